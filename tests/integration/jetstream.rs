//! JetStream → Cassandra route: volume with dead letters, crash recovery.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use shardgate::devkit::{self, Gateway};

use crate::{assert_all_orders_exact, gateway_binary, gateway_lock, Names};

const DEADLINE: Duration = Duration::from_secs(300);

/// Stream, subjects and durable of one test.
struct JetStreamNames {
    stream: String,
    subject: String,
    durable: String,
    dead_letter_stream: String,
    dead_letter_subject: String,
}

impl JetStreamNames {
    fn new(names: &Names, test: &str) -> JetStreamNames {
        let run = names.group.rsplit('-').next().unwrap_or("0").to_string();
        JetStreamNames {
            stream: format!("IT_{test}_{run}"),
            subject: format!("it.{test}.{run}.orders"),
            durable: format!("shardgate-{test}"),
            dead_letter_stream: format!("IT_{test}_{run}_DL"),
            dead_letter_subject: format!("it.{test}.{run}.dead-letter"),
        }
    }

    fn write_config(&self, names: &Names) -> PathBuf {
        let routes = devkit::jetstream_orders_route_toml(
            "orders",
            &names.keyspace,
            &self.stream,
            &self.subject,
            &self.durable,
            &self.dead_letter_subject,
        );
        let path = names.dir.join("gateway.toml");
        std::fs::write(&path, devkit::gateway_toml(&routes)).expect("write config");
        path
    }
}

async fn setup(names: &Names, js: &JetStreamNames) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    devkit::create_stream(&js.stream, &[&js.subject])
        .await
        .expect("NATS with JetStream is up: create source stream");
    devkit::create_stream(&js.dead_letter_stream, &[&js.dead_letter_subject])
        .await
        .expect("create dead-letter stream");
}

