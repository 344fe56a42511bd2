//! A source message on its way to a core, and where it came from. Every source copies what it
//! receives into a [`SourceMessage`]; its [`Origin`] — implemented by each source in its own
//! folder — says how it is settled and what the dead-letter headers say about it. A message a route spools is encoded as a spool record
//! ([`SourceMessage::spool_record`]) and comes back from the drain as one with a spooled origin
//! ([`SourceMessage::from_record`]). Data only: built on a source's thread, used on cores.

use bytes::Bytes;

use crate::mapping::{write_timestamp_us, Envelope};
use crate::sink::dead_letter::headers;
use crate::spool::frame::Framed;
use crate::spool::record::{RouteEncoder, RouteRecord};

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
    /// Message key (Kafka; ZeroMQ first frame), if any. `Bytes`, so a source may hand a whole
    /// poll's keys and payloads over in one buffer (Kafka) or pass its client's buffer on
    /// (NATS) instead of one allocation per message.
    pub key: Option<Bytes>,
    /// Headers or properties whose values are text (Kafka, NATS, JetStream, AMQP).
    pub headers: Vec<(String, String)>,
    /// Message payload; `None` for a Kafka tombstone.
    pub payload: Option<Bytes>,
    /// Where it came from: how to acknowledge it and what to tell the dead-letter destination.
    pub origin: Box<dyn Origin>,
}

/// How a message ends: its rows written, or its dead letter delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Every row is confirmed by the database.
    Written,
    /// Its dead letter is confirmed by the destination (or the route's filter skipped it).
    DeadLettered,
}

