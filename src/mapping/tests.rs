use super::*;
use crate::config::{
    DeadLetterConfig, Format, KafkaSourceConfig, ProtobufConfig, SourceConfig, StartFrom, TargetConfig, TimestampConfig,
};
use proptest::prelude::*;
use scylla::serialize::row::SerializeRow;

use crate::sink::scylla::bound::{RowBuilder, SerializedRow};
use scylla::cluster::metadata::ColumnKind;
use std::time::Duration;

fn schema() -> TableSchema {
    let native = |t| ColumnType::Native(t);
    let columns = [
        ("id", native(NativeType::Text), ColumnKind::PartitionKey),
        ("seq", native(NativeType::Int), ColumnKind::Clustering),
        ("city", native(NativeType::Text), ColumnKind::Regular),
        ("amount", native(NativeType::Decimal), ColumnKind::Regular),
        ("hits", native(NativeType::BigInt), ColumnKind::Regular),
        ("body", native(NativeType::Blob), ColumnKind::Regular),
    ];
    TableSchema {
        columns: columns.into_iter().map(|(n, t, k)| (n.to_string(), (t, k))).collect(),
        partition_key: vec!["id".into()],
        clustering_key: vec!["seq".into()],
    }
}

fn target(table: &str, when: Option<&str>, columns: &[(&str, FieldRef)]) -> TargetConfig {
    TargetConfig {
        keyspace: "ks".into(),
        table: table.into(),
        when: when.map(str::to_string),
        columns: columns
            .iter()
            .map(|(c, f)| ColumnMapping {
                column: c.to_string(),
                field: f.clone(),
            })
            .collect(),
    }
}

fn route_with(targets: Vec<TargetConfig>) -> RouteConfig {
    RouteConfig {
        name: "r".into(),
        ack: crate::config::AckMode::Written,
        source: SourceConfig::Kafka(KafkaSourceConfig {
            brokers: "b:1".into(),
            topic: "in".into(),
            group_id: "g".into(),
            start_from: StartFrom::Earliest,
            commit_interval: Duration::from_secs(1),
            properties: vec![],
            security: None,
        }),
        format: Format::Json,
        targets,
        table_from: None,
        filter: None,
        delete_when: None,
        delete_on_tombstone: true,
        ttl: None,
        timestamp: None,
        dead_letter: DeadLetterConfig::Kafka {
            brokers: "b:1".into(),
            topic: "dl".into(),
            security: None,
        },
    }
}

fn route(columns: &[(&str, FieldRef)]) -> RouteConfig {
    route_with(vec![target("t", None, columns)])
}

fn path(p: &str) -> FieldRef {
    FieldRef::Path(p.split('.').map(str::to_string).collect())
}

fn expr(source: &str) -> FieldRef {
    FieldRef::Expr(source.into())
}

/// Comparable view of bound values: `None` = unset, `Some(None)` = null.
type View = Vec<Option<Option<CqlValue>>>;

fn view(values: &RowValues) -> View {
    values
        .iter()
        .map(|v| match v {
            MaybeUnset::Unset => None,
            MaybeUnset::Set(inner) => Some(inner.clone()),
        })
        .collect()
}

fn envelope<'a>(key: Option<&'a [u8]>, payload: Option<&'a [u8]>, headers: &'a [(String, String)]) -> Envelope<'a> {
    Envelope {
        key,
        payload,
        headers,
        source: "orders",
        subject: Some("orders.eu"),
        partition: Some(2),
        position: 77,
        timestamp_ms: Some(1_700_000_000_000),
    }
}

/// Write timestamp the tests pass as the source-derived one.
const TS: i64 = 5_000_000;

fn set(value: CqlValue) -> Option<Option<CqlValue>> {
    Some(Some(value))
}

fn text(value: &str) -> Option<Option<CqlValue>> {
    set(CqlValue::Text(value.into()))
}

