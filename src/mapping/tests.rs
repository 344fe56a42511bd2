use super::*;
use crate::config::{DeadLetterConfig, Format, KafkaSourceConfig, SourceConfig, StartFrom};
use proptest::prelude::*;
use std::time::Duration;

fn schema() -> TableSchema {
    let native = |t| ColumnType::Native(t);
    let columns = [
        ("id", native(NativeType::Text), ColumnKind::PartitionKey),
        ("seq", native(NativeType::Int), ColumnKind::Clustering),
        ("city", native(NativeType::Text), ColumnKind::Regular),
        ("amount", native(NativeType::Decimal), ColumnKind::Regular),
        ("hits", native(NativeType::BigInt), ColumnKind::Regular),
    ];
    TableSchema {
        columns: columns.into_iter().map(|(n, t, k)| (n.to_string(), (t, k))).collect(),
        partition_key: vec!["id".into()],
        clustering_key: vec!["seq".into()],
    }
}

fn route(columns: &[(&str, FieldRef)]) -> RouteConfig {
    RouteConfig {
        name: "r".into(),
        keyspace: "ks".into(),
        table: "t".into(),
        source: SourceConfig::Kafka(KafkaSourceConfig {
            brokers: "b:1".into(),
            topic: "in".into(),
            group_id: "g".into(),
            start_from: StartFrom::Earliest,
            commit_interval: Duration::from_secs(1),
            properties: vec![],
        }),
        format: Format::Json,
        columns: columns
            .iter()
            .map(|(c, f)| ColumnMapping {
                column: c.to_string(),
                field: f.clone(),
            })
            .collect(),
        dead_letter: DeadLetterConfig::Kafka {
            brokers: "b:1".into(),
            topic: "dl".into(),
        },
    }
}

fn path(p: &str) -> FieldRef {
    FieldRef::Path(p.split('.').map(str::to_string).collect())
}

/// Comparable view of bound values: `None` = unset, `Some(None)` = null.
fn view(values: &RowValues) -> Vec<Option<Option<CqlValue>>> {
    values
        .iter()
        .map(|v| match v {
            MaybeUnset::Unset => None,
            MaybeUnset::Set(inner) => Some(inner.clone()),
        })
        .collect()
}

