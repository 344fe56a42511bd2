//! Stream jobs (`[job.source] stream = ["route", ..]`): rollups as messages arrive. The job
//! reads each named Kafka route's topic with its own consumer group (`shardgate-job-<name>`)
//! and each JetStream route's stream with an ordered consumer of its own (the stream is one
//! part, folded by one process at a time under a lease kept in `job_windows`), maps every
//! message with the route's own mapping (the row of its first target), and folds the rows its
//! filter keeps into event-time windows ([`super::aggregate`]).
//!
//! **Durable before counted as done.** Every `checkpoint` the open windows of each
//! (route, partition) this process holds are written to `job_windows` in the job's
//! `state_keyspace` — in one conditional batch with the partition's next offset and largest
//! event time, applied only if the stored offset is still the one this process loaded or last
//! wrote, and no window closed meanwhile. A message below a partition's stored offset is
//! skipped: its rows are counted in the stored windows already. So a `kill -9` anywhere loses
//! nothing (the messages after the stored offset are read again) and counts nothing twice. The
//! group's Kafka offsets are committed after each checkpoint (for lag tools; never past it).
//!
//! **Windows close by watermark**: the least of the largest event times the partitions have
//! stored (a partition still for `idle` no longer counts), less the window's `lateness`. Whoever sees a window's end at or before the watermark merges every
//! partition's stored partial of it, writes the results (tables with the window's end as the
//! write timestamp; brokers under the message id `<job>.<group key>`), then advances the job's
//! closed mark with a lightweight transaction and deletes the window's partials. A row whose
//! windows are all closed is dead-lettered as `late`. Several gateways running the job share
//! the topic's partitions through the group; a checkpoint refused because another gateway moved
//! a partition's offset or closed windows makes this one start over from the stored state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use scylla::client::session::Session;
use scylla::statement::batch::Batch;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, MaybeUnset};

use super::aggregate::{result_columns, Partial};
use super::signal::{next_command, Command, Signal};
use super::{applied, message_id, now_ms, open_dead_letter, Compiled, Fold, Output, Positions};
use crate::bridge::kafka::text_headers;
use crate::bridge::route::prepare_route;
use crate::client::GatewayAddr;
use crate::config::{AggregateConfig, ClusterConfig, JobConfig, RouteConfig, SourceConfig, StartFrom};
use crate::mapping::{Envelope, ReasonCode, RouteMapper};
use crate::sink::dead_letter::{headers, DeadLetter, DeadLetterSink};
use crate::telemetry::metric;
use crate::wire::convert::from_cql;
use crate::wire::proto::Row;

/// `window` of a partition's progress row (next offset, largest event time) and of the job's
/// closed mark (`part` = [`JOB_PART`]).
const PROGRESS: i64 = i64::MIN;
/// `window` of a JetStream part's lease row: `position` holds when the lease runs out (epoch
/// ms), `partial` its holder.
const LEASE: i64 = i64::MIN + 1;
/// `part` of the job's closed mark: windows ending at or before its `time` are written.
const JOB_PART: &str = "";
/// Pause before starting over after a refused checkpoint or a lost connection.
const RESTART_PAUSE: Duration = Duration::from_secs(2);

/// What a stream job did while this process ran it.
#[derive(Debug, Default, Clone)]
pub struct StreamReport {
    /// Messages folded (or found to have no row for the job).
    pub messages: u64,
    /// Messages skipped because a checkpoint had counted them already.
    pub replayed: u64,
    /// Messages the route's mapping refused (the route dead-letters them; the job skips them).
    pub unmapped: u64,
    /// Rows the filter kept and folded.
    pub rows_kept: u64,
    /// Rows an expression or a measure failed on (dead-lettered).
    pub rows_failed: u64,
    /// Rows whose windows had all closed (dead-lettered as `late`).
    pub rows_late: u64,
    /// Windows this process closed and wrote.
    pub windows_closed: u64,
    /// Results written, counted once per sink.
    pub rows_out: u64,
    /// Checkpoints refused (another gateway moved on first), each followed by a start over.
    pub restarts: u64,
    /// Wall time.
    pub seconds: f64,
}

impl std::fmt::Display for StreamReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} messages folded ({} already counted, {} unmapped), {} rows kept, {} failed, {} late, \
             {} windows closed, {} results written, {} restarts in {:.1} s",
            self.messages,
            self.replayed,
            self.unmapped,
            self.rows_kept,
            self.rows_failed,
            self.rows_late,
            self.windows_closed,
            self.rows_out,
            self.restarts,
            self.seconds
        )
    }
}

/// One route the job reads.
struct Source {
    route: String,
    /// Its Kafka topic or JetStream stream.
    name: String,
    mapper: RouteMapper,
    /// The first target's columns, the names of the rows the job sees.
    names: Vec<String>,
    positions: Positions,
    feed: Feed,
}

/// How a stream job reads one of its routes.
enum Feed {
    /// Its own consumer group on the route's topic: the partitions are shared by the gateways
    /// running the job.
    Kafka(StreamConsumer),
    /// An ordered consumer of the route's stream of its own, started at the stream sequence
    /// after the part's stored one, under the part's lease (one gateway folds a stream at a
    /// time). Its messages' settlement channel goes nowhere: the job acknowledges nothing.
    JetStream {
        stream: Box<async_nats::jetstream::stream::Stream>,
        acks: tokio::sync::mpsc::UnboundedSender<Vec<crate::bridge::nats::ack::Settled>>,
    },
}

/// A message of either feed.
enum Item<'c> {
    Kafka(BorrowedMessage<'c>),
    JetStream(crate::bridge::message::SourceMessage),
}

