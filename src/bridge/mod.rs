//! Sources that feed routes (the way in). `message` is what a source hands over; `handoff` the
//! bounded per-core queues it hands over on; `route` the per-core half every source shares (map,
//! place on the owner core, write through `sink::scylla::writer`, dead-letter, complete); one
//! folder per broker for its consumer (`kafka`: poll thread and watermark; `nats`: core
//! subscriptions and the JetStream puller; `amqp`: RabbitMQ consumer; `zeromq`: PULL / SUB
//! socket thread); `tap` what folds a route's rows beside it (a stream job). Each folder's `mod.rs` says which thread its consumer runs on.

pub mod amqp;
pub mod handoff;
pub mod kafka;
pub mod message;
pub mod nats;
pub mod route;
pub mod source;
pub mod tap;
pub mod zeromq;

use crate::config::SourceConfig;
use source::{Handoff, Opened, Start};

/// Opens a route's source, whichever broker it is: the one `match` over source kinds.
pub fn open_source(config: &SourceConfig, start: &Start<'_>, handoff: Handoff) -> anyhow::Result<Opened> {
    match config {
        SourceConfig::Kafka(config) => source::open::<kafka::KafkaSource>(config, start, handoff),
        SourceConfig::JetStream(config) => source::open::<nats::JetStreamSource>(config, start, handoff),
        SourceConfig::Nats(config) => source::open::<nats::NatsSource>(config, start, handoff),
        SourceConfig::Amqp(config) => source::open::<amqp::AmqpSource>(config, start, handoff),
        SourceConfig::Zmq(config) => source::open::<zeromq::ZmqSource>(config, start, handoff),
    }
}
