//! The closed set of dead-letter reason codes: the `shardgate.reason.code` header, the
//! `reason_code` column of a dead-letter table and the `code` label of
//! `shardgate_rows_failed_total`. Each code's description is the user documentation
//! (`deploy/reference/reason-codes.md` is generated from it). Pure; used on every core.

/// Why a message went to the dead-letter destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// A message without payload (Kafka tombstone) on a route that does not delete on them.
    EmptyPayload,
    /// A `json` route's payload is not JSON.
    NotJson,
    /// A `json` route's payload is JSON but not an object.
    NotObject,
    /// A `protobuf` route's payload is not a message of its type.
    NotProtobuf,
    /// A `flatbuffers` route's payload does not verify against its schema.
    NotFlatBuffer,
    /// A primary-key column is mapped from `$key` and the message has no key, or the key is
    /// not UTF-8 / not a JSON object where `$key.<path>` needs one.
    BadKey,
    /// A primary-key column's field is missing or null.
    MissingKeyColumn,
    /// A value does not fit its column's CQL type.
    BadValue,
    /// A CEL filter, condition or computed column failed to evaluate.
    ExpressionFailed,
    /// `table_from` names none of the route's tables.
    UnknownTable,
    /// The `ttl` or `timestamp` field holds something that cannot be one.
    BadAttribute,
    /// The database refused the write for a permanent reason.
    WriteRejected,
    /// A stream job's row arrived after every window holding it had closed.
    Late,
}

impl ReasonCode {
    /// Every code, in documentation order.
    pub const ALL: [ReasonCode; 13] = [
        ReasonCode::NotJson,
        ReasonCode::NotObject,
        ReasonCode::NotProtobuf,
        ReasonCode::NotFlatBuffer,
        ReasonCode::EmptyPayload,
        ReasonCode::BadKey,
        ReasonCode::MissingKeyColumn,
        ReasonCode::BadValue,
        ReasonCode::BadAttribute,
        ReasonCode::ExpressionFailed,
        ReasonCode::UnknownTable,
        ReasonCode::WriteRejected,
        ReasonCode::Late,
    ];

    /// The stable code as it appears in headers, columns and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::EmptyPayload => "empty_payload",
            ReasonCode::NotJson => "not_json",
            ReasonCode::NotObject => "not_object",
            ReasonCode::NotProtobuf => "not_protobuf",
            ReasonCode::NotFlatBuffer => "not_flatbuffer",
            ReasonCode::BadKey => "bad_key",
            ReasonCode::MissingKeyColumn => "missing_key_column",
            ReasonCode::BadValue => "bad_value",
            ReasonCode::ExpressionFailed => "expression_failed",
            ReasonCode::UnknownTable => "unknown_table",
            ReasonCode::BadAttribute => "bad_attribute",
            ReasonCode::WriteRejected => "write_rejected",
            ReasonCode::Late => "late",
        }
    }

    /// When a message gets this code, and what to do about it.
    pub fn description(self) -> &'static str {
        match self {
            ReasonCode::EmptyPayload => {
                "The message has no payload (a Kafka tombstone) and the route has `delete_on_tombstone = false`, or no target's primary key can be read without the payload."
            }
            ReasonCode::NotJson => "A `format = \"json\"` route got a payload that is not valid JSON; the reason quotes the parser's error.",
            ReasonCode::NotObject => "A `format = \"json\"` route got valid JSON that is not an object (an array, a string, a number).",
            ReasonCode::NotProtobuf => "A `format = \"protobuf\"` route got bytes that do not decode as the configured message type.",
            ReasonCode::NotFlatBuffer => "A `format = \"flatbuffers\"` route got a buffer that does not verify against the configured binary schema.",
            ReasonCode::BadKey => {
                "A primary-key column is mapped from `$key` and the message has no key; or the key is not UTF-8 text (`$key`) or not a JSON object (`$key.<path>`). A regular column mapped from an absent key is left unset instead."
            }
            ReasonCode::MissingKeyColumn => "A primary-key column's field is missing or null in the message.",
            ReasonCode::BadValue => {
                "A value cannot become its column's CQL type; the reason names the column, the field, the expected form and the value (see *JSON forms per CQL type* in the configuration reference)."
            }
            ReasonCode::BadAttribute => "The route's `ttl` or `timestamp` field holds a value that is not a valid TTL or write time.",
            ReasonCode::ExpressionFailed => "A CEL `filter`, `delete_when`, `when` or computed column failed to evaluate (for example a missing field or a type error).",
            ReasonCode::UnknownTable => "The `table_from` field names a table that is none of the route's targets.",
            ReasonCode::WriteRejected => {
                "The database refused the row for a permanent reason (for example an invalid value it checks itself); transient failures are retried, never dead-lettered."
            }
            ReasonCode::Late => {
                "A stream job's row whose every window had already closed: its event time is further behind the largest one seen than the window's `lateness` allows. The job dead-letters the message and does not count it; the route still writes it."
            }
        }
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in ReasonCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert!(code.as_str().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert!(!code.description().is_empty());
        }
    }
}
