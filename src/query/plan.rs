//! Scan plans: the whole token ring, (i64::MIN, i64::MAX], cut into ranges that each lie on one
//! primary replica, one shard of it and one gateway core — at ring tokens (vnode boundaries), at
//! the boundaries of the cores' token buckets (where the ownership rule splits by token) and, on
//! a ScyllaDB node, at its shard boundaries (the driver's `Sharder`). The ranges of one (replica,
//! shard, core) are then dealt into splits, in token order, until the plan has the splits asked
//! for, cutting the widest ranges in halves when there are too few. Pure; served by any core.

use crate::topology::{Ownership, Placement};
use crate::wire::proto::{Split, TokenRange};
use std::collections::BTreeMap;

/// Most ranges a plan holds: a ScyllaDB ring of many nodes and shards is cut into many small
/// ranges; past this the cuts at shard boundaries stop and ranges are dealt as they are.
const RANGES_MAX: usize = 1 << 20;

/// The splits of a scan over `ownership`'s ring: at least `min_splits` when the ring can be cut
/// that finely, every token in exactly one range of one split.
pub fn plan(ownership: &Ownership, min_splits: usize) -> Vec<Split> {
    let mut ranges = cut_ring(ownership);
    let wanted = min_splits.max(1);
    while ranges.len() < wanted {
        // Halve the widest range (a range of one token cannot be cut).
        let Some((index, _)) = ranges
            .iter()
            .enumerate()
            .filter(|(_, (start, end, _))| width(*start, *end) > 1)
            .max_by_key(|(_, (start, end, _))| width(*start, *end))
        else {
            break;
        };
        let (start, end, placement) = ranges[index];
        let middle = (i128::from(start) + width(start, end) as i128 / 2) as i64;
        ranges[index] = (start, middle, placement);
        ranges.insert(index + 1, (middle, end, placement));
    }
    let mut groups: BTreeMap<(Option<u32>, u32, usize), Vec<TokenRange>> = BTreeMap::new();
    for (start, end, placement) in &ranges {
        groups
            .entry((placement.node, placement.shard, placement.core))
            .or_default()
            .push(TokenRange {
                start: *start,
                end: *end,
            });
    }
    let total = ranges.len().max(1);
    let mut splits = Vec::new();
    for ((node, shard, core), group) in groups {
        // Each group gets splits in proportion to its ranges, at least one.
        let count = (group.len() * wanted).div_ceil(total).clamp(1, group.len());
        let per_split = group.len().div_ceil(count);
        for chunk in group.chunks(per_split) {
            splits.push(Split {
                ranges: chunk.to_vec(),
                core: core as u32,
                node: node.map_or(-1, |n| n as i32),
                shard,
            });
        }
    }
    splits
}

/// Tokens in (start, end].
fn width(start: i64, end: i64) -> u128 {
    (i128::from(end) - i128::from(start)).max(0) as u128
}

/// The ring cut at every token where the placement may change, each range with its placement.
fn cut_ring(ownership: &Ownership) -> Vec<(i64, i64, Placement)> {
    let mut cuts: Vec<i64> = ownership.ring().iter().map(|(token, _)| *token).collect();
    let cores = ownership.cores();
    for bucket in 1..cores {
        // The first token of bucket `bucket` is the start of its range; cut just before it.
        let first = ((bucket as u128) << 64).div_ceil(cores as u128) as i128 + i128::from(i64::MIN);
        cuts.push((first - 1) as i64);
    }
    cuts.push(i64::MAX);
    cuts.retain(|t| *t > i64::MIN);
    cuts.sort_unstable();
    cuts.dedup();
    let mut ranges = Vec::with_capacity(cuts.len());
    let mut start = i64::MIN;
    for end in cuts {
        for (from, to) in shard_cuts(ownership, start, end) {
            ranges.push((from, to, ownership.place(to)));
        }
        start = end;
    }
    ranges
}

/// (start, end] cut at the shard boundaries of its primary replica, when that node has shards
/// (and the plan stays under [`RANGES_MAX`]).
fn shard_cuts(ownership: &Ownership, start: i64, end: i64) -> Vec<(i64, i64)> {
    let placement = ownership.place(end);
    let layout = placement
        .node
        .and_then(|node| ownership.nodes().get(node as usize).copied())
        .filter(|l| l.shards > 1);
    let Some(layout) = layout else {
        return vec![(start, end)];
    };
    let mut pieces = Vec::new();
    let mut from = start;
    for first in shard_starts(layout.shards, layout.msb_ignore, start, end) {
        if pieces.len() >= RANGES_MAX {
            break;
        }
        pieces.push((from, first - 1));
        from = first - 1;
    }
    pieces.push((from, end));
    pieces
}

