//! Kafka source: a consumer group on one topic, at-least-once into a table.
//!
//! One housekeeping poll thread per route ([`Poller::run`]) owns the `BaseConsumer`: it polls
//! (which also drives rebalances), hands each message to the core that reads its partition
//! (`topology::kafka_partition_owner`) in batches over a bounded channel, and stores offsets
//! from the contiguous watermark as completions come back. A core whose channel is full has its
//! partitions paused at the broker until it catches up (`pause`); the others are fed meanwhile.
//! The cores' side (map, route to the owner core, write, dead-letter, complete) is shared by
//! every source: `bridge::route`.
//!
//! Delivery contract: an offset is stored (and later auto-committed) only after the message and
//! every message before it in its partition is written or dead-lettered; a `kill -9` therefore
//! replays from the last committed offset, and replays write identical cells because each write
//! carries a timestamp derived from the message (`mapping::write_timestamp_us`). When a core's
//! queue is full its partitions pause, so memory stays bounded (by the core queues, and by what
//! librdkafka had fetched for those partitions before the pause).

pub mod ack;
pub mod pause;
pub mod watermark;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::message::SourceMessage;
use super::route::RouteCounters;
use super::source::{Consumer as SourceConsumer, Handoff, Source, Start};
use super::tap::{durable_of, Taps};
use crate::config::{KafkaSecurity, KafkaSourceConfig, StartFrom};
use crate::mapping::next_write_timestamp_us;
use crate::runtime::shutdown::Stop;
use crate::sink::broker::kafka::{security_hint, LastError};
use crate::topology::kafka_partition_owner;
pub use ack::Completion;
use ack::KafkaOrigin;
use watermark::{Held, Watermarks};

/// Messages taken from librdkafka per dispatch round.
const POLL_BATCH_MAX: usize = 512;
/// How long one poll waits when nothing is buffered.
const POLL_WAIT: Duration = Duration::from_millis(50);
/// How long one poll waits while a core has batches waiting (its queue is retried after).
const PAUSED_RETRY: Duration = Duration::from_millis(5);
/// How long start-up waits for broker metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(15);
/// Interval of the progress log line.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// How long a seek for a tap's rewind may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a consumer waiting for its assignment says so.
const WAIT_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// How long the consumer may stay without partitions after losing them (revoked, no new
/// assignment — not even an empty one) before the poll thread replaces it with a fresh,
/// freshly subscribed consumer. librdkafka normally rejoins within seconds of the coordinator
/// coming back; after a broker outage longer than the session timeout it was seen, about once
/// in four runs, to never rejoin at all.
const REJOIN_STUCK_AFTER: Duration = Duration::from_secs(45);

/// Rebalance events recorded inside `poll` and applied right after it returns.
#[derive(Debug)]
enum RebalanceEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// How often librdkafka reports statistics (consumer lag).
const STATISTICS_INTERVAL_MS: &str = "5000";

/// Consumer context that records rebalances for the poll loop, publishes consumer lag and
/// keeps librdkafka's last error (a refused SASL login or TLS handshake says why only there).
pub struct RebalanceRecorder {
    route: String,
    events: Mutex<Vec<RebalanceEvent>>,
    last_error: LastError,
}

fn partitions_of(list: &TopicPartitionList) -> Vec<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

impl RebalanceRecorder {
    fn new(route: &str) -> RebalanceRecorder {
        RebalanceRecorder {
            route: route.to_string(),
            events: Mutex::new(Vec::new()),
            last_error: LastError::default(),
        }
    }

    /// The last error librdkafka reported, if any.
    fn last_error(&self) -> Option<String> {
        self.last_error.get()
    }

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

impl ClientContext for RebalanceRecorder {
    /// Logged and kept: start-up names it when the brokers cannot be reached.
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(route = %self.route, %error, reason, "kafka client error");
        self.last_error.record(&error, reason);
    }

