//! Replay jobs (`[job.source] replay = "<route>"`, and `shardgate replay --route`): a route's
//! dead letters sent back through the route — decoded, mapped and written with the route as
//! configured now, after the cause was fixed — from its dead-letter Kafka topic or table. Each
//! letter carries its source coordinates, message time and write timestamp, so replayed rows
//! get the cells the original write would have written. A letter that fails again goes back to
//! the dead-letter destination with its new reason.
//!
//! Progress is durable: a Kafka topic is read by the consumer group `shardgate-replay.<route>`
//! whose offsets are committed after each chunk (a second run starts where the first stopped);
//! table rows are deleted once replayed. Letters of other routes sharing the destination are
//! left alone (Kafka: skipped; table: not read). A transient database failure that outlasts
//! the retries stops the run before the chunk is committed, so nothing is lost.
//!
//! A run is a job task like the others: between chunks it pauses, resumes, and ends on cancel
//! or stop (after committing its last chunk); inside `serve` it runs on the island under the
//! [`super::control::JobControl`] (the `Jobs` service, `every` schedules), with the job's
//! metrics. `shardgate replay` and `shardgate job run` run it on their own tokio runtime.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures::{StreamExt as _, TryStreamExt as _};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimeuuid;

use super::signal::{next_command, steady, Command, Interrupted, Signal};
use crate::bridge::route::{prepare_route, TargetStatements};
use crate::config::{Config, DeadLetterConfig, KafkaSecurity, RouteConfig};
use crate::mapping::{write_timestamp_us, Envelope, MappedRow, RouteMapper};
use crate::sink::dead_letter::{headers, DeadLetter, DeadLetterRow, DeadLetterSink};
use crate::sink::scylla::retry::{execute_with_retries, Retries};
use crate::sink::scylla::writer::{self, Statements, WriteError, WriteOptions, WriteStatement};
use crate::sink::scylla::{self as sink, RowValues};
use crate::telemetry::{metric, RowMetrics};

/// Letters replayed concurrently.
const CONCURRENCY: usize = 64;
/// Letters per committed chunk.
const CHUNK: usize = 512;
/// Attempts of a transient write failure before the run stops.
const WRITE_ATTEMPTS: u32 = 8;
/// How long a Kafka poll waits.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// Polls in a row without a message before the topic counts as read to its end.
const IDLE_POLLS_MAX: u32 = 20;

/// Headers copied onto a letter that fails again: its source coordinates and times.
const COORDINATES: &[&[&str]] = &[
    headers::SOURCE_COORDINATES,
    &[headers::SOURCE_TIMESTAMP, headers::WRITE_TIMESTAMP],
];

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    /// Letters of this route read.
    pub letters: u64,
    /// Rows written.
    pub rows_written: u64,
    /// Letters the route's filter skips now.
    pub filtered: u64,
    /// Letters that failed again and went back to the dead-letter destination.
    pub dead_lettered_again: u64,
    /// Letters of other routes, left alone.
    pub other_routes: u64,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} letter(s) replayed: {} row(s) written, {} filtered, {} dead-lettered again; {} of other routes left alone",
            self.letters, self.rows_written, self.filtered, self.dead_lettered_again, self.other_routes
        )
    }
}

/// One dead letter as read back.
struct Letter {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: HashMap<String, String>,
}

enum Outcome {
    Written(u64),
    Filtered,
    DeadLettered,
}

/// The route, ready to map and write.
struct Replayer {
    route: RouteConfig,
    mapper: RouteMapper,
    session: Arc<Session>,
    statements: Vec<TargetStatements>,
    metrics: RowMetrics,
    sink: DeadLetterSink,
    /// The job's counters.
    counters: Counters,
    /// `shardgate replay` on a terminal: a spinner with the report so far.
    progress: Option<indicatif::ProgressBar>,
}

