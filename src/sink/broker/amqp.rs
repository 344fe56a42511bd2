//! RabbitMQ producer: a confirming channel on its own connection, publishing persistent
//! messages with headers. Also the one `connect` and the URL redaction the RabbitMQ source uses.
//! Threads: the island (lapin is tokio-bound); callers on a core await it through the island's
//! reactor.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::config::AmqpSecurity;

/// Connects to the broker, with `security`'s login (replacing the URL's) and TLS material
/// when given. Run on the island. The error never holds the password.
pub async fn connect(url: &str, security: Option<&AmqpSecurity>) -> Result<Connection, String> {
    let Some(security) = security else {
        return Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|e| e.to_string());
    };
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(|e| format!("not an AMQP URL: {e}"))?;
    if let Some((username, password)) = &security.login {
        uri.authority.userinfo.username = username.clone();
        uri.authority.userinfo.password = password.clone();
    }
    let over_tls = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
    let tls = OwnedTLSConfig {
        identity: security.identity.as_ref().map(|(cert, key)| OwnedIdentity::PKCS8 {
            pem: cert.clone(),
            key: key.clone(),
        }),
        cert_chain: security.ca_pem.clone(),
    };
    Connection::connect_uri_with_config(uri, ConnectionProperties::default(), tls)
        .await
        .map_err(|e| {
            let text = e.to_string();
            let hint = refusal_hint(&text, over_tls);
            format!("{text}{hint}")
        })
}

/// The `security` keys to check for a refused connection, from lapin's error text (lapin reports
/// the cause only as text): ACCESS_REFUSED for a bad login, a TLS refusal for a failed handshake.
/// Over TLS a listener that wants a client certificate may instead close the socket once the
/// handshake ends (TLS 1.3 sends its alert after the client's last flight), so the client sees a
/// broken pipe, a reset or an early end of stream: that also points at TLS.
fn refusal_hint(text: &str, over_tls: bool) -> &'static str {
    let lower = text.to_ascii_lowercase();
    let dropped = || {
        ["broken pipe", "connection reset", "unexpected eof", "early eof"]
            .iter()
            .any(|word| lower.contains(word))
    };
    if lower.contains("access_refused") || lower.contains("authentication") {
        " (check `security`: `username`, `password_file`)"
    } else if super::tls_refusal(text) || (over_tls && dropped()) {
        " (check `security`: `ca_file`, `cert_file`, `key_file`)"
    } else {
        ""
    }
}

pub use crate::config::redact_url as redact;

/// Publishes to one exchange with publisher confirms: `publish` returns once the broker
/// confirmed the message (persistent, headers as long strings). Dead letters go out through one;
/// so will processing jobs' results.
pub struct AmqpPublisher {
    _connection: Connection,
    channel: lapin::Channel,
    /// Exchange name (`""` is the default exchange, routing by queue name).
    pub exchange: String,
    routing_key: String,
}

impl AmqpPublisher {
    /// Opens a confirming channel on a new connection. Run on the island at start-up.
    pub async fn open(
        url: &str,
        exchange: &str,
        routing_key: &str,
        security: Option<&AmqpSecurity>,
    ) -> Result<AmqpPublisher, String> {
        let connection = connect(url, security)
            .await
            .map_err(|e| format!("cannot connect to RabbitMQ at `{}`: {e}", redact(url)))?;
        let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Ok(AmqpPublisher {
            _connection: connection,
            channel,
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
        })
    }

    /// Publishes one message and waits for the broker's confirm.
    pub async fn publish(&self, headers: Vec<(String, String)>, payload: &[u8]) -> Result<(), String> {
        self.publish_with_id(headers, payload, None).await
    }

    /// [`AmqpPublisher::publish`] with the AMQP `message_id` property set (consumers de-duplicate
    /// on it).
    pub async fn publish_with_id(
        &self,
        headers: Vec<(String, String)>,
        payload: &[u8],
        message_id: Option<&str>,
    ) -> Result<(), String> {
        let mut table = FieldTable::default();
        for (key, value) in headers {
            table.insert(ShortString::from(key), AMQPValue::LongString(LongString::from(value)));
        }
        let mut properties = BasicProperties::default().with_headers(table).with_delivery_mode(2);
        if let Some(id) = message_id {
            properties = properties.with_message_id(ShortString::from(id.to_string()));
        }
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str(),
                self.routing_key.as_str(),
                BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if confirm.is_nack() {
            return Err("the broker refused the message (nack)".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::refusal_hint;

    #[test]
    fn a_refused_login_points_at_the_login_keys() {
        let text = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN";
        assert!(refusal_hint(text, true).contains("`password_file`"));
    }

    #[test]
    fn a_tls_listener_closing_the_socket_points_at_the_certificate_keys() {
        for text in [
            "IO error: Broken pipe (os error 32)",
            "IO error: Connection reset by peer (os error 104)",
            "invalid peer certificate: UnknownIssuer",
        ] {
            assert!(refusal_hint(text, true).contains("`cert_file`"), "{text}");
        }
    }

    #[test]
    fn a_dropped_plain_connection_names_no_tls_keys() {
        assert_eq!(refusal_hint("IO error: Broken pipe (os error 32)", false), "");
    }
}
