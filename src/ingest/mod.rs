//! The gRPC ingest RPCs (`proto/shardgate/v1/ingest.proto`): typed rows in, written on the core
//! that owns them. `service` admits a batch, binds its rows, places them and hands them to the
//! ScyllaDB write engine (`sink::scylla::writer`), or to the core's spool first
//! (`ACK_MODE_SPOOLED`). Transport, codec, limits and status codes are `server`'s; wire types and
//! value conversion are `wire`'s.
//!
//! Threads: every core; a call's futures stay on the core that accepted its connection.

pub mod service;
