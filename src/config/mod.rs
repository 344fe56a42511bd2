//! Configuration: raw serde structs read from TOML, then [`RawConfig::validate`] (pure, no IO)
//! turns them into the validated types the rest of the gateway uses.
//!
//! Runs on the main thread before anything starts. Every error names the key, the bad value and
//! what is expected; unknown keys are errors (`deny_unknown_fields`). Connectivity and the
//! cluster schema are checked later, at start-up (`app`), never here.

mod de;
mod raw;

pub use raw::{RawConfig, RawDeadLetter, RawSource};

use std::fmt;
use std::path::Path;
use std::time::Duration;

use scylla::frame::types::Consistency;

/// A configuration error: which key, which value, what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        /// Path given on the command line.
        path: String,
        /// Underlying IO error.
        source: std::io::Error,
    },
    /// TOML syntax error; toml's message carries the line and column.
    #[error("config file `{path}`: {message}")]
    Parse {
        /// Path given on the command line.
        path: String,
        /// The TOML parser's message (includes the location).
        message: String,
    },
    /// A key that does not exist, a required key that is missing, or a value of the wrong type.
    #[error("config file `{path}`{}: `{key}`: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Key {
        /// Path given on the command line.
        path: String,
        /// Full key path, for example `route[2].source.commit_interval_ms`.
        key: String,
        /// Line of the value in the file, when known.
        line: Option<usize>,
        /// What is wrong: the value as read and what is expected.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("`{key}` = `{value}`: {expected}")]
    Invalid {
        /// Dotted key path, for example `route[0].table`.
        key: String,
        /// The offending value as written.
        value: String,
        /// What is expected instead.
        expected: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, value: impl fmt::Display, expected: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// How to reach the database cluster.
    pub cluster: ClusterConfig,
    /// Cores, island threads and per-core limits.
    pub runtime: RuntimeConfig,
    /// Source → table routes; at least one unless the ingest API is on.
    pub routes: Vec<RouteConfig>,
    /// The gRPC ingest API, if served.
    pub ingest: Option<IngestConfig>,
    /// Address of the Prometheus metrics endpoint, if served.
    pub admin: Option<std::net::SocketAddr>,
}

/// The gRPC ingest API's addresses and limits.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Shared address every core accepts on.
    pub listen: std::net::SocketAddr,
    /// First per-core port (core `i` listens on `core_port_base + i`); 0 = none.
    pub core_port_base: u16,
    /// Host published for per-core endpoints.
    pub advertise_host: String,
    /// Largest accepted request message in bytes.
    pub message_bytes_max: usize,
}

impl IngestConfig {
    /// Address of core `core`'s own port, if per-core ports are on.
    pub fn core_addr(&self, core: usize) -> Option<std::net::SocketAddr> {
        if self.core_port_base == 0 {
            return None;
        }
        let port = u16::try_from(usize::from(self.core_port_base) + core).ok()?;
        Some(std::net::SocketAddr::new(self.listen.ip(), port))
    }
}

/// How to reach the ScyllaDB / Cassandra cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `host:port` contact points.
    pub contact_points: Vec<String>,
    /// Data center whose replicas are preferred; `None` lets the driver pick.
    pub local_datacenter: Option<String>,
    /// Consistency level of every write.
    pub consistency: Consistency,
    /// Client-side timeout of one request.
    pub request_timeout: Duration,
    /// How long start-up keeps retrying an unreachable cluster.
    pub connect_wait: Duration,
}

/// How many cores run executors and how much work each may hold.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Number of data-plane cores; `None` means one per physical core (hwlocality).
    pub cores: Option<usize>,
    /// Worker threads of the tokio driver island.
    pub island_threads: usize,
    /// Rows a core may have in flight (decoded, not yet acknowledged by the database).
    pub inflight_rows_per_core_max: usize,
    /// Rows per UNLOGGED batch on the gRPC write path (rows of one replica and shard only);
    /// 1 sends single writes.
    pub write_batch_rows_max: usize,
    /// How long a graceful shutdown may take before in-flight work is abandoned (and replayed
    /// from the source on the next start).
    pub shutdown_deadline: Duration,
    /// The per-core spools, if configured.
    pub spool: Option<SpoolConfig>,
    /// `runtime.gateway_id` as written; see [`Config::gateway_id`] for the default.
    pub gateway_id: Option<String>,
}

