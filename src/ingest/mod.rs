//! gRPC ingest API (`proto/shardgate/v1/ingest.proto`): typed rows in, written on the core that
//! owns them. `server` serves tonic routes on glommio sockets; `service` routes and writes rows;
//! `convert` turns typed values into CQL values.

pub mod convert;
pub mod server;
pub mod service;
pub mod status;

/// Generated messages, server and client of `shardgate.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("shardgate.v1");
}