/// A replay job's metrics: letters read, rows written, letters dead-lettered again.
struct Counters {
    read: metrics::Counter,
    out: metrics::Counter,
    failed: metrics::Counter,
}

/// `shardgate replay` and `shardgate job run` of a replay job: replays the dead letters of
/// `route_name` as job `job` on a runtime of its own, until the destination is read to its end
/// or `stop` resolves (Ctrl-C, SIGTERM: the chunk in hand is finished and committed first).
pub fn run(
    config: Config,
    route_name: &str,
    job: &str,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<ReplayReport> {
    let Some(route) = config.routes.iter().find(|r| r.name == route_name).cloned() else {
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        bail!("no route `{route_name}` in the config; routes: {}", names.join(", "));
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let (command, signal) = steady();
    runtime.spawn(async move {
        stop.await;
        command.send_replace(Command::Stop);
    });
    let progress = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(format!("replaying route `{route_name}`'s dead letters"));
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    });
    let shown = progress.clone();
    let report = runtime.block_on(async move {
        let session = Arc::new(sink::connect(&config.cluster).await?);
        replay(session, &route, job, signal, progress).await
    });
    if let Some(bar) = shown {
        bar.finish_and_clear();
    }
    report
}

/// Replays the dead letters of `route` as job `job` through `session`, on the current tokio
/// runtime (multi-threaded), under `signal`: paused between chunks, ended by cancel or stop
/// once the chunk in hand is committed ([`Interrupted`], with the report so far).
pub async fn replay(
    session: Arc<Session>,
    route: &RouteConfig,
    job: &str,
    mut signal: Signal,
    progress: Option<indicatif::ProgressBar>,
) -> anyhow::Result<ReplayReport> {
    let (mapper, statements) = prepare_route(&session, route).await?;
    let (sink, _nats) = DeadLetterSink::open(&route.dead_letter, &route.name, &session)
        .await
        .map_err(|reason| anyhow::anyhow!("route `{}`: {reason}", route.name))?;
    let metrics = RowMetrics::new("replay", &route.tables_label(), 0);
    let counter = |name: &'static str| metrics::counter!(name, "job" => job.to_string());
    let replayer = Replayer {
        route: route.clone(),
        mapper,
        session,
        statements,
        metrics,
        sink,
        counters: Counters {
            read: counter(metric::JOB_ROWS_READ),
            out: counter(metric::JOB_ROWS_OUT),
            failed: counter(metric::JOB_ROWS_FAILED),
        },
        progress,
    };
    match replayer.route.dead_letter.clone() {
        DeadLetterConfig::Kafka {
            brokers,
            topic,
            security,
        } => {
            replayer
                .replay_topic(&brokers, &topic, security.as_ref(), &mut signal)
                .await
        }
        DeadLetterConfig::Table { keyspace, table } => replayer.replay_table(&keyspace, &table, &mut signal).await,
        DeadLetterConfig::Nats { subject, .. } => bail!(
            "route `{}` dead-letters to the NATS subject `{subject}`, which keeps nothing to replay; \
             replay reads a Kafka topic or a table",
            replayer.route.name
        ),
        DeadLetterConfig::Amqp { .. } => bail!(
            "route `{}` dead-letters to RabbitMQ; replay reads a Kafka topic or a table (shovel the \
             dead-letter queue back into the source queue to retry it)",
            replayer.route.name
        ),
    }
}

/// Between two chunks: waits out a pause; once cancelled or stopped, [`Interrupted`] with the
/// report so far.
async fn between_chunks(signal: &mut Signal, report: &ReplayReport) -> anyhow::Result<()> {
    loop {
        let command = *signal.borrow_and_update();
        let interrupted = match command {
            Command::Run => return Ok(()),
            Command::Pause => {
                next_command(signal).await;
                continue;
            }
            Command::Cancel => Interrupted("cancelled"),
            Command::Stop => Interrupted("stopped"),
        };
        let context = format!(
            "replay {}: {report} so far, committed (a next run goes on from there)",
            interrupted.0
        );
        return Err(anyhow::Error::new(interrupted).context(context));
    }
}

