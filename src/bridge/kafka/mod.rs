//! Kafka source: a consumer group on one topic, at-least-once into a table.
//!
//! Threads:
//! - one housekeeping poll thread per route ([`Poller::run`]) owns the `BaseConsumer`: it polls
//!   (which also drives rebalances), hands each message to the core that owns its partition
//!   (`topology::kafka_partition_owner`) in batches over a bounded channel, and stores offsets
//!   from the contiguous watermark as completions come back;
//! - each core runs [`run_on_core`] for the partitions it owns: decode and map a batch, place
//!   each row (token → replica, shard, owner core), keep the rows it owns and hand every other
//!   owner its rows in one task over the cross-core mesh (`runtime::mesh`); each owner writes
//!   its rows in UNLOGGED batches of one replica and shard with retry. What cannot be mapped or
//!   written is dead-lettered; completions are reported once the owner's write (or the dead
//!   letter) is confirmed. Messages in flight per core and route are bounded by a semaphore that
//!   is held until the owners answer.
//!
//! Delivery contract: an offset is stored (and later auto-committed) only after the message and
//! every message before it in its partition is written or dead-lettered; a `kill -9` therefore
//! replays from the last committed offset, and replays write identical cells because each write
//! carries a timestamp derived from the message (`mapping::write_timestamp_us`). When the cores'
//! queues are full the poll thread blocks, so memory stays bounded.

pub mod dead_letter;
pub mod watermark;

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, TopicPartitionList};
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use arc_swap::ArcSwap;

use crate::config::{KafkaSourceConfig, StartFrom};
use crate::mapping::{write_timestamp_us, RowMapper, RowValues};
use crate::runtime::mesh::Mesh;
use crate::sink::scylla::{batches_by_replica_shard, place_row, with_timestamp, write_rows_once, Retries};
use crate::telemetry::RowMetrics;
use crate::topology::{kafka_partition_owner, Ownership, ReplicaShard};
use dead_letter::{DeadLetter, DeadLetterTopic};
use watermark::Watermarks;

/// Messages taken from librdkafka per dispatch round.
const POLL_BATCH_MAX: usize = 512;
/// How long one poll waits when nothing is buffered.
const POLL_WAIT: Duration = Duration::from_millis(50);
/// Batches a core's queue holds per route before the poll thread blocks.
pub const CORE_QUEUE_BATCHES_MAX: usize = 8;
/// How long start-up waits for broker metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(15);
/// Interval of the progress log line.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// One message, copied out of librdkafka, on its way to its owner core.
#[derive(Debug)]
pub struct KafkaWork {
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Watermark epoch the completion must carry.
    pub epoch: u64,
    /// Message time in milliseconds (create or log-append time), if the broker has one.
    pub timestamp_ms: Option<i64>,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message payload; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
}

/// A message and the row it maps to.
type MappedRow = (KafkaWork, RowValues);

/// A mapped row with the replica and shard it belongs to.
type PlacedRow = (ReplicaShard, MappedRow);

/// A message that is written or dead-lettered.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    partition: i32,
    epoch: u64,
    offset: i64,
}

/// Counters of one route, shared by its poll thread and cores.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// Messages handed to cores.
    pub received: AtomicU64,
    /// Rows confirmed by the database.
    pub written: AtomicU64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
}

/// What a core needs to turn a route's messages into rows. Shared by all cores.
pub struct RouteWriter {
    /// Route name.
    pub route: String,
    /// Source topic (for dead-letter headers).
    pub topic: String,
    /// Message → bound values.
    pub mapper: RowMapper,
    /// The cluster session (sockets on the island).
    pub session: Arc<Session>,
    /// The route's prepared insert.
    pub insert: PreparedStatement,
    /// Where failed messages go.
    pub dead_letter: DeadLetterTopic,
    /// Completions back to the poll thread.
    pub completions: crossbeam_channel::Sender<Completion>,
    /// Route counters.
    pub counters: Arc<RouteCounters>,
    /// Ring snapshot: each row's replica, shard and owner core.
    pub ownership: Arc<ArcSwap<Ownership>>,
    /// Rows per UNLOGGED batch.
    pub batch_rows_max: usize,
    /// The cross-core mesh rows travel to their owner core on.
    pub mesh: Arc<Mesh>,
    /// Metric handles of the route's table, one per core.
    pub metrics: Vec<RowMetrics>,
}

