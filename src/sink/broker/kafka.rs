//! Kafka producer: idempotent, `acks=all`, a short linger; `publish` returns once the broker
//! acknowledged the record. Threads: librdkafka's own threads do the IO; `publish` is awaited on
//! whichever thread sends (a core, `shardgate replay`).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::KafkaSecurity;

/// How long one publish may wait in librdkafka's queue and for the broker.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes to one topic.
pub struct KafkaPublisher {
    producer: FutureProducer,
    topic: String,
}

impl KafkaPublisher {
    /// Creates the producer (no network IO until the first publish), with `security`'s TLS and
    /// SASL when given.
    pub fn new(brokers: &str, topic: &str, security: Option<&KafkaSecurity>) -> Result<KafkaPublisher, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5");
        for (key, value) in security.into_iter().flat_map(KafkaSecurity::properties) {
            config.set(key, value);
        }
        let producer = config.create()?;
        Ok(KafkaPublisher {
            producer,
            topic: topic.to_string(),
        })
    }

    /// Asks the brokers for their metadata (all topics: nothing is created), so that a refused
    /// login or handshake stops start-up instead of failing each publish later.
    pub async fn reach(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout).map(|_| ()))
            .await
            .map_err(|_| KafkaError::Canceled)?
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes one record with text headers and waits for the broker's acknowledgement.
    pub async fn publish(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(String, String)],
    ) -> Result<(), String> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (key, value) in headers {
            owned = owned.insert(Header {
                key: key.as_str(),
                value: Some(value.as_str()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Timeout::After(PUBLISH_TIMEOUT))
            .await
            .map(|_| ())
            .map_err(|(error, _)| error.to_string())
    }
}
