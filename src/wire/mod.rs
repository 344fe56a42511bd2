//! What travels, with no IO: the crate's vocabulary on the wire. `proto` is the generated
//! `shardgate.v1` package (`proto/shardgate/v1/{types,topology,ingest}.proto`); `convert` turns
//! typed values into CQL values of a column's type; `raw` keeps protobuf rows encoded and reads
//! them straight into CQL cells (`server_view` is the ingest server built on it); `flat` reads
//! FlatBuffers row batches
//! (`schemas/row_batch.fbs`); `generated` holds flatc's output for the row batch and the spool
//! record, in one place.
//!
//! Threads: pure functions, run by whichever thread holds the bytes — a core serving a gRPC
//! call, the shard-aware client, the spool's drain.

pub mod convert;
pub mod flat;
pub mod generated;
pub mod raw;

/// Generated messages, services and clients of `shardgate.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("shardgate.v1");
}

/// The ingest service's server side with `RowBatch` as [`raw::RowBatch`] (rows kept encoded):
/// its `WriteRequest` and `WriteStreamRequest` are wire-identical to [`proto`]'s, and every
/// other message is [`proto`]'s (`build.rs`).
#[allow(clippy::all, missing_docs)]
pub mod server_view {
    include!(concat!(env!("OUT_DIR"), "/server_view/shardgate.v1.rs"));
}
