//! `[ingest]`: the gRPC ingest API's listeners and limits — the raw table, its validated form
//! and `validate`. Pure.

use schemars::JsonSchema;
use serde::Deserialize;

use super::check::parse_socket_addr;
use super::error::ConfigError;

/// `[ingest]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    /// Shared gRPC address every core accepts on, e.g. `127.0.0.1:50051`.
    pub listen: String,
    /// First per-core port: core `i` also listens on `core_port_base + i` (same host). 0 turns
    /// per-core ports off (the shard-aware client then falls back to the shared port).
    #[serde(default)]
    pub core_port_base: u16,
    /// Host published to clients for the per-core ports. Default: the host of `listen`.
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// Largest accepted request message in bytes (1024 to 268435456); a larger one is refused
    /// `TOO_LARGE` naming this key, and a stream goes on with its next message.
    #[serde(default = "default_message_bytes_max")]
    pub message_bytes_max: usize,
}

pub(super) fn default_message_bytes_max() -> usize {
    4 << 20
}

/// The gRPC ingest API's addresses and limits.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Shared address every core accepts on.
    pub listen: std::net::SocketAddr,
    /// First per-core port (core `i` listens on `core_port_base + i`); 0 = none.
    pub core_port_base: u16,
    /// Host published for per-core endpoints.
    pub advertise_host: String,
    /// Largest accepted request message in bytes.
    pub message_bytes_max: usize,
}

impl IngestConfig {
    /// Address of core `core`'s own port, if per-core ports are on.
    pub fn core_addr(&self, core: usize) -> Option<std::net::SocketAddr> {
        if self.core_port_base == 0 {
            return None;
        }
        let port = u16::try_from(usize::from(self.core_port_base) + core).ok()?;
        Some(std::net::SocketAddr::new(self.listen.ip(), port))
    }
}

pub(super) fn validate_ingest(raw: RawIngest) -> Result<IngestConfig, ConfigError> {
    let listen = parse_socket_addr("ingest.listen", &raw.listen)?;
    if !(1024..=(256 << 20)).contains(&raw.message_bytes_max) {
        return Err(ConfigError::invalid(
            "ingest.message_bytes_max",
            raw.message_bytes_max,
            "bytes from 1024 to 268435456",
        ));
    }
    let advertise_host = raw.advertise_host.unwrap_or_else(|| listen.ip().to_string());
    Ok(IngestConfig {
        listen,
        core_port_base: raw.core_port_base,
        advertise_host,
        message_bytes_max: raw.message_bytes_max,
    })
}
