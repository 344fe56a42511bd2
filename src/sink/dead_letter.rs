//! Dead-letter destinations: a Kafka topic, a NATS subject, a RabbitMQ exchange (through the
//! `broker` publishers) or a ScyllaDB table. Created at start-up ([`DeadLetterSink::open`]); `send` is awaited on the core that gave
//! up on the message (or by `shardgate replay`). The original key and payload are kept byte for
//! byte; headers (table: columns) carry why and where from, the message time and write timestamp
//! (so a replay writes the cells the original write would have) and the original headers
//! (`shardgate.header.<name>`). A dead letter is retried until the destination confirms it: the
//! source message is only acknowledged after that, so nothing is dropped silently.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimeuuid;

use super::broker::amqp::AmqpPublisher;
use super::broker::kafka::KafkaPublisher;
use super::broker::nats::NatsPublisher;

/// Header names on every dead letter.
pub mod headers {
    /// Route that gave up on the message.
    pub const ROUTE: &str = "shardgate.route";
    /// Stable reason code, e.g. `not_json`, `bad_value`, `write_rejected`.
    pub const REASON_CODE: &str = "shardgate.reason.code";
    /// Human-readable reason.
    pub const REASON: &str = "shardgate.reason";
    /// Source topic (Kafka).
    pub const SOURCE_TOPIC: &str = "shardgate.source.topic";
    /// Source partition, decimal (Kafka).
    pub const SOURCE_PARTITION: &str = "shardgate.source.partition";
    /// Source offset, decimal (Kafka).
    pub const SOURCE_OFFSET: &str = "shardgate.source.offset";
    /// Source stream (JetStream).
    pub const SOURCE_STREAM: &str = "shardgate.source.stream";
    /// Source subject (NATS).
    pub const SOURCE_SUBJECT: &str = "shardgate.source.subject";
    /// Source stream sequence, decimal (JetStream).
    pub const SOURCE_SEQUENCE: &str = "shardgate.source.sequence";
    /// Source queue (RabbitMQ).
    pub const SOURCE_QUEUE: &str = "shardgate.source.queue";
    /// Routing key the message was published with (RabbitMQ).
    pub const SOURCE_ROUTING_KEY: &str = "shardgate.source.routing_key";
    /// Whether the broker had delivered the message before (RabbitMQ).
    pub const SOURCE_REDELIVERED: &str = "shardgate.source.redelivered";
    /// Socket endpoint (ZeroMQ).
    pub const SOURCE_ENDPOINT: &str = "shardgate.source.endpoint";
    /// Table a job read the row from (processing jobs).
    pub const SOURCE_TABLE: &str = "shardgate.source.table";
    /// Index of the scan split the row was in (processing jobs).
    pub const SOURCE_SPLIT: &str = "shardgate.source.split";
    /// Original message key, when the destination has no key of its own (NATS), as text.
    pub const KEY: &str = "shardgate.key";
    /// Message time at the source, epoch milliseconds.
    pub const SOURCE_TIMESTAMP: &str = "shardgate.source.timestamp";
    /// Write timestamp (microseconds) the message's rows were to be written with.
    pub const WRITE_TIMESTAMP: &str = "shardgate.write_timestamp_us";
    /// Prefix of the original message's headers.
    pub const HEADER_PREFIX: &str = "shardgate.header.";
    /// Every source coordinate header.
    pub const SOURCE_COORDINATES: &[&str] = &[
        SOURCE_TOPIC,
        SOURCE_PARTITION,
        SOURCE_OFFSET,
        SOURCE_STREAM,
        SOURCE_SUBJECT,
        SOURCE_SEQUENCE,
        SOURCE_QUEUE,
        SOURCE_ROUTING_KEY,
        SOURCE_REDELIVERED,
        SOURCE_ENDPOINT,
    ];
}

const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest reason text put in a header.
const REASON_BYTES_MAX: usize = 1024;

