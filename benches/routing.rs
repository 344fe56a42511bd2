//! The per-row cost of shard-native routing and of the ingest hot path, without a database:
//! - `routing/owner_core_*`: token → primary replica → shard → owner core over a ring of 3 nodes
//!   × 256 vnodes (ScyllaDB-like: 8 shards per node, msb_ignore 12; Cassandra-like: 1 shard);
//!   target ≤ 150 ns per row;
//! - `routing/client_token`: the shard-aware client's token for a bigint partition key (driver
//!   serialization + the driver's Murmur3);
//! - `ingest/decode_and_bind`: what the gRPC server does with a 500-row `WriteRequest` of
//!   100-byte rows: decode it with each row kept encoded (`wire::raw`, from a shared buffer as
//!   tonic hands it over), then read every row's values straight into serialized CQL cells
//!   (what the write engine sends); `ingest/full_decode_and_bind`: the same with every value
//!   decoded by prost first (the path of a row that is not plain protobuf);
//!   `ingest/flat_decode_and_bind`: the same rows as a FlatBuffers `RowBatch` (verify, read,
//!   bind);
//! - `routing/batches_by_replica_shard_{1,48}`: cutting a core's 512 placed rows (64 bytes
//!   each) into UNLOGGED batches of at most
//!   64 rows of one (replica, shard): all rows on one (Cassandra, a single node) or spread over
//!   48 (3 ScyllaDB nodes of 16 shards); each iteration takes its own copy of the rows, made
//!   outside the timing;
//! - `mesh/forward_hop`: running a task that carries a 500-row batch on another core through
//!   `runtime::mesh` (the same inbox, `spawn_local` and reply every forward uses) and awaiting
//!   its answer.

// Tooling and tests: a failed expectation is the tool or test failing, never a gateway core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use scylla::cluster::metadata::{CollectionType, ColumnType, NativeType};
use shardgate::client::row_token;
use shardgate::devkit;
use shardgate::ingest::service::{bind_encoded_row, bind_row};
use shardgate::runtime::mesh::{self, Mesh};
use shardgate::sink::scylla::bound::{RowBuilder, RowSpan, SerializedRow};
use shardgate::topology::{NodeShards, Ownership};
use shardgate::wire::flat::{decode_row_batch, encode_row_batch};
use shardgate::wire::proto::{RowBatch, WriteRequest};

const TOKENS: usize = 4096;

fn tokens() -> Vec<i64> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    (0..TOKENS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as i64
        })
        .collect()
}

fn ownership(shards: u16) -> Ownership {
    let tokens = tokens();
    let nodes: BTreeMap<u128, NodeShards> = (1..=3).map(|id| (id, NodeShards { shards, msb_ignore: 12 })).collect();
    let ring: Vec<(i64, u128)> = tokens
        .iter()
        .take(768)
        .enumerate()
        .map(|(i, t)| (*t, (i % 3 + 1) as u128))
        .collect();
    Ownership::new(2, &ring, &nodes)
}

fn routing(c: &mut Criterion) {
    let probes: Vec<i64> = tokens().into_iter().map(|t| t.rotate_left(17)).collect();
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(probes.len() as u64));
    for (name, shards) in [("owner_core_scylla_8_shards", 8), ("owner_core_cassandra", 1)] {
        let o = ownership(shards);
        group.bench_function(name, |b| {
            b.iter(|| probes.iter().map(|&t| o.owner_core(t)).sum::<usize>())
        });
    }
    let key = vec![("id".to_string(), ColumnType::Native(NativeType::BigInt))];
    let columns = devkit::event_columns();
    let rows: Vec<_> = (0..512).map(devkit::event_row).collect();
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function("client_token", |b| {
        b.iter(|| {
            rows.iter()
                .filter_map(|r| row_token(&key, &columns, r))
                .fold(0i64, i64::wrapping_add)
        })
    });
    group.finish();
}

/// The bound rows of a batch, sharing its sealed buffer (as the ingest service keeps them).
fn sealed_rows(builder: &mut RowBuilder, spans: Vec<RowSpan>) -> Vec<SerializedRow> {
    let sealed = builder.seal();
    spans
        .into_iter()
        .map(|span| SerializedRow::new(&sealed, span))
        .collect()
}

