//! The poll thread's hand-off to the cores, one core at a time. A core whose queue is full is
//! waited for, as long as it is only busy: up to [`STUCK_AFTER`] since its queue filled. A core
//! still full after that is held up — its spool full, the database away — and then keeps its
//! batches waiting here while its partitions are paused at the broker (librdkafka stops
//! fetching them), so it no longer stops the poll thread from feeding the other cores (a
//! blocking send did: one full core stalled the whole route). Pausing at once instead cost
//! more than half the throughput under ordinary load (librdkafka's fetch pipeline restarts on
//! every resume). The core's partitions resume once its queue has taken everything waiting.
//! Messages of a partition keep their order: a core's new batches queue behind its waiting
//! ones. A busy core is waited for by parking the poll thread until the core takes a batch (the
//! queue's own wake-up), not by polling it: a 1 ms sleep-and-retry loop cost the poll thread a
//! wake-up per millisecond whenever the cores were the bottleneck (4 % of the gateway's samples
//! in a `kafka-5` profile).
//!
//! Threads: the route's poll thread.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use crate::bridge::message::SourceMessage;

/// How long a core's queue may stay full before the core counts as held up and its partitions
/// pause.
pub const STUCK_AFTER: Duration = Duration::from_millis(200);
/// The route's per-core queues, with what waits for each.
pub struct CoreQueues {
    queues: Vec<Sender<Vec<SourceMessage>>>,
    waiting: Vec<VecDeque<Vec<SourceMessage>>>,
    paused: Vec<bool>,
    /// Since when each core's queue has been full, while it is.
    full_since: Vec<Option<Instant>>,
    stuck_after: Duration,
}

/// Unparks the thread that waits for room in a core's queue.
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `future` on this thread, parked between polls, until it is ready or `deadline` passes.
fn block_until<F: Future>(future: F, deadline: Instant) -> Option<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return Some(output);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        // Returns at the deadline, on an unpark, or spuriously: the poll above tells which.
        std::thread::park_timeout(deadline - now);
    }
}

/// A core whose queue is closed (it stopped).
#[derive(Debug)]
pub struct Closed(pub usize);

impl CoreQueues {
    /// Over the route's per-core queues.
    pub fn new(queues: Vec<Sender<Vec<SourceMessage>>>) -> CoreQueues {
        let cores = queues.len();
        CoreQueues {
            queues,
            waiting: (0..cores).map(|_| VecDeque::new()).collect(),
            paused: vec![false; cores],
            full_since: vec![None; cores],
            stuck_after: STUCK_AFTER,
        }
    }

    /// With another wait before a full core counts as held up (tests).
    #[cfg(test)]
    fn with_stuck_after(mut self, stuck_after: Duration) -> CoreQueues {
        self.stuck_after = stuck_after;
        self
    }

    /// Number of cores.
    pub fn cores(&self) -> usize {
        self.queues.len()
    }

    /// Queues `batches` (one per core, possibly empty) behind what waits already, and hands each
    /// core all its queue takes now. Returns how many messages were handed.
    pub fn hand_off(&mut self, batches: Vec<Vec<SourceMessage>>) -> Result<usize, Closed> {
        for (core, batch) in batches.into_iter().enumerate() {
            if !batch.is_empty() {
                self.waiting[core].push_back(batch);
            }
        }
        let mut handed = 0;
        for core in 0..self.queues.len() {
            while let Some(batch) = self.waiting[core].pop_front() {
                let len = batch.len();
                match self.queues[core].try_send(batch) {
                    Ok(()) => {
                        handed += len;
                        self.full_since[core] = None;
                    }
                    Err(TrySendError::Full(batch)) => {
                        self.waiting[core].push_front(batch);
                        let since = *self.full_since[core].get_or_insert_with(Instant::now);
                        if self.paused[core] {
                            break;
                        }
                        // Busy, not held up: wait for room, as a blocking send would, until the
                        // core counts as held up. The queue's next try takes the room.
                        match block_until(self.queues[core].reserve(), since + self.stuck_after) {
                            Some(Ok(permit)) => drop(permit),
                            Some(Err(_)) => return Err(Closed(core)),
                            None => break,
                        }
                    }
                    Err(TrySendError::Closed(_)) => return Err(Closed(core)),
                }
            }
        }
        Ok(handed)
    }

