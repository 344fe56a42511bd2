//! Tools for the demo, the integration tests and the end-to-end bench: a sample `orders` table
//! and its messages, topic setup, a fast producer, read-back verification, dead-letter and
//! committed-offset inspection, and a gateway child process. Talks to real services only.
//!
//! Not used by the gateway itself. Runs on the caller's tokio runtime / thread.

// Tooling and tests: a failed expectation is the tool or test failing, never a gateway core.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::TryStreamExt;
use num_bigint::BigInt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::value::{CqlDecimal, CqlTimestamp};

/// Local service addresses used by `deploy/local`.
pub const CASSANDRA: &str = "127.0.0.1:9042";
/// Kafka bootstrap server of the local stack.
pub const KAFKA: &str = "127.0.0.1:9092";
/// The local stack's secured Cassandra: client TLS required (certificate of [`stack_ca_file`]),
/// `PasswordAuthenticator` with superuser `cassandra`/`cassandra`, `CassandraAuthorizer`.
pub const CASSANDRA_SECURE: &str = "127.0.0.1:9142";
/// The local Kafka's SASL_SSL listener (certificate of [`stack_ca_file`]; user `shardgate`,
/// SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN, password in [`stack_kafka_password_file`]).
pub const KAFKA_SECURE: &str = "127.0.0.1:9095";
/// The stack's Kafka SSL listener, where clients must present a certificate of the stack's CA.
pub const KAFKA_CLIENT_CERT: &str = "127.0.0.1:9096";

const CITIES: [&str; 8] = ["Oslo", "Lyon", "Porto", "Kraków", "Turku", "Gent", "Brno", "Cork"];
/// Base of the sample `placed_at` times (2026-01-01T00:00:00Z).
const PLACED_AT_BASE_MS: i64 = 1_767_225_600_000;

/// Connects to the local Cassandra (or `contact`).
pub async fn connect(contact: &str) -> anyhow::Result<Session> {
    SessionBuilder::new()
        .known_node(contact)
        .build()
        .await
        .with_context(|| format!("cannot connect to Cassandra at {contact}; is `deploy/local/stack.sh up` running?"))
}

/// The CA of the local stack's secured services (`deploy/local/stack.sh` makes it).
pub fn stack_ca_file() -> PathBuf {
    state_dir().join("pki/ca.pem")
}

/// The client certificate (`CN=shardgate-client`) and key the stack made with its CA.
pub fn stack_client_identity() -> (PathBuf, PathBuf) {
    (state_dir().join("pki/client.pem"), state_dir().join("pki/client.key"))
}

/// The password of the local Kafka's SASL user `shardgate`.
pub fn stack_kafka_password_file() -> PathBuf {
    state_dir().join("pki/kafka-password")
}

/// A Kafka `security` inline table for [`KAFKA_SECURE`]: SASL_SSL as user `shardgate`
/// (SCRAM-SHA-512, [`stack_kafka_password_file`]), trusting [`stack_ca_file`].
pub fn kafka_sasl_ssl_security_toml() -> String {
    format!(
        "{{ protocol = \"sasl_ssl\", mechanism = \"SCRAM-SHA-512\", username = \"shardgate\", password_file = {:?}, ca_file = {:?} }}",
        stack_kafka_password_file(),
        stack_ca_file()
    )
}

/// The local RabbitMQ's amqps listener (certificate of [`stack_ca_file`]; user `shardgate`,
/// password in [`stack_rabbitmq_password_file`]).
pub const AMQPS: &str = "amqps://127.0.0.1:5671/%2f";

/// The password of the local RabbitMQ's user `shardgate`.
pub fn stack_rabbitmq_password_file() -> PathBuf {
    state_dir().join("pki/rabbitmq-password")
}

/// Connects to the secured Cassandra at `contact` over TLS (trusting [`stack_ca_file`], with the
/// stack's client certificate, which it requires) as `user`, retrying for up to a minute while
/// the server is still setting up its roles.
pub async fn connect_secure(contact: &str, user: &str, password: &str) -> anyhow::Result<Session> {
    let (cert, key) = stack_client_identity();
    let tls = crate::tls::database_client_config(&stack_ca_file(), Some((&cert, &key)), true)?;
    let started = Instant::now();
    loop {
        let session = SessionBuilder::new()
            .known_node(contact)
            .tls_context(Some(tls.clone()))
            .user(user, password)
            .build()
            .await;
        match session {
            Ok(session) => return Ok(session),
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                tracing::debug!(error = %e, "secured Cassandra not ready; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => bail!(
                "cannot connect to the secured Cassandra at {contact} as `{user}`: {e}; is `deploy/local/stack.sh up` running?"
            ),
        }
    }
}

/// Drops and recreates `keyspace` (replication factor 1), then runs `create_table` in it.
pub async fn recreate_keyspace_with(session: &Session, keyspace: &str, create_table: String) -> anyhow::Result<()> {
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), &[])
        .await?;
    let replication = "{'class': 'SimpleStrategy', 'replication_factor': 1}";
    session
        .query_unpaged(
            format!("CREATE KEYSPACE {keyspace} WITH replication = {replication}"),
            &[],
        )
        .await?;
    session.query_unpaged(create_table, &[]).await?;
    session.await_schema_agreement().await?;
    Ok(())
}

/// Creates (or recreates) keyspace `keyspace` with the sample `orders` table.
pub async fn create_orders_table(session: &Session, keyspace: &str) -> anyhow::Result<()> {
    let table = format!(
        "CREATE TABLE {keyspace}.orders (order_id text PRIMARY KEY, customer_id bigint, city text, \
         amount decimal, quantity int, placed_at timestamp, express boolean, tags set<text>)"
    );
    recreate_keyspace_with(session, keyspace, table).await
}

/// The `[[route]]` block that maps sample order messages into `keyspace.orders`.
pub fn orders_route_toml(name: &str, keyspace: &str, topic: &str, group: &str, dead_letter_topic: &str) -> String {
    let source = format!(
        r#"kind = "kafka"
brokers = ["{KAFKA}"]
topic = "{topic}"
group_id = "{group}"
start_from = "earliest"
commit_interval_ms = 500
[route.source.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000""#
    );
    let dead_letter = format!(
        r#"kind = "kafka"
topic = "{dead_letter_topic}""#
    );
    orders_route(name, keyspace, &source, "$key", &dead_letter)
}

/// A `[[route]]` into `keyspace.orders` with the given `[route.source]` and
/// `[route.dead_letter]` bodies, the order id read from `order_id_field`.
fn orders_route(name: &str, keyspace: &str, source: &str, order_id_field: &str, dead_letter: &str) -> String {
    let columns = orders_columns_toml(order_id_field);
    format!(
        r#"
[[route]]
name = "{name}"
table = "{keyspace}.orders"
format = "json"

[route.source]
{source}

{columns}

[route.dead_letter]
{dead_letter}
"#
    )
}

/// The `[route.columns]` table of the sample orders, the order id read from `order_id_field`.
fn orders_columns_toml(order_id_field: &str) -> String {
    format!(
        r#"[route.columns]
order_id = "{order_id_field}"
customer_id = "customer.id"
city = "customer.address.city"
amount = "amount"
quantity = "quantity"
placed_at = "placed_at"
express = "express"
tags = "tags""#
    )
}

/// A gateway config for the local cluster with the given routes and default limits.
pub fn gateway_toml(routes: &str) -> String {
    gateway_toml_with(routes, "", ADMIN_LISTEN)
}

/// Like [`gateway_toml`] with metrics on `admin` (a second gateway on the same host).
pub fn gateway_toml_on(routes: &str, admin: &str) -> String {
    gateway_toml_with(routes, "", admin)
}

/// A gateway config for the local cluster, with metrics on [`ADMIN_LISTEN`]: `runtime_extra`
/// lines go in `[runtime]`, then the routes.
pub fn gateway_toml_with(routes: &str, runtime_extra: &str, admin: &str) -> String {
    format!(
        r#"
[cluster]
contact_points = ["{CASSANDRA}"]
local_datacenter = "datacenter1"
consistency = "local_quorum"

[runtime]
cores = "auto"
island_threads = 1
shutdown_deadline_ms = 5000
{runtime_extra}

[admin]
listen = "{admin}"
{routes}"#
    )
}

/// What order `i` must look like in the table.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedOrder {
    /// Primary key, also the message key.
    pub order_id: String,
    /// `customer.id`.
    pub customer_id: i64,
    /// `customer.address.city`.
    pub city: String,
    /// `amount` as a decimal with 2 fractional digits.
    pub amount_cents: i64,
    /// `quantity`.
    pub quantity: i32,
    /// `placed_at` in epoch milliseconds.
    pub placed_at_ms: i64,
    /// `express`.
    pub express: bool,
    /// `tags`, sorted (a set).
    pub tags: Vec<String>,
}

