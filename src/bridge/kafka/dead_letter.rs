//! Dead-letter topic producer. Created at start-up; `send` is awaited on the core that owns the
//! failed message. The original key and payload are kept byte for byte; headers carry why and
//! where from. A dead letter is retried until the broker confirms it: the source message is only
//! acknowledged after that, so nothing is dropped silently.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

/// Header names on every dead letter.
pub mod headers {
    /// Route that gave up on the message.
    pub const ROUTE: &str = "shardgate.route";
    /// Stable reason code, e.g. `not_json`, `bad_value`, `write_rejected`.
    pub const REASON_CODE: &str = "shardgate.reason.code";
    /// Human-readable reason.
    pub const REASON: &str = "shardgate.reason";
    /// Source topic.
    pub const SOURCE_TOPIC: &str = "shardgate.source.topic";
    /// Source partition, decimal.
    pub const SOURCE_PARTITION: &str = "shardgate.source.partition";
    /// Source offset, decimal.
    pub const SOURCE_OFFSET: &str = "shardgate.source.offset";
}

const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest reason text put in a header.
const REASON_BYTES_MAX: usize = 1024;

/// What failed, and where the message came from.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// Stable reason code.
    pub reason_code: &'a str,
    /// Human-readable reason.
    pub reason: &'a str,
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Original key.
    pub key: Option<&'a [u8]>,
    /// Original payload.
    pub payload: Option<&'a [u8]>,
}

/// A route's dead-letter topic.
pub struct DeadLetterTopic {
    producer: FutureProducer,
    topic: String,
    route: String,
}

impl DeadLetterTopic {
    /// Creates the producer (no network IO until the first send).
    pub fn new(brokers: &str, topic: &str, route: &str) -> Result<DeadLetterTopic, KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()?;
        Ok(DeadLetterTopic {
            producer,
            topic: topic.to_string(),
            route: route.to_string(),
        })
    }

    /// Sends one dead letter, retrying until the broker confirms it.
    pub async fn send(&self, letter: &DeadLetter<'_>) {
        let reason = truncate(letter.reason, REASON_BYTES_MAX);
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let mut backoff = RETRY_BACKOFF_MIN;
        loop {
            let headers = OwnedHeaders::new_with_capacity(6)
                .insert(Header {
                    key: headers::ROUTE,
                    value: Some(self.route.as_str()),
                })
                .insert(Header {
                    key: headers::REASON_CODE,
                    value: Some(letter.reason_code),
                })
                .insert(Header {
                    key: headers::REASON,
                    value: Some(reason),
                })
                .insert(Header {
                    key: headers::SOURCE_TOPIC,
                    value: Some(letter.topic),
                })
                .insert(Header {
                    key: headers::SOURCE_PARTITION,
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: headers::SOURCE_OFFSET,
                    value: Some(offset.as_str()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
            if let Some(key) = letter.key {
                record = record.key(key);
            }
            if let Some(payload) = letter.payload {
                record = record.payload(payload);
            }
            match self.producer.send(record, Timeout::After(Duration::from_secs(5))).await {
                Ok(_) => return,
                Err((error, _)) => {
                    tracing::warn!(route = %self.route, topic = %self.topic, %error, "dead letter not delivered, retrying");
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
    }
}

/// Cuts `text` to at most `bytes_max` bytes on a character boundary.
fn truncate(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(super::truncate("héllo", 2), "h");
        assert_eq!(super::truncate("héllo", 3), "hé");
        assert_eq!(super::truncate("abc", 10), "abc");
    }
}
