//! Dead-letter destinations: a Kafka topic, a NATS subject or a RabbitMQ exchange. Created at start-up; `send` is
//! awaited on the core that gave up on the message. The original key and payload are kept byte
//! for byte; headers carry why and where from. A dead letter is retried until the broker
//! confirms it: the source message is only acknowledged after that, so nothing is dropped
//! silently.

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
    /// Source topic (Kafka).
    pub const SOURCE_TOPIC: &str = "shardgate.source.topic";
    /// Source partition, decimal (Kafka).
    pub const SOURCE_PARTITION: &str = "shardgate.source.partition";
    /// Source offset, decimal (Kafka).
    pub const SOURCE_OFFSET: &str = "shardgate.source.offset";
    /// Source stream (JetStream).
    pub const SOURCE_STREAM: &str = "shardgate.source.stream";
    /// Source subject (NATS).
    pub const SOURCE_SUBJECT: &str = "shardgate.source.subject";
    /// Source stream sequence, decimal (JetStream).
    pub const SOURCE_SEQUENCE: &str = "shardgate.source.sequence";
    /// Source queue (RabbitMQ).
    pub const SOURCE_QUEUE: &str = "shardgate.source.queue";
    /// Routing key the message was published with (RabbitMQ).
    pub const SOURCE_ROUTING_KEY: &str = "shardgate.source.routing_key";
    /// Whether the broker had delivered the message before (RabbitMQ).
    pub const SOURCE_REDELIVERED: &str = "shardgate.source.redelivered";
    /// Socket endpoint (ZeroMQ).
    pub const SOURCE_ENDPOINT: &str = "shardgate.source.endpoint";
    /// Original message key, when the destination has no key of its own (NATS), as text.
    pub const KEY: &str = "shardgate.key";
}

const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest reason text put in a header.
const REASON_BYTES_MAX: usize = 1024;

/// What failed, and where the message came from.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// Route that gave up.
    pub route: &'a str,
    /// Stable reason code.
    pub reason_code: &'a str,
    /// Human-readable reason.
    pub reason: &'a str,
    /// Source coordinates as (header, value).
    pub source: Vec<(&'static str, String)>,
    /// Original key.
    pub key: Option<&'a [u8]>,
    /// Original payload.
    pub payload: Option<&'a [u8]>,
}

impl DeadLetter<'_> {
    /// Every header, reason text cut to [`REASON_BYTES_MAX`].
    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut all = vec![
            (headers::ROUTE, self.route.to_string()),
            (headers::REASON_CODE, self.reason_code.to_string()),
            (headers::REASON, truncate(self.reason, REASON_BYTES_MAX).to_string()),
        ];
        all.extend(self.source.iter().cloned());
        all
    }
}

/// Where a route's dead letters go.
pub enum DeadLetterSink {
    /// A Kafka topic.
    Kafka(DeadLetterTopic),
    /// A NATS subject (captured by a JetStream stream if it should be durable).
    Nats(DeadLetterSubject),
    /// A RabbitMQ exchange, with publisher confirms.
    Amqp(Box<super::amqp::DeadLetterExchange>),
}

impl DeadLetterSink {
    /// Sends one dead letter, retrying until the broker confirms it.
    pub async fn send(&self, letter: &DeadLetter<'_>) {
        let mut backoff = RETRY_BACKOFF_MIN;
        loop {
            let (destination, result) = match self {
                DeadLetterSink::Kafka(topic) => (topic.topic.as_str(), topic.send_once(letter).await),
                DeadLetterSink::Nats(subject) => (subject.subject.as_str(), subject.send_once(letter).await),
                DeadLetterSink::Amqp(exchange) => {
                    let mut headers = letter.headers();
                    if let Some(key) = letter.key {
                        headers.push((headers::KEY, String::from_utf8_lossy(key).into_owned()));
                    }
                    let payload = letter.payload.unwrap_or_default();
                    (exchange.exchange.as_str(), exchange.send_once(headers, payload).await)
                }
            };
            match result {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(route = letter.route, destination, %error, "dead letter not delivered, retrying");
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
    }
}

/// A dead-letter Kafka topic.
pub struct DeadLetterTopic {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterTopic {
    /// Creates the producer (no network IO until the first send).
    pub fn new(brokers: &str, topic: &str) -> Result<DeadLetterTopic, KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()?;
        Ok(DeadLetterTopic {
            producer,
            topic: topic.to_string(),
        })
    }

    async fn send_once(&self, letter: &DeadLetter<'_>) -> Result<(), String> {
        let pairs = letter.headers();
        let mut headers = OwnedHeaders::new_with_capacity(pairs.len());
        for (key, value) in &pairs {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = letter.key {
            record = record.key(key);
        }
        if let Some(payload) = letter.payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Timeout::After(Duration::from_secs(5)))
            .await
            .map(|_| ())
            .map_err(|(error, _)| error.to_string())
    }
}

/// A dead-letter NATS subject: published with headers, then flushed, so the letter has left the
/// gateway before the source message is acknowledged. Make it durable with a JetStream stream
/// that captures the subject.
pub struct DeadLetterSubject {
    client: async_nats::Client,
    subject: String,
}

impl DeadLetterSubject {
    /// A publisher on `client` (connected at start-up on the island).
    pub fn new(client: async_nats::Client, subject: &str) -> DeadLetterSubject {
        DeadLetterSubject {
            client,
            subject: subject.to_string(),
        }
    }

    async fn send_once(&self, letter: &DeadLetter<'_>) -> Result<(), String> {
        let mut headers = async_nats::HeaderMap::new();
        for (key, value) in letter.headers() {
            headers.insert(key, value.as_str());
        }
        if let Some(key) = letter.key {
            headers.insert(headers::KEY, String::from_utf8_lossy(key).as_ref());
        }
        let payload = letter.payload.map(<[u8]>::to_vec).unwrap_or_default();
        self.client
            .publish_with_headers(self.subject.clone(), headers, payload.into())
            .await
            .map_err(|e| e.to_string())?;
        self.client.flush().await.map_err(|e| e.to_string())
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
