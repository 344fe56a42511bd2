//! FlatBuffers row batches (`schemas/row_batch.fbs`): the zero-copy producer format. A buffer is
//! verified (bounds, offsets, nesting depth, table count) before anything reads it, then read in
//! place into the same typed rows the protobuf API carries, so both formats share one
//! conversion, one routing and one write path. [`encode_row_batch`] builds a buffer from typed
//! rows (for producers in Rust, tests and benchmarks).

use flatbuffers::{FlatBufferBuilder, ForwardsUOffset, Vector, VerifierOptions, WIPOffset};

pub use super::generated::row_batch::shardgate::v_1::fb;
use super::proto::value::Kind;
use super::proto::{Decimal, Map, MapEntry, Row, RowBatch, Value, Values};

/// Tables one buffer may hold: a 10,000-row batch of 100 columns with room for collections.
const TABLES_MAX: usize = 4_000_000;
/// Nesting the verifier accepts (collections inside collections).
const DEPTH_MAX: usize = 32;

/// A buffer that is not a valid `RowBatch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlatError {
    /// The verifier refused the buffer.
    #[error("not a valid FlatBuffers shardgate.v1.fb.RowBatch: {0}")]
    Invalid(String),
    /// A value names a kind this gateway does not know.
    #[error("row {row}, value {value}: unknown kind {kind}")]
    UnknownKind {
        /// Row index.
        row: usize,
        /// Value index in the row.
        value: usize,
        /// The kind byte.
        kind: u8,
    },
}

