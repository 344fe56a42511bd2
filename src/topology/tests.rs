use super::*;
use proptest::prelude::*;

/// A ring of `nodes` nodes with `vnodes` tokens each, from a seed.
fn ring(nodes: u128, vnodes: usize, seed: u64, shards: u16) -> (Vec<(i64, u128)>, BTreeMap<u128, NodeShards>) {
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as i64
    };
    let mut entries = Vec::new();
    let mut layouts = BTreeMap::new();
    for id in 0..nodes {
        let id = id * 7919 + 11;
        layouts.insert(id, NodeShards { shards, msb_ignore: 12 });
        for _ in 0..vnodes {
            entries.push((next(), id));
        }
    }
    (entries, layouts)
}

#[test]
fn driver_sharder_test_vector() {
    // From the scylla driver's own tests (DESIGN §3).
    let sharder = Sharder::new(NonZeroU16::new(4).expect("4"), 12);
    assert_eq!(sharder.shard_of(Token::new(-9219783007514621794)), 3);
}

#[test]
fn primary_node_is_first_ring_token_at_or_after() {
    let nodes: BTreeMap<u128, NodeShards> = [(1, NodeShards::UNSHARDED), (2, NodeShards::UNSHARDED)].into();
    let o = Ownership::new(2, &[(100, 2), (-100, 1)], &nodes);
    assert_eq!(o.place(-100).node, Some(0));
    assert_eq!(o.place(-99).node, Some(1));
    assert_eq!(o.place(100).node, Some(1));
    assert_eq!(o.place(101).node, Some(0), "wraps around");
    assert_eq!(o.place(i64::MIN).node, Some(0));
}

#[test]
fn token_range_buckets_cover_the_ring_in_order() {
    assert_eq!(token_range_bucket(i64::MIN, 4), 0);
    assert_eq!(token_range_bucket(-1, 4), 1);
    assert_eq!(token_range_bucket(0, 4), 2);
    assert_eq!(token_range_bucket(i64::MAX, 4), 3);
    assert_eq!(token_range_bucket(i64::MAX, 1), 0);
}

#[test]
fn parts_round_trip() {
    let (entries, layouts) = ring(3, 4, 9, 8);
    let o = Ownership::new(4, &entries, &layouts);
    let rebuilt = Ownership::from_parts(o.cores(), o.ring().to_vec(), o.nodes().to_vec(), o.node_ids().to_vec());
    assert_eq!(o, rebuilt);
}

#[test]
fn partitions_spread_over_all_cores() {
    let owners: std::collections::BTreeSet<usize> = (0..6).map(|p| kafka_partition_owner(p, 4)).collect();
    assert_eq!(owners.len(), 4);
}

proptest! {
    /// Every token maps to exactly one core, inside the core range, whatever the ring.
    #[test]
    fn every_row_has_one_owner_in_range(token in any::<i64>(), cores in 1usize..64, nodes in 0u128..6, shards in 1u16..16, seed in any::<u64>()) {
        let (entries, layouts) = ring(nodes, 4, seed, shards);
        let o = Ownership::new(cores, &entries, &layouts);
        let core = o.owner_core(token);
        prop_assert!(core < cores);
        prop_assert_eq!(core, o.owner_core(token));
    }

    /// Rebuilding from the same cluster (nodes listed in any order) gives the same owners.
    #[test]
    fn stable_across_refreshes(tokens in proptest::collection::vec(any::<i64>(), 1..50), seed in any::<u64>(), shards in 1u16..16) {
        let (entries, layouts) = ring(3, 8, seed, shards);
        let mut reversed = entries.clone();
        reversed.reverse();
        let a = Ownership::new(4, &entries, &layouts);
        let b = Ownership::new(4, &reversed, &layouts);
        prop_assert_eq!(&a, &b);
        for t in tokens {
            prop_assert_eq!(a.place(t), b.place(t));
        }
    }

    /// When nodes have at least as many shards as the gateway has cores, all rows of one
    /// (node, shard) land on one core.
    #[test]
    fn one_node_shard_pair_one_core(tokens in proptest::collection::vec(any::<i64>(), 200), seed in any::<u64>(), cores in 1usize..9) {
        let (entries, layouts) = ring(3, 8, seed, 8);
        let o = Ownership::new(cores, &entries, &layouts);
        let mut core_of_pair = BTreeMap::new();
        for t in tokens {
            let p = o.place(t);
            let previous = core_of_pair.insert((p.node, p.shard), p.core);
            prop_assert!(previous.is_none_or(|c| c == p.core));
        }
    }

    /// With one shard per node (Cassandra), every core gets work under uniform keys.
    #[test]
    fn all_cores_get_work_without_shards(seed in any::<u64>(), cores in 1usize..9, nodes in 1u128..4) {
        let (entries, layouts) = ring(nodes, 4, seed, 1);
        let o = Ownership::new(cores, &entries, &layouts);
        let mut counts = vec![0u32; cores];
        let mut state = seed | 1;
        for _ in 0..4000 {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            counts[o.owner_core(state as i64)] += 1;
        }
        prop_assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    }
}
