//! Faults against the real services: the database hangs for 30 s in the middle of a Kafka
//! stream (Cassandra frozen with SIGSTOP: connections stay open, requests time out).

use std::time::{Duration, Instant};

use shardgate::devkit::{self, CassandraPause, Gateway};
use shardgate::wire::proto::ingest_client::IngestClient;
use shardgate::wire::proto::{AckMode, RowBatch, WriteRequest, WriteStreamRequest};
use tonic::transport::Channel;

use crate::{assert_all_orders_exact, gateway_binary, gateway_lock, wait_committed, Names};

const PARTITIONS: i32 = 6;
const OUTAGE: Duration = Duration::from_secs(30);
/// Orders each test produces.
const ORDERS: u64 = 200_000;

/// Writes `gateway_toml` with the per-core spools in `spool_dir` as the test's config; returns
/// its path. Each core writes at most 1 MiB of spooled records from memory: beyond, records
/// wait on disk only and are read back, the path every outage below takes.
fn write_config_with_spool(names: &Names, gateway_toml: &str, spool_dir: &std::path::Path) -> std::path::PathBuf {
    let config = names.dir.join("gateway.toml");
    let spool = format!(
        "[runtime]\nspool_dir = \"{}\"\nspool_memory_mib_per_core = 1\n",
        spool_dir.display()
    );
    std::fs::write(&config, gateway_toml.replacen("[runtime]\n", &spool, 1)).expect("config");
    config
}

/// Writes a gateway config with `route` switched to `ack = "spooled"` and the spools in
/// `spool_dir`; returns its path.
fn write_spooled_config(names: &Names, route: &str, spool_dir: &std::path::Path) -> std::path::PathBuf {
    let route = route.replace("format = \"json\"", "format = \"json\"\nack = \"spooled\"");
    write_config_with_spool(names, &devkit::gateway_toml(&route), spool_dir)
}

/// Connects a gRPC client to the gateway and writes the first of `batches` synchronously, so the
/// table's statement is prepared before the database goes away.
async fn connect_and_write_first(batches: &mut impl Iterator<Item = RowBatch>) -> IngestClient<Channel> {
    let mut client = IngestClient::connect(format!("http://{}", devkit::INGEST_LISTEN))
        .await
        .expect("client connects");
    let first = client
        .write(WriteRequest {
            batch: batches.next(),
            ack: AckMode::Written as i32,
        })
        .await
        .expect("write")
        .into_inner();
    assert_eq!((first.written, first.spooled), (500, 0));
    client
}

/// Sends every batch with `ACK_MODE_SPOOLED`; each must be answered as spooled whole.
async fn write_spooled(client: &mut IngestClient<Channel>, batches: impl Iterator<Item = RowBatch>) {
    for batch in batches {
        let answer = client
            .write(WriteRequest {
                batch: Some(batch),
                ack: AckMode::Spooled as i32,
            })
            .await
            .expect("spooled while the database is down")
            .into_inner();
        assert_eq!((answer.written, answer.spooled), (0, 500));
        assert!(answer.errors.is_empty(), "{:?}", answer.errors);
    }
}

/// Checks that `keyspace.events` holds exactly the sample events `0..count`.
async fn assert_events_exact(session: &scylla::client::session::Session, keyspace: &str, count: u64) {
    let report = devkit::verify_events(session, keyspace, count)
        .await
        .expect("read back");
    assert_eq!(
        (report.rows, report.matching),
        (count, count),
        "{:?}",
        report.differences
    );
}

/// Kills the running gateway with `kill -9`, lets Cassandra run again, restarts the gateway and
/// waits until orders `0..count` are all in the table — from the spool — then stops it and
/// checks every row.
async fn kill_then_replay(
    mut gateway: Gateway,
    pause: CassandraPause,
    names: &Names,
    config: &std::path::Path,
    session: &scylla::client::session::Session,
    count: u64,
) {
    assert!(gateway.is_running(), "the gateway rode the outage out");
    gateway.kill9().expect("kill -9");
    pause.resume().expect("resume Cassandra");
    let gateway = Gateway::start(&gateway_binary(), config, &names.dir.join("gateway-2.log")).expect("restart");
    devkit::wait_for_orders(session, &names.keyspace, count, Duration::from_secs(300))
        .await
        .expect("every acknowledged row replayed from the spool");
    assert!(gateway.stop().expect("stop").success());
    assert_all_orders_exact(names, count).await;
}

