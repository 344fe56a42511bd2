//! Processing jobs (`shardgate job run`) against the real Cassandra, through a real gateway:
//! scan → filter → aggregate (per customer and hour; per hour with distinct customers) → table,
//! every result recomputed here from the generated orders; a job killed mid-run and run again
//! finishes its run with the same results and write timestamps; two runners share one job's
//! splits, one is killed, the other takes its splits over when their leases run out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use shardgate::client::ShardAwareClient;
use shardgate::devkit::{self, Gateway};
use shardgate::wire::proto::value::Kind;
use shardgate::wire::proto::{Row, RowBatch, Value};

use crate::{gateway_binary, gateway_lock, Names};

const ORDERS: i64 = 200_000;
/// 2026-01-01T00:00:00Z.
const BASE_MS: i64 = 1_767_225_600_000;
const HOUR_MS: i64 = 3_600_000;
const STATUSES: [&str; 5] = ["paid", "paid", "paid", "cancelled", "refunded"];

/// Order `i`: (customer, amount in cents, status, placed at), spread over 24 hours.
fn order(i: i64) -> (i64, i64, &'static str, i64) {
    (
        i * 7_919 % 500,
        i * 37 % 10_000,
        STATUSES[(i % 5) as usize],
        BASE_MS + i * 432,
    )
}

fn v(kind: Kind) -> Value {
    Value { kind: Some(kind) }
}

/// Recreates the keyspace with the orders table and both result tables, starts a gateway whose
/// config holds `jobs`, and writes the orders through it.
async fn setup(names: &Names, jobs: &str) -> (Gateway, std::path::PathBuf) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let keyspace = &names.keyspace;
    devkit::recreate_keyspace_with(
        &session,
        keyspace,
        format!(
            "CREATE TABLE {keyspace}.orders (order_id bigint PRIMARY KEY, customer_id bigint, amount bigint, \
             status text, placed_at timestamp)"
        ),
    )
    .await
    .expect("keyspace");
    for table in [
        format!(
            "CREATE TABLE {keyspace}.by_customer_hour (customer_id bigint, window_start timestamp, orders bigint, \
             revenue bigint, biggest bigint, PRIMARY KEY (customer_id, window_start))"
        ),
        format!("CREATE TABLE {keyspace}.hourly (window_start timestamp PRIMARY KEY, customers bigint, orders bigint)"),
        format!("CREATE TABLE {keyspace}.counts (id int PRIMARY KEY, orders counter)"),
        format!("CREATE TABLE {keyspace}.by_status (status text PRIMARY KEY, orders bigint, shares bigint)"),
        format!("CREATE TABLE {keyspace}.query_totals (status text PRIMARY KEY, orders bigint, shares bigint)"),
    ] {
        session.query_unpaged(table, ()).await.expect("result table");
    }
    session.await_schema_agreement().await.expect("schema agreement");
    let config = names.dir.join("gateway.toml");
    let text = format!(
        "{}\n{}\n",
        devkit::ingest_gateway_toml("", 2048, 64),
        jobs.replace("KS", keyspace)
    );
    std::fs::write(&config, text).expect("write config");
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");
    let table = format!("{keyspace}.orders");
    let writer = ShardAwareClient::connect(devkit::INGEST_LISTEN, &[&table])
        .await
        .expect("ingest client connects");
    let columns: Vec<String> = ["order_id", "customer_id", "amount", "status", "placed_at"]
        .map(String::from)
        .to_vec();
    let batches: Vec<RowBatch> = (0..ORDERS)
        .step_by(1000)
        .map(|start| RowBatch {
            table: table.clone(),
            columns: columns.clone(),
            rows: (start..start + 1000)
                .map(|i| {
                    let (customer, amount, status, at) = order(i);
                    Row {
                        values: vec![
                            v(Kind::Int(i)),
                            v(Kind::Int(customer)),
                            v(Kind::Int(amount)),
                            v(Kind::Text(status.into())),
                            v(Kind::TimestampMs(at)),
                        ],
                    }
                })
                .collect(),
            timestamp_us: 0,
        })
        .collect();
    let summary = writer.stream(batches).await.expect("write orders");
    assert_eq!(summary.written, ORDERS as u64);
    (gateway, config)
}

const BY_CUSTOMER_HOUR: &str = r#"
[[job]]
name = "by_customer_hour"
state_keyspace = "KS"
lease = "3s"
parallel_splits = 2
filter = "row.status != 'cancelled'"
[job.source]
table = "KS.orders"
columns = ["customer_id", "amount", "status", "placed_at"]
min_splits = 24
[job.aggregate]
group_by = ["customer_id"]
window = { column = "placed_at", size = "1h" }
measures = { orders = "count()", revenue = "sum(row.amount)", biggest = "max(row.amount)" }
[[job.sink]]
table = "KS.by_customer_hour"
"#;

const HOURLY: &str = r#"
[[job]]
name = "hourly"
state_keyspace = "KS"
[job.source]
table = "KS.orders"
[job.aggregate]
window = { column = "placed_at", size = "1h" }
measures = { customers = "distinct(row.customer_id)", orders = "count()" }
[[job.sink]]
table = "KS.hourly"
[[job.sink]]
kafka = { brokers = ["127.0.0.1:9095"], topic = "TOPIC", security = KAFKA_SECURITY }
[[job.sink]]
nats = { url = "nats://127.0.0.1:4222", subject = "SUBJECT", jetstream = true }
[[job.sink]]
rabbitmq = { url = "amqp://guest:guest@127.0.0.1:5672/%2f", routing_key = "QUEUE" }
"#;

/// A query job: the paid orders' count and amounts, read by a CQL statement with a bind (a
/// table scan, so split at the table's shard boundaries).
const PAID_BY_QUERY: &str = r#"
[[job]]
name = "paid_by_query"
state_keyspace = "KS"
[job.source]
query = "SELECT status, amount FROM KS.orders WHERE status = ? ALLOW FILTERING"
binds = ["paid"]
[job.aggregate]
group_by = ["status"]
measures = { orders = "count()", shares = "sum(row.amount)" }
[[job.sink]]
table = "KS.query_totals"
"#;

/// `hourly`'s results as Protobuf messages (`schemas/job_results.proto`) on a Kafka topic.
const HOURLY_PROTOBUF: &str = r#"
[[job]]
name = "hourly_pb"
state_keyspace = "KS"
[job.source]
table = "KS.orders"
[job.aggregate]
window = { column = "placed_at", size = "1h" }
measures = { customers = "distinct(row.customer_id)", orders = "count()" }
[[job.sink]]
kafka = { brokers = ["127.0.0.1:9092"], topic = "TOPIC.pb" }
[job.protobuf]
message = "shardgate.examples.HourlyOrders"
files = ["schemas/job_results.proto"]
"#;

/// A job whose sink is a counter table (refused), and one whose sink table does not exist.
const REFUSED: &str = r#"
[[job]]
name = "into_counters"
state_keyspace = "KS"
[job.source]
table = "KS.orders"
[job.aggregate]
measures = { orders = "count()" }
[[job.sink]]
table = "KS.counts"

[[job]]
name = "into_nowhere"
state_keyspace = "KS"
[job.source]
table = "KS.orders"
[[job.sink]]
table = "KS.nowhere"
"#;

/// A job whose measure fails on some rows (division by zero when `amount % 7 == 0`): those rows
/// go to a dead-letter table and the results count the others.
const WITH_FAILURES: &str = r#"
[[job]]
name = "with_failures"
state_keyspace = "KS"
[job.source]
table = "KS.orders"
[job.aggregate]
group_by = ["status"]
measures = { orders = "count()", shares = "sum(700 / (row.amount % 7))" }
[[job.sink]]
table = "KS.by_status"
[job.dead_letter]
kind = "table"
table = "KS.job_dead_letters"
"#;

fn job_command(config: &std::path::Path, job: &str) -> std::process::Command {
    let mut command = std::process::Command::new(gateway_binary());
    command
        .args(["job", "run", "--config"])
        .arg(config)
        .args(["--job", job]);
    command
}

