//! The query API against the real Cassandra: `Get` of rows written through the ingest API with
//! every CQL type it supports, paged partitions, `Execute` / `ExecuteStream` with binds and page
//! tokens (across a gateway restart), read-only refusals, and full and resumed scans that return
//! every row exactly once.

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use shardgate::client::ShardAwareClient;
use shardgate::devkit::{self, Gateway};
use shardgate::wire::proto::query_client::QueryClient;
use shardgate::wire::proto::value::Kind;
use shardgate::wire::proto::{
    Decimal, ExecuteRequest, GetRequest, Map, MapEntry, PlanScanRequest, QueryOptions, Row, RowBatch, ScanRequest,
    Split, Value, Values,
};
use tonic::transport::Channel;

use crate::{gateway_binary, gateway_lock, Names};

/// Partitions and rows per partition of the all-types table.
const PARTITIONS: i64 = 1_000;
const ROWS_PER_PARTITION: i64 = 10;
/// The write timestamp of every all-types row.
const WRITTEN_AT_US: i64 = 1_700_000_000_000_000;

fn v(kind: Kind) -> Value {
    Value { kind: Some(kind) }
}

/// The all-types columns, in table order (`SELECT *`: partition key, clustering key, the rest
/// by name).
const KINDS_COLUMNS: [&str; 21] = [
    "id", "seq", "a", "b", "bl", "d", "db", "dc", "f", "ip", "l", "m", "s", "si", "t", "ti", "tm", "ts", "tu", "u",
    "vi",
];

async fn create_kinds_table(session: &scylla::client::session::Session, keyspace: &str) {
    let table = format!(
        "CREATE TABLE {keyspace}.kinds (id bigint, seq int, a ascii, b boolean, bl blob, d date, db double, \
         dc decimal, f float, ip inet, l frozen<list<int>>, m frozen<map<text, int>>, s frozen<set<text>>, \
         si smallint, t text, ti tinyint, tm time, ts timestamp, tu timeuuid, u uuid, vi varint, \
         PRIMARY KEY (id, seq))"
    );
    devkit::recreate_keyspace_with(session, keyspace, table)
        .await
        .expect("create table");
}

/// Row (id, seq) of the all-types table, values in [`KINDS_COLUMNS`] order, in the canonical
/// form the database returns them (sets and maps sorted, numbers in minimal bytes).
fn kinds_row(id: i64, seq: i64) -> Row {
    let n = id * 100 + seq;
    let minimal = |x: i64| num_bigint::BigInt::from(x).to_signed_bytes_be();
    let timeuuid = uuid::Uuid::new_v1(
        uuid::Timestamp::from_unix(uuid::NoContext, 1_700_000_000 + n as u64, 0),
        &[1, 2, 3, 4, 5, 6],
    );
    Row {
        values: vec![
            v(Kind::Int(id)),
            v(Kind::Int(seq)),
            v(Kind::Text(format!("ascii-{n}"))),
            v(Kind::Boolean(n % 2 == 0)),
            v(Kind::Blob(vec![(n % 256) as u8, 0, 255])),
            v(Kind::DateDays(19_000 + n as i32)),
            v(Kind::Double(n as f64 * 0.25)),
            v(Kind::Decimal(Decimal {
                unscaled: minimal(n * 1_000 - 7),
                scale: 3,
            })),
            v(Kind::Float(n as f32 * 0.5)),
            v(Kind::Inet(vec![10, 0, (n / 256 % 256) as u8, (n % 256) as u8])),
            v(Kind::List(Values {
                values: vec![v(Kind::Int(n)), v(Kind::Int(-n))],
            })),
            v(Kind::Map(Map {
                entries: vec![
                    MapEntry {
                        key: Some(v(Kind::Text("a".into()))),
                        value: Some(v(Kind::Int(n))),
                    },
                    MapEntry {
                        key: Some(v(Kind::Text("b".into()))),
                        value: Some(v(Kind::Int(n + 1))),
                    },
                ],
            })),
            v(Kind::Set(Values {
                values: vec![v(Kind::Text(format!("x{n}"))), v(Kind::Text(format!("y{n}")))],
            })),
            v(Kind::Int(n % 30_000)),
            v(Kind::Text(format!("text ✓ {n}"))),
            v(Kind::Int(n % 100)),
            v(Kind::TimeNs(n * 1_000_000_007 % 86_400_000_000_000)),
            v(Kind::TimestampMs(1_700_000_000_000 + n)),
            v(Kind::Timeuuid(timeuuid.as_bytes().to_vec())),
            v(Kind::Uuid(uuid::Uuid::from_u128(n as u128 * 7919).as_bytes().to_vec())),
            v(Kind::Varint(minimal(n * 1_000_003 - 500))),
        ],
    }
}