/// The orders table, the topic with [`ORDERS`] orders, the dead-letter topic.
async fn setup(names: &Names) -> u64 {
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    devkit::create_topic(&names.topic, PARTITIONS).await.expect("topic");
    devkit::create_topic(&names.dead_letter_topic, 1).await.expect("topic");
    let orders = (0..ORDERS).map(|i| {
        let (key, payload) = devkit::order_message(i);
        (key, payload.into_bytes())
    });
    devkit::produce(&names.topic, orders).expect("produce");
    ORDERS
}

/// 200,000 orders through a Kafka route in `written` mode while Cassandra hangs for 30 s: the
/// route stops committing (nothing is acknowledged that is not written), the gateway stays up,
/// and once Cassandra is back it drains by itself — every row exactly once with exact values,
/// every offset committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_route_survives_a_30_second_database_outage() {
    let _lock = gateway_lock().await;
    let names = Names::new("outage");
    let count = setup(&names).await;

    let mut gateway = Gateway::start(&gateway_binary(), &names.write_config(), &names.dir.join("gateway.log"))
        .expect("gateway starts");
    wait_committed(&names, PARTITIONS, 20_000, Duration::from_secs(120));
    let pause = CassandraPause::start().expect("freeze Cassandra");
    let frozen = Instant::now();
    // Let in-flight writes time out, then watch the committed offsets stand still.
    std::thread::sleep(Duration::from_secs(12));
    let (during, _) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
    std::thread::sleep(OUTAGE.saturating_sub(frozen.elapsed()));
    let (after, end) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
    assert!(
        after < end,
        "the outage must land mid-stream ({after} of {end} committed)"
    );
    assert_eq!(during, after, "nothing is committed while the database is down");
    assert!(gateway.is_running(), "the gateway rides the outage out");
    pause.resume().expect("resume Cassandra");

    wait_committed(&names, PARTITIONS, count as i64, Duration::from_secs(300));
    assert!(gateway.stop().expect("stop").success());
    assert_all_orders_exact(&names, count).await;
    let letters = devkit::read_topic(&names.dead_letter_topic, 1, Duration::from_secs(5)).expect("read");
    assert!(letters.is_empty(), "a timeout is transient: nothing is dead-lettered");
}

/// The same 200,000 orders through a route with `ack = "spooled"`: while Cassandra hangs the
/// route keeps acknowledging (every offset is committed with the database down — the rows are
/// in the spool), then the gateway is killed with `kill -9`. Nothing is left in Kafka to
/// re-read, so when the gateway restarts (database back) every row must come from the spool:
/// all 200,000 land with exact values and the spool empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_route_acks_through_an_outage_and_replays_after_kill_9() {
    let _lock = gateway_lock().await;
    let names = Names::new("spooled");
    let count = setup(&names).await;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let spool_dir = names.dir.join("spool");
    let route = devkit::orders_route_toml(
        "orders",
        &names.keyspace,
        &names.topic,
        &names.group,
        &names.dead_letter_topic,
    );
    let config = write_spooled_config(&names, &route, &spool_dir);

    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-1.log")).expect("gateway starts");
    wait_committed(&names, PARTITIONS, 20_000, Duration::from_secs(120));
    let pause = CassandraPause::start().expect("freeze Cassandra");
    // Acknowledged at disk speed: the whole topic is committed while the database is down.
    wait_committed(&names, PARTITIONS, count as i64, Duration::from_secs(120));
    let written_before_kill = devkit::scrape_metric_where(
        devkit::ADMIN_LISTEN,
        shardgate::telemetry::metric::ROWS_WRITTEN,
        &[("source", "orders")],
    )
    .expect("metrics");
    assert!(
        written_before_kill < count as f64,
        "the outage must leave rows unwritten ({written_before_kill})"
    );
    kill_then_replay(gateway, pause, &names, &config, &session, count).await;
    let (committed, end) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
    assert_eq!(committed, end);
    let segments: Vec<_> = std::fs::read_dir(&spool_dir)
        .expect("spool dir")
        .flat_map(|core| std::fs::read_dir(core.expect("entry").path()).expect("core dir"))
        .collect();
    assert!(
        segments.is_empty(),
        "the spool empties once every row is written: {segments:?}"
    );
}

