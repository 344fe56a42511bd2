//! Per-row cost of the mapping stage: JSON decode of a sample order message, field lookup and
//! coercion of eight columns to their CQL types (text, bigint, decimal, int, timestamp, boolean,
//! set<text>), and the write timestamp. This is the core-side CPU a Kafka row costs before the
//! driver serializes it. Assumes the demo's message shape (~230 bytes of JSON). A second case
//! adds a CEL filter and a computed column, the price of expressions per message. `rollup`
//! measures what a stream job adds per mapped message on the core.

// Tooling and tests: a failed expectation is the tool or test failing, never a gateway core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use scylla::cluster::metadata::{CollectionType, ColumnKind, ColumnType, NativeType};
use shardgate::bridge::kafka::ack::KafkaOrigin;
use shardgate::bridge::message::SourceMessage;
use shardgate::config::Config;
use shardgate::devkit;
use shardgate::mapping::{write_timestamp_us, Envelope, RouteMapper};
use shardgate::sink::scylla::bound::RowBuilder;
use shardgate::sink::scylla::TableSchema;

fn orders_schema() -> TableSchema {
    let native = ColumnType::Native;
    let columns = [
        ("order_id", native(NativeType::Text), ColumnKind::PartitionKey),
        ("customer_id", native(NativeType::BigInt), ColumnKind::Regular),
        ("city", native(NativeType::Text), ColumnKind::Regular),
        ("amount", native(NativeType::Decimal), ColumnKind::Regular),
        ("quantity", native(NativeType::Int), ColumnKind::Regular),
        ("placed_at", native(NativeType::Timestamp), ColumnKind::Regular),
        ("express", native(NativeType::Boolean), ColumnKind::Regular),
        (
            "tags",
            ColumnType::Collection {
                frozen: false,
                typ: CollectionType::Set(Box::new(native(NativeType::Text))),
            },
            ColumnKind::Regular,
        ),
    ];
    TableSchema {
        columns: columns.into_iter().map(|(n, t, k)| (n.to_string(), (t, k))).collect(),
        partition_key: vec!["order_id".into()],
        clustering_key: vec![],
    }
}

/// `orders5`: issue 13's 5-column orders (text key, bigint, decimal, int, timestamp).
fn orders5_schema() -> TableSchema {
    let native = ColumnType::Native;
    let columns = [
        ("order_id", native(NativeType::Text), ColumnKind::PartitionKey),
        ("customer_id", native(NativeType::BigInt), ColumnKind::Regular),
        ("amount", native(NativeType::Decimal), ColumnKind::Regular),
        ("quantity", native(NativeType::Int), ColumnKind::Regular),
        ("placed_at", native(NativeType::Timestamp), ColumnKind::Regular),
    ];
    TableSchema {
        columns: columns.into_iter().map(|(n, t, k)| (n.to_string(), (t, k))).collect(),
        partition_key: vec!["order_id".into()],
        clustering_key: vec![],
    }
}

fn envelope<'a>(key: &'a str, payload: &'a str, position: i64) -> Envelope<'a> {
    Envelope {
        key: Some(key.as_bytes()),
        payload: Some(payload.as_bytes()),
        headers: &[],
        source: "orders",
        subject: None,
        partition: Some(0),
        position,
        timestamp_ms: Some(1_700_000_000_000),
    }
}

