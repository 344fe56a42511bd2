//! Kafka producer: idempotent, `acks=all`, a short linger; `publish` returns once the broker
//! acknowledged the record. Threads: librdkafka's own threads do the IO; `publish` is awaited on
//! whichever thread sends (a core, `shardgate replay`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientContext;

use crate::config::KafkaSecurity;

/// How long one publish may wait in librdkafka's queue and for the broker.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`KafkaPublisher::reach`] waits for the brokers to answer.
const REACH_TIMEOUT: Duration = Duration::from_secs(15);

/// Publishes to one topic.
pub struct KafkaPublisher {
    producer: FutureProducer<PublisherContext>,
    topic: String,
    /// The producer context's last error (the context itself is not reachable through the
    /// producer).
    last_error: Arc<LastError>,
}

/// The last error a librdkafka client reported: a refused SASL login or a failed handshake is
/// named there, not in the error of the request that failed. Kept by the clients' contexts.
#[derive(Default)]
pub struct LastError(Mutex<Option<String>>);

impl LastError {
    /// Keeps `error` and librdkafka's `reason` as the last error.
    pub fn record(&self, error: &KafkaError, reason: &str) {
        let text = format!("{error}: {reason}");
        match self.0.lock() {
            Ok(mut last) => *last = Some(text),
            Err(poisoned) => *poisoned.into_inner() = Some(text),
        }
    }

    /// The last error recorded, if any.
    pub fn get(&self) -> Option<String> {
        match self.0.lock() {
            Ok(last) => last.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The publisher's context: logs each error librdkafka reports (`kafka client error`) and
/// keeps the last one.
struct PublisherContext {
    topic: String,
    last: Arc<LastError>,
}

impl ClientContext for PublisherContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(topic = %self.topic, %error, reason, "kafka client error");
        self.last.record(&error, reason);
    }
}

/// Which keys to look at (`keys`, e.g. "the route's `source.security`") for a client error that
/// is about credentials or TLS; empty for any other.
pub fn security_hint(cause: &str, keys: &str) -> String {
    // Broker names carry the protocol (`sasl_ssl://…`), so match the failure's own words.
    let cause = cause.to_ascii_lowercase();
    if cause.contains("handshake") || cause.contains("certificate") {
        format!(" (check {keys}: `protocol`, `ca_file`, `cert_file`, `verify_hostname`)")
    } else if cause.contains("authentication") {
        format!(" (check {keys}: `mechanism`, `username`, `password_file`)")
    } else {
        String::new()
    }
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
        let last_error = Arc::new(LastError::default());
        let producer = config.create_with_context(PublisherContext {
            topic: topic.to_string(),
            last: last_error.clone(),
        })?;
        Ok(KafkaPublisher {
            producer,
            topic: topic.to_string(),
            last_error,
        })
    }

    /// Asks the brokers for their metadata (all topics: nothing is created; 15 s at most), so
    /// that a refused login or handshake stops start-up instead of failing each publish later.
    /// The error names librdkafka's last reported error and, for credentials or TLS, the keys of
    /// `keys`.
    pub async fn reach(&self, keys: &str) -> Result<(), String> {
        let producer = self.producer.clone();
        let fetched =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, REACH_TIMEOUT).map(|_| ()))
                .await
                .map_err(|_| "the metadata request was cancelled".to_string())?;
        fetched.map_err(|error| match self.last_error.get() {
            Some(cause) => format!("{error}; last client error: {cause}{}", security_hint(&cause, keys)),
            None => format!("{error} (check {keys})"),
        })
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
