//! shardgate: a thread-per-core, shard-native gateway between message systems and ScyllaDB.
//!
//! Layout (see README's design section): `config` (pure validation), `runtime` (pinned glommio
//! executors + the tokio driver island), `topology` (row → owner core), `mapping` (formats and
//! columns), `sink::scylla` (session, prepared writes, retries), `bridge` (sources), `app`
//! (wiring), `telemetry` (logs).

pub mod app;
pub mod bridge;
pub mod client;
pub mod config;
/// Demo, bench and test tooling; only with the `devkit` feature (and in unit tests).
#[cfg(any(test, feature = "devkit"))]
pub mod devkit;
pub mod ingest;
pub mod mapping;
pub mod reference;
pub mod replay;
pub mod runtime;
pub mod sink;
pub mod spool;
pub mod telemetry;
pub mod topology;
