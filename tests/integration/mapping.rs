//! The mapping features end to end, on one gateway with four Kafka routes against the real
//! Kafka and Cassandra:
//! - JSON into two tables (the second only `when` the message has an owner), a CEL filter, a
//!   computed column, a header, the source topic and offset as columns, TTL and write time from
//!   fields, deletes from tombstones and from a delete marker, and an expression that fails
//!   (dead-lettered with its reason);
//! - Protobuf decoded with a `.proto` file compiled at start-up, garbage dead-lettered;
//! - FlatBuffers verified and read with `schemas/order_event.bfbs`, garbage dead-lettered;
//! - raw text payloads into one column;
//! - the table chosen per message from a field, an unknown table dead-lettered.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use prost_reflect::{DescriptorPool, DynamicMessage, Value as PbValue};
use shardgate::devkit::{self, Gateway, Record};

use super::{gateway_binary, gateway_lock, Names};

const DEADLINE: Duration = Duration::from_secs(120);
const ITEMS: u64 = 1_000;
const FILTERED: u64 = 50;
const FAILING: u64 = 10;
const TOMBSTONES: u64 = 50;
const MARKERS: u64 = 50;
const PROTO_ROWS: u64 = 200;
const PROTO_GARBAGE: u64 = 5;
const LINES: u64 = 100;
const EVENTS: u64 = 100;
const UNKNOWN_KIND: u64 = 3;
const FLAT_ROWS: u64 = 100;
const FLAT_GARBAGE: u64 = 3;

const ORDER_PROTO: &str = r#"syntax = "proto3";
package shop.v1;
enum Kind { KIND_UNSPECIFIED = 0; RETAIL = 1; WHOLESALE = 2; }
message Address { string city = 1; }
message Order {
  string id = 1;
  int32 qty = 2;
  Address address = 3;
  Kind kind = 4;
  optional string note = 5;
}
"#;

fn kafka_source(topic: &str, group: &str) -> String {
    format!(
        r#"[route.source]
kind = "kafka"
brokers = ["{}"]
topic = "{topic}"
group_id = "{group}"
start_from = "earliest"
commit_interval_ms = 500
"#,
        devkit::KAFKA
    )
}

struct Topics {
    items: String,
    proto: String,
    lines: String,
    events: String,
    flat: String,
}

impl Topics {
    fn new(names: &Names) -> Topics {
        Topics {
            items: format!("{}.items", names.topic),
            proto: format!("{}.proto", names.topic),
            lines: format!("{}.lines", names.topic),
            events: format!("{}.events", names.topic),
            flat: format!("{}.flat", names.topic),
        }
    }

    fn all(&self) -> [&str; 5] {
        [&self.items, &self.proto, &self.lines, &self.events, &self.flat]
    }
}

fn routes_toml(names: &Names, topics: &Topics, proto_file: &std::path::Path) -> String {
    let ks = &names.keyspace;
    let group = &names.group;
    format!(
        r#"
[[route]]
name = "items"
format = "json"
filter = "!has(msg.test)"
delete_when = "has(msg.op) && msg.op == 'delete'"
ttl = "ttl_s"
timestamp = "updated_at"
{items_source}
[[route.target]]
table = "{ks}.items"
[route.target.columns]
id = "$key"
name = "name"
qty = "qty"
total = {{ expr = "double(msg.qty) * msg.price" }}
tenant = "$header.tenant"
src = "$source"
pos = "$position"
[[route.target]]
table = "{ks}.items_by_owner"
when = "has(msg.owner)"
[route.target.columns]
owner = "owner"
id = "$key"
name = "name"
[route.dead_letter]
kind = "kafka"
topic = "{items}.dl"

[[route]]
name = "proto"
format = "protobuf"
table = "{ks}.proto_items"
[route.protobuf]
message = "shop.v1.Order"
files = ["{proto_file}"]
{proto_source}
[route.columns]
id = "id"
qty = "qty"
city = "address.city"
kind = "kind"
note = "note"
[route.dead_letter]
kind = "kafka"
topic = "{proto}.dl"

[[route]]
name = "lines"
format = "text"
table = "{ks}.raw_lines"
{lines_source}
[route.columns]
id = "$key"
body = "$payload"
at = "$timestamp"
[route.dead_letter]
kind = "kafka"
topic = "{lines}.dl"

[[route]]
name = "events"
table_from = "kind"
{events_source}
[[route.target]]
table = "{ks}.events_a"
[[route.target]]
table = "{ks}.events_b"
[route.dead_letter]
kind = "kafka"
topic = "{events}.dl"

[[route]]
name = "flat"
format = "flatbuffers"
table = "{ks}.fb_orders"
[route.flatbuffers]
schema = "{flat_schema}"
{flat_source}
[route.columns]
order_id = "order_id"
quantity = "quantity"
amount = "amount"
express = "express"
channel = "channel"
city = "address.city"
line_quantities = "line_quantities"
[route.dead_letter]
kind = "kafka"
topic = "{flat}.dl"
"#,
        flat = topics.flat,
        flat_schema = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/order_event.bfbs"),
        flat_source = kafka_source(&topics.flat, &format!("{group}-flat")),
        items = topics.items,
        proto = topics.proto,
        lines = topics.lines,
        events = topics.events,
        proto_file = proto_file.display(),
        items_source = kafka_source(&topics.items, &format!("{group}-items")),
        proto_source = kafka_source(&topics.proto, &format!("{group}-proto")),
        lines_source = kafka_source(&topics.lines, &format!("{group}-lines")),
        events_source = kafka_source(&topics.events, &format!("{group}-events")),
    )
}

