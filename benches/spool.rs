//! Spool append on the machine's disk through glommio DMA files: one group commit (write +
//! sync) of 1, 64 and 512 records of 256 bytes, framed beforehand as callers frame them. The
//! time per iteration is the latency of one durable group commit (its fsync included);
//! throughput is in records. Completed records are released after each commit so segments roll
//! and are removed as in steady state.
//!
//! In memory, per record (no disk): encoding a batch of 512 Kafka orders (~150-byte JSON, three
//! source coordinates) as spool records straight into their frames, as a spooled route does
//! before its append; and decoding them back from one read buffer into messages whose payloads
//! are views of it, as the drain does.
//!
//! Where the files go: `$SHARDGATE_SPOOL_BENCH_DIR`, default the system temp dir (use a
//! directory on the NVMe the spool will run on; tmpfs turns O_DIRECT off and measures memory).

// Tooling and tests: a failed expectation is the tool or test failing, never a gateway core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardgate::spool::frame::{self, Framed};
use shardgate::spool::record::{self, Record, RouteEncoder};
use shardgate::spool::storage::DmaStorage;
use shardgate::spool::{Spool, SpoolLimits};

fn bench_dir() -> std::path::PathBuf {
    let base = std::env::var_os("SHARDGATE_SPOOL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("shardgate-spool-bench-{}", std::process::id()))
}

fn spool_append(c: &mut Criterion) {
    let dir = bench_dir();
    let record = vec![0x5a_u8; 256];
    let mut group = c.benchmark_group("spool");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for batch in [1_usize, 64, 512] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("group_commit_{batch}_records_of_256_bytes"), |b| {
            let dir = dir.join(batch.to_string());
            let record = record.clone();
            b.iter_custom(move |iters| {
                let dir = dir.clone();
                let record = record.clone();
                glommio::LocalExecutorBuilder::default()
                    .spawn(move || async move {
                        let _ = std::fs::remove_dir_all(&dir);
                        let storage = DmaStorage::new(dir.clone()).expect("bench dir");
                        let limits = SpoolLimits {
                            segment_bytes_max: 64 << 20,
                            cap_bytes: 1 << 40,
                        };
                        let (mut spool, _, _) = Spool::open(storage, limits).await.expect("open");
                        let mut records = Framed::default();
                        (0..batch).for_each(|_| records.push(&record));
                        let started = Instant::now();
                        for _ in 0..iters {
                            let ids = spool.append(&[&records]).await.expect("append");
                            for id in ids {
                                spool.complete(id).await;
                            }
                        }
                        let elapsed = started.elapsed();
                        spool.close().await;
                        let _ = std::fs::remove_dir_all(&dir);
                        elapsed
                    })
                    .expect("executor")
                    .join()
                    .expect("bench thread")
            })
        });
    }
    group.finish();
}

/// 512 orders as a spooled Kafka route encodes them.
fn encode_orders(encoder: &mut RouteEncoder, payloads: &[Vec<u8>]) -> Framed {
    let key_and_payload_bytes = payloads.iter().map(|p| p.len() + b"customer-17".len()).sum();
    let mut framed = record::route_batch(payloads.len(), key_and_payload_bytes);
    for (offset, payload) in payloads.iter().enumerate() {
        let offset_text = offset.to_string();
        let coordinates = [
            ("shardgate.source.topic", "bench.orders"),
            ("shardgate.source.partition", "3"),
            ("shardgate.source.offset", offset_text.as_str()),
        ];
        encoder.encode(
            "orders",
            offset as i64,
            Some(1_700_000_000_000),
            1_700_000_000_000_000 + offset as i64,
            Some(b"customer-17"),
            Some(payload),
            std::iter::empty(),
            coordinates.into_iter(),
            Some(3),
            &mut framed,
        );
    }
    framed
}

fn spool_records(c: &mut Criterion) {
    let payloads: Vec<Vec<u8>> = (0..512)
        .map(|i| {
            format!(
                r#"{{"order_id":{i},"customer":"customer-{}","amount":{}.25,"quantity":{},"ts":1700000000{i:03}}}"#,
                i % 97,
                i * 3,
                i % 9
            )
            .into_bytes()
        })
        .collect();
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Elements(payloads.len() as u64));
    group.bench_function("encode_512_route_records", |b| {
        let mut encoder = RouteEncoder::default();
        b.iter(|| encode_orders(&mut encoder, &payloads))
    });
    let framed = encode_orders(&mut RouteEncoder::default(), &payloads);
    let read = Bytes::copy_from_slice(framed.bytes());
    group.bench_function("decode_512_route_records_as_views", |b| {
        b.iter(|| {
            let (bodies, _) = frame::decode(&read);
            bodies
                .into_iter()
                .map(|body| match record::decode(&read.slice_ref(body)) {
                    Ok(Record::Route { message, .. }) => message.payload.map_or(0, |p| p.len()),
                    _ => panic!("a route record"),
                })
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, spool_append, spool_records);
criterion_main!(benches);
