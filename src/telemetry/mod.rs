//! Logs and metrics. `RUST_LOG` overrides the default log level (`info`, with the driver's
//! per-response server warnings at `error`). Metrics are served as Prometheus text on the admin
//! port ([`admin`]), which runs on the island.

pub mod admin;
pub mod snapshot;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Every metric name, in one place. Labels: `core` (data-plane core index), `table`
/// (`keyspace.table`), `source` (`grpc` or the route's name), `code` (row error code); all bounded
/// by configuration, the cores and the tables that exist.
pub mod metric {
    /// 1 once every source, core and listener is up (the `shardgate serving` log line), 0
    /// from the stop signal on: the readiness signal for load balancers and deploy scripts.
    pub const READY: &str = "shardgate_ready";
    /// Rows received (from a producer or a source message), by the core that received them.
    pub const ROWS_RECEIVED: &str = "shardgate_rows_received_total";
    /// Rows confirmed by the database, by the core that wrote them.
    pub const ROWS_WRITTEN: &str = "shardgate_rows_written_total";
    /// Rows rejected or failed, by core, table, source and error code.
    pub const ROWS_FAILED: &str = "shardgate_rows_failed_total";
    /// gRPC batches refused as a whole (unknown table or column, too large, malformed, ...),
    /// by core, source and error code; their rows are not counted in `ROWS_FAILED`.
    pub const BATCHES_REFUSED: &str = "shardgate_batches_refused_total";
    /// Rows a core received but did not own, handed once to their owner core.
    pub const ROWS_FORWARDED: &str = "shardgate_rows_forwarded_total";
    /// Source messages skipped by their route's filter (or sent to no target table).
    pub const MESSAGES_FILTERED: &str = "shardgate_messages_filtered_total";
    /// Rows admitted into a core's in-flight budget and not yet answered (ingest API).
    pub const INGEST_ROWS_IN_FLIGHT: &str = "shardgate_ingest_rows_in_flight";
    /// Rows per received batch: a gRPC batch, or a source's hand-off of messages to a core.
    pub const RECEIVED_BATCH_ROWS: &str = "shardgate_received_batch_rows";
    /// Rows per write sent to the database — an UNLOGGED batch, or one row — by core, table,
    /// source, `replica` (the node's ordinal in the ring snapshot, nodes in ascending host-id
    /// order) and `shard`: the batch size the database really gets.
    pub const BATCH_ROWS: &str = "shardgate_batch_rows";
    /// Latency of one database write (a row or an UNLOGGED batch; retries included).
    pub const WRITE_LATENCY_SECONDS: &str = "shardgate_write_latency_seconds";
    /// The same latency by core, table, source, `replica` and `shard` (as `BATCH_ROWS`): which
    /// node or shard is slow.
    pub const REPLICA_WRITE_LATENCY_SECONDS: &str = "shardgate_replica_write_latency_seconds";
    /// Writes sent to a (replica, shard) and not yet answered, by core, table, source, `replica`
    /// and `shard`.
    pub const REPLICA_WRITES_IN_FLIGHT: &str = "shardgate_replica_writes_in_flight";
    /// From a source message's timestamp (Kafka create or log-append time) to its rows being
    /// confirmed by the database or its dead letter delivered, by route.
    pub const DELIVERY_LATENCY_SECONDS: &str = "shardgate_delivery_latency_seconds";
    /// Messages of a Kafka partition not yet consumed (high watermark minus position), by route
    /// and partition.
    pub const KAFKA_CONSUMER_LAG: &str = "shardgate_kafka_consumer_lag";
    /// Partitions of a Kafka route's topic assigned to this gateway, by route: 0 while the
    /// consumer is out of its group (alert on it staying 0).
    pub const KAFKA_ASSIGNED_PARTITIONS: &str = "shardgate_kafka_assigned_partitions";
    /// Messages of a JetStream route's stream not yet delivered to its durable consumer (the
    /// consumer's `num_pending`, read every few seconds), by `source`.
    pub const JETSTREAM_PENDING: &str = "shardgate_jetstream_pending";
    /// Messages the durable consumer delivered and has not had acknowledged (`num_ack_pending`,
    /// every gateway sharing the durable together), by `source`.
    pub const JETSTREAM_ACK_PENDING: &str = "shardgate_jetstream_ack_pending";
    /// Deliveries a RabbitMQ route's channel received and has not acknowledged or rejected yet,
    /// by `source`: bounded by `prefetch`; at `prefetch` the cores are the bottleneck.
    pub const AMQP_UNACKED: &str = "shardgate_amqp_unacked";
    /// Share of the last second a data-plane core's thread spent on the CPU (0 to 1), by `core`:
    /// a core near 1 is saturated.
    pub const CORE_BUSY: &str = "shardgate_core_busy_ratio";
    /// Bytes in a core's live spool segments (records acknowledged or in flight whose segment
    /// is not yet wholly written), by `core`; compare with `spool.cap_bytes_per_core`.
    pub const SPOOL_BYTES: &str = "shardgate_spool_bytes";
    /// Group commits of the spools (one sync each, however many batches joined it).
    pub const SPOOL_COMMITS: &str = "shardgate_spool_commits_total";
    /// Spooled records (acknowledged, not yet written) that wait on disk only because their
    /// core's memory budget for spooled writes is spent, by `core`.
    pub const SPOOL_DEFERRED_RECORDS: &str = "shardgate_spool_deferred_records";

