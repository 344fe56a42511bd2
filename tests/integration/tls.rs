//! The gRPC API over TLS with required client certificates, against the real Cassandra: a test
//! CA and its certificates made here (rcgen); rows written by the shard-aware client over TLS
//! to every core's own port and read back from Cassandra; `shardgate export` (a client of the
//! gateway's own, configured by `[ingest.tls]`) reads them back through the TLS listeners; a
//! plaintext client, a client without a certificate and one whose certificate another CA
//! signed are all refused in the handshake, and counted.

use std::process::Command;

use rcgen::ExtendedKeyUsagePurpose;
use shardgate::client::{GatewayAddr, ShardAwareClient};
use shardgate::devkit::{self, Gateway};
use shardgate::tls::ClientTls;

use crate::pki::{client_tls, TestCa};
use crate::{gateway_binary, gateway_lock, Names};

const EVENTS: i64 = 4_000;

fn over_tls(tls: ClientTls) -> GatewayAddr {
    GatewayAddr {
        address: devkit::INGEST_LISTEN.to_string(),
        tls: Some(tls),
        token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_api_serves_tls_with_required_client_certificates() {
    let _lock = gateway_lock().await;
    let names = Names::new("tls_grpc");
    let dir = &names.dir;
    let ca = TestCa::new("shardgate test CA");
    let ca_file = ca.write(dir, "ca");
    let (server_cert, server_key) = ca.issue_server(dir);
    let client = ca.issue(dir, "client", &["loader"], ExtendedKeyUsagePurpose::ClientAuth);
    let internal = ca.issue(dir, "gateway-client", &["gateway"], ExtendedKeyUsagePurpose::ClientAuth);
    let rogue = TestCa::new("another CA").issue(dir, "rogue", &["rogue"], ExtendedKeyUsagePurpose::ClientAuth);

    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let table = format!("{}.events", names.keyspace);
    let config = format!(
        "{}[ingest.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_auth = \"required\"\nclient_ca_file = {:?}\n\
         ca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}\n",
        devkit::ingest_gateway_toml("", 2048, 64),
        server_cert,
        server_key,
        ca_file,
        ca_file,
        internal.0,
        internal.1,
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

    // A client with a certificate of the CA writes to every core's own port over TLS.
    let smart = ShardAwareClient::connect(over_tls(client_tls(&ca_file, Some(&client))), &[&table])
        .await
        .expect("a TLS client with its certificate connects");
    assert!(smart.cores() >= 1);
    let summary = smart
        .stream(devkit::event_batches(&table, EVENTS, 500))
        .await
        .expect("rows streamed over TLS");
    assert_eq!(summary.written, EVENTS as u64, "{summary:?}");
    let report = devkit::verify_events(&session, &names.keyspace, EVENTS as u64)
        .await
        .expect("read back");
    assert_eq!(
        (report.rows, report.matching, report.missing),
        (EVENTS as u64, EVENTS as u64, 0),
        "{:?}",
        report.differences
    );
    let forwarded =
        devkit::scrape_metric(devkit::ADMIN_LISTEN, shardgate::telemetry::metric::ROWS_FORWARDED).expect("scrape");
    assert_eq!(forwarded, 0.0, "every row reached its owner core's own TLS port");

    // `shardgate export` reaches the API with `[ingest.tls]`'s CA and client certificate.
    let (lines, _) = crate::export_lines(&path, &table, dir);
    assert_eq!(lines as i64, EVENTS);

    // Refused in the handshake: plaintext, no client certificate, a certificate of another CA.
    let refusals = [
        ("plaintext", GatewayAddr::from(devkit::INGEST_LISTEN)),
        ("no client certificate", over_tls(client_tls(&ca_file, None))),
        ("another CA's certificate", over_tls(client_tls(&ca_file, Some(&rogue)))),
    ];
    let failures_before =
        devkit::scrape_metric(devkit::ADMIN_LISTEN, "shardgate_tls_handshake_failures_total").unwrap_or(0.0);
    for (what, addr) in refusals {
        let refused = ShardAwareClient::connect(addr, &[&table]).await;
        assert!(refused.is_err(), "{what}: connected");
    }
    let failures =
        devkit::scrape_metric(devkit::ADMIN_LISTEN, "shardgate_tls_handshake_failures_total").expect("scrape");
    assert!(failures >= failures_before + 3.0, "{failures_before} → {failures}");
    assert!(gateway.stop().expect("stop").success());
}
