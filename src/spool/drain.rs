//! The core's drain: writes the records that wait on disk only — left by the previous run, or
//! deferred while the core's memory budget was spent — oldest segment first, each chunk once the
//! budget admits it. It knows records, not their writers: what writes a route's messages or a
//! gRPC batch is a [`Replay`] the application registers. Records of a route no longer
//! configured (or gRPC batches with the ingest API off) stay in the spool, logged, until such a
//! writer returns; an unreadable or undecodable record is logged and skipped.
//!
//! Threads: the owning core, one drain task per core.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use futures::future::LocalBoxFuture;

use super::record::{self, Record, RouteRecord};
use super::service::{complete, core_backlog, core_spool, Backlog, Held, Spooled};
use super::RecordId;
use crate::runtime::shutdown::Stop;

/// Records handed to a writer per chunk of the drain.
const DRAIN_CHUNK: usize = 512;
/// Longest wait between retries of a failing disk.
const IO_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Who writes replayed records. Each method returns `None` when it has no writer for the
/// record (the record then stays in the spool); the future it returns writes the records and
/// calls [`Spooled::written`].
pub trait Replay {
    /// Writes messages of `route` read back from the spool.
    fn route(&self, route: &str, messages: Vec<RouteRecord>, spooled: Spooled) -> Option<LocalBoxFuture<'static, ()>>;
    /// Whether a route of this name is configured.
    fn knows_route(&self, route: &str) -> bool;
    /// Writes a gRPC batch (protobuf `shardgate.v1.RowBatch` bytes) read back from the spool.
    fn grpc(&self, batch: Vec<u8>, spooled: Spooled) -> Option<LocalBoxFuture<'static, ()>>;
    /// Whether gRPC batches can be written (the ingest API is configured).
    fn knows_grpc(&self) -> bool;
}

/// Runs on core `core` until `stop`, handing deferred records to `replay`.
pub async fn drain_on_core(core: usize, replay: Rc<dyn Replay>, mut stop: Stop) {
    let (Some(backlog), Some(spool)) = (core_backlog(), core_spool()) else {
        return;
    };
    let mut kept_for = BTreeSet::new();
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some((segment, indexes)) = next_deferred(&backlog, &mut stop).await else {
            return;
        };
        let read = spool.lock().await.read(segment, &indexes).await;
        let records = match read {
            Ok(records) => {
                backoff = Duration::from_millis(50);
                records
            }
            Err(error) => {
                tracing::error!(core, %error, "spool: cannot read deferred records; retrying");
                backlog
                    .deferred
                    .borrow_mut()
                    .entry(segment)
                    .or_default()
                    .extend(indexes);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(IO_BACKOFF_MAX);
                continue;
            }
        };
        let taken = indexes.len() as u64;
        let sorted = sort_records(core, segment, indexes, records, &*replay, &mut kept_for);
        // Records kept for an absent writer stay in the spool, no longer waiting.
        settle(&backlog, taken - sorted.to_write());
        complete(&sorted.skipped).await;
        if !hand_over(sorted, &backlog, &*replay, &mut stop).await {
            return;
        }
    }
}

/// One segment's deferred records, sorted by who writes them.
#[derive(Default)]
struct Sorted {
    /// Damaged or undecodable: completed without a write (logged).
    skipped: Vec<RecordId>,
    /// Route messages by route, each with its record's size.
    by_route: BTreeMap<String, Vec<(RecordId, RouteRecord, u64)>>,
    /// gRPC batches, each with its record's size.
    grpc: Vec<(RecordId, Vec<u8>, u64)>,
}

impl Sorted {
    fn to_write(&self) -> u64 {
        (self.grpc.len() + self.by_route.values().map(Vec::len).sum::<usize>()) as u64
    }
}