/// (customer, hour start) → (orders, revenue, biggest), computed from the generated orders.
fn expected_by_customer_hour() -> BTreeMap<(i64, i64), (i64, i64, i64)> {
    let mut expected: BTreeMap<(i64, i64), (i64, i64, i64)> = BTreeMap::new();
    for i in 0..ORDERS {
        let (customer, amount, status, at) = order(i);
        if status == "cancelled" {
            continue;
        }
        let entry = expected
            .entry((customer, at.div_euclid(HOUR_MS) * HOUR_MS))
            .or_insert((0, 0, i64::MIN));
        entry.0 += 1;
        entry.1 += amount;
        entry.2 = entry.2.max(amount);
    }
    expected
}

/// The `by_customer_hour` table, with each row's write time of `revenue`.
async fn read_by_customer_hour(keyspace: &str) -> (BTreeMap<(i64, i64), (i64, i64, i64)>, BTreeSet<i64>) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    type Result = (i64, scylla::value::CqlTimestamp, i64, i64, i64, i64);
    let rows: Vec<Result> = devkit::select::<Result>(
        &session,
        format!(
            "SELECT customer_id, window_start, orders, revenue, biggest, writetime(revenue) \
                 FROM {keyspace}.by_customer_hour"
        ),
    )
    .await
    .expect("select");
    let times = rows.iter().map(|r| r.5).collect();
    let table = rows
        .into_iter()
        .map(|(customer, start, orders, revenue, biggest, _)| ((customer, start.0), (orders, revenue, biggest)))
        .collect();
    (table, times)
}

/// (run, split owners of the done splits, splits done, splits in all) of a job's current run.
async fn progress(keyspace: &str, job: &str) -> (i64, Vec<String>, usize, usize) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let Some((run,)) = session
        .query_unpaged(format!("SELECT run FROM {keyspace}.job_runs WHERE job = ?"), (job,))
        .await
        .ok()
        .and_then(|r| r.into_rows_result().ok())
        .and_then(|r| r.maybe_first_row::<(i64,)>().ok().flatten())
    else {
        return (0, Vec::new(), 0, 0);
    };
    let splits: Vec<(Option<String>, Option<bool>)> = session
        .query_iter(
            format!("SELECT owner, done FROM {keyspace}.job_splits WHERE job = ? AND run = ?"),
            (job, run),
        )
        .await
        .expect("select")
        .rows_stream::<(Option<String>, Option<bool>)>()
        .expect("typed")
        .try_collect()
        .await
        .expect("rows");
    let owners = splits
        .iter()
        .filter(|s| s.1 == Some(true))
        .filter_map(|s| s.0.clone())
        .collect::<Vec<_>>();
    let done = owners.len();
    (run, owners, done, splits.len())
}

