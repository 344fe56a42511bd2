//! Processing jobs (`[[job]]`, `shardgate job run`): a table scanned through the gateway's
//! shard-aligned splits, each split at its owner core's port; rows kept by a CEL filter; either
//! written as read to the sinks, or folded into aggregate groups ([`aggregate`]) whose results
//! are written once every split is done. Table sinks are written through the gateway's ingest
//! API, so results take the one write engine's owner-core routing; broker sinks (Kafka, NATS or
//! JetStream, RabbitMQ) get each result as a JSON message under a stable message id.
//!
//! **Progress and sharing** live in two tables of the job's `state_keyspace`: `job_runs` (one
//! row per job: the current run, its start time, its split plan, its state) and `job_splits`
//! (per split: owner, lease, done, the split's partial aggregate and counts). A split is
//! claimed with a lightweight transaction on its lease, renewed while it runs, and marked done
//! only by the gateway still holding it; a split of a gateway that died is taken over when its
//! lease runs out. Every gateway running the same job shares its splits this way; whichever
//! finds every split done merges the partials and writes the results.
//!
//! **Never double-counted**: a split's rows count once, in the partial its holder stored with
//! `done`. With each lease renewal the holder stores the token resuming the split after its last
//! folded page together with the partial up to there, in one row; a split whose holder died is
//! read on by the next holder after that page (from its start if none was stored), starting
//! from that stored partial. Every result and copied row is written with the run's
//! start time as its write timestamp, so writing it again (a rerun of the last step, a split
//! processed twice) leaves identical cells.

pub mod aggregate;
pub mod control;
pub mod replay;
pub mod signal;
pub mod split;
pub mod stream;
pub mod tap;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message;
use scylla::client::session::Session;

use crate::client::{GatewayAddr, ShardAwareClient};
use crate::config::{AggregateConfig, ClusterConfig, JobConfig, JobSinkConfig};
use crate::export::{json_object, json_of};
use crate::mapping::expr::{Bound, Expr};
use crate::mapping::ReasonCode;
use crate::sink::dead_letter::{headers, DeadLetter, DeadLetterSink};
use crate::telemetry::metric;
use crate::wire::proto::value::Kind;
use crate::wire::proto::{PlanScanRequest, PlanScanResponse, QueryOptions, Row, RowBatch, ScanRequest, Split};
use aggregate::Partial;
use signal::{next_command, Command, Interrupted, Signal};

/// Rows per page a job's scan asks for.
const PAGE_ROWS: u32 = 2_000;
/// Rows per batch written to a sink.
const WRITE_ROWS: usize = 500;
/// Longest group key kept as is in a result's message id (longer ones are hashed).
const RESULT_KEY_BYTES_MAX: usize = 128;
/// Reasons kept for the report.
const REASONS_MAX: usize = 5;

/// What a job run did.
#[derive(Debug, Default, Clone)]
pub struct JobReport {
    /// The run (its start, epoch microseconds; also the write timestamp of what it wrote).
    pub run: i64,
    /// Splits of the run.
    pub splits: usize,
    /// Splits this process finished.
    pub splits_here: usize,
    /// Rows read by this process.
    pub rows_in: u64,
    /// Rows the filter kept.
    pub rows_kept: u64,
    /// Rows an expression failed on (skipped, counted, first reasons in `reasons`).
    pub rows_failed: u64,
    /// Rows written to the sinks by this process (results, or copied rows).
    pub rows_out: u64,
    /// First failure reasons.
    pub reasons: Vec<String>,
    /// Wall time.
    pub seconds: f64,
}

impl std::fmt::Display for JobReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {}: {} of {} splits here, {} rows read, {} kept, {} failed, {} written in {:.1} s",
            self.run,
            self.splits_here,
            self.splits,
            self.rows_in,
            self.rows_kept,
            self.rows_failed,
            self.rows_out,
            self.seconds
        )?;
        for reason in &self.reasons {
            write!(f, "\n  - {reason}")?;
        }
        Ok(())
    }
}

/// The compiled expressions of a job.
struct Compiled {
    filter: Option<Expr>,
    measures: Vec<Input>,
    aggregate: Option<AggregateConfig>,
}

/// What became of a row the filter and the measures saw.
enum Fold {
    /// The filter skipped it.
    Skipped,
    /// Kept by a job without `aggregate`: the row to write as read.
    Copied(Row),
    /// Folded into the partial; its event time when windowed.
    Folded(Option<i64>),
}

/// What a measure folds per row.
enum Input {
    /// Nothing (`count()`).
    Rows,
    /// A column's value as is: `row.<column>`, read without building a CEL context.
    Column(String),
    /// A CEL expression over `row`.
    Cel(Expr),
}