/// NATS core has no acknowledgement; with `ack = "spooled"` a message is safe once the gateway
/// has received it. 20,000 orders are published while Cassandra hangs (none can be written),
/// the gateway is killed with `kill -9` once it has received them all, and its newest spool
/// segment is made to end in half a record (a crash in the middle of a write). After the
/// restart the torn record is skipped with a log line and every record before it lands from
/// the spool with exact values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_nats_core_route_is_at_least_once_from_receipt() {
    let _lock = gateway_lock().await;
    let names = Names::new("natsspool");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let subject = format!("it.natsspool.{}", names.group);
    let route =
        devkit::nats_orders_route_toml("orders", &names.keyspace, &subject, "spooled", &format!("{subject}.dl"));
    let config = write_spooled_config(&names, &route, &names.dir.join("spool"));
    let count: u64 = 20_000;
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-1.log")).expect("gateway starts");
    let pause = CassandraPause::start().expect("freeze Cassandra");
    devkit::publish_nats(&subject, (0..count).map(devkit::order_message_with_id))
        .await
        .expect("publish");
    let started = Instant::now();
    loop {
        let received = devkit::scrape_metric_where(
            devkit::ADMIN_LISTEN,
            shardgate::telemetry::metric::ROWS_RECEIVED,
            &[("source", "orders")],
        )
        .expect("metrics");
        // Counted once a batch is in the spool.
        if received >= count as f64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "received {received} of {count}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.kill9().expect("kill -9");
    // A crash in the middle of a spool write: the newest segment ends in half a record (order
    // `count`, never published, never acknowledged). The restart must skip it with a log line
    // and replay every record before it.
    let torn = shardgate::bridge::message::SourceMessage {
        position: 0,
        timestamp_ms: None,
        write_timestamp_us: None,
        key: None,
        headers: Vec::new(),
        payload: Some(devkit::order_message_with_id(count).into()),
        origin: Box::new(shardgate::bridge::nats::ack::NatsOrigin {
            subject: subject.clone().into(),
        }),
    };
    let torn = torn.spool_record("orders", "");
    devkit::tear_spool_tail(&names.dir.join("spool"), &torn).expect("tear the spool's tail");
    pause.resume().expect("resume Cassandra");
    let log = names.dir.join("gateway-2.log");
    let gateway = Gateway::start(&gateway_binary(), &config, &log).expect("restart");
    devkit::wait_for_orders(&session, &names.keyspace, count, Duration::from_secs(180))
        .await
        .expect("every record before the torn one replayed from the spool");
    assert!(gateway.stop().expect("stop").success());
    let log = std::fs::read_to_string(&log).expect("gateway log");
    assert!(
        log.lines().any(|line| line.contains("spool: unreadable tail skipped")
            && line.contains(&format!(
                "reason=length {} runs past the end of the segment",
                torn.len()
            ))),
        "the torn record is reported"
    );
    // Exactly orders 0..count: the torn record (order `count`) is not written.
    assert_all_orders_exact(&names, count).await;
}

/// gRPC writes with `ACK_MODE_SPOOLED`: 99,500 rows are acknowledged (spooled) while Cassandra
/// hangs, the gateway is killed with `kill -9`, and after the restart every row lands from the
/// spool with exact values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_spooled_batches_are_acked_during_an_outage_and_survive_kill_9() {
    let _lock = gateway_lock().await;
    let names = Names::new("grpcspool");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, &names.keyspace)
        .await
        .expect("create table");
    let config = write_config_with_spool(
        &names,
        &devkit::ingest_gateway_toml("", 2048, 64),
        &names.dir.join("spool"),
    );
    let count: i64 = 100_000;
    let table = format!("{}.events", names.keyspace);
    let mut batches = devkit::event_batches(&table, count, 500).into_iter();
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-1.log")).expect("gateway starts");
    let mut client = connect_and_write_first(&mut batches).await;

    let pause = CassandraPause::start().expect("freeze Cassandra");
    write_spooled(&mut client, batches).await;
    gateway.kill9().expect("kill -9");
    pause.resume().expect("resume Cassandra");

    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway-2.log")).expect("restart");
    devkit::wait_for_rows::<i64>(
        &session,
        &names.keyspace,
        "events",
        "id",
        count as u64,
        Duration::from_secs(180),
    )
    .await
    .expect("every spooled row after the restart");
    assert!(gateway.stop().expect("stop").success());
    assert_events_exact(&session, &names.keyspace, count as u64).await;
}

