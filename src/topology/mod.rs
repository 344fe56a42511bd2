//! Which core owns a row: token → primary replica → shard → owner core. Pure functions over a
//! snapshot of the token ring ([`Ownership`]), used identically by the gateway (to decide whether
//! a row must be forwarded) and by the shard-aware client (to pick the core's endpoint).
//!
//! Threads: snapshots are built on the island when the driver's cluster state changes
//! ([`Ownership::from_cluster_state`]) and read on every core; they are immutable and swapped
//! whole, never edited.
//!
//! Rule ([`owner_core_of`]):
//! - when the primary replica has at least as many shards as the gateway has cores (ScyllaDB on a
//!   host like the gateway's), core = (node ordinal × shards + shard) mod cores: every row of one
//!   (node, shard) lands on one core, so that core's batches all go to one shard's connection;
//! - otherwise (Cassandra reports no shards: one per node), the token ring is split into `cores`
//!   equal ranges, so every core gets work under a uniform key distribution.
//!
//! Tokens are the driver's partitioners over the partition key serialized by the driver's
//! `SerializeValue`, combined into one key by [`PartitionKeyHasher`] (the gateway's
//! `sink::scylla::writer::row_token` and [`crate::client`]'s both use it); shards come from the
//! driver's `Sharder`. Nothing here re-implements either. With tablets, ownership is only a hint: a row
//! that reaches a core that does not own it is forwarded, never written wrongly, because any core
//! may write any row through the shared session.

use std::collections::BTreeMap;
use std::num::NonZeroU16;

use scylla::cluster::ClusterState;
use scylla::routing::partitioner::PartitionerHasher;
use scylla::routing::{Sharder, Token};

/// Hashes a partition key given component by component (each a serialized value, without its
/// length prefix): a single component as it is, several each as a 2-byte big-endian length,
/// the bytes and a 0 — the composite encoding Cassandra and ScyllaDB hash, and the driver's
/// `calculate_token` builds.
pub struct PartitionKeyHasher<H: PartitionerHasher> {
    hasher: H,
    composite: bool,
}

impl<H: PartitionerHasher> PartitionKeyHasher<H> {
    /// A hasher for a key of `components` columns, using a partitioner's `hasher`.
    pub fn new(hasher: H, components: usize) -> PartitionKeyHasher<H> {
        PartitionKeyHasher {
            hasher,
            composite: components > 1,
        }
    }

    /// Adds the next component in key order; `None` when it is longer than a composite
    /// component can be (64 KiB).
    pub fn component(&mut self, bytes: &[u8]) -> Option<()> {
        if self.composite {
            self.hasher.write(&u16::try_from(bytes.len()).ok()?.to_be_bytes());
            self.hasher.write(bytes);
            self.hasher.write(&[0]);
        } else {
            self.hasher.write(bytes);
        }
        Some(())
    }

    /// The token.
    pub fn finish(self) -> i64 {
        self.hasher.finish().value()
    }
}

/// Shard layout of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeShards {
    /// Shards the node runs; 1 for Cassandra (no sharding reported).
    pub shards: u16,
    /// Most significant token bits the node's sharding ignores.
    pub msb_ignore: u8,
}

impl NodeShards {
    /// A node that reports no sharding (Cassandra): one shard.
    pub const UNSHARDED: NodeShards = NodeShards {
        shards: 1,
        msb_ignore: 0,
    };
}

/// Snapshot of the ring and the core count: everything the ownership rule needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    cores: usize,
    /// Ring tokens, ascending, each with the ordinal of the node that owns the range ending there.
    ring: Vec<(i64, u32)>,
    /// Shard layout per node ordinal. Ordinals follow ascending node id, so every builder of the
    /// same cluster gets the same ordinals.
    nodes: Vec<NodeShards>,
    /// Node id (host id as u128) per node ordinal; empty when the snapshot was rebuilt from
    /// parts that do not carry them (the smart client's).
    node_ids: Vec<u128>,
}

/// A primary replica (node ordinal, `None` while the ring is empty) and its shard.
pub type ReplicaShard = (Option<u32>, u32);

/// Where a token lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Ordinal of the primary replica (`None` while the ring is empty).
    pub node: Option<u32>,
    /// Shard of the token on that node.
    pub shard: u32,
    /// Owning core.
    pub core: usize,
}

impl Placement {
    /// The (replica, shard) pair: rows sharing it may share an UNLOGGED batch.
    pub fn replica_shard(&self) -> ReplicaShard {
        (self.node, self.shard)
    }
}

