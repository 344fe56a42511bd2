//! The `shardgate.v1.Ingest` service. One instance per core; its futures run on that core (the
//! connection tasks are spawned there), so a row the core owns is converted, routed and written
//! without leaving it.
//!
//! Per batch: resolve the table writer (schema check + prepared insert, cached), convert each
//! row, compute its token with the prepared statement, and split rows by owner core. Owned rows
//! are written here; the rest go to their owners as one task per owner over the cross-core mesh
//! (`runtime::mesh`: one hop, counted in `shardgate_rows_forwarded_total`). Rows are admitted by a
//! per-core semaphore of `inflight_rows_per_core_max` permits, acquired before a stream's next
//! batch is read: when it is empty, the stream stops reading.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bridge::spooled::WhenFull;
use arc_swap::ArcSwap;
use futures::{SinkExt, Stream, StreamExt};
use scylla::client::session::Session;
use scylla::cluster::metadata::{ColumnKind, ColumnType};
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::MaybeUnset;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{cql_type_name, to_cql};
use super::flat::decode_row_batch;
use super::limit::{take_oversized, OversizeLog};
use super::proto::ingest_server::Ingest;
use super::proto::{
    AckMode, BatchError, ErrorCode, GetTopologyRequest, KeyColumn, NodeShards as ProtoNodeShards, RingEntry, Row,
    RowBatch, RowError, TableKey, Topology, WriteFlatRequest, WriteRequest, WriteResponse, WriteStreamRequest,
    WriteStreamResponse,
};
use super::status::status;
use crate::mapping::{RowValues, TableSchema};
use crate::runtime::mesh::Mesh;
use crate::sink::scylla::{
    batches_by_replica_shard, classify, insert_statement, place_row, with_timestamp, write_rows_once, Retries,
    WriteFailure,
};
use crate::telemetry::{metric, RowMetrics};
use crate::topology::{Ownership, ReplicaShard};

/// Attempts per row before a transient failure is reported to the producer.
const WRITE_ATTEMPTS_MAX: u32 = 4;
/// Batches answered concurrently on one stream.
const STREAM_BATCHES_IN_FLIGHT_MAX: usize = 64;
/// Rows one batch may carry.
const BATCH_ROWS_MAX: usize = 10_000;
/// Prepared writers kept per gateway, one per (table, column list). Past it, the cache is
/// emptied and refilled on demand, so a producer cycling through column lists cannot grow it.
const WRITER_CACHE_ENTRIES_MAX: usize = 4096;
/// How often a missing table may trigger a schema refresh.
const SCHEMA_REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// Prepared writers by (table, column list).
type WriterCache = HashMap<(String, Vec<String>), Arc<TableWriter>>;

/// A row's outcome: written, or why not.
type RowOutcome = Result<(), (ErrorCode, String)>;

/// A batch refused as a whole: one code and one reason for all its rows.
pub type Refusal = (ErrorCode, String);

/// What a batch came to: rows written, rows spooled, rows refused one by one.
type Accepted = (u32, u32, Vec<RowError>);

/// A converted row on its way to the database.
pub struct PendingRow {
    /// Index in the producer's batch.
    index: u32,
    /// Bound values (the write timestamp last).
    values: RowValues,
    /// Primary replica and shard: rows sharing it may share an UNLOGGED batch.
    replica_shard: ReplicaShard,
}

/// The `source` label of rows from the ingest API.
const SOURCE_LABEL: &str = "grpc";

/// What writing rows of one (table, column list) needs; prepared once, shared by all cores.
pub struct TableWriter {
    /// Column names in the batch's column order, for row errors.
    names: Vec<String>,
    /// Column types in the batch's column order.
    types: Vec<ColumnType<'static>>,
    /// Positions (in the batch's columns) of primary-key columns, which must be non-null.
    key_positions: Vec<usize>,
    /// `INSERT ... USING TIMESTAMP ?`.
    insert: PreparedStatement,
    /// The session the insert runs on.
    session: Arc<Session>,
    /// Metric handles of the table, one per core.
    metrics: Vec<RowMetrics>,
}