fn query_gateway_toml(names: &Names, extra: &str) -> std::path::PathBuf {
    let key = names.dir.join("page-token.key");
    let text = format!(
        "{}\n[query]\npage_token_key_file = \"{}\"\npage_size_max = 5000\n{extra}\n",
        devkit::ingest_gateway_toml("", 2048, 64),
        key.display()
    );
    let path = names.dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn start(names: &Names, extra: &str) -> Gateway {
    let config = query_gateway_toml(names, extra);
    Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts")
}

async fn query_client() -> QueryClient<Channel> {
    QueryClient::connect(format!("http://{}", devkit::INGEST_LISTEN))
        .await
        .expect("query client connects")
}

fn code_of(status: &tonic::Status) -> String {
    status
        .metadata()
        .get(shardgate::server::status::ERROR_CODE_METADATA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Writes the all-types rows through the ingest API; returns the table name.
async fn write_kinds(names: &Names) -> String {
    let table = format!("{}.kinds", names.keyspace);
    let client = ShardAwareClient::connect(devkit::INGEST_LISTEN, &[&table])
        .await
        .expect("ingest client connects");
    let columns: Vec<String> = KINDS_COLUMNS.iter().map(|c| c.to_string()).collect();
    for id in 0..PARTITIONS {
        let batch = RowBatch {
            table: table.clone(),
            columns: columns.clone(),
            rows: (0..ROWS_PER_PARTITION).map(|seq| kinds_row(id, seq)).collect(),
            timestamp_us: WRITTEN_AT_US,
        };
        let answer = client.write(batch).await.expect("write");
        assert!(answer.errors.is_empty(), "row errors: {:?}", answer.errors);
        assert_eq!(answer.written, ROWS_PER_PARTITION as u32);
    }
    table
}

fn get(table: &str, key: Vec<Value>) -> GetRequest {
    GetRequest {
        table: table.to_string(),
        key,
        ..Default::default()
    }
}

/// `Get` returns what the ingest API wrote, value for value, for every supported type, with
/// write times; a partition pages by 7 with tokens; bad requests name their field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_returns_the_rows_written_and_pages_a_partition() {
    let _lock = gateway_lock().await;
    let names = Names::new("query_get");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    create_kinds_table(&session, &names.keyspace).await;
    let gateway = start(&names, "");
    let table = write_kinds(&names).await;
    let mut client = query_client().await;

    // Every row by its full key, in a shuffled order, 64 at a time: the same values, in
    // SELECT * order, with the column specs.
    let total = PARTITIONS * ROWS_PER_PARTITION;
    // 7_919 is prime and does not divide `total`: i ↦ i·7_919 mod total visits every row once.
    let keys = (0..total)
        .map(|i| i * 7_919 % total)
        .map(|n| (n / ROWS_PER_PARTITION, n % ROWS_PER_PARTITION));
    let checked = futures::stream::iter(keys)
        .map(|(id, seq)| {
            let mut client = client.clone();
            let mut request = get(&table, vec![v(Kind::Int(id)), v(Kind::Int(seq))]);
            request.with_writetime = vec!["t".into()];
            async move { (id, seq, client.get(request).await) }
        })
        .buffer_unordered(64)
        .fold(0, |checked, (id, seq, answer)| async move {
            let result = answer.expect("get").into_inner().result.expect("result");
            assert_eq!(result.rows.len(), 1, "row ({id}, {seq})");
            let mut expected = kinds_row(id, seq);
            expected.values.push(v(Kind::Int(WRITTEN_AT_US)));
            assert_eq!(result.rows[0], expected, "row ({id}, {seq})");
            assert!(result.next_page_token.is_empty());
            let names: Vec<&str> = result.columns.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(&names[..KINDS_COLUMNS.len()], KINDS_COLUMNS);
            checked + 1
        })
        .await;
    assert_eq!(checked, total);

    // A whole partition, 7 rows a page, chosen columns.
    let mut rows = Vec::new();
    let mut token = Vec::new();
    let mut pages = 0;
    loop {
        let mut request = get(&table, vec![v(Kind::Int(42))]);
        request.columns = vec!["seq".into(), "t".into()];
        request.options = Some(QueryOptions {
            page_size: 7,
            page_token: token.clone(),
            ..Default::default()
        });
        let result = client
            .get(request)
            .await
            .expect("page")
            .into_inner()
            .result
            .expect("result");
        assert!(result.rows.len() <= 7);
        pages += 1;
        rows.extend(result.rows);
        if result.next_page_token.is_empty() {
            break;
        }
        token = result.next_page_token;
    }
    assert!(pages >= 2, "{pages} pages");
    let expected: Vec<Row> = (0..ROWS_PER_PARTITION)
        .map(|seq| {
            let full = kinds_row(42, seq);
            Row {
                values: vec![full.values[1].clone(), full.values[14].clone()],
            }
        })
        .collect();
    assert_eq!(rows, expected);

    // Bad requests: the code and the field.
    let refused = |request: GetRequest| {
        let mut client = client.clone();
        async move { client.get(request).await.expect_err("refused") }
    };
    let status = refused(get(&table, vec![])).await;
    assert_eq!(code_of(&status), "MISSING_KEY", "{status:?}");
    assert!(status.message().contains("key:"), "{status:?}");
    let mut request = get(&table, vec![v(Kind::Int(1))]);
    request.columns = vec!["nope".into()];
    let status = refused(request).await;
    assert_eq!(code_of(&status), "UNKNOWN_COLUMN", "{status:?}");
    assert!(status.message().contains("columns[0]"), "{status:?}");
    let status = refused(get(&format!("{}.missing", names.keyspace), vec![v(Kind::Int(1))])).await;
    assert_eq!(code_of(&status), "UNKNOWN_TABLE", "{status:?}");
    let status = refused(get(&table, vec![v(Kind::Text("one".into()))])).await;
    assert_eq!(code_of(&status), "BAD_VALUE", "{status:?}");
    assert!(status.message().contains("key[0] (`id`, bigint)"), "{status:?}");

    assert!(gateway.stop().expect("stop").success());
}

fn execute(cql: String, values: Vec<Value>, page_size: u32, token: Vec<u8>) -> ExecuteRequest {
    ExecuteRequest {
        cql,
        values,
        options: Some(QueryOptions {
            page_size,
            page_token: token,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `Execute` pages with positional and named binds, resumes across a gateway restart with the
/// same key file, refuses a foreign or altered token, refuses writes unless allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_pages_with_binds_and_refuses_writes_when_read_only() {
    let _lock = gateway_lock().await;
    let names = Names::new("query_execute");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    create_kinds_table(&session, &names.keyspace).await;
    let gateway = start(&names, "");
    let table = write_kinds(&names).await;
    let mut client = query_client().await;
    let cql = format!("SELECT seq, t FROM {table} WHERE id = ? AND seq >= ?");
    let binds = vec![v(Kind::Int(7)), v(Kind::Int(2))];

    // First page of 3 on this gateway.
    let first = client
        .execute(execute(cql.clone(), binds.clone(), 3, Vec::new()))
        .await
        .expect("execute")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(first.rows.len(), 3);
    assert_eq!(first.columns.len(), 2);
    assert!(!first.next_page_token.is_empty());

    // A token is bound to its statement and binds, and to its bytes.
    let status = client
        .execute(execute(
            cql.clone(),
            vec![v(Kind::Int(8)), v(Kind::Int(2))],
            3,
            first.next_page_token.clone(),
        ))
        .await
        .expect_err("foreign token");
    assert_eq!(code_of(&status), "BAD_PAGE_TOKEN", "{status:?}");
    let mut altered = first.next_page_token.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let status = client
        .execute(execute(cql.clone(), binds.clone(), 3, altered))
        .await
        .expect_err("altered token");
    assert_eq!(code_of(&status), "BAD_PAGE_TOKEN", "{status:?}");

    // The rest after a restart: the key file keeps the tokens valid.
    assert!(gateway.stop().expect("stop").success());
    let gateway = start(&names, "");
    let mut client = query_client().await;
    let mut rows = first.rows.clone();
    let mut token = first.next_page_token;
    let mut pages = 1;
    while !token.is_empty() {
        let page = client
            .execute(execute(cql.clone(), binds.clone(), 3, token))
            .await
            .expect("page after restart")
            .into_inner()
            .result
            .expect("result");
        pages += 1;
        rows.extend(page.rows);
        token = page.next_page_token;
    }
    assert!(pages >= 3, "{pages} pages");
    let expected: Vec<Row> = (2..ROWS_PER_PARTITION)
        .map(|seq| Row {
            values: vec![v(Kind::Int(seq)), kinds_row(7, seq).values[14].clone()],
        })
        .collect();
    assert_eq!(rows, expected);

    // Named binds, streamed: every page, the same rows.
    let mut named = execute(
        format!("SELECT seq, t FROM {table} WHERE id = :id AND seq >= :low"),
        vec![v(Kind::Int(2)), v(Kind::Int(7))],
        2,
        Vec::new(),
    );
    named.value_names = vec!["low".into(), "id".into()];
    let mut stream = client.execute_stream(named).await.expect("stream").into_inner();
    let mut streamed = Vec::new();
    let mut pages = 0;
    while let Some(page) = stream.next().await {
        streamed.extend(page.expect("page").result.expect("result").rows);
        pages += 1;
    }
    assert_eq!(streamed, expected);
    assert!(pages >= 4, "{pages} pages");

    // Refusals.
    let insert = format!("INSERT INTO {table} (id, seq, t) VALUES (?, ?, ?)");
    let row = vec![v(Kind::Int(9_999)), v(Kind::Int(0)), v(Kind::Text("new".into()))];
    let status = client
        .execute(execute(insert.clone(), row.clone(), 0, Vec::new()))
        .await
        .expect_err("read-only");
    assert_eq!(code_of(&status), "READ_ONLY", "{status:?}");
    let status = client
        .execute(execute(format!("SELEKT * FROM {table}"), vec![], 0, Vec::new()))
        .await
        .expect_err("syntax");
    assert_eq!(code_of(&status), "BAD_QUERY", "{status:?}");
    let status = client
        .execute(execute(cql.clone(), vec![v(Kind::Int(7))], 0, Vec::new()))
        .await
        .expect_err("bind count");
    assert_eq!(code_of(&status), "BAD_QUERY", "{status:?}");
    assert!(status.message().contains("values: 1 values given"), "{status:?}");
    let status = client
        .execute(execute(cql.clone(), binds.clone(), 100_000, Vec::new()))
        .await
        .expect_err("page size");
    assert_eq!(code_of(&status), "BAD_QUERY", "{status:?}");
    assert!(status.message().contains("query.page_size_max"), "{status:?}");
    assert!(gateway.stop().expect("stop").success());

    // With writes allowed, the insert lands.
    let gateway = start(&names, "allow_writes = true");
    let mut client = query_client().await;
    client
        .execute(execute(insert, row, 0, Vec::new()))
        .await
        .expect("insert allowed");
    let (t,): (Option<String>,) = session
        .query_unpaged(format!("SELECT t FROM {table} WHERE id = 9999 AND seq = 0"), ())
        .await
        .expect("read")
        .into_rows_result()
        .expect("rows")
        .single_row()
        .expect("one row");
    assert_eq!(t.as_deref(), Some("new"));
    assert!(gateway.stop().expect("stop").success());
}

/// Reads every page of `request`'s scan; `stop_after` pages then drops the stream. Returns
/// each split's rows and last token (empty once the split is done).
async fn scan_pages(
    client: &mut QueryClient<Channel>,
    request: ScanRequest,
    stop_after: Option<usize>,
) -> (Vec<Row>, HashMap<u32, Vec<u8>>, usize) {
    let mut stream = client.scan(request).await.expect("scan").into_inner();
    let mut rows = Vec::new();
    let mut tokens = HashMap::new();
    let mut pages = 0;
    while let Some(page) = stream.next().await {
        let page = page.expect("page");
        let set = page.page.expect("page");
        rows.extend(set.rows);
        tokens.insert(page.split, set.next_page_token);
        pages += 1;
        if stop_after.is_some_and(|n| pages >= n) {
            break;
        }
    }
    (rows, tokens, pages)
}

/// Every row compared with the event it should be; panics on a duplicate or a wrong value.
fn check_events(rows: &[Row], seen: &mut [bool]) -> usize {
    for row in rows {
        let Some(Kind::Int(id)) = row.values.first().and_then(|v| v.kind.clone()) else {
            panic!("row without an id: {row:?}");
        };
        assert!(!seen[id as usize], "event {id} returned twice");
        seen[id as usize] = true;
        assert_eq!(row, &devkit::event_row(id), "event {id}");
    }
    rows.len()
}

/// A full scan of a million rows returns every row exactly once with the values written; a
/// scan dropped half-way and resumed from its splits' last tokens, on a restarted gateway,
/// completes with every row exactly once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_return_every_row_exactly_once_and_resume() {
    let _lock = gateway_lock().await;
    let count = 1_000_000i64;
    let names = Names::new("query_scan");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let gateway = start(&names, "");
    let table = format!("{}.events", names.keyspace);
    let writer = ShardAwareClient::connect(devkit::INGEST_LISTEN, &[&table])
        .await
        .expect("ingest client connects");
    let summary = writer
        .stream(devkit::event_batches(&table, count, 500))
        .await
        .expect("write");
    assert_eq!(summary.written, count as u64);
    let mut client = query_client().await;
    let columns: Vec<String> = devkit::event_columns();

    // The whole table, planned by the gateway.
    let request = ScanRequest {
        table: table.clone(),
        columns: columns.clone(),
        options: Some(QueryOptions {
            page_size: 5000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (rows, tokens, _) = scan_pages(&mut client, request.clone(), None).await;
    let mut seen = vec![false; count as usize];
    assert_eq!(check_events(&rows, &mut seen), count as usize);
    assert!(tokens.values().all(Vec::is_empty), "every split finished");

    // Planned splits, dropped after a few pages, resumed on a restarted gateway.
    let splits: Vec<Split> = client
        .plan_scan(PlanScanRequest {
            table: table.clone(),
            min_splits: 12,
        })
        .await
        .expect("plan")
        .into_inner()
        .splits;
    assert!(splits.len() >= 12, "{} splits", splits.len());
    let mut first = request.clone();
    first.splits = splits.clone();
    let (rows, tokens, pages) = scan_pages(&mut client, first, Some(40)).await;
    assert_eq!(pages, 40);
    let mut seen = vec![false; count as usize];
    let mut total = check_events(&rows, &mut seen);
    assert!(gateway.stop().expect("stop").success());
    let gateway = start(&names, "");
    let mut client = query_client().await;
    // Splits never started resume from their start; finished ones are left out.
    let mut rest = request.clone();
    let mut left: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    for (i, _) in splits.iter().enumerate() {
        match tokens.get(&(i as u32)) {
            Some(token) if token.is_empty() => {}
            Some(token) => {
                left.insert(i, token.clone());
            }
            None => {
                left.insert(i, Vec::new());
            }
        }
    }
    rest.splits = left.keys().map(|&i| splits[i].clone()).collect();
    rest.resume = left.values().cloned().collect();
    let (rows, tokens, _) = scan_pages(&mut client, rest, None).await;
    total += check_events(&rows, &mut seen);
    assert_eq!(total, count as usize, "every row exactly once");
    assert!(tokens.values().all(Vec::is_empty));

    // A token of one split is refused for another.
    if let Some((&i, token)) = left.iter().find(|(_, t)| !t.is_empty()) {
        let other = (i + 1) % splits.len();
        let mut forged = request.clone();
        forged.splits = vec![splits[other].clone()];
        forged.resume = vec![token.clone()];
        let mut stream = client.scan(forged).await;
        let status = match &mut stream {
            Err(status) => status.clone(),
            Ok(response) => response
                .get_mut()
                .next()
                .await
                .expect("an answer")
                .expect_err("refused"),
        };
        assert_eq!(code_of(&status), "BAD_PAGE_TOKEN", "{status:?}");
    }
    assert!(gateway.stop().expect("stop").success());
}

/// A fresh `events` table (made before the gateway starts, so its schema knows it).
async fn create_events(names: &Names) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, &names.keyspace)
        .await
        .expect("create table");
}

/// `count` sample events written to the `events` table through the ingest API.
async fn events_table(names: &Names, count: i64) -> String {
    let table = format!("{}.events", names.keyspace);
    let writer = ShardAwareClient::connect(devkit::INGEST_LISTEN, &[&table])
        .await
        .expect("ingest client connects");
    let summary = writer
        .stream(devkit::event_batches(&table, count, 500))
        .await
        .expect("write");
    assert_eq!(summary.written, count as u64);
    table
}

/// Event `id` as `shardgate export` should write it in JSON, formatted here independently of the
/// exporter: numbers as numbers, the timestamp as RFC 3339 with milliseconds.
fn event_json(id: i64) -> serde_json::Value {
    let row = devkit::event_row(id);
    let kind = |i: usize| row.values[i].kind.clone().expect("a value");
    let (Kind::Text(name), Kind::Double(score), Kind::TimestampMs(at), Kind::List(tags)) =
        (kind(1), kind(2), kind(3), kind(4))
    else {
        panic!("unexpected event shape");
    };
    let at = chrono::DateTime::from_timestamp_millis(at)
        .expect("time")
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    let tags: Vec<i64> = tags
        .values
        .iter()
        .map(|v| match v.kind {
            Some(Kind::Int(i)) => i,
            _ => panic!("tag"),
        })
        .collect();
    serde_json::json!({"id": id, "name": name, "score": score, "at": at, "tags": tags})
}

/// `shardgate export` writes every row once with the values written; stopped half-way (SIGKILL)
/// and started again with its state file, it finishes with every row once; CSV has a header and
/// a line per row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_every_row_once_and_resumes_after_a_kill() {
    let _lock = gateway_lock().await;
    let count = 200_000i64;
    let names = Names::new("query_export");
    create_events(&names).await;
    let config = query_gateway_toml(&names, "");
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");
    let table = events_table(&names, count).await;
    let output = names.dir.join("events.jsonl");
    let state = names.dir.join("export.state");
    let export = |extra: &[&str]| {
        let mut command = std::process::Command::new(gateway_binary());
        command
            .args(["export", "--config"])
            .arg(&config)
            .args([
                "--table",
                &table,
                "--columns",
                "id,name,score,at,tags",
                "--page-size",
                "2000",
                "--parallel",
                "2",
            ])
            .args(extra);
        command
    };
    // Killed once the state says a quarter of the rows are out.
    let mut first = export(&[
        "--format",
        "jsonl",
        "--output",
        output.to_str().unwrap(),
        "--resume",
        state.to_str().unwrap(),
    ])
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("export starts");
    let started = std::time::Instant::now();
    loop {
        let rows = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["rows"].as_u64())
            .unwrap_or(0);
        if rows >= count as u64 / 4 {
            break;
        }
        assert!(
            first.try_wait().expect("wait").is_none(),
            "the export ended before it was killed"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    first.kill().expect("kill");
    first.wait().expect("reaped");
    // A state file whose saved token is damaged is refused, naming the split, rather than
    // restarting that split and repeating rows the output holds.
    let damaged = names.dir.join("damaged.state");
    let mut saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).expect("state")).expect("JSON");
    let open = saved["splits"]
        .as_array()
        .expect("splits")
        .iter()
        .position(|s| s["done"] == false)
        .expect("a split not done");
    saved["splits"][open]["token"] = "not base64!".into();
    std::fs::write(&damaged, serde_json::to_vec(&saved).expect("JSON")).expect("write");
    std::fs::copy(&output, names.dir.join("damaged.jsonl")).expect("copy");
    let refused = export(&[
        "--format",
        "jsonl",
        "--output",
        names.dir.join("damaged.jsonl").to_str().unwrap(),
        "--resume",
        damaged.to_str().unwrap(),
    ])
    .output()
    .expect("export runs");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(&format!("splits[{open}].token is not base64")),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let second = export(&[
        "--format",
        "jsonl",
        "--output",
        output.to_str().unwrap(),
        "--resume",
        state.to_str().unwrap(),
    ])
    .output()
    .expect("export runs");
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains(&format!("{count} rows exported")),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let text = std::fs::read_to_string(&output).expect("output");
    let mut seen = vec![false; count as usize];
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let id = row["id"].as_i64().expect("id");
        assert!(
            !std::mem::replace(&mut seen[id as usize], true),
            "event {id} exported twice"
        );
        assert_eq!(row, event_json(id));
    }
    assert!(seen.iter().all(|s| *s), "every event exported");

    // CSV, to stdout: a header, then a line per row.
    let csv = export(&["--format", "csv"]).output().expect("export runs");
    assert!(csv.status.success(), "{}", String::from_utf8_lossy(&csv.stderr));
    let text = String::from_utf8(csv.stdout).expect("utf-8");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("id,name,score,at,tags"));
    assert_eq!(lines.count(), count as usize);
    assert!(gateway.stop().expect("stop").success());
}

/// 100,000 `Get`s from a plain client on one connection to the shared port, spread over both
/// cores by key (so about half are forwarded over the mesh): every one answers its row, and both
/// cores read their share. (The core panic seen under this load in `shardgate-bench get-plain`
/// is pinned down by `server::http2`'s unit test; this one checks the answers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_gets_keep_answering_through_many_forwards() {
    let _lock = gateway_lock().await;
    let count = 2_000i64;
    let gets = 100_000i64;
    let names = Names::new("query_forwards");
    create_events(&names).await;
    let gateway = start(&names, "");
    let table = events_table(&names, count).await;
    let client = query_client().await;
    let answered = futures::stream::iter(0..gets)
        .map(|i| {
            let mut client = client.clone();
            let id = i * 7_919 % count;
            let request = GetRequest {
                table: table.clone(),
                columns: devkit::event_columns(),
                key: vec![v(Kind::Int(id))],
                ..Default::default()
            };
            async move { (id, client.get(request).await) }
        })
        .buffer_unordered(64)
        .fold(0i64, |answered, (id, answer)| async move {
            let rows = answer.expect("get").into_inner().result.expect("result").rows;
            assert_eq!(rows, [devkit::event_row(id)], "event {id}");
            answered + 1
        })
        .await;
    assert_eq!(answered, gets);
    // Both cores served: the gets were spread over them by key, so about half were forwarded.
    let served = |core: &str| {
        devkit::scrape_metric_where(
            devkit::ADMIN_LISTEN,
            shardgate::telemetry::metric::ROWS_READ,
            &[("rpc", "get"), ("core", core)],
        )
        .expect("metrics")
    };
    let (zero, one) = (served("0"), served("1"));
    assert_eq!(zero + one, gets as f64);
    assert!(
        zero.min(one) > (gets / 4) as f64,
        "core 0 read {zero}, core 1 read {one}"
    );
    assert!(gateway.stop().expect("stop").success());
}

