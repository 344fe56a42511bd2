//! Kafka → Cassandra route: volume, crash recovery, dead letters.

use std::collections::BTreeMap;
use std::time::Duration;

use shardgate::devkit::{self, Gateway};
use shardgate::telemetry::metric;

use crate::{assert_all_orders_exact, gateway_binary, gateway_lock, wait_committed, Names};

const PARTITIONS: i32 = 6;
const DEADLINE: Duration = Duration::from_secs(300);

fn orders(count: u64) -> impl Iterator<Item = (String, Vec<u8>)> {
    (0..count).map(|i| {
        let (key, payload) = devkit::order_message(i);
        (key, payload.into_bytes())
    })
}

async fn setup(names: &Names) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    devkit::create_topic(&names.topic, PARTITIONS)
        .await
        .expect("Kafka is up: create source topic");
    devkit::create_topic(&names.dead_letter_topic, 1)
        .await
        .expect("create dead-letter topic");
}

/// 100,000 JSON messages over 6 partitions all land with exact values, and the group's committed
/// offsets reach the end of every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_land_exactly() {
    let _lock = gateway_lock().await;
    let names = Names::new("volume");
    setup(&names).await;
    let count = 100_000;
    assert_eq!(devkit::produce(&names.topic, orders(count)).expect("produce"), count);

    let gateway = Gateway::start(&gateway_binary(), &names.write_config(), &names.dir.join("gateway.log"))
        .expect("gateway starts");
    wait_committed(&names, PARTITIONS, count as i64, DEADLINE);
    let written_by_core = |core: usize| {
        let core = core.to_string();
        let labels = [("source", "orders"), ("core", core.as_str())];
        devkit::scrape_metric_where(devkit::ADMIN_LISTEN, metric::ROWS_WRITTEN, &labels).expect("metrics")
    };
    let cores = shardgate::runtime::data_plane_cpus(None).expect("hwloc").len();
    let written: Vec<f64> = (0..cores).map(written_by_core).collect();
    let forwarded = devkit::scrape_metric_where(devkit::ADMIN_LISTEN, metric::ROWS_FORWARDED, &[("source", "orders")])
        .expect("metrics");
    // librdkafka reports consumer lag every 5 s: one gauge per partition, all 0 once drained.
    let lag_started = std::time::Instant::now();
    let lags = loop {
        let lags = devkit::scrape_samples(devkit::ADMIN_LISTEN, metric::KAFKA_CONSUMER_LAG, &[("route", "orders")])
            .expect("metrics");
        if lags.len() == PARTITIONS as usize && lags.iter().all(|&lag| lag == 0.0) {
            break lags;
        }
        assert!(
            lag_started.elapsed() < Duration::from_secs(30),
            "consumer lag per partition after draining: {lags:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(lags.len(), PARTITIONS as usize);
    let status = gateway.stop().expect("stop gateway");
    assert!(status.success(), "graceful stop exits 0, got {status}");

    assert_all_orders_exact(&names, count).await;
    // Every row is written by the core that owns its token, whichever core read its partition.
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let owned = devkit::orders_per_owner_core(&session, &names.keyspace, count, cores).expect("ownership");
    let owned: Vec<f64> = owned.into_iter().map(|n| n as f64).collect();
    assert_eq!(written, owned, "rows written per core vs rows each core owns");
    if cores > 1 {
        assert!(forwarded > 0.0, "partitions' cores hand foreign rows to their owners");
    }
    let (committed, end) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
    assert_eq!(committed, end, "every partition committed to its end");
}

/// `kill -9` of the gateway mid-stream, then a restart: still exactly 300,000 rows with the
/// right values (replays are idempotent), and offsets resume to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_loses_nothing() {
    let _lock = gateway_lock().await;
    let names = Names::new("kill9");
    setup(&names).await;
    // Enough that the kill lands mid-stream: the gateway wrote all of 100,000 (about 1.5 s at
    // its rate here) before the first commit past 15,000 was seen.
    let count = 300_000;
    devkit::produce(&names.topic, orders(count)).expect("produce");
    let config = names.write_config();

    let first = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-1.log")).expect("gateway starts");
    let committed_at_kill = wait_committed(&names, PARTITIONS, 15_000, DEADLINE);
    first.kill9().expect("kill -9");
    assert!(
        committed_at_kill < count as i64,
        "the kill must land mid-stream (committed {committed_at_kill})"
    );
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let rows_at_kill = devkit::count_rows::<String>(&session, &names.keyspace, "orders", "order_id")
        .await
        .expect("count");
    assert!(rows_at_kill < count, "rows at kill: {rows_at_kill}");

    let second =
        Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-2.log")).expect("gateway restarts");
    wait_committed(&names, PARTITIONS, count as i64, DEADLINE);
    assert!(second.stop().expect("stop").success());

    assert_all_orders_exact(&names, count).await;
    let (committed, end) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
    assert_eq!(committed, end);
}

