//! Errors of mapping: a route that does not fit its tables (found at start-up) and a message that
//! cannot become rows (dead-lettered with its reason code). Data only.

use super::reason::ReasonCode;

/// A route that does not fit its table; found at start-up, before any message is read.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A mapped column does not exist in the table.
    #[error("route `{route}`: table `{table}` has no column `{column}`; its columns are {available}")]
    ColumnNotFound {
        /// Route name.
        route: String,
        /// `keyspace.table`.
        table: String,
        /// The configured column.
        column: String,
        /// The table's columns, for the operator.
        available: String,
    },
    /// A partition or clustering key column has no mapping, so no row could ever be written.
    #[error("route `{route}`: primary key column `{column}` of `{table}` has no mapping in `[route.columns]`")]
    PrimaryKeyUnmapped {
        /// Route name.
        route: String,
        /// `keyspace.table`.
        table: String,
        /// The unmapped key column.
        column: String,
    },
    /// The format's schema could not be loaded (Protobuf descriptors).
    #[error("route `{route}`: {reason}")]
    Format {
        /// Route name.
        route: String,
        /// What is wrong, naming the config key.
        reason: String,
    },
    /// A computed column, filter or condition does not compile (checked at config time too).
    #[error("route `{route}`: {key}: {reason}")]
    Expression {
        /// Route name.
        route: String,
        /// Where it is configured.
        key: String,
        /// The parser's message.
        reason: String,
    },
    /// `table_from` needs more than one target to choose from, all in one keyspace or named
    /// fully.
    #[error("route `{route}`: {reason}")]
    Targets {
        /// Route name.
        route: String,
        /// What is wrong.
        reason: String,
    },
    /// The column's type cannot be written by this route.
    #[error("route `{route}`: column `{column}` has type {typ}, which routes cannot write")]
    UnsupportedColumn {
        /// Route name.
        route: String,
        /// Column name.
        column: String,
        /// Its CQL type, debug-printed.
        typ: String,
    },
}

/// Why one message could not become rows. The message goes to the dead-letter destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// The message has no payload (a Kafka tombstone) and the route does not delete on them.
    #[error("message has no payload (tombstone) and `delete_on_tombstone` is off for this route")]
    EmptyPayload,
    /// The payload is not valid JSON.
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    /// The payload is JSON but not an object.
    #[error("payload is JSON but not an object")]
    NotObject,
    /// The payload is not a message of the route's Protobuf type.
    #[error("payload is not a valid Protobuf message {0}")]
    NotProtobuf(String),
    /// The payload does not verify against the route's FlatBuffers schema.
    #[error("payload is not a valid FlatBuffers {0}")]
    NotFlatBuffer(String),
    /// A primary-key column is mapped from `$key` but the message has no key.
    #[error("primary key column `{column}` is mapped from `$key` but the message has no key")]
    KeyAbsent {
        /// The column fed by the key.
        column: String,
    },
    /// The message key is not UTF-8 text, or not a JSON object for `$key.<path>`.
    #[error("column `{column}` is mapped from `{field}` but the key is not {expected}")]
    KeyNotText {
        /// The column fed by the key.
        column: String,
        /// The reference.
        field: String,
        /// What the key should be.
        expected: &'static str,
    },
    /// A primary-key column's field is absent or null.
    #[error("primary key column `{column}` has no value: field `{field}` is missing or null")]
    MissingPrimaryKey {
        /// The key column.
        column: String,
        /// The field it is mapped from.
        field: String,
    },
    /// A value does not fit its column's type.
    #[error("column `{column}` (field `{field}`): {reason}")]
    BadValue {
        /// The column.
        column: String,
        /// The field it is mapped from.
        field: String,
        /// Why it does not fit.
        reason: String,
    },
    /// A filter, condition or computed column failed to evaluate.
    #[error("{key} `{source_text}` failed: {reason}")]
    Expression {
        /// Which expression (`filter`, `delete_when`, `target[0].when`, `columns.total`).
        key: String,
        /// Its source.
        source_text: String,
        /// The evaluation error.
        reason: String,
    },
    /// `table_from` names no target of the route.
    #[error("`table_from` ({field}) is `{value}`, which is none of this route's tables: {tables}")]
    UnknownTable {
        /// The field.
        field: String,
        /// Its value in this message.
        value: String,
        /// The route's tables.
        tables: String,
    },
    /// The write time or TTL field has a value that cannot be one.
    #[error("`{key}` (field `{field}`): {reason}")]
    BadAttribute {
        /// `timestamp` or `ttl`.
        key: &'static str,
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
}

impl MappingError {
    /// Stable reason code for dead-letter headers and metrics labels.
    pub fn code(&self) -> ReasonCode {
        match self {
            MappingError::EmptyPayload => ReasonCode::EmptyPayload,
            MappingError::NotJson(_) => ReasonCode::NotJson,
            MappingError::NotObject => ReasonCode::NotObject,
            MappingError::NotProtobuf(_) => ReasonCode::NotProtobuf,
            MappingError::NotFlatBuffer(_) => ReasonCode::NotFlatBuffer,
            MappingError::KeyAbsent { .. } | MappingError::KeyNotText { .. } => ReasonCode::BadKey,
            MappingError::MissingPrimaryKey { .. } => ReasonCode::MissingKeyColumn,
            MappingError::BadValue { .. } => ReasonCode::BadValue,
            MappingError::Expression { .. } => ReasonCode::ExpressionFailed,
            MappingError::UnknownTable { .. } => ReasonCode::UnknownTable,
            MappingError::BadAttribute { .. } => ReasonCode::BadAttribute,
        }
    }
}
