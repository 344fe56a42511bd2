//! Spool append on the machine's disk through glommio DMA files: one group commit (write +
//! sync) of 1, 64 and 512 records of 256 bytes. The time per iteration is the latency of one
//! durable group commit (its fsync included); throughput is in records. Completed records are
//! released after each commit so segments roll and are removed as in steady state.
//!
//! Where the files go: `$SHARDGATE_SPOOL_BENCH_DIR`, default the system temp dir (use a
//! directory on the NVMe the spool will run on; tmpfs turns O_DIRECT off and measures memory).

// Tooling and tests: a failed expectation is the tool or test failing, never a gateway core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
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
                        let records: Vec<&[u8]> = (0..batch).map(|_| record.as_slice()).collect();
                        let started = Instant::now();
                        for _ in 0..iters {
                            let ids = spool.append(&records).await.expect("append");
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

criterion_group!(benches, spool_append);
criterion_main!(benches);
