//! The spool's per-core service: the one protocol every spooling caller follows (routes with
//! `ack = "spooled"`, gRPC batches with `ACK_MODE_SPOOLED`):
//!
//! 1. [`append`] / [`append_batch`]: the records join the core's next group commit (every caller
//!    that arrives while a sync is under way shares the next one) and come back [`Appended`]
//!    once durable — the caller acknowledges its source or answers its client then;
//! 2. [`Appended::hold`]: written from memory while the core's memory budget
//!    (`runtime.spool_memory_mib_per_core`) allows — [`Spooled`] — else left on disk for the
//!    drain (`spool::drain`) to read back once memory frees;
//! 3. [`Spooled::written`]: the caller wrote (or dead-lettered) them; the records complete, the
//!    memory returns, and appends waiting on a full spool are woken.
//!
//! One spool per core (`<runtime.spool_dir>/core-<n>`), opened on the core at start-up and
//! kept, with the rest of this service's per-core state ([`CoreService`]), in the core's context
//! (`runtime::context`). Threads: the owning core only (nothing here is `Send`).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use futures::lock::Mutex;

use super::frame::Framed;
use super::storage::DmaStorage;
use super::{RecordId, Spool, SpoolError, SpoolLimits};
use crate::config::SpoolConfig;

/// Longest an append waits on a full spool before it tries again anyway; it is woken as soon as
/// records complete (room may have freed), this only bounds a missed wake-up.
const FULL_WAIT_MAX: Duration = Duration::from_secs(1);
/// Longest wait between retries of a failing disk.
const IO_BACKOFF_MAX: Duration = Duration::from_secs(2);

pub(super) type CoreSpool = Rc<Mutex<Spool<DmaStorage>>>;

/// This service's state on one core, in the core's context (`runtime::context`).
#[derive(Default)]
struct CoreService {
    /// The core's spool, once opened.
    spool: RefCell<Option<CoreSpool>>,
    /// What the core still has to write from its spool, once opened.
    backlog: RefCell<Option<Rc<Backlog>>>,
    /// Woken whenever records of this core complete: appends waiting on a full spool retry.
    room: tokio::sync::Notify,
    /// Records waiting for the next group commit, and whether a commit task runs.
    commits: RefCell<(Vec<CommitRequest>, bool)>,
    /// This core's "spool full" lines.
    full_log: crate::telemetry::LogEvery,
    /// Group commits (appends with one sync) this core made.
    syncs: Cell<u64>,
}

fn service() -> Rc<CoreService> {
    crate::runtime::context::state::<CoreService>()
}

/// Waits until records of this core complete (room may have freed) or [`FULL_WAIT_MAX`] passes.
/// Registered before the caller's failed append returns, so no completion in between is missed.
async fn wait_for_room(room: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) {
    let _ = tokio::time::timeout(FULL_WAIT_MAX, room).await;
}

pub(super) fn core_spool() -> Option<CoreSpool> {
    service().spool.borrow().clone()
}

pub(super) fn core_backlog() -> Option<Rc<Backlog>> {
    service().backlog.borrow().clone()
}

/// Bytes in this core's live spool segments; `None` on a core without a spool, or while an
/// append holds the spool (the sampler tries again a second later). Never waits, so it never
/// holds the spool's `Rc` across a suspension that `close_on_core` could see.
pub fn live_bytes_on_core() -> Option<u64> {
    let spool = core_spool()?;
    let bytes = spool.try_lock()?.live_bytes();
    Some(bytes)
}

/// What a core still has to write from its spool. A spooled record is written from memory
/// while the bytes of such records stay under the core's budget (`held`); beyond it — the
/// database slow or away — its id waits here (`deferred`) and the record is read back from
/// disk once the budget frees, so memory stays bounded however long the database is away.
/// Records a previous run left start out deferred. Deferred records are written oldest
/// segment first, and while any wait, new records wait behind them.
pub(super) struct Backlog {
    /// Bytes of spooled records being written from memory.
    pub(super) held_bytes: Cell<u64>,
    /// The budget for `held_bytes`.
    pub(super) held_max: u64,
    /// Records that wait on disk only, by segment.
    pub(super) deferred: RefCell<BTreeMap<u64, BTreeSet<u32>>>,
    /// Records deferred and not yet handed to a writer (those taken by the drain included).
    pub(super) waiting: Cell<u64>,
    /// `shardgate_spool_deferred_records{core}` of this core: `waiting`, published.
    waiting_gauge: metrics::Gauge,
    /// Wakes the core's drain: records deferred or memory released.
    pub(super) changed: tokio::sync::Notify,
}

