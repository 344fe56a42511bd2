//! `shardgate-demo`: the README's main job, against the local stack (`deploy/local/stack.sh up`).
//!
//! 1. recreates keyspace `shardgate_demo` with an `orders` table and a fresh 6-partition topic;
//! 2. produces the sample orders plus some malformed messages to Kafka;
//! 3. starts `shardgate serve` on a generated config and shows live progress (committed
//!    consumer-group offsets, which only advance once rows are written);
//! 4. streams typed rows over gRPC with the shard-aware client (each row to the core that owns
//!    it) into an `events` table;
//! 5. publishes sample orders to a JetStream stream, a RabbitMQ queue, a core NATS subject and
//!    a ZeroMQ PUSH socket (the same gateway has a route for each) into a second `orders` table;
//! 6. reads the `events` table back through the gateway's query API: a scan planned by the
//!    gateway, each split read at its owner core's port, and 1,000 `Get`s by key;
//! 7. runs a processing job (`shardgate job run`) over the Kafka orders: the express orders'
//!    count, items, largest quantity, revenue and distinct customers per city and hour, written
//!    to `city_hourly` and compared with the same aggregation computed here;
//!    A stream rollup inside `serve` folds the same orders as they arrive (orders and items per
//!    city and 10 minutes); every window it has closed is compared with the orders too;
//! 8. reads every row back from Cassandra and compares it with what was sent, reads the
//!    dead-letter topic, and prints a summary with rows/s and gateway CPU-seconds per million rows.
//!
//! Exits non-zero if any row is missing or wrong (in Cassandra or through the query API), or a
//! malformed message was not dead-lettered.

// Tooling and tests: a failed expectation is the tool or test failing, never a gateway core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures::TryStreamExt;
use shardgate::client::ShardAwareClient;
use shardgate::devkit::{self, Gateway};

#[derive(Parser)]
#[command(about = "Run the shardgate demo against the local stack")]
struct Args {
    /// Valid order messages to send.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Rows sent over gRPC by the shard-aware client.
    #[arg(long, default_value_t = 100_000)]
    grpc_rows: i64,
    /// Malformed messages mixed in (they must land in the dead-letter topic).
    #[arg(long, default_value_t = 30)]
    malformed: u64,
    /// Orders sent through each of JetStream, RabbitMQ, NATS and ZeroMQ.
    #[arg(long, default_value_t = 20_000)]
    broker_messages: u64,
    /// Partitions of the source topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/shardgate")]
    gateway: PathBuf,
    /// Directory for the generated config and the gateway log.
    #[arg(long, default_value = ".state/demo")]
    work_dir: PathBuf,
    /// Give up if progress stalls this long.
    #[arg(long, default_value_t = 120)]
    stall_timeout_s: u64,
}

const KEYSPACE: &str = "shardgate_demo";
const GRPC_KEYSPACE: &str = "shardgate_demo_grpc";
const GRPC_BATCH_ROWS: i64 = 500;
const BROKERS_KEYSPACE: &str = "shardgate_demo_brokers";
/// The demo's processing job over the Kafka orders (`KS` = the demo keyspace).
const CITY_HOURLY_JOB: &str = r#"
[[job]]
name = "city_hourly"
state_keyspace = "KS"
filter = "row.express"
[job.source]
table = "KS.orders"
columns = ["city", "customer_id", "amount", "quantity", "placed_at", "express"]
[job.aggregate]
group_by = ["city"]
window = { column = "placed_at", size = "1h" }
[job.aggregate.measures]
orders = "count()"
items = "sum(row.quantity)"
largest = "max(row.quantity)"
revenue_cents = "sum(int(double(row.amount) * 100.0 + 0.5))"
customers = "distinct(row.customer_id)"
[[job.sink]]
table = "KS.city_hourly"
"#;

/// The demo's stream rollup inside `serve`: orders and items per city and 10 minutes, folded
/// from the Kafka route's rows as they arrive.
const CITY_10MIN_JOB: &str = r#"
[[job]]
name = "city_10min"
state_keyspace = "KS"
[job.source]
stream = ["orders"]
[job.aggregate]
group_by = ["city"]
window = { column = "placed_at", size = "10m", lateness = "1m" }
measures = { orders = "count()", items = "sum(row.quantity)" }
[[job.sink]]
table = "KS.city_10min"
"#;