/// One (route, partition) as this process holds it.
#[derive(Default)]
pub(super) struct Part {
    /// Next offset to fold.
    pub(super) position: Option<i64>,
    /// The next offset `job_windows` holds (what a checkpoint's condition expects).
    pub(super) stored: Option<i64>,
    /// Largest event time folded.
    pub(super) max_time: Option<i64>,
    /// Open windows.
    pub(super) partial: Partial,
    /// Changed since the last checkpoint.
    pub(super) dirty: bool,
}

/// What a checkpoint writes of one part, taken from it at one moment.
pub(super) struct Snapshot {
    /// Next offset folded.
    pub(super) position: Option<i64>,
    /// The next offset stored before (the batch's condition).
    pub(super) stored: Option<i64>,
    /// Largest event time folded.
    pub(super) max_time: Option<i64>,
    /// Each open window's partial, encoded.
    pub(super) windows: Vec<(i64, Vec<u8>)>,
}

impl Part {
    /// The part as a checkpoint writes it.
    pub(super) fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut windows = Vec::new();
        for (window, partial) in self.partial.by_window() {
            windows.push((window.unwrap_or_default(), serde_json::to_vec(&partial)?));
        }
        Ok(Snapshot {
            position: self.position,
            stored: self.stored,
            max_time: self.max_time,
            windows,
        })
    }
}

/// Prepared statements on `job_windows`.
struct Statements {
    /// A partition's next offset and largest time, if its stored offset is as expected.
    progress: PreparedStatement,
    /// Sets the closed mark, if unchanged: to its own value as a checkpoint's guard, or on to
    /// a new watermark when windows close.
    closed_mark: PreparedStatement,
    /// A window's partial of one partition.
    window: PreparedStatement,
    /// Deletes a closed window's partial.
    delete: PreparedStatement,
    /// A partition's rows.
    load: PreparedStatement,
    /// One window's partial of one partition.
    partial: PreparedStatement,
    /// A part's lease row.
    lease_read: PreparedStatement,
    /// A first lease of a part.
    lease_new: PreparedStatement,
    /// Takes a part's lease, if it is as read (run out, or this process's).
    lease_take: PreparedStatement,
    /// Renews this process's lease (a checkpoint's condition).
    lease_renew: PreparedStatement,
}

/// Why a pass of the job ended.
enum Ended {
    /// The stop signal.
    Stopped,
    /// A checkpoint was refused: start over from the stored state.
    Refused,
}

/// A stream job's state in `job_windows` and its outputs: what both ways of feeding it share
/// (its own consumer under `job run`, its routes' taps inside `serve`: `super::tap`).
pub(super) struct Windows {
    pub(super) job: JobConfig,
    pub(super) aggregate: AggregateConfig,
    session: Arc<Session>,
    output: Output,
    pub(super) dead_letter: Option<DeadLetterSink>,
    statements: Statements,
    table: String,
    /// Windows ending at or before this are closed and written.
    pub(super) closed_through: Option<i64>,
    /// Partitions of the job's routes' topics, all together (0: unknown).
    partitions: usize,
    /// When this gateway opened the job's state: for `idle` after it, a partition with no
    /// stored progress yet holds the watermark back (it may just not have been read yet).
    opened: Instant,
}

/// A running stream job with its own consumer.
struct Stream {
    windows: Windows,
    compiled: Compiled,
    report: StreamReport,
    /// `shardgate_job_rows_read_total` of this job, looked up once (counted per message).
    rows_read: metrics::Counter,
    /// This process as the holder of JetStream parts' leases.
    owner: String,
}

/// Creates `job_windows` in the job's keyspace (which must exist).
async fn ensure_windows_table(session: &Session, keyspace: &str) -> anyhow::Result<()> {
    session
        .query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {keyspace}.job_windows (job text, part text, window bigint, \
                 position bigint, time bigint, partial blob, PRIMARY KEY (job, part, window))"
            ),
            (),
        )
        .await
        .with_context(|| {
            format!("creating {keyspace}.job_windows (the keyspace `{keyspace}` of `state_keyspace` must exist)")
        })?;
    Ok(())
}

async fn prepare(session: &Session, table: &str) -> anyhow::Result<Statements> {
    let prepare = |text: String| async move {
        session
            .prepare(text.clone())
            .await
            .with_context(|| format!("preparing `{text}`"))
    };
    Ok(Statements {
        progress: prepare(format!(
            "UPDATE {table} SET position = ?, time = ? WHERE job = ? AND part = ? AND window = ? IF position = ?"
        ))
        .await?,
        closed_mark: prepare(format!(
            "UPDATE {table} SET time = ? WHERE job = ? AND part = ? AND window = ? IF time = ?"
        ))
        .await?,
        window: prepare(format!(
            "UPDATE {table} SET partial = ? WHERE job = ? AND part = ? AND window = ?"
        ))
        .await?,
        delete: prepare(format!("DELETE FROM {table} WHERE job = ? AND part = ? AND window = ?")).await?,
        load: prepare(format!(
            "SELECT window, position, time, partial FROM {table} WHERE job = ? AND part = ?"
        ))
        .await?,
        partial: prepare(format!(
            "SELECT partial FROM {table} WHERE job = ? AND part = ? AND window = ?"
        ))
        .await?,
        lease_read: prepare(format!(
            "SELECT position, partial FROM {table} WHERE job = ? AND part = ? AND window = ?"
        ))
        .await?,
        lease_new: prepare(format!(
            "INSERT INTO {table} (job, part, window, position, partial) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
        ))
        .await?,
        lease_take: prepare(format!(
            "UPDATE {table} SET position = ?, partial = ? WHERE job = ? AND part = ? AND window = ? IF position = ?"
        ))
        .await?,
        lease_renew: prepare(format!(
            "UPDATE {table} SET position = ? WHERE job = ? AND part = ? AND window = ? IF partial = ?"
        ))
        .await?,
    })
}

