//! How NATS messages are settled. A JetStream message is acked once its rows are written, or
//! terminated (`AckKind::Term`) once its dead letter is delivered, so a poison message is never
//! redelivered; the ack is a publish on the island's connection, spawned there, not awaited on
//! the core. A core NATS message has nothing to acknowledge (at-most-once).

use crate::bridge::message::{Origin, Settlement};
use crate::sink::dead_letter::headers;

/// Where a JetStream message came from, with the message for its ack.
#[derive(Debug)]
pub struct JetStreamOrigin {
    /// Subject the message was published on.
    pub subject: String,
    /// The message, for its ack.
    pub message: Box<async_nats::jetstream::Message>,
}

impl Origin for JetStreamOrigin {
    fn settle(&self, settlement: Settlement, route: &str) {
        let message = self.message.clone();
        let route = route.to_string();
        let kind = match settlement {
            Settlement::Written => async_nats::jetstream::AckKind::Ack,
            Settlement::DeadLettered => async_nats::jetstream::AckKind::Term,
        };
        tokio::spawn(async move {
            if let Err(error) = message.ack_with(kind).await {
                tracing::warn!(%route, %error, "JetStream ack failed; the message will be redelivered");
            }
        });
    }

    fn coordinates(&self, source: &str, position: i64) -> Vec<(&'static str, String)> {
        vec![
            (headers::SOURCE_STREAM, source.to_string()),
            (headers::SOURCE_SUBJECT, self.subject.clone()),
            (headers::SOURCE_SEQUENCE, position.to_string()),
        ]
    }

    fn subject(&self) -> Option<&str> {
        Some(&self.subject)
    }
}

/// Where a core NATS message came from: nothing to acknowledge.
#[derive(Debug)]
pub struct NatsOrigin {
    /// Subject the message was published on.
    pub subject: String,
}

impl Origin for NatsOrigin {
    fn settle(&self, _: Settlement, _: &str) {}

    fn coordinates(&self, _: &str, position: i64) -> Vec<(&'static str, String)> {
        vec![
            (headers::SOURCE_SUBJECT, self.subject.clone()),
            (headers::SOURCE_SEQUENCE, position.to_string()),
        ]
    }

    fn subject(&self) -> Option<&str> {
        Some(&self.subject)
    }
}
