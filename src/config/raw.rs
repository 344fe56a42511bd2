//! The TOML file as written. Field doc comments are the user documentation of each key.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use scylla::frame::types::Consistency;
use serde::Deserialize;

use super::de;

use super::{
    validate_identifier, AckMode, AmqpSourceConfig, ClusterConfig, ColumnMapping, Config, ConfigError,
    DeadLetterConfig, FieldRef, Format, IngestConfig, JetStreamSourceConfig, KafkaSourceConfig, NatsSourceConfig,
    ProtobufConfig, RouteConfig, RuntimeConfig, SourceConfig, SpoolConfig, StartFrom, TargetConfig, TimeUnit,
    TimestampConfig, TtlConfig, ZmqSocketKind, ZmqSourceConfig,
};

/// Top level of a shardgate config file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[cluster]`: how to reach the database.
    pub cluster: RawCluster,
    /// `[runtime]`: cores and limits; every key has a default.
    #[serde(default)]
    pub runtime: RawRuntime,
    /// `[[route]]`: one or more tables per entry, fed by one source.
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
    /// `[ingest]`: the gRPC ingest API. Absent: no gRPC port.
    #[serde(default)]
    pub ingest: Option<RawIngest>,
    /// `[admin]`: metrics endpoint. Absent: no admin port.
    #[serde(default)]
    pub admin: Option<RawAdmin>,
}

/// `[ingest]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    /// Shared gRPC address every core accepts on, e.g. `127.0.0.1:50051`.
    pub listen: String,
    /// First per-core port: core `i` also listens on `core_port_base + i` (same host). 0 turns
    /// per-core ports off (the shard-aware client then falls back to the shared port).
    #[serde(default)]
    pub core_port_base: u16,
    /// Host published to clients for the per-core ports. Default: the host of `listen`.
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// Largest accepted request message in bytes (1024 to 268435456); a larger one is refused
    /// `TOO_LARGE` naming this key, and a stream goes on with its next message.
    #[serde(default = "default_message_bytes_max")]
    pub message_bytes_max: usize,
}

/// `[admin]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Address of the Prometheus endpoint (`/metrics`), e.g. `127.0.0.1:9190`.
    pub listen: String,
}

fn default_message_bytes_max() -> usize {
    4 << 20
}

/// `[cluster]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// Contact points, `host:port`, for example `["127.0.0.1:9042"]`.
    pub contact_points: Vec<String>,
    /// Data center to prefer, for example `datacenter1`. Optional.
    #[serde(default)]
    pub local_datacenter: Option<String>,
    /// Write consistency: `one`, `two`, `three`, `quorum`, `all`, `local_quorum`, `each_quorum`,
    /// `local_one`, `any`.
    #[serde(default = "default_consistency")]
    #[schemars(extend("enum" = ["any", "one", "two", "three", "quorum", "all", "local_quorum", "each_quorum", "local_one"]))]
    pub consistency: String,
    /// Client-side timeout of one request, in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How long start-up keeps trying to reach the cluster, in milliseconds, before it gives
    /// up with the error (0: one attempt). The default waits 5 minutes, so a gateway restarted during a
    /// database outage waits for it, its spool intact.
    #[serde(default = "default_connect_wait_ms")]
    pub connect_wait_ms: u64,
}

/// `[runtime]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// Data-plane cores: `"auto"` (one per physical core) or a number.
    #[serde(default = "default_cores")]
    #[schemars(schema_with = "cores_schema")]
    pub cores: toml::Value,
    /// Worker threads of the tokio driver island (database and broker sockets).
    #[serde(default = "default_island_threads")]
    pub island_threads: usize,
    /// Rows a core may have in flight before its sources stop reading.
    #[serde(default = "default_inflight_rows")]
    pub inflight_rows_per_core_max: usize,
    /// Graceful shutdown deadline in milliseconds: in-flight messages finish within it, the rest
    /// replays after the next start.
    #[serde(default = "default_shutdown_deadline_ms")]
    pub shutdown_deadline_ms: u64,
    /// Rows per UNLOGGED batch on the gRPC write path, grouped by replica and shard (1 = single
    /// writes); the default is measured, see the README.
    #[serde(default = "default_write_batch_rows")]
    pub write_batch_rows_max: usize,
    /// Directory of the per-core spools (`<dir>/core-<n>`), on the NVMe. Required by routes
    /// with `ack = "spooled"`.
    #[serde(default)]
    pub spool_dir: Option<String>,
    /// A spool segment is sealed at this size, in MiB (1 to 2048).
    #[serde(default = "default_spool_segment_mib")]
    pub spool_segment_mib: u64,
    /// Bytes of spool per core, in MiB, beyond which spooled routes pause (backpressure).
    #[serde(default = "default_spool_cap_mib")]
    pub spool_cap_mib_per_core: u64,
    /// Spooled records per core, in MiB, that are written straight from memory; beyond (the
    /// database slow or down) acknowledged records wait on disk only and are read back when it
    /// keeps up again, so memory stays bounded.
    #[serde(default = "default_spool_memory_mib")]
    pub spool_memory_mib_per_core: u64,
    /// Stable name of this gateway, unique among the gateways sharing a Kafka consumer group.
    /// Kafka routes join their group as static members (`group.instance.id` =
    /// `shardgate.<gateway_id>.<route>`), so a gateway restarted within the group's session
    /// timeout gets its partitions back at once instead of after that timeout. Default:
    /// `<hostname>-<port>` of `ingest.listen`, else of `admin.listen`, when that port is not 0;
    /// with neither, Kafka routes join as dynamic members. Letters, digits, `.`, `_` and `-`.
    #[serde(default)]
    pub gateway_id: Option<String>,
}

fn default_spool_segment_mib() -> u64 {
    64
}
fn default_spool_cap_mib() -> u64 {
    1024
}
fn default_spool_memory_mib() -> u64 {
    64
}

impl Default for RawRuntime {
    fn default() -> Self {
        RawRuntime {
            cores: default_cores(),
            island_threads: default_island_threads(),
            inflight_rows_per_core_max: default_inflight_rows(),
            shutdown_deadline_ms: default_shutdown_deadline_ms(),
            write_batch_rows_max: default_write_batch_rows(),
            spool_dir: None,
            spool_segment_mib: default_spool_segment_mib(),
            spool_cap_mib_per_core: default_spool_cap_mib(),
            spool_memory_mib_per_core: default_spool_memory_mib(),
            gateway_id: None,
        }
    }
}