const TEN_MINUTES_MS: i64 = 600_000;

/// Waits until the stream rollup's closed mark stops moving (the watermark has caught up with
/// the orders), then compares every closed window with the orders `0..messages` aggregated
/// here: (closed windows exact, closed windows expected, windows still open, results in the
/// table, seconds waited).
async fn verify_city_10min(
    session: &scylla::client::session::Session,
    messages: u64,
) -> anyhow::Result<(usize, usize, usize, usize, f64)> {
    let started = Instant::now();
    let closed_mark = || async {
        anyhow::Ok(
            shardgate::job::stream::progress(session, KEYSPACE, "city_10min")
                .await?
                .closed_through_ms,
        )
    };
    // Every order is in by now; the job closes what the watermark has passed within seconds.
    let newest = devkit::expected_order(messages.saturating_sub(1)).placed_at_ms;
    let mut last = None;
    let mut still_since = Instant::now();
    let closed = loop {
        let mark = closed_mark().await?;
        if mark != last {
            last = mark;
            still_since = Instant::now();
        }
        let caught_up = mark.is_some_and(|m| m >= newest - 2 * TEN_MINUTES_MS);
        if (caught_up && still_since.elapsed() > Duration::from_secs(3)) || started.elapsed() > Duration::from_secs(60)
        {
            break mark.unwrap_or(i64::MIN);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut expected: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    for i in 0..messages {
        let order = devkit::expected_order(i);
        let start = order.placed_at_ms.div_euclid(TEN_MINUTES_MS) * TEN_MINUTES_MS;
        let group = expected.entry((order.city, start)).or_default();
        group.0 += 1;
        group.1 += i64::from(order.quantity);
    }
    let rows: Vec<(String, scylla::value::CqlTimestamp, i64, i64)> = devkit::select(
        session,
        format!("SELECT city, window_start, orders, items FROM {KEYSPACE}.city_10min"),
    )
    .await?;
    let found: BTreeMap<(String, i64), (i64, i64)> = rows
        .into_iter()
        .map(|(city, start, orders, items)| ((city, start.0), (orders, items)))
        .collect();
    let (closed_groups, open_groups): (Vec<_>, Vec<_>) = expected
        .iter()
        .partition(|((_, start), _)| start + TEN_MINUTES_MS <= closed);
    let exact = closed_groups
        .iter()
        .filter(|(key, want)| found.get(*key) == Some(*want))
        .count();
    for (key, want) in closed_groups
        .iter()
        .filter(|(key, want)| found.get(*key) != Some(*want))
        .take(3)
    {
        println!("   stream difference: {key:?}: {:?} against {want:?}", found.get(*key));
    }
    let beyond = found.len().saturating_sub(exact);
    if beyond > 0 {
        println!("   stream difference: {beyond} result(s) beyond the closed windows' exact ones");
    }
    Ok((
        exact,
        closed_groups.len(),
        open_groups.len(),
        found.len(),
        started.elapsed().as_secs_f64(),
    ))
}

/// Per (city, hour start): orders, items, largest quantity, revenue in cents, customers.
type CityHour = BTreeMap<(String, i64), (i64, i64, i64, i64, i64)>;

/// The express orders `0..messages` aggregated here, independently of the job.
fn expected_city_hourly(messages: u64) -> CityHour {
    type Group = (i64, i64, i64, i64, BTreeSet<i64>);
    let mut groups: BTreeMap<(String, i64), Group> = BTreeMap::new();
    for i in 0..messages {
        let order = devkit::expected_order(i);
        if !order.express {
            continue;
        }
        let hour = order.placed_at_ms.div_euclid(3_600_000) * 3_600_000;
        let group = groups.entry((order.city, hour)).or_default();
        group.0 += 1;
        group.1 += i64::from(order.quantity);
        group.2 = group.2.max(i64::from(order.quantity));
        group.3 += order.amount_cents;
        group.4.insert(order.customer_id);
    }
    groups
        .into_iter()
        .map(|(key, (orders, items, largest, cents, customers))| {
            (key, (orders, items, largest, cents, customers.len() as i64))
        })
        .collect()
}

/// Runs the demo job; returns its summary line, results verified against
/// [`expected_city_hourly`] (every measure exact but the distinct customers, an estimate: within
/// 5 %).
async fn run_city_hourly(
    args: &Args,
    config: &std::path::Path,
    session: &scylla::client::session::Session,
) -> anyhow::Result<(String, usize, usize)> {
    let started = Instant::now();
    let output = std::process::Command::new(&args.gateway)
        .args(["job", "run", "--config"])
        .arg(config)
        .args(["--job", "city_hourly"])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("job city_hourly failed: {stderr}");
    }
    let summary = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("job "))
        .unwrap_or_default()
        .to_string();
    let expected = expected_city_hourly(args.messages);
    let rows: Vec<(String, scylla::value::CqlTimestamp, i64, i64, i32, i64, i64)> = session
        .query_iter(
            format!(
                "SELECT city, window_start, orders, items, largest, revenue_cents, customers FROM {KEYSPACE}.city_hourly"
            ),
            (),
        )
        .await?
        .rows_stream::<(String, scylla::value::CqlTimestamp, i64, i64, i32, i64, i64)>()?
        .try_collect()
        .await?;
    let mut exact = 0;
    for (city, start, orders, items, largest, cents, customers) in &rows {
        let Some(want) = expected.get(&(city.clone(), start.0)) else {
            println!(
                "   job difference: a group that should not exist: {city} at {}",
                start.0
            );
            continue;
        };
        let close = (customers - want.4).abs() * 20 <= want.4;
        if (*orders, *items, i64::from(*largest), *cents) == (want.0, want.1, want.2, want.3) && close {
            exact += 1;
        } else if exact < 3 {
            println!(
                "   job difference: {city} at {}: {:?} against {want:?}",
                start.0,
                (orders, items, largest, cents, customers)
            );
        }
    }
    println!(
        "   job: {} of {} (city, hour) groups as computed here, in {:.1} s",
        exact,
        expected.len(),
        started.elapsed().as_secs_f64()
    );
    Ok((summary, exact, expected.len()))
}

