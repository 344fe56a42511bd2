//! JSON value → CQL value of a given column type. Pure; runs on the core that owns the row.
//!
//! Rules (what a Kafka Connect JSON user expects, and a little more):
//! - integers accept JSON integers or integer strings, range-checked for the column width;
//! - `float`/`double` accept numbers or numeric strings; `decimal`/`varint` keep full precision
//!   (the JSON literal is parsed as written, never through `f64`);
//! - `timestamp` accepts epoch milliseconds or RFC 3339 text; `date` accepts `YYYY-MM-DD` or days
//!   since the epoch; `time` accepts `HH:MM:SS[.fraction]` or nanoseconds since midnight;
//! - `blob` accepts `0x`-prefixed hex or standard base64;
//! - `text` accepts strings; numbers and booleans become their JSON text; objects and arrays
//!   become compact JSON;
//! - collections, tuples and UDTs recurse; JSON `null` inside a collection is refused.

use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine;
use bigdecimal::BigDecimal;
use num_bigint::BigInt;
use scylla::cluster::metadata::{CollectionType, ColumnType, NativeType};
use scylla::serialize::value::SerializeValue;
use scylla::serialize::writers::CellWriter;
use scylla::value::{CqlDate, CqlDecimal, CqlTime, CqlTimestamp, CqlTimeuuid, CqlValue, CqlVarint};
use serde_json::Value;

use crate::sink::scylla::bound::{put, put_integer, write_collection};

/// Why a value does not fit its column type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct CoerceError {
    /// Human-readable reason, naming the expected form.
    pub reason: String,
}

fn fail<T>(reason: impl Into<String>) -> Result<T, CoerceError> {
    Err(CoerceError { reason: reason.into() })
}

/// Short, bounded rendering of a JSON value for error messages.
pub(crate) fn preview<'a>(value: impl Into<Json<'a>>) -> String {
    const PREVIEW_CHARS_MAX: usize = 64;
    let text = value.into().to_string();
    if text.chars().count() <= PREVIEW_CHARS_MAX {
        return text;
    }
    let cut: String = text.chars().take(PREVIEW_CHARS_MAX).collect();
    format!("{cut}…")
}

/// Days between 1970-01-01 and CQL's date epoch origin (2^31 is the epoch).
const CQL_DATE_EPOCH: i64 = 1 << 31;
const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;

/// What a column of one CQL type accepts from JSON: the user documentation of [`coerce`]
/// (rendered into `deploy/reference/configuration.md`); every example is checked by a test.
#[derive(Debug, Clone)]
pub struct JsonForm {
    /// The CQL type as written in a schema.
    pub cql: &'static str,
    /// The column type the examples are coerced to.
    pub typ: ColumnType<'static>,
    /// The JSON forms accepted.
    pub accepts: &'static str,
    /// JSON literals that this type accepts.
    pub examples: &'static [&'static str],
}