/// State shared by every core's service instance.
pub struct IngestShared {
    /// The cluster session.
    pub session: Arc<Session>,
    /// Current ownership snapshot (swapped when the cluster topology changes).
    pub ownership: Arc<ArcSwap<Ownership>>,
    /// The cross-core mesh rows are forwarded over.
    pub mesh: Arc<Mesh>,
    /// In-flight row budget of each core.
    pub budgets: Vec<Arc<Semaphore>>,
    /// Rows one core may hold in flight.
    pub inflight_rows_max: usize,
    /// `host:port` of each core's own port, published by `GetTopology`.
    pub core_endpoints: Vec<String>,
    /// Rows per UNLOGGED batch sent to the database (1 = single writes).
    pub write_batch_rows_max: usize,
    /// In-flight gauge per core.
    inflight_gauges: Vec<metrics::Gauge>,
    writers: Mutex<WriterCache>,
    last_schema_refresh: Mutex<Option<Instant>>,
}

impl IngestShared {
    /// Creates the state shared by every core's service.
    pub fn new(
        session: Arc<Session>,
        ownership: Arc<ArcSwap<Ownership>>,
        mesh: Arc<Mesh>,
        inflight_rows_max: usize,
        write_batch_rows_max: usize,
        core_endpoints: Vec<String>,
    ) -> Arc<IngestShared> {
        let cores = mesh.cores();
        let shared = IngestShared {
            session,
            ownership,
            mesh,
            budgets: (0..cores)
                .map(|_| Arc::new(Semaphore::new(inflight_rows_max)))
                .collect(),
            inflight_rows_max,
            core_endpoints,
            write_batch_rows_max: write_batch_rows_max.max(1),
            inflight_gauges: (0..cores)
                .map(|core| metrics::gauge!(metric::INGEST_ROWS_IN_FLIGHT, "core" => core.to_string()))
                .collect(),
            writers: Mutex::new(HashMap::new()),
            last_schema_refresh: Mutex::new(None),
        };
        Arc::new(shared)
    }

    /// The writer for `table` with `columns`, prepared on first use.
    async fn writer(&self, table: &str, columns: &[String]) -> Result<Arc<TableWriter>, Refusal> {
        let key = (table.to_string(), columns.to_vec());
        if let Some(writer) = lock(&self.writers).get(&key) {
            return Ok(Arc::clone(writer));
        }
        let writer = Arc::new(self.prepare_writer(table, columns).await?);
        let mut writers = lock(&self.writers);
        if writers.len() >= WRITER_CACHE_ENTRIES_MAX {
            writers.clear();
        }
        writers.insert(key, Arc::clone(&writer));
        Ok(writer)
    }

