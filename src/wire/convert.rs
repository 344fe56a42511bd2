//! Typed proto values → CQL values of a column's type. Pure; runs on the core that received the
//! batch (and in the shard-aware client, for partition-key columns). Never panics on input:
//! every mismatch is a `BAD_VALUE` reason naming what was expected.

use std::net::IpAddr;

use scylla::cluster::metadata::{CollectionType, ColumnType, NativeType};
use scylla::serialize::value::SerializeValue;
use scylla::serialize::writers::CellWriter;
use scylla::value::{CqlDate, CqlDecimal, CqlTime, CqlTimestamp, CqlTimeuuid, CqlValue, CqlVarint};

use super::proto::value::Kind;
use super::proto::{Decimal, Duration, Map, MapEntry, Udt, UdtField, Value, Values};
use crate::sink::scylla::bound::{put, put_integer, write_collection};

/// Days between CQL's date origin and 1970-01-01 (2^31).
pub(crate) const CQL_DATE_EPOCH: i64 = 1 << 31;
/// Nanoseconds in a day: a `time` is below it.
pub(crate) const NANOS_PER_DAY: i64 = 86_400 * 1_000_000_000;
/// Deepest nesting of collections accepted, so a hostile value cannot exhaust the stack.
pub(crate) const NESTING_MAX: usize = 8;

/// A value that does not fit its column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(pub String);

/// Converts `value` to CQL for a column of type `typ`. `Ok(None)` is a CQL null.
pub fn to_cql(value: &Value, typ: &ColumnType<'_>) -> Result<Option<CqlValue>, ConvertError> {
    convert(value, typ, 0)
}

/// Appends `value`, for a column of type `typ`, to `buffer` as one serialized CQL cell (a 4-byte
/// length, then the bytes; -1 for null): the bytes [`to_cql`] and the driver's serialization
/// give, without building the `CqlValue`. Scalars and collections of them are written straight
/// from the protobuf value; other kinds (UDTs, tuples, vectors, durations) and every value that
/// does not fit go through [`to_cql`], so errors read the same. On error `buffer` is as it was.
pub fn write_cell(value: &Value, typ: &ColumnType<'_>, buffer: &mut Vec<u8>) -> Result<(), ConvertError> {
    let start = buffer.len();
    if write_direct(value, typ, buffer, 0).is_some() {
        return Ok(());
    }
    buffer.truncate(start);
    let written = match to_cql(value, typ)? {
        None => {
            CellWriter::new(buffer).set_null();
            Ok(())
        }
        Some(cql) => cql.serialize(typ, CellWriter::new(buffer)).map(|_| ()),
    };
    written.map_err(|e| {
        buffer.truncate(start);
        ConvertError(e.to_string())
    })
}