    /// Cores whose pause state must change: `(core, pause)` — pause a core with batches
    /// waiting, resume one whose queue took them all. The caller pauses or resumes the core's
    /// partitions and confirms with [`CoreQueues::set_paused`].
    pub fn pause_changes(&self) -> Vec<(usize, bool)> {
        (0..self.queues.len())
            .filter_map(|core| {
                // Batches wait only for a core that stayed full past `stuck_after`.
                let blocked = !self.waiting[core].is_empty();
                (blocked != self.paused[core]).then_some((core, blocked))
            })
            .collect()
    }

    /// Records that `core`'s partitions are paused (or resumed).
    pub fn set_paused(&mut self, core: usize, paused: bool) {
        self.paused[core] = paused;
    }

    /// After a rebalance: a new assignment starts fetching, whatever was paused before.
    pub fn forget_pauses(&mut self) {
        self.paused.fill(false);
    }

    /// Whether any core has batches waiting.
    pub fn any_waiting(&self) -> bool {
        self.waiting.iter().any(|w| !w.is_empty())
    }

    /// Messages waiting for a core (never handed, so never completed).
    pub fn waiting_messages(&self) -> usize {
        self.waiting.iter().flatten().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::CoreQueues;
    use crate::bridge::message::SourceMessage;

    fn batch(positions: std::ops::Range<i64>) -> Vec<SourceMessage> {
        positions.map(SourceMessage::test_message).collect()
    }

    /// A busy core (its queue full, then taken) is waited for and fed, not paused.
    #[test]
    fn a_busy_core_is_waited_for_until_it_takes_a_batch() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let mut queues = CoreQueues::new(vec![tx]).with_stuck_after(std::time::Duration::from_secs(60));
        assert_eq!(queues.hand_off(vec![batch(0..2)]).expect("open"), 2);
        let core = std::thread::spawn(move || {
            let first = rx.blocking_recv().expect("first batch");
            let second = rx.blocking_recv().expect("second batch");
            (first[0].position, second[0].position)
        });
        // The queue is full until the core takes the first batch: the hand-off waits for it.
        assert_eq!(queues.hand_off(vec![batch(2..3)]).expect("open"), 1);
        assert!(!queues.any_waiting(), "nothing left waiting");
        assert!(queues.pause_changes().is_empty(), "a busy core is not paused");
        assert_eq!(core.join().expect("core thread"), (0, 2), "in order");
    }

    #[test]
    fn a_full_core_waits_alone_and_keeps_its_order() {
        let (full_tx, mut full_rx) = tokio::sync::mpsc::channel(1);
        let (free_tx, mut free_rx) = tokio::sync::mpsc::channel(8);
        let mut queues = CoreQueues::new(vec![full_tx, free_tx]).with_stuck_after(std::time::Duration::ZERO);
        assert_eq!(queues.hand_off(vec![batch(0..2), batch(100..101)]).expect("open"), 3);
        assert_eq!(queues.hand_off(vec![batch(2..4), batch(101..102)]).expect("open"), 1);
        assert_eq!(queues.hand_off(vec![batch(4..5), batch(102..103)]).expect("open"), 1);
        assert_eq!(queues.pause_changes(), vec![(0, true)], "only the full core pauses");
        queues.set_paused(0, true);
        assert_eq!(queues.waiting_messages(), 3);
        assert_eq!(
            free_rx.try_recv().expect("handed").len(),
            1,
            "the other core is fed meanwhile"
        );
        let first = full_rx.try_recv().expect("first batch");
        assert_eq!(first[0].position, 0);
        assert_eq!(queues.hand_off(vec![Vec::new(), Vec::new()]).expect("open"), 2);
        assert_eq!(
            full_rx.try_recv().expect("next").first().map(|m| m.position),
            Some(2),
            "in order"
        );
        assert_eq!(queues.hand_off(vec![Vec::new(), Vec::new()]).expect("open"), 1);
        assert!(!queues.any_waiting());
        assert_eq!(
            queues.pause_changes(),
            vec![(0, false)],
            "resumed once everything is taken"
        );
        drop(full_rx);
        queues.set_paused(0, false);
        assert!(
            queues.hand_off(vec![batch(5..6), Vec::new()]).is_err(),
            "a closed core is reported"
        );
    }
}
