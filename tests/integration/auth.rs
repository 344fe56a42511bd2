//! `[ingest.auth]` against the real Cassandra, over TLS with optional client certificates:
//! principals known by a bearer token or by their certificate's name, each RPC checked against
//! its scope. Calls without a token or with an unknown one are UNAUTHENTICATED; a principal
//! writes, reads and controls jobs within its scopes (rows read back from Cassandra) and is
//! refused PERMISSION_DENIED elsewhere, a stream's forbidden batch alone; the gateway's own
//! clients (a job it runs, `shardgate export`) present `client_token_file`'s token, and so does
//! the Python example over TLS; refusals are counted by reason; no token appears in the
//! gateway's log.

use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rcgen::ExtendedKeyUsagePurpose;
use shardgate::auth::token_sha256_hex;
use shardgate::client::{gateway_channel, GatewayAddr, ShardAwareClient};
use shardgate::devkit::{self, Gateway};
use shardgate::telemetry::metric;
use shardgate::wire::proto::ingest_client::IngestClient;
use shardgate::wire::proto::jobs_client::JobsClient;
use shardgate::wire::proto::query_client::QueryClient;
use shardgate::wire::proto::{
    value::Kind, ErrorCode, ExecuteRequest, GetRequest, JobRequest, ListJobsRequest, Value, WriteRequest,
    WriteStreamRequest,
};
use tonic::Code;

use crate::pki::{client_tls, TestCa};
use crate::{gateway_binary, gateway_lock, Names};

const EVENTS: i64 = 2_000;

/// A fresh random token.
fn new_token(principal: &str) -> String {
    format!("sg-{principal}-{}", uuid::Uuid::new_v4().simple())
}