impl Replayer {
    /// Replays the route's letters in `topic` from the replay group's committed offsets to the
    /// end of the topic as it was when the run started.
    async fn replay_topic(
        &self,
        brokers: &str,
        topic: &str,
        security: Option<&KafkaSecurity>,
        signal: &mut Signal,
    ) -> anyhow::Result<ReplayReport> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("shardgate-replay.{}", self.route.name))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest");
        for (key, value) in security.into_iter().flat_map(KafkaSecurity::properties) {
            config.set(key, value);
        }
        let consumer: StreamConsumer = config.create().context("Kafka consumer")?;
        let (ends, mut positions) = tokio::task::block_in_place(|| assign_from_committed(&consumer, topic))?;
        let mut report = ReplayReport::default();
        let done = |positions: &HashMap<i32, i64>| {
            ends.iter()
                .all(|(p, end)| positions.get(p).copied().unwrap_or(0) >= *end)
        };
        let mut idle_polls = 0;
        while !done(&positions) && idle_polls < IDLE_POLLS_MAX {
            between_chunks(signal, &report).await?;
            let mut chunk = Vec::new();
            while chunk.len() < CHUNK {
                let Ok(polled) = tokio::time::timeout(POLL_WAIT, consumer.recv()).await else {
                    idle_polls += 1;
                    break;
                };
                idle_polls = 0;
                let message = polled?;
                let (partition, offset) = (message.partition(), message.offset());
                if offset >= ends.get(&partition).copied().unwrap_or(0) {
                    continue;
                }
                positions.insert(partition, offset + 1);
                chunk.push(Letter::of(&message));
                if done(&positions) {
                    break;
                }
            }
            self.replay_chunk(chunk, &mut report).await?;
            let mut progress = TopicPartitionList::new();
            for (&partition, &offset) in &positions {
                progress.add_partition_offset(topic, partition, Offset::Offset(offset))?;
            }
            tokio::task::block_in_place(|| consumer.commit(&progress, CommitMode::Sync))?;
        }
        if !done(&positions) {
            bail!("`{topic}` stopped delivering before its end; {report} so far (committed, rerun to continue)");
        }
        Ok(report)
    }

    /// Replays the route's rows of `keyspace.table` written before the run started, deleting
    /// each once replayed.
    async fn replay_table(&self, keyspace: &str, table: &str, signal: &mut Signal) -> anyhow::Result<ReplayReport> {
        let started_ms = chrono::Utc::now().timestamp_millis();
        let mut delete = self
            .session
            .prepare(format!(
                "DELETE FROM {keyspace}.{table} WHERE route = ? AND day = ? AND id = ?"
            ))
            .await?;
        delete.set_is_idempotent(true);
        let mut rows = self
            .session
            .query_iter(
                format!("SELECT route, day, id, reason_code, reason, headers, key, payload FROM {keyspace}.{table}"),
                &[],
            )
            .await?
            .rows_stream::<DeadLetterRow>()?;
        let mut report = ReplayReport::default();
        let mut chunk = Vec::new();
        let mut keys = Vec::new();
        while let Some((route, day, id, _code, _reason, headers, key, payload)) = rows.try_next().await? {
            if route != self.route.name {
                report.other_routes += 1;
                continue;
            }
            // Letters this run sent back (they failed again) are left for the next run.
            if timeuuid_ms(id).is_some_and(|ms| ms >= started_ms) {
                continue;
            }
            chunk.push(Letter {
                key,
                payload,
                headers: headers.unwrap_or_default(),
            });
            keys.push((route, day, id));
            if chunk.len() >= CHUNK {
                between_chunks(signal, &report).await?;
                self.replay_chunk(std::mem::take(&mut chunk), &mut report).await?;
                self.delete_rows(&delete, std::mem::take(&mut keys)).await?;
            }
        }
        self.replay_chunk(chunk, &mut report).await?;
        self.delete_rows(&delete, keys).await?;
        Ok(report)
    }

    async fn delete_rows(
        &self,
        delete: &PreparedStatement,
        keys: Vec<(String, String, CqlTimeuuid)>,
    ) -> anyhow::Result<()> {
        for key in keys {
            execute_with_retries(Retries::UpTo(WRITE_ATTEMPTS), || {
                self.session.execute_unpaged(delete, &key)
            })
            .await
            .context("deleting a replayed dead letter")?;
        }
        Ok(())
    }

    async fn replay_chunk(&self, chunk: Vec<Letter>, report: &mut ReplayReport) -> anyhow::Result<()> {
        let outcomes: Vec<anyhow::Result<Option<Outcome>>> = futures::stream::iter(chunk)
            .map(|letter| self.replay_one(letter))
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for outcome in outcomes {
            match outcome? {
                None => report.other_routes += 1,
                Some(outcome) => {
                    report.letters += 1;
                    self.counters.read.increment(1);
                    match outcome {
                        Outcome::Written(rows) => {
                            report.rows_written += rows;
                            self.counters.out.increment(rows);
                        }
                        Outcome::Filtered => report.filtered += 1,
                        Outcome::DeadLettered => {
                            report.dead_lettered_again += 1;
                            self.counters.failed.increment(1);
                        }
                    }
                }
            }
        }
        if let Some(bar) = &self.progress {
            bar.set_message(report.to_string());
        }
        Ok(())
    }

    /// `None` for a letter of another route.
    async fn replay_one(&self, letter: Letter) -> anyhow::Result<Option<Outcome>> {
        if letter.headers.get(headers::ROUTE) != Some(&self.route.name) {
            return Ok(None);
        }
        let header = |name: &str| letter.headers.get(name);
        let number = |names: &[&str]| names.iter().find_map(|n| header(n)?.parse::<i64>().ok());
        let source = [
            headers::SOURCE_TOPIC,
            headers::SOURCE_STREAM,
            headers::SOURCE_QUEUE,
            headers::SOURCE_SUBJECT,
            headers::SOURCE_ENDPOINT,
        ]
        .iter()
        .find_map(|n| header(n))
        .cloned()
        .unwrap_or_default();
        let position = number(&[headers::SOURCE_OFFSET, headers::SOURCE_SEQUENCE]).unwrap_or(0);
        let timestamp_ms = number(&[headers::SOURCE_TIMESTAMP]);
        let timestamp_us =
            number(&[headers::WRITE_TIMESTAMP]).unwrap_or_else(|| write_timestamp_us(timestamp_ms, position));
        let original_headers: Vec<(String, String)> = letter
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(headers::HEADER_PREFIX)?.to_string(), v.clone())))
            .collect();
        let key = letter
            .key
            .clone()
            .or_else(|| header(headers::KEY).map(|k| k.clone().into_bytes()));
        let envelope = Envelope {
            key: key.as_deref(),
            payload: letter.payload.as_deref(),
            headers: &original_headers,
            source: &source,
            subject: header(headers::SOURCE_SUBJECT)
                .or_else(|| header(headers::SOURCE_ROUTING_KEY))
                .map(String::as_str),
            partition: number(&[headers::SOURCE_PARTITION]).and_then(|p| i32::try_from(p).ok()),
            position,
            timestamp_ms,
        };
        let rows = match self.mapper.map(&envelope, timestamp_us) {
            Ok(rows) if rows.is_empty() => return Ok(Some(Outcome::Filtered)),
            Ok(rows) => rows,
            Err(error) => {
                self.dead_letter_again(
                    &letter,
                    &original_headers,
                    key.as_deref(),
                    error.code().as_str(),
                    &error.to_string(),
                )
                .await;
                return Ok(Some(Outcome::DeadLettered));
            }
        };
        let count = rows.len() as u64;
        if let Err(reason) = self.write_rows(rows).await? {
            self.dead_letter_again(
                &letter,
                &original_headers,
                key.as_deref(),
                crate::mapping::ReasonCode::WriteRejected.as_str(),
                &reason,
            )
            .await;
            return Ok(Some(Outcome::DeadLettered));
        }
        Ok(Some(Outcome::Written(count)))
    }

    /// Writes one letter's rows through the write engine: `Ok(Err(reason))` when the database
    /// refuses one for good; `Err` when it stays unavailable past the attempts.
    async fn write_rows(&self, rows: Vec<MappedRow>) -> anyhow::Result<Result<(), String>> {
        let options = WriteOptions {
            batch_rows_max: 1,
            retries: Retries::UpTo(WRITE_ATTEMPTS),
        };
        let placed = rows.into_iter().map(|row| ((None, 0), row)).collect();
        let mut refused = None;
        for (_, outcome) in writer::write_rows(&self.session, self, placed, options, &self.metrics).await {
            match outcome {
                Ok(()) => {}
                Err(WriteError::Refused(reason)) => refused = refused.or(Some(reason)),
                Err(error) => bail!("the cluster stays unavailable: {}", error.reason()),
            }
        }
        Ok(refused.map_or(Ok(()), Err))
    }

    async fn dead_letter_again(
        &self,
        letter: &Letter,
        original_headers: &[(String, String)],
        key: Option<&[u8]>,
        reason_code: &str,
        reason: &str,
    ) {
        let source = COORDINATES
            .iter()
            .flat_map(|names| names.iter())
            .filter_map(|&name| Some((name, letter.headers.get(name)?.clone())))
            .collect();
        self.sink
            .send(&DeadLetter {
                route: &self.route.name,
                reason_code,
                reason,
                source,
                headers: original_headers,
                key,
                payload: letter.payload.as_deref(),
            })
            .await;
    }
}

