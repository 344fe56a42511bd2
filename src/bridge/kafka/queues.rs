//! Partition-queue intake: each assigned partition's messages are read on the core that owns
//! the partition (`topology::kafka_partition_owner`) from the partition's own librdkafka queue
//! (`split_partition_queue`, split inside the rebalance callback right after the assignment,
//! before the first fetch), so no thread copies them out and hands them across. The route's
//! poll thread still polls the consumer's main queue — rebalances, errors, statistics — and
//! stores the offsets the readers report; each core's [`Reader`] stamps its partitions' write
//! clocks, tracks their watermarks and takes their completions.
//!
//! Threads: [`Reader::run`] on every core; [`Links`] on the route's poll thread.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, Notify};

use super::ack::{Completion, Completions};
use super::watermark::Watermarks;
use super::{source_message, Clocks, RebalanceRecorder, POLL_BATCH_MAX, POLL_WAIT};
use crate::bridge::message::SourceMessage;
use crate::bridge::route::RouteCounters;
use crate::runtime::shutdown::Stop;

/// One partition's queue of a route's consumer.
pub type Queue = PartitionQueue<RebalanceRecorder>;

/// Watermarks a reader reports but could not send yet, by partition: (offset, write timestamp).
type Marks = BTreeMap<i32, (i64, i64)>;

/// What the poll thread tells a core's reader, in order.
pub enum Control {
    /// Read `partition` from `queue`; its write clock resumes from `clock` (the committed
    /// offset's metadata), or from the source time.
    Assign {
        /// The partition.
        partition: i32,
        /// Its queue, split off the consumer's main queue.
        queue: Queue,
        /// Its write clock at the committed offset, if recorded.
        clock: Option<i64>,
    },
    /// Stop reading `partition`: revoked. Its outstanding completions are ignored.
    Revoke(i32),
    /// A message that reached the main queue before its partition's queue was split.
    Stray(Box<OwnedMessage>),
}

/// What a core's reader tells the poll thread.
pub enum Report {
    /// Watermarks advanced: store these offsets.
    Stored(Marks),
    /// The reader stopped, with this many messages unfinished (replayed after a restart).
    Drained {
        /// Messages handed out and not finished when the deadline passed.
        abandoned: usize,
    },
}

/// The poll thread's ends of a route's readers.
pub struct Links {
    /// One control channel per core.
    pub controls: Vec<mpsc::UnboundedSender<Control>>,
    /// Reports from every reader.
    pub reports: crossbeam_channel::Receiver<Report>,
}

/// Capacity of the reports channel: a reader that finds it full keeps its marks and merges
/// newer ones into them (`Reader::report`), so nothing is lost and nothing waits.
const REPORTS_CAPACITY: usize = 1024;

/// The readers of one route, one per core, and the poll thread's links to them.
pub fn readers(
    route: &str,
    queues: Vec<mpsc::Sender<Vec<SourceMessage>>>,
    counters: &Arc<RouteCounters>,
    stop: &Stop,
    completions_capacity: usize,
    drain_deadline: Duration,
) -> (Links, Vec<Reader>) {
    let (reports_tx, reports) = crossbeam_channel::bounded(REPORTS_CAPACITY);
    let mut controls = Vec::with_capacity(queues.len());
    let readers = queues
        .into_iter()
        .map(|queue| {
            let (control_tx, control) = mpsc::unbounded_channel();
            controls.push(control_tx);
            let (completions_tx, completions) = mpsc::channel(completions_capacity);
            Reader {
                route: route.to_string(),
                queue,
                control,
                completions,
                completions_tx,
                reports: reports_tx.clone(),
                wake: Arc::new(Notify::new()),
                counters: Arc::clone(counters),
                stop: stop.clone(),
                drain_deadline,
            }
        })
        .collect();
    (Links { controls, reports }, readers)
}

/// One core's reader of one route: the partitions this core owns.
pub struct Reader {
    route: String,
    /// This core's queue of the route (`bridge::route::run_on_core` takes from it).
    queue: mpsc::Sender<Vec<SourceMessage>>,
    control: mpsc::UnboundedReceiver<Control>,
    completions: mpsc::Receiver<Completion>,
    completions_tx: mpsc::Sender<Completion>,
    reports: crossbeam_channel::Sender<Report>,
    /// Woken by librdkafka when a partition queue becomes non-empty.
    wake: Arc<Notify>,
    counters: Arc<RouteCounters>,
    stop: Stop,
    drain_deadline: Duration,
}

/// A reader's partitions and what it tracks of them.
#[derive(Default)]
struct Partitions {
    queues: BTreeMap<i32, Queue>,
    marks: Watermarks,
    clocks: Clocks,
    /// Advanced watermarks not yet reported.
    unreported: Marks,
    /// Stray messages to hand out before the next read.
    strays: Vec<SourceMessage>,
    last_error_log: Option<Instant>,
}