/// Waits until the durable has nothing undelivered and nothing unacked.
async fn wait_all_acked(js: &JetStreamNames) {
    let started = Instant::now();
    loop {
        if let Some((0, 0)) = devkit::jetstream_backlog(&js.stream, &js.durable)
            .await
            .expect("backlog")
        {
            return;
        }
        assert!(started.elapsed() < DEADLINE, "JetStream consumer did not drain");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// 20,000 orders and 30 malformed messages through a JetStream durable: every order lands with
/// exact values, every malformed message is in the dead-letter stream with its reason and
/// coordinates, and the consumer ends with nothing pending or unacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_messages_land_exactly_and_poison_is_dead_lettered() {
    let _lock = gateway_lock().await;
    let names = Names::new("jsvolume");
    let js = JetStreamNames::new(&names, "jsvolume");
    setup(&names, &js).await;
    let count = 20_000;
    let bad = 30;
    let good = (0..count).map(devkit::order_message_with_id);
    let malformed = (0..bad).map(|j| devkit::malformed_message(j).1);
    let sent = devkit::publish_jetstream(&js.subject, good.chain(malformed))
        .await
        .expect("publish");
    assert_eq!(sent, count + bad);

    let gateway = Gateway::start(
        &gateway_binary(),
        &js.write_config(&names),
        &names.dir.join("gateway.log"),
    )
    .expect("gateway starts");
    wait_all_acked(&js).await;
    assert!(gateway.stop().expect("stop").success(), "graceful stop exits 0");

    assert_all_orders_exact(&names, count).await;
    let letters = devkit::read_stream(&js.dead_letter_stream, bad as usize, Duration::from_secs(30))
        .await
        .expect("read dead letters");
    assert_eq!(letters.len(), bad as usize, "one dead letter per malformed message");
    for letter in &letters {
        let sequence: u64 = letter.headers["shardgate.source.sequence"].parse().expect("sequence");
        assert!(sequence > count && sequence <= count + bad, "sequence {sequence}");
        let j = sequence - count - 1;
        // NATS messages have no key: the third kind lacks `order_id` rather than a Kafka key.
        let expected = ["not_json", "bad_value", "missing_key_column"][(j % 3) as usize];
        assert_eq!(
            letter.headers.get("shardgate.reason.code").map(String::as_str),
            Some(expected),
            "{:?}",
            letter.headers
        );
        assert!(letter.headers.get("shardgate.reason").is_some_and(|r| !r.is_empty()));
        assert_eq!(
            letter.headers.get("shardgate.route").map(String::as_str),
            Some("orders")
        );
        assert_eq!(letter.headers.get("shardgate.source.stream"), Some(&js.stream));
        assert_eq!(letter.headers.get("shardgate.source.subject"), Some(&js.subject));
        assert_eq!(letter.payload, devkit::malformed_message(j).1, "original bytes");
    }
}

/// `kill -9` mid-stream, then a restart: the unacked messages are redelivered and exactly
/// 50,000 orders land with exact values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_kill_9_mid_stream_then_restart_loses_nothing() {
    let _lock = gateway_lock().await;
    let names = Names::new("jskill");
    let js = JetStreamNames::new(&names, "jskill");
    setup(&names, &js).await;
    let count = 50_000;
    devkit::publish_jetstream(&js.subject, (0..count).map(devkit::order_message_with_id))
        .await
        .expect("publish");
    let config = js.write_config(&names);

    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-1.log")).expect("gateway starts");
    let started = Instant::now();
    loop {
        if let Some((pending, _)) = devkit::jetstream_backlog(&js.stream, &js.durable)
            .await
            .expect("backlog")
        {
            if pending < count - 5_000 {
                break;
            }
        }
        assert!(started.elapsed() < DEADLINE, "gateway made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway.kill9().expect("kill -9");
    let (pending, _) = devkit::jetstream_backlog(&js.stream, &js.durable)
        .await
        .expect("backlog")
        .expect("consumer exists");
    assert!(pending > 0, "killed mid-stream, with messages still undelivered");

    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-2.log")).expect("restart");
    wait_all_acked(&js).await;
    assert!(gateway.stop().expect("stop").success());
    assert_all_orders_exact(&names, count).await;
}

/// 1,000 updates of one order published in one burst, after 500 other orders so their stream
/// sequences straddle 1,000, apply in stream order: the last update reads back, written at the
/// stream's store time. Then a second durable replays the stream and writes identical cells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_burst_of_updates_to_one_key_applies_in_order() {
    let _lock = gateway_lock().await;
    let names = Names::new("jsburst");
    let mut js = JetStreamNames::new(&names, "jsburst");
    setup(&names, &js).await;
    devkit::publish_jetstream(&js.subject, (0..500).map(devkit::order_message_with_id))
        .await
        .expect("publish");
    let template: serde_json::Value = serde_json::from_slice(&devkit::order_message_with_id(900_000)).expect("json");
    let updates = (0..1000i64).map(|n| {
        let mut order = template.clone();
        order["customer"]["id"] = serde_json::json!(n);
        order.to_string().into_bytes()
    });
    devkit::publish_jetstream(&js.subject, updates)
        .await
        .expect("publish updates");

    let read_back = || async {
        let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
        session
            .query_unpaged(
                format!(
                    "SELECT customer_id, WRITETIME(customer_id) FROM {}.orders WHERE order_id = ?",
                    names.keyspace
                ),
                (template["order_id"].as_str().expect("id"),),
            )
            .await
            .expect("select")
            .into_rows_result()
            .expect("rows")
            .single_row::<(Option<i64>, Option<i64>)>()
            .expect("one row")
    };
    let mut written = Vec::new();
    for run in ["first", "replay"] {
        let config = js.write_config(&names);
        let gateway = Gateway::start(
            &gateway_binary(),
            &config,
            &names.dir.join(format!("gateway-{run}.log")),
        )
        .expect("gateway starts");
        wait_all_acked(&js).await;
        assert!(gateway.stop().expect("stop").success());
        let (customer_id, writetime) = read_back().await;
        assert_eq!(customer_id, Some(999), "{run}: the last update of the burst wins");
        written.push(writetime.expect("write time"));
        // The replay reads the same stream with a new durable.
        js.durable = format!("{}-replay", js.durable);
    }
    assert_eq!(written[0], written[1], "a replay writes identical cells");
}
