//! `[cluster]`: how to reach the database — the raw table, its validated form and `validate`.
//! Pure.

use schemars::JsonSchema;
use scylla::frame::types::Consistency;
use serde::Deserialize;
use std::time::Duration;

use super::check::{bounded_ms, validate_host_port};
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
    Ok(ClusterConfig {
        contact_points: raw.contact_points,
        local_datacenter: raw.local_datacenter,
        consistency,
        request_timeout: Duration::from_millis(bounded_ms("cluster.request_timeout_ms", raw.request_timeout_ms)?),
        connect_wait: Duration::from_millis(match raw.connect_wait_ms {
            0 => 0,
            wait => bounded_ms("cluster.connect_wait_ms", wait)?,
        }),
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

pub(super) fn default_request_timeout_ms() -> u64 {
    10_000
}

pub(super) fn default_connect_wait_ms() -> u64 {
    300_000
}