/// A stream job's consumer of one route's topic: its own group, no automatic commits (the
/// offsets that count are the checkpoint's).
fn subscribe(job: &str, route: &str, kafka: &crate::config::KafkaSourceConfig) -> anyhow::Result<StreamConsumer> {
    let mut config = client_config(kafka);
    config
        .set("group.id", format!("shardgate-job-{job}"))
        .set("client.id", format!("shardgate-job-{job}-{route}"))
        .set("enable.auto.commit", "false")
        .set(
            "auto.offset.reset",
            match kafka.start_from {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            },
        );
    let consumer: StreamConsumer = config
        .create()
        .with_context(|| format!("job `{job}`: a consumer of route `{route}`'s topic"))?;
    consumer
        .subscribe(&[&kafka.topic])
        .with_context(|| format!("job `{job}`: subscribing to {}", kafka.topic))?;
    Ok(consumer)
}

/// A Kafka client of `kafka`'s brokers with the route's properties and security.
fn client_config(kafka: &crate::config::KafkaSourceConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.properties {
        if key != "group.instance.id" {
            config.set(key, value);
        }
    }
    for (key, value) in kafka.security.iter().flat_map(crate::config::KafkaSecurity::properties) {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &kafka.brokers);
    config
}

/// How long reading the routes' topic metadata may take when a stream job opens.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Partitions of `routes`' Kafka topics together, from the brokers' metadata, and one per
/// JetStream route (its stream is folded as one part); 0 when the metadata cannot be read
/// (logged: windows then close on the partitions that have progress, as before).
pub(super) async fn topic_partitions(job: &str, routes: &[RouteConfig]) -> usize {
    let streams = routes
        .iter()
        .filter(|route| matches!(route.source, SourceConfig::JetStream(_)))
        .count();
    let sources: Vec<crate::config::KafkaSourceConfig> = routes
        .iter()
        .filter_map(|route| match &route.source {
            SourceConfig::Kafka(kafka) => Some(kafka.clone()),
            _ => None,
        })
        .collect();
    let counted = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        let mut total = 0;
        for kafka in &sources {
            let consumer: rdkafka::consumer::BaseConsumer = client_config(kafka).create()?;
            let metadata = consumer.fetch_metadata(Some(&kafka.topic), METADATA_TIMEOUT)?;
            total += metadata
                .topics()
                .iter()
                .map(|topic| topic.partitions().len())
                .sum::<usize>();
        }
        Ok(total)
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|counted| counted);
    counted.map(|topics| topics + streams).unwrap_or_else(|error| {
        tracing::warn!(job, error = %format!("{error:#}"), "cannot read the routes' partitions; windows close on the partitions seen");
        0
    })
}

/// A mapped row's values as the job sees them (an unset column reads as null): the first
/// `columns`, or with `read` only those it marks converted and the others null (a job without
/// expressions reads a few columns).
pub(super) fn row_of(values: &[MaybeUnset<Option<CqlValue>>], columns: usize, read: Option<&[bool]>) -> Row {
    Row {
        values: values
            .iter()
            .take(columns)
            .enumerate()
            .map(|(at, value)| match value {
                MaybeUnset::Set(value) if read.is_none_or(|read| read.get(at).copied().unwrap_or(false)) => {
                    from_cql(value.as_ref())
                }
                _ => from_cql(None),
            })
            .collect(),
    }
}

/// Runs stream job `job` over `routes` (its `stream` routes, in order) until `signal` says
/// cancel or stop (a last checkpoint first), writing table results through the gateway at
/// `endpoint`; paused, it checkpoints and reads nothing until resumed. A refused checkpoint or
/// a lost connection starts the job over from its stored state (logged), so this ends only so,
/// or on a set-up error (a missing table, a column the job names that the route lacks).
pub async fn run(
    cluster: &ClusterConfig,
    job: JobConfig,
    routes: &[RouteConfig],
    endpoint: &GatewayAddr,
    mut signal: Signal,
) -> anyhow::Result<StreamReport> {
    let started = Instant::now();
    let compiled = Compiled::new(&job)?;
    let session = Arc::new(crate::sink::scylla::connect(cluster).await?);
    let rows_read = metrics::counter!(metric::JOB_ROWS_READ, "job" => job.name.clone());
    let mut stream = Stream {
        windows: Windows::open(job, session, endpoint, routes).await?,
        compiled,
        report: StreamReport::default(),
        rows_read,
        owner: super::owner_id(),
    };
    loop {
        let sources = stream.sources(routes).await?;
        match stream.pass(&sources, &mut signal).await {
            Ok(Ended::Stopped) => break,
            Ok(Ended::Refused) => {
                stream.report.restarts += 1;
                tracing::info!(job = %stream.windows.job.name, "checkpoint refused (another gateway moved on first); starting over from the stored state");
            }
            Err(error) => {
                stream.report.restarts += 1;
                tracing::warn!(job = %stream.windows.job.name, error = %format!("{error:#}"), "stream job failed; starting over from the stored state");
            }
        }
        drop(sources);
        tokio::select! {
            _ = tokio::time::sleep(RESTART_PAUSE) => {}
            command = next_command(&mut signal) => {
                if matches!(command, Command::Cancel | Command::Stop) {
                    break;
                }
            }
        }
    }
    stream.report.rows_out = stream.windows.rows_out();
    stream.report.seconds = started.elapsed().as_secs_f64();
    Ok(stream.report)
}