/// [`write_cell`]'s direct path: `None` when `value` is not written here (a kind it leaves to
/// [`to_cql`], or a value that does not fit), with `buffer` left to be truncated by the caller.
/// Collection elements are written at `depth + 1`; a null element is not written here (it is
/// an error).
fn write_direct(value: &Value, typ: &ColumnType<'_>, buffer: &mut Vec<u8>, depth: usize) -> Option<()> {
    if depth > NESTING_MAX {
        return None;
    }
    let native = |n: &NativeType| match typ {
        ColumnType::Native(t) => t == n,
        _ => false,
    };
    match value.kind.as_ref() {
        None | Some(Kind::Null(_)) if depth == 0 => {
            buffer.extend_from_slice(&(-1i32).to_be_bytes());
            Some(())
        }
        Some(Kind::Text(s)) if native(&NativeType::Text) || (native(&NativeType::Ascii) && s.is_ascii()) => {
            put(buffer, s.as_bytes())
        }
        Some(Kind::Int(n)) => match typ {
            ColumnType::Native(native) => put_integer(buffer, native, *n),
            _ => None,
        },
        Some(Kind::Float(f)) if native(&NativeType::Float) => put(buffer, &f.to_be_bytes()),
        Some(Kind::Double(f)) if native(&NativeType::Double) => put(buffer, &f.to_be_bytes()),
        Some(Kind::Boolean(b)) if native(&NativeType::Boolean) => put(buffer, &[u8::from(*b)]),
        Some(Kind::Blob(b)) if native(&NativeType::Blob) => put(buffer, b),
        Some(Kind::Uuid(b)) if native(&NativeType::Uuid) && b.len() == 16 => put(buffer, b),
        // A timeuuid is a version 1 UUID: the version is the high nibble of byte 6.
        Some(Kind::Timeuuid(b) | Kind::Uuid(b)) if native(&NativeType::Timeuuid) && b.len() == 16 && b[6] >> 4 == 1 => {
            put(buffer, b)
        }
        Some(Kind::TimestampMs(ms)) if native(&NativeType::Timestamp) => put(buffer, &ms.to_be_bytes()),
        Some(Kind::DateDays(days)) if native(&NativeType::Date) => {
            put(buffer, &((i64::from(*days) + CQL_DATE_EPOCH) as u32).to_be_bytes())
        }
        Some(Kind::TimeNs(ns)) if native(&NativeType::Time) && (0..NANOS_PER_DAY).contains(ns) => {
            put(buffer, &ns.to_be_bytes())
        }
        Some(Kind::Decimal(d)) if native(&NativeType::Decimal) => {
            let length = i32::try_from(d.unscaled.len().checked_add(4)?).ok()?;
            buffer.extend_from_slice(&length.to_be_bytes());
            buffer.extend_from_slice(&d.scale.to_be_bytes());
            buffer.extend_from_slice(&d.unscaled);
            Some(())
        }
        Some(Kind::Varint(b)) if native(&NativeType::Varint) && !b.is_empty() => put(buffer, b),
        Some(Kind::Inet(b)) if native(&NativeType::Inet) && (b.len() == 4 || b.len() == 16) => put(buffer, b),
        Some(Kind::List(items) | Kind::Set(items)) => {
            // A list fits a list or a set column; a set only a set column.
            let element = match (&value.kind, typ) {
                (
                    Some(Kind::List(_)),
                    ColumnType::Collection {
                        typ: CollectionType::List(element) | CollectionType::Set(element),
                        ..
                    },
                )
                | (
                    Some(Kind::Set(_)),
                    ColumnType::Collection {
                        typ: CollectionType::Set(element),
                        ..
                    },
                ) => element,
                _ => return None,
            };
            write_collection(buffer, |buffer| {
                items
                    .values
                    .iter()
                    .try_for_each(|item| write_direct(item, element, buffer, depth + 1))?;
                Some(items.values.len())
            })
        }
        Some(Kind::Map(map)) => match typ {
            ColumnType::Collection {
                typ: CollectionType::Map(key_type, value_type),
                ..
            } => write_collection(buffer, |buffer| {
                map.entries.iter().try_for_each(|entry| {
                    write_direct(entry.key.as_ref()?, key_type, buffer, depth + 1)?;
                    write_direct(entry.value.as_ref()?, value_type, buffer, depth + 1)
                })?;
                Some(map.entries.len())
            }),
            _ => None,
        },
        _ => None,
    }
}

fn kind_name(kind: &Option<Kind>) -> &'static str {
    match kind {
        None => "no value",
        Some(Kind::Null(_)) => "null",
        Some(Kind::Text(_)) => "text",
        Some(Kind::Int(_)) => "int",
        Some(Kind::Float(_)) => "float",
        Some(Kind::Double(_)) => "double",
        Some(Kind::Boolean(_)) => "boolean",
        Some(Kind::Blob(_)) => "blob",
        Some(Kind::Uuid(_)) => "uuid",
        Some(Kind::Timeuuid(_)) => "timeuuid",
        Some(Kind::TimestampMs(_)) => "timestamp_ms",
        Some(Kind::DateDays(_)) => "date_days",
        Some(Kind::TimeNs(_)) => "time_ns",
        Some(Kind::Decimal(_)) => "decimal",
        Some(Kind::Varint(_)) => "varint",
        Some(Kind::Inet(_)) => "inet",
        Some(Kind::List(_)) => "list",
        Some(Kind::Set(_)) => "set",
        Some(Kind::Map(_)) => "map",
        Some(Kind::Unset(_)) => "unset",
        Some(Kind::Udt(_)) => "udt",
        Some(Kind::Tuple(_)) => "tuple",
        Some(Kind::Duration(_)) => "duration",
        Some(Kind::Vector(_)) => "vector",
    }
}

