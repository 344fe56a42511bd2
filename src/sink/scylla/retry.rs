//! Retrying a write: which driver errors are worth another attempt ([`classify`]), how long to
//! keep trying ([`Retries`]), and the loop with capped exponential backoff
//! ([`execute_with_retries`]). Runs on the core that writes (tokio timers: the island's handle
//! is entered on every core) and in `shardgate replay`.

use std::time::Duration;

use scylla::errors::{DbError, ExecutionError, PrepareError, RequestAttemptError};

/// First retry delay of a transiently failed write.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(25);
/// Longest delay between retries of one write.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Outcome of a write that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFailure {
    /// The cluster refused the statement or its values: retrying cannot help.
    Permanent(String),
    /// Worth retrying: timeouts, unavailable replicas, overload, lost connections.
    Transient(String),
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

/// Whether the node does not know a statement's table yet, when preparing it or running it: it
/// refused the statement as invalid (a table whose schema it has not applied), or Cassandra failed
/// it with `Unknown CF` (for a moment after a table's schema row is applied, before its store is
/// open).
pub fn table_not_known_yet(error: &ExecutionError) -> bool {
    let attempt = match error {
        ExecutionError::LastAttemptError(attempt) => attempt,
        ExecutionError::PrepareError(PrepareError::AllAttemptsFailed { first_attempt }) => first_attempt,
        _ => return false,
    };
    match attempt {
        RequestAttemptError::DbError(DbError::Invalid, _) => true,
        RequestAttemptError::DbError(DbError::ServerError, message) => message.contains("Unknown CF"),
        _ => false,
    }
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

/// This core's "write failed, retrying" lines, in the core's context (`runtime::context`).
#[derive(Default)]
struct RetryLog(crate::telemetry::LogEvery);

fn log_retry(attempts: u32, reason: &dyn std::fmt::Display) {
    let log = crate::runtime::context::state::<RetryLog>();
    if let Some(retries_since_last_line) = log.0.due(RETRY_LOG_INTERVAL) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_with(error: DbError, message: &str) -> ExecutionError {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(error, message.to_string()))
    }

    #[test]
    fn a_table_the_node_has_not_opened_yet_is_not_known_yet() {
        assert!(table_not_known_yet(&failed_with(
            DbError::Invalid,
            "unconfigured table job_windows"
        )));
        assert!(table_not_known_yet(&failed_with(
            DbError::ServerError,
            "java.lang.IllegalArgumentException: Unknown CF 75736400-f209-11f1-ba44-4de12c8308b8"
        )));
        assert!(!table_not_known_yet(&failed_with(
            DbError::ServerError,
            "java.lang.NullPointerException"
        )));
        assert!(!table_not_known_yet(&failed_with(DbError::Overloaded, "overloaded")));
    }
}