/// Decodes records read back from `segment` and sorts them: to a route's writer, to the ingest
/// API, kept (no writer for them now; logged once per route in `kept_for`), or skipped.
fn sort_records(
    core: usize,
    segment: u64,
    indexes: Vec<u32>,
    records: Vec<Option<Vec<u8>>>,
    replay: &dyn Replay,
    kept_for: &mut BTreeSet<String>,
) -> Sorted {
    let mut sorted = Sorted::default();
    for (index, bytes) in indexes.into_iter().zip(records) {
        let id = RecordId { segment, index };
        let Some(bytes) = bytes else {
            tracing::error!(
                core,
                segment,
                index,
                "spool: record damaged after it was acknowledged; skipped"
            );
            sorted.skipped.push(id);
            continue;
        };
        let size = bytes.len() as u64;
        match record::decode(&bytes) {
            Ok(Record::Grpc(batch)) if replay.knows_grpc() => sorted.grpc.push((id, batch, size)),
            Ok(Record::Grpc(_)) => {
                if kept_for.insert(String::new()) {
                    tracing::warn!(core, "spool: gRPC batches kept (the ingest API is not configured)");
                }
            }
            Ok(Record::Route(message)) if replay.knows_route(&message.route) => sorted
                .by_route
                .entry(message.route.clone())
                .or_default()
                .push((id, message, size)),
            Ok(Record::Route(message)) => {
                if kept_for.insert(message.route.clone()) {
                    tracing::warn!(core, route = %message.route, "spool: records of a route not in the config; kept");
                }
            }
            Err(reason) => {
                tracing::error!(core, %reason, "spool: undecodable record skipped");
                sorted.skipped.push(id);
            }
        }
    }
    sorted
}

/// Hands sorted records to their writers, each chunk once the core's memory budget admits it;
/// `false` at stop.
async fn hand_over(sorted: Sorted, backlog: &Rc<Backlog>, replay: &dyn Replay, stop: &mut Stop) -> bool {
    for (id, batch, size) in sorted.grpc {
        let Some(held) = held_when_admitted(backlog, size, stop).await else {
            return false;
        };
        settle(backlog, 1);
        if let Some(write) = replay.grpc(batch, Spooled::replayed(vec![id], held)) {
            glommio::spawn_local(write).detach();
        }
    }
    for (route, messages) in sorted.by_route {
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            let chunk: Vec<_> = messages.by_ref().take(DRAIN_CHUNK).collect();
            let size = chunk.iter().map(|(_, _, size)| size).sum();
            let Some(held) = held_when_admitted(backlog, size, stop).await else {
                return false;
            };
            settle(backlog, chunk.len() as u64);
            let (ids, messages): (Vec<RecordId>, Vec<RouteRecord>) =
                chunk.into_iter().map(|(id, message, _)| (id, message)).unzip();
            if let Some(write) = replay.route(&route, messages, Spooled::replayed(ids, held)) {
                glommio::spawn_local(write).detach();
            }
        }
    }
    true
}

/// Counts `records` of the drain's current segment as no longer waiting.
fn settle(backlog: &Backlog, records: u64) {
    backlog.set_waiting(backlog.waiting.get().saturating_sub(records));
}

/// The oldest segment's deferred records, once there are any; `None` at stop.
async fn next_deferred(backlog: &Backlog, stop: &mut Stop) -> Option<(u64, Vec<u32>)> {
    loop {
        if stop.is_stopped() {
            return None;
        }
        if let Some((segment, mut indexes)) = backlog.deferred.borrow_mut().pop_first() {
            indexes.sort_unstable();
            return Some((segment, indexes));
        }
        wait_for_change(backlog, stop).await;
    }
}

/// Memory for `bytes` of drained records, once the core's budget admits them; `None` at stop.
async fn held_when_admitted(backlog: &Rc<Backlog>, bytes: u64, stop: &mut Stop) -> Option<Held> {
    loop {
        if stop.is_stopped() {
            return None;
        }
        if backlog.admits(bytes) {
            return Some(backlog.take(bytes));
        }
        wait_for_change(backlog, stop).await;
    }
}

async fn wait_for_change(backlog: &Backlog, stop: &mut Stop) {
    let changed = std::pin::pin!(backlog.changed.notified());
    let stopped = std::pin::pin!(stop.stopped());
    futures::future::select(changed, stopped).await;
}