    /// `shardgate_kafka_consumer_lag{route, topic, partition}`: high watermark minus the
    /// consumer's position, from librdkafka's statistics; 0 for partitions this gateway does not
    /// fetch (owned by another gateway of the group, or not yet assigned).
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (&partition, p) in &stats.partitions {
                if partition < 0 {
                    continue;
                }
                let lag = if p.fetch_state == "active" {
                    p.consumer_lag.max(0)
                } else {
                    0
                };
                metrics::gauge!(
                    crate::telemetry::metric::KAFKA_CONSUMER_LAG,
                    "route" => self.route.clone(),
                    "topic" => topic.clone(),
                    "partition" => partition.to_string(),
                )
                .set(lag as f64);
            }
        }
    }
}

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

/// Capacity of a route's completion channel (cores → poll thread), in hand-overs of one or more
/// completions each. They never outnumber the messages handed out and not yet applied: at
/// most, per core, a full queue (`CORE_QUEUE_BATCHES_MAX` batches of `POLL_BATCH_MAX`), the
/// messages admitted in flight (`inflight_max`, overshot by at most one batch) and the batch
/// the poll thread is handing over — the poll thread hands out nothing while it waits on a full
/// queue, and applies every waiting completion otherwise. Twice that, so a full channel can
/// only be a bug (logged).
pub fn completions_capacity(cores: usize, inflight_max: usize) -> usize {
    let per_core = (super::handoff::CORE_QUEUE_BATCHES_MAX + 2) * POLL_BATCH_MAX + inflight_max;
    2 * cores.max(1) * per_core
}

/// A Kafka route's source: its subscribed consumer and the completion channel its cores report
/// on; the consumer loop is the route's poll thread ([`Poller`]).
pub struct KafkaSource {
    config: KafkaSourceConfig,
    consumer: RouteConsumer,
    instance_id: Option<String>,
    completions: (
        crossbeam_channel::Sender<Vec<Completion>>,
        crossbeam_channel::Receiver<Vec<Completion>>,
    ),
    shutdown_deadline: Duration,
}

impl Source for KafkaSource {
    type Config = KafkaSourceConfig;

    /// Subscribes on the (unpinned) main thread, so librdkafka's threads are not bound to a
    /// data-plane core.
    fn open(config: &KafkaSourceConfig, start: &Start<'_>) -> anyhow::Result<KafkaSource> {
        let instance_id = start.gateway_id.map(|id| group_instance_id(id, start.route));
        let consumer = subscribe(config, start.route, instance_id.as_deref()).map_err(|e| {
            anyhow::anyhow!(
                "route `{}`: cannot reach Kafka at `{}`: {e}",
                start.route,
                config.brokers
            )
        })?;
        let capacity = completions_capacity(start.cores, start.inflight_rows_max);
        Ok(KafkaSource {
            config: config.clone(),
            consumer,
            instance_id,
            completions: crossbeam_channel::bounded(capacity),
            shutdown_deadline: start.shutdown_deadline,
        })
    }

    fn name(&self) -> String {
        self.config.topic.clone()
    }

    fn consumer(self, handoff: Handoff) -> SourceConsumer {
        let (completions_tx, completions) = self.completions;
        let poller = Poller {
            route: handoff.route,
            topic: self.config.topic.clone(),
            consumer: self.consumer,
            source: self.config,
            instance_id: self.instance_id,
            queues: pause::CoreQueues::new(handoff.queues),
            completions,
            completions_tx,
            stop: handoff.stop,
            drain_deadline: self.shutdown_deadline,
            counters: handoff.counters,
            taps: handoff.taps,
        };
        SourceConsumer::Thread(Box::new(move || poller.run()))
    }
}

/// The `group.instance.id` of a route's consumer on gateway `gateway_id`: static membership,
/// so a restarted gateway gets its partitions back at once instead of after the session
/// timeout. Route names and gateway ids are validated to Kafka's legal characters.
pub fn group_instance_id(gateway_id: &str, route: &str) -> String {
    format!("shardgate.{gateway_id}.{route}")
}