/// `[[route]]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique name of the route.
    pub name: String,
    /// Target table as `keyspace.table` (one target; or `[[route.target]]` for several).
    pub table: Option<String>,
    /// Message format; `protobuf` needs `[route.protobuf]`, `flatbuffers` needs
    /// `[route.flatbuffers]`, `text` and `bytes` map the payload with `"$payload"`.
    #[serde(default = "default_format")]
    #[schemars(extend("enum" = ["json", "protobuf", "flatbuffers", "text", "bytes"]))]
    pub format: String,
    /// `[route.protobuf]`: the message type of a `protobuf` route.
    pub protobuf: Option<RawProtobuf>,
    /// `[route.flatbuffers]`: the binary schema of a `flatbuffers` route.
    pub flatbuffers: Option<RawFlatBuffers>,
    /// `[route.source]`: where messages come from.
    pub source: RawSource,
    /// `[route.columns]` of the single `table`: `column = "field.path"`, `"$key"`, ... or
    /// `{ expr = "CEL" }`. Omitted: every column is read from the top-level field of its name.
    #[serde(default)]
    pub columns: BTreeMap<String, RawColumn>,
    /// `[[route.target]]`: several tables, each with its own columns and condition.
    #[serde(default)]
    pub target: Vec<RawTarget>,
    /// A field whose text names the target table of each message.
    pub table_from: Option<String>,
    /// CEL expression: messages for which it is false are skipped.
    pub filter: Option<String>,
    /// CEL expression: messages for which it is true delete their rows.
    pub delete_when: Option<String>,
    /// Whether a message without payload (Kafka tombstone) deletes its rows.
    #[serde(default = "default_true")]
    pub delete_on_tombstone: bool,
    /// TTL of written cells: seconds, or a field holding seconds.
    #[serde(default)]
    #[schemars(schema_with = "ttl_schema")]
    pub ttl: Option<toml::Value>,
    /// Field holding the write time (RFC 3339 text or a number in `timestamp_unit`).
    pub timestamp: Option<String>,
    /// Unit of a numeric `timestamp` field.
    #[schemars(extend("enum" = ["s", "ms", "us"], "default" = "ms"))]
    pub timestamp_unit: Option<String>,
    /// `written` (ack after the database write, default) or `spooled` (ack once the message is
    /// in the core's spool on disk; needs `runtime.spool_dir`).
    #[serde(default)]
    #[schemars(extend("enum" = ["written", "spooled"], "default" = "written"))]
    pub ack: Option<String>,
    /// `[route.dead_letter]`: where undecodable or unwritable messages go. Required.
    #[schemars(required)]
    pub dead_letter: Option<RawDeadLetter>,
}

/// A column's source: a field reference (`"customer.id"`, `"$key"`, `"$header.tenant"`, ...),
/// or a table `{ expr = "CEL" }` computing the value.
#[derive(Debug, JsonSchema)]
#[serde(untagged)]
pub enum RawColumn {
    /// `"field.path"`, `"$key"`, `"$header.name"`, ...
    Field(String),
    /// `{ expr = "msg.qty * msg.price" }`
    Expr {
        /// CEL source.
        expr: String,
    },
}

impl<'de> Deserialize<'de> for RawColumn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ColumnVisitor)
    }
}

/// Reads a column source: a string, or a table with the one key `expr`.
struct ColumnVisitor;

impl<'de> serde::de::Visitor<'de> for ColumnVisitor {
    type Value = RawColumn;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field path in quotes such as \"customer.id\" or \"$key\", or a table { expr = \"CEL\" }")
    }

    fn visit_str<E: serde::de::Error>(self, field: &str) -> Result<RawColumn, E> {
        Ok(RawColumn::Field(field.to_string()))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawColumn, A::Error> {
        /// The one key of an expression column.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ExprColumn {
            expr: String,
        }
        let column = ExprColumn::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(RawColumn::Expr { expr: column.expr })
    }
}

/// `[[route.target]]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    /// `keyspace.table`.
    pub table: String,
    /// CEL expression: the message goes to this table only when it is true.
    pub when: Option<String>,
    /// `[route.target.columns]`, as `[route.columns]`.
    #[serde(default)]
    pub columns: BTreeMap<String, RawColumn>,
}

/// `[route.flatbuffers]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFlatBuffers {
    /// Path of the binary schema (`flatc --binary --schema x.fbs` writes `x.bfbs`).
    pub schema: String,
}

/// `[route.protobuf]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawProtobuf {
    /// Fully qualified message name.
    pub message: String,
    /// Path of a serialized `FileDescriptorSet`.
    pub descriptor_set: Option<String>,
    /// `.proto` files to compile at start-up.
    #[serde(default)]
    pub files: Vec<String>,
    /// Include directories for `files`.
    #[serde(default)]
    pub includes: Vec<String>,
}

/// `[route.source]`: where the route's messages come from, chosen by `kind`.
#[derive(Debug, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RawSource {
    /// A Kafka consumer group on one topic. Gateways naming the same `group_id` split the
    /// partitions; offsets are committed only for messages written or dead-lettered.
    Kafka(RawKafkaSource),
    /// A durable JetStream pull consumer with explicit acks: a message is acked once written,
    /// terminated once dead-lettered. Gateways naming the same `durable` share its messages.
    Jetstream(RawJetStreamSource),
    /// A consumer on a RabbitMQ queue: `basic.ack` once written, `basic.reject` (no requeue)
    /// once dead-lettered. Gateways on the same queue are competing consumers.
    Rabbitmq(RawRabbitMqSource),
    /// A core NATS subscription. At-most-once (core NATS has no acknowledgement) unless the
    /// route sets `ack = "spooled"`; use `jetstream` for at-least-once from the broker.
    /// `$source` maps the subscription subject, `$subject` each message's own subject.
    Nats(RawNatsSource),
    /// A ZeroMQ PULL or SUB socket. At-most-once (ZeroMQ has no acknowledgement) unless the
    /// route sets `ack = "spooled"`. Multipart messages: the first frame is the key, the last
    /// the payload.
    Zeromq(RawZeroMqSource),
}

impl RawSource {
    /// The `kind` values, in documentation order.
    pub const KINDS: &'static [&'static str] = &["kafka", "jetstream", "rabbitmq", "nats", "zeromq"];
}

impl<'de> Deserialize<'de> for RawSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (kind, table) = de::tagged(deserializer)?;
        Ok(match kind.as_str() {
            "kafka" => RawSource::Kafka(de::variant(table)?),
            "jetstream" => RawSource::Jetstream(de::variant(table)?),
            "rabbitmq" => RawSource::Rabbitmq(de::variant(table)?),
            "nats" => RawSource::Nats(de::variant(table)?),
            "zeromq" => RawSource::Zeromq(de::variant(table)?),
            other => return Err(de::unknown_kind(other, Self::KINDS)),
        })
    }
}

