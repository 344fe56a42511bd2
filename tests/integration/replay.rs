//! `shardgate replay` against the real Kafka and Cassandra: a route whose computed column only
//! knows `price` dead-letters the messages that carry `unit_price`; after the config is fixed,
//! replay writes them, sends the hopeless ones (not JSON) back to the dead-letter destination,
//! and a second run replays only those. Once with a Kafka dead-letter topic — that route reads
//! over the broker's SASL_SSL listener, so its dead letters are written and replayed there —
//! once with a dead-letter table.

use std::process::Command;
use std::time::Duration;

use futures::TryStreamExt;
use shardgate::devkit::{self, Gateway, Record};

use super::{gateway_binary, gateway_lock, Names};

const GOOD: u64 = 200;
const FIXABLE: u64 = 100;
const HOPELESS: u64 = 5;
const DEADLINE: Duration = Duration::from_secs(120);

const BROKEN_TOTAL: &str = "double(msg.qty) * msg.price";
const FIXED_TOTAL: &str = "double(msg.qty) * (has(msg.price) ? msg.price : msg.unit_price)";

fn config(names: &Names, total: &str) -> String {
    let ks = &names.keyspace;
    let route = |name: &str, topic: &str, dead_letter: &str, kafka: &str, security: &str| {
        format!(
            r#"
[[route]]
name = "{name}"
table = "{ks}.{name}"
[route.source]
kind = "kafka"
brokers = ["{kafka}"]
topic = "{topic}"
group_id = "{group}-{name}"
start_from = "earliest"
commit_interval_ms = 500
{security}
[route.columns]
id = "$key"
qty = "qty"
total = {{ expr = "{total}" }}
[route.dead_letter]
{dead_letter}
"#,
            group = names.group,
        )
    };
    let routes = route(
        "via_topic",
        &format!("{}.a", names.topic),
        &format!("kind = \"kafka\"\ntopic = \"{}\"", names.dead_letter_topic),
        devkit::KAFKA_SECURE,
        &format!("security = {}", devkit::kafka_sasl_ssl_security_toml()),
    ) + &route(
        "via_table",
        &format!("{}.b", names.topic),
        &format!("kind = \"table\"\ntable = \"{ks}.dead_letters\""),
        devkit::KAFKA,
        "",
    );
    devkit::gateway_toml(&routes)
}