impl Ownership {
    /// Builds a snapshot from ring entries `(token, node id)` and per-node shard layouts. Node
    /// ids may be anything ordered (host ids as u128); the input order does not matter.
    pub fn new(cores: usize, ring: &[(i64, u128)], nodes: &BTreeMap<u128, NodeShards>) -> Ownership {
        assert!(cores > 0, "at least one core");
        let ordinal: BTreeMap<u128, u32> = nodes.keys().enumerate().map(|(i, id)| (*id, i as u32)).collect();
        let mut entries: Vec<(i64, u32)> = ring
            .iter()
            .filter_map(|(token, id)| ordinal.get(id).map(|o| (*token, *o)))
            .collect();
        entries.sort_unstable();
        entries.dedup_by_key(|e| e.0);
        Ownership {
            cores,
            ring: entries,
            nodes: nodes.values().copied().collect(),
            node_ids: nodes.keys().copied().collect(),
        }
    }

    /// Builds a snapshot from the driver's current cluster state.
    pub fn from_cluster_state(state: &ClusterState, cores: usize) -> Ownership {
        let mut nodes = BTreeMap::new();
        let mut ring = Vec::new();
        for (token, node) in state.replica_locator().ring().iter() {
            let id = node.host_id.as_u128();
            let shards = node.sharder().map_or(NodeShards::UNSHARDED, |s| NodeShards {
                shards: s.nr_shards.get(),
                msb_ignore: s.msb_ignore,
            });
            nodes.insert(id, shards);
            ring.push((token.value(), id));
        }
        Ownership::new(cores, &ring, &nodes)
    }

    /// A snapshot without ring knowledge: ownership by token range only.
    pub fn token_ranges_only(cores: usize) -> Ownership {
        Ownership::new(cores, &[], &BTreeMap::new())
    }

    /// Data-plane cores of the gateway.
    pub fn cores(&self) -> usize {
        self.cores
    }

    /// Ring entries `(token, node ordinal)`, ascending.
    pub fn ring(&self) -> &[(i64, u32)] {
        &self.ring
    }

    /// Shard layouts by node ordinal.
    pub fn nodes(&self) -> &[NodeShards] {
        &self.nodes
    }

    /// The node id (host id as u128) of node ordinal `node`, when the snapshot knows it.
    pub fn node_id(&self, node: u32) -> Option<u128> {
        self.node_ids.get(node as usize).copied()
    }

    /// Node ids by ordinal (empty when unknown).
    pub fn node_ids(&self) -> &[u128] {
        &self.node_ids
    }

    /// Rebuilds a snapshot from its parts (as published by the `GetTopology` RPC, which carries
    /// no node ids: pass none).
    pub fn from_parts(cores: usize, ring: Vec<(i64, u32)>, nodes: Vec<NodeShards>, node_ids: Vec<u128>) -> Ownership {
        let mut ring: Vec<(i64, u32)> = ring.into_iter().filter(|(_, n)| (*n as usize) < nodes.len()).collect();
        ring.sort_unstable();
        ring.dedup_by_key(|e| e.0);
        Ownership {
            cores: cores.max(1),
            ring,
            nodes,
            node_ids,
        }
    }

    /// Primary replica, shard and owner core of `token`.
    pub fn place(&self, token: i64) -> Placement {
        let Some(node) = self.primary_node(token) else {
            return Placement {
                node: None,
                shard: 0,
                core: token_range_bucket(token, self.cores),
            };
        };
        let layout = self.nodes[node as usize];
        let shard = match NonZeroU16::new(layout.shards) {
            Some(count) if count.get() > 1 => Sharder::new(count, layout.msb_ignore).shard_of(Token::new(token)),
            _ => 0,
        };
        let core = owner_core_of(node, shard, u32::from(layout.shards), token, self.cores);
        Placement {
            node: Some(node),
            shard,
            core,
        }
    }

    /// The owner core of `token`.
    pub fn owner_core(&self, token: i64) -> usize {
        self.place(token).core
    }

    /// The node owning the ring range that contains `token`: the first ring token ≥ `token`,
    /// wrapping around to the first entry.
    fn primary_node(&self, token: i64) -> Option<u32> {
        let first = self.ring.first()?;
        let index = self.ring.partition_point(|(t, _)| *t < token);
        Some(self.ring.get(index).unwrap_or(first).1)
    }
}

/// The ownership rule (see the module docs). Pure; every input maps to one core in `0..cores`.
pub fn owner_core_of(node: u32, shard: u32, shards: u32, token: i64, cores: usize) -> usize {
    if shards as usize >= cores {
        (node as usize * shards as usize + shard as usize) % cores
    } else {
        token_range_bucket(token, cores)
    }
}

/// Splits the whole token range into `buckets` equal parts; returns the part holding `token`.
pub fn token_range_bucket(token: i64, buckets: usize) -> usize {
    let offset = (i128::from(token) - i128::from(i64::MIN)) as u128;
    ((offset * buckets as u128) >> 64) as usize
}

/// The core that owns a Kafka partition: every partition maps to exactly one core, round-robin.
pub fn kafka_partition_owner(partition: i32, cores: usize) -> usize {
    assert!(cores > 0, "at least one core");
    (partition.unsigned_abs() as usize) % cores
}

#[cfg(test)]
mod tests;
