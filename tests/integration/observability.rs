//! Operations against a real Prometheus (Debian's package, started by `stack.sh`, scraping the
//! admin port every second): a gateway busy with every kind of work — Kafka, JetStream and
//! spooled RabbitMQ routes with a poison message, a stream rollup, a scan job, a query, a call
//! refused by `ingest.auth` — is scraped, and every PromQL expression of the Grafana dashboard
//! (`deploy/grafana/shardgate.json`) returns data; `promtool check metrics` passes the scrape,
//! `promtool check rules` the alert rules, and Prometheus evaluates those rules without error.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardgate::auth::token_sha256_hex;
use shardgate::devkit::{self, Gateway};
use shardgate::telemetry::metric;
use shardgate::wire::proto::jobs_client::JobsClient;
use shardgate::wire::proto::query_client::QueryClient;
use shardgate::wire::proto::{ExecuteRequest, JobRequest, ListJobsRequest};

use crate::{gateway_binary, gateway_lock, Names};

const JOBS: &str = r#"
[[job]]
name = "city_minutes"
state_keyspace = "KS"
[job.source]
stream = ["orders"]
checkpoint = "500ms"
[job.aggregate]
group_by = ["city"]
window = { column = "placed_at", size = "1m", lateness = "2m" }
measures = { orders = "count()" }
[[job.sink]]
table = "KS.city_minutes"
[job.dead_letter]
kind = "kafka"
brokers = ["127.0.0.1:9092"]
topic = "LATE"

[[job]]
name = "city_totals"
state_keyspace = "KS"
[job.source]
table = "KS.orders"
[job.aggregate]
group_by = ["city"]
measures = { orders = "count()" }
[[job.sink]]
table = "KS.city_totals"
"#;

/// Orders per source: Kafka `0..N`, JetStream `N..2N`, RabbitMQ `2N..3N`.
const PER_SOURCE: u64 = 2_000;

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every PromQL expression of the dashboard, with Grafana's variables as the test evaluates
/// them (every gateway, a one-minute rate window).
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/shardgate.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut expressions = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a target's expr");
            let expr = expr.replace("$instance", ".*").replace("$__rate_interval", "1m");
            expressions.push((panel["title"].as_str().unwrap_or_default().to_string(), expr));
        }
    }
    expressions
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    request
}

