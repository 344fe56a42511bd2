//! Routes with `ack = "spooled"`: the receiving core appends each batch of source messages to
//! its spool (one group commit), acknowledges the source once the sync returns, then maps and
//! writes the rows as any route does and completes the records once they are written or
//! dead-lettered. After a crash, the core's spool replays what was acknowledged but not yet
//! written through the same route (`replay_on_core`). NATS core and ZeroMQ routes become
//! at-least-once from the moment of receipt; Kafka, JetStream and RabbitMQ routes acknowledge
//! at disk speed and keep flowing while the database is down, up to the spool's cap.
//!
//! One spool per core (`<runtime.spool_dir>/core-<n>`), opened on the core at start-up and
//! reached through a thread-local; the records are `schemas/spool_record.fbs`.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use futures::lock::Mutex;

use super::dead_letter::headers;
use super::route::{Origin, SourceMessage};
use crate::config::SpoolConfig;
use crate::spool::storage::DmaStorage;
use crate::spool::{RecordId, Spool, SpoolError, SpoolLimits};

#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, clippy::expect_used, missing_docs, unused_imports, dead_code, mismatched_lifetime_syntaxes)]
#[path = "spool_record_generated.rs"]
mod spool_record_generated;
use spool_record_generated::shardgate::spool as fb;

/// Longest an append waits on a full spool before it tries again anyway; it is woken as soon as
/// records complete (room may have freed), this only bounds a missed wake-up.
const FULL_WAIT_MAX: Duration = Duration::from_secs(1);
/// Longest wait between retries of a failing disk.
const IO_BACKOFF_MAX: Duration = Duration::from_secs(2);

type CoreSpool = Rc<Mutex<Spool<DmaStorage>>>;

thread_local! {
    static SPOOL: RefCell<Option<CoreSpool>> = const { RefCell::new(None) };
    static BACKLOG: RefCell<Option<Rc<Backlog>>> = const { RefCell::new(None) };
    /// Woken whenever records of this core complete: appends waiting on a full spool retry.
    static ROOM: Rc<tokio::sync::Notify> = Rc::new(tokio::sync::Notify::new());
}

/// Waits until records of this core complete (room may have freed) or [`FULL_WAIT_MAX`] passes.
/// Registered before the caller's failed append returns, so no completion in between is missed.
async fn wait_for_room(room: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) {
    let _ = tokio::time::timeout(FULL_WAIT_MAX, room).await;
}

fn core_spool() -> Option<CoreSpool> {
    SPOOL.with(|s| s.borrow().clone())
}

fn core_backlog() -> Option<Rc<Backlog>> {
    BACKLOG.with(|b| b.borrow().clone())
}

/// What a core still has to write from its spool. A spooled record is written from memory
/// while the bytes of such records stay under the core's budget (`held`); beyond it — the
/// database slow or away — its id waits here (`deferred`) and the record is read back from
/// disk once the budget frees, so memory stays bounded however long the database is away.
/// Records a previous run left start out deferred. Deferred records are written oldest
/// segment first, and while any wait, new records wait behind them.
struct Backlog {
    /// Bytes of spooled records being written from memory.
    held_bytes: Cell<u64>,
    /// The budget for `held_bytes`.
    held_max: u64,
    /// Records that wait on disk only, by segment.
    deferred: RefCell<BTreeMap<u64, Vec<u32>>>,
    /// Records deferred and not yet handed to a writer (those taken by the drain included).
    waiting: Cell<u64>,
    /// Wakes the core's drain: records deferred or memory released.
    changed: tokio::sync::Notify,
}

impl Backlog {
    fn release(&self, bytes: u64) {
        self.held_bytes.set(self.held_bytes.get().saturating_sub(bytes));
        self.changed.notify_one();
    }

    fn admits(&self, bytes: u64) -> bool {
        let held = self.held_bytes.get();
        held == 0 || held + bytes <= self.held_max
    }

