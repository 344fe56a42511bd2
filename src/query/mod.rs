//! The query API (`shardgate.v1.Query`): `Get`, `Execute` / `ExecuteStream` and `PlanScan` /
//! `Scan` over gRPC, served on the ingest listeners by every core. `service` answers the RPCs
//! (statements prepared and cached per core, binds converted by `wire::convert`, results back
//! as typed values); `plan` cuts a table's token ring into scan splits by replica, shard and
//! core; `pinned` sends each scan page to the replica and shard its range lies on; `token` seals
//! and opens the page tokens that let a read resume.
//!
//! Threads: every core. A `Get` whose key another core owns, and each page of a scan split
//! another core owns, run on that core through the mesh (`runtime::mesh`); the database work of
//! a read is issued by the core that owns its tokens.

pub mod pinned;
pub mod plan;
pub mod service;
pub mod token;
