//! Scan pages pinned to their replica and shard. A scan statement restricts `token(key)` to a
//! range, so the driver cannot compute a token from its binds and would send it to any node and
//! shard — which then reads from the replica, one more hop on every page. The plan cut each range
//! so that it lies on one primary replica and one shard of it; [`ReplicaFirst`] sends the page
//! there, through that shard's connection, and falls back to the session's own policy when that
//! node is not connected (or retries elsewhere after an error).
//!
//! Threads: one cache per core (core-local state); the policies are shared with the driver.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use scylla::client::session::Session;
use scylla::cluster::{ClusterState, NodeRef};
use scylla::policies::load_balancing::{FallbackPlan, LoadBalancingPolicy, RoutingInfo};
use scylla::routing::Shard;
use uuid::Uuid;

use crate::topology::Ownership;

/// First the target node and shard, when connected; then what the session's policy plans.
#[derive(Debug)]
pub struct ReplicaFirst {
    /// Host id of the primary replica.
    host_id: Uuid,
    /// Its shard, `None` on a node that reports no sharding (Cassandra).
    shard: Option<Shard>,
    /// The session's default policy.
    rest: Arc<dyn LoadBalancingPolicy>,
}

impl LoadBalancingPolicy for ReplicaFirst {
    fn pick<'a>(&'a self, request: &'a RoutingInfo, cluster: &'a ClusterState) -> Option<(NodeRef<'a>, Option<Shard>)> {
        match cluster
            .get_nodes_info()
            .iter()
            .find(|node| node.host_id == self.host_id)
        {
            Some(node) if node.is_connected() => Some((node, self.shard)),
            _ => self.rest.pick(request, cluster),
        }
    }

    fn fallback<'a>(&'a self, request: &'a RoutingInfo, cluster: &'a ClusterState) -> FallbackPlan<'a> {
        self.rest.fallback(request, cluster)
    }

    fn name(&self) -> String {
        "shardgate-replica-first".into()
    }
}

/// A target: node id (host id as u128) and shard.
type Target = (u128, Option<Shard>);

/// One core's policies by target, built once each.
#[derive(Default)]
pub struct Pins {
    policies: RefCell<HashMap<Target, Arc<dyn LoadBalancingPolicy>>>,
}

impl Pins {
    /// The policy that sends a read of the range starting after `start` to its primary replica
    /// and shard under `ownership`; `None` when the snapshot does not know the node (an empty
    /// ring).
    pub fn for_range(
        &self,
        session: &Session,
        ownership: &Ownership,
        start: i64,
    ) -> Option<Arc<dyn LoadBalancingPolicy>> {
        // Ranges are (start, end]: their first token is start + 1.
        let placement = ownership.place(start.saturating_add(1));
        let node = placement.node?;
        let id = ownership.node_id(node)?;
        let sharded = ownership.nodes().get(node as usize).is_some_and(|n| n.shards > 1);
        let shard = sharded.then_some(placement.shard);
        let mut policies = self.policies.borrow_mut();
        let policy = policies.entry((id, shard)).or_insert_with(|| {
            let rest = Arc::clone(
                session
                    .get_default_execution_profile_handle()
                    .to_profile()
                    .get_load_balancing_policy(),
            );
            Arc::new(ReplicaFirst {
                host_id: Uuid::from_u128(id),
                shard,
                rest,
            })
        });
        Some(Arc::clone(policy))
    }
}
