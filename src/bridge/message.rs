//! A source message on its way to a core, and where it came from. Every source copies what it
//! receives into a [`SourceMessage`]; its [`Origin`] says how it is acknowledged and what the
//! dead-letter headers say about it. A message a route spools is encoded as a spool record
//! ([`SourceMessage::spool_record`]) and comes back from the drain as one with a spooled origin
//! ([`SourceMessage::from_record`]). Data only: built on a source's thread, used on cores.

use crate::mapping::{write_timestamp_us, Envelope};
use crate::sink::dead_letter::headers;
use crate::spool::record::{self, RouteRecord};

/// One source message, copied out of its client library, on its way to a core.
#[derive(Debug)]
pub struct SourceMessage {
    /// Position in its partition or stream (Kafka offset, JetStream stream sequence): orders
    /// messages of the same millisecond in the write timestamp.
    pub position: i64,
    /// Message time in milliseconds (Kafka create or log-append time, JetStream publish time).
    pub timestamp_ms: Option<i64>,
    /// Write timestamp the source assigned (Kafka: per-partition clock), else derived from
    /// `timestamp_ms` and `position`.
    pub write_timestamp_us: Option<i64>,
    /// Message key (Kafka; ZeroMQ first frame), if any.
    pub key: Option<Vec<u8>>,
    /// Headers or properties whose values are text (Kafka, NATS, JetStream, AMQP).
    pub headers: Vec<(String, String)>,
    /// Message payload; `None` for a Kafka tombstone.
    pub payload: Option<Vec<u8>>,
    /// Where it came from: how to acknowledge it and what to tell the dead-letter destination.
    pub origin: Origin,
}

/// Where a message came from.
#[derive(Debug)]
pub enum Origin {
    /// A Kafka partition; the poll thread stores offsets from the contiguous watermark.
    Kafka {
        /// Source partition.
        partition: i32,
        /// Watermark epoch the completion must carry.
        epoch: u64,
    },
    /// A JetStream consumer; the message is acked (or terminated once dead-lettered) itself.
    JetStream {
        /// Subject the message was published on.
        subject: String,
        /// The message, for its ack.
        message: Box<async_nats::jetstream::Message>,
    },
    /// A RabbitMQ queue; the delivery is acked, or rejected without requeue once dead-lettered.
    Amqp {
        /// Source queue.
        queue: String,
        /// Routing key it was published with.
        routing_key: String,
        /// Whether the broker delivered it before.
        redelivered: bool,
        /// Acks on the delivering channel.
        acker: lapin::acker::Acker,
    },
    /// A core NATS subscription: nothing to acknowledge (at-most-once).
    Nats {
        /// Subject the message was published on.
        subject: String,
    },
    /// A ZeroMQ socket: nothing to acknowledge (at-most-once).
    Zmq {
        /// The socket's endpoint.
        endpoint: String,
    },
    /// Already acknowledged: the message is in the core's spool (`ack = "spooled"`), written
    /// from there; or replayed from the spool after a restart.
    Spooled {
        /// Its source coordinates, for dead letters.
        coordinates: Vec<(&'static str, String)>,
        /// Kafka partition, if it came from Kafka.
        partition: Option<i32>,
    },
}

impl SourceMessage {
    /// The Kafka partition it came from, if any.
    pub fn partition(&self) -> Option<i32> {
        match &self.origin {
            Origin::Kafka { partition, .. } => Some(*partition),
            Origin::Spooled { partition, .. } => *partition,
            _ => None,
        }
    }

    /// The message's own subject: NATS or JetStream subject, AMQP routing key.
    pub fn subject(&self) -> Option<&str> {
        match &self.origin {
            Origin::JetStream { subject, .. } | Origin::Nats { subject } => Some(subject),
            Origin::Amqp { routing_key, .. } => Some(routing_key),
            Origin::Spooled { coordinates, .. } => coordinates
                .iter()
                .find(|(name, _)| *name == headers::SOURCE_SUBJECT || *name == headers::SOURCE_ROUTING_KEY)
                .map(|(_, value)| value.as_str()),
            Origin::Kafka { .. } | Origin::Zmq { .. } => None,
        }
    }

    /// What the mapper sees of this message.
    pub fn envelope<'a>(&'a self, source: &'a str) -> Envelope<'a> {
        Envelope {
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            headers: &self.headers,
            source,
            subject: self.subject(),
            partition: self.partition(),
            position: self.position,
            timestamp_ms: self.timestamp_ms,
        }
    }

    /// The write timestamp of this message's rows: the source's clock (Kafka), else derived
    /// from its time and position.
    pub fn write_timestamp_us(&self) -> i64 {
        self.write_timestamp_us
            .unwrap_or_else(|| write_timestamp_us(self.timestamp_ms, self.position))
    }

