//! The per-row cost of the query path on the gateway's side of the wire, without a database:
//! - `query/page_to_proto`: a 5,000-row page of the sample events (bigint, text, double,
//!   timestamp, list<int>) as the driver hands it over (`CqlValue`s) turned into typed `Value`
//!   rows and encoded as a `ScanResponse`, what every scan page and `Get` does per row;
//! - `query/page_decode`: the shard-aware client's side, decoding that `ScanResponse`;
//! - `query/page_token`: sealing and opening a page token (HMAC-SHA256 over a request
//!   fingerprint and a 100-byte paging state), once per page.

// Tooling and tests: a failed expectation is the tool or test failing, never a gateway core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use scylla::value::{CqlTimestamp, CqlValue};
use shardgate::query::token::{FingerprintBuilder, Keys, Position};
use shardgate::wire::convert::from_cql;
use shardgate::wire::proto::{ResultSet, Row, ScanResponse};

const PAGE_ROWS: usize = 5_000;

/// Event `i` as the driver deserializes it (`scylla::value::Row`'s columns).
fn driver_row(i: i64) -> Vec<Option<CqlValue>> {
    vec![
        Some(CqlValue::BigInt(i)),
        Some(CqlValue::Text(format!("event-{i:09}-Porto"))),
        Some(CqlValue::Double(i as f64 * 0.5)),
        Some(CqlValue::Timestamp(CqlTimestamp(1_767_225_600_000 + i))),
        Some(CqlValue::List(vec![
            CqlValue::Int((i % 7) as i32),
            CqlValue::Int((i % 11) as i32),
        ])),
    ]
}

fn page(rows: &[Vec<Option<CqlValue>>]) -> ScanResponse {
    ScanResponse {
        split: 3,
        page: Some(ResultSet {
            columns: Vec::new(),
            rows: rows
                .iter()
                .map(|row| Row {
                    values: row.iter().map(|c| from_cql(c.as_ref())).collect(),
                })
                .collect(),
            next_page_token: vec![0; 120],
        }),
        split_done: false,
        splits_total: 6,
    }
}

fn query(c: &mut Criterion) {
    let rows: Vec<_> = (0..PAGE_ROWS as i64).map(driver_row).collect();
    let mut group = c.benchmark_group("query");
    group.throughput(Throughput::Elements(PAGE_ROWS as u64));
    group.bench_function("page_to_proto", |b| {
        b.iter(|| page(std::hint::black_box(&rows)).encode_to_vec())
    });
    let encoded = page(&rows).encode_to_vec();
    group.bench_function("page_decode", |b| {
        b.iter(|| ScanResponse::decode(std::hint::black_box(encoded.as_slice())).unwrap())
    });
    group.throughput(Throughput::Elements(1));
    let keys = Keys::new(vec![7; 32]);
    let fingerprint = FingerprintBuilder::new("scan")
        .field(b"shardgate_demo_grpc.events")
        .field(b"id,name,score,at,tags")
        .finish();
    let position = Position {
        range: 1,
        paging_state: vec![0x5a; 100],
    };
    group.bench_function("page_token", |b| {
        b.iter(|| {
            let token = keys.seal(&fingerprint, std::hint::black_box(&position));
            keys.open(&fingerprint, &token).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, query);
criterion_main!(benches);