fn records() -> Vec<Record> {
    let mut records = Vec::new();
    for i in 0..GOOD + FIXABLE {
        let price = if i < GOOD { "price" } else { "unit_price" };
        records.push(Record {
            key: Some(format!("item-{i:04}")),
            payload: Some(format!(r#"{{"qty": {}, "{price}": {}.5}}"#, i % 7 + 1, i % 20).into_bytes()),
            headers: vec![],
        });
    }
    for j in 0..HOPELESS {
        records.push(Record {
            key: Some(format!("junk-{j}")),
            payload: Some(b"{not json".to_vec()),
            headers: vec![],
        });
    }
    records
}

fn replay(config: &std::path::Path, route: &str) -> String {
    let output = Command::new(gateway_binary())
        .args(["replay", "--config"])
        .arg(config)
        .args(["--route", route])
        .output()
        .expect("run shardgate replay");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "replay failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn assert_items(session: &scylla::client::session::Session, ks: &str, table: &str, count: u64) {
    let mut rows = session
        .query_iter(format!("SELECT id, qty, total FROM {ks}.{table}"), &[])
        .await
        .expect("select")
        .rows_stream::<(String, Option<i32>, Option<f64>)>()
        .expect("typed rows");
    let mut seen = 0;
    while let Some((id, qty, total)) = rows.try_next().await.expect("row") {
        let i: u64 = id.strip_prefix("item-").expect("item id").parse().expect("number");
        let q = (i % 7 + 1) as i32;
        assert_eq!(qty, Some(q), "{id}");
        assert_eq!(total, Some(f64::from(q) * ((i % 20) as f64 + 0.5)), "{id}");
        seen += 1;
    }
    assert_eq!(seen, count, "rows in {table}");
}

async fn dead_letter_rows(session: &scylla::client::session::Session, ks: &str) -> Vec<(String, String)> {
    let mut rows = session
        .query_iter(format!("SELECT route, reason_code FROM {ks}.dead_letters"), &[])
        .await
        .expect("select")
        .rows_stream::<(String, Option<String>)>()
        .expect("typed rows");
    let mut all = Vec::new();
    while let Some((route, code)) = rows.try_next().await.expect("row") {
        all.push((route, code.unwrap_or_default()));
    }
    all.sort();
    all
}

/// Both routes' tables created and their topics produced; the broken route run until every
/// message is committed: the good rows written, the fixable and hopeless ones dead-lettered.
async fn dead_letter_both(names: &Names, session: &scylla::client::session::Session) {
    devkit::create_orders_table(session, &names.keyspace)
        .await
        .expect("keyspace");
    let ks = &names.keyspace;
    for table in ["via_topic", "via_table"] {
        session
            .query_unpaged(
                format!("CREATE TABLE {ks}.{table} (id text PRIMARY KEY, qty int, total double)"),
                &[],
            )
            .await
            .expect("create table");
    }
    session.await_schema_agreement().await.expect("schema agreement");
    for suffix in ["a", "b"] {
        let topic = format!("{}.{suffix}", names.topic);
        devkit::create_topic(&topic, 1).await.expect("topic");
        devkit::produce_records(&topic, records()).expect("produce");
    }

    let broken = names.dir.join("broken.toml");
    std::fs::write(&broken, config(names, BROKEN_TOTAL)).expect("config");
    let gateway = Gateway::start(&gateway_binary(), &broken, &names.dir.join("gateway.log")).expect("gateway starts");
    let total = (GOOD + FIXABLE + HOPELESS) as i64;
    let start = std::time::Instant::now();
    for route in ["via_topic", "via_table"] {
        let suffix = if route == "via_topic" { "a" } else { "b" };
        loop {
            let (committed, _) = devkit::committed_and_end(
                &format!("{}-{route}", names.group),
                &format!("{}.{suffix}", names.topic),
                1,
            )
            .expect("offsets");
            if committed == total {
                break;
            }
            assert!(start.elapsed() < DEADLINE, "{route}: committed {committed} of {total}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    assert!(gateway.stop().expect("stop").success());
    assert_items(session, ks, "via_topic", GOOD).await;
    assert_items(session, ks, "via_table", GOOD).await;
    let letters = devkit::read_topic(
        &names.dead_letter_topic,
        (FIXABLE + HOPELESS) as usize,
        Duration::from_secs(60),
    )
    .expect("dead letters");
    assert_eq!(letters.len() as u64, FIXABLE + HOPELESS);
    assert!(letters
        .iter()
        .all(|l| l.headers.contains_key("shardgate.write_timestamp_us")));
    let rows = dead_letter_rows(session, ks).await;
    assert_eq!(rows.len() as u64, FIXABLE + HOPELESS);
    assert_eq!(
        rows.iter().filter(|(_, code)| code == "expression_failed").count() as u64,
        FIXABLE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_dead_letters_back_through_the_fixed_route() {
    let _lock = gateway_lock().await;
    let names = Names::new("replay");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    dead_letter_both(&names, &session).await;
    let ks = &names.keyspace;

    // Fix the config and replay both routes.
    let fixed = names.dir.join("fixed.toml");
    std::fs::write(&fixed, config(&names, FIXED_TOTAL)).expect("config");
    let expected = format!(
        "{} letter(s) replayed: {FIXABLE} row(s) written, 0 filtered, {HOPELESS} dead-lettered again",
        FIXABLE + HOPELESS
    );
    for route in ["via_topic", "via_table"] {
        let report = replay(&fixed, route);
        assert!(report.contains(&expected), "{route}: {report}");
        assert_items(&session, ks, route, GOOD + FIXABLE).await;
    }
    // The table holds only the hopeless letters now, with their new reason.
    let rows = dead_letter_rows(&session, ks).await;
    assert_eq!(
        rows,
        vec![("via_table".to_string(), "not_json".to_string()); HOPELESS as usize]
    );

    // A second run replays only what the first sent back.
    let again = format!("{HOPELESS} letter(s) replayed: 0 row(s) written, 0 filtered, {HOPELESS} dead-lettered again");
    for route in ["via_topic", "via_table"] {
        let report = replay(&fixed, route);
        assert!(report.contains(&again), "{route}: {report}");
    }
    assert_eq!(dead_letter_rows(&session, ks).await.len() as u64, HOPELESS);
}

/// `[job.source] replay`: the same replay as a job — run by `shardgate job run`, on an `every`
/// schedule inside `serve` (its first run when the gateway serves) and over the `Jobs`
/// service, with its report in the job's status and its counts in the job metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_jobs_run_under_job_run_on_a_schedule_and_over_the_jobs_service() {
    use shardgate::wire::proto::jobs_client::JobsClient;
    use shardgate::wire::proto::{JobRequest, JobStatus};
    let _lock = gateway_lock().await;
    let names = Names::new("replay_job");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    dead_letter_both(&names, &session).await;
    let ks = &names.keyspace;

    let fixed = names.dir.join("fixed.toml");
    let routes = config(&names, FIXED_TOTAL);
    let routes = &routes[routes.find("[[route]]").expect("routes")..];
    let jobs = "\n[[job]]\nname = \"replay_topic\"\n[job.source]\nreplay = \"via_topic\"\n\
                \n[[job]]\nname = \"replay_table\"\nevery = \"1h\"\n[job.source]\nreplay = \"via_table\"\n";
    std::fs::write(&fixed, devkit::ingest_gateway_toml(routes, 2048, 64) + jobs).expect("config");
    let expected = format!(
        "{} letter(s) replayed: {FIXABLE} row(s) written, 0 filtered, {HOPELESS} dead-lettered again",
        FIXABLE + HOPELESS
    );

    // `job run` of the topic's replay job.
    let output = Command::new(gateway_binary())
        .args(["job", "run", "--config"])
        .arg(&fixed)
        .args(["--job", "replay_topic"])
        .output()
        .expect("run shardgate job run");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "job run failed: {stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert_items(&session, ks, "via_topic", GOOD + FIXABLE).await;

    // `serve`: the table's replay job is scheduled and runs once the gateway serves.
    let gateway = Gateway::start(&gateway_binary(), &fixed, &names.dir.join("fixed.log")).expect("gateway starts");
    let mut client = JobsClient::connect(format!("http://{}", devkit::INGEST_LISTEN))
        .await
        .expect("Jobs client");
    let request = |job: &str| JobRequest { job: job.into() };
    async fn until_done(client: &mut JobsClient<tonic::transport::Channel>, job: &str) -> JobStatus {
        let start = std::time::Instant::now();
        loop {
            let status = client
                .get_job_status(JobRequest { job: job.into() })
                .await
                .expect("status")
                .into_inner();
            if status.state == "done" {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE && status.state != "failed",
                "{job}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let table = until_done(&mut client, "replay_table").await;
    assert_eq!((table.kind.as_str(), table.every.as_str()), ("replay", "3600s"));
    assert!(table.report.contains(&expected), "{table:?}");
    assert_items(&session, ks, "via_table", GOOD + FIXABLE).await;
    assert_eq!(
        dead_letter_rows(&session, ks).await,
        vec![("via_table".to_string(), "not_json".to_string()); HOPELESS as usize]
    );
    let scrape = |name: &str| {
        devkit::scrape_metric_where(devkit::ADMIN_LISTEN, name, &[("job", "replay_table")]).expect("scrape")
    };
    assert_eq!(scrape("shardgate_job_rows_read_total"), (FIXABLE + HOPELESS) as f64);
    assert_eq!(scrape("shardgate_job_rows_out_total"), FIXABLE as f64);
    assert_eq!(scrape("shardgate_job_rows_failed_total"), HOPELESS as f64);

    // Started over the service, the topic's job finds only what `job run` sent back.
    let idle = client
        .get_job_status(request("replay_topic"))
        .await
        .expect("status")
        .into_inner();
    assert_eq!((idle.state.as_str(), idle.report.as_str()), ("idle", ""));
    client.start_job(request("replay_topic")).await.expect("start");
    let topic = until_done(&mut client, "replay_topic").await;
    let again = format!("{HOPELESS} letter(s) replayed: 0 row(s) written, 0 filtered, {HOPELESS} dead-lettered again");
    assert!(topic.report.contains(&again), "{topic:?}");
    assert_items(&session, ks, "via_topic", GOOD + FIXABLE).await;
    assert!(gateway.stop().expect("stop").success());
}
