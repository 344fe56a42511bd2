//! gRPC ingest API against the real Cassandra: shard-aware and plain clients, per-row errors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardgate::client::{stream_batches, ShardAwareClient};
use shardgate::devkit::{self, Gateway};
use shardgate::wire::proto::ingest_client::IngestClient;
use shardgate::wire::proto::value::Kind;
use shardgate::wire::proto::{
    ErrorCode, Row, RowBatch, Value, WriteFlatRequest, WriteRequest, WriteResponse, WriteStreamRequest,
};
use tonic::transport::Channel;

use crate::{gateway_binary, gateway_lock, Names};

const FORWARDED: &str = shardgate::telemetry::metric::ROWS_FORWARDED;
const WRITTEN: &str = shardgate::telemetry::metric::ROWS_WRITTEN;
const FAILED: &str = shardgate::telemetry::metric::ROWS_FAILED;
const REFUSED: &str = shardgate::telemetry::metric::BATCHES_REFUSED;
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
async fn write_event(
    client: &mut IngestClient<shardgate::client::GatewayChannel>,
    table: String,
    columns: Vec<String>,
) -> Result<WriteResponse, tonic::Status> {
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
        .map(tonic::Response::into_inner)
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

/// `shardgate_batch_rows` is what the database gets: every written row is counted in exactly
/// one database write, labelled with its replica and shard, and the shard-aware client's
/// 500-row batches reach the database as UNLOGGED batches of up to 64 rows, not row by row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_batches_are_measured_per_replica_and_shard() {
    const ROWS_PER_DATABASE_BATCH_MAX: f64 = 64.0;
    let _lock = gateway_lock().await;
    let count = 10_000;
    let Setup {
        names,
        gateway,
        table,
        client,
        ..
    } = setup("dbbatches").await;
    let summary = client.stream(batches(&table, count)).await.expect("stream");
    assert_eq!(
        summary.written,
        count as u64,
        "{:?}",
        &summary.errors[..summary.errors.len().min(5)]
    );
    let metric = shardgate::telemetry::metric::BATCH_ROWS;
    let rows = devkit::scrape_metric(devkit::ADMIN_LISTEN, &format!("{metric}_sum")).expect("metrics");
    let writes = devkit::scrape_metric(devkit::ADMIN_LISTEN, &format!("{metric}_count")).expect("metrics");
    assert_eq!(rows, count as f64, "each written row is in exactly one database write");
    assert!(
        writes >= count as f64 / ROWS_PER_DATABASE_BATCH_MAX,
        "{writes} writes cannot carry {count} rows in batches of at most 64"
    );
    assert!(
        rows / writes >= ROWS_PER_DATABASE_BATCH_MAX / 2.0,
        "500-row batches reach the database as batches of {:.1} rows on average",
        rows / writes
    );
    // One Cassandra node, which reports no shards: replica 0, shard 0.
    let labelled = devkit::scrape_metric_where(
        devkit::ADMIN_LISTEN,
        &format!("{metric}_count"),
        &[("replica", "0"), ("shard", "0"), ("source", "grpc")],
    )
    .expect("metrics");
    assert_eq!(
        labelled, writes,
        "every database write is labelled with its replica and shard"
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

/// The error code a status built by the gateway carries in its metadata.
fn error_code_of(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get(shardgate::server::status::ERROR_CODE_METADATA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Rows and batches the gateway counted as failed or refused, by code.
fn failed_rows(code: &str) -> f64 {
    devkit::scrape_metric_where(devkit::ADMIN_LISTEN, FAILED, &[("code", code)]).unwrap_or(0.0)
}

fn refused_batches(code: &str) -> f64 {
    devkit::scrape_metric_where(devkit::ADMIN_LISTEN, REFUSED, &[("code", code)]).unwrap_or(0.0)
}

/// Sends `body` as the raw protobuf of a `Write` request and returns the answer.
async fn write_raw(endpoint: &str, body: Vec<u8>) -> Result<WriteResponse, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/shardgate.v1.Ingest/Write");
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// Encodes raw bytes as a request message; decodes a `WriteResponse`.
#[derive(Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = WriteResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<WriteResponse>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

/// Bad rows are refused one by one, naming the column and its type, while the rest of the
/// batch is written (a row whose protobuf bytes do not decode too). A batch that cannot be
/// written at all (unknown table or column, a column named twice, an oversized or malformed
/// request) fails once with its own code, counted once as a refused batch and never as failed
/// rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_rejected_per_row_and_bad_batches_once() {
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
    let reasons: Vec<&str> = response.errors.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        reasons[0].starts_with("column `score` (double): a `text` value cannot be written"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1], "primary key column `id` is missing or null");
    assert!(reasons[2].starts_with("column `id` (bigint): "), "{reasons:?}");

    let mut shared = client.shared_client();
    let failed_before = failed_rows("UNKNOWN_TABLE") + failed_rows("UNKNOWN_COLUMN");
    let refused = write_event(&mut shared, format!("{}.nope", names.keyspace), devkit::event_columns())
        .await
        .expect_err("unknown table");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert_eq!(error_code_of(&refused), "UNKNOWN_TABLE");

    let mut columns = devkit::event_columns();
    columns[1] = "nmae".into();
    let refused = write_event(&mut shared, table.clone(), columns)
        .await
        .expect_err("unknown column");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(error_code_of(&refused), "UNKNOWN_COLUMN");
    assert!(refused.message().contains("no column `nmae`"), "{refused:?}");
    assert!(
        refused
            .message()
            .contains("its columns: `at`, `id`, `name`, `score`, `tags`"),
        "{refused:?}"
    );
    assert_eq!(refused_batches("UNKNOWN_COLUMN"), 1.0, "one batch, counted once");
    assert_eq!(refused_batches("UNKNOWN_TABLE"), 1.0);
    assert_eq!(
        failed_rows("UNKNOWN_TABLE") + failed_rows("UNKNOWN_COLUMN"),
        failed_before,
        "a refused batch is not counted as failed rows"
    );

    let mut columns = devkit::event_columns();
    columns[4] = "name".into();
    let refused = write_event(&mut shared, table.clone(), columns)
        .await
        .expect_err("duplicate column");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(error_code_of(&refused), "DUPLICATE_COLUMN");
    assert_eq!(
        refused.message(),
        "DUPLICATE_COLUMN: column `name` is named twice in the batch's columns"
    );

    let huge = RowBatch {
        table: table.clone(),
        columns: vec!["id".into(), "name".into()],
        rows: vec![Row {
            values: vec![v(Kind::Int(1)), v(Kind::Text("x".repeat(5 << 20)))],
        }],
        timestamp_us: 0,
    };
    let request = WriteRequest {
        batch: Some(huge.clone()),
        ..Default::default()
    };
    let size = prost::Message::encoded_len(&request);
    let status = shared.write(request).await.expect_err("too large");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert_eq!(error_code_of(&status), "TOO_LARGE");
    assert_eq!(
        status.message(),
        format!(
            "TOO_LARGE: request message of {size} bytes is over `ingest.message_bytes_max` = 4194304 bytes; split the batch"
        )
    );

    let status = write_raw(devkit::INGEST_LISTEN, vec![0x0a, 0xff, 0x01, 0x02])
        .await
        .expect_err("malformed protobuf");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(error_code_of(&status), "MALFORMED");
    assert!(status.message().contains("not a valid protobuf message"), "{status:?}");

    // Rows stay encoded until bound: a row whose bytes do not decode is refused alone.
    let encoded_row = |i: i64| bytes::Bytes::from(prost::Message::encode_to_vec(&devkit::event_row(i)));
    let body = prost::Message::encode_to_vec(&shardgate::wire::server_view::WriteRequest {
        batch: Some(shardgate::wire::raw::RowBatch {
            table: table.clone(),
            columns: devkit::event_columns(),
            rows: vec![
                encoded_row(200),
                bytes::Bytes::from_static(&[0x0a, 0xff, 0x01, 0x02]),
                encoded_row(201),
            ],
            timestamp_us: 0,
        }),
        ack: 0,
    });
    let malformed_before = failed_rows("MALFORMED");
    let response = write_raw(devkit::INGEST_LISTEN, body)
        .await
        .expect("a batch with one unreadable row is answered");
    assert_eq!(response.written, 2, "{response:?}");
    let errors: Vec<(u32, i32)> = response.errors.iter().map(|e| (e.row, e.code)).collect();
    assert_eq!(errors, vec![(1, ErrorCode::Malformed as i32)]);
    assert!(
        response.errors[0]
            .reason
            .starts_with("the row is not a valid protobuf message"),
        "{response:?}"
    );
    assert_eq!(failed_rows("MALFORMED"), malformed_before + 1.0);

    // On a stream, a refused batch is answered with `batch_error` and the stream goes on.
    let mut bad_columns = devkit::event_columns();
    bad_columns[2] = "scroe".into();
    let stream = vec![
        WriteStreamRequest {
            batch_id: 1,
            batch: Some(RowBatch {
                table: table.clone(),
                columns: devkit::event_columns(),
                rows: (20..30).map(devkit::event_row).collect(),
                timestamp_us: 0,
            }),
            ..Default::default()
        },
        WriteStreamRequest {
            batch_id: 2,
            batch: Some(huge),
            ..Default::default()
        },
        WriteStreamRequest {
            batch_id: 3,
            batch: Some(RowBatch {
                table: table.clone(),
                columns: bad_columns,
                rows: vec![devkit::event_row(100)],
                timestamp_us: 0,
            }),
            ..Default::default()
        },
        WriteStreamRequest {
            batch_id: 4,
            flat_batch: vec![0xff; 32],
            ..Default::default()
        },
        WriteStreamRequest {
            batch_id: 5,
            batch: Some(RowBatch {
                table: table.clone(),
                columns: devkit::event_columns(),
                rows: (30..40).map(devkit::event_row).collect(),
                timestamp_us: 0,
            }),
            ..Default::default()
        },
    ];
    let mut answers = shared
        .write_stream(futures::stream::iter(stream))
        .await
        .expect("stream opens")
        .into_inner();
    let mut by_batch = std::collections::BTreeMap::new();
    while let Some(answer) = answers.message().await.expect("the stream stays open") {
        by_batch.insert(answer.batch_id, answer);
    }
    assert_eq!(by_batch.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!((by_batch[&1].written, by_batch[&5].written), (10, 10));
    let refusal = |id: u64| {
        let error = by_batch[&id].batch_error.clone().expect("a batch error");
        (ErrorCode::try_from(error.code).expect("code"), error.reason)
    };
    let (code, reason) = refusal(2);
    assert_eq!(code, ErrorCode::TooLarge);
    assert!(
        reason.contains("`ingest.message_bytes_max` = 4194304 bytes"),
        "{reason}"
    );
    assert_eq!(refusal(3).0, ErrorCode::UnknownColumn);
    assert_eq!(refusal(4).0, ErrorCode::Malformed);
    assert!(by_batch[&2].errors.is_empty() && by_batch[&2].written == 0);

    assert!(gateway.stop().expect("stop").success());
    let written = devkit::count_rows::<i64>(&session, &names.keyspace, "events", "id")
        .await
        .expect("count");
    assert_eq!(
        written,
        7 + 2 + 10 + 10,
        "7 good rows of the first batch, 2 of the raw batch, then stream batches 1 and 5"
    );
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
        Ok(response) => response.into_inner().message().await,
        Err(status) => Err(status),
    };
    let answer = streamed.expect("garbage in a stream is answered, not a stream error");
    let refusal = answer.and_then(|a| a.batch_error).expect("a batch error");
    assert_eq!(refusal.code, ErrorCode::Malformed as i32, "{refusal:?}");

    assert!(gateway.stop().expect("stop").success());
    assert_events_exact(&names, count as u64).await;
}
