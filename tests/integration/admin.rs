//! The admin port over HTTPS with a bearer token, and certificates re-read on SIGHUP, against
//! a running gateway: `/live` and `/ready` answer without the token, `/metrics` only with it
//! (checked with curl, a client of its own); plaintext gets nothing. After the certificate
//! files are replaced by ones of another CA and the gateway gets SIGHUP, new connections to
//! the admin port and to the gRPC listeners see the new certificate (rows written through them
//! read back from Cassandra) while the old CA is no longer trusted; a reload from broken files
//! keeps the previous certificate serving; SIGHUP never stops the gateway; the token is not
//! in the log. Under a service manager, `serve` says `READY=1` and `STOPPING=1` on
//! `NOTIFY_SOCKET`, and `--log-format json` writes one JSON object per log line.

use std::path::Path;
use std::process::Command;

use shardgate::client::{GatewayAddr, ShardAwareClient};
use shardgate::devkit::{self, Gateway};

use crate::pki::{client_tls, TestCa};
use crate::{gateway_binary, gateway_lock, Names};

const EVENTS: i64 = 1_500;

/// `curl` of `path` on the admin port: (HTTP status, body); status 0 when no HTTP answer came
/// (a refused handshake).
fn curl(scheme: &str, path: &str, ca: Option<&Path>, token: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args(["-s", "--max-time", "10", "-w", "\n%{http_code}"]);
    if let Some(ca) = ca {
        command.arg("--cacert").arg(ca);
    }
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    command.arg(format!("{scheme}://{}{path}", devkit::ADMIN_LISTEN));
    let output = command.output().expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn over_tls(ca: &Path) -> GatewayAddr {
    GatewayAddr {
        address: devkit::INGEST_LISTEN.to_string(),
        tls: Some(client_tls(ca, None)),
        token: None,
    }
}

fn sighup(gateway: &Gateway) {
    let status = Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// How many times the log says `needle`.
fn log_count(gateway: &Gateway, needle: &str) -> usize {
    std::fs::read_to_string(&gateway.log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_takes_https_and_a_token_and_certificates_reload_on_sighup() {
    let _lock = gateway_lock().await;
    let names = Names::new("admin_tls");
    let (dir, keyspace) = (&names.dir, &names.keyspace);
    let (first, second) = (TestCa::new("first CA"), TestCa::new("second CA"));
    let (first_ca, second_ca) = (first.write(dir, "first-ca"), second.write(dir, "second-ca"));
    let (cert, key) = first.issue_server(dir);
    let next_dir = dir.join("next");
    std::fs::create_dir_all(&next_dir).expect("dir");
    let (next_cert, next_key) = second.issue_server(&next_dir);

    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, keyspace)
        .await
        .expect("create table");
    let table = format!("{keyspace}.events");
    let token = format!("admin-{}", uuid::Uuid::new_v4().simple());
    let config = devkit::ingest_gateway_toml("", 2048, 64).replacen(
        &format!("listen = \"{}\"\n", devkit::ADMIN_LISTEN),
        &format!(
            "listen = \"{}\"\ncert_file = {cert:?}\nkey_file = {key:?}\ntoken_sha256 = \"{}\"\n",
            devkit::ADMIN_LISTEN,
            shardgate::auth::token_sha256_hex(&token)
        ),
        1,
    ) + &format!("[ingest.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nca_file = {first_ca:?}\n");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).expect("config");
    let gateway = Gateway::start(&gateway_binary(), &path, &dir.join("gateway.log")).expect("gateway starts");

    // Probes without the token; metrics only with it; nothing over plaintext.
    assert_eq!(curl("https", "/live", Some(&first_ca), None), (200, "live\n".into()));
    assert_eq!(curl("https", "/ready", Some(&first_ca), None), (200, "ready\n".into()));
    let (status, body) = curl("https", "/metrics", Some(&first_ca), None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(curl("https", "/metrics", Some(&first_ca), Some("wrong")).0, 401);
    let (status, body) = curl("https", "/metrics", Some(&first_ca), Some(&token));
    assert_eq!(status, 200);
    assert!(body.lines().any(|l| l == "shardgate_ready 1"), "{body}");
    assert_ne!(curl("http", "/live", None, None).0, 200, "plaintext answered");
    ShardAwareClient::connect(over_tls(&first_ca), &[&table])
        .await
        .expect("the first CA's certificate serves gRPC");
    // `shardgate top` over HTTPS: refused without the token, naming the flag; served with it.
    let top = |token_file: Option<&Path>| {
        let mut command = Command::new(gateway_binary());
        command
            .args([
                "top",
                "--once",
                "--json",
                "--interval",
                "0.2",
                "--admin",
                devkit::ADMIN_LISTEN,
                "--ca-file",
            ])
            .arg(&first_ca);
        if let Some(file) = token_file {
            command.arg("--token-file").arg(file);
        }
        command.output().expect("top runs")
    };
    let refused = top(None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--token-file"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let served = top(Some(&token_file));
    assert!(served.status.success(), "{}", String::from_utf8_lossy(&served.stderr));
    let view: serde_json::Value = serde_json::from_slice(&served.stdout).expect("JSON");
    assert_eq!(view["ready"], true, "{view}");
    assert!(!view["cores"].as_array().expect("cores").is_empty(), "{view}");

    // New files of another CA, then SIGHUP: new connections see them.
    std::fs::copy(&next_cert, &cert).expect("replace certificate");
    std::fs::copy(&next_key, &key).expect("replace key");
    sighup(&gateway);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while log_count(&gateway, "TLS certificate files reloaded") < 2 {
        assert!(std::time::Instant::now() < deadline, "no reload logged");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(curl("https", "/live", Some(&second_ca), None).0, 200);
    assert_eq!(
        curl("https", "/live", Some(&first_ca), None).0,
        0,
        "the old CA still verifies"
    );
    assert!(
        ShardAwareClient::connect(over_tls(&first_ca), &[&table]).await.is_err(),
        "gRPC still serves the old certificate"
    );
    let smart = ShardAwareClient::connect(over_tls(&second_ca), &[&table])
        .await
        .expect("the new certificate serves gRPC on every port");
    let summary = smart
        .stream(devkit::event_batches(&table, EVENTS, 250))
        .await
        .expect("rows streamed");
    assert_eq!(summary.written, EVENTS as u64, "{summary:?}");
    let report = devkit::verify_events(&session, keyspace, EVENTS as u64)
        .await
        .expect("read back");
    assert_eq!((report.rows, report.matching), (EVENTS as u64, EVENTS as u64));

    // Broken files: the reload is refused and the certificate in use stays.
    std::fs::write(&key, "not a key\n").expect("break the key");
    sighup(&gateway);
    while log_count(&gateway, "TLS certificate files not reloaded") < 2 {
        assert!(std::time::Instant::now() < deadline, "no refused reload logged");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(curl("https", "/live", Some(&second_ca), None).0, 200);
    let (status, body) = curl("https", "/metrics", Some(&second_ca), Some(&token));
    assert_eq!(status, 200);
    assert!(body.contains("shardgate_rows_written_total"), "{body}");

    let log = gateway.log.clone();
    assert!(
        gateway.stop().expect("stop").success(),
        "SIGHUP did not stop the gateway"
    );
    let text = std::fs::read_to_string(log).expect("log");
    assert!(!text.contains(&token), "the admin token is in the log");
}

/// `serve` started with a CPU affinity (`taskset -c N`, as systemd's `CPUAffinity=` sets it)
/// pins one core, to that CPU, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_pins_cores_only_to_the_cpus_it_may_use() {
    let _lock = gateway_lock().await;
    let names = Names::new("affinity");
    let config = names.dir.join("gateway.toml");
    std::fs::write(&config, devkit::ingest_gateway_toml("", 2048, 64)).expect("config");
    let last = std::thread::available_parallelism().expect("cpus").get() - 1;
    let mut command = Command::new("taskset");
    command
        .args(["-c", &last.to_string()])
        .arg(gateway_binary())
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config);
    let log = names.dir.join("gateway.log");
    let mut gateway = Gateway::spawn_command(command, &log).expect("gateway starts");
    gateway
        .wait_for_log("shardgate serving", std::time::Duration::from_secs(60))
        .expect("serves");
    let text = std::fs::read_to_string(&log).expect("log");
    let serving: serde_json::Value = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "shardgate serving")
        .expect("the serving line");
    assert_eq!(serving["cores"], 1, "one core: {serving}");
    assert_eq!(
        serving["cpus"],
        format!("[{last}]"),
        "pinned to the allowed CPU: {serving}"
    );
    assert!(gateway.stop().expect("stop").success());
}

/// `serve` under a service manager (`NOTIFY_SOCKET`, as systemd sets it for a `Type=notify`
/// unit): `READY=1` once it serves, with `/ready` answering 200 by then; `STOPPING=1` at
/// SIGTERM. With `--log-format json` every line of its log is one JSON object with a
/// timestamp, level, message and thread, the event's fields beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_notifies_the_service_manager_and_logs_json_lines() {
    use std::os::unix::net::UnixDatagram;
    let _lock = gateway_lock().await;
    let names = Names::new("notify");
    let dir = &names.dir;
    let config = dir.join("gateway.toml");
    std::fs::write(&config, devkit::ingest_gateway_toml("", 2048, 64)).expect("config");
    let socket_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&socket_path);
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(90)))
        .expect("timeout");
    let mut command = Command::new(gateway_binary());
    command
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path);
    let gateway = Gateway::spawn_command(command, &dir.join("gateway.log")).expect("gateway starts");
    let mut buffer = [0u8; 512];
    let received = socket.recv(&mut buffer).expect("a notification within 90 s");
    assert_eq!(String::from_utf8_lossy(&buffer[..received]), "READY=1\n");
    assert_eq!(curl("http", "/ready", None, None), (200, "ready\n".into()));
    let log = gateway.log.clone();
    assert!(gateway.stop().expect("stop").success());
    let received = socket.recv(&mut buffer).expect("a notification at the stop");
    assert_eq!(String::from_utf8_lossy(&buffer[..received]), "STOPPING=1\n");

    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
        .collect();
    for line in &lines {
        for key in ["timestamp", "level", "message", "threadName"] {
            assert!(line[key].is_string(), "no `{key}` in {line}");
        }
    }
    let serving = lines
        .iter()
        .find(|line| line["message"] == "shardgate serving")
        .expect("the serving line");
    assert_eq!(serving["level"], "INFO");
    assert!(serving["cores"].as_u64().is_some_and(|cores| cores >= 1), "{serving}");
    assert!(
        lines.iter().any(|line| line["message"] == "service manager notified"),
        "{text}"
    );
}