impl Input {
    fn new(source: Option<&str>) -> anyhow::Result<Input> {
        let Some(source) = source else {
            return Ok(Input::Rows);
        };
        let bare = source.trim().strip_prefix("row.").filter(|name| {
            let mut chars = name.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        Ok(match bare {
            Some(column) => Input::Column(column.to_string()),
            None => Input::Cel(Expr::compile(source).map_err(|e| anyhow::anyhow!("{source}: {e}"))?),
        })
    }
}

impl Compiled {
    fn new(job: &JobConfig) -> anyhow::Result<Compiled> {
        let compile = |source: &str| Expr::compile(source).map_err(|e| anyhow::anyhow!("{source}: {e}"));
        Ok(Compiled {
            filter: job.filter.as_deref().map(compile).transpose()?,
            measures: job
                .aggregate
                .iter()
                .flat_map(|a| &a.measures)
                .map(|m| Input::new(m.expr.as_deref()))
                .collect::<anyhow::Result<_>>()?,
            aggregate: job.aggregate.clone(),
        })
    }

    /// Whether a row must become a CEL object (a filter or a measure needs one).
    fn needs_cel(&self) -> bool {
        self.filter.is_some() || self.measures.iter().any(|m| matches!(m, Input::Cel(_)))
    }

    /// One row through the filter and into the partial. Windows ending at or before
    /// `closed_through` are closed (a stream job's, already written): the row is not folded
    /// into them, and is `late` when they are all it belongs to.
    fn fold_row(
        &self,
        names: &[String],
        positions: &Positions,
        row: &Row,
        partial: &mut Partial,
        closed_through: i64,
    ) -> Result<Fold, Failure> {
        let bad_value = |reason: String| (ReasonCode::BadValue, reason);
        let failed = |reason: String| (ReasonCode::ExpressionFailed, reason);
        let object = self
            .needs_cel()
            .then(|| serde_json::Value::Object(json_object(names, row)));
        let bound = object.as_ref().map(Bound::row);
        if let (Some(filter), Some(bound)) = (&self.filter, &bound) {
            if !filter
                .is_true(bound)
                .map_err(|e| failed(format!("filter `{}`: {e}", filter.source())))?
            {
                return Ok(Fold::Skipped);
            }
        }
        let Some(aggregate) = &self.aggregate else {
            return Ok(Fold::Copied(row.clone()));
        };
        // A column the rows lack (or a short row) reads as missing.
        let value = |at: Option<usize>| at.and_then(|at| row.values.get(at));
        let mut group = Vec::with_capacity(aggregate.group_by.len());
        for (name, at) in aggregate.group_by.iter().zip(&positions.group_by) {
            let found = value(*at).ok_or_else(|| bad_value(format!("no column `{name}` in the rows read")))?;
            group.push(found.clone());
        }
        let time_ms = match &aggregate.window {
            None => None,
            Some(window) => {
                let found = value(positions.window)
                    .ok_or_else(|| bad_value(format!("no column `{}` in the rows read", window.column)))?;
                match &found.kind {
                    Some(Kind::TimestampMs(ms)) => Some(*ms),
                    Some(Kind::Null(_)) | None => None,
                    Some(other) => {
                        return Err(bad_value(format!(
                            "window column `{}` is not a timestamp: {other:?}",
                            window.column
                        )))
                    }
                }
            }
        };
        let mut values = Vec::with_capacity(self.measures.len());
        for ((input, measure), at) in self.measures.iter().zip(&aggregate.measures).zip(&positions.measures) {
            values.push(match (input, &bound) {
                (Input::Rows, _) => None,
                (Input::Column(name), _) => {
                    let found = value(*at).ok_or_else(|| {
                        failed(format!(
                            "measure `{}` = `row.{name}`: no column `{name}` in the rows read",
                            measure.name
                        ))
                    })?;
                    Some(json_of(found))
                }
                (Input::Cel(expr), Some(bound)) => Some(
                    expr.evaluate(bound)
                        .map_err(|e| failed(format!("measure `{}` = `{}`: {e}", measure.name, expr.source())))?,
                ),
                (Input::Cel(_), None) => None,
            });
        }
        let folded = partial
            .fold(aggregate, group, time_ms, &values, closed_through)
            .map_err(bad_value)?;
        if folded == 0 {
            return Err((
                ReasonCode::Late,
                format!(
                    "event time {} ms is in windows closed already (closed through {closed_through} ms)",
                    time_ms.unwrap_or_default()
                ),
            ));
        }
        Ok(Fold::Folded(time_ms))
    }
}

/// Where the columns a job's aggregate reads sit in the rows of a split, found once from the
/// split's column specs (`None`: the rows lack that column).
#[derive(Default)]
struct Positions {
    group_by: Vec<Option<usize>>,
    window: Option<usize>,
    /// Per measure; only `row.<column>` measures have one.
    measures: Vec<Option<usize>>,
}

impl Positions {
    fn new(names: &[String], compiled: &Compiled) -> Positions {
        let position = |name: &str| names.iter().position(|n| n == name);
        let Some(aggregate) = &compiled.aggregate else {
            return Positions::default();
        };
        Positions {
            group_by: aggregate.group_by.iter().map(|name| position(name)).collect(),
            window: aggregate.window.as_ref().and_then(|w| position(&w.column)),
            measures: compiled
                .measures
                .iter()
                .map(|input| match input {
                    Input::Column(name) => position(name),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// Why a row failed, and how.
type Failure = (ReasonCode, String);

/// Broker publishes awaited at once.
const PUBLISHES_IN_FLIGHT: usize = 256;
/// How long a publish is retried before the run stops (the next `job run` resumes it).
const BROKER_RETRY_FOR: Duration = Duration::from_secs(300);

/// An opened sink.
enum Sink {
    /// A table, through the ingest API.
    Table(String),
    /// A Kafka topic; the message id is the record key and the `shardgate.message_id` header.
    Kafka(crate::sink::broker::kafka::KafkaPublisher),
    /// A RabbitMQ exchange; the message id in the AMQP `message_id` property.
    Amqp(Box<crate::sink::broker::amqp::AmqpPublisher>),
    /// A NATS subject; the message id in `Nats-Msg-Id`.
    Nats {
        client: async_nats::Client,
        subject: String,
        jetstream: Option<Box<async_nats::jetstream::Context>>,
    },
}

impl Sink {
    async fn open(config: &JobSinkConfig, job: &str) -> anyhow::Result<Sink> {
        Ok(match config {
            JobSinkConfig::Table(table) => Sink::Table(table.clone()),
            JobSinkConfig::Kafka {
                brokers,
                topic,
                security,
            } => {
                let publisher = crate::sink::broker::kafka::KafkaPublisher::new(brokers, topic, security.as_ref())
                    .with_context(|| format!("job `{job}`: kafka sink {topic}"))?;
                // A refused login or handshake fails the run now, naming the sink's keys.
                publisher.reach("the sink's `security`").await.map_err(|e| {
                    anyhow::anyhow!("job `{job}`: kafka sink `{topic}`: cannot reach Kafka at `{brokers}`: {e}")
                })?;
                Sink::Kafka(publisher)
            }
            JobSinkConfig::RabbitMq {
                url,
                exchange,
                routing_key,
                security,
            } => Sink::Amqp(Box::new(
                crate::sink::broker::amqp::AmqpPublisher::open(url, exchange, routing_key, security.as_ref())
                    .await
                    .map_err(|reason| anyhow::anyhow!("job `{job}`: rabbitmq sink: {reason}"))?,
            )),
            JobSinkConfig::Nats {
                url,
                subject,
                jetstream,
                security,
            } => {
                let client = crate::sink::broker::nats::connect(url, job, security.as_ref())
                    .await
                    .map_err(|e| anyhow::anyhow!("job `{job}`: nats sink {subject}: {e}"))?;
                Sink::Nats {
                    jetstream: jetstream.then(|| Box::new(async_nats::jetstream::new(client.clone()))),
                    client,
                    subject: subject.clone(),
                }
            }
        })
    }

    fn label(&self) -> String {
        match self {
            Sink::Table(table) => format!("table {table}"),
            Sink::Kafka(publisher) => format!("kafka topic {}", publisher.topic()),
            Sink::Nats { subject, .. } => format!("nats subject {subject}"),
            Sink::Amqp(publisher) => format!("rabbitmq exchange `{}`", publisher.exchange),
        }
    }

    async fn publish_one(&self, job: &str, id: &str, payload: &[u8]) -> Result<(), String> {
        match self {
            Sink::Table(_) => Ok(()),
            Sink::Kafka(publisher) => {
                let headers = [
                    ("shardgate.job".to_string(), job.to_string()),
                    ("shardgate.message_id".to_string(), id.to_string()),
                ];
                publisher.publish(Some(id.as_bytes()), Some(payload), &headers).await
            }
            Sink::Amqp(publisher) => {
                let headers = vec![("shardgate.job".to_string(), job.to_string())];
                publisher.publish_with_id(headers, payload, Some(id)).await
            }
            Sink::Nats {
                client,
                subject,
                jetstream,
            } => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", id);
                headers.insert("shardgate.job", job);
                match jetstream {
                    Some(context) => context
                        .publish_with_headers(subject.clone(), headers, payload.to_vec().into())
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    None => client
                        .publish_with_headers(subject.clone(), headers, payload.to_vec().into())
                        .await
                        .map_err(|e| e.to_string()),
                }
            }
        }
    }

    async fn flush(&self) -> Result<(), String> {
        match self {
            Sink::Nats { client, .. } => client.flush().await.map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }
}

/// Publishes one result, retried (logged, backing off up to 5 s) until the broker takes it or
/// `BROKER_RETRY_FOR` passes.
async fn publish_retrying(sink: &Sink, job: &str, id: &str, payload: Vec<u8>) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        match sink.publish_one(job, id, &payload).await {
            Ok(()) => return Ok(()),
            Err(reason) if started.elapsed() < BROKER_RETRY_FOR => {
                tracing::warn!(job, sink = %sink.label(), %reason, "publish failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(reason) => anyhow::bail!("publishing to {}: {reason}", sink.label()),
        }
    }
}

/// Where a job's results go: its sinks, table ones written through the gateway's ingest API.
struct Output {
    job: String,
    sinks: Vec<Sink>,
    client: ShardAwareClient,
    rows_out: AtomicU64,
    /// The Protobuf message broker sinks publish (`[job.protobuf]`); JSON when none.
    payload: Option<prost_reflect::MessageDescriptor>,
}

impl Output {
    /// Checks the sink tables (they must exist and hold no counters), opens every sink and
    /// connects to the gateway at `endpoint`, which also serves `reads` (a scan job's table).
    async fn open(
        job: &JobConfig,
        session: &Session,
        endpoint: &GatewayAddr,
        reads: Option<&str>,
    ) -> anyhow::Result<Output> {
        let mut tables: Vec<&str> = reads.into_iter().collect();
        for sink in &job.sinks {
            if let JobSinkConfig::Table(table) = sink {
                check_sink_table(session, &job.name, table).await?;
                tables.push(table);
            }
        }
        let payload = match &job.protobuf {
            None => None,
            Some(config) => {
                let message = crate::mapping::format::load_protobuf(config)
                    .map_err(|reason| anyhow::anyhow!("job `{}`: [job.protobuf]: {reason}", job.name))?;
                let columns = match &job.aggregate {
                    Some(aggregate) => aggregate::result_columns(aggregate),
                    None => job.columns.clone(),
                };
                if let Some(missing) = columns.iter().find(|c| message.get_field_by_name(c).is_none()) {
                    anyhow::bail!(
                        "job `{}`: [job.protobuf] message `{}` has no field `{missing}` (the results' columns: {})",
                        job.name,
                        message.full_name(),
                        columns.join(", ")
                    );
                }
                Some(message)
            }
        };
        let mut sinks = Vec::with_capacity(job.sinks.len());
        for sink in &job.sinks {
            sinks.push(Sink::open(sink, &job.name).await?);
        }
        Ok(Output {
            job: job.name.clone(),
            sinks,
            client: ShardAwareClient::connect(endpoint.clone(), &tables).await?,
            rows_out: AtomicU64::new(0),
            payload,
        })
    }

    /// A result's payload: a JSON object of its columns, or that object as the job's Protobuf
    /// message.
    fn payload(&self, columns: &[String], row: &Row) -> anyhow::Result<Vec<u8>> {
        let object = serde_json::Value::Object(json_object(columns, row));
        match &self.payload {
            None => Ok(serde_json::to_vec(&object)?),
            Some(message) => {
                let encoded = prost_reflect::DynamicMessage::deserialize(message.clone(), object)
                    .with_context(|| format!("a result as Protobuf message `{}`", message.full_name()))?;
                Ok(encoded.encode_to_vec())
            }
        }
    }

    /// Writes rows to every sink: tables with the write timestamp `timestamp_us`, brokers as
    /// JSON objects each under its stable message id (`ids`, one per row).
    async fn write(
        &self,
        columns: &[String],
        rows: Vec<Row>,
        ids: Vec<String>,
        timestamp_us: i64,
    ) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        for sink in &self.sinks {
            let written = match sink {
                Sink::Table(table) => self.write_table(table, columns, &rows, timestamp_us).await?,
                broker => self.publish(broker, columns, &rows, &ids).await?,
            };
            self.rows_out.fetch_add(written, Ordering::Relaxed);
            metrics::counter!(metric::JOB_ROWS_OUT, "job" => self.job.clone()).increment(written);
        }
        Ok(())
    }

    async fn write_table(
        &self,
        table: &str,
        columns: &[String],
        rows: &[Row],
        timestamp_us: i64,
    ) -> anyhow::Result<u64> {
        let batches: Vec<RowBatch> = rows
            .chunks(WRITE_ROWS)
            .map(|chunk| RowBatch {
                table: table.to_string(),
                columns: columns.to_vec(),
                rows: chunk.to_vec(),
                timestamp_us,
            })
            .collect();
        let summary = self
            .client
            .stream(batches)
            .await
            .with_context(|| format!("writing to {table}"))?;
        if let Some(error) = summary.errors.first() {
            anyhow::bail!(
                "writing to {table}: {} row(s) refused, first: {} {}",
                summary.errors.len(),
                error.code,
                error.reason
            );
        }
        if let Some((_, error)) = summary.batch_errors.first() {
            anyhow::bail!("writing to {table}: a batch refused: {} {}", error.code, error.reason);
        }
        Ok(summary.written)
    }

    /// Publishes each row as a JSON object, `PUBLISHES_IN_FLIGHT` at a time, each retried
    /// (logged) until the broker takes it or `BROKER_RETRY_FOR` passes.
    async fn publish(&self, sink: &Sink, columns: &[String], rows: &[Row], ids: &[String]) -> anyhow::Result<u64> {
        use futures::stream::{FuturesUnordered, StreamExt};
        let mut pending = FuturesUnordered::new();
        for (row, id) in rows.iter().zip(ids) {
            if pending.len() >= PUBLISHES_IN_FLIGHT {
                if let Some(outcome) = pending.next().await {
                    outcome?;
                }
            }
            let payload = self.payload(columns, row)?;
            pending.push(publish_retrying(sink, &self.job, id, payload));
        }
        while let Some(outcome) = pending.next().await {
            outcome?;
        }
        sink.flush()
            .await
            .map_err(|reason| anyhow::anyhow!("flushing {}: {reason}", sink.label()))?;
        Ok(rows.len() as u64)
    }
}

/// How far a split is: the token resuming it (empty: from its start), the partial and counts
/// of the rows before it.
#[derive(Default)]
struct Progress {
    token: Vec<u8>,
    partial: Partial,
    rows_in: u64,
    rows_kept: u64,
}

/// A claimed split: its index in the run's plan and its token ranges.
struct Claim {
    index: i32,
    split: Split,
}

/// Shared state of one `job run`.
struct Runner {
    job: JobConfig,
    output: Output,
    dead_letter: Option<DeadLetterSink>,
    session: Arc<Session>,
    compiled: Compiled,
    owner: String,
    run: i64,
    rows_in: AtomicU64,
    rows_kept: AtomicU64,
    rows_failed: AtomicU64,
    reasons: std::sync::Mutex<Vec<String>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A result's message id: `prefix` (the job, and a scan job's run) and the group key — hashed
/// when long, so the id fits every broker (AMQP's `message_id` holds at most 255 bytes).
fn message_id(prefix: &str, key: &str) -> String {
    if key.len() <= RESULT_KEY_BYTES_MAX {
        return format!("{prefix}.{key}");
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}.{hex}")
}

/// A query job's bind value as the API takes it (the gateway converts it to the marker's type).
fn bind_value(value: &serde_json::Value) -> crate::wire::proto::Value {
    let kind = match value {
        serde_json::Value::Bool(b) => Kind::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Kind::Int(i),
            None => Kind::Double(n.as_f64().unwrap_or_default()),
        },
        serde_json::Value::String(text) => Kind::Text(text.clone()),
        serde_json::Value::Null => Kind::Null(true),
        other => Kind::Text(other.to_string()),
    };
    crate::wire::proto::Value { kind: Some(kind) }
}

/// This process as a lease owner: host, process id and start time.
fn owner_id() -> String {
    format!(
        "{}-{}-{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim(),
        std::process::id(),
        now_ms()
    )
}

/// The job's dead-letter destination, if it has one.
async fn open_dead_letter(job: &JobConfig, session: &Arc<Session>) -> anyhow::Result<Option<DeadLetterSink>> {
    let Some(config) = &job.dead_letter else {
        return Ok(None);
    };
    let (sink, _) = DeadLetterSink::open(config, &job.name, session)
        .await
        .map_err(|reason| anyhow::anyhow!("job `{}`: dead letters: {reason}", job.name))?;
    Ok(Some(sink))
}

/// Job `job`'s current run in `keyspace.job_runs` and its state (`running`, `done`,
/// `cancelled`); `None` before any run (also before any job of the keyspace made the table).
async fn current_run_state(session: &Session, keyspace: &str, job: &str) -> anyhow::Result<Option<(i64, String)>> {
    let result = match session
        .query_unpaged(
            format!("SELECT run, state FROM {keyspace}.job_runs WHERE job = ?"),
            (job,),
        )
        .await
    {
        Ok(result) => result,
        Err(error) if crate::sink::scylla::retry::table_not_known_yet(&error) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    Ok(result
        .into_rows_result()?
        .maybe_first_row::<(i64, Option<String>)>()?
        .map(|(run, state)| (run, state.unwrap_or_default())))
}

/// Marks run `run` of `job` cancelled (if it is still the current one): its runners stop before
/// their next claim, and the next start begins a new run.
async fn cancel_run(session: &Session, keyspace: &str, job: &str, run: i64) -> anyhow::Result<()> {
    session
        .query_unpaged(
            format!("UPDATE {keyspace}.job_runs SET state = 'cancelled' WHERE job = ? IF run = ?"),
            (job, run),
        )
        .await?;
    Ok(())
}

/// Moves run `run` of `job` from state `from` to `to` (`running` ⇄ `paused`) if it is still the
/// current run in that state; whether it did.
async fn set_run_state(
    session: &Session,
    keyspace: &str,
    job: &str,
    run: i64,
    (from, to): (&str, &str),
) -> anyhow::Result<bool> {
    let result = session
        .query_unpaged(
            format!("UPDATE {keyspace}.job_runs SET state = ? WHERE job = ? IF run = ? AND state = ?"),
            (to, job, run, from),
        )
        .await?;
    applied(result)
}

/// Creates the progress tables in the job's keyspace (which must exist).
async fn ensure_state_tables(session: &Session, keyspace: &str) -> anyhow::Result<()> {
    session
        .query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {keyspace}.job_runs (job text PRIMARY KEY, run bigint, plan blob, \
                 splits int, state text)"
            ),
            (),
        )
        .await
        .with_context(|| {
            format!("creating {keyspace}.job_runs (the keyspace `{keyspace}` of `state_keyspace` must exist)")
        })?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {keyspace}.job_splits (job text, run bigint, split int, owner text, \
                 lease_until bigint, done boolean, partial blob, rows_in bigint, rows_kept bigint, page_token blob, \
                 PRIMARY KEY ((job, run), split))"
            ),
            (),
        )
        .await
        .with_context(|| format!("creating {keyspace}.job_splits"))?;
    // Tables made before splits kept their last page's token get the column (an error says it
    // is there already).
    let _ = session
        .query_unpaged(format!("ALTER TABLE {keyspace}.job_splits ADD page_token blob"), ())
        .await;
    Ok(())
}

/// The job's current run — or a new one when it has none or its last finished: (run, plan).
async fn current_run(
    session: &Session,
    job: &JobConfig,
    client: &ShardAwareClient,
) -> anyhow::Result<(i64, Vec<Split>)> {
    let keyspace = &job.state_keyspace;
    loop {
        let existing = session
            .query_unpaged(
                format!("SELECT run, plan, state FROM {keyspace}.job_runs WHERE job = ?"),
                (&job.name,),
            )
            .await?
            .into_rows_result()?
            .maybe_first_row::<(i64, Vec<u8>, String)>()?;
        if let Some((run, plan, state)) = &existing {
            // A paused run is joined too: its runners wait until it is resumed.
            if state == "running" || state == "paused" {
                let plan = PlanScanResponse::decode(plan.as_slice()).context("the run's saved split plan")?;
                return Ok((*run, plan.splits));
            }
        }
        // A query job's statement is its one split.
        let plan = if job.query.is_some() {
            PlanScanResponse {
                splits: vec![Split::default()],
            }
        } else {
            client
                .query_client()
                .plan_scan(PlanScanRequest {
                    table: job.table.clone(),
                    min_splits: job.min_splits,
                })
                .await
                .with_context(|| format!("planning the scan of {}", job.table))?
                .into_inner()
        };
        let run = now_ms() * 1_000;
        let splits = plan.splits.len() as i32;
        let started = match &existing {
            None => session
                .query_unpaged(
                    format!(
                        "INSERT INTO {keyspace}.job_runs (job, run, plan, splits, state) VALUES (?, ?, ?, ?, 'running') \
                         IF NOT EXISTS"
                    ),
                    (&job.name, run, plan.encode_to_vec(), splits),
                )
                .await?,
            Some((previous, _, _)) => session
                .query_unpaged(
                    format!(
                        "UPDATE {keyspace}.job_runs SET run = ?, plan = ?, splits = ?, state = 'running' WHERE job = ? \
                         IF run = ?"
                    ),
                    (run, plan.encode_to_vec(), splits, &job.name, *previous),
                )
                .await?,
        };
        if applied(started)? {
            for index in 0..splits {
                session
                    .query_unpaged(
                        format!(
                            "INSERT INTO {keyspace}.job_splits (job, run, split, owner, lease_until, done) \
                             VALUES (?, ?, ?, '', 0, false) IF NOT EXISTS"
                        ),
                        (&job.name, run, index),
                    )
                    .await?;
            }
            return Ok((run, plan.splits));
        }
        // Another gateway started a run first: go round and join it.
    }
}

/// A sink table must exist and hold no counters: adding to a counter is not idempotent, so a
/// split processed twice (after a takeover) would count twice.
async fn check_sink_table(session: &Session, job: &str, table: &str) -> anyhow::Result<()> {
    let (keyspace, name) = table.split_once('.').unwrap_or((table, ""));
    let types: Vec<(String,)> = session
        .query_unpaged(
            "SELECT type FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?",
            (keyspace, name),
        )
        .await?
        .into_rows_result()?
        .rows::<(String,)>()?
        .collect::<Result<_, _>>()?;
    if types.is_empty() {
        anyhow::bail!("job `{job}`: sink table {table} does not exist");
    }
    if types.iter().any(|(t,)| t == "counter") {
        anyhow::bail!(
            "job `{job}`: sink table {table} is a counter table; counters are not idempotent (a split \
             processed twice would count twice): use a table of regular columns"
        );
    }
    Ok(())
}

/// Whether a lightweight transaction applied (its `[applied]` column).
fn applied(result: scylla::response::query_result::QueryResult) -> anyhow::Result<bool> {
    let rows = result.into_rows_result()?;
    let mut typed = rows.rows::<scylla::value::Row>()?;
    match typed.next() {
        Some(row) => Ok(matches!(
            row?.columns.first(),
            Some(Some(scylla::value::CqlValue::Boolean(true)))
        )),
        None => anyhow::bail!("a lightweight transaction answered no row"),
    }
}

impl Runner {
    fn state_table(&self, table: &str) -> String {
        format!("{}.{table}", self.job.state_keyspace)
    }

    /// A row an expression or a measure failed on: counted, its reason kept for the summary,
    /// and sent to the job's dead-letter destination (the row as a JSON object) if it has one.
    async fn failed(&self, names: &[String], row: &Row, split: i32, code: ReasonCode, reason: String) {
        self.rows_failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::JOB_ROWS_FAILED, "job" => self.job.name.clone()).increment(1);
        if let Ok(mut reasons) = self.reasons.lock() {
            if reasons.len() < REASONS_MAX {
                reasons.push(format!("{}: {reason}", code.as_str()));
            }
        }
        let Some(sink) = &self.dead_letter else {
            return;
        };
        let payload = serde_json::to_vec(&json_object(names, row)).unwrap_or_default();
        let letter = DeadLetter {
            route: &self.job.name,
            reason_code: code.as_str(),
            reason: &reason,
            source: vec![
                (headers::SOURCE_TABLE, self.job.table.clone()),
                (headers::SOURCE_SPLIT, split.to_string()),
            ],
            headers: &[],
            key: None,
            payload: Some(&payload),
        };
        sink.send(&letter).await;
    }

    /// Split rows: (index, owner, lease_until, done).
    async fn splits(&self) -> anyhow::Result<Vec<(i32, String, i64, bool)>> {
        let mut rows = Vec::new();
        let pages = self
            .session
            .query_iter(
                format!(
                    "SELECT split, owner, lease_until, done FROM {} WHERE job = ? AND run = ?",
                    self.state_table("job_splits")
                ),
                (&self.job.name, self.run),
            )
            .await?
            .rows_stream::<(i32, Option<String>, Option<i64>, Option<bool>)>()?;
        use futures::TryStreamExt;
        let all: Vec<_> = pages.try_collect().await?;
        for (index, owner, lease, done) in all {
            rows.push((
                index,
                owner.unwrap_or_default(),
                lease.unwrap_or(0),
                done.unwrap_or(false),
            ));
        }
        Ok(rows)
    }

    /// Claims split `index` if its lease is still `seen_lease` (nobody claimed it since).
    async fn claim(&self, index: i32, seen_lease: i64) -> anyhow::Result<bool> {
        let result = self
            .session
            .query_unpaged(
                format!(
                    "UPDATE {} SET owner = ?, lease_until = ? WHERE job = ? AND run = ? AND split = ? \
                     IF lease_until = ? AND done = false",
                    self.state_table("job_splits")
                ),
                (
                    &self.owner,
                    now_ms() + self.job.lease.as_millis() as i64,
                    &self.job.name,
                    self.run,
                    index,
                    seen_lease,
                ),
            )
            .await?;
        applied(result)
    }

    /// Renews the lease on a split this gateway holds, storing its progress with it: the
    /// token resuming it after the last page folded (and written, for a copy job), the partial
    /// and counts up to there. False when another holds it now.
    async fn renew(&self, index: i32, progress: &Progress) -> anyhow::Result<bool> {
        let result = self
            .session
            .query_unpaged(
                format!(
                    "UPDATE {} SET lease_until = ?, page_token = ?, partial = ?, rows_in = ?, rows_kept = ? \
                     WHERE job = ? AND run = ? AND split = ? IF owner = ?",
                    self.state_table("job_splits")
                ),
                (
                    now_ms() + self.job.lease.as_millis() as i64,
                    &progress.token,
                    serde_json::to_vec(&progress.partial)?,
                    progress.rows_in as i64,
                    progress.rows_kept as i64,
                    &self.job.name,
                    self.run,
                    index,
                    &self.owner,
                ),
            )
            .await?;
        applied(result)
    }

    /// What an earlier holder of split `index` stored of its progress (nothing: from its start).
    async fn stored_progress(&self, index: i32) -> anyhow::Result<Progress> {
        let row = self
            .session
            .query_unpaged(
                format!(
                    "SELECT page_token, partial, rows_in, rows_kept FROM {} WHERE job = ? AND run = ? AND split = ?",
                    self.state_table("job_splits")
                ),
                (&self.job.name, self.run, index),
            )
            .await?
            .into_rows_result()?
            .maybe_first_row::<(Option<Vec<u8>>, Option<Vec<u8>>, Option<i64>, Option<i64>)>()?;
        let Some((Some(token), Some(partial), rows_in, rows_kept)) =
            row.filter(|r| r.0.as_ref().is_some_and(|t| !t.is_empty()))
        else {
            return Ok(Progress::default());
        };
        Ok(Progress {
            token,
            partial: serde_json::from_slice(&partial).context("a split's stored partial")?,
            rows_in: rows_in.unwrap_or_default().max(0) as u64,
            rows_kept: rows_kept.unwrap_or_default().max(0) as u64,
        })
    }

    /// The pages of a claimed split from `token` on (empty: from its start): a scan job's token
    /// range through `Scan` at its owner core, or a query job's statement through
    /// `ExecuteStream`.
    fn pages(
        &self,
        request: &ScanRequest,
        split: &Split,
        token: Vec<u8>,
    ) -> tokio::sync::mpsc::Receiver<Result<crate::client::ScanPage, tonic::Status>> {
        let Some(cql) = &self.job.query else {
            return self
                .output
                .client
                .scan(request.clone(), vec![split.clone()], vec![token], 1);
        };
        let execute = crate::wire::proto::ExecuteRequest {
            cql: cql.clone(),
            values: self.job.binds.iter().map(bind_value).collect(),
            options: Some(QueryOptions {
                page_size: PAGE_ROWS,
                page_token: token,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let mut client = self.output.client.query_client();
        tokio::spawn(async move {
            let mut stream = match client.execute_stream(execute).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    let _ = sender.send(Err(status)).await;
                    return;
                }
            };
            loop {
                let item = match stream.message().await {
                    Ok(Some(page)) => {
                        let result = page.result.unwrap_or_default();
                        Ok(crate::client::ScanPage {
                            split: 0,
                            token: result.next_page_token.clone(),
                            result,
                        })
                    }
                    Ok(None) => return,
                    Err(status) => Err(status),
                };
                let failed = item.is_err();
                if sender.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        receiver
    }

    /// Processes one claimed split to its end; true when its result was stored as done by this
    /// gateway (false: the lease was lost to another, whose result will count instead).
    async fn process(self: &Arc<Self>, claim: Claim) -> anyhow::Result<bool> {
        let request = ScanRequest {
            table: self.job.table.clone(),
            columns: self.job.columns.clone(),
            r#where: self.job.r#where.clone(),
            values: self.job.binds.iter().map(bind_value).collect(),
            allow_filtering: self.job.allow_filtering,
            options: Some(QueryOptions {
                page_size: PAGE_ROWS,
                ..Default::default()
            }),
            ..Default::default()
        };
        // A split an earlier holder stored progress of goes on after its last stored page.
        let mut progress = self.stored_progress(claim.index).await?;
        if !progress.token.is_empty() {
            tracing::info!(job = %self.job.name, split = claim.index, rows = progress.rows_in, "resuming the split after its last stored page");
        }
        let mut pages = self.pages(&request, &claim.split, progress.token.clone());
        let mut names: Vec<String> = Vec::new();
        // Until a page names the columns, every column reads as missing.
        let mut positions = Positions::new(&[], &self.compiled);
        let (mut rows_in, mut rows_kept) = (0u64, 0u64);
        let mut renewed = Instant::now();
        let renew_every = self.job.lease / 3;
        let mut paged = false;
        while let Some(page) = pages.recv().await {
            let page = match page {
                Ok(page) => page,
                // A stored token the gateway refuses (its page-token key changed with a restart
                // and is not kept in a file): the split is read again from its start.
                Err(status) if !paged && !progress.token.is_empty() => {
                    tracing::warn!(job = %self.job.name, split = claim.index, reason = %status.message(), "the stored page token is refused; reading the split from its start");
                    progress = Progress::default();
                    pages = self.pages(&request, &claim.split, Vec::new());
                    continue;
                }
                Err(status) => {
                    return Err(anyhow::Error::from(status).context(format!("scanning split {}", claim.index)))
                }
            };
            paged = true;
            if names.is_empty() {
                names = page.result.columns.iter().map(|c| c.name.clone()).collect();
                positions = Positions::new(&names, &self.compiled);
            }
            let mut copied = Vec::new();
            for row in &page.result.rows {
                rows_in += 1;
                match self
                    .compiled
                    .fold_row(&names, &positions, row, &mut progress.partial, i64::MIN)
                {
                    Ok(Fold::Copied(row)) => {
                        rows_kept += 1;
                        copied.push(row);
                    }
                    Ok(Fold::Folded(_)) => rows_kept += 1,
                    Ok(Fold::Skipped) => {}
                    Err((code, reason)) => self.failed(&names, row, claim.index, code, reason).await,
                }
            }
            if self.job.aggregate.is_none() {
                let ids = copied.iter().map(|row| self.copy_id(row)).collect();
                self.output.write(&names, copied, ids, self.run).await?;
            }
            progress.token = page.token;
            if renewed.elapsed() >= renew_every {
                let stored = Progress {
                    token: progress.token.clone(),
                    partial: std::mem::take(&mut progress.partial),
                    rows_in: progress.rows_in + rows_in,
                    rows_kept: progress.rows_kept + rows_kept,
                };
                let renewed_here = self.renew(claim.index, &stored).await;
                progress.partial = stored.partial;
                if !renewed_here? {
                    tracing::warn!(job = %self.job.name, split = claim.index, "lease lost; another gateway has the split");
                    return Ok(false);
                }
                renewed = Instant::now();
            }
        }
        let partial = serde_json::to_vec(&progress.partial)?;
        let stored = self
            .session
            .query_unpaged(
                format!(
                    "UPDATE {} SET done = true, partial = ?, rows_in = ?, rows_kept = ? \
                     WHERE job = ? AND run = ? AND split = ? IF owner = ?",
                    self.state_table("job_splits")
                ),
                (
                    partial,
                    (progress.rows_in + rows_in) as i64,
                    (progress.rows_kept + rows_kept) as i64,
                    &self.job.name,
                    self.run,
                    claim.index,
                    &self.owner,
                ),
            )
            .await?;
        let stored = applied(stored)?;
        // Counted here (the rows this runner read) only when its partial is the one that counts.
        if stored {
            self.rows_in.fetch_add(rows_in, Ordering::Relaxed);
            self.rows_kept.fetch_add(rows_kept, Ordering::Relaxed);
            metrics::counter!(metric::JOB_ROWS_READ, "job" => self.job.name.clone()).increment(rows_in);
        }
        Ok(stored)
    }

    /// The message id of a result: the job, the run and the group key.
    fn result_id(&self, key: &str) -> String {
        message_id(&format!("{}.{}", self.job.name, self.run), key)
    }

    /// The message id of a copied row: the job, the run and a hash of the row's values (the
    /// same row read again has the same id).
    fn copy_id(&self, row: &Row) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(row.encode_to_vec());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}.{}.{hex}", self.job.name, self.run)
    }

    /// Merges every split's partial and writes the results; marks the run done.
    async fn finish(&self) -> anyhow::Result<()> {
        if let Some(aggregate) = &self.job.aggregate {
            let mut merged = Partial::default();
            let mut pages = self
                .session
                .query_iter(
                    format!(
                        "SELECT partial FROM {} WHERE job = ? AND run = ?",
                        self.state_table("job_splits")
                    ),
                    (&self.job.name, self.run),
                )
                .await?
                .rows_stream::<(Option<Vec<u8>>,)>()?;
            use futures::StreamExt;
            while let Some(row) = pages.next().await {
                let (bytes,) = row?;
                let partial: Partial =
                    serde_json::from_slice(&bytes.unwrap_or_default()).context("a split's stored partial")?;
                merged.merge(partial);
            }
            let (keys, rows): (Vec<String>, Vec<Row>) = merged.keyed_rows().into_iter().unzip();
            let ids = keys.iter().map(|key| self.result_id(key)).collect();
            self.output
                .write(&aggregate::result_columns(aggregate), rows, ids, self.run)
                .await?;
        }
        self.session
            .query_unpaged(
                format!(
                    "UPDATE {} SET state = 'done' WHERE job = ? IF run = ?",
                    self.state_table("job_runs")
                ),
                (&self.job.name, self.run),
            )
            .await?;
        Ok(())
    }
}

/// A query job whose `SELECT` is a table scan ([`split::scan_of`]) runs as that scan: planned
/// into shard-aligned splits, its binds bound to the scan's restrictions. Any other job as is.
fn as_scan(session: &Session, mut job: JobConfig) -> JobConfig {
    let Some(scan) = job.query.as_deref().and_then(split::scan_of) else {
        if let Some(query) = &job.query {
            tracing::info!(job = %job.name, %query, "the query spans token ranges: read as one split");
        }
        return job;
    };
    let Some((keyspace, table)) = scan.table.split_once('.') else {
        return job;
    };
    let state = session.get_cluster_state();
    let partition_key = state
        .get_keyspace(keyspace)
        .and_then(|k| k.tables.get(table))
        .map(|t| t.partition_key.clone());
    match partition_key {
        // An unknown table: the statement says so when it runs.
        None => job,
        Some(key) if split::restricts(&scan.r#where, &key) => {
            tracing::info!(job = %job.name, "the query restricts the partition key: read as one split");
            job
        }
        Some(_) => {
            job.query = None;
            job.table = scan.table;
            job.columns = scan.columns;
            job.r#where = scan.r#where;
            job.allow_filtering = scan.allow_filtering;
            job
        }
    }
}

/// Runs `job` to the end of its current run (a new run when the last one finished), sharing its
/// splits with any other gateway running it, through the gateway at `endpoint`. `progress`
/// draws a bar on the terminal. `signal` pauses it (no new split claimed; the run is marked
/// `paused`, so its other runners pause too, until any of them or any gateway's `ResumeJob`
/// marks it `running`), cancels it (its
/// splits' reads end, the run is marked `cancelled`) or stops it (reads end, the run stays to
/// be resumed): both end in an [`Interrupted`] error.
pub async fn run(
    cluster: &ClusterConfig,
    job: JobConfig,
    endpoint: &GatewayAddr,
    progress: bool,
    mut signal: Signal,
) -> anyhow::Result<JobReport> {
    let started = Instant::now();
    let compiled = Compiled::new(&job)?;
    let session = crate::sink::scylla::connect(cluster).await?;
    let job = as_scan(&session, job);
    ensure_state_tables(&session, &job.state_keyspace).await?;
    let reads = (!job.table.is_empty()).then_some(job.table.as_str());
    let output = Output::open(&job, &session, endpoint, reads).await?;
    let session = Arc::new(session);
    let dead_letter = open_dead_letter(&job, &session).await?;
    let (run, plan) = current_run(&session, &job, &output.client).await?;
    let owner = owner_id();
    let parallel = job.parallel_splits as usize;
    let runner = Arc::new(Runner {
        job,
        output,
        dead_letter,
        session,
        compiled,
        owner,
        run,
        rows_in: AtomicU64::new(0),
        rows_kept: AtomicU64::new(0),
        rows_failed: AtomicU64::new(0),
        reasons: std::sync::Mutex::new(Vec::new()),
    });
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(plan.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} job {msg} [{bar:30}] {pos}/{len} splits, {elapsed}, ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(runner.job.name.clone());
        bar
    });
    let mut running: tokio::task::JoinSet<(i32, anyhow::Result<bool>)> = tokio::task::JoinSet::new();
    let mut in_flight: Vec<i32> = Vec::new();
    let mut splits_here = 0;
    // Paused by the last change seen: a command here (written to the run for its other
    // runners) or the run's shared state (a `PauseJob`/`ResumeJob` on any gateway).
    let mut paused = false;
    let mut last_command = Command::Run;
    let mut last_shared: Option<String> = None;
    // What the bar says.
    let mut shown_paused = false;
    loop {
        let command = *signal.borrow_and_update();
        if matches!(command, Command::Cancel | Command::Stop) {
            running.abort_all();
            if let Some(bar) = &bar {
                bar.abandon();
            }
            if command == Command::Cancel {
                cancel_run(
                    &runner.session,
                    &runner.job.state_keyspace,
                    &runner.job.name,
                    runner.run,
                )
                .await?;
                tracing::info!(job = %runner.job.name, run, "run cancelled");
                return Err(Interrupted("cancelled").into());
            }
            return Err(Interrupted("stopped").into());
        }
        // Cancelled elsewhere (any gateway's `CancelJob`): every runner of the run stops.
        let shared = current_run_state(&runner.session, &runner.job.state_keyspace, &runner.job.name)
            .await?
            .filter(|(current, _)| *current == runner.run)
            .map(|(_, state)| state);
        if shared.as_deref() == Some("cancelled") {
            running.abort_all();
            if let Some(bar) = &bar {
                bar.abandon();
            }
            tracing::info!(job = %runner.job.name, run, "run cancelled through the Jobs service");
            return Err(Interrupted("cancelled").into());
        }
        if command != last_command {
            last_command = command;
            paused = command == Command::Pause;
            let change = if paused {
                ("running", "paused")
            } else {
                ("paused", "running")
            };
            set_run_state(
                &runner.session,
                &runner.job.state_keyspace,
                &runner.job.name,
                run,
                change,
            )
            .await?;
            last_shared = Some(change.1.to_string());
        } else if shared != last_shared {
            if let Some(state) = &shared {
                paused = state == "paused";
                if last_shared.is_some() {
                    tracing::info!(job = %runner.job.name, run, state = %state, "run paused or resumed through the Jobs service");
                }
            }
            last_shared = shared;
        }
        if let (Some(bar), true) = (&bar, paused != shown_paused) {
            shown_paused = paused;
            bar.set_message(if paused {
                format!("{} (paused)", runner.job.name)
            } else {
                runner.job.name.clone()
            });
        }
        let splits = runner.splits().await?;
        let done = splits.iter().filter(|s| s.3).count();
        if let Some(bar) = &bar {
            bar.set_position(done as u64);
        }
        metrics::gauge!(metric::JOB_SPLITS_DONE, "job" => runner.job.name.clone()).set(done as f64);
        metrics::gauge!(metric::JOB_SPLITS_TOTAL, "job" => runner.job.name.clone()).set(plan.len() as f64);
        if done == plan.len() && running.is_empty() {
            break;
        }
        let now = now_ms();
        let claimable: Vec<(i32, i64)> = splits
            .iter()
            .filter(|s| !s.3 && s.2 < now && !in_flight.contains(&s.0))
            .map(|s| (s.0, s.2))
            .collect();
        for (index, lease) in &claimable {
            if running.len() >= parallel || paused {
                break;
            }
            let Some(split) = plan.get(*index as usize).cloned() else {
                anyhow::bail!("split {index} is not in the run's plan of {} splits", plan.len());
            };
            if runner.claim(*index, *lease).await? {
                in_flight.push(*index);
                let (runner, index) = (Arc::clone(&runner), *index);
                running.spawn(async move { (index, runner.process(Claim { index, split }).await) });
            }
        }
        // Wait for a split to end, or look again in a while (others hold the rest).
        let wait = tokio::time::sleep(Duration::from_millis(500));
        tokio::select! {
            Some(ended) = running.join_next(), if !running.is_empty() => {
                let (index, outcome) = ended.context("a split task")?;
                in_flight.retain(|i| *i != index);
                if outcome? {
                    splits_here += 1;
                }
            }
            _ = wait => {}
            _ = next_command(&mut signal) => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    runner.finish().await?;
    let reasons = runner.reasons.lock().map(|r| r.clone()).unwrap_or_default();
    Ok(JobReport {
        run,
        splits: plan.len(),
        splits_here,
        rows_in: runner.rows_in.load(Ordering::Relaxed),
        rows_kept: runner.rows_kept.load(Ordering::Relaxed),
        rows_failed: runner.rows_failed.load(Ordering::Relaxed),
        rows_out: runner.output.rows_out.load(Ordering::Relaxed),
        reasons,
        seconds: started.elapsed().as_secs_f64(),
    })
}