/// Malformed messages (not JSON, a value that cannot be coerced, no key for the key column) land
/// in the dead-letter topic with reason, source coordinates and the original bytes, while every
/// valid message is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_reasons() {
    let _lock = gateway_lock().await;
    let names = Names::new("deadletter");
    setup(&names).await;
    let valid = 2_000;
    let malformed = 30;
    let mut expected_codes: BTreeMap<String, (&'static str, Vec<u8>)> = BTreeMap::new();
    let mut messages = Vec::new();
    for i in 0..valid {
        let (key, payload) = devkit::order_message(i);
        messages.push((key, payload.into_bytes()));
        if i % (valid / malformed) == 0 && (expected_codes.len() as u64) < malformed {
            let j = expected_codes.len() as u64;
            let (key, payload, code) = devkit::malformed_message(j);
            // Keyless messages are told apart by their payload.
            expected_codes.insert(
                format!("{key}|{}", String::from_utf8_lossy(&payload)),
                (code, payload.clone()),
            );
            messages.push((key, payload));
        }
    }
    let total = messages.len() as i64;
    devkit::produce(&names.topic, messages).expect("produce");

    let gateway = Gateway::start(&gateway_binary(), &names.write_config(), &names.dir.join("gateway.log"))
        .expect("gateway starts");
    wait_committed(&names, PARTITIONS, total, DEADLINE);
    assert!(gateway.stop().expect("stop").success());

    assert_all_orders_exact(&names, valid).await;
    let letters = devkit::read_topic(&names.dead_letter_topic, malformed as usize, Duration::from_secs(60))
        .expect("read dead letters");
    assert_eq!(
        letters.len() as u64,
        malformed,
        "every malformed message is dead-lettered once"
    );
    let mut offsets_seen = std::collections::BTreeSet::new();
    for letter in &letters {
        let key = letter
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let payload = letter.payload.clone().unwrap_or_default();
        let lookup = format!("{key}|{}", String::from_utf8_lossy(&payload));
        let (code, original) = expected_codes
            .get(&lookup)
            .unwrap_or_else(|| panic!("unexpected dead letter {lookup}"));
        assert_eq!(&payload, original, "original payload kept");
        assert_eq!(
            letter.headers.get("shardgate.reason.code").map(String::as_str),
            Some(*code),
            "{:?}",
            letter.headers
        );
        assert!(!letter.headers["shardgate.reason"].is_empty());
        assert_eq!(letter.headers["shardgate.route"], "orders");
        assert_eq!(letter.headers["shardgate.source.topic"], names.topic);
        let partition: i32 = letter.headers["shardgate.source.partition"]
            .parse()
            .expect("partition header");
        let offset: i64 = letter.headers["shardgate.source.offset"]
            .parse()
            .expect("offset header");
        assert!((0..PARTITIONS).contains(&partition));
        assert!(offsets_seen.insert((partition, offset)), "no duplicate dead letters");
    }
}

