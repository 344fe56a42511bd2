//! The per-core half of every source: one [`RouteWriter`] per route, shared by all cores.
//! A source's consumer (Kafka poll thread, JetStream puller on the island) hands batches of
//! [`SourceMessage`]s to cores over bounded queues; [`run_on_core`] maps each message to a row,
//! places the row (token → replica, shard, owner core), keeps the rows the core owns and hands
//! every other owner its rows in one task over the cross-core mesh (`runtime::mesh`). Owners
//! write UNLOGGED batches of one replica and shard, retrying transient failures forever. What
//! cannot be mapped or written goes to the route's dead-letter destination; only then, or once
//! the row is confirmed, is the message completed (Kafka: contiguous watermark on the poll
//! thread; JetStream: ack, or term after a dead letter). Messages in flight per core and route
//! are bounded by a semaphore held until the owners answer, and the queues are bounded, so a
//! slow database stops consumption instead of growing memory.
//!
//! One message may become several rows (several target tables, upserts or deletes): it completes
//! once all of them are written, or is dead-lettered once if any is refused.
//!
//! Replays are idempotent: each write carries a timestamp derived from the message
//! (`mapping::write_timestamp_us` of its time and position, or the Kafka partition clock).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::dead_letter::{headers, DeadLetter, DeadLetterSink};
use crate::mapping::{write_timestamp_us, Envelope, MappedRow, RouteMapper};
use crate::runtime::mesh::Mesh;
use crate::sink::scylla::{batches_by_replica_shard, place_row, write_statements_once, Retries};
use crate::telemetry::RowMetrics;
use crate::topology::{Ownership, ReplicaShard};

/// Batches a core's queue holds per route before the source's consumer waits.
pub const CORE_QUEUE_BATCHES_MAX: usize = 8;

/// One source message, copied out of its client library, on its way to a core.
#[derive(Debug)]
pub struct SourceMessage {
    /// Position in its partition or stream (Kafka offset, JetStream stream sequence): orders
    /// messages of the same millisecond in the write timestamp.
    pub position: i64,
    /// Message time in milliseconds (Kafka create or log-append time, JetStream publish time).
    pub timestamp_ms: Option<i64>,
    /// Write timestamp the source assigned (Kafka: per-partition clock), else derived from
    /// `timestamp_ms` and `position`.
    pub write_timestamp_us: Option<i64>,
    /// Message key (Kafka; ZeroMQ first frame), if any.
    pub key: Option<Vec<u8>>,
    /// Headers or properties whose values are text (Kafka, NATS, JetStream, AMQP).
    pub headers: Vec<(String, String)>,
    /// Message payload; `None` for a Kafka tombstone.
    pub payload: Option<Vec<u8>>,
    /// Where it came from: how to acknowledge it and what to tell the dead-letter destination.
    pub origin: Origin,
}

/// Where a message came from.
#[derive(Debug)]
pub enum Origin {
    /// A Kafka partition; the poll thread stores offsets from the contiguous watermark.
    Kafka {
        /// Source partition.
        partition: i32,
        /// Watermark epoch the completion must carry.
        epoch: u64,
    },
    /// A JetStream consumer; the message is acked (or terminated once dead-lettered) itself.
    JetStream {
        /// Subject the message was published on.
        subject: String,
        /// The message, for its ack.
        message: Box<async_nats::jetstream::Message>,
    },
    /// A RabbitMQ queue; the delivery is acked, or rejected without requeue once dead-lettered.
    Amqp {
        /// Source queue.
        queue: String,
        /// Routing key it was published with.
        routing_key: String,
        /// Whether the broker delivered it before.
        redelivered: bool,
        /// Acks on the delivering channel.
        acker: lapin::acker::Acker,
    },
    /// A core NATS subscription: nothing to acknowledge (at-most-once).
    Nats {
        /// Subject the message was published on.
        subject: String,
    },
    /// A ZeroMQ socket: nothing to acknowledge (at-most-once).
    Zmq {
        /// The socket's endpoint.
        endpoint: String,
    },
    /// Already acknowledged: the message is in the core's spool (`ack = "spooled"`), written
    /// from there; or replayed from the spool after a restart.
    Spooled {
        /// Its source coordinates, for dead letters.
        coordinates: Vec<(&'static str, String)>,
        /// Kafka partition, if it came from Kafka.
        partition: Option<i32>,
    },
}

impl SourceMessage {
    /// The Kafka partition it came from, if any.
    pub fn partition(&self) -> Option<i32> {
        match &self.origin {
            Origin::Kafka { partition, .. } => Some(*partition),
            Origin::Spooled { partition, .. } => *partition,
            _ => None,
        }
    }

