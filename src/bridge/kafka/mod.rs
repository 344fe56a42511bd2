//! Kafka source: a consumer group on one topic, at-least-once into a table.
//!
//! One housekeeping poll thread per route ([`Poller::run`]) owns the `BaseConsumer`: it polls
//! (which also drives rebalances), hands each message to the core that reads its partition
//! (`topology::kafka_partition_owner`) in batches over a bounded channel, and stores offsets
//! from the contiguous watermark as completions come back. The cores' side (map, route to the
//! owner core, write, dead-letter, complete) is shared by every source: `bridge::route`.
//!
//! Delivery contract: an offset is stored (and later auto-committed) only after the message and
//! every message before it in its partition is written or dead-lettered; a `kill -9` therefore
//! replays from the last committed offset, and replays write identical cells because each write
//! carries a timestamp derived from the message (`mapping::write_timestamp_us`). When the cores'
//! queues are full the poll thread blocks, so memory stays bounded.

pub mod watermark;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, TopicPartitionList};

use super::route::{Completion, Origin, RouteCounters, SourceMessage};
use crate::config::{KafkaSourceConfig, StartFrom};
use crate::topology::kafka_partition_owner;
use watermark::Watermarks;

/// Messages taken from librdkafka per dispatch round.
const POLL_BATCH_MAX: usize = 512;
/// How long one poll waits when nothing is buffered.
const POLL_WAIT: Duration = Duration::from_millis(50);
/// How long start-up waits for broker metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(15);
/// Interval of the progress log line.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(5);

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
    pub queues: Vec<tokio::sync::mpsc::Sender<Vec<SourceMessage>>>,
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
            let mut batches: Vec<Vec<SourceMessage>> = (0..self.queues.len()).map(|_| Vec::new()).collect();
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
                        batches[owner].push(SourceMessage {
                            position: offset,
                            timestamp_ms: message.timestamp().to_millis(),
                            key: message.key().map(<[u8]>::to_vec),
                            payload: message.payload().map(<[u8]>::to_vec),
                            origin: Origin::Kafka { partition, epoch },
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
