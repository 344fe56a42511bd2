//! Producers to message brokers: a Kafka topic, a NATS subject, a RabbitMQ exchange. Each
//! `publish` returns once the broker has the message (Kafka ack, NATS flush, AMQP confirm), so a
//! caller acknowledges its own input only after that. Dead letters go out through them today;
//! processing jobs will publish their results through the same publishers.
//!
//! Threads: created on the island at start-up; `publish` is awaited by the core (or the replay
//! runtime) that sends, the IO runs on the island or librdkafka's threads.

pub mod amqp;
pub mod kafka;
pub mod nats;

/// Whether a connection error's text says the TLS handshake failed or was refused: a
/// certificate or handshake error, a TLS alert from the server. For client libraries that give
/// the cause only as text (lapin) or inside an IO error (async-nats).
fn tls_refusal(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    ["alert", "certificate", "handshake", "tls"]
        .iter()
        .any(|word| text.contains(word))
}

#[cfg(test)]
mod tests {
    /// The server's TLS alerts (as the real nats-server sends them) read as TLS refusals; a
    /// refused TCP connection does not.
    #[test]
    fn tls_alerts_are_told_apart_from_other_io_errors() {
        assert!(super::tls_refusal("IO error: received fatal alert: BadCertificate"));
        assert!(super::tls_refusal(
            "IO error: received fatal alert: CertificateRequired"
        ));
        assert!(!super::tls_refusal("IO error: Connection refused (os error 111)"));
    }
}
