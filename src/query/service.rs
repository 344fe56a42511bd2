//! The `shardgate.v1.Query` service. One instance per core, on the ingest listeners. Every RPC's
//! work runs as a local task of the core that accepted it (statements prepared and cached per
//! core, no lock); a `Get` whose key another core owns runs on that core, and so does every page
//! of a scan split another core owns, through the mesh. Results stream through bounded channels:
//! a client that reads slowly stops the pages being fetched for it, and holds no more than a
//! page per split it reads in parallel.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::{SinkExt, Stream, StreamExt};
use scylla::client::session::Session;
use scylla::cluster::metadata::{ColumnKind, ColumnType, NativeType};
use scylla::errors::{DbError, ExecutionError, PrepareError, RequestAttemptError};
use scylla::frame::types::Consistency as CqlConsistency;
use scylla::response::query_result::QueryResult;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, MaybeUnset};
use tonic::{Request, Response, Status};

use super::plan::plan;
use super::token::{Fingerprint, FingerprintBuilder, Keys, Position};
use crate::auth::{check_caller, Access, Caller};
use crate::config::QueryConfig;
use crate::query::pinned::Pins;
use crate::runtime::mesh::Mesh;
use crate::server::gate::{forbidden, refused};
use crate::server::limit::take_oversized;
use crate::server::status::status;
use crate::sink::scylla::writer::place_row;
use crate::sink::scylla::{cached_table_schema, RowValues, TableSchema};
use crate::telemetry::metric;
use crate::topology::Ownership;
use crate::wire::convert::{cql_type_name, from_cql, to_cql};
use crate::wire::proto::query_server::Query;
use crate::wire::proto::value::Kind;
use crate::wire::proto::{
    ColumnSpec, Consistency, ErrorCode, ExecuteRequest, ExecuteResponse, GetRequest, GetResponse, PlanScanRequest,
    PlanScanResponse, QueryOptions, ResultSet, Row, ScanRequest, ScanResponse, Split, Value,
};

/// Prepared statements kept per core; past it the cache is emptied and refilled on demand, so
/// clients cycling through statements cannot grow it.
const PREPARED_ENTRIES_MAX: usize = 1024;
/// How often an unknown table may trigger a schema refresh, per core.
const SCHEMA_REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// Splits a `Scan` reads at once when the request names no number.
const SCAN_PARALLEL_SPLITS_DEFAULT: u32 = 2;

/// What every core's query service shares.
pub struct QueryShared {
    /// The cluster session.
    pub session: Arc<Session>,
    /// Current ownership snapshot.
    pub ownership: Arc<ArcSwap<Ownership>>,
    /// The cross-core mesh reads of other cores' tokens run over.
    pub mesh: Arc<Mesh>,
    /// Defaults and limits.
    pub config: QueryConfig,
    /// The page-token key.
    pub keys: Keys,
}

/// The query service of one core.
#[derive(Clone)]
pub struct QueryService {
    core: usize,
    shared: Arc<QueryShared>,
}

/// This core's prepared statements, schema-refresh clock, scan pins and scan-read permits, in
/// the core's context.
#[derive(Default)]
struct CoreStatements {
    prepared: RefCell<HashMap<String, Arc<PreparedStatement>>>,
    last_schema_refresh: Cell<Option<Instant>>,
    pins: Pins,
    /// Permits for scan page fetches (`query.scan_reads_per_core_max`), made on first use.
    scan_reads: std::cell::OnceCell<glommio::sync::Semaphore>,
}

/// Why a request is refused: its code and a reason naming the field.
type Refusal = (ErrorCode, String);

fn refusal(code: ErrorCode, reason: impl Into<String>) -> Refusal {
    (code, reason.into())
}

fn to_status((code, reason): Refusal) -> Status {
    let core = crate::runtime::context::core().map_or_else(String::new, |c| c.to_string());
    let labels = [("core", core), ("code", code.as_str_name().to_string())];
    metrics::counter!(metric::READS_REFUSED, &labels).increment(1);
    status(code, reason)
}

impl QueryService {
    /// The service for `core`.
    pub fn new(core: usize, shared: Arc<QueryShared>) -> QueryService {
        QueryService { core, shared }
    }
}

/// Starts `work` as a local task of this core now (it may hold core-local state across
/// awaits) and returns a `Send` future of its output: tonic's handlers must be `Send`, the work
/// need not be.
fn on_this_core<T: Send + 'static>(
    work: impl Future<Output = T> + 'static,
) -> impl Future<Output = Result<T, Status>> + Send {
    let (answer, answered) = futures::channel::oneshot::channel();
    glommio::spawn_local(async move {
        let _ = answer.send(work.await);
    })
    .detach();
    async move {
        answered
            .await
            .map_err(|_| status(ErrorCode::Unavailable, "the core stopped while serving the request"))
    }
}