/// A CQL value as a typed proto value; `None` (a CQL null) and an empty value become `null`.
/// Read results: every CQL type has a kind (counters are `int`, a UDT's fields keep their names).
pub fn from_cql(value: Option<&CqlValue>) -> Value {
    let Some(value) = value else {
        return Value {
            kind: Some(Kind::Null(true)),
        };
    };
    let values = |items: &[CqlValue]| Values {
        values: items.iter().map(|v| from_cql(Some(v))).collect(),
    };
    let kind = match value {
        CqlValue::Empty => Kind::Null(true),
        CqlValue::Ascii(s) | CqlValue::Text(s) => Kind::Text(s.clone()),
        CqlValue::Boolean(b) => Kind::Boolean(*b),
        CqlValue::Blob(b) => Kind::Blob(b.clone()),
        CqlValue::Counter(c) => Kind::Int(c.0),
        CqlValue::Decimal(d) => {
            let (unscaled, scale) = d.as_signed_be_bytes_slice_and_exponent();
            Kind::Decimal(Decimal {
                unscaled: unscaled.to_vec(),
                scale,
            })
        }
        CqlValue::Date(d) => Kind::DateDays((i64::from(d.0) - CQL_DATE_EPOCH) as i32),
        CqlValue::Double(d) => Kind::Double(*d),
        CqlValue::Duration(d) => Kind::Duration(Duration {
            months: d.months,
            days: d.days,
            nanoseconds: d.nanoseconds,
        }),
        CqlValue::Float(f) => Kind::Float(*f),
        CqlValue::Int(i) => Kind::Int(i64::from(*i)),
        CqlValue::BigInt(i) => Kind::Int(*i),
        CqlValue::SmallInt(i) => Kind::Int(i64::from(*i)),
        CqlValue::TinyInt(i) => Kind::Int(i64::from(*i)),
        CqlValue::Timestamp(t) => Kind::TimestampMs(t.0),
        CqlValue::Time(t) => Kind::TimeNs(t.0),
        CqlValue::Inet(IpAddr::V4(a)) => Kind::Inet(a.octets().to_vec()),
        CqlValue::Inet(IpAddr::V6(a)) => Kind::Inet(a.octets().to_vec()),
        CqlValue::Uuid(u) => Kind::Uuid(u.as_bytes().to_vec()),
        CqlValue::Timeuuid(u) => Kind::Timeuuid(u.as_bytes().to_vec()),
        CqlValue::Varint(v) => Kind::Varint(v.as_signed_bytes_be_slice().to_vec()),
        CqlValue::List(items) => Kind::List(values(items)),
        CqlValue::Set(items) => Kind::Set(values(items)),
        CqlValue::Vector(items) => Kind::Vector(values(items)),
        CqlValue::Map(pairs) => Kind::Map(Map {
            entries: pairs
                .iter()
                .map(|(k, v)| MapEntry {
                    key: Some(from_cql(Some(k))),
                    value: Some(from_cql(Some(v))),
                })
                .collect(),
        }),
        CqlValue::Tuple(items) => Kind::Tuple(Values {
            values: items.iter().map(|v| from_cql(v.as_ref())).collect(),
        }),
        CqlValue::UserDefinedType { fields, .. } => Kind::Udt(Udt {
            fields: fields
                .iter()
                .map(|(name, v)| UdtField {
                    name: name.clone(),
                    value: Some(from_cql(v.as_ref())),
                })
                .collect(),
        }),
        // A variant a newer driver adds: its debug form, so the value is never lost silently.
        other => Kind::Text(format!("{other:?}")),
    };
    Value { kind: Some(kind) }
}

fn mismatch<T>(kind: &Option<Kind>, typ: &ColumnType<'_>) -> Result<T, ConvertError> {
    Err(ConvertError(format!(
        "a `{}` value cannot be written to a column of type {}",
        kind_name(kind),
        cql_type_name(typ)
    )))
}