/// `[route.source]` with `kind = "kafka"`: a consumer group on one topic. Gateways naming the
/// same `group_id` split the partitions.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaSource {
    /// Bootstrap servers, for example `["127.0.0.1:9092"]`.
    pub brokers: Vec<String>,
    /// Topic to consume.
    pub topic: String,
    /// Consumer group id. Gateways with the same id split the partitions.
    pub group_id: String,
    /// Where a group without committed offsets starts.
    #[serde(default = "default_start_from")]
    #[schemars(extend("enum" = ["earliest", "latest"]))]
    pub start_from: String,
    /// How often stored offsets are committed, in milliseconds (1 to 600000).
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Extra librdkafka consumer properties, for example `"session.timeout.ms" = "6000"`: how
    /// long the group waits for a gateway that stopped answering before its partitions go to
    /// another gateway (librdkafka's default is 45 s). Keys shardgate sets itself are refused:
    /// `bootstrap.servers`, `group.id`, `group.instance.id`, `enable.auto.commit`,
    /// `enable.auto.offset.store`, `auto.offset.reset`, `auto.commit.interval.ms`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// `[route.source]` with `kind = "jetstream"`: a durable pull consumer with explicit acks.
/// Gateways naming the same `durable` share its messages.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJetStreamSource {
    /// NATS server URL, for example `nats://127.0.0.1:4222`.
    pub url: String,
    /// Stream name.
    pub stream: String,
    /// Subjects of the stream, used only to create it when it does not exist. Empty: the
    /// stream must exist.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Durable consumer name (created with explicit acks if it does not exist).
    pub durable: String,
    /// Messages delivered and not yet acked, per consumer: the backpressure bound (1 to
    /// 1000000).
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: i64,
    /// How long the server waits for an ack before redelivering, in milliseconds (1000 to
    /// 600000).
    #[serde(default = "default_ack_wait_ms")]
    pub ack_wait_ms: u64,
}

/// `[route.source]` with `kind = "rabbitmq"`: a consumer on a queue. Gateways on the same
/// queue are competing consumers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRabbitMqSource {
    /// AMQP URL, for example `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Queue to consume.
    pub queue: String,
    /// Deliveries the broker hands out unacked (`basic.qos`): the backpressure bound (1 to
    /// 65535).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Declare the queue (durable) if it does not exist; `false` requires it to exist.
    #[serde(default = "default_true")]
    pub declare: bool,
}

/// `[route.source]` with `kind = "nats"`: a core NATS subscription. At-most-once (core NATS
/// has no acknowledgement) unless the route sets `ack = "spooled"`; use `jetstream` for
/// at-least-once from the broker.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawNatsSource {
    /// NATS server URL, for example `nats://127.0.0.1:4222`.
    pub url: String,
    /// Subject; wildcards `*` and `>` allowed. `$source` maps this subscription subject,
    /// `$subject` each message's own subject.
    pub subject: String,
    /// Queue group: gateways naming the same group split the messages. Optional.
    #[serde(default)]
    pub queue_group: Option<String>,
}

/// `[route.source]` with `kind = "zeromq"`: a PULL or SUB socket. At-most-once (ZeroMQ has no
/// acknowledgement) unless the route sets `ack = "spooled"`. Multipart messages: the first
/// frame is the key, the last the payload.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawZeroMqSource {
    /// Socket type.
    #[schemars(extend("enum" = ["pull", "sub"]))]
    pub socket: String,
    /// Endpoint, for example `tcp://127.0.0.1:5557` or `ipc:///run/orders.sock`.
    pub endpoint: String,
    /// Bind the endpoint (true) or connect to it (false).
    #[serde(default)]
    pub bind: bool,
    /// SUB only: topic prefixes to subscribe to; `[""]` is everything.
    #[serde(default = "default_subscribe")]
    pub subscribe: Vec<String>,
}

fn default_subscribe() -> Vec<String> {
    vec![String::new()]
}

fn default_prefetch() -> u16 {
    1024
}
fn default_true() -> bool {
    true
}
fn default_max_ack_pending() -> i64 {
    4096
}
fn default_ack_wait_ms() -> u64 {
    30_000
}

/// `[route.dead_letter]`: where messages that cannot be decoded, mapped or written go, with
/// their reason code (see the reason codes reference). Required on every route.
#[derive(Debug, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RawDeadLetter {
    /// Letters produced to a Kafka topic: key and bytes as received, the reason and source
    /// coordinates in `shardgate.*` headers. `shardgate replay` reads them back.
    Kafka(RawKafkaDeadLetter),
    /// Letters published with `shardgate.*` headers to a NATS subject (capture it in a
    /// JetStream stream to keep them).
    Nats(RawNatsDeadLetter),
    /// Letters published (persistent, with publisher confirms) to a RabbitMQ exchange, the
    /// reason in AMQP headers.
    Rabbitmq(RawRabbitMqDeadLetter),
    /// Letters as rows of a ScyllaDB table of the route's cluster (`route`, `day`, `id`,
    /// `reason_code`, `reason`, `headers`, `key`, `payload`), created if missing, partitioned
    /// by route and day. `shardgate replay` reads them back.
    Table(RawTableDeadLetter),
}

impl RawDeadLetter {
    /// The `kind` values, in documentation order.
    pub const KINDS: &'static [&'static str] = &["kafka", "nats", "rabbitmq", "table"];
}

impl<'de> Deserialize<'de> for RawDeadLetter {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (kind, table) = de::tagged(deserializer)?;
        Ok(match kind.as_str() {
            "kafka" => RawDeadLetter::Kafka(de::variant(table)?),
            "nats" => RawDeadLetter::Nats(de::variant(table)?),
            "rabbitmq" => RawDeadLetter::Rabbitmq(de::variant(table)?),
            "table" => RawDeadLetter::Table(de::variant(table)?),
            other => return Err(de::unknown_kind(other, Self::KINDS)),
        })
    }
}

/// `[route.dead_letter]` with `kind = "kafka"`: letters produced to a topic, key and bytes as
/// received, the reason and source coordinates in headers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaDeadLetter {
    /// Bootstrap servers; default: the route's source brokers (required when the source is
    /// not Kafka).
    #[serde(default)]
    pub brokers: Option<Vec<String>>,
    /// Dead-letter topic (not the source topic).
    pub topic: String,
}

