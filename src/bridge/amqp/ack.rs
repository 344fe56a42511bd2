//! How a RabbitMQ delivery is settled: acked (`basic.ack`) once its rows are written, rejected
//! without requeue once its dead letter is confirmed. The ack goes out on the delivering channel
//! from a task spawned on the island, not awaited on the core.

use crate::bridge::message::{Origin, Settlement};
use crate::sink::dead_letter::headers;

/// Where a RabbitMQ delivery came from, with its acker.
#[derive(Debug)]
pub struct AmqpOrigin {
    /// Source queue.
    pub queue: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// Acks on the delivering channel.
    pub acker: lapin::acker::Acker,
}

impl Origin for AmqpOrigin {
    fn settle(&self, settlement: Settlement, route: &str) {
        let acker = self.acker.clone();
        let route = route.to_string();
        tokio::spawn(async move {
            let result = match settlement {
                Settlement::Written => acker.ack(lapin::options::BasicAckOptions::default()).await,
                Settlement::DeadLettered => {
                    acker
                        .reject(lapin::options::BasicRejectOptions { requeue: false })
                        .await
                }
            };
            if let Err(error) = result {
                tracing::warn!(%route, %error, "RabbitMQ ack failed; the message will be redelivered");
            }
        });
    }

    fn coordinates(&self, _: &str, _: i64) -> Vec<(&'static str, String)> {
        vec![
            (headers::SOURCE_QUEUE, self.queue.clone()),
            (headers::SOURCE_ROUTING_KEY, self.routing_key.clone()),
            (headers::SOURCE_REDELIVERED, self.redelivered.to_string()),
        ]
    }

    fn subject(&self) -> Option<&str> {
        Some(&self.routing_key)
    }
}