fn map(key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<Vec<Option<Option<CqlValue>>>, MappingError> {
    mapper().map_json(key, payload).map(|v| view(&v))
}

fn mapper() -> RowMapper {
    RowMapper::new(
        &route(&[
            ("id", FieldRef::Key),
            ("seq", path("seq")),
            ("city", path("customer.address.city")),
            ("hits", path("hits")),
        ]),
        &schema(),
    )
    .expect("mapper")
}

#[test]
fn maps_key_nested_path_and_leaves_missing_unset() {
    let values = map(
        Some(b"k1"),
        Some(br#"{"seq": 3, "customer": {"address": {"city": "Oslo"}}}"#),
    )
    .expect("row");
    assert_eq!(
        values,
        vec![
            Some(Some(CqlValue::Text("k1".into()))),
            Some(Some(CqlValue::Int(3))),
            Some(Some(CqlValue::Text("Oslo".into()))),
            None,
        ]
    );
}

#[test]
fn explicit_null_writes_null() {
    let values = map(Some(b"k"), Some(br#"{"seq": 1, "hits": null}"#)).expect("row");
    assert_eq!(values[3], Some(None));
}

#[test]
fn errors_carry_column_field_and_reason() {
    let m = map;
    assert!(matches!(m(Some(b"k"), Some(b"{nope")), Err(MappingError::NotJson(_))));
    assert_eq!(m(Some(b"k"), Some(b"[1]")), Err(MappingError::NotObject));
    assert_eq!(m(Some(b"k"), None), Err(MappingError::EmptyPayload));
    assert_eq!(
        m(None, Some(br#"{"seq":1}"#)),
        Err(MappingError::KeyAbsent { column: "id".into() })
    );
    assert_eq!(
        m(Some(&[0xff]), Some(br#"{"seq":1}"#)),
        Err(MappingError::KeyNotText { column: "id".into() })
    );
    assert_eq!(
        m(Some(b"k"), Some(br#"{"seq": null}"#)),
        Err(MappingError::MissingPrimaryKey {
            column: "seq".into(),
            field: "seq".into()
        })
    );
    let Err(MappingError::BadValue { column, field, reason }) = m(Some(b"k"), Some(br#"{"seq": 1, "hits": "many"}"#))
    else {
        panic!("expected a bad value")
    };
    assert_eq!((column.as_str(), field.as_str()), ("hits", "hits"));
    assert!(reason.contains("expected an integer"), "{reason}");
}

#[test]
fn schema_errors_found_at_start() {
    let unknown = RowMapper::new(
        &route(&[("id", FieldRef::Key), ("seq", path("s")), ("nope", path("x"))]),
        &schema(),
    );
    assert!(matches!(unknown, Err(SchemaError::ColumnNotFound { column, .. }) if column == "nope"));
    let unmapped = RowMapper::new(&route(&[("id", FieldRef::Key)]), &schema());
    assert!(matches!(unmapped, Err(SchemaError::PrimaryKeyUnmapped { column, .. }) if column == "seq"));
}

#[test]
fn empty_mapping_maps_every_column_by_name() {
    let m = RowMapper::new(&route(&[]), &schema()).expect("mapper");
    assert_eq!(
        m.column_names().collect::<Vec<_>>(),
        ["amount", "city", "hits", "id", "seq"]
    );
    assert_eq!(
        m.insert_statement("ks", "t"),
        "INSERT INTO \"ks\".\"t\" (\"amount\", \"city\", \"hits\", \"id\", \"seq\") VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
    );
}

#[test]
fn write_timestamps_are_deterministic_and_ordered_within_a_millisecond() {
    assert_eq!(write_timestamp_us(Some(1_700_000_000_000), 42), 1_700_000_000_000_042);
    assert_eq!(write_timestamp_us(Some(5), 1999), 5_999);
    assert_eq!(write_timestamp_us(None, 7), 7);
    assert!(write_timestamp_us(Some(5), 10) < write_timestamp_us(Some(5), 11));
    assert!(write_timestamp_us(Some(5), 999) < write_timestamp_us(Some(6), 1000));
    assert!(write_timestamp_us(Some(i64::MAX), 0) > 0);
}

proptest! {
    /// No payload or key, however malformed, makes the mapper panic.
    #[test]
    fn arbitrary_input_never_panics(key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
                                    payload in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256))) {
        let _ = mapper().map_json(key.as_deref(), payload.as_deref());
    }

    /// Any JSON object with a valid key and integer seq maps, and the key comes back as text.
    #[test]
    fn valid_rows_always_map(key in "[a-z0-9]{1,12}", seq in any::<i32>(), city in ".{0,20}") {
        let payload = serde_json::json!({"seq": seq, "customer": {"address": {"city": city.clone()}}}).to_string();
        let values = map(Some(key.as_bytes()), Some(payload.as_bytes())).expect("row");
        prop_assert_eq!(&values[0], &Some(Some(CqlValue::Text(key))));
        prop_assert_eq!(&values[1], &Some(Some(CqlValue::Int(seq))));
        prop_assert_eq!(&values[2], &Some(Some(CqlValue::Text(city))));
    }
}

#[test]
fn write_clock_orders_a_burst_within_one_millisecond() {
    let mut last = 0;
    let stamps: Vec<i64> = (0..1500)
        .map(|_| {
            last = super::next_write_timestamp_us(Some(7), last);
            last
        })
        .collect();
    assert_eq!(stamps[0], 7000);
    assert!(stamps.windows(2).all(|w| w[1] > w[0]), "strictly increasing");
    // A later millisecond starts at its own time once the clock has not run past it.
    assert_eq!(super::next_write_timestamp_us(Some(9), 8500), 9000);
    assert_eq!(super::next_write_timestamp_us(Some(8), 8500), 8501);
}