/// The code a refusal carries in its metadata.
fn error_code(status: &tonic::Status) -> String {
    status
        .metadata()
        .get(shardgate::server::status::ERROR_CODE_METADATA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn assert_forbidden(status: &tonic::Status, principal: &str, scope: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(error_code(status), "FORBIDDEN");
    assert!(
        status.message().contains(&format!("`{principal}`")) && status.message().contains(&format!("`{scope}`")),
        "the refusal names the principal and the scope it lacks: {}",
        status.message()
    );
}

const JOBS: &str = r#"
[[job]]
name = "copy_events"
state_keyspace = "KS"
[job.source]
table = "KS.events"
[[job.sink]]
table = "KS.events_copy"

[[job]]
name = "audit_copy"
state_keyspace = "KS"
[job.source]
table = "KS.secret"
[[job.sink]]
table = "KS.events_copy"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_checks_its_callers_token_or_certificate_against_its_scopes() {
    let _lock = gateway_lock().await;
    let names = Names::new("auth_scopes");
    let (dir, keyspace) = (&names.dir, &names.keyspace);
    let ca = TestCa::new("shardgate auth test CA");
    let ca_file = ca.write(dir, "ca");
    let (server_cert, server_key) = ca.issue_server(dir);
    // Known by its DNS SAN, not its CN (`loader`).
    let loader = ca.issue(dir, "loader", &["loader.example"], ExtendedKeyUsagePurpose::ClientAuth);

    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, keyspace)
        .await
        .expect("create table");
    for table in ["events_copy", "secret", "python"] {
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE {keyspace}.{table} (id bigint PRIMARY KEY, name text, score double, at timestamp, \
                     tags frozen<list<int>>)"
                ),
                &[],
            )
            .await
            .expect("create table");
    }
    let (events, secret) = (format!("{keyspace}.events"), format!("{keyspace}.secret"));

    let [writer, reader, ops, own] = ["writer", "reader", "ops", "gateway"].map(new_token);
    let token_file = dir.join("gateway.token");
    std::fs::write(&token_file, format!("{own}\n")).expect("token file");
    let config = format!(
        "{base}[ingest.tls]\ncert_file = {server_cert:?}\nkey_file = {server_key:?}\nclient_auth = \"optional\"\n\
         client_ca_file = {ca_file:?}\nca_file = {ca_file:?}\n\n\
         [ingest.auth]\nclient_token_file = {token_file:?}\n\n\
         [[ingest.auth.principal]]\nname = \"writer\"\ntoken_sha256 = \"{writer_hash}\"\nscopes = [\"write:{keyspace}.events\"]\n\n\
         [[ingest.auth.principal]]\nname = \"reader\"\ntoken_sha256 = \"{reader_hash}\"\nscopes = [\"read:{keyspace}.*\"]\n\n\
         [[ingest.auth.principal]]\nname = \"ops\"\ntoken_sha256 = \"{ops_hash}\"\nscopes = [\"jobs:copy_*\"]\n\n\
         [[ingest.auth.principal]]\nname = \"gateway\"\ntoken_sha256 = \"{own_hash}\"\nscopes = [\"admin\"]\n\n\
         [[ingest.auth.principal]]\nname = \"loader\"\ncertificate = \"loader.example\"\nscopes = [\"read:{keyspace}.events\"]\n\
         {jobs}",
        base = devkit::ingest_gateway_toml("", 2048, 64),
        writer_hash = token_sha256_hex(&writer),
        reader_hash = token_sha256_hex(&reader),
        ops_hash = token_sha256_hex(&ops),
        own_hash = token_sha256_hex(&own),
        jobs = JOBS.replace("KS", keyspace),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).expect("config");
    let check = Command::new(gateway_binary())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check runs");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let gateway = Gateway::start(&gateway_binary(), &path, &dir.join("gateway.log")).expect("gateway starts");
    let tls = client_tls(&ca_file, None);
    let address = GatewayAddr {
        address: devkit::INGEST_LISTEN.to_string(),
        tls: Some(tls.clone()),
        token: None,
    };
    let as_principal = |token: &str| address.clone().with_token(token);

    // No token, an unknown one, a header that is not `Bearer`: UNAUTHENTICATED, nothing echoed.
    let wrong = new_token("nobody");
    for (what, addr) in [("no token", address.clone()), ("unknown token", as_principal(&wrong))] {
        let refused = ShardAwareClient::connect(addr, &[&events]).await;
        let Err(shardgate::client::ClientError::Topology(status)) = refused else {
            panic!("{what}: not refused at GetTopology");
        };
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert_eq!(error_code(&status), "UNAUTHENTICATED");
        assert!(
            !status.message().contains(&wrong),
            "the token is echoed: {}",
            status.message()
        );
    }

    // The writer streams to every core's own port: every row written, none forwarded.
    let smart = ShardAwareClient::connect(as_principal(&writer), &[&events])
        .await
        .expect("the writer connects");
    let summary = smart
        .stream(devkit::event_batches(&events, EVENTS, 250))
        .await
        .expect("rows streamed");
    assert_eq!(summary.written, EVENTS as u64, "{summary:?}");
    let report = devkit::verify_events(&session, keyspace, EVENTS as u64)
        .await
        .expect("read back");
    assert_eq!((report.rows, report.matching), (EVENTS as u64, EVENTS as u64));
    assert_eq!(
        devkit::scrape_metric(devkit::ADMIN_LISTEN, metric::ROWS_FORWARDED).expect("scrape"),
        0.0
    );

    // Outside its pattern: a unary write refused as a whole; in a stream, that batch alone.
    let mut ingest = smart.shared_client();
    let refused = ingest
        .write(WriteRequest {
            batch: Some(devkit::event_batches(&secret, 10, 10).remove(0)),
            ..Default::default()
        })
        .await
        .expect_err("a write outside the writer's scopes");
    assert_forbidden(&refused, "writer", &format!("write:{secret}"));
    let mut forbidden_batch = devkit::event_batches(&secret, 5, 5).remove(0);
    forbidden_batch.rows.truncate(5);
    let allowed_batch = devkit::event_batches(&events, EVENTS + 10, 10)
        .pop()
        .expect("last batch");
    let requests = futures::stream::iter([
        WriteStreamRequest {
            batch_id: 1,
            batch: Some(forbidden_batch),
            ..Default::default()
        },
        WriteStreamRequest {
            batch_id: 2,
            batch: Some(allowed_batch),
            ..Default::default()
        },
    ]);
    let answers: Vec<_> = ingest
        .write_stream(requests)
        .await
        .expect("stream opens")
        .into_inner()
        .map(|answer| answer.expect("answer"))
        .collect()
        .await;
    let answer = |id| answers.iter().find(|a| a.batch_id == id).expect("answered");
    let refusal = answer(1).batch_error.clone().expect("batch 1 refused");
    assert_eq!(refusal.code, ErrorCode::Forbidden as i32, "{refusal:?}");
    assert!(
        refusal.reason.contains(&format!("write:{secret}")),
        "{}",
        refusal.reason
    );
    assert_eq!((answer(2).written, answer(2).batch_error.is_none()), (10, true));
    let key = |id: i64| Value {
        kind: Some(Kind::Int(id)),
    };
    let get = |table: &str, id| GetRequest {
        table: table.to_string(),
        key: vec![key(id)],
        ..Default::default()
    };
    // Reading is another scope.
    let mut writer_query = smart.query_client();
    let refused = writer_query.get(get(&events, 5)).await.expect_err("the writer reads");
    assert_forbidden(&refused, "writer", &format!("read:{events}"));

    // The reader reads its keyspace, and nothing else, and writes nothing.
    let mut reader_query = QueryClient::new(
        gateway_channel(&as_principal(&reader), devkit::INGEST_LISTEN)
            .await
            .expect("channel"),
    );
    let found = reader_query
        .get(get(&events, 5))
        .await
        .expect("the reader gets")
        .into_inner();
    assert_eq!(found.result.map(|r| r.rows.len()), Some(1));
    let execute = |cql: String| ExecuteRequest {
        cql,
        ..Default::default()
    };
    let counted = reader_query
        .execute(execute(format!("SELECT id FROM {events} WHERE id = 7")))
        .await
        .expect("the reader executes a SELECT")
        .into_inner();
    assert_eq!(counted.result.map(|r| r.rows.len()), Some(1));
    let refused = reader_query
        .execute(execute("SELECT release_version FROM system.local".into()))
        .await
        .expect_err("another keyspace");
    assert_forbidden(&refused, "reader", "read:system.local");
    let mut reader_ingest = IngestClient::new(
        gateway_channel(&as_principal(&reader), devkit::INGEST_LISTEN)
            .await
            .expect("channel"),
    );
    let refused = reader_ingest
        .write(WriteRequest {
            batch: Some(devkit::event_batches(&events, 1, 1).remove(0)),
            ..Default::default()
        })
        .await
        .expect_err("the reader writes");
    assert_forbidden(&refused, "reader", &format!("write:{events}"));

    // A client certificate names its principal when no token is sent.
    let by_certificate = GatewayAddr {
        address: devkit::INGEST_LISTEN.to_string(),
        tls: Some(client_tls(&ca_file, Some(&loader))),
        token: None,
    };
    let mut loader_query = QueryClient::new(
        gateway_channel(&by_certificate, devkit::INGEST_LISTEN)
            .await
            .expect("channel"),
    );
    let found = loader_query
        .get(get(&events, 9))
        .await
        .expect("the loader gets")
        .into_inner();
    assert_eq!(found.result.map(|r| r.rows.len()), Some(1));
    let refused = loader_query
        .get(get(&secret, 9))
        .await
        .expect_err("the loader reads another table");
    assert_forbidden(&refused, "loader", &format!("read:{secret}"));

    // Jobs: `ops` sees and runs its jobs only; the job reads and writes through the gateway as
    // its own principal (`client_token_file`).
    let mut jobs = JobsClient::new(
        gateway_channel(&as_principal(&ops), devkit::INGEST_LISTEN)
            .await
            .expect("channel"),
    );
    let listed: Vec<String> = jobs
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.job)
        .collect();
    assert_eq!(listed, ["copy_events"]);
    let refused = jobs
        .start_job(JobRequest {
            job: "audit_copy".into(),
        })
        .await
        .expect_err("a job outside the pattern");
    assert_forbidden(&refused, "ops", "jobs:audit_copy");
    let request = || JobRequest {
        job: "copy_events".into(),
    };
    jobs.start_job(request()).await.expect("start");
    let started = Instant::now();
    let status = loop {
        let status = jobs.get_job_status(request()).await.expect("status").into_inner();
        if status.state != "running" {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the job ran 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.state, "done", "{status:?}");
    let copied = devkit::count_rows::<i64>(&session, keyspace, "events_copy", "id")
        .await
        .expect("count");
    assert_eq!(copied, EVENTS as u64 + 10);

    // `shardgate export` reads as the gateway's own principal.
    let (lines, export_stderr) = crate::export_lines(&path, &events, dir);
    assert_eq!(lines as i64, EVENTS + 10);

    // The Python example over TLS with a token (SHARDGATE_CA_FILE, SHARDGATE_TOKEN_FILE).
    let stdout = crate::run_python_example(
        &format!("{keyspace}.python"),
        &[("SHARDGATE_CA_FILE", &ca_file), ("SHARDGATE_TOKEN_FILE", &token_file)],
    );
    assert!(stdout.contains("python example OK: 500 rows"), "{stdout}");
    let python_rows = devkit::count_rows::<i64>(&session, keyspace, "python", "id")
        .await
        .expect("count");
    assert_eq!(python_rows, 500, "the Python example's rows are in its table");

    let failures = |reason: &str| {
        devkit::scrape_metric_where(devkit::ADMIN_LISTEN, metric::AUTH_FAILURES, &[("reason", reason)]).expect("scrape")
    };
    assert!(failures("no_credentials") >= 1.0);
    assert!(failures("unknown_token") >= 1.0);
    assert!(failures("forbidden") >= 7.0, "{}", failures("forbidden"));
    assert!(gateway.stop().expect("stop").success());
    let mut output = std::fs::read_to_string(dir.join("gateway.log")).expect("log");
    output.push_str(&export_stderr);
    output.push_str(&String::from_utf8_lossy(&check.stderr));
    for token in [&writer, &reader, &ops, &own, &wrong] {
        assert!(
            !output.contains(token.as_str()),
            "a token appears in the gateway's output"
        );
    }
}