    /// Rows a processing job read, by `job` (the runs inside `serve`).
    pub const JOB_ROWS_READ: &str = "shardgate_job_rows_read_total";
    /// Results (or copied rows) a job wrote to its sinks, by `job`, counted once per sink.
    pub const JOB_ROWS_OUT: &str = "shardgate_job_rows_out_total";
    /// Rows a job's filter or measures failed on, by `job`.
    pub const JOB_ROWS_FAILED: &str = "shardgate_job_rows_failed_total";
    /// Splits of a job's current run done (by any gateway), by `job`.
    pub const JOB_SPLITS_DONE: &str = "shardgate_job_splits_done";
    /// Splits of a job's current run, by `job`.
    pub const JOB_SPLITS_TOTAL: &str = "shardgate_job_splits";
    /// Job runs ended, by `job` and `outcome` (`done`, `failed`, `cancelled`).
    pub const JOB_RUNS: &str = "shardgate_job_runs_total";
    /// A stream job's rows that came after every window holding them had closed (dead-lettered
    /// as `late`, not counted), by `job`.
    pub const JOB_ROWS_LATE: &str = "shardgate_job_rows_late_total";
    /// A stream job's watermark (the largest event time seen, less `lateness`) behind the wall
    /// clock, seconds, by `job`.
    pub const JOB_WATERMARK_LAG: &str = "shardgate_job_watermark_lag_seconds";
    /// A stream job's windows closed and written, by `job`.
    pub const JOB_WINDOWS_CLOSED: &str = "shardgate_job_windows_closed_total";

    /// Rows returned by the query API, by core, table and `rpc` (`get`, `execute`, `scan`).
    pub const ROWS_READ: &str = "shardgate_rows_read_total";
    /// Pages read from the database by the query API, by core, table and `rpc`.
    pub const READ_PAGES: &str = "shardgate_read_pages_total";
    /// Latency of one page read from the database by the query API, by core, table and `rpc`.
    pub const READ_LATENCY_SECONDS: &str = "shardgate_read_latency_seconds";
    /// Scan splits by core (the split's), table and `state`: `started` when a `Scan` begins
    /// reading a split, `done` once its last page is sent.
    pub const SCAN_SPLITS: &str = "shardgate_scan_splits_total";
    /// Query API requests refused, by core and `code`.
    pub const READS_REFUSED: &str = "shardgate_reads_refused_total";

