//! Code flatc 25 generated from `schemas/*.fbs`; not edited by hand (`flatc --rust -o
//! src/wire/generated schemas/row_batch.fbs schemas/spool_record.fbs`, then each
//! `*_generated.rs` renamed to its schema's name).

#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used, missing_docs, unused_imports, dead_code, mismatched_lifetime_syntaxes)]
pub mod row_batch;

#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used, missing_docs, unused_imports, dead_code, mismatched_lifetime_syntaxes)]
pub mod spool_record;