    fn take(self: &Rc<Self>, bytes: u64) -> Held {
        self.held_bytes.set(self.held_bytes.get() + bytes);
        Held {
            backlog: Rc::clone(self),
            bytes,
        }
    }
}

/// Memory of spooled records being written; dropping it returns the bytes to the core's
/// budget.
pub struct Held {
    backlog: Rc<Backlog>,
    bytes: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.backlog.release(self.bytes);
    }
}

/// Admits `bytes` of records just appended to this core's spool to be written from memory;
/// `None` when the core's budget is spent or older records wait on disk: then [`defer`] their
/// ids and drop the records.
pub fn hold(bytes: u64) -> Option<Held> {
    let backlog = core_backlog()?;
    if backlog.waiting.get() > 0 || !backlog.admits(bytes) {
        return None;
    }
    Some(backlog.take(bytes))
}

/// Leaves records `ids` (durable in this core's spool) on disk only; the core's drain writes
/// them once memory frees.
pub fn defer(ids: &[RecordId]) {
    let Some(backlog) = core_backlog() else {
        unreachable!("records are only deferred on cores whose spool is open");
    };
    let mut deferred = backlog.deferred.borrow_mut();
    for id in ids {
        deferred.entry(id.segment).or_default().push(id.index);
    }
    backlog.waiting.set(backlog.waiting.get() + ids.len() as u64);
    metrics::gauge!(crate::telemetry::metric::SPOOL_DEFERRED_RECORDS).increment(ids.len() as f64);
    backlog.changed.notify_one();
}

/// Opens core `core`'s spool and installs it for this thread; the records left by the previous
/// run are deferred: [`drain_on_core`] writes them.
pub async fn open_on_core(config: &SpoolConfig, core: usize) -> Result<(), String> {
    let dir = config.dir.join(format!("core-{core}"));
    let storage = DmaStorage::new(dir.clone()).map_err(|e| format!("spool directory `{}`: {e}", dir.display()))?;
    let limits = SpoolLimits {
        segment_bytes_max: config.segment_bytes,
        cap_bytes: config.cap_bytes_per_core,
    };
    let (spool, replay, recovery) = Spool::open(storage, limits)
        .await
        .map_err(|e| format!("spool `{}`: {e}", dir.display()))?;
    if recovery.records > 0 || !recovery.torn.is_empty() {
        tracing::info!(
            core,
            segments = recovery.segments,
            records = recovery.records,
            torn_tails = recovery.torn.len(),
            "spool: replaying records left by the previous run"
        );
    }
    if core == 0 {
        // glommio probes each block device once for polled IO (io_uring IOPOLL) and logs an
        // ERROR when the probe read fails, as it does on most virtual disks; it then uses
        // interrupt-driven IO, which is correct. The filter in `telemetry::init_logging` hides
        // that line; this says it once, at INFO.
        tracing::info!(
            dir = %config.dir.display(),
            "spool open; on disks without polled IO (most virtual disks) glommio uses interrupt-driven IO, which is expected"
        );
    }
    SPOOL.with(|s| *s.borrow_mut() = Some(Rc::new(Mutex::new(spool))));
    BACKLOG.with(|b| {
        *b.borrow_mut() = Some(Rc::new(Backlog {
            held_bytes: Cell::new(0),
            held_max: config.memory_bytes_per_core,
            deferred: RefCell::new(BTreeMap::new()),
            waiting: Cell::new(0),
            changed: tokio::sync::Notify::new(),
        }))
    });
    defer(&replay);
    Ok(())
}