/// Creates the consumer, checks that the brokers answer, and subscribes; a static group member
/// when `instance_id` is given. Called at start-up on the (unpinned) main thread, so
/// librdkafka's threads are not bound to a data-plane core.
pub fn subscribe(
    source: &KafkaSourceConfig,
    route: &str,
    instance_id: Option<&str>,
) -> Result<RouteConsumer, SubscribeError> {
    let mut config = ClientConfig::new();
    if let Some(id) = instance_id {
        config.set("group.instance.id", id);
    }
    config
        .set("bootstrap.servers", &source.brokers)
        .set("group.id", &source.group_id)
        .set("client.id", format!("shardgate-{route}"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
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
    for (key, value) in source.security.iter().flat_map(KafkaSecurity::properties) {
        config.set(key, value);
    }
    let consumer: RouteConsumer = config
        .create_with_context(RebalanceRecorder::new(route))
        .map_err(|error| SubscribeError { error, cause: None })?;
    let checked = consumer
        .fetch_metadata(None, METADATA_TIMEOUT)
        .and_then(|_| consumer.subscribe(&[&source.topic]));
    if let Err(error) = checked {
        // librdkafka queues its error events (a refused SASL login, a failed handshake) until
        // the consumer is polled: serve them so the context holds the cause.
        for _ in 0..10 {
            if consumer.poll(Duration::from_millis(20)).is_none() && consumer.context().last_error().is_some() {
                break;
            }
        }
        return Err(SubscribeError {
            error,
            cause: consumer.context().last_error(),
        });
    }
    Ok(consumer)
}

/// The keys a route's Kafka client errors point to.
const ROUTE_SECURITY: &str = "the route's `source.security`";

/// Why a consumer could not subscribe: librdkafka's error, and the last error it reported
/// meanwhile — where a refused SASL login or a failed TLS handshake is named.
#[derive(Debug, thiserror::Error)]
#[error("{error}{}", match cause {
    Some(cause) => format!("; last client error: {cause}{}", security_hint(cause, ROUTE_SECURITY)),
    None => String::new(),
})]
pub struct SubscribeError {
    /// librdkafka's error.
    pub error: KafkaError,
    /// The client's last reported error.
    pub cause: Option<String>,
}

/// A message's headers whose values are UTF-8 text.
pub fn text_headers(message: &rdkafka::message::BorrowedMessage<'_>) -> Vec<(String, String)> {
    use rdkafka::message::Headers as _;
    let Some(headers) = message.headers() else {
        return Vec::new();
    };
    headers
        .iter()
        .filter_map(|h| Some((h.key.to_string(), std::str::from_utf8(h.value?).ok()?.to_string())))
        .collect()
}

/// Metadata prefix of a committed offset: the write timestamp of the message before it.
const CLOCK_METADATA_PREFIX: &str = "shardgate.write_ts_us=";
/// How long an assignment waits for the committed offsets' metadata.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-partition write clocks: each message is written at its source time, but always after the
/// previous message of its partition (`mapping::next_write_timestamp_us`), so any number of
/// messages within one millisecond apply in source order. The clock travels with the committed
/// offset (as its metadata), so a replay after a crash stamps the same timestamps.
#[derive(Debug, Default)]
struct Clocks {
    /// Last write timestamp handed out, by partition (a `BTreeMap` for the reason
    /// `Watermarks` gives: read once per message on the poll thread).
    last: BTreeMap<i32, i64>,
    /// Last stored watermark (offset, its write timestamp), by partition.
    stored: HashMap<i32, (i64, i64)>,
}

impl Clocks {
    fn next(&mut self, partition: i32, source_time_ms: Option<i64>) -> i64 {
        let last = self.last.entry(partition).or_insert(0);
        *last = next_write_timestamp_us(source_time_ms, *last);
        *last
    }

    fn forget(&mut self, partition: i32) {
        self.last.remove(&partition);
        self.stored.remove(&partition);
    }

