//! `[query]`: the gRPC query API's defaults and limits — the raw table, its validated form and
//! `validate`. The query API is served on the `[ingest]` listeners. Pure.

use schemars::JsonSchema;
use scylla::frame::types::Consistency;
use serde::Deserialize;

use super::cluster::parse_consistency_at;
use super::error::ConfigError;

/// `[query]`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawQuery {
    /// Lets `Query.Execute` run statements that are not SELECTs (INSERT, UPDATE, DELETE,
    /// schema changes). Off: they are refused `READ_ONLY`.
    #[serde(default)]
    pub allow_writes: bool,
    /// Consistency of reads that do not ask for one: `one`, `two`, `three`, `quorum`, `all`,
    /// `local_quorum`, `each_quorum`, `local_one`.
    #[serde(default = "default_consistency")]
    #[schemars(extend("enum" = ["one", "two", "three", "quorum", "all", "local_quorum", "each_quorum", "local_one"]))]
    pub consistency: String,
    /// Rows per page when a request asks for none (1 to `page_size_max`).
    #[serde(default = "default_page_size")]
    pub page_size_default: u32,
    /// Most rows per page a request may ask for (1 to 100000); a larger `page_size` is
    /// refused `BAD_QUERY`.
    #[serde(default = "default_page_size_max")]
    pub page_size_max: u32,
    /// File holding the key page tokens are MAC'd with (at least 32 bytes; created with a
    /// random key if missing). Gateways that share it accept each other's tokens, across
    /// restarts. Default: `<runtime.spool_dir>/page-token.key` when a spool directory is set;
    /// without either, a random key per process (tokens die with the process; logged).
    #[serde(default)]
    pub page_token_key_file: Option<String>,
    /// Splits per gateway core a scan is planned into when the request asks for no number
    /// (1 to 1024).
    #[serde(default = "default_scan_splits_per_core")]
    pub scan_splits_per_core: u32,
    /// Most splits one `Scan` request reads at once (1 to 64).
    #[serde(default = "default_scan_parallel_splits_max")]
    pub scan_parallel_splits_max: u32,
    /// Most scan pages one core fetches from the database at once, over all `Scan`s (1 to
    /// 1024); more wait their turn, so many scans share the core's database connections
    /// instead of flooding them.
    #[serde(default = "default_scan_reads_per_core_max")]
    pub scan_reads_per_core_max: u32,
}

impl Default for RawQuery {
    fn default() -> Self {
        RawQuery {
            allow_writes: false,
            consistency: default_consistency(),
            page_size_default: default_page_size(),
            page_size_max: default_page_size_max(),
            page_token_key_file: None,
            scan_splits_per_core: default_scan_splits_per_core(),
            scan_parallel_splits_max: default_scan_parallel_splits_max(),
            scan_reads_per_core_max: default_scan_reads_per_core_max(),
        }
    }
}

fn default_consistency() -> String {
    "local_quorum".into()
}

fn default_page_size() -> u32 {
    100
}

fn default_page_size_max() -> u32 {
    10_000
}

fn default_scan_splits_per_core() -> u32 {
    3
}

fn default_scan_parallel_splits_max() -> u32 {
    8
}

fn default_scan_reads_per_core_max() -> u32 {
    16
}

/// The query API's defaults and limits.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// Statements other than SELECT allowed.
    pub allow_writes: bool,
    /// Consistency of reads that ask for none.
    pub consistency: Consistency,
    /// Rows per page by default.
    pub page_size_default: u32,
    /// Most rows per page.
    pub page_size_max: u32,
    /// Where the page-token key is kept, if anywhere.
    pub page_token_key_file: Option<std::path::PathBuf>,
    /// Splits per core of a planned scan.
    pub scan_splits_per_core: u32,
    /// Most splits one scan reads at once.
    pub scan_parallel_splits_max: u32,
    /// Most scan pages one core fetches at once.
    pub scan_reads_per_core_max: u32,
}

pub(super) fn validate_query(raw: RawQuery, spool_dir: Option<&std::path::Path>) -> Result<QueryConfig, ConfigError> {
    let consistency = parse_consistency_at("query.consistency", &raw.consistency)?;
    if consistency == Consistency::Any {
        return Err(ConfigError::invalid(
            "query.consistency",
            &raw.consistency,
            "a read consistency (`any` is for writes only)",
        ));
    }
    if !(1..=100_000).contains(&raw.page_size_max) {
        return Err(ConfigError::invalid(
            "query.page_size_max",
            raw.page_size_max,
            "rows from 1 to 100000",
        ));
    }
    if !(1..=raw.page_size_max).contains(&raw.page_size_default) {
        return Err(ConfigError::invalid(
            "query.page_size_default",
            raw.page_size_default,
            format!("rows from 1 to query.page_size_max ({})", raw.page_size_max),
        ));
    }
    if !(1..=1024).contains(&raw.scan_splits_per_core) {
        return Err(ConfigError::invalid(
            "query.scan_splits_per_core",
            raw.scan_splits_per_core,
            "from 1 to 1024",
        ));
    }
    if !(1..=64).contains(&raw.scan_parallel_splits_max) {
        return Err(ConfigError::invalid(
            "query.scan_parallel_splits_max",
            raw.scan_parallel_splits_max,
            "from 1 to 64",
        ));
    }
    if !(1..=1024).contains(&raw.scan_reads_per_core_max) {
        return Err(ConfigError::invalid(
            "query.scan_reads_per_core_max",
            raw.scan_reads_per_core_max,
            "from 1 to 1024",
        ));
    }
    let page_token_key_file = match raw.page_token_key_file {
        Some(path) if path.trim().is_empty() => {
            return Err(ConfigError::invalid("query.page_token_key_file", "\"\"", "a file path"))
        }
        Some(path) => Some(path.into()),
        None => spool_dir.map(|dir| dir.join("page-token.key")),
    };
    Ok(QueryConfig {
        allow_writes: raw.allow_writes,
        consistency,
        page_size_default: raw.page_size_default,
        page_size_max: raw.page_size_max,
        page_token_key_file,
        scan_splits_per_core: raw.scan_splits_per_core,
        scan_parallel_splits_max: raw.scan_parallel_splits_max,
        scan_reads_per_core_max: raw.scan_reads_per_core_max,
    })
}
