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
use scylla::value::{CqlDate, CqlDecimal, CqlTime, CqlTimestamp, CqlTimeuuid, CqlValue, CqlVarint};
use serde_json::Value;

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
        NativeType::Boolean => match value {
            Json::Bool(b) => Ok(CqlValue::Boolean(b)),
            Json::String(s) if s.eq_ignore_ascii_case("true") => Ok(CqlValue::Boolean(true)),
            Json::String(s) if s.eq_ignore_ascii_case("false") => Ok(CqlValue::Boolean(false)),
            other => fail(format!(
                "expected true or false for a `boolean` column, got {}",
                preview(other)
            )),
        },
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

fn as_text(value: Json<'_>) -> String {
    match value {
        Json::String(s) => s.to_string(),
        other => other.to_string(),
    }
}

fn integer(value: Json<'_>, cql: &str) -> Result<i64, CoerceError> {
    let parsed = match value {
        Json::Number(_) => value.as_i64(),
        Json::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    parsed.map_or_else(
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

fn float(value: Json<'_>, cql: &str) -> Result<f64, CoerceError> {
    let parsed = match value {
        // As `serde_json::Number::as_f64` answers.
        Json::Number(n) => n.parse::<f64>().ok().filter(|f| f.is_finite()),
        Json::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    parsed.map_or_else(
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

fn timestamp(value: Json<'_>) -> Result<CqlValue, CoerceError> {
    let millis = match value {
        Json::Number(_) => value.as_i64(),
        Json::String(s) => chrono::DateTime::parse_from_rfc3339(s.trim())
            .ok()
            .map(|t| t.timestamp_millis()),
        _ => None,
    };
    millis.map(|m| CqlValue::Timestamp(CqlTimestamp(m))).map_or_else(
        || {
            fail(format!(
                "expected epoch milliseconds or RFC 3339 text for a `timestamp` column, got {}",
                preview(value)
            ))
        },
        Ok,
    )
}

fn date(value: Json<'_>) -> Result<CqlValue, CoerceError> {
    let days = match value {
        Json::Number(_) => value.as_i64(),
        Json::String(s) => chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
            .ok()
            .map(|d| d.signed_duration_since(chrono::NaiveDate::default()).num_days()),
        _ => None,
    };
    let encoded = days.and_then(|d| u32::try_from(d + CQL_DATE_EPOCH).ok());
    encoded.map(|d| CqlValue::Date(CqlDate(d))).map_or_else(
        || {
            fail(format!(
                "expected `YYYY-MM-DD` or days since 1970-01-01 for a `date` column, got {}",
                preview(value)
            ))
        },
        Ok,
    )
}

fn time(value: Json<'_>) -> Result<CqlValue, CoerceError> {
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
    match nanos {
        Some(n) if (0..NANOS_PER_DAY).contains(&n) => Ok(CqlValue::Time(CqlTime(n))),
        _ => fail(format!(
            "expected `HH:MM:SS[.fraction]` or nanoseconds since midnight for a `time` column, got {}",
            preview(value)
        )),
    }
}

fn uuid(value: Json<'_>, cql: &str) -> Result<uuid::Uuid, CoerceError> {
    match value {
        Json::String(s) => uuid::Uuid::parse_str(s.trim())
            .or_else(|_| fail(format!("expected a UUID for a `{cql}` column, got {}", preview(value)))),
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
}