impl RouteWriter {
    /// Maps a batch of messages received on `core`, writes each row on its owner core (in
    /// UNLOGGED batches of one replica and shard), dead-letters what cannot be mapped or
    /// written, and reports every message's completion only after its row is written or its
    /// dead letter delivered. Returns once every owner has answered.
    async fn process_batch(self: &Arc<Self>, core: usize, batch: Vec<KafkaWork>) {
        let ownership = self.ownership.load();
        let metrics = &self.metrics[core];
        metrics.received.increment(batch.len() as u64);
        metrics.batch_rows.record(batch.len() as f64);
        let mut by_owner: BTreeMap<usize, Vec<PlacedRow>> = BTreeMap::new();
        let mut unmappable = Vec::new();
        for work in batch {
            match self.mapper.map_json(work.key.as_deref(), work.payload.as_deref()) {
                Ok(values) => {
                    let values = with_timestamp(values, write_timestamp_us(work.timestamp_ms, work.offset));
                    let placement = place_row(&self.insert, &values, &ownership);
                    let owner = placement.map_or(core, |p| p.core);
                    let replica_shard = placement.map_or((None, 0), |p| p.replica_shard());
                    by_owner.entry(owner).or_default().push((replica_shard, (work, values)));
                }
                Err(error) => unmappable.push((work, error)),
            }
        }
        let dead_letters = unmappable.into_iter().map(|(work, error)| async move {
            self.dead_letter(core, &work, error.code(), &error.to_string()).await;
            self.complete(core, &work);
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
    /// refused ones are dead-lettered.
    async fn write_chunk(&self, core: usize, chunk: Vec<MappedRow>) {
        let metrics = &self.metrics[core];
        let rows: Vec<&RowValues> = chunk.iter().map(|(_, values)| values).collect();
        let started = Instant::now();
        let outcome = write_rows_once(&self.session, &self.insert, &rows, Retries::Forever).await;
        metrics.write_latency.record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                self.counters.written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                metrics.written.increment(chunk.len() as u64);
                chunk.iter().for_each(|(work, _)| self.complete(core, work));
            }
            Err(_) if chunk.len() > 1 => {
                let singles = chunk.into_iter().map(|single| self.write_single(core, single));
                futures::future::join_all(singles).await;
            }
            Err(error) => {
                let (work, _) = &chunk[0];
                self.dead_letter(core, work, "write_rejected", &error.to_string()).await;
                self.complete(core, work);
            }
        }
    }

    async fn write_single(&self, core: usize, (work, values): MappedRow) {
        match write_rows_once(&self.session, &self.insert, &[&values], Retries::Forever).await {
            Ok(()) => {
                self.counters.written.fetch_add(1, Ordering::Relaxed);
                self.metrics[core].written.increment(1);
            }
            Err(error) => {
                self.dead_letter(core, &work, "write_rejected", &error.to_string())
                    .await
            }
        }
        self.complete(core, &work);
    }

    /// Reports a message done. The poll thread outlives every writer task; a closed channel
    /// only happens after a shutdown deadline, when the message is replayed anyway.
    fn complete(&self, core: usize, work: &KafkaWork) {
        if let Some(sent_ms) = work.timestamp_ms {
            let age_ms = chrono::Utc::now().timestamp_millis() - sent_ms;
            self.metrics[core].delivery_latency.record(age_ms.max(0) as f64 / 1e3);
        }
        let _ = self.completions.send(Completion {
            partition: work.partition,
            epoch: work.epoch,
            offset: work.offset,
        });
    }

    async fn dead_letter(&self, core: usize, work: &KafkaWork, reason_code: &str, reason: &str) {
        self.metrics[core].failed(reason_code, 1);
        tracing::debug!(route = %self.route, partition = work.partition, offset = work.offset, reason_code, reason, "dead-lettering message");
        self.dead_letter
            .send(&DeadLetter {
                reason_code,
                reason,
                topic: &self.topic,
                partition: work.partition,
                offset: work.offset,
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
    mut queue: tokio::sync::mpsc::Receiver<Vec<KafkaWork>>,
    inflight_max: usize,
) {
    let permits = Rc::new(glommio::sync::Semaphore::new(inflight_max as u64));
    while let Some(batch) = queue.recv().await {
        let units = batch.len().clamp(1, inflight_max) as u64;
        let Ok(permit) = permits.acquire_static_permit(units).await else {
            return;
        };
        let writer = Arc::clone(&writer);
        glommio::spawn_local(async move {
            writer.process_batch(core, batch).await;
            drop(permit);
        })
        .detach();
    }
    let _ = permits.acquire(inflight_max as u64).await;
}

/// Rebalance events recorded inside `poll` and applied right after it returns.
#[derive(Debug)]
enum RebalanceEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Consumer context that records rebalances for the poll loop.
#[derive(Default)]
pub struct RebalanceRecorder {
    events: Mutex<Vec<RebalanceEvent>>,
}

fn partitions_of(list: &TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

impl RebalanceRecorder {
    fn push(&self, event: RebalanceEvent) {
        match self.events.lock() {
            Ok(mut events) => events.push(event),
            Err(poisoned) => poisoned.into_inner().push(event),
        }
    }

    fn take(&self) -> Vec<RebalanceEvent> {
        match self.events.lock() {
            Ok(mut events) => std::mem::take(&mut *events),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }
}

impl ClientContext for RebalanceRecorder {}

impl ConsumerContext for RebalanceRecorder {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            self.push(RebalanceEvent::Revoked(partitions_of(list)));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => self.push(RebalanceEvent::Assigned(partitions_of(list))),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "consumer group rebalance failed"),
        }
    }
}

/// The route's consumer, subscribed and checked against the brokers.
pub type RouteConsumer = BaseConsumer<RebalanceRecorder>;

/// Creates the consumer, checks that the brokers answer, and subscribes. Called at start-up
/// on the (unpinned) main thread, so librdkafka's threads are not bound to a data-plane core.
pub fn subscribe(source: &KafkaSourceConfig, route: &str) -> Result<RouteConsumer, KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &source.brokers)
        .set("group.id", &source.group_id)
        .set("client.id", format!("shardgate-{route}"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.commit.interval.ms",
            source.commit_interval.as_millis().to_string(),
        )
        .set(
            "auto.offset.reset",
            match source.start_from {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            },
        );
    for (key, value) in &source.properties {
        config.set(key, value);
    }
    let consumer: RouteConsumer = config.create_with_context(RebalanceRecorder::default())?;
    consumer.fetch_metadata(None, METADATA_TIMEOUT)?;
    consumer.subscribe(&[&source.topic])?;
    Ok(consumer)
}

/// The poll side of a Kafka route.
pub struct Poller {
    /// Route name.
    pub route: String,
    /// Source topic.
    pub topic: String,
    /// The subscribed consumer.
    pub consumer: RouteConsumer,
    /// One bounded queue per core.
    pub queues: Vec<tokio::sync::mpsc::Sender<Vec<KafkaWork>>>,
    /// Completions from the cores.
    pub completions: crossbeam_channel::Receiver<Completion>,
    /// Set when the gateway is stopping.
    pub shutdown: Arc<AtomicBool>,
    /// How long to wait for in-flight messages at shutdown.
    pub drain_deadline: Duration,
    /// Route counters.
    pub counters: Arc<RouteCounters>,
}

impl Poller {
    /// The poll loop; returns after shutdown, once in-flight messages are done or the deadline
    /// passed, with the stored offsets committed.
    pub fn run(self) {
        let mut marks = Watermarks::default();
        let mut last_progress = Instant::now();
        let mut last_error_log: Option<Instant> = None;
        tracing::info!(route = %self.route, topic = %self.topic, cores = self.queues.len(), "consuming");
        while !self.shutdown.load(Ordering::Relaxed) {
            self.apply_completions(&mut marks, None);
            let mut batches: Vec<Vec<KafkaWork>> = (0..self.queues.len()).map(|_| Vec::new()).collect();
            let mut taken = 0;
            let mut wait = POLL_WAIT;
            while taken < POLL_BATCH_MAX {
                let polled = self.consumer.poll(wait);
                wait = Duration::ZERO;
                self.apply_rebalances(&mut marks);
                match polled {
                    None => break,
                    Some(Err(error)) => {
                        if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::warn!(route = %self.route, %error, "kafka consumer error");
                            last_error_log = Some(Instant::now());
                        }
                        break;
                    }
                    Some(Ok(message)) => {
                        let partition = message.partition();
                        let offset = message.offset();
                        let epoch = marks.track(partition, offset);
                        let owner = kafka_partition_owner(partition, self.queues.len());
                        batches[owner].push(KafkaWork {
                            partition,
                            offset,
                            epoch,
                            timestamp_ms: message.timestamp().to_millis(),
                            key: message.key().map(<[u8]>::to_vec),
                            payload: message.payload().map(<[u8]>::to_vec),
                        });
                        taken += 1;
                    }
                }
            }
            self.counters.received.fetch_add(taken as u64, Ordering::Relaxed);
            for (core, batch) in batches.into_iter().enumerate() {
                if !batch.is_empty() && self.queues[core].blocking_send(batch).is_err() {
                    tracing::error!(route = %self.route, core, "core queue closed; stopping the route");
                    return;
                }
            }
            if last_progress.elapsed() >= PROGRESS_LOG_INTERVAL {
                self.log_progress(&marks);
                last_progress = Instant::now();
            }
        }
        self.drain(marks);
    }

    fn log_progress(&self, marks: &Watermarks) {
        tracing::info!(
            route = %self.route,
            received = self.counters.received.load(Ordering::Relaxed),
            written = self.counters.written.load(Ordering::Relaxed),
            dead_lettered = self.counters.dead_lettered.load(Ordering::Relaxed),
            in_flight = marks.in_flight(),
            "progress"
        );
    }

    /// Waits for in-flight messages up to the deadline, then commits what is stored.
    fn drain(self, mut marks: Watermarks) {
        let deadline = Instant::now() + self.drain_deadline;
        while marks.in_flight() > 0 && Instant::now() < deadline {
            self.apply_completions(&mut marks, Some(Duration::from_millis(50)));
        }
        let abandoned = marks.in_flight();
        if abandoned > 0 {
            tracing::warn!(route = %self.route, abandoned, "shutdown deadline passed; unfinished messages will be replayed on restart");
        }
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            // "No offset stored" is normal when nothing was consumed.
            tracing::debug!(route = %self.route, %error, "final offset commit");
        }
        self.log_progress(&marks);
        tracing::info!(route = %self.route, "stopped");
    }