/// Appends records and waits until they are durable: retries while the spool is full (the
/// caller's source pauses meanwhile) or the disk fails (logged), so it returns only with
/// every record synced.
pub async fn append(route: &str, records: Vec<Vec<u8>>) -> Vec<RecordId> {
    let records = Rc::new(records);
    let mut backoff = Duration::from_millis(50);
    let room = ROOM.with(Rc::clone);
    loop {
        let notified = room.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        match commit(Rc::clone(&records)).await {
            Ok(ids) => return ids,
            Err(SpoolError::Full { live_bytes, cap_bytes }) => {
                // Every batch in flight meets the cap; one line per core every 10 s says it.
                if FULL_LOG.with(|log| log.due(Duration::from_secs(10))).is_some() {
                    tracing::warn!(
                        route,
                        live_bytes,
                        cap_bytes,
                        "spool full: the route waits for rows to be written"
                    );
                }
                wait_for_room(notified).await;
            }
            Err(error) => {
                tracing::error!(route, %error, "spool append failed; retrying (the source is not acknowledged)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(IO_BACKOFF_MAX);
            }
        }
    }
}

/// One caller's records waiting for the core's next group commit.
struct CommitRequest {
    records: Rc<Vec<Vec<u8>>>,
    done: futures::channel::oneshot::Sender<Result<Vec<RecordId>, SpoolError>>,
}

thread_local! {
    /// Records waiting for the next group commit, and whether a commit task runs.
    static COMMITS: RefCell<(Vec<CommitRequest>, bool)> = const { RefCell::new((Vec::new(), false)) };
    /// This core's "spool full" lines.
    static FULL_LOG: crate::telemetry::LogEvery = const { crate::telemetry::LogEvery::new() };
    /// Group commits (appends with one sync) this core made.
    static SYNCS: Cell<u64> = const { Cell::new(0) };
}

/// Makes `records` durable in this core's spool in a group commit: every caller that arrives
/// while a sync is under way joins the next one, so concurrent batches share one sync. Returns
/// the records' ids, or why they are not durable.
async fn commit(records: Rc<Vec<Vec<u8>>>) -> Result<Vec<RecordId>, SpoolError> {
    // A bad record fails only its own caller, never the group it would have joined.
    if let Some(bad) = records
        .iter()
        .find(|r| r.is_empty() || r.len() > crate::spool::frame::RECORD_BYTES_MAX)
    {
        return Err(SpoolError::TooLarge(bad.len()));
    }
    let (done, answer) = futures::channel::oneshot::channel();
    let start = COMMITS.with(|c| {
        let mut commits = c.borrow_mut();
        commits.0.push(CommitRequest { records, done });
        !std::mem::replace(&mut commits.1, true)
    });
    if start {
        glommio::spawn_local(run_commits()).detach();
    }
    answer.await.unwrap_or_else(|_| {
        Err(SpoolError::Io {
            operation: "commit",
            segment: String::new(),
            source: std::io::Error::other("the core stopped before the commit"),
        })
    })
}

/// The core's commit task: takes every waiting request, appends them all with one sync, answers
/// each, and repeats until none wait.
async fn run_commits() {
    let spool = core_spool();
    loop {
        let requests = COMMITS.with(|c| {
            let mut commits = c.borrow_mut();
            let requests = std::mem::take(&mut commits.0);
            if requests.is_empty() {
                commits.1 = false;
            }
            requests
        });
        if requests.is_empty() {
            return;
        }
        let Some(spool) = &spool else {
            // The spool is closed (shutdown): nothing more is durable.
            for request in requests {
                let closed = SpoolError::Io {
                    operation: "commit",
                    segment: String::new(),
                    source: std::io::Error::other("the spool is closed"),
                };
                let _ = request.done.send(Err(closed));
            }
            continue;
        };
        let mut spool = spool.lock().await;
        let refs: Vec<&[u8]> = requests
            .iter()
            .flat_map(|r| r.records.iter().map(Vec::as_slice))
            .collect();
        let result = spool.append(&refs).await;
        drop(refs);
        SYNCS.with(|syncs| syncs.set(syncs.get() + 1));
        metrics::counter!(crate::telemetry::metric::SPOOL_COMMITS).increment(1);
        match result {
            Ok(mut ids) => {
                for request in requests.into_iter().rev() {
                    let mine = ids.split_off(ids.len() - request.records.len());
                    let _ = request.done.send(Ok(mine));
                }
            }
            Err(SpoolError::Full { .. }) if requests.len() > 1 => {
                // Together over the cap: each on its own, as many as fit.
                for request in requests {
                    let refs: Vec<&[u8]> = request.records.iter().map(Vec::as_slice).collect();
                    let result = spool.append(&refs).await;
                    drop(refs);
                    let _ = request.done.send(result);
                }
            }
            Err(error) => {
                for request in requests {
                    let _ = request.done.send(Err(same_error(&error)));
                }
            }
        }
    }
}

/// A copy of `error` for each caller of a failed group commit.
fn same_error(error: &SpoolError) -> SpoolError {
    match error {
        SpoolError::Full { live_bytes, cap_bytes } => SpoolError::Full {
            live_bytes: *live_bytes,
            cap_bytes: *cap_bytes,
        },
        SpoolError::TooLarge(bytes) => SpoolError::TooLarge(*bytes),
        SpoolError::Io {
            operation,
            segment,
            source,
        } => SpoolError::Io {
            operation,
            segment: segment.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
    }
}

/// Whether this core's spool is open (routes or the ingest API may spool).
pub fn is_open() -> bool {
    SPOOL.with(|s| s.borrow().is_some())
}

/// What [`append_record`] does when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Return [`SpoolError::Full`] (unary gRPC calls answer RESOURCE_EXHAUSTED).
    Refuse,
    /// Wait for room (gRPC streams: backpressure instead of ending the stream).
    Wait,
}

/// Appends one record in the core's next group commit; a disk failure is returned (the gRPC
/// path answers UNAVAILABLE), a full spool per `when_full`.
pub async fn append_record(record: Vec<u8>, when_full: WhenFull) -> Result<Vec<RecordId>, SpoolError> {
    let record = Rc::new(vec![record]);
    let room = ROOM.with(Rc::clone);
    loop {
        let notified = room.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        match commit(Rc::clone(&record)).await {
            Err(SpoolError::Full { .. }) if when_full == WhenFull::Wait => wait_for_room(notified).await,
            other => return other,
        }
    }
}

/// Route name of spool records that hold a gRPC batch (no route may be named "").
const GRPC_RECORD: &str = "";

/// Encodes a gRPC batch (rows already validated, write timestamp resolved) as a spool record.
pub fn encode_row_batch(batch: &crate::ingest::proto::RowBatch) -> Vec<u8> {
    let work = SourceMessage {
        position: 0,
        timestamp_ms: None,
        write_timestamp_us: Some(batch.timestamp_us),
        key: None,
        headers: Vec::new(),
        payload: Some(prost::Message::encode_to_vec(batch)),
        origin: Origin::Spooled {
            coordinates: Vec::new(),
            partition: None,
        },
    };
    encode(GRPC_RECORD, &work, &[])
}

/// Marks records written.
pub async fn complete(ids: &[RecordId]) {
    let Some(spool) = core_spool() else {
        return;
    };
    let mut spool = spool.lock().await;
    for id in ids {
        spool.complete(*id).await;
    }
    drop(spool);
    ROOM.with(|room| room.notify_waiters());
}

/// Seals this core's spool at shutdown (outstanding records replay on the next start).
pub async fn close_on_core() {
    let Some(spool) = SPOOL.with(|s| s.borrow_mut().take()) else {
        return;
    };
    if let Ok(spool) = Rc::try_unwrap(spool) {
        spool.into_inner().close().await;
    }
}

/// Encodes a message of `route` as a spool record.
pub fn encode(route: &str, work: &SourceMessage, coordinates: &[(&'static str, String)]) -> Vec<u8> {
    let mut builder = flatbuffers::FlatBufferBuilder::with_capacity(
        64 + work.payload.as_ref().map_or(0, Vec::len) + work.key.as_ref().map_or(0, Vec::len),
    );
    let route = builder.create_string(route);
    let key = work.key.as_ref().map(|k| builder.create_vector(k));
    let payload = work.payload.as_ref().map(|p| builder.create_vector(p));
    let headers = pairs(&mut builder, work.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let coordinates = pairs(&mut builder, coordinates.iter().map(|(n, v)| (*n, v.as_str())));
    let record = fb::SpoolRecord::create(
        &mut builder,
        &fb::SpoolRecordArgs {
            route: Some(route),
            key,
            payload,
            headers: Some(headers),
            coordinates: Some(coordinates),
            position: work.position,
            timestamp_ms: work.timestamp_ms,
            write_timestamp_us: Some(work.write_timestamp_us()),
            partition: work.partition(),
        },
    );
    builder.finish(record, None);
    builder.finished_data().to_vec()
}

type Pairs<'b> = flatbuffers::WIPOffset<flatbuffers::Vector<'b, flatbuffers::ForwardsUOffset<fb::Pair<'b>>>>;

fn pairs<'n, 'b>(
    builder: &mut flatbuffers::FlatBufferBuilder<'b>,
    items: impl Iterator<Item = (&'n str, &'n str)>,
) -> Pairs<'b> {
    let offsets: Vec<_> = items
        .map(|(name, value)| {
            let name = builder.create_string(name);
            let value = builder.create_string(value);
            fb::Pair::create(
                builder,
                &fb::PairArgs {
                    name: Some(name),
                    value: Some(value),
                },
            )
        })
        .collect();
    builder.create_vector(&offsets)
}

/// Decodes a spool record into its route's name and a message with a spooled origin (nothing
/// left to acknowledge).
pub fn decode(bytes: &[u8]) -> Result<(String, SourceMessage), String> {
    let record = flatbuffers::root::<fb::SpoolRecord>(bytes).map_err(|e| format!("not a spool record: {e}"))?;
    let route = record.route().ok_or("spool record without a route")?.to_string();
    let pairs = |list: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::Pair<'_>>>>| {
        list.into_iter()
            .flatten()
            .filter_map(|p| Some((p.name()?.to_string(), p.value()?.to_string())))
            .collect::<Vec<_>>()
    };
    let coordinates = pairs(record.coordinates())
        .into_iter()
        .filter_map(|(name, value)| {
            let name = headers::SOURCE_COORDINATES.iter().find(|n| **n == name)?;
            Some((*name, value))
        })
        .collect();
    Ok((
        route,
        SourceMessage {
            position: record.position(),
            timestamp_ms: record.timestamp_ms(),
            write_timestamp_us: record.write_timestamp_us(),
            key: record.key().map(|k| k.bytes().to_vec()),
            headers: pairs(record.headers()),
            payload: record.payload().map(|p| p.bytes().to_vec()),
            origin: Origin::Spooled {
                coordinates,
                partition: record.partition(),
            },
        },
    ))
}

/// Runs on core `core` until `stop`: writes the records that wait on disk only (left by the
/// previous run, or deferred while the core's memory budget was spent) through their routes or
/// the ingest API, oldest segment first, each chunk once the budget admits it, completing each
/// record once written. Records of routes no longer configured stay in the spool (logged) until
/// such a route returns; an unreadable or undecodable record is logged and skipped.
pub async fn drain_on_core(
    core: usize,
    writers: std::collections::HashMap<String, std::sync::Arc<super::route::RouteWriter>>,
    ingest: Option<crate::ingest::service::IngestService>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (Some(backlog), Some(spool)) = (core_backlog(), core_spool()) else {
        return;
    };
    let mut unknown_routes = std::collections::BTreeSet::new();
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
        let mut skipped = Vec::new();
        let mut by_route: BTreeMap<String, Vec<(RecordId, SourceMessage, u64)>> = BTreeMap::new();
        let mut grpc = Vec::new();
        for (index, record) in indexes.into_iter().zip(records) {
            let id = RecordId { segment, index };
            let Some(record) = record else {
                tracing::error!(
                    core,
                    segment,
                    index,
                    "spool: record damaged after it was acknowledged; skipped"
                );
                skipped.push(id);
                continue;
            };
            let bytes = record.len() as u64;
            match decode(&record) {
                Ok((route, message)) if route == GRPC_RECORD => match (&ingest, message.payload.as_deref()) {
                    (Some(_), Some(payload)) => {
                        match <crate::ingest::proto::RowBatch as prost::Message>::decode(payload) {
                            Ok(batch) => grpc.push((id, batch, bytes)),
                            Err(error) => {
                                tracing::error!(core, %error, "spool: undecodable gRPC batch skipped");
                                skipped.push(id);
                            }
                        }
                    }
                    _ => {
                        if unknown_routes.insert(route) {
                            tracing::warn!(core, "spool: gRPC batches kept (the ingest API is not configured)");
                        }
                    }
                },
                Ok((route, message)) if writers.contains_key(&route) => {
                    by_route.entry(route).or_default().push((id, message, bytes))
                }
                Ok((route, _)) => {
                    if unknown_routes.insert(route.clone()) {
                        tracing::warn!(core, %route, "spool: records of a route not in the config; kept");
                    }
                }
                Err(reason) => {
                    tracing::error!(core, %reason, "spool: undecodable record skipped");
                    skipped.push(id);
                }
            }
        }
        // Records kept for an absent route stay in the spool, no longer waiting.
        let to_write = (grpc.len() + by_route.values().map(Vec::len).sum::<usize>()) as u64;
        settle(&backlog, taken - to_write);
        complete(&skipped).await;
        for (id, batch, bytes) in grpc {
            let Some(held) = held_when_admitted(&backlog, bytes, &mut stop).await else {
                return;
            };
            settle(&backlog, 1);
            let Some(service) = ingest.clone() else {
                unreachable!("gRPC records are only taken with the ingest API configured");
            };
            glommio::spawn_local(async move {
                service.write_spooled(batch, vec![id]).await;
                drop(held);
            })
            .detach();
        }
        for (route, records) in by_route {
            let writer = &writers[&route];
            let mut records = records.into_iter().peekable();
            while records.peek().is_some() {
                let chunk: Vec<_> = records.by_ref().take(DRAIN_CHUNK).collect();
                let bytes = chunk.iter().map(|(_, _, bytes)| bytes).sum();
                let Some(held) = held_when_admitted(&backlog, bytes, &mut stop).await else {
                    return;
                };
                settle(&backlog, chunk.len() as u64);
                let (ids, batch): (Vec<RecordId>, Vec<SourceMessage>) =
                    chunk.into_iter().map(|(id, message, _)| (id, message)).unzip();
                let writer = std::sync::Arc::clone(writer);
                glommio::spawn_local(async move {
                    writer.write_replayed(core, batch, ids).await;
                    drop(held);
                })
                .detach();
            }
        }
    }
}

/// At shutdown, after the sources stopped: waits up to `deadline` for the spooled records this
/// core is writing from memory. Whatever is unwritten then, and every deferred record, stays in
/// the spool and is written after the next start (logged).
pub async fn finish_on_core(core: usize, deadline: Duration) {
    let Some(backlog) = core_backlog() else {
        return;
    };
    let until = std::time::Instant::now() + deadline;
    while backlog.held_bytes.get() > 0 && std::time::Instant::now() < until {
        let changed = std::pin::pin!(backlog.changed.notified());
        let tick = std::pin::pin!(tokio::time::sleep(Duration::from_millis(100)));
        futures::future::select(changed, tick).await;
    }
    let (writing_bytes, deferred) = (backlog.held_bytes.get(), backlog.waiting.get());
    if writing_bytes > 0 || deferred > 0 {
        tracing::info!(
            core,
            writing_bytes,
            deferred,
            "spool: unwritten records stay in the spool and are written after the next start"
        );
    }
}

/// Records handed to a writer per chunk of the drain.
const DRAIN_CHUNK: usize = 512;

/// Counts `records` of the drain's current segment as no longer waiting.
fn settle(backlog: &Backlog, records: u64) {
    backlog.waiting.set(backlog.waiting.get().saturating_sub(records));
    metrics::gauge!(crate::telemetry::metric::SPOOL_DEFERRED_RECORDS).decrement(records as f64);
}

/// The oldest segment's deferred records, once there are any; `None` at stop.
async fn next_deferred(backlog: &Backlog, stop: &mut tokio::sync::watch::Receiver<bool>) -> Option<(u64, Vec<u32>)> {
    loop {
        if *stop.borrow() {
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
async fn held_when_admitted(
    backlog: &Rc<Backlog>,
    bytes: u64,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<Held> {
    loop {
        if *stop.borrow() {
            return None;
        }
        if backlog.admits(bytes) {
            return Some(backlog.take(bytes));
        }
        wait_for_change(backlog, stop).await;
    }
}

async fn wait_for_change(backlog: &Backlog, stop: &mut tokio::sync::watch::Receiver<bool>) {
    let changed = std::pin::pin!(backlog.changed.notified());
    let stopped = std::pin::pin!(stop.changed());
    futures::future::select(changed, stopped).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent appends on one core share group commits; each caller gets the ids of its own
    /// records, which read back as what it appended.
    #[test]
    fn concurrent_appends_share_one_sync_and_keep_their_records() {
        let dir = std::env::temp_dir().join(format!("shardgate-group-commit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = SpoolConfig {
            dir: dir.clone(),
            segment_bytes: 1 << 20,
            cap_bytes_per_core: 1 << 30,
            memory_bytes_per_core: 1 << 20,
        };
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                open_on_core(&config, 0).await.expect("open");
                let callers: Vec<_> = (0..16u8)
                    .map(|caller| {
                        glommio::spawn_local(async move {
                            let records: Vec<Vec<u8>> = (0..3u8).map(|i| vec![caller, i, 7]).collect();
                            (records.clone(), append("test", records).await)
                        })
                    })
                    .collect();
                let outcomes = futures::future::join_all(callers).await;
                let syncs = SYNCS.with(Cell::get);
                assert!(syncs < 16, "16 concurrent callers took {syncs} syncs");
                let spool = core_spool().expect("open");
                let spool = spool.lock().await;
                for (records, ids) in outcomes {
                    assert_eq!(ids.len(), 3);
                    for (record, id) in records.into_iter().zip(ids) {
                        let back = spool.read(id.segment, &[id.index]).await.expect("read");
                        assert_eq!(back, vec![Some(record)]);
                    }
                }
                drop(spool);
                let too_large = append_record(Vec::new(), WhenFull::Refuse).await;
                assert!(matches!(too_large, Err(SpoolError::TooLarge(0))), "{too_large:?}");
                close_on_core().await;
            })
            .expect("executor")
            .join()
            .expect("join");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_round_trip_every_field() {
        let work = SourceMessage {
            position: 42,
            timestamp_ms: Some(1_700_000_000_000),
            write_timestamp_us: Some(1_700_000_000_000_123),
            key: Some(b"k".to_vec()),
            headers: vec![("tenant".into(), "acme".into())],
            payload: None,
            origin: Origin::Nats {
                subject: "orders.created".into(),
            },
        };
        let coordinates = vec![(headers::SOURCE_SUBJECT, "orders.created".to_string())];
        let bytes = encode("orders", &work, &coordinates);
        let (route, back) = decode(&bytes).expect("decodes");
        assert_eq!(route, "orders");
        assert_eq!(
            (back.position, back.timestamp_ms, back.write_timestamp_us),
            (42, Some(1_700_000_000_000), Some(1_700_000_000_000_123))
        );
        assert_eq!(back.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(back.payload, None, "a tombstone stays a tombstone");
        assert_eq!(back.headers, work.headers);
        assert!(matches!(back.origin, Origin::Spooled { ref coordinates, partition: None } if coordinates.len() == 1));
        assert!(decode(b"garbage!").is_err());
    }
}