/// Where and how big the per-core spools are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Directory; core `n` uses `<dir>/core-<n>`.
    pub dir: std::path::PathBuf,
    /// Segment size at which a segment is sealed.
    pub segment_bytes: u64,
    /// Live bytes per core beyond which spooled routes pause.
    pub cap_bytes_per_core: u64,
    /// Bytes of spooled records per core written from memory; beyond, they are read back from
    /// disk once the database keeps up.
    pub memory_bytes_per_core: u64,
}

/// When a route acknowledges a source message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// After every row of the message is written (or it is dead-lettered).
    Written,
    /// Once the message is durable in the receiving core's spool; rows are written after.
    Spooled,
}

/// One route: a source feeding one or more tables.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Unique route name, used in logs, metrics and dead-letter headers.
    pub name: String,
    /// When source messages are acknowledged.
    pub ack: AckMode,
    /// Where messages come from.
    pub source: SourceConfig,
    /// Message format.
    pub format: Format,
    /// Tables a message is written to (one `table` + `[route.columns]`, or `[[route.target]]`).
    pub targets: Vec<TargetConfig>,
    /// A field whose text names the one target table of each message (`table_from`).
    pub table_from: Option<FieldRef>,
    /// CEL expression; a message for which it is false is skipped (acknowledged, not written).
    pub filter: Option<String>,
    /// CEL expression; a message for which it is true deletes its rows instead of writing them.
    pub delete_when: Option<String>,
    /// Whether a message without a payload (a Kafka tombstone) deletes its rows. Default true.
    pub delete_on_tombstone: bool,
    /// Time to live of written cells.
    pub ttl: Option<TtlConfig>,
    /// Write timestamp from a field instead of the source's time and position.
    pub timestamp: Option<TimestampConfig>,
    /// Where messages that cannot be written go.
    pub dead_letter: DeadLetterConfig,
}

impl RouteConfig {
    /// `keyspace.table` of every target, comma-separated (logs and metric labels).
    pub fn tables_label(&self) -> String {
        let names: Vec<String> = self.targets.iter().map(TargetConfig::qualified).collect();
        names.join(",")
    }
}

/// One table a route writes to.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Keyspace.
    pub keyspace: String,
    /// Table.
    pub table: String,
    /// CEL expression; the message is written to this table only when it is true.
    pub when: Option<String>,
    /// Column → field mappings; empty means "every column from the field of the same name".
    pub columns: Vec<ColumnMapping>,
}

impl TargetConfig {
    /// `keyspace.table`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.keyspace, self.table)
    }
}

/// Message formats a route can decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per message.
    Json,
    /// One Protobuf message per message, decoded with a descriptor loaded at start-up.
    Protobuf(ProtobufConfig),
    /// One FlatBuffers buffer per message, verified and read with this binary schema (`.bfbs`,
    /// from `flatc --binary --schema`).
    FlatBuffers(std::path::PathBuf),
    /// The payload is UTF-8 text, mapped with `$payload`.
    Text,
    /// The payload is opaque bytes, mapped with `$payload`.
    Bytes,
}

/// Where a Protobuf route's message type is defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtobufConfig {
    /// Fully qualified message name, for example `shop.v1.Order`.
    pub message: String,
    /// A serialized `FileDescriptorSet` (`protoc --descriptor_set_out`, `buf build -o`).
    pub descriptor_set: Option<std::path::PathBuf>,
    /// `.proto` files compiled at start-up (instead of a descriptor set).
    pub files: Vec<std::path::PathBuf>,
    /// Include directories for `files`; default: each file's directory.
    pub includes: Vec<std::path::PathBuf>,
}

/// Time to live of written cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtlConfig {
    /// The same TTL for every row, in seconds.
    Seconds(i32),
    /// Seconds read from the message; a message without it uses the table's default.
    Field(FieldRef),
}

