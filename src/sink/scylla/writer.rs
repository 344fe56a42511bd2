//! The one ScyllaDB write engine: routes, the ingest API and `shardgate replay` all write through
//! [`write_rows`]. Rows arrive placed (their primary replica and shard known, on the core that
//! owns them); rows of one (replica, shard) share UNLOGGED batches of at most `batch_rows_max`
//! rows, every batch in parallel; a batch the database refuses for a permanent reason is split
//! into single writes, so only the refused rows fail. Transient failures retry per [`Retries`].
//! Every row comes back with its outcome; what an outcome means (ack, dead letter, a row error
//! to the producer) is the caller's.
//!
//! Threads: the core that owns the rows (its futures are not `Send`-bound; statements are
//! serialized and answers parsed there, the sockets live on the island).

use std::sync::OnceLock;
use std::time::Instant;

use scylla::client::session::Session;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::routing::partitioner::Partitioner;
use scylla::statement::batch::{Batch, BatchStatement, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::bound::BoundValues;
use super::retry::{classify, execute_with_retries, Retries, WriteFailure};
use crate::telemetry::RowMetrics;
use crate::topology::{Ownership, PartitionKeyHasher, Placement, ReplicaShard};

/// Why a row was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The database refused the row for good (a bad value, a schema mismatch).
    Refused(String),
    /// The database is overloaded or rate-limits: attempts ran out.
    Overloaded(String),
    /// Replicas did not answer, or the connection was lost: attempts ran out.
    Unavailable(String),
}

impl WriteError {
    /// Sorts a driver error.
    pub fn of(error: &ExecutionError) -> WriteError {
        match classify(error) {
            WriteFailure::Permanent(reason) => WriteError::Refused(reason),
            WriteFailure::Transient(reason) => match error {
                ExecutionError::LastAttemptError(RequestAttemptError::DbError(
                    DbError::Overloaded | DbError::RateLimitReached { .. },
                    _,
                )) => WriteError::Overloaded(reason),
                _ => WriteError::Unavailable(reason),
            },
        }
    }

    /// The reason, as the database gave it.
    pub fn reason(&self) -> &str {
        match self {
            WriteError::Refused(reason) | WriteError::Overloaded(reason) | WriteError::Unavailable(reason) => reason,
        }
    }
}

/// What a row type needs to be written: the prepared statement it binds to (chosen by the
/// caller's context, e.g. a route's upsert or delete of a target) and its bound values.
pub trait Statements<R> {
    /// How the rows' values are bound.
    type Values: BoundValues;
    /// The statement `row` is written with.
    fn statement(&self, row: &R) -> &WriteStatement;
    /// The row's bound values, in the statement's marker order.
    fn values<'r>(&self, row: &'r R) -> &'r Self::Values;
}

/// A prepared write, and the full UNLOGGED batch of it that every full chunk of its rows is
/// written with: made on first use, so a batch does not clone the statement once per row.
pub struct WriteStatement {
    /// The prepared statement.
    prepared: PreparedStatement,
    /// `batch_rows_max` copies of it.
    full_batch: OnceLock<Batch>,
}

impl WriteStatement {
    /// Wraps a prepared write.
    pub fn new(prepared: PreparedStatement) -> WriteStatement {
        WriteStatement {
            prepared,
            full_batch: OnceLock::new(),
        }
    }

    /// The prepared statement.
    pub fn prepared(&self) -> &PreparedStatement {
        &self.prepared
    }

    /// The batch of `rows` copies of the statement when `rows` is a full chunk (`rows_max`,
    /// more than one row).
    fn full_batch(&self, rows: usize, rows_max: usize) -> Option<&Batch> {
        (rows > 1 && rows == rows_max).then(|| {
            self.full_batch
                .get_or_init(|| unlogged_batch(vec![BatchStatement::PreparedStatement(self.prepared.clone()); rows]))
        })
    }
}

/// An idempotent UNLOGGED batch of `statements` (rows of one replica and shard).
fn unlogged_batch(statements: Vec<BatchStatement>) -> Batch {
    let mut batch = Batch::new_with_statements(BatchType::Unlogged, statements);
    batch.set_is_idempotent(true);
    batch
}

/// How rows are written.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Rows per UNLOGGED batch (1 = single writes).
    pub batch_rows_max: usize,
    /// How long transient failures retry.
    pub retries: Retries,
}

