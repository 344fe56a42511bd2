//! What the sink knows of a table: column types and the primary key, copied from the driver's
//! schema metadata; the bound values of one row; the "replay-unsafe column" check. Pure data,
//! used by every thread that binds rows (cores, `shardgate replay`) and by start-up on the island.

use std::collections::HashMap;

use scylla::cluster::metadata::{ColumnKind, ColumnType, Table};
use scylla::value::{CqlValue, MaybeUnset};

/// Bound values of one row, in the order of its statement's markers.
pub type RowValues = Vec<MaybeUnset<Option<CqlValue>>>;

/// What writing and mapping need of a table: column types and the primary key, copied from the
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
    /// Copies the parts of the driver's table metadata writers and mappers use.
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

/// Whether writing `typ` twice changes the row: a non-frozen list appends its elements under new
/// cell ids on every write, so a replayed write (redelivery, the spool, `shardgate replay`)
/// duplicates them. Every other type is replay-safe with the gateway's write timestamps.
pub fn replay_unsafe(typ: &ColumnType<'_>) -> bool {
    matches!(
        typ,
        ColumnType::Collection {
            frozen: false,
            typ: scylla::cluster::metadata::CollectionType::List(_),
        }
    )
}

/// Tables already warned about by [`warn_replay_unsafe_columns`], so each is named once.
static REPLAY_UNSAFE_WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Logs one WARN line, once per process, for a table with non-frozen `list` columns (see
/// [`replay_unsafe`]). Called at start-up for route targets and, with the ingest API on, for
/// every table of the cluster; and when the ingest API first writes a table created later.
pub fn warn_replay_unsafe_columns(keyspace: &str, table: &str, schema: &TableSchema) {
    let mut columns: Vec<&str> = schema
        .columns
        .iter()
        .filter(|(_, (typ, _))| replay_unsafe(typ))
        .map(|(name, _)| name.as_str())
        .collect();
    if columns.is_empty() {
        return;
    }
    columns.sort_unstable();
    let qualified = format!("{keyspace}.{table}");
    let mut warned = REPLAY_UNSAFE_WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if warned.contains(&qualified) {
        return;
    }
    warned.push(qualified.clone());
    tracing::warn!(
        table = %qualified,
        columns = %columns.join(", "),
        "non-frozen list column(s): a retried, spooled or replayed write appends the elements again; use frozen<list<...>> or a set"
    );
}
