//! How a Kafka message is settled: a [`Completion`] to its route's poll thread, which advances
//! the partition's contiguous watermark and stores offsets from it (`watermark`). A dead letter
//! completes the message the same way: its offset may be committed once the letter is confirmed.
//! Settled on the core that finishes the message, gathered per write ([`CompletionGroup`]) and
//! sent as one hand-over; never blocks it.

use crate::bridge::message::{Origin, SettleGroup, Settlement, Settlements};
use crate::sink::dead_letter::headers;

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

/// Where a Kafka message came from, and the channel its completion goes back on.
#[derive(Debug)]
pub struct KafkaOrigin {
    /// Source partition.
    pub partition: i32,
    /// Watermark epoch the completion must carry.
    pub epoch: u64,
    /// Source offset.
    pub offset: i64,
    /// The route's completion channel (bounded: `completions_capacity`).
    pub completions: crossbeam_channel::Sender<Vec<Completion>>,
}

/// The completions of one write for one route's poll thread, sent in one hand-over.
pub struct CompletionGroup {
    channel: crossbeam_channel::Sender<Vec<Completion>>,
    completions: Vec<Completion>,
}

impl SettleGroup for CompletionGroup {
    fn hand_over(self: Box<Self>, route: &str) {
        let CompletionGroup { channel, completions } = *self;
        // Never blocks a core (`completions_capacity`). Full can only be a bug: the partitions'
        // offsets then stop advancing and they replay after a restart, which is safe.
        // Disconnected happens after a shutdown deadline: replayed too.
        if let Err(crossbeam_channel::TrySendError::Full(lost)) = channel.try_send(completions) {
            tracing::error!(
                route,
                completions = lost.len(),
                "completion channel full; offsets stop advancing"
            );
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Origin for KafkaOrigin {
    fn settle(&self, _: Settlement, settlements: &mut Settlements<'_>) {
        let completion = Completion {
            partition: self.partition,
            epoch: self.epoch,
            offset: self.offset,
        };
        let expected = settlements.expected();
        settlements.add(
            |group: &CompletionGroup| group.channel.same_channel(&self.completions),
            || CompletionGroup {
                channel: self.completions.clone(),
                completions: Vec::with_capacity(expected),
            },
            |group| group.completions.push(completion),
        );
    }

    fn coordinates(&self, source: &str, position: i64) -> Vec<(&'static str, String)> {
        vec![
            (headers::SOURCE_TOPIC, source.to_string()),
            (headers::SOURCE_PARTITION, self.partition.to_string()),
            (headers::SOURCE_OFFSET, position.to_string()),
        ]
    }

    fn partition(&self) -> Option<i32> {
        Some(self.partition)
    }

    fn assignment(&self) -> Option<u64> {
        Some(self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::{Completion, KafkaOrigin};
    use crate::bridge::message::{Origin, Settlement, Settlements};

    fn origin(completions: &crossbeam_channel::Sender<Vec<Completion>>, offset: i64) -> KafkaOrigin {
        KafkaOrigin {
            partition: (offset % 2) as i32,
            epoch: 7,
            offset,
            completions: completions.clone(),
        }
    }

    fn offsets(hand_over: Vec<Completion>) -> Vec<i64> {
        hand_over.iter().map(|c| c.offset).collect()
    }

    #[test]
    fn a_write_hands_each_poll_thread_its_completions_at_once_when_done() {
        let (a, from_a) = crossbeam_channel::unbounded();
        let (b, from_b) = crossbeam_channel::unbounded();
        let mut settlements = Settlements::new("orders");
        for (channel, offset) in [(&a, 10), (&b, 20), (&a, 11), (&a, 13), (&b, 21)] {
            origin(channel, offset).settle(Settlement::Written, &mut settlements);
        }
        assert!(
            from_a.is_empty() && from_b.is_empty(),
            "nothing is sent before the write is done"
        );
        settlements.hand_over();
        // One hand-over per poll thread, in the order the messages finished.
        assert_eq!(offsets(from_a.try_recv().expect("a's completions")), vec![10, 11, 13]);
        assert_eq!(offsets(from_b.try_recv().expect("b's completions")), vec![20, 21]);
        assert!(from_a.is_empty() && from_b.is_empty(), "one hand-over each");
        {
            let mut settlements = Settlements::new("orders");
            origin(&a, 14).settle(Settlement::DeadLettered, &mut settlements);
            // Dropped without `hand_over` (a stop mid-write): what finished still goes.
        }
        let completions = from_a.try_recv().expect("sent on drop");
        assert_eq!((completions[0].partition, completions[0].epoch), (0, 7));
        assert_eq!(offsets(completions), vec![14]);
    }
}
