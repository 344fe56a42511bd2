//! NATS producer: publishes with headers on a subject and flushes, so a message has left the
//! gateway when `publish` returns (a JetStream stream that captures the subject makes it
//! durable). Also the one `connect` every NATS user shares. Threads: the island (async-nats is
//! tokio-bound); callers on a core await it through the island's reactor.

use crate::config::{NatsLogin, NatsSecurity};

/// Errors reaching the server, the stream or the consumer at start-up.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct NatsError {
    what: String,
    reason: String,
}

/// A [`NatsError`] saying what failed and why.
pub fn nats_error(what: impl Into<String>, reason: impl std::fmt::Display) -> NatsError {
    NatsError {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// Connects to a NATS server, with `security`'s TLS and login when given. Run on the island.
/// A refused login or a failed handshake says which `security` keys to look at.
pub async fn connect(url: &str, route: &str, security: Option<&NatsSecurity>) -> Result<async_nats::Client, NatsError> {
    let what = || format!("cannot connect to NATS at `{url}`");
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("shardgate-{route}"))
        .connection_timeout(std::time::Duration::from_secs(10));
    if let Some(security) = security {
        options = options.require_tls(security.require_tls);
        if let Some(ca) = &security.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &security.identity {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options = match &security.login {
            None => options,
            Some(NatsLogin::Password { username, password }) => {
                options.user_and_password(username.clone(), password.clone())
            }
            Some(NatsLogin::Token(token)) => options.token(token.clone()),
            Some(NatsLogin::NKey(seed)) => options.nkey(seed.clone()),
            Some(NatsLogin::Creds(path)) => options
                .credentials_file(path)
                .await
                .map_err(|e| nats_error(what(), format!("`creds_file` = `{}`: {e}", path.display())))?,
        };
    }
    options.connect(url).await.map_err(|e| {
        use async_nats::ConnectErrorKind as Kind;
        let hint = match e.kind() {
            Kind::AuthorizationViolation | Kind::Authentication => {
                " (check `security`: `username` / `password_file`, `token_file`, `nkey_seed_file` or `creds_file`)"
            }
            Kind::Tls => " (check `security`: `tls`, `ca_file`, `cert_file`, `key_file`)",
            // The server's TLS refusing the client (no certificate, another CA's) arrives as an
            // IO error carrying the alert.
            Kind::Io if super::tls_refusal(&e.to_string()) => {
                " (check `security`: `tls`, `ca_file`, `cert_file`, `key_file`)"
            }
            _ => "",
        };
        nats_error(what(), format!("{e}{hint}"))
    })
}

/// Publishes on one subject.
pub struct NatsPublisher {
    client: async_nats::Client,
    subject: String,
}

impl NatsPublisher {
    /// A publisher on `client` (connected at start-up on the island).
    pub fn new(client: async_nats::Client, subject: &str) -> NatsPublisher {
        NatsPublisher {
            client,
            subject: subject.to_string(),
        }
    }

    /// The subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Publishes one message with `headers` and flushes the connection.
    pub async fn publish(&self, headers: &[(String, String)], payload: Vec<u8>) -> Result<(), String> {
        let mut map = async_nats::HeaderMap::new();
        for (key, value) in headers {
            map.insert(key.as_str(), value.as_str());
        }
        self.client
            .publish_with_headers(self.subject.clone(), map, payload.into())
            .await
            .map_err(|e| e.to_string())?;
        self.client.flush().await.map_err(|e| e.to_string())
    }
}