fn convert(value: &Value, typ: &ColumnType<'_>, depth: usize) -> Result<Option<CqlValue>, ConvertError> {
    if depth > NESTING_MAX {
        return Err(ConvertError(format!("values nest deeper than {NESTING_MAX} levels")));
    }
    let kind = &value.kind;
    let cql = match (kind, typ) {
        (None | Some(Kind::Null(_)), _) => return Ok(None),
        (Some(Kind::Text(s)), ColumnType::Native(NativeType::Text)) => CqlValue::Text(s.clone()),
        (Some(Kind::Text(s)), ColumnType::Native(NativeType::Ascii)) if s.is_ascii() => CqlValue::Ascii(s.clone()),
        (Some(Kind::Int(n)), ColumnType::Native(native)) if is_integer(native) => integer(*n, native)?,
        (Some(Kind::Float(f)), ColumnType::Native(NativeType::Float)) => CqlValue::Float(*f),
        (Some(Kind::Double(f)), ColumnType::Native(NativeType::Double)) => CqlValue::Double(*f),
        (Some(Kind::Boolean(b)), ColumnType::Native(NativeType::Boolean)) => CqlValue::Boolean(*b),
        (Some(Kind::Blob(b)), ColumnType::Native(NativeType::Blob)) => CqlValue::Blob(b.clone()),
        (Some(Kind::Uuid(b)), ColumnType::Native(NativeType::Uuid)) => CqlValue::Uuid(uuid(b)?),
        (Some(Kind::Timeuuid(b) | Kind::Uuid(b)), ColumnType::Native(NativeType::Timeuuid)) => {
            let id = uuid(b)?;
            if id.get_version_num() != 1 {
                return Err(ConvertError("a timeuuid must be a version 1 UUID".into()));
            }
            CqlValue::Timeuuid(CqlTimeuuid::from(id))
        }
        (Some(Kind::TimestampMs(ms)), ColumnType::Native(NativeType::Timestamp)) => {
            CqlValue::Timestamp(CqlTimestamp(*ms))
        }
        (Some(Kind::DateDays(days)), ColumnType::Native(NativeType::Date)) => {
            CqlValue::Date(CqlDate((i64::from(*days) + CQL_DATE_EPOCH) as u32))
        }
        (Some(Kind::TimeNs(ns)), ColumnType::Native(NativeType::Time)) if (0..NANOS_PER_DAY).contains(ns) => {
            CqlValue::Time(CqlTime(*ns))
        }
        (Some(Kind::Decimal(d)), ColumnType::Native(NativeType::Decimal)) => CqlValue::Decimal(
            CqlDecimal::from_signed_be_bytes_and_exponent(d.unscaled.clone(), d.scale),
        ),
        (Some(Kind::Varint(b)), ColumnType::Native(NativeType::Varint)) if !b.is_empty() => {
            CqlValue::Varint(CqlVarint::from_signed_bytes_be(b.clone()))
        }
        (Some(Kind::Inet(b)), ColumnType::Native(NativeType::Inet)) => CqlValue::Inet(inet(b)?),
        (
            Some(Kind::List(items)),
            ColumnType::Collection {
                typ: CollectionType::List(element),
                ..
            },
        ) => CqlValue::List(elements(&items.values, element, depth)?),
        (
            Some(Kind::Set(items) | Kind::List(items)),
            ColumnType::Collection {
                typ: CollectionType::Set(element),
                ..
            },
        ) => CqlValue::Set(elements(&items.values, element, depth)?),
        (
            Some(Kind::Map(map)),
            ColumnType::Collection {
                typ: CollectionType::Map(key_type, value_type),
                ..
            },
        ) => {
            let mut pairs = Vec::with_capacity(map.entries.len());
            for entry in &map.entries {
                let key = entry
                    .key
                    .as_ref()
                    .map(|k| convert(k, key_type, depth + 1))
                    .transpose()?
                    .flatten();
                let value = entry
                    .value
                    .as_ref()
                    .map(|v| convert(v, value_type, depth + 1))
                    .transpose()?
                    .flatten();
                match (key, value) {
                    (Some(k), Some(v)) => pairs.push((k, v)),
                    _ => return Err(ConvertError("map keys and values cannot be null".into())),
                }
            }
            CqlValue::Map(pairs)
        }
        _ => return mismatch(kind, typ),
    };
    Ok(Some(cql))
}

