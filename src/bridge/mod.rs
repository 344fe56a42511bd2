//! Sources that feed routes. One folder per broker with the same files in each (`mod.rs` for
//! the consumer and per-core writer, `dead_letter.rs`, `watermark.rs` where acks are ordered).

pub mod kafka;