/// Verifies `bytes` and reads the batch into typed rows.
pub fn decode_row_batch(bytes: &[u8]) -> Result<RowBatch, FlatError> {
    let options = VerifierOptions {
        max_depth: DEPTH_MAX,
        max_tables: TABLES_MAX,
        ..VerifierOptions::default()
    };
    let batch =
        flatbuffers::root_with_opts::<fb::RowBatch>(&options, bytes).map_err(|e| FlatError::Invalid(e.to_string()))?;
    let rows = batch
        .rows()
        .map(|rows| {
            rows.iter()
                .enumerate()
                .map(|(row, r)| {
                    let values = r.values().map(|v| read_values(v, row)).transpose()?;
                    Ok(Row {
                        values: values.unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, FlatError>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(RowBatch {
        table: batch.table().unwrap_or_default().to_string(),
        columns: batch
            .columns()
            .map(|c| c.iter().map(str::to_string).collect())
            .unwrap_or_default(),
        rows,
        timestamp_us: batch.timestamp_us(),
    })
}

fn read_values(values: Vector<'_, ForwardsUOffset<fb::Value<'_>>>, row: usize) -> Result<Vec<Value>, FlatError> {
    values
        .iter()
        .enumerate()
        .map(|(index, v)| read_value(&v, row, index))
        .collect()
}

fn read_value(v: &fb::Value<'_>, row: usize, index: usize) -> Result<Value, FlatError> {
    let bytes = || v.bytes().map(|b| b.bytes().to_vec()).unwrap_or_default();
    let items = || -> Result<Vec<Value>, FlatError> {
        v.items()
            .map(|i| read_values(i, row))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let kind = match v.kind() {
        fb::Kind::Null => Kind::Null(true),
        fb::Kind::Text => Kind::Text(v.text().unwrap_or_default().to_string()),
        fb::Kind::Int => Kind::Int(v.int()),
        fb::Kind::Float => Kind::Float(v.real() as f32),
        fb::Kind::Double => Kind::Double(v.real()),
        fb::Kind::Boolean => Kind::Boolean(v.boolean()),
        fb::Kind::Blob => Kind::Blob(bytes()),
        fb::Kind::Uuid => Kind::Uuid(bytes()),
        fb::Kind::Timeuuid => Kind::Timeuuid(bytes()),
        fb::Kind::TimestampMs => Kind::TimestampMs(v.int()),
        fb::Kind::DateDays => Kind::DateDays(i32::try_from(v.int()).unwrap_or(i32::MAX)),
        fb::Kind::TimeNs => Kind::TimeNs(v.int()),
        fb::Kind::Decimal => Kind::Decimal(Decimal {
            unscaled: bytes(),
            scale: i32::try_from(v.int()).unwrap_or(i32::MAX),
        }),
        fb::Kind::Varint => Kind::Varint(bytes()),
        fb::Kind::Inet => Kind::Inet(bytes()),
        fb::Kind::List => Kind::List(Values { values: items()? }),
        fb::Kind::Set => Kind::Set(Values { values: items()? }),
        fb::Kind::Map => {
            let keys = items()?;
            let values = v.values().map(|i| read_values(i, row)).transpose()?.unwrap_or_default();
            Kind::Map(Map {
                entries: keys
                    .into_iter()
                    .zip(values.into_iter().map(Some).chain(std::iter::repeat(None)))
                    .map(|(key, value)| MapEntry { key: Some(key), value })
                    .collect(),
            })
        }
        other => {
            return Err(FlatError::UnknownKind {
                row,
                value: index,
                kind: other.0,
            })
        }
    };
    Ok(Value { kind: Some(kind) })
}

/// Builds a FlatBuffers `RowBatch` from typed rows. A value without a kind becomes a null.
pub fn encode_row_batch(batch: &RowBatch) -> Vec<u8> {
    let mut builder = FlatBufferBuilder::with_capacity(1024);
    let rows: Vec<_> = batch
        .rows
        .iter()
        .map(|row| {
            let values = write_values(&mut builder, &row.values);
            fb::Row::create(&mut builder, &fb::RowArgs { values: Some(values) })
        })
        .collect();
    let rows = builder.create_vector(&rows);
    let columns: Vec<_> = batch.columns.iter().map(|c| builder.create_string(c)).collect();
    let columns = builder.create_vector(&columns);
    let table = builder.create_string(&batch.table);
    let root = fb::RowBatch::create(
        &mut builder,
        &fb::RowBatchArgs {
            table: Some(table),
            columns: Some(columns),
            rows: Some(rows),
            timestamp_us: batch.timestamp_us,
        },
    );
    builder.finish(root, None);
    builder.finished_data().to_vec()
}

type ValuesOffset<'a> = WIPOffset<Vector<'a, ForwardsUOffset<fb::Value<'a>>>>;

fn write_values<'a>(builder: &mut FlatBufferBuilder<'a>, values: &[Value]) -> ValuesOffset<'a> {
    let offsets: Vec<_> = values.iter().map(|v| write_value(builder, v)).collect();
    builder.create_vector(&offsets)
}

fn write_value<'a>(builder: &mut FlatBufferBuilder<'a>, value: &Value) -> WIPOffset<fb::Value<'a>> {
    let mut args = fb::ValueArgs::default();
    match &value.kind {
        None | Some(Kind::Null(_)) => args.kind = fb::Kind::Null,
        Some(Kind::Text(s)) => {
            args.kind = fb::Kind::Text;
            args.text = Some(builder.create_string(s));
        }
        Some(Kind::Int(i)) => (args.kind, args.int) = (fb::Kind::Int, *i),
        Some(Kind::Float(f)) => (args.kind, args.real) = (fb::Kind::Float, f64::from(*f)),
        Some(Kind::Double(d)) => (args.kind, args.real) = (fb::Kind::Double, *d),
        Some(Kind::Boolean(b)) => (args.kind, args.boolean) = (fb::Kind::Boolean, *b),
        Some(Kind::Blob(b)) => (args.kind, args.bytes) = (fb::Kind::Blob, Some(builder.create_vector(b))),
        Some(Kind::Uuid(b)) => (args.kind, args.bytes) = (fb::Kind::Uuid, Some(builder.create_vector(b))),
        Some(Kind::Timeuuid(b)) => (args.kind, args.bytes) = (fb::Kind::Timeuuid, Some(builder.create_vector(b))),
        Some(Kind::TimestampMs(t)) => (args.kind, args.int) = (fb::Kind::TimestampMs, *t),
        Some(Kind::DateDays(d)) => (args.kind, args.int) = (fb::Kind::DateDays, i64::from(*d)),
        Some(Kind::TimeNs(t)) => (args.kind, args.int) = (fb::Kind::TimeNs, *t),
        Some(Kind::Decimal(d)) => {
            args.kind = fb::Kind::Decimal;
            args.bytes = Some(builder.create_vector(&d.unscaled));
            args.int = i64::from(d.scale);
        }
        Some(Kind::Varint(b)) => (args.kind, args.bytes) = (fb::Kind::Varint, Some(builder.create_vector(b))),
        Some(Kind::Inet(b)) => (args.kind, args.bytes) = (fb::Kind::Inet, Some(builder.create_vector(b))),
        Some(Kind::List(items)) => {
            args.kind = fb::Kind::List;
            args.items = Some(write_values(builder, &items.values));
        }
        Some(Kind::Set(items)) => {
            args.kind = fb::Kind::Set;
            args.items = Some(write_values(builder, &items.values));
        }
        Some(Kind::Map(map)) => {
            let null = Value::default();
            let keys: Vec<Value> = map.entries.iter().map(|e| e.key.clone().unwrap_or_default()).collect();
            let values: Vec<Value> = map
                .entries
                .iter()
                .map(|e| e.value.clone().unwrap_or_else(|| null.clone()))
                .collect();
            args.kind = fb::Kind::Map;
            args.items = Some(write_values(builder, &keys));
            args.values = Some(write_values(builder, &values));
        }
        // Kinds of read results and binds, which the FlatBuffers schema has no kind for: written
        // as a kind the gateway does not know, so the batch is refused MALFORMED rather than
        // written with a null in the value's place.
        Some(Kind::Unset(_) | Kind::Udt(_) | Kind::Tuple(_) | Kind::Duration(_) | Kind::Vector(_)) => {
            args.kind = fb::Kind(u8::MAX);
        }
    }
    fb::Value::create(builder, &args)
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    fn leaf() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Null(true)),
            ".{0,12}".prop_map(Kind::Text),
            any::<i64>().prop_map(Kind::Int),
            any::<i32>().prop_map(|f| Kind::Float(f as f32)),
            any::<i32>().prop_map(|d| Kind::Double(f64::from(d) / 7.0)),
            any::<bool>().prop_map(Kind::Boolean),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Kind::Blob),
            proptest::collection::vec(any::<u8>(), 16).prop_map(Kind::Uuid),
            proptest::collection::vec(any::<u8>(), 16).prop_map(Kind::Timeuuid),
            any::<i64>().prop_map(Kind::TimestampMs),
            any::<i32>().prop_map(Kind::DateDays),
            any::<i64>().prop_map(Kind::TimeNs),
            (proptest::collection::vec(any::<u8>(), 1..9), any::<i32>())
                .prop_map(|(unscaled, scale)| Kind::Decimal(Decimal { unscaled, scale })),
            proptest::collection::vec(any::<u8>(), 1..9).prop_map(Kind::Varint),
            proptest::collection::vec(any::<u8>(), 4).prop_map(Kind::Inet),
        ]
    }

    /// Any typed value, collections nested three deep (shared with the other decoders' tests).
    pub(crate) fn value() -> impl Strategy<Value = Value> {
        leaf()
            .prop_map(|k| Value { kind: Some(k) })
            .prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(|values| Value {
                        kind: Some(Kind::List(Values { values }))
                    }),
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(|values| Value {
                        kind: Some(Kind::Set(Values { values }))
                    }),
                    proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(|pairs| Value {
                        kind: Some(Kind::Map(Map {
                            entries: pairs
                                .into_iter()
                                .map(|(k, v)| MapEntry {
                                    key: Some(k),
                                    value: Some(v),
                                })
                                .collect()
                        }))
                    }),
                ]
            })
    }

    proptest! {
        /// Every typed batch survives FlatBuffers encoding and verified decoding unchanged.
        #[test]
        fn row_batches_round_trip(
            rows in proptest::collection::vec(proptest::collection::vec(value(), 0..6), 0..8),
            timestamp_us in any::<i64>(),
        ) {
            let batch = RowBatch {
                table: "ks.t".to_string(),
                columns: vec!["a".to_string(), "b".to_string()],
                rows: rows.into_iter().map(|values| Row { values }).collect(),
                timestamp_us,
            };
            prop_assert_eq!(decode_row_batch(&encode_row_batch(&batch)), Ok(batch));
        }

        /// Arbitrary bytes never panic the decoder: they decode or are refused.
        #[test]
        fn garbage_is_refused_not_panicked_on(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_row_batch(&bytes);
        }
    }

    #[test]
    fn truncated_buffer_is_refused_with_a_reason() {
        let batch = RowBatch {
            table: "ks.t".to_string(),
            columns: vec!["id".to_string()],
            rows: vec![Row {
                values: vec![Value {
                    kind: Some(Kind::Text("x".repeat(40))),
                }],
            }],
            timestamp_us: 0,
        };
        let bytes = encode_row_batch(&batch);
        let error = decode_row_batch(&bytes[..bytes.len() / 2]).expect_err("truncated");
        assert!(error.to_string().starts_with("not a valid FlatBuffers"), "{error}");
    }

    #[test]
    fn unknown_kind_names_row_and_value() {
        let mut builder = FlatBufferBuilder::new();
        let value = fb::Value::create(
            &mut builder,
            &fb::ValueArgs {
                kind: fb::Kind(200),
                ..Default::default()
            },
        );
        let values = builder.create_vector(&[value]);
        let row = fb::Row::create(&mut builder, &fb::RowArgs { values: Some(values) });
        let rows = builder.create_vector(&[row]);
        let root = fb::RowBatch::create(
            &mut builder,
            &fb::RowBatchArgs {
                rows: Some(rows),
                ..Default::default()
            },
        );
        builder.finish(root, None);
        assert_eq!(
            decode_row_batch(builder.finished_data()),
            Err(FlatError::UnknownKind {
                row: 0,
                value: 0,
                kind: 200
            })
        );
    }
}