/// Routes of the other brokers, in the order their order-id ranges follow each other.
const BROKER_ROUTES: [&str; 4] = ["jetstream", "rabbitmq", "nats", "zeromq"];

/// Names of the demo's JetStream, RabbitMQ and NATS resources for one run.
struct BrokerNames {
    stream: String,
    subject: String,
    queue: String,
    core_subject: String,
    dead_letter_subject: String,
}

impl BrokerNames {
    fn new(run: u64) -> BrokerNames {
        BrokerNames {
            stream: format!("DEMO_{run}"),
            subject: format!("demo.{run}.orders"),
            queue: format!("demo.{run}.orders"),
            core_subject: format!("demo.{run}.core"),
            dead_letter_subject: format!("demo.{run}.dead-letter"),
        }
    }

    /// One route per broker into `BROKERS_KEYSPACE.orders`.
    fn routes(&self) -> String {
        [
            devkit::jetstream_orders_route_toml(
                BROKER_ROUTES[0],
                BROKERS_KEYSPACE,
                &self.stream,
                &self.subject,
                "shardgate-demo",
                &self.dead_letter_subject,
            ),
            devkit::rabbitmq_orders_route_toml(
                BROKER_ROUTES[1],
                BROKERS_KEYSPACE,
                &self.queue,
                &format!("{}.dead-letter", self.queue),
            ),
            devkit::nats_orders_route_toml(
                BROKER_ROUTES[2],
                BROKERS_KEYSPACE,
                &self.core_subject,
                "shardgate-demo",
                &self.dead_letter_subject,
            ),
            devkit::zeromq_orders_route_toml(BROKER_ROUTES[3], BROKERS_KEYSPACE, &self.dead_letter_subject),
        ]
        .concat()
    }