    /// TLS handshakes the gRPC listeners and the admin port failed or timed out (a plaintext
    /// client, an unknown CA, a client certificate missing or refused).
    pub const TLS_HANDSHAKE_FAILURES: &str = "shardgate_tls_handshake_failures_total";
    /// gRPC calls refused by `ingest.auth`, by `reason`: `no_credentials`, `bad_header`,
    /// `unknown_token` (UNAUTHENTICATED) or `forbidden` (a principal without the scope).
    pub const AUTH_FAILURES: &str = "shardgate_auth_failures_total";
    /// ZeroMQ peers a CURVE route's ZAP handler refused (a key not in
    /// `curve_client_keys_file`, or not CURVE at all), by `source` (the route).
    pub const ZEROMQ_PEERS_REFUSED: &str = "shardgate_zeromq_peers_refused_total";

    /// Every metric above with its type and help text (`# HELP` on `/metrics`); the README must
    /// name each (a test checks).
    pub const ALL: &[(&str, Kind, &str)] = &[
        (
            READY,
            Kind::Gauge,
            "1 once every source, core and listener is up, 0 before and from the stop signal on.",
        ),
        (
            ROWS_RECEIVED,
            Kind::Counter,
            "Rows received from a producer or a source message, by the core that received them.",
        ),
        (
            ROWS_WRITTEN,
            Kind::Counter,
            "Rows confirmed by the database, by the core that wrote them.",
        ),
        (
            ROWS_FAILED,
            Kind::Counter,
            "Rows rejected or failed (dead-lettered or refused), by core, table, source and error code.",
        ),
        (
            BATCHES_REFUSED,
            Kind::Counter,
            "gRPC batches refused as a whole, by core, source and error code.",
        ),
        (
            ROWS_FORWARDED,
            Kind::Counter,
            "Rows a core received but did not own, handed once to their owner core.",
        ),
        (
            MESSAGES_FILTERED,
            Kind::Counter,
            "Source messages skipped by their route's filter or sent to no table.",
        ),
        (
            INGEST_ROWS_IN_FLIGHT,
            Kind::Gauge,
            "Rows admitted into a core's in-flight budget by the ingest API and not yet answered.",
        ),
        (
            RECEIVED_BATCH_ROWS,
            Kind::Histogram,
            "Rows per received batch: a gRPC batch, or a source's hand-off to a core.",
        ),
        (
            BATCH_ROWS,
            Kind::Histogram,
            "Rows per write sent to the database, by core, table, source, replica and shard.",
        ),
        (
            WRITE_LATENCY_SECONDS,
            Kind::Histogram,
            "Latency of one database write (a row or an UNLOGGED batch, retries included).",
        ),
        (
            REPLICA_WRITE_LATENCY_SECONDS,
            Kind::Histogram,
            "Latency of one database write, by core, table, source, replica and shard.",
        ),
        (
            REPLICA_WRITES_IN_FLIGHT,
            Kind::Gauge,
            "Writes sent to a replica and shard and not yet answered, by core, table, source, replica and shard.",
        ),
        (
            DELIVERY_LATENCY_SECONDS,
            Kind::Histogram,
            "From a source message's timestamp to its rows confirmed or its dead letter delivered.",
        ),
        (
            KAFKA_CONSUMER_LAG,
            Kind::Gauge,
            "Messages of a Kafka partition not yet consumed, by route and partition.",
        ),
        (
            KAFKA_ASSIGNED_PARTITIONS,
            Kind::Gauge,
            "Partitions of a Kafka route's topic assigned to this gateway, by route.",
        ),
        (
            JETSTREAM_PENDING,
            Kind::Gauge,
            "Messages of a JetStream route's stream not yet delivered to its durable consumer, by source.",
        ),
        (
            JETSTREAM_ACK_PENDING,
            Kind::Gauge,
            "Messages a JetStream route's durable consumer delivered and has not had acknowledged, by source.",
        ),
        (
            AMQP_UNACKED,
            Kind::Gauge,
            "Deliveries a RabbitMQ route received and has not acknowledged or rejected yet, by source.",
        ),
        (
            CORE_BUSY,
            Kind::Gauge,
            "Share of the last second a data-plane core's thread spent on the CPU, 0 to 1, by core.",
        ),
        (
            SPOOL_BYTES,
            Kind::Gauge,
            "Bytes in a core's live spool segments (acknowledged or in flight, not yet all written), by core.",
        ),
        (
            SPOOL_COMMITS,
            Kind::Counter,
            "Group commits of the spools (one sync each).",
        ),
        (
            SPOOL_DEFERRED_RECORDS,
            Kind::Gauge,
            "Spooled records waiting on disk only because their core's memory budget is spent.",
        ),
        (
            ROWS_READ,
            Kind::Counter,
            "Rows returned by the query API, by core, table and rpc.",
        ),
        (
            READ_PAGES,
            Kind::Counter,
            "Pages read from the database by the query API, by core, table and rpc.",
        ),
        (
            READ_LATENCY_SECONDS,
            Kind::Histogram,
            "Latency of one page read by the query API, by core, table and rpc.",
        ),
        (
            SCAN_SPLITS,
            Kind::Counter,
            "Scan splits by core, table and state (started, done).",
        ),
        (
            READS_REFUSED,
            Kind::Counter,
            "Query API requests refused, by core and code.",
        ),
        (JOB_ROWS_READ, Kind::Counter, "Rows a processing job read, by job."),
        (
            JOB_ROWS_OUT,
            Kind::Counter,
            "Results or copied rows a job wrote to its sinks, by job (once per sink).",
        ),
        (
            JOB_ROWS_FAILED,
            Kind::Counter,
            "Rows a job's filter or measures failed on, by job.",
        ),
        (
            JOB_SPLITS_DONE,
            Kind::Gauge,
            "Splits of a job's current run done by any gateway, by job.",
        ),
        (JOB_SPLITS_TOTAL, Kind::Gauge, "Splits of a job's current run, by job."),
        (
            JOB_RUNS,
            Kind::Counter,
            "Job runs ended, by job and outcome (done, failed, cancelled).",
        ),
        (
            JOB_ROWS_LATE,
            Kind::Counter,
            "A stream job's rows that came after their windows closed (dead-lettered as late), by job.",
        ),
        (
            JOB_WATERMARK_LAG,
            Kind::Gauge,
            "A stream job's watermark behind the wall clock, seconds, by job.",
        ),
        (
            JOB_WINDOWS_CLOSED,
            Kind::Counter,
            "A stream job's windows closed and written, by job.",
        ),
        (
            TLS_HANDSHAKE_FAILURES,
            Kind::Counter,
            "TLS handshakes the gRPC listeners and the admin port failed or timed out.",
        ),
        (
            AUTH_FAILURES,
            Kind::Counter,
            "gRPC calls refused by ingest.auth, by reason.",
        ),
        (
            ZEROMQ_PEERS_REFUSED,
            Kind::Counter,
            "ZeroMQ peers a CURVE route's ZAP handler refused, by source.",
        ),
    ];

