//! How a Kafka message is settled: a [`Completion`] to its route's poll thread, which advances
//! the partition's contiguous watermark and stores offsets from it (`watermark`). A dead letter
//! completes the message the same way: its offset may be committed once the letter is confirmed.
//! Settled on the core that finishes the message; never blocks it.

use crate::bridge::message::{Origin, Settlement};
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
    pub completions: crossbeam_channel::Sender<Completion>,
}

impl Origin for KafkaOrigin {
    fn settle(&self, _: Settlement, route: &str) {
        let completion = Completion {
            partition: self.partition,
            epoch: self.epoch,
            offset: self.offset,
        };
        // Never blocks a core (`completions_capacity`). Full can only be a bug: the partition's
        // offsets then stop advancing and it replays after a restart, which is safe.
        // Disconnected happens after a shutdown deadline: replayed too.
        if let Err(crossbeam_channel::TrySendError::Full(_)) = self.completions.try_send(completion) {
            tracing::error!(
                route,
                partition = self.partition,
                "completion channel full; offsets stop advancing"
            );
        }
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
