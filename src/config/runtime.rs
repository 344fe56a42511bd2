//! `[runtime]`: cores, limits, the spool, the gateway's id — the raw table, its validated form
//! and `validate`. Pure.

use schemars::JsonSchema;
use serde::Deserialize;
use std::time::Duration;

use super::check::bounded_ms;
use super::error::ConfigError;

/// `[runtime]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// Data-plane cores: `"auto"` (one per physical core) or a number.
    #[serde(default = "default_cores")]
    #[schemars(schema_with = "cores_schema")]
    pub cores: toml::Value,
    /// Worker threads of the tokio driver island (database and broker sockets).
    #[serde(default = "default_island_threads")]
    pub island_threads: usize,
    /// Rows a core may have in flight before its sources stop reading, in all: split evenly
    /// among the core's routes and the ingest API, so a stalled route cannot starve the others
    /// (a source message counts as one row until it is mapped). Raise it with many routes.
    #[serde(default = "default_inflight_rows")]
    pub inflight_rows_per_core_max: usize,
    /// Graceful shutdown deadline in milliseconds: in-flight messages finish within it, the rest
    /// replays after the next start.
    #[serde(default = "default_shutdown_deadline_ms")]
    pub shutdown_deadline_ms: u64,
    /// Rows per UNLOGGED batch on the gRPC write path, grouped by replica and shard (1 = single
    /// writes); the default is measured, see the README.
    #[serde(default = "default_write_batch_rows")]
    pub write_batch_rows_max: usize,
    /// Directory of the per-core spools (`<dir>/core-<n>`), on the NVMe. Required by routes
    /// with `ack = "spooled"`.
    #[serde(default)]
    pub spool_dir: Option<String>,
    /// A spool segment is sealed at this size, in MiB (1 to 2048).
    #[serde(default = "default_spool_segment_mib")]
    pub spool_segment_mib: u64,
    /// Bytes of spool per core, in MiB, beyond which spooled routes pause (backpressure).
    #[serde(default = "default_spool_cap_mib")]
    pub spool_cap_mib_per_core: u64,
    /// Spooled records per core, in MiB of their spool records, that are written straight from
    /// memory (the messages and rows being written take about four times that); beyond (the
    /// database slow or down) acknowledged records wait on disk only and are read back when it
    /// keeps up again, so memory stays bounded. More does not write faster: the database is
    /// what the records wait for.
    #[serde(default = "default_spool_memory_mib")]
    pub spool_memory_mib_per_core: u64,
    /// Stable name of this gateway, unique among the gateways sharing a Kafka consumer group.
    /// Kafka routes join their group as static members (`group.instance.id` =
    /// `shardgate.<gateway_id>.<route>`), so a gateway restarted within the group's session
    /// timeout gets its partitions back at once instead of after that timeout. Default:
    /// `<hostname>-<port>` of `ingest.listen`, else of `admin.listen`, when that port is not 0;
    /// with neither, Kafka routes join as dynamic members. Letters, digits, `.`, `_` and `-`.
    #[serde(default)]
    pub gateway_id: Option<String>,
}

impl Default for RawRuntime {
    fn default() -> Self {
        RawRuntime {
            cores: default_cores(),
            island_threads: default_island_threads(),
            inflight_rows_per_core_max: default_inflight_rows(),
            shutdown_deadline_ms: default_shutdown_deadline_ms(),
            write_batch_rows_max: default_write_batch_rows(),
            spool_dir: None,
            spool_segment_mib: default_spool_segment_mib(),
            spool_cap_mib_per_core: default_spool_cap_mib(),
            spool_memory_mib_per_core: default_spool_memory_mib(),
            gateway_id: None,
        }
    }
}

/// How many cores run executors and how much work each may hold.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Number of data-plane cores; `None` means one per physical core (hwlocality).
    pub cores: Option<usize>,
    /// Worker threads of the tokio driver island.
    pub island_threads: usize,
    /// Rows a core may have in flight (decoded, not yet acknowledged by the database).
    pub inflight_rows_per_core_max: usize,
    /// Rows per UNLOGGED batch on the gRPC write path (rows of one replica and shard only);
    /// 1 sends single writes.
    pub write_batch_rows_max: usize,
    /// How long a graceful shutdown may take before in-flight work is abandoned (and replayed
    /// from the source on the next start).
    pub shutdown_deadline: Duration,
    /// The per-core spools, if configured.
    pub spool: Option<SpoolConfig>,
    /// `runtime.gateway_id` as written; see [`Config::gateway_id`] for the default.
    pub gateway_id: Option<String>,
}

/// Where and how big the per-core spools are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Directory; core `n` uses `<dir>/core-<n>`.
    pub dir: std::path::PathBuf,
    /// Segment size at which a segment is sealed.
    pub segment_bytes: u64,
    /// Live bytes per core beyond which spooled routes pause.
    pub cap_bytes_per_core: u64,
    /// Bytes of spooled records per core written from memory; beyond, they are read back from
    /// disk once the database keeps up.
    pub memory_bytes_per_core: u64,
}