fn mapping(c: &mut Criterion) {
    let routes = devkit::orders_route_toml("orders", "ks", "in", "g", "dl");
    let config = Config::parse(&devkit::gateway_toml(&routes), "bench").expect("bench config");
    let plain = RouteMapper::new(&config.routes[0], &[orders_schema()]).expect("mapper");
    let mut with_expressions = config.routes[0].clone();
    with_expressions.filter = Some("msg.quantity > 0 && msg.customer.address.city != 'nowhere'".into());
    with_expressions.targets[0].columns.retain(|c| c.column != "express");
    with_expressions.targets[0]
        .columns
        .push(shardgate::config::ColumnMapping {
            column: "express".into(),
            field: shardgate::config::FieldRef::Expr("msg.quantity >= 3".into()),
        });
    let computed = RouteMapper::new(&with_expressions, &[orders_schema()]).expect("mapper");
    let messages: Vec<(String, String)> = (0..1024).map(devkit::order_message).collect();

    let mut group = c.benchmark_group("mapping");
    group.throughput(Throughput::Elements(messages.len() as u64));
    for (name, mapper) in [
        ("json_order_to_bound_row", &plain),
        ("json_order_filter_and_computed_column", &computed),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || (),
                |()| {
                    for (offset, (key, payload)) in messages.iter().enumerate() {
                        let offset = offset as i64;
                        let timestamp_us = write_timestamp_us(Some(1_700_000_000_000), offset);
                        let rows = mapper
                            .map(&envelope(key, payload, offset), timestamp_us)
                            .expect("valid row");
                        std::hint::black_box(rows);
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    // Straight into serialized cells (what a route writes): the 8-column orders and the
    // 5-column ones, beside the 5-column ones into CQL values.
    let routes5 = devkit::orders5_route_toml("orders", "ks", "in", "g", "dl");
    let config5 = Config::parse(&devkit::gateway_toml(&routes5), "bench").expect("bench config");
    let orders5 = RouteMapper::new(&config5.routes[0], &[orders5_schema()]).expect("mapper");
    let messages5: Vec<(String, String)> = (0..1024).map(devkit::order5_message).collect();
    group.bench_function("json_order5_to_bound_row", |b| {
        b.iter(|| {
            for (offset, (key, payload)) in messages5.iter().enumerate() {
                let offset = offset as i64;
                let timestamp_us = write_timestamp_us(Some(1_700_000_000_000), offset);
                let rows = orders5
                    .map(&envelope(key, payload, offset), timestamp_us)
                    .expect("valid row");
                std::hint::black_box(rows);
            }
        })
    });
    for (name, mapper, messages) in [
        ("json_order_to_cells", &plain, &messages),
        ("json_order5_to_cells", &orders5, &messages5),
    ] {
        let mut builder = RowBuilder::for_rows(messages.len());
        let mut rows = Vec::with_capacity(messages.len());
        group.bench_function(name, |b| {
            b.iter(|| {
                rows.clear();
                for (offset, (key, payload)) in messages.iter().enumerate() {
                    let offset = offset as i64;
                    let timestamp_us = write_timestamp_us(Some(1_700_000_000_000), offset);
                    mapper
                        .map_cells(&envelope(key, payload, offset), timestamp_us, &mut builder, &mut rows)
                        .expect("valid row");
                }
                std::hint::black_box(builder.seal());
            })
        });
    }
    group.finish();
}

/// A stream rollup's cost per ingested message on the core (`job::tap`): the mapped row turned
/// into the job's row (only the columns it reads converted), folded into its hour's window —
/// what a route with a stream job pays beside its own mapping and write. The job is the bench's
/// `kafka-5-rollup` one: orders and items per hour.
fn rollup(c: &mut Criterion) {
    let routes = devkit::orders_route_toml("orders", "ks", "in", "g", "dl");
    let job = devkit::hourly_rollup_job_toml("hourly", "ks");
    let config = Config::parse(
        &format!("{}\n{job}", devkit::ingest_gateway_toml(&routes, 2048, 64)),
        "bench",
    )
    .expect("bench config");
    let mapper = RouteMapper::new(&config.routes[0], &[orders_schema()]).expect("mapper");
    let rollup = shardgate::job::tap::Rollup::new(&config.jobs[0], 1).expect("rollup");
    let tap = rollup.tap("orders", "in", &mapper).expect("columns").expect("a tap");
    let (completions, _held) = crossbeam_channel::bounded(1);
    let orders: Vec<(String, String)> = (0..1024).map(devkit::order_message).collect();
    let message = |offset: i64| {
        let (key, payload) = &orders[offset as usize % orders.len()];
        SourceMessage {
            position: offset,
            timestamp_ms: Some(1_700_000_000_000),
            write_timestamp_us: None,
            key: Some(Bytes::from(key.clone())),
            headers: Vec::new(),
            payload: Some(Bytes::from(payload.clone())),
            origin: Box::new(KafkaOrigin {
                partition: 0,
                epoch: 1,
                offset,
                completions: completions.clone(),
            }),
        }
    };
    // The partition's first message starts it loading; installed fresh, it folds from there.
    let first = message(0);
    tap.fold(0, &first, Some(&mapper.map(&first.envelope("in"), 1).expect("mapped")));
    rollup.install_fresh();
    let mut next = 1;
    let mut group = c.benchmark_group("rollup");
    group.throughput(Throughput::Elements(orders.len() as u64));
    group.bench_function("fold_order_per_message", |b| {
        b.iter_batched(
            || {
                let batch: Vec<_> = (next..next + orders.len() as i64)
                    .map(|offset| {
                        let message = message(offset);
                        let rows = mapper.map(&message.envelope("in"), 1).expect("mapped");
                        (message, rows)
                    })
                    .collect();
                next += orders.len() as i64;
                batch
            },
            |batch| {
                for (message, rows) in &batch {
                    tap.fold(0, message, Some(rows));
                }
                batch
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, mapping, rollup);
criterion_main!(benches);
