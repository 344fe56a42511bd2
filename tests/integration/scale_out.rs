//! Two gateways sharing every source: one Kafka consumer group, one JetStream durable, one
//! RabbitMQ queue and one NATS queue group. They split the load and together write every row.

use std::time::Duration;

use shardgate::devkit::{self, Gateway};
use shardgate::telemetry::metric;

use crate::{assert_all_orders_exact, gateway_binary, gateway_lock, Names};

const DEADLINE: Duration = Duration::from_secs(300);
const ADMIN: [&str; 2] = ["127.0.0.1:9190", "127.0.0.1:9191"];
/// Orders per source; source `s` carries orders `s * PER_SOURCE .. (s + 1) * PER_SOURCE`.
const PER_SOURCE: u64 = 20_000;
const ROUTES: [&str; 4] = ["kafka", "jetstream", "rabbitmq", "nats"];

fn orders_of(source: u64) -> std::ops::Range<u64> {
    source * PER_SOURCE..(source + 1) * PER_SOURCE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_split_every_source_and_write_every_row() {
    let _lock = gateway_lock().await;
    let names = Names::new("scale");
    let run = names.group.rsplit('-').next().unwrap_or("0").to_string();
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    devkit::create_topic(&names.topic, 6).await.expect("Kafka is up");
    devkit::create_topic(&names.dead_letter_topic, 1).await.expect("topic");
    let stream = format!("IT_scale_{run}");
    let subject = format!("it.scale.{run}.js");
    devkit::create_stream(&stream, &[&subject]).await.expect("NATS is up");
    let queue = format!("it.scale.{run}.orders");
    devkit::recreate_queue(&queue).await.expect("RabbitMQ is up");
    let core_subject = format!("it.scale.{run}.core");
    let dead_letters = format!("it.scale.{run}.dead-letter");

    let routes = [
        devkit::orders_route_toml(
            ROUTES[0],
            &names.keyspace,
            &names.topic,
            &names.group,
            &names.dead_letter_topic,
        ),
        devkit::jetstream_orders_route_toml(ROUTES[1], &names.keyspace, &stream, &subject, "shared", &dead_letters),
        devkit::rabbitmq_orders_route_toml(ROUTES[2], &names.keyspace, &queue, &format!("{queue}.dead-letter")),
        devkit::nats_orders_route_toml(ROUTES[3], &names.keyspace, &core_subject, "shared", &dead_letters),
    ]
    .concat();
    devkit::recreate_queue(&format!("{queue}.dead-letter"))
        .await
        .expect("dead-letter queue");
    let mut gateways = Vec::new();
    for (i, admin) in ADMIN.iter().enumerate() {
        let config = names.dir.join(format!("gateway-{i}.toml"));
        std::fs::write(&config, devkit::gateway_toml_on(&routes, admin)).expect("write config");
        let log = names.dir.join(format!("gateway-{i}.log"));
        gateways.push(Gateway::start(&gateway_binary(), &config, &log).expect("gateway starts"));
    }
    // The second gateway's first Kafka assignment comes after the group rebalanced over both.
    gateways[1]
        .wait_for_log("partitions assigned", Duration::from_secs(60))
        .expect("second gateway joins the group");

    devkit::produce(
        &names.topic,
        orders_of(0).map(|i| {
            let (key, payload) = devkit::order_message(i);
            (key, payload.into_bytes())
        }),
    )
    .expect("produce");
    devkit::publish_jetstream(&subject, orders_of(1).map(devkit::order_message_with_id))
        .await
        .expect("publish JetStream");
    devkit::publish_rabbitmq(&queue, orders_of(2).map(devkit::order_message_with_id))
        .await
        .expect("publish RabbitMQ");
    devkit::publish_nats(&core_subject, orders_of(3).map(devkit::order_message_with_id))
        .await
        .expect("publish NATS");

    let total = PER_SOURCE * ROUTES.len() as u64;
    devkit::wait_for_orders(&session, &names.keyspace, total, DEADLINE)
        .await
        .expect("rows arrive");
    let mut shares = Vec::new();
    for admin in ADMIN {
        let share: Vec<f64> = ROUTES
            .iter()
            .map(|route| {
                devkit::scrape_metric_where(admin, metric::ROWS_RECEIVED, &[("source", route)]).expect("metrics")
            })
            .collect();
        shares.push(share);
    }
    for gateway in gateways {
        assert!(gateway.stop().expect("stop").success());
    }

    assert_all_orders_exact(&names, total).await;
    for (s, route) in ROUTES.iter().enumerate() {
        let (a, b) = (shares[0][s], shares[1][s]);
        assert!(a > 0.0 && b > 0.0, "{route}: both gateways take a share ({a} + {b})");
        if *route != "rabbitmq" && *route != "jetstream" {
            // Partitions and queue-group messages go to exactly one member.
            assert_eq!(a + b, PER_SOURCE as f64, "{route}: every message received once");
        } else {
            assert!(a + b >= PER_SOURCE as f64, "{route}: every message received");
        }
    }
    let (committed, end) = devkit::committed_and_end(&names.group, &names.topic, 6).expect("offsets");
    assert_eq!(committed, end, "Kafka offsets committed to the end");
    assert_eq!(devkit::queue_depth(&queue).await.expect("depth"), 0, "queue drained");
    assert_eq!(
        devkit::jetstream_backlog(&stream, "shared").await.expect("backlog"),
        Some((0, 0)),
        "durable drained"
    );
}
