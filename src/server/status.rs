//! The one place ingest error codes become gRPC statuses, and the documentation of each code
//! (`deploy/reference/reason-codes.md` is generated from [`describe`]). Per-row outcomes travel
//! inside `WriteResponse` / `WriteStreamResponse` (the request itself succeeded); a status is
//! used when a unary request as a whole fails. Every status built here starts its message with
//! the code and carries it in the `shardgate-error-code` metadata.

use tonic::{Code, Status};

use crate::wire::proto::{BatchError, ErrorCode, RowError};

/// Metadata key of the error code on a status built here.
pub const ERROR_CODE_METADATA: &str = "shardgate-error-code";

/// Every code a client may see, in documentation order.
pub const ALL_CODES: [ErrorCode; 17] = [
    ErrorCode::BadValue,
    ErrorCode::MissingKey,
    ErrorCode::UnknownTable,
    ErrorCode::UnknownColumn,
    ErrorCode::DuplicateColumn,
    ErrorCode::TooLarge,
    ErrorCode::Malformed,
    ErrorCode::NoSpool,
    ErrorCode::Overloaded,
    ErrorCode::Unavailable,
    ErrorCode::Rejected,
    ErrorCode::BadQuery,
    ErrorCode::ReadOnly,
    ErrorCode::BadPageToken,
    ErrorCode::Timeout,
    ErrorCode::Unauthenticated,
    ErrorCode::Forbidden,
];

/// gRPC statuses the ingest API answers without one of its codes.
pub const OTHER_STATUSES: &[(Code, &str)] = &[
    (
        Code::Unimplemented,
        "an RPC this gateway does not serve (check the client's proto against `proto/shardgate/v1/ingest.proto`)",
    ),
    (
        Code::Unavailable,
        "the gateway is shutting down (`gateway is shutting down`), or a core stopped while holding the batch; retry on another gateway",
    ),
];

/// The gRPC code for an ingest error code.
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::BadValue
        | ErrorCode::UnknownColumn
        | ErrorCode::MissingKey
        | ErrorCode::DuplicateColumn
        | ErrorCode::Malformed
        | ErrorCode::BadQuery
        | ErrorCode::BadPageToken => Code::InvalidArgument,
        ErrorCode::ReadOnly | ErrorCode::Forbidden => Code::PermissionDenied,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::Timeout => Code::DeadlineExceeded,
        ErrorCode::UnknownTable => Code::NotFound,
        ErrorCode::Overloaded => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::TooLarge => Code::OutOfRange,
        ErrorCode::Rejected | ErrorCode::NoSpool => Code::FailedPrecondition,
        ErrorCode::Unspecified => Code::Unknown,
    }
}

/// What the reference says of one code.
#[derive(Debug, Clone, Copy)]
pub struct CodeDoc {
    /// `row`, `batch` or both.
    pub scope: &'static str,
    /// When the gateway answers it.
    pub when: &'static str,
    /// Whether and how to retry.
    pub retry: &'static str,
}

