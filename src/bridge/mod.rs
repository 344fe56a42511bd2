//! Sources that feed routes (the way in). `message` is what a source hands over; `handoff` the
//! bounded per-core queues it hands over on; `route` the per-core half every source shares (map,
//! place on the owner core, write through `sink::scylla::writer`, dead-letter, complete); one
//! folder per broker for its consumer (`kafka`: poll thread and watermark; `nats`: core
//! subscriptions and the JetStream puller; `amqp`: RabbitMQ consumer; `zeromq`: PULL / SUB
//! socket thread). Each folder's `mod.rs` says which thread its consumer runs on.

pub mod amqp;
pub mod handoff;
pub mod kafka;
pub mod message;
pub mod nats;
pub mod route;
pub mod zeromq;