/// The tokens in (start + 1, end] at which a shard's run begins, ascending, as the driver's
/// `Sharder::shard_of` lays them out: the token biased by 2^63 and shifted left by `msb_ignore`
/// bits gives the shard as `(z × shards) >> 64`, so within each cycle of 2^(64 − msb_ignore)
/// tokens shard k begins at the first token whose shifted value reaches ⌈k × 2^64 / shards⌉.
fn shard_starts(shards: u16, msb_ignore: u8, start: i64, end: i64) -> Vec<i64> {
    let bits = 64 - u32::from(msb_ignore.min(63));
    let biased = |token: i64| (i128::from(token) - i128::from(i64::MIN)) as u128;
    let (low, high) = (biased(start) + 1, biased(end));
    let mut starts = Vec::new();
    let (first_cycle, last_cycle) = (low >> bits, high >> bits);
    for cycle in first_cycle..=last_cycle {
        for k in 0..u128::from(shards) {
            let shifted = (k << 64).div_ceil(u128::from(shards));
            let offset = shifted.div_ceil(1 << u32::from(msb_ignore.min(63)));
            let z = (cycle << bits) + offset;
            if z > low && z <= high {
                starts.push((z as i128 + i128::from(i64::MIN)) as i64);
            }
        }
        if starts.len() > RANGES_MAX {
            break;
        }
    }
    starts
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::topology::NodeShards;

    /// Every token of the ring in exactly one range: ranges sorted by start chain from MIN to
    /// MAX with no gap and no overlap.
    fn assert_covers_ring(splits: &[Split]) {
        let mut ranges: Vec<(i64, i64)> = splits
            .iter()
            .flat_map(|s| s.ranges.iter().map(|r| (r.start, r.end)))
            .collect();
        ranges.sort_unstable();
        let mut next = i64::MIN;
        for (start, end) in ranges {
            assert_eq!(start, next, "gap or overlap at {start}");
            assert!(end > start);
            next = end;
        }
        assert_eq!(next, i64::MAX);
    }

    /// Every range of a split lies on the split's core, replica and shard.
    fn assert_placed(ownership: &Ownership, splits: &[Split]) {
        for split in splits {
            for range in &split.ranges {
                for token in [
                    range.start.saturating_add(1),
                    range.end,
                    range.start / 2 + range.end / 2,
                ] {
                    if token <= range.start || token > range.end {
                        continue;
                    }
                    let placement = ownership.place(token);
                    assert_eq!(placement.core as u32, split.core, "token {token}");
                    assert_eq!(placement.node.map_or(-1, |n| n as i32), split.node, "token {token}");
                    assert_eq!(placement.shard, split.shard, "token {token}");
                }
            }
        }
    }

    #[test]
    fn without_a_ring_the_core_buckets_are_split() {
        let ownership = Ownership::token_ranges_only(2);
        let splits = plan(&ownership, 6);
        assert_eq!(splits.len(), 6);
        assert_covers_ring(&splits);
        assert_placed(&ownership, &splits);
    }

    #[test]
    fn cassandra_vnodes_are_cut_at_core_buckets() {
        let nodes: BTreeMap<u128, NodeShards> = [(1, NodeShards::UNSHARDED), (2, NodeShards::UNSHARDED)].into();
        let ring: Vec<(i64, u128)> = (0..32)
            .map(|i| (i64::MIN / 16 * (16 - i) + 12345, 1 + (i % 2) as u128))
            .collect();
        let ownership = Ownership::new(2, &ring, &nodes);
        let splits = plan(&ownership, 12);
        assert!(splits.len() >= 12, "{} splits", splits.len());
        assert_covers_ring(&splits);
        assert_placed(&ownership, &splits);
    }

    #[test]
    fn scylla_ranges_are_cut_at_shard_boundaries() {
        let layout = NodeShards {
            shards: 4,
            msb_ignore: 12,
        };
        let nodes: BTreeMap<u128, NodeShards> = [(1, layout), (2, layout)].into();
        let ring: Vec<(i64, u128)> = (0..8)
            .map(|i| (i64::MIN / 4 * (4 - i) + 99, 1 + (i % 2) as u128))
            .collect();
        let ownership = Ownership::new(8, &ring, &nodes);
        let splits = plan(&ownership, 24);
        assert_covers_ring(&splits);
        assert_placed(&ownership, &splits);
        let shards: std::collections::BTreeSet<u32> = splits.iter().map(|s| s.shard).collect();
        assert_eq!(shards.len(), 4);
        // Every range on one shard of its node, checked token by token against the driver's
        // sharder at both ends and across each range.
        let sharder = scylla::routing::Sharder::new(std::num::NonZeroU16::new(4).unwrap(), 12);
        for split in &splits {
            for range in &split.ranges {
                for step in 1..=16i128 {
                    let token = (i128::from(range.start)
                        + (i128::from(range.end) - i128::from(range.start)) * step / 16)
                        as i64;
                    if token > range.start {
                        assert_eq!(sharder.shard_of(scylla::routing::Token::new(token)), split.shard);
                    }
                }
            }
        }
    }
}