fn rows_of(
    mapper: &RouteMapper,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Result<Vec<(usize, bool, View)>, MappingError> {
    let headers = vec![
        ("tenant".to_string(), "acme".to_string()),
        ("n".to_string(), "12".to_string()),
        ("h".to_string(), "!".to_string()),
    ];
    mapper
        .map(&envelope(key, payload, &headers), TS)
        .map(|rows| rows.iter().map(|r| (r.target, r.delete, view(&r.values))).collect())
}

/// The single upsert's values without the trailing write timestamp.
fn map(key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<View, MappingError> {
    let mut rows = rows_of(&mapper(), key, payload)?;
    assert_eq!(rows.len(), 1);
    let (_, delete, mut values) = rows.remove(0);
    assert!(!delete);
    assert_eq!(values.pop(), Some(set(CqlValue::BigInt(TS))));
    Ok(values)
}

fn mapper() -> RouteMapper {
    RouteMapper::new(
        &route(&[
            ("id", FieldRef::Key),
            ("seq", path("seq")),
            ("city", path("customer.address.city")),
            ("hits", path("hits")),
        ]),
        &[schema()],
    )
    .expect("mapper")
}

/// A route using every feature at once (for the never-panics property).
fn rich_mapper() -> RouteMapper {
    let mut route = route_with(vec![
        target(
            "t",
            Some("has(msg.seq) && msg.seq > 0"),
            &[
                ("id", FieldRef::KeyPath(vec!["id".into()])),
                ("seq", path("seq")),
                ("city", expr("msg.city + headers.h")),
                ("hits", FieldRef::Position),
                ("body", FieldRef::Payload),
            ],
        ),
        target(
            "u",
            None,
            &[("id", FieldRef::Header("h".into())), ("seq", FieldRef::Partition)],
        ),
    ]);
    route.filter = Some("!has(msg.skip)".into());
    route.delete_when = Some("has(msg.op) && msg.op == 'd'".into());
    route.ttl = Some(TtlConfig::Field(path("ttl")));
    route.timestamp = Some(TimestampConfig {
        field: path("at"),
        unit: TimeUnit::Millis,
    });
    RouteMapper::new(&route, &[schema(), schema()]).expect("mapper")
}

#[test]
fn maps_key_nested_path_and_leaves_missing_unset() {
    let values = map(
        Some(b"k1"),
        Some(br#"{"seq": 3, "customer": {"address": {"city": "Oslo"}}}"#),
    )
    .expect("row");
    assert_eq!(values, vec![text("k1"), set(CqlValue::Int(3)), text("Oslo"), None]);
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
    assert_eq!(
        m(None, Some(br#"{"seq":1}"#)),
        Err(MappingError::KeyAbsent { column: "id".into() })
    );
    assert_eq!(
        m(Some(&[0xff]), Some(br#"{"seq":1}"#)),
        Err(MappingError::KeyNotText {
            column: "id".into(),
            field: "$key".into(),
            expected: "UTF-8 text"
        })
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
    let unknown = RouteMapper::new(
        &route(&[("id", FieldRef::Key), ("seq", path("s")), ("nope", path("x"))]),
        &[schema()],
    );
    assert!(matches!(unknown, Err(SchemaError::ColumnNotFound { column, .. }) if column == "nope"));
    let unmapped = RouteMapper::new(&route(&[("id", FieldRef::Key)]), &[schema()]);
    assert!(matches!(unmapped, Err(SchemaError::PrimaryKeyUnmapped { column, .. }) if column == "seq"));
    let bad_expr = RouteMapper::new(&route(&[("id", FieldRef::Key), ("seq", expr("1 +"))]), &[schema()]);
    assert!(matches!(bad_expr, Err(SchemaError::Expression { key, .. }) if key == "columns.seq"));
}

#[test]
fn empty_mapping_maps_every_column_by_name() {
    let m = RouteMapper::new(&route(&[]), &[schema()]).expect("mapper");
    assert_eq!(
        m.targets()[0].column_names().collect::<Vec<_>>(),
        ["amount", "body", "city", "hits", "id", "seq"]
    );
    assert_eq!(
        m.upsert_statement(0),
        "INSERT INTO \"ks\".\"t\" (\"amount\", \"body\", \"city\", \"hits\", \"id\", \"seq\") VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
    );
    assert_eq!(
        m.delete_statement(0),
        "DELETE FROM \"ks\".\"t\" USING TIMESTAMP ? WHERE \"id\" = ? AND \"seq\" = ?"
    );
}

#[test]
fn tombstones_delete_when_the_key_names_the_row_and_fail_otherwise() {
    let by_key = RouteMapper::new(
        &route(&[
            ("id", FieldRef::KeyPath(vec!["id".into()])),
            ("seq", FieldRef::KeyPath(vec!["seq".into()])),
            ("city", path("city")),
        ]),
        &[schema()],
    )
    .expect("mapper");
    assert!(by_key.deletes_without_payload(0));
    let rows = rows_of(&by_key, Some(br#"{"id": "a", "seq": 4}"#), None).expect("delete");
    assert_eq!(
        rows,
        vec![(
            0,
            true,
            vec![set(CqlValue::BigInt(TS)), text("a"), set(CqlValue::Int(4))]
        )]
    );
    // The default mapper reads `seq` from the payload, which a tombstone does not have.
    assert!(!mapper().deletes_without_payload(0));
    assert!(
        matches!(rows_of(&mapper(), Some(b"k"), None), Err(MappingError::MissingPrimaryKey { column, .. }) if column == "seq")
    );
    let mut off = route(&[("id", FieldRef::Key), ("seq", path("seq"))]);
    off.delete_on_tombstone = false;
    let off = RouteMapper::new(&off, &[schema()]).expect("mapper");
    assert_eq!(rows_of(&off, Some(b"k"), None), Err(MappingError::EmptyPayload));
}

#[test]
fn filter_delete_marker_and_conditions_pick_rows() {
    let m = rich_mapper();
    // Filtered out: no rows, no error.
    assert_eq!(
        rows_of(&m, Some(br#"{"id":"a"}"#), Some(br#"{"skip": true, "seq": 1}"#)),
        Ok(vec![])
    );
    // `when` of target 0 is false (seq 0): only target 1, keyed from the header and partition.
    let rows = rows_of(&m, Some(br#"{"id":"a"}"#), Some(br#"{"seq": 0, "city": "x"}"#)).expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, 1);
    // Delete marker: both targets get a delete with the key columns only.
    let rows = rows_of(&m, Some(br#"{"id":"a"}"#), Some(br#"{"op": "d", "seq": 5}"#)).expect("rows");
    assert_eq!(
        rows.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        vec![(0, true), (1, true)]
    );
    assert_eq!(
        rows[0].2,
        vec![set(CqlValue::BigInt(TS)), text("a"), set(CqlValue::Int(5))]
    );
}

#[test]
fn computed_columns_metadata_ttl_and_timestamp_fields() {
    let m = rich_mapper();
    let payload = br#"{"seq": 2, "city": "Oslo-", "ttl": 60, "at": 1700000000123}"#;
    let rows = rows_of(&m, Some(br#"{"id":"a"}"#), Some(payload)).expect("rows");
    assert_eq!(rows.len(), 2);
    let (target, delete, values) = &rows[0];
    assert_eq!((*target, *delete), (0, false));
    assert_eq!(
        values,
        &vec![
            text("a"),
            set(CqlValue::Int(2)),
            text("Oslo-!"),
            set(CqlValue::BigInt(77)),
            set(CqlValue::Blob(payload.to_vec())),
            set(CqlValue::Int(60)),
            set(CqlValue::BigInt(1_700_000_000_123_000)),
        ]
    );
    // Target 1: keyed from the header `h` and the Kafka partition.
    assert_eq!(rows[1].2[..2], [text("!"), set(CqlValue::Int(2))]);
    // Without `at` the source's timestamp is used; without `ttl` the TTL is unset (table default).
    let rows = rows_of(&m, Some(br#"{"id":"a"}"#), Some(br#"{"seq": 2, "city": "x"}"#)).expect("rows");
    assert_eq!(rows[0].2[5..], [None, set(CqlValue::BigInt(TS))]);
    // A computed column that cannot be evaluated fails the message with the expression named.
    let failed = rows_of(&m, Some(br#"{"id":"a"}"#), Some(br#"{"seq": 2}"#));
    assert!(
        matches!(&failed, Err(MappingError::Expression { key, .. }) if key == "target[0].columns.city"),
        "{failed:?}"
    );
    let bad_ttl = rows_of(
        &m,
        Some(br#"{"id":"a"}"#),
        Some(br#"{"seq": 2, "city": "x", "ttl": -1}"#),
    );
    assert!(matches!(bad_ttl, Err(MappingError::BadAttribute { key: "ttl", .. })));
    let bad_time = rows_of(
        &m,
        Some(br#"{"id":"a"}"#),
        Some(br#"{"seq": 2, "city": "x", "at": "noon"}"#),
    );
    assert!(matches!(
        bad_time,
        Err(MappingError::BadAttribute { key: "timestamp", .. })
    ));
}

#[test]
fn table_from_names_the_target_per_message() {
    let mut route = route_with(vec![
        target("t", None, &[("id", FieldRef::Key), ("seq", path("seq"))]),
        target(
            "u",
            None,
            &[
                ("id", FieldRef::Key),
                ("seq", path("seq")),
                ("city", FieldRef::Header("tenant".into())),
            ],
        ),
    ]);
    route.table_from = Some(path("kind"));
    let m = RouteMapper::new(&route, &[schema(), schema()]).expect("mapper");
    let rows = rows_of(&m, Some(b"k"), Some(br#"{"kind": "u", "seq": 1}"#)).expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, 1);
    assert_eq!(rows[0].2[2], text("acme"));
    let rows = rows_of(&m, Some(b"k"), Some(br#"{"kind": "ks.t", "seq": 1}"#)).expect("rows");
    assert_eq!(rows[0].0, 0);
    assert!(matches!(
        rows_of(&m, Some(b"k"), Some(br#"{"kind": "v", "seq": 1}"#)),
        Err(MappingError::UnknownTable { value, .. }) if value == "v"
    ));
}

#[test]
fn raw_payloads_map_with_dollar_payload() {
    let mut route = route(&[
        ("id", FieldRef::Source),
        ("seq", FieldRef::Header("n".into())),
        ("city", FieldRef::Payload),
        ("body", FieldRef::Payload),
    ]);
    route.format = Format::Text;
    let m = RouteMapper::new(&route, &[schema()]).expect("mapper");
    let rows = rows_of(&m, None, Some(b"hello \xc3\xa9")).expect("rows");
    assert_eq!(
        rows[0].2[..4],
        [
            text("orders"),
            set(CqlValue::Int(12)),
            text("hello é"),
            set(CqlValue::Blob(b"hello \xc3\xa9".to_vec()))
        ]
    );
    assert!(matches!(rows_of(&m, None, Some(&[0xff])), Err(MappingError::BadValue { column, .. }) if column == "city"));
}

#[test]
fn protobuf_messages_decode_from_a_proto_file() {
    let dir = std::env::temp_dir().join(format!("shardgate-proto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("order.proto"),
        r#"syntax = "proto3";
package shop.v1;
message Address { string city = 1; }
message Order {
  string id = 1;
  int32 seq = 2;
  optional int64 hits = 3;
  Address address = 4;
  bytes body = 5;
}
"#,
    )
    .expect("proto");
    let mut route = route(&[
        ("id", path("id")),
        ("seq", path("seq")),
        ("hits", path("hits")),
        ("city", path("address.city")),
        ("body", path("body")),
    ]);
    route.format = Format::Protobuf(ProtobufConfig {
        message: "shop.v1.Order".into(),
        descriptor_set: None,
        files: vec![dir.join("order.proto")],
        includes: vec![],
    });
    let m = RouteMapper::new(&route, &[schema()]).expect("mapper");
    // id = "o1", seq = 7, address { city = "Oslo" }, body = [1, 2]; hits not set.
    let payload = [
        0x0a, 2, b'o', b'1', 0x10, 7, 0x22, 6, 0x0a, 4, b'O', b's', b'l', b'o', 0x2a, 2, 1, 2,
    ];
    let rows = rows_of(&m, None, Some(&payload)).expect("rows");
    assert_eq!(
        rows[0].2[..5],
        [
            text("o1"),
            set(CqlValue::Int(7)),
            None,
            text("Oslo"),
            set(CqlValue::Blob(vec![1, 2]))
        ]
    );
    assert!(matches!(
        rows_of(&m, None, Some(&[0xff, 0xff])),
        Err(MappingError::NotProtobuf(_))
    ));
    let mut missing = route.clone();
    if let Format::Protobuf(p) = &mut missing.format {
        p.message = "shop.v1.Nope".into();
    }
    assert!(
        matches!(RouteMapper::new(&missing, &[schema()]), Err(SchemaError::Format { reason, .. }) if reason.contains("shop.v1.Order"))
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
        let headers = vec![("h".to_string(), "v".to_string())];
        for mapper in [mapper(), rich_mapper()] {
            let _ = mapper.map(&envelope(key.as_deref(), payload.as_deref(), &headers), 1);
        }
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

#[test]
fn flatbuffers_messages_verify_and_map_by_field_name() {
    let schema_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/order_event.bfbs");
    let decoder = format::Decoder::load("r", &Format::FlatBuffers(schema_path.clone())).expect("schema loads");
    let document = decoder
        .decode(&crate::devkit::order_event_flatbuffer(7))
        .expect("decodes");
    assert_eq!(
        document,
        serde_json::json!({
            "order_id": "fb-00007",
            "quantity": 7,
            "amount": 7.5,
            "express": false,
            "channel": "Store",
            "address": {"city": crate::devkit::expected_order(7).city},
            "line_quantities": [1, 3],
        })
    );
    // Defaults are not stored but read back as values, as FlatBuffers defines them.
    let zero = decoder
        .decode(&crate::devkit::order_event_flatbuffer(0))
        .expect("decodes");
    assert_eq!(
        (zero["quantity"].clone(), zero["channel"].clone()),
        (serde_json::json!(0), serde_json::json!("Web"))
    );
    assert!(matches!(
        decoder.decode(&[1, 2, 3, 4, 5, 6, 7, 8]),
        Err(MappingError::NotFlatBuffer(_))
    ));
    assert!(matches!(decoder.decode(b""), Err(MappingError::NotFlatBuffer(_))));
    let bad = format::Decoder::load(
        "r",
        &Format::FlatBuffers(std::path::PathBuf::from("schemas/order_event.fbs")),
    );
    assert!(matches!(bad, Err(SchemaError::Format { .. })));
}

proptest! {
    /// No buffer, however malformed, makes the FlatBuffers decoder panic.
    #[test]
    fn arbitrary_flatbuffers_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        let schema_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/order_event.bfbs");
        let decoder = format::Decoder::load("r", &Format::FlatBuffers(schema_path)).expect("schema loads");
        let _ = decoder.decode(&payload);
    }
}

/// `$key` (and `$key.<path>`) in a regular column: a message without a key leaves it unset,
/// like any missing field; only a primary-key column needs the key (`bad_key`).
#[test]
fn absent_key_leaves_a_regular_column_unset() {
    let mapper = RouteMapper::new(
        &route(&[
            ("id", path("id")),
            ("seq", path("seq")),
            ("city", FieldRef::Key),
            ("hits", FieldRef::KeyPath(vec!["n".into()])),
        ]),
        &[schema()],
    )
    .expect("mapper");
    let rows = rows_of(&mapper, None, Some(br#"{"id": "a", "seq": 1}"#)).expect("mapped without a key");
    assert_eq!(rows.len(), 1);
    let values = &rows[0].2;
    assert_eq!(values[..4], [text("a"), set(CqlValue::Int(1)), None, None]);
    let keyed = rows_of(&mapper, Some(br#"{"n": 7}"#), Some(br#"{"id": "a", "seq": 1}"#)).expect("mapped");
    assert_eq!(
        keyed[0].2[..4],
        [
            text("a"),
            set(CqlValue::Int(1)),
            text(r#"{"n": 7}"#),
            set(CqlValue::BigInt(7))
        ]
    );
    let error = map(None, Some(br#"{"seq":1}"#)).expect_err("key column needs the key");
    assert_eq!(error.code(), ReasonCode::BadKey);
}

/// `$subject` maps the message's own subject (a wildcard subscription's real subject), and is
/// unset for sources without one.
#[test]
fn subject_maps_the_message_subject() {
    let mapper = RouteMapper::new(
        &route(&[("id", path("id")), ("seq", path("seq")), ("city", FieldRef::Subject)]),
        &[schema()],
    )
    .expect("mapper");
    let rows = rows_of(&mapper, None, Some(br#"{"id": "a", "seq": 1}"#)).expect("mapped");
    assert_eq!(rows[0].2[2], text("orders.eu"));
    let headers = Vec::new();
    let mut no_subject = envelope(None, Some(br#"{"id": "a", "seq": 1}"#), &headers);
    no_subject.subject = None;
    let rows = mapper.map(&no_subject, TS).expect("mapped");
    assert!(matches!(rows[0].values[2], MaybeUnset::Unset));
}

/// A JSON route without expressions that reads payload paths everywhere a field may stand:
/// columns (nested too), TTL, timestamp and `table_from`.
fn paths_mapper() -> RouteMapper {
    let columns = [
        ("id", FieldRef::Key),
        ("seq", path("seq")),
        ("city", path("customer.address.city")),
        ("hits", path("hits")),
        ("amount", path("customer.amount")),
    ];
    let mut route = route_with(vec![target("t", None, &columns), target("u", None, &columns)]);
    route.ttl = Some(TtlConfig::Field(path("ttl")));
    route.timestamp = Some(TimestampConfig {
        field: path("at"),
        unit: TimeUnit::Millis,
    });
    route.table_from = Some(path("table"));
    RouteMapper::new(&route, &[schema(), schema()]).expect("mapper")
}

#[test]
fn routes_without_expressions_decode_only_what_they_read() {
    assert!(mapper().projection.is_some());
    assert!(paths_mapper().projection.is_some());
    // Any expression sees the whole message.
    assert!(rich_mapper().projection.is_none());
    let mut computed = route(&[("id", FieldRef::Key), ("seq", path("seq")), ("city", expr("msg.city"))]);
    assert!(RouteMapper::new(&computed, &[schema()])
        .expect("mapper")
        .projection
        .is_none());
    computed.targets[0].columns.pop();
    computed.filter = Some("msg.seq > 1".into());
    assert!(RouteMapper::new(&computed, &[schema()])
        .expect("mapper")
        .projection
        .is_none());
    // A valid message maps the same both ways (the last of a repeated key wins).
    let payload = br#"{"table":"u","seq":3,"customer":{"address":{"city":"Oslo"},"amount":"1.5"},"hits":9,"ttl":60,"at":1700000000000,"seq":4}"#;
    let (projected, full) = projected_and_full(&mut paths_mapper(), b"k1", payload);
    assert!(projected.starts_with("Ok([(1, false, "), "{projected}");
    assert!(projected.contains("Int(4)"), "{projected}");
    assert_eq!(projected, full);
}

/// Maps with the route's projection and again with a full decode; both must agree exactly,
/// errors included.
fn projected_and_full(mapper: &mut RouteMapper, key: &[u8], payload: &[u8]) -> (String, String) {
    let projected = format!("{:?}", rows_of(mapper, Some(key), Some(payload)));
    let projection = mapper.projection.take();
    let full = format!("{:?}", rows_of(mapper, Some(key), Some(payload)));
    mapper.projection = projection;
    (projected, full)
}

/// JSON values whose objects use the keys the paths mapper reads, and others.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        (-1e6f64..1e6).prop_map(serde_json::Value::from),
        "[a-z0-9 ]{0,6}".prop_map(serde_json::Value::from),
        prop_oneof![Just("t"), Just("u"), Just("ks.u")].prop_map(serde_json::Value::from),
        // Strings that need escapes, and number literals kept as written.
        "[a-z\"\\\\é\n\u{1}]{0,4}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("1E+3"),
            Just("-0.50"),
            Just("12345678901234567890123"),
            Just("7e0"),
            Just("60")
        ]
        .prop_map(|literal| serde_json::from_str::<serde_json::Value>(literal).expect("a JSON number")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::Array),
            proptest::collection::vec((json_key(), inner), 0..4)
                .prop_map(|members| serde_json::Value::Object(members.into_iter().collect())),
        ]
    })
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("seq"),
        Just("customer"),
        Just("address"),
        Just("city"),
        Just("amount"),
        Just("hits"),
        Just("ttl"),
        Just("at"),
        Just("table"),
        Just("other"),
    ]
    .prop_map(str::to_string)
}

proptest! {
    /// A projected decode maps every object — duplicate keys, nulls, wrong types, nesting —
    /// exactly as the full decode does, and so does any malformed payload.
    #[test]
    fn projected_and_full_decodes_map_alike(members in proptest::collection::vec((json_key(), json_value()), 0..8),
                                            noise in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut mapper = paths_mapper();
        // Object text written member by member, so a key may repeat.
        let body: Vec<String> = members
            .iter()
            .map(|(k, v)| format!("{}:{v}", serde_json::Value::from(k.as_str())))
            .collect();
        let object = format!("{{{}}}", body.join(","));
        let (projected, full) = projected_and_full(&mut mapper, b"k1", object.as_bytes());
        prop_assert_eq!(projected, full);
        let (projected, full) = projected_and_full(&mut mapper, b"k1", &noise);
        prop_assert_eq!(projected, full);
        let truncated = &object.as_bytes()[..object.len() / 2];
        let (projected, full) = projected_and_full(&mut mapper, b"k1", truncated);
        prop_assert_eq!(projected, full);
    }
}

/// The types of a row's statement markers, in order: the target's columns, the TTL and the
/// write timestamp (an upsert), or the write timestamp and the primary key (a delete).
fn marker_types(mapper: &RouteMapper, target: usize, delete: bool) -> Vec<ColumnType<'static>> {
    let target = &mapper.targets[target];
    let bigint = ColumnType::Native(NativeType::BigInt);
    if delete {
        return std::iter::once(bigint)
            .chain(target.primary_key.iter().map(|&i| target.columns[i].typ.clone()))
            .collect();
    }
    let mut types: Vec<ColumnType<'static>> = target.columns.iter().map(|c| c.typ.clone()).collect();
    if mapper.ttl.is_some() {
        types.push(ColumnType::Native(NativeType::Int));
    }
    types.push(bigint);
    types
}

/// A row as the driver serializes it for its statement.
fn serialized(types: &[ColumnType<'static>], row: &impl SerializeRow) -> Result<Vec<u8>, String> {
    use scylla::frame::response::result::{ColumnSpec, TableSpec};
    let specs: Vec<ColumnSpec<'_>> = types
        .iter()
        .map(|typ| ColumnSpec::borrowed("v", typ.clone(), TableSpec::borrowed("ks", "t")))
        .collect();
    let mut bytes = Vec::new();
    row.serialize(
        &scylla::serialize::row::RowSerializationContext::from_specs(&specs),
        &mut scylla::serialize::writers::RowWriter::new(&mut bytes),
    )
    .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// A message's key and payload (`None`: absent).
type KeyAndPayload<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// Maps `messages` with `map_cells` into one buffer (a refused message's cells stay there, as
/// in a real batch), with `map_cells_and_values` into another, and each again with `map`: every
/// message must become the same rows — serialized, byte for byte — or the same refusal.
fn cells_agree_with_values(mapper: &RouteMapper, messages: &[KeyAndPayload<'_>]) -> Result<(), TestCaseError> {
    let headers = vec![
        ("tenant".to_string(), "acme".to_string()),
        ("n".to_string(), "12".to_string()),
        ("h".to_string(), "!".to_string()),
    ];
    let mut builder = RowBuilder::default();
    let mut spans = Vec::new();
    let counts: Vec<_> = messages
        .iter()
        .map(|(key, payload)| mapper.map_cells(&envelope(*key, *payload, &headers), TS, &mut builder, &mut spans))
        .collect();
    // The same messages mapped into cells and values at once (a tapped route).
    let mut both_builder = RowBuilder::default();
    let mut both_spans = Vec::new();
    let both: Vec<_> = messages
        .iter()
        .map(|(key, payload)| {
            mapper.map_cells_and_values(
                &envelope(*key, *payload, &headers),
                TS,
                &mut both_builder,
                &mut both_spans,
            )
        })
        .collect();
    let sealed = builder.seal();
    let both_sealed = both_builder.seal();
    let mut spans = spans.into_iter();
    let mut both_spans = both_spans.into_iter();
    for (((key, payload), count), both) in messages.iter().zip(counts).zip(both) {
        let mapped = mapper.map(&envelope(*key, *payload, &headers), TS);
        prop_assert_eq!(format!("{mapped:?}"), format!("{both:?}"));
        match (mapped, count) {
            (Ok(rows), Ok(count)) => {
                prop_assert_eq!(rows.len(), count);
                for (row, (cells, both_cells)) in rows.iter().zip(spans.by_ref().zip(both_spans.by_ref()).take(count)) {
                    prop_assert_eq!((row.target, row.delete), (cells.target, cells.delete));
                    let types = marker_types(mapper, row.target, row.delete);
                    let from_values = serialized(&types, &row.values);
                    prop_assert!(from_values.is_ok(), "{:?}", from_values);
                    let from_cells = serialized(&types, &SerializedRow::new(&sealed, cells.values));
                    prop_assert_eq!(&from_values, &from_cells, "{:?}", row.values);
                    let from_both = serialized(&types, &SerializedRow::new(&both_sealed, both_cells.values));
                    prop_assert_eq!(from_values, from_both, "{:?}", row.values);
                }
            }
            (Err(values), Err(cells)) => {
                prop_assert_eq!(values.to_string(), cells.to_string());
                prop_assert_eq!(values.code(), cells.code());
            }
            (values, cells) => prop_assert!(false, "map: {values:?}, map_cells: {cells:?}"),
        }
    }
    prop_assert!(spans.next().is_none() && both_spans.next().is_none(), "rows left over");
    Ok(())
}

proptest! {
    /// Mapping straight into cells gives every message the rows (serialized) or the refusal
    /// mapping into CQL values gives, for routes of paths, of expressions and of metadata,
    /// messages good and bad, tombstones included.
    #[test]
    fn cells_map_as_values_serialize(objects in proptest::collection::vec(proptest::collection::vec((json_key(), json_value()), 0..8), 1..4),
                                     noise in proptest::collection::vec(any::<u8>(), 0..32)) {
        let payloads: Vec<String> = objects
            .iter()
            .map(|members| {
                let body: Vec<String> = members
                    .iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::Value::from(k.as_str())))
                    .collect();
                format!("{{{}}}", body.join(","))
            })
            .collect();
        let mut messages: Vec<KeyAndPayload<'_>> =
            payloads.iter().map(|p| (Some(&b"k1"[..]), Some(p.as_bytes()))).collect();
        messages.push((Some(br#"{"id":"k2"}"#), Some(&noise)));
        messages.push((Some(br#"{"id":"k3"}"#), None));
        messages.push((None, payloads.first().map(String::as_bytes)));
        for mapper in [mapper(), rich_mapper(), paths_mapper()] {
            cells_agree_with_values(&mapper, &messages)?;
        }
    }
}

/// The orders of the demo, good ones and ones refused at each column, map into cells as
/// their CQL values serialize.
#[test]
fn order_cells_match_their_values() {
    let amounts = [
        "12.50",
        "-0.01",
        "0",
        "99999999999999999.99",
        "1e3",
        "\"7.25\"",
        "\"x\"",
        "null",
        "[1]",
    ];
    let payloads: Vec<String> = amounts
        .iter()
        .enumerate()
        .map(|(i, amount)| {
            format!(r#"{{"seq":{i},"customer":{{"address":{{"city":"Oslo"}},"amount":{amount}}},"hits":{i}}}"#)
        })
        .collect();
    let messages: Vec<KeyAndPayload<'_>> = payloads
        .iter()
        .map(|p| (Some(&b"k1"[..]), Some(p.as_bytes())))
        .collect();
    let mut mapper = route(&[
        ("id", FieldRef::Key),
        ("seq", path("seq")),
        ("city", path("customer.address.city")),
        ("amount", path("customer.amount")),
        ("hits", path("hits")),
    ]);
    mapper.ttl = Some(TtlConfig::Seconds(60));
    let mapper = RouteMapper::new(&mapper, &[schema()]).expect("mapper");
    let checked = cells_agree_with_values(&mapper, &messages);
    assert!(checked.is_ok(), "{checked:?}");
}
