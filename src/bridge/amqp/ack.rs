//! How a RabbitMQ delivery is settled: acknowledged once its rows are written, rejected without
//! requeue once its dead letter is confirmed — coalesced per channel. A core reports the
//! settlements of each write together to its channel's ack task ([`run_acker`]) on the
//! island; the task keeps the channel's [`AckWindow`] and sends one `basic.ack` with
//! `multiple` for the contiguous run of settled delivery tags (a tag is acknowledged only when
//! it and every tag before it on the channel is settled, so no message whose rows are not
//! written is ever acknowledged), and a
//! `basic.reject` for each dead-lettered delivery before any `multiple` ack that spans it. The
//! ack names the last *written* tag of the run: RabbitMQ refuses (and closes the channel on) an
//! ack whose tag is no longer outstanding, as a rejected one is. Under load one ack covers
//! hundreds of deliveries; a quiet channel acks each settlement as it comes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lapin::options::{BasicAckOptions, BasicRejectOptions};
use tokio::sync::mpsc;

use crate::bridge::message::{AckTaskGroup, Origin, Settlement, Settlements, TaskSettlement};
use crate::sink::dead_letter::headers;

/// A settled delivery, reported by the core that finished it.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    /// Delivery tag on the delivering channel.
    pub tag: u64,
    /// Written, or dead-lettered.
    pub settlement: Settlement,
}

impl TaskSettlement for Settled {
    // Closed only once the connection is gone: the broker redelivers the messages.
    const GONE: &'static str = "channel gone; the messages will be redelivered";
    const GONE_EXPECTED: bool = true;
}

/// What to send on the channel, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckAction {
    /// `basic.reject` of one delivery, without requeue.
    Reject(u64),
    /// `basic.ack` with `multiple`: every outstanding delivery up to and including the tag
    /// (itself outstanding: written, never rejected).
    AckThrough(u64),
}

/// The settled delivery tags of one channel. Tags start at 1 and grow by one per delivery on
/// the channel (AMQP 0-9-1), so the contiguous settled prefix is exactly what may be acked.
#[derive(Debug, Default)]
pub struct AckWindow {
    /// Every tag up to here is settled (acked or rejected).
    through: u64,
    /// The tags after `through`, in order: `None` while unsettled, `Some(true)` when written,
    /// `Some(false)` when rejected. At most the channel's unacknowledged deliveries long (the
    /// prefetch, at most 65,535): a slot per tag, no allocation per settlement.
    settled: VecDeque<Option<bool>>,
}

impl AckWindow {
    /// Records settlements; returns what to send: the rejections first, then at most one
    /// `multiple` ack for the new contiguous prefix — or, where the prefix ends on a rejection
    /// only, no ack.
    pub fn settle(&mut self, settled: impl IntoIterator<Item = Settled>) -> Vec<AckAction> {
        let mut actions = Vec::new();
        for Settled { tag, settlement } in settled {
            let Some(slot) = tag.checked_sub(self.through + 1) else {
                continue;
            };
            let slot = slot as usize;
            if slot >= self.settled.len() {
                self.settled.resize(slot + 1, None);
            }
            if self.settled[slot].is_some() {
                continue;
            }
            let written = settlement == Settlement::Written;
            self.settled[slot] = Some(written);
            if !written {
                actions.push(AckAction::Reject(tag));
            }
        }
        let mut last_written = None;
        while let Some(&Some(written)) = self.settled.front() {
            self.settled.pop_front();
            self.through += 1;
            if written {
                last_written = Some(self.through);
            }
        }
        // A run of rejections alone needs no ack: they are settled already.
        actions.extend(last_written.map(AckAction::AckThrough));
        actions
    }

    /// Deliveries settled but not yet covered by an ack (waiting for an earlier tag).
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.settled.iter().filter(|slot| slot.is_some()).count()
    }
}

/// The channel's ack task: takes every settlement waiting, sends the window's actions in order.
/// Ends when every delivery's sender is gone (the channel's deliveries are all settled or
/// dropped). Runs on the island.
pub async fn run_acker(
    route: String,
    channel: lapin::Channel,
    mut settled: mpsc::UnboundedReceiver<Vec<Settled>>,
    unacked: Arc<Unacked>,
) {
    let mut window = AckWindow::default();
    let mut batch = Vec::new();
    while settled.recv_many(&mut batch, usize::MAX).await > 0 {
        let actions = window.settle(batch.drain(..).flatten());
        unacked.settled_through(window.through);
        for action in actions {
            let result = match action {
                AckAction::Reject(tag) => channel.basic_reject(tag, BasicRejectOptions { requeue: false }).await,
                AckAction::AckThrough(tag) => channel.basic_ack(tag, BasicAckOptions { multiple: true }).await,
            };
            if let Err(error) = result {
                tracing::warn!(%route, %error, "RabbitMQ ack failed; unacknowledged messages will be redelivered");
            }
        }
    }
}

/// A channel's deliveries not yet settled on it — the newest delivery tag less the contiguous
/// settled prefix — exported as `shardgate_amqp_unacked` for the route.
pub struct Unacked {
    delivered: AtomicU64,
    through: AtomicU64,
    gauge: metrics::Gauge,
}

