//! The ScyllaDB / Cassandra sink: one driver `Session` (built on the island, shared by every
//! core), schema lookup at start-up, prepared inserts, and the write-with-retry loop.
//!
//! Threads: `connect`, `table_schema` and `prepare_insert` run on the island at start-up;
//! [`write_with_retry`] runs on the core that owns the row (serialization and response parsing
//! happen there; the connection's socket task lives on the island).
//!
//! Contract: a write is a success only when the cluster confirms it at the configured
//! consistency; transient failures (timeouts, unavailable, overloaded, lost connections) retry
//! with capped exponential backoff, never counting as success; permanent failures (the server
//! rejects the statement or value) are returned for dead-lettering.

use std::collections::HashMap;
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, MaybeUnset};

use crate::config::ClusterConfig;
use crate::mapping::{RowValues, SchemaError, TableSchema};
use crate::topology::{Ownership, Placement, ReplicaShard};

/// First retry delay of a transiently failed write.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(25);
/// Longest delay between retries of one write.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long start-up waits for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors at start-up: connecting, reading the schema, preparing.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// No contact point answered.
    #[error("cannot connect to the cluster at {contact_points}: {reason}")]
    Connect {
        /// Configured contact points.
        contact_points: String,
        /// Driver's error.
        reason: String,
    },
    /// The route does not fit the table.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The insert statement could not be prepared.
    #[error("cannot prepare `{statement}`: {reason}")]
    Prepare {
        /// The CQL text.
        statement: String,
        /// Driver's error.
        reason: String,
    },
}

/// Outcome of a write that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFailure {
    /// The cluster refused the statement or its values: retrying cannot help.
    Permanent(String),
    /// Worth retrying: timeouts, unavailable replicas, overload, lost connections.
    Transient(String),
}