/// `[route.dead_letter]` with `kind = "nats"`: letters published with headers to a subject
/// (capture it in a JetStream stream to keep them).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawNatsDeadLetter {
    /// NATS server URL; default: the route's source URL (required when the source is not
    /// NATS or JetStream).
    #[serde(default)]
    pub url: Option<String>,
    /// Dead-letter subject.
    pub subject: String,
}

/// `[route.dead_letter]` with `kind = "rabbitmq"`: letters published (persistent, with
/// publisher confirms) to an exchange, the reason in AMQP headers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRabbitMqDeadLetter {
    /// AMQP URL; default: the route's source URL (required when the source is not RabbitMQ).
    #[serde(default)]
    pub url: Option<String>,
    /// Exchange; `""` is the default exchange, which routes to the queue named by
    /// `routing_key`.
    #[serde(default)]
    pub exchange: String,
    /// Routing key (with the default exchange: the dead-letter queue's name, not the source
    /// queue).
    pub routing_key: String,
}

/// `[route.dead_letter]` with `kind = "table"`: letters as rows of a ScyllaDB table of the
/// route's cluster, created if missing, partitioned by route and day.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTableDeadLetter {
    /// `keyspace.table` (the keyspace must exist; not one of the route's targets).
    pub table: String,
}

fn default_consistency() -> String {
    "local_quorum".to_string()
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_connect_wait_ms() -> u64 {
    300_000
}
/// `runtime.cores`: `"auto"` or a whole number.
fn cores_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [{ "type": "string", "enum": ["auto"] }, { "type": "integer", "minimum": 1, "maximum": CORES_MAX }]
    })
}

/// `route.ttl`: seconds, or the field holding seconds.
fn ttl_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [{ "type": "integer", "minimum": 1 }, { "type": "string" }]
    })
}

fn default_cores() -> toml::Value {
    toml::Value::String("auto".to_string())
}
fn default_island_threads() -> usize {
    1
}
fn default_inflight_rows() -> usize {
    2048
}
fn default_shutdown_deadline_ms() -> u64 {
    10_000
}
/// Measured with `shardgate-bench --modes grpc-smart --rows 300000 --write-batch-rows N` on
/// the 2-core test machine (Cassandra on the same cores), 100-byte rows:
/// N = 1 (concurrent single writes): 31,899 rows/s, 17.2 gateway CPU-s per million rows;
/// N = 16: 40,445 rows/s, 5.1 CPU-s/M; N = 64: 46,937 rows/s, 4.3 CPU-s/M. Batches only ever
/// hold rows of one replica and shard, so the coordinator never fans them out.
fn default_write_batch_rows() -> usize {
    64
}
fn default_format() -> String {
    "json".to_string()
}
fn default_start_from() -> String {
    "earliest".to_string()
}
fn default_commit_interval_ms() -> u64 {
    1000
}

/// Bounds of every numeric knob: generous, but a typo cannot ask for a million threads.
const CORES_MAX: usize = 1024;
const ISLAND_THREADS_MAX: usize = 64;
const INFLIGHT_ROWS_MAX: usize = 1 << 20;
const WRITE_BATCH_ROWS_MAX: usize = 1024;
const TIMEOUT_MS_MAX: u64 = 600_000;

/// librdkafka properties the Kafka bridge owns; overriding them would break delivery.
const KAFKA_RESERVED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "auto.commit.interval.ms",
    "group.instance.id",
];

impl RawConfig {
    /// Validates without IO. Errors name the key, the value and what is expected.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let cluster = validate_cluster(self.cluster)?;
        let runtime = validate_runtime(self.runtime)?;
        let ingest = self.ingest.map(validate_ingest).transpose()?;
        let admin = match self.admin {
            Some(admin) => Some(parse_socket_addr("admin.listen", &admin.listen)?),
            None => None,
        };
        if self.routes.is_empty() && ingest.is_none() {
            return Err(ConfigError::invalid(
                "route",
                "[]",
                "at least one `[[route]]` table, or an `[ingest]` table",
            ));
        }
        let mut routes = Vec::with_capacity(self.routes.len());
        for (index, raw) in self.routes.into_iter().enumerate() {
            let route = validate_route(index, raw)?;
            if routes.iter().any(|r: &RouteConfig| r.name == route.name) {
                return Err(ConfigError::invalid(
                    format!("route[{index}].name"),
                    &route.name,
                    "a name no other route uses",
                ));
            }
            if route.ack == AckMode::Spooled && runtime.spool.is_none() {
                return Err(ConfigError::invalid(
                    format!("route[{index}].ack"),
                    "spooled",
                    "`runtime.spool_dir` set to a directory for the per-core spools",
                ));
            }
            routes.push(route);
        }
        Ok(Config {
            cluster,
            runtime,
            routes,
            ingest,
            admin,
        })
    }
}

fn validate_ingest(raw: RawIngest) -> Result<IngestConfig, ConfigError> {
    let listen = parse_socket_addr("ingest.listen", &raw.listen)?;
    if !(1024..=(256 << 20)).contains(&raw.message_bytes_max) {
        return Err(ConfigError::invalid(
            "ingest.message_bytes_max",
            raw.message_bytes_max,
            "bytes from 1024 to 268435456",
        ));
    }
    let advertise_host = raw.advertise_host.unwrap_or_else(|| listen.ip().to_string());
    Ok(IngestConfig {
        listen,
        core_port_base: raw.core_port_base,
        advertise_host,
        message_bytes_max: raw.message_bytes_max,
    })
}

fn parse_socket_addr(key: &str, text: &str) -> Result<std::net::SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| ConfigError::invalid(key, text, "an IP address and port, for example `127.0.0.1:50051`"))
}

fn validate_cluster(raw: RawCluster) -> Result<ClusterConfig, ConfigError> {
    if raw.contact_points.is_empty() {
        return Err(ConfigError::invalid(
            "cluster.contact_points",
            "[]",
            "at least one `host:port`",
        ));
    }
    for point in &raw.contact_points {
        validate_host_port("cluster.contact_points", point)?;
    }
    let consistency = parse_consistency(&raw.consistency)?;
    Ok(ClusterConfig {
        contact_points: raw.contact_points,
        local_datacenter: raw.local_datacenter,
        consistency,
        request_timeout: Duration::from_millis(bounded_ms("cluster.request_timeout_ms", raw.request_timeout_ms)?),
        connect_wait: Duration::from_millis(match raw.connect_wait_ms {
            0 => 0,
            wait => bounded_ms("cluster.connect_wait_ms", wait)?,
        }),
    })
}

