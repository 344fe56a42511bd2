//! gRPC ingest API (`proto/shardgate/v1/ingest.proto`): typed rows in, written on the core that
//! owns them. `server` serves tonic routes on glommio sockets; `service` routes and writes rows;
//! `convert` turns typed values into CQL values; `flat` reads FlatBuffers row batches
//! (`schemas/row_batch.fbs`) into the same typed rows.

pub mod codec;
pub mod convert;
pub mod flat;
pub mod limit;
pub mod server;
pub mod service;
pub mod status;

/// Generated messages, server and client of `shardgate.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("shardgate.v1");
}

/// Code flatc 25 generated from `schemas/row_batch.fbs` (`flatc --rust -o src/ingest
/// schemas/row_batch.fbs`); not edited by hand.
#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used, missing_docs, unused_imports, dead_code, mismatched_lifetime_syntaxes)]
mod row_batch_generated;