impl Windows {
    /// Opens a stream job's state (creating `job_windows`), outputs and dead-letter destination.
    pub(super) async fn open(
        job: JobConfig,
        session: Arc<Session>,
        endpoint: &GatewayAddr,
        routes: &[RouteConfig],
    ) -> anyhow::Result<Windows> {
        let Some(aggregate) = job.aggregate.clone() else {
            anyhow::bail!("job `{}`: a stream job needs `[job.aggregate]`", job.name);
        };
        ensure_windows_table(&session, &job.state_keyspace).await?;
        let table = format!("{}.job_windows", job.state_keyspace);
        let statements = prepare(&session, &table).await?;
        let output = Output::open(&job, &session, endpoint, None).await?;
        let dead_letter = open_dead_letter(&job, &session).await?;
        let partitions = topic_partitions(&job.name, routes).await;
        Ok(Windows {
            job,
            aggregate,
            session,
            output,
            dead_letter,
            statements,
            table,
            closed_through: None,
            partitions,
            opened: Instant::now(),
        })
    }

    /// Results written so far, counted once per sink.
    pub(super) fn rows_out(&self) -> u64 {
        self.output.rows_out.load(Ordering::Relaxed)
    }

    /// Reads the job's closed mark.
    pub(super) async fn load_closed(&self) -> anyhow::Result<Option<i64>> {
        let rows = self
            .session
            .execute_unpaged(&self.statements.load, (&self.job.name, JOB_PART))
            .await?
            .into_rows_result()?;
        for row in rows.rows::<(i64, Option<i64>, Option<i64>, Option<Vec<u8>>)>()? {
            let (window, _, time, _) = row?;
            if window == PROGRESS {
                return Ok(time);
            }
        }
        Ok(None)
    }

    /// Loads a part's stored state (windows already closed are left out).
    pub(super) async fn load_part(&self, part: &str) -> anyhow::Result<Part> {
        let rows = self
            .session
            .execute_unpaged(&self.statements.load, (&self.job.name, part))
            .await?
            .into_rows_result()?;
        let mut loaded = Part::default();
        for row in rows.rows::<(i64, Option<i64>, Option<i64>, Option<Vec<u8>>)>()? {
            let (window, position, time, partial) = row?;
            if window == PROGRESS {
                loaded.position = position;
                loaded.stored = position;
                loaded.max_time = time;
            } else if window == LEASE {
                continue;
            } else if let Some(bytes) = partial {
                let partial: Partial = serde_json::from_slice(&bytes)
                    .with_context(|| format!("the stored partial of {part}, window {window}"))?;
                loaded.partial.merge(partial);
            }
        }
        if let (Some(window), Some(closed)) = (&self.aggregate.window, self.closed_through) {
            loaded.partial.drop_closed(window.spec.size_ms, closed);
        }
        Ok(loaded)
    }

    /// Writes one part's checkpoint: its open windows, next offset and largest time in one
    /// conditional batch, applied only if the stored offset is still `snapshot.stored` and the
    /// closed mark still this process's — and, with `lease` (its holder), renewing the part's
    /// lease if this process still holds it. `false` when refused.
    pub(super) async fn store(&self, name: &str, snapshot: &Snapshot, lease: Option<&str>) -> anyhow::Result<bool> {
        let mut batch = Batch::default();
        let mut values: Vec<Vec<Option<CqlValue>>> = Vec::with_capacity(snapshot.windows.len() + 2);
        let text = |s: &str| Some(CqlValue::Text(s.to_string()));
        let big = |n: Option<i64>| n.map(CqlValue::BigInt);
        batch.append_statement(self.statements.progress.clone());
        values.push(vec![
            big(snapshot.position),
            big(snapshot.max_time),
            text(&self.job.name),
            text(name),
            big(Some(PROGRESS)),
            big(snapshot.stored),
        ]);
        batch.append_statement(self.statements.closed_mark.clone());
        values.push(vec![
            big(self.closed_through),
            text(&self.job.name),
            text(JOB_PART),
            big(Some(PROGRESS)),
            big(self.closed_through),
        ]);
        if let Some(owner) = lease {
            batch.append_statement(self.statements.lease_renew.clone());
            values.push(vec![
                big(Some(self.lease_until())),
                text(&self.job.name),
                text(name),
                big(Some(LEASE)),
                Some(CqlValue::Blob(owner.as_bytes().to_vec())),
            ]);
        }
        for (window, bytes) in &snapshot.windows {
            batch.append_statement(self.statements.window.clone());
            values.push(vec![
                Some(CqlValue::Blob(bytes.clone())),
                text(&self.job.name),
                text(name),
                big(Some(*window)),
            ]);
        }
        let result = self
            .session
            .batch(&batch, values)
            .await
            .with_context(|| format!("checkpointing {name}"))?;
        applied(result)
    }
}

