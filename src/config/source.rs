//! `[route.source]`: one table per broker kind (`kind` picks it) — the raw tables, their
//! validated forms and `validate`. Pure.

use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

use super::amqp_security::{validate_amqp_security, AmqpSecurity, RawAmqpSecurity};
use super::check::{
    default_true, join_brokers, validate_amqp_url, validate_nats_name, validate_nats_url, validate_subject,
    validate_topic, TIMEOUT_MS_MAX,
};
use super::de;
use super::error::ConfigError;
use super::kafka_security::{validate_kafka_security, KafkaSecurity, RawKafkaSecurity, KAFKA_SECRET_PROPERTIES};
use super::nats_security::{validate_nats_security, NatsSecurity, RawNatsSecurity};
use super::zmq_security::{validate_zmq_security, RawZmqSecurity, ZmqSecurity};

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
    /// `[route.source.security]`: TLS and SASL to the brokers (the route's Kafka dead letters
    /// use it too when they name no brokers of their own).
    #[serde(default)]
    pub security: Option<RawKafkaSecurity>,
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
    /// `[route.source.security]`: TLS and a login (the route's NATS dead letters use it too
    /// when they name no URL of their own).
    #[serde(default)]
    pub security: Option<RawNatsSecurity>,
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
    /// `[route.source.security]`: the login (instead of credentials in `url`) and, with
    /// `amqps://`, TLS (the route's RabbitMQ dead letters use it too when they name no URL of
    /// their own).
    #[serde(default)]
    pub security: Option<RawAmqpSecurity>,
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
    /// `[route.source.security]`: TLS and a login (the route's NATS dead letters use it too
    /// when they name no URL of their own).
    #[serde(default)]
    pub security: Option<RawNatsSecurity>,
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
    /// `[route.source.security]`: CURVE encryption and an allow-list of client keys. Absent:
    /// plaintext, any peer.
    #[serde(default)]
    pub security: Option<RawZmqSecurity>,
}

pub(super) fn default_subscribe() -> Vec<String> {
    vec![String::new()]
}

pub(super) fn default_prefetch() -> u16 {
    1024
}

pub(super) fn default_max_ack_pending() -> i64 {
    4096
}

pub(super) fn default_ack_wait_ms() -> u64 {
    30_000
}

pub(super) fn default_start_from() -> String {
    "earliest".to_string()
}

pub(super) fn default_commit_interval_ms() -> u64 {
    1000
}

/// librdkafka properties the Kafka bridge owns; overriding them would break delivery.
pub(super) const KAFKA_RESERVED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "auto.commit.interval.ms",
    "group.instance.id",
];

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
    /// TLS and a login, when `security` is set.
    pub security: Option<NatsSecurity>,
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
    /// CURVE, when on.
    pub security: Option<ZmqSecurity>,
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
    /// The login and TLS, when `security` is set.
    pub security: Option<AmqpSecurity>,
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
    /// TLS and a login, when `security` is set.
    pub security: Option<NatsSecurity>,
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
    /// TLS and SASL, when `security` is set.
    pub security: Option<KafkaSecurity>,
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest retained message.
    Earliest,
    /// Only messages produced after the group first joins.
    Latest,
}

pub(super) fn validate_source(key: &str, raw: RawSource) -> Result<SourceConfig, ConfigError> {
    match raw {
        RawSource::Kafka(raw) => kafka_source(key, raw),
        RawSource::Jetstream(raw) => jetstream_source(key, raw),
        RawSource::Rabbitmq(raw) => rabbitmq_source(key, raw),
        RawSource::Nats(raw) => nats_source(key, raw),
        RawSource::Zeromq(raw) => zeromq_source(key, raw),
    }
}

fn kafka_source(
    key: &str,
    RawKafkaSource {
        brokers,
        topic,
        group_id,
        start_from,
        commit_interval_ms,
        properties,
        security,
    }: RawKafkaSource,
) -> Result<SourceConfig, ConfigError> {
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
        refuse_secret_property(&format!("{key}.properties.{name}"), name)?;
    }
    let security = security
        .map(|raw| validate_kafka_security(&format!("{key}.security"), raw))
        .transpose()?;
    Ok(SourceConfig::Kafka(KafkaSourceConfig {
        brokers,
        topic,
        group_id,
        start_from,
        commit_interval: Duration::from_millis(commit_interval_ms),
        properties: properties.into_iter().collect(),
        security,
    }))
}

/// Refuses a librdkafka property that carries a secret (`sasl.password`, …): secrets come from
/// `security.password_file`.
pub(super) fn refuse_secret_property(key: &str, name: &str) -> Result<(), ConfigError> {
    if KAFKA_SECRET_PROPERTIES.contains(&name) {
        return Err(ConfigError::invalid(
            key,
            name,
            "no secret in the config: the `security` table takes TLS and SASL settings, the password from `password_file`",
        ));
    }
    Ok(())
}

fn jetstream_source(
    key: &str,
    RawJetStreamSource {
        url,
        stream,
        subjects,
        durable,
        max_ack_pending,
        ack_wait_ms,
        security,
    }: RawJetStreamSource,
) -> Result<SourceConfig, ConfigError> {
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
        security: security
            .map(|raw| validate_nats_security(&format!("{key}.security"), raw))
            .transpose()?,
    }))
}

fn rabbitmq_source(
    key: &str,
    RawRabbitMqSource {
        url,
        queue,
        prefetch,
        declare,
        security,
    }: RawRabbitMqSource,
) -> Result<SourceConfig, ConfigError> {
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
    let security = security
        .map(|raw| validate_amqp_security(&format!("{key}.security"), raw, &url))
        .transpose()?;
    Ok(SourceConfig::Amqp(AmqpSourceConfig {
        url,
        queue,
        prefetch,
        declare,
        security,
    }))
}

fn nats_source(
    key: &str,
    RawNatsSource {
        url,
        subject,
        queue_group,
        security,
    }: RawNatsSource,
) -> Result<SourceConfig, ConfigError> {
    let url = validate_nats_url(&format!("{key}.url"), url)?;
    validate_subject(&format!("{key}.subject"), &subject)?;
    if let Some(group) = &queue_group {
        validate_nats_name(&format!("{key}.queue_group"), group)?;
    }
    Ok(SourceConfig::Nats(NatsSourceConfig {
        url,
        subject,
        queue_group,
        security: security
            .map(|raw| validate_nats_security(&format!("{key}.security"), raw))
            .transpose()?,
    }))
}

fn zeromq_source(
    key: &str,
    RawZeroMqSource {
        socket,
        endpoint,
        bind,
        subscribe,
        security,
    }: RawZeroMqSource,
) -> Result<SourceConfig, ConfigError> {
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
        security: security
            .map(|raw| validate_zmq_security(&format!("{key}.security"), raw))
            .transpose()?,
    }))
}