impl Unacked {
    /// A new channel's count (its tags start again at 1) for route `route`.
    pub fn new(route: &str) -> Arc<Unacked> {
        let gauge = metrics::gauge!(crate::telemetry::metric::AMQP_UNACKED, "source" => route.to_string());
        gauge.set(0.0);
        Arc::new(Unacked {
            delivered: AtomicU64::new(0),
            through: AtomicU64::new(0),
            gauge,
        })
    }

    /// Deliveries up to `tag` received.
    pub fn delivered(&self, tag: u64) {
        self.delivered.fetch_max(tag, Ordering::Relaxed);
        self.publish();
    }

    fn settled_through(&self, tag: u64) {
        self.through.fetch_max(tag, Ordering::Relaxed);
        self.publish();
    }

    fn publish(&self) {
        let delivered = self.delivered.load(Ordering::Relaxed);
        self.gauge
            .set(delivered.saturating_sub(self.through.load(Ordering::Relaxed)) as f64);
    }
}

/// Where a RabbitMQ delivery came from, and the channel's ack task its settlement goes to.
#[derive(Debug)]
pub struct AmqpOrigin {
    /// Source queue.
    pub queue: Arc<str>,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// Delivery tag on its channel.
    pub tag: u64,
    /// Its channel's ack task (unbounded, but never holding more than the channel's
    /// unacknowledged deliveries' settlements: the prefetch).
    pub acks: mpsc::UnboundedSender<Vec<Settled>>,
}

impl Origin for AmqpOrigin {
    fn settle(&self, settlement: Settlement, settlements: &mut Settlements<'_>) {
        let settled = Settled {
            tag: self.tag,
            settlement,
        };
        AckTaskGroup::add(settlements, &self.acks, settled);
    }

    fn coordinates(&self, _: &str, _: i64) -> Vec<(&'static str, String)> {
        vec![
            (headers::SOURCE_QUEUE, self.queue.to_string()),
            (headers::SOURCE_ROUTING_KEY, self.routing_key.clone()),
            (headers::SOURCE_REDELIVERED, self.redelivered.to_string()),
        ]
    }

    fn subject(&self) -> Option<&str> {
        Some(&self.routing_key)
    }
}

#[cfg(test)]
mod tests {
    use super::{AckAction, AckWindow, Settled};
    use crate::bridge::message::Settlement;
    use proptest::prelude::*;

    fn written(tag: u64) -> Settled {
        Settled {
            tag,
            settlement: Settlement::Written,
        }
    }

    #[test]
    fn acks_only_the_contiguous_prefix_and_rejects_dead_letters_first() {
        let mut w = AckWindow::default();
        assert_eq!(w.settle([written(2), written(3)]), vec![], "tag 1 is not settled yet");
        assert_eq!(w.waiting(), 2);
        let dead = Settled {
            tag: 1,
            settlement: Settlement::DeadLettered,
        };
        assert_eq!(w.settle([dead]), vec![AckAction::Reject(1), AckAction::AckThrough(3)]);
        assert_eq!(w.waiting(), 0);
        assert_eq!(w.settle([written(3)]), vec![], "a repeat changes nothing");
        assert_eq!(w.settle([written(5), written(4)]), vec![AckAction::AckThrough(5)]);
        let dead = |tag| Settled {
            tag,
            settlement: Settlement::DeadLettered,
        };
        assert_eq!(
            w.settle([written(6), dead(7)]),
            vec![AckAction::Reject(7), AckAction::AckThrough(6)],
            "the ack names the last written tag, never a rejected one"
        );
        assert_eq!(
            w.settle([dead(8)]),
            vec![AckAction::Reject(8)],
            "no ack for rejections alone"
        );
    }

    proptest! {
        /// Whatever the order of settlements, every tag an ack covers is settled, rejections
        /// come before any ack that spans them, and all tags are covered once all are settled.
        #[test]
        fn never_acks_an_unsettled_delivery(
            dead in proptest::collection::vec(any::<bool>(), 1..80),
            seed in any::<u64>(),
        ) {
            let tags: Vec<u64> = (1..=dead.len() as u64).collect();
            let mut order = tags.clone();
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut w = AckWindow::default();
            let mut settled = std::collections::BTreeSet::new();
            let mut rejected = std::collections::BTreeSet::new();
            let mut acked_through = 0;
            for chunk in order.chunks(3) {
                let batch: Vec<Settled> = chunk.iter().map(|&tag| Settled {
                    tag,
                    settlement: if dead[tag as usize - 1] { Settlement::DeadLettered } else { Settlement::Written },
                }).collect();
                settled.extend(chunk.iter().copied());
                for action in w.settle(batch) {
                    match action {
                        AckAction::Reject(tag) => {
                            prop_assert!(dead[tag as usize - 1]);
                            prop_assert!(tag > acked_through, "rejected after an ack covered it");
                            rejected.insert(tag);
                        }
                        AckAction::AckThrough(through) => {
                            prop_assert!((1..=through).all(|t| settled.contains(&t)));
                            prop_assert!(!dead[through as usize - 1], "the acked tag is outstanding");
                            prop_assert!(through > acked_through);
                            acked_through = through;
                        }
                    }
                }
            }
            let last_written = tags.iter().rev().find(|&&t| !dead[t as usize - 1]).copied().unwrap_or(0);
            prop_assert_eq!(acked_through, last_written, "every written delivery is acked in the end");
            prop_assert_eq!(rejected.len(), dead.iter().filter(|&&d| d).count());
        }
    }
}
