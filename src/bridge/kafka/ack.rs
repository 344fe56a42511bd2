//! How a Kafka message is settled: a [`Completion`] to whoever tracks its partition's contiguous
//! watermark (`watermark`) — the route's poll thread, or the reader on the partition's owner core
//! (`kafka::queues`) — which stores offsets from it. A dead letter
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
    /// Where its completion goes (bounded: `completions_capacity`).
    pub completions: Completions,
}

/// The sending end of a completion channel.
#[derive(Debug, Clone)]
pub enum Completions {
    /// To the route's poll thread.
    Thread(crossbeam_channel::Sender<Completion>),
    /// To the reader of the partition on its owner core.
    Core(tokio::sync::mpsc::Sender<Completion>),
}

impl Completions {
    /// Sends without blocking; `false` only when the channel is full.
    fn try_send(&self, completion: Completion) -> bool {
        match self {
            Completions::Thread(tx) => {
                !matches!(tx.try_send(completion), Err(crossbeam_channel::TrySendError::Full(_)))
            }
            Completions::Core(tx) => !matches!(
                tx.try_send(completion),
                Err(tokio::sync::mpsc::error::TrySendError::Full(_))
            ),
        }
    }
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
        if !self.completions.try_send(completion) {
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
}
