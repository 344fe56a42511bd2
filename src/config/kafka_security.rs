//! `security` of every Kafka client (a route's source, a Kafka dead letter, a job's Kafka sink):
//! TLS and SASL (PLAIN, SCRAM-SHA-256/512) — the raw table, its validated form and `validate`.
//! Reads the files it names (the password, the PEM files), as start-up would; nothing else.

use schemars::JsonSchema;
use serde::Deserialize;

use super::check::{read_secret, validate_ca_file, validate_identity};
use super::error::ConfigError;

/// `security`: how a Kafka client reaches the brokers. Secrets come from files only; librdkafka
/// properties that carry secrets are refused in `properties`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaSecurity {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl` (librdkafka's
    /// `security.protocol`).
    #[serde(default = "default_protocol")]
    #[schemars(extend("enum" = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]))]
    pub protocol: String,
    /// SASL mechanism with `sasl_*`: `SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN`.
    #[serde(default)]
    #[schemars(extend("enum" = ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]))]
    pub mechanism: Option<String>,
    /// SASL user name, with `sasl_*`.
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the SASL password (one line; a trailing line break is not part of it),
    /// with `sasl_*`.
    #[serde(default)]
    pub password_file: Option<String>,
    /// CA certificates (PEM) the brokers' certificates must chain to, with `ssl` / `sasl_ssl`.
    /// Default: the system's trust store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Client certificate (PEM) to present, with `ssl` / `sasl_ssl`; with `key_file`.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Private key (PEM, unencrypted) of `cert_file`.
    #[serde(default)]
    pub key_file: Option<String>,
    /// Check that a broker's certificate names the host connected to (librdkafka's
    /// `ssl.endpoint.identification.algorithm = https`). `false` still verifies the chain.
    #[serde(default = "default_verify_hostname")]
    pub verify_hostname: bool,
}

fn default_protocol() -> String {
    "plaintext".into()
}

fn default_verify_hostname() -> bool {
    true
}

/// A validated `security`: the librdkafka properties it stands for. `Debug` never shows the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSecurity {
    properties: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(key, value)| (*key, if *key == SASL_PASSWORD { "<redacted>" } else { value }))
            .collect();
        f.debug_struct("KafkaSecurity").field("properties", &shown).finish()
    }
}

const SASL_PASSWORD: &str = "sasl.password";

/// librdkafka properties that carry secrets: refused in `properties` (they would sit in the
/// config in clear and show in its errors); `security.password_file` takes the SASL password.
pub(super) const KAFKA_SECRET_PROPERTIES: &[&str] = &[
    SASL_PASSWORD,
    "sasl.jaas.config",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
];

impl KafkaSecurity {
    /// The librdkafka properties, to set on a client config (after `properties`: these win).
    pub fn properties(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.properties.iter().map(|(key, value)| (*key, value.as_str()))
    }
}

/// Validates `security` at config key `key` (e.g. `route[0].source.security`).
pub(super) fn validate_kafka_security(key: &str, raw: RawKafkaSecurity) -> Result<KafkaSecurity, ConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    let protocol = raw.protocol.to_ascii_lowercase();
    let (tls, sasl) = match protocol.as_str() {
        "plaintext" => (false, false),
        "ssl" => (true, false),
        "sasl_plaintext" => (false, true),
        "sasl_ssl" => (true, true),
        _ => {
            return Err(ConfigError::invalid(
                at("protocol"),
                &raw.protocol,
                "one of `plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl`",
            ))
        }
    };
    let mut properties = vec![("security.protocol", protocol.clone())];
    let sasl_keys = [
        ("mechanism", raw.mechanism.is_some()),
        ("username", raw.username.is_some()),
        ("password_file", raw.password_file.is_some()),
    ];
    let tls_keys = [
        ("ca_file", raw.ca_file.is_some()),
        ("cert_file", raw.cert_file.is_some()),
        ("key_file", raw.key_file.is_some()),
    ];
    let misplaced = |keys: &[(&'static str, bool)], needs: &str| -> Result<(), ConfigError> {
        match keys.iter().find(|(_, given)| *given) {
            Some((field, _)) => Err(ConfigError::invalid(
                at(field),
                "given",
                format!("only with `protocol` = {needs} (it is `{protocol}`)"),
            )),
            None => Ok(()),
        }
    };
    if sasl {
        let mechanism = raw.mechanism.ok_or_else(|| {
            ConfigError::invalid(
                at("mechanism"),
                "absent",
                "the SASL mechanism: `SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN`",
            )
        })?;
        let mechanism = match mechanism.to_ascii_uppercase().as_str() {
            m @ ("SCRAM-SHA-512" | "SCRAM-SHA-256" | "PLAIN") => m.to_string(),
            _ => {
                return Err(ConfigError::invalid(
                    at("mechanism"),
                    &mechanism,
                    "one of `SCRAM-SHA-512`, `SCRAM-SHA-256`, `PLAIN`",
                ))
            }
        };
        let username = raw
            .username
            .filter(|name| !name.is_empty())
            .ok_or_else(|| ConfigError::invalid(at("username"), "absent", "the SASL user name"))?;
        let path = raw
            .password_file
            .ok_or_else(|| ConfigError::invalid(at("password_file"), "absent", "a file holding the SASL password"))?;
        let password = read_secret(
            &at("password_file"),
            &path,
            &format!("the SASL password of `{username}`"),
        )?;
        properties.push(("sasl.mechanisms", mechanism));
        properties.push(("sasl.username", username));
        properties.push((SASL_PASSWORD, password));
    } else {
        misplaced(&sasl_keys, "`sasl_plaintext` or `sasl_ssl`")?;
    }
    if tls {
        if let Some(ca) = &raw.ca_file {
            validate_ca_file(&at("ca_file"), ca)?;
            properties.push(("ssl.ca.location", ca.clone()));
        }
        if let Some((cert, private)) = validate_identity(key, raw.cert_file, raw.key_file)? {
            properties.push(("ssl.certificate.location", cert.display().to_string()));
            properties.push(("ssl.key.location", private.display().to_string()));
        }
        properties.push((
            "ssl.endpoint.identification.algorithm",
            if raw.verify_hostname { "https" } else { "none" }.to_string(),
        ));
    } else {
        misplaced(&tls_keys, "`ssl` or `sasl_ssl`")?;
    }
    Ok(KafkaSecurity { properties })
}