    /// The message's own subject: NATS or JetStream subject, AMQP routing key.
    pub fn subject(&self) -> Option<&str> {
        match &self.origin {
            Origin::JetStream { subject, .. } | Origin::Nats { subject } => Some(subject),
            Origin::Amqp { routing_key, .. } => Some(routing_key),
            Origin::Spooled { coordinates, .. } => coordinates
                .iter()
                .find(|(name, _)| *name == headers::SOURCE_SUBJECT || *name == headers::SOURCE_ROUTING_KEY)
                .map(|(_, value)| value.as_str()),
            Origin::Kafka { .. } | Origin::Zmq { .. } => None,
        }
    }

    /// What the mapper sees of this message.
    fn envelope<'a>(&'a self, source: &'a str) -> Envelope<'a> {
        Envelope {
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            headers: &self.headers,
            source,
            subject: self.subject(),
            partition: self.partition(),
            position: self.position,
            timestamp_ms: self.timestamp_ms,
        }
    }

    /// The write timestamp of this message's rows: the source's clock (Kafka), else derived
    /// from its time and position.
    pub fn write_timestamp_us(&self) -> i64 {
        self.write_timestamp_us
            .unwrap_or_else(|| write_timestamp_us(self.timestamp_ms, self.position))
    }

    /// Source coordinates, message time and write timestamp as dead-letter headers.
    fn coordinates(&self, source: &str) -> Vec<(&'static str, String)> {
        let mut coordinates = self.source_coordinates(source);
        if let Some(ms) = self.timestamp_ms {
            coordinates.push((headers::SOURCE_TIMESTAMP, ms.to_string()));
        }
        coordinates.push((headers::WRITE_TIMESTAMP, self.write_timestamp_us().to_string()));
        coordinates
    }

    /// Where the message came from, as dead-letter headers.
    pub fn source_coordinates(&self, source: &str) -> Vec<(&'static str, String)> {
        match &self.origin {
            Origin::Spooled { coordinates, .. } => coordinates.clone(),
            Origin::Kafka { partition, .. } => vec![
                (headers::SOURCE_TOPIC, source.to_string()),
                (headers::SOURCE_PARTITION, partition.to_string()),
                (headers::SOURCE_OFFSET, self.position.to_string()),
            ],
            Origin::JetStream { subject, .. } => vec![
                (headers::SOURCE_STREAM, source.to_string()),
                (headers::SOURCE_SUBJECT, subject.clone()),
                (headers::SOURCE_SEQUENCE, self.position.to_string()),
            ],
            Origin::Amqp {
                queue,
                routing_key,
                redelivered,
                ..
            } => vec![
                (headers::SOURCE_QUEUE, queue.clone()),
                (headers::SOURCE_ROUTING_KEY, routing_key.clone()),
                (headers::SOURCE_REDELIVERED, redelivered.to_string()),
            ],
            Origin::Nats { subject } => vec![
                (headers::SOURCE_SUBJECT, subject.clone()),
                (headers::SOURCE_SEQUENCE, self.position.to_string()),
            ],
            Origin::Zmq { endpoint } => vec![
                (headers::SOURCE_ENDPOINT, endpoint.clone()),
                (headers::SOURCE_SEQUENCE, self.position.to_string()),
            ],
        }
    }
}

/// A row with the replica and shard it belongs to.
type PlacedRow = (ReplicaShard, RowWork);

/// A Kafka message that is written or dead-lettered, reported to the poll thread.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// Source partition.
    pub partition: i32,
    /// Watermark epoch.
    pub epoch: u64,
    /// Source offset.
    pub offset: i64,
}