impl Windows {
    /// Takes part `part`'s lease for `owner` (for the job's `lease`) unless another holder's
    /// has not run out; whether it did.
    async fn claim(&self, part: &str, owner: &str) -> anyhow::Result<bool> {
        let now = now_ms();
        let until = self.lease_until();
        let held = self
            .session
            .execute_unpaged(&self.statements.lease_read, (&self.job.name, part, LEASE))
            .await?
            .into_rows_result()?
            .maybe_first_row::<(Option<i64>, Option<Vec<u8>>)>()?;
        let result = match held {
            None => {
                self.session
                    .execute_unpaged(
                        &self.statements.lease_new,
                        (&self.job.name, part, LEASE, until, owner.as_bytes()),
                    )
                    .await?
            }
            Some((seen, holder)) => {
                if holder.as_deref() != Some(owner.as_bytes()) && seen.unwrap_or_default() > now {
                    return Ok(false);
                }
                self.session
                    .execute_unpaged(
                        &self.statements.lease_take,
                        (until, owner.as_bytes(), &self.job.name, part, LEASE, seen),
                    )
                    .await?
            }
        };
        applied(result)
    }

    /// When a lease taken or renewed now runs out (epoch ms).
    fn lease_until(&self) -> i64 {
        now_ms().saturating_add(self.job.lease.as_millis() as i64)
    }

    /// Sets part `part`'s lease, if `owner` holds it, to run out at `until` (epoch ms; 0 lets
    /// it go); whether `owner` held it.
    async fn hold(&self, part: &str, owner: &str, until: i64) -> anyhow::Result<bool> {
        let result = self
            .session
            .execute_unpaged(
                &self.statements.lease_renew,
                (until, &self.job.name, part, LEASE, owner.as_bytes()),
            )
            .await?;
        applied(result)
    }

    /// Closes the windows the watermark has passed: merges every part's stored partial of
    /// each, writes the results, advances the closed mark and deletes their partials. Returns
    /// the windows this call wrote; `closed_through` is the job's closed mark after it (the
    /// caller drops what it holds of windows ending at or before it).
    pub(super) async fn close_windows(&mut self) -> anyhow::Result<u64> {
        let Some(window) = self.aggregate.window.clone() else {
            return Ok(0);
        };
        let size = window.spec.size_ms;
        let rows = self
            .session
            .query_unpaged(
                format!(
                    "SELECT part, window, time, WRITETIME(position) FROM {} WHERE job = ?",
                    self.table
                ),
                (&self.job.name,),
            )
            .await?
            .into_rows_result()?;
        // The least largest event time of the parts that moved within `idle`.
        let active_since_us = (now_ms() - self.job.idle.as_millis() as i64) * 1_000;
        let mut least: Option<i64> = None;
        let mut closed: Option<i64> = None;
        let mut stored: Vec<(String, i64)> = Vec::new();
        let mut seen = 0;
        for row in rows.rows::<(String, i64, Option<i64>, Option<i64>)>()? {
            let (part, start, time, written_us) = row?;
            match (part.as_str(), start) {
                (JOB_PART, PROGRESS) => closed = time,
                (_, LEASE) => {}
                (_, PROGRESS) => {
                    seen += 1;
                    if let (Some(time), true) = (time, written_us.unwrap_or_default() >= active_since_us) {
                        least = Some(least.map_or(time, |least| least.min(time)));
                    }
                }
                _ => stored.push((part, start)),
            }
        }
        // A partition with no progress yet may simply not have been read yet (at a first start
        // each partition's first messages come in their own time): its rows would all be late.
        // It holds the watermark back until it has been still for `idle`.
        if seen < self.partitions && self.opened.elapsed() < self.job.idle {
            least = None;
        }
        let mut written = 0;
        if let Some(least) = least {
            let watermark = least.saturating_sub(window.lateness_ms);
            metrics::gauge!(metric::JOB_WATERMARK_LAG, "job" => self.job.name.clone())
                .set((now_ms() - watermark) as f64 / 1_000.0);
            let after = closed.unwrap_or(i64::MIN);
            let closable: BTreeSet<i64> = stored
                .iter()
                .map(|(_, start)| *start)
                .filter(|start| start.saturating_add(size) <= watermark && start.saturating_add(size) > after)
                .collect();
            if !closable.is_empty() {
                written = self.write_closed(&stored, &closable, size).await?;
                let advanced = self
                    .session
                    .execute_unpaged(
                        &self.statements.closed_mark,
                        (watermark, &self.job.name, JOB_PART, PROGRESS, closed),
                    )
                    .await?;
                closed = if applied(advanced)? {
                    Some(watermark)
                } else {
                    // Another gateway closed them first (with the same results).
                    self.load_closed().await?
                };
                tracing::info!(job = %self.job.name, windows = closable.len(), watermark, "windows closed");
            }
        }
        self.closed_through = closed;
        if let Some(closed) = closed {
            for (part, start) in stored.iter().filter(|(_, start)| start.saturating_add(size) <= closed) {
                self.session
                    .execute_unpaged(&self.statements.delete, (&self.job.name, part, *start))
                    .await?;
            }
        }
        Ok(written)
    }

    /// Merges the stored partials of the `closable` windows (read only now, and only theirs)
    /// and writes their results with the window's end as the write timestamp.
    async fn write_closed(&self, stored: &[(String, i64)], closable: &BTreeSet<i64>, size: i64) -> anyhow::Result<u64> {
        let mut merged: BTreeMap<i64, Partial> = BTreeMap::new();
        for (part, start) in stored.iter().filter(|(_, start)| closable.contains(start)) {
            let bytes = self
                .session
                .execute_unpaged(&self.statements.partial, (&self.job.name, part, *start))
                .await?
                .into_rows_result()?
                .maybe_first_row::<(Option<Vec<u8>>,)>()?
                .and_then(|(bytes,)| bytes);
            if let Some(bytes) = bytes {
                let partial: Partial = serde_json::from_slice(&bytes)
                    .with_context(|| format!("the stored partial of {part}, window {start}"))?;
                merged.entry(*start).or_default().merge(partial);
            }
        }
        let columns = result_columns(&self.aggregate);
        let mut written = 0;
        for (start, partial) in merged {
            let (keys, rows): (Vec<String>, Vec<Row>) = partial.keyed_rows().into_iter().unzip();
            let ids = keys.iter().map(|key| message_id(&self.job.name, key)).collect();
            // The window's end is the write timestamp: writing it again leaves identical cells.
            let end_us = start.saturating_add(size).saturating_mul(1_000);
            self.output.write(&columns, rows, ids, end_us).await?;
            written += 1;
            metrics::counter!(metric::JOB_WINDOWS_CLOSED, "job" => self.job.name.clone()).increment(1);
        }
        Ok(written)
    }

