//! `[[job]]`: a processing job — the raw table, its validated form and `validate`. A scan job
//! reads a table through the query API's shard-aligned splits, keeps the rows a CEL `filter`
//! passes, and either writes them to its sinks as they are or folds them into `aggregate`
//! groups whose results it writes at the end. A stream job folds the mapped rows of Kafka
//! routes as they arrive into windows, each result written once its window closes. Pure.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

use super::amqp_security::{validate_amqp_security, AmqpSecurity, RawAmqpSecurity};
use super::check::{
    join_brokers, validate_amqp_url, validate_expression, validate_identifier, validate_nats_url, validate_subject,
    validate_topic,
};
use super::error::ConfigError;
use super::kafka_security::{validate_kafka_security, KafkaSecurity, RawKafkaSecurity};
use super::nats_security::{validate_nats_security, NatsSecurity, RawNatsSecurity};

/// `[[job]]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    /// Unique job name (a CQL identifier): the key of its progress in the state tables.
    pub name: String,
    /// `[job.source]`: what the job reads.
    pub source: RawJobSource,
    /// CEL condition over `row` (the row as an object of its columns, in the JSON forms
    /// `shardgate export` writes); rows for which it is false are skipped. Default: every row.
    #[serde(default)]
    pub filter: Option<String>,
    /// `[job.aggregate]`: group and fold the rows; absent, every kept row is written to the
    /// sinks as read.
    #[serde(default)]
    pub aggregate: Option<RawAggregate>,
    /// `[[job.sink]]`: where results go (one or more).
    #[serde(default, rename = "sink")]
    pub sinks: Vec<RawJobSink>,
    /// Keyspace of the job's progress tables (`job_runs`, `job_splits`, created in it when
    /// missing). The keyspace itself must exist: its replication is the operator's choice.
    #[serde(default = "default_state_keyspace")]
    pub state_keyspace: String,
    /// How long a gateway's claim on a split lasts without renewal (`"30s"`, 1 s to 1 h).
    /// A split claimed by a gateway that died is taken over once its lease runs out. A stream
    /// job holds a lease as long on each JetStream stream it folds.
    #[serde(default = "default_lease")]
    pub lease: String,
    /// Splits one `shardgate job run` processes at once (1 to 64).
    #[serde(default = "default_parallel_splits")]
    pub parallel_splits: u32,
    /// Runs the job inside `shardgate serve` every this long (`"1h"`, `"15m"`; 1 s to 30 d),
    /// the first run when the gateway is serving, each next one this long after the last
    /// ended. Absent: the job runs only by `shardgate job run`.
    #[serde(default)]
    pub every: Option<String>,
    /// `[job.dead_letter]`: where rows an expression or a measure fails on go (as a route's:
    /// `kind` = `kafka`, `nats`, `rabbitmq` or `table`; brokers and URLs must be given). Absent,
    /// such rows are only counted.
    #[serde(default)]
    pub dead_letter: Option<super::dead_letter::RawDeadLetter>,
    /// `[job.protobuf]`: broker sinks publish each result as this Protobuf message (`message`,
    /// and `descriptor_set` or `files` + `includes`, as a route's `[route.protobuf]`), its
    /// fields named like the result columns and set from their JSON forms (a `window_start`
    /// field is a `string` in RFC 3339, or a `google.protobuf.Timestamp`). Absent: JSON.
    #[serde(default)]
    pub protobuf: Option<super::route::RawProtobuf>,
}

