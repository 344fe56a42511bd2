//! Taps: what folds a route's mapped rows as the route writes them — a stream job's rollup
//! (`job::tap`) — and holds the route's Kafka offsets back until what it folded is durable.
//!
//! The route engine knows a tap only through [`Tap`]; the job that implements it lives above
//! the bridge. A Kafka partition is mapped on one core (`topology::kafka_partition_owner`), in
//! offset order, so a tap sees each partition's messages in order on one core and keeps their
//! state there.
//!
//! The contract with the route's source (the Kafka poll thread):
//! - offsets are stored no further than [`Tap::durable`] (the next offset whose folding the tap
//!   has made durable): a restart re-reads what the tap had not yet made durable;
//! - [`Tap::rewinds`] asks the consumer to read a partition again from an offset (the tap's
//!   stored state is behind what it saw — another gateway moved on, or the job was cancelled
//!   and attached again). The consumer seeks no further back than needed and never past a
//!   message still in flight; the messages read again carry a new assignment epoch
//!   ([`super::message::Origin::assignment`]), which tells the tap the stale ones apart.
//!
//! Threads: `fold` on the core that maps the message; `durable` and `rewinds` on the route's
//! poll thread. Never blocks either.

use super::message::SourceMessage;
use crate::mapping::MappedRow;

/// A rewind a tap asks of its route's consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewind {
    /// The Kafka partition.
    pub partition: i32,
    /// The offset to read again from (the consumer may start lower, never higher).
    pub offset: i64,
    /// The assignment epoch whose messages the tap has stopped folding: a rewind is only done
    /// while the partition is still in it.
    pub epoch: u64,
}

/// Something folding a route's mapped rows.
pub trait Tap: Send + Sync {
    /// Folds one message received on `core`: `rows` its mapped rows (empty when the route's
    /// filter skipped it), `None` when the route could not map it (the route dead-letters it;
    /// the tap only moves past it). Called in each partition's offset order.
    fn fold(&self, core: usize, message: &SourceMessage, rows: Option<&[MappedRow]>);

    /// The next offset of `partition` up to which what the tap folded is durable, `None` while
    /// nothing is (the source then stores no offset of it). `i64::MAX` once the tap lets go of
    /// the route (its job cancelled).
    fn durable(&self, partition: i32) -> Option<i64>;

    /// Rewinds asked since the last call.
    fn rewinds(&self) -> Vec<Rewind>;
}

/// A route's taps, shared by its cores and its source.
pub type Taps = std::sync::Arc<[std::sync::Arc<dyn Tap>]>;

/// How far a route's source may store `partition`'s offsets: the least of its taps' durable
/// offsets (`None`: not at all yet); no taps, no bound.
pub fn durable_of(taps: &[std::sync::Arc<dyn Tap>], partition: i32) -> Option<i64> {
    taps.iter()
        .map(|tap| tap.durable(partition))
        .try_fold(i64::MAX, |least, durable| durable.map(|d| least.min(d)))
}