/// Broker restarts: a gateway consumes Kafka, JetStream and RabbitMQ; the Kafka broker, the
/// NATS server and RabbitMQ are stopped and started again (Kafka is down longer than the
/// group's 6 s session timeout, so the consumer loses its partitions and must rejoin); every
/// bridge reconnects by itself and resumes from its position — the messages published after
/// the restart land too, every row exact, offsets committed, the queue and the durable drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_resume_after_broker_restarts() {
    const PER_SOURCE: u64 = 10_000;
    let _lock = gateway_lock().await;
    let names = Names::new("restarts");
    let run = names.group.rsplit('-').next().unwrap_or("0").to_string();
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_orders_table(&session, &names.keyspace)
        .await
        .expect("create table");
    devkit::create_topic(&names.topic, PARTITIONS).await.expect("topic");
    devkit::create_topic(&names.dead_letter_topic, 1).await.expect("topic");
    let stream = format!("IT_restarts_{run}");
    let subject = format!("it.restarts.{run}.js");
    devkit::create_stream(&stream, &[&subject]).await.expect("stream");
    let queue = format!("it.restarts.{run}.orders");
    devkit::recreate_queue(&queue).await.expect("queue");
    devkit::recreate_queue(&format!("{queue}.dead-letter"))
        .await
        .expect("queue");
    let routes = [
        devkit::orders_route_toml(
            "kafka",
            &names.keyspace,
            &names.topic,
            &names.group,
            &names.dead_letter_topic,
        ),
        devkit::jetstream_orders_route_toml(
            "jetstream",
            &names.keyspace,
            &stream,
            &subject,
            "restarts",
            &format!("it.restarts.{run}.dead-letter"),
        ),
        devkit::rabbitmq_orders_route_toml("rabbitmq", &names.keyspace, &queue, &format!("{queue}.dead-letter")),
    ]
    .concat();
    let config = names.dir.join("gateway.toml");
    std::fs::write(&config, devkit::gateway_toml(&routes)).expect("config");
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");

    // Sources 0..3 before the restart, 3..6 after: source `s` carries orders of range `s`.
    let range = |s: u64| s * PER_SOURCE..(s + 1) * PER_SOURCE;
    let publish = |first: u64| {
        let subject = subject.clone();
        let queue = queue.clone();
        let topic = names.topic.clone();
        async move {
            devkit::produce(
                &topic,
                range(first).map(|i| {
                    let (key, payload) = devkit::order_message(i);
                    (key, payload.into_bytes())
                }),
            )
            .expect("produce");
            devkit::publish_jetstream(&subject, range(first + 1).map(devkit::order_message_with_id))
                .await
                .expect("publish JetStream");
            devkit::publish_rabbitmq(&queue, range(first + 2).map(devkit::order_message_with_id))
                .await
                .expect("publish RabbitMQ");
        }
    };
    publish(0).await;
    devkit::wait_for_orders(&session, &names.keyspace, 3 * PER_SOURCE, Duration::from_secs(120))
        .await
        .expect("rows before the restart");
    devkit::restart_services(&["kafka", "nats", "rabbitmq"]).expect("restart the brokers");
    publish(3).await;
    devkit::wait_for_orders(&session, &names.keyspace, 6 * PER_SOURCE, Duration::from_secs(180))
        .await
        .expect("rows after the restart: every bridge resumed");
    let assigned = devkit::scrape_metric_where(
        devkit::ADMIN_LISTEN,
        shardgate::telemetry::metric::KAFKA_ASSIGNED_PARTITIONS,
        &[("route", "kafka")],
    )
    .expect("metrics");
    assert_eq!(assigned, f64::from(PARTITIONS), "the consumer is back in its group");
    assert!(gateway.stop().expect("stop").success());
    assert_all_orders_exact(&names, 6 * PER_SOURCE).await;
    let (committed, end) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
    assert_eq!(committed, end);
    assert_eq!(devkit::queue_depth(&queue).await.expect("depth"), 0);
    assert_eq!(
        devkit::jetstream_backlog(&stream, "restarts").await.expect("backlog"),
        Some((0, 0))
    );
}

