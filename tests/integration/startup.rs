//! Start-up refusals: bad configs and routes that do not fit the cluster.

use std::process::Command;

use shardgate::devkit;

use crate::{gateway_binary, gateway_lock, Names};

fn run(args: &[&str]) -> (bool, String) {
    let output = Command::new(gateway_binary())
        .args(args)
        .output()
        .expect("run shardgate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// `check` accepts a valid config and refuses a bad one naming the key, value and expectation.
#[test]
fn check_names_the_bad_key() {
    let names = Names::new("check");
    let config = names.write_config();
    let (ok, text) = run(&["check", "--config", config.to_str().expect("utf-8 path")]);
    assert!(ok, "{text}");
    assert!(text.contains("valid, 1 route(s)"), "{text}");

    let bad = names.dir.join("bad.toml");
    let original = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(&bad, original.replace("local_quorum", "mostly")).expect("write");
    let (ok, text) = run(&["check", "--config", bad.to_str().expect("utf-8 path")]);
    assert!(!ok);
    assert!(text.contains("`cluster.consistency` = `mostly`: one of"), "{text}");

    std::fs::write(
        &bad,
        original.replace("format = \"json\"", "format = \"json\"\nfromat = 1"),
    )
    .expect("write");
    let (ok, text) = run(&["check", "--config", bad.to_str().expect("utf-8 path")]);
    assert!(!ok);
    assert!(text.contains("unknown field `fromat`"), "{text}");
}

/// A route whose table or column does not exist is refused at start with a clear message,
/// before any message is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_to_missing_table_or_column_is_refused() {
    let _lock = gateway_lock().await;
    let names = Names::new("refuse");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", names.keyspace), &[])
        .await
        .expect("drop");
    let config = names.write_config();
    let (ok, text) = run(&["serve", "--config", config.to_str().expect("utf-8 path")]);
    assert!(!ok);
    assert!(
        text.contains(&format!(
            "table `{}.orders` does not exist in the cluster",
            names.keyspace
        )),
        "{text}"
    );

    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let original = std::fs::read_to_string(&config).expect("read config");
    std::fs::write(
        &config,
        original.replace("quantity = \"quantity\"", "qty = \"quantity\""),
    )
    .expect("write");
    let (ok, text) = run(&["serve", "--config", config.to_str().expect("utf-8 path")]);
    assert!(!ok);
    assert!(text.contains("has no column `qty`"), "{text}");
}
