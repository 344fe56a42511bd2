//! Destinations of rows. Only ScyllaDB (and Cassandra, which speaks the same protocol) today.

pub mod scylla;
