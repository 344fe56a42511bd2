//! `[admin]`: the admin port — Prometheus metrics and health probes — its address, optional
//! TLS and optional bearer token. Pure, but for reading the TLS files as start-up would.

use schemars::JsonSchema;
use serde::Deserialize;

use super::check::parse_socket_addr;
use super::error::ConfigError;
use super::ingest::parse_sha256;

/// `[admin]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Address of the admin port: `/metrics` (Prometheus text), `/live` and `/ready`, e.g.
    /// `127.0.0.1:9190`. Keep it on loopback or a management network.
    pub listen: String,
    /// Server certificate chain (PEM, leaf first): the port speaks HTTPS (TLS 1.2/1.3,
    /// HTTP/1.1). With `key_file`. Re-read on SIGHUP for new connections.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Private key (PEM) of `cert_file`.
    #[serde(default)]
    pub key_file: Option<String>,
    /// SHA-256 (64 hex digits) of the bearer token `/metrics` and every other path but `/live`
    /// and `/ready` require (`Authorization: Bearer <token>`), e.g. from
    /// `printf %s "$TOKEN" | sha256sum`. Absent: no token asked.
    #[serde(default)]
    pub token_sha256: Option<String>,
}

/// A validated `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where the admin port listens.
    pub listen: std::net::SocketAddr,
    /// (certificate chain, key) files when the port speaks HTTPS.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// SHA-256 of the bearer token, when one is asked.
    pub token_sha256: Option<[u8; 32]>,
}

pub(super) fn validate_admin(raw: RawAdmin) -> Result<AdminConfig, ConfigError> {
    let listen = parse_socket_addr("admin.listen", &raw.listen)?;
    let tls = match (raw.cert_file, raw.key_file) {
        (Some(cert), Some(key)) => Some((cert.into(), key.into())),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "admin.key_file",
                "absent",
                "the private key (PEM) of `admin.cert_file`",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "admin.cert_file",
                "absent",
                "the certificate chain (PEM) of `admin.key_file`",
            ))
        }
    };
    let token_sha256 = match raw.token_sha256 {
        Some(hex) => Some(parse_sha256(&hex).ok_or_else(|| {
            ConfigError::invalid(
                "admin.token_sha256",
                &hex,
                "64 hex digits: the SHA-256 of the token, e.g. `printf %s \"$TOKEN\" | sha256sum`",
            )
        })?),
        None => None,
    };
    let config = AdminConfig {
        listen,
        tls,
        token_sha256,
    };
    // The files are read now, as at start-up: `shardgate check` names a bad one.
    if let Some((cert, key)) = &config.tls {
        crate::tls::https_server_config(cert, key).map_err(|error| {
            ConfigError::invalid(format!("admin.{}", error.field), error.path.display(), error.reason)
        })?;
    }
    Ok(config)
}