/// `[job.source]`: `table` (a scan job), `query` (a query job), `stream` (a stream job) or
/// `replay` (a replay job).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJobSource {
    /// `keyspace.table` to scan.
    #[serde(default)]
    pub table: Option<String>,
    /// A query job: one CQL `SELECT` (table names qualified), read page by page through the
    /// gateway's `ExecuteStream` as the job's one split; `?` markers bound to `binds`.
    #[serde(default)]
    pub query: Option<String>,
    /// Bind values of `query`, in marker order: numbers, strings, booleans (a string binds to
    /// any CQL type that takes its text form, e.g. a timestamp or a uuid).
    #[serde(default)]
    #[schemars(with = "Vec<serde_json::Value>")]
    pub binds: Vec<toml::Value>,
    /// A stream job: names of Kafka or JetStream `[[route]]`s whose mapped rows (of each
    /// route's first target, the row its columns make) the job folds as messages arrive. Over
    /// Kafka routes only, inside `shardgate serve`, it folds them on the cores right after the
    /// route maps them, and the route commits no offset beyond what the job made durable; else
    /// (under `shardgate job run`, or with a JetStream route) it reads each route's topic with
    /// its own consumer group, `shardgate-job-<name>`, and each stream with an ordered consumer
    /// of its own under a lease.
    #[serde(default)]
    pub stream: Vec<String>,
    /// A replay job: the name of a `[[route]]` whose dead letters (its Kafka dead-letter topic
    /// or table) the job sends back through the route as configured now — `shardgate replay
    /// --route` as a job, run by `shardgate job run`, an `every` schedule inside `serve` or the
    /// `Jobs` service. The route is its sink and its dead-letter destination: a replay job has
    /// no `filter`, `aggregate`, `sink`, `dead_letter` or `protobuf` of its own.
    #[serde(default)]
    pub replay: Option<String>,
    /// A stream job: how often its progress and open windows are made durable, and closed
    /// windows written (`"1s"`; 100 ms to 1 min).
    #[serde(default = "default_checkpoint")]
    pub checkpoint: String,
    /// A stream job: a partition whose offset has not moved for this long stops holding the
    /// watermark back (`"30s"`; 1 s to 1 d). The watermark is the least of the partitions'
    /// largest event times, so one partition behind the others makes nothing late.
    #[serde(default = "default_idle")]
    pub idle: String,
    /// Columns to read; default all.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Extra CQL restrictions, bound to nothing (e.g. `status = 'open'`).
    #[serde(default, rename = "where")]
    pub r#where: String,
    /// Adds ALLOW FILTERING to the scan (needed by a `where` on non-key columns).
    #[serde(default)]
    pub allow_filtering: bool,
    /// Splits to plan the scan into; 0 = the gateway's default (`query.scan_splits_per_core`
    /// × cores).
    #[serde(default)]
    pub min_splits: u32,
}

/// `[job.aggregate]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAggregate {
    /// Source columns whose values form a group (and become result columns of the same name).
    /// Empty: one group over all rows (per window).
    #[serde(default)]
    pub group_by: Vec<String>,
    /// `[job.aggregate.window]`: groups per event-time window too.
    #[serde(default)]
    pub window: Option<RawWindow>,
    /// Result column name → measure: `count()`, or `sum(E)`, `min(E)`, `max(E)`, `mean(E)`,
    /// `distinct(E)` (approximate, HyperLogLog), `first(E)` or `last(E)` (by the window's event
    /// time: a window is needed) of a CEL expression `E` over `row`.
    pub measures: BTreeMap<String, String>,
}

/// `[job.aggregate.window]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    /// Source column of the event time: a `timestamp`.
    pub column: String,
    /// Window length (`"1h"`, `"15m"`, `"30s"`; 1 s to 366 days). Windows start at multiples
    /// of it since the epoch; a row belongs to the one holding its time (tumbling).
    pub size: String,
    /// Hopping windows: a new window every `hop` (a divisor of `size`), a row counted in each
    /// of the `size / hop` windows holding its time. Default: tumbling.
    #[serde(default)]
    pub hop: Option<String>,
    /// Stream jobs: how far behind the watermark's event time a row may be and still count
    /// (`"30s"`; 0 s to 1 d). A window closes, and its result is written, once the watermark
    /// (the least of the partitions' largest event times, minus `lateness`) passes its end; a
    /// row arriving for closed windows only is dead-lettered as `late`.
    #[serde(default)]
    pub lateness: Option<String>,
}

/// `[[job.sink]]`: exactly one of `table`, `kafka`, `nats`, `rabbitmq`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJobSink {
    /// `keyspace.table` written through the gateway's ingest API: columns named like the
    /// results (the `group_by` columns, `window_start` when windowed, each measure), or like
    /// the source columns for a job without `aggregate`.
    #[serde(default)]
    pub table: Option<String>,
    /// A Kafka topic: each result a JSON object, keyed by its stable message id.
    #[serde(default)]
    pub kafka: Option<RawKafkaJobSink>,
    /// A NATS subject: each result a JSON object with its stable message id in `Nats-Msg-Id`
    /// (JetStream drops a repeat within its duplicate window).
    #[serde(default)]
    pub nats: Option<RawNatsJobSink>,
    /// A RabbitMQ exchange: each result a persistent JSON message with its stable message id
    /// in the AMQP `message_id` property, published with confirms.
    #[serde(default)]
    pub rabbitmq: Option<RawRabbitMqJobSink>,
}