fn decode_and_bind(c: &mut Criterion) {
    let batch = RowBatch {
        table: "ks.events".into(),
        columns: devkit::event_columns(),
        rows: (0..500).map(devkit::event_row).collect(),
        timestamp_us: 0,
    };
    let flat = encode_row_batch(&batch);
    let bytes = WriteRequest {
        batch: Some(batch),
        ..Default::default()
    }
    .encode_to_vec();
    let types = vec![
        ColumnType::Native(NativeType::BigInt),
        ColumnType::Native(NativeType::Text),
        ColumnType::Native(NativeType::Double),
        ColumnType::Native(NativeType::Timestamp),
        ColumnType::Collection {
            frozen: false,
            typ: CollectionType::List(Box::new(ColumnType::Native(NativeType::Int))),
        },
    ];
    let names: Vec<String> = (0..types.len()).map(|i| format!("c{i}")).collect();
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(500));
    let mut builder = RowBuilder::default();
    let shared = bytes::Bytes::from(bytes.clone());
    group.bench_function("decode_and_bind", |b| {
        b.iter(|| {
            let request = shardgate::wire::server_view::WriteRequest::decode(shared.clone()).expect("decode");
            let batch = request.batch.expect("batch");
            let spans = batch
                .rows
                .iter()
                .filter_map(|row| bind_encoded_row(&names, &types, &[0], row, 1, &mut builder).ok())
                .collect::<Vec<_>>();
            sealed_rows(&mut builder, spans)
        })
    });
    group.bench_function("full_decode_and_bind", |b| {
        b.iter(|| {
            let request = WriteRequest::decode(bytes.as_slice()).expect("decode");
            let batch = request.batch.expect("batch");
            let spans = batch
                .rows
                .iter()
                .filter_map(|row| bind_row(&names, &types, &[0], row, 1, &mut builder).ok())
                .collect::<Vec<_>>();
            sealed_rows(&mut builder, spans)
        })
    });
    group.bench_function("flat_decode_and_bind", |b| {
        b.iter(|| {
            let batch = decode_row_batch(&flat).expect("verified");
            let spans = batch
                .rows
                .iter()
                .filter_map(|row| bind_row(&names, &types, &[0], row, 1, &mut builder).ok())
                .collect::<Vec<_>>();
            sealed_rows(&mut builder, spans)
        })
    });
    group.finish();
}

/// What the bench moves per row in place of a placed row: 64 bytes.
type PlacedRowBytes = [u64; 8];

fn batching(c: &mut Criterion) {
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(512));
    for groups in [1u32, 48] {
        let rows: Vec<(shardgate::topology::ReplicaShard, PlacedRowBytes)> = (0..512u64)
            .map(|i| {
                let spread = u32::try_from(i).unwrap() % groups;
                ((Some(spread / 16), spread % 16), [i; 8])
            })
            .collect();
        group.bench_function(format!("batches_by_replica_shard_{groups}"), |b| {
            b.iter_batched(
                || rows.clone(),
                |rows| shardgate::sink::scylla::writer::batches_by_replica_shard(rows, 64),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn mesh_hop(c: &mut Criterion) {
    let rows: Vec<_> = (0..500).map(devkit::event_row).collect();
    let (mesh, mut inboxes) = Mesh::new(1);
    let inbox = inboxes.pop().expect("one inbox");
    let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
    let owner = glommio::LocalExecutorBuilder::default()
        .name("owner")
        .io_memory(512 * 1024)
        .spawn(move || async move {
            mesh::serve(inbox, async {
                let _ = stop_rx.await;
            })
            .await;
        })
        .expect("owner executor");
    let mut group = c.benchmark_group("mesh");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function("forward_hop", |b| {
        b.iter_batched(
            || rows.clone(),
            |batch| {
                futures::executor::block_on(mesh.run_on(0, move || async move { batch.len() })).expect("owner alive")
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
    let _ = stop_tx.send(());
    let _ = owner.join();
}

criterion_group!(benches, routing, batching, decode_and_bind, mesh_hop);
criterion_main!(benches);
