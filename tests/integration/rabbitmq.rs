//! RabbitMQ → Cassandra route: volume with dead letters, crash recovery.

use std::time::{Duration, Instant};

use shardgate::devkit::{self, Gateway};

use crate::{assert_all_orders_exact, gateway_binary, gateway_lock, Names};

const DEADLINE: Duration = Duration::from_secs(300);

struct Queues {
    source: String,
    dead_letter: String,
}

async fn setup(names: &Names, test: &str) -> (Queues, std::path::PathBuf) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let queues = Queues {
        source: format!("it.{test}.orders"),
        dead_letter: format!("it.{test}.dead-letter"),
    };
    devkit::recreate_queue(&queues.source)
        .await
        .expect("RabbitMQ is up: declare source queue");
    devkit::recreate_queue(&queues.dead_letter)
        .await
        .expect("declare dead-letter queue");
    let routes = devkit::rabbitmq_orders_route_toml("orders", &names.keyspace, &queues.source, &queues.dead_letter);
    let path = names.dir.join("gateway.toml");
    std::fs::write(&path, devkit::gateway_toml(&routes)).expect("write config");
    (queues, path)
}

/// Waits until the orders table holds `count` rows.
async fn wait_rows(names: &Names, count: u64) {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::wait_for_orders(&session, &names.keyspace, count, DEADLINE)
        .await
        .expect("rows arrive");
}

/// 20,000 orders and 30 malformed messages through a queue: every order lands with exact
/// values, every malformed message is in the dead-letter queue with its reason, and the source
/// queue ends empty (every delivery acked or rejected, none requeued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_messages_land_exactly_and_poison_is_dead_lettered() {
    let _lock = gateway_lock().await;
    let names = Names::new("amqpvolume");
    let (queues, config) = setup(&names, "amqpvolume").await;
    let count = 20_000;
    let bad = 30;
    let good = (0..count).map(devkit::order_message_with_id);
    let malformed = (0..bad).map(|j| devkit::malformed_message(j).1);
    let sent = devkit::publish_rabbitmq(&queues.source, good.chain(malformed))
        .await
        .expect("publish");
    assert_eq!(sent, count + bad);

    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");
    wait_rows(&names, count).await;
    let letters = devkit::read_queue(&queues.dead_letter, bad as usize, Duration::from_secs(60))
        .await
        .expect("read dead letters");
    assert!(gateway.stop().expect("stop").success(), "graceful stop exits 0");

    assert_all_orders_exact(&names, count).await;
    assert_eq!(
        devkit::queue_depth(&queues.source).await.expect("depth"),
        0,
        "nothing requeued"
    );
    assert_eq!(letters.len(), bad as usize, "one dead letter per malformed message");
    let mut by_code = std::collections::BTreeMap::new();
    for letter in &letters {
        let code = letter.headers.get("shardgate.reason.code").cloned().unwrap_or_default();
        let expected = (0..bad)
            .map(devkit::malformed_message)
            .find(|(_, payload, _)| *payload == letter.payload)
            .map(|j| j.1);
        assert!(expected.is_some(), "dead letter carries the original bytes");
        assert!(letter.headers.get("shardgate.reason").is_some_and(|r| !r.is_empty()));
        assert_eq!(
            letter.headers.get("shardgate.route").map(String::as_str),
            Some("orders")
        );
        assert_eq!(letter.headers.get("shardgate.source.queue"), Some(&queues.source));
        *by_code.entry(code).or_insert(0) += 1;
    }
    let expected: std::collections::BTreeMap<String, i32> = [
        ("bad_value".to_string(), 10),
        ("missing_key_column".to_string(), 10),
        ("not_json".to_string(), 10),
    ]
    .into();
    assert_eq!(by_code, expected, "reason codes");
}

/// `kill -9` mid-stream, then a restart: the broker redelivers the unacked messages and
/// exactly 50,000 orders land with exact values; the queue ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_kill_9_mid_stream_then_restart_loses_nothing() {
    let _lock = gateway_lock().await;
    let names = Names::new("amqpkill");
    let (queues, config) = setup(&names, "amqpkill").await;
    let count = 50_000u64;
    devkit::publish_rabbitmq(&queues.source, (0..count).map(devkit::order_message_with_id))
        .await
        .expect("publish");

    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-1.log")).expect("gateway starts");
    let started = Instant::now();
    loop {
        let depth = u64::from(devkit::queue_depth(&queues.source).await.expect("depth"));
        if depth < count - 5_000 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "gateway made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway.kill9().expect("kill -9");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let depth = u64::from(devkit::queue_depth(&queues.source).await.expect("depth"));
    assert!(depth > 0, "killed mid-stream, with messages still queued");

    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-2.log")).expect("restart");
    wait_rows(&names, count).await;
    assert!(gateway.stop().expect("stop").success());
    assert_all_orders_exact(&names, count).await;
    assert_eq!(
        devkit::queue_depth(&queues.source).await.expect("depth"),
        0,
        "nothing left"
    );
}