/// `rabbitmq = { url = "..", exchange = "", routing_key = ".." }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRabbitMqJobSink {
    /// `amqp://user:password@host:port/vhost`.
    pub url: String,
    /// Exchange; `""` (the default) routes to the queue named by `routing_key`.
    #[serde(default)]
    pub exchange: String,
    /// Routing key (with the default exchange: the queue's name).
    pub routing_key: String,
    /// The login and, with `amqps://`, TLS (`security = { username = "…", password_file = "…" }`).
    #[serde(default)]
    pub security: Option<RawAmqpSecurity>,
}

/// `kafka = { brokers = [..], topic = ".." }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaJobSink {
    /// Bootstrap servers, `host:port`.
    pub brokers: Vec<String>,
    /// Topic (it must exist, or the broker must create topics).
    pub topic: String,
    /// TLS and SASL to the brokers (`security = { protocol = "sasl_ssl", … }`).
    #[serde(default)]
    pub security: Option<RawKafkaSecurity>,
}

/// `nats = { url = "..", subject = "..", jetstream = true }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawNatsJobSink {
    /// `nats://host:port`.
    pub url: String,
    /// Subject each result is published on.
    pub subject: String,
    /// Publish to JetStream and wait for each publish's acknowledgement (a stream must capture
    /// the subject); false: core NATS, flushed.
    #[serde(default)]
    pub jetstream: bool,
    /// TLS and a login (`security = { ca_file = "…", nkey_seed_file = "…" }`).
    #[serde(default)]
    pub security: Option<RawNatsSecurity>,
}

/// A validated sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSinkConfig {
    /// A table, through the ingest API.
    Table(String),
    /// A Kafka topic.
    Kafka {
        /// Comma-separated bootstrap servers.
        brokers: String,
        /// Topic.
        topic: String,
        /// TLS and SASL to the brokers.
        security: Option<KafkaSecurity>,
    },
    /// A NATS subject.
    Nats {
        /// Server URL.
        url: String,
        /// Subject.
        subject: String,
        /// Through JetStream, acknowledged.
        jetstream: bool,
        /// TLS and a login.
        security: Option<NatsSecurity>,
    },
    /// A RabbitMQ exchange.
    RabbitMq {
        /// AMQP URL.
        url: String,
        /// Exchange (`""`: the default one).
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// Login and TLS.
        security: Option<AmqpSecurity>,
    },
}

impl JobSinkConfig {
    /// The sink as a label, e.g. `table shop.t` or `kafka topic t`.
    pub fn label(&self) -> String {
        match self {
            JobSinkConfig::Table(table) => format!("table {table}"),
            JobSinkConfig::Kafka { topic, .. } => format!("kafka topic {topic}"),
            JobSinkConfig::Nats { subject, .. } => format!("nats subject {subject}"),
            JobSinkConfig::RabbitMq {
                exchange, routing_key, ..
            } => format!("rabbitmq exchange `{exchange}` routing key {routing_key}"),
        }
    }
}

fn default_state_keyspace() -> String {
    "shardgate".into()
}

fn default_lease() -> String {
    "30s".into()
}

fn default_idle() -> String {
    "30s".into()
}

fn default_checkpoint() -> String {
    "1s".into()
}

fn default_parallel_splits() -> u32 {
    4
}

