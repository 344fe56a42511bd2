//! `security` of every RabbitMQ connection (a `rabbitmq` route's source, a RabbitMQ dead
//! letter, a job's RabbitMQ sink): the login (user and a password file, instead of credentials
//! in the URL) and, with `amqps://`, the CA and a client certificate. The raw table, its
//! validated form and `validate`; reads the files it names, as start-up would.

use std::path::Path;

use schemars::JsonSchema;
use serde::Deserialize;

use super::check::{validate_ca_file, validate_identity, validate_login};
use super::error::ConfigError;

/// `security`: a login and TLS material towards RabbitMQ. Secrets come from files only.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAmqpSecurity {
    /// User name; with `password_file`. Replaces the URL's user and password.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the user's password (one line).
    #[serde(default)]
    pub password_file: Option<String>,
    /// CA certificates (PEM) the broker's certificate must chain to (`amqps://` URLs). Default:
    /// the system's trust store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Client certificate (PEM) to present (`amqps://`); with `key_file`.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Private key (PEM, PKCS#8) of `cert_file`.
    #[serde(default)]
    pub key_file: Option<String>,
}

/// A validated `security` of a RabbitMQ connection: the files' contents. `Debug` never shows
/// the password or the key.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpSecurity {
    /// User and password, when set.
    pub login: Option<(String, String)>,
    /// CA certificates, PEM.
    pub ca_pem: Option<String>,
    /// Client certificate and key, PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for AmqpSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSecurity")
            .field("username", &self.login.as_ref().map(|(user, _)| user))
            .field("ca", &self.ca_pem.is_some())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

/// Validates `security` at config key `key` (e.g. `route[0].source.security`) for `url`.
pub(super) fn validate_amqp_security(key: &str, raw: RawAmqpSecurity, url: &str) -> Result<AmqpSecurity, ConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    let tls = url.starts_with("amqps://");
    if !tls {
        if let Some((field, _)) = [
            ("ca_file", raw.ca_file.is_some()),
            ("cert_file", raw.cert_file.is_some()),
            ("key_file", raw.key_file.is_some()),
        ]
        .into_iter()
        .find(|(_, given)| *given)
        {
            return Err(ConfigError::invalid(
                at(field),
                "given",
                "only with an `amqps://` URL (TLS)",
            ));
        }
    }
    let login = validate_login(key, raw.username, raw.password_file)?;
    let ca_pem = match &raw.ca_file {
        Some(ca) => {
            validate_ca_file(&at("ca_file"), ca)?;
            Some(
                std::fs::read_to_string(ca)
                    .map_err(|e| ConfigError::invalid(at("ca_file"), ca, format!("a readable PEM file ({e})")))?,
            )
        }
        None => None,
    };
    let identity = match validate_identity(key, raw.cert_file, raw.key_file)? {
        Some((cert, private)) => {
            let read = |field: &str, path: &Path| {
                std::fs::read(path)
                    .map_err(|e| ConfigError::invalid(at(field), path.display(), format!("a readable file ({e})")))
            };
            Some((read("cert_file", &cert)?, read("key_file", &private)?))
        }
        None => None,
    };
    Ok(AmqpSecurity {
        login,
        ca_pem,
        identity,
    })
}
