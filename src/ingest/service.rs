//! The `shardgate.v1.Ingest` service. One instance per core; its futures run on that core (the
//! connection tasks are spawned there), so a row the core owns is converted, routed and written
//! without leaving it.
//!
//! Per batch: resolve the table writer (schema check + prepared insert, cached per core with no
//! lock), bind each row once, compute its token with the prepared statement, and split rows by
//! owner core. Owned rows are written here through the write engine (`sink::scylla::writer`);
//! the rest go to their owners as one task per owner over the cross-core mesh (`runtime::mesh`:
//! one hop, counted in `shardgate_rows_forwarded_total`). `ACK_MODE_SPOOLED` appends the valid
//! rows to the core's spool as one gRPC record (`spool::service`), answers once it is durable,
//! and writes the rows it bound. Rows are admitted into the ingest API's share of the core's row
//! budget (`runtime::budget`) before a stream's next batch is read: when it is full, the stream
//! stops reading.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use scylla::client::session::Session;
use scylla::cluster::metadata::{ColumnKind, ColumnType};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{check, check_caller, Access, Caller};
use crate::runtime::budget::{Admitted, Budget};
use crate::runtime::mesh::Mesh;
use crate::server::gate::{forbidden, refused};
use crate::server::limit::{take_oversized, OversizeLog};
use crate::server::status::status;
use crate::server::topology::topology;
use crate::sink::scylla::bound::{RowBuilder, RowSpan, SerializedRow, TooManyCells};
use crate::sink::scylla::retry::Retries;
use crate::sink::scylla::schema::warn_replay_unsafe_columns;
use crate::sink::scylla::statement::insert_statement;
use crate::sink::scylla::writer::{self, owner_of, place_row, Statements, WriteError, WriteOptions, WriteStatement};
use crate::sink::scylla::{cached_table_schema, prepare_insert};
use crate::spool::record;
use crate::spool::service::{self as spool, Spooled, WhenFull};
use crate::telemetry::{metric, RowMetrics};
use crate::topology::{Ownership, ReplicaShard};
use crate::wire::convert::{cql_type_name, write_cell, ConvertError};
use crate::wire::flat::decode_row_batch;
use crate::wire::proto::{
    AckMode, BatchError, ErrorCode, GetTopologyRequest, Row, RowBatch, RowError, Topology, WriteFlatRequest,
    WriteResponse, WriteStreamResponse,
};
use crate::wire::raw::{self, ValueError};
use crate::wire::server_view::ingest_server::Ingest;
use crate::wire::server_view::{WriteRequest, WriteStreamRequest};

/// Attempts per row before a transient failure is reported to the producer.
const WRITE_ATTEMPTS_MAX: u32 = 4;
/// Batches answered concurrently on one stream.
const STREAM_BATCHES_IN_FLIGHT_MAX: usize = 64;
/// Rows one batch may carry.
const BATCH_ROWS_MAX: usize = 10_000;
/// Prepared writers kept per core, one per (table, column list). Past it, the core's cache is
/// emptied and refilled on demand, so a producer cycling through column lists cannot grow it.
const WRITER_CACHE_ENTRIES_MAX: usize = 4096;
/// How often a missing table may trigger a schema refresh.
const SCHEMA_REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// The ingest API's state on one core, in the core's context (`runtime::context`).
#[derive(Default)]
struct CoreWriters {
    /// This core's prepared writers by table, then column list: looked up by borrowed names, no
    /// lock and no allocation per batch. Every core prepares its own on first use.
    by_table: RefCell<HashMap<String, Vec<Arc<TableWriter>>>>,
    /// When this core last refreshed the schema for a table it did not know.
    last_schema_refresh: Cell<Option<Instant>>,
}

fn core_writers() -> Rc<CoreWriters> {
    crate::runtime::context::state::<CoreWriters>()
}

/// A row's outcome: written, or why not.
type RowOutcome = Result<(), (ErrorCode, String)>;