impl Backlog {
    /// Sets `waiting` (and its gauge) to `records`.
    pub(super) fn set_waiting(&self, records: u64) {
        self.waiting.set(records);
        self.waiting_gauge.set(records as f64);
    }

    pub(super) fn release(&self, bytes: u64) {
        self.held_bytes.set(self.held_bytes.get().saturating_sub(bytes));
        self.changed.notify_one();
    }

    pub(super) fn admits(&self, bytes: u64) -> bool {
        let held = self.held_bytes.get();
        held == 0 || held + bytes <= self.held_max
    }

    pub(super) fn take(self: &Rc<Self>, bytes: u64) -> Held {
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

impl Held {
    /// Moves `bytes` of this memory (at most what it holds) into a `Held` of their own, for
    /// records that are written apart from the others.
    pub(super) fn split(&mut self, bytes: u64) -> Held {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Held {
            backlog: Rc::clone(&self.backlog),
            bytes,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.backlog.release(self.bytes);
    }
}

/// Records durable in this core's spool, not yet written.
#[must_use = "durable records are written from memory (`hold`) or left to the drain"]
pub struct Appended {
    ids: Vec<RecordId>,
    bytes: u64,
}

impl Appended {
    /// Admits the records to be written from memory, or — the core's budget spent, or older
    /// records waiting on disk — leaves them on disk for the core's drain (`None`; the caller
    /// drops its copy).
    pub fn hold(self) -> Option<Spooled> {
        let admitted = core_backlog().filter(|backlog| backlog.waiting.get() == 0 && backlog.admits(self.bytes));
        let Some(backlog) = admitted else {
            defer(&self.ids);
            return None;
        };
        Some(Spooled {
            held: Some(backlog.take(self.bytes)),
            ids: self.ids,
        })
    }
}

/// Spooled records being written from memory. [`Spooled::written`] completes them; dropping it
/// unwritten (a core stopping) leaves them in the spool for the next start.
#[must_use = "spooled records complete only through `written`"]
pub struct Spooled {
    ids: Vec<RecordId>,
    held: Option<Held>,
}

impl Spooled {
    /// Records the drain read back, with the memory it admitted them under.
    pub(super) fn replayed(ids: Vec<RecordId>, held: Held) -> Spooled {
        Spooled { ids, held: Some(held) }
    }

    /// The records are written (or dead-lettered, or refused for good): complete them, return
    /// their memory, wake appends waiting for room.
    pub async fn written(mut self) {
        complete(&self.ids).await;
        drop(self.held.take());
    }
}

/// Leaves records `ids` (durable in this core's spool) on disk only; the core's drain writes
/// them once memory frees.
fn defer(ids: &[RecordId]) {
    let Some(backlog) = core_backlog() else {
        unreachable!("records are only deferred on cores whose spool is open");
    };
    let mut deferred = backlog.deferred.borrow_mut();
    for id in ids {
        deferred.entry(id.segment).or_default().insert(id.index);
    }
    backlog.set_waiting(backlog.waiting.get() + ids.len() as u64);
    backlog.changed.notify_one();
}

/// Opens core `core`'s spool and installs it for this thread; the records left by the previous
/// run are deferred: the drain (`spool::drain`) writes them.
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
    let service = service();
    *service.spool.borrow_mut() = Some(Rc::new(Mutex::new(spool)));
    *service.backlog.borrow_mut() = Some(Rc::new(Backlog {
        held_bytes: Cell::new(0),
        held_max: config.memory_bytes_per_core,
        deferred: RefCell::new(BTreeMap::new()),
        waiting: Cell::new(0),
        waiting_gauge: metrics::gauge!(crate::telemetry::metric::SPOOL_DEFERRED_RECORDS, "core" => core.to_string()),
        changed: tokio::sync::Notify::new(),
    }));
    defer(&replay);
    Ok(())
}

/// Appends records and waits until they are durable: retries while the spool is full (the
/// caller's source pauses meanwhile) or the disk fails (logged), so it returns only with
/// every record synced.
pub async fn append(route: &str, records: Framed) -> Appended {
    let bytes = records.bytes().len() as u64;
    let records = Rc::new(records);
    let mut backoff = Duration::from_millis(50);
    let service = service();
    loop {
        let notified = service.room.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        match commit(Rc::clone(&records)).await {
            Ok(ids) => return Appended { ids, bytes },
            Err(SpoolError::Full { live_bytes, cap_bytes }) => {
                // Every batch in flight meets the cap; one line per core every 10 s says it.
                if service.full_log.due(Duration::from_secs(10)).is_some() {
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
    records: Rc<Framed>,
    done: futures::channel::oneshot::Sender<Result<Vec<RecordId>, SpoolError>>,
}

/// Makes `records` durable in this core's spool in a group commit: every caller that arrives
/// while a sync is under way joins the next one, so concurrent batches share one sync. Returns
/// the records' ids, or why they are not durable.
async fn commit(records: Rc<Framed>) -> Result<Vec<RecordId>, SpoolError> {
    // A bad record fails only its own caller, never the group it would have joined.
    if let Some(length) = records.refused() {
        return Err(SpoolError::TooLarge(length));
    }
    let (done, answer) = futures::channel::oneshot::channel();
    let start = {
        let service = service();
        let mut commits = service.commits.borrow_mut();
        commits.0.push(CommitRequest { records, done });
        !std::mem::replace(&mut commits.1, true)
    };
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
    let service = service();
    let spool = service.spool.borrow().clone();
    loop {
        let requests = {
            let mut commits = service.commits.borrow_mut();
            let requests = std::mem::take(&mut commits.0);
            if requests.is_empty() {
                commits.1 = false;
            }
            requests
        };
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
        let batches: Vec<&Framed> = requests.iter().map(|request| &*request.records).collect();
        let result = spool.append(&batches).await;
        drop(batches);
        service.syncs.set(service.syncs.get() + 1);
        metrics::counter!(crate::telemetry::metric::SPOOL_COMMITS).increment(1);
        match result {
            Ok(mut ids) => {
                for request in requests.into_iter().rev() {
                    let mine = ids.split_off(ids.len() - request.records.records());
                    let _ = request.done.send(Ok(mine));
                }
            }
            Err(SpoolError::Full { .. }) if requests.len() > 1 => {
                // Together over the cap: each on its own, as many as fit.
                for request in requests {
                    let result = spool.append(&[&*request.records]).await;
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
    service().spool.borrow().is_some()
}

/// What [`append_batch`] does when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Return [`SpoolError::Full`] (unary gRPC calls answer RESOURCE_EXHAUSTED).
    Refuse,
    /// Wait for room (gRPC streams: backpressure instead of ending the stream).
    Wait,
}

/// Appends records (a gRPC batch's one) in the core's next group commit; a disk failure is
/// returned (the gRPC path answers UNAVAILABLE), a full spool per `when_full`.
pub async fn append_batch(record: Framed, when_full: WhenFull) -> Result<Appended, SpoolError> {
    let bytes = record.bytes().len() as u64;
    let record = Rc::new(record);
    let service = service();
    loop {
        let notified = service.room.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        match commit(Rc::clone(&record)).await {
            Err(SpoolError::Full { .. }) if when_full == WhenFull::Wait => wait_for_room(notified).await,
            Ok(ids) => return Ok(Appended { ids, bytes }),
            Err(error) => return Err(error),
        }
    }
}

/// Marks records written.
pub(super) async fn complete(ids: &[RecordId]) {
    let Some(spool) = core_spool() else {
        return;
    };
    let mut spool = spool.lock().await;
    for id in ids {
        spool.complete(*id).await;
    }
    drop(spool);
    service().room.notify_waiters();
}

/// Seals this core's spool at shutdown (outstanding records replay on the next start).
pub async fn close_on_core() {
    let taken = service().spool.borrow_mut().take();
    let Some(spool) = taken else {
        return;
    };
    if let Ok(spool) = Rc::try_unwrap(spool) {
        spool.into_inner().close().await;
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
                            let mut framed = Framed::default();
                            records.iter().for_each(|record| framed.push(record));
                            (records, append("test", framed).await.ids)
                        })
                    })
                    .collect();
                let outcomes = futures::future::join_all(callers).await;
                let syncs = service().syncs.get();
                assert!(syncs < 16, "16 concurrent callers took {syncs} syncs");
                let spool = core_spool().expect("open");
                let spool = spool.lock().await;
                for (records, ids) in outcomes {
                    assert_eq!(ids.len(), 3);
                    for (record, id) in records.into_iter().zip(ids) {
                        let back = spool.read(id.segment, &[id.index]).await.expect("read");
                        assert_eq!(back, vec![Some(record.into())]);
                    }
                }
                drop(spool);
                let mut empty = Framed::default();
                empty.push(b"");
                let too_large = append_batch(empty, WhenFull::Refuse).await.map(|appended| appended.ids);
                assert!(matches!(too_large, Err(SpoolError::TooLarge(0))), "{too_large:?}");
                close_on_core().await;
            })
            .expect("executor")
            .join()
            .expect("join");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
