//! Logs and metrics. `RUST_LOG` overrides the default log level (`info`). Metrics are served as
//! Prometheus text on the admin port by the exporter, which runs on the island.

use std::io::IsTerminal;
use std::net::SocketAddr;

use tracing_subscriber::EnvFilter;

/// Every metric name, in one place. Labels: `core` (data-plane core index), `code` (row error
/// code); all bounded.
pub mod metric {
    /// Rows received by the ingest API, by the core that received them.
    pub const INGEST_ROWS_RECEIVED: &str = "shardgate_ingest_rows_received_total";
    /// Rows confirmed by the database, by the core that wrote them.
    pub const INGEST_ROWS_WRITTEN: &str = "shardgate_ingest_rows_written_total";
    /// Rows rejected or failed, by core and error code.
    pub const INGEST_ROWS_FAILED: &str = "shardgate_ingest_rows_failed_total";
    /// Rows a core received but did not own, forwarded once to their owner core.
    pub const INGEST_ROWS_FORWARDED: &str = "shardgate_ingest_rows_forwarded_total";
    /// Rows admitted into a core's in-flight budget and not yet answered.
    pub const INGEST_ROWS_IN_FLIGHT: &str = "shardgate_ingest_rows_in_flight";
    /// Rows per received batch.
    pub const INGEST_BATCH_ROWS: &str = "shardgate_ingest_batch_rows";
    /// Latency of one row write (send to database confirmation, retries included).
    pub const WRITE_LATENCY_SECONDS: &str = "shardgate_write_latency_seconds";
}

/// Installs the global tracing subscriber: compact text to stderr, thread names shown (they
/// name the core or island thread a line came from).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Starts the Prometheus exporter on `addr` (`/metrics`). Must run inside the island runtime.
pub fn start_metrics(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
}