impl Statements<MappedRow> for Replayer {
    type Values = RowValues;

    fn statement(&self, row: &MappedRow) -> &WriteStatement {
        TargetStatements::of(&self.statements, row)
    }

    fn values<'r>(&self, row: &'r MappedRow) -> &'r RowValues {
        &row.values
    }
}

/// Assigns every partition of `topic` from the replay group's committed offsets; returns each
/// partition's end (high watermark when the run starts) and its start position.
fn assign_from_committed(
    consumer: &StreamConsumer,
    topic: &str,
) -> anyhow::Result<(HashMap<i32, i64>, HashMap<i32, i64>)> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(15))
        .with_context(|| format!("metadata of `{topic}`"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("dead-letter topic `{topic}` does not exist");
    }
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(15))?;
        ends.insert(partition, high);
        assignment.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(assignment, Duration::from_secs(15))?;
    let mut start = TopicPartitionList::new();
    let mut positions = HashMap::new();
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        positions.insert(element.partition(), offset);
        start.add_partition_offset(topic, element.partition(), Offset::Offset(offset))?;
    }
    consumer.assign(&start)?;
    Ok((ends, positions))
}

impl Letter {
    /// A dead letter read from a Kafka topic: key, payload and text headers.
    fn of(message: &rdkafka::message::BorrowedMessage<'_>) -> Letter {
        let mut headers = HashMap::new();
        if let Some(list) = message.headers() {
            for header in list.iter() {
                let value = header.value.map(|v| String::from_utf8_lossy(v).into_owned());
                headers.insert(header.key.to_string(), value.unwrap_or_default());
            }
        }
        Letter {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }
}

/// Milliseconds since the epoch of a version-1 UUID.
fn timeuuid_ms(id: CqlTimeuuid) -> Option<i64> {
    let (seconds, nanos) = uuid::Uuid::from(id).get_timestamp()?.to_unix();
    Some(seconds as i64 * 1000 + i64::from(nanos / 1_000_000))
}