/// The JSON forms of every CQL type a mapped column may have, in documentation order.
pub fn json_forms() -> Vec<JsonForm> {
    let native = ColumnType::Native;
    let form = |cql, typ, accepts, examples| JsonForm {
        cql,
        typ,
        accepts,
        examples,
    };
    vec![
        form(
            "text, varchar",
            native(NativeType::Text),
            "a string; numbers and booleans become their JSON text, objects and arrays compact JSON",
            &[r#""Oslo""#, "42", r#"{"a":1}"#],
        ),
        form(
            "ascii",
            native(NativeType::Ascii),
            "as `text`, ASCII only",
            &[r#""abc""#],
        ),
        form(
            "boolean",
            native(NativeType::Boolean),
            "`true`/`false`, or the strings `\"true\"`/`\"false\"` (any case)",
            &["true", r#""FALSE""#],
        ),
        form(
            "tinyint, smallint, int, bigint",
            native(NativeType::BigInt),
            "an integer, or a string holding one; range-checked for the column's width (no fractions)",
            &["42", r#""-7""#, "9223372036854775807"],
        ),
        form(
            "float, double",
            native(NativeType::Double),
            "a number, or a string holding one",
            &["1.5", "3", r#""2.25""#],
        ),
        form(
            "decimal",
            native(NativeType::Decimal),
            "a number or a numeric string, kept at full precision (never through a binary float)",
            &["12.345678901234567890", r#""0.10""#],
        ),
        form(
            "varint",
            native(NativeType::Varint),
            "an integer of any size, or a string holding one",
            &["123456789012345678901234567890", r#""-5""#],
        ),
        form(
            "timestamp",
            native(NativeType::Timestamp),
            "epoch milliseconds (a number or numeric string) or RFC 3339 text with a zone",
            &[
                "1700000000123",
                r#""2023-11-14T22:13:20.123Z""#,
                r#""2023-11-14T23:13:20+01:00""#,
            ],
        ),
        form(
            "date",
            native(NativeType::Date),
            "`YYYY-MM-DD`, or days since 1970-01-01 (may be negative)",
            &[r#""2024-02-29""#, "19000"],
        ),
        form(
            "time",
            native(NativeType::Time),
            "`HH:MM:SS[.fraction]`, or nanoseconds since midnight",
            &[r#""13:45:00.5""#, "1000000000"],
        ),
        form(
            "uuid",
            native(NativeType::Uuid),
            "a UUID string",
            &[r#""123e4567-e89b-42d3-a456-426614174000""#],
        ),
        form(
            "timeuuid",
            native(NativeType::Timeuuid),
            "a version 1 UUID string",
            &[r#""d2177dd0-eaa2-11de-a572-001b779c76e3""#],
        ),
        form(
            "inet",
            native(NativeType::Inet),
            "an IPv4 or IPv6 address string",
            &[r#""10.0.0.1""#, r#""::1""#],
        ),
        form(
            "blob",
            native(NativeType::Blob),
            "`0x`-prefixed hex, or standard base64 (`$payload` maps raw bytes)",
            &[r#""0x00ff10""#, r#""AP8Q""#],
        ),
        form(
            "list<T>, set<T>",
            ColumnType::Collection {
                frozen: true,
                typ: CollectionType::Set(Box::new(native(NativeType::Int))),
            },
            "a JSON array of `T` forms (no nulls inside)",
            &["[1, 2, 3]", r#"["4"]"#],
        ),
        form(
            "map<K, V>",
            ColumnType::Collection {
                frozen: false,
                typ: CollectionType::Map(Box::new(native(NativeType::Int)), Box::new(native(NativeType::Text))),
            },
            "a JSON object; keys are read as `K` from their text, values as `V` (no nulls inside)",
            &[r#"{"1": "a", "2": "b"}"#],
        ),
        form(
            "tuple<...>",
            ColumnType::Tuple(vec![native(NativeType::Int), native(NativeType::Text)]),
            "a JSON array with one element per field (`null` allowed)",
            &[r#"[1, "x"]"#, "[2, null]"],
        ),
        form(
            "user types",
            native(NativeType::Text),
            "a JSON object by field name; missing fields are null, unknown fields are refused",
            &[],
        ),
    ]
}

/// A JSON value as coercion reads it, borrowed: from a decoded document, or straight from a
/// payload's bytes (a projected member's text or number literal needs no `Value` of its own).
#[derive(Debug, Clone, Copy)]
pub enum Json<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number's literal, as written (serde_json's `arbitrary_precision` keeps it so too).
    Number(&'a str),
    /// A string's text, unescaped.
    String(&'a str),
    /// An array.
    Array(&'a [Value]),
    /// An object.
    Object(&'a serde_json::Map<String, Value>),
}

impl<'a> From<&'a Value> for Json<'a> {
    fn from(value: &'a Value) -> Json<'a> {
        match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => Json::Number(n.as_str()),
            Value::String(s) => Json::String(s),
            Value::Array(items) => Json::Array(items),
            Value::Object(object) => Json::Object(object),
        }
    }
}

impl Json<'_> {
    /// Whether it is `null`.
    pub fn is_null(self) -> bool {
        matches!(self, Json::Null)
    }

    /// The number as `i64`, as `serde_json::Number::as_i64` answers.
    pub fn as_i64(self) -> Option<i64> {
        match self {
            Json::Number(n) => n.parse().ok(),
            _ => None,
        }
    }
}

/// Compact JSON text, as `Value`'s `Display` writes it.
impl std::fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let write = |f: &mut std::fmt::Formatter<'_>, json: Result<String, serde_json::Error>| {
            f.write_str(&json.map_err(|_| std::fmt::Error)?)
        };
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::Number(n) => f.write_str(n),
            Json::String(s) => write(f, serde_json::to_string(s)),
            Json::Array(items) => write(f, serde_json::to_string(items)),
            Json::Object(object) => write(f, serde_json::to_string(object)),
        }
    }
}

/// Converts `value` to a CQL value of type `typ`. `null` is handled by the caller.
pub fn coerce(value: &Value, typ: &ColumnType<'_>) -> Result<CqlValue, CoerceError> {
    coerce_json(value.into(), typ)
}

/// [`coerce`] of a borrowed JSON value.
pub fn coerce_json(value: Json<'_>, typ: &ColumnType<'_>) -> Result<CqlValue, CoerceError> {
    match typ {
        ColumnType::Native(native) => coerce_native(value, native),
        ColumnType::Collection { typ: collection, .. } => coerce_collection(value, collection),
        ColumnType::Tuple(types) => {
            let Json::Array(items) = value else {
                return fail(format!("expected a JSON array for a tuple, got {}", preview(value)));
            };
            if items.len() != types.len() {
                return fail(format!(
                    "expected a tuple of {} elements, got {}",
                    types.len(),
                    items.len()
                ));
            }
            let fields = items
                .iter()
                .zip(types)
                .map(|(item, t)| {
                    if item.is_null() {
                        Ok(None)
                    } else {
                        coerce(item, t).map(Some)
                    }
                })
                .collect::<Result<_, _>>()?;
            Ok(CqlValue::Tuple(fields))
        }
        ColumnType::UserDefinedType { definition, .. } => {
            let Json::Object(object) = value else {
                return fail(format!(
                    "expected a JSON object for a user type, got {}",
                    preview(value)
                ));
            };
            if let Some(unknown) = object
                .keys()
                .find(|k| !definition.field_types.iter().any(|(name, _)| name == k.as_str()))
            {
                return fail(format!("user type `{}` has no field `{unknown}`", definition.name));
            }
            let mut fields = Vec::with_capacity(definition.field_types.len());
            for (name, field_type) in &definition.field_types {
                let field = match object.get(name.as_ref()) {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(coerce(v, field_type).map_err(|e| CoerceError {
                        reason: format!("field `{name}`: {}", e.reason),
                    })?),
                };
                fields.push((name.to_string(), field));
            }
            Ok(CqlValue::UserDefinedType {
                keyspace: definition.keyspace.to_string(),
                name: definition.name.to_string(),
                fields,
            })
        }
        other => fail(format!("columns of type {other:?} are not supported yet")),
    }
}

fn coerce_collection(value: Json<'_>, collection: &CollectionType<'_>) -> Result<CqlValue, CoerceError> {
    let elements = |items: &[Value], element: &ColumnType<'_>| -> Result<Vec<CqlValue>, CoerceError> {
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                if item.is_null() {
                    return fail(format!("element {i} is null; collections cannot hold nulls"));
                }
                coerce(item, element).map_err(|e| CoerceError {
                    reason: format!("element {i}: {}", e.reason),
                })
            })
            .collect()
    };
    match collection {
        CollectionType::List(element) => match value {
            Json::Array(items) => Ok(CqlValue::List(elements(items, element)?)),
            other => fail(format!("expected a JSON array for a list, got {}", preview(other))),
        },
        CollectionType::Set(element) => match value {
            Json::Array(items) => Ok(CqlValue::Set(elements(items, element)?)),
            other => fail(format!("expected a JSON array for a set, got {}", preview(other))),
        },
        CollectionType::Map(key_type, value_type) => {
            let Json::Object(object) = value else {
                return fail(format!("expected a JSON object for a map, got {}", preview(value)));
            };
            let mut pairs = Vec::with_capacity(object.len());
            for (k, v) in object {
                // Map keys arrive as JSON strings; coerce them as text first, then as the key type.
                let key = coerce_json(Json::String(k), key_type).map_err(|e| CoerceError {
                    reason: format!("map key `{k}`: {}", e.reason),
                })?;
                if v.is_null() {
                    return fail(format!("map value of `{k}` is null; collections cannot hold nulls"));
                }
                let value = coerce(v, value_type).map_err(|e| CoerceError {
                    reason: format!("map value of `{k}`: {}", e.reason),
                })?;
                pairs.push((key, value));
            }
            Ok(CqlValue::Map(pairs))
        }
        other => fail(format!("collections of type {other:?} are not supported yet")),
    }
}

fn coerce_native(value: Json<'_>, native: &NativeType) -> Result<CqlValue, CoerceError> {
    match native {
        NativeType::Text => Ok(CqlValue::Text(as_text(value))),
        NativeType::Ascii => {
            let text = as_text(value);
            if !text.is_ascii() {
                return fail("expected ASCII text for an `ascii` column");
            }
            Ok(CqlValue::Ascii(text))
        }
        NativeType::Boolean => boolean_of(value).map(CqlValue::Boolean).map_or_else(
            || {
                fail(format!(
                    "expected true or false for a `boolean` column, got {}",
                    preview(value)
                ))
            },
            Ok,
        ),
        NativeType::TinyInt => integer(value, "tinyint")
            .and_then(|n| narrow(n, "tinyint"))
            .map(CqlValue::TinyInt),
        NativeType::SmallInt => integer(value, "smallint")
            .and_then(|n| narrow(n, "smallint"))
            .map(CqlValue::SmallInt),
        NativeType::Int => integer(value, "int").and_then(|n| narrow(n, "int")).map(CqlValue::Int),
        NativeType::BigInt => integer(value, "bigint").map(CqlValue::BigInt),
        NativeType::Float => float(value, "float").map(|f| CqlValue::Float(f as f32)),
        NativeType::Double => float(value, "double").map(CqlValue::Double),
        NativeType::Decimal => decimal(value),
        NativeType::Varint => varint(value),
        NativeType::Timestamp => timestamp(value),
        NativeType::Date => date(value),
        NativeType::Time => time(value),
        NativeType::Uuid => uuid(value, "uuid").map(CqlValue::Uuid),
        NativeType::Timeuuid => {
            let id = uuid(value, "timeuuid")?;
            if id.get_version_num() != 1 {
                return fail(format!(
                    "expected a version 1 UUID for a `timeuuid` column, got version {}",
                    id.get_version_num()
                ));
            }
            Ok(CqlValue::Timeuuid(CqlTimeuuid::from(id)))
        }
        NativeType::Inet => match value {
            Json::String(s) => IpAddr::from_str(s).map(CqlValue::Inet).or_else(|_| {
                fail(format!(
                    "expected an IPv4 or IPv6 address for an `inet` column, got {}",
                    preview(value)
                ))
            }),
            other => fail(format!(
                "expected an IP address string for an `inet` column, got {}",
                preview(other)
            )),
        },
        NativeType::Blob => blob(value).map(CqlValue::Blob),
        NativeType::Counter => fail("counter columns cannot be written by insert"),
        other => fail(format!("columns of type {other:?} are not supported yet")),
    }
}

/// A boolean from `true`, `false` or their text in any case.
fn boolean_of(value: Json<'_>) -> Option<bool> {
    match value {
        Json::Bool(b) => Some(b),
        Json::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Json::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn as_text(value: Json<'_>) -> String {
    match value {
        Json::String(s) => s.to_string(),
        other => other.to_string(),
    }
}

/// An integer from a JSON integer or integer text.
fn integer_of(value: Json<'_>) -> Option<i64> {
    match value {
        Json::Number(_) => value.as_i64(),
        Json::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
}

fn integer(value: Json<'_>, cql: &str) -> Result<i64, CoerceError> {
    integer_of(value).map_or_else(
        || {
            fail(format!(
                "expected an integer for a `{cql}` column, got {}",
                preview(value)
            ))
        },
        Ok,
    )
}

fn narrow<T: TryFrom<i64>>(n: i64, cql: &str) -> Result<T, CoerceError> {
    T::try_from(n).or_else(|_| fail(format!("{n} is out of range for a `{cql}` column")))
}

/// A float from a JSON number or numeric text.
fn float_of(value: Json<'_>) -> Option<f64> {
    match value {
        // As `serde_json::Number::as_f64` answers.
        Json::Number(n) => n.parse::<f64>().ok().filter(|f| f.is_finite()),
        Json::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

fn float(value: Json<'_>, cql: &str) -> Result<f64, CoerceError> {
    float_of(value).map_or_else(
        || {
            fail(format!(
                "expected a number for a `{cql}` column, got {}",
                preview(value)
            ))
        },
        Ok,
    )
}

/// The number's literal text.
fn number_text(value: Json<'_>) -> Option<&str> {
    match value {
        Json::Number(n) => Some(n),
        Json::String(s) => Some(s.trim()),
        _ => None,
    }
}

fn decimal(value: Json<'_>) -> Result<CqlValue, CoerceError> {
    let parsed = number_text(value).and_then(|t| BigDecimal::from_str(t).ok());
    let Some(decimal) = parsed else {
        return fail(format!(
            "expected a decimal number for a `decimal` column, got {}",
            preview(value)
        ));
    };
    let (digits, scale) = decimal.as_bigint_and_exponent();
    let Ok(scale) = i32::try_from(scale) else {
        return fail("decimal scale is out of range");
    };
    Ok(CqlValue::Decimal(CqlDecimal::from_signed_be_bytes_and_exponent(
        digits.to_signed_bytes_be(),
        scale,
    )))
}

fn varint(value: Json<'_>) -> Result<CqlValue, CoerceError> {
    let parsed = number_text(value).and_then(|t| BigInt::from_str(t).ok());
    let Some(int) = parsed else {
        return fail(format!(
            "expected an integer for a `varint` column, got {}",
            preview(value)
        ));
    };
    Ok(CqlValue::Varint(CqlVarint::from_signed_bytes_be(
        int.to_signed_bytes_be(),
    )))
}

/// Epoch milliseconds from a JSON integer or RFC 3339 text.
fn timestamp_of(value: Json<'_>) -> Option<i64> {
    match value {
        Json::Number(_) => value.as_i64(),
        Json::String(s) => chrono::DateTime::parse_from_rfc3339(s.trim())
            .ok()
            .map(|t| t.timestamp_millis()),
        _ => None,
    }
}

fn timestamp(value: Json<'_>) -> Result<CqlValue, CoerceError> {
    timestamp_of(value)
        .map(|m| CqlValue::Timestamp(CqlTimestamp(m)))
        .map_or_else(
            || {
                fail(format!(
                    "expected epoch milliseconds or RFC 3339 text for a `timestamp` column, got {}",
                    preview(value)
                ))
            },
            Ok,
        )
}

/// A CQL date (days, with 2^31 the epoch) from `YYYY-MM-DD` or days since 1970-01-01.
fn date_of(value: Json<'_>) -> Option<u32> {
    let days = match value {
        Json::Number(_) => value.as_i64(),
        Json::String(s) => chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
            .ok()
            .map(|d| d.signed_duration_since(chrono::NaiveDate::default()).num_days()),
        _ => None,
    };
    days.and_then(|d| u32::try_from(d.checked_add(CQL_DATE_EPOCH)?).ok())
}

fn date(value: Json<'_>) -> Result<CqlValue, CoerceError> {
    date_of(value).map(|d| CqlValue::Date(CqlDate(d))).map_or_else(
        || {
            fail(format!(
                "expected `YYYY-MM-DD` or days since 1970-01-01 for a `date` column, got {}",
                preview(value)
            ))
        },
        Ok,
    )
}

/// Nanoseconds since midnight from `HH:MM:SS[.fraction]` or a JSON integer, within a day.
fn time_of(value: Json<'_>) -> Option<i64> {
    let nanos = match value {
        Json::Number(_) => value.as_i64(),
        Json::String(s) => chrono::NaiveTime::parse_from_str(s.trim(), "%H:%M:%S%.f")
            .ok()
            .map(|t| {
                t.signed_duration_since(chrono::NaiveTime::MIN)
                    .num_nanoseconds()
                    .unwrap_or(-1)
            }),
        _ => None,
    };
    nanos.filter(|n| (0..NANOS_PER_DAY).contains(n))
}

fn time(value: Json<'_>) -> Result<CqlValue, CoerceError> {
    match time_of(value) {
        Some(n) => Ok(CqlValue::Time(CqlTime(n))),
        _ => fail(format!(
            "expected `HH:MM:SS[.fraction]` or nanoseconds since midnight for a `time` column, got {}",
            preview(value)
        )),
    }
}

/// A UUID from its text.
fn uuid_of(value: Json<'_>) -> Option<uuid::Uuid> {
    match value {
        Json::String(s) => uuid::Uuid::parse_str(s.trim()).ok(),
        _ => None,
    }
}

fn uuid(value: Json<'_>, cql: &str) -> Result<uuid::Uuid, CoerceError> {
    if let Some(id) = uuid_of(value) {
        return Ok(id);
    }
    match value {
        Json::String(_) => fail(format!("expected a UUID for a `{cql}` column, got {}", preview(value))),
        other => fail(format!(
            "expected a UUID string for a `{cql}` column, got {}",
            preview(other)
        )),
    }
}

fn blob(value: Json<'_>) -> Result<Vec<u8>, CoerceError> {
    let Json::String(s) = value else {
        return fail(format!(
            "expected `0x` hex or base64 text for a `blob` column, got {}",
            preview(value)
        ));
    };
    if let Some(hex) = s.strip_prefix("0x") {
        return decode_hex(hex).map_or_else(|| fail("invalid hex after `0x` for a `blob` column"), Ok);
    }
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .or_else(|_| fail("expected `0x` hex or standard base64 for a `blob` column"))
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Appends `value`, for a column of type `typ`, to `buffer` as one serialized CQL cell (a
/// 4-byte length, then the bytes): the bytes [`coerce_json`] and the driver's serialization give,
/// without building the `CqlValue` (held to them by property tests). Scalars and collections of
/// them are written straight from the JSON; `varint`, tuples, UDTs and every value that does
/// not fit go through [`coerce_json`], so errors read the same. `null` is the caller's (as for
/// [`coerce_json`]). On error `buffer` is as it was.
pub fn write_cell(value: Json<'_>, typ: &ColumnType<'_>, buffer: &mut Vec<u8>) -> Result<(), CoerceError> {
    let start = buffer.len();
    if write_direct(value, typ, buffer).is_some() {
        return Ok(());
    }
    buffer.truncate(start);
    serialize_cell(&coerce_json(value, typ)?, typ, buffer)
}

/// Appends an already coerced `value` to `buffer` as one serialized CQL cell, by the driver's
/// serialization (what [`write_cell`] gives for the JSON it came from). On error `buffer` is as
/// it was.
pub fn serialize_cell(value: &CqlValue, typ: &ColumnType<'_>, buffer: &mut Vec<u8>) -> Result<(), CoerceError> {
    let start = buffer.len();
    value.serialize(typ, CellWriter::new(buffer)).map(|_| ()).map_err(|e| {
        buffer.truncate(start);
        CoerceError { reason: e.to_string() }
    })
}

/// [`write_cell`]'s direct path: `None` when `value` is not written here (a type it leaves to
/// [`coerce_json`], or a value that does not fit), with `buffer` left to be truncated by the
/// caller. The rules are [`coerce_native`]'s, through the same readers (`integer_of`, ...).
fn write_direct(value: Json<'_>, typ: &ColumnType<'_>, buffer: &mut Vec<u8>) -> Option<()> {
    let native = match typ {
        ColumnType::Native(native) => native,
        ColumnType::Collection {
            typ: CollectionType::List(element) | CollectionType::Set(element),
            ..
        } => {
            let Json::Array(items) = value else {
                return None;
            };
            return write_collection(buffer, |buffer| {
                for item in items {
                    if item.is_null() {
                        return None;
                    }
                    write_direct(item.into(), element, buffer)?;
                }
                Some(items.len())
            });
        }
        ColumnType::Collection {
            typ: CollectionType::Map(key_type, value_type),
            ..
        } => {
            let Json::Object(object) = value else {
                return None;
            };
            return write_collection(buffer, |buffer| {
                for (key, item) in object {
                    write_direct(Json::String(key), key_type, buffer)?;
                    if item.is_null() {
                        return None;
                    }
                    write_direct(item.into(), value_type, buffer)?;
                }
                Some(object.len())
            });
        }
        _ => return None,
    };
    // What a text column holds: the string, or a number's or boolean's JSON text.
    let text = match value {
        Json::String(s) | Json::Number(s) => Some(s.as_bytes()),
        Json::Bool(true) => Some(b"true".as_slice()),
        Json::Bool(false) => Some(b"false".as_slice()),
        _ => None,
    };
    match native {
        NativeType::Text => put(buffer, text?),
        NativeType::Ascii => put(buffer, text.filter(|t| t.is_ascii())?),
        NativeType::Boolean => put(buffer, &[u8::from(boolean_of(value)?)]),
        NativeType::TinyInt | NativeType::SmallInt | NativeType::Int | NativeType::BigInt => {
            put_integer(buffer, native, integer_of(value)?)
        }
        NativeType::Float => put(buffer, &(float_of(value)? as f32).to_be_bytes()),
        NativeType::Double => put(buffer, &float_of(value)?.to_be_bytes()),
        NativeType::Decimal => write_small_decimal(number_text(value)?, buffer),
        NativeType::Timestamp => put(buffer, &timestamp_of(value)?.to_be_bytes()),
        NativeType::Date => put(buffer, &date_of(value)?.to_be_bytes()),
        NativeType::Time => put(buffer, &time_of(value)?.to_be_bytes()),
        NativeType::Uuid => put(buffer, uuid_of(value)?.as_bytes()),
        NativeType::Timeuuid => put(
            buffer,
            uuid_of(value).filter(|id| id.get_version_num() == 1)?.as_bytes(),
        ),
        NativeType::Inet => match value {
            Json::String(s) => match IpAddr::from_str(s).ok()? {
                IpAddr::V4(address) => put(buffer, &address.octets()),
                IpAddr::V6(address) => put(buffer, &address.octets()),
            },
            _ => None,
        },
        NativeType::Blob => put(buffer, &blob(value).ok()?),
        _ => None,
    }
}

/// Writes a decimal literal of at most 18 digits, `-?D+(.D+)?` (the usual money amount), as
/// [`decimal`] would: the digits as written are the unscaled value, the fraction's length the
/// scale. `None` for any other literal (an exponent, a sign `+`, more digits), left to
/// [`decimal`].
fn write_small_decimal(literal: &str, buffer: &mut Vec<u8>) -> Option<()> {
    const DIGITS_MAX: usize = 18;
    let (negative, unsigned) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if whole.is_empty()
        || (unsigned.len() > whole.len() && fraction.is_empty())
        || whole.len() + fraction.len() > DIGITS_MAX
    {
        return None;
    }
    let mut unscaled: i64 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        if !digit.is_ascii_digit() {
            return None;
        }
        // Cannot overflow: at most 18 digits.
        unscaled = unscaled * 10 + i64::from(digit - b'0');
    }
    if negative {
        unscaled = -unscaled;
    }
    let scale = i32::try_from(fraction.len()).ok()?;
    let bytes = unscaled.to_be_bytes();
    // Two's complement in as few bytes as keep the sign, as `BigInt::to_signed_bytes_be` writes.
    let mut first = 0;
    while first < bytes.len() - 1 {
        let redundant = (bytes[first] == 0x00 && bytes[first + 1] & 0x80 == 0)
            || (bytes[first] == 0xff && bytes[first + 1] & 0x80 != 0);
        if !redundant {
            break;
        }
        first += 1;
    }
    let unscaled = &bytes[first..];
    buffer.extend_from_slice(&i32::try_from(4 + unscaled.len()).ok()?.to_be_bytes());
    buffer.extend_from_slice(&scale.to_be_bytes());
    buffer.extend_from_slice(unscaled);
    Some(())
}

#[cfg(test)]
mod tests {
    /// Every example in the documented JSON forms is accepted by its type.
    #[test]
    fn documented_json_forms_are_accepted() {
        for form in json_forms() {
            for example in form.examples {
                let value: Value = serde_json::from_str(example).expect("example is JSON");
                assert!(
                    coerce(&value, &form.typ).is_ok(),
                    "{}: {example} refused: {:?}",
                    form.cql,
                    coerce(&value, &form.typ)
                );
            }
        }
    }

    use super::*;
    use serde_json::json;

    fn native(t: NativeType) -> ColumnType<'static> {
        ColumnType::Native(t)
    }

    #[test]
    fn integers_are_range_checked() {
        assert_eq!(
            coerce(&json!(127), &native(NativeType::TinyInt)),
            Ok(CqlValue::TinyInt(127))
        );
        assert!(coerce(&json!(128), &native(NativeType::TinyInt)).is_err());
        assert_eq!(coerce(&json!("-5"), &native(NativeType::Int)), Ok(CqlValue::Int(-5)));
        assert!(coerce(&json!(1.5), &native(NativeType::BigInt)).is_err());
        assert!(coerce(&json!(true), &native(NativeType::Int)).is_err());
        assert_eq!(
            coerce(&json!(i64::MAX), &native(NativeType::BigInt)),
            Ok(CqlValue::BigInt(i64::MAX))
        );
    }

    #[test]
    fn decimal_keeps_full_precision() {
        let value: Value = serde_json::from_str("12345678901234567890.000000000001").expect("json");
        let expected = CqlDecimal::from_signed_be_bytes_and_exponent(
            BigInt::from_str("12345678901234567890000000000001")
                .expect("int")
                .to_signed_bytes_be(),
            12,
        );
        assert_eq!(
            coerce(&value, &native(NativeType::Decimal)),
            Ok(CqlValue::Decimal(expected))
        );
    }

    #[test]
    fn varint_beyond_i64() {
        let value: Value = serde_json::from_str("123456789012345678901234567890").expect("json");
        let expected = BigInt::from_str("123456789012345678901234567890")
            .expect("int")
            .to_signed_bytes_be();
        assert_eq!(
            coerce(&value, &native(NativeType::Varint)),
            Ok(CqlValue::Varint(CqlVarint::from_signed_bytes_be(expected)))
        );
    }

    #[test]
    fn timestamps_from_millis_or_rfc3339() {
        assert_eq!(
            coerce(&json!(1_700_000_000_123_i64), &native(NativeType::Timestamp)),
            Ok(CqlValue::Timestamp(CqlTimestamp(1_700_000_000_123)))
        );
        assert_eq!(
            coerce(&json!("2023-11-14T22:13:20.123Z"), &native(NativeType::Timestamp)),
            Ok(CqlValue::Timestamp(CqlTimestamp(1_700_000_000_123)))
        );
        assert!(coerce(&json!("yesterday"), &native(NativeType::Timestamp)).is_err());
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(
            coerce(&json!("1970-01-02"), &native(NativeType::Date)),
            Ok(CqlValue::Date(CqlDate((1 << 31) + 1)))
        );
        assert_eq!(
            coerce(&json!(-1), &native(NativeType::Date)),
            Ok(CqlValue::Date(CqlDate((1 << 31) - 1)))
        );
        assert_eq!(
            coerce(&json!("00:00:01.5"), &native(NativeType::Time)),
            Ok(CqlValue::Time(CqlTime(1_500_000_000)))
        );
        assert!(coerce(&json!(NANOS_PER_DAY), &native(NativeType::Time)).is_err());
    }

    #[test]
    fn uuids_and_timeuuids() {
        let v4 = "5b6962dd-3f90-4c93-8f61-eabfa4a803e2";
        assert!(matches!(
            coerce(&json!(v4), &native(NativeType::Uuid)),
            Ok(CqlValue::Uuid(_))
        ));
        assert!(coerce(&json!(v4), &native(NativeType::Timeuuid)).is_err());
        let v1 = "58e0a7d7-eebc-11d8-9669-0800200c9a66";
        assert!(matches!(
            coerce(&json!(v1), &native(NativeType::Timeuuid)),
            Ok(CqlValue::Timeuuid(_))
        ));
    }

    #[test]
    fn blobs_from_hex_or_base64() {
        assert_eq!(
            coerce(&json!("0x00ff10"), &native(NativeType::Blob)),
            Ok(CqlValue::Blob(vec![0, 255, 16]))
        );
        assert_eq!(
            coerce(&json!("AP8Q"), &native(NativeType::Blob)),
            Ok(CqlValue::Blob(vec![0, 255, 16]))
        );
        assert!(coerce(&json!("0xf"), &native(NativeType::Blob)).is_err());
        assert!(coerce(&json!("0xzz"), &native(NativeType::Blob)).is_err());
    }

    #[test]
    fn text_accepts_scalars_and_json() {
        assert_eq!(
            coerce(&json!(42), &native(NativeType::Text)),
            Ok(CqlValue::Text("42".into()))
        );
        assert_eq!(
            coerce(&json!({"a": 1}), &native(NativeType::Text)),
            Ok(CqlValue::Text("{\"a\":1}".into()))
        );
        assert!(coerce(&json!("é"), &native(NativeType::Ascii)).is_err());
    }

    #[test]
    fn collections_recurse_and_refuse_nulls() {
        let list = ColumnType::Collection {
            frozen: false,
            typ: CollectionType::List(Box::new(native(NativeType::Int))),
        };
        assert_eq!(
            coerce(&json!([1, "2"]), &list),
            Ok(CqlValue::List(vec![CqlValue::Int(1), CqlValue::Int(2)]))
        );
        assert!(coerce(&json!([1, null]), &list).is_err());
        let map = ColumnType::Collection {
            frozen: false,
            typ: CollectionType::Map(Box::new(native(NativeType::Int)), Box::new(native(NativeType::Text))),
        };
        assert_eq!(
            coerce(&json!({"7": "x"}), &map),
            Ok(CqlValue::Map(vec![(CqlValue::Int(7), CqlValue::Text("x".into()))]))
        );
        assert!(coerce(&json!({"seven": "x"}), &map).is_err());
    }

    #[test]
    fn inet_and_boolean() {
        assert_eq!(
            coerce(&json!("::1"), &native(NativeType::Inet)),
            Ok(CqlValue::Inet("::1".parse().expect("ip")))
        );
        assert!(coerce(&json!("300.1.1.1"), &native(NativeType::Inet)).is_err());
        assert_eq!(
            coerce(&json!("TRUE"), &native(NativeType::Boolean)),
            Ok(CqlValue::Boolean(true))
        );
        assert!(coerce(&json!(1), &native(NativeType::Boolean)).is_err());
    }

    #[test]
    fn long_values_are_previewed_briefly() {
        let long = json!("x".repeat(1000));
        let error = coerce(&long, &native(NativeType::Int)).expect_err("not an int");
        assert!(error.reason.len() < 200, "{}", error.reason);
    }

    /// Column types a JSON value may be written to: every native type routes write, and
    /// collections of them (one nested).
    fn column_types() -> Vec<ColumnType<'static>> {
        use NativeType::*;
        let natives = [
            Ascii, Boolean, Blob, Date, Decimal, Double, Float, Int, BigInt, Text, Timestamp, Inet, SmallInt, TinyInt,
            Time, Timeuuid, Uuid, Varint,
        ];
        let mut types: Vec<ColumnType<'static>> = natives.into_iter().map(native).collect();
        let collection = |typ| ColumnType::Collection { frozen: false, typ };
        types.push(collection(CollectionType::List(Box::new(native(Int)))));
        types.push(collection(CollectionType::Set(Box::new(native(Text)))));
        types.push(collection(CollectionType::Set(Box::new(native(Decimal)))));
        types.push(collection(CollectionType::Map(
            Box::new(native(Int)),
            Box::new(collection(CollectionType::List(Box::new(native(Double))))),
        )));
        types.push(ColumnType::Tuple(vec![native(Int), native(Text)]));
        types
    }

    /// JSON scalars in the forms columns read (and near misses), and arrays and objects of them.
    fn json_value() -> impl Strategy<Value = Value> {
        let literal = |literals: &'static [&'static str]| {
            proptest::sample::select(literals).prop_map(|l| serde_json::from_str::<Value>(l).expect("JSON"))
        };
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            (-70_000i64..70_000).prop_map(Value::from),
            // Numbers as written: decimals of every width, exponents, signs, huge integers.
            (any::<i64>(), 0u32..20).prop_map(|(n, point)| {
                let digits = n.unsigned_abs().to_string();
                let point = (point as usize).min(digits.len());
                let sign = if n < 0 { "-" } else { "" };
                let (whole, fraction) = digits.split_at(digits.len() - point);
                let whole = if whole.is_empty() { "0" } else { whole };
                let text = if fraction.is_empty() {
                    format!("{sign}{whole}")
                } else {
                    format!("{sign}{whole}.{fraction}")
                };
                serde_json::from_str::<Value>(&text).expect("a JSON number")
            }),
            literal(&[
                "1E+3",
                "-0.50",
                "0.0",
                "-0",
                "12345678901234567890123",
                "7e0",
                "1.5e-7",
                "99999999999999999.9",
                "-9223372036854775808",
                "9223372036854775807.1"
            ]),
            // Text in the forms of each type, and near misses.
            proptest::sample::select(
                &[
                    "true",
                    "FALSE",
                    "yes",
                    " 42 ",
                    "-7",
                    "1.25",
                    "+5",
                    "0.5.1",
                    "-",
                    "",
                    "é",
                    "2024-02-29",
                    "2024-13-01",
                    "12:30:00.5",
                    "24:00:00",
                    "2024-05-01T10:00:00Z",
                    "2024-05-01T10:00:00+02:00",
                    "not a time",
                    "4a7e8b1c-3f6d-11ee-be56-0242ac120002",
                    "4a7e8b1c-3f6d-41ee-be56-0242ac120002",
                    "127.0.0.1",
                    "::1",
                    "300.1.1.1",
                    "0xdeadBEEF",
                    "0xabc",
                    "aGVsbG8=",
                    "!!",
                    "12345678901234567890",
                    "-0.00",
                    "00012.3400",
                ][..]
            )
            .prop_map(Value::from),
            "[a-z0-9 .:-]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((prop_oneof![Just("1"), Just("x"), Just("-2")], inner), 0..3)
                    .prop_map(|members| Value::Object(members.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    use proptest::prelude::*;

    proptest! {
        /// Any JSON value against any column type is written as the exact cell the driver
        /// makes of its coerced CQL value, or refused with coercion's own error and nothing
        /// left behind.
        #[test]
        fn cells_are_the_drivers_bytes_of_coerced_values(value in json_value()) {
            for typ in column_types() {
                if value.is_null() {
                    continue;
                }
                let mut direct = vec![7];
                let written = write_cell((&value).into(), &typ, &mut direct);
                let mut through_cql = vec![7];
                let coerced = coerce(&value, &typ).and_then(|cql| {
                    cql.serialize(&typ, CellWriter::new(&mut through_cql))
                        .map(|_| ())
                        .map_err(|e| CoerceError { reason: e.to_string() })
                });
                match (written, coerced) {
                    (Ok(()), Ok(())) => prop_assert_eq!(&direct, &through_cql, "{} as {:?}", value, typ),
                    (Err(direct_error), Err(error)) => {
                        prop_assert_eq!(direct_error, error);
                        prop_assert_eq!(&direct, &vec![7], "a refused value left bytes behind");
                    }
                    (written, coerced) => prop_assert!(false, "{value} as {typ:?}: direct {written:?}, coerced {coerced:?}"),
                }
            }
        }
    }
}