/// The statement for `cql`, prepared on this core once and cached.
async fn prepared(session: &Session, cql: &str) -> Result<Arc<PreparedStatement>, Refusal> {
    let state = crate::runtime::context::state::<CoreStatements>();
    if let Some(found) = state.prepared.borrow().get(cql) {
        return Ok(Arc::clone(found));
    }
    let statement = session
        .prepare(cql)
        .await
        .map_err(|error| prepare_refusal(cql, &error))?;
    let statement = Arc::new(statement);
    let mut cache = state.prepared.borrow_mut();
    if cache.len() >= PREPARED_ENTRIES_MAX {
        cache.clear();
    }
    cache.insert(cql.to_string(), Arc::clone(&statement));
    Ok(statement)
}

/// The schema of `table` (`keyspace.table`), refreshing the driver's metadata at most every
/// [`SCHEMA_REFRESH_INTERVAL`] per core when it is unknown.
async fn table_schema(session: &Session, field: &str, table: &str) -> Result<(String, String, TableSchema), Refusal> {
    let Some((keyspace, name)) = table.split_once('.') else {
        return Err(refusal(
            ErrorCode::UnknownTable,
            format!("{field}: `{table}` is not `keyspace.table`"),
        ));
    };
    let mut schema = cached_table_schema(session, keyspace, name);
    if schema.is_none() {
        let state = crate::runtime::context::state::<CoreStatements>();
        let last = &state.last_schema_refresh;
        if last.get().is_none_or(|t| t.elapsed() >= SCHEMA_REFRESH_INTERVAL) {
            last.set(Some(Instant::now()));
            let _ = session.refresh_metadata().await;
            schema = cached_table_schema(session, keyspace, name);
        }
    }
    match schema {
        Some(schema) => Ok((keyspace.to_string(), name.to_string(), schema)),
        None => Err(refusal(
            ErrorCode::UnknownTable,
            format!("{field}: table `{table}` does not exist"),
        )),
    }
}

/// The table's columns in `SELECT *` order: partition key, clustering key, the rest by name.
fn all_columns(schema: &TableSchema) -> Vec<String> {
    let mut rest: Vec<&String> = schema
        .columns
        .iter()
        .filter(|(_, (_, kind))| matches!(kind, ColumnKind::Regular | ColumnKind::Static))
        .map(|(name, _)| name)
        .collect();
    rest.sort_unstable();
    schema
        .partition_key
        .iter()
        .chain(&schema.clustering_key)
        .chain(rest)
        .cloned()
        .collect()
}

/// Checks that every name in `names` is a column of the table; `field` names the request field.
fn check_columns(table: &str, schema: &TableSchema, field: &str, names: &[String]) -> Result<(), Refusal> {
    for (i, name) in names.iter().enumerate() {
        if !schema.columns.contains_key(name) {
            let mut known: Vec<&str> = schema.columns.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(refusal(
                ErrorCode::UnknownColumn,
                format!(
                    "{field}[{i}]: table `{table}` has no column `{name}`; its columns: `{}`",
                    known.join("`, `")
                ),
            ));
        }
    }
    Ok(())
}

