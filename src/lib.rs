//! shardgate: a thread-per-core, shard-native gateway between message systems and ScyllaDB.
//!
//! Layout (README's design section has the table with each module's threads): `config` (pure
//! validation), `runtime` (pinned glommio executors + the tokio driver island), `topology` (row →
//! owner core), `wire` (protos, value conversion, FlatBuffers), `server` (gRPC on glommio, status
//! codes), `ingest` (the ingest RPCs), `mapping` (formats and columns), `sink` (ScyllaDB: one
//! write engine; broker publishers; dead letters), `spool` (per-core durable log and its
//! service), `bridge` (sources), `replay`, `client`, `app` (wiring), `telemetry` (logs, metrics).

pub mod app;
pub mod auth;
pub mod bridge;
pub mod client;
pub mod config;
/// Demo, bench and test tooling; only with the `devkit` feature (and in unit tests).
#[cfg(any(test, feature = "devkit"))]
pub mod devkit;
pub mod export;
pub mod ingest;
pub mod job;
pub mod mapping;
pub mod query;
pub mod reference;
pub mod runtime;
pub mod server;
pub mod sink;
pub mod spool;
pub mod telemetry;
pub mod tls;
pub mod top;
pub mod topology;
pub mod wire;