/// The dashboard names only metrics the gateway exports (a summary's `_sum` and `_count`
/// included), and gives every panel a unique id.
#[test]
fn the_dashboard_names_only_exported_metrics() {
    let known: BTreeSet<&str> = metric::ALL.iter().map(|(name, _, _)| *name).collect();
    let mut named = BTreeSet::new();
    for (panel, expr) in dashboard_expressions() {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("shardgate_") {
                continue;
            }
            let base = word.strip_suffix("_count").or_else(|| word.strip_suffix("_sum"));
            let name = match base {
                Some(base) if known.contains(base) => base,
                _ => word,
            };
            assert!(
                known.contains(name),
                "panel `{panel}` names `{word}`, which the gateway does not export"
            );
            named.insert(name.to_string());
        }
    }
    assert!(
        named.len() >= 25,
        "the dashboard covers the gateway ({} metrics)",
        named.len()
    );
    let text = std::fs::read_to_string(repo().join("deploy/grafana/shardgate.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let ids: Vec<u64> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| p["id"].as_u64().expect("panel id"))
        .collect();
    assert_eq!(
        ids.len(),
        ids.iter().collect::<BTreeSet<_>>().len(),
        "panel ids are unique"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_busy_gateway_and_every_dashboard_expression_has_data() {
    let _lock = gateway_lock().await;
    let names = Names::new("observe");
    let keyspace = &names.keyspace;
    let run = names.group.rsplit('-').next().unwrap_or("0").to_string();
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, keyspace)
        .await
        .expect("orders table");
    for table in [
        "city_minutes (city text, window_start timestamp, orders bigint, PRIMARY KEY (city, window_start))",
        "city_totals (city text PRIMARY KEY, orders bigint)",
    ] {
        session
            .query_unpaged(format!("CREATE TABLE {keyspace}.{table}"), ())
            .await
            .expect("result table");
    }
    session.await_schema_agreement().await.expect("schema agreement");
    devkit::create_topic(&names.topic, 3).await.expect("Kafka is up");
    devkit::create_topic(&names.dead_letter_topic, 1).await.expect("topic");
    let late_topic = format!("{}.late", names.topic);
    devkit::create_topic(&late_topic, 1).await.expect("topic");
    let stream = format!("IT_observe_{run}");
    let subject = format!("it.observe.{run}.js");
    devkit::create_stream(&stream, &[&subject]).await.expect("NATS is up");
    let queue = format!("it.observe.{run}.orders");
    devkit::recreate_queue(&queue).await.expect("RabbitMQ is up");
    devkit::recreate_queue(&format!("{queue}.dead-letter"))
        .await
        .expect("queue");

    let rabbitmq = devkit::rabbitmq_orders_route_toml("rabbitmq", keyspace, &queue, &format!("{queue}.dead-letter"))
        .replace("format = \"json\"", "format = \"json\"\nack = \"spooled\"");
    let routes = [
        devkit::orders_route_toml("orders", keyspace, &names.topic, &names.group, &names.dead_letter_topic),
        devkit::jetstream_orders_route_toml(
            "jetstream",
            keyspace,
            &stream,
            &subject,
            "observe",
            &format!("it.observe.{run}.dead-letter"),
        ),
        rabbitmq,
    ]
    .concat();
    let token = format!("observe-{run}-token");
    let token_file = names.dir.join("gateway.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let spool = format!("[runtime]\nspool_dir = {:?}\n", names.dir.join("spool"));
    let config = format!(
        "{base}[ingest.auth]\nclient_token_file = {token_file:?}\n\n\
         [[ingest.auth.principal]]\nname = \"operator\"\ntoken_sha256 = \"{hash}\"\nscopes = [\"admin\"]\n\
         {jobs}",
        base = devkit::ingest_gateway_toml(&routes, 2048, 64).replacen("[runtime]\n", &spool, 1),
        hash = token_sha256_hex(&token),
        jobs = JOBS.replace("KS", keyspace).replace("LATE", &late_topic),
    );
    let path = names.dir.join("gateway.toml");
    std::fs::write(&path, config).expect("config");
    let gateway = Gateway::start(&gateway_binary(), &path, &names.dir.join("gateway.log")).expect("gateway starts");

    // Traffic on every source, one poison message on Kafka.
    let orders = |range: std::ops::Range<u64>| {
        range.map(|i| {
            let (key, payload) = devkit::order_message(i);
            (key, payload.into_bytes())
        })
    };
    devkit::produce(&names.topic, orders(0..PER_SOURCE)).expect("produce");
    devkit::produce(
        &names.topic,
        [("poison".to_string(), b"{not json".to_vec())].into_iter(),
    )
    .expect("produce");
    devkit::publish_jetstream(
        &subject,
        (PER_SOURCE..2 * PER_SOURCE).map(devkit::order_message_with_id),
    )
    .await
    .expect("publish JetStream");
    devkit::publish_rabbitmq(
        &queue,
        (2 * PER_SOURCE..3 * PER_SOURCE).map(devkit::order_message_with_id),
    )
    .await
    .expect("publish RabbitMQ");
    devkit::wait_for_orders(&session, keyspace, 3 * PER_SOURCE, Duration::from_secs(120))
        .await
        .expect("every order written");

    // A scan job run to its end, a query, and a call without credentials.
    let mut jobs = JobsClient::connect(format!("http://{}", devkit::INGEST_LISTEN))
        .await
        .expect("Jobs client");
    let job = || JobRequest {
        job: "city_totals".into(),
    };
    jobs.start_job(with_token(job(), &token))
        .await
        .expect("start the scan job");
    let started = Instant::now();
    loop {
        let status = jobs
            .get_job_status(with_token(job(), &token))
            .await
            .expect("status")
            .into_inner();
        if status.state == "done" {
            break;
        }
        assert_ne!(status.state, "failed", "the scan job failed: {}", status.error);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the scan job did not end in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = jobs.list_jobs(ListJobsRequest {}).await.expect_err("no credentials");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut query = QueryClient::connect(format!("http://{}", devkit::INGEST_LISTEN))
        .await
        .expect("Query client");
    let page = query
        .execute(with_token(
            ExecuteRequest {
                cql: format!("SELECT order_id, city FROM {keyspace}.orders LIMIT 50"),
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("execute")
        .into_inner();
    assert_eq!(page.result.expect("a result").rows.len(), 50);

    // Prometheus scrapes every second: wait until every expression has data (or say which not).
    let expressions = dashboard_expressions();
    let started = Instant::now();
    let empty = loop {
        let empty: Vec<String> = expressions
            .iter()
            .filter(|(_, expr)| {
                devkit::prometheus_query(expr)
                    .expect("Prometheus evaluates it")
                    .is_empty()
            })
            .map(|(panel, expr)| format!("{panel}: {expr}"))
            .collect();
        if empty.is_empty() || started.elapsed() > Duration::from_secs(90) {
            break empty;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(
        empty.is_empty(),
        "dashboard expressions without data after 90 s:\n{}",
        empty.join("\n")
    );
    // What the dashboard shows agrees with the gateway: rows written, every source together.
    let written: f64 = devkit::prometheus_query(&format!(
        "sum(shardgate_rows_written_total{{instance=\"{}\"}})",
        devkit::ADMIN_LISTEN
    ))
    .expect("query")
    .first()
    .and_then(|series| series["value"][1].as_str()?.parse().ok())
    .expect("a value");
    assert!(
        written >= (3 * PER_SOURCE) as f64,
        "Prometheus saw {written} rows written"
    );

    // promtool passes the scrape.
    let (status, scrape) = devkit::http_get(devkit::ADMIN_LISTEN, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) runs");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("scrape to promtool");
    let checked = promtool.wait_with_output().expect("promtool ends");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(gateway.stop().expect("stop").success());
}

/// The alert rules pass `promtool check rules`, and the stack's Prometheus, which loads them,
/// evaluates every one of them without error.
#[test]
fn the_alert_rules_check_and_evaluate() {
    let rules = repo().join("deploy/prometheus/alerts.yml");
    let checked = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool (Debian's prometheus package) runs");
    assert!(
        checked.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let text = std::fs::read_to_string(&rules).expect("rules");
    let defined: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .map(str::to_string)
        .collect();
    assert!(defined.len() >= 6, "the rule file defines the alerts ({defined:?})");
    // Evaluated every 5 s: wait for one evaluation of every rule.
    let started = Instant::now();
    loop {
        let (status, body) = devkit::http_get(devkit::PROMETHEUS, "/api/v1/rules").expect("Prometheus is up");
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let loaded: Vec<&serde_json::Value> = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|group| group["name"] == "shardgate")
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .collect();
        let names: BTreeSet<String> = loaded
            .iter()
            .filter_map(|rule| Some(rule["name"].as_str()?.to_string()))
            .collect();
        assert_eq!(names, defined, "Prometheus loaded the rule file the repository has");
        let unhealthy: Vec<String> = loaded
            .iter()
            .filter(|rule| rule["health"] != "ok")
            .map(|rule| format!("{}: {} {}", rule["name"], rule["health"], rule["lastError"]))
            .collect();
        if unhealthy.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "rules not evaluated cleanly: {unhealthy:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `shardgate top` against a gateway that wrote a Kafka route's orders: `--once --json` gives a
/// line per core whose totals are `/metrics`' own, and the route's; in a terminal (tmux) it
/// renders a line per core and quits on `q`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_every_core_and_agrees_with_metrics() {
    use shardgate::telemetry::snapshot::View;
    let _lock = gateway_lock().await;
    let names = Names::new("top");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("table");
    devkit::create_topic(&names.topic, 6).await.expect("Kafka is up");
    devkit::create_topic(&names.dead_letter_topic, 1).await.expect("topic");
    let config = names.write_config();
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");
    const ORDERS: u64 = 5_000;
    devkit::produce(
        &names.topic,
        (0..ORDERS).map(|i| {
            let (key, payload) = devkit::order_message(i);
            (key, payload.into_bytes())
        }),
    )
    .expect("produce");
    devkit::wait_for_orders(&session, &names.keyspace, ORDERS, Duration::from_secs(120))
        .await
        .expect("orders written");
    let started = Instant::now();
    while devkit::scrape_metric(devkit::ADMIN_LISTEN, metric::ROWS_WRITTEN).expect("scrape") < ORDERS as f64 {
        assert!(started.elapsed() < Duration::from_secs(30), "written rows not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let output = Command::new(gateway_binary())
        .args([
            "top",
            "--once",
            "--json",
            "--interval",
            "0.5",
            "--admin",
            devkit::ADMIN_LISTEN,
        ])
        .output()
        .expect("top runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let view: View = serde_json::from_slice(&output.stdout).expect("a view as JSON");
    let cores = std::thread::available_parallelism().expect("cpus").get();
    assert_eq!(view.cores.len(), cores, "a line per core");
    assert!(view.ready);
    for line in &view.cores {
        let core = line.core.to_string();
        let scraped = devkit::scrape_metric_where(devkit::ADMIN_LISTEN, metric::ROWS_WRITTEN, &[("core", &core)])
            .expect("scrape");
        assert_eq!(line.totals.rows_written, scraped, "core {core}: top and /metrics agree");
        assert!(
            (0.0..=100.0).contains(&line.busy_percent),
            "core {core}: busy {}",
            line.busy_percent
        );
    }
    let written: f64 = view.cores.iter().map(|c| c.totals.rows_written).sum();
    assert_eq!(written, ORDERS as f64, "every order written once");
    let route = view
        .routes
        .iter()
        .find(|r| r.route == "orders")
        .expect("the route's line");
    assert_eq!(route.totals.rows_written, ORDERS as f64);
    assert_eq!(route.totals.kafka_partitions, Some(6.0), "every partition assigned");

    // The live view in a terminal: a line per core, `q` quits.
    let tmux = format!("shardgate-top-{}", names.group);
    let command = format!("{} top --admin {}", gateway_binary().display(), devkit::ADMIN_LISTEN);
    let started = Command::new("tmux")
        .args(["new-session", "-d", "-s", &tmux, "-x", "150", "-y", "40", &command])
        .status()
        .expect("tmux runs");
    assert!(started.success(), "tmux session started");
    let capture = || {
        let pane = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &tmux])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&pane.stdout).to_string()
    };
    let started = Instant::now();
    loop {
        let screen = capture();
        let shown = (0..cores).all(|core| screen.contains(&format!("core {core} ")));
        if shown && screen.contains("orders") && screen.contains("— ready —") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "top did not render a line per core:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    Command::new("tmux")
        .args(["send-keys", "-t", &tmux, "q"])
        .status()
        .expect("tmux send-keys");
    let started = Instant::now();
    while Command::new("tmux")
        .args(["has-session", "-t", &tmux])
        .stderr(Stdio::null())
        .status()
        .expect("tmux has-session")
        .success()
    {
        assert!(started.elapsed() < Duration::from_secs(10), "top did not quit on `q`");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gateway.stop().expect("stop").success());
}
