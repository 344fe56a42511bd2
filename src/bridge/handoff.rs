//! The hand-off from a source's consumer to the cores: per-route, per-core bounded queues, and
//! [`RoundRobin`] over them for sources without partitions (JetStream, RabbitMQ, NATS, ZeroMQ);
//! Kafka hands each partition to its owner core instead (`bridge::kafka`). Runs on the source's
//! thread (island task or housekeeping thread); a full queue makes the consumer wait.

use std::sync::atomic::Ordering;

use super::message::SourceMessage;
use super::route::RouteCounters;
use crate::runtime::shutdown::Stop;

/// Batches a core's queue holds per route before the source's consumer waits.
pub const CORE_QUEUE_BATCHES_MAX: usize = 8;

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
    pub async fn hand_off(&mut self, batch: Vec<SourceMessage>, counters: &RouteCounters, stop: &mut Stop) -> bool {
        counters.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let queue = self.next_queue();
        tokio::select! {
            _ = stop.stopped() => false,
            sent = queue.send(batch) => sent.is_ok(),
        }
    }

    /// [`RoundRobin::hand_off`] from a plain thread: `false` when the core is gone.
    pub fn hand_off_blocking(&mut self, batch: Vec<SourceMessage>, counters: &RouteCounters) -> bool {
        counters.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.next_queue().blocking_send(batch).is_ok()
    }
}