/// Cassandra stopped (process gone, connections refused) for 30 s while rows arrive over gRPC
/// with `ACK_MODE_SPOOLED` and over a Kafka route in `written` mode, then started again: the
/// gRPC rows are answered from the spool during the outage, the Kafka route commits nothing
/// while the database is gone, and once it is back both drain by themselves — every row exactly
/// once with exact values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_spooled_and_kafka_written_ride_out_a_stopped_database() {
    ride_out_a_stopped_database("dbstop", false).await;
}

/// The same run, but the gateway is killed with `kill -9` while Cassandra is stopped (gRPC rows
/// acknowledged only in the spool, Kafka offsets behind the rows in flight) and restarted while
/// Cassandra is still stopped: start-up waits for the database, then the spool replays, the
/// Kafka route resumes from its committed offsets, and every row is there exactly once with
/// exact values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_spooled_and_kafka_written_survive_kill_9_while_the_database_is_stopped() {
    ride_out_a_stopped_database("dbkill", true).await;
}

async fn ride_out_a_stopped_database(test: &str, kill: bool) {
    let _lock = gateway_lock().await;
    let names = Names::new(test);
    let (count, grpc_keyspace, config) = setup_orders_and_events(&names, "", "").await;
    let events: i64 = 100_000;
    let mut batches = devkit::event_batches(&format!("{grpc_keyspace}.events"), events, 500).into_iter();
    let mut gateway =
        Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");
    let mut client = connect_and_write_first(&mut batches).await;
    wait_committed(&names, PARTITIONS, 20_000, Duration::from_secs(120));

    devkit::stop_service("cassandra").expect("stop Cassandra");
    let stopped = Instant::now();
    write_spooled(&mut client, batches).await;
    std::thread::sleep(Duration::from_secs(5));
    let (during, _) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
    std::thread::sleep(OUTAGE.saturating_sub(stopped.elapsed()));
    let (after, end) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
    assert_eq!(during, after, "nothing is committed while the database is stopped");
    assert!(after < end, "the outage lands mid-stream");
    assert!(gateway.is_running(), "the gateway rides the outage out");
    let deferred = devkit::scrape_metric(
        devkit::ADMIN_LISTEN,
        shardgate::telemetry::metric::SPOOL_DEFERRED_RECORDS,
    )
    .expect("metrics");
    assert!(
        deferred > 0.0,
        "past the 1 MiB memory budget the spooled batches wait on disk only"
    );
    // `top`'s source (`/v1/cores`) has them per core, adding up to the metric's total.
    let (_, body) = devkit::http_get(devkit::ADMIN_LISTEN, "/v1/cores").expect("/v1/cores");
    let snapshot: shardgate::telemetry::snapshot::Snapshot = serde_json::from_str(&body).expect("a snapshot");
    let per_core: f64 = snapshot.cores.iter().map(|c| c.spool_deferred_records).sum();
    assert_eq!(
        (per_core, snapshot.spool_deferred_records),
        (deferred, deferred),
        "deferred records per core"
    );
    if kill {
        drop(client);
        gateway.kill9().expect("kill -9");
        // Restarted while the database is still gone: start-up waits for it.
        gateway = Gateway::spawn(&gateway_binary(), &config, &names.dir.join("gateway-2.log")).expect("restart");
        gateway
            .wait_for_log("database unreachable at start-up; retrying", Duration::from_secs(60))
            .expect("the restarted gateway waits for the database");
        devkit::start_services().expect("start Cassandra again");
        gateway
            .wait_for_log("shardgate serving", Duration::from_secs(120))
            .expect("serving once the database is back");
    } else {
        devkit::start_services().expect("start Cassandra again");
    }

    drain_and_check(gateway, &names, count, &grpc_keyspace, events as u64).await;
}

