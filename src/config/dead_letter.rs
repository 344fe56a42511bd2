//! `[route.dead_letter]`: where a route's failed messages go (`kind` picks it) — the raw tables,
//! their validated form and `validate`. Pure.

use schemars::JsonSchema;
use serde::Deserialize;

use super::amqp_security::{validate_amqp_security, AmqpSecurity, RawAmqpSecurity};
use super::check::{
    join_brokers, validate_amqp_url, validate_identifier, validate_nats_url, validate_subject, validate_topic,
};
use super::de;
use super::error::ConfigError;
use super::kafka_security::{validate_kafka_security, KafkaSecurity, RawKafkaSecurity};
use super::nats_security::{validate_nats_security, NatsSecurity, RawNatsSecurity};
use super::source::SourceConfig;

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
    /// `security` (TLS and SASL) of the dead-letter brokers. Default: the source's
    /// `security` when `brokers` is absent (the source's brokers), none otherwise.
    #[serde(default)]
    pub security: Option<RawKafkaSecurity>,
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
    /// `security` (TLS and a login) of the dead-letter server. Default: the source's
    /// `security` when `url` is absent (the source's server), none otherwise.
    #[serde(default)]
    pub security: Option<RawNatsSecurity>,
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
    /// `security` (login, TLS) of the dead-letter broker. Default: the source's `security`
    /// when `url` is absent (the source's broker), none otherwise.
    #[serde(default)]
    pub security: Option<RawAmqpSecurity>,
}