fn elements(items: &[Value], element: &ColumnType<'_>, depth: usize) -> Result<Vec<CqlValue>, ConvertError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match convert(item, element, depth + 1) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(ConvertError(format!(
                "element {i} is null; collections cannot hold nulls"
            ))),
            Err(e) => Err(ConvertError(format!("element {i}: {}", e.0))),
        })
        .collect()
}

fn is_integer(native: &NativeType) -> bool {
    matches!(
        native,
        NativeType::TinyInt | NativeType::SmallInt | NativeType::Int | NativeType::BigInt
    )
}

fn integer(n: i64, native: &NativeType) -> Result<CqlValue, ConvertError> {
    let out_of_range = || {
        ConvertError(format!(
            "{n} is out of range for a {} column",
            cql_type_name(&ColumnType::Native(native.clone()))
        ))
    };
    Ok(match native {
        NativeType::TinyInt => CqlValue::TinyInt(i8::try_from(n).map_err(|_| out_of_range())?),
        NativeType::SmallInt => CqlValue::SmallInt(i16::try_from(n).map_err(|_| out_of_range())?),
        NativeType::Int => CqlValue::Int(i32::try_from(n).map_err(|_| out_of_range())?),
        _ => CqlValue::BigInt(n),
    })
}

fn uuid(bytes: &[u8]) -> Result<uuid::Uuid, ConvertError> {
    uuid::Uuid::from_slice(bytes).map_err(|_| ConvertError(format!("a UUID is 16 bytes, got {}", bytes.len())))
}

fn inet(bytes: &[u8]) -> Result<IpAddr, ConvertError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::from(v6));
    }
    Err(ConvertError(format!("an inet is 4 or 16 bytes, got {}", bytes.len())))
}

/// The CQL spelling of a type, e.g. `bigint`, `frozen<list<int>>`.
pub fn cql_type_name(typ: &ColumnType<'_>) -> String {
    match typ {
        ColumnType::Native(native) => native_name(native).to_string(),
        ColumnType::Collection { frozen, typ } => {
            let inner = match typ {
                CollectionType::List(e) => format!("list<{}>", cql_type_name(e)),
                CollectionType::Set(e) => format!("set<{}>", cql_type_name(e)),
                CollectionType::Map(k, v) => format!("map<{}, {}>", cql_type_name(k), cql_type_name(v)),
                other => format!("{other:?}"),
            };
            if *frozen {
                format!("frozen<{inner}>")
            } else {
                inner
            }
        }
        other => format!("{other:?}"),
    }
}

fn native_name(native: &NativeType) -> &'static str {
    match native {
        NativeType::Ascii => "ascii",
        NativeType::Boolean => "boolean",
        NativeType::Blob => "blob",
        NativeType::Counter => "counter",
        NativeType::Date => "date",
        NativeType::Decimal => "decimal",
        NativeType::Double => "double",
        NativeType::Duration => "duration",
        NativeType::Float => "float",
        NativeType::Int => "int",
        NativeType::BigInt => "bigint",
        NativeType::Text => "text",
        NativeType::Timestamp => "timestamp",
        NativeType::Inet => "inet",
        NativeType::SmallInt => "smallint",
        NativeType::TinyInt => "tinyint",
        NativeType::Time => "time",
        NativeType::Timeuuid => "timeuuid",
        NativeType::Uuid => "uuid",
        NativeType::Varint => "varint",
        _ => "unknown",
    }
}

