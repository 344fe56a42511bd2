//! ZeroMQ → Cassandra route: multipart messages from a PUSH socket, dead letters to NATS.

use std::time::Duration;

use shardgate::devkit::{self, Gateway};

use crate::{assert_all_orders_exact, gateway_binary, gateway_lock, Names};

const DEADLINE: Duration = Duration::from_secs(300);

/// 20,000 two-frame messages (order id, JSON) and 30 malformed ones pushed to the gateway's
/// PULL socket: every order lands with exact values and every malformed message is in the
/// dead-letter stream with its reason and the socket coordinates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeromq_messages_land_exactly_and_poison_is_dead_lettered() {
    let _lock = gateway_lock().await;
    let names = Names::new("zmq");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let run = names.group.rsplit('-').next().unwrap_or("0").to_string();
    let dead_letter_stream = format!("IT_zmq_{run}_DL");
    let dead_letter_subject = format!("it.zmq.{run}.dead-letter");
    devkit::create_stream(&dead_letter_stream, &[&dead_letter_subject])
        .await
        .expect("NATS with JetStream is up: create dead-letter stream");
    let routes = devkit::zeromq_orders_route_toml("orders", &names.keyspace, &dead_letter_subject);
    let config = names.dir.join("gateway.toml");
    std::fs::write(&config, devkit::gateway_toml(&routes)).expect("write config");
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");

    let count = 20_000u64;
    let bad = 30u64;
    let good = (0..count).map(|i| {
        let (key, payload) = devkit::order_message(i);
        (key.into_bytes(), payload.into_bytes())
    });
    let malformed = (0..bad).map(|j| {
        let (key, payload, _) = devkit::malformed_message(j);
        (key.into_bytes(), payload)
    });
    let messages: Vec<_> = good.chain(malformed).collect();
    let sent = tokio::task::spawn_blocking(move || devkit::push_zeromq(devkit::ZMQ_ENDPOINT, messages))
        .await
        .expect("push thread")
        .expect("push");
    assert_eq!(sent, count + bad);

    devkit::wait_for_orders(&session, &names.keyspace, count, DEADLINE)
        .await
        .expect("rows arrive");
    let letters = devkit::read_stream(&dead_letter_stream, bad as usize, Duration::from_secs(60))
        .await
        .expect("read dead letters");
    assert!(gateway.stop().expect("stop").success(), "graceful stop exits 0");

    assert_all_orders_exact(&names, count).await;
    assert_eq!(letters.len(), bad as usize, "one dead letter per malformed message");
    let mut codes = std::collections::BTreeMap::new();
    for letter in &letters {
        let key = letter.headers.get("shardgate.key").cloned().unwrap_or_default();
        // Malformed messages of the third kind have an empty key frame.
        let j = key
            .strip_prefix("bad-")
            .map_or(2, |n| n.parse::<u64>().expect("key number"));
        let (_, payload, code) = devkit::malformed_message(j);
        assert_eq!(letter.payload, payload, "original bytes of {key:?}");
        assert_eq!(
            letter.headers.get("shardgate.reason.code").map(String::as_str),
            Some(code)
        );
        assert_eq!(
            letter.headers.get("shardgate.source.endpoint").map(String::as_str),
            Some(devkit::ZMQ_ENDPOINT)
        );
        *codes.entry(code).or_insert(0) += 1;
    }
    assert_eq!(codes.values().sum::<u64>(), bad);
    assert_eq!(codes.len(), 3, "all three kinds: {codes:?}");
}