/// Writes `rows` (placed, on their owner core) and returns each with its outcome, in no
/// particular order. Records write latency per batch and rows written in `metrics`.
pub async fn write_rows<R, S: Statements<R>>(
    session: &Session,
    statements: &S,
    rows: Vec<(ReplicaShard, R)>,
    options: WriteOptions,
    metrics: &RowMetrics,
) -> Vec<(R, Result<(), WriteError>)> {
    let total = rows.len();
    let chunks = batches_by_replica_shard(rows, options.batch_rows_max);
    let writes = chunks.into_iter().map(|(replica_shard, chunk)| async move {
        let replica = metrics.database_batch(replica_shard, chunk.len());
        let in_flight = InFlight::new(&replica.in_flight);
        let started = Instant::now();
        let outcomes = write_chunk(session, statements, chunk, options).await;
        let elapsed = started.elapsed().as_secs_f64();
        drop(in_flight);
        metrics.write_latency.record(elapsed);
        replica.latency.record(elapsed);
        metrics
            .written
            .increment(outcomes.iter().filter(|(_, outcome)| outcome.is_ok()).count() as u64);
        outcomes
    });
    let mut outcomes = Vec::with_capacity(total);
    outcomes.extend(futures::future::join_all(writes).await.into_iter().flatten());
    outcomes
}

/// One write counted in a (replica, shard)'s in-flight gauge until dropped (answered, or its
/// future dropped at shutdown).
struct InFlight<'g>(&'g metrics::Gauge);