    async fn prepare_writer(&self, table: &str, columns: &[String]) -> Result<TableWriter, Refusal> {
        if let Some(twice) = columns
            .iter()
            .enumerate()
            .find_map(|(i, c)| columns[..i].contains(c).then_some(c))
        {
            return Err((
                ErrorCode::DuplicateColumn,
                format!("column `{twice}` is named twice in the batch's columns"),
            ));
        }
        let Some((keyspace, name)) = table.split_once('.') else {
            return Err((
                ErrorCode::UnknownTable,
                format!("table `{table}` is not `keyspace.table`"),
            ));
        };
        let mut schema = self.lookup_table(keyspace, name);
        if schema.is_none() && self.may_refresh_schema() {
            let _ = self.session.refresh_metadata().await;
            schema = self.lookup_table(keyspace, name);
        }
        let Some(schema) = schema else {
            return Err((ErrorCode::UnknownTable, format!("table `{table}` does not exist")));
        };
        let mut types = Vec::with_capacity(columns.len());
        let mut key_positions = Vec::new();
        for (position, column) in columns.iter().enumerate() {
            let Some((typ, kind)) = schema.columns.get(column) else {
                let mut known: Vec<&str> = schema.columns.keys().map(String::as_str).collect();
                known.sort_unstable();
                return Err((
                    ErrorCode::UnknownColumn,
                    format!(
                        "table `{table}` has no column `{column}`; its columns: `{}`",
                        known.join("`, `")
                    ),
                ));
            };
            if matches!(kind, ColumnKind::PartitionKey | ColumnKind::Clustering) {
                key_positions.push(position);
            }
            types.push(typ.clone());
        }
        let mut key_columns = schema.partition_key.iter().chain(&schema.clustering_key);
        if let Some(missing) = key_columns.find(|k| !columns.contains(k)) {
            return Err((
                ErrorCode::MissingKey,
                format!("primary key column `{missing}` is not among the batch's columns"),
            ));
        }
        let statement = insert_statement(keyspace, name, columns.iter().map(String::as_str));
        let mut insert = self.session.prepare(statement).await.map_err(|e| {
            (
                ErrorCode::Rejected,
                format!("cannot prepare the insert for `{table}`: {e}"),
            )
        })?;
        insert.set_is_idempotent(true);
        // Tables created after start-up are checked here, once (start-up checked the others).
        crate::mapping::warn_replay_unsafe_columns(keyspace, name, &schema);
        Ok(TableWriter {
            names: columns.to_vec(),
            types,
            key_positions,
            insert,
            session: Arc::clone(&self.session),
            metrics: RowMetrics::per_core(SOURCE_LABEL, table, self.mesh.cores()),
        })
    }

    /// The table's schema from the driver's cached metadata.
    fn lookup_table(&self, keyspace: &str, table: &str) -> Option<TableSchema> {
        let state = self.session.get_cluster_state();
        state
            .get_keyspace(keyspace)?
            .tables
            .get(table)
            .map(TableSchema::from_driver)
    }