/// Waits until the job's current run has at least `splits` splits done.
async fn wait_done_splits(keyspace: &str, job: &str, splits: usize, child: &mut std::process::Child) {
    let started = Instant::now();
    loop {
        let (_, _, done, _) = progress(keyspace, job).await;
        if done >= splits {
            return;
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the job ended before it was killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no progress: {done} splits done"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An hourly result published as JSON: (window start, (customers, orders)).
fn hourly_result(payload: &[u8]) -> (i64, (i64, i64)) {
    let object: serde_json::Value = serde_json::from_slice(payload).expect("a JSON result");
    let start = chrono::DateTime::parse_from_rfc3339(object["window_start"].as_str().expect("window_start"))
        .expect("RFC 3339")
        .timestamp_millis();
    let values = (
        object["customers"].as_i64().expect("customers"),
        object["orders"].as_i64().expect("orders"),
    );
    (start, values)
}

/// Both jobs run to the end; every result equals the aggregation computed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_jobs_aggregate_exactly_into_tables() {
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_exact");
    // The hourly results go to a table, a Kafka topic (written over the broker's SASL_SSL
    // listener, read back here over the plain one), a JetStream stream and a RabbitMQ queue.
    let stream = format!("JOBS_{}", names.group.replace('-', "_"));
    let subject = format!("{}.hourly", names.topic);
    devkit::create_topic(&names.topic, 1).await.expect("topic");
    devkit::create_stream(&stream, &[&subject]).await.expect("stream");
    let queue = format!("{}.hourly", names.group);
    devkit::recreate_queue(&queue).await.expect("queue");
    let hourly = HOURLY
        .replace("KAFKA_SECURITY", &devkit::kafka_sasl_ssl_security_toml())
        .replace("TOPIC", &names.topic)
        .replace("SUBJECT", &subject)
        .replace("QUEUE", &queue);
    devkit::create_topic(&format!("{}.pb", names.topic), 1)
        .await
        .expect("topic");
    let hourly_pb = HOURLY_PROTOBUF.replace("TOPIC", &names.topic);
    let (gateway, config) = setup(
        &names,
        &format!("{BY_CUSTOMER_HOUR}{hourly}{hourly_pb}{PAID_BY_QUERY}{REFUSED}{WITH_FAILURES}"),
    )
    .await;
    // Rows a measure fails on: dead-lettered with their reason and values, not counted.
    let output = job_command(&config, "with_failures").output().expect("job runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let failing: BTreeSet<i64> = (0..ORDERS).filter(|i| order(*i).1 % 7 == 0).collect();
    assert!(
        stderr.contains(&format!("{} failed", failing.len())) && stderr.contains("expression_failed"),
        "{stderr}"
    );
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    type Letter = (String, String, std::collections::HashMap<String, String>, Vec<u8>);
    let letters: Vec<Letter> = devkit::select::<Letter>(
        &session,
        format!(
            "SELECT reason_code, reason, headers, payload FROM {}.job_dead_letters",
            names.keyspace
        ),
    )
    .await
    .expect("select");
    let mut dead: BTreeSet<i64> = BTreeSet::new();
    for (code, reason, headers, payload) in &letters {
        assert_eq!(code, "expression_failed");
        assert!(reason.contains("measure `shares`"), "{reason}");
        assert_eq!(headers["shardgate.route"], "with_failures");
        assert_eq!(headers["shardgate.source.table"], format!("{}.orders", names.keyspace));
        let row: serde_json::Value = serde_json::from_slice(payload).expect("the row as JSON");
        let id = row["order_id"].as_i64().expect("order_id");
        assert_eq!(row["amount"].as_i64(), Some(order(id).1));
        dead.insert(id);
    }
    assert_eq!(dead, failing, "every failing row dead-lettered, once");
    let mut by_status: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for i in (0..ORDERS).filter(|i| !failing.contains(i)) {
        let (_, amount, status, _) = order(i);
        let entry = by_status.entry(status.to_string()).or_default();
        entry.0 += 1;
        entry.1 += 700 / (amount % 7);
    }
    let got: BTreeMap<String, (i64, i64)> = session
        .query_iter(
            format!("SELECT status, orders, shares FROM {}.by_status", names.keyspace),
            (),
        )
        .await
        .expect("select")
        .rows_stream::<(String, i64, i64)>()
        .expect("typed")
        .map_ok(|(status, orders, shares)| (status, (orders, shares)))
        .try_collect()
        .await
        .expect("rows");
    assert_eq!(got, by_status);
    for (job, reason) in [
        ("into_counters", "is a counter table; counters are not idempotent"),
        ("into_nowhere", "does not exist"),
    ] {
        let output = job_command(&config, job).output().expect("job runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(reason), "{job}: {stderr}");
    }
    for job in ["by_customer_hour", "hourly", "hourly_pb"] {
        let output = job_command(&config, job).output().expect("job runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{job}: {stderr}");
        assert!(
            stderr.contains(&format!("{ORDERS} rows read")) && stderr.contains("0 failed"),
            "{stderr}"
        );
    }
    // The query job read every order the statement selects: the paid ones.
    let paid: Vec<i64> = (0..ORDERS)
        .filter(|i| order(*i).2 == "paid")
        .map(|i| order(i).1)
        .collect();
    // Its SELECT is a scan of the table: planned into the table's splits, like a scan job.
    let output = job_command(&config, "paid_by_query").output().expect("job runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let (_, _, done, splits) = progress(&names.keyspace, "paid_by_query").await;
    assert!(splits > 1 && done == splits, "{done} of {splits} splits done");
    assert!(
        stderr.contains(&format!("{splits} of {splits} splits here, {} rows read", paid.len())),
        "{stderr}"
    );
    let totals: Vec<(String, i64, i64)> = devkit::connect(devkit::CASSANDRA)
        .await
        .expect("Cassandra is up")
        .query_iter(
            format!("SELECT status, orders, shares FROM {}.query_totals", names.keyspace),
            (),
        )
        .await
        .expect("select")
        .rows_stream::<(String, i64, i64)>()
        .expect("typed")
        .try_collect()
        .await
        .expect("rows");
    assert_eq!(
        totals,
        [("paid".to_string(), paid.len() as i64, paid.iter().sum::<i64>())]
    );
    let expected = expected_by_customer_hour();
    let (table, times) = read_by_customer_hour(&names.keyspace).await;
    assert_eq!(table.len(), expected.len());
    assert_eq!(table, expected);
    let (run, _, done, splits) = progress(&names.keyspace, "by_customer_hour").await;
    assert_eq!(done, splits);
    assert_eq!(
        times,
        BTreeSet::from([run]),
        "every result written with the run's timestamp"
    );

    // Per hour: orders exact; distinct customers within the sketch's error of the true count.
    let mut hours: BTreeMap<i64, (i64, BTreeSet<i64>)> = BTreeMap::new();
    for i in 0..ORDERS {
        let (customer, _, _, at) = order(i);
        let hour = hours.entry(at.div_euclid(HOUR_MS) * HOUR_MS).or_default();
        hour.0 += 1;
        hour.1.insert(customer);
    }
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let hourly = session
        .query_iter(
            format!("SELECT window_start, customers, orders FROM {}.hourly", names.keyspace),
            (),
        )
        .await
        .expect("select")
        .rows_stream::<(scylla::value::CqlTimestamp, i64, i64)>()
        .expect("typed")
        .try_collect::<Vec<_>>()
        .await
        .expect("rows");
    assert_eq!(hourly.len(), hours.len());
    let mut in_table = BTreeMap::new();
    for (start, customers, orders) in hourly {
        let (count, distinct) = &hours[&start.0];
        assert_eq!(orders, *count, "orders in the hour at {}", start.0);
        let error = (customers - distinct.len() as i64).abs() as f64 / distinct.len() as f64;
        assert!(
            error < 0.05,
            "{customers} distinct customers estimated, {} true",
            distinct.len()
        );
        in_table.insert(start.0, (customers, orders));
    }
    // The same results on the broker sinks: one message per hour (asked for one more, none
    // came), each under its own stable id, as JSON with the table's values.
    let as_results = |payloads: Vec<(String, Vec<u8>)>| {
        let mut results = BTreeMap::new();
        let mut ids = BTreeSet::new();
        for (id, payload) in payloads {
            assert!(ids.insert(id.clone()), "message id {id} twice");
            assert!(id.starts_with("hourly."), "{id}");
            let (start, values) = hourly_result(&payload);
            results.insert(start, values);
        }
        results
    };
    let kafka = devkit::read_topic(&names.topic, in_table.len() + 1, Duration::from_secs(10)).expect("topic");
    assert_eq!(kafka.len(), in_table.len());
    let kafka = kafka
        .into_iter()
        .map(|record| {
            let key = String::from_utf8(record.key.expect("a key")).expect("utf-8");
            assert_eq!(record.headers.get("shardgate.message_id"), Some(&key));
            (key, record.payload.expect("a payload"))
        })
        .collect();
    assert_eq!(as_results(kafka), in_table);
    // As Protobuf: each message decodes as `HourlyOrders` with the table's values.
    let files = protox::compile(["schemas/job_results.proto"], ["schemas"]).expect("the results' proto");
    let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(files).expect("descriptors");
    let message = pool
        .get_message_by_name("shardgate.examples.HourlyOrders")
        .expect("HourlyOrders");
    let records = devkit::read_topic(
        &format!("{}.pb", names.topic),
        in_table.len() + 1,
        Duration::from_secs(10),
    )
    .expect("protobuf topic");
    assert_eq!(records.len(), in_table.len());
    let mut decoded = BTreeMap::new();
    for record in records {
        let payload = record.payload.expect("a payload");
        let result = prost_reflect::DynamicMessage::decode(message.clone(), payload.as_slice()).expect("HourlyOrders");
        let field = |name: &str| result.get_field_by_name(name).expect(name).into_owned();
        let start = chrono::DateTime::parse_from_rfc3339(field("window_start").as_str().expect("text"))
            .expect("RFC 3339")
            .timestamp_millis();
        let values = (
            field("customers").as_i64().expect("int64"),
            field("orders").as_i64().expect("int64"),
        );
        decoded.insert(start, values);
    }
    assert_eq!(decoded, in_table);
    let jetstream = devkit::read_stream(&stream, in_table.len() + 1, Duration::from_secs(5))
        .await
        .expect("stream");
    assert_eq!(jetstream.len(), in_table.len());
    let jetstream = jetstream
        .into_iter()
        .map(|message| (message.headers["Nats-Msg-Id"].clone(), message.payload))
        .collect();
    assert_eq!(as_results(jetstream), in_table);
    let rabbitmq = devkit::read_queue(&queue, in_table.len() + 1, Duration::from_secs(5))
        .await
        .expect("queue");
    assert_eq!(rabbitmq.len(), in_table.len());
    let rabbitmq = rabbitmq
        .into_iter()
        .map(|message| (message.message_id.expect("an AMQP message_id"), message.payload))
        .collect();
    assert_eq!(as_results(rabbitmq), in_table);
    assert!(gateway.stop().expect("stop").success());
}

/// A runner killed (SIGKILL) with a third of its splits done, then run again: the run goes on
/// (the first runner's splits kept, the rest done by the second) and the results are exact,
/// all written with the run's one timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_job_resumes_its_run_and_counts_nothing_twice() {
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_resume");
    let (gateway, config) = setup(&names, BY_CUSTOMER_HOUR).await;
    // `--metrics`: the runner serves its job metrics while it runs.
    let metrics = "127.0.0.1:9196";
    let mut first = job_command(&config, "by_customer_hour")
        .args(["--metrics", metrics])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("job starts");
    wait_done_splits(&names.keyspace, "by_customer_hour", 8, &mut first).await;
    let scrape = |name: &str| {
        devkit::scrape_metric_where(metrics, name, &[("job", "by_customer_hour")]).expect("the runner's metrics")
    };
    let (read, total) = (scrape("shardgate_job_rows_read_total"), scrape("shardgate_job_splits"));
    assert!(read > 0.0 && read < ORDERS as f64, "rows read so far: {read}");
    assert!(total > 8.0, "splits in the run: {total}");
    first.kill().expect("kill");
    first.wait().expect("reaped");
    let (run, owners, done, splits) = progress(&names.keyspace, "by_customer_hour").await;
    assert!(done < splits, "killed before the end: {done} of {splits}");
    let output = job_command(&config, "by_customer_hour").output().expect("job runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("run {run}:")),
        "the same run goes on: {stderr}"
    );
    let (after, all_owners, done, splits) = progress(&names.keyspace, "by_customer_hour").await;
    assert_eq!((after, done), (run, splits));
    let distinct: BTreeSet<&String> = all_owners.iter().collect();
    assert_eq!(distinct.len(), 2, "splits done by both runners: {all_owners:?}");
    assert!(
        owners.iter().all(|o| all_owners.contains(o)),
        "the first runner's splits kept"
    );
    let (table, times) = read_by_customer_hour(&names.keyspace).await;
    assert_eq!(table, expected_by_customer_hour());
    assert_eq!(times, BTreeSet::from([run]));
    assert!(gateway.stop().expect("stop").success());
}

/// Two runners of one job share its splits; one is killed mid-run and the other finishes,
/// taking over the killed runner's claimed splits when their leases run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_share_a_job_and_one_takes_over_when_the_other_dies() {
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_shared");
    // One split at a time each, of 48: both runners get splits before the run ends.
    let job = BY_CUSTOMER_HOUR
        .replace("parallel_splits = 2", "parallel_splits = 1")
        .replace("min_splits = 24", "min_splits = 48");
    let (gateway, config) = setup(&names, &job).await;
    let mut doomed = job_command(&config, "by_customer_hour")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("job starts");
    wait_done_splits(&names.keyspace, "by_customer_hour", 1, &mut doomed).await;
    let survivor = job_command(&config, "by_customer_hour")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("job starts");
    // Both at work: the survivor finishes a split of its own, then the other dies.
    let started = Instant::now();
    let mut owners = Vec::new();
    while owners.len() < 2 {
        let (_, done_by, _, _) = progress(&names.keyspace, "by_customer_hour").await;
        owners = done_by.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the second runner did no split"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    doomed.kill().expect("kill");
    doomed.wait().expect("reaped");
    let (_, _, done, splits) = progress(&names.keyspace, "by_customer_hour").await;
    assert!(done < splits, "killed before the end: {done} of {splits}");
    let output = survivor.wait_with_output().expect("survivor ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let (run, all_owners, done, splits) = progress(&names.keyspace, "by_customer_hour").await;
    assert_eq!(done, splits);
    assert_eq!(all_owners.iter().collect::<BTreeSet<_>>().len(), 2, "{all_owners:?}");
    let (table, times) = read_by_customer_hour(&names.keyspace).await;
    assert_eq!(table, expected_by_customer_hour());
    assert_eq!(times, BTreeSet::from([run]));
    assert!(gateway.stop().expect("stop").success());
}

/// A `shardgate job run` process is in every gateway's view of its job: `GetJobStatus` names
/// it among the run's runners while it holds a split; `PauseJob` on a gateway where the job
/// does not run marks the run paused (that process finishes the split in hand and claims no
/// other), `ResumeJob` marks it running again (splits are done again), and `CancelJob` marks
/// it cancelled, which stops that process before its next claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_run_elsewhere_is_seen_paused_resumed_and_cancelled_through_the_jobs_service() {
    use shardgate::wire::proto::jobs_client::JobsClient;
    use shardgate::wire::proto::JobRequest;
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_elsewhere");
    // One split at a time, of 48: the run lasts long enough to be watched and cancelled.
    let job = BY_CUSTOMER_HOUR
        .replace("parallel_splits = 2", "parallel_splits = 1")
        .replace("min_splits = 24", "min_splits = 48");
    let (gateway, config) = setup(&names, &job).await;
    let mut jobs = JobsClient::connect(format!("http://{}", devkit::INGEST_LISTEN))
        .await
        .expect("Jobs client");
    let request = || JobRequest {
        job: "by_customer_hour".into(),
    };
    let refused = jobs.cancel_job(request()).await.expect_err("nothing runs the job yet");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("no run of it is running elsewhere"),
        "{}",
        refused.message()
    );

    let mut runner = job_command(&config, "by_customer_hour")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("job starts");
    wait_done_splits(&names.keyspace, "by_customer_hour", 1, &mut runner).await;
    let pid = format!("-{}-", runner.id());
    let started = Instant::now();
    let seen = loop {
        let status = jobs.get_job_status(request()).await.expect("status").into_inner();
        if status.runners.iter().any(|r| r.contains(&pid)) {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the runner (pid {}) never listed: {status:?}",
            runner.id()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seen.state, "idle", "it does not run on this gateway");
    assert_eq!(seen.run_state, "running");
    assert_eq!(seen.runners.len(), 1, "{:?}", seen.runners);
    assert!(
        seen.splits_done >= 1 && seen.splits_done < seen.splits_total,
        "{seen:?}"
    );
    let refused = jobs
        .resume_job(request())
        .await
        .expect_err("a running run does not resume");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("its run is running: only a paused job resumes"),
        "{}",
        refused.message()
    );

    // Paused from the gateway: the process finishes the split it reads, then claims none.
    let paused = jobs.pause_job(request()).await.expect("pause").into_inner();
    assert_eq!((paused.state.as_str(), paused.run_state.as_str()), ("idle", "paused"));
    let refused = jobs
        .pause_job(request())
        .await
        .expect_err("a paused run does not pause");
    assert!(
        refused
            .message()
            .contains("its run is paused: only a running job pauses"),
        "{}",
        refused.message()
    );
    let started = Instant::now();
    let settled = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = jobs.get_job_status(request()).await.expect("status").into_inner();
        if status.runners.is_empty() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the runner still holds a split: {status:?}"
        );
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = jobs.get_job_status(request()).await.expect("status").into_inner();
    assert_eq!(still.splits_done, settled.splits_done, "no split done while paused");
    assert!(still.splits_done < still.splits_total, "{still:?}");
    assert!(
        runner.try_wait().expect("the runner").is_none(),
        "a paused `job run` waits"
    );

    let resumed = jobs.resume_job(request()).await.expect("resume").into_inner();
    assert_eq!(resumed.run_state, "running");
    let started = Instant::now();
    loop {
        let status = jobs.get_job_status(request()).await.expect("status").into_inner();
        if status.splits_done > still.splits_done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no split done after resuming: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let cancelled = jobs.cancel_job(request()).await.expect("cancel").into_inner();
    assert_eq!(
        (cancelled.state.as_str(), cancelled.run_state.as_str()),
        ("idle", "cancelled")
    );
    let output = runner.wait_with_output().expect("the runner ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a cancelled run does not end well: {stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    let (run, _, done, splits) = progress(&names.keyspace, "by_customer_hour").await;
    assert_eq!(run, cancelled.run);
    assert!(done < splits, "stopped before the end: {done} of {splits}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = jobs.get_job_status(request()).await.expect("status").into_inner();
    assert_eq!(
        after.splits_done, done as u32,
        "no split finishes after the cancel: {after:?}"
    );
    assert!(gateway.stop().expect("stop").success());
}

/// A job with `every` runs inside `serve`: a run that started after the orders were written
/// ends with exact results, and the gateway's metrics count its runs, rows and splits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_runs_inside_serve_with_metrics() {
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_scheduled");
    let job = BY_CUSTOMER_HOUR.replace("lease = \"3s\"", "lease = \"3s\"\nevery = \"2s\"");
    let (gateway, _config) = setup(&names, &job).await;
    let written_by_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let started = Instant::now();
    let run = loop {
        let current = session
            .query_unpaged(
                format!("SELECT run, state FROM {}.job_runs WHERE job = ?", names.keyspace),
                ("by_customer_hour",),
            )
            .await
            .ok()
            .and_then(|r| r.into_rows_result().ok())
            .and_then(|r| r.maybe_first_row::<(i64, String)>().ok().flatten());
        if let Some((run, state)) = current {
            if run > written_by_us && state == "done" {
                break run;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no scheduled run after the writes ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (table, times) = read_by_customer_hour(&names.keyspace).await;
    assert_eq!(table, expected_by_customer_hour());
    assert!(times.iter().all(|t| *t >= run), "the latest run wrote every result");
    let metric = |name: &str, labels: &[(&str, &str)]| {
        devkit::scrape_metric_where(devkit::ADMIN_LISTEN, name, labels).expect("metrics")
    };
    let job = [("job", "by_customer_hour")];
    assert!(
        metric(
            shardgate::telemetry::metric::JOB_RUNS,
            &[("job", "by_customer_hour"), ("outcome", "done")]
        ) >= 1.0
    );
    assert!(metric(shardgate::telemetry::metric::JOB_ROWS_READ, &job) >= ORDERS as f64);
    assert!(metric(shardgate::telemetry::metric::JOB_ROWS_OUT, &job) >= expected_by_customer_hour().len() as f64);
    // The gauges follow the current run (the next may have begun): 24 splits planned.
    let total = metric(shardgate::telemetry::metric::JOB_SPLITS_TOTAL, &job);
    assert!(total >= 24.0, "{total} splits");
    assert!(metric(shardgate::telemetry::metric::JOB_SPLITS_DONE, &job) <= total);
    assert!(gateway.stop().expect("stop").success());
}

/// 1970-based ms of sample order `i`'s `placed_at` (as `devkit::order_message` writes it).
fn placed_at_ms(i: u64) -> i64 {
    devkit::expected_order(i).placed_at_ms
}

/// Sample order `i`, placed at `at_ms` instead of its own time.
fn order_placed_at(i: u64, at_ms: i64) -> (String, Vec<u8>) {
    let (key, payload) = devkit::order_message(i);
    let mut object: serde_json::Value = serde_json::from_str(&payload).expect("sample order JSON");
    object["placed_at"] = serde_json::Value::String(
        chrono::DateTime::from_timestamp_millis(at_ms)
            .expect("a time")
            .to_rfc3339(),
    );
    (key, serde_json::to_vec(&object).expect("JSON"))
}

const MINUTE_MS: i64 = 60_000;

const CITY_MINUTES: &str = r#"
[[job]]
name = "city_minutes"
state_keyspace = "KS"
[job.source]
stream = ["orders"]
checkpoint = "500ms"
[job.aggregate]
group_by = ["city"]
window = { column = "placed_at", size = "1m", lateness = "2m" }
measures = { orders = "count()", items = "sum(row.quantity)", latest = "last(row.quantity)" }
[[job.sink]]
table = "KS.city_minutes"
[[job.sink]]
nats = { url = "nats://127.0.0.1:4222", subject = "SUBJECT", jetstream = true }
[job.dead_letter]
kind = "kafka"
brokers = ["127.0.0.1:9092"]
topic = "LATE"
"#;

/// Messages the stream job has made durable: its partitions' next offsets, summed.
async fn stream_folded(session: &scylla::client::session::Session, keyspace: &str) -> i64 {
    shardgate::job::stream::progress(session, keyspace, "city_minutes")
        .await
        .expect("the job's progress")
        .messages as i64
}

async fn wait_stream_folded(session: &scylla::client::session::Session, keyspace: &str, target: i64) {
    let started = Instant::now();
    loop {
        let folded = stream_folded(session, keyspace).await;
        if folded >= target {
            assert_eq!(folded, target, "more messages made durable than produced");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the stream job made {folded} of {target} messages durable in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The orders table the route writes and the `city_minutes` results table, in `keyspace`.
async fn stream_tables(session: &scylla::client::session::Session, keyspace: &str) {
    devkit::create_orders_table(session, keyspace)
        .await
        .expect("orders table");
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {keyspace}.city_minutes (city text, window_start timestamp, orders bigint, \
                 items bigint, latest bigint, PRIMARY KEY (city, window_start))"
            ),
            (),
        )
        .await
        .expect("result table");
    session.await_schema_agreement().await.expect("schema agreement");
}

/// The orders table, `city_minutes`, a 3-partition topic, the late topic, a JetStream stream
/// for the results, and a gateway config with the orders route and [`CITY_MINUTES`]. Returns
/// the config's path, the late topic and the stream's name.
async fn stream_setup(
    session: &scylla::client::session::Session,
    names: &Names,
) -> (std::path::PathBuf, String, String) {
    let keyspace = &names.keyspace;
    stream_tables(session, keyspace).await;
    devkit::create_topic(&names.topic, 3).await.expect("topic");
    let late_topic = format!("{}.late", names.topic);
    devkit::create_topic(&late_topic, 1).await.expect("late topic");
    let stream = format!("STREAM_{}", names.group.replace('-', "_"));
    let subject = format!("{}.minutes", names.topic);
    devkit::create_stream(&stream, &[&subject]).await.expect("stream");
    let route = devkit::orders_route_toml("orders", keyspace, &names.topic, &names.group, &names.dead_letter_topic);
    let job = CITY_MINUTES
        .replace("KS", keyspace)
        .replace("SUBJECT", &subject)
        .replace("LATE", &late_topic);
    let config = names.dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!("{}\n{job}\n", devkit::ingest_gateway_toml(&route, 2048, 64)),
    )
    .expect("config");
    (config, late_topic, stream)
}

/// (city, window start) → (orders, items, quantity of the latest order — of equally late ones,
/// the greatest) over `counted` (order number, event time).
fn expected_city_minutes(counted: impl Iterator<Item = (u64, i64)>) -> BTreeMap<(String, i64), (i64, i64, i64)> {
    let mut expected: BTreeMap<(String, i64), (i64, i64, i64)> = BTreeMap::new();
    let mut latest: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    for (i, at) in counted {
        let order = devkit::expected_order(i);
        let key = (order.city, at.div_euclid(MINUTE_MS) * MINUTE_MS);
        let quantity = i64::from(order.quantity);
        let entry = expected.entry(key.clone()).or_default();
        entry.0 += 1;
        entry.1 += quantity;
        let last = latest.entry(key).or_insert((at, quantity));
        *last = (*last).max((at, quantity));
    }
    for (key, entry) in expected.iter_mut() {
        entry.2 = latest[key].1;
    }
    expected
}

/// Waits (up to 60 s) for `expected.len()` results in `city_minutes`, checks each was written
/// at its window's end, and asserts they equal `expected`.
async fn assert_city_minutes(
    session: &scylla::client::session::Session,
    keyspace: &str,
    expected: &BTreeMap<(String, i64), (i64, i64, i64)>,
) {
    type Result = (String, scylla::value::CqlTimestamp, i64, i64, i64, i64);
    let read = || async {
        let rows: Vec<Result> = devkit::select::<Result>(
            session,
            format!("SELECT city, window_start, orders, items, latest, WRITETIME(orders) FROM {keyspace}.city_minutes"),
        )
        .await
        .expect("select");
        rows
    };
    let started = Instant::now();
    let rows = loop {
        let rows = read().await;
        if rows.len() >= expected.len() || started.elapsed() > Duration::from_secs(60) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut found: BTreeMap<(String, i64), (i64, i64, i64)> = BTreeMap::new();
    for (city, start, orders, items, latest, written_us) in rows {
        assert_eq!(written_us, (start.0 + MINUTE_MS) * 1_000, "written at the window's end");
        found.insert((city, start.0), (orders, items, latest));
    }
    let differing: Vec<_> = expected
        .iter()
        .filter(|(key, value)| found.get(*key) != Some(value))
        .take(5)
        .map(|(key, value)| format!("{key:?}: expected {value:?}, found {:?}", found.get(key)))
        .collect();
    assert!(differing.is_empty(), "results differ: {differing:?}");
    assert_eq!(found.len(), expected.len(), "no result beyond the expected windows");
}

/// Waits (up to 60 s) until `city_minutes` holds `at_least` results: windows have closed.
async fn wait_results(session: &scylla::client::session::Session, keyspace: &str, at_least: i64) {
    let started = Instant::now();
    loop {
        let written: i64 = session
            .query_unpaged(format!("SELECT COUNT(*) FROM {keyspace}.city_minutes"), ())
            .await
            .expect("count")
            .into_rows_result()
            .expect("rows")
            .first_row::<(i64,)>()
            .expect("a count")
            .0;
        if written >= at_least {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no window closed in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The orders sent after the `main` ones, as (order number, event time): 40 a minute behind the
/// newest (within the lateness: their windows are still open), 20 twenty minutes behind (their
/// windows closed long ago: late), 30 an hour ahead (the watermark passes every window above).
#[allow(clippy::type_complexity)]
fn tail_orders(main: u64) -> (Vec<(u64, i64)>, Vec<(u64, i64)>, Vec<(u64, i64)>) {
    let newest = placed_at_ms(main - 1);
    let within = (0..40)
        .map(|j| (main + j, newest - 60_000 + j as i64 * 1_000))
        .collect();
    let late = (0..20)
        .map(|j| (main + 40 + j, newest - 20 * MINUTE_MS + j as i64 * 1_000))
        .collect();
    let ahead = (0..30).map(|j| (main + 60 + j, newest + 60 * MINUTE_MS)).collect();
    (within, late, ahead)
}

/// One message per result on JetStream stream `stream` (a window closed again after a kill
/// carries the same message id, which JetStream drops), each equal to `expected`'s.
async fn assert_published(stream: &str, expected: &BTreeMap<(String, i64), (i64, i64, i64)>) {
    let messages = devkit::read_stream(stream, expected.len() + 1, Duration::from_secs(10))
        .await
        .expect("stream");
    let ids: BTreeSet<&String> = messages.iter().map(|m| &m.headers["Nats-Msg-Id"]).collect();
    assert_eq!(ids.len(), messages.len(), "unique message ids");
    let published: BTreeMap<(String, i64), (i64, i64, i64)> = messages
        .iter()
        .map(|message| {
            let object: serde_json::Value = serde_json::from_slice(&message.payload).expect("JSON");
            let start = chrono::DateTime::parse_from_rfc3339(object["window_start"].as_str().expect("window_start"))
                .expect("RFC 3339")
                .timestamp_millis();
            (
                (object["city"].as_str().expect("city").to_string(), start),
                (
                    object["orders"].as_i64().expect("orders"),
                    object["items"].as_i64().expect("items"),
                    object["latest"].as_i64().expect("latest"),
                ),
            )
        })
        .collect();
    assert_eq!(messages.len(), expected.len());
    assert_eq!(&published, expected);
}

/// Stream rollup: Kafka orders → per-minute orders, items and the latest order's quantity per
/// city, into a table and a JetStream subject, folded from the route's rows on the cores as the
/// route writes the orders. The gateway is killed (SIGKILL) while orders flow, the route's
/// consumer group deleted (so the topic is read from its start) and the gateway restarted; rows within the allowed lateness still count in their window,
/// rows for closed windows are dead-lettered as `late`; every result equals the aggregation
/// computed here, written with its window's end as write timestamp, once per window on the
/// subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_rollup_survives_kill_9_and_dead_letters_late_rows() {
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_stream");
    let keyspace = &names.keyspace;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let (config, late_topic, stream) = stream_setup(&session, &names).await;

    // Half the orders at a paced rate; the gateway is killed once it has closed windows.
    const MAIN: u64 = 30_000;
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-1.log")).expect("gateway starts");
    let topic = names.topic.clone();
    let producer = std::thread::spawn(move || {
        let first = (0..MAIN / 2).map(|i| {
            let (key, payload) = devkit::order_message(i);
            (key, payload.into_bytes())
        });
        devkit::produce_at(&topic, first, Some(3_000)).expect("produce")
    });
    wait_results(&session, keyspace, 24).await;
    gateway.kill9().expect("kill -9");
    assert_eq!(producer.join().expect("producer"), MAIN / 2);
    // Without the route's committed offsets the route reads the topic from its start again (and
    // writes its orders again): what the job's checkpoints counted must be skipped, not counted
    // twice.
    devkit::delete_group(&names.group, Duration::from_secs(30))
        .await
        .expect("delete the route's group");
    let second = (MAIN / 2..MAIN).map(|i| {
        let (key, payload) = devkit::order_message(i);
        (key, payload.into_bytes())
    });
    devkit::produce(&names.topic, second).expect("produce");
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-2.log")).expect("restart");
    wait_stream_folded(&session, keyspace, MAIN as i64).await;

    let (within, late, ahead) = tail_orders(MAIN);
    devkit::produce(&names.topic, within.iter().map(|(i, at)| order_placed_at(*i, *at))).expect("produce");
    wait_stream_folded(&session, keyspace, MAIN as i64 + 40).await;
    devkit::produce(&names.topic, late.iter().map(|(i, at)| order_placed_at(*i, *at))).expect("produce");
    wait_stream_folded(&session, keyspace, MAIN as i64 + 60).await;
    devkit::produce(&names.topic, ahead.iter().map(|(i, at)| order_placed_at(*i, *at))).expect("produce");

    let counted = (0..MAIN).map(|i| (i, placed_at_ms(i))).chain(within.iter().copied());
    let expected = expected_city_minutes(counted);
    assert_city_minutes(&session, keyspace, &expected).await;

    // The late orders, and only they, dead-lettered as `late`.
    let letters = devkit::read_topic(&late_topic, late.len() + 1, Duration::from_secs(10)).expect("late topic");
    let late_keys: BTreeSet<String> = late.iter().map(|(i, _)| devkit::order_message(*i).0).collect();
    let letter_keys: BTreeSet<String> = letters
        .iter()
        .map(|letter| String::from_utf8(letter.key.clone().expect("a key")).expect("utf-8"))
        .collect();
    assert_eq!(letter_keys, late_keys);
    assert_eq!(letters.len(), late.len());
    assert!(letters
        .iter()
        .all(|letter| letter.headers.get("shardgate.reason.code").map(String::as_str) == Some("late")));

    assert_published(&stream, &expected).await;
    assert!(gateway.stop().expect("stop").success());
    let log = std::fs::read_to_string(names.dir.join("gateway-2.log")).expect("log");
    let replayed: u64 = log
        .split(" already counted")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("the stream job's report");
    assert!(replayed > 0, "the restarted job skipped what its checkpoints counted");
}

/// Sample order `i` with its `order_id` in the payload (as a JetStream route reads it), placed
/// at `at_ms`.
fn order_with_id_placed_at(i: u64, at_ms: i64) -> Vec<u8> {
    let (key, payload) = order_placed_at(i, at_ms);
    let mut object: serde_json::Value = serde_json::from_slice(&payload).expect("JSON");
    object["order_id"] = serde_json::Value::String(key);
    serde_json::to_vec(&object).expect("JSON")
}

/// Stream rollup over a JetStream route: the job reads the route's stream with an ordered
/// consumer of its own, under a lease in `job_windows`, from the sequence after its stored one.
/// The gateway is killed (SIGKILL) while orders flow, once windows closed; a gateway started
/// again at once waits for the killed one's lease to run out and takes it over, and more orders
/// are published: every result equals the
/// aggregation computed here (nothing lost, nothing counted twice), written at its window's
/// end and published once per window; rows of closed windows are dead-lettered as `late` with
/// the stream's coordinates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_stream_rollup_survives_kill_9() {
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_js_stream");
    let keyspace = &names.keyspace;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    stream_tables(&session, keyspace).await;
    let run = names.group.rsplit('-').next().unwrap_or("0").to_string();
    let source_stream = format!("IT_JOBS_JS_{run}");
    let source_subject = format!("it.jobs_js.{run}.orders");
    devkit::create_stream(&source_stream, &[&source_subject])
        .await
        .expect("source stream");
    let results_stream = format!("IT_JOBS_JS_{run}_MINUTES");
    let results_subject = format!("it.jobs_js.{run}.minutes");
    devkit::create_stream(&results_stream, &[&results_subject])
        .await
        .expect("results stream");
    let late_topic = format!("{}.late", names.topic);
    devkit::create_topic(&late_topic, 1).await.expect("late topic");
    let route = devkit::jetstream_orders_route_toml(
        "orders",
        keyspace,
        &source_stream,
        &source_subject,
        "shardgate-jobs-js",
        &format!("it.jobs_js.{run}.dead-letter"),
    );
    let job = CITY_MINUTES
        .replace("KS", keyspace)
        .replace("SUBJECT", &results_subject)
        .replace("LATE", &late_topic)
        .replace("state_keyspace", "lease = \"10s\"\nstate_keyspace");
    let config = names.dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!("{}\n{job}\n", devkit::ingest_gateway_toml(&route, 2048, 64)),
    )
    .expect("config");
    let publish = |orders: Vec<Vec<u8>>| {
        let subject = source_subject.clone();
        async move { devkit::publish_jetstream(&subject, orders).await.expect("publish") }
    };

    const MAIN: u64 = 20_000;
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-1.log")).expect("gateway starts");
    // The first half at about 2,000 a second: the gateway is killed while they flow.
    let subject = source_subject.clone();
    let paced = tokio::spawn(async move {
        for start in (0..MAIN / 2).step_by(250) {
            let chunk: Vec<Vec<u8>> = (start..start + 250).map(devkit::order_message_with_id).collect();
            devkit::publish_jetstream(&subject, chunk).await.expect("publish");
            tokio::time::sleep(Duration::from_millis(125)).await;
        }
    });
    wait_results(&session, keyspace, 24).await;
    gateway.kill9().expect("kill -9");
    // Started again at once: the killed gateway's lease (10 s) holds it back until it runs out.
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-2.log")).expect("restart");
    paced.await.expect("publisher");
    publish((MAIN / 2..MAIN).map(devkit::order_message_with_id).collect()).await;
    // A stream part's stored position is the next stream sequence (the first is 1).
    wait_stream_folded(&session, keyspace, MAIN as i64 + 1).await;

    let (within, late, ahead) = tail_orders(MAIN);
    publish(within.iter().map(|(i, at)| order_with_id_placed_at(*i, *at)).collect()).await;
    wait_stream_folded(&session, keyspace, MAIN as i64 + 41).await;
    publish(late.iter().map(|(i, at)| order_with_id_placed_at(*i, *at)).collect()).await;
    wait_stream_folded(&session, keyspace, MAIN as i64 + 61).await;
    publish(ahead.iter().map(|(i, at)| order_with_id_placed_at(*i, *at)).collect()).await;

    let counted = (0..MAIN).map(|i| (i, placed_at_ms(i))).chain(within.iter().copied());
    let expected = expected_city_minutes(counted);
    assert_city_minutes(&session, keyspace, &expected).await;

    // The late orders, and only they, dead-lettered as `late`, with the stream's coordinates.
    let letters = devkit::read_topic(&late_topic, late.len() + 1, Duration::from_secs(10)).expect("late topic");
    let late_ids: BTreeSet<String> = late.iter().map(|(i, _)| devkit::order_message(*i).0).collect();
    let letter_ids: BTreeSet<String> = letters
        .iter()
        .map(|letter| {
            let object: serde_json::Value =
                serde_json::from_slice(letter.payload.as_deref().expect("a payload")).expect("JSON");
            object["order_id"].as_str().expect("order_id").to_string()
        })
        .collect();
    assert_eq!(letter_ids, late_ids);
    assert_eq!(letters.len(), late.len());
    for letter in &letters {
        assert_eq!(
            letter.headers.get("shardgate.reason.code").map(String::as_str),
            Some("late")
        );
        assert_eq!(letter.headers.get("shardgate.source.stream"), Some(&source_stream));
        let sequence: u64 = letter.headers["shardgate.source.sequence"].parse().expect("a sequence");
        assert!(sequence > MAIN + 40 && sequence <= MAIN + 60, "{sequence}");
    }

    assert_published(&results_stream, &expected).await;
    assert!(gateway.stop().expect("stop").success());
    // The restarted gateway waited for the killed one's lease, took it over and read on from
    // the stored sequence, which the kill left inside the first half.
    let log = std::fs::read_to_string(names.dir.join("gateway-2.log")).expect("log");
    let waited = log.find("another gateway folds this stream; waiting for its lease");
    let folding = log.find("folding the stream");
    assert!(
        waited.is_some() && waited < folding,
        "the restarted gateway waited for the lease before folding"
    );
    let from: u64 = log
        .split("folding the stream")
        .nth(1)
        .and_then(|line| line.split("from=Some(").nth(1))
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .expect("the restarted gateway folds the stream from a stored sequence");
    assert!(
        from > 1 && from <= MAIN / 2,
        "killed mid-stream: read on from sequence {from}"
    );
}

/// A stream rollup cancelled over the `Jobs` service lets its route go on alone (the route
/// commits its offsets past it); started again, it has the route read each partition again
/// from its stored offset, and its results come out exact — the orders that arrived while it
/// was cancelled counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_rollup_catches_up_when_started_again() {
    use shardgate::wire::proto::jobs_client::JobsClient;
    use shardgate::wire::proto::JobRequest;
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_restream");
    let keyspace = &names.keyspace;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let (config, _, _) = stream_setup(&session, &names).await;
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");
    let mut jobs = JobsClient::connect(format!("http://{}", devkit::INGEST_LISTEN))
        .await
        .expect("Jobs client");
    let request = || JobRequest {
        job: "city_minutes".into(),
    };
    const FIRST: u64 = 6_000;
    const SECOND: u64 = 6_000;
    let orders = |range: std::ops::Range<u64>| {
        range.map(|i| {
            let (key, payload) = devkit::order_message(i);
            (key, payload.into_bytes())
        })
    };
    devkit::produce(&names.topic, orders(0..FIRST)).expect("produce");
    wait_stream_folded(&session, keyspace, FIRST as i64).await;

    let cancelled = jobs.cancel_job(request()).await.expect("cancel").into_inner();
    assert_eq!(cancelled.kind, "stream");
    // The job's task ends with a last checkpoint; then it folds nothing.
    let started = Instant::now();
    while jobs.get_job_status(request()).await.expect("status").into_inner().state != "cancelled" {
        assert!(started.elapsed() < Duration::from_secs(30), "not cancelled in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    devkit::produce(&names.topic, orders(FIRST..FIRST + SECOND)).expect("produce");
    // The route writes them and commits past the job.
    let started = Instant::now();
    loop {
        let (committed, end) = devkit::committed_and_end(&names.group, &names.topic, 3).expect("offsets");
        if committed == end && end == (FIRST + SECOND) as i64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the route committed {committed} of {end} offsets in 60 s without its job"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        stream_folded(&session, keyspace).await,
        FIRST as i64,
        "nothing folded while cancelled"
    );

    let restarted = jobs.start_job(request()).await.expect("start").into_inner();
    assert_eq!(restarted.state, "running");
    // Orders the route reads after the restart make the job see that it is behind.
    devkit::produce(&names.topic, orders(FIRST + SECOND..FIRST + SECOND + 30)).expect("produce");
    wait_stream_folded(&session, keyspace, (FIRST + SECOND + 30) as i64).await;
    // An hour ahead on every partition: the watermark passes every window above.
    let newest = placed_at_ms(FIRST + SECOND + 29);
    let ahead: Vec<(String, Vec<u8>)> = (0..30)
        .map(|j| order_placed_at(FIRST + SECOND + 30 + j, newest + 60 * MINUTE_MS))
        .collect();
    devkit::produce(&names.topic, ahead.into_iter()).expect("produce");
    let counted = (0..FIRST + SECOND + 30).map(|i| (i, placed_at_ms(i)));
    assert_city_minutes(&session, keyspace, &expected_city_minutes(counted)).await;
    assert!(gateway.stop().expect("stop").success());
    let log = std::fs::read_to_string(names.dir.join("gateway.log")).expect("log");
    assert!(
        log.contains("partition read again from an earlier offset for a stream job"),
        "the route read the partitions again for the job"
    );
}

/// The `Jobs` gRPC service on the gateway's listener: the jobs listed; a scan job started,
/// paused (no split finishes while paused), resumed and watched to its end with exact results;
/// started again and cancelled (its run marked `cancelled`); unknown jobs and calls in the wrong
/// state refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_service_starts_pauses_resumes_watches_and_cancels() {
    use shardgate::wire::proto::jobs_client::JobsClient;
    use shardgate::wire::proto::{JobRequest, ListJobsRequest};
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_service");
    let (gateway, _) = setup(&names, BY_CUSTOMER_HOUR).await;
    let mut jobs = JobsClient::connect(format!("http://{}", devkit::INGEST_LISTEN))
        .await
        .expect("Jobs client");
    let request = || JobRequest {
        job: "by_customer_hour".into(),
    };
    let listed = jobs
        .list_jobs(ListJobsRequest {})
        .await
        .expect("list")
        .into_inner()
        .jobs;
    let listed: Vec<(&str, &str, &str)> = listed
        .iter()
        .map(|s| (s.job.as_str(), s.kind.as_str(), s.state.as_str()))
        .collect();
    assert_eq!(listed, [("by_customer_hour", "scan", "idle")]);

    let started = jobs.start_job(request()).await.expect("start").into_inner();
    assert_eq!(started.state, "running");
    let paused = jobs.pause_job(request()).await.expect("pause").into_inner();
    assert_eq!(paused.state, "paused");
    // Splits read when the pause came finish; then none.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = jobs.get_job_status(request()).await.expect("status").into_inner();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = jobs.get_job_status(request()).await.expect("status").into_inner();
    assert_eq!(second.state, "paused");
    assert_eq!(first.splits_done, second.splits_done, "no split finishes while paused");
    assert!(
        second.splits_total >= 24 && second.splits_done < second.splits_total,
        "{second:?}"
    );
    let refused = jobs
        .pause_job(request())
        .await
        .expect_err("a paused job does not pause");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("only a running job pauses"),
        "{}",
        refused.message()
    );

    assert_eq!(
        jobs.resume_job(request()).await.expect("resume").into_inner().state,
        "running"
    );
    let mut watch = jobs.watch_job(request()).await.expect("watch").into_inner();
    let mut seen = Vec::new();
    while let Some(status) = watch.message().await.expect("a status") {
        seen.push(status);
    }
    let last = seen.last().expect("statuses").clone();
    assert!(seen.iter().any(|s| s.state == "running"), "{seen:?}");
    assert_eq!(
        (last.state.as_str(), last.run_state.as_str()),
        ("done", "done"),
        "{last:?}"
    );
    assert_eq!(last.splits_done, last.splits_total);
    assert_eq!(last.run, started.run.max(last.run));
    assert_eq!(last.rows_read, ORDERS as u64, "rows read by the run's splits");
    let (table, _) = read_by_customer_hour(&names.keyspace).await;
    assert_eq!(table, expected_by_customer_hour());

    // A second run, cancelled: marked so in the database, and here.
    let again = jobs.start_job(request()).await.expect("start again").into_inner();
    assert_eq!(again.state, "running");
    jobs.cancel_job(request()).await.expect("cancel");
    let deadline = Instant::now() + Duration::from_secs(30);
    let cancelled = loop {
        let status = jobs.get_job_status(request()).await.expect("status").into_inner();
        if status.state == "cancelled" && status.run_state == "cancelled" {
            break status;
        }
        assert!(Instant::now() < deadline, "not cancelled: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        cancelled.run > last.run,
        "a new run was cancelled, not the finished one"
    );
    let refused = jobs
        .resume_job(request())
        .await
        .expect_err("a cancelled job does not resume");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let unknown = jobs
        .get_job_status(JobRequest { job: "nope".into() })
        .await
        .expect_err("unknown job");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(
        unknown.message().contains("no job `nope`; jobs: by_customer_hour"),
        "{}",
        unknown.message()
    );
    assert!(gateway.stop().expect("stop").success());
}

/// Orders and amounts per status, read by big splits one at a time (so a split's progress is
/// stored while it is read: its lease renews every 333 ms).
const BY_STATUS_SLOWLY: &str = r#"
[[job]]
name = "by_status_slowly"
state_keyspace = "KS"
lease = "1s"
parallel_splits = 1
[job.source]
table = "KS.orders"
columns = ["status", "amount"]
min_splits = 1
[job.aggregate]
group_by = ["status"]
measures = { orders = "count()", shares = "sum(row.amount)" }
[[job.sink]]
table = "KS.by_status"
"#;

/// A runner killed (SIGKILL) in the middle of a split whose progress it stored: the next runner
/// goes on after the split's last stored page instead of its start — it reads fewer rows than
/// the table holds — and the results count every order once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_resumes_after_its_last_stored_page() {
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_pages");
    let (gateway, config) = setup(&names, BY_STATUS_SLOWLY).await;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let mut first = job_command(&config, "by_status_slowly")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("job starts");
    // A split not done with a stored token: its holder is mid-split.
    let started = Instant::now();
    loop {
        // The job creates its progress tables when it starts: until then, nothing.
        let rows: Vec<(Option<bool>, Option<Vec<u8>>)> = match session
            .query_iter(
                format!(
                    "SELECT done, page_token FROM {}.job_splits WHERE job = 'by_status_slowly' ALLOW FILTERING",
                    names.keyspace
                ),
                (),
            )
            .await
        {
            Ok(pages) => pages
                .rows_stream::<(Option<bool>, Option<Vec<u8>>)>()
                .expect("typed")
                .try_collect()
                .await
                .expect("rows"),
            Err(_) => Vec::new(),
        };
        if rows
            .iter()
            .any(|(done, token)| *done != Some(true) && token.as_ref().is_some_and(|t| !t.is_empty()))
        {
            break;
        }
        assert!(
            first.try_wait().expect("wait").is_none(),
            "the job ended before a split stored its progress"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no progress stored in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().expect("kill");
    first.wait().expect("reaped");
    // Its lease runs out in a second; the next runner takes the split over.
    let output = job_command(&config, "by_status_slowly").output().expect("job runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("resuming the split after its last stored page"),
        "{stderr}"
    );
    let read: u64 = stderr
        .split(" rows read")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("rows read in the summary");
    assert!(
        read < ORDERS as u64,
        "the second runner read {read} rows: not from the start"
    );
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for i in 0..ORDERS {
        let (_, amount, status, _) = order(i);
        let entry = expected.entry(status.to_string()).or_default();
        entry.0 += 1;
        entry.1 += amount;
    }
    let found: BTreeMap<String, (i64, i64)> = session
        .query_iter(
            format!("SELECT status, orders, shares FROM {}.by_status", names.keyspace),
            (),
        )
        .await
        .expect("select")
        .rows_stream::<(String, i64, i64)>()
        .expect("typed")
        .try_collect::<Vec<_>>()
        .await
        .expect("rows")
        .into_iter()
        .map(|(status, orders, shares)| (status, (orders, shares)))
        .collect();
    assert_eq!(found, expected);
    assert!(gateway.stop().expect("stop").success());
}

/// `hourly`'s results to a table and a JetStream subject, read slowly (48 splits, one at a time).
const HOURLY_NATS: &str = r#"
[[job]]
name = "hourly_nats"
state_keyspace = "KS"
parallel_splits = 1
[job.source]
table = "KS.orders"
min_splits = 48
[job.aggregate]
window = { column = "placed_at", size = "1h" }
measures = { customers = "distinct(row.customer_id)", orders = "count()" }
[[job.sink]]
table = "KS.hourly"
[[job.sink]]
nats = { url = "nats://127.0.0.1:4222", subject = "SUBJECT", jetstream = true }
"#;

/// The sink broker (NATS with JetStream) stops while the job reads and starts again seconds
/// later: the job's publishes wait it out (logged, retried), the run ends by itself, and the
/// subject holds one message per result, each equal to the table's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waits_out_its_sink_broker_restarting() {
    let _lock = gateway_lock().await;
    let names = Names::new("jobs_broker_restart");
    let stream = format!("RESTART_{}", names.group.replace('-', "_"));
    let subject = format!("{}.hourly", names.topic);
    devkit::create_stream(&stream, &[&subject]).await.expect("stream");
    let (gateway, config) = setup(&names, &HOURLY_NATS.replace("SUBJECT", &subject)).await;
    let job = job_command(&config, "hourly_nats")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("job starts");
    // Once the run has started (its sinks are open), NATS goes down for a few seconds.
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let started = Instant::now();
    loop {
        let run = session
            .query_unpaged(
                format!("SELECT run FROM {}.job_runs WHERE job = 'hourly_nats'", names.keyspace),
                (),
            )
            .await
            .ok()
            .and_then(|result| result.into_rows_result().ok())
            .and_then(|rows| rows.maybe_first_row::<(i64,)>().ok().flatten());
        if run.is_some() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the run did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    devkit::stop_service("nats").expect("stop NATS");
    // The results are published once every split is done, so a fast scan may have finished
    // its splits by now; that the publishes met the stopped broker is asserted below (`publish
    // failed; retrying`). Nothing may fail between the stop and the start: the tests after
    // this one need NATS.
    tokio::time::sleep(Duration::from_secs(8)).await;
    devkit::start_services().expect("NATS again");
    let output = job.wait_with_output().expect("the job ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("publish failed; retrying"),
        "the publishes waited: {stderr}"
    );

    let table: BTreeMap<i64, (i64, i64)> = session
        .query_iter(
            format!("SELECT window_start, customers, orders FROM {}.hourly", names.keyspace),
            (),
        )
        .await
        .expect("select")
        .rows_stream::<(scylla::value::CqlTimestamp, i64, i64)>()
        .expect("typed")
        .try_collect::<Vec<_>>()
        .await
        .expect("rows")
        .into_iter()
        .map(|(start, customers, orders)| (start.0, (customers, orders)))
        .collect();
    assert_eq!(table.values().map(|v| v.1).sum::<i64>(), ORDERS);
    let messages = devkit::read_stream(&stream, table.len() + 1, Duration::from_secs(10))
        .await
        .expect("stream");
    let ids: BTreeSet<&String> = messages.iter().map(|m| &m.headers["Nats-Msg-Id"]).collect();
    assert_eq!(
        (messages.len(), ids.len()),
        (table.len(), table.len()),
        "one message per result"
    );
    let published: BTreeMap<i64, (i64, i64)> = messages.iter().map(|m| hourly_result(&m.payload)).collect();
    assert_eq!(published, table);
    assert!(gateway.stop().expect("stop").success());
}