fn validate_runtime(raw: RawRuntime) -> Result<RuntimeConfig, ConfigError> {
    let cores = match &raw.cores {
        toml::Value::String(s) if s == "auto" => None,
        toml::Value::Integer(n) if (1..=CORES_MAX as i64).contains(n) => Some(*n as usize),
        other => {
            return Err(ConfigError::invalid(
                "runtime.cores",
                other,
                format!("`\"auto\"` or a whole number from 1 to {CORES_MAX}"),
            ))
        }
    };
    if !(1..=ISLAND_THREADS_MAX).contains(&raw.island_threads) {
        return Err(ConfigError::invalid(
            "runtime.island_threads",
            raw.island_threads,
            format!("a whole number from 1 to {ISLAND_THREADS_MAX}"),
        ));
    }
    if !(1..=INFLIGHT_ROWS_MAX).contains(&raw.inflight_rows_per_core_max) {
        return Err(ConfigError::invalid(
            "runtime.inflight_rows_per_core_max",
            raw.inflight_rows_per_core_max,
            format!("a whole number from 1 to {INFLIGHT_ROWS_MAX}"),
        ));
    }
    if !(1..=WRITE_BATCH_ROWS_MAX).contains(&raw.write_batch_rows_max) {
        return Err(ConfigError::invalid(
            "runtime.write_batch_rows_max",
            raw.write_batch_rows_max,
            format!("a whole number from 1 to {WRITE_BATCH_ROWS_MAX}"),
        ));
    }
    if raw.spool_segment_mib == 0 || raw.spool_segment_mib > 2048 {
        return Err(ConfigError::invalid(
            "runtime.spool_segment_mib",
            raw.spool_segment_mib,
            "MiB from 1 to 2048",
        ));
    }
    if raw.spool_cap_mib_per_core < raw.spool_segment_mib {
        return Err(ConfigError::invalid(
            "runtime.spool_cap_mib_per_core",
            raw.spool_cap_mib_per_core,
            format!("at least `runtime.spool_segment_mib` ({} MiB)", raw.spool_segment_mib),
        ));
    }
    if raw.spool_memory_mib_per_core == 0 || raw.spool_memory_mib_per_core > raw.spool_cap_mib_per_core {
        return Err(ConfigError::invalid(
            "runtime.spool_memory_mib_per_core",
            raw.spool_memory_mib_per_core,
            format!(
                "MiB from 1 to `runtime.spool_cap_mib_per_core` ({} MiB)",
                raw.spool_cap_mib_per_core
            ),
        ));
    }
    Ok(RuntimeConfig {
        cores,
        island_threads: raw.island_threads,
        inflight_rows_per_core_max: raw.inflight_rows_per_core_max,
        write_batch_rows_max: raw.write_batch_rows_max,
        spool: raw.spool_dir.map(|dir| SpoolConfig {
            dir: dir.into(),
            segment_bytes: raw.spool_segment_mib << 20,
            cap_bytes_per_core: raw.spool_cap_mib_per_core << 20,
            memory_bytes_per_core: raw.spool_memory_mib_per_core << 20,
        }),
        shutdown_deadline: Duration::from_millis(bounded_ms("runtime.shutdown_deadline_ms", raw.shutdown_deadline_ms)?),
        gateway_id: raw.gateway_id.map(validate_gateway_id).transpose()?,
    })
}

/// Longest `runtime.gateway_id`: Kafka allows 249 characters in `group.instance.id`, which
/// also carries a prefix and the route name.
const GATEWAY_ID_LEN_MAX: usize = 64;

fn validate_gateway_id(id: String) -> Result<String, ConfigError> {
    let valid = !id.is_empty()
        && id.len() <= GATEWAY_ID_LEN_MAX
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid {
        return Err(ConfigError::invalid(
            "runtime.gateway_id",
            &id,
            format!("1 to {GATEWAY_ID_LEN_MAX} letters, digits, `.`, `_` or `-`, unique among the gateways of a consumer group"),
        ));
    }
    Ok(id)
}