/// A source's handle on one message: how it is acknowledged and where it came from. Each source
/// implements it in its own folder (`kafka::ack`, `nats::ack`, `amqp::ack`, `zeromq`), so the
/// shared route engine never names a broker; a spooled message's handle is [`Spooled`].
pub trait Origin: Send + Sync + std::fmt::Debug {
    /// Settles the message at its source (Kafka: a completion to the poll thread; JetStream:
    /// ack, or term once dead-lettered; RabbitMQ: ack, or reject without requeue) by adding it
    /// to `settlements`, which hands it over with the others of its write. Called once, on the
    /// core that finishes the message; never blocks it.
    fn settle(&self, settlement: Settlement, settlements: &mut Settlements<'_>);
    /// Its source coordinates as dead-letter headers; `source` is the route's topic, stream,
    /// queue, subject or endpoint, `position` the message's.
    fn coordinates(&self, source: &str, position: i64) -> Vec<(&'static str, String)>;
    /// The message's own subject: NATS or JetStream subject, AMQP routing key.
    fn subject(&self) -> Option<&str> {
        None
    }
    /// The Kafka partition it came from.
    fn partition(&self) -> Option<i32> {
        None
    }
    /// The Kafka assignment epoch it was read in (a rewind or a new assignment starts a new
    /// one); `None` for other sources and for a message that is the spool's.
    fn assignment(&self) -> Option<u64> {
        None
    }
    /// Whether settling reaches the source (false once the message is the spool's).
    fn acknowledges(&self) -> bool {
        true
    }
}

/// The settlements a core gathers over one write (or one hand-off's filtered messages, or one
/// spool append), per source acknowledger, handed over together when dropped: one send to the
/// poll thread or ack task per write instead of one per message. Each source keeps its own
/// [`SettleGroup`] (`kafka::ack`, `nats::ack`, `amqp::ack`), so the route engine never names a
/// broker. A message is added once it is finished, so handing over later never settles
/// anything early; dropped mid-write (a stop), it hands over what was finished.
pub struct Settlements<'r> {
    route: &'r str,
    groups: Vec<Box<dyn SettleGroup>>,
    /// About how many messages will be added, for a group to size itself once.
    expected: usize,
}

/// One acknowledger's share of [`Settlements`]: the settlements its origins added.
pub trait SettleGroup: std::any::Any + Send {
    /// Hands what was gathered to the acknowledger; `route` names it in logs.
    fn hand_over(self: Box<Self>, route: &str);
    /// For [`Settlements::add`] to find a source's group among the others.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl<'r> Settlements<'r> {
    /// Nothing gathered yet, for route `route`.
    pub fn new(route: &'r str) -> Settlements<'r> {
        Settlements::expecting(route, 0)
    }

    /// Nothing gathered yet, for route `route`, about `expected` messages to come (a write's).
    pub fn expecting(route: &'r str, expected: usize) -> Settlements<'r> {
        Settlements {
            route,
            groups: Vec::new(),
            expected,
        }
    }

    /// About how many messages will be added: a group made by [`Settlements::add`] can take
    /// room for them at once instead of growing one message at a time.
    pub fn expected(&self) -> usize {
        self.expected
    }

    /// Adds to the group of type `G` that `mine` recognizes (the same acknowledger), made by
    /// `new` if there is none yet. A write's messages mostly share one.
    pub fn add<G: SettleGroup>(
        &mut self,
        mine: impl Fn(&G) -> bool,
        new: impl FnOnce() -> G,
        add: impl FnOnce(&mut G),
    ) {
        for group in &mut self.groups {
            if let Some(group) = group.as_any_mut().downcast_mut::<G>() {
                if mine(group) {
                    add(group);
                    return;
                }
            }
        }
        let mut group = new();
        add(&mut group);
        self.groups.push(Box::new(group));
    }

    /// Hands everything gathered so far over now (dropping does too).
    pub fn hand_over(&mut self) {
        for group in self.groups.drain(..) {
            group.hand_over(self.route);
        }
    }
}

impl Drop for Settlements<'_> {
    fn drop(&mut self) {
        self.hand_over();
    }
}

/// A settlement an ack task on the island takes, and what its [`AckTaskGroup`] logs when that
/// task is gone (the messages are redelivered).
pub trait TaskSettlement: Send + 'static {
    /// Logged when the task is gone.
    const GONE: &'static str;
    /// Whether that is expected (a RabbitMQ channel replaced after a reconnect): logged at
    /// debug level, else as a warning.
    const GONE_EXPECTED: bool;
}

/// The [`SettleGroup`] of a source whose acknowledger is a task on the island fed over an
/// unbounded channel (the JetStream route's ack task, a RabbitMQ channel's): the write's
/// settlements go over in one send.
pub struct AckTaskGroup<T> {
    acks: tokio::sync::mpsc::UnboundedSender<Vec<T>>,
    settled: Vec<T>,
}

impl<T: TaskSettlement> AckTaskGroup<T> {
    /// Adds `settled` to `settlements`' group for the task behind `acks`.
    pub fn add(settlements: &mut Settlements<'_>, acks: &tokio::sync::mpsc::UnboundedSender<Vec<T>>, settled: T) {
        let expected = settlements.expected();
        settlements.add(
            |group: &AckTaskGroup<T>| group.acks.same_channel(acks),
            || AckTaskGroup {
                acks: acks.clone(),
                settled: Vec::with_capacity(expected),
            },
            |group| group.settled.push(settled),
        );
    }
}

impl<T: TaskSettlement> SettleGroup for AckTaskGroup<T> {
    fn hand_over(self: Box<Self>, route: &str) {
        let messages = self.settled.len();
        if self.acks.send(self.settled).is_err() {
            if T::GONE_EXPECTED {
                tracing::debug!(route, messages, "{}", T::GONE);
            } else {
                tracing::warn!(route, messages, "{}", T::GONE);
            }
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// A message that is the spool's: acknowledged at its source when it became durable (`ack =
/// "spooled"`), or replayed from the spool after a restart. Nothing left to settle; its
/// coordinates stay for dead letters.
#[derive(Debug)]
pub struct Spooled {
    /// Its source coordinates, for dead letters.
    coordinates: Vec<(&'static str, String)>,
    /// Kafka partition, if it came from Kafka.
    partition: Option<i32>,
    /// Which coordinate is the message's own subject or routing key, found once: the mapper
    /// asks for it per message.
    subject: Option<usize>,
}

impl Spooled {
    /// The spool's handle on a message with these source coordinates.
    pub fn new(coordinates: Vec<(&'static str, String)>, partition: Option<i32>) -> Spooled {
        let subject = coordinates
            .iter()
            .position(|(name, _)| *name == headers::SOURCE_SUBJECT || *name == headers::SOURCE_ROUTING_KEY);
        Spooled {
            coordinates,
            partition,
            subject,
        }
    }
}

impl Origin for Spooled {
    fn settle(&self, _: Settlement, _: &mut Settlements<'_>) {}

    fn coordinates(&self, _: &str, _: i64) -> Vec<(&'static str, String)> {
        self.coordinates.clone()
    }

    fn subject(&self) -> Option<&str> {
        self.subject
            .and_then(|i| self.coordinates.get(i))
            .map(|(_, value)| value.as_str())
    }

    fn partition(&self) -> Option<i32> {
        self.partition
    }

    fn acknowledges(&self) -> bool {
        false
    }
}

impl SourceMessage {
    /// A message at `position` with no payload and an origin that settles nowhere (unit tests).
    #[cfg(test)]
    pub fn test_message(position: i64) -> SourceMessage {
        SourceMessage {
            position,
            timestamp_ms: None,
            write_timestamp_us: None,
            key: None,
            headers: Vec::new(),
            payload: None,
            origin: Box::new(Spooled::new(Vec::new(), None)),
        }
    }

    /// The Kafka partition it came from, if any.
    pub fn partition(&self) -> Option<i32> {
        self.origin.partition()
    }

    /// The message's own subject: NATS or JetStream subject, AMQP routing key.
    pub fn subject(&self) -> Option<&str> {
        self.origin.subject()
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
        self.origin.coordinates(source, self.position)
    }
}

impl SourceMessage {
    /// The spool record body of this message, received by `route` from `source`.
    pub fn spool_record(&self, route: &str, source: &str) -> Vec<u8> {
        let mut framed = Framed::default();
        self.encode_record(
            route,
            &self.source_coordinates(source),
            &mut RouteEncoder::default(),
            &mut framed,
        );
        framed.body(0).map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// Hands the message to the spool: encodes its spool record (with `encoder`) as the next of
    /// `records` and settles nothing itself — its origin becomes [`Spooled`] (the coordinates
    /// computed once for both), and the old origin is returned for the caller to settle at the
    /// source.
    pub fn into_spool(
        &mut self,
        route: &str,
        source: &str,
        encoder: &mut RouteEncoder,
        records: &mut Framed,
    ) -> Box<dyn Origin> {
        let coordinates = self.source_coordinates(source);
        self.encode_record(route, &coordinates, encoder, records);
        let spooled = Box::new(Spooled::new(coordinates, self.partition()));
        std::mem::replace(&mut self.origin, spooled)
    }

    fn encode_record(
        &self,
        route: &str,
        coordinates: &[(&'static str, String)],
        encoder: &mut RouteEncoder,
        records: &mut Framed,
    ) {
        encoder.encode(
            route,
            self.position,
            self.timestamp_ms,
            self.write_timestamp_us(),
            self.key.as_deref(),
            self.payload.as_deref(),
            self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            coordinates.iter().map(|(n, v)| (*n, v.as_str())),
            self.partition(),
            records,
        );
    }

    /// A message read back from the spool.
    pub fn from_record(record: RouteRecord) -> SourceMessage {
        let coordinates = record
            .coordinates
            .into_iter()
            .filter_map(|(name, value)| {
                let name = headers::SOURCE_COORDINATES.iter().find(|n| n.as_bytes() == name)?;
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
            origin: Box::new(Spooled::new(coordinates, record.partition)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::record::{self, Record};

    #[test]
    fn spool_records_round_trip_every_field() {
        let work = SourceMessage {
            position: 42,
            timestamp_ms: Some(1_700_000_000_000),
            write_timestamp_us: Some(1_700_000_000_000_123),
            key: Some(bytes::Bytes::from_static(b"k")),
            headers: vec![("tenant".into(), "acme".into())],
            payload: None,
            origin: Box::new(Spooled::new(
                vec![
                    (headers::SOURCE_STREAM, "orders".to_string()),
                    (headers::SOURCE_SUBJECT, "orders.created".to_string()),
                ],
                None,
            )),
        };
        let bytes = bytes::Bytes::from(work.spool_record("orders", "orders-subject"));
        let Ok(Record::Route { route, message }) = record::decode(&bytes) else {
            panic!("not a route record");
        };
        assert_eq!(route, "orders");
        let back = SourceMessage::from_record(message);
        assert_eq!(
            (back.position, back.timestamp_ms, back.write_timestamp_us),
            (42, Some(1_700_000_000_000), Some(1_700_000_000_000_123))
        );
        assert_eq!(back.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(back.payload, None, "a tombstone stays a tombstone");
        assert_eq!(back.headers, work.headers);
        assert_eq!(back.subject(), Some("orders.created"));
        assert!(
            !back.origin.acknowledges(),
            "a message from the spool has nothing to settle"
        );
        assert_eq!(back.source_coordinates("ignored").len(), 2);
    }
}