/// Parses the native type names [`cql_type_name`] writes (what `GetTopology` publishes for
/// partition keys). Collections and user types return `None`: the client then lets the gateway
/// route those rows.
pub fn parse_native_type(name: &str) -> Option<ColumnType<'static>> {
    let native = match name {
        "ascii" => NativeType::Ascii,
        "boolean" => NativeType::Boolean,
        "blob" => NativeType::Blob,
        "date" => NativeType::Date,
        "decimal" => NativeType::Decimal,
        "double" => NativeType::Double,
        "float" => NativeType::Float,
        "int" => NativeType::Int,
        "bigint" => NativeType::BigInt,
        "text" | "varchar" => NativeType::Text,
        "timestamp" => NativeType::Timestamp,
        "inet" => NativeType::Inet,
        "smallint" => NativeType::SmallInt,
        "tinyint" => NativeType::TinyInt,
        "time" => NativeType::Time,
        "timeuuid" => NativeType::Timeuuid,
        "uuid" => NativeType::Uuid,
        "varint" => NativeType::Varint,
        _ => return None,
    };
    Some(ColumnType::Native(native))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::proto;

    fn v(kind: Kind) -> Value {
        Value { kind: Some(kind) }
    }
    fn native(t: NativeType) -> ColumnType<'static> {
        ColumnType::Native(t)
    }

    #[test]
    fn integers_fit_their_width() {
        assert_eq!(
            to_cql(&v(Kind::Int(7)), &native(NativeType::SmallInt)),
            Ok(Some(CqlValue::SmallInt(7)))
        );
        assert!(to_cql(&v(Kind::Int(1 << 40)), &native(NativeType::Int)).is_err());
        assert_eq!(
            to_cql(&v(Kind::Int(1 << 40)), &native(NativeType::BigInt)),
            Ok(Some(CqlValue::BigInt(1 << 40)))
        );
    }

    #[test]
    fn type_mismatch_names_both_sides() {
        let error = to_cql(&v(Kind::Text("x".into())), &native(NativeType::Int)).expect_err("mismatch");
        assert_eq!(error.0, "a `text` value cannot be written to a column of type int");
    }

    #[test]
    fn nulls_and_absent_values_are_null() {
        assert_eq!(to_cql(&v(Kind::Null(true)), &native(NativeType::Int)), Ok(None));
        assert_eq!(to_cql(&Value { kind: None }, &native(NativeType::Int)), Ok(None));
    }

    #[test]
    fn fixed_size_values_are_checked() {
        assert!(to_cql(&v(Kind::Uuid(vec![0; 15])), &native(NativeType::Uuid)).is_err());
        assert!(to_cql(&v(Kind::Inet(vec![127, 0, 0])), &native(NativeType::Inet)).is_err());
        assert_eq!(
            to_cql(&v(Kind::Inet(vec![127, 0, 0, 1])), &native(NativeType::Inet)),
            Ok(Some(CqlValue::Inet("127.0.0.1".parse().expect("ip"))))
        );
        assert!(to_cql(&v(Kind::TimeNs(NANOS_PER_DAY)), &native(NativeType::Time)).is_err());
    }

    #[test]
    fn collections_and_nesting_limit() {
        let list_of_int = ColumnType::Collection {
            frozen: false,
            typ: CollectionType::List(Box::new(native(NativeType::Int))),
        };
        let items = proto::Values {
            values: vec![v(Kind::Int(1)), v(Kind::Int(2))],
        };
        assert_eq!(
            to_cql(&v(Kind::List(items)), &list_of_int),
            Ok(Some(CqlValue::List(vec![CqlValue::Int(1), CqlValue::Int(2)])))
        );
        let with_null = proto::Values {
            values: vec![v(Kind::Null(true))],
        };
        assert!(to_cql(&v(Kind::List(with_null)), &list_of_int).is_err());
        // A deeply nested value against a deeply nested type stops at the limit.
        let mut typ = native(NativeType::Int);
        let mut value = v(Kind::Int(1));
        for _ in 0..20 {
            typ = ColumnType::Collection {
                frozen: true,
                typ: CollectionType::List(Box::new(typ)),
            };
            value = v(Kind::List(proto::Values { values: vec![value] }));
        }
        assert!(to_cql(&value, &typ).expect_err("too deep").0.contains("nest deeper"));
    }

    #[test]
    fn type_names_round_trip_for_natives() {
        for name in [
            "text",
            "bigint",
            "int",
            "uuid",
            "timestamp",
            "date",
            "blob",
            "decimal",
            "varint",
            "inet",
        ] {
            let typ = parse_native_type(name).expect("native");
            assert_eq!(cql_type_name(&typ), name);
        }
        assert_eq!(parse_native_type("list<int>"), None);
    }
}