    /// A list of `offset + 1` per partition with the clock as metadata.
    fn offsets_of(
        &self,
        topic: &str,
        marks: impl Iterator<Item = (i32, (i64, i64))>,
    ) -> Result<TopicPartitionList, KafkaError> {
        let mut list = TopicPartitionList::new();
        for (partition, (offset, timestamp_us)) in marks {
            list.add_partition_offset(topic, partition, Offset::Offset(offset + 1))?;
            if let Some(mut elem) = list.find_partition(topic, partition) {
                elem.set_metadata(format!("{CLOCK_METADATA_PREFIX}{timestamp_us}"));
            }
        }
        Ok(list)
    }

    /// Every stored watermark, for the final commit.
    fn stored_offsets(&self, topic: &str) -> Result<TopicPartitionList, KafkaError> {
        self.offsets_of(topic, self.stored.iter().map(|(&p, &mark)| (p, mark)))
    }
}

/// The write clock a committed offset's metadata carries, if any.
fn clock_from_metadata(metadata: &str) -> Option<i64> {
    metadata.strip_prefix(CLOCK_METADATA_PREFIX)?.parse().ok()
}

/// A polled message whose key and payload are still ranges of its core's poll buffer.
struct Copied {
    message: SourceMessage,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
}

/// One poll's messages for one core, their keys and payloads copied into one buffer: one
/// allocation per core and poll instead of two per message (measured on the poll thread: its
/// allocations, freed on the cores, were 7 % of the gateway's CPU).
struct PollBatch {
    buffer: Vec<u8>,
    messages: Vec<Copied>,
}

/// How many messages, and bytes of keys and payloads, a [`PollBatch`] took.
#[derive(Debug, Clone, Copy, Default)]
struct PollBatchSize {
    messages: usize,
    bytes: usize,
}

impl PollBatch {
    /// An empty batch with room for a quarter more than `last` (a core's previous batch), so
    /// that a steady stream fills it without growing it: growing the buffer by doubling cost
    /// the poll thread a reallocation and a copy of everything copied so far, each time.
    fn sized_for(last: PollBatchSize) -> PollBatch {
        PollBatch {
            buffer: Vec::with_capacity(last.bytes + last.bytes / 4),
            messages: Vec::with_capacity((last.messages + last.messages / 4).min(POLL_BATCH_MAX)),
        }
    }

    /// What this batch took.
    fn size(&self) -> PollBatchSize {
        PollBatchSize {
            messages: self.messages.len(),
            bytes: self.buffer.len(),
        }
    }

    /// The messages, their keys and payloads cut out of the shared buffer.
    fn into_messages(self) -> Vec<SourceMessage> {
        let buffer = Bytes::from(self.buffer);
        self.messages
            .into_iter()
            .map(|copied| SourceMessage {
                key: copied.key.map(|range| buffer.slice(range)),
                payload: copied.payload.map(|range| buffer.slice(range)),
                ..copied.message
            })
            .collect()
    }
}

/// The poll side of a Kafka route.
pub struct Poller {
    /// Route name.
    pub route: String,
    /// Source topic.
    pub topic: String,
    /// The subscribed consumer.
    pub consumer: RouteConsumer,
    /// The route's source, to subscribe again with a fresh consumer (see [`REJOIN_STUCK_AFTER`]).
    pub source: KafkaSourceConfig,
    /// The consumer's `group.instance.id` (static membership), if the gateway has an id.
    pub instance_id: Option<String>,
    /// One bounded queue per core, and what waits for each.
    pub queues: pause::CoreQueues,
    /// Completions from the cores, one hand-over per write.
    pub completions: crossbeam_channel::Receiver<Vec<Completion>>,
    /// The sending side, one clone in every message's origin.
    pub completions_tx: crossbeam_channel::Sender<Vec<Completion>>,
    /// The gateway's stop signal.
    pub stop: Stop,
    /// How long to wait for in-flight messages at shutdown.
    pub drain_deadline: Duration,
    /// Route counters.
    pub counters: Arc<RouteCounters>,
    /// The route's taps: offsets are stored no further than they made durable (`super::tap`).
    pub taps: Taps,
}

