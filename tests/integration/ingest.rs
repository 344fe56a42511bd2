//! gRPC ingest API against the real Cassandra: shard-aware and plain clients, per-row errors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardgate::client::{stream_batches, ShardAwareClient};
use shardgate::devkit::{self, Gateway};
use shardgate::ingest::proto::ingest_client::IngestClient;
use shardgate::ingest::proto::value::Kind;
use shardgate::ingest::proto::{
    ErrorCode, Row, RowBatch, Value, WriteFlatRequest, WriteRequest, WriteResponse, WriteStreamRequest,
};
use tonic::transport::Channel;

use crate::{gateway_binary, gateway_lock, Names};

const FORWARDED: &str = shardgate::telemetry::metric::ROWS_FORWARDED;
const WRITTEN: &str = shardgate::telemetry::metric::ROWS_WRITTEN;
const BATCH_ROWS: i64 = 500;
/// RSS ceiling for a gateway with `inflight_rows_per_core_max = 2048` under a producer faster
/// than Cassandra.
const RSS_BYTES_MAX: u64 = 512 << 20;

fn start_gateway(names: &Names) -> Gateway {
    let path = names.dir.join("gateway.toml");
    std::fs::write(&path, devkit::ingest_gateway_toml("", 2048, 64)).expect("write config");
    Gateway::start(&gateway_binary(), &path, &names.dir.join("gateway.log")).expect("gateway starts")
}

/// A fresh `events` table, a gateway serving it, and a shard-aware client.
struct Setup {
    names: Names,
    session: scylla::client::session::Session,
    gateway: Gateway,
    table: String,
    client: ShardAwareClient,
}

async fn setup(test: &str) -> Setup {
    let names = Names::new(test);
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let gateway = start_gateway(&names);
    let table = format!("{}.events", names.keyspace);
    let client = ShardAwareClient::connect(devkit::INGEST_LISTEN, &[&table])
        .await
        .expect("client connects");
    Setup {
        names,
        session,
        gateway,
        table,
        client,
    }
}

fn batches(table: &str, count: i64) -> Vec<RowBatch> {
    devkit::event_batches(table, count, BATCH_ROWS)
}

/// Writes one batch of `columns` holding event 1 to `table` over `client`.
async fn write_event(client: &mut IngestClient<Channel>, table: String, columns: Vec<String>) -> WriteResponse {
    let batch = RowBatch {
        table,
        columns,
        rows: vec![devkit::event_row(1)],
        timestamp_us: 0,
    };
    client
        .write(WriteRequest {
            batch: Some(batch),
            ..Default::default()
        })
        .await
        .expect("write")
        .into_inner()
}

async fn assert_events_exact(names: &Names, count: u64) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let report = devkit::verify_events(&session, &names.keyspace, count)
        .await
        .expect("read back");
    assert_eq!(report.missing, 0, "missing rows; {:?}", report.differences);
    assert_eq!(report.rows, count, "{:?}", report.differences);
    assert_eq!(report.matching, count, "wrong values: {:?}", report.differences);
}

/// Samples the gateway's RSS until stopped; returns the maximum.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let max = AtomicU64::new(0);
        while !stop.load(Ordering::Relaxed) {
            if let Ok(rss) = devkit::rss_bytes(pid) {
                max.fetch_max(rss, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        max.load(Ordering::Relaxed)
    })
}

/// 1,000,000 rows through `WriteStream` from the shard-aware client are all written with exact
/// values, and the gateway forwards none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_client_writes_a_million_rows_with_zero_forwards() {
    let _lock = gateway_lock().await;
    let count = 1_000_000;
    let Setup {
        names,
        gateway,
        table,
        client,
        ..
    } = setup("smart").await;
    assert!(client.cores() >= 1);

    let summary = client.stream(batches(&table, count)).await.expect("stream");
    assert!(
        summary.errors.is_empty(),
        "row errors: {:?}",
        &summary.errors[..summary.errors.len().min(5)]
    );
    assert_eq!(summary.written, count as u64);
    assert_eq!(
        devkit::scrape_metric(devkit::ADMIN_LISTEN, FORWARDED).expect("metrics"),
        0.0,
        "zero forwards"
    );
    assert_eq!(
        devkit::scrape_metric(devkit::ADMIN_LISTEN, WRITTEN).expect("metrics"),
        count as f64
    );
    assert!(gateway.stop().expect("stop").success());
    assert_events_exact(&names, count as u64).await;
}