fn validate_route(index: usize, raw: RawRoute) -> Result<RouteConfig, ConfigError> {
    let key = |field: &str| format!("route[{index}].{field}");
    if raw.name.is_empty() || !raw.name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        return Err(ConfigError::invalid(
            key("name"),
            &raw.name,
            "a non-empty name of letters, digits, `_`, `-`, `.`",
        ));
    }
    let format = match (raw.format.as_str(), raw.flatbuffers) {
        ("flatbuffers", Some(flat)) if raw.protobuf.is_none() => Format::FlatBuffers(flat.schema.into()),
        ("flatbuffers", None) => {
            return Err(ConfigError::invalid(
                key("flatbuffers"),
                "(missing)",
                "a `[route.flatbuffers]` table with `schema = \"path/to/schema.bfbs\"`",
            ))
        }
        (_, Some(_)) => {
            return Err(ConfigError::invalid(
                key("flatbuffers"),
                "(set)",
                "`format = \"flatbuffers\"` when `[route.flatbuffers]` is given",
            ))
        }
        (format, None) => validate_format(&key, format, raw.protobuf)?,
    };
    let raw_payload = matches!(format, Format::Text | Format::Bytes);
    let targets = match (raw.table, raw.target.is_empty()) {
        (Some(table), true) => vec![validate_target(&key, "", &table, None, raw.columns, raw_payload)?],
        (None, false) if raw.columns.is_empty() => raw
            .target
            .into_iter()
            .enumerate()
            .map(|(i, t)| validate_target(&key, &format!("target[{i}]."), &t.table, t.when, t.columns, raw_payload))
            .collect::<Result<Vec<_>, _>>()?,
        (None, false) => {
            return Err(ConfigError::invalid(
                key("columns"),
                "(set)",
                "columns inside each `[[route.target]]` when the route has targets",
            ))
        }
        (Some(table), false) => {
            return Err(ConfigError::invalid(
                key("table"),
                &table,
                "either `table` or `[[route.target]]` tables, not both",
            ))
        }
        (None, true) => {
            return Err(ConfigError::invalid(
                key("table"),
                "(missing)",
                "`table = \"keyspace.table\"` or one or more `[[route.target]]` tables",
            ))
        }
    };
    let table_from = raw
        .table_from
        .map(|field| parse_field_ref(&key("table_from"), &field))
        .transpose()?;
    let filter = raw.filter.map(|e| validate_expression(&key("filter"), e)).transpose()?;
    let delete_when = raw
        .delete_when
        .map(|e| validate_expression(&key("delete_when"), e))
        .transpose()?;
    let ttl = match raw.ttl {
        None => None,
        Some(toml::Value::Integer(seconds)) => match i32::try_from(seconds) {
            Ok(seconds) if seconds > 0 => Some(TtlConfig::Seconds(seconds)),
            _ => {
                return Err(ConfigError::invalid(
                    key("ttl"),
                    seconds.to_string(),
                    "seconds between 1 and 2147483647, or a field name",
                ))
            }
        },
        Some(toml::Value::String(field)) => Some(TtlConfig::Field(parse_field_ref(&key("ttl"), &field)?)),
        Some(other) => {
            return Err(ConfigError::invalid(
                key("ttl"),
                other.to_string(),
                "seconds (an integer) or a field name (a string)",
            ))
        }
    };
    let unit = match raw.timestamp_unit.as_deref() {
        None | Some("ms") => TimeUnit::Millis,
        Some("s") => TimeUnit::Seconds,
        Some("us") => TimeUnit::Micros,
        Some(other) => return Err(ConfigError::invalid(key("timestamp_unit"), other, "`s`, `ms` or `us`")),
    };
    let timestamp = raw
        .timestamp
        .map(|field| parse_field_ref(&key("timestamp"), &field).map(|field| TimestampConfig { field, unit }))
        .transpose()?;
    let source = validate_source(&key("source"), raw.source)?;
    let Some(dead_letter) = raw.dead_letter else {
        return Err(ConfigError::invalid(
            key("dead_letter"),
            "(missing)",
            "a `[route.dead_letter]` table, for example `kind = \"kafka\"` and `topic = \"orders.dead-letter\"`",
        ));
    };
    let dead_letter = match dead_letter {
        RawDeadLetter::Kafka(RawKafkaDeadLetter { brokers, topic }) => {
            validate_topic(&key("dead_letter.topic"), &topic)?;
            let source_kafka = match &source {
                SourceConfig::Kafka(kafka) => Some(kafka),
                _ => None,
            };
            if source_kafka.is_some_and(|kafka| kafka.topic == topic) {
                return Err(ConfigError::invalid(
                    key("dead_letter.topic"),
                    &topic,
                    "a topic other than the source topic",
                ));
            }
            let brokers = match (brokers, source_kafka) {
                (Some(list), _) => join_brokers(&key("dead_letter.brokers"), &list)?,
                (None, Some(kafka)) => kafka.brokers.clone(),
                (None, None) => {
                    return Err(ConfigError::invalid(
                        key("dead_letter.brokers"),
                        "(missing)",
                        "the Kafka brokers of the dead-letter topic (the source is not Kafka)",
                    ))
                }
            };
            DeadLetterConfig::Kafka { brokers, topic }
        }
        RawDeadLetter::Nats(RawNatsDeadLetter { url, subject }) => {
            validate_subject(&key("dead_letter.subject"), &subject)?;
            let url = match (url, &source) {
                (Some(url), _) => validate_nats_url(&key("dead_letter.url"), url)?,
                (None, SourceConfig::JetStream(js)) => js.url.clone(),
                (None, SourceConfig::Nats(nats)) => nats.url.clone(),
                (None, _) => {
                    return Err(ConfigError::invalid(
                        key("dead_letter.url"),
                        "(missing)",
                        "the NATS server URL of the dead-letter subject (the source is not NATS)",
                    ))
                }
            };
            DeadLetterConfig::Nats { url, subject }
        }
        RawDeadLetter::Rabbitmq(RawRabbitMqDeadLetter {
            url,
            exchange,
            routing_key,
        }) => {
            let url = match (url, &source) {
                (Some(url), _) => validate_amqp_url(&key("dead_letter.url"), url)?,
                (None, SourceConfig::Amqp(amqp)) => amqp.url.clone(),
                (None, _) => {
                    return Err(ConfigError::invalid(
                        key("dead_letter.url"),
                        "(missing)",
                        "the AMQP URL of the dead-letter exchange (the source is not RabbitMQ)",
                    ))
                }
            };
            if exchange.is_empty() && routing_key.is_empty() {
                return Err(ConfigError::invalid(
                    key("dead_letter.routing_key"),
                    "",
                    "the dead-letter queue's name when `exchange` is the default exchange",
                ));
            }
            if let SourceConfig::Amqp(amqp) = &source {
                if exchange.is_empty() && routing_key == amqp.queue {
                    return Err(ConfigError::invalid(
                        key("dead_letter.routing_key"),
                        &routing_key,
                        "a queue other than the source queue",
                    ));
                }
            }
            DeadLetterConfig::Amqp {
                url,
                exchange,
                routing_key,
            }
        }
        RawDeadLetter::Table(RawTableDeadLetter { table }) => {
            let key = key("dead_letter.table");
            let Some((keyspace, name)) = table.split_once('.') else {
                return Err(ConfigError::invalid(key, &table, "`keyspace.table`"));
            };
            validate_identifier(&key, keyspace)?;
            validate_identifier(&key, name)?;
            if targets.iter().any(|t| t.keyspace == keyspace && t.table == name) {
                return Err(ConfigError::invalid(
                    key,
                    &table,
                    "a table other than the route's targets",
                ));
            }
            DeadLetterConfig::Table {
                keyspace: keyspace.to_string(),
                table: name.to_string(),
            }
        }
    };
    let ack = match raw.ack.as_deref() {
        None | Some("written") => AckMode::Written,
        Some("spooled") => AckMode::Spooled,
        Some(other) => return Err(ConfigError::invalid(key("ack"), other, "`written` or `spooled`")),
    };
    Ok(RouteConfig {
        name: raw.name,
        ack,
        source,
        format,
        targets,
        table_from,
        filter,
        delete_when,
        delete_on_tombstone: raw.delete_on_tombstone,
        ttl,
        timestamp,
        dead_letter,
    })
}

fn validate_format(
    key: &impl Fn(&str) -> String,
    format: &str,
    protobuf: Option<RawProtobuf>,
) -> Result<Format, ConfigError> {
    let format = match (format, protobuf) {
        ("json", None) => Format::Json,
        ("text", None) => Format::Text,
        ("bytes", None) => Format::Bytes,
        ("protobuf", Some(raw)) => {
            let valid_name = !raw.message.is_empty()
                && raw
                    .message
                    .split('.')
                    .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            if !valid_name {
                return Err(ConfigError::invalid(
                    key("protobuf.message"),
                    &raw.message,
                    "a fully qualified message name such as `shop.v1.Order`",
                ));
            }
            if raw.descriptor_set.is_some() != raw.files.is_empty() {
                return Err(ConfigError::invalid(
                    key("protobuf"),
                    "(descriptor_set and files)",
                    "exactly one of `descriptor_set` (a FileDescriptorSet file) or `files` (.proto files)",
                ));
            }
            Format::Protobuf(ProtobufConfig {
                message: raw.message,
                descriptor_set: raw.descriptor_set.map(Into::into),
                files: raw.files.into_iter().map(Into::into).collect(),
                includes: raw.includes.into_iter().map(Into::into).collect(),
            })
        }
        ("protobuf", None) => {
            return Err(ConfigError::invalid(
                key("protobuf"),
                "(missing)",
                "a `[route.protobuf]` table with `message` and `descriptor_set` or `files`",
            ))
        }
        ("json" | "text" | "bytes", Some(_)) => {
            return Err(ConfigError::invalid(
                key("protobuf"),
                "(set)",
                "`format = \"protobuf\"` when `[route.protobuf]` is given",
            ))
        }
        (other, _) => {
            return Err(ConfigError::invalid(
                key("format"),
                other,
                "`json`, `protobuf`, `flatbuffers`, `text` or `bytes`",
            ))
        }
    };
    Ok(format)
}