/// A batch refused as a whole: one code and one reason for all its rows.
pub type Refusal = (ErrorCode, String);

/// What a batch came to: rows written, rows spooled, rows refused one by one.
type Accepted = (u32, u32, Vec<RowError>);

/// A bound row on its way to the database.
pub struct PendingRow {
    /// Index in the producer's batch.
    index: u32,
    /// Bound values, serialized (the write timestamp last).
    values: SerializedRow,
}

/// A batch as the service binds it.
pub struct Batch {
    /// `keyspace.table`.
    pub table: String,
    /// Column names, in the order of each row's values.
    pub columns: Vec<String>,
    /// The rows.
    pub rows: BatchRows,
    /// Write timestamp in microseconds; 0 = the gateway's clock.
    pub timestamp_us: i64,
}

/// A batch's rows: protobuf rows still encoded (read straight into cells when bound), or rows
/// decoded already (a FlatBuffers batch).
pub enum BatchRows {
    /// Each an encoded `shardgate.v1.Row`, sharing the request's buffer.
    Encoded(Vec<Bytes>),
    /// Decoded rows.
    Decoded(Vec<Row>),
}

impl BatchRows {
    /// How many rows.
    pub fn len(&self) -> usize {
        match self {
            BatchRows::Encoded(rows) => rows.len(),
            BatchRows::Decoded(rows) => rows.len(),
        }
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<raw::RowBatch> for Batch {
    fn from(batch: raw::RowBatch) -> Batch {
        Batch {
            table: batch.table,
            columns: batch.columns,
            rows: BatchRows::Encoded(batch.rows),
            timestamp_us: batch.timestamp_us,
        }
    }
}

impl From<RowBatch> for Batch {
    fn from(batch: RowBatch) -> Batch {
        Batch {
            table: batch.table,
            columns: batch.columns,
            rows: BatchRows::Decoded(batch.rows),
            timestamp_us: batch.timestamp_us,
        }
    }
}

/// The `source` label of rows from the ingest API.
const SOURCE_LABEL: &str = "grpc";

/// What writing rows of one (table, column list) needs; prepared once per core, shared with the
/// cores rows are forwarded to.
pub struct TableWriter {
    /// Column names in the batch's column order, for row errors.
    names: Vec<String>,
    /// Column types in the batch's column order.
    types: Vec<ColumnType<'static>>,
    /// Positions (in the batch's columns) of primary-key columns, which must be non-null.
    key_positions: Vec<usize>,
    /// `INSERT ... USING TIMESTAMP ?`.
    insert: WriteStatement,
    /// The session the insert runs on.
    session: Arc<Session>,
    /// Metric handles of the table, one per core.
    metrics: Vec<RowMetrics>,
}

impl Statements<PendingRow> for TableWriter {
    type Values = SerializedRow;

    fn statement(&self, _: &PendingRow) -> &WriteStatement {
        &self.insert
    }

    fn values<'r>(&self, row: &'r PendingRow) -> &'r SerializedRow {
        &row.values
    }
}

/// State shared by every core's service instance.
pub struct IngestShared {
    /// The cluster session.
    pub session: Arc<Session>,
    /// Current ownership snapshot (swapped when the cluster topology changes).
    pub ownership: Arc<ArcSwap<Ownership>>,
    /// The cross-core mesh rows are forwarded over.
    pub mesh: Arc<Mesh>,
    /// Each core's ingest share of its row budget.
    pub budgets: Vec<Budget>,
    /// `host:port` of each core's own port, published by `GetTopology`.
    pub core_endpoints: Vec<String>,
    /// Rows per UNLOGGED batch sent to the database (1 = single writes).
    pub write_batch_rows_max: usize,
    /// In-flight gauge per core.
    inflight_gauges: Vec<metrics::Gauge>,
}