/// Counters of one route, shared by its poll thread and cores.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// Messages handed to cores.
    pub received: AtomicU64,
    /// Rows confirmed by the database.
    pub written: AtomicU64,
    /// Messages sent to the dead-letter destination.
    pub dead_lettered: AtomicU64,
    /// Messages skipped by the route's filter (or sent to no target).
    pub filtered: AtomicU64,
}

impl RouteCounters {
    /// The route's closing log line.
    pub fn log_stopped(&self, route: &str) {
        tracing::info!(
            route,
            received = self.received.load(Ordering::Relaxed),
            written = self.written.load(Ordering::Relaxed),
            dead_lettered = self.dead_lettered.load(Ordering::Relaxed),
            filtered = self.filtered.load(Ordering::Relaxed),
            "stopped"
        );
    }
}

/// Hands a source's batches to the cores in turn over their bounded queues (for sources
/// without partitions: JetStream, RabbitMQ, NATS, ZeroMQ).
pub struct RoundRobin {
    queues: Vec<tokio::sync::mpsc::Sender<Vec<SourceMessage>>>,
    next: usize,
}

impl RoundRobin {
    /// Over the route's per-core queues.
    pub fn new(queues: Vec<tokio::sync::mpsc::Sender<Vec<SourceMessage>>>) -> RoundRobin {
        RoundRobin { queues, next: 0 }
    }

    /// Number of cores.
    pub fn cores(&self) -> usize {
        self.queues.len()
    }

    fn next_queue(&mut self) -> tokio::sync::mpsc::Sender<Vec<SourceMessage>> {
        let core = self.next;
        self.next = (self.next + 1) % self.queues.len();
        self.queues[core].clone()
    }

    /// Counts `batch` received and hands it to the next core, waiting while that core's queue
    /// is full. `false` when the gateway is stopping (the batch is dropped: its messages were
    /// not acknowledged) or the core is gone.
    pub async fn hand_off(
        &mut self,
        batch: Vec<SourceMessage>,
        counters: &RouteCounters,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        counters.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let queue = self.next_queue();
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => false,
            sent = queue.send(batch) => sent.is_ok(),
        }
    }

    /// [`RoundRobin::hand_off`] from a plain thread: `false` when the core is gone.
    pub fn hand_off_blocking(&mut self, batch: Vec<SourceMessage>, counters: &RouteCounters) -> bool {
        counters.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.next_queue().blocking_send(batch).is_ok()
    }
}

/// The prepared statements of one target table.
pub struct TargetStatements {
    /// `INSERT ... USING [TTL ? AND] TIMESTAMP ?`.
    pub upsert: PreparedStatement,
    /// `DELETE ... USING TIMESTAMP ? WHERE <primary key>`.
    pub delete: PreparedStatement,
}

/// A message whose rows are being written, possibly on several cores.
struct Pending {
    work: SourceMessage,
    rows_left: AtomicUsize,
    /// The first permanent failure among its rows: (reason code, reason).
    failure: Mutex<Option<(&'static str, String)>>,
}

/// One row of a message on its way to its owner core.
type RowWork = (Arc<Pending>, MappedRow);

/// What a core needs to turn a route's messages into rows. Shared by all cores.
pub struct RouteWriter {
    /// Route name.
    pub route: String,
    /// Source topic or stream (for dead-letter headers).
    pub source: String,
    /// Message → rows.
    pub mapper: RouteMapper,
    /// The cluster session (sockets on the island).
    pub session: Arc<Session>,
    /// Prepared statements, by target index.
    pub statements: Vec<TargetStatements>,
    /// Where failed messages go.
    pub dead_letter: DeadLetterSink,
    /// Kafka completions back to the poll thread (unused by other sources).
    pub completions: Option<crossbeam_channel::Sender<Completion>>,
    /// Route counters.
    pub counters: Arc<RouteCounters>,
    /// Ring snapshot: each row's replica, shard and owner core.
    pub ownership: Arc<ArcSwap<Ownership>>,
    /// Rows per UNLOGGED batch.
    pub batch_rows_max: usize,
    /// The cross-core mesh rows travel to their owner core on.
    pub mesh: Arc<Mesh>,
    /// Metric handles of the route's tables, one per core.
    pub metrics: Vec<RowMetrics>,
    /// `ack = "spooled"`: messages are acknowledged once in the core's spool.
    pub spooled: bool,
}

impl RouteWriter {
    fn statement(&self, row: &MappedRow) -> &PreparedStatement {
        let statements = &self.statements[row.target];
        if row.delete {
            &statements.delete
        } else {
            &statements.upsert
        }
    }

