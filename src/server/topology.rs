//! `GetTopology`: the gateway's cores, their endpoints and the ownership rule's inputs (ring,
//! shard layout per node, partition keys of the asked tables), which the shard-aware client
//! routes by. Part of the `Ingest` service on the wire (existing clients call it there); any
//! service that needs it answers through [`topology`]. Runs on the core serving the call; reads
//! the current ownership snapshot and the driver's cached schema, no IO.

use scylla::client::session::Session;
use tonic::Status;

use crate::topology::Ownership;
use crate::wire::convert::cql_type_name;
use crate::wire::proto::{KeyColumn, NodeShards, RingEntry, TableKey, Topology};

/// The answer to `GetTopology` for `tables` (`keyspace.table`); NOT_FOUND names the first table
/// that does not exist.
pub fn topology(
    ownership: &Ownership,
    core_endpoints: &[String],
    session: &Session,
    tables: Vec<String>,
) -> Result<Topology, Status> {
    let mut keys = Vec::with_capacity(tables.len());
    for table in tables {
        match table_key(session, &table) {
            Some(key) => keys.push(key),
            None => return Err(Status::not_found(format!("table `{table}` does not exist"))),
        }
    }
    Ok(Topology {
        cores: ownership.cores() as u32,
        core_endpoints: core_endpoints.to_vec(),
        ring: ownership
            .ring()
            .iter()
            .map(|&(token, node)| RingEntry { token, node })
            .collect(),
        nodes: ownership
            .nodes()
            .iter()
            .map(|n| NodeShards {
                shards: u32::from(n.shards),
                msb_ignore: u32::from(n.msb_ignore),
            })
            .collect(),
        tables: keys,
    })
}

/// Partition key columns of `table` with their CQL types.
fn table_key(session: &Session, table: &str) -> Option<TableKey> {
    let (keyspace, name) = table.split_once('.')?;
    let state = session.get_cluster_state();
    let meta = state.get_keyspace(keyspace)?.tables.get(name)?;
    let columns = meta
        .partition_key
        .iter()
        .filter_map(|k| {
            meta.columns.get(k).map(|c| KeyColumn {
                name: k.clone(),
                cql_type: cql_type_name(&c.typ),
            })
        })
        .collect();
    Some(TableKey {
        table: table.to_string(),
        columns,
    })
}