    /// Drops from `partial` the windows the job has closed.
    pub(super) fn drop_closed(&self, partial: &mut Partial) {
        if let (Some(window), Some(closed)) = (&self.aggregate.window, self.closed_through) {
            partial.drop_closed(window.spec.size_ms, closed);
        }
    }
}

impl Stream {
    /// Maps the job's routes and opens their feeds: a consumer of each Kafka route's topic, the
    /// stream of each JetStream route.
    async fn sources(&self, routes: &[RouteConfig]) -> anyhow::Result<Vec<Source>> {
        let job = &self.windows.job;
        let mut sources = Vec::with_capacity(routes.len());
        for route in routes {
            let (name, feed) = match &route.source {
                SourceConfig::Kafka(kafka) => (
                    kafka.topic.clone(),
                    Feed::Kafka(subscribe(&job.name, &route.name, kafka)?),
                ),
                SourceConfig::JetStream(config) => {
                    let client = crate::sink::broker::nats::connect(&config.url, &route.name, config.security.as_ref())
                        .await
                        .map_err(|e| anyhow::anyhow!("job `{}`: route `{}`: {e}", job.name, route.name))?;
                    let stream = async_nats::jetstream::new(client)
                        .get_stream(&config.stream)
                        .await
                        .with_context(|| format!("job `{}`: JetStream stream `{}`", job.name, config.stream))?;
                    let (acks, _) = tokio::sync::mpsc::unbounded_channel();
                    (
                        config.stream.clone(),
                        Feed::JetStream {
                            stream: Box::new(stream),
                            acks,
                        },
                    )
                }
                _ => anyhow::bail!(
                    "job `{}`: route `{}` is neither a Kafka nor a JetStream route",
                    job.name,
                    route.name
                ),
            };
            let (mapper, _) = prepare_route(&self.windows.session, route).await?;
            let names = route_columns(job, &route.name, &mapper)?;
            sources.push(Source {
                positions: Positions::new(&names, &self.compiled),
                feed,
                route: route.name.clone(),
                name,
                mapper,
                names,
            });
        }
        Ok(sources)
    }