/// Connects the session. Run on the island.
pub async fn connect(cluster: &ClusterConfig) -> Result<Session, SinkError> {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &cluster.local_datacenter {
        // Failover stays permitted: with it off, a SimpleStrategy keyspace (common in tests and
        // single-DC clusters) makes the driver warn on every request. LOCAL_* consistency still
        // keeps writes in the local data center.
        policy = policy.prefer_datacenter(dc.clone()).permit_dc_failover(true);
    }
    let profile = ExecutionProfile::builder()
        .consistency(cluster.consistency)
        .request_timeout(Some(cluster.request_timeout))
        .load_balancing_policy(policy.build())
        .build();
    let builder = SessionBuilder::new()
        .known_nodes(&cluster.contact_points)
        .default_execution_profile_handle(profile.into_handle());
    let build = builder.build();
    let connect_error = |reason: String| SinkError::Connect {
        contact_points: cluster.contact_points.join(", "),
        reason,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, build).await {
        Ok(Ok(session)) => Ok(session),
        Ok(Err(e)) => Err(connect_error(e.to_string())),
        Err(_) => Err(connect_error(format!(
            "no answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// Reads a table's schema from the session's cluster state, refreshing it once if missing.
pub async fn table_schema(
    session: &Session,
    route: &str,
    keyspace: &str,
    table: &str,
) -> Result<TableSchema, SinkError> {
    let lookup = |session: &Session| {
        let state = session.get_cluster_state();
        state
            .get_keyspace(keyspace)
            .and_then(|k| k.tables.get(table))
            .map(TableSchema::from_driver)
    };
    if let Some(schema) = lookup(session) {
        return Ok(schema);
    }
    // A table created moments ago may not be in the cached metadata yet.
    if let Err(e) = session.refresh_metadata().await {
        tracing::warn!(error = %e, "schema refresh failed");
    }
    lookup(session).ok_or_else(|| {
        SinkError::Schema(SchemaError::TableNotFound {
            route: route.to_string(),
            keyspace: keyspace.to_string(),
            table: table.to_string(),
        })
    })
}

/// Prepares an insert. Writes carry explicit timestamps, so they are marked idempotent and the
/// driver may retry them.
pub async fn prepare_insert(session: &Session, statement: &str) -> Result<PreparedStatement, SinkError> {
    let mut prepared = session.prepare(statement).await.map_err(|e| SinkError::Prepare {
        statement: statement.to_string(),
        reason: e.to_string(),
    })?;
    prepared.set_is_idempotent(true);
    Ok(prepared)
}

/// Sorts a driver error into permanent or transient.
pub fn classify(error: &ExecutionError) -> WriteFailure {
    let permanent = match error {
        ExecutionError::BadQuery(_) | ExecutionError::PrepareError(_) => true,
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::SerializationError(_) | RequestAttemptError::CqlRequestSerialization(_) => true,
            RequestAttemptError::DbError(db, _) => matches!(
                db,
                DbError::Invalid
                    | DbError::SyntaxError
                    | DbError::Unauthorized
                    | DbError::ConfigError
                    | DbError::AlreadyExists { .. }
                    | DbError::FunctionFailure { .. }
            ),
            _ => false,
        },
        _ => false,
    };
    if permanent {
        WriteFailure::Permanent(error.to_string())
    } else {
        WriteFailure::Transient(error.to_string())
    }
}

/// Appends the write timestamp (microseconds) as the last bound value.
pub fn with_timestamp(mut values: RowValues, timestamp_us: i64) -> RowValues {
    values.push(MaybeUnset::Set(Some(CqlValue::BigInt(timestamp_us))));
    values
}

/// `INSERT INTO "keyspace"."table" ("c1", ...) VALUES (?, ...) USING TIMESTAMP ?`: identifiers
/// quoted (embedded quotes doubled), every value bound, the write timestamp bound last.
pub fn insert_statement<'a>(keyspace: &str, table: &str, columns: impl IntoIterator<Item = &'a str>) -> String {
    let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let names: Vec<String> = columns.into_iter().map(quote).collect();
    let markers = vec!["?"; names.len()].join(", ");
    format!(
        "INSERT INTO {}.{} ({}) VALUES ({markers}) USING TIMESTAMP ?",
        quote(keyspace),
        quote(table),
        names.join(", ")
    )
}

/// `DELETE FROM "keyspace"."table" USING TIMESTAMP ? WHERE "k1" = ? AND ...`: the write
/// timestamp bound first, then the primary key columns.
pub fn delete_statement<'a>(keyspace: &str, table: &str, key_columns: impl IntoIterator<Item = &'a str>) -> String {
    let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let conditions: Vec<String> = key_columns.into_iter().map(|c| format!("{} = ?", quote(c))).collect();
    format!(
        "DELETE FROM {}.{} USING TIMESTAMP ? WHERE {}",
        quote(keyspace),
        quote(table),
        conditions.join(" AND ")
    )
}

/// How long a write keeps retrying transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retries {
    /// Until it succeeds or fails permanently (sources that can wait: the message stays unacked).
    Forever,
    /// At most this many attempts (producers that get a retryable answer instead).
    UpTo(u32),
}

/// Interval between two "write failed, retrying" lines of one thread: an outage fails every
/// in-flight write, and one line per write would flood the log.
const RETRY_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

thread_local! {
    /// This thread's "write failed, retrying" lines.
    static RETRY_LOG: crate::telemetry::LogEvery = const { crate::telemetry::LogEvery::new() };
}

fn log_retry(attempts: u32, reason: &dyn std::fmt::Display) {
    if let Some(retries_since_last_line) = RETRY_LOG.with(|log| log.due(RETRY_LOG_INTERVAL)) {
        tracing::warn!(attempts, %reason, retries_since_last_line, "write failed, retrying");
    }
}

/// Runs `request`, retrying transient failures ([`classify`]) with capped exponential backoff.
/// Returns the first permanent error, or the last transient one once attempts run out. Runs on
/// a core executor with the island entered (tokio timers; the future stays `Send` for tonic).
pub async fn execute_with_retries<F, Fut, T>(retries: Retries, mut request: F) -> Result<T, ExecutionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ExecutionError>>,
{
    let mut backoff = RETRY_BACKOFF_MIN;
    let mut attempts: u32 = 0;
    loop {
        attempts = attempts.saturating_add(1);
        let error = match request().await {
            Ok(result) => return Ok(result),
            Err(error) => error,
        };
        let exhausted = matches!(retries, Retries::UpTo(max) if attempts >= max);
        match classify(&error) {
            WriteFailure::Permanent(_) => return Err(error),
            WriteFailure::Transient(_) if exhausted => return Err(error),
            WriteFailure::Transient(reason) => {
                log_retry(attempts, &reason);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            }
        }
    }
}

/// Writes rows of one prepared insert: a single row as a plain write, several as one UNLOGGED
/// batch (callers only group rows of one replica and shard), retrying per `retries`.
pub async fn write_rows_once(
    session: &Session,
    insert: &PreparedStatement,
    rows: &[&RowValues],
    retries: Retries,
) -> Result<(), ExecutionError> {
    let statements: Vec<(&PreparedStatement, &RowValues)> = rows.iter().map(|row| (insert, *row)).collect();
    write_statements_once(session, &statements, retries).await
}

/// Like [`write_rows_once`], each row with its own prepared statement (upserts and deletes of
/// several tables in one UNLOGGED batch).
pub async fn write_statements_once(
    session: &Session,
    rows: &[(&PreparedStatement, &RowValues)],
    retries: Retries,
) -> Result<(), ExecutionError> {
    if let [(statement, row)] = rows {
        return execute_with_retries(retries, || session.execute_unpaged(statement, row))
            .await
            .map(|_| ());
    }
    let mut batch = Batch::new(BatchType::Unlogged);
    for (statement, _) in rows {
        batch.append_statement((*statement).clone());
    }
    batch.set_is_idempotent(true);
    let values: Vec<&RowValues> = rows.iter().map(|(_, values)| *values).collect();
    execute_with_retries(retries, || session.batch(&batch, &values))
        .await
        .map(|_| ())
}

/// Where a bound row goes: its token from the driver (through the prepared statement), placed
/// on the ring snapshot. `None` when the driver cannot compute the token.
pub fn place_row(insert: &PreparedStatement, values: &RowValues, ownership: &Ownership) -> Option<Placement> {
    insert
        .calculate_token(values)
        .ok()
        .flatten()
        .map(|token| ownership.place(token.value()))
}

/// Groups rows by their (replica, shard) and cuts each group into batches of at most
/// `rows_max` rows: the only rows that may share an UNLOGGED batch.
pub fn batches_by_replica_shard<T>(rows: impl IntoIterator<Item = (ReplicaShard, T)>, rows_max: usize) -> Vec<Vec<T>> {
    let mut groups: HashMap<ReplicaShard, Vec<T>> = HashMap::new();
    for (key, row) in rows {
        groups.entry(key).or_default().push(row);
    }
    let mut batches = Vec::new();
    for (_, mut group) in groups {
        while !group.is_empty() {
            let rest = group.split_off(group.len().min(rows_max.max(1)));
            batches.push(std::mem::replace(&mut group, rest));
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    #[test]
    fn batches_hold_one_replica_shard_and_at_most_rows_max() {
        let rows = (0..10).map(|i| (if i % 2 == 0 { (Some(0), 1) } else { (None, 0) }, i));
        let mut batches = super::batches_by_replica_shard(rows, 3);
        batches.sort();
        assert_eq!(batches, vec![vec![0, 2, 4], vec![1, 3, 5], vec![6, 8], vec![7, 9]]);
    }

    #[test]
    fn insert_statement_quotes_identifiers_and_binds_the_timestamp() {
        assert_eq!(
            super::insert_statement("ks", "t", ["a", "b\"c"]),
            "INSERT INTO \"ks\".\"t\" (\"a\", \"b\"\"c\") VALUES (?, ?) USING TIMESTAMP ?"
        );
    }
}