/// A P-256 signing key (PKCS#8 DER) and its public JWK named `kid`.
fn jwt_key(kid: &str) -> (Vec<u8>, serde_json::Value) {
    use base64::Engine;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let point = pair.public_key_raw();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    });
    (pair.serialize_der(), jwk)
}

/// A JWT signed by `der` as key `kid`, for subject `etl` with `scope`, expiring at `exp`.
fn jwt(der: &[u8], kid: &str, scope: &str, exp: i64) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_string());
    let claims = serde_json::json!({
        "iss": "https://id.example", "aud": "shardgate", "sub": "etl", "exp": exp, "scope": scope,
    });
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_der(der)).expect("sign")
}

/// `[ingest.auth.jwt]`: a JWT signed by a key of the JWKS file writes within its `scope` claim
/// (rows read back from Cassandra) and is refused PERMISSION_DENIED outside it; an expired JWT,
/// one signed by another key and one of an unknown `kid` are UNAUTHENTICATED, each saying why,
/// and counted by reason; no token appears in a refusal or the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_signed_by_the_jwks_write_within_their_scope_claim() {
    let _lock = gateway_lock().await;
    let names = Names::new("auth_jwt");
    let (dir, keyspace) = (&names.dir, &names.keyspace);
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, keyspace)
        .await
        .expect("create table");
    let (events, other) = (format!("{keyspace}.events"), format!("{keyspace}.other"));
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {other} (id bigint PRIMARY KEY, name text, score double, at timestamp, tags frozen<list<int>>)"
            ),
            &[],
        )
        .await
        .expect("create table");
    let (der, jwk) = jwt_key("k1");
    let (rogue_der, _) = jwt_key("k1");
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, serde_json::json!({ "keys": [jwk] }).to_string()).expect("jwks");
    let config = format!(
        "{}[ingest.auth.jwt]\njwks_file = {jwks:?}\nissuer = \"https://id.example\"\naudience = \"shardgate\"\n",
        devkit::ingest_gateway_toml("", 2048, 64)
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).expect("config");
    let check = Command::new(gateway_binary())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check runs");
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let gateway = Gateway::start(&gateway_binary(), &path, &dir.join("gateway.log")).expect("gateway starts");
    let now = chrono::Utc::now().timestamp();
    let scope = format!("openid write:{keyspace}.events");
    let good = jwt(&der, "k1", &scope, now + 600);
    let address = GatewayAddr::from(devkit::INGEST_LISTEN);

    let smart = ShardAwareClient::connect(address.clone().with_token(&good), &[&events])
        .await
        .expect("a valid JWT connects");
    let summary = smart
        .stream(devkit::event_batches(&events, EVENTS, 250))
        .await
        .expect("rows streamed");
    assert_eq!(summary.written, EVENTS as u64, "{summary:?}");
    let report = devkit::verify_events(&session, keyspace, EVENTS as u64)
        .await
        .expect("read back");
    assert_eq!((report.rows, report.matching), (EVENTS as u64, EVENTS as u64));
    let refused = smart
        .shared_client()
        .write(WriteRequest {
            batch: Some(devkit::event_batches(&other, 5, 5).remove(0)),
            ..Default::default()
        })
        .await
        .expect_err("outside the scope claim");
    assert_forbidden(&refused, "jwt:etl", &format!("write:{other}"));

    let refusals = [
        ("expired", jwt(&der, "k1", &scope, now - 600), "expired"),
        ("another key", jwt(&rogue_der, "k1", &scope, now + 600), "signature"),
        ("unknown kid", jwt(&der, "k9", &scope, now + 600), "`kid`"),
    ];
    for (what, token, says) in &refusals {
        let Err(shardgate::client::ClientError::Topology(status)) =
            ShardAwareClient::connect(address.clone().with_token(token), &[&events]).await
        else {
            panic!("{what}: not refused at GetTopology");
        };
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(status.message().contains(says), "{what}: {}", status.message());
        assert!(
            !status.message().contains(token.as_str()),
            "{what}: the token is echoed"
        );
    }
    let failures = |reason: &str| {
        devkit::scrape_metric_where(devkit::ADMIN_LISTEN, metric::AUTH_FAILURES, &[("reason", reason)]).unwrap_or(0.0)
    };
    assert!(failures("jwt_expired") >= 1.0);
    assert!(failures("jwt_invalid") >= 2.0);
    let log = gateway.log.clone();
    assert!(gateway.stop().expect("stop").success());
    let text = std::fs::read_to_string(log).expect("log");
    for token in std::iter::once(&good).chain(refusals.iter().map(|(_, t, _)| t)) {
        assert!(!text.contains(token.as_str()), "a JWT is in the log");
    }
}
