//! Formats and field → column mapping.
//!
//! A [`RowMapper`] is built once per route at start-up from the route config and the table's
//! schema read from the cluster ([`RowMapper::new`] refuses unknown columns and unmapped primary
//! key columns). On the data plane it turns one message into the bound values of the route's
//! prepared insert, on the core that owns the message; it is pure and never panics on input.
//!
//! Value rules: a field that is absent leaves its column UNSET (a partial update, never a null
//! overwrite); JSON `null` writes a null; primary-key columns must be present and non-null.

pub mod coerce;

use std::collections::HashMap;

use scylla::cluster::metadata::{ColumnKind, ColumnType, NativeType, Table};
use scylla::value::{CqlValue, MaybeUnset};
use serde_json::Value;

use crate::config::{ColumnMapping, FieldRef, RouteConfig};

/// Bound values of one row, in the order of [`RowMapper::column_names`].
pub type RowValues = Vec<MaybeUnset<Option<CqlValue>>>;

/// A route that does not fit its table; found at start-up, before any message is read.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The keyspace or table does not exist in the cluster.
    #[error("route `{route}`: table `{keyspace}.{table}` does not exist in the cluster")]
    TableNotFound {
        /// Route name.
        route: String,
        /// Keyspace as configured.
        keyspace: String,
        /// Table as configured.
        table: String,
    },
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

/// Why one message could not become a row. The message goes to the dead-letter destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// The message has no payload (a Kafka tombstone); deletes are not mapped yet.
    #[error("message has no payload (tombstone); deletes are not supported by this route")]
    EmptyPayload,
    /// The payload is not valid JSON.
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    /// The payload is JSON but not an object.
    #[error("payload is JSON but not an object")]
    NotObject,
    /// `$key` is mapped but the message has no key.
    #[error("column `{column}` is mapped from `$key` but the message has no key")]
    KeyAbsent {
        /// The column fed by the key.
        column: String,
    },
    /// The message key is not UTF-8 text.
    #[error("column `{column}` is mapped from `$key` but the key is not UTF-8 text")]
    KeyNotText {
        /// The column fed by the key.
        column: String,
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
}

impl MappingError {
    /// Stable short code for dead-letter headers and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            MappingError::EmptyPayload => "empty_payload",
            MappingError::NotJson(_) => "not_json",
            MappingError::NotObject => "not_object",
            MappingError::KeyAbsent { .. } | MappingError::KeyNotText { .. } => "bad_key",
            MappingError::MissingPrimaryKey { .. } => "missing_key_column",
            MappingError::BadValue { .. } => "bad_value",
        }
    }
}

/// What the mapper needs of a table: column types and the primary key, copied from the
/// driver's schema metadata ([`TableSchema::from_driver`]).
#[derive(Debug, Clone, Default)]
pub struct TableSchema {
    /// Column name → (type, kind).
    pub columns: HashMap<String, (ColumnType<'static>, ColumnKind)>,
    /// Partition key columns in order.
    pub partition_key: Vec<String>,
    /// Clustering columns in order.
    pub clustering_key: Vec<String>,
}

impl TableSchema {
    /// Copies the parts of the driver's table metadata the mapper uses.
    pub fn from_driver(table: &Table) -> TableSchema {
        TableSchema {
            columns: table
                .columns
                .iter()
                .map(|(name, c)| (name.clone(), (c.typ.clone(), c.kind.clone())))
                .collect(),
            partition_key: table.partition_key.clone(),
            clustering_key: table.clustering_key.clone(),
        }
    }
}

/// One column of the route's insert statement.
#[derive(Debug, Clone)]
struct BoundColumn {
    name: String,
    typ: ColumnType<'static>,
    field: FieldRef,
    primary_key: bool,
}

/// Turns messages of one route into bound values for its prepared insert.
#[derive(Debug, Clone)]
pub struct RowMapper {
    columns: Vec<BoundColumn>,
}

impl RowMapper {
    /// Checks the route against the table schema and fixes the column order.
    pub fn new(route: &RouteConfig, table: &TableSchema) -> Result<RowMapper, SchemaError> {
        let table_name = format!("{}.{}", route.keyspace, route.table);
        let mappings: Vec<ColumnMapping> = if route.columns.is_empty() {
            let mut names: Vec<&String> = table.columns.keys().collect();
            names.sort();
            names
                .into_iter()
                .map(|name| ColumnMapping {
                    column: name.clone(),
                    field: FieldRef::Path(vec![name.clone()]),
                })
                .collect()
        } else {
            route.columns.clone()
        };
        let mut columns = Vec::with_capacity(mappings.len());
        for mapping in mappings {
            let Some((typ, kind)) = table.columns.get(&mapping.column) else {
                let mut available: Vec<&str> = table.columns.keys().map(String::as_str).collect();
                available.sort_unstable();
                return Err(SchemaError::ColumnNotFound {
                    route: route.name.clone(),
                    table: table_name,
                    column: mapping.column,
                    available: format!("`{}`", available.join("`, `")),
                });
            };
            if matches!(
                typ,
                ColumnType::Native(NativeType::Counter) | ColumnType::Native(NativeType::Duration)
            ) {
                return Err(SchemaError::UnsupportedColumn {
                    route: route.name.clone(),
                    column: mapping.column,
                    typ: format!("{typ:?}"),
                });
            }
            columns.push(BoundColumn {
                primary_key: matches!(kind, ColumnKind::PartitionKey | ColumnKind::Clustering),
                name: mapping.column,
                typ: typ.clone(),
                field: mapping.field,
            });
        }
        for key_column in table.partition_key.iter().chain(&table.clustering_key) {
            if !columns.iter().any(|c| &c.name == key_column) {
                return Err(SchemaError::PrimaryKeyUnmapped {
                    route: route.name.clone(),
                    table: table_name,
                    column: key_column.clone(),
                });
            }
        }
        Ok(RowMapper { columns })
    }

