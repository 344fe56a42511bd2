//! `[[route]]`: a source, its format, target tables and column mappings — the raw tables, their
//! validated forms and `validate`. Pure.

use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

use super::check::{default_true, validate_expression, validate_identifier};
use super::dead_letter::{validate_dead_letter, DeadLetterConfig, RawDeadLetter};
use super::error::ConfigError;
use super::source::{validate_source, RawSource, SourceConfig};

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
pub(super) struct ColumnVisitor;

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

/// `route.ttl`: seconds, or the field holding seconds.
pub(super) fn ttl_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [{ "type": "integer", "minimum": 1 }, { "type": "string" }]
    })
}

pub(super) fn default_format() -> String {
    "json".to_string()
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

pub(super) fn validate_route(index: usize, raw: RawRoute) -> Result<RouteConfig, ConfigError> {
    let key = |field: &str| format!("route[{index}].{field}");
    if raw.name.is_empty() || !raw.name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        return Err(ConfigError::invalid(
            key("name"),
            &raw.name,
            "a non-empty name of letters, digits, `_`, `-`, `.`",
        ));
    }
    let format = route_format(&key, &raw.format, raw.flatbuffers, raw.protobuf)?;
    let raw_payload = matches!(format, Format::Text | Format::Bytes);
    let targets = route_targets(&key, raw.table, raw.target, raw.columns, raw_payload)?;
    let table_from = raw
        .table_from
        .map(|field| parse_field_ref(&key("table_from"), &field))
        .transpose()?;
    let filter = raw.filter.map(|e| validate_expression(&key("filter"), e)).transpose()?;
    let delete_when = raw
        .delete_when
        .map(|e| validate_expression(&key("delete_when"), e))
        .transpose()?;
    let ttl = raw.ttl.map(|ttl| route_ttl(&key, ttl)).transpose()?;
    let timestamp = route_timestamp(&key, raw.timestamp, raw.timestamp_unit.as_deref())?;
    let source = validate_source(&key("source"), raw.source)?;
    let target_tables: Vec<(&str, &str)> = targets
        .iter()
        .map(|t| (t.keyspace.as_str(), t.table.as_str()))
        .collect();
    let dead_letter = validate_dead_letter(&key, raw.dead_letter, Some(&source), &target_tables)?;
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

/// `format` with its `[route.flatbuffers]` or `[route.protobuf]` table.
fn route_format(
    key: &impl Fn(&str) -> String,
    format: &str,
    flatbuffers: Option<RawFlatBuffers>,
    protobuf: Option<RawProtobuf>,
) -> Result<Format, ConfigError> {
    match (format, flatbuffers) {
        ("flatbuffers", Some(flat)) if protobuf.is_none() => Ok(Format::FlatBuffers(flat.schema.into())),
        ("flatbuffers", None) => Err(ConfigError::invalid(
            key("flatbuffers"),
            "(missing)",
            "a `[route.flatbuffers]` table with `schema = \"path/to/schema.bfbs\"`",
        )),
        (_, Some(_)) => Err(ConfigError::invalid(
            key("flatbuffers"),
            "(set)",
            "`format = \"flatbuffers\"` when `[route.flatbuffers]` is given",
        )),
        (format, None) => validate_format(key, format, protobuf),
    }
}

/// `table` + `columns`, or `[[route.target]]` tables with their own columns.
fn route_targets(
    key: &impl Fn(&str) -> String,
    table: Option<String>,
    target: Vec<RawTarget>,
    columns: BTreeMap<String, RawColumn>,
    raw_payload: bool,
) -> Result<Vec<TargetConfig>, ConfigError> {
    match (table, target.is_empty()) {
        (Some(table), true) => Ok(vec![validate_target(key, "", &table, None, columns, raw_payload)?]),
        (None, false) if columns.is_empty() => target
            .into_iter()
            .enumerate()
            .map(|(i, t)| validate_target(key, &format!("target[{i}]."), &t.table, t.when, t.columns, raw_payload))
            .collect(),
        (None, false) => Err(ConfigError::invalid(
            key("columns"),
            "(set)",
            "columns inside each `[[route.target]]` when the route has targets",
        )),
        (Some(table), false) => Err(ConfigError::invalid(
            key("table"),
            &table,
            "either `table` or `[[route.target]]` tables, not both",
        )),
        (None, true) => Err(ConfigError::invalid(
            key("table"),
            "(missing)",
            "`table = \"keyspace.table\"` or one or more `[[route.target]]` tables",
        )),
    }
}

/// `ttl`: seconds, or a field name.
fn route_ttl(key: &impl Fn(&str) -> String, ttl: toml::Value) -> Result<TtlConfig, ConfigError> {
    match ttl {
        toml::Value::Integer(seconds) => match i32::try_from(seconds) {
            Ok(seconds) if seconds > 0 => Ok(TtlConfig::Seconds(seconds)),
            _ => Err(ConfigError::invalid(
                key("ttl"),
                seconds.to_string(),
                "seconds between 1 and 2147483647, or a field name",
            )),
        },
        toml::Value::String(field) => Ok(TtlConfig::Field(parse_field_ref(&key("ttl"), &field)?)),
        other => Err(ConfigError::invalid(
            key("ttl"),
            other.to_string(),
            "seconds (an integer) or a field name (a string)",
        )),
    }
}

/// `timestamp` with its `timestamp_unit`.
fn route_timestamp(
    key: &impl Fn(&str) -> String,
    timestamp: Option<String>,
    unit: Option<&str>,
) -> Result<Option<TimestampConfig>, ConfigError> {
    let unit = match unit {
        None | Some("ms") => TimeUnit::Millis,
        Some("s") => TimeUnit::Seconds,
        Some("us") => TimeUnit::Micros,
        Some(other) => return Err(ConfigError::invalid(key("timestamp_unit"), other, "`s`, `ms` or `us`")),
    };
    timestamp
        .map(|field| parse_field_ref(&key("timestamp"), &field).map(|field| TimestampConfig { field, unit }))
        .transpose()
}

pub(super) fn validate_format(
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

pub(super) fn validate_target(
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