    /// Applies completions and stores advanced watermarks. With `wait`, blocks up to that long
    /// for the first completion.
    fn apply_completions(&self, marks: &mut Watermarks, wait: Option<Duration>) {
        let mut advanced: BTreeMap<i32, i64> = BTreeMap::new();
        let mut apply = |c: Completion, marks: &mut Watermarks| {
            if let Some(mark) = marks.complete(c.partition, c.epoch, c.offset) {
                advanced.insert(c.partition, mark);
            }
        };
        if let Some(wait) = wait {
            if let Ok(c) = self.completions.recv_timeout(wait) {
                apply(c, marks);
            }
        }
        while let Ok(c) = self.completions.try_recv() {
            apply(c, marks);
        }
        for (partition, offset) in advanced {
            // librdkafka stores `offset + 1`, the next message to read.
            if let Err(error) = self.consumer.store_offset(&self.topic, partition, offset) {
                tracing::debug!(route = %self.route, partition, %error, "offset not stored (partition revoked?)");
            }
        }
    }

    fn apply_rebalances(&self, marks: &mut Watermarks) {
        for event in self.consumer.context().take() {
            match event {
                RebalanceEvent::Assigned(partitions) => {
                    tracing::info!(route = %self.route, ?partitions, "partitions assigned");
                    for p in partitions {
                        marks.assign(p);
                    }
                }
                RebalanceEvent::Revoked(partitions) => {
                    tracing::info!(route = %self.route, ?partitions, "partitions revoked");
                    for p in partitions {
                        marks.revoke(p);
                    }
                }
            }
        }
    }
}
