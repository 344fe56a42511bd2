//! The hand-off from a source's consumer to the cores: per-route, per-core bounded queues, and
//! [`RoundRobin`] over them for sources without partitions (JetStream, RabbitMQ, NATS, ZeroMQ);
//! Kafka hands each partition to its owner core instead (`bridge::kafka`). Runs on the source's
//! thread (island task or housekeeping thread); a full queue makes the consumer wait.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{Stream, StreamExt};

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

/// Gathers one hand-off from a client's stream of ready chunks (`ready_chunks`), starting with
/// `first`: more chunks are taken for up to `linger` after it, until the hand-off holds at least
/// `max` items. A client yields what one read from its socket held — for RabbitMQ a frame's
/// worth, 4–5 deliveries — so without the linger a core would get hand-offs, and the database
/// batches, of that size. A stream that ends while gathering ends it: what is here is handed
/// off, and the caller's next read sees the end (`ready_chunks` is fused).
pub async fn linger<S, T>(chunks: &mut S, first: Vec<T>, max: usize, linger: Duration) -> Vec<T>
where
    S: Stream<Item = Vec<T>> + Unpin,
{
    let mut gathered = first;
    gathered.reserve(max.saturating_sub(gathered.len()));
    let deadline = tokio::time::sleep(linger);
    tokio::pin!(deadline);
    while gathered.len() < max {
        tokio::select! {
            biased;
            more = chunks.next() => match more {
                Some(more) => gathered.extend(more),
                None => break,
            },
            _ = &mut deadline => break,
        }
    }
    gathered
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures::{stream, StreamExt};

    use super::linger;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_hand_off_gathers_ready_chunks_up_to_its_bound() {
        runtime().block_on(async {
            // Chunks of 3 as a client yields them; never ending, so only the bound stops it.
            let mut chunks = stream::iter(0..).chunks(3).chain(stream::pending());
            let first = chunks.next().await.expect("first");
            let gathered = linger(&mut chunks, first, 10, Duration::from_secs(60)).await;
            // Whole chunks: 4 of 3 reach the bound of 10; nothing is lost or reordered.
            assert_eq!(gathered, (0..12).collect::<Vec<_>>());
            assert_eq!(chunks.next().await, Some(vec![12, 13, 14]));
        });
    }

    #[test]
    fn a_quiet_stream_ends_the_hand_off_at_the_linger() {
        runtime().block_on(async {
            let mut chunks = stream::iter([vec![1], vec![2, 3]]).chain(stream::pending());
            let first = chunks.next().await.expect("first");
            let started = Instant::now();
            let gathered = linger(&mut chunks, first, 256, Duration::from_millis(20)).await;
            assert_eq!(gathered, vec![1, 2, 3]);
            assert!(
                started.elapsed() >= Duration::from_millis(20),
                "handed off before the linger"
            );
        });
    }

    #[test]
    fn an_ending_stream_hands_off_what_it_gave() {
        runtime().block_on(async {
            let mut chunks = stream::iter([vec![1], vec![2]]).fuse();
            let first = chunks.next().await.expect("first");
            let gathered = linger(&mut chunks, first, 256, Duration::from_secs(60)).await;
            assert_eq!(gathered, vec![1, 2]);
            assert_eq!(chunks.next().await, None);
        });
    }
}