/// A quoted CQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The select list: the columns (all when empty), then `writetime(c)` and `ttl(c)` selectors.
fn select_list(schema: &TableSchema, columns: &[String], writetime: &[String], ttl: &[String]) -> String {
    let columns = if columns.is_empty() {
        all_columns(schema)
    } else {
        columns.to_vec()
    };
    columns
        .iter()
        .map(|c| quote(c))
        .chain(writetime.iter().map(|c| format!("writetime({})", quote(c))))
        .chain(ttl.iter().map(|c| format!("ttl({})", quote(c))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The page size a request asks for, within `query.page_size_max`.
fn page_size(config: &QueryConfig, options: &QueryOptions) -> Result<i32, Refusal> {
    match options.page_size {
        0 => Ok(config.page_size_default as i32),
        n if n <= config.page_size_max => Ok(n as i32),
        n => Err(refusal(
            ErrorCode::BadQuery,
            format!(
                "options.page_size: {n} rows is over query.page_size_max ({})",
                config.page_size_max
            ),
        )),
    }
}

/// The driver's consistency for a request's.
fn consistency(config: &QueryConfig, asked: i32) -> Result<CqlConsistency, Refusal> {
    Ok(match Consistency::try_from(asked) {
        Ok(Consistency::Unspecified) => config.consistency,
        Ok(Consistency::Any) => {
            return Err(refusal(
                ErrorCode::BadQuery,
                "options.consistency: ANY is for writes only",
            ))
        }
        Ok(Consistency::One) => CqlConsistency::One,
        Ok(Consistency::Two) => CqlConsistency::Two,
        Ok(Consistency::Three) => CqlConsistency::Three,
        Ok(Consistency::Quorum) => CqlConsistency::Quorum,
        Ok(Consistency::All) => CqlConsistency::All,
        Ok(Consistency::LocalQuorum) => CqlConsistency::LocalQuorum,
        Ok(Consistency::EachQuorum) => CqlConsistency::EachQuorum,
        Ok(Consistency::LocalOne) => CqlConsistency::LocalOne,
        Err(_) => {
            return Err(refusal(
                ErrorCode::BadQuery,
                format!("options.consistency: {asked} is not a consistency level"),
            ))
        }
    })
}

/// The statement as a request runs it: page size, consistency and timeout of its options.
fn configured(
    config: &QueryConfig,
    statement: &PreparedStatement,
    options: &QueryOptions,
) -> Result<PreparedStatement, Refusal> {
    let mut statement = statement.clone();
    statement.set_page_size(page_size(config, options)?);
    statement.set_consistency(consistency(config, options.consistency)?);
    if options.timeout_ms > 0 {
        statement.set_request_timeout(Some(Duration::from_millis(u64::from(options.timeout_ms))));
    }
    Ok(statement)
}

/// Converts a request's values for the statement's markers `from..`; `field` names the request
/// field. An `unset` value leaves its marker unset.
fn bind(
    statement: &PreparedStatement,
    from: usize,
    field: &str,
    values: &[Value],
    names: &[String],
) -> Result<RowValues, Refusal> {
    let specs = statement.get_variable_col_specs();
    let markers = specs.len().saturating_sub(from);
    let mut bound: RowValues = vec![MaybeUnset::Unset; markers];
    let positions: Vec<usize> = if names.is_empty() {
        if values.len() != markers {
            return Err(refusal(
                ErrorCode::BadQuery,
                format!(
                    "{field}: {} values given; the statement has {markers} bind markers",
                    values.len()
                ),
            ));
        }
        (0..markers).collect()
    } else {
        if names.len() != values.len() {
            return Err(refusal(
                ErrorCode::BadQuery,
                format!(
                    "value_names: {} names for {} values; give one name per value",
                    names.len(),
                    values.len()
                ),
            ));
        }
        let mut positions = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let Some(position) = specs.iter().skip(from).position(|spec| spec.name() == name) else {
                let known: Vec<&str> = specs.iter().skip(from).map(|s| s.name()).collect();
                return Err(refusal(
                    ErrorCode::BadQuery,
                    format!(
                        "value_names[{i}]: the statement has no bind marker `{name}`; its markers: `{}`",
                        known.join("`, `")
                    ),
                ));
            };
            positions.push(position);
        }
        positions
    };
    for (i, (value, position)) in values.iter().zip(positions).enumerate() {
        let Some(spec) = specs.get_by_index(from + position) else {
            continue;
        };
        if matches!(value.kind, Some(Kind::Unset(_))) {
            continue;
        }
        let converted = to_cql(value, spec.typ()).map_err(|e| {
            refusal(
                ErrorCode::BadValue,
                format!(
                    "{field}[{i}] (`{}`, {}): {}",
                    spec.name(),
                    cql_type_name(spec.typ()),
                    e.0
                ),
            )
        })?;
        bound[position] = MaybeUnset::Set(converted);
    }
    Ok(bound)
}

/// The position a request's page token resumes at (the start when it has none).
fn resume_position(keys: &Keys, fingerprint: &Fingerprint, field: &str, token: &[u8]) -> Result<Position, Refusal> {
    if token.is_empty() {
        return Ok(Position {
            range: 0,
            paging_state: Vec::new(),
        });
    }
    keys.open(fingerprint, token)
        .map_err(|e| refusal(ErrorCode::BadPageToken, format!("{field}: {e}")))
}

fn paging_state(position: &Position) -> PagingState {
    if position.paging_state.is_empty() {
        PagingState::start()
    } else {
        PagingState::new_from_raw_bytes(position.paging_state.as_slice())
    }
}

/// The database's paging state after a page, if more pages follow.
fn next_paging_state(response: &PagingStateResponse) -> Option<Vec<u8>> {
    match response {
        PagingStateResponse::HasMorePages { state } => {
            Some(state.as_bytes_slice().map(|b| b.to_vec()).unwrap_or_default())
        }
        PagingStateResponse::NoMorePages => None,
    }
}

/// A page of results as typed rows (column specs unless `skip_metadata`), and its warnings.
fn result_set(result: QueryResult, skip_metadata: bool) -> Result<(ResultSet, Vec<String>), Refusal> {
    let warnings = result.warnings().map(str::to_string).collect();
    if !result.is_rows() {
        return Ok((ResultSet::default(), warnings));
    }
    let rows_result = result
        .into_rows_result()
        .map_err(|e| refusal(ErrorCode::Unavailable, format!("unreadable result: {e}")))?;
    let columns = if skip_metadata {
        Vec::new()
    } else {
        rows_result
            .column_specs()
            .iter()
            .map(|spec| ColumnSpec {
                name: spec.name().to_string(),
                cql_type: cql_type_name(spec.typ()),
            })
            .collect()
    };
    let mut rows = Vec::with_capacity(rows_result.rows_num());
    let typed = rows_result
        .rows::<scylla::value::Row>()
        .map_err(|e| refusal(ErrorCode::Unavailable, format!("unreadable rows: {e}")))?;
    for row in typed {
        let row = row.map_err(|e| refusal(ErrorCode::Unavailable, format!("unreadable row: {e}")))?;
        rows.push(Row {
            values: row.columns.iter().map(|c| from_cql(c.as_ref())).collect(),
        });
    }
    Ok((
        ResultSet {
            columns,
            rows,
            next_page_token: Vec::new(),
        },
        warnings,
    ))
}

/// A database error of a read as a refusal.
fn read_refusal(error: &ExecutionError) -> Refusal {
    let reason = error.to_string();
    let code = match error {
        ExecutionError::LastAttemptError(attempt) => attempt_code(attempt),
        ExecutionError::PrepareError(PrepareError::AllAttemptsFailed { first_attempt }) => attempt_code(first_attempt),
        ExecutionError::BadQuery(_) => ErrorCode::BadQuery,
        ExecutionError::RequestTimeout(_) => ErrorCode::Timeout,
        _ => ErrorCode::Unavailable,
    };
    (code, reason)
}

fn prepare_refusal(cql: &str, error: &PrepareError) -> Refusal {
    let code = match error {
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_code(first_attempt),
        _ => ErrorCode::Unavailable,
    };
    (code, format!("cannot prepare `{cql}`: {error}"))
}

fn attempt_code(attempt: &RequestAttemptError) -> ErrorCode {
    match attempt {
        RequestAttemptError::DbError(db, _) => match db {
            DbError::SyntaxError
            | DbError::Invalid
            | DbError::AlreadyExists { .. }
            | DbError::FunctionFailure { .. }
            | DbError::Unauthorized
            | DbError::ConfigError => ErrorCode::BadQuery,
            DbError::ReadTimeout { .. } | DbError::WriteTimeout { .. } => ErrorCode::Timeout,
            DbError::Overloaded | DbError::RateLimitReached { .. } => ErrorCode::Overloaded,
            _ => ErrorCode::Unavailable,
        },
        RequestAttemptError::SerializationError(_) | RequestAttemptError::CqlRequestSerialization(_) => {
            ErrorCode::BadValue
        }
        _ => ErrorCode::Unavailable,
    }
}

/// One page of `statement` with `values` from `position`; the token of the next page sealed
/// for `fingerprint` (same range), if any.
#[allow(clippy::too_many_arguments)]
async fn page(
    shared: &QueryShared,
    statement: &PreparedStatement,
    values: &RowValues,
    position: &Position,
    fingerprint: &Fingerprint,
    skip_metadata: bool,
    (table, rpc): (&str, &'static str),
) -> Result<(ResultSet, Vec<String>, Option<Position>), Refusal> {
    let started = Instant::now();
    let (result, paging) = shared
        .session
        .execute_single_page(statement, values, paging_state(position))
        .await
        .map_err(|e| read_refusal(&e))?;
    let (mut set, warnings) = result_set(result, skip_metadata)?;
    record_read(table, rpc, set.rows.len(), started);
    let next = next_paging_state(&paging).map(|state| Position {
        range: position.range,
        paging_state: state,
    });
    if let Some(next) = &next {
        set.next_page_token = shared.keys.seal(fingerprint, next);
    }
    Ok((set, warnings, next))
}

/// Counts a page read on this core for `table` by `rpc`: its rows, and its latency from
/// `started`.
fn record_read(table: &str, rpc: &'static str, rows: usize, started: Instant) {
    let core = crate::runtime::context::core().map_or_else(String::new, |c| c.to_string());
    let labels = [("core", core), ("table", table.to_string()), ("rpc", rpc.to_string())];
    metrics::counter!(metric::ROWS_READ, &labels).increment(rows as u64);
    metrics::counter!(metric::READ_PAGES, &labels).increment(1);
    metrics::histogram!(metric::READ_LATENCY_SECONDS, &labels).record(started.elapsed().as_secs_f64());
}

/// The `keyspace.table` a prepared statement reads (its result columns' table, else its bind
/// markers'); empty when it names none.
fn statement_table(statement: &PreparedStatement) -> String {
    let from_result = statement
        .get_current_result_set_col_specs()
        .get()
        .iter()
        .next()
        .map(|spec| format!("{}.{}", spec.table_spec().ks_name(), spec.table_spec().table_name()));
    from_result
        .or_else(|| {
            statement
                .get_table_spec()
                .map(|spec| format!("{}.{}", spec.ks_name(), spec.table_name()))
        })
        .unwrap_or_default()
}

/// The fingerprint of a value list: its protobuf encoding.
fn encoded_values(values: &[Value]) -> Vec<u8> {
    use prost::Message as _;
    crate::wire::proto::Values {
        values: values.to_vec(),
    }
    .encode_to_vec()
}

/// An `Execute` request, prepared and bound: what its pages run.
struct Executable {
    statement: PreparedStatement,
    /// The table it reads, for metrics.
    table: String,
    values: RowValues,
    fingerprint: Fingerprint,
    position: Position,
    skip_metadata: bool,
}

async fn executable(
    shared: &QueryShared,
    request: &ExecuteRequest,
    caller: Option<&Caller>,
) -> Result<Executable, Refusal> {
    if request.cql.trim().is_empty() {
        return Err(refusal(ErrorCode::BadQuery, "cql: empty; give a CQL statement"));
    }
    let options = request.options.clone().unwrap_or_default();
    let statement = prepared(&shared.session, &request.cql).await?;
    // A SELECT's result has columns; an INSERT, UPDATE, DELETE, BATCH or schema change has
    // none (decided by the database when preparing, not by reading the text).
    let writes = statement.get_current_result_set_col_specs().get().len() == 0 || statement.is_confirmed_lwt();
    // The scope: the one table the statement reads or writes (from its prepared metadata); a
    // statement that names none that way, or a BATCH (which may name several), needs `admin`.
    let table = statement_table(&statement);
    let batch = request
        .cql
        .trim_start()
        .get(..5)
        .is_some_and(|w| w.eq_ignore_ascii_case("begin"));
    let access = match (table.is_empty() || batch, writes) {
        (true, _) => Access::Admin,
        (false, true) => Access::Write(&table),
        (false, false) => Access::Read(&table),
    };
    check_caller(caller, access).map_err(|denied| refusal(ErrorCode::Forbidden, refused(denied)))?;
    if writes && !shared.config.allow_writes {
        return Err(refusal(
            ErrorCode::ReadOnly,
            format!(
                "cql: `{}` is not a SELECT, and query.allow_writes is false",
                request.cql
            ),
        ));
    }
    let values = bind(&statement, 0, "values", &request.values, &request.value_names)?;
    let mut fingerprint = FingerprintBuilder::new("execute")
        .field(request.cql.as_bytes())
        .field(&encoded_values(&request.values));
    for name in &request.value_names {
        fingerprint = fingerprint.field(name.as_bytes());
    }
    let fingerprint = fingerprint.finish();
    let position = resume_position(&shared.keys, &fingerprint, "options.page_token", &options.page_token)?;
    Ok(Executable {
        table,
        statement: configured(&shared.config, &statement, &options)?,
        values,
        fingerprint,
        position,
        skip_metadata: options.skip_metadata,
    })
}

async fn execute_one(
    shared: Arc<QueryShared>,
    request: ExecuteRequest,
    caller: Option<Caller>,
) -> Result<ExecuteResponse, Refusal> {
    let run = executable(&shared, &request, caller.as_ref()).await?;
    let (result, warnings, _) = page(
        &shared,
        &run.statement,
        &run.values,
        &run.position,
        &run.fingerprint,
        run.skip_metadata,
        (&run.table, "execute"),
    )
    .await?;
    Ok(ExecuteResponse {
        result: Some(result),
        warnings,
    })
}

/// A `Get` read on this core: prepared and bound here, then its page.
async fn get_here(shared: Arc<QueryShared>, request: GetRequest) -> Result<GetResponse, Refusal> {
    let prepared = get_statement(&shared, &request).await?;
    get_page(&shared, &request.table, prepared).await
}

/// The page of a prepared `Get` (its statement, key values, fingerprint and options).
async fn get_page(
    shared: &QueryShared,
    table: &str,
    (statement, values, fingerprint, options): (Arc<PreparedStatement>, RowValues, Fingerprint, QueryOptions),
) -> Result<GetResponse, Refusal> {
    let position = resume_position(&shared.keys, &fingerprint, "options.page_token", &options.page_token)?;
    let statement = configured(&shared.config, &statement, &options)?;
    let (result, _, _) = page(
        shared,
        &statement,
        &values,
        &position,
        &fingerprint,
        options.skip_metadata,
        (table, "get"),
    )
    .await?;
    Ok(GetResponse { result: Some(result) })
}

/// The prepared `SELECT ... WHERE <key> = ?` of a `Get`, its bound key and its fingerprint.
async fn get_statement(
    shared: &QueryShared,
    request: &GetRequest,
) -> Result<(Arc<PreparedStatement>, RowValues, Fingerprint, QueryOptions), Refusal> {
    let (keyspace, table, schema) = table_schema(&shared.session, "table", &request.table).await?;
    check_columns(&request.table, &schema, "columns", &request.columns)?;
    check_columns(&request.table, &schema, "with_writetime", &request.with_writetime)?;
    check_columns(&request.table, &schema, "with_ttl", &request.with_ttl)?;
    let key_columns: Vec<&String> = schema.partition_key.iter().chain(&schema.clustering_key).collect();
    let given = request.key.len();
    if given < schema.partition_key.len() || given > key_columns.len() {
        return Err(refusal(
            ErrorCode::MissingKey,
            format!(
                "key: {given} values given; table `{}` needs its partition key (`{}`) and optionally a prefix of its clustering key (`{}`)",
                request.table,
                schema.partition_key.join("`, `"),
                schema.clustering_key.join("`, `")
            ),
        ));
    }
    let conditions: Vec<String> = key_columns[..given]
        .iter()
        .map(|c| format!("{} = ?", quote(c)))
        .collect();
    let cql = format!(
        "SELECT {} FROM {}.{} WHERE {}",
        select_list(&schema, &request.columns, &request.with_writetime, &request.with_ttl),
        quote(&keyspace),
        quote(&table),
        conditions.join(" AND ")
    );
    let statement = prepared(&shared.session, &cql).await?;
    let mut values = RowValues::with_capacity(given);
    for (i, (value, column)) in request.key.iter().zip(&key_columns).enumerate() {
        let typ = schema
            .columns
            .get(*column)
            .map(|(typ, _)| typ.clone())
            .unwrap_or(ColumnType::Native(NativeType::Blob));
        let converted = to_cql(value, &typ).map_err(|e| {
            refusal(
                ErrorCode::BadValue,
                format!("key[{i}] (`{column}`, {}): {}", cql_type_name(&typ), e.0),
            )
        })?;
        if converted.is_none() {
            return Err(refusal(
                ErrorCode::MissingKey,
                format!("key[{i}] (`{column}`): a key value cannot be null"),
            ));
        }
        values.push(MaybeUnset::Set(converted));
    }
    let mut fingerprint = FingerprintBuilder::new("get")
        .field(cql.as_bytes())
        .field(&encoded_values(&request.key));
    for name in &request.columns {
        fingerprint = fingerprint.field(name.as_bytes());
    }
    Ok((
        statement,
        values,
        fingerprint.finish(),
        request.options.clone().unwrap_or_default(),
    ))
}

/// A scan, prepared: the statement (`token(pk) > ? AND token(pk) <= ?` then the request's
/// `where`), the `where` binds, the splits and how each starts.
struct ScanPlan {
    /// `keyspace.table`, for metrics.
    table: String,
    statement: PreparedStatement,
    where_values: RowValues,
    splits: Vec<Split>,
    starts: Vec<Position>,
    fingerprints: Vec<Fingerprint>,
    skip_metadata: bool,
    parallel: usize,
}

async fn scan_plan(shared: &QueryShared, request: &ScanRequest) -> Result<ScanPlan, Refusal> {
    let (keyspace, table, schema) = table_schema(&shared.session, "table", &request.table).await?;
    check_columns(&request.table, &schema, "columns", &request.columns)?;
    let options = request.options.clone().unwrap_or_default();
    if !options.page_token.is_empty() {
        return Err(refusal(
            ErrorCode::BadQuery,
            "options.page_token: a scan resumes split by split; give each split's token in `resume`",
        ));
    }
    let key: Vec<String> = schema.partition_key.iter().map(|c| quote(c)).collect();
    let key = key.join(", ");
    let mut cql = format!(
        "SELECT {} FROM {}.{} WHERE token({key}) > ? AND token({key}) <= ?",
        select_list(&schema, &request.columns, &[], &[]),
        quote(&keyspace),
        quote(&table),
    );
    if !request.r#where.trim().is_empty() {
        cql.push_str(" AND ");
        cql.push_str(&request.r#where);
    }
    if request.allow_filtering {
        cql.push_str(" ALLOW FILTERING");
    }
    let statement = prepared(&shared.session, &cql).await?;
    let where_values = bind(&statement, 2, "values", &request.values, &[])?;
    let splits = if request.splits.is_empty() {
        let ownership = shared.ownership.load();
        let wanted = ownership.cores() * shared.config.scan_splits_per_core as usize;
        plan(&ownership, wanted)
    } else {
        for (i, split) in request.splits.iter().enumerate() {
            if split.ranges.iter().any(|r| r.start >= r.end) {
                return Err(refusal(
                    ErrorCode::BadQuery,
                    format!("splits[{i}].ranges: every range needs start < end"),
                ));
            }
        }
        request.splits.clone()
    };
    if !request.resume.is_empty() && request.resume.len() != splits.len() {
        return Err(refusal(
            ErrorCode::BadQuery,
            format!(
                "resume: {} tokens for {} splits; give one per split (empty = from its start)",
                request.resume.len(),
                splits.len()
            ),
        ));
    }
    let values = encoded_values(&request.values);
    let mut fingerprints = Vec::with_capacity(splits.len());
    let mut starts = Vec::with_capacity(splits.len());
    for (i, split) in splits.iter().enumerate() {
        let mut fingerprint = FingerprintBuilder::new("scan").field(cql.as_bytes()).field(&values);
        for range in &split.ranges {
            fingerprint = fingerprint
                .field(&range.start.to_be_bytes())
                .field(&range.end.to_be_bytes());
        }
        let fingerprint = fingerprint.finish();
        let token = request.resume.get(i).map(Vec::as_slice).unwrap_or_default();
        let position = resume_position(&shared.keys, &fingerprint, &format!("resume[{i}]"), token)?;
        if position.range as usize > split.ranges.len() {
            return Err(refusal(
                ErrorCode::BadPageToken,
                format!("resume[{i}]: the token points past the split's ranges"),
            ));
        }
        fingerprints.push(fingerprint);
        starts.push(position);
    }
    let parallel = match request.parallel_splits {
        0 => SCAN_PARALLEL_SPLITS_DEFAULT,
        n => n.min(shared.config.scan_parallel_splits_max),
    };
    Ok(ScanPlan {
        table: request.table.clone(),
        statement: configured(&shared.config, &statement, &options)?,
        where_values,
        splits,
        starts,
        fingerprints,
        skip_metadata: options.skip_metadata,
        parallel: parallel.max(1) as usize,
    })
}

/// One page of a scan split's range `position.range`: the rows, and where the split goes on
/// (`None` once the split is done). Runs on the split's core.
#[allow(clippy::too_many_arguments)]
async fn scan_page(
    shared: Arc<QueryShared>,
    table: String,
    statement: PreparedStatement,
    where_values: RowValues,
    split: Split,
    fingerprint: Fingerprint,
    position: Position,
    skip_metadata: bool,
) -> Result<(ResultSet, Option<Position>), Refusal> {
    let Some(range) = split.ranges.get(position.range as usize) else {
        return Ok((ResultSet::default(), None));
    };
    let mut values = RowValues::with_capacity(2 + where_values.len());
    values.push(MaybeUnset::Set(Some(CqlValue::BigInt(range.start))));
    values.push(MaybeUnset::Set(Some(CqlValue::BigInt(range.end))));
    values.extend(where_values);
    let mut statement = statement;
    let statements = crate::runtime::context::state::<CoreStatements>();
    let permits = statements
        .scan_reads
        .get_or_init(|| glommio::sync::Semaphore::new(u64::from(shared.config.scan_reads_per_core_max)));
    let _permit = permits
        .acquire_permit(1)
        .await
        .map_err(|_| refusal(ErrorCode::Unavailable, "the core is shutting down"))?;
    statement.set_load_balancing_policy(statements.pins.for_range(
        &shared.session,
        &shared.ownership.load(),
        range.start,
    ));
    let started = Instant::now();
    let (result, paging) = shared
        .session
        .execute_single_page(&statement, &values, paging_state(&position))
        .await
        .map_err(|e| read_refusal(&e))?;
    let (mut set, _) = result_set(result, skip_metadata)?;
    record_read(&table, "scan", set.rows.len(), started);
    let next = match next_paging_state(&paging) {
        Some(state) => Some(Position {
            range: position.range,
            paging_state: state,
        }),
        None if (position.range as usize + 1) < split.ranges.len() => Some(Position {
            range: position.range + 1,
            paging_state: Vec::new(),
        }),
        None => None,
    };
    if let Some(next) = &next {
        set.next_page_token = shared.keys.seal(&fingerprint, next);
    }
    Ok((set, next))
}

type ExecuteStream = Pin<Box<dyn Stream<Item = Result<ExecuteResponse, Status>> + Send>>;
type ScanStream = Pin<Box<dyn Stream<Item = Result<ScanResponse, Status>> + Send>>;

/// The request's message, or TOO_LARGE when it was over `ingest.message_bytes_max` (the body
/// limiter dropped it and logged why).
fn message<T>(request: Request<T>) -> Result<T, Status> {
    match take_oversized(request.extensions(), 0) {
        Some(oversized) => Err(status(ErrorCode::TooLarge, oversized.reason())),
        None => Ok(request.into_inner()),
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let caller = Caller::of(request.extensions());
        let request = message(request)?;
        check_caller(caller.as_ref(), Access::Read(&request.table)).map_err(forbidden)?;
        let shared = Arc::clone(&self.shared);
        let core = self.core;
        on_this_core(async move {
            // The key's owner core reads it; this core prepares and binds to find it, and
            // reads it with what it bound when it is the owner.
            let prepared = get_statement(&shared, &request).await?;
            let owner = place_row(&prepared.0, &prepared.1, &shared.ownership.load()).map_or(core, |p| p.core);
            if owner == core {
                return get_page(&shared, &request.table, prepared).await;
            }
            let remote = Arc::clone(&shared);
            shared
                .mesh
                .run_on(owner, move || get_here(remote, request))
                .await
                .map_err(|gone| refusal(ErrorCode::Unavailable, gone.to_string()))?
        })
        .await?
        .map(Response::new)
        .map_err(to_status)
    }

    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteResponse>, Status> {
        let caller = Caller::of(request.extensions());
        let request = message(request)?;
        let shared = Arc::clone(&self.shared);
        on_this_core(execute_one(shared, request, caller))
            .await?
            .map(Response::new)
            .map_err(to_status)
    }

    type ExecuteStreamStream = ExecuteStream;

    async fn execute_stream(&self, request: Request<ExecuteRequest>) -> Result<Response<ExecuteStream>, Status> {
        let caller = Caller::of(request.extensions());
        let request = message(request)?;
        let shared = Arc::clone(&self.shared);
        // One page waits in the channel at most: the client's reading paces the fetching.
        let (mut pages, receiver) = futures::channel::mpsc::channel(1);
        glommio::spawn_local(async move {
            let mut run = match executable(&shared, &request, caller.as_ref()).await {
                Ok(run) => run,
                Err(refused) => {
                    let _ = pages.send(Err(to_status(refused))).await;
                    return;
                }
            };
            loop {
                let fetched = page(
                    &shared,
                    &run.statement,
                    &run.values,
                    &run.position,
                    &run.fingerprint,
                    run.skip_metadata,
                    (&run.table, "execute"),
                )
                .await;
                let (result, warnings, next) = match fetched {
                    Ok(page) => page,
                    Err(refused) => {
                        let _ = pages.send(Err(to_status(refused))).await;
                        return;
                    }
                };
                let response = ExecuteResponse {
                    result: Some(result),
                    warnings,
                };
                if pages.send(Ok(response)).await.is_err() {
                    return; // The client went away.
                }
                match next {
                    Some(position) => run.position = position,
                    None => return,
                }
            }
        })
        .detach();
        Ok(Response::new(Box::pin(receiver)))
    }

    async fn plan_scan(&self, request: Request<PlanScanRequest>) -> Result<Response<PlanScanResponse>, Status> {
        let caller = Caller::of(request.extensions());
        let request = message(request)?;
        check_caller(caller.as_ref(), Access::Read(&request.table)).map_err(forbidden)?;
        let shared = Arc::clone(&self.shared);
        on_this_core(async move {
            table_schema(&shared.session, "table", &request.table).await?;
            let ownership = shared.ownership.load();
            let wanted = match request.min_splits {
                0 => ownership.cores() * shared.config.scan_splits_per_core as usize,
                n => n as usize,
            };
            Ok(PlanScanResponse {
                splits: plan(&ownership, wanted.min(1 << 16)),
            })
        })
        .await?
        .map(Response::new)
        .map_err(to_status)
    }

    type ScanStream = ScanStream;

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanStream>, Status> {
        let caller = Caller::of(request.extensions());
        let request = message(request)?;
        check_caller(caller.as_ref(), Access::Read(&request.table)).map_err(forbidden)?;
        let shared = Arc::clone(&self.shared);
        let core = self.core;
        let (plan, (pages, receiver)) = {
            let shared = Arc::clone(&shared);
            let plan = on_this_core(async move { scan_plan(&shared, &request).await })
                .await?
                .map_err(to_status)?;
            let channel = futures::channel::mpsc::channel(plan.parallel);
            (plan, channel)
        };
        glommio::spawn_local(run_scan(shared, core, plan, pages)).detach();
        Ok(Response::new(Box::pin(receiver)))
    }
}

/// Reads a scan's splits, `plan.parallel` at a time, each page on its split's core, and sends
/// the pages to the client in the order they come; stops at the first error or when the client
/// goes away.
async fn run_scan(
    shared: Arc<QueryShared>,
    core: usize,
    plan: ScanPlan,
    pages: futures::channel::mpsc::Sender<Result<ScanResponse, Status>>,
) {
    let total = plan.splits.len() as u32;
    let ScanPlan {
        table,
        statement,
        where_values,
        splits,
        starts,
        fingerprints,
        skip_metadata,
        parallel,
    } = plan;
    let scan = Arc::new(SplitScan {
        shared,
        core,
        table,
        statement,
        where_values,
        skip_metadata,
        total,
    });
    let work =
        splits
            .into_iter()
            .zip(starts)
            .zip(fingerprints)
            .enumerate()
            .map(|(index, ((split, start), fingerprint))| {
                Arc::clone(&scan).read_split(index, split, start, fingerprint, pages.clone())
            });
    let mut running = futures::stream::iter(work).buffer_unordered(parallel);
    while let Some(went_on) = running.next().await {
        if !went_on {
            return;
        }
    }
}

/// What every split of one `Scan` shares.
struct SplitScan {
    shared: Arc<QueryShared>,
    /// The core serving the request.
    core: usize,
    table: String,
    statement: PreparedStatement,
    where_values: RowValues,
    skip_metadata: bool,
    total: u32,
}

impl SplitScan {
    /// Reads split `index` from `start` to its end, each page on the split's core, sending
    /// every page; false when it stopped early (an error sent, or the client gone).
    async fn read_split(
        self: Arc<Self>,
        index: usize,
        split: Split,
        start: Position,
        fingerprint: Fingerprint,
        mut pages: futures::channel::mpsc::Sender<Result<ScanResponse, Status>>,
    ) -> bool {
        let owner = (split.core as usize).min(self.shared.mesh.cores().saturating_sub(1));
        let count = |state: &str| {
            let labels = [
                ("core", owner.to_string()),
                ("table", self.table.clone()),
                ("state", state.to_string()),
            ];
            metrics::counter!(metric::SCAN_SPLITS, &labels).increment(1);
        };
        count("started");
        let mut position = start;
        loop {
            let read = {
                let (shared, table, statement, where_values, split, fingerprint, position, skip_metadata) = (
                    Arc::clone(&self.shared),
                    self.table.clone(),
                    self.statement.clone(),
                    self.where_values.clone(),
                    split.clone(),
                    fingerprint.clone(),
                    position.clone(),
                    self.skip_metadata,
                );
                move || {
                    scan_page(
                        shared,
                        table,
                        statement,
                        where_values,
                        split,
                        fingerprint,
                        position,
                        skip_metadata,
                    )
                }
            };
            let page = if owner == self.core {
                read().await
            } else {
                match self.shared.mesh.run_on(owner, read).await {
                    Ok(page) => page,
                    Err(gone) => Err(refusal(ErrorCode::Unavailable, gone.to_string())),
                }
            };
            let (set, next) = match page {
                Ok(page) => page,
                Err(refused) => {
                    let _ = pages.send(Err(to_status(refused))).await;
                    return false;
                }
            };
            let response = ScanResponse {
                split: index as u32,
                page: Some(set),
                split_done: next.is_none(),
                splits_total: self.total,
            };
            if pages.send(Ok(response)).await.is_err() {
                return false;
            }
            match next {
                Some(next) => position = next,
                None => {
                    count("done");
                    return true;
                }
            }
        }
    }
}
