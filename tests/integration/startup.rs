//! Start-up refusals: bad configs and routes that do not fit the cluster.

use std::process::Command;

use shardgate::devkit;

use crate::{gateway_binary, gateway_lock, Names};

fn run(args: &[&str]) -> (bool, String) {
    let mut command = Command::new(gateway_binary());
    command.args(args);
    crate::outcome(command)
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

/// `check` names the full key path of a wrong type nested in a tagged table.
#[test]
fn check_names_the_full_path_of_a_nested_wrong_type() {
    let names = Names::new("checkpath");
    let config = names.write_config();
    let original = std::fs::read_to_string(&config).expect("read config");
    let bad = names.dir.join("bad.toml");
    std::fs::write(
        &bad,
        original.replace("commit_interval_ms = 500", "commit_interval_ms = \"1s\""),
    )
    .expect("write");
    let (ok, text) = run(&["check", "--config", bad.to_str().expect("utf-8 path")]);
    assert!(!ok);
    assert!(text.contains("`route[0].source.commit_interval_ms`"), "{text}");
    assert!(text.contains("string \"1s\", expected a whole number"), "{text}");
}

/// A clean start with a spool and the ingest API logs no ERROR line (glommio's polled-IO probe
/// is explained at INFO instead), and a table with a non-frozen list is warned about at
/// start-up, before anything writes to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_start_logs_no_error_and_warns_about_list_columns_up_front() {
    let _lock = gateway_lock().await;
    let names = Names::new("cleanstart");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, &names.keyspace)
        .await
        .expect("create table");
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {}.listy (id int PRIMARY KEY, tags list<int>, names list<text>)",
                names.keyspace
            ),
            &[],
        )
        .await
        .expect("create list table");
    session.await_schema_agreement().await.expect("schema agreement");
    let spool = names.dir.join("spool");
    let config = devkit::ingest_gateway_toml("", 2048, 64).replace(
        "write_batch_rows_max = 64",
        &format!("write_batch_rows_max = 64\nspool_dir = \"{}\"", spool.display()),
    );
    let path = names.dir.join("gateway.toml");
    std::fs::write(&path, config).expect("write config");
    let log = names.dir.join("gateway.log");
    let gateway = devkit::Gateway::start(&gateway_binary(), &path, &log).expect("gateway starts");
    let mut gateway = gateway;
    gateway
        .wait_for_log("ingest API listening", std::time::Duration::from_secs(60))
        .expect("ingest API up");
    assert!(gateway.stop().expect("stop").success());
    let text = std::fs::read_to_string(&log).expect("read log");
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "ERROR lines on a clean start: {errors:?}");
    assert!(text.contains("spool open"), "{text}");
    let warning = text
        .lines()
        .find(|l| l.contains("non-frozen list") && l.contains(&format!("{}.listy", names.keyspace)))
        .unwrap_or_else(|| panic!("no start-up warning for the list table: {text}"));
    assert!(warning.contains("names, tags"), "{warning}");
}

/// `shardgate check` accepts every example of the configuration reference.
#[test]
fn check_accepts_every_reference_example() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(shardgate::reference::EXAMPLES_DIR);
    let examples = shardgate::reference::read_examples(&dir).expect("examples");
    assert!(examples.len() >= 6, "{examples:?}");
    for (name, _) in examples {
        let path = dir.join(&name);
        let (ok, text) = run(&["check", "--config", path.to_str().expect("utf-8 path")]);
        assert!(ok, "{name}: {text}");
        assert!(text.contains(": valid, "), "{name}: {text}");
    }
}