    /// Processes a batch received on `core`. A spooled route first appends the batch to the
    /// core's spool, acknowledges the source once it is durable and releases the batch's
    /// in-flight `permit` (the source may read on while the rows are written), then writes the
    /// rows and completes the records. Otherwise the permit is held until the rows are written.
    async fn process_batch(
        self: &Arc<Self>,
        core: usize,
        mut batch: Vec<SourceMessage>,
        permit: glommio::sync::StaticPermit,
    ) {
        let metrics = &self.metrics[core];
        if !self.spooled {
            metrics.received.increment(batch.len() as u64);
            metrics.batch_rows.record(batch.len() as f64);
            self.write_batch(core, batch).await;
            drop(permit);
            return;
        }
        let coordinates: Vec<_> = batch.iter().map(|work| work.source_coordinates(&self.source)).collect();
        let records: Vec<Vec<u8>> = batch
            .iter()
            .zip(&coordinates)
            .map(|(work, coordinates)| super::spooled::encode(&self.route, work, coordinates))
            .collect();
        let bytes = records.iter().map(|r| r.len() as u64).sum();
        let ids = super::spooled::append(&self.route, records).await;
        metrics.received.increment(batch.len() as u64);
        metrics.batch_rows.record(batch.len() as f64);
        for (work, coordinates) in batch.iter_mut().zip(coordinates) {
            self.complete(core, work, false);
            work.origin = Origin::Spooled {
                coordinates,
                partition: work.partition(),
            };
        }
        drop(permit);
        // Written from memory while the core's budget allows; beyond, the records wait on disk
        // and the core's drain reads them back (`spooled::drain_on_core`).
        let Some(held) = super::spooled::hold(bytes) else {
            super::spooled::defer(&ids);
            return;
        };
        self.write_batch(core, batch).await;
        super::spooled::complete(&ids).await;
        drop(held);
    }

    /// Writes messages read back from the core's spool (left by the previous run, or deferred),
    /// then completes their records.
    pub async fn write_replayed(
        self: &Arc<Self>,
        core: usize,
        batch: Vec<SourceMessage>,
        ids: Vec<crate::spool::RecordId>,
    ) {
        self.write_batch(core, batch).await;
        super::spooled::complete(&ids).await;
    }