    /// A metric's Prometheus type.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        /// Only grows (`_total`).
        Counter,
        /// Goes up and down.
        Gauge,
        /// Observations, served as a summary (quantiles, `_sum`, `_count`).
        Histogram,
    }
}

/// Gives every metric of [`metric::ALL`] its type and help text on `/metrics` (`# HELP`,
/// `# TYPE`), as `promtool check metrics` asks.
fn describe_metrics() {
    for &(name, kind, help) in metric::ALL {
        match kind {
            metric::Kind::Counter => metrics::describe_counter!(name, help),
            metric::Kind::Gauge => metrics::describe_gauge!(name, help),
            metric::Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// CPU time the calling thread has used (`/proc/thread-self/schedstat`, nanoseconds on the
/// CPU); `None` where the kernel does not say.
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos = text.split_whitespace().next()?.parse().ok()?;
    Some(std::time::Duration::from_nanos(nanos))
}

/// The share of `wall` that `cpu` is, clamped to 0..=1 (a sample's clocks are read a moment
/// apart).
pub fn busy_ratio(cpu: std::time::Duration, wall: std::time::Duration) -> f64 {
    if wall.is_zero() {
        return 0.0;
    }
    (cpu.as_secs_f64() / wall.as_secs_f64()).clamp(0.0, 1.0)
}

/// A core's per-(replica, shard) handles by (handle set, replica, shard).
#[derive(Default)]
struct DatabaseBatches(std::cell::RefCell<std::collections::HashMap<DatabaseBatchKey, ReplicaShardMetrics>>);

/// The handles of one (replica, shard) of a handle set, on one core.
#[derive(Clone)]
pub struct ReplicaShardMetrics {
    /// `shardgate_batch_rows`.
    rows: metrics::Histogram,
    /// `shardgate_replica_write_latency_seconds`.
    pub latency: metrics::Histogram,
    /// `shardgate_replica_writes_in_flight`.
    pub in_flight: metrics::Gauge,
}

/// A handle set's id, a replica's ordinal (`None` while the ring is empty), a shard.
type DatabaseBatchKey = (u64, Option<u32>, u32);

/// Metric handles of one (source, table, core), registered once so that label allocation and
/// registry lookups stay off the per-row path.
#[derive(Clone)]
pub struct RowMetrics {
    /// Tells this handle set's per-(replica, shard) histograms apart in a core's cache.
    id: u64,
    core: String,
    table: String,
    source: String,
    /// Rows received.
    pub received: metrics::Counter,
    /// Rows written.
    pub written: metrics::Counter,
    /// Rows forwarded to their owner core.
    pub forwarded: metrics::Counter,
    /// Messages skipped by the route's filter.
    pub filtered: metrics::Counter,
    /// Rows per received batch.
    pub received_batch_rows: metrics::Histogram,
    /// Latency of one database write.
    pub write_latency: metrics::Histogram,
    /// Source message time to confirmed (bridges).
    pub delivery_latency: metrics::Histogram,
}

impl RowMetrics {
    /// Handles for rows of `table` from `source` on `core`.
    pub fn new(source: &str, table: &str, core: usize) -> RowMetrics {
        let labels = [
            ("core", core.to_string()),
            ("table", table.to_string()),
            ("source", source.to_string()),
        ];
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        RowMetrics {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            received: metrics::counter!(metric::ROWS_RECEIVED, &labels),
            written: metrics::counter!(metric::ROWS_WRITTEN, &labels),
            forwarded: metrics::counter!(metric::ROWS_FORWARDED, &labels),
            filtered: metrics::counter!(metric::MESSAGES_FILTERED, &labels),
            received_batch_rows: metrics::histogram!(metric::RECEIVED_BATCH_ROWS, &labels),
            write_latency: metrics::histogram!(metric::WRITE_LATENCY_SECONDS, &labels),
            delivery_latency: metrics::histogram!(metric::DELIVERY_LATENCY_SECONDS, &labels),
            core: core.to_string(),
            table: table.to_string(),
            source: source.to_string(),
        }
    }

    /// One handle set per core.
    pub fn per_core(source: &str, table: &str, cores: usize) -> Vec<RowMetrics> {
        (0..cores).map(|core| RowMetrics::new(source, table, core)).collect()
    }

    /// Records one write sent to the database: `rows` rows (an UNLOGGED batch, or one row) of
    /// replica `node` (ordinal; `None` while the ring is empty) and `shard`; returns that
    /// (replica, shard)'s handles for the write's latency and in-flight count. They are
    /// registered once per core, in the core's context.
    pub fn database_batch(&self, (node, shard): (Option<u32>, u32), rows: usize) -> ReplicaShardMetrics {
        let cache = crate::runtime::context::state::<DatabaseBatches>();
        let mut cache = cache.0.borrow_mut();
        let handles = cache.entry((self.id, node, shard)).or_insert_with(|| {
            let labels = [
                ("core", self.core.clone()),
                ("table", self.table.clone()),
                ("source", self.source.clone()),
                ("replica", node.map_or_else(|| "none".to_string(), |n| n.to_string())),
                ("shard", shard.to_string()),
            ];
            ReplicaShardMetrics {
                rows: metrics::histogram!(metric::BATCH_ROWS, &labels),
                latency: metrics::histogram!(metric::REPLICA_WRITE_LATENCY_SECONDS, &labels),
                in_flight: metrics::gauge!(metric::REPLICA_WRITES_IN_FLIGHT, &labels),
            }
        });
        handles.rows.record(rows as f64);
        handles.clone()
    }

    /// Counts `rows` failed rows with error `code` (not on the hot path).
    pub fn failed(&self, code: &str, rows: u64) {
        metrics::counter!(
            metric::ROWS_FAILED,
            "core" => self.core.clone(),
            "table" => self.table.clone(),
            "source" => self.source.clone(),
            "code" => code.to_string()
        )
        .increment(rows);
    }
}

/// A log line that repeats per event (every write an outage fails, every batch a full spool
/// refuses) written at most once per interval; kept in a core's context, so per core.
pub struct LogEvery {
    last: std::cell::Cell<Option<std::time::Instant>>,
    suppressed: std::cell::Cell<u64>,
}

impl LogEvery {
    /// A limiter that has not logged yet.
    pub const fn new() -> LogEvery {
        LogEvery {
            last: std::cell::Cell::new(None),
            suppressed: std::cell::Cell::new(0),
        }
    }

    /// `Some(events suppressed since the last line)` when a line is due now, else `None`.
    pub fn due(&self, interval: std::time::Duration) -> Option<u64> {
        if self.last.get().is_some_and(|t| t.elapsed() < interval) {
            self.suppressed.set(self.suppressed.get() + 1);
            return None;
        }
        self.last.set(Some(std::time::Instant::now()));
        Some(self.suppressed.replace(0))
    }
}

impl Default for LogEvery {
    fn default() -> Self {
        LogEvery::new()
    }
}

/// The log filter without `RUST_LOG`: INFO, minus the two library lines above.
fn default_filter() -> EnvFilter {
    EnvFilter::new("info,scylla::network::connection=error,glommio::reactor=off")
}

/// How log lines are written to stderr (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Compact text, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message`, the event's fields and
    /// `threadName` (for log shippers: journald, Vector, Fluent Bit, Loki).
    Json,
}

/// Installs the global tracing subscriber writing `format` to stderr, thread names shown (they
/// name the core or island thread a line came from).
pub fn init_logging(format: LogFormat) {
    // The driver logs every server warning at WARN from `scylla::network::connection`; the
    // gateway's UNLOGGED batches of one replica and shard (DESIGN §4) make Cassandra warn
    // "Unlogged batch covering N partitions" on each of them. glommio's reactor logs one
    // ERROR, only when a disk does not support polled IO, which is harmless (the spool says so
    // at INFO when it opens). `RUST_LOG` brings both back.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true)
        .with_target(false)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

/// Tells the service manager the gateway is ready (`READY=1`) or stopping (`STOPPING=1`) when
/// it runs under one that asked (`NOTIFY_SOCKET` set: a systemd `Type=notify` unit); nothing
/// otherwise. A failure to tell is logged, never fatal. Called by [`admin::set_ready`].
fn notify_service_manager(ready: bool) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let state = if ready {
        sd_notify::NotifyState::Ready
    } else {
        sd_notify::NotifyState::Stopping
    };
    match sd_notify::notify(false, &[state]) {
        Ok(()) => tracing::info!(ready, "service manager notified"),
        Err(e) => tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tracing_subscriber::layer::SubscriberExt;

    /// Counts the events that pass the filter.
    struct Count(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
        fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// glommio's one reactor ERROR (a disk without polled IO) is not logged by default; every
    /// other ERROR, WARN and INFO is (issue 11: ERROR is for an operator who must act).
    #[test]
    fn default_filter_hides_only_the_iopoll_probe_error() {
        let count = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(super::default_filter())
            .with(Count(Arc::clone(&count)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "glommio::reactor", "got unexpected error when probing iopoll support");
            assert_eq!(count.load(Ordering::Relaxed), 0, "glommio's probe error is filtered");
            tracing::error!(target: "glommio::executor", "another glommio error");
            tracing::error!(target: "shardgate::spool", "data at risk");
            tracing::info!(target: "shardgate::app", "serving");
            tracing::debug!(target: "shardgate::app", "detail");
            assert_eq!(count.load(Ordering::Relaxed), 3);
        });
    }
}