/// Unit of a numeric timestamp field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeUnit {
    /// Seconds since the epoch.
    Seconds,
    /// Milliseconds since the epoch.
    Millis,
    /// Microseconds since the epoch (CQL's write-time unit).
    Micros,
}

/// Write timestamp read from the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampConfig {
    /// Where it is read from: a number in `unit`, or RFC 3339 text.
    pub field: FieldRef,
    /// Unit of numeric values.
    pub unit: TimeUnit,
}

/// One column fed from one place in the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    /// Column name in the table.
    pub column: String,
    /// Where its value comes from.
    pub field: FieldRef,
}

/// A place in a message a column value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldRef {
    /// The message key, as UTF-8 text (`$key`).
    Key,
    /// A path into the message key decoded as a JSON object (`$key.id`).
    KeyPath(Vec<String>),
    /// A header or property, as text (`$header.trace-id`): Kafka headers, NATS headers, AMQP
    /// headers.
    Header(String),
    /// The source's name: Kafka topic, JetStream stream, queue, subject or endpoint (`$source`).
    Source,
    /// The message's own subject (`$subject`): the NATS or JetStream subject it was published
    /// on (a wildcard subscription's real subject), the RabbitMQ routing key; unset for Kafka
    /// and ZeroMQ.
    Subject,
    /// Kafka partition (`$partition`); unset for other sources.
    Partition,
    /// Offset or sequence within the source (`$position`).
    Position,
    /// Message time, epoch milliseconds (`$timestamp`).
    Timestamp,
    /// The raw payload (`$payload`): bytes for `blob` columns, UTF-8 text otherwise.
    Payload,
    /// A path of object keys into the decoded payload (`customer.address.city`).
    Path(Vec<String>),
    /// A computed value: a CEL expression over `msg`, `key`, `headers`, `source`, `partition`,
    /// `position` and `timestamp` (`{ expr = "..." }`).
    Expr(String),
}

impl fmt::Display for FieldRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldRef::Key => f.write_str("$key"),
            FieldRef::KeyPath(parts) => write!(f, "$key.{}", parts.join(".")),
            FieldRef::Header(name) => write!(f, "$header.{name}"),
            FieldRef::Source => f.write_str("$source"),
            FieldRef::Subject => f.write_str("$subject"),
            FieldRef::Partition => f.write_str("$partition"),
            FieldRef::Position => f.write_str("$position"),
            FieldRef::Timestamp => f.write_str("$timestamp"),
            FieldRef::Payload => f.write_str("$payload"),
            FieldRef::Path(parts) => f.write_str(&parts.join(".")),
            FieldRef::Expr(source) => write!(f, "expr `{source}`"),
        }
    }
}

/// Source of a route.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A Kafka consumer group on one topic.
    Kafka(KafkaSourceConfig),
    /// A JetStream durable pull consumer.
    JetStream(JetStreamSourceConfig),
    /// A RabbitMQ queue consumer.
    Amqp(AmqpSourceConfig),
    /// A ZeroMQ PULL or SUB socket.
    Zmq(ZmqSourceConfig),
    /// A core NATS subscription.
    Nats(NatsSourceConfig),
}

/// Core NATS subscription settings of one route.
#[derive(Debug, Clone)]
pub struct NatsSourceConfig {
    /// Server URL.
    pub url: String,
    /// Subject (wildcards allowed).
    pub subject: String,
    /// Queue group: gateways in one group split the messages.
    pub queue_group: Option<String>,
}

/// ZeroMQ socket settings of one route.
#[derive(Debug, Clone)]
pub struct ZmqSourceConfig {
    /// PULL or SUB.
    pub socket: ZmqSocketKind,
    /// `tcp://host:port`, `ipc://path`, ...
    pub endpoint: String,
    /// Bind (true) or connect (false).
    pub bind: bool,
    /// SUB prefixes.
    pub subscribe: Vec<String>,
}

/// The ZeroMQ socket types a route can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZmqSocketKind {
    /// PULL: load-balanced from PUSH senders.
    Pull,
    /// SUB: every message of the subscribed prefixes from PUB senders.
    Sub,
}