    fn may_refresh_schema(&self) -> bool {
        let mut last = lock(&self.last_schema_refresh);
        if last.is_some_and(|t| t.elapsed() < SCHEMA_REFRESH_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Partition key columns of `table` with their CQL types, for `GetTopology`.
    fn table_key(&self, table: &str) -> Option<TableKey> {
        let (keyspace, name) = table.split_once('.')?;
        let state = self.session.get_cluster_state();
        let meta = state.get_keyspace(keyspace)?.tables.get(name)?;
        let columns = meta
            .partition_key
            .iter()
            .filter_map(|k| {
                meta.columns.get(k).map(|c| KeyColumn {
                    name: k.clone(),
                    cql_type: cql_type_name(&c.typ),
                })
            })
            .collect();
        Some(TableKey {
            table: table.to_string(),
            columns,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The service instance of one core.
#[derive(Clone)]
pub struct IngestService {
    core: usize,
    shared: Arc<IngestShared>,
}

impl IngestService {
    /// The service for `core`.
    pub fn new(core: usize, shared: Arc<IngestShared>) -> IngestService {
        IngestService { core, shared }
    }

    /// The prepared writer of a batch, or the batch's refusal.
    async fn batch_writer(&self, batch: &RowBatch) -> Result<Arc<TableWriter>, Refusal> {
        let rows = batch.rows.len();
        if rows > BATCH_ROWS_MAX {
            return Err((
                ErrorCode::TooLarge,
                format!("batch has {rows} rows; the limit is {BATCH_ROWS_MAX} rows per batch"),
            ));
        }
        self.shared.writer(&batch.table, &batch.columns).await
    }

    /// Counts one batch refused as a whole (never its rows one by one). Called where a refusal
    /// becomes an answer ([`IngestService::unary_answer`], [`IngestService::stream_answer`]) or
    /// is given up on (a spooled batch's replay).
    fn count_refusal(&self, code: ErrorCode) {
        metrics::counter!(metric::BATCHES_REFUSED, "core" => self.core.to_string(), "source" => SOURCE_LABEL, "code" => code.as_str_name())
            .increment(1);
    }

    /// Converts, routes and writes one batch; returns rows written and per-row errors, or the
    /// batch's refusal.
    async fn write_batch(&self, batch: RowBatch) -> Result<(u32, Vec<RowError>), Refusal> {
        let rows = batch.rows.len();
        let writer = self.batch_writer(&batch).await?;
        let metrics = &writer.metrics[self.core];
        metrics.received.increment(rows as u64);
        metrics.batch_rows.record(rows as f64);
        let timestamp_us = if batch.timestamp_us > 0 {
            batch.timestamp_us
        } else {
            now_us()
        };
        let ownership = self.shared.ownership.load();
        let mut errors = Vec::new();
        let mut local = Vec::new();
        let mut remote: BTreeMap<usize, Vec<PendingRow>> = BTreeMap::new();
        for (index, row) in batch.rows.iter().enumerate() {
            let index = index as u32;
            match bind_row(&writer.names, &writer.types, &writer.key_positions, row, timestamp_us) {
                Ok(values) => {
                    let placement = place_row(&writer.insert, &values, &ownership);
                    let owner = placement.map_or(self.core, |p| p.core);
                    let replica_shard = placement.map_or((None, 0), |p| p.replica_shard());
                    let pending = PendingRow {
                        index,
                        values,
                        replica_shard,
                    };
                    if owner == self.core {
                        local.push(pending);
                    } else {
                        remote.entry(owner).or_default().push(pending);
                    }
                }
                Err((code, reason)) => errors.push(row_error(index, code, &reason)),
            }
        }
        let mut written = 0u32;
        let batch_rows_max = self.shared.write_batch_rows_max;
        let forwards = remote.into_iter().map(|(owner, rows)| {
            let writer = Arc::clone(&writer);
            let indexes: Vec<u32> = rows.iter().map(|r| r.index).collect();
            metrics.forwarded.increment(rows.len() as u64);
            async move {
                let outcome = self
                    .shared
                    .mesh
                    .run_on(owner, move || async move {
                        write_rows(&writer, rows, &writer.metrics[owner], batch_rows_max).await
                    })
                    .await;
                outcome.unwrap_or_else(|gone| {
                    let reason = gone.to_string();
                    indexes
                        .into_iter()
                        .map(|index| (index, Err((ErrorCode::Unavailable, reason.clone()))))
                        .collect()
                })
            }
        });
        let (local, forwarded) = futures::join!(
            write_rows(&writer, local, metrics, batch_rows_max),
            futures::future::join_all(forwards)
        );
        for (index, outcome) in local.into_iter().chain(forwarded.into_iter().flatten()) {
            tally(index, outcome, &mut written, &mut errors);
        }
        for error in &errors {
            metrics.failed(
                ErrorCode::try_from(error.code)
                    .unwrap_or(ErrorCode::Unspecified)
                    .as_str_name(),
                1,
            );
        }
        errors.sort_by_key(|e| e.row);
        Ok((written, errors))
    }

    /// Answers one batch per its ack mode: written now, or (ACK_MODE_SPOOLED) validated, made
    /// durable in this core's spool and written in the background. A full spool is
    /// RESOURCE_EXHAUSTED for unary calls; a stream (`full_spool`) waits for room instead, so
    /// the stream stays open and stops reading meanwhile. Returns (written, spooled, errors).
    async fn accept(&self, batch: RowBatch, ack: i32, full_spool: WhenFull) -> Result<Accepted, Refusal> {
        if AckMode::try_from(ack).unwrap_or(AckMode::Unspecified) != AckMode::Spooled {
            let (written, errors) = self.write_batch(batch).await?;
            return Ok((written, 0, errors));
        }
        if !crate::bridge::spooled::is_open() {
            return Err((
                ErrorCode::NoSpool,
                "ACK_MODE_SPOOLED needs `runtime.spool_dir` in the gateway's config".to_string(),
            ));
        }
        let rows = batch.rows.len();
        let writer = self.batch_writer(&batch).await?;
        let timestamp_us = if batch.timestamp_us > 0 {
            batch.timestamp_us
        } else {
            now_us()
        };
        let mut errors = Vec::new();
        let mut valid = Vec::with_capacity(rows);
        for (index, row) in batch.rows.into_iter().enumerate() {
            match bind_row(&writer.names, &writer.types, &writer.key_positions, &row, timestamp_us) {
                Ok(_) => valid.push(row),
                Err((code, reason)) => errors.push(row_error(index as u32, code, &reason)),
            }
        }
        if valid.is_empty() {
            return Ok((0, 0, errors));
        }
        let spooled = valid.len() as u32;
        // The resolved timestamp travels with the rows: a replay writes identical cells.
        let batch = RowBatch {
            table: batch.table,
            columns: batch.columns,
            rows: valid,
            timestamp_us,
        };
        // The spool is core-local (not `Send`): append on a local task, answer through a oneshot.
        let (answer, answered) = futures::channel::oneshot::channel();
        let service = self.clone();
        glommio::spawn_local(async move {
            let record = crate::bridge::spooled::encode_row_batch(&batch);
            let bytes = record.len() as u64;
            match crate::bridge::spooled::append_record(record, full_spool).await {
                Ok(ids) => {
                    let _ = answer.send(Ok(()));
                    // From memory while the core's budget allows, else read back from disk by
                    // the core's drain.
                    match crate::bridge::spooled::hold(bytes) {
                        Some(held) => {
                            service.write_spooled(batch, ids).await;
                            drop(held);
                        }
                        None => crate::bridge::spooled::defer(&ids),
                    }
                }
                Err(error) => {
                    let code = match error {
                        crate::spool::SpoolError::Full { .. } => ErrorCode::Overloaded,
                        _ => ErrorCode::Unavailable,
                    };
                    let _ = answer.send(Err((code, error.to_string())));
                }
            }
        })
        .detach();
        answered.await.map_err(|_| {
            (
                ErrorCode::Unavailable,
                "the core stopped before the rows were spooled".to_string(),
            )
        })??;
        Ok((0, spooled, errors))
    }

    /// Writes a spooled batch (just accepted, or replayed after a restart) until every row is
    /// written or refused for good, then completes its spool record. Refusals are logged and
    /// counted (the client was answered when the rows were spooled).
    pub async fn write_spooled(&self, mut batch: RowBatch, ids: Vec<crate::spool::RecordId>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let errors = match self.write_batch(batch.clone()).await {
                Ok((_, errors)) => errors,
                Err((code, reason)) => {
                    // The table or its columns went away since the rows were spooled: refused
                    // for good, like a row the database refuses.
                    self.count_refusal(code);
                    tracing::warn!(core = self.core, rows = batch.rows.len(), code = code.as_str_name(), %reason, "spooled gRPC batch refused");
                    Vec::new()
                }
            };
            let (retry, refused): (Vec<RowError>, Vec<RowError>) = errors.into_iter().partition(|e| {
                matches!(
                    ErrorCode::try_from(e.code),
                    Ok(ErrorCode::Unavailable | ErrorCode::Overloaded)
                )
            });
            if let Some(first) = refused.first() {
                tracing::warn!(core = self.core, rows = refused.len(), reason = %first.reason, "spooled gRPC rows refused by the database");
            }
            if retry.is_empty() {
                break;
            }
            batch.rows = retry
                .iter()
                .filter_map(|e| batch.rows.get(e.row as usize).cloned())
                .collect();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        crate::bridge::spooled::complete(&ids).await;
    }

    /// A unary call's answer: the response, or the batch's refusal (counted) as its status.
    fn unary_answer(&self, answer: Result<Accepted, Refusal>) -> Result<Response<WriteResponse>, Status> {
        let (written, spooled, errors) = answer.map_err(|(code, reason)| {
            self.count_refusal(code);
            status(code, reason)
        })?;
        Ok(Response::new(WriteResponse {
            written,
            errors,
            spooled,
        }))
    }

    /// A stream batch's answer: written, spooled and row errors, or the batch's refusal
    /// (counted).
    fn stream_answer(&self, batch_id: u64, answer: Result<Accepted, Refusal>) -> WriteStreamResponse {
        match answer {
            Ok((written, spooled, errors)) => WriteStreamResponse {
                batch_id,
                written,
                errors,
                spooled,
                batch_error: None,
            },
            Err((code, reason)) => {
                self.count_refusal(code);
                WriteStreamResponse {
                    batch_id,
                    batch_error: Some(BatchError {
                        code: code as i32,
                        reason,
                    }),
                    ..Default::default()
                }
            }
        }
    }

    /// Admits `rows` rows into this core's in-flight budget.
    async fn admit(&self, rows: usize) -> Result<Admitted, Status> {
        let permits = rows.clamp(1, self.shared.inflight_rows_max) as u32;
        let permit = Arc::clone(&self.shared.budgets[self.core])
            .acquire_many_owned(permits)
            .await
            .map_err(|_| status(ErrorCode::Unavailable, "gateway is shutting down"))?;
        let gauge = self.shared.inflight_gauges[self.core].clone();
        gauge.increment(f64::from(permits));
        Ok(Admitted {
            _permit: permit,
            gauge,
            rows: f64::from(permits),
        })
    }
}

/// Rows admitted into a core's budget; released (and un-counted) when dropped.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: metrics::Gauge,
    rows: f64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gauge.decrement(self.rows);
    }
}

fn tally(index: u32, outcome: RowOutcome, written: &mut u32, errors: &mut Vec<RowError>) {
    match outcome {
        Ok(()) => *written += 1,
        Err((code, reason)) => errors.push(row_error(index, code, &reason)),
    }
}

fn row_error(row: u32, code: ErrorCode, reason: &str) -> RowError {
    RowError {
        row,
        code: code as i32,
        reason: reason.to_string(),
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Converts one row to bound values (plus the write timestamp) for columns of `types`. Missing
/// trailing values leave their columns unset; columns at `key_positions` must be non-null.
pub fn bind_row(
    names: &[String],
    types: &[ColumnType<'static>],
    key_positions: &[usize],
    row: &Row,
    timestamp_us: i64,
) -> Result<RowValues, (ErrorCode, String)> {
    let name = |position: usize| names.get(position).map_or("?", String::as_str);
    if row.values.len() > types.len() {
        return Err((
            ErrorCode::BadValue,
            format!("row has {} values for {} columns", row.values.len(), types.len()),
        ));
    }
    let mut values: RowValues = Vec::with_capacity(types.len() + 1);
    for (position, typ) in types.iter().enumerate() {
        let bound = match row.values.get(position) {
            None => MaybeUnset::Unset,
            Some(value) => MaybeUnset::Set(to_cql(value, typ).map_err(|e| {
                (
                    ErrorCode::BadValue,
                    format!("column `{}` ({}): {}", name(position), cql_type_name(typ), e.0),
                )
            })?),
        };
        values.push(bound);
    }
    for &position in key_positions {
        if !matches!(values.get(position), Some(MaybeUnset::Set(Some(_)))) {
            return Err((
                ErrorCode::MissingKey,
                format!("primary key column `{}` is missing or null", name(position)),
            ));
        }
    }
    Ok(with_timestamp(values, timestamp_us))
}

/// Writes rows concurrently on the current core: rows sharing a (replica, shard) go together
/// in UNLOGGED batches of up to `batch_rows_max`, each batch and each single row in parallel.
async fn write_rows(
    writer: &TableWriter,
    rows: Vec<PendingRow>,
    metrics: &RowMetrics,
    batch_rows_max: usize,
) -> Vec<(u32, RowOutcome)> {
    let chunks = batches_by_replica_shard(rows.into_iter().map(|row| (row.replica_shard, row)), batch_rows_max);
    let writes = chunks.into_iter().map(|chunk| async move {
        let started = Instant::now();
        let outcomes = write_chunk(writer, chunk).await;
        metrics.write_latency.record(started.elapsed().as_secs_f64());
        metrics
            .written
            .increment(outcomes.iter().filter(|(_, o)| o.is_ok()).count() as u64);
        outcomes
    });
    futures::future::join_all(writes).await.into_iter().flatten().collect()
}

/// One chunk: a single row is a plain write; several rows go as one UNLOGGED batch. If the
/// database rejects the batch for a permanent reason, its rows are retried one by one so each
/// row gets its own outcome.
async fn write_chunk(writer: &TableWriter, chunk: Vec<PendingRow>) -> Vec<(u32, RowOutcome)> {
    let rows: Vec<&RowValues> = chunk.iter().map(|r| &r.values).collect();
    let outcome = row_outcome(write_rows_once(&writer.session, &writer.insert, &rows, RETRIES).await);
    match outcome {
        Err((ErrorCode::Rejected, _)) if chunk.len() > 1 => {
            let singles = chunk.iter().map(|row| async move {
                let outcome = write_rows_once(&writer.session, &writer.insert, &[&row.values], RETRIES).await;
                (row.index, row_outcome(outcome))
            });
            futures::future::join_all(singles).await
        }
        outcome => chunk.iter().map(|row| (row.index, outcome.clone())).collect(),
    }
}

/// Producers get a retryable code after a few attempts rather than an unbounded wait.
const RETRIES: Retries = Retries::UpTo(WRITE_ATTEMPTS_MAX);

/// A write's result as a row outcome.
fn row_outcome(result: Result<(), ExecutionError>) -> RowOutcome {
    result.map_err(|error| match classify(&error) {
        WriteFailure::Permanent(reason) => (ErrorCode::Rejected, reason),
        WriteFailure::Transient(reason) => (transient_code(&error), reason),
    })
}

fn transient_code(error: &ExecutionError) -> ErrorCode {
    match error {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::Overloaded | DbError::RateLimitReached { .. },
            _,
        )) => ErrorCode::Overloaded,
        _ => ErrorCode::Unavailable,
    }
}

/// The rows of one stream message: the protobuf batch, else the FlatBuffers one.
fn stream_batch(batch: Option<RowBatch>, flat_batch: &[u8]) -> Result<RowBatch, Refusal> {
    match batch {
        Some(batch) => Ok(batch),
        None if !flat_batch.is_empty() => {
            decode_row_batch(flat_batch).map_err(|e| (ErrorCode::Malformed, e.to_string()))
        }
        None => Err((ErrorCode::Malformed, "`batch` or `flat_batch` is required".to_string())),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<WriteStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        if let Some(oversized) = take_oversized(request.extensions(), 0) {
            return self.unary_answer(Err((ErrorCode::TooLarge, oversized.reason())));
        }
        let request = request.into_inner();
        let ack = request.ack;
        let Some(batch) = request.batch else {
            return self.unary_answer(Err((ErrorCode::Malformed, "`batch` is required".to_string())));
        };
        let _permit = self.admit(batch.rows.len()).await?;
        self.unary_answer(self.accept(batch, ack, WhenFull::Refuse).await)
    }

    async fn write_flat(&self, request: Request<WriteFlatRequest>) -> Result<Response<WriteResponse>, Status> {
        if let Some(oversized) = take_oversized(request.extensions(), 0) {
            return self.unary_answer(Err((ErrorCode::TooLarge, oversized.reason())));
        }
        let request = request.into_inner();
        let batch = match decode_row_batch(&request.row_batch) {
            Ok(batch) => batch,
            Err(error) => return self.unary_answer(Err((ErrorCode::Malformed, error.to_string()))),
        };
        let _permit = self.admit(batch.rows.len()).await?;
        self.unary_answer(self.accept(batch, request.ack, WhenFull::Refuse).await)
    }

    type WriteStreamStream = ResponseStream;

    async fn write_stream(
        &self,
        request: Request<Streaming<WriteStreamRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let limits = OversizeLog::of(request.extensions());
        let mut incoming = request.into_inner();
        let (mut responses, receiver) = futures::channel::mpsc::channel(STREAM_BATCHES_IN_FLIGHT_MAX);
        let service = self.clone();
        glommio::spawn_local(async move {
            let batches_in_flight = Arc::new(Semaphore::new(STREAM_BATCHES_IN_FLIGHT_MAX));
            let mut sequence = 0u64;
            loop {
                let Ok(slot) = Arc::clone(&batches_in_flight).acquire_owned().await else {
                    break;
                };
                let message = match incoming.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) => {
                        // Unreadable bytes: the stream cannot be followed past them.
                        let _ = responses.send(Err(status)).await;
                        break;
                    }
                };
                let oversized = limits.as_ref().and_then(|log| log.take(sequence));
                sequence += 1;
                let batch = match oversized {
                    Some(oversized) => Err((oversized.batch_id, (ErrorCode::TooLarge, oversized.reason()))),
                    None => stream_batch(message.batch, &message.flat_batch).map_err(|r| (message.batch_id, r)),
                };
                let batch = match batch {
                    Ok(batch) => batch,
                    Err((batch_id, refusal)) => {
                        if responses
                            .send(Ok(service.stream_answer(batch_id, Err(refusal))))
                            .await
                            .is_err()
                        {
                            break;
                        }
                        continue;
                    }
                };
                let permit = match service.admit(batch.rows.len()).await {
                    Ok(permit) => permit,
                    Err(status) => {
                        let _ = responses.send(Err(status)).await;
                        break;
                    }
                };
                let service = service.clone();
                let mut responses = responses.clone();
                let (batch_id, ack) = (message.batch_id, message.ack);
                glommio::spawn_local(async move {
                    let answer = service.accept(batch, ack, WhenFull::Wait).await;
                    drop(permit);
                    let _ = responses.send(Ok(service.stream_answer(batch_id, answer))).await;
                    drop(slot);
                })
                .detach();
            }
            // Wait for the batches still in flight before the response stream ends.
            let _ = batches_in_flight
                .acquire_many(STREAM_BATCHES_IN_FLIGHT_MAX as u32)
                .await;
        })
        .detach();
        Ok(Response::new(Box::pin(receiver.map(|item| item))))
    }

    async fn get_topology(&self, request: Request<GetTopologyRequest>) -> Result<Response<Topology>, Status> {
        let ownership = self.shared.ownership.load();
        let mut tables = Vec::new();
        for table in request.into_inner().tables {
            match self.shared.table_key(&table) {
                Some(key) => tables.push(key),
                None => return Err(Status::not_found(format!("table `{table}` does not exist"))),
            }
        }
        Ok(Response::new(Topology {
            cores: ownership.cores() as u32,
            core_endpoints: self.shared.core_endpoints.clone(),
            ring: ownership
                .ring()
                .iter()
                .map(|&(token, node)| RingEntry { token, node })
                .collect(),
            nodes: ownership
                .nodes()
                .iter()
                .map(|n| ProtoNodeShards {
                    shards: u32::from(n.shards),
                    msb_ignore: u32::from(n.msb_ignore),
                })
                .collect(),
            tables,
        }))
    }
}
