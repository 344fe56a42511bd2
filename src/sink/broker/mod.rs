//! Producers to message brokers: a Kafka topic, a NATS subject, a RabbitMQ exchange. Each
//! `publish` returns once the broker has the message (Kafka ack, NATS flush, AMQP confirm), so a
//! caller acknowledges its own input only after that. Dead letters go out through them today;
//! processing jobs will publish their results through the same publishers.
//!
//! Threads: created on the island at start-up; `publish` is awaited by the core (or the replay
//! runtime) that sends, the IO runs on the island or librdkafka's threads.

pub mod amqp;
pub mod kafka;
pub mod nats;
