//! How NATS messages are settled. A JetStream message is acked once its rows are written, or
//! terminated (`AckKind::Term`) once its dead letter is delivered, so a poison message is never
//! redelivered. JetStream acks are per message (`AckPolicy::Explicit`: an `All` ack would also
//! ack what another gateway sharing the durable has not written yet), so they are made cheap
//! instead: a core sends the settlements of each write together to the route's ack task on the
//! island ([`run_acker`]), which publishes every waiting one back to back on the route's
//! connection — one write to the server for many acks, no task and no message copy per ack. A
//! core NATS message has nothing to acknowledge (at-most-once).

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::bridge::message::{AckTaskGroup, Origin, Settlement, Settlements, TaskSettlement};
use crate::sink::dead_letter::headers;

/// One JetStream settlement: the message's ack subject and how it ends.
pub type Settled = (async_nats::Subject, Settlement);

impl TaskSettlement for Settled {
    const GONE: &'static str = "the JetStream ack task has stopped; the messages will be redelivered";
    const GONE_EXPECTED: bool = false;
}

/// The route's ack task: takes every settlement waiting and publishes its ack (`+ACK` when
/// written, `+TERM` when dead-lettered) on `client`, then flushes once. Ends when every
/// message's sender is gone. Runs on the island.
pub async fn run_acker(route: String, client: async_nats::Client, mut settled: mpsc::UnboundedReceiver<Vec<Settled>>) {
    let mut batch = Vec::new();
    while settled.recv_many(&mut batch, usize::MAX).await > 0 {
        for (reply, settlement) in batch.drain(..).flatten() {
            let kind = match settlement {
                Settlement::Written => Bytes::from_static(b"+ACK"),
                Settlement::DeadLettered => Bytes::from_static(b"+TERM"),
            };
            if let Err(error) = client.publish(reply, kind).await {
                tracing::warn!(%route, %error, "JetStream ack failed; the message will be redelivered");
            }
        }
    }
}

/// Where a JetStream message came from, and the route's ack task its settlement goes to.
#[derive(Debug)]
pub struct JetStreamOrigin {
    /// Subject the message was published on (the client's bytes, not copied).
    pub subject: async_nats::Subject,
    /// The subject its ack is published on; `None` for a message that is not JetStream's
    /// (nothing to acknowledge).
    pub reply: Option<async_nats::Subject>,
    /// The route's ack task (unbounded, but never holding more than the consumer's
    /// `max_ack_pending` settlements).
    pub acks: mpsc::UnboundedSender<Vec<Settled>>,
}

impl Origin for JetStreamOrigin {
    fn settle(&self, settlement: Settlement, settlements: &mut Settlements<'_>) {
        let Some(reply) = &self.reply else { return };
        AckTaskGroup::add(settlements, &self.acks, (reply.clone(), settlement));
    }

    fn coordinates(&self, source: &str, position: i64) -> Vec<(&'static str, String)> {
        vec![
            (headers::SOURCE_STREAM, source.to_string()),
            (headers::SOURCE_SUBJECT, self.subject.to_string()),
            (headers::SOURCE_SEQUENCE, position.to_string()),
        ]
    }

    fn subject(&self) -> Option<&str> {
        Some(self.subject.as_str())
    }
}

/// Where a core NATS message came from: nothing to acknowledge.
#[derive(Debug)]
pub struct NatsOrigin {
    /// Subject the message was published on (the client's bytes, not copied).
    pub subject: async_nats::Subject,
}

impl Origin for NatsOrigin {
    fn settle(&self, _: Settlement, _: &mut Settlements<'_>) {}

    fn coordinates(&self, _: &str, position: i64) -> Vec<(&'static str, String)> {
        vec![
            (headers::SOURCE_SUBJECT, self.subject.to_string()),
            (headers::SOURCE_SEQUENCE, position.to_string()),
        ]
    }

    fn subject(&self) -> Option<&str> {
        Some(self.subject.as_str())
    }
}