impl Reader {
    /// Reads until the stop signal, then waits for its messages in flight up to the deadline.
    pub async fn run(mut self) {
        let mut parts = Partitions::default();
        let mut stop = self.stop.clone();
        while !stop.is_stopped() {
            while let Ok(control) = self.control.try_recv() {
                self.apply(control, &mut parts);
            }
            self.take_completions(&mut parts, None);
            let batch = self.read(&mut parts);
            if !batch.is_empty() {
                self.counters.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
                // Stopping while the core's queue is full drops the batch: its messages stay
                // unfinished, so their offsets are not stored and they replay after a restart.
                tokio::select! {
                    biased;
                    sent = self.queue.send(batch) => if sent.is_err() {
                        tracing::error!(route = %self.route, "core queue closed; stopping the reader");
                        return;
                    },
                    _ = stop.stopped() => {}
                }
                continue;
            }
            // Completions are applied while waiting; the partitions are read again only when
            // librdkafka says one has messages, a control arrives, or the backstop passes.
            let wake = Arc::clone(&self.wake);
            let woken = wake.notified();
            let backstop = glommio::timer::sleep(POLL_WAIT);
            futures::pin_mut!(woken, backstop);
            loop {
                tokio::select! {
                    biased;
                    _ = stop.stopped() => break,
                    Some(control) = self.control.recv() => {
                        self.apply(control, &mut parts);
                        break;
                    }
                    Some(completion) = self.completions.recv() => self.take_completions(&mut parts, Some(completion)),
                    _ = &mut woken => break,
                    _ = &mut backstop => break,
                }
            }
        }
        self.drain(parts).await;
    }

    fn apply(&self, control: Control, parts: &mut Partitions) {
        match control {
            Control::Assign {
                partition,
                mut queue,
                clock,
            } => {
                let wake = Arc::clone(&self.wake);
                queue.set_nonempty_callback(move || wake.notify_one());
                parts.marks.assign(partition);
                match clock {
                    Some(clock) => parts.clocks.last.insert(partition, clock),
                    None => parts.clocks.last.remove(&partition),
                };
                parts.queues.insert(partition, queue);
                // A message may have arrived before the callback was set.
                self.wake.notify_one();
            }
            Control::Revoke(partition) => {
                parts.queues.remove(&partition);
                parts.marks.revoke(partition);
                parts.clocks.forget(partition);
                parts.unreported.remove(&partition);
            }
            Control::Stray(message) => {
                let message = source_message(
                    message.as_ref(),
                    &mut parts.marks,
                    &mut parts.clocks,
                    Completions::Core(self.completions_tx.clone()),
                );
                parts.strays.push(message);
            }
        }
    }

    /// Up to `POLL_BATCH_MAX` messages from the partitions' queues, strays first.
    fn read(&self, parts: &mut Partitions) -> Vec<SourceMessage> {
        let mut batch = std::mem::take(&mut parts.strays);
        for queue in parts.queues.values() {
            while batch.len() < POLL_BATCH_MAX {
                match queue.poll(Duration::ZERO) {
                    None => break,
                    Some(Ok(message)) => batch.push(source_message(
                        &message,
                        &mut parts.marks,
                        &mut parts.clocks,
                        Completions::Core(self.completions_tx.clone()),
                    )),
                    Some(Err(error)) => {
                        if parts
                            .last_error_log
                            .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                        {
                            tracing::warn!(route = %self.route, %error, "kafka partition queue error");
                            parts.last_error_log = Some(Instant::now());
                        }
                        break;
                    }
                }
            }
        }
        batch
    }

    /// Applies `first` and every waiting completion, and reports advanced watermarks.
    fn take_completions(&mut self, parts: &mut Partitions, first: Option<Completion>) {
        let waiting = std::iter::from_fn(|| self.completions.try_recv().ok());
        for c in first.into_iter().chain(waiting) {
            if let Some(mark) = parts.marks.complete_stamped(c.partition, c.epoch, c.offset) {
                parts.unreported.insert(c.partition, mark);
            }
        }
        self.report(parts);
    }

    /// Sends the unreported watermarks; kept (and merged with later ones) while the channel is
    /// full.
    fn report(&self, parts: &mut Partitions) {
        if parts.unreported.is_empty() {
            return;
        }
        let marks = std::mem::take(&mut parts.unreported);
        if let Err(crossbeam_channel::TrySendError::Full(Report::Stored(marks))) =
            self.reports.try_send(Report::Stored(marks))
        {
            parts.unreported = marks;
        }
    }

    /// Waits for the messages in flight up to the deadline, reports the last watermarks and
    /// how many messages are unfinished, and lets the partitions' queues go.
    async fn drain(mut self, mut parts: Partitions) {
        let deadline = Instant::now() + self.drain_deadline;
        while parts.marks.in_flight() > 0 && Instant::now() < deadline {
            let wait = deadline.saturating_duration_since(Instant::now()).min(POLL_WAIT);
            tokio::select! {
                biased;
                Some(completion) = self.completions.recv() => self.take_completions(&mut parts, Some(completion)),
                _ = glommio::timer::sleep(wait) => self.report(&mut parts),
            }
        }
        while !parts.unreported.is_empty() && Instant::now() < deadline {
            self.report(&mut parts);
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let mut report = Report::Drained {
            abandoned: parts.marks.in_flight(),
        };
        drop(parts);
        // Never blocks the core: the poll thread takes reports until every reader is done.
        while let Err(crossbeam_channel::TrySendError::Full(again)) = self.reports.try_send(report) {
            report = again;
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }
}