    /// Maps a batch of messages received on `core`, writes each row on its owner core (in
    /// UNLOGGED batches of one replica and shard), dead-letters what cannot be mapped or
    /// written, and reports every message's completion only after all its rows are written or
    /// its dead letter delivered. Returns once every owner has answered.
    async fn write_batch(self: &Arc<Self>, core: usize, batch: Vec<SourceMessage>) {
        let ownership = self.ownership.load();
        let metrics = &self.metrics[core];
        let mut by_owner: BTreeMap<usize, Vec<PlacedRow>> = BTreeMap::new();
        let mut unmappable = Vec::new();
        for work in batch {
            match self.mapper.map(&work.envelope(&self.source), work.write_timestamp_us()) {
                Ok(rows) if rows.is_empty() => {
                    self.counters.filtered.fetch_add(1, Ordering::Relaxed);
                    metrics.filtered.increment(1);
                    self.complete(core, &work, false);
                }
                Ok(rows) => {
                    let pending = Arc::new(Pending {
                        work,
                        rows_left: AtomicUsize::new(rows.len()),
                        failure: Mutex::new(None),
                    });
                    for row in rows {
                        let placement = place_row(self.statement(&row), &row.values, &ownership);
                        let owner = placement.map_or(core, |p| p.core);
                        let replica_shard = placement.map_or((None, 0), |p| p.replica_shard());
                        by_owner
                            .entry(owner)
                            .or_default()
                            .push((replica_shard, (Arc::clone(&pending), row)));
                    }
                }
                Err(error) => unmappable.push((work, error)),
            }
        }
        let dead_letters = unmappable.into_iter().map(|(work, error)| async move {
            self.dead_letter(core, &work, error.code().as_str(), &error.to_string())
                .await;
            self.complete(core, &work, true);
        });
        let writes = by_owner.into_iter().map(|(owner, rows)| async move {
            if owner == core {
                return self.write_rows(core, rows).await;
            }
            metrics.forwarded.increment(rows.len() as u64);
            let writer = Arc::clone(self);
            let forwarded = self
                .mesh
                .run_on(owner, move || async move { writer.write_rows(owner, rows).await })
                .await;
            if let Err(gone) = forwarded {
                // Only at shutdown. The rows' messages are never completed, so their offsets are
                // not stored and they replay on the next start.
                tracing::warn!(route = %self.route, %gone, "rows not forwarded; they replay on restart");
            }
        });
        futures::join!(
            futures::future::join_all(dead_letters),
            futures::future::join_all(writes)
        );
    }

    /// Writes rows on `core` in UNLOGGED batches of one replica and shard.
    async fn write_rows(&self, core: usize, rows: Vec<PlacedRow>) {
        let chunks = batches_by_replica_shard(rows, self.batch_rows_max);
        let writes = chunks.into_iter().map(|chunk| self.write_chunk(core, chunk));
        futures::future::join_all(writes).await;
    }

