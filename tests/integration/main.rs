//! Integration tests against the real services started by `deploy/local/stack.sh up`:
//! Cassandra on 127.0.0.1:9042 and Kafka on 127.0.0.1:9092. A service that is down fails the
//! test with the reason; nothing is skipped. Each test uses its own keyspace, topics and
//! consumer group. Tests that run a gateway take a process-wide lock so that two gateways never
//! compete for the machine's two cores.

// Tooling and tests: a failed expectation is the tool or test failing, never a gateway core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod auth;
mod faults;
mod ingest;
mod jetstream;
mod jobs;
mod kafka_route;
mod mapping;
mod observability;
mod packaging;
mod pki;
mod query;
mod rabbitmq;
mod replay;
mod scale_out;
mod secured;
mod startup;
mod tls;
mod tokens;
mod zeromq;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shardgate::devkit;

static GATEWAY_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Serializes tests that run a gateway (each test has its own runtime; tokio's mutex works
/// across them and a failed test does not poison it).
pub async fn gateway_lock() -> tokio::sync::MutexGuard<'static, ()> {
    GATEWAY_LOCK.lock().await
}

/// Names unique to this test run.
#[derive(Clone)]
pub struct Names {
    pub keyspace: String,
    pub topic: String,
    pub dead_letter_topic: String,
    pub group: String,
    pub dir: PathBuf,
}

impl Names {
    pub fn new(test: &str) -> Names {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis();
        let dir = std::env::temp_dir().join(format!("shardgate-it-{test}-{run}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Names {
            keyspace: format!("it_{test}"),
            topic: format!("it.{test}.{run}"),
            dead_letter_topic: format!("it.{test}.{run}.dead-letter"),
            group: format!("it-{test}-{run}"),
            dir,
        }
    }

    /// Writes the gateway config for the sample orders route and returns its path.
    pub fn write_config(&self) -> PathBuf {
        let routes = devkit::orders_route_toml(
            "orders",
            &self.keyspace,
            &self.topic,
            &self.group,
            &self.dead_letter_topic,
        );
        let path = self.dir.join("gateway.toml");
        std::fs::write(&path, devkit::gateway_toml(&routes)).expect("write config");
        path
    }
}

/// The gateway binary cargo built for this test run.
pub fn gateway_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shardgate"))
}

/// Waits until the group's committed offsets reach `target` (summed over partitions).
pub fn wait_committed(names: &Names, partitions: i32, target: i64, deadline: Duration) -> i64 {
    let start = Instant::now();
    loop {
        let (committed, _) =
            devkit::committed_and_end(&names.group, &names.topic, partitions).expect("read committed offsets");
        if committed >= target {
            return committed;
        }
        assert!(
            start.elapsed() < deadline,
            "committed offsets reached {committed} of {target} within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Reads the sample orders `0..count` back from the test keyspace: every row present, exact.
pub async fn assert_all_orders_exact(names: &Names, count: u64) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let report = devkit::verify_orders(&session, &names.keyspace, count)
        .await
        .expect("read back orders");
    assert_eq!(
        report.missing, 0,
        "missing rows; first differences: {:?}",
        report.differences
    );
    assert_eq!(
        report.rows, count,
        "row count; first differences: {:?}",
        report.differences
    );
    assert_eq!(
        report.matching, count,
        "rows with wrong values: {:?}",
        report.differences
    );
}

/// Runs the Python example (`deploy/clients/python/run.sh TABLE ENDPOINT`) with `env` and
/// asserts it succeeded; returns its standard output.
pub fn run_python_example(table: &str, env: &[(&str, &std::path::Path)]) -> String {
    python(&[table, devkit::INGEST_LISTEN], env)
}

/// Runs `deploy/clients/python/run.sh ARGS` (a script of that directory first, e.g.
/// `shard_aware.py`) and asserts it succeeded; returns its standard output.
pub fn run_python(args: &[&str]) -> String {
    python(args, &[])
}

fn python(args: &[&str], env: &[(&str, &std::path::Path)]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/clients/python/run.sh");
    let mut command = std::process::Command::new(script);
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run.sh runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "python {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs `command`; whether it succeeded, and its standard output and error together.
pub fn outcome(mut command: std::process::Command) -> (bool, String) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{:?} runs: {e}", command.get_program()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Runs `shardgate export --config CONFIG --table TABLE --output DIR/<table>.jsonl`, asserts it
/// succeeded, and returns the lines it wrote and its standard error.
pub fn export_lines(config: &std::path::Path, table: &str, dir: &std::path::Path) -> (usize, String) {
    let exported = dir.join(format!("{table}.jsonl"));
    let export = std::process::Command::new(gateway_binary())
        .args(["export", "--config"])
        .arg(config)
        .args(["--table", table, "--output"])
        .arg(&exported)
        .output()
        .expect("export runs");
    let stderr = String::from_utf8_lossy(&export.stderr).to_string();
    assert!(export.status.success(), "{stderr}");
    let lines = std::fs::read_to_string(&exported)
        .expect("export output")
        .lines()
        .count();
    (lines, stderr)
}