impl<'g> InFlight<'g> {
    fn new(gauge: &'g metrics::Gauge) -> InFlight<'g> {
        gauge.increment(1.0);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// One chunk: a single row as a plain write, several as one UNLOGGED batch; a batch refused for
/// good is retried row by row so each row gets its own outcome.
async fn write_chunk<R, S: Statements<R>>(
    session: &Session,
    statements: &S,
    chunk: Vec<R>,
    options: WriteOptions,
) -> Vec<(R, Result<(), WriteError>)> {
    let retries = options.retries;
    let bound: Vec<_> = chunk
        .iter()
        .map(|row| (statements.statement(row), statements.values(row)))
        .collect();
    let uniform = match bound.as_slice() {
        [(first, _), rest @ ..] if rest.iter().all(|(statement, _)| std::ptr::eq(*statement, *first)) => {
            first.full_batch(bound.len(), options.batch_rows_max)
        }
        _ => None,
    };
    let outcome = write_statements_once(session, &bound, uniform, retries)
        .await
        .map_err(|error| WriteError::of(&error));
    drop(bound);
    match outcome {
        Err(WriteError::Refused(_)) if chunk.len() > 1 => {
            let singles = chunk.into_iter().map(|row| async move {
                let bound = [(statements.statement(&row), statements.values(&row))];
                let outcome = write_statements_once(session, &bound, None, retries)
                    .await
                    .map_err(|error| WriteError::of(&error));
                (row, outcome)
            });
            futures::future::join_all(singles).await
        }
        outcome => chunk.into_iter().map(|row| (row, outcome.clone())).collect(),
    }
}

/// Writes rows, each with its own prepared statement: a single row as a plain write, several as
/// one UNLOGGED batch (callers group rows of one replica and shard; `uniform` is that batch
/// made already, when every row has the same statement and the chunk is full), retrying per
/// `retries`.
async fn write_statements_once<V: BoundValues>(
    session: &Session,
    rows: &[(&WriteStatement, &V)],
    uniform: Option<&Batch>,
    retries: Retries,
) -> Result<(), ExecutionError> {
    if let [(statement, row)] = rows {
        return execute_with_retries(retries, || session.execute_unpaged(statement.prepared(), row))
            .await
            .map(|_| ());
    }
    let values: Vec<&V> = rows.iter().map(|(_, values)| *values).collect();
    if let Some(batch) = uniform {
        return execute_with_retries(retries, || session.batch(batch, &values))
            .await
            .map(|_| ());
    }
    // Sized once: a `BatchStatement` is a whole `PreparedStatement` (136 bytes), and growing
    // the list by appends moved them up to six times per 64-row batch (1.1 % of a Kafka profile's samples).
    let statements = rows
        .iter()
        .map(|(statement, _)| BatchStatement::PreparedStatement(statement.prepared().clone()))
        .collect();
    let batch = unlogged_batch(statements);
    execute_with_retries(retries, || session.batch(&batch, &values))
        .await
        .map(|_| ())
}

/// Where a bound row goes: its token ([`row_token`]) placed on the ring snapshot. `None` when
/// the token cannot be computed.
pub fn place_row(statement: &PreparedStatement, values: &impl BoundValues, ownership: &Ownership) -> Option<Placement> {
    row_token(statement, values).map(|token| ownership.place(token))
}

/// The token of a bound row, from its partition-key values alone: each serialized (by the
/// driver's `SerializeValue`, unless bound serialized already), combined and hashed by
/// [`PartitionKeyHasher`] with the statement's partitioner (Murmur3, or ScyllaDB's CDC
/// partitioner) — the token `PreparedStatement::calculate_token` gives, without serializing
/// the whole row first
/// (it did, once more than the write itself: ~3 % of the Kafka path's CPU). `None` for a
/// statement that is not token-aware, or when a key value is unset, null or does not fit its
/// type (the driver would hash the other key values; such a row is refused by the database
/// either way, and stays on the core that mapped it). Checked against the driver's
/// `calculate_token` by the `row_tokens_match_the_driver` integration test.
pub fn row_token(statement: &PreparedStatement, values: &impl BoundValues) -> Option<i64> {
    if !statement.is_token_aware() {
        return None;
    }
    let specs = statement.get_variable_col_specs();
    let key = statement.get_variable_pk_indexes();
    if key.is_empty() {
        return None;
    }
    let mut hasher = PartitionKeyHasher::new(statement.get_partitioner_name().build_hasher(), key.len());
    let mut cell = Vec::with_capacity(64);
    for sequence in 0..key.len() {
        let index = usize::from(key.iter().find(|i| usize::from(i.sequence) == sequence)?.index);
        hasher.component(values.key_cell(index, specs.get_by_index(index)?.typ(), &mut cell)?)?;
    }
    Some(hasher.finish())
}

/// The owner core and the (replica, shard) of a row placed by [`place_row`]; a row whose token
/// cannot be computed stays on `here` with no replica.
pub fn owner_of(placement: Option<Placement>, here: usize) -> (usize, ReplicaShard) {
    placement.map_or((here, (None, 0)), |p| (p.core, p.replica_shard()))
}

/// Groups rows by their (replica, shard) and cuts each group into batches of at most
/// `rows_max` rows: the only rows that may share an UNLOGGED batch. The rows are sorted by
/// (replica, shard) in place, keeping their order within one (a stable sort, one pass over
/// rows that share one, as on a single node), and each batch is allocated once at its size:
/// every row is moved once more, where growing a vector per group by pushes moved each one
/// several times.
pub fn batches_by_replica_shard<T>(rows: Vec<(ReplicaShard, T)>, rows_max: usize) -> Vec<(ReplicaShard, Vec<T>)> {
    let rows_max = rows_max.max(1);
    let mut rows = rows;
    rows.sort_by_key(|&(key, _)| key);
    let runs: Vec<(ReplicaShard, usize)> = rows
        .chunk_by(|a, b| a.0 == b.0)
        .map(|run| (run[0].0, run.len()))
        .collect();
    let mut batches = Vec::with_capacity(runs.iter().map(|&(_, len)| len.div_ceil(rows_max)).sum());
    let mut rows = rows.into_iter().map(|(_, row)| row);
    for (key, len) in runs {
        let mut left = len;
        while left > 0 {
            let take = left.min(rows_max);
            let mut batch = Vec::with_capacity(take);
            batch.extend(rows.by_ref().take(take));
            left -= take;
            batches.push((key, batch));
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    #[test]
    fn batches_hold_one_replica_shard_and_at_most_rows_max() {
        let rows = (0..10)
            .map(|i| (if i % 2 == 0 { (Some(0), 1) } else { (None, 0) }, i))
            .collect();
        let mut batches = super::batches_by_replica_shard(rows, 3);
        batches.sort();
        let odd = (None, 0);
        let even = (Some(0), 1);
        assert_eq!(
            batches,
            vec![
                (odd, vec![1, 3, 5]),
                (odd, vec![7, 9]),
                (even, vec![0, 2, 4]),
                (even, vec![6, 8])
            ]
        );
    }
}