/// A client that stops reading a scan holds the gateway to the pages in flight: its RSS stays
/// bounded while `Get`s from another client keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_scan_keeps_memory_bounded_and_gets_answering() {
    let _lock = gateway_lock().await;
    let count = 300_000i64;
    let names = Names::new("query_stall");
    create_events(&names).await;
    let gateway = start(&names, "");
    let table = events_table(&names, count).await;
    let baseline = devkit::rss_bytes(gateway.pid()).expect("rss");
    let mut client = query_client().await;
    let mut stalled = client
        .scan(ScanRequest {
            table: table.clone(),
            columns: devkit::event_columns(),
            parallel_splits: 8,
            options: Some(QueryOptions {
                page_size: 5000,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("scan")
        .into_inner();
    stalled.next().await.expect("a first page").expect("page");
    // Not read any further: the gateway must stop fetching for it once the pages a scan may
    // hold are read (how long filling them takes depends on the database, so wait until the
    // count holds still for 2 s, or fail after 60 s).
    let rows_read = || {
        devkit::scrape_metric_where(
            devkit::ADMIN_LISTEN,
            shardgate::telemetry::metric::ROWS_READ,
            &[("rpc", "scan")],
        )
        .expect("metrics")
    };
    let settling = std::time::Instant::now();
    let mut read = rows_read();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let now = rows_read();
        if now == read {
            break;
        }
        assert!(
            settling.elapsed() < std::time::Duration::from_secs(60),
            "the gateway kept reading for 60 s for a client that read one page ({now} rows)"
        );
        read = now;
    }
    let reader = ShardAwareClient::connect(devkit::INGEST_LISTEN, &[&table])
        .await
        .expect("client connects");
    let mut peak = 0;
    for round in 0..20i64 {
        for id in (round * 997..count).step_by(15_013).take(10) {
            let response = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                reader.get(get(&table, vec![v(Kind::Int(id))])),
            )
            .await
            .expect("a get answers while the scan is stalled")
            .expect("get");
            assert_eq!(response.result.expect("result").rows.len(), 1);
        }
        peak = peak.max(devkit::rss_bytes(gateway.pid()).expect("rss"));
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    // The gateway stopped fetching for the stalled client: of the table's rows it read no more
    // than the pages a scan may hold (a page per split in flight, the channel's, what HTTP/2's
    // window takes), nothing more during the 5 s of `Get`s, and its memory did not grow with
    // the table.
    assert!(
        read <= (count / 2) as f64,
        "the gateway read {read} of {count} rows for a client that read one page"
    );
    assert_eq!(read, rows_read(), "the gateway went on reading for a stalled client");
    assert!(
        peak < baseline + (96 << 20),
        "RSS grew from {baseline} to {peak} bytes with a stalled scan"
    );
    drop(stalled);
    assert!(gateway.stop().expect("stop").success());
}

/// The README's grpcurl examples, run as written (the demo's table swapped for this test's):
/// the `Get` answers event 42, the named-bind `Execute` events 1 and 2, `PlanScan` at least 4
/// splits, the filtered `Scan` exactly the events with `score < 1.5` over every split, and the
/// `DELETE` is refused `READ_ONLY` and deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_grpcurl_examples_answer() {
    let _lock = gateway_lock().await;
    let names = Names::new("query_grpcurl");
    create_events(&names).await;
    let gateway = start(&names, "");
    let table = events_table(&names, 100).await;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("README");
    let block = readme
        .split("```sh\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .find(|block| block.contains("shardgate.v1.Query/"))
        .expect("a sh block of grpcurl examples in the README");
    let block = block.replace("shardgate_demo_grpc.events", &table);
    let prelude = block.lines().find(|l| l.starts_with("q=")).expect("the q= line");
    let grpcurl = devkit::state_dir().join("bin/grpcurl");
    assert!(
        grpcurl.exists(),
        "{} (deploy/local/stack.sh install builds it)",
        grpcurl.display()
    );
    let prelude = prelude.replace(".state/bin/grpcurl", grpcurl.to_str().expect("utf-8"));
    let run = |line: &str| {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("{prelude}\n{line}"))
            .current_dir(repo)
            .output()
            .expect("bash runs")
    };
    let json = |output: &std::process::Output| -> Vec<serde_json::Value> {
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::Deserializer::from_slice(&output.stdout)
            .into_iter::<serde_json::Value>()
            .collect::<Result<_, _>>()
            .expect("grpcurl prints JSON")
    };
    // Event `id`'s text and double values as types.proto's JSON shows them.
    let event = |id: i64| {
        let row = devkit::event_row(id);
        let (Some(Kind::Text(name)), Some(Kind::Double(score))) = (&row.values[1].kind, &row.values[2].kind) else {
            panic!("event_row's shape changed");
        };
        (name.clone(), *score)
    };
    let commands: Vec<&str> = block.lines().filter(|l| l.starts_with("$q ")).collect();
    assert_eq!(commands.len(), 5, "the README's grpcurl examples changed: {commands:?}");
    let mut checked = Vec::new();
    for command in commands {
        let rpc = command.rsplit('/').next().expect("an RPC");
        let output = run(command);
        if command.contains("DELETE") {
            assert!(!output.status.success());
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains("PermissionDenied") && stderr.contains("READ_ONLY"),
                "{stderr}"
            );
            checked.push("refused");
            continue;
        }
        let answers = json(&output);
        match rpc {
            "Get" => {
                let result = &answers[0]["result"];
                let column = |name: &str| {
                    let at = result["columns"]
                        .as_array()
                        .expect("columns")
                        .iter()
                        .position(|c| c["name"] == name)
                        .expect("column");
                    result["rows"][0]["values"][at].clone()
                };
                let (name, score) = event(42);
                assert_eq!(column("id"), serde_json::json!({"int": "42"}));
                assert_eq!(column("name"), serde_json::json!({ "text": name }));
                assert_eq!(column("score")["double"].as_f64(), Some(score));
            }
            "Execute" => {
                let rows = answers[0]["result"]["rows"].as_array().expect("rows").clone();
                let got: Vec<_> = rows.iter().map(|r| r["values"].clone()).collect();
                let want: Vec<_> = [1, 2]
                    .map(|id| serde_json::json!([{"int": id.to_string()}, {"text": event(id).0}]))
                    .to_vec();
                assert_eq!(got, want);
            }
            "PlanScan" => {
                assert!(answers[0]["splits"].as_array().expect("splits").len() >= 4);
            }
            "Scan" => {
                let mut ids: Vec<i64> = answers
                    .iter()
                    .flat_map(|page| page["page"]["rows"].as_array().cloned().unwrap_or_default())
                    .map(|row| row["values"][0]["int"].as_str().expect("id").parse().expect("a number"))
                    .collect();
                ids.sort_unstable();
                let want: Vec<i64> = (0..100).filter(|&id| event(id).1 < 1.5).collect();
                assert_eq!(ids, want);
                let total = answers[0]["splitsTotal"].as_u64().expect("splitsTotal");
                let done = answers.iter().filter(|page| page["splitDone"] == true).count();
                assert_eq!(done as u64, total, "every split ends");
            }
            other => panic!("an example of an unknown RPC: {other}"),
        }
        checked.push(rpc);
    }
    assert_eq!(checked, ["Get", "Execute", "PlanScan", "Scan", "refused"]);
    // The refused DELETE deleted nothing.
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let (left,) = session
        .query_unpaged(format!("SELECT count(*) FROM {table} WHERE id = 1"), ())
        .await
        .expect("count")
        .into_rows_result()
        .expect("rows")
        .single_row::<(i64,)>()
        .expect("one row");
    assert_eq!(left, 1);
    assert!(gateway.stop().expect("stop").success());
}