/// The documentation of `code`.
pub fn describe(code: ErrorCode) -> CodeDoc {
    let (scope, when, retry) = match code {
        ErrorCode::BadValue => (
            "row",
            "a value does not fit its column: the reason names the column and its CQL type, as in column `qty` (int): ...",
            "no: fix the row",
        ),
        ErrorCode::MissingKey => (
            "row, batch",
            "row: a primary-key column is null or has no value; batch: a primary-key column is not among the batch's `columns`",
            "no",
        ),
        ErrorCode::UnknownTable => (
            "batch",
            "`table` does not exist (or is not `keyspace.table`)",
            "after creating the table",
        ),
        ErrorCode::UnknownColumn => (
            "batch",
            "a name in `columns` is not a column of the table; the reason lists the table's columns",
            "no: fix `columns`",
        ),
        ErrorCode::DuplicateColumn => ("batch", "`columns` names one column twice", "no: fix `columns`"),
        ErrorCode::TooLarge => (
            "batch",
            "the request message is over `ingest.message_bytes_max` (the reason gives both sizes), or the batch has more than 10000 rows",
            "no: split the batch",
        ),
        ErrorCode::Malformed => (
            "row, batch",
            "the request is not valid protobuf, a FlatBuffers batch fails verification, or a stream message has neither `batch` nor `flat_batch`; as a row error, that row's protobuf bytes do not decode (the rest of the batch is written)",
            "no",
        ),
        ErrorCode::NoSpool => (
            "batch",
            "`ACK_MODE_SPOOLED` asked of a gateway without `runtime.spool_dir`",
            "with `ACK_MODE_WRITTEN`, or after configuring a spool",
        ),
        ErrorCode::Overloaded => (
            "row, batch",
            "row: the database is overloaded after the gateway's retries; batch: the core's spool is full (`ACK_MODE_SPOOLED`)",
            "yes, with backoff",
        ),
        ErrorCode::Unavailable => (
            "row, batch",
            "row: the database could not reach enough replicas, or timed out, after the gateway's retries; batch: the spool could not be written",
            "yes, with backoff",
        ),
        ErrorCode::Rejected => (
            "row, batch",
            "the database refused the write (or, for a batch, refused to prepare the insert) for a permanent reason",
            "no",
        ),
        ErrorCode::BadQuery => (
            "request",
            "query API: the database refused the statement (CQL syntax, an invalid query such as a restriction that needs ALLOW FILTERING, binds of the wrong count or names), or a request field is out of range (`page_size` over `query.page_size_max`, a `where` without `table`)",
            "no: fix the request",
        ),
        ErrorCode::ReadOnly => (
            "request",
            "query API: `Execute` of a statement that is not a SELECT (decided from its prepared metadata) while `query.allow_writes` is false",
            "no",
        ),
        ErrorCode::BadPageToken => (
            "request",
            "query API: a `page_token` or `resume` token the gateway did not issue for this request — altered, from another statement, binds, table or split, or MAC'd with another `query.page_token_key_file`",
            "no: restart from the first page",
        ),
        ErrorCode::Timeout => (
            "request",
            "query API: the database timed out reading (the reason says whether data was present)",
            "yes, perhaps with a smaller `page_size`",
        ),
        ErrorCode::Unauthenticated => (
            "request",
            "`ingest.auth` is on and the call has no `authorization: Bearer <token>` header of a principal (nor a client certificate of one); the reason says which (no credentials, a header that is not `Bearer`, an unknown token) and never echoes it",
            "no: send a principal's token",
        ),
        ErrorCode::Forbidden => (
            "request, batch",
            "the caller's principal has no scope allowing the table (`write:`/`read:`), the job (`jobs:`) or the statement (`admin` for one that names no single table); the reason names the principal and the scope it lacks. In a `WriteStream` the batch is refused and the stream goes on",
            "no: grant the scope",
        ),
        ErrorCode::Unspecified => ("—", "never sent", "—"),
    };
    CodeDoc { scope, when, retry }
}

/// A status for `code` with `reason`: the code opens the message and rides in metadata.
pub fn status(code: ErrorCode, reason: impl Into<String>) -> Status {
    let mut status = Status::new(grpc_code(code), format!("{}: {}", code.as_str_name(), reason.into()));
    if let Ok(value) = code.as_str_name().parse() {
        status.metadata_mut().insert(ERROR_CODE_METADATA, value);
    }
    status
}

/// A status for a batch refused as a whole.
pub fn status_of_batch(error: &BatchError) -> Status {
    status(
        ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Unspecified),
        error.reason.clone(),
    )
}

/// A status for one row's error.
pub fn status_of_row(error: &RowError) -> Status {
    let code = ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Unspecified);
    status(code, format!("row {}: {}", error.row, error.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_codes_map_to_retryable_statuses() {
        assert_eq!(grpc_code(ErrorCode::Overloaded), Code::ResourceExhausted);
        assert_eq!(grpc_code(ErrorCode::Unavailable), Code::Unavailable);
        assert_eq!(grpc_code(ErrorCode::UnknownTable), Code::NotFound);
        let row = RowError {
            row: 3,
            code: ErrorCode::BadValue as i32,
            reason: "x".into(),
        };
        let status = status_of_row(&row);
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, "BAD_VALUE: row 3: x")
        );
        assert_eq!(
            status.metadata().get(ERROR_CODE_METADATA).and_then(|v| v.to_str().ok()),
            Some("BAD_VALUE")
        );
    }

    /// Every code the proto defines (but the unspecified one) is documented.
    #[test]
    fn every_code_is_listed() {
        for value in 1..64 {
            if let Ok(code) = ErrorCode::try_from(value) {
                assert!(ALL_CODES.contains(&code), "{code:?} is missing from ALL_CODES");
            }
        }
    }
}