impl IngestShared {
    /// Creates the state shared by every core's service.
    pub fn new(
        session: Arc<Session>,
        ownership: Arc<ArcSwap<Ownership>>,
        mesh: Arc<Mesh>,
        budgets: Vec<Budget>,
        write_batch_rows_max: usize,
        core_endpoints: Vec<String>,
    ) -> Arc<IngestShared> {
        let cores = mesh.cores();
        let shared = IngestShared {
            session,
            ownership,
            mesh,
            budgets,
            core_endpoints,
            write_batch_rows_max: write_batch_rows_max.max(1),
            inflight_gauges: (0..cores)
                .map(|core| metrics::gauge!(metric::INGEST_ROWS_IN_FLIGHT, "core" => core.to_string()))
                .collect(),
        };
        Arc::new(shared)
    }

    /// The writer for `table` with `columns` on this core, prepared on first use.
    async fn writer(&self, table: &str, columns: &[String]) -> Result<Arc<TableWriter>, Refusal> {
        // The state is looked up on each side of the await, not held across it: the handler's
        // future stays `Send` for tonic.
        let cached = core_writers()
            .by_table
            .borrow()
            .get(table)
            .and_then(|candidates| candidates.iter().find(|w| w.names == columns).map(Arc::clone));
        if let Some(writer) = cached {
            return Ok(writer);
        }
        let writer = Arc::new(self.prepare_writer(table, columns).await?);
        let writers = core_writers();
        let mut by_table = writers.by_table.borrow_mut();
        if by_table.values().map(Vec::len).sum::<usize>() >= WRITER_CACHE_ENTRIES_MAX {
            by_table.clear();
        }
        by_table.entry(table.to_string()).or_default().push(Arc::clone(&writer));
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
        let mut schema = cached_table_schema(&self.session, keyspace, name);
        if schema.is_none() && may_refresh_schema() {
            let _ = self.session.refresh_metadata().await;
            schema = cached_table_schema(&self.session, keyspace, name);
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
        let insert = prepare_insert(&self.session, &statement).await.map_err(|e| {
            (
                ErrorCode::Rejected,
                format!("cannot prepare the insert for `{table}`: {e}"),
            )
        })?;
        // Tables created after start-up are checked here, once (start-up checked the others).
        warn_replay_unsafe_columns(keyspace, name, &schema);
        Ok(TableWriter {
            names: columns.to_vec(),
            types,
            key_positions,
            insert: WriteStatement::new(insert),
            session: Arc::clone(&self.session),
            metrics: RowMetrics::per_core(SOURCE_LABEL, table, self.mesh.cores()),
        })
    }
}

/// Whether this core may refresh the schema now (at most every [`SCHEMA_REFRESH_INTERVAL`]).
fn may_refresh_schema() -> bool {
    let last = &core_writers().last_schema_refresh;
    if last.get().is_some_and(|t| t.elapsed() < SCHEMA_REFRESH_INTERVAL) {
        return false;
    }
    last.set(Some(Instant::now()));
    true
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
    async fn batch_writer(&self, batch: &Batch) -> Result<Arc<TableWriter>, Refusal> {
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

    /// Binds a batch's rows for its writer: the bound rows, and the rows refused one by one.
    fn bind_batch(writer: &TableWriter, batch: &Batch, timestamp_us: i64) -> (Vec<PendingRow>, Vec<RowError>) {
        let mut rows = Vec::with_capacity(batch.rows.len());
        let mut errors = Vec::new();
        let mut builder = RowBuilder::for_rows(batch.rows.len());
        let (names, types, keys) = (&writer.names, &writer.types, &writer.key_positions);
        let mut spans = Vec::with_capacity(batch.rows.len());
        let mut bound = |index: usize, values: Result<RowSpan, (ErrorCode, String)>| {
            let index = index as u32;
            match values {
                Ok(span) => spans.push((index, span)),
                Err((code, reason)) => errors.push(row_error(index, code, &reason)),
            }
        };
        match &batch.rows {
            BatchRows::Encoded(encoded) => {
                for (index, row) in encoded.iter().enumerate() {
                    bound(
                        index,
                        bind_encoded_row(names, types, keys, row, timestamp_us, &mut builder),
                    );
                }
            }
            BatchRows::Decoded(decoded) => {
                for (index, row) in decoded.iter().enumerate() {
                    bound(index, bind_row(names, types, keys, row, timestamp_us, &mut builder));
                }
            }
        }
        // The batch's rows share one buffer.
        let sealed = builder.seal();
        rows.extend(spans.into_iter().map(|(index, span)| PendingRow {
            index,
            values: SerializedRow::new(&sealed, span),
        }));
        (rows, errors)
    }

    /// Places bound rows and writes each on its owner core through the write engine (this
    /// core's rows here, every other owner's in one task over the mesh). Returns every row with
    /// its outcome.
    async fn write_bound(&self, writer: &Arc<TableWriter>, rows: Vec<PendingRow>) -> Vec<Written> {
        let ownership = self.shared.ownership.load();
        let mut by_owner: BTreeMap<usize, Vec<(ReplicaShard, PendingRow)>> = BTreeMap::new();
        for row in rows {
            let (owner, replica_shard) =
                owner_of(place_row(writer.insert.prepared(), &row.values, &ownership), self.core);
            by_owner.entry(owner).or_default().push((replica_shard, row));
        }
        let options = WriteOptions {
            batch_rows_max: self.shared.write_batch_rows_max,
            retries: RETRIES,
        };
        let writes = by_owner.into_iter().map(|(owner, rows)| {
            let writer = Arc::clone(writer);
            async move {
                if owner == self.core {
                    return write_on_owner(&writer, rows, options, owner).await;
                }
                writer.metrics[self.core].forwarded.increment(rows.len() as u64);
                let indexes: Vec<u32> = rows.iter().map(|(_, row)| row.index).collect();
                let forwarded = self
                    .shared
                    .mesh
                    .run_on(owner, move || async move {
                        write_on_owner(&writer, rows, options, owner).await
                    })
                    .await;
                forwarded.unwrap_or_else(|gone| {
                    // Only at shutdown: the rows went with the task.
                    let reason = gone.to_string();
                    indexes
                        .into_iter()
                        .map(|index| Written::Gone(index, reason.clone()))
                        .collect()
                })
            }
        });
        futures::future::join_all(writes).await.into_iter().flatten().collect()
    }

    /// Binds, routes and writes one batch; returns rows written and per-row errors, or the
    /// batch's refusal.
    async fn write_batch(&self, batch: Batch) -> Result<(u32, Vec<RowError>), Refusal> {
        let rows = batch.rows.len();
        let writer = self.batch_writer(&batch).await?;
        let metrics = &writer.metrics[self.core];
        metrics.received.increment(rows as u64);
        metrics.received_batch_rows.record(rows as f64);
        let (bound, mut errors) = Self::bind_batch(&writer, &batch, resolve_timestamp(batch.timestamp_us));
        drop(batch);
        let mut written = 0u32;
        for written_row in self.write_bound(&writer, bound).await {
            match written_row {
                Written::Row(_, Ok(())) => written += 1,
                Written::Row(row, Err((code, reason))) => errors.push(row_error(row.index, code, &reason)),
                // The producer gets a retryable code.
                Written::Gone(index, reason) => errors.push(row_error(index, ErrorCode::Unavailable, &reason)),
            }
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

    /// Answers one batch per its ack mode: written now, or (ACK_MODE_SPOOLED) bound, made
    /// durable in this core's spool and written in the background from the rows bound here. A
    /// full spool is RESOURCE_EXHAUSTED for unary calls; a stream (`full_spool`) waits for room
    /// instead, so the stream stays open and stops reading meanwhile. Returns (written,
    /// spooled, errors).
    async fn accept(&self, batch: Batch, ack: i32, full_spool: WhenFull) -> Result<Accepted, Refusal> {
        if AckMode::try_from(ack).unwrap_or(AckMode::Unspecified) != AckMode::Spooled {
            let (written, errors) = self.write_batch(batch).await?;
            return Ok((written, 0, errors));
        }
        if !spool::is_open() {
            return Err((
                ErrorCode::NoSpool,
                "ACK_MODE_SPOOLED needs `runtime.spool_dir` in the gateway's config".to_string(),
            ));
        }
        let writer = self.batch_writer(&batch).await?;
        let timestamp_us = resolve_timestamp(batch.timestamp_us);
        let (bound, errors) = Self::bind_batch(&writer, &batch, timestamp_us);
        if bound.is_empty() {
            return Ok((0, 0, errors));
        }
        let spooled = bound.len() as u32;
        // The spool keeps the valid rows as the producer sent them, with the resolved timestamp
        // (a replay writes identical cells): protobuf bytes, encoded once.
        let valid = bound.iter().map(|row| row.index as usize);
        let record = match batch.rows {
            BatchRows::Encoded(mut rows) => record::encode_grpc(&raw::RowBatch {
                table: batch.table,
                columns: batch.columns,
                rows: valid.map(|index| std::mem::take(&mut rows[index])).collect(),
                timestamp_us,
            }),
            BatchRows::Decoded(mut rows) => record::encode_grpc(&RowBatch {
                table: batch.table,
                columns: batch.columns,
                rows: valid.map(|index| std::mem::take(&mut rows[index])).collect(),
                timestamp_us,
            }),
        };
        // The spool is core-local (not `Send`): append on a local task, answer through a oneshot.
        let (answer, answered) = futures::channel::oneshot::channel();
        let service = self.clone();
        glommio::spawn_local(async move {
            match spool::append_batch(record, full_spool).await {
                Ok(appended) => {
                    let _ = answer.send(Ok(()));
                    // From memory while the core's budget allows, else read back from disk by
                    // the core's drain.
                    if let Some(spooled) = appended.hold() {
                        if service.write_until_settled(&writer, bound).await {
                            spooled.written().await;
                        }
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

    /// Writes spooled rows until each is written or refused for good (the client was answered
    /// when the rows were spooled): rows that failed for a transient reason are written again,
    /// with backoff; refusals are logged and counted. `false` when an owner core is gone (the
    /// gateway is stopping): the record must stay in the spool and replay after the restart.
    async fn write_until_settled(&self, writer: &Arc<TableWriter>, mut rows: Vec<PendingRow>) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut retry = Vec::new();
            let mut refused = Vec::new();
            for written_row in self.write_bound(writer, rows).await {
                match written_row {
                    Written::Row(_, Ok(())) => {}
                    Written::Row(row, Err((ErrorCode::Unavailable | ErrorCode::Overloaded, _))) => retry.push(row),
                    Written::Row(_, Err((code, reason))) => refused.push((code, reason)),
                    Written::Gone(..) => return false,
                }
            }
            if let Some((code, reason)) = refused.first() {
                writer.metrics[self.core].failed(code.as_str_name(), refused.len() as u64);
                tracing::warn!(core = self.core, rows = refused.len(), %reason, "spooled gRPC rows refused by the database");
            }
            if retry.is_empty() {
                return true;
            }
            rows = retry;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Writes a gRPC batch read back from the spool (left by the previous run, or deferred),
    /// then completes its record. A batch whose table or columns went away since is refused
    /// for good (logged and counted), like a row the database refuses.
    pub async fn write_replayed(&self, batch: bytes::Bytes, spooled: Spooled) {
        let batch: Batch = match <raw::RowBatch as prost::Message>::decode(batch) {
            Ok(batch) => batch.into(),
            Err(error) => {
                tracing::error!(core = self.core, %error, "spool: undecodable gRPC batch skipped");
                return spooled.written().await;
            }
        };
        match self.batch_writer(&batch).await {
            Ok(writer) => {
                let (bound, errors) = Self::bind_batch(&writer, &batch, resolve_timestamp(batch.timestamp_us));
                if let Some(first) = errors.first() {
                    tracing::warn!(core = self.core, rows = errors.len(), reason = %first.reason, "spooled gRPC rows no longer fit their table");
                }
                if !self.write_until_settled(&writer, bound).await {
                    return;
                }
            }
            Err((code, reason)) => {
                self.count_refusal(code);
                tracing::warn!(core = self.core, rows = batch.rows.len(), code = code.as_str_name(), %reason, "spooled gRPC batch refused");
            }
        }
        spooled.written().await;
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

    /// Admits `rows` rows into this core's ingest share of the row budget, waiting for room (a
    /// stream stops reading meanwhile).
    async fn admit(&self, rows: usize) -> Result<IngestAdmitted, Status> {
        let admitted = self.shared.budgets[self.core].admit(rows).await;
        self.admitted(admitted)
    }

    fn admitted(&self, admitted: Option<Admitted>) -> Result<IngestAdmitted, Status> {
        let admitted = admitted.ok_or_else(|| status(ErrorCode::Unavailable, "gateway is shutting down"))?;
        let gauge = self.shared.inflight_gauges[self.core].clone();
        gauge.increment(admitted.rows() as f64);
        Ok(IngestAdmitted {
            _admitted: admitted,
            gauge,
        })
    }
}

/// Ingest rows admitted into a core's budget; released (and un-counted) when dropped.
struct IngestAdmitted {
    _admitted: Admitted,
    gauge: metrics::Gauge,
}

impl Drop for IngestAdmitted {
    fn drop(&mut self) {
        self.gauge.decrement(self._admitted.rows() as f64);
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

/// Serializes one row's values (plus the write timestamp) for columns of `types`, cell by cell
/// in `builder`. Missing trailing values leave their columns unset; columns at `key_positions`
/// must be non-null.
pub fn bind_row(
    names: &[String],
    types: &[ColumnType<'static>],
    key_positions: &[usize],
    row: &Row,
    timestamp_us: i64,
    builder: &mut RowBuilder,
) -> Result<RowSpan, (ErrorCode, String)> {
    let name = |position: usize| names.get(position).map_or("?", String::as_str);
    if row.values.len() > types.len() {
        return Err((
            ErrorCode::BadValue,
            format!("row has {} values for {} columns", row.values.len(), types.len()),
        ));
    }
    builder.start();
    for (position, typ) in types.iter().enumerate() {
        match row.values.get(position) {
            None => builder.unset().map_err(too_many_values)?,
            Some(value) => write_cell(value, typ, builder.cell().map_err(too_many_values)?)
                .map_err(|e| bad_value(name(position), typ, e))?,
        }
    }
    finish_row(names, key_positions, timestamp_us, builder)
}

/// [`bind_row`] for a row still encoded (a `shardgate.v1.Row`): its values are read straight
/// into cells (`wire::raw`). A row that is not valid protobuf is refused alone, MALFORMED.
pub fn bind_encoded_row(
    names: &[String],
    types: &[ColumnType<'static>],
    key_positions: &[usize],
    row: &[u8],
    timestamp_us: i64,
    builder: &mut RowBuilder,
) -> Result<RowSpan, (ErrorCode, String)> {
    // Read in one pass; a row with more values than columns is refused as such whatever else
    // is wrong with it, as for a decoded row.
    let too_many_values_for = |row: &[u8]| {
        raw::count_values(row)
            .filter(|&count| count > types.len())
            .map(|count| {
                (
                    ErrorCode::BadValue,
                    format!("row has {count} values for {} columns", types.len()),
                )
            })
    };
    let name = |position: usize| names.get(position).map_or("?", String::as_str);
    // A row this cannot read itself (a field `Row` does not declare, or malformed) is decoded
    // by prost, then bound as decoded rows are; MALFORMED when prost cannot decode it.
    let undecoded = |builder: &mut RowBuilder| {
        let decoded = <Row as prost::Message>::decode(row).map_err(|e| {
            (
                ErrorCode::Malformed,
                format!("the row is not a valid protobuf message: {e}"),
            )
        })?;
        bind_row(names, types, key_positions, &decoded, timestamp_us, builder)
    };
    builder.start();
    let mut values = raw::repeated_values(row);
    for (position, typ) in types.iter().enumerate() {
        let written = match values.next() {
            None => builder.unset().map_err(too_many_values),
            Some(None) => return undecoded(builder),
            Some(Some(value)) => builder.cell().map_err(too_many_values).and_then(|cell| {
                raw::write_value(value, typ, cell).map_err(|error| match error {
                    ValueError::Malformed(reason) => {
                        (ErrorCode::Malformed, format!("column `{}`: {reason}", name(position)))
                    }
                    ValueError::Convert(e) => bad_value(name(position), typ, e),
                })
            }),
        };
        if let Err(refusal) = written {
            if raw::count_values(row).is_none() {
                return undecoded(builder);
            }
            return Err(too_many_values_for(row).unwrap_or(refusal));
        }
    }
    match values.next() {
        None => finish_row(names, key_positions, timestamp_us, builder),
        Some(None) => undecoded(builder),
        Some(Some(_)) => match too_many_values_for(row) {
            Some(refusal) => Err(refusal),
            None => undecoded(builder),
        },
    }
}

/// A value that does not fit its column, naming the column and its type.
fn bad_value(column: &str, typ: &ColumnType<'_>, error: ConvertError) -> (ErrorCode, String) {
    (
        ErrorCode::BadValue,
        format!("column `{column}` ({}): {}", cql_type_name(typ), error.0),
    )
}

/// A row past the protocol's 65,535 values.
fn too_many_values(_: TooManyCells) -> (ErrorCode, String) {
    (ErrorCode::BadValue, format!("a row holds at most {} values", u16::MAX))
}

/// Ends a row whose columns are in `builder`: every key column must hold a value; then the
/// write timestamp.
fn finish_row(
    names: &[String],
    key_positions: &[usize],
    timestamp_us: i64,
    builder: &mut RowBuilder,
) -> Result<RowSpan, (ErrorCode, String)> {
    if let Some(&position) = key_positions.iter().find(|&&position| !builder.holds_value(position)) {
        return Err((
            ErrorCode::MissingKey,
            format!(
                "primary key column `{}` is missing or null",
                names.get(position).map_or("?", String::as_str)
            ),
        ));
    }
    builder.bigint(timestamp_us).map_err(too_many_values)?;
    builder.finish().ok_or_else(|| {
        (
            ErrorCode::BadValue,
            "the row's values did not serialize to whole cells".to_string(),
        )
    })
}

/// A bound row after [`IngestService::write_bound`]: its outcome, or gone with its owner core
/// (only at shutdown: the row went with the mesh task that could not run).
enum Written {
    /// Written, or refused with a code.
    Row(PendingRow, RowOutcome),
    /// The owner core was gone: the row's index and why.
    Gone(u32, String),
}

/// Writes `rows` on `owner` (the current core) through the write engine.
async fn write_on_owner(
    writer: &TableWriter,
    rows: Vec<(ReplicaShard, PendingRow)>,
    options: WriteOptions,
    owner: usize,
) -> Vec<Written> {
    writer::write_rows(&writer.session, writer, rows, options, &writer.metrics[owner])
        .await
        .into_iter()
        .map(|(row, outcome)| Written::Row(row, row_outcome(outcome)))
        .collect()
}

/// Producers get a retryable code after a few attempts rather than an unbounded wait.
const RETRIES: Retries = Retries::UpTo(WRITE_ATTEMPTS_MAX);

/// A write engine outcome as a row outcome.
fn row_outcome(outcome: Result<(), WriteError>) -> RowOutcome {
    outcome.map_err(|error| match error {
        WriteError::Refused(reason) => (ErrorCode::Rejected, reason),
        WriteError::Overloaded(reason) => (ErrorCode::Overloaded, reason),
        WriteError::Unavailable(reason) => (ErrorCode::Unavailable, reason),
    })
}

/// The batch's write timestamp, or now when the producer left it 0.
fn resolve_timestamp(timestamp_us: i64) -> i64 {
    if timestamp_us > 0 {
        timestamp_us
    } else {
        now_us()
    }
}

/// The rows of one stream message: the protobuf batch, else the FlatBuffers one.
fn stream_batch(batch: Option<raw::RowBatch>, flat_batch: &[u8]) -> Result<Batch, Refusal> {
    match batch {
        Some(batch) => Ok(batch.into()),
        None if !flat_batch.is_empty() => decode_row_batch(flat_batch)
            .map(Batch::from)
            .map_err(|e| (ErrorCode::Malformed, e.to_string())),
        None => Err((ErrorCode::Malformed, "`batch` or `flat_batch` is required".to_string())),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<WriteStreamResponse, Status>> + Send>>;

/// Whether `caller` may write `table`: the refusal (FORBIDDEN, counted) of a batch otherwise.
fn may_write(caller: Option<&Caller>, table: &str) -> Result<(), (ErrorCode, String)> {
    check_caller(caller, Access::Write(table)).map_err(|denied| (ErrorCode::Forbidden, refused(denied)))
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        if let Some(oversized) = take_oversized(request.extensions(), 0) {
            return self.unary_answer(Err((ErrorCode::TooLarge, oversized.reason())));
        }
        let caller = Caller::of(request.extensions());
        let request = request.into_inner();
        let ack = request.ack;
        let Some(batch) = request.batch else {
            return self.unary_answer(Err((ErrorCode::Malformed, "`batch` is required".to_string())));
        };
        if let Err(refusal) = may_write(caller.as_ref(), &batch.table) {
            return self.unary_answer(Err(refusal));
        }
        let _permit = self.admit(batch.rows.len()).await?;
        self.unary_answer(self.accept(batch.into(), ack, WhenFull::Refuse).await)
    }

    async fn write_flat(&self, request: Request<WriteFlatRequest>) -> Result<Response<WriteResponse>, Status> {
        if let Some(oversized) = take_oversized(request.extensions(), 0) {
            return self.unary_answer(Err((ErrorCode::TooLarge, oversized.reason())));
        }
        let caller = Caller::of(request.extensions());
        let request = request.into_inner();
        let batch = match decode_row_batch(&request.row_batch) {
            Ok(batch) => batch,
            Err(error) => return self.unary_answer(Err((ErrorCode::Malformed, error.to_string()))),
        };
        if let Err(refusal) = may_write(caller.as_ref(), &batch.table) {
            return self.unary_answer(Err(refusal));
        }
        let _permit = self.admit(batch.rows.len()).await?;
        self.unary_answer(self.accept(batch.into(), request.ack, WhenFull::Refuse).await)
    }

    type WriteStreamStream = ResponseStream;

    async fn write_stream(
        &self,
        request: Request<Streaming<WriteStreamRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let limits = OversizeLog::of(request.extensions());
        let caller = Caller::of(request.extensions());
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
                    None => stream_batch(message.batch, &message.flat_batch)
                        .and_then(|batch| may_write(caller.as_ref(), &batch.table).map(|()| batch))
                        .map_err(|r| (message.batch_id, r)),
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
        check(request.extensions(), Access::Authenticated).map_err(forbidden)?;
        let ownership = self.shared.ownership.load();
        let tables = request.into_inner().tables;
        topology(&ownership, &self.shared.core_endpoints, &self.shared.session, tables).map(Response::new)
    }
}