/// RabbitMQ consumer settings of one route.
#[derive(Debug, Clone)]
pub struct AmqpSourceConfig {
    /// AMQP URL.
    pub url: String,
    /// Queue.
    pub queue: String,
    /// Unacked deliveries the broker hands out.
    pub prefetch: u16,
    /// Declare the queue (durable) when missing.
    pub declare: bool,
}

/// JetStream consumer settings of one route.
#[derive(Debug, Clone)]
pub struct JetStreamSourceConfig {
    /// NATS server URL.
    pub url: String,
    /// Stream name.
    pub stream: String,
    /// Subjects to create the stream with if it does not exist (empty: it must exist).
    pub subjects: Vec<String>,
    /// Durable consumer name.
    pub durable: String,
    /// Delivered-but-unacked bound.
    pub max_ack_pending: i64,
    /// Redelivery delay of an unacked message.
    pub ack_wait: Duration,
}

/// Kafka consumer settings of one route.
#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers, comma separated as librdkafka expects.
    pub brokers: String,
    /// Topic to consume.
    pub topic: String,
    /// Consumer group id; gateways sharing it split the partitions.
    pub group_id: String,
    /// Where a group without committed offsets starts.
    pub start_from: StartFrom,
    /// How often stored offsets are committed.
    pub commit_interval: Duration,
    /// Extra librdkafka properties, passed through as written.
    pub properties: Vec<(String, String)>,
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest retained message.
    Earliest,
    /// Only messages produced after the group first joins.
    Latest,
}

/// Dead-letter destination of a route.
#[derive(Debug, Clone)]
pub enum DeadLetterConfig {
    /// A Kafka topic; the original key and payload are kept, headers carry the reason and the
    /// source coordinates.
    Kafka {
        /// Bootstrap servers.
        brokers: String,
        /// Topic name.
        topic: String,
    },
    /// A NATS subject; payload kept, headers carry the reason and the source coordinates.
    Nats {
        /// Server URL.
        url: String,
        /// Subject.
        subject: String,
    },
    /// A RabbitMQ exchange; payload kept, headers carry the reason and the source coordinates.
    Amqp {
        /// AMQP URL.
        url: String,
        /// Exchange (`""`: the default exchange).
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// A ScyllaDB table (created at start-up if missing): one row per dead letter, partitioned
    /// by route and day.
    Table {
        /// Keyspace (must exist).
        keyspace: String,
        /// Table.
        table: String,
    },
}

impl Config {
    /// This gateway's stable name: `runtime.gateway_id`, else `<hostname>-<port>` of the
    /// ingest (else admin) listener when its port is fixed; `None` when neither gives one.
    /// Reads the host name, so call it at start-up, not from `validate`.
    pub fn gateway_id(&self) -> Option<String> {
        if let Some(id) = &self.runtime.gateway_id {
            return Some(id.clone());
        }
        let port = [
            self.ingest.as_ref().map(|i| i.listen.port()),
            self.admin.map(|a| a.port()),
        ]
        .into_iter()
        .flatten()
        .find(|&port| port != 0)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(48)
            .collect();
        let host = if host.is_empty() { "localhost".to_string() } else { host };
        Some(format!("{host}-{port}"))
    }

    /// Reads and validates a config file. Does no network IO.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        de::parse(text, origin)?.validate()
    }
}

/// Longest identifier Cassandra accepts for keyspaces and tables.
const IDENTIFIER_LEN_MAX: usize = 48;

/// Checks a CQL identifier from config: letters, digits, underscore, not starting with a digit.
/// Statements quote identifiers, so case is kept as written.
pub(crate) fn validate_identifier(key: &str, value: &str) -> Result<(), ConfigError> {
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || !rest_ok || value.len() > IDENTIFIER_LEN_MAX {
        return Err(ConfigError::invalid(
            key,
            value,
            format!(
                "a CQL identifier: a letter or `_`, then letters, digits or `_`, at most {IDENTIFIER_LEN_MAX} characters"
            ),
        ));
    }
    Ok(())
}

/// `amqp://user:password@host` with the password hidden, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            let user = credentials.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests;