async fn create_tables(names: &Names) -> scylla::client::session::Session {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("keyspace");
    let ks = &names.keyspace;
    for table in [
        format!("CREATE TABLE {ks}.items (id text PRIMARY KEY, name text, qty int, total double, tenant text, src text, pos bigint)"),
        format!("CREATE TABLE {ks}.items_by_owner (owner text, id text, name text, PRIMARY KEY (owner, id))"),
        format!("CREATE TABLE {ks}.proto_items (id text PRIMARY KEY, qty int, city text, kind text, note text)"),
        format!("CREATE TABLE {ks}.raw_lines (id text PRIMARY KEY, body text, at timestamp)"),
        format!("CREATE TABLE {ks}.events_a (id text PRIMARY KEY, v int)"),
        format!("CREATE TABLE {ks}.events_b (id text PRIMARY KEY, v int)"),
        format!(
            "CREATE TABLE {ks}.fb_orders (order_id text PRIMARY KEY, quantity int, amount double, express boolean, \
             channel text, city text, line_quantities list<int>)"
        ),
    ] {
        session.query_unpaged(table, &[]).await.expect("create table");
    }
    session.await_schema_agreement().await.expect("schema agreement");
    session
}

fn item_payload(i: u64, updated_at_ms: i64) -> Vec<u8> {
    let mut item = serde_json::json!({
        "name": format!("item {i}"),
        "qty": i % 9 + 1,
        "price": (i % 50) as f64 + 0.25,
        "updated_at": updated_at_ms + i as i64,
    });
    if i.is_multiple_of(2) {
        item["owner"] = serde_json::json!(format!("owner-{}", i % 7));
    }
    if i.is_multiple_of(10) {
        item["ttl_s"] = serde_json::json!(3600);
    }
    item.to_string().into_bytes()
}

