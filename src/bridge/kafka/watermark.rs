//! Contiguous per-partition watermarks. Pure; owned by the Kafka poll thread.
//!
//! Messages of a partition complete out of order (concurrent writes, dead letters), but an
//! offset may only be stored once every message before it in that partition is done. Each
//! partition keeps the offsets it handed out, in receipt order; completing the oldest ones
//! advances the watermark to the last of the contiguous done prefix.
//!
//! Offsets are tracked as received, not assumed consecutive (compaction and transaction markers
//! leave gaps). Every assignment gets a fresh epoch: a completion from before a revoke can never
//! mark a message of a later assignment done.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// One tracked message: its offset, its write timestamp and whether it is done.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: i64,
    timestamp_us: i64,
    done: bool,
}

/// The index of `offset` among `slots` (increasing offsets). A partition's offsets are
/// consecutive unless compaction or transaction markers left gaps, so its distance from the
/// first slot is tried first — one comparison where a binary search over a few thousand slots in
/// flight makes a dozen, per completion on the poll thread.
fn slot_of(slots: &VecDeque<Slot>, offset: i64) -> Option<usize> {
    let first = slots.front()?.offset;
    let guess = usize::try_from(offset.checked_sub(first)?).ok()?;
    if slots.get(guess).is_some_and(|slot| slot.offset == offset) {
        return Some(guess);
    }
    slots.binary_search_by_key(&offset, |s| s.offset).ok()
}

#[derive(Debug, Default)]
struct Partition {
    epoch: u64,
    slots: VecDeque<Slot>,
}

/// Watermarks of every assigned partition of one consumer.
#[derive(Debug, Default)]
pub struct Watermarks {
    /// By partition. A `BTreeMap`: a lookup among a consumer's partitions (tens, or hundreds)
    /// is a few comparisons of small keys, where a `HashMap` hashed each key with SipHash, on
    /// the poll thread, twice per message.
    partitions: BTreeMap<i32, Partition>,
    next_epoch: u64,
}

impl Watermarks {
    /// Starts tracking `partition` afresh (after an assignment); returns its epoch.
    pub fn assign(&mut self, partition: i32) -> u64 {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.partitions.insert(
            partition,
            Partition {
                epoch,
                slots: VecDeque::new(),
            },
        );
        epoch
    }

    /// Stops tracking `partition`; its outstanding completions will be ignored.
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Records a received message; returns the epoch its completion must carry. A message at or
    /// before the newest tracked offset means the consumer rewound: tracking restarts.
    pub fn track(&mut self, partition: i32, offset: i64) -> u64 {
        self.track_stamped(partition, offset, 0)
    }

    /// [`Watermarks::track`] for a message written with `timestamp_us`, which
    /// [`Watermarks::complete_stamped`] reports with the watermark.
    pub fn track_stamped(&mut self, partition: i32, offset: i64, timestamp_us: i64) -> u64 {
        let slot = Slot {
            offset,
            timestamp_us,
            done: false,
        };
        if let Some(p) = self.partitions.get_mut(&partition) {
            if p.slots.back().is_none_or(|last| offset > last.offset) {
                p.slots.push_back(slot);
                return p.epoch;
            }
        }
        // Not tracked yet, or rewound.
        let epoch = self.assign(partition);
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.slots.push_back(slot);
        }
        epoch
    }

    /// Marks a message done. Returns the new watermark (the offset of the last message of the
    /// contiguous done prefix) when it advanced, `None` otherwise or for a stale epoch.
    pub fn complete(&mut self, partition: i32, epoch: u64, offset: i64) -> Option<i64> {
        self.complete_stamped(partition, epoch, offset).map(|(mark, _)| mark)
    }

    /// [`Watermarks::complete`], returning the watermark with its message's write timestamp.
    pub fn complete_stamped(&mut self, partition: i32, epoch: u64, offset: i64) -> Option<(i64, i64)> {
        let p = self.partitions.get_mut(&partition)?;
        if p.epoch != epoch {
            return None;
        }
        let index = slot_of(&p.slots, offset)?;
        p.slots[index].done = true;
        let mut advanced = None;
        while let Some(front) = p.slots.front() {
            if !front.done {
                break;
            }
            advanced = Some((front.offset, front.timestamp_us));
            p.slots.pop_front();
        }
        advanced
    }

    /// The epoch `partition` is tracked in, if it is.
    pub fn epoch(&self, partition: i32) -> Option<u64> {
        self.partitions.get(&partition).map(|p| p.epoch)
    }

    /// The offset of `partition`'s oldest message not yet done, if any (the done prefix is
    /// dropped as it completes).
    pub fn oldest_unfinished(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition)?.slots.front().map(|slot| slot.offset)
    }

    /// Messages handed out and not yet done, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(|p| p.slots.iter().filter(|s| !s.done).count())
            .sum()
    }
}

/// Watermarks held back until a route's taps have made them durable (`bridge::tap`): per
/// partition, the advanced marks (offset, write timestamp) in order, each released once its next
/// offset is durable — so the offset stored is always that of a real watermark, with its own
/// write clock.
#[derive(Debug, Default)]
pub struct Held {
    partitions: HashMap<i32, VecDeque<(i64, i64)>>,
}