impl Poller {
    /// Restores the write clocks of newly assigned partitions from their committed offsets'
    /// metadata (none: the clock starts from the source time).
    fn restore_clocks(&self, clocks: &mut Clocks, partitions: &[i32]) {
        let mut list = TopicPartitionList::new();
        for &p in partitions {
            list.add_partition(&self.topic, p);
        }
        match self.consumer.committed_offsets(list, COMMITTED_TIMEOUT) {
            Ok(committed) => {
                for elem in committed.elements_for_topic(&self.topic) {
                    match clock_from_metadata(elem.metadata()) {
                        Some(clock) => {
                            clocks.last.insert(elem.partition(), clock);
                        }
                        None => {
                            clocks.last.remove(&elem.partition());
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(route = %self.route, %error, "cannot read committed offsets; write clocks restart from source time")
            }
        }
    }

    /// The poll loop; returns after shutdown, once in-flight messages are done or the deadline
    /// passed, with the stored offsets committed.
    pub fn run(mut self) {
        let mut marks = Watermarks::default();
        let mut clocks = Clocks::default();
        let mut held = Held::default();
        let mut last_progress = Instant::now();
        let mut last_error_log: Option<Instant> = None;
        // Since when the consumer waits for an assignment (start-up, or after a revocation).
        let mut unassigned_since = Some(Instant::now());
        let mut last_wait_log: Option<Instant> = None;
        // Each core's last poll batch, to size its next one.
        let mut sizes = vec![PollBatchSize::default(); self.queues.cores()];
        tracing::info!(
            route = %self.route,
            topic = %self.topic,
            cores = self.queues.cores(),
            group = %self.source.group_id,
            member = self.instance_id.as_deref().unwrap_or("dynamic"),
            "consuming"
        );
        while !self.stop.is_stopped() {
            self.apply_completions(&mut marks, &mut clocks, &mut held, None);
            if !self.taps.is_empty() {
                self.release_held(&mut held, &mut clocks);
                self.apply_rewinds(&mut marks, &mut held);
            }
            if let Some(since) = unassigned_since {
                if last_wait_log.is_none_or(|t| t.elapsed() >= WAIT_LOG_INTERVAL)
                    && since.elapsed() >= WAIT_LOG_INTERVAL
                {
                    self.log_waiting(since);
                    last_wait_log = Some(Instant::now());
                }
            }
            if unassigned_since.is_some_and(|t| t.elapsed() > REJOIN_STUCK_AFTER) {
                self.resubscribe();
                unassigned_since = Some(Instant::now());
            }
            let mut batches: Vec<PollBatch> = sizes.iter().map(|&size| PollBatch::sized_for(size)).collect();
            let mut taken = 0;
            // A core with batches waiting is retried soon, not after a whole poll wait.
            let mut wait = if self.queues.any_waiting() {
                PAUSED_RETRY
            } else {
                POLL_WAIT
            };
            let mut rebalanced = false;
            while taken < POLL_BATCH_MAX {
                let polled = self.consumer.poll(wait);
                wait = Duration::ZERO;
                rebalanced |= self.apply_rebalances(&mut marks, &mut clocks, &mut held, &mut unassigned_since);
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
                        let owner = kafka_partition_owner(message.partition(), self.queues.cores());
                        let copied = self.source_message(&message, &mut batches[owner].buffer, &mut marks, &mut clocks);
                        batches[owner].messages.push(copied);
                        taken += 1;
                    }
                }
            }
            for (size, batch) in sizes.iter_mut().zip(&batches) {
                *size = batch.size();
            }
            if rebalanced {
                // A new assignment fetches every partition; cores still full pause theirs anew.
                self.queues.forget_pauses();
            }
            match self
                .queues
                .hand_off(batches.into_iter().map(PollBatch::into_messages).collect())
            {
                Ok(handed) => {
                    self.counters.received.fetch_add(handed as u64, Ordering::Relaxed);
                }
                Err(pause::Closed(core)) => {
                    tracing::error!(route = %self.route, core, "core queue closed; stopping the route");
                    return;
                }
            }
            self.apply_pauses();
            if last_progress.elapsed() >= PROGRESS_LOG_INTERVAL {
                self.log_progress(&marks);
                last_progress = Instant::now();
            }
        }
        self.drain(marks, clocks, held);
    }

    /// A polled message copied out for its partition's core: stamped with its partition's
    /// write clock and tracked in the watermark; its key and payload appended to `buffer` (the
    /// core's share of this poll), to be cut out of it by [`PollBatch::into_messages`].
    fn source_message(
        &self,
        message: &rdkafka::message::BorrowedMessage<'_>,
        buffer: &mut Vec<u8>,
        marks: &mut Watermarks,
        clocks: &mut Clocks,
    ) -> Copied {
        let partition = message.partition();
        let offset = message.offset();
        let timestamp_ms = message.timestamp().to_millis();
        let write_timestamp_us = clocks.next(partition, timestamp_ms);
        let epoch = marks.track_stamped(partition, offset, write_timestamp_us);
        let mut append = |bytes: &[u8]| {
            buffer.extend_from_slice(bytes);
            buffer.len() - bytes.len()..buffer.len()
        };
        let key = message.key().map(&mut append);
        let payload = message.payload().map(&mut append);
        let message = SourceMessage {
            position: offset,
            timestamp_ms,
            write_timestamp_us: Some(write_timestamp_us),
            key: None,
            headers: text_headers(message),
            payload: None,
            origin: Box::new(KafkaOrigin {
                partition,
                epoch,
                offset,
                completions: self.completions_tx.clone(),
            }),
        };
        Copied { message, key, payload }
    }

    /// Pauses the partitions of each core that has batches waiting, and resumes those of each
    /// core that took them all.
    fn apply_pauses(&mut self) {
        for (core, pause) in self.queues.pause_changes() {
            let Ok(assignment) = self.consumer.assignment() else {
                continue;
            };
            let mut list = TopicPartitionList::new();
            for elem in assignment.elements() {
                if kafka_partition_owner(elem.partition(), self.queues.cores()) == core {
                    list.add_partition(elem.topic(), elem.partition());
                }
            }
            let result = if pause {
                self.consumer.pause(&list)
            } else {
                self.consumer.resume(&list)
            };
            match result {
                Ok(()) => {
                    tracing::debug!(route = %self.route, core, pause, partitions = list.count(), "core's partitions paused or resumed");
                    self.queues.set_paused(core, pause);
                }
                Err(error) => tracing::warn!(route = %self.route, core, %error, "cannot pause or resume partitions"),
            }
        }
    }

    /// Replaces a consumer that lost its partitions and never rejoined with a fresh one,
    /// subscribed the same way; it starts from the committed offsets (messages in flight for the
    /// old assignment were already dropped from the watermarks at the revocation). If the
    /// brokers do not answer, the old consumer stays and this is tried again later. The old one
    /// is unsubscribed and closed on a thread of its own, so a close that hangs cannot stop
    /// the route.
    fn resubscribe(&mut self) {
        if self.consumer.assignment().is_ok_and(|list| list.count() > 0) {
            return;
        }
        tracing::warn!(
            route = %self.route,
            waited_s = REJOIN_STUCK_AFTER.as_secs(),
            "kafka consumer has not rejoined its group; subscribing again with a fresh consumer"
        );
        match subscribe(&self.source, &self.route, self.instance_id.as_deref()) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut self.consumer, fresh);
                old.unsubscribe();
                let closing = std::thread::Builder::new()
                    .name("kafka-close".into())
                    .spawn(move || drop(old));
                if let Err(error) = closing {
                    tracing::warn!(route = %self.route, %error, "cannot close the old consumer on a thread");
                }
            }
            Err(error) => tracing::warn!(route = %self.route, %error, "brokers not reachable; keeping the consumer"),
        }
    }

    /// Says what an unassigned consumer waits for, so a quiet start-up is explained.
    fn log_waiting(&self, since: Instant) {
        let how = match &self.instance_id {
            Some(_) => "as a static member; a member that left within the session timeout gets its partitions back at once, a new one waits for the old member's session timeout",
            None => "as a dynamic member; after a crash the group waits for the old member's session timeout (`session.timeout.ms`, librdkafka default 45 s) before it hands its partitions over — set `runtime.gateway_id` for instant restarts",
        };
        tracing::info!(
            route = %self.route,
            group = %self.source.group_id,
            topic = %self.topic,
            member = self.instance_id.as_deref().unwrap_or("dynamic"),
            waited_s = since.elapsed().as_secs(),
            "waiting for the group coordinator to assign partitions, {how}"
        );
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
    fn drain(self, mut marks: Watermarks, mut clocks: Clocks, mut held: Held) {
        let deadline = Instant::now() + self.drain_deadline;
        // Batches still waiting for a full core were never handed over: they cannot complete,
        // and replay after a restart.
        let never_handed = self.queues.waiting_messages();
        while marks.in_flight() > never_handed && Instant::now() < deadline {
            self.apply_completions(&mut marks, &mut clocks, &mut held, Some(Duration::from_millis(50)));
        }
        if !self.taps.is_empty() {
            // What the taps made durable (their jobs checkpointed before the routes stop).
            self.release_held(&mut held, &mut clocks);
        }
        let abandoned = marks.in_flight().saturating_sub(never_handed);
        if abandoned > 0 {
            tracing::warn!(route = %self.route, abandoned, "shutdown deadline passed; unfinished messages will be replayed on restart");
        }
        if never_handed > 0 {
            tracing::info!(route = %self.route, never_handed, "messages read but not yet handed to a core at the stop (it was catching up); they are replayed on restart");
        }
        // An explicit list: a commit of "the current state" would drop the offsets' metadata.
        match clocks.stored_offsets(&self.topic) {
            Ok(list) if list.count() > 0 => {
                if let Err(error) = self.consumer.commit(&list, CommitMode::Sync) {
                    tracing::warn!(route = %self.route, %error, "final offset commit failed; the last messages will replay");
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(route = %self.route, %error, "final offset commit"),
        }
        self.log_progress(&marks);
        tracing::info!(route = %self.route, "stopped");
    }

    /// Applies completions and stores advanced watermarks (held back for the route's taps, if
    /// it has any). With `wait`, blocks up to that long for the first completion.
    fn apply_completions(&self, marks: &mut Watermarks, clocks: &mut Clocks, held: &mut Held, wait: Option<Duration>) {
        let mut advanced: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        let mut apply = |completions: Vec<Completion>, marks: &mut Watermarks| {
            for c in completions {
                if let Some(mark) = marks.complete_stamped(c.partition, c.epoch, c.offset) {
                    advanced.insert(c.partition, mark);
                }
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
        if advanced.is_empty() {
            return;
        }
        if !self.taps.is_empty() {
            for (partition, mark) in advanced {
                held.push(partition, mark);
            }
            self.release_held(held, clocks);
            return;
        }
        self.store(clocks, advanced);
    }

    /// Stores the held watermarks the route's taps have made durable.
    fn release_held(&self, held: &mut Held, clocks: &mut Clocks) {
        let released = held.release(|partition| durable_of(&self.taps, partition));
        if !released.is_empty() {
            self.store(clocks, released);
        }
    }

    /// Stores advanced watermarks: `offset + 1` of each, its write clock as metadata.
    fn store(&self, clocks: &mut Clocks, advanced: BTreeMap<i32, (i64, i64)>) {
        for (&partition, &(offset, timestamp_us)) in &advanced {
            clocks.stored.insert(partition, (offset, timestamp_us));
        }
        // The next message to read (`offset + 1`), with the write clock in the metadata so that a
        // replay from here stamps the same timestamps.
        let stored = clocks.offsets_of(&self.topic, advanced.into_iter());
        let result = stored.and_then(|list| self.consumer.store_offsets(&list));
        if let Err(error) = result {
            tracing::debug!(route = %self.route, %error, "offsets not stored (partition revoked?)");
        }
    }

    /// Reads partitions again where the route's taps ask ([`super::tap::Rewind`]): from the
    /// asked offset, or from the oldest message still in flight or the consumer's position if
    /// either is lower — every message from there is read again in a new epoch (so the taps
    /// tell them from the stale ones, and the stale ones' completions are ignored), and nothing
    /// in flight is skipped. A partition no longer in the epoch the tap asked about is left
    /// alone (revoked or rewound since).
    fn apply_rewinds(&self, marks: &mut Watermarks, held: &mut Held) {
        for rewind in self.taps.iter().flat_map(|tap| tap.rewinds()) {
            let partition = rewind.partition;
            if marks.epoch(partition) != Some(rewind.epoch) {
                continue;
            }
            let position = self.consumer.position().ok().and_then(|list| {
                list.find_partition(&self.topic, partition)
                    .and_then(|elem| elem.offset().to_raw())
                    .filter(|offset| *offset >= 0)
            });
            let offset = [Some(rewind.offset), marks.oldest_unfinished(partition), position]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(rewind.offset);
            match self
                .consumer
                .seek(&self.topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
            {
                Ok(()) => {
                    marks.assign(partition);
                    held.forget(partition);
                    tracing::info!(route = %self.route, partition, offset, asked = rewind.offset, "partition read again from an earlier offset for a stream job");
                }
                Err(error) => {
                    tracing::warn!(route = %self.route, partition, offset, %error, "cannot read a partition again for a stream job; it reads again after the next rebalance or restart")
                }
            }
        }
    }

    /// Applies the rebalances recorded during the last poll; `true` when there were any.
    fn apply_rebalances(
        &self,
        marks: &mut Watermarks,
        clocks: &mut Clocks,
        held: &mut Held,
        unassigned_since: &mut Option<Instant>,
    ) -> bool {
        let events = self.consumer.context().take();
        if events.is_empty() {
            return false;
        }
        for event in events {
            match event {
                RebalanceEvent::Assigned(partitions) => {
                    // In the group again, even with no partitions (more members than partitions).
                    *unassigned_since = None;
                    tracing::info!(route = %self.route, ?partitions, "partitions assigned");
                    for &p in &partitions {
                        marks.assign(p);
                    }
                    self.restore_clocks(clocks, &partitions);
                }
                RebalanceEvent::Revoked(partitions) => {
                    tracing::info!(route = %self.route, ?partitions, "partitions revoked");
                    unassigned_since.get_or_insert_with(Instant::now);
                    for p in partitions {
                        marks.revoke(p);
                        clocks.forget(p);
                        held.forget(p);
                    }
                }
            }
        }
        let assigned = self.consumer.assignment().map_or(0, |list| list.count());
        metrics::gauge!(crate::telemetry::metric::KAFKA_ASSIGNED_PARTITIONS, "route" => self.route.clone())
            .set(assigned as f64);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{security_hint, ROUTE_SECURITY};

    /// The hints for librdkafka's own words, as the local SASL_SSL broker gave them: a refused
    /// SCRAM login and a broker certificate of an unknown CA (both name `sasl_ssl://`).
    #[test]
    fn security_hints_follow_the_failure_not_the_protocol_name() {
        let login =
            "Global error: Authentication (Local: Authentication failure): sasl_ssl://127.0.0.1:9095/bootstrap: \
                     SASL authentication error: Authentication failed during authentication due to invalid credentials \
                     with SASL mechanism SCRAM-SHA-512 (after 324ms in state AUTH_REQ)";
        let tls = "Global error: SSL (Local: SSL error): sasl_ssl://127.0.0.1:9095/bootstrap: SSL handshake failed: \
                   error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified";
        assert!(
            security_hint(login, ROUTE_SECURITY).contains("source.security`: `mechanism`, `username`, `password_file`")
        );
        assert!(security_hint(tls, ROUTE_SECURITY).contains("source.security`: `protocol`, `ca_file`"));
        assert_eq!(security_hint("Local: Broker transport failure", ROUTE_SECURITY), "");
    }
}