/// 1,000 updates of one key within one millisecond (same Kafka timestamp, offsets 500..1499 so
/// they straddle a multiple of 1000) apply in source order: the last one is what reads back.
/// Then the same 1,500 messages replayed by a fresh consumer group write identical cells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_updates_in_one_millisecond_apply_in_order() {
    let _lock = gateway_lock().await;
    let names = Names::new("samems");
    setup(&names).await;
    let millis = chrono::Utc::now().timestamp_millis();
    let others = (0..500).map(|i| {
        let (key, payload) = devkit::order_message(i);
        (key, payload.into_bytes())
    });
    devkit::produce_at_time(&names.topic, 0, millis - 1, others).expect("produce");
    let (key, template) = devkit::order_message(900_000);
    let updates = (0..1000i64).map(|n| {
        let mut order: serde_json::Value = serde_json::from_str(&template).expect("json");
        order["customer"]["id"] = serde_json::json!(n);
        (key.clone(), order.to_string().into_bytes())
    });
    devkit::produce_at_time(&names.topic, 0, millis, updates).expect("produce updates");

    let read_back = || async {
        let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
        let row: (Option<i64>, Option<i64>) = session
            .query_unpaged(
                format!(
                    "SELECT customer_id, WRITETIME(customer_id) FROM {}.orders WHERE order_id = ?",
                    names.keyspace
                ),
                (&key,),
            )
            .await
            .expect("select")
            .into_rows_result()
            .expect("rows")
            .single_row()
            .expect("one row");
        row
    };
    let gateway = Gateway::start(&gateway_binary(), &names.write_config(), &names.dir.join("gateway.log"))
        .expect("gateway starts");
    wait_committed(&names, PARTITIONS, 1_500, DEADLINE);
    assert!(gateway.stop().expect("stop").success());
    let (last, written_at) = read_back().await;
    assert_eq!(last, Some(999), "the last of 1,000 same-millisecond updates wins");
    let written_at = written_at.expect("write time");
    assert!(
        written_at >= millis * 1000 + 999,
        "1,000 distinct increasing write times from {}: {written_at}",
        millis * 1000
    );

    // A replay from the start (new group) stamps the same write times: nothing changes.
    let replay = Names {
        group: format!("{}-replay", names.group),
        ..names.clone()
    };
    let gateway = Gateway::start(&gateway_binary(), &replay.write_config(), &names.dir.join("replay.log"))
        .expect("gateway starts");
    wait_committed(&replay, PARTITIONS, 1_500, DEADLINE);
    assert!(gateway.stop().expect("stop").success());
    assert_eq!(
        read_back().await,
        (Some(999), Some(written_at)),
        "replay writes identical cells"
    );
}

/// A gateway killed with `kill -9` and restarted resumes its partitions at once: its Kafka
/// route rejoins as the same static member (`runtime.gateway_id`), so the group does not wait
/// out the old member's session timeout (45 s here, librdkafka's default) — the restarted
/// gateway holds all 6 partitions within 15 s, and every row lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_kill_9_resumes_partitions_without_waiting_for_the_session_timeout() {
    let _lock = gateway_lock().await;
    let names = Names::new("static");
    setup(&names).await;
    let count = 30_000;
    devkit::produce(&names.topic, orders(count)).expect("produce");
    let config = names.write_config();
    let text = std::fs::read_to_string(&config).expect("read config");
    let text = text
        .replace(
            "\"session.timeout.ms\" = \"6000\"",
            "\"session.timeout.ms\" = \"45000\"",
        )
        .replace("[runtime]\n", "[runtime]\ngateway_id = \"it-static\"\n");
    std::fs::write(&config, text).expect("write config");

    let first = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-1.log")).expect("gateway starts");
    wait_committed(&names, PARTITIONS, 3_000, DEADLINE);
    first.kill9().expect("kill -9");

    let restarted = std::time::Instant::now();
    let log = names.dir.join("gateway-2.log");
    let second = Gateway::start(&gateway_binary(), &config, &log).expect("gateway restarts");
    loop {
        let assigned = devkit::scrape_metric_where(
            devkit::ADMIN_LISTEN,
            metric::KAFKA_ASSIGNED_PARTITIONS,
            &[("route", "orders")],
        )
        .unwrap_or(0.0);
        if assigned == f64::from(PARTITIONS) {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(15),
            "the restarted gateway holds {assigned} of {PARTITIONS} partitions {:?} after the restart",
            restarted.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(&log).expect("read log");
    assert!(
        text.contains("member=\"shardgate.it-static.orders\""),
        "static member named in the log"
    );
    wait_committed(&names, PARTITIONS, count as i64, DEADLINE);
    assert!(second.stop().expect("stop").success());
    assert_all_orders_exact(&names, count).await;
}