/// The Python example (its gRPC client code generated from proto/ by grpcio-tools) writes rows, gets them back
/// by key, scans them and sees a DELETE refused, against a real gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_writes_gets_and_scans() {
    let _lock = gateway_lock().await;
    let names = Names::new("query_python");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let gateway = start(&names, "");
    let stdout = crate::run_python_example(&format!("{}.events", names.keyspace), &[]);
    assert!(stdout.contains("python example OK: 500 rows"));
    // What it wrote is in the table.
    let rows = session
        .query_unpaged(format!("SELECT count(*) FROM {}.events", names.keyspace), ())
        .await
        .expect("count")
        .into_rows_result()
        .expect("rows")
        .single_row::<(i64,)>()
        .expect("one row")
        .0;
    assert_eq!(rows, 500);
    assert!(gateway.stop().expect("stop").success());
}

/// The Python shard-aware writer (`deploy/clients/python/shardgate_writer.py`: topology from
/// `GetTopology`, Murmur3 from the Python driver's `Murmur3Token`, a channel per core port)
/// writes 20,000 rows: every row read back exact, every core received some, none forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_shard_aware_writer_forwards_nothing() {
    use futures::TryStreamExt;
    const ROWS: i64 = 20_000;
    let _lock = gateway_lock().await;
    let names = Names::new("query_python_shards");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let gateway = start(&names, "");
    let table = format!("{}.events", names.keyspace);
    let stdout = crate::run_python(&["shard_aware.py", &table, devkit::INGEST_LISTEN, &ROWS.to_string()]);
    assert!(
        stdout.contains(&format!("python shard-aware writer OK: {ROWS} rows")),
        "{stdout}"
    );
    let forwarded = devkit::scrape_metric_where(
        devkit::ADMIN_LISTEN,
        shardgate::telemetry::metric::ROWS_FORWARDED,
        &[("source", "grpc")],
    )
    .expect("scrape");
    assert_eq!(forwarded, 0.0, "no row forwarded between cores");
    let cores = std::thread::available_parallelism().expect("cpus").get();
    for core in 0..cores {
        let received = devkit::scrape_metric_where(
            devkit::ADMIN_LISTEN,
            shardgate::telemetry::metric::ROWS_RECEIVED,
            &[("source", "grpc"), ("core", &core.to_string())],
        )
        .expect("scrape");
        assert!(received > 0.0, "core {core} received rows of its own");
    }
    let mut rows = session
        .query_iter(format!("SELECT id, name, score, at, tags FROM {table}"), ())
        .await
        .expect("select")
        .rows_stream::<(i64, String, f64, scylla::value::CqlTimestamp, Vec<i32>)>()
        .expect("typed rows");
    let mut seen = std::collections::BTreeSet::new();
    while let Some((id, name, score, at, tags)) = rows.try_next().await.expect("row") {
        assert_eq!(name, format!("python-{id}"));
        assert_eq!(score, id as f64 * 0.25);
        assert_eq!(at.0, 1_700_000_000_000 + id);
        assert_eq!(tags, vec![(id % 5) as i32, 7]);
        assert!(seen.insert(id), "row {id} once");
    }
    assert_eq!(seen.len() as i64, ROWS);
    assert_eq!(seen.last().copied(), Some(ROWS - 1));
    assert!(gateway.stop().expect("stop").success());
}
