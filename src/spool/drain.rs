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

use bytes::Bytes;
use futures::future::LocalBoxFuture;

use super::frame::HEADER_BYTES;
use super::record::{self, Record, RouteRecord};
use super::service::{complete, core_backlog, core_spool, Backlog, CoreSpool, Held, Spooled};
use super::RecordId;
use crate::runtime::shutdown::Stop;

/// Most records read back and handed to writers at once.
const DRAIN_CHUNK_RECORDS: usize = 512;
/// Most bytes of records read back at once, or the core's memory budget if smaller (a chunk
/// holds at least one record, whatever its size): the chunk is admitted into the budget before
/// it is read.
const DRAIN_CHUNK_BYTES: u64 = 4 << 20;
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
    fn grpc(&self, batch: Bytes, spooled: Spooled) -> Option<LocalBoxFuture<'static, ()>>;
    /// Whether gRPC batches can be written (the ingest API is configured).
    fn knows_grpc(&self) -> bool;
}

/// Runs on core `core` until `stop`, handing deferred records to `replay`: a chunk at a time
/// (at most [`DRAIN_CHUNK_RECORDS`] records and [`DRAIN_CHUNK_BYTES`]), each admitted into the
/// core's memory budget before it is read, so what the drain holds stays within the budget.
pub async fn drain_on_core(core: usize, replay: Rc<dyn Replay>, mut stop: Stop) {
    let (Some(backlog), Some(spool)) = (core_backlog(), core_spool()) else {
        return;
    };
    let mut kept_for = BTreeSet::new();
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some((segment, indexes, bytes)) = next_chunk(&backlog, &spool, &mut stop).await else {
            return;
        };
        let Some(held) = held_when_admitted(&backlog, bytes, &mut stop).await else {
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
                drop(held);
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
        // Handed to a writer, kept for an absent one or skipped: none waits any more.
        settle(&backlog, indexes.len() as u64);
        let sorted = sort_records(core, segment, indexes, &records, &*replay, &mut kept_for);
        complete(&sorted.skipped).await;
        hand_over(sorted, held, &*replay);
    }
}

/// One chunk's records, sorted by who writes them.
#[derive(Default)]
struct Sorted {
    /// Damaged or undecodable: completed without a write (logged).
    skipped: Vec<RecordId>,
    /// Route messages by route, each with its record's frame bytes.
    by_route: BTreeMap<String, Vec<(RecordId, RouteRecord, u64)>>,
    /// gRPC batches, each with its record's frame bytes.
    grpc: Vec<(RecordId, Bytes, u64)>,
}

/// Decodes records read back from `segment` and sorts them: to a route's writer, to the ingest
/// API, kept (no writer for them now; logged once per route in `kept_for`), or skipped.
fn sort_records(
    core: usize,
    segment: u64,
    indexes: Vec<u32>,
    records: &[Option<Bytes>],
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
        let size = (bytes.len() + HEADER_BYTES) as u64;
        match record::decode(bytes) {
            Ok(Record::Grpc(batch)) if replay.knows_grpc() => sorted.grpc.push((id, batch, size)),
            Ok(Record::Grpc(_)) => {
                if kept_for.insert(String::new()) {
                    tracing::warn!(core, "spool: gRPC batches kept (the ingest API is not configured)");
                }
            }
            Ok(Record::Route { route, message }) if replay.knows_route(route) => {
                let entry = match sorted.by_route.get_mut(route) {
                    Some(entry) => entry,
                    None => sorted.by_route.entry(route.to_string()).or_default(),
                };
                entry.push((id, message, size));
            }
            Ok(Record::Route { route, .. }) => {
                if !kept_for.contains(route) {
                    kept_for.insert(route.to_string());
                    tracing::warn!(core, route, "spool: records of a route not in the config; kept");
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

/// Hands sorted records to their writers, each write with its records' share of the chunk's
/// memory (`held`; what kept and skipped records took returns now).
fn hand_over(sorted: Sorted, mut held: Held, replay: &dyn Replay) {
    for (id, batch, size) in sorted.grpc {
        if let Some(write) = replay.grpc(batch, Spooled::replayed(vec![id], held.split(size))) {
            glommio::spawn_local(write).detach();
        }
    }
    for (route, messages) in sorted.by_route {
        let size = messages.iter().map(|(_, _, size)| size).sum();
        let (ids, messages): (Vec<RecordId>, Vec<RouteRecord>) =
            messages.into_iter().map(|(id, message, _)| (id, message)).unzip();
        if let Some(write) = replay.route(&route, messages, Spooled::replayed(ids, held.split(size))) {
            glommio::spawn_local(write).detach();
        }
    }
}

/// Counts `records` of the drain's current chunk as no longer waiting.
fn settle(backlog: &Backlog, records: u64) {
    backlog.set_waiting(backlog.waiting.get().saturating_sub(records));
}

/// The next chunk of the oldest segment's deferred records, in order, and their frame bytes,
/// once there are any; `None` at stop.
async fn next_chunk(backlog: &Backlog, spool: &CoreSpool, stop: &mut Stop) -> Option<(u64, Vec<u32>, u64)> {
    loop {
        if stop.is_stopped() {
            return None;
        }
        let taken = {
            let mut deferred = backlog.deferred.borrow_mut();
            deferred.first_entry().map(|mut entry| {
                let indexes = entry.get_mut();
                let chunk: Vec<u32> = std::iter::from_fn(|| indexes.pop_first())
                    .take(DRAIN_CHUNK_RECORDS)
                    .collect();
                let segment = *entry.key();
                if entry.get().is_empty() {
                    entry.remove();
                }
                (segment, chunk)
            })
        };
        let Some((segment, mut indexes)) = taken else {
            wait_for_change(backlog, stop).await;
            continue;
        };
        // Within the byte bound (and the core's budget); what is over it goes back, to be
        // taken next.
        let bound = DRAIN_CHUNK_BYTES.min(backlog.held_max);
        let spool = spool.lock().await;
        let mut bytes = 0;
        let mut within = 0;
        for &index in &indexes {
            let frame = spool.frame_bytes(segment, &[index]).unwrap_or(0);
            if within > 0 && bytes + frame > bound {
                break;
            }
            bytes += frame;
            within += 1;
        }
        drop(spool);
        let over = indexes.split_off(within);
        if !over.is_empty() {
            backlog.deferred.borrow_mut().entry(segment).or_default().extend(over);
        }
        return Some((segment, indexes, bytes));
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