fn validate_target(
    key: &impl Fn(&str) -> String,
    prefix: &str,
    table: &str,
    when: Option<String>,
    raw_columns: BTreeMap<String, RawColumn>,
    raw_payload: bool,
) -> Result<TargetConfig, ConfigError> {
    let Some((keyspace, name)) = table.split_once('.') else {
        return Err(ConfigError::invalid(
            key(&format!("{prefix}table")),
            table,
            "`keyspace.table`",
        ));
    };
    validate_identifier(&key(&format!("{prefix}table")), keyspace)?;
    validate_identifier(&key(&format!("{prefix}table")), name)?;
    if raw_payload && raw_columns.is_empty() {
        return Err(ConfigError::invalid(
            key(&format!("{prefix}columns")),
            "(missing)",
            "explicit columns for a `text` or `bytes` route, for example `body = \"$payload\"`",
        ));
    }
    let mut columns = Vec::with_capacity(raw_columns.len());
    for (column, source) in raw_columns {
        let column_key = key(&format!("{prefix}columns.{column}"));
        validate_identifier(&column_key, &column)?;
        let field = match source {
            RawColumn::Field(field) => parse_field_ref(&column_key, &field)?,
            RawColumn::Expr { expr } => FieldRef::Expr(validate_expression(&format!("{column_key}.expr"), expr)?),
        };
        columns.push(ColumnMapping { column, field });
    }
    let when = when
        .map(|e| validate_expression(&key(&format!("{prefix}when")), e))
        .transpose()?;
    Ok(TargetConfig {
        keyspace: keyspace.to_string(),
        table: name.to_string(),
        when,
        columns,
    })
}

/// Compiles a CEL expression once, so a syntax error names its key at start-up.
fn validate_expression(key: &str, source: String) -> Result<String, ConfigError> {
    match crate::mapping::expr::Expr::compile(&source) {
        Ok(_) => Ok(source),
        Err(reason) => Err(ConfigError::invalid(
            key,
            &source,
            format!("a CEL expression ({reason})"),
        )),
    }
}

fn validate_source(key: &str, raw: RawSource) -> Result<SourceConfig, ConfigError> {
    match raw {
        RawSource::Kafka(RawKafkaSource {
            brokers,
            topic,
            group_id,
            start_from,
            commit_interval_ms,
            properties,
        }) => {
            let brokers = join_brokers(&format!("{key}.brokers"), &brokers)?;
            validate_topic(&format!("{key}.topic"), &topic)?;
            if group_id.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.group_id"),
                    "",
                    "a non-empty consumer group id",
                ));
            }
            let start_from = match start_from.as_str() {
                "earliest" => StartFrom::Earliest,
                "latest" => StartFrom::Latest,
                other => {
                    return Err(ConfigError::invalid(
                        format!("{key}.start_from"),
                        other,
                        "`earliest` or `latest`",
                    ))
                }
            };
            if commit_interval_ms == 0 || commit_interval_ms > TIMEOUT_MS_MAX {
                return Err(ConfigError::invalid(
                    format!("{key}.commit_interval_ms"),
                    commit_interval_ms,
                    format!("milliseconds from 1 to {TIMEOUT_MS_MAX}"),
                ));
            }
            for name in properties.keys() {
                if KAFKA_RESERVED_PROPERTIES.contains(&name.as_str()) {
                    return Err(ConfigError::invalid(
                        format!("{key}.properties.{name}"),
                        name,
                        "a property shardgate does not set itself; use the route's own keys instead",
                    ));
                }
            }
            Ok(SourceConfig::Kafka(KafkaSourceConfig {
                brokers,
                topic,
                group_id,
                start_from,
                commit_interval: Duration::from_millis(commit_interval_ms),
                properties: properties.into_iter().collect(),
            }))
        }
        RawSource::Jetstream(RawJetStreamSource {
            url,
            stream,
            subjects,
            durable,
            max_ack_pending,
            ack_wait_ms,
        }) => {
            let url = validate_nats_url(&format!("{key}.url"), url)?;
            validate_nats_name(&format!("{key}.stream"), &stream)?;
            validate_nats_name(&format!("{key}.durable"), &durable)?;
            for (i, subject) in subjects.iter().enumerate() {
                validate_subject(&format!("{key}.subjects[{i}]"), subject)?;
            }
            if !(1..=1_000_000).contains(&max_ack_pending) {
                return Err(ConfigError::invalid(
                    format!("{key}.max_ack_pending"),
                    max_ack_pending,
                    "a number of messages from 1 to 1000000",
                ));
            }
            if !(1000..=TIMEOUT_MS_MAX).contains(&ack_wait_ms) {
                return Err(ConfigError::invalid(
                    format!("{key}.ack_wait_ms"),
                    ack_wait_ms,
                    format!("milliseconds from 1000 to {TIMEOUT_MS_MAX}"),
                ));
            }
            Ok(SourceConfig::JetStream(JetStreamSourceConfig {
                url,
                stream,
                subjects,
                durable,
                max_ack_pending,
                ack_wait: Duration::from_millis(ack_wait_ms),
            }))
        }
        RawSource::Rabbitmq(RawRabbitMqSource {
            url,
            queue,
            prefetch,
            declare,
        }) => {
            let url = validate_amqp_url(&format!("{key}.url"), url)?;
            if queue.is_empty() || queue.len() > 255 {
                return Err(ConfigError::invalid(
                    format!("{key}.queue"),
                    &queue,
                    "a queue name of 1 to 255 bytes",
                ));
            }
            if prefetch == 0 {
                return Err(ConfigError::invalid(
                    format!("{key}.prefetch"),
                    prefetch,
                    "a number of deliveries from 1 to 65535",
                ));
            }
            Ok(SourceConfig::Amqp(AmqpSourceConfig {
                url,
                queue,
                prefetch,
                declare,
            }))
        }
        RawSource::Nats(RawNatsSource {
            url,
            subject,
            queue_group,
        }) => {
            let url = validate_nats_url(&format!("{key}.url"), url)?;
            validate_subject(&format!("{key}.subject"), &subject)?;
            if let Some(group) = &queue_group {
                validate_nats_name(&format!("{key}.queue_group"), group)?;
            }
            Ok(SourceConfig::Nats(NatsSourceConfig {
                url,
                subject,
                queue_group,
            }))
        }
        RawSource::Zeromq(RawZeroMqSource {
            socket,
            endpoint,
            bind,
            subscribe,
        }) => {
            let socket = match socket.as_str() {
                "pull" => ZmqSocketKind::Pull,
                "sub" => ZmqSocketKind::Sub,
                other => return Err(ConfigError::invalid(format!("{key}.socket"), other, "`pull` or `sub`")),
            };
            let transport_ok = ["tcp://", "ipc://", "inproc://"]
                .iter()
                .any(|t| endpoint.strip_prefix(t).is_some_and(|rest| !rest.is_empty()));
            if !transport_ok {
                return Err(ConfigError::invalid(
                    format!("{key}.endpoint"),
                    &endpoint,
                    "a ZeroMQ endpoint like `tcp://127.0.0.1:5557` or `ipc:///run/orders.sock`",
                ));
            }
            Ok(SourceConfig::Zmq(ZmqSourceConfig {
                socket,
                endpoint,
                bind,
                subscribe,
            }))
        }
    }
}

