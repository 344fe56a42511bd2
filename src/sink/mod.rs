//! Everything that writes out: ScyllaDB (`scylla`: the session, the schema and prepare path, the
//! one write engine), message brokers (`broker`: reusable publishers) and the dead-letter
//! destinations built on both (`dead_letter`).

pub mod broker;
pub mod dead_letter;
pub mod scylla;
