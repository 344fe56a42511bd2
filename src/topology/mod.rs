//! Which core owns a piece of work. Pure functions, called on the threads that dispatch work.
//!
//! Today a Kafka partition is owned by one core (`partition mod cores`), so all messages of a
//! partition are processed on one core and its offsets advance from one place. Token → shard →
//! core ownership for individual rows comes with the shard-native engine.

/// The core that owns a Kafka partition. Every partition maps to exactly one core in
/// `0..cores`; partitions spread round-robin, so every core gets work once there are at least
/// as many partitions as cores.
pub fn kafka_partition_owner(partition: i32, cores: usize) -> usize {
    assert!(cores > 0, "at least one core");
    (partition.unsigned_abs() as usize) % cores
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every partition has exactly one owner, inside the core range.
        #[test]
        fn owner_is_in_range(partition in any::<i32>(), cores in 1usize..256) {
            prop_assert!(kafka_partition_owner(partition, cores) < cores);
        }
    }

    #[test]
    fn partitions_spread_over_all_cores() {
        let owners: std::collections::BTreeSet<usize> = (0..6).map(|p| kafka_partition_owner(p, 4)).collect();
        assert_eq!(owners.len(), 4);
    }
}