    /// Source coordinates, message time and write timestamp as dead-letter headers.
    pub fn coordinates(&self, source: &str) -> Vec<(&'static str, String)> {
        let mut coordinates = self.source_coordinates(source);
        if let Some(ms) = self.timestamp_ms {
            coordinates.push((headers::SOURCE_TIMESTAMP, ms.to_string()));
        }
        coordinates.push((headers::WRITE_TIMESTAMP, self.write_timestamp_us().to_string()));
        coordinates
    }

    /// Where the message came from, as dead-letter headers.
    pub fn source_coordinates(&self, source: &str) -> Vec<(&'static str, String)> {
        match &self.origin {
            Origin::Spooled { coordinates, .. } => coordinates.clone(),
            Origin::Kafka { partition, .. } => vec![
                (headers::SOURCE_TOPIC, source.to_string()),
                (headers::SOURCE_PARTITION, partition.to_string()),
                (headers::SOURCE_OFFSET, self.position.to_string()),
            ],
            Origin::JetStream { subject, .. } => vec![
                (headers::SOURCE_STREAM, source.to_string()),
                (headers::SOURCE_SUBJECT, subject.clone()),
                (headers::SOURCE_SEQUENCE, self.position.to_string()),
            ],
            Origin::Amqp {
                queue,
                routing_key,
                redelivered,
                ..
            } => vec![
                (headers::SOURCE_QUEUE, queue.clone()),
                (headers::SOURCE_ROUTING_KEY, routing_key.clone()),
                (headers::SOURCE_REDELIVERED, redelivered.to_string()),
            ],
            Origin::Nats { subject } => vec![
                (headers::SOURCE_SUBJECT, subject.clone()),
                (headers::SOURCE_SEQUENCE, self.position.to_string()),
            ],
            Origin::Zmq { endpoint } => vec![
                (headers::SOURCE_ENDPOINT, endpoint.clone()),
                (headers::SOURCE_SEQUENCE, self.position.to_string()),
            ],
        }
    }
}

impl SourceMessage {
    /// The spool record of this message, received by `route` from `source`.
    pub fn spool_record(&self, route: &str, source: &str) -> Vec<u8> {
        let coordinates = self.source_coordinates(source);
        record::encode_route(
            route,
            self.position,
            self.timestamp_ms,
            self.write_timestamp_us(),
            self.key.as_deref(),
            self.payload.as_deref(),
            self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            coordinates.iter().map(|(n, v)| (*n, v.as_str())),
            self.partition(),
        )
    }

    /// The origin a message has once it is the spool's: nothing left to acknowledge, its
    /// coordinates kept for dead letters.
    pub fn spooled_origin(&self, source: &str) -> Origin {
        Origin::Spooled {
            coordinates: self.source_coordinates(source),
            partition: self.partition(),
        }
    }

    /// A message read back from the spool.
    pub fn from_record(record: RouteRecord) -> SourceMessage {
        let coordinates = record
            .coordinates
            .into_iter()
            .filter_map(|(name, value)| {
                let name = headers::SOURCE_COORDINATES.iter().find(|n| **n == name)?;
                Some((*name, value))
            })
            .collect();
        SourceMessage {
            position: record.position,
            timestamp_ms: record.timestamp_ms,
            write_timestamp_us: record.write_timestamp_us,
            key: record.key,
            headers: record.headers,
            payload: record.payload,
            origin: Origin::Spooled {
                coordinates,
                partition: record.partition,
            },
        }
    }
}

/// A Kafka message that is written or dead-lettered, reported to the poll thread.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// Source partition.
    pub partition: i32,
    /// Watermark epoch.
    pub epoch: u64,
    /// Source offset.
    pub offset: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_records_round_trip_every_field() {
        let work = SourceMessage {
            position: 42,
            timestamp_ms: Some(1_700_000_000_000),
            write_timestamp_us: Some(1_700_000_000_000_123),
            key: Some(b"k".to_vec()),
            headers: vec![("tenant".into(), "acme".into())],
            payload: None,
            origin: Origin::Nats {
                subject: "orders.created".into(),
            },
        };
        let bytes = work.spool_record("orders", "orders-subject");
        let Ok(record::Record::Route(record)) = record::decode(&bytes) else {
            panic!("not a route record");
        };
        assert_eq!(record.route, "orders");
        let back = SourceMessage::from_record(record);
        assert_eq!(
            (back.position, back.timestamp_ms, back.write_timestamp_us),
            (42, Some(1_700_000_000_000), Some(1_700_000_000_000_123))
        );
        assert_eq!(back.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(back.payload, None, "a tombstone stays a tombstone");
        assert_eq!(back.headers, work.headers);
        assert_eq!(back.subject(), Some("orders.created"));
        assert!(matches!(back.origin, Origin::Spooled { ref coordinates, partition: None } if coordinates.len() == 2));
    }
}
