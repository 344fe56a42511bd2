//! The one place ingest error codes become gRPC statuses. Per-row outcomes travel inside
//! `WriteResponse` / `WriteStreamResponse` (the request itself succeeded); a status is used when
//! the request as a whole fails, and by callers that want to turn a row error into one.

use tonic::{Code, Status};

use super::proto::{ErrorCode, RowError};

/// The gRPC code for an ingest error code.
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::BadValue | ErrorCode::UnknownColumn | ErrorCode::MissingKey => Code::InvalidArgument,
        ErrorCode::UnknownTable => Code::NotFound,
        ErrorCode::Overloaded => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::TooLarge => Code::OutOfRange,
        ErrorCode::Rejected => Code::FailedPrecondition,
        ErrorCode::Unspecified => Code::Unknown,
    }
}

/// A status for `code` with `reason`.
pub fn status(code: ErrorCode, reason: impl Into<String>) -> Status {
    Status::new(grpc_code(code), reason)
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
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "row 3: x"));
    }
}