impl Held {
    /// Holds `partition`'s advanced watermark `mark`. A mark at or before the last held one means
    /// tracking restarted (a rewind): what was held before it is dropped.
    pub fn push(&mut self, partition: i32, mark: (i64, i64)) {
        let marks = self.partitions.entry(partition).or_default();
        if marks.back().is_some_and(|last| mark.0 <= last.0) {
            marks.clear();
        }
        marks.push_back(mark);
    }

    /// Releases, per partition, the last held mark whose next offset (`offset + 1`) is at or
    /// below `durable(partition)` (`None`: nothing is durable yet), dropping the marks before it.
    pub fn release(&mut self, durable: impl Fn(i32) -> Option<i64>) -> BTreeMap<i32, (i64, i64)> {
        let mut released = BTreeMap::new();
        for (&partition, marks) in self.partitions.iter_mut() {
            let Some(limit) = durable(partition) else {
                continue;
            };
            let mut last = None;
            while marks.front().is_some_and(|front| front.0 < limit) {
                last = marks.pop_front();
            }
            if let Some(mark) = last {
                released.insert(partition, mark);
            }
        }
        self.partitions.retain(|_, marks| !marks.is_empty());
        released
    }

    /// Drops what is held of `partition` (revoked, or read again from an earlier offset).
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn advances_only_over_contiguous_done_prefix() {
        let mut w = Watermarks::default();
        let e = w.assign(0);
        for offset in [10, 11, 13, 14] {
            assert_eq!(w.track(0, offset), e);
        }
        assert_eq!(w.complete(0, e, 11), None);
        assert_eq!(w.complete(0, e, 13), None);
        assert_eq!(w.complete(0, e, 10), Some(13), "gap at 12 is not a missing message");
        assert_eq!(w.in_flight(), 1);
        assert_eq!(w.complete(0, e, 14), Some(14));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn stale_epoch_is_ignored_after_reassignment() {
        let mut w = Watermarks::default();
        let old = w.assign(3);
        w.track(3, 5);
        w.revoke(3);
        let new = w.assign(3);
        w.track(3, 5);
        assert_ne!(old, new);
        assert_eq!(w.complete(3, old, 5), None);
        assert_eq!(w.complete(3, new, 5), Some(5));
    }

    #[test]
    fn rewind_restarts_tracking() {
        let mut w = Watermarks::default();
        let first = w.track(1, 100);
        let second = w.track(1, 50);
        assert_ne!(first, second);
        assert_eq!(w.complete(1, first, 100), None);
        assert_eq!(w.complete(1, second, 50), Some(50));
    }

    #[test]
    fn held_marks_are_released_only_up_to_the_durable_offset() {
        let mut held = Held::default();
        held.push(0, (9, 90));
        held.push(0, (19, 190));
        held.push(0, (29, 290));
        held.push(1, (4, 40));
        assert!(held.release(|_| None).is_empty(), "nothing durable: nothing stored");
        // Durable up to offset 20 (exclusive) of partition 0: the mark at 19 is the last one whose
        // next offset (20) is durable; partition 1 has nothing durable.
        let released = held.release(|p| (p == 0).then_some(20));
        assert_eq!(released, BTreeMap::from([(0, (19, 190))]));
        assert!(held.release(|p| (p == 0).then_some(20)).is_empty(), "released once");
        // A tap that let go (durable i64::MAX) releases everything.
        let released = held.release(|_| Some(i64::MAX));
        assert_eq!(released, BTreeMap::from([(0, (29, 290)), (1, (4, 40))]));
        // A mark behind the last held one: tracking restarted, the older marks are dropped.
        held.push(2, (50, 1));
        held.push(2, (10, 2));
        assert_eq!(held.release(|_| Some(100)), BTreeMap::from([(2, (10, 2))]));
        held.push(3, (5, 1));
        held.forget(3);
        assert!(held.release(|_| Some(100)).is_empty());
    }

    #[test]
    fn the_oldest_unfinished_offset_and_the_epoch_are_reported() {
        let mut w = Watermarks::default();
        assert_eq!(w.epoch(0), None);
        let e = w.track(0, 10);
        w.track(0, 11);
        assert_eq!(w.epoch(0), Some(e));
        assert_eq!(w.oldest_unfinished(0), Some(10));
        w.complete(0, e, 10);
        assert_eq!(w.oldest_unfinished(0), Some(11));
        w.complete(0, e, 11);
        assert_eq!(w.oldest_unfinished(0), None);
    }

    proptest! {
        /// Whatever the completion order, the watermark never passes a message that is not done,
        /// and it reaches the last offset once all are done.
        #[test]
        fn watermark_never_passes_an_unfinished_message(
            gaps in proptest::collection::vec(1i64..4, 1..60),
            seed in any::<u64>(),
        ) {
            let mut offsets = Vec::new();
            let mut next = 0;
            for gap in gaps { offsets.push(next); next += gap; }
            let mut w = Watermarks::default();
            let epoch = w.assign(0);
            for &o in &offsets { w.track(0, o); }
            // A deterministic shuffle from the seed.
            let mut shuffled = offsets.clone();
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                shuffled.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut done = std::collections::BTreeSet::new();
            let mut mark = None;
            for o in shuffled {
                done.insert(o);
                if let Some(m) = w.complete(0, epoch, o) { mark = Some(m); }
                if let Some(m) = mark {
                    prop_assert!(offsets.iter().filter(|&&x| x <= m).all(|x| done.contains(x)));
                }
            }
            prop_assert_eq!(mark, offsets.last().copied());
        }
    }
}