/// A validated job.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// `job[i].name`.
    pub name: String,
    /// The table scanned (empty for a query or stream job).
    pub table: String,
    /// A query job's CQL SELECT.
    pub query: Option<String>,
    /// Its bind values.
    pub binds: Vec<serde_json::Value>,
    /// A stream job's routes (empty for a scan job).
    pub stream: Vec<String>,
    /// A replay job's route.
    pub replay: Option<String>,
    /// A stream job's checkpoint interval.
    pub checkpoint: Duration,
    /// How long a stream job's partition may stand still and still hold the watermark back.
    pub idle: Duration,
    /// Columns read (empty: all).
    pub columns: Vec<String>,
    /// Extra CQL restrictions.
    pub r#where: String,
    /// ALLOW FILTERING on the scan.
    pub allow_filtering: bool,
    /// Splits planned (0: the gateway's default).
    pub min_splits: u32,
    /// CEL filter source.
    pub filter: Option<String>,
    /// Grouping and measures, if any.
    pub aggregate: Option<AggregateConfig>,
    /// Sinks.
    pub sinks: Vec<JobSinkConfig>,
    /// Keyspace of the progress tables.
    pub state_keyspace: String,
    /// Split lease.
    pub lease: Duration,
    /// Splits at once.
    pub parallel_splits: u32,
    /// Where failed rows go, if anywhere.
    pub dead_letter: Option<super::dead_letter::DeadLetterConfig>,
    /// Schedule inside `serve`.
    pub every: Option<Duration>,
    /// The Protobuf message broker sinks publish, if not JSON.
    pub protobuf: Option<super::route::ProtobufConfig>,
}

impl JobConfig {
    /// `scan`, `query`, `stream` or `replay`.
    pub fn kind(&self) -> &'static str {
        match (&self.replay, self.stream.is_empty(), &self.query) {
            (Some(_), _, _) => "replay",
            (None, false, _) => "stream",
            (None, true, Some(_)) => "query",
            (None, true, None) => "scan",
        }
    }
}

/// A validated `[job.aggregate]`.
#[derive(Debug, Clone)]
pub struct AggregateConfig {
    /// Group columns.
    pub group_by: Vec<String>,
    /// Event-time windows.
    pub window: Option<WindowConfig>,
    /// Measures in result column order (sorted by name).
    pub measures: Vec<MeasureConfig>,
}

/// A validated window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    /// Window length, milliseconds.
    pub size_ms: i64,
    /// Distance between window starts, milliseconds (= `size_ms` when tumbling).
    pub hop_ms: i64,
}

/// A validated `[job.aggregate.window]`.
#[derive(Debug, Clone)]
pub struct WindowConfig {
    /// Event-time column.
    pub column: String,
    /// Size and hop.
    pub spec: WindowSpec,
    /// Allowed lateness of a stream job's rows, milliseconds.
    pub lateness_ms: i64,
}

/// What a measure folds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureKind {
    /// Rows in the group.
    Count,
    /// Sum of numbers (exact over integers; a float anywhere makes it a double).
    Sum,
    /// Least value (numbers, then text).
    Min,
    /// Greatest value.
    Max,
    /// Arithmetic mean, a double.
    Mean,
    /// Approximate count of distinct values (HyperLogLog).
    Distinct,
    /// The value of the row with the earliest event time (ties: the least value).
    First,
    /// The value of the row with the latest event time (ties: the greatest value).
    Last,
}

/// A validated measure.
#[derive(Debug, Clone)]
pub struct MeasureConfig {
    /// Result column.
    pub name: String,
    /// The fold.
    pub kind: MeasureKind,
    /// CEL over `row` (none for `count()`).
    pub expr: Option<String>,
}

/// `"1h"`-style durations: a number and a unit (`ms`, `s`, `m`, `h`, `d`).
fn parse_duration(key: &str, text: &str, min: Duration, max: Duration, bounds: &str) -> Result<Duration, ConfigError> {
    let expected =
        || format!("a duration like `30s`, `15m`, `1h` or `1d` (a whole number and one of ms, s, m, h, d), {bounds}");
    let text_trim = text.trim();
    let split = text_trim.find(|c: char| !c.is_ascii_digit()).unwrap_or(text_trim.len());
    let (number, unit) = text_trim.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| ConfigError::invalid(key, text, expected()))?;
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(ConfigError::invalid(key, text, expected())),
    };
    let duration = number
        .checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| ConfigError::invalid(key, text, expected()))?;
    if duration < min || duration > max {
        return Err(ConfigError::invalid(key, text, expected()));
    }
    Ok(duration)
}

/// `every`: a schedule from 1 s to 30 d, if any.
fn parse_every(key: &str, every: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    every
        .map(|every| {
            parse_duration(
                key,
                every,
                Duration::from_secs(1),
                Duration::from_secs(30 * 86_400),
                "from 1s to 30d",
            )
        })
        .transpose()
}