    /// Takes the lease of every JetStream source's part (waiting while another gateway holds
    /// one: it folds that stream) and opens an ordered consumer of the stream from the part's
    /// stored sequence. `None` when told to cancel or stop meanwhile.
    async fn open_streams<'s>(
        &mut self,
        sources: &'s [Source],
        parts: &mut HashMap<(usize, i32), Part>,
        signal: &mut Signal,
    ) -> anyhow::Result<Option<Vec<futures::stream::BoxStream<'s, (usize, anyhow::Result<Item<'s>>)>>>> {
        let mut feeds = Vec::new();
        for (index, source) in sources.iter().enumerate() {
            let Feed::JetStream { stream, acks } = &source.feed else {
                continue;
            };
            let name = part_name(&source.route, 0);
            let mut waiting = false;
            while !self.windows.claim(&name, &self.owner).await? {
                if !waiting {
                    waiting = true;
                    tracing::info!(job = %self.windows.job.name, part = %name, "another gateway folds this stream; waiting for its lease");
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.windows.job.lease / 3) => {}
                    command = next_command(signal) => {
                        if matches!(command, Command::Cancel | Command::Stop) {
                            return Ok(None);
                        }
                    }
                }
            }
            let part = self.windows.load_part(&name).await?;
            let deliver_policy = match part.position {
                Some(next) => DeliverPolicy::ByStartSequence {
                    start_sequence: next.max(1) as u64,
                },
                None => DeliverPolicy::All,
            };
            tracing::info!(job = %self.windows.job.name, part = %name, from = ?part.position, "folding the stream");
            let messages = stream
                .create_consumer(OrderedConfig {
                    deliver_policy,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("an ordered consumer of JetStream stream `{}`", source.name))?
                .messages()
                .await
                .with_context(|| format!("reading JetStream stream `{}`", source.name))?;
            parts.insert((index, 0), part);
            let acks = acks.clone();
            feeds.push(
                messages
                    .map(move |message| {
                        let item = message
                            .map(|message| Item::JetStream(crate::bridge::nats::source_message(message, &acks)))
                            .map_err(anyhow::Error::from);
                        (index, item)
                    })
                    .boxed(),
            );
        }
        Ok(Some(feeds))
    }

    /// One pass: read until cancelled or stopped, checkpointing every `checkpoint`; ends early
    /// when a checkpoint is refused.
    async fn pass(&mut self, sources: &[Source], signal: &mut Signal) -> anyhow::Result<Ended> {
        self.windows.closed_through = self.windows.load_closed().await?;
        let mut parts: HashMap<(usize, i32), Part> = HashMap::new();
        let Some(mut feeds) = self.open_streams(sources, &mut parts, signal).await? else {
            return Ok(Ended::Stopped);
        };
        for (index, source) in sources.iter().enumerate() {
            if let Feed::Kafka(consumer) = &source.feed {
                feeds.push(
                    consumer
                        .stream()
                        .map(move |message| (index, message.map(Item::Kafka).map_err(anyhow::Error::from)))
                        .boxed(),
                );
            }
        }
        let mut messages = futures::stream::select_all(feeds);
        let mut tick = tokio::time::interval(self.windows.job.checkpoint);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut command = *signal.borrow_and_update();
        loop {
            if command != Command::Run {
                // What was folded is made durable before pausing or ending.
                if let Ended::Refused = self.checkpoint(sources, &mut parts).await? {
                    return Ok(Ended::Refused);
                }
                self.close_windows(&mut parts).await?;
                while command == Command::Pause {
                    command = self.paused(sources, &parts, signal).await?;
                }
                if command != Command::Run {
                    self.let_go(sources, &parts).await;
                    return Ok(Ended::Stopped);
                }
            }
            tokio::select! {
                next = next_command(signal) => command = next,
                _ = tick.tick() => {
                    if let Ended::Refused = self.checkpoint(sources, &mut parts).await? {
                        return Ok(Ended::Refused);
                    }
                    self.close_windows(&mut parts).await?;
                }
                Some((index, message)) = messages.next() => {
                    let source = &sources[index];
                    let message = message.with_context(|| format!("reading route `{}`'s {}", source.route, source.name))?;
                    match &message {
                        Item::Kafka(message) => {
                            let headers = text_headers(message);
                            let envelope = Envelope {
                                key: message.key(),
                                payload: message.payload(),
                                headers: &headers,
                                source: &source.name,
                                subject: None,
                                partition: Some(message.partition()),
                                position: message.offset(),
                                timestamp_ms: message.timestamp().to_millis(),
                            };
                            let coordinates = || {
                                vec![
                                    (headers::SOURCE_TOPIC, source.name.clone()),
                                    (headers::SOURCE_PARTITION, message.partition().to_string()),
                                    (headers::SOURCE_OFFSET, message.offset().to_string()),
                                ]
                            };
                            self.on_message(source, (index, message.partition()), &envelope, &coordinates, &mut parts).await?;
                        }
                        Item::JetStream(message) => {
                            let envelope = message.envelope(&source.name);
                            let coordinates = || message.origin.coordinates(&source.name, message.position);
                            self.on_message(source, (index, 0), &envelope, &coordinates, &mut parts).await?;
                        }
                    }
                }
            }
        }
    }

    /// While paused: keeps the JetStream parts' leases until the next command.
    async fn paused(
        &self,
        sources: &[Source],
        parts: &HashMap<(usize, i32), Part>,
        signal: &mut Signal,
    ) -> anyhow::Result<Command> {
        loop {
            tokio::select! {
                command = next_command(signal) => return Ok(command),
                _ = tokio::time::sleep(self.windows.job.lease / 3) => {
                    for name in leased(sources, parts) {
                        self.windows.hold(&name, &self.owner, self.windows.lease_until()).await?;
                    }
                }
            }
        }
    }

    /// Lets go of the JetStream parts' leases (the job stops here; another gateway may take
    /// them at once). Best effort: a lease not let go runs out.
    async fn let_go(&self, sources: &[Source], parts: &HashMap<(usize, i32), Part>) {
        for name in leased(sources, parts) {
            if let Err(error) = self.windows.hold(&name, &self.owner, 0).await {
                tracing::debug!(job = %self.windows.job.name, part = %name, error = %format!("{error:#}"), "letting go of the lease failed; it runs out");
            }
        }
    }

    /// Folds one message's rows into part `key`, unless a checkpoint counted it already;
    /// `coordinates` name it in a dead letter.
    async fn on_message(
        &mut self,
        source: &Source,
        key: (usize, i32),
        envelope: &Envelope<'_>,
        coordinates: &(dyn Fn() -> Vec<(&'static str, String)> + Sync),
        parts: &mut HashMap<(usize, i32), Part>,
    ) -> anyhow::Result<()> {
        let part = match parts.entry(key) {
            std::collections::hash_map::Entry::Occupied(held) => held.into_mut(),
            std::collections::hash_map::Entry::Vacant(new) => {
                new.insert(self.windows.load_part(&part_name(&source.route, key.1)).await?)
            }
        };
        let offset = envelope.position;
        if part.position.is_some_and(|next| offset < next) {
            self.report.replayed += 1;
            return Ok(());
        }
        part.position = Some(offset + 1);
        part.dirty = true;
        self.report.messages += 1;
        let rows = match source.mapper.map(envelope, 0) {
            Ok(rows) => rows,
            Err(_) => {
                // The route dead-letters it with the mapping's reason.
                self.report.unmapped += 1;
                return Ok(());
            }
        };
        let closed = self.windows.closed_through.unwrap_or(i64::MIN);
        let job = &self.windows.job.name;
        for mapped in rows.iter().filter(|row| row.target == 0 && !row.delete) {
            let row = row_of(&mapped.values, source.names.len(), None);
            match self
                .compiled
                .fold_row(&source.names, &source.positions, &row, &mut part.partial, closed)
            {
                Ok(Fold::Folded(time)) => {
                    self.report.rows_kept += 1;
                    part.max_time = part.max_time.max(time);
                }
                Ok(Fold::Skipped | Fold::Copied(_)) => {}
                Err((code, reason)) => {
                    self.report.rows_failed += 1;
                    metrics::counter!(metric::JOB_ROWS_FAILED, "job" => job.clone()).increment(1);
                    if code == ReasonCode::Late {
                        self.report.rows_late += 1;
                        metrics::counter!(metric::JOB_ROWS_LATE, "job" => job.clone()).increment(1);
                    }
                    if let Some(sink) = &self.windows.dead_letter {
                        let letter = DeadLetter {
                            route: job,
                            reason_code: code.as_str(),
                            reason: &reason,
                            source: coordinates(),
                            headers: envelope.headers,
                            key: envelope.key,
                            payload: envelope.payload,
                        };
                        sink.send(&letter).await;
                    }
                }
            }
        }
        self.rows_read.increment(rows.len() as u64);
        Ok(())
    }

    /// Makes every changed part durable ([`Windows::store`]; a JetStream part at every
    /// checkpoint, which renews its lease), then commits the Kafka offsets to the group.
    /// `Refused` when a condition failed (another gateway moved the part on, closed windows or
    /// took the lease).
    async fn checkpoint(
        &mut self,
        sources: &[Source],
        parts: &mut HashMap<(usize, i32), Part>,
    ) -> anyhow::Result<Ended> {
        let mut commits: Vec<TopicPartitionList> = sources.iter().map(|_| TopicPartitionList::new()).collect();
        for ((index, partition), part) in parts.iter_mut() {
            let source = &sources[*index];
            let lease = matches!(source.feed, Feed::JetStream { .. }).then_some(self.owner.as_str());
            let name = part_name(&source.route, *partition);
            if !part.dirty {
                // A still stream's lease is renewed alone: its progress row keeps the time it
                // last moved (`idle`).
                if let Some(owner) = lease {
                    if !self.windows.hold(&name, owner, self.windows.lease_until()).await? {
                        return Ok(Ended::Refused);
                    }
                }
                continue;
            }
            if !self.windows.store(&name, &part.snapshot()?, lease).await? {
                return Ok(Ended::Refused);
            }
            part.stored = part.position;
            part.dirty = false;
            if let (Some(position), Feed::Kafka(_)) = (part.position, &source.feed) {
                commits[*index].add_partition_offset(&source.name, *partition, Offset::Offset(position))?;
            }
        }
        for (source, commit) in sources.iter().zip(&commits) {
            if let (Feed::Kafka(consumer), true) = (&source.feed, commit.count() > 0) {
                if let Err(error) = consumer.commit(commit, CommitMode::Async) {
                    tracing::debug!(job = %self.windows.job.name, %error, "offset commit (for lag tools) failed");
                }
            }
        }
        Ok(Ended::Stopped)
    }

    /// Closes what the watermark passed and drops it from the parts held here.
    async fn close_windows(&mut self, parts: &mut HashMap<(usize, i32), Part>) -> anyhow::Result<()> {
        self.report.windows_closed += self.windows.close_windows().await?;
        for part in parts.values_mut() {
            self.windows.drop_closed(&mut part.partial);
        }
        Ok(())
    }
}

/// The names of the parts held under a lease: the JetStream sources' streams.
fn leased<'a>(sources: &'a [Source], parts: &'a HashMap<(usize, i32), Part>) -> impl Iterator<Item = String> + 'a {
    parts
        .keys()
        .filter(|(index, _)| matches!(sources[*index].feed, Feed::JetStream { .. }))
        .map(|(index, partition)| part_name(&sources[*index].route, *partition))
}

/// The columns of `route`'s first target — the names of the rows a stream job sees — checked
/// to hold every column the job's `group_by` and window name.
pub(super) fn route_columns(job: &JobConfig, route: &str, mapper: &RouteMapper) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = mapper.targets()[0].column_names().map(str::to_string).collect();
    let aggregate = job.aggregate.as_ref();
    let missing = aggregate
        .into_iter()
        .flat_map(|a| a.group_by.iter().chain(a.window.as_ref().map(|w| &w.column)))
        .find(|column| !names.contains(column));
    if let Some(column) = missing {
        anyhow::bail!(
            "job `{}`: route `{route}` maps no column `{column}` (its columns: {})",
            job.name,
            names.join(", ")
        );
    }
    Ok(names)
}