/// 1,000,000 rows through one `WriteStream` on the shared port from a plain client are all
/// written; rows a core does not own cost one forward each; RSS stays bounded while the
/// producer sends faster than Cassandra accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_writes_a_million_rows_with_one_hop_per_foreign_row() {
    let _lock = gateway_lock().await;
    let count = 1_000_000;
    let Setup {
        names,
        gateway,
        table,
        client: smart,
        ..
    } = setup("plain").await;
    let all = batches(&table, count);
    let columns = devkit::event_columns();
    let cores = smart.cores();

    let stop = Arc::new(AtomicBool::new(false));
    let rss = watch_rss(gateway.pid(), Arc::clone(&stop));
    let summary = stream_batches(smart.shared_client(), all).await.expect("stream");
    stop.store(true, Ordering::Relaxed);
    let rss_max = rss.join().expect("rss thread");

    assert!(
        summary.errors.is_empty(),
        "row errors: {:?}",
        &summary.errors[..summary.errors.len().min(5)]
    );
    assert_eq!(summary.written, count as u64);
    let forwarded = devkit::scrape_metric(devkit::ADMIN_LISTEN, FORWARDED).expect("metrics");
    if cores > 1 {
        // One connection lands on one core; every row it does not own is forwarded exactly once.
        let owned_by_others = (0..count)
            .filter(|&i| smart.owner_core(&table, &columns, &devkit::event_row(i)) != Some(0))
            .count();
        let owned_by_core0 = count as usize - owned_by_others;
        assert!(
            forwarded == owned_by_others as f64 || forwarded == owned_by_core0 as f64,
            "forwarded {forwarded}, foreign rows for core 0: {owned_by_others}, for core 1: {owned_by_core0}"
        );
    }
    assert!(
        rss_max > 0 && rss_max < RSS_BYTES_MAX,
        "gateway RSS peaked at {} MiB",
        rss_max >> 20
    );
    assert!(gateway.stop().expect("stop").success());
    assert_events_exact(&names, count as u64).await;
}

/// Bad rows are rejected one by one with a reason code while the rest of the batch is written;
/// an unknown table or column rejects every row; an oversized message is refused naming the
/// limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_rejected_per_row_with_reasons() {
    let _lock = gateway_lock().await;
    let Setup {
        names,
        session,
        gateway,
        table,
        client,
    } = setup("badrows").await;
    let v = |kind| Value { kind: Some(kind) };

    let mut rows: Vec<Row> = (0..10).map(devkit::event_row).collect();
    rows[3].values[2] = v(Kind::Text("not a double".into()));
    rows[5].values[0] = v(Kind::Null(true));
    rows[7].values[0] = v(Kind::Text("not a bigint".into()));
    let batch = RowBatch {
        table: table.clone(),
        columns: devkit::event_columns(),
        rows,
        timestamp_us: 0,
    };
    let response = client.write(batch).await.expect("write");
    assert_eq!(response.written, 7);
    let codes: Vec<(u32, i32)> = response.errors.iter().map(|e| (e.row, e.code)).collect();
    assert_eq!(
        codes,
        vec![
            (3, ErrorCode::BadValue as i32),
            (5, ErrorCode::MissingKey as i32),
            (7, ErrorCode::BadValue as i32)
        ]
    );
    assert!(
        response.errors[0]
            .reason
            .contains("cannot be written to a column of type double"),
        "{:?}",
        response.errors[0]
    );

    let mut shared = client.shared_client();
    let response = write_event(&mut shared, format!("{}.nope", names.keyspace), devkit::event_columns()).await;
    assert_eq!(response.written, 0);
    assert_eq!(response.errors[0].code, ErrorCode::UnknownTable as i32);

    let mut columns = devkit::event_columns();
    columns[1] = "nmae".into();
    let response = write_event(&mut shared, table.clone(), columns).await;
    assert_eq!(response.errors[0].code, ErrorCode::UnknownColumn as i32);
    assert!(response.errors[0].reason.contains("`nmae`"));

    let huge = RowBatch {
        table: table.clone(),
        columns: vec!["id".into(), "name".into()],
        rows: vec![Row {
            values: vec![v(Kind::Int(1)), v(Kind::Text("x".repeat(5 << 20)))],
        }],
        timestamp_us: 0,
    };
    let status = shared
        .write(WriteRequest {
            batch: Some(huge),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert!(status.message().contains("4194304"), "names the limit: {status:?}");

    assert!(gateway.stop().expect("stop").success());
    let written = devkit::count_rows::<i64>(&session, &names.keyspace, "events", "id")
        .await
        .expect("count");
    assert_eq!(written, 7);
}

/// FlatBuffers row batches (`schemas/row_batch.fbs`) through `WriteFlat` from the shard-aware
/// client land with exact values and no forwards; a buffer that fails verification is refused
/// with a reason, as a stream message too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flatbuffers_batches_land_exactly_and_bad_buffers_are_refused() {
    let _lock = gateway_lock().await;
    let count = 20_000;
    let Setup {
        names,
        gateway,
        table,
        client,
        ..
    } = setup("flat").await;

    let mut written = 0;
    for batch in batches(&table, count) {
        let response = client.write_flat(batch).await.expect("write_flat");
        assert!(response.errors.is_empty(), "row errors: {:?}", response.errors);
        written += u64::from(response.written);
    }
    assert_eq!(written, count as u64);
    assert_eq!(
        devkit::scrape_metric(devkit::ADMIN_LISTEN, FORWARDED).expect("metrics"),
        0.0,
        "zero forwards"
    );

    let mut plain = client.shared_client();
    let garbage = vec![0xFF; 64];
    let refused = plain
        .write_flat(WriteFlatRequest {
            row_batch: garbage.clone(),
            ..Default::default()
        })
        .await
        .expect_err("garbage refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("not a valid FlatBuffers"),
        "{}",
        refused.message()
    );
    let request = WriteStreamRequest {
        batch_id: 7,
        batch: None,
        flat_batch: garbage,
        ..Default::default()
    };
    let streamed = match plain.write_stream(futures::stream::iter([request])).await {
        Ok(response) => response.into_inner().message().await.map(|_| ()),
        Err(status) => Err(status),
    };
    let status = streamed.expect_err("garbage in a stream is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");

    assert!(gateway.stop().expect("stop").success());
    assert_events_exact(&names, count as u64).await;
}