/// What failed, and where the message came from.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// Route that gave up.
    pub route: &'a str,
    /// Stable reason code.
    pub reason_code: &'a str,
    /// Human-readable reason.
    pub reason: &'a str,
    /// Source coordinates as (header, value).
    pub source: Vec<(&'static str, String)>,
    /// The original message's text headers.
    pub headers: &'a [(String, String)],
    /// Original key.
    pub key: Option<&'a [u8]>,
    /// Original payload.
    pub payload: Option<&'a [u8]>,
}

impl DeadLetter<'_> {
    /// Every header, reason text cut to [`REASON_BYTES_MAX`].
    fn headers(&self) -> Vec<(String, String)> {
        let mut all = vec![
            (headers::ROUTE.to_string(), self.route.to_string()),
            (headers::REASON_CODE.to_string(), self.reason_code.to_string()),
            (
                headers::REASON.to_string(),
                truncate(self.reason, REASON_BYTES_MAX).to_string(),
            ),
        ];
        all.extend(self.source.iter().map(|(k, v)| (k.to_string(), v.clone())));
        all.extend(
            self.headers
                .iter()
                .map(|(k, v)| (format!("{}{k}", headers::HEADER_PREFIX), v.clone())),
        );
        all
    }

    /// [`DeadLetter::headers`], plus the original key as text for destinations without keys
    /// (NATS, RabbitMQ).
    fn headers_with_key(&self) -> Vec<(String, String)> {
        let mut all = self.headers();
        if let Some(key) = self.key {
            all.push((headers::KEY.to_string(), String::from_utf8_lossy(key).into_owned()));
        }
        all
    }
}

/// Where a route's dead letters go.
pub enum DeadLetterSink {
    /// A Kafka topic.
    Kafka(KafkaPublisher),
    /// A NATS subject (captured by a JetStream stream if it should be durable).
    Nats(NatsPublisher),
    /// A RabbitMQ exchange, with publisher confirms.
    Amqp(Box<AmqpPublisher>),
    /// A ScyllaDB table.
    Table(DeadLetterTable),
}

impl DeadLetterSink {
    /// Opens the destination `config` names (on the island). Returns the NATS client it
    /// created, if any, for the caller to flush at shutdown.
    pub async fn open(
        config: &crate::config::DeadLetterConfig,
        route: &str,
        session: &Arc<Session>,
    ) -> Result<(DeadLetterSink, Option<async_nats::Client>), String> {
        use crate::config::DeadLetterConfig;
        match config {
            DeadLetterConfig::Kafka {
                brokers,
                topic,
                security,
            } => {
                let publisher = KafkaPublisher::new(brokers, topic, security.as_ref())
                    .map_err(|e| format!("cannot create the dead-letter producer: {e}"))?;
                let keys = "`dead_letter.security`, or the source's `security` when the dead letters use its brokers";
                publisher
                    .reach(keys)
                    .await
                    .map_err(|e| format!("dead-letter topic `{topic}`: cannot reach Kafka at `{brokers}`: {e}"))?;
                Ok((DeadLetterSink::Kafka(publisher), None))
            }
            DeadLetterConfig::Nats { url, subject, security } => {
                let client = super::broker::nats::connect(url, route, security.as_ref())
                    .await
                    .map_err(|e| format!("dead-letter subject: {e:#}"))?;
                Ok((
                    DeadLetterSink::Nats(NatsPublisher::new(client.clone(), subject)),
                    Some(client),
                ))
            }
            DeadLetterConfig::Amqp {
                url,
                exchange,
                routing_key,
                security,
            } => AmqpPublisher::open(url, exchange, routing_key, security.as_ref())
                .await
                .map(|e| (DeadLetterSink::Amqp(Box::new(e)), None))
                .map_err(|reason| format!("dead-letter exchange: {reason}")),
            DeadLetterConfig::Table { keyspace, table } => DeadLetterTable::open(Arc::clone(session), keyspace, table)
                .await
                .map(|t| (DeadLetterSink::Table(t), None)),
        }
    }