/// A stream job's progress every gateway shares: what its checkpoints hold.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Messages checkpointed, every partition together (the sum of their next offsets).
    pub messages: u64,
    /// Windows ending at or before this (epoch milliseconds) are closed and written.
    pub closed_through_ms: Option<i64>,
}

/// Reads stream job `job`'s [`Progress`] from `keyspace.job_windows`. Before the first stream
/// job of the keyspace has opened its state (jobs start just after `shardgate serving`), the
/// node does not know the table yet (nor for a moment after its schema row is written): nothing
/// is checkpointed, and the progress is the default.
pub async fn progress(session: &Session, keyspace: &str, job: &str) -> anyhow::Result<Progress> {
    let rows = match session
        .query_unpaged(
            format!(
                "SELECT part, position, time FROM {keyspace}.job_windows WHERE job = ? AND window = ? ALLOW FILTERING"
            ),
            (job, PROGRESS),
        )
        .await
    {
        Ok(result) => result.into_rows_result()?,
        Err(error) if crate::sink::scylla::retry::table_not_known_yet(&error) => return Ok(Progress::default()),
        Err(error) => return Err(error.into()),
    };
    let mut progress = Progress::default();
    for row in rows.rows::<(String, Option<i64>, Option<i64>)>()? {
        let (part, position, time) = row?;
        if part == JOB_PART {
            progress.closed_through_ms = time;
        } else {
            progress.messages += position.unwrap_or_default().max(0) as u64;
        }
    }
    Ok(progress)
}

/// A partition's name in `job_windows`: the route and the partition.
pub(super) fn part_name(route: &str, partition: i32) -> String {
    format!("{route}/{partition}")
}