    /// Column names in bind order.
    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// The route's insert for these columns (see [`crate::sink::scylla::insert_statement`]).
    pub fn insert_statement(&self, keyspace: &str, table: &str) -> String {
        crate::sink::scylla::insert_statement(keyspace, table, self.column_names())
    }

    /// Maps one JSON message. `key` is the message key, `payload` its body.
    pub fn map_json(&self, key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<RowValues, MappingError> {
        let payload = payload.ok_or(MappingError::EmptyPayload)?;
        let document: Value = serde_json::from_slice(payload).map_err(|e| MappingError::NotJson(e.to_string()))?;
        if !document.is_object() {
            return Err(MappingError::NotObject);
        }
        let mut values = Vec::with_capacity(self.columns.len());
        for column in &self.columns {
            values.push(self.bind_column(column, key, &document)?);
        }
        Ok(values)
    }

    fn bind_column(
        &self,
        column: &BoundColumn,
        key: Option<&[u8]>,
        document: &Value,
    ) -> Result<MaybeUnset<Option<CqlValue>>, MappingError> {
        let key_value;
        let found: Option<&Value> = match &column.field {
            FieldRef::Key => {
                let bytes = key.ok_or_else(|| MappingError::KeyAbsent {
                    column: column.name.clone(),
                })?;
                let text = std::str::from_utf8(bytes).map_err(|_| MappingError::KeyNotText {
                    column: column.name.clone(),
                })?;
                key_value = Value::String(text.to_string());
                Some(&key_value)
            }
            FieldRef::Path(parts) => lookup(document, parts),
        };
        match found {
            None | Some(Value::Null) if column.primary_key => Err(MappingError::MissingPrimaryKey {
                column: column.name.clone(),
                field: column.field.to_string(),
            }),
            None => Ok(MaybeUnset::Unset),
            Some(Value::Null) => Ok(MaybeUnset::Set(None)),
            Some(value) => coerce::coerce(value, &column.typ)
                .map(|v| MaybeUnset::Set(Some(v)))
                .map_err(|e| MappingError::BadValue {
                    column: column.name.clone(),
                    field: column.field.to_string(),
                    reason: e.reason,
                }),
        }
    }
}

/// Follows a path of object keys; `None` when any step is absent or not an object.
fn lookup<'a>(document: &'a Value, parts: &[String]) -> Option<&'a Value> {
    parts
        .iter()
        .try_fold(document, |node, part| node.as_object()?.get(part))
}

/// Deterministic write timestamp in microseconds from a source position: the source time in
/// milliseconds, plus the position within that millisecond (`offset mod 1000`). A replay of the
/// same message writes the same timestamp, and up to 1000 messages of one partition within one
/// millisecond apply in source order. A message without a time uses 0 ms.
pub fn write_timestamp_us(source_time_ms: Option<i64>, offset: i64) -> i64 {
    let millis = source_time_ms.unwrap_or(0).clamp(0, i64::MAX / 1000 - 1);
    millis * 1000 + offset.rem_euclid(1000)
}

/// The next write timestamp of a partition whose previous message was written at
/// `previous_us`: the source time in microseconds, but always after the previous message. So
/// any number of messages within one millisecond apply in source order. Deterministic on replay
/// when `previous_us` is restored with the committed position (Kafka: commit metadata).
pub fn next_write_timestamp_us(source_time_ms: Option<i64>, previous_us: i64) -> i64 {
    let millis = source_time_ms.unwrap_or(0).clamp(0, i64::MAX / 1000 - 1);
    (millis * 1000).max(previous_us.saturating_add(1))
}

#[cfg(test)]
mod tests;