fn items_records(updated_at_ms: i64) -> Vec<Record> {
    let mut records = Vec::new();
    for i in 0..ITEMS {
        records.push(Record {
            key: Some(format!("item-{i:04}")),
            payload: Some(item_payload(i, updated_at_ms)),
            headers: vec![("tenant".into(), format!("t{}", i % 3))],
        });
    }
    for j in 0..FILTERED {
        records.push(Record {
            key: Some(format!("test-{j}")),
            payload: Some(br#"{"test": true, "name": "x", "qty": 1, "price": 1.0}"#.to_vec()),
            headers: vec![],
        });
    }
    for j in 0..FAILING {
        // No price: the computed `total` cannot be evaluated.
        records.push(Record {
            key: Some(format!("noprice-{j}")),
            payload: Some(br#"{"name": "x", "qty": 1}"#.to_vec()),
            headers: vec![],
        });
    }
    for i in 0..TOMBSTONES {
        records.push(Record {
            key: Some(format!("item-{i:04}")),
            payload: None,
            headers: vec![],
        });
    }
    for i in TOMBSTONES..TOMBSTONES + MARKERS {
        let mut marker = serde_json::json!({"op": "delete"});
        if i.is_multiple_of(2) {
            marker["owner"] = serde_json::json!(format!("owner-{}", i % 7));
        }
        records.push(Record {
            key: Some(format!("item-{i:04}")),
            payload: Some(marker.to_string().into_bytes()),
            headers: vec![],
        });
    }
    records
}

fn proto_records(pool: &DescriptorPool) -> Vec<Record> {
    let order = pool.get_message_by_name("shop.v1.Order").expect("Order");
    let address = pool.get_message_by_name("shop.v1.Address").expect("Address");
    let mut records = Vec::new();
    for i in 0..PROTO_ROWS {
        let mut message = DynamicMessage::new(order.clone());
        message.set_field_by_name("id", PbValue::String(format!("p-{i:04}")));
        message.set_field_by_name("qty", PbValue::I32(i as i32));
        let mut addr = DynamicMessage::new(address.clone());
        addr.set_field_by_name("city", PbValue::String(format!("city-{}", i % 5)));
        message.set_field_by_name("address", PbValue::Message(addr));
        message.set_field_by_name("kind", PbValue::EnumNumber((i % 3) as i32));
        if i.is_multiple_of(4) {
            message.set_field_by_name("note", PbValue::String(format!("note {i}")));
        }
        records.push(Record {
            key: None,
            payload: Some(prost::Message::encode_to_vec(&message)),
            headers: vec![],
        });
    }
    for j in 0..PROTO_GARBAGE {
        records.push(Record {
            key: None,
            payload: Some(vec![0xff, 0xff, 0xff, j as u8]),
            headers: vec![],
        });
    }
    records
}

fn lines_records() -> Vec<Record> {
    (0..LINES)
        .map(|i| Record {
            key: Some(format!("line-{i:03}")),
            payload: Some(format!("log line {i}: ünïcode ok").into_bytes()),
            headers: vec![],
        })
        .collect()
}

fn events_records() -> Vec<Record> {
    let mut records: Vec<Record> = (0..EVENTS)
        .map(|i| Record {
            key: None,
            payload: Some(
                serde_json::json!({"id": format!("e-{i:03}"), "v": i, "kind": if i % 2 == 0 { "events_a" } else { "events_b" }})
                    .to_string()
                    .into_bytes(),
            ),
            headers: vec![],
        })
        .collect();
    for j in 0..UNKNOWN_KIND {
        records.push(Record {
            key: None,
            payload: Some(format!(r#"{{"id": "x-{j}", "v": 1, "kind": "events_c"}}"#).into_bytes()),
            headers: vec![],
        });
    }
    records
}

async fn wait_all_committed(names: &Names, topics: &Topics) {
    let start = std::time::Instant::now();
    for (topic, suffix) in topics
        .all()
        .into_iter()
        .zip(["items", "proto", "lines", "events", "flat"])
    {
        loop {
            let group = format!("{}-{suffix}", names.group);
            let (committed, end) = devkit::committed_and_end(&group, topic, 1).expect("offsets");
            if end > 0 && committed == end {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "`{topic}`: committed {committed} of {end} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn dead_letter_codes(topic: &str, expected: usize) -> BTreeMap<String, usize> {
    let letters = devkit::read_topic(topic, expected, Duration::from_secs(60)).expect("read dead letters");
    assert_eq!(letters.len(), expected, "dead letters in `{topic}`");
    let mut codes = BTreeMap::new();
    for letter in letters {
        assert!(!letter.headers["shardgate.reason"].is_empty());
        *codes
            .entry(letter.headers["shardgate.reason.code"].clone())
            .or_insert(0) += 1;
    }
    codes
}

type ItemRow = (
    String,
    Option<String>,
    Option<i32>,
    Option<f64>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i32>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_and_mapping_feature_lands_exactly() {
    let _lock = gateway_lock().await;
    let names = Names::new("mapping");
    let topics = Topics::new(&names);
    let session = create_tables(&names).await;
    for topic in topics.all() {
        devkit::create_topic(topic, 1).await.expect("create topic");
    }
    let proto_file = names.dir.join("order.proto");
    std::fs::write(&proto_file, ORDER_PROTO).expect("write proto");
    let pool = DescriptorPool::from_file_descriptor_set(protox::compile([&proto_file], [&names.dir]).expect("compile"))
        .expect("descriptor pool");

    let updated_at_ms = chrono::Utc::now().timestamp_millis() - 600_000;
    devkit::produce_records(&topics.items, items_records(updated_at_ms)).expect("produce items");
    devkit::produce_records(&topics.proto, proto_records(&pool)).expect("produce protobuf");
    devkit::produce_records(&topics.lines, lines_records()).expect("produce lines");
    devkit::produce_records(&topics.events, events_records()).expect("produce events");
    let flat_records = (0..FLAT_ROWS)
        .map(devkit::order_event_flatbuffer)
        .chain((0..FLAT_GARBAGE).map(|j| vec![0xde, 0xad, 0xbe, 0xef, j as u8]))
        .map(|payload| Record {
            key: None,
            payload: Some(payload),
            headers: vec![],
        });
    devkit::produce_records(&topics.flat, flat_records).expect("produce flatbuffers");

    let config = names.dir.join("gateway.toml");
    std::fs::write(
        &config,
        devkit::gateway_toml(&routes_toml(&names, &topics, &proto_file)),
    )
    .expect("write config");
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");
    wait_all_committed(&names, &topics).await;
    let filtered = devkit::scrape_metric_where(
        devkit::ADMIN_LISTEN,
        "shardgate_messages_filtered_total",
        &[("source", "items")],
    )
    .expect("filtered metric");
    assert!(gateway.stop().expect("stop").success());
    assert_eq!(filtered as u64, FILTERED, "filtered messages counted");

    // JSON route, first target: items 100.. remain (0..50 tombstoned, 50..100 marked deleted).
    let ks = &names.keyspace;
    let mut rows = session
        .query_iter(
            format!("SELECT id, name, qty, total, tenant, src, pos, writetime(name), ttl(name) FROM {ks}.items"),
            &[],
        )
        .await
        .expect("select items")
        .rows_stream::<ItemRow>()
        .expect("typed rows");
    let mut seen = 0;
    while let Some((id, name, qty, total, tenant, src, pos, writetime, ttl)) = rows.try_next().await.expect("row") {
        let i: u64 = id
            .strip_prefix("item-")
            .unwrap_or_else(|| panic!("unexpected row {id}"))
            .parse()
            .expect("item number");
        assert!(i >= TOMBSTONES + MARKERS, "item {i} should be deleted");
        assert_eq!(name.as_deref(), Some(format!("item {i}").as_str()));
        let q = (i % 9 + 1) as i32;
        assert_eq!(qty, Some(q));
        assert_eq!(
            total,
            Some(f64::from(q) * ((i % 50) as f64 + 0.25)),
            "computed total of {id}"
        );
        assert_eq!(tenant.as_deref(), Some(format!("t{}", i % 3).as_str()));
        assert_eq!(src.as_deref(), Some(topics.items.as_str()));
        assert_eq!(pos, Some(i as i64), "offset of {id}");
        assert_eq!(writetime, Some((updated_at_ms + i as i64) * 1000), "write time of {id}");
        if i.is_multiple_of(10) {
            assert!(ttl.is_some_and(|t| t > 3000 && t <= 3600), "ttl of {id}: {ttl:?}");
        } else {
            assert_eq!(ttl, None, "no ttl on {id}");
        }
        seen += 1;
    }
    assert_eq!(seen, ITEMS - TOMBSTONES - MARKERS);

    // Second target: even items with an owner; tombstones cannot key it (owner is in the
    // payload), markers with an owner delete from it.
    let by_owner = devkit::count_rows::<String>(&session, ks, "items_by_owner", "id")
        .await
        .expect("count");
    let expected_by_owner = (0..ITEMS)
        .filter(|i| i.is_multiple_of(2) && !(TOMBSTONES..TOMBSTONES + MARKERS).contains(i))
        .count() as u64;
    assert_eq!(by_owner, expected_by_owner);
    assert_eq!(
        dead_letter_codes(&format!("{}.dl", topics.items), FAILING as usize),
        BTreeMap::from([("expression_failed".to_string(), FAILING as usize)])
    );

    // Protobuf route.
    let mut rows = session
        .query_iter(format!("SELECT id, qty, city, kind, note FROM {ks}.proto_items"), &[])
        .await
        .expect("select")
        .rows_stream::<(String, Option<i32>, Option<String>, Option<String>, Option<String>)>()
        .expect("typed rows");
    let mut seen = 0;
    while let Some((id, qty, city, kind, note)) = rows.try_next().await.expect("row") {
        let i: u64 = id.strip_prefix("p-").expect("proto id").parse().expect("number");
        assert_eq!(qty, Some(i as i32));
        assert_eq!(city.as_deref(), Some(format!("city-{}", i % 5).as_str()));
        let kinds = ["KIND_UNSPECIFIED", "RETAIL", "WHOLESALE"];
        assert_eq!(kind.as_deref(), Some(kinds[(i % 3) as usize]));
        let expected_note = i.is_multiple_of(4).then(|| format!("note {i}"));
        assert_eq!(note, expected_note, "an unset optional field leaves its column unset");
        seen += 1;
    }
    assert_eq!(seen, PROTO_ROWS);
    assert_eq!(
        dead_letter_codes(&format!("{}.dl", topics.proto), PROTO_GARBAGE as usize),
        BTreeMap::from([("not_protobuf".to_string(), PROTO_GARBAGE as usize)])
    );

    // Raw text route.
    let mut rows = session
        .query_iter(format!("SELECT id, body, at FROM {ks}.raw_lines"), &[])
        .await
        .expect("select")
        .rows_stream::<(String, Option<String>, Option<scylla::value::CqlTimestamp>)>()
        .expect("typed rows");
    let mut seen = 0;
    while let Some((id, body, at)) = rows.try_next().await.expect("row") {
        let i: u64 = id.strip_prefix("line-").expect("line id").parse().expect("number");
        assert_eq!(body, Some(format!("log line {i}: ünïcode ok")));
        assert!(at.is_some_and(|t| t.0 > updated_at_ms), "message time of {id}");
        seen += 1;
    }
    assert_eq!(seen, LINES);

    // Table per message.
    for (table, parity) in [("events_a", 0), ("events_b", 1)] {
        let mut rows = session
            .query_iter(format!("SELECT id, v FROM {ks}.{table}"), &[])
            .await
            .expect("select")
            .rows_stream::<(String, Option<i32>)>()
            .expect("typed rows");
        let mut seen = 0;
        while let Some((id, v)) = rows.try_next().await.expect("row") {
            let v = v.expect("v");
            assert_eq!(id, format!("e-{v:03}"));
            assert_eq!(v % 2, parity, "{id} in {table}");
            seen += 1;
        }
        assert_eq!(seen, EVENTS / 2, "rows in {table}");
    }
    assert_eq!(
        dead_letter_codes(&format!("{}.dl", topics.events), UNKNOWN_KIND as usize),
        BTreeMap::from([("unknown_table".to_string(), UNKNOWN_KIND as usize)])
    );

    // FlatBuffers route.
    let mut rows = session
        .query_iter(
            format!("SELECT order_id, quantity, amount, express, channel, city, line_quantities FROM {ks}.fb_orders"),
            &[],
        )
        .await
        .expect("select")
        .rows_stream::<(
            String,
            Option<i32>,
            Option<f64>,
            Option<bool>,
            Option<String>,
            Option<String>,
            Option<Vec<i32>>,
        )>()
        .expect("typed rows");
    let mut seen = 0;
    while let Some((id, quantity, amount, express, channel, city, lines)) = rows.try_next().await.expect("row") {
        let i: u64 = id.strip_prefix("fb-").expect("flat id").parse().expect("number");
        assert_eq!(quantity, Some((i % 10) as i32));
        assert_eq!(amount, Some(i as f64 + 0.5));
        assert_eq!(express, Some(i.is_multiple_of(3)));
        assert_eq!(channel.as_deref(), Some(["Web", "Store", "Phone"][(i % 3) as usize]));
        assert_eq!(city, Some(devkit::expected_order(i).city));
        assert_eq!(lines, Some(vec![1, (i % 4) as i32]));
        seen += 1;
    }
    assert_eq!(seen, FLAT_ROWS);
    assert_eq!(
        dead_letter_codes(&format!("{}.dl", topics.flat), FLAT_GARBAGE as usize),
        BTreeMap::from([("not_flatbuffer".to_string(), FLAT_GARBAGE as usize)])
    );
}