    /// Sends one dead letter, retrying until the broker confirms it.
    pub async fn send(&self, letter: &DeadLetter<'_>) {
        let mut backoff = RETRY_BACKOFF_MIN;
        loop {
            let (destination, result) = match self {
                DeadLetterSink::Kafka(topic) => (
                    topic.topic(),
                    topic.publish(letter.key, letter.payload, &letter.headers()).await,
                ),
                DeadLetterSink::Nats(subject) => {
                    let payload = letter.payload.map(<[u8]>::to_vec).unwrap_or_default();
                    (
                        subject.subject(),
                        subject.publish(&letter.headers_with_key(), payload).await,
                    )
                }
                DeadLetterSink::Table(table) => (table.name.as_str(), table.send_once(letter).await),
                DeadLetterSink::Amqp(exchange) => {
                    let payload = letter.payload.unwrap_or_default();
                    (
                        exchange.exchange.as_str(),
                        exchange.publish(letter.headers_with_key(), payload).await,
                    )
                }
            };
            match result {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(route = letter.route, destination, %error, "dead letter not delivered, retrying");
                    // tokio's timer: works on the cores (the island's handle is entered there) and
                    // in `shardgate replay`.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
    }
}

/// A dead-letter table, created if it does not exist: one row per dead letter, partitioned by
/// route and UTC day so no partition grows without bound.
pub struct DeadLetterTable {
    session: Arc<Session>,
    insert: PreparedStatement,
    name: String,
}

/// Columns of a dead-letter table (`CREATE TABLE` in [`DeadLetterTable::open`]).
pub type DeadLetterRow = (
    String,
    String,
    CqlTimeuuid,
    Option<String>,
    Option<String>,
    Option<HashMap<String, String>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

impl DeadLetterTable {
    /// Creates `keyspace.table` if needed (the keyspace must exist) and prepares the insert.
    pub async fn open(session: Arc<Session>, keyspace: &str, table: &str) -> Result<DeadLetterTable, String> {
        let name = format!("{keyspace}.{table}");
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {name} (route text, day text, id timeuuid, reason_code text, reason text, \
             headers map<text, text>, key blob, payload blob, PRIMARY KEY ((route, day), id))"
        );
        session
            .query_unpaged(create, &[])
            .await
            .map_err(|e| format!("cannot create dead-letter table `{name}`: {e}"))?;
        session
            .await_schema_agreement()
            .await
            .map_err(|e| format!("dead-letter table `{name}`: {e}"))?;
        let mut insert = session
            .prepare(format!(
                "INSERT INTO {name} (route, day, id, reason_code, reason, headers, key, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await
            .map_err(|e| format!("dead-letter table `{name}`: {e}"))?;
        insert.set_is_idempotent(true);
        Ok(DeadLetterTable { session, insert, name })
    }

    /// `keyspace.table`.
    pub fn name(&self) -> &str {
        &self.name
    }

    async fn send_once(&self, letter: &DeadLetter<'_>) -> Result<(), String> {
        let now = chrono::Utc::now();
        let node: [u8; 6] = rand_node();
        let id = CqlTimeuuid::from(uuid::Uuid::now_v1(&node));
        let headers: HashMap<String, String> = letter.headers().into_iter().collect();
        let values = (
            letter.route,
            now.format("%Y-%m-%d").to_string(),
            id,
            letter.reason_code,
            truncate(letter.reason, REASON_BYTES_MAX),
            headers,
            letter.key,
            letter.payload,
        );
        self.session
            .execute_unpaged(&self.insert, values)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A random node id for version-1 UUIDs (multicast bit set, as RFC 4122 asks of random ids).
fn rand_node() -> [u8; 6] {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let mut node = [0u8; 6];
    node.copy_from_slice(&bytes[..6]);
    node[0] |= 0x01;
    node
}

/// Cuts `text` to at most `bytes_max` bytes on a character boundary.
fn truncate(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(super::truncate("héllo", 2), "h");
        assert_eq!(super::truncate("héllo", 3), "hé");
        assert_eq!(super::truncate("abc", 10), "abc");
    }
}