/// The orders table, the topic with [`ORDERS`] orders and an events table in
/// `<keyspace>_grpc`; a gateway config with the orders route (plus `route_extra`, e.g. an ack
/// mode) and the ingest API, the spools in the test's directory (plus `runtime_extra`).
/// Returns (orders, events keyspace, config path).
async fn setup_orders_and_events(
    names: &Names,
    route_extra: &str,
    runtime_extra: &str,
) -> (u64, String, std::path::PathBuf) {
    let count = setup(names).await;
    let grpc_keyspace = format!("{}_grpc", names.keyspace);
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::create_events_table(&session, &grpc_keyspace)
        .await
        .expect("events table");
    let route = devkit::orders_route_toml(
        "orders",
        &names.keyspace,
        &names.topic,
        &names.group,
        &names.dead_letter_topic,
    )
    .replace("format = \"json\"", &format!("format = \"json\"\n{route_extra}"));
    let gateway_toml = devkit::ingest_gateway_toml(&route, 2048, 64).replacen(
        "[runtime]\n",
        &format!("[runtime]\n{runtime_extra}"),
        1,
    );
    let config = write_config_with_spool(names, &gateway_toml, &names.dir.join("spool"));
    (count, grpc_keyspace, config)
}

/// Waits until every order is committed and every event written, checks that no spooled record
/// still waits on disk, stops the gateway and checks every row.
async fn drain_and_check(gateway: Gateway, names: &Names, count: u64, grpc_keyspace: &str, events: u64) {
    wait_committed(names, PARTITIONS, count as i64, Duration::from_secs(300));
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    devkit::wait_for_rows::<i64>(
        &session,
        grpc_keyspace,
        "events",
        "id",
        events,
        Duration::from_secs(300),
    )
    .await
    .expect("every gRPC row");
    let deferred = devkit::scrape_metric(
        devkit::ADMIN_LISTEN,
        shardgate::telemetry::metric::SPOOL_DEFERRED_RECORDS,
    )
    .expect("metrics");
    assert_eq!(deferred, 0.0, "every deferred record was read back and written");
    assert!(gateway.stop().expect("stop").success());
    assert_all_orders_exact(names, count).await;
    assert_events_exact(&session, grpc_keyspace, events).await;
}