pub(super) fn validate_runtime(raw: RawRuntime) -> Result<RuntimeConfig, ConfigError> {
    let cores = match &raw.cores {
        toml::Value::String(s) if s == "auto" => None,
        toml::Value::Integer(n) if (1..=CORES_MAX as i64).contains(n) => Some(*n as usize),
        other => {
            return Err(ConfigError::invalid(
                "runtime.cores",
                other,
                format!("`\"auto\"` or a whole number from 1 to {CORES_MAX}"),
            ))
        }
    };
    if !(1..=ISLAND_THREADS_MAX).contains(&raw.island_threads) {
        return Err(ConfigError::invalid(
            "runtime.island_threads",
            raw.island_threads,
            format!("a whole number from 1 to {ISLAND_THREADS_MAX}"),
        ));
    }
    if !(1..=INFLIGHT_ROWS_MAX).contains(&raw.inflight_rows_per_core_max) {
        return Err(ConfigError::invalid(
            "runtime.inflight_rows_per_core_max",
            raw.inflight_rows_per_core_max,
            format!("a whole number from 1 to {INFLIGHT_ROWS_MAX}"),
        ));
    }
    if !(1..=WRITE_BATCH_ROWS_MAX).contains(&raw.write_batch_rows_max) {
        return Err(ConfigError::invalid(
            "runtime.write_batch_rows_max",
            raw.write_batch_rows_max,
            format!("a whole number from 1 to {WRITE_BATCH_ROWS_MAX}"),
        ));
    }
    if raw.spool_segment_mib == 0 || raw.spool_segment_mib > 2048 {
        return Err(ConfigError::invalid(
            "runtime.spool_segment_mib",
            raw.spool_segment_mib,
            "MiB from 1 to 2048",
        ));
    }
    if raw.spool_cap_mib_per_core < raw.spool_segment_mib {
        return Err(ConfigError::invalid(
            "runtime.spool_cap_mib_per_core",
            raw.spool_cap_mib_per_core,
            format!("at least `runtime.spool_segment_mib` ({} MiB)", raw.spool_segment_mib),
        ));
    }
    if raw.spool_memory_mib_per_core == 0 || raw.spool_memory_mib_per_core > raw.spool_cap_mib_per_core {
        return Err(ConfigError::invalid(
            "runtime.spool_memory_mib_per_core",
            raw.spool_memory_mib_per_core,
            format!(
                "MiB from 1 to `runtime.spool_cap_mib_per_core` ({} MiB)",
                raw.spool_cap_mib_per_core
            ),
        ));
    }
    Ok(RuntimeConfig {
        cores,
        island_threads: raw.island_threads,
        inflight_rows_per_core_max: raw.inflight_rows_per_core_max,
        write_batch_rows_max: raw.write_batch_rows_max,
        spool: raw.spool_dir.map(|dir| SpoolConfig {
            dir: dir.into(),
            segment_bytes: raw.spool_segment_mib << 20,
            cap_bytes_per_core: raw.spool_cap_mib_per_core << 20,
            memory_bytes_per_core: raw.spool_memory_mib_per_core << 20,
        }),
        shutdown_deadline: Duration::from_millis(bounded_ms("runtime.shutdown_deadline_ms", raw.shutdown_deadline_ms)?),
        gateway_id: raw.gateway_id.map(validate_gateway_id).transpose()?,
    })
}

/// Longest `runtime.gateway_id`: Kafka allows 249 characters in `group.instance.id`, which
/// also carries a prefix and the route name.
pub(super) const GATEWAY_ID_LEN_MAX: usize = 64;

pub(super) fn validate_gateway_id(id: String) -> Result<String, ConfigError> {
    let valid = !id.is_empty()
        && id.len() <= GATEWAY_ID_LEN_MAX
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid {
        return Err(ConfigError::invalid(
            "runtime.gateway_id",
            &id,
            format!("1 to {GATEWAY_ID_LEN_MAX} letters, digits, `.`, `_` or `-`, unique among the gateways of a consumer group"),
        ));
    }
    Ok(id)
}

pub(super) fn default_spool_segment_mib() -> u64 {
    64
}

pub(super) fn default_spool_cap_mib() -> u64 {
    1024
}

pub(super) fn default_spool_memory_mib() -> u64 {
    16
}

/// `runtime.cores`: `"auto"` or a whole number.
pub(super) fn cores_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [{ "type": "string", "enum": ["auto"] }, { "type": "integer", "minimum": 1, "maximum": CORES_MAX }]
    })
}

pub(super) fn default_cores() -> toml::Value {
    toml::Value::String("auto".to_string())
}

pub(super) fn default_island_threads() -> usize {
    1
}

pub(super) fn default_inflight_rows() -> usize {
    2048
}

pub(super) fn default_shutdown_deadline_ms() -> u64 {
    10_000
}

/// Measured with `shardgate-bench --modes grpc-smart --rows 300000 --write-batch-rows N` on
/// the 2-core test machine (Cassandra on the same cores), 100-byte rows:
/// N = 1 (concurrent single writes): 31,899 rows/s, 17.2 gateway CPU-s per million rows;
/// N = 16: 40,445 rows/s, 5.1 CPU-s/M; N = 64: 46,937 rows/s, 4.3 CPU-s/M. Batches only ever
/// hold rows of one replica and shard, so the coordinator never fans them out.
pub(super) fn default_write_batch_rows() -> usize {
    64
}

/// Bounds of every numeric knob: generous, but a typo cannot ask for a million threads.
pub(super) const CORES_MAX: usize = 1024;

pub(super) const ISLAND_THREADS_MAX: usize = 64;

pub(super) const INFLIGHT_ROWS_MAX: usize = 1 << 20;

pub(super) const WRITE_BATCH_ROWS_MAX: usize = 1024;