    /// Writes one chunk on `core`, retrying transient failures until they pass. If the database
    /// refuses the chunk for a permanent reason, its rows are written one by one so only the
    /// refused ones fail their messages.
    async fn write_chunk(&self, core: usize, chunk: Vec<RowWork>) {
        let metrics = &self.metrics[core];
        let rows: Vec<_> = chunk
            .iter()
            .map(|(_, row)| (self.statement(row), &row.values))
            .collect();
        let started = Instant::now();
        let outcome = write_statements_once(&self.session, &rows, Retries::Forever).await;
        metrics.write_latency.record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                self.counters.written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                metrics.written.increment(chunk.len() as u64);
                for (pending, _) in &chunk {
                    self.row_done(core, pending, None).await;
                }
            }
            Err(_) if chunk.len() > 1 => {
                let singles = chunk.into_iter().map(|single| self.write_single(core, single));
                futures::future::join_all(singles).await;
            }
            Err(error) => {
                let (pending, _) = &chunk[0];
                self.row_done(core, pending, Some(error.to_string())).await;
            }
        }
    }

    async fn write_single(&self, core: usize, (pending, row): RowWork) {
        let statement = self.statement(&row);
        let failure = match write_statements_once(&self.session, &[(statement, &row.values)], Retries::Forever).await {
            Ok(()) => {
                self.counters.written.fetch_add(1, Ordering::Relaxed);
                self.metrics[core].written.increment(1);
                None
            }
            Err(error) => Some(error.to_string()),
        };
        self.row_done(core, &pending, failure).await;
    }

    /// One row of a message is written (or refused, with the reason). The last row completes the
    /// message: acknowledged when every row was written, else dead-lettered with the first
    /// refusal and then acknowledged.
    async fn row_done(&self, core: usize, pending: &Pending, refused: Option<String>) {
        let failure = {
            let mut failure = match pending.failure.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let (Some(reason), None) = (refused, failure.as_ref()) {
                *failure = Some((crate::mapping::ReasonCode::WriteRejected.as_str(), reason));
            }
            if pending.rows_left.fetch_sub(1, Ordering::AcqRel) != 1 {
                return;
            }
            failure.take()
        };
        match failure {
            Some((code, reason)) => {
                self.dead_letter(core, &pending.work, code, &reason).await;
                self.complete(core, &pending.work, true);
            }
            None => self.complete(core, &pending.work, false),
        }
    }

    /// Reports a message done: a Kafka completion to the poll thread (a closed channel only
    /// happens after a shutdown deadline, when the message is replayed anyway), or a JetStream
    /// ack — a termination when the message was dead-lettered, so it is never redelivered.
    fn complete(&self, core: usize, work: &SourceMessage, dead_lettered: bool) {
        if matches!(work.origin, Origin::Spooled { .. }) {
            return;
        }
        if let Some(sent_ms) = work.timestamp_ms {
            let age_ms = chrono::Utc::now().timestamp_millis() - sent_ms;
            self.metrics[core].delivery_latency.record(age_ms.max(0) as f64 / 1e3);
        }
        match &work.origin {
            Origin::Kafka { partition, epoch } => {
                if let Some(completions) = &self.completions {
                    let _ = completions.send(Completion {
                        partition: *partition,
                        epoch: *epoch,
                        offset: work.position,
                    });
                }
            }
            Origin::JetStream { message, .. } => {
                let message = message.clone();
                let route = self.route.clone();
                let kind = if dead_lettered {
                    async_nats::jetstream::AckKind::Term
                } else {
                    async_nats::jetstream::AckKind::Ack
                };
                // The ack is a publish on the island's connection; not awaited on the core.
                tokio::spawn(async move {
                    if let Err(error) = message.ack_with(kind).await {
                        tracing::warn!(%route, %error, "JetStream ack failed; the message will be redelivered");
                    }
                });
            }
            Origin::Amqp { acker, .. } => {
                let acker = acker.clone();
                let route = self.route.clone();
                tokio::spawn(async move {
                    let result = if dead_lettered {
                        acker
                            .reject(lapin::options::BasicRejectOptions { requeue: false })
                            .await
                    } else {
                        acker.ack(lapin::options::BasicAckOptions::default()).await
                    };
                    if let Err(error) = result {
                        tracing::warn!(%route, %error, "RabbitMQ ack failed; the message will be redelivered");
                    }
                });
            }
            Origin::Nats { .. } | Origin::Zmq { .. } | Origin::Spooled { .. } => {}
        }
    }

    async fn dead_letter(&self, core: usize, work: &SourceMessage, reason_code: &str, reason: &str) {
        self.metrics[core].failed(reason_code, 1);
        tracing::debug!(route = %self.route, position = work.position, reason_code, reason, "dead-lettering message");
        self.dead_letter
            .send(&DeadLetter {
                route: &self.route,
                reason_code,
                reason,
                source: work.coordinates(&self.source),
                headers: &work.headers,
                key: work.key.as_deref(),
                payload: work.payload.as_deref(),
            })
            .await;
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs on core `core`: processes the batches this core receives for one route, with at most
/// `inflight_max` messages in flight (forwarded rows included), until the poll thread closes the
/// queue; then waits for the messages still in flight.
pub async fn run_on_core(
    core: usize,
    writer: Arc<RouteWriter>,
    mut queue: tokio::sync::mpsc::Receiver<Vec<SourceMessage>>,
    inflight_max: usize,
) {
    let permits = Rc::new(glommio::sync::Semaphore::new(inflight_max as u64));
    while let Some(batch) = queue.recv().await {
        let units = batch.len().clamp(1, inflight_max) as u64;
        let Ok(permit) = permits.acquire_static_permit(units).await else {
            return;
        };
        let writer = Arc::clone(&writer);
        glommio::spawn_local(async move { writer.process_batch(core, batch, permit).await }).detach();
    }
    let _ = permits.acquire(inflight_max as u64).await;
}
