//! `[cluster]`: how to reach the database — the raw table, its validated form and `validate`.
//! Pure.

use schemars::JsonSchema;
use scylla::frame::types::Consistency;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

use super::check::{bounded_ms, read_secret, validate_host_port, validate_identity};
use super::error::ConfigError;

/// `[cluster]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// Contact points, `host:port`, for example `["127.0.0.1:9042"]`.
    pub contact_points: Vec<String>,
    /// Data center to prefer, for example `datacenter1`. Optional.
    #[serde(default)]
    pub local_datacenter: Option<String>,
    /// Write consistency: `one`, `two`, `three`, `quorum`, `all`, `local_quorum`, `each_quorum`,
    /// `local_one`, `any`.
    #[serde(default = "default_consistency")]
    #[schemars(extend("enum" = ["any", "one", "two", "three", "quorum", "all", "local_quorum", "each_quorum", "local_one"]))]
    pub consistency: String,
    /// Client-side timeout of one request, in milliseconds.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How long start-up keeps trying to reach the cluster, in milliseconds, before it gives
    /// up with the error (0: one attempt). The default waits 5 minutes, so a gateway restarted during a
    /// database outage waits for it, its spool intact.
    #[serde(default = "default_connect_wait_ms")]
    pub connect_wait_ms: u64,
    /// `[cluster.tls]`: TLS to every node (the server's `client_encryption_options`).
    #[serde(default)]
    pub tls: Option<RawClusterTls>,
    /// `[cluster.auth]`: the role the gateway logs in as (`PasswordAuthenticator`).
    #[serde(default)]
    pub auth: Option<RawClusterAuth>,
}

/// `[cluster.tls]`: what the gateway trusts and presents to the database. PEM files only; read
/// at start-up (and by `shardgate check`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawClusterTls {
    /// CA certificates (PEM) the nodes' certificates must chain to.
    pub ca_file: String,
    /// Client certificate chain (PEM) to present, when the nodes ask for one
    /// (`require_client_auth`); with `key_file`.
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Private key (PEM) of `cert_file`.
    #[serde(default)]
    pub key_file: Option<String>,
    /// Check that a node's certificate names the address connected to (an IP SAN: the driver
    /// connects to the addresses the cluster reports). `false` still verifies the chain and
    /// validity period — for certificates issued without the nodes' addresses.
    #[serde(default = "default_verify_hostname")]
    pub verify_hostname: bool,
}

/// `[cluster.auth]`: a role and its password, read from a file (a Kubernetes secret mount or
/// similar), never from the config itself.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawClusterAuth {
    /// The role to log in as.
    pub username: String,
    /// A file holding its password (one line; a trailing line break is not part of it).
    pub password_file: String,
}

/// A role and its password; `Debug` never shows the password.
#[derive(Clone)]
pub struct ClusterCredentials {
    /// The role.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for ClusterCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How to reach the ScyllaDB / Cassandra cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `host:port` contact points.
    pub contact_points: Vec<String>,
    /// Data center whose replicas are preferred; `None` lets the driver pick.
    pub local_datacenter: Option<String>,
    /// Consistency level of every write.
    pub consistency: Consistency,
    /// Client-side timeout of one request.
    pub request_timeout: Duration,
    /// How long start-up keeps retrying an unreachable cluster.
    pub connect_wait: Duration,
    /// TLS to every node, when `[cluster.tls]` is set.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The role to log in as, when `[cluster.auth]` is set.
    pub credentials: Option<ClusterCredentials>,
}

pub(super) fn validate_cluster(raw: RawCluster) -> Result<ClusterConfig, ConfigError> {
    if raw.contact_points.is_empty() {
        return Err(ConfigError::invalid(
            "cluster.contact_points",
            "[]",
            "at least one `host:port`",
        ));
    }
    for point in &raw.contact_points {
        validate_host_port("cluster.contact_points", point)?;
    }
    let consistency = parse_consistency(&raw.consistency)?;
    let tls = raw.tls.map(validate_cluster_tls).transpose()?;
    let credentials = raw.auth.map(validate_cluster_auth).transpose()?;
    Ok(ClusterConfig {
        contact_points: raw.contact_points,
        local_datacenter: raw.local_datacenter,
        consistency,
        request_timeout: Duration::from_millis(bounded_ms("cluster.request_timeout_ms", raw.request_timeout_ms)?),
        connect_wait: Duration::from_millis(match raw.connect_wait_ms {
            0 => 0,
            wait => bounded_ms("cluster.connect_wait_ms", wait)?,
        }),
        tls,
        credentials,
    })
}

fn validate_cluster_tls(raw: RawClusterTls) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let identity = validate_identity("cluster.tls", raw.cert_file, raw.key_file)?;
    // The files are read now, as at start-up: `shardgate check` names a bad one.
    crate::tls::database_client_config(
        std::path::Path::new(&raw.ca_file),
        identity.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path())),
        raw.verify_hostname,
    )
    .map_err(|error| {
        ConfigError::invalid(
            format!("cluster.tls.{}", error.field),
            error.path.display(),
            error.reason,
        )
    })
}

fn validate_cluster_auth(raw: RawClusterAuth) -> Result<ClusterCredentials, ConfigError> {
    if raw.username.is_empty() {
        return Err(ConfigError::invalid("cluster.auth.username", "\"\"", "a role name"));
    }
    let password = read_secret(
        "cluster.auth.password_file",
        &raw.password_file,
        &format!("the password of role `{}`", raw.username),
    )?;
    Ok(ClusterCredentials {
        username: raw.username,
        password,
    })
}

pub(super) fn parse_consistency(text: &str) -> Result<Consistency, ConfigError> {
    parse_consistency_at("cluster.consistency", text)
}

/// Parses a consistency level named at config key `key`.
pub(super) fn parse_consistency_at(key: &str, text: &str) -> Result<Consistency, ConfigError> {
    let consistency = match text.to_ascii_lowercase().as_str() {
        "any" => Consistency::Any,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        _ => {
            return Err(ConfigError::invalid(
                key,
                text,
                "one of `any`, `one`, `two`, `three`, `quorum`, `all`, `local_quorum`, `each_quorum`, `local_one`",
            ))
        }
    };
    Ok(consistency)
}

pub(super) fn default_consistency() -> String {
    "local_quorum".to_string()
}

fn default_verify_hostname() -> bool {
    true
}

pub(super) fn default_request_timeout_ms() -> u64 {
    10_000
}

pub(super) fn default_connect_wait_ms() -> u64 {
    300_000
}