/// `[route.dead_letter]` with `kind = "table"`: letters as rows of a ScyllaDB table of the
/// route's cluster, created if missing, partitioned by route and day.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTableDeadLetter {
    /// `keyspace.table` (the keyspace must exist; not one of the route's targets).
    pub table: String,
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
        /// TLS and SASL to the brokers.
        security: Option<KafkaSecurity>,
    },
    /// A NATS subject; payload kept, headers carry the reason and the source coordinates.
    Nats {
        /// Server URL.
        url: String,
        /// Subject.
        subject: String,
        /// TLS and a login.
        security: Option<NatsSecurity>,
    },
    /// A RabbitMQ exchange; payload kept, headers carry the reason and the source coordinates.
    Amqp {
        /// AMQP URL.
        url: String,
        /// Exchange (`""`: the default exchange).
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// Login and TLS.
        security: Option<AmqpSecurity>,
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

/// `[route.dead_letter]`, checked against the route's `source` (defaults, and never the source
/// itself) and its target tables (never one of them).
pub(super) fn validate_dead_letter(
    key: &impl Fn(&str) -> String,
    raw: Option<RawDeadLetter>,
    source: Option<&SourceConfig>,
    targets: &[(&str, &str)],
) -> Result<DeadLetterConfig, ConfigError> {
    let Some(raw) = raw else {
        return Err(ConfigError::invalid(
            key("dead_letter"),
            "(missing)",
            "a `[route.dead_letter]` table, for example `kind = \"kafka\"` and `topic = \"orders.dead-letter\"`",
        ));
    };
    match raw {
        RawDeadLetter::Kafka(raw) => kafka_dead_letter(key, raw, source),
        RawDeadLetter::Nats(raw) => nats_dead_letter(key, raw, source),
        RawDeadLetter::Rabbitmq(raw) => rabbitmq_dead_letter(key, raw, source),
        RawDeadLetter::Table(raw) => table_dead_letter(key, raw, targets),
    }
}

fn kafka_dead_letter(
    key: &impl Fn(&str) -> String,
    RawKafkaDeadLetter {
        brokers,
        topic,
        security,
    }: RawKafkaDeadLetter,
    source: Option<&SourceConfig>,
) -> Result<DeadLetterConfig, ConfigError> {
    validate_topic(&key("dead_letter.topic"), &topic)?;
    let source_kafka = match source {
        Some(SourceConfig::Kafka(kafka)) => Some(kafka),
        _ => None,
    };
    if source_kafka.is_some_and(|kafka| kafka.topic == topic) {
        return Err(ConfigError::invalid(
            key("dead_letter.topic"),
            &topic,
            "a topic other than the source topic",
        ));
    }
    let inherits = brokers.is_none();
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
    let security = match security {
        Some(raw) => Some(validate_kafka_security(&key("dead_letter.security"), raw)?),
        None if inherits => source_kafka.and_then(|kafka| kafka.security.clone()),
        None => None,
    };
    Ok(DeadLetterConfig::Kafka {
        brokers,
        topic,
        security,
    })
}

fn nats_dead_letter(
    key: &impl Fn(&str) -> String,
    RawNatsDeadLetter { url, subject, security }: RawNatsDeadLetter,
    source: Option<&SourceConfig>,
) -> Result<DeadLetterConfig, ConfigError> {
    validate_subject(&key("dead_letter.subject"), &subject)?;
    let inherits = url.is_none();
    let url = match (url, source) {
        (Some(url), _) => validate_nats_url(&key("dead_letter.url"), url)?,
        (None, Some(SourceConfig::JetStream(js))) => js.url.clone(),
        (None, Some(SourceConfig::Nats(nats))) => nats.url.clone(),
        (None, _) => {
            return Err(ConfigError::invalid(
                key("dead_letter.url"),
                "(missing)",
                "the NATS server URL of the dead-letter subject (the source is not NATS)",
            ))
        }
    };
    let security = match (security, source) {
        (Some(raw), _) => Some(validate_nats_security(&key("dead_letter.security"), raw)?),
        (None, Some(SourceConfig::JetStream(js))) if inherits => js.security.clone(),
        (None, Some(SourceConfig::Nats(nats))) if inherits => nats.security.clone(),
        (None, _) => None,
    };
    Ok(DeadLetterConfig::Nats { url, subject, security })
}

fn rabbitmq_dead_letter(
    key: &impl Fn(&str) -> String,
    RawRabbitMqDeadLetter {
        url,
        exchange,
        routing_key,
        security,
    }: RawRabbitMqDeadLetter,
    source: Option<&SourceConfig>,
) -> Result<DeadLetterConfig, ConfigError> {
    let inherits = url.is_none();
    let url = match (url, source) {
        (Some(url), _) => validate_amqp_url(&key("dead_letter.url"), url)?,
        (None, Some(SourceConfig::Amqp(amqp))) => amqp.url.clone(),
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
    if let Some(SourceConfig::Amqp(amqp)) = source {
        if exchange.is_empty() && routing_key == amqp.queue {
            return Err(ConfigError::invalid(
                key("dead_letter.routing_key"),
                &routing_key,
                "a queue other than the source queue",
            ));
        }
    }
    let security = match (security, source) {
        (Some(raw), _) => Some(validate_amqp_security(&key("dead_letter.security"), raw, &url)?),
        (None, Some(SourceConfig::Amqp(amqp))) if inherits => amqp.security.clone(),
        (None, _) => None,
    };
    Ok(DeadLetterConfig::Amqp {
        url,
        exchange,
        routing_key,
        security,
    })
}

fn table_dead_letter(
    key: &impl Fn(&str) -> String,
    RawTableDeadLetter { table }: RawTableDeadLetter,
    targets: &[(&str, &str)],
) -> Result<DeadLetterConfig, ConfigError> {
    let key = key("dead_letter.table");
    let Some((keyspace, name)) = table.split_once('.') else {
        return Err(ConfigError::invalid(key, &table, "`keyspace.table`"));
    };
    validate_identifier(&key, keyspace)?;
    validate_identifier(&key, name)?;
    if targets.contains(&(keyspace, name)) {
        return Err(ConfigError::invalid(
            key,
            &table,
            "a table other than the route's targets",
        ));
    }
    Ok(DeadLetterConfig::Table {
        keyspace: keyspace.to_string(),
        table: name.to_string(),
    })
}