    async fn create(&self) -> anyhow::Result<()> {
        devkit::create_stream(&self.stream, &[&self.subject]).await?;
        devkit::create_stream(&format!("{}_DL", self.stream), &[&self.dead_letter_subject]).await?;
        devkit::recreate_queue(&self.queue).await?;
        devkit::recreate_queue(&format!("{}.dead-letter", self.queue)).await?;
        Ok(())
    }

    /// Sends orders `range` of broker `index` (in `BROKER_ROUTES` order).
    async fn send(&self, index: usize, range: std::ops::Range<u64>) -> anyhow::Result<u64> {
        match index {
            0 => devkit::publish_jetstream(&self.subject, range.map(devkit::order_message_with_id)).await,
            1 => devkit::publish_rabbitmq(&self.queue, range.map(devkit::order_message_with_id)).await,
            2 => devkit::publish_nats(&self.core_subject, range.map(devkit::order_message_with_id)).await,
            _ => {
                let messages: Vec<_> = range
                    .map(|i| {
                        let (key, payload) = devkit::order_message(i);
                        (key.into_bytes(), payload.into_bytes())
                    })
                    .collect();
                tokio::task::spawn_blocking(move || devkit::push_zeromq(devkit::ZMQ_ENDPOINT, messages)).await?
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work_dir)?;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let topic = format!("demo.orders.{run}");
    let dead_letter_topic = format!("{topic}.dead-letter");
    let group = format!("shardgate-demo-{run}");

    println!(
        "== shardgate demo: {} orders + {} malformed messages over {} partitions",
        args.messages, args.malformed, args.partitions
    );
    let session = devkit::connect(devkit::CASSANDRA).await?;
    devkit::create_orders_table(&session, KEYSPACE).await?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {KEYSPACE}.city_hourly (city text, window_start timestamp, orders bigint, items bigint, \
                 largest int, revenue_cents bigint, customers bigint, PRIMARY KEY (city, window_start))"
            ),
            (),
        )
        .await?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {KEYSPACE}.city_10min (city text, window_start timestamp, orders bigint, items bigint, \
                 PRIMARY KEY (city, window_start))"
            ),
            (),
        )
        .await?;
    devkit::create_events_table(&session, GRPC_KEYSPACE).await?;
    devkit::create_orders_table(&session, BROKERS_KEYSPACE).await?;
    let brokers = BrokerNames::new(run);
    brokers.create().await?;
    devkit::create_topic(&topic, args.partitions).await?;
    devkit::create_topic(&dead_letter_topic, 1).await?;
    println!("   table {KEYSPACE}.orders and topic {topic} created");

    let produce_start = Instant::now();
    let malformed_every = args.messages.checked_div(args.malformed).map_or(u64::MAX, |n| n.max(1));
    let mut malformed_sent = 0;
    let messages = (0..args.messages).flat_map(|i| {
        let (key, payload) = devkit::order_message(i);
        let mut batch = vec![(key, payload.into_bytes())];
        if i % malformed_every == 0 && malformed_sent < args.malformed {
            let (bad_key, bad_payload, _) = devkit::malformed_message(malformed_sent);
            batch.push((bad_key, bad_payload));
            malformed_sent += 1;
        }
        batch
    });
    let sent = devkit::produce(&topic, messages)?;
    println!(
        "   produced {sent} messages to Kafka in {:.1} s",
        produce_start.elapsed().as_secs_f64()
    );

    let config_path = args.work_dir.join("gateway.toml");
    let routes = devkit::orders_route_toml("orders", KEYSPACE, &topic, &group, &dead_letter_topic) + &brokers.routes();
    std::fs::write(
        &config_path,
        devkit::ingest_gateway_toml(&routes, 2048, 64)
            + &CITY_HOURLY_JOB.replace("KS", KEYSPACE)
            + &CITY_10MIN_JOB.replace("KS", KEYSPACE),
    )?;
    let log_path = args.work_dir.join("gateway.log");
    let gateway_start = Instant::now();
    let gateway = Gateway::start(&args.gateway, &config_path, &log_path)
        .with_context(|| format!("gateway failed to start; see {}", log_path.display()))?;
    println!(
        "   gateway serving (pid {}, config {}, log {})",
        gateway.pid(),
        config_path.display(),
        log_path.display()
    );

    let total = sent as i64;
    let mut last_committed = -1;
    let mut last_change = Instant::now();
    let done_at = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (committed, _) = devkit::committed_and_end(&group, &topic, args.partitions)?;
        let elapsed = gateway_start.elapsed().as_secs_f64();
        println!(
            "   progress: {committed:>7} / {total} messages written and committed ({:>6.0} msg/s)",
            committed as f64 / elapsed
        );
        if committed >= total {
            break gateway_start.elapsed();
        }
        if committed != last_committed {
            last_committed = committed;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(args.stall_timeout_s) {
            bail!("no progress for {} s; see {}", args.stall_timeout_s, log_path.display());
        }
    };
    let cpu_seconds = gateway.cpu_seconds()?;
    println!("   stream: the rollup city_10min (inside serve) closing its windows as the watermark passes them");
    let (stream_exact, stream_closed, stream_open, stream_results, stream_wait) =
        verify_city_10min(&session, args.messages).await?;
    println!("   job: aggregating the express orders per city and hour (shardgate job run --job city_hourly)");
    let (job_summary, job_exact, job_groups) = run_city_hourly(&args, &config_path, &session).await?;

    let table = format!("{GRPC_KEYSPACE}.events");
    println!(
        "   gRPC: streaming {} typed rows with the shard-aware client",
        args.grpc_rows
    );
    let client = ShardAwareClient::connect(devkit::INGEST_LISTEN, &[&table]).await?;
    let batches = devkit::event_batches(&table, args.grpc_rows, GRPC_BATCH_ROWS);
    let grpc_cpu_before = gateway.cpu_seconds()?;
    let grpc_start = Instant::now();
    let grpc = client.stream(batches).await?;
    let grpc_elapsed = grpc_start.elapsed();
    let grpc_cpu = gateway.cpu_seconds()? - grpc_cpu_before;
    let forwarded = devkit::scrape_metric_where(
        devkit::ADMIN_LISTEN,
        shardgate::telemetry::metric::ROWS_FORWARDED,
        &[("source", "grpc")],
    )?;
    println!(
        "   gRPC: {} rows written, {} rejected, in {:.1} s",
        grpc.written,
        grpc.errors.len(),
        grpc_elapsed.as_secs_f64()
    );
    println!(
        "   brokers: {} orders each through JetStream, RabbitMQ, NATS (queue group) and ZeroMQ (PUSH → PULL)",
        args.broker_messages
    );
    let mut broker_lines = Vec::new();
    for (index, route) in BROKER_ROUTES.iter().enumerate() {
        let first = index as u64 * args.broker_messages;
        let started = Instant::now();
        let sent = brokers.send(index, first..first + args.broker_messages).await?;
        let target = first + args.broker_messages;
        devkit::wait_for_orders(
            &session,
            BROKERS_KEYSPACE,
            target,
            Duration::from_secs(args.stall_timeout_s),
        )
        .await
        .with_context(|| format!("{route}: see {}", log_path.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        let line = format!(
            "{route:<10} {sent} sent, all written in {seconds:.1} s ({:.0} rows/s, send included)",
            sent as f64 / seconds
        );
        println!("   {line}");
        broker_lines.push(line);
    }
    println!("   queries: scanning the gRPC table and getting events by key through the query API");
    let read_back = devkit::read_back_events(&client, &table, args.grpc_rows as u64, 0, 4, 1_000).await?;
    let status = gateway.stop()?;
    let broker_total = args.broker_messages * BROKER_ROUTES.len() as u64;
    let broker_report = devkit::verify_orders(&session, BROKERS_KEYSPACE, broker_total).await?;

    let report = devkit::verify_orders(&session, KEYSPACE, args.messages).await?;
    let dead_letters = devkit::read_topic(&dead_letter_topic, malformed_sent as usize, Duration::from_secs(30))?;
    let rate = args.messages as f64 / done_at.as_secs_f64();
    println!();
    println!("== summary");
    println!("   rows in Cassandra:        {}", report.rows);
    println!("   rows verified exact:      {} of {}", report.matching, args.messages);
    println!("   rows missing:             {}", report.missing);
    println!(
        "   dead letters (with reason): {} of {} malformed",
        dead_letters.len(),
        malformed_sent
    );
    for letter in dead_letters.iter().take(3) {
        println!(
            "     - {} at partition {} offset {}: {}",
            letter.headers.get("shardgate.reason.code").map_or("?", String::as_str),
            letter
                .headers
                .get("shardgate.source.partition")
                .map_or("?", String::as_str),
            letter
                .headers
                .get("shardgate.source.offset")
                .map_or("?", String::as_str),
            letter.headers.get("shardgate.reason").map_or("?", String::as_str),
        );
    }
    println!(
        "   Kafka throughput:         {rate:.0} rows/s (gateway start to all offsets committed, {:.1} s)",
        done_at.as_secs_f64()
    );
    println!(
        "   Kafka gateway CPU:        {:.1} s total, {:.1} CPU-s per million rows (the route with the stream rollup beside it)",
        cpu_seconds,
        cpu_seconds * 1e6 / sent as f64
    );
    let grpc_report = devkit::verify_events(&session, GRPC_KEYSPACE, args.grpc_rows as u64).await?;
    println!("   gRPC rows verified exact: {} of {} ({:.0} rows/s, {:.1} CPU-s per million rows, {forwarded} forwarded between cores)",
        grpc_report.matching, args.grpc_rows, args.grpc_rows as f64 / grpc_elapsed.as_secs_f64(), grpc_cpu * 1e6 / args.grpc_rows as f64);
    println!(
        "   query API:                {} of {} rows scanned exact in {:.1} s ({:.0} rows/s, {} splits, {} duplicates); {} of {} gets exact",
        read_back.exact,
        args.grpc_rows,
        read_back.scan_time.as_secs_f64(),
        read_back.scanned as f64 / read_back.scan_time.as_secs_f64().max(1e-3),
        read_back.splits,
        read_back.duplicates,
        read_back.gets_exact,
        read_back.gets
    );
    for difference in &read_back.differences {
        println!("   query difference: {difference}");
    }
    println!(
        "   job city_hourly:          {job_exact} of {job_groups} (city, hour) groups exact (customers within 5 %)"
    );
    println!("     - {job_summary}");
    println!(
        "   stream rollup city_10min: {stream_exact} of {stream_closed} closed (city, 10 minutes) windows exact; {stream_open} still open (no newer orders to pass them); closed {stream_wait:.1} s after the last commit"
    );
    println!(
        "   broker rows verified exact: {} of {} (JetStream, RabbitMQ, NATS, ZeroMQ)",
        broker_report.matching, broker_total
    );
    for line in &broker_lines {
        println!("     - {line}");
    }
    println!("   gateway exit:             {status}");
    for difference in &broker_report.differences {
        println!("   broker difference: {difference}");
    }
    for difference in &grpc_report.differences {
        println!("   gRPC difference: {difference}");
    }
    for difference in &report.differences {
        println!("   difference: {difference}");
    }
    if report.matching != args.messages
        || report.rows != args.messages
        || dead_letters.len() as u64 != malformed_sent
        || grpc_report.matching != args.grpc_rows as u64
        || grpc_report.rows != args.grpc_rows as u64
        || broker_report.matching != broker_total
        || broker_report.rows != broker_total
        || read_back.exact != args.grpc_rows as u64
        || read_back.scanned != args.grpc_rows as u64
        || read_back.gets_exact != read_back.gets
        || job_exact != job_groups
        || job_groups == 0
        || stream_exact != stream_closed
        || stream_results != stream_closed
        || stream_closed == 0
    {
        bail!("verification failed");
    }
    println!(
        "== OK: every Kafka, gRPC, JetStream, RabbitMQ, NATS and ZeroMQ row verified in Cassandra, every malformed message dead-lettered, the gRPC table read back exact through the query API, the scan job's and the stream rollup's results exact"
    );
    Ok(())
}