/// An `amqp://` or `amqps://` URL with a host.
fn validate_amqp_url(key: &str, url: String) -> Result<String, ConfigError> {
    let rest = url.strip_prefix("amqp://").or_else(|| url.strip_prefix("amqps://"));
    let host = rest.map(|r| r.rsplit('@').next().unwrap_or(r)).unwrap_or("");
    if !host.is_empty() && !host.starts_with('/') {
        Ok(url)
    } else {
        Err(ConfigError::invalid(
            key,
            super::redact_url(&url),
            "an AMQP URL like `amqp://guest:guest@127.0.0.1:5672/%2f`",
        ))
    }
}

/// A `nats://host:port` URL (or a bare `host:port`).
fn validate_nats_url(key: &str, url: String) -> Result<String, ConfigError> {
    let rest = url.strip_prefix("nats://").unwrap_or(&url);
    let valid = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if valid {
        Ok(url)
    } else {
        Err(ConfigError::invalid(
            key,
            &url,
            "a NATS URL like `nats://127.0.0.1:4222`",
        ))
    }
}

/// A stream or consumer name: letters, digits, `-` and `_`.
fn validate_nats_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if !name.is_empty() && name.len() <= 255 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            name,
            "a name of letters, digits, `-` and `_` (at most 255)",
        ))
    }
}

/// A NATS subject: dot-separated non-empty tokens without whitespace.
fn validate_subject(key: &str, subject: &str) -> Result<(), ConfigError> {
    if !subject.is_empty()
        && subject
            .split('.')
            .all(|t| !t.is_empty() && !t.contains(char::is_whitespace))
    {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            subject,
            "a NATS subject like `orders.created` (tokens separated by `.`, no spaces)",
        ))
    }
}

/// Parses `$key`, `$key.path`, `$header.name`, `$source`, `$partition`, `$position`,
/// `$timestamp`, `$payload` or a dotted path of object keys.
pub(crate) fn parse_field_ref(key: &str, text: &str) -> Result<FieldRef, ConfigError> {
    const EXPECTED: &str = "a field path such as `customer.id`, or `$key`, `$key.<path>`, `$header.<name>`, \
         `$source`, `$subject`, `$partition`, `$position`, `$timestamp`, `$payload`";
    let path = |text: &str| -> Result<Vec<String>, ConfigError> {
        let parts: Vec<String> = text.split('.').map(str::to_string).collect();
        if parts.iter().any(String::is_empty) {
            return Err(ConfigError::invalid(
                key,
                text,
                "a field path of non-empty names separated by `.`",
            ));
        }
        Ok(parts)
    };
    let field = match text {
        "$key" => FieldRef::Key,
        "$source" => FieldRef::Source,
        "$subject" => FieldRef::Subject,
        "$partition" => FieldRef::Partition,
        "$position" => FieldRef::Position,
        "$timestamp" => FieldRef::Timestamp,
        "$payload" => FieldRef::Payload,
        _ => {
            if let Some(rest) = text.strip_prefix("$key.") {
                FieldRef::KeyPath(path(rest)?)
            } else if let Some(name) = text.strip_prefix("$header.") {
                if name.is_empty() {
                    return Err(ConfigError::invalid(key, text, EXPECTED));
                }
                FieldRef::Header(name.to_string())
            } else if text.starts_with('$') {
                return Err(ConfigError::invalid(key, text, EXPECTED));
            } else {
                FieldRef::Path(path(text)?)
            }
        }
    };
    Ok(field)
}

fn parse_consistency(text: &str) -> Result<Consistency, ConfigError> {
    let consistency = match text.to_ascii_lowercase().as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        _ => {
            return Err(ConfigError::invalid(
                "cluster.consistency",
                text,
                "one of `any`, `one`, `two`, `three`, `quorum`, `all`, `local_quorum`, `each_quorum`, `local_one`",
            ))
        }
    };
    Ok(consistency)
}

fn validate_host_port(key: &str, text: &str) -> Result<(), ConfigError> {
    let valid = text
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !valid {
        return Err(ConfigError::invalid(
            key,
            text,
            "`host:port`, for example `127.0.0.1:9042`",
        ));
    }
    Ok(())
}

fn join_brokers(key: &str, brokers: &[String]) -> Result<String, ConfigError> {
    if brokers.is_empty() {
        return Err(ConfigError::invalid(key, "[]", "at least one `host:port`"));
    }
    for broker in brokers {
        validate_host_port(key, broker)?;
    }
    Ok(brokers.join(","))
}

/// Kafka's own topic name rule: 1–249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn validate_topic(key: &str, topic: &str) -> Result<(), ConfigError> {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid {
        return Err(ConfigError::invalid(
            key,
            topic,
            "a Kafka topic name: 1 to 249 of letters, digits, `.`, `_`, `-`",
        ));
    }
    Ok(())
}

fn bounded_ms(key: &str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 || value > TIMEOUT_MS_MAX {
        return Err(ConfigError::invalid(
            key,
            value,
            format!("milliseconds from 1 to {TIMEOUT_MS_MAX}"),
        ));
    }
    Ok(value)
}