/// The expected row of sample order `i`.
pub fn expected_order(i: u64) -> ExpectedOrder {
    let mut tags = vec![format!("batch-{}", i / 1000)];
    if i.is_multiple_of(3) {
        tags.push("express".to_string());
    }
    tags.sort();
    ExpectedOrder {
        order_id: format!("order-{i:08}"),
        customer_id: (i * 7919 % 100_000) as i64,
        city: CITIES[(i % CITIES.len() as u64) as usize].to_string(),
        amount_cents: (i * 37 % 1_000_000) as i64,
        quantity: (i % 10 + 1) as i32,
        placed_at_ms: PLACED_AT_BASE_MS + i as i64 * 1_000,
        express: i.is_multiple_of(3),
        tags,
    }
}

/// Sample order `i` as a Kafka message: (key, JSON payload).
pub fn order_message(i: u64) -> (String, String) {
    let e = expected_order(i);
    let placed_at = chrono::DateTime::from_timestamp_millis(e.placed_at_ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    let payload = format!(
        r#"{{"customer":{{"id":{},"address":{{"city":"{}"}}}},"amount":{}.{:02},"quantity":{},"placed_at":"{}","express":{},"tags":{}}}"#,
        e.customer_id,
        e.city,
        e.amount_cents / 100,
        e.amount_cents % 100,
        e.quantity,
        placed_at,
        e.express,
        serde_json::to_string(&e.tags).unwrap_or_default()
    );
    (e.order_id, payload)
}

/// Creates `keyspace.orders5`, the 5-column orders (issue 13's workload): order id, customer,
/// amount, quantity, time.
pub async fn create_orders5_table(session: &Session, keyspace: &str) -> anyhow::Result<()> {
    let table = format!(
        "CREATE TABLE {keyspace}.orders5 (order_id text PRIMARY KEY, customer_id bigint, amount decimal, \
         quantity int, placed_at timestamp)"
    );
    recreate_keyspace_with(session, keyspace, table).await
}

/// Sample order `i` of the 5-column workload as a Kafka message: (key, flat JSON payload of
/// about 117 bytes, the order id in it too). Its values are those of [`expected_order`].
pub fn order5_message(i: u64) -> (String, String) {
    let e = expected_order(i);
    let placed_at = chrono::DateTime::from_timestamp_millis(e.placed_at_ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default();
    let payload = format!(
        r#"{{"order_id":"{}","customer_id":{},"amount":{}.{:02},"quantity":{},"placed_at":"{}"}}"#,
        e.order_id,
        e.customer_id,
        e.amount_cents / 100,
        e.amount_cents % 100,
        e.quantity,
        placed_at,
    );
    (e.order_id, payload)
}

/// The `[[route]]` block that maps [`order5_message`]s from `topic` into `keyspace.orders5`
/// (every column named as its field).
pub fn orders5_route_toml(name: &str, keyspace: &str, topic: &str, group: &str, dead_letter_topic: &str) -> String {
    orders_route_toml(name, keyspace, topic, group, dead_letter_topic)
        .replace(
            &format!("table = \"{keyspace}.orders\""),
            &format!("table = \"{keyspace}.orders5\""),
        )
        .replace(
            &orders_columns_toml("$key"),
            "[route.columns]\norder_id = \"order_id\"\ncustomer_id = \"customer_id\"\namount = \"amount\"\n\
             quantity = \"quantity\"\nplaced_at = \"placed_at\"",
        )
}

/// Order `i` of the 5-column workload as the table must hold it: (order id, customer id,
/// amount in cents, quantity, placed at in epoch milliseconds).
pub fn expected_order5(i: u64) -> (String, i64, i64, i32, i64) {
    let e = expected_order(i);
    (e.order_id, e.customer_id, e.amount_cents, e.quantity, e.placed_at_ms)
}

/// Malformed message `j` of three kinds, with the reason code the gateway must give it.
pub fn malformed_message(j: u64) -> (String, Vec<u8>, &'static str) {
    let key = format!("bad-{j:06}");
    match j % 3 {
        0 => (key, b"{this is not json".to_vec(), "not_json"),
        1 => (
            key,
            br#"{"customer":{"id":"not-a-number"},"amount":1.00}"#.to_vec(),
            "bad_value",
        ),
        _ => (String::new(), br#"{"amount":2.50}"#.to_vec(), "bad_key"),
    }
}

/// Creates `topic` with `partitions` partitions (replication 1); an existing topic is an error.
pub async fn create_topic(topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", KAFKA).create()?;
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&new_topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for result in results {
        if let Err((name, code)) = result {
            bail!("cannot create topic `{name}`: {code}");
        }
    }
    Ok(())
}

/// Deletes consumer group `group` (its committed offsets with it), retrying while the broker
/// still counts a member of it (a killed member stays until its session times out).
pub async fn delete_group(group: &str, deadline: Duration) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", KAFKA).create()?;
    let started = Instant::now();
    loop {
        let results = admin
            .delete_groups(
                &[group],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        match results.into_iter().next() {
            Some(Ok(_)) => return Ok(()),
            Some(Err((_, code))) if started.elapsed() < deadline => {
                tracing::debug!(group, %code, "group not deletable yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some(Err((_, code))) => bail!("cannot delete group `{group}`: {code}"),
            None => bail!("deleting group `{group}`: no result"),
        }
    }
}

/// Counts failed deliveries of the devkit producer.
#[derive(Default)]
pub struct DeliveryFailures(AtomicU64);

impl ClientContext for DeliveryFailures {}

impl ProducerContext for DeliveryFailures {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Produces (key, payload) messages to `topic` as fast as the broker takes them; returns once
/// all are acknowledged by the broker. An empty key is sent as no key.
pub fn produce<I>(topic: &str, messages: I) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = (String, Vec<u8>)>,
{
    produce_at(topic, messages, None)
}

/// Like [`produce`], sending at most `per_second` messages per second when given (each message
/// carries its send time as its Kafka timestamp).
pub fn produce_at<I>(topic: &str, messages: I, per_second: Option<u64>) -> anyhow::Result<u64>
where
    I: IntoIterator<Item = (String, Vec<u8>)>,
{
    let started = std::time::Instant::now();
    let producer: BaseProducer<DeliveryFailures> = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .create_with_context(DeliveryFailures::default())?;
    let mut sent = 0;
    for (key, payload) in messages {
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).payload(&payload);
        if !key.is_empty() {
            record = record.key(key.as_str());
        }
        send_waiting(&producer, record)?;
        sent += 1;
        if let Some(rate) = per_second.filter(|&r| r > 0) {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(ahead) = due
                .checked_sub(started.elapsed())
                .filter(|a| *a >= Duration::from_millis(1))
            {
                producer.poll(Duration::ZERO);
                std::thread::sleep(ahead);
            }
        }
    }
    producer.flush(Timeout::After(Duration::from_secs(120)))?;
    let failed = producer.context().0.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {sent} messages were not delivered to `{topic}`");
    }
    Ok(sent)
}

/// Waits until the broker acknowledged everything `producer` sent; an error if it refused any.
fn flush_all(producer: &BaseProducer<DeliveryFailures>) -> anyhow::Result<()> {
    producer.flush(Timeout::After(Duration::from_secs(60)))?;
    anyhow::ensure!(
        producer.context().0.load(Ordering::Relaxed) == 0,
        "the broker refused some messages"
    );
    Ok(())
}

/// Sends `record`, waiting while the producer's queue is full.
fn send_waiting(
    producer: &BaseProducer<DeliveryFailures>,
    mut record: BaseRecord<'_, str, [u8]>,
) -> anyhow::Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                producer.poll(Duration::from_millis(20));
                record = back;
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// Every row of `cql` (no binds), paged, each as `R` (a tuple of the selected columns' types).
pub async fn select<R>(session: &Session, cql: impl Into<String>) -> anyhow::Result<Vec<R>>
where
    R: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
{
    let rows = session
        .query_iter(cql.into(), &[])
        .await?
        .rows_stream::<R>()?
        .try_collect()
        .await?;
    Ok(rows)
}

/// Rows in `keyspace.table`, counted by reading every key; `K` is the key column's Rust type
/// (`String` for text, `i64` for bigint).
pub async fn count_rows<K>(session: &Session, keyspace: &str, table: &str, key_column: &str) -> anyhow::Result<u64>
where
    K: for<'frame, 'metadata> scylla::deserialize::value::DeserializeValue<'frame, 'metadata>,
{
    let mut rows = session
        .query_iter(format!("SELECT {key_column} FROM {keyspace}.{table}"), &[])
        .await?
        .rows_stream::<(K,)>()?;
    let mut count = 0;
    while rows.try_next().await?.is_some() {
        count += 1;
    }
    Ok(count)
}

/// Result of reading back the sample orders.
#[derive(Debug, Default)]
pub struct Verification {
    /// Rows in the table.
    pub rows: u64,
    /// Rows equal to their expected values.
    pub matching: u64,
    /// Expected orders not in the table.
    pub missing: u64,
    /// The first few differences, for the report.
    pub differences: Vec<String>,
}

type OrderRow = (
    String,
    Option<i64>,
    Option<String>,
    Option<CqlDecimal>,
    Option<i32>,
    Option<CqlTimestamp>,
    Option<bool>,
    Option<Vec<String>>,
);

/// Reads every row of `keyspace.orders` and compares it with orders `0..count`.
pub async fn verify_orders(session: &Session, keyspace: &str, count: u64) -> anyhow::Result<Verification> {
    let mut rows = session
        .query_iter(
            format!(
                "SELECT order_id, customer_id, city, amount, quantity, placed_at, express, tags FROM {keyspace}.orders"
            ),
            &[],
        )
        .await?
        .rows_stream::<OrderRow>()?;
    let mut report = Verification::default();
    let mut seen = vec![false; count as usize];
    while let Some(row) = rows.try_next().await? {
        report.rows += 1;
        let index = row
            .0
            .strip_prefix("order-")
            .and_then(|n| u64::from_str(n).ok())
            .filter(|&i| i < count);
        let Some(i) = index else {
            note(&mut report, format!("unexpected row `{}`", row.0));
            continue;
        };
        seen[i as usize] = true;
        let e = expected_order(i);
        let amount =
            CqlDecimal::from_signed_be_bytes_and_exponent(BigInt::from(e.amount_cents).to_signed_bytes_be(), 2);
        let expected: OrderRow = (
            e.order_id.clone(),
            Some(e.customer_id),
            Some(e.city.clone()),
            Some(amount),
            Some(e.quantity),
            Some(CqlTimestamp(e.placed_at_ms)),
            Some(e.express),
            Some(e.tags.clone()),
        );
        if row == expected {
            report.matching += 1;
        } else {
            note(
                &mut report,
                format!("`{}`: got {row:?}, expected {expected:?}", e.order_id),
            );
        }
    }
    report.missing = seen.iter().filter(|s| !**s).count() as u64;
    Ok(report)
}

fn note(report: &mut Verification, difference: String) {
    const DIFFERENCES_MAX: usize = 5;
    if report.differences.len() < DIFFERENCES_MAX {
        report.differences.push(difference);
    }
}

/// A message read back from a dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetterRecord {
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original payload.
    pub payload: Option<Vec<u8>>,
    /// Headers by name, values as text.
    pub headers: BTreeMap<String, String>,
}

/// Reads `topic` from the beginning until `expected` messages arrived or `deadline` passed.
pub fn read_topic(topic: &str, expected: usize, deadline: Duration) -> anyhow::Result<Vec<DeadLetterRecord>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", format!("devkit-reader-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let start = Instant::now();
    let mut records = Vec::new();
    while records.len() < expected && start.elapsed() < deadline {
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = polled?;
        let mut headers = BTreeMap::new();
        if let Some(list) = message.headers() {
            for header in list.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                headers.insert(header.key.to_string(), value);
            }
        }
        records.push(DeadLetterRecord {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    Ok(records)
}

/// (committed offsets, end offsets) of `group` on `topic`, summed over partitions.
pub fn committed_and_end(group: &str, topic: &str, partitions: i32) -> anyhow::Result<(i64, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", group)
        .create()?;
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10))?;
    let mut committed_sum = 0;
    for element in committed.elements() {
        if let Offset::Offset(o) = element.offset() {
            committed_sum += o;
        }
    }
    let mut end_sum = 0;
    for p in 0..partitions {
        end_sum += consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?.1;
    }
    Ok((committed_sum, end_sum))
}

/// A gateway running as a child process.
pub struct Gateway {
    child: Child,
    /// Its log file (stderr and stdout).
    pub log: PathBuf,
}

impl Gateway {
    /// Starts `binary serve --config config`, logging to `log` (truncated), and waits until it
    /// serves.
    pub fn start(binary: &Path, config: &Path, log: &Path) -> anyhow::Result<Gateway> {
        let mut gateway = Gateway::spawn(binary, config, log)?;
        gateway.wait_for_log("shardgate serving", Duration::from_secs(60))?;
        Ok(gateway)
    }

    /// Starts `binary serve --config config`, logging to `log` (truncated), without waiting.
    pub fn spawn(binary: &Path, config: &Path, log: &Path) -> anyhow::Result<Gateway> {
        let mut command = Command::new(binary);
        command.args(["serve", "--config"]).arg(config);
        Gateway::spawn_command(command, log)
    }

    /// Starts `command` (a `serve` with flags or environment of the caller's), its stdout and
    /// stderr to `log` (truncated), without waiting.
    pub fn spawn_command(mut command: Command, log: &Path) -> anyhow::Result<Gateway> {
        let file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = command
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.get_program()))?;
        Ok(Gateway {
            child,
            log: log.to_path_buf(),
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str, deadline: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "gateway exited with {status} before `{needle}`; log tail:\n{}",
                    tail(&text, 30)
                );
            }
            if start.elapsed() > deadline {
                bail!(
                    "gateway did not log `{needle}` within {deadline:?}; log tail:\n{}",
                    tail(&text, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// CPU seconds (user + system) the gateway has used, from /proc.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        process_cpu_seconds(self.child.id())
    }

    /// `kill -9`: no drain, no commit.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits for a graceful exit.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("cannot signal the gateway");
        }
        Ok(self.child.wait()?)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Simulates a crash in the middle of a spool write: in the newest segment (of any core under
/// `spool_dir`) that holds records, replaces whatever follows the last record with the first
/// half of a frame carrying `record` — a record whose write the crash cut, never acknowledged.
/// Returns the segment's path. Run it on a stopped gateway.
pub fn tear_spool_tail(spool_dir: &Path, record: &[u8]) -> anyhow::Result<PathBuf> {
    use crate::spool::frame;
    let mut segments = Vec::new();
    for core in std::fs::read_dir(spool_dir).with_context(|| format!("spool dir {}", spool_dir.display()))? {
        for segment in std::fs::read_dir(core?.path())? {
            let path = segment?.path();
            let bytes = std::fs::read(&path)?;
            let (records, _) = frame::decode(&bytes);
            if let Some(last) = records.last() {
                let end = frame::frame_offset(&bytes, last) + frame::HEADER_BYTES + last.len();
                segments.push((path.clone(), end));
            }
        }
    }
    // Segment names sort by number; the newest segment across cores is as good as any.
    let (path, end) = segments
        .into_iter()
        .max_by(|a, b| a.0.file_name().cmp(&b.0.file_name()))
        .context("no spool segment holds a record")?;
    let mut torn = Vec::new();
    frame::encode(record, &mut torn);
    torn.truncate(torn.len() / 2);
    let mut file = std::fs::OpenOptions::new().write(true).open(&path)?;
    file.set_len(end as u64)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(end as u64))?;
    std::io::Write::write_all(&mut file, &torn)?;
    file.sync_all()?;
    Ok(path)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Shared gRPC port of the gateways the devkit starts.
pub const INGEST_LISTEN: &str = "127.0.0.1:50051";
/// First per-core gRPC port.
pub const INGEST_CORE_PORT_BASE: u16 = 50100;
/// Admin (metrics) address.
pub const ADMIN_LISTEN: &str = "127.0.0.1:9190";

/// A stream job `name` over route `orders`: orders and items per hour into `keyspace.hourly`
/// (the bench's `kafka-5-rollup` job and the `rollup` criterion bench's).
pub fn hourly_rollup_job_toml(name: &str, keyspace: &str) -> String {
    format!(
        r#"
[[job]]
name = "{name}"
state_keyspace = "{keyspace}"
[job.source]
stream = ["orders"]
[job.aggregate]
window = {{ column = "placed_at", size = "1h", lateness = "1m" }}
measures = {{ orders = "count()", items = "sum(row.quantity)" }}
[[job.sink]]
table = "{keyspace}.hourly"
"#
    )
}

/// A gateway config serving the ingest API (and metrics) with the given routes.
pub fn ingest_gateway_toml(routes: &str, inflight_rows_per_core_max: usize, write_batch_rows_max: usize) -> String {
    let limits = format!(
        "inflight_rows_per_core_max = {inflight_rows_per_core_max}\nwrite_batch_rows_max = {write_batch_rows_max}"
    );
    let base = gateway_toml_with(routes, &limits, ADMIN_LISTEN);
    format!("{base}\n[ingest]\nlisten = \"{INGEST_LISTEN}\"\ncore_port_base = {INGEST_CORE_PORT_BASE}\n")
}

/// What reading the sample events back through the query API found.
#[derive(Debug, Clone, Default)]
pub struct EventsReadBack {
    /// Rows the scan returned.
    pub scanned: u64,
    /// Scanned rows equal to the event they should be, each counted once.
    pub exact: u64,
    /// Rows returned more than once.
    pub duplicates: u64,
    /// Scan splits.
    pub splits: usize,
    /// Time the scan took.
    pub scan_time: Duration,
    /// `Get`s made and how many returned exactly their event.
    pub gets: u64,
    /// `Get`s that returned exactly their event.
    pub gets_exact: u64,
    /// First differences, for the report.
    pub differences: Vec<String>,
}

/// Reads the sample events `0..count` of `table` back through the gateway's query API with the
/// shard-aware client: a scan of the whole table (planned by the gateway into at least `splits`
/// splits, 0 for its configured default; `parallel` splits at a time, each at its owner core's port), every row compared with the event it should be; then
/// `gets` of them by key (spread over the range), each to the key's owner core.
pub async fn read_back_events(
    client: &crate::client::ShardAwareClient,
    table: &str,
    count: u64,
    splits: u32,
    parallel: usize,
    gets: u64,
) -> anyhow::Result<EventsReadBack> {
    use crate::wire::proto::value::Kind;
    use crate::wire::proto::{GetRequest, PlanScanRequest, QueryOptions, ScanRequest, Value};
    let mut report = EventsReadBack::default();
    let started = Instant::now();
    let splits = client
        .query_client()
        .plan_scan(PlanScanRequest {
            table: table.to_string(),
            min_splits: splits,
        })
        .await?
        .into_inner()
        .splits;
    report.splits = splits.len();
    let request = ScanRequest {
        table: table.to_string(),
        columns: event_columns(),
        options: Some(QueryOptions {
            page_size: 5000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut seen = vec![false; count as usize];
    let mut pages = client.scan(request, splits, Vec::new(), parallel);
    while let Some(page) = pages.recv().await {
        for row in page?.result.rows {
            report.scanned += 1;
            let id = match row.values.first().and_then(|v| v.kind.as_ref()) {
                Some(Kind::Int(id)) if (0..count as i64).contains(id) => *id,
                _ => {
                    if report.differences.len() < 5 {
                        report
                            .differences
                            .push(format!("scanned a row outside the events: {row:?}"));
                    }
                    continue;
                }
            };
            if std::mem::replace(&mut seen[id as usize], true) {
                report.duplicates += 1;
            } else if row == event_row(id) {
                report.exact += 1;
            } else if report.differences.len() < 5 {
                report.differences.push(format!("event {id} scanned as {row:?}"));
            }
        }
    }
    report.scan_time = started.elapsed();
    let step = (count / gets.max(1)).max(1);
    for id in (0..count).step_by(step as usize).take(gets as usize) {
        let response = client
            .get(GetRequest {
                table: table.to_string(),
                columns: event_columns(),
                key: vec![Value {
                    kind: Some(Kind::Int(id as i64)),
                }],
                ..Default::default()
            })
            .await?;
        report.gets += 1;
        let rows = response.result.map(|r| r.rows).unwrap_or_default();
        if rows == [event_row(id as i64)] {
            report.gets_exact += 1;
        } else if report.differences.len() < 5 {
            report.differences.push(format!("get of event {id} returned {rows:?}"));
        }
    }
    Ok(report)
}

/// Creates (or recreates) keyspace `keyspace` with the sample `events` table for the ingest API.
/// `tags` is a frozen list: a non-frozen list appends its elements under new cell ids on every
/// write, so a replayed write (at-least-once delivery, the spool) would duplicate them.
pub async fn create_events_table(session: &Session, keyspace: &str) -> anyhow::Result<()> {
    let table = format!(
        "CREATE TABLE {keyspace}.events (id bigint PRIMARY KEY, name text, score double, at timestamp, \
         tags frozen<list<int>>)"
    );
    recreate_keyspace_with(session, keyspace, table).await
}

/// Columns of the sample events, in row order.
pub fn event_columns() -> Vec<String> {
    ["id", "name", "score", "at", "tags"]
        .iter()
        .map(|c| c.to_string())
        .collect()
}

/// The `at` of sample event `i`, epoch milliseconds.
pub fn event_at_ms(i: i64) -> i64 {
    PLACED_AT_BASE_MS + i
}

/// Sample event `i` as a typed row (about 100 bytes on the wire).
pub fn event_row(i: i64) -> crate::wire::proto::Row {
    use crate::wire::proto::value::Kind;
    use crate::wire::proto::{Row, Value, Values};
    let v = |kind| Value { kind: Some(kind) };
    Row {
        values: vec![
            v(Kind::Int(i)),
            v(Kind::Text(format!("event-{i:09}-{}", CITIES[(i % 8) as usize]))),
            v(Kind::Double(i as f64 * 0.5)),
            v(Kind::TimestampMs(event_at_ms(i))),
            v(Kind::List(Values {
                values: vec![v(Kind::Int(i % 7)), v(Kind::Int(i % 11))],
            })),
        ],
    }
}

/// Events `0..count` for `table` in batches of `batch_rows` rows.
pub fn event_batches(table: &str, count: i64, batch_rows: i64) -> Vec<crate::wire::proto::RowBatch> {
    (0..count)
        .step_by(batch_rows.max(1) as usize)
        .map(|start| crate::wire::proto::RowBatch {
            table: table.to_string(),
            columns: event_columns(),
            rows: (start..(start + batch_rows).min(count)).map(event_row).collect(),
            timestamp_us: 0,
        })
        .collect()
}

/// Reads every row of `keyspace.events` and compares it with events `0..count`.
pub async fn verify_events(session: &Session, keyspace: &str, count: u64) -> anyhow::Result<Verification> {
    let mut rows = session
        .query_iter(format!("SELECT id, name, score, at, tags FROM {keyspace}.events"), &[])
        .await?
        .rows_stream::<(i64, Option<String>, Option<f64>, Option<CqlTimestamp>, Option<Vec<i32>>)>()?;
    let mut report = Verification::default();
    let mut seen = vec![false; count as usize];
    while let Some(row) = rows.try_next().await? {
        report.rows += 1;
        let id = row.0;
        if !(0..count as i64).contains(&id) {
            note(&mut report, format!("unexpected row {id}"));
            continue;
        }
        seen[id as usize] = true;
        let expected = (
            id,
            Some(format!("event-{id:09}-{}", CITIES[(id % 8) as usize])),
            Some(id as f64 * 0.5),
            Some(CqlTimestamp(PLACED_AT_BASE_MS + id)),
            Some(vec![(id % 7) as i32, (id % 11) as i32]),
        );
        if row == expected {
            report.matching += 1;
        } else {
            note(&mut report, format!("{id}: got {row:?}, expected {expected:?}"));
        }
    }
    report.missing = seen.iter().filter(|s| !**s).count() as u64;
    Ok(report)
}

/// Reads `keyspace.orders5` back and compares every row with [`expected_order5`].
pub async fn verify_orders5(session: &Session, keyspace: &str, count: u64) -> anyhow::Result<Verification> {
    type Row = (
        String,
        Option<i64>,
        Option<CqlDecimal>,
        Option<i32>,
        Option<CqlTimestamp>,
    );
    let mut rows = session
        .query_iter(
            format!("SELECT order_id, customer_id, amount, quantity, placed_at FROM {keyspace}.orders5"),
            &[],
        )
        .await?
        .rows_stream::<Row>()?;
    let mut report = Verification::default();
    let mut seen = vec![false; count as usize];
    while let Some(row) = rows.try_next().await? {
        report.rows += 1;
        let index = row.0.strip_prefix("order-").and_then(|n| n.parse::<u64>().ok());
        let Some(i) = index.filter(|i| *i < count) else {
            note(&mut report, format!("unexpected row {}", row.0));
            continue;
        };
        seen[i as usize] = true;
        let amount = row.2.as_ref().map(|d| {
            let (digits, scale) = d.as_signed_be_bytes_slice_and_exponent();
            (BigInt::from_signed_bytes_be(digits), scale)
        });
        let got = (row.0.clone(), row.1, amount, row.3, row.4.map(|t| t.0));
        let (order_id, customer_id, cents, quantity, placed_at_ms) = expected_order5(i);
        let expected = (
            order_id,
            Some(customer_id),
            Some((BigInt::from(cents), 2)),
            Some(quantity),
            Some(placed_at_ms),
        );
        if got == expected {
            report.matching += 1;
        } else {
            note(&mut report, format!("{i}: got {got:?}, expected {expected:?}"));
        }
    }
    report.missing = seen.iter().filter(|s| !**s).count() as u64;
    Ok(report)
}

/// How many of sample orders `0..count` each of `cores` cores owns (token of the order id →
/// ring snapshot → owner core), as the gateway computes it.
pub fn orders_per_owner_core(session: &Session, keyspace: &str, count: u64, cores: usize) -> anyhow::Result<Vec<u64>> {
    let state = session.get_cluster_state();
    let ownership = crate::topology::Ownership::from_cluster_state(&state, cores);
    let mut per_core = vec![0u64; cores];
    for i in 0..count {
        let token = state
            .compute_token(keyspace, "orders", &(expected_order(i).order_id,))
            .context("token of an order id")?;
        per_core[ownership.owner_core(token.value())] += 1;
    }
    Ok(per_core)
}

/// Waits until `keyspace.table` holds at least `count` rows (counted by reading `key_column`
/// of type `K`).
pub async fn wait_for_rows<K>(
    session: &Session,
    keyspace: &str,
    table: &str,
    key_column: &str,
    count: u64,
    deadline: Duration,
) -> anyhow::Result<()>
where
    K: for<'frame, 'metadata> scylla::deserialize::value::DeserializeValue<'frame, 'metadata>,
{
    let started = std::time::Instant::now();
    loop {
        let rows = count_rows::<K>(session, keyspace, table, key_column).await?;
        if rows >= count {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < deadline,
            "only {rows} of {count} rows of {keyspace}.{table} arrived within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `keyspace.orders` holds at least `count` rows; fails after `deadline`.
pub async fn wait_for_orders(session: &Session, keyspace: &str, count: u64, deadline: Duration) -> anyhow::Result<()> {
    wait_for_rows::<String>(session, keyspace, "orders", "order_id", count, deadline).await
}

/// Sum of a Prometheus counter over all its label sets, scraped from `addr`'s `/metrics`.
pub fn scrape_metric(addr: &str, name: &str) -> anyhow::Result<f64> {
    scrape_metric_where(addr, name, &[])
}

/// The sum of metric `name`'s samples whose labels include every `(label, value)` of `labels`.
pub fn scrape_metric_where(addr: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    Ok(scrape_samples(addr, name, labels)?.into_iter().sum())
}

/// Every sample of metric `name` whose labels include every `(label, value)` of `labels`.
pub fn scrape_samples(addr: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<Vec<f64>> {
    let (_, body) = http_get(addr, "/metrics").with_context(|| format!("cannot reach metrics at {addr}"))?;
    Ok(body
        .lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| {
            labels
                .iter()
                .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .collect())
}

/// The local stack's Prometheus (Debian's package), scraping [`ADMIN_LISTEN`] every second.
pub const PROMETHEUS: &str = "127.0.0.1:9090";

/// `GET path` (with its query string) from `addr` over HTTP/1.0 (so the answer is neither
/// chunked nor kept alive); the status code and the body.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).with_context(|| format!("cannot reach {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer without a head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("an HTTP answer without a status")?;
    Ok((status, body.to_string()))
}

/// `text` percent-encoded for a URL's query string (RFC 3986 unreserved characters kept).
pub fn url_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => encoded.push(byte as char),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

/// Evaluates PromQL `expr` now through [`PROMETHEUS`]'s HTTP API; the result's series (`data.result`).
pub fn prometheus_query(expr: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let (status, body) = http_get(PROMETHEUS, &format!("/api/v1/query?query={}", url_encode(expr)))?;
    let answer: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("Prometheus answered {status}: {body}"))?;
    if answer["status"] != "success" {
        anyhow::bail!("Prometheus refused `{expr}` ({status}): {}", answer["error"]);
    }
    Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// Resident set size of process `pid` in bytes, from /proc.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .context("VmRSS missing")?;
    Ok(kib * 1024)
}

/// The local NATS server.
pub const NATS: &str = "nats://127.0.0.1:4222";

/// Sample order `i` as a JSON message that carries its id as field `order_id` (NATS messages
/// have no key).
pub fn order_message_with_id(i: u64) -> Vec<u8> {
    let (id, payload) = order_message(i);
    format!("{{\"order_id\":\"{id}\",{}", &payload[1..]).into_bytes()
}

/// A JetStream route for the sample orders: stream `stream` (created by the gateway on
/// `subject` if missing), durable `durable`, dead letters to NATS subject `dead_letter_subject`.
pub fn jetstream_orders_route_toml(
    name: &str,
    keyspace: &str,
    stream: &str,
    subject: &str,
    durable: &str,
    dead_letter_subject: &str,
) -> String {
    let source = format!(
        r#"kind = "jetstream"
url = "{NATS}"
stream = "{stream}"
subjects = ["{subject}"]
durable = "{durable}"
ack_wait_ms = 3000"#
    );
    let dead_letter = format!(
        r#"kind = "nats"
subject = "{dead_letter_subject}""#
    );
    orders_route(name, keyspace, &source, "order_id", &dead_letter)
}

/// Creates (or replaces) JetStream stream `name` capturing `subjects`.
pub async fn create_stream(name: &str, subjects: &[&str]) -> anyhow::Result<()> {
    create_stream_on(async_nats::connect(NATS).await?, name, subjects).await
}

/// [`create_stream`] through `client` (e.g. a secured server's).
pub async fn create_stream_on(client: async_nats::Client, name: &str, subjects: &[&str]) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream(name).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot create stream `{name}`: {e}"))?;
    Ok(())
}

/// Publishes `payloads` to `subject` through JetStream, each acknowledged by the server.
pub async fn publish_jetstream(subject: &str, payloads: impl IntoIterator<Item = Vec<u8>>) -> anyhow::Result<u64> {
    publish_jetstream_on(async_nats::connect(NATS).await?, subject, payloads).await
}

/// [`publish_jetstream`] through `client` (e.g. a secured server's).
pub async fn publish_jetstream_on(
    client: async_nats::Client,
    subject: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
) -> anyhow::Result<u64> {
    let js = async_nats::jetstream::new(client);
    let mut pending = Vec::new();
    let mut sent = 0;
    for payload in payloads {
        pending.push(
            js.publish(subject.to_string(), payload.into())
                .await
                .map_err(|e| anyhow::anyhow!("publish: {e}"))?,
        );
        sent += 1;
        if pending.len() >= 1000 {
            for ack in pending.drain(..) {
                ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
            }
        }
    }
    for ack in pending {
        ack.await.map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
    }
    Ok(sent)
}

/// A durable consumer's (messages not yet delivered, delivered but not acked), or `None` while
/// the consumer does not exist.
pub async fn jetstream_backlog(stream: &str, durable: &str) -> anyhow::Result<Option<(u64, usize)>> {
    jetstream_backlog_on(async_nats::connect(NATS).await?, stream, durable).await
}

/// [`jetstream_backlog`] through `client` (e.g. a secured server's).
pub async fn jetstream_backlog_on(
    client: async_nats::Client,
    stream: &str,
    durable: &str,
) -> anyhow::Result<Option<(u64, usize)>> {
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("stream `{stream}`: {e}"))?;
    let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> = stream.get_consumer(durable).await;
    match consumer {
        Ok(mut consumer) => {
            let info = consumer
                .info()
                .await
                .map_err(|e| anyhow::anyhow!("consumer info: {e}"))?;
            Ok(Some((info.num_pending, info.num_ack_pending)))
        }
        Err(_) => Ok(None),
    }
}

/// The broker's own ceiling for a JetStream consumer: a durable pull consumer `durable` on
/// `stream` configured as the gateway's (explicit acks, `max_ack_pending`), reading `count`
/// messages and acknowledging each, doing nothing else. Returns the time from the first
/// message to the last acknowledgement sent (acks are flushed before it ends).
pub async fn drain_jetstream(
    stream: &str,
    durable: &str,
    count: u64,
    max_ack_pending: i64,
) -> anyhow::Result<Duration> {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    use futures::StreamExt;
    let client = async_nats::connect(NATS).await?;
    let js = async_nats::jetstream::new(client.clone());
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("stream `{stream}`: {e}"))?;
    let consumer = stream
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.to_string()),
                ack_policy: AckPolicy::Explicit,
                max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("consumer `{durable}`: {e}"))?;
    let mut messages = consumer.messages().await.map_err(|e| anyhow::anyhow!("consume: {e}"))?;
    let mut first = None;
    let mut read = 0;
    while read < count {
        let message = messages
            .next()
            .await
            .context("the consumer ended")?
            .map_err(|e| anyhow::anyhow!("message: {e}"))?;
        first.get_or_insert_with(Instant::now);
        message.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        read += 1;
    }
    client.flush().await?;
    Ok(first.map_or(Duration::ZERO, |t| t.elapsed()))
}

/// The broker's own ceiling for a RabbitMQ consumer: `count` deliveries from queue `queue`
/// with prefetch `prefetch`, acknowledged with one `multiple` ack per half prefetch, doing
/// nothing else. Returns the time from the first delivery to the last acknowledgement.
pub async fn drain_rabbitmq(queue: &str, count: u64, prefetch: u16) -> anyhow::Result<Duration> {
    use futures::StreamExt;
    let (connection, channel) = amqp_channel().await?;
    channel.basic_qos(prefetch, Default::default()).await?;
    let mut consumer = channel
        .basic_consume(queue, "shardgate-bench-drain", Default::default(), Default::default())
        .await?;
    let ack_every = u64::from(prefetch / 2).max(1);
    let mut first = None;
    let mut read = 0;
    while read < count {
        let delivery = consumer.next().await.context("the consumer was cancelled")??;
        first.get_or_insert_with(Instant::now);
        read += 1;
        if read % ack_every == 0 || read == count {
            channel
                .basic_ack(
                    delivery.delivery_tag,
                    lapin::options::BasicAckOptions { multiple: true },
                )
                .await?;
        }
    }
    let seconds = first.map_or(Duration::ZERO, |t| t.elapsed());
    let _ = connection.close(200, "done").await;
    Ok(seconds)
}

/// The broker's own ceiling for a Kafka consumer: `count` messages of `topic` read by a
/// consumer in group `group` configured as the gateway's source is (automatic commits of
/// explicitly stored offsets, from the earliest offset), each message's key and payload copied
/// out of librdkafka's buffer (as the gateway's poll thread copies them) and its offset stored,
/// doing nothing else. Blocking: run it on a blocking thread. Returns the time from the first
/// message to the last, after a final synchronous commit.
pub fn drain_kafka(topic: &str, group: &str, count: u64) -> anyhow::Result<Duration> {
    use rdkafka::consumer::CommitMode;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut copied = Vec::with_capacity(1 << 20);
    let mut first = None;
    let mut read = 0;
    while read < count {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{read} of {count} messages read from `{topic}`"
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        first.get_or_insert_with(Instant::now);
        if copied.len() > (1 << 20) {
            copied.clear();
        }
        copied.extend_from_slice(message.key().unwrap_or_default());
        copied.extend_from_slice(message.payload().unwrap_or_default());
        consumer.store_offset_from_message(&message)?;
        read += 1;
    }
    consumer.commit_consumer_state(CommitMode::Sync)?;
    Ok(first.map_or(Duration::ZERO, |t| t.elapsed()))
}

/// A dead letter read back from a JetStream stream or a RabbitMQ queue: headers and payload.
#[derive(Debug, Clone)]
pub struct BrokerDeadLetter {
    /// Header name → value.
    pub headers: BTreeMap<String, String>,
    /// The AMQP `message_id` property (RabbitMQ), if set.
    pub message_id: Option<String>,
    /// Original payload.
    pub payload: Vec<u8>,
}

/// Reads every message of JetStream stream `stream` (expects `expected`, waits up to
/// `deadline`).
pub async fn read_stream(stream: &str, expected: usize, deadline: Duration) -> anyhow::Result<Vec<BrokerDeadLetter>> {
    read_stream_on(async_nats::connect(NATS).await?, stream, expected, deadline).await
}

/// [`read_stream`] through `client` (e.g. a secured server's).
pub async fn read_stream_on(
    client: async_nats::Client,
    stream: &str,
    expected: usize,
    deadline: Duration,
) -> anyhow::Result<Vec<BrokerDeadLetter>> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("stream `{stream}`: {e}"))?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .map_err(|e| anyhow::anyhow!("ordered consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("messages: {e}"))?;
    let mut letters = Vec::new();
    let started = std::time::Instant::now();
    while letters.len() < expected && started.elapsed() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
            Ok(Some(Ok(message))) => letters.push(BrokerDeadLetter {
                headers: message
                    .headers
                    .iter()
                    .flat_map(|h| h.iter())
                    .filter_map(|(k, v)| Some((k.to_string(), v.first()?.to_string())))
                    .collect(),
                message_id: None,
                payload: message.payload.to_vec(),
            }),
            Ok(Some(Err(e))) => anyhow::bail!("reading stream: {e}"),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    Ok(letters)
}

/// The local RabbitMQ broker.
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

async fn amqp_channel() -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let connection = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// Deletes and re-declares durable queue `queue`.
pub async fn recreate_queue(queue: &str) -> anyhow::Result<()> {
    let (connection, channel) = amqp_channel().await?;
    let _ = channel.queue_delete(queue, Default::default()).await;
    channel
        .queue_declare(
            queue,
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    let _ = connection.close(200, "done").await;
    Ok(())
}

/// Publishes `payloads` to queue `queue` (default exchange, persistent), each confirmed.
pub async fn publish_rabbitmq(queue: &str, payloads: impl IntoIterator<Item = Vec<u8>>) -> anyhow::Result<u64> {
    let (connection, channel) = amqp_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let mut sent = 0;
    let mut pending = Vec::new();
    for payload in payloads {
        let properties = lapin::BasicProperties::default().with_delivery_mode(2);
        pending.push(
            channel
                .basic_publish("", queue, Default::default(), &payload, properties)
                .await?,
        );
        sent += 1;
        if pending.len() >= 1000 {
            for confirm in pending.drain(..) {
                anyhow::ensure!(confirm.await?.is_ack(), "broker nacked a message");
            }
        }
    }
    for confirm in pending {
        anyhow::ensure!(confirm.await?.is_ack(), "broker nacked a message");
    }
    let _ = connection.close(200, "done").await;
    Ok(sent)
}

/// Messages ready in queue `queue` (not counting delivered-but-unacked ones).
pub async fn queue_depth(queue: &str) -> anyhow::Result<u32> {
    let (connection, channel) = amqp_channel().await?;
    let declared = channel
        .queue_declare(
            queue,
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    let _ = connection.close(200, "done").await;
    Ok(declared.message_count())
}

/// Takes (and acks) up to `expected` messages from queue `queue`, waiting up to `deadline`.
pub async fn read_queue(queue: &str, expected: usize, deadline: Duration) -> anyhow::Result<Vec<BrokerDeadLetter>> {
    let (connection, channel) = amqp_channel().await?;
    let mut letters = Vec::new();
    let started = std::time::Instant::now();
    while letters.len() < expected && started.elapsed() < deadline {
        match channel.basic_get(queue, Default::default()).await? {
            Some(message) => {
                let delivery = message.delivery;
                let headers = crate::bridge::amqp::text_headers(&delivery.properties)
                    .into_iter()
                    .collect();
                delivery.acker.ack(Default::default()).await?;
                letters.push(BrokerDeadLetter {
                    headers,
                    message_id: delivery.properties.message_id().as_ref().map(|id| id.to_string()),
                    payload: delivery.data,
                });
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _ = connection.close(200, "done").await;
    Ok(letters)
}

/// A RabbitMQ route for the sample orders from queue `queue`, dead letters to queue
/// `dead_letter_queue` through the default exchange.
pub fn rabbitmq_orders_route_toml(name: &str, keyspace: &str, queue: &str, dead_letter_queue: &str) -> String {
    let source = format!(
        r#"kind = "rabbitmq"
url = "{AMQP}"
queue = "{queue}"
prefetch = 512"#
    );
    let dead_letter = format!(
        r#"kind = "rabbitmq"
routing_key = "{dead_letter_queue}""#
    );
    orders_route(name, keyspace, &source, "order_id", &dead_letter)
}

/// Endpoint the ZeroMQ test routes bind their PULL socket to.
pub const ZMQ_ENDPOINT: &str = "tcp://127.0.0.1:5557";

/// A ZeroMQ route for the sample orders: PULL bound on [`ZMQ_ENDPOINT`], two-frame messages
/// (order id, JSON), dead letters to NATS subject `dead_letter_subject`.
pub fn zeromq_orders_route_toml(name: &str, keyspace: &str, dead_letter_subject: &str) -> String {
    let source = format!(
        r#"kind = "zeromq"
socket = "pull"
endpoint = "{ZMQ_ENDPOINT}"
bind = true"#
    );
    let dead_letter = format!(
        r#"kind = "nats"
url = "{NATS}"
subject = "{dead_letter_subject}""#
    );
    orders_route(name, keyspace, &source, "$key", &dead_letter)
}

/// Sends (key, payload) messages as two-frame ZeroMQ messages from a PUSH socket connected to
/// `endpoint` (blocks until a PULL peer is there); returns after the socket's buffer drained.
pub fn push_zeromq(endpoint: &str, messages: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> anyhow::Result<u64> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::PUSH)?;
    socket.set_linger(30_000)?;
    socket.set_sndhwm(100_000)?;
    socket.connect(endpoint)?;
    let mut sent = 0;
    for (key, payload) in messages {
        socket.send_multipart([key, payload], 0)?;
        sent += 1;
    }
    drop(socket);
    Ok(sent)
}

/// A CURVE client of a CURVE ZeroMQ route: a PUSH socket connected to `endpoint` that knows the
/// gateway's public key `server_public` and presents `client` (binary keys, 32 bytes each).
/// Linger is 0: what the gateway refuses is dropped with the socket.
pub fn curve_pusher(
    endpoint: &str,
    server_public: &[u8; 32],
    client: &zmq::CurveKeyPair,
) -> anyhow::Result<zmq::Socket> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::PUSH)?;
    socket.set_linger(0)?;
    socket.set_sndhwm(100_000)?;
    socket.set_curve_serverkey(server_public)?;
    socket.set_curve_publickey(&client.public_key)?;
    socket.set_curve_secretkey(&client.secret_key)?;
    socket.connect(endpoint)?;
    Ok(socket)
}

/// A core NATS route for the sample orders on `subject` in queue group `queue_group`, dead
/// letters to NATS subject `dead_letter_subject`.
pub fn nats_orders_route_toml(
    name: &str,
    keyspace: &str,
    subject: &str,
    queue_group: &str,
    dead_letter_subject: &str,
) -> String {
    let source = format!(
        r#"kind = "nats"
url = "{NATS}"
subject = "{subject}"
queue_group = "{queue_group}""#
    );
    let dead_letter = format!(
        r#"kind = "nats"
subject = "{dead_letter_subject}""#
    );
    orders_route(name, keyspace, &source, "order_id", &dead_letter)
}

/// Publishes `payloads` on core NATS subject `subject` and flushes.
pub async fn publish_nats(subject: &str, payloads: impl IntoIterator<Item = Vec<u8>>) -> anyhow::Result<u64> {
    let client = async_nats::connect(NATS).await?;
    let mut sent = 0;
    for payload in payloads {
        client.publish(subject.to_string(), payload.into()).await?;
        sent += 1;
    }
    client.flush().await?;
    Ok(sent)
}

/// Publishes `payloads` on core NATS subject `subject` at `per_second` (in bursts every
/// 10 ms, flushed), and flushes at the end.
pub async fn publish_nats_at(
    subject: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
    per_second: u64,
) -> anyhow::Result<u64> {
    let client = async_nats::connect(NATS).await?;
    let per_tick = (per_second / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0;
    for payload in payloads {
        if sent % per_tick == 0 {
            client.flush().await?;
            tick.tick().await;
        }
        client.publish(subject.to_string(), payload.into()).await?;
        sent += 1;
    }
    client.flush().await?;
    Ok(sent)
}

/// Produces (key, payload) messages to partition `partition` of `topic`, all with Kafka
/// timestamp `timestamp_ms`; returns once the broker acknowledged them.
pub fn produce_at_time(
    topic: &str,
    partition: i32,
    timestamp_ms: i64,
    messages: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> anyhow::Result<u64> {
    let producer: BaseProducer<DeliveryFailures> = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create_with_context(DeliveryFailures::default())?;
    let mut sent = 0;
    for (key, payload) in messages {
        let record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic)
            .partition(partition)
            .timestamp(timestamp_ms)
            .key(key.as_str())
            .payload(&payload);
        producer.send(record).map_err(|(e, _)| e)?;
        sent += 1;
    }
    flush_all(&producer)?;
    Ok(sent)
}

/// One Kafka record for [`produce_records`].
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Key (`None`: no key).
    pub key: Option<String>,
    /// Payload (`None`: a tombstone).
    pub payload: Option<Vec<u8>>,
    /// Text headers.
    pub headers: Vec<(String, String)>,
}

/// Produces records with headers and tombstones to partition 0 of `topic`, in order (idempotent
/// producer), and returns once the broker acknowledged all of them.
pub fn produce_records(topic: &str, records: impl IntoIterator<Item = Record>) -> anyhow::Result<u64> {
    use rdkafka::message::{Header, OwnedHeaders};
    let producer: BaseProducer<DeliveryFailures> = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(DeliveryFailures::default())?;
    let mut sent = 0;
    for record in records {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut message: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).partition(0).headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key.as_str());
        }
        if let Some(payload) = &record.payload {
            message = message.payload(payload.as_slice());
        }
        send_waiting(&producer, message)?;
        sent += 1;
    }
    flush_all(&producer)?;
    Ok(sent)
}

/// Sample FlatBuffers order event `i` (`schemas/order_event.fbs`), built field by field:
/// `order_id` `fb-<i>`, `quantity` `i % 10` (0 is FlatBuffers' default and is not stored),
/// `amount` `i + 0.5`, `express` every third, `channel` `i % 3`, `address.city` from the sample
/// cities, `line_quantities` `[1, i % 4]`.
pub fn order_event_flatbuffer(i: u64) -> Vec<u8> {
    let mut builder = flatbuffers::FlatBufferBuilder::new();
    let order_id = builder.create_string(&format!("fb-{i:05}"));
    let city = builder.create_string(CITIES[(i % CITIES.len() as u64) as usize]);
    let address_start = builder.start_table();
    builder.push_slot_always(4, city);
    let address = builder.end_table(address_start);
    let lines = builder.create_vector(&[1_i32, (i % 4) as i32]);
    let start = builder.start_table();
    builder.push_slot_always(4, order_id);
    builder.push_slot::<i32>(6, (i % 10) as i32, 0);
    builder.push_slot::<f64>(8, i as f64 + 0.5, 0.0);
    builder.push_slot::<bool>(10, i.is_multiple_of(3), false);
    builder.push_slot::<i8>(12, (i % 3) as i8, 0);
    builder.push_slot_always(14, address);
    builder.push_slot_always(16, lines);
    let root = builder.end_table(start);
    builder.finish(root, None);
    builder.finished_data().to_vec()
}

/// CPU seconds (user + system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

/// The state directory of `deploy/local/stack.sh`: `$SHARDGATE_STATE` or `.state` in the
/// repository (service data, pids, and tools it installs such as `bin/grpcurl`).
pub fn state_dir() -> std::path::PathBuf {
    std::env::var_os("SHARDGATE_STATE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".state"))
}

/// The pid of the Cassandra `deploy/local/stack.sh up` started (from its state dir).
pub fn cassandra_pid() -> anyhow::Result<i32> {
    let pidfile = state_dir().join("cassandra/pid");
    std::fs::read_to_string(&pidfile)
        .with_context(|| format!("reading {}", pidfile.display()))?
        .trim()
        .parse()
        .context("cassandra pid")
}

/// The CPU the local services used over a span of a run: read at [`ServicesCpu::start`], the
/// difference at [`ServicesCpu::seconds`]. On this box they share the cores with the gateway,
/// so rows/s is bounded by the gateway's, the database's and the broker's CPU per row together.
pub struct ServicesCpu {
    cassandra: u32,
    before: SpanCpu,
}

/// CPU seconds of the local services over a span.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpanCpu {
    /// The Cassandra `stack.sh` started (the database the gateway writes to).
    pub cassandra: f64,
    /// Kafka, NATS and RabbitMQ together, each with the processes it started (RabbitMQ's
    /// `beam.smp` runs under its start script).
    pub brokers: f64,
}

/// The brokers `stack.sh up` starts, by their state directory's name.
const BROKERS: [&str; 3] = ["kafka", "nats", "rabbitmq"];

impl ServicesCpu {
    /// Starts the span now.
    pub fn start() -> anyhow::Result<ServicesCpu> {
        let cassandra = u32::try_from(cassandra_pid()?).context("cassandra pid")?;
        let before = SpanCpu {
            cassandra: process_cpu_seconds(cassandra)?,
            brokers: brokers_cpu_seconds(),
        };
        Ok(ServicesCpu { cassandra, before })
    }

    /// The services' CPU seconds since the start of the span.
    pub fn seconds(&self) -> anyhow::Result<SpanCpu> {
        Ok(SpanCpu {
            cassandra: process_cpu_seconds(self.cassandra)? - self.before.cassandra,
            brokers: brokers_cpu_seconds() - self.before.brokers,
        })
    }
}

/// CPU seconds of every running broker's process tree so far (a broker that is not running
/// counts nothing).
fn brokers_cpu_seconds() -> f64 {
    let roots: Vec<u32> = BROKERS
        .iter()
        .filter_map(|name| std::fs::read_to_string(state_dir().join(name).join("pid")).ok())
        .filter_map(|pid| pid.trim().parse().ok())
        .collect();
    process_trees(&roots)
        .into_iter()
        .filter_map(|pid| process_cpu_seconds(pid).ok())
        .sum()
}

/// `roots` and every process descended from them.
fn process_trees(roots: &[u32]) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after_name = stat.rsplit_once(')')?.1;
            Some((pid, after_name.split_whitespace().nth(1)?.parse().ok()?))
        })
        .collect();
    let mut tree: Vec<u32> = roots.to_vec();
    let mut at = 0;
    while at < tree.len() {
        let parent = tree[at];
        tree.extend(parents.iter().filter(|(_, p)| *p == parent).map(|(pid, _)| *pid));
        at += 1;
    }
    tree
}

/// The local Cassandra frozen with SIGSTOP — unreachable as a hung node is: connections stay
/// open, requests time out — until [`CassandraPause::resume`] or drop sends SIGCONT.
pub struct CassandraPause {
    pid: i32,
    resumed: bool,
}

impl CassandraPause {
    /// Freezes the Cassandra that `deploy/local/stack.sh up` started (pid from its state dir,
    /// `$SHARDGATE_STATE` or `.state` in the repository).
    pub fn start() -> anyhow::Result<CassandraPause> {
        let pid = cassandra_pid()?;
        signal(pid, "STOP")?;
        Ok(CassandraPause { pid, resumed: false })
    }

    /// Sends SIGCONT.
    pub fn resume(mut self) -> anyhow::Result<()> {
        self.resumed = true;
        signal(self.pid, "CONT")
    }
}

impl Drop for CassandraPause {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = signal(self.pid, "CONT");
        }
    }
}

fn signal(pid: i32, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// Runs `deploy/local/stack.sh` with `args`.
fn stack(args: &[&str]) -> anyhow::Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local/stack.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {args:?}", script.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "stack.sh {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Stops one local service (`cassandra`, `kafka`, `nats`, `rabbitmq`).
pub fn stop_service(service: &str) -> anyhow::Result<()> {
    stack(&["stop", service])
}

/// Starts every local service that is not running and waits until all are ready.
pub fn start_services() -> anyhow::Result<()> {
    stack(&["up"])
}

/// Stops the given local services and starts them again, waiting until they are ready.
pub fn restart_services(services: &[&str]) -> anyhow::Result<()> {
    for service in services {
        stop_service(service)?;
    }
    start_services()
}