/// The spool's byte cap is backpressure, never loss. With 2 MiB of spool per core and
/// Cassandra frozen, a spooled Kafka route fills the spools and pauses (its offsets stop short
/// of the end); unary gRPC calls with `ACK_MODE_SPOOLED` are answered RESOURCE_EXHAUSTED; a
/// spooled `WriteStream` stays open without answers (it waits for room). Once Cassandra runs
/// again the stream's batches are answered as spooled, the refused calls are sent again, and
/// every order and every event lands exactly once with exact values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_pushes_back_and_loses_nothing() {
    const UNARY_BATCHES: usize = 20;
    const STREAM_BATCHES: usize = 10;
    let _lock = gateway_lock().await;
    let names = Names::new("spoolcap");
    let (count, grpc_keyspace, config) = setup_orders_and_events(
        &names,
        "ack = \"spooled\"",
        "spool_segment_mib = 1\nspool_cap_mib_per_core = 2\n",
    )
    .await;
    let events = (1 + UNARY_BATCHES + STREAM_BATCHES) as i64 * 500;
    let mut batches = devkit::event_batches(&format!("{grpc_keyspace}.events"), events, 500).into_iter();
    let gateway = Gateway::start(&gateway_binary(), &config, &names.dir.join("gateway.log")).expect("gateway starts");
    let mut client = connect_and_write_first(&mut batches).await;

    let pause = CassandraPause::start().expect("freeze Cassandra");
    // The Kafka route fills both spools and pauses: its committed offsets stop moving.
    let mut last = -1;
    let started = Instant::now();
    let paused_at = loop {
        std::thread::sleep(Duration::from_secs(2));
        let (committed, end) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
        assert!(committed < end, "2 MiB per core cannot take the whole topic");
        if committed == last {
            break committed;
        }
        last = committed;
        assert!(started.elapsed() < Duration::from_secs(60), "the route never paused");
    };
    assert!(paused_at > 0, "the route acknowledged what fitted in the spool");

    let mut refused = Vec::new();
    for batch in batches.by_ref().take(UNARY_BATCHES) {
        let request = WriteRequest {
            batch: Some(batch.clone()),
            ack: AckMode::Spooled as i32,
        };
        match client.write(request).await {
            Ok(answer) => assert_eq!(answer.into_inner().spooled, 500),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
                refused.push(batch);
            }
        }
    }
    assert!(!refused.is_empty(), "a full spool answers RESOURCE_EXHAUSTED");

    let stream: Vec<_> = batches
        .by_ref()
        .take(STREAM_BATCHES)
        .enumerate()
        .map(|(i, batch)| WriteStreamRequest {
            batch_id: i as u64,
            batch: Some(batch),
            ack: AckMode::Spooled as i32,
            ..Default::default()
        })
        .collect();
    let mut responses = client
        .clone()
        .write_stream(futures::stream::iter(stream))
        .await
        .expect("stream opens")
        .into_inner();
    let waiting = tokio::time::timeout(Duration::from_secs(3), responses.message()).await;
    assert!(waiting.is_err(), "no answer while the spool is full: {waiting:?}");
    assert_eq!(
        devkit::committed_and_end(&names.group, &names.topic, PARTITIONS)
            .expect("offsets")
            .0,
        paused_at,
        "the Kafka route stays paused"
    );

    pause.resume().expect("resume Cassandra");
    let mut answered = 0;
    while let Some(response) = responses.message().await.expect("the stream stayed open") {
        assert_eq!((response.spooled, response.written), (500, 0), "{response:?}");
        answered += 1;
    }
    assert_eq!(answered, STREAM_BATCHES);
    for batch in refused {
        // What a client does with RESOURCE_EXHAUSTED: back off and send it again (the Kafka
        // route competes for the room the writes free).
        let started = Instant::now();
        loop {
            let request = WriteRequest {
                batch: Some(batch.clone()),
                ack: AckMode::Spooled as i32,
            };
            match client.write(request).await {
                Ok(answer) => {
                    assert_eq!(answer.into_inner().spooled, 500);
                    break;
                }
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    assert!(started.elapsed() < Duration::from_secs(120), "no room for 120 s");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("{status}"),
            }
        }
    }
    drain_and_check(gateway, &names, count, &grpc_keyspace, events as u64).await;
}

/// SIGTERM mid-stream: a written Kafka route stops reading, finishes the messages in flight
/// within the shutdown deadline, commits, and exits 0 — every committed offset is backed by its
/// row. A restart resumes from there and every order lands exactly once with exact values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_drains_commits_and_resumes() {
    let _lock = gateway_lock().await;
    let names = Names::new("sigterm");
    let count = setup(&names).await;
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let log = names.dir.join("gateway-1.log");
    let gateway = Gateway::start(&gateway_binary(), &names.write_config(), &log).expect("gateway starts");
    wait_committed(&names, PARTITIONS, 20_000, Duration::from_secs(120));
    assert!(gateway.stop().expect("SIGTERM").success(), "graceful stop exits 0");
    let (committed, end) = devkit::committed_and_end(&names.group, &names.topic, PARTITIONS).expect("offsets");
    assert!(committed < end, "stopped mid-stream ({committed} of {end})");
    let rows = devkit::count_rows::<String>(&session, &names.keyspace, "orders", "order_id")
        .await
        .expect("count");
    assert!(
        rows >= committed as u64,
        "every committed offset is backed by its row ({rows} rows, {committed} committed)"
    );
    let log = std::fs::read_to_string(&log).expect("log");
    assert!(
        !log.contains("shutdown deadline passed"),
        "in-flight messages finished within the deadline"
    );
    let gateway = Gateway::start(
        &gateway_binary(),
        &names.write_config(),
        &names.dir.join("gateway-2.log"),
    )
    .expect("restart");
    wait_committed(&names, PARTITIONS, count as i64, Duration::from_secs(300));
    assert!(gateway.stop().expect("stop").success());
    assert_all_orders_exact(&names, count).await;
}