fn validate_table(key: &str, table: &str) -> Result<(), ConfigError> {
    let Some((keyspace, name)) = table.split_once('.') else {
        return Err(ConfigError::invalid(key, table, "`keyspace.table`"));
    };
    validate_identifier(key, keyspace)?;
    validate_identifier(key, name)
}

/// A measure as written: `count()` or `kind(expression)`.
fn parse_measure(key: &str, name: &str, text: &str) -> Result<MeasureConfig, ConfigError> {
    let expected =
        "`count()`, or `sum(E)`, `min(E)`, `max(E)`, `mean(E)`, `distinct(E)`, `first(E)` or `last(E)` with \
                    `E` a CEL expression over `row`";
    let text_trim = text.trim();
    let Some((kind, rest)) = text_trim.split_once('(') else {
        return Err(ConfigError::invalid(key, text, expected));
    };
    let Some(inner) = rest.strip_suffix(')') else {
        return Err(ConfigError::invalid(key, text, expected));
    };
    let kind = match kind.trim() {
        "count" => MeasureKind::Count,
        "sum" => MeasureKind::Sum,
        "min" => MeasureKind::Min,
        "max" => MeasureKind::Max,
        "mean" => MeasureKind::Mean,
        "distinct" => MeasureKind::Distinct,
        "first" => MeasureKind::First,
        "last" => MeasureKind::Last,
        _ => return Err(ConfigError::invalid(key, text, expected)),
    };
    let inner = inner.trim();
    let expr = match (kind, inner.is_empty()) {
        (MeasureKind::Count, true) => None,
        (MeasureKind::Count, false) => {
            return Err(ConfigError::invalid(
                key,
                text,
                "`count()`: it counts rows, with no expression",
            ))
        }
        (_, true) => return Err(ConfigError::invalid(key, text, expected)),
        (_, false) => Some(validate_expression(key, inner.to_string())?),
    };
    Ok(MeasureConfig {
        name: name.to_string(),
        kind,
        expr,
    })
}

/// Validates `job[index]`.
pub(super) fn validate_job(index: usize, raw: RawJob) -> Result<JobConfig, ConfigError> {
    let key = |field: &str| format!("job[{index}].{field}");
    validate_identifier(&key("name"), &raw.name)?;
    let stream = !raw.source.stream.is_empty();
    let kinds: Vec<&str> = [
        raw.source.table.is_some().then_some("table"),
        raw.source.query.is_some().then_some("query"),
        stream.then_some("stream"),
        raw.source.replay.is_some().then_some("replay"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if kinds.len() != 1 {
        return Err(ConfigError::invalid(
            key("source"),
            format!("{{{}}}", kinds.join(", ")),
            "exactly one of `table` (a scan job), `query` (a CQL SELECT: a query job), `stream` \
             (route names: a stream job) and `replay` (a route name: a replay job)",
        ));
    }
    if let Some(route) = raw.source.replay {
        validate_identifier(&key("source.replay"), &route)?;
        let route_decides = [
            ("filter", raw.filter.is_some()),
            ("aggregate", raw.aggregate.is_some()),
            ("sink", !raw.sinks.is_empty()),
            ("dead_letter", raw.dead_letter.is_some()),
            ("protobuf", raw.protobuf.is_some()),
            ("source.binds", !raw.source.binds.is_empty()),
            ("source.columns", !raw.source.columns.is_empty()),
            ("source.where", !raw.source.r#where.is_empty()),
            ("source.allow_filtering", raw.source.allow_filtering),
            ("source.min_splits", raw.source.min_splits != 0),
        ];
        if let Some((field, _)) = route_decides.iter().find(|(_, set)| *set) {
            return Err(ConfigError::invalid(
                key(field),
                "set",
                "nothing on a replay job (it sends the route's dead letters back through the route, as \
                 the route maps, writes and dead-letters them now)",
            ));
        }
        return Ok(JobConfig {
            every: parse_every(&key("every"), raw.every.as_deref())?,
            name: raw.name,
            table: String::new(),
            query: None,
            binds: Vec::new(),
            stream: Vec::new(),
            replay: Some(route),
            checkpoint: Duration::from_secs(1),
            idle: Duration::from_secs(30),
            columns: Vec::new(),
            r#where: String::new(),
            allow_filtering: false,
            min_splits: 0,
            filter: None,
            aggregate: None,
            sinks: Vec::new(),
            state_keyspace: raw.state_keyspace,
            lease: Duration::from_secs(30),
            parallel_splits: 1,
            dead_letter: None,
            protobuf: None,
        });
    }
    let table = match &raw.source.table {
        Some(table) => {
            validate_table(&key("source.table"), table)?;
            table.clone()
        }
        None => String::new(),
    };
    let query = match &raw.source.query {
        None => None,
        Some(query) => {
            let first = query.split_whitespace().next().unwrap_or_default();
            if !first.eq_ignore_ascii_case("select") {
                return Err(ConfigError::invalid(
                    key("source.query"),
                    query,
                    "a CQL `SELECT` statement (jobs read; they write through their sinks)",
                ));
            }
            Some(query.clone())
        }
    };
    // Keys of a table scan (and, for a stream job, of a schedule) mean nothing to the others.
    let not_a_scan = match (&query, stream) {
        (Some(_), _) => Some("nothing on a query job (its `query` says what it reads)"),
        (None, true) => {
            Some("nothing on a stream job (it reads its routes' rows as they arrive and runs inside `serve`)")
        }
        (None, false) => None,
    };
    if let Some(expected) = not_a_scan {
        let scan_only = [
            ("source.columns", !raw.source.columns.is_empty()),
            ("source.where", !raw.source.r#where.is_empty()),
            ("source.allow_filtering", raw.source.allow_filtering),
            ("source.min_splits", raw.source.min_splits != 0),
            ("every", stream && raw.every.is_some()),
        ];
        if let Some((field, _)) = scan_only.iter().find(|(_, set)| *set) {
            return Err(ConfigError::invalid(key(field), "set", expected));
        }
    }
    let mut binds = Vec::with_capacity(raw.source.binds.len());
    for (i, bind) in raw.source.binds.iter().enumerate() {
        let value = match bind {
            toml::Value::Integer(n) => serde_json::json!(n),
            toml::Value::Float(f) => serde_json::json!(f),
            toml::Value::String(text) => serde_json::json!(text),
            toml::Value::Boolean(b) => serde_json::json!(b),
            other => {
                return Err(ConfigError::invalid(
                    key(&format!("source.binds[{i}]")),
                    other,
                    "a number, a string or a boolean",
                ))
            }
        };
        binds.push(value);
    }
    if !binds.is_empty() && query.is_none() {
        return Err(ConfigError::invalid(
            key("source.binds"),
            format!("{} value(s)", binds.len()),
            "a `source.query` to bind them to",
        ));
    }
    for (i, route) in raw.source.stream.iter().enumerate() {
        validate_identifier(&key(&format!("source.stream[{i}]")), route)?;
    }
    let checkpoint = parse_duration(
        &key("source.checkpoint"),
        &raw.source.checkpoint,
        Duration::from_millis(100),
        Duration::from_secs(60),
        "from 100ms to 1m",
    )?;
    let idle = parse_duration(
        &key("source.idle"),
        &raw.source.idle,
        Duration::from_secs(1),
        Duration::from_secs(86_400),
        "from 1s to 1d",
    )?;
    if stream {
        let windowed = raw.aggregate.as_ref().is_some_and(|a| a.window.is_some());
        if !windowed {
            return Err(ConfigError::invalid(
                key("aggregate.window"),
                "absent",
                "a `[job.aggregate.window]` on a stream job: its results are written as windows close",
            ));
        }
    }
    for (i, column) in raw.source.columns.iter().enumerate() {
        validate_identifier(&key(&format!("source.columns[{i}]")), column)?;
    }
    let filter = raw.filter.map(|f| validate_expression(&key("filter"), f)).transpose()?;
    let readable = |field: &str, column: &str| -> Result<(), ConfigError> {
        validate_identifier(&key(field), column)?;
        if !raw.source.columns.is_empty() && !raw.source.columns.iter().any(|c| c == column) {
            return Err(ConfigError::invalid(
                key(field),
                column,
                format!("one of the columns read (`{}.source.columns`)", key("")),
            ));
        }
        Ok(())
    };
    let aggregate = match raw.aggregate {
        None => None,
        Some(aggregate) => {
            for (i, column) in aggregate.group_by.iter().enumerate() {
                readable(&format!("aggregate.group_by[{i}]"), column)?;
            }
            let window = match aggregate.window {
                None => None,
                Some(window) => {
                    readable("aggregate.window.column", &window.column)?;
                    let size = parse_duration(
                        &key("aggregate.window.size"),
                        &window.size,
                        Duration::from_secs(1),
                        Duration::from_secs(366 * 86_400),
                        "from 1s to 366d",
                    )?;
                    let hop = match &window.hop {
                        None => size,
                        Some(hop) => {
                            let hop_key = key("aggregate.window.hop");
                            let parsed = parse_duration(
                                &hop_key,
                                hop,
                                Duration::from_secs(1),
                                size,
                                &format!("from 1s to `aggregate.window.size` ({})", window.size),
                            )?;
                            if size.as_millis() % parsed.as_millis() != 0 {
                                return Err(ConfigError::invalid(
                                    hop_key,
                                    hop,
                                    format!("a divisor of `aggregate.window.size` ({})", window.size),
                                ));
                            }
                            parsed
                        }
                    };
                    let lateness = match (&window.lateness, stream) {
                        (None, _) => Duration::ZERO,
                        (Some(lateness), true) => parse_duration(
                            &key("aggregate.window.lateness"),
                            lateness,
                            Duration::ZERO,
                            Duration::from_secs(86_400),
                            "from 0s to 1d",
                        )?,
                        (Some(lateness), false) => {
                            return Err(ConfigError::invalid(
                                key("aggregate.window.lateness"),
                                lateness,
                                "nothing on a scan job (lateness is for `stream` sources)",
                            ))
                        }
                    };
                    Some(WindowConfig {
                        column: window.column,
                        spec: WindowSpec {
                            size_ms: size.as_millis() as i64,
                            hop_ms: hop.as_millis() as i64,
                        },
                        lateness_ms: lateness.as_millis() as i64,
                    })
                }
            };
            if aggregate.measures.is_empty() {
                return Err(ConfigError::invalid(
                    key("aggregate.measures"),
                    "{}",
                    "at least one measure, for example `orders = \"count()\"`",
                ));
            }
            let mut measures = Vec::with_capacity(aggregate.measures.len());
            for (name, text) in &aggregate.measures {
                let measure_key = key(&format!("aggregate.measures.{name}"));
                validate_identifier(&measure_key, name)?;
                if aggregate.group_by.iter().any(|g| g == name) || (window.is_some() && name == "window_start") {
                    return Err(ConfigError::invalid(
                        measure_key,
                        name,
                        "a result column name no `group_by` column (nor `window_start`) has",
                    ));
                }
                let measure = parse_measure(&measure_key, name, text)?;
                if matches!(measure.kind, MeasureKind::First | MeasureKind::Last) && window.is_none() {
                    return Err(ConfigError::invalid(
                        measure_key,
                        text,
                        "a `[job.aggregate.window]` too: `first` and `last` order rows by its event time",
                    ));
                }
                measures.push(measure);
            }
            Some(AggregateConfig {
                group_by: aggregate.group_by,
                window,
                measures,
            })
        }
    };
    if raw.sinks.is_empty() {
        return Err(ConfigError::invalid(
            key("sink"),
            "[]",
            "at least one `[[job.sink]]` (a `table`, `kafka`, `nats` or `rabbitmq`)",
        ));
    }
    let mut sinks = Vec::with_capacity(raw.sinks.len());
    for (i, sink) in raw.sinks.into_iter().enumerate() {
        let sink_key = |field: &str| key(&format!("sink[{i}]{field}"));
        let sink = match (sink.table, sink.kafka, sink.nats, sink.rabbitmq) {
            (None, None, None, Some(rabbitmq)) => {
                let url = validate_amqp_url(&sink_key(".rabbitmq.url"), rabbitmq.url)?;
                if rabbitmq.routing_key.is_empty() {
                    return Err(ConfigError::invalid(
                        sink_key(".rabbitmq.routing_key"),
                        "",
                        "a routing key (with the default exchange, the queue's name)",
                    ));
                }
                let security = rabbitmq
                    .security
                    .map(|raw| validate_amqp_security(&sink_key(".rabbitmq.security"), raw, &url))
                    .transpose()?;
                JobSinkConfig::RabbitMq {
                    url,
                    exchange: rabbitmq.exchange,
                    routing_key: rabbitmq.routing_key,
                    security,
                }
            }
            (Some(table), None, None, None) => {
                validate_table(&sink_key(".table"), &table)?;
                JobSinkConfig::Table(table)
            }
            (None, Some(kafka), None, None) => {
                let brokers = join_brokers(&sink_key(".kafka.brokers"), &kafka.brokers)?;
                validate_topic(&sink_key(".kafka.topic"), &kafka.topic)?;
                let security = kafka
                    .security
                    .map(|raw| validate_kafka_security(&sink_key(".kafka.security"), raw))
                    .transpose()?;
                JobSinkConfig::Kafka {
                    brokers,
                    topic: kafka.topic,
                    security,
                }
            }
            (None, None, Some(nats), None) => {
                let url = validate_nats_url(&sink_key(".nats.url"), nats.url)?;
                validate_subject(&sink_key(".nats.subject"), &nats.subject)?;
                let security = nats
                    .security
                    .map(|raw| validate_nats_security(&sink_key(".nats.security"), raw))
                    .transpose()?;
                JobSinkConfig::Nats {
                    url,
                    subject: nats.subject,
                    jetstream: nats.jetstream,
                    security,
                }
            }
            (table, kafka, nats, rabbitmq) => {
                let set: Vec<&str> = [
                    table.is_some().then_some("table"),
                    kafka.is_some().then_some("kafka"),
                    nats.is_some().then_some("nats"),
                    rabbitmq.is_some().then_some("rabbitmq"),
                ]
                .into_iter()
                .flatten()
                .collect();
                return Err(ConfigError::invalid(
                    sink_key(""),
                    format!("{{{}}}", set.join(", ")),
                    "exactly one of `table`, `kafka`, `nats`, `rabbitmq`",
                ));
            }
        };
        sinks.push(sink);
    }
    validate_identifier(&key("state_keyspace"), &raw.state_keyspace)?;
    let lease = parse_duration(
        &key("lease"),
        &raw.lease,
        Duration::from_secs(1),
        Duration::from_secs(3600),
        "from 1s to 1h",
    )?;
    if !(1..=64).contains(&raw.parallel_splits) {
        return Err(ConfigError::invalid(
            key("parallel_splits"),
            raw.parallel_splits,
            "a number of splits from 1 to 64",
        ));
    }
    let sink_tables: Vec<(&str, &str)> = sinks
        .iter()
        .filter_map(|sink| match sink {
            JobSinkConfig::Table(table) => table.split_once('.'),
            _ => None,
        })
        .collect();
    let dead_letter = match raw.dead_letter {
        None => None,
        Some(dead_letter) => Some(super::dead_letter::validate_dead_letter(
            &key,
            Some(dead_letter),
            None,
            &sink_tables,
        )?),
    };
    let every = parse_every(&key("every"), raw.every.as_deref())?;
    let protobuf = match raw.protobuf {
        None => None,
        Some(protobuf) => {
            if sinks.iter().all(|sink| matches!(sink, JobSinkConfig::Table(_))) {
                return Err(ConfigError::invalid(
                    key("protobuf"),
                    &protobuf.message,
                    "a broker sink (`kafka`, `nats` or `rabbitmq`) too: it is their payload",
                ));
            }
            match super::route::validate_format(&key, "protobuf", Some(protobuf))? {
                super::route::Format::Protobuf(config) => Some(config),
                _ => None,
            }
        }
    };
    Ok(JobConfig {
        protobuf,
        every,
        dead_letter,
        name: raw.name,
        table,
        query,
        binds,
        stream: raw.source.stream,
        replay: None,
        checkpoint,
        idle,
        columns: raw.source.columns,
        r#where: raw.source.r#where,
        allow_filtering: raw.source.allow_filtering,
        min_splits: raw.source.min_splits,
        filter,
        aggregate,
        sinks,
        state_keyspace: raw.state_keyspace,
        lease,
        parallel_splits: raw.parallel_splits,
    })
}
