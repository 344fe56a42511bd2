//! Stream rollups inside `serve`: a stream job taps its Kafka routes (`bridge::tap`) and folds
//! each message's mapped rows on the core that maps it — no second consumer, no second mapping.
//!
//! **State per (route, partition)**, on the core that maps the partition: the partition's next
//! offset, its largest event time and its open windows ([`Part`]), stored in `job_windows` by
//! the same conditional batches as the job's own consumer uses (`super::stream`), so a job may
//! move between `job run` and `serve` and keep its counts.
//!
//! **Durable before acknowledged**: every `checkpoint` the island task writes each changed part
//! (one conditional batch, applied only if the stored offset is still the one this gateway
//! loaded or wrote); the route's poll thread stores no offset of the partition beyond what is
//! durable. A `kill -9` therefore re-reads what was folded and not yet durable, and a message
//! below a part's stored offset is skipped (counted already): nothing is lost or counted twice.
//!
//! **Assignments and rewinds**: the first message of a partition in a new assignment epoch
//! starts loading its stored part; messages arriving meanwhile wait beside it (bounded). If the
//! part's stored offset lies behind the first message seen (the job was cancelled, or added to
//! a running route, or a gateway stored offsets without the tap) the part asks its route to
//! read the partition again from there. A checkpoint refused (another gateway moved the part on)
//! stops the part and asks for the same; messages of a stale epoch are ignored.
//!
//! **Control**: paused, the job folds and checkpoints on (its routes must not run ahead of it)
//! but closes no window; cancelled, it stops folding, checkpoints and lets go of its routes'
//! offsets — started again, its parts read on from their stored offsets; stopped with the
//! gateway, it checkpoints and keeps holding the offsets at what it made durable.
//!
//! Threads: [`RouteTap::fold`] on the cores; [`RouteTap::durable`] and [`RouteTap::rewinds`] on
//! the routes' poll threads; [`run`] on the island.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use scylla::client::session::Session;

use super::signal::{next_command, Command, Signal};
use super::stream::{part_name, route_columns, row_of, Part, StreamReport, Windows};
use super::{Compiled, Fold, Positions};
use crate::bridge::message::SourceMessage;
use crate::bridge::tap::{Rewind, Tap};
use crate::client::GatewayAddr;
use crate::config::{JobConfig, RouteConfig};
use crate::mapping::{MappedRow, ReasonCode, RouteMapper};
use crate::sink::dead_letter::{headers, DeadLetter};
use crate::telemetry::metric;
use crate::wire::proto::Row;

/// Messages a part keeps while its stored state loads; beyond, it reads them again later.
const PENDING_MESSAGES_MAX: usize = 100_000;
/// Least time between two warnings of a failing checkpoint, load or close.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// A stream job's columns of one of its routes.
struct RouteColumns {
    /// Route name (the part names' prefix).
    route: String,
    /// Its topic (dead-letter headers).
    topic: String,
    /// The first target's columns: the names of the rows the job sees.
    names: Vec<String>,
    positions: Positions,
    /// Which columns the job reads (`None`: all, a filter or an expression sees the whole row);
    /// the others are passed as null, not converted.
    read: Option<Vec<bool>>,
}

/// A message seen while its part loads.
struct Waiting {
    offset: i64,
    rows: Vec<Row>,
    key: Option<Bytes>,
    payload: Option<Bytes>,
    headers: Vec<(String, String)>,
}

/// Where a part is.
enum Phase {
    /// Its stored state is being read; `requested` once the island took it up.
    Loading { waiting: Vec<Waiting>, requested: bool },
    /// Folding.
    Ready(Part),
    /// Stopped for this epoch: a rewind is asked, its messages are ignored.
    Stale,
}

/// One (route, partition) on its core.
struct PartState {
    /// The assignment epoch it folds.
    epoch: u64,
    /// The first offset seen in this epoch.
    first: i64,
    /// The stored offset a rewind was last asked to (asked once per stored offset: a topic that
    /// no longer holds it starts later, and is then taken as it is).
    rewound_to: Option<i64>,
    phase: Phase,
}

/// A row the job could not fold, waiting for the island to dead-letter it.
struct Letter {
    route: usize,
    partition: i32,
    offset: i64,
    code: ReasonCode,
    reason: String,
    key: Option<Bytes>,
    payload: Option<Bytes>,
    headers: Vec<(String, String)>,
}

/// What one core holds of a job.
#[derive(Default)]
struct CoreState {
    parts: HashMap<(usize, i32), PartState>,
    spill: Spill,
}

/// What folding leaves besides the parts: letters to send and counts (kept per core, so the
/// cores share no counter's cache line; summed for the report, and the rows read added to the
/// metric at each checkpoint).
#[derive(Default)]
struct Spill {
    letters: Vec<Letter>,
    counts: Counts,
    /// Rows read since the last checkpoint.
    rows_read: u64,
}

/// Counts of a rollup on one core (the job's report).
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    messages: u64,
    replayed: u64,
    unmapped: u64,
    rows_kept: u64,
    rows_failed: u64,
    rows_late: u64,
}

/// A stream job folding its routes' rows on the cores: shared by its [`RouteTap`]s and its
/// island task.
pub struct Rollup {
    job: JobConfig,
    compiled: Compiled,
    /// Per `stream` route, set when the route is opened.
    routes: Vec<OnceLock<RouteColumns>>,
    /// Per core.
    cores: Vec<Mutex<CoreState>>,
    /// Per (route, partition): the next offset whose folding is durable.
    durable: Mutex<HashMap<(usize, i32), i64>>,
    /// Rewinds asked, per route.
    rewinds: Mutex<Vec<(usize, Rewind)>>,
    /// The job's closed mark (`i64::MIN`: none).
    closed_through: AtomicI64,
    /// Whether the cores fold: from the gateway's start (what arrives before the job's task
    /// has its state waits for it) until the job is cancelled or stopped.
    folding: AtomicBool,
    /// Whether the routes' offsets are let go (the job was cancelled).
    released: AtomicBool,
    /// Parts waiting for their stored state.
    loads: tokio::sync::Notify,
    rows_read: metrics::Counter,
    rows_failed: metrics::Counter,
    rows_late: metrics::Counter,
}

/// One route's tap of a [`Rollup`].
pub struct RouteTap {
    rollup: Arc<Rollup>,
    route: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Rollup {
    /// The rollup of stream job `job` on `cores` cores, folding at once (what arrives before
    /// [`run`] loads the parts' stored state waits for it).
    pub fn new(job: &JobConfig, cores: usize) -> anyhow::Result<Arc<Rollup>> {
        Ok(Arc::new(Rollup {
            compiled: Compiled::new(job)?,
            routes: job.stream.iter().map(|_| OnceLock::new()).collect(),
            cores: (0..cores).map(|_| Mutex::default()).collect(),
            durable: Mutex::default(),
            rewinds: Mutex::default(),
            closed_through: AtomicI64::new(i64::MIN),
            folding: AtomicBool::new(true),
            released: AtomicBool::new(false),
            loads: tokio::sync::Notify::new(),
            rows_read: metrics::counter!(metric::JOB_ROWS_READ, "job" => job.name.clone()),
            rows_failed: metrics::counter!(metric::JOB_ROWS_FAILED, "job" => job.name.clone()),
            rows_late: metrics::counter!(metric::JOB_ROWS_LATE, "job" => job.name.clone()),
            job: job.clone(),
        }))
    }

    /// The job's name.
    pub fn name(&self) -> &str {
        &self.job.name
    }

    /// The tap of route `route` (one of the job's `stream` routes, mapped by `mapper`, reading
    /// `topic`); `None` when the job does not read that route.
    pub fn tap(
        self: &Arc<Self>,
        route: &str,
        topic: &str,
        mapper: &RouteMapper,
    ) -> anyhow::Result<Option<Arc<dyn Tap>>> {
        let Some(index) = self.job.stream.iter().position(|name| name == route) else {
            return Ok(None);
        };
        let names = route_columns(&self.job, route, mapper)?;
        let positions = Positions::new(&names, &self.compiled);
        let read = (!self.compiled.needs_cel()).then(|| {
            let mut read = vec![false; names.len()];
            let used = positions
                .group_by
                .iter()
                .chain(&positions.measures)
                .chain([&positions.window]);
            for at in used.flatten() {
                read[*at] = true;
            }
            read
        });
        let columns = RouteColumns {
            route: route.to_string(),
            topic: topic.to_string(),
            positions,
            names,
            read,
        };
        if self.routes[index].set(columns).is_err() {
            anyhow::bail!("job `{}`: route `{route}` tapped twice", self.job.name);
        }
        Ok(Some(Arc::new(RouteTap {
            rollup: Arc::clone(self),
            route: index,
        })))
    }

    /// Installs every part still loading as fresh (no stored state), as [`run`] does once the
    /// database answers: for benchmarks of the folding alone.
    #[cfg(feature = "devkit")]
    pub fn install_fresh(&self) {
        for state in &self.cores {
            let mut state = lock(state);
            let state = &mut *state;
            for (key, part) in state.parts.iter_mut() {
                if matches!(part.phase, Phase::Loading { .. }) {
                    self.install(*key, part, Part::default(), &mut state.spill);
                }
            }
        }
    }

    fn closed(&self) -> i64 {
        self.closed_through.load(Ordering::Acquire)
    }

    /// Folds one message's kept rows into a ready part (unless a checkpoint counted it).
    #[allow(clippy::too_many_arguments)]
    fn fold_message(
        &self,
        route: usize,
        partition: i32,
        part: &mut Part,
        offset: i64,
        rows: &[Row],
        message: (&Option<Bytes>, &Option<Bytes>, &[(String, String)]),
        spill: &mut Spill,
    ) {
        if part.position.is_some_and(|next| offset < next) {
            spill.counts.replayed += 1;
            return;
        }
        part.position = Some(offset + 1);
        part.dirty = true;
        spill.counts.messages += 1;
        let Some(columns) = self.routes[route].get() else {
            return;
        };
        let closed = self.closed();
        for row in rows {
            match self
                .compiled
                .fold_row(&columns.names, &columns.positions, row, &mut part.partial, closed)
            {
                Ok(Fold::Folded(time)) => {
                    spill.counts.rows_kept += 1;
                    part.max_time = part.max_time.max(time);
                }
                Ok(Fold::Skipped | Fold::Copied(_)) => {}
                Err((code, reason)) => {
                    spill.counts.rows_failed += 1;
                    self.rows_failed.increment(1);
                    if code == ReasonCode::Late {
                        spill.counts.rows_late += 1;
                        self.rows_late.increment(1);
                    }
                    spill.letters.push(Letter {
                        route,
                        partition,
                        offset,
                        code,
                        reason,
                        key: message.0.clone(),
                        payload: message.1.clone(),
                        headers: message.2.to_vec(),
                    });
                }
            }
        }
        spill.rows_read += rows.len() as u64;
    }

    /// Asks route `route` to read `partition` again from `offset` (its epoch `epoch` stops).
    fn ask_rewind(&self, route: usize, partition: i32, offset: i64, epoch: u64) {
        lock(&self.rewinds).push((
            route,
            Rewind {
                partition,
                offset,
                epoch,
            },
        ));
    }

    /// Reads the stored state of every part waiting for it, then folds what waited.
    async fn load(&self, windows: &Windows) -> anyhow::Result<()> {
        let mut wanted = Vec::new();
        for (core, state) in self.cores.iter().enumerate() {
            for (key, part) in lock(state).parts.iter_mut() {
                if let Phase::Loading { requested, .. } = &mut part.phase {
                    if !*requested {
                        *requested = true;
                        wanted.push((core, *key, part.epoch));
                    }
                }
            }
        }
        for (core, key, epoch) in wanted {
            let name = self.routes[key.0].get().map(|c| part_name(&c.route, key.1));
            let loaded = match name {
                Some(name) => windows.load_part(&name).await,
                None => continue,
            };
            let mut state = lock(&self.cores[core]);
            let state = &mut *state;
            let Some(part) = state.parts.get_mut(&key).filter(|part| part.epoch == epoch) else {
                continue;
            };
            let loaded = match loaded {
                Ok(loaded) => loaded,
                Err(error) => {
                    if let Phase::Loading { requested, .. } = &mut part.phase {
                        *requested = false;
                    }
                    return Err(error);
                }
            };
            self.install(key, part, loaded, &mut state.spill);
        }
        Ok(())
    }

    /// A loaded part replaces a loading one: ready, with what waited folded — or stale, with a
    /// rewind asked, when its stored offset is behind the first message seen.
    fn install(&self, key: (usize, i32), part: &mut PartState, loaded: Part, spill: &mut Spill) {
        let Phase::Loading { waiting, .. } = std::mem::replace(&mut part.phase, Phase::Stale) else {
            return;
        };
        if let Some(stored) = loaded.stored {
            lock(&self.durable).insert(key, stored);
            if part.first > stored && part.rewound_to != Some(stored) {
                part.rewound_to = Some(stored);
                tracing::info!(job = %self.job.name, route = key.0, partition = key.1, stored, first = part.first, "stream job reads the partition again from its stored offset");
                self.ask_rewind(key.0, key.1, stored, part.epoch);
                return;
            }
        }
        let mut ready = loaded;
        for message in waiting {
            let info = (&message.key, &message.payload, message.headers.as_slice());
            self.fold_message(key.0, key.1, &mut ready, message.offset, &message.rows, info, spill);
        }
        part.phase = Phase::Ready(ready);
    }

    /// Dead-letters what the cores could not fold, then makes every changed part durable.
    async fn checkpoint(&self, windows: &Windows) -> anyhow::Result<()> {
        let mut snapshots = Vec::new();
        let mut letters = Vec::new();
        for (core, state) in self.cores.iter().enumerate() {
            let mut state = lock(state);
            letters.append(&mut state.spill.letters);
            self.rows_read.increment(std::mem::take(&mut state.spill.rows_read));
            for (key, part) in state.parts.iter_mut() {
                if let Phase::Ready(ready) = &mut part.phase {
                    if ready.dirty {
                        snapshots.push((core, *key, part.epoch, part.first, ready.snapshot()?));
                        ready.dirty = false;
                    }
                }
            }
        }
        // The letters of messages a checkpoint covers are sent before it is written.
        if let Some(sink) = &windows.dead_letter {
            for letter in &letters {
                let topic = self.routes[letter.route]
                    .get()
                    .map(|c| c.topic.clone())
                    .unwrap_or_default();
                sink.send(&DeadLetter {
                    route: &self.job.name,
                    reason_code: letter.code.as_str(),
                    reason: &letter.reason,
                    source: vec![
                        (headers::SOURCE_TOPIC, topic),
                        (headers::SOURCE_PARTITION, letter.partition.to_string()),
                        (headers::SOURCE_OFFSET, letter.offset.to_string()),
                    ],
                    headers: &letter.headers,
                    key: letter.key.as_deref(),
                    payload: letter.payload.as_deref(),
                })
                .await;
            }
        }
        let mut failed = None;
        for (core, key, epoch, first, snapshot) in snapshots {
            let Some(name) = self.routes[key.0].get().map(|c| part_name(&c.route, key.1)) else {
                continue;
            };
            let stored = if failed.is_none() {
                windows.store(&name, &snapshot, None).await
            } else {
                Err(anyhow::anyhow!("an earlier checkpoint failed"))
            };
            let mut state = lock(&self.cores[core]);
            let Some(part) = state.parts.get_mut(&key).filter(|part| part.epoch == epoch) else {
                continue;
            };
            let Phase::Ready(ready) = &mut part.phase else {
                continue;
            };
            match stored {
                Ok(true) => {
                    ready.stored = snapshot.position;
                    if let Some(position) = snapshot.position {
                        lock(&self.durable).insert(key, position);
                    }
                }
                Ok(false) => {
                    // Another gateway moved the part on: read the partition again from what
                    // this one last stored (the stored state then decides what is skipped).
                    let from = snapshot.stored.unwrap_or(first);
                    tracing::info!(job = %self.job.name, part = %name, from, "checkpoint refused (another gateway moved on first); the partition is read again");
                    part.phase = Phase::Stale;
                    self.ask_rewind(key.0, key.1, from, epoch);
                }
                Err(error) => {
                    ready.dirty = true;
                    failed.get_or_insert(error);
                }
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Whether every part this gateway folds has its progress stored: until then the stored
    /// watermark would leave it out (a partition still loading, or not yet checkpointed, must
    /// not let the others close windows its rows still fall in). A partition no message of which
    /// has reached this gateway yet is not seen here.
    fn all_stored(&self) -> bool {
        self.cores.iter().all(|state| {
            lock(state).parts.values().all(|part| match &part.phase {
                Phase::Ready(ready) => ready.stored.is_some(),
                Phase::Loading { .. } => false,
                // Read again from an offset stored already.
                Phase::Stale => true,
            })
        })
    }

    /// Closes what the watermark passed and drops it from the parts on every core (nothing
    /// while a part here has no stored progress).
    async fn close(&self, windows: &mut Windows) -> anyhow::Result<u64> {
        if !self.all_stored() {
            return Ok(0);
        }
        let written = windows.close_windows().await?;
        self.closed_through
            .store(windows.closed_through.unwrap_or(i64::MIN), Ordering::Release);
        for state in &self.cores {
            for part in lock(state).parts.values_mut() {
                if let Phase::Ready(ready) = &mut part.phase {
                    windows.drop_closed(&mut ready.partial);
                }
            }
        }
        Ok(written)
    }

    /// Stops folding and forgets every part (started again, each loads its stored state and
    /// reads on from it); with `release`, the routes store their offsets without the job.
    fn detach(&self, release: bool) {
        self.folding.store(false, Ordering::Release);
        for state in &self.cores {
            let mut state = lock(state);
            state.parts.clear();
            state.spill.letters.clear();
        }
        if release {
            self.released.store(true, Ordering::Release);
        }
    }

    /// The counts of every core, summed.
    fn counts(&self) -> Counts {
        let mut sum = Counts::default();
        for state in &self.cores {
            let counts = lock(state).spill.counts;
            sum.messages += counts.messages;
            sum.replayed += counts.replayed;
            sum.unmapped += counts.unmapped;
            sum.rows_kept += counts.rows_kept;
            sum.rows_failed += counts.rows_failed;
            sum.rows_late += counts.rows_late;
        }
        sum
    }

    /// The job's report so far.
    fn report(&self, windows_closed: u64, rows_out: u64, started: Instant) -> StreamReport {
        let counts = self.counts();
        StreamReport {
            messages: counts.messages,
            replayed: counts.replayed,
            unmapped: counts.unmapped,
            rows_kept: counts.rows_kept,
            rows_failed: counts.rows_failed,
            rows_late: counts.rows_late,
            windows_closed,
            rows_out,
            restarts: 0,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

impl Tap for RouteTap {
    fn fold(&self, core: usize, message: &SourceMessage, rows: Option<&[MappedRow]>) {
        let rollup = &*self.rollup;
        if !rollup.folding.load(Ordering::Acquire) {
            return;
        }
        let (Some(partition), Some(epoch)) = (message.origin.partition(), message.origin.assignment()) else {
            return;
        };
        let Some(columns) = rollup.routes[self.route].get() else {
            return;
        };
        // Converted before the lock is taken.
        let kept: Vec<Row> = rows
            .unwrap_or_default()
            .iter()
            .filter(|row| row.target == 0 && !row.delete)
            .map(|row| row_of(&row.values, columns.names.len(), columns.read.as_deref()))
            .collect();
        let offset = message.position;
        let key = (self.route, partition);
        let Some(cell) = rollup.cores.get(core) else {
            return;
        };
        let mut state = lock(cell);
        let state = &mut *state;
        if rows.is_none() {
            state.spill.counts.unmapped += 1;
        }
        let part = state.parts.entry(key).or_insert_with(|| PartState {
            epoch: 0,
            first: offset,
            rewound_to: None,
            phase: Phase::Stale,
        });
        if epoch < part.epoch {
            return;
        }
        if epoch > part.epoch {
            part.epoch = epoch;
            part.first = offset;
            part.phase = Phase::Loading {
                waiting: Vec::new(),
                requested: false,
            };
            rollup.loads.notify_one();
        }
        match &mut part.phase {
            Phase::Stale => {}
            Phase::Loading { waiting, .. } => {
                if waiting.len() >= PENDING_MESSAGES_MAX {
                    // Its stored state did not come in time: read these again once it has.
                    let first = part.first;
                    part.phase = Phase::Stale;
                    rollup.ask_rewind(self.route, partition, first, epoch);
                    return;
                }
                waiting.push(Waiting {
                    offset,
                    rows: kept,
                    key: message.key.clone(),
                    payload: message.payload.clone(),
                    headers: message.headers.clone(),
                });
            }
            Phase::Ready(ready) => {
                let info = (&message.key, &message.payload, message.headers.as_slice());
                rollup.fold_message(self.route, partition, ready, offset, &kept, info, &mut state.spill);
            }
        }
    }

    fn durable(&self, partition: i32) -> Option<i64> {
        if self.rollup.released.load(Ordering::Acquire) {
            return Some(i64::MAX);
        }
        lock(&self.rollup.durable).get(&(self.route, partition)).copied()
    }

    fn rewinds(&self) -> Vec<Rewind> {
        let mut asked = lock(&self.rollup.rewinds);
        if asked.is_empty() {
            return Vec::new();
        }
        let (mine, others): (Vec<_>, Vec<_>) = asked.drain(..).partition(|(route, _)| *route == self.route);
        *asked = others;
        mine.into_iter().map(|(_, rewind)| rewind).collect()
    }
}

/// Runs stream job `rollup` inside `serve` until `signal` says cancel or stop: loads parts as
/// their partitions come, checkpoints every `checkpoint` and closes the windows the watermark
/// passed (not while paused). A failing checkpoint, load or close (the database or a sink
/// broker down) is logged and tried again at the next checkpoint; nothing is acknowledged
/// meanwhile beyond what is durable. Table results are written through the gateway at
/// `endpoint`.
pub async fn run(
    rollup: Arc<Rollup>,
    session: Arc<Session>,
    endpoint: &GatewayAddr,
    routes: &[RouteConfig],
    mut signal: Signal,
) -> anyhow::Result<StreamReport> {
    let started = Instant::now();
    rollup.released.store(false, Ordering::Release);
    rollup.folding.store(true, Ordering::Release);
    let opened = async {
        let mut windows = Windows::open(rollup.job.clone(), session, endpoint, routes).await?;
        windows.closed_through = windows.load_closed().await?;
        anyhow::Ok(windows)
    };
    let mut windows = match opened.await {
        Ok(windows) => windows,
        Err(error) => {
            // The routes go on without it; started again, its parts read on from their stored
            // offsets.
            rollup.detach(true);
            return Err(error);
        }
    };
    rollup
        .closed_through
        .store(windows.closed_through.unwrap_or(i64::MIN), Ordering::Release);
    let mut tick = tokio::time::interval(rollup.job.checkpoint);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut command = *signal.borrow_and_update();
    let mut windows_closed = 0;
    let mut last_warning: Option<Instant> = None;
    let mut warn = |what: &str, error: anyhow::Error| {
        if last_warning.is_none_or(|at| at.elapsed() >= WARN_INTERVAL) {
            last_warning = Some(Instant::now());
            tracing::warn!(job = %rollup.job.name, error = %format!("{error:#}"), "stream job: {what} failed; tried again at the next checkpoint (offsets stay held)");
        }
    };
    while matches!(command, Command::Run | Command::Pause) {
        tokio::select! {
            next = next_command(&mut signal) => command = next,
            _ = rollup.loads.notified() => {
                if let Err(error) = rollup.load(&windows).await {
                    warn("loading a partition's state", error);
                }
            }
            _ = tick.tick() => {
                if let Err(error) = rollup.load(&windows).await {
                    warn("loading a partition's state", error);
                }
                if let Err(error) = rollup.checkpoint(&windows).await {
                    warn("checkpoint", error);
                    continue;
                }
                if command == Command::Run {
                    match rollup.close(&mut windows).await {
                        Ok(written) => windows_closed += written,
                        Err(error) => warn("closing windows", error),
                    }
                }
            }
        }
    }
    // Cancelled or stopping: fold no more, make what was folded durable.
    rollup.folding.store(false, Ordering::Release);
    if let Err(error) = rollup.checkpoint(&windows).await {
        tracing::warn!(job = %rollup.job.name, error = %format!("{error:#}"), "last checkpoint failed; the routes read again from the one before");
    }
    if command == Command::Cancel {
        rollup.detach(true);
    }
    Ok(rollup.report(windows_closed, windows.rows_out(), started))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::kafka::ack::KafkaOrigin;
    use crate::config::Config;
    use crate::sink::scylla::schema::TableSchema;
    use scylla::cluster::metadata::{ColumnKind, ColumnType, NativeType};

    const CONFIG: &str = r#"
[cluster]
contact_points = ["127.0.0.1:9042"]
local_datacenter = "datacenter1"

[ingest]
listen = "127.0.0.1:50051"

[[route]]
name = "orders"
table = "shop.orders"
[route.source]
kind = "kafka"
brokers = ["127.0.0.1:9092"]
topic = "orders"
group_id = "shardgate-orders"
[route.columns]
order_id = "$key"
city = "city"
placed_at = "placed_at"
[route.dead_letter]
kind = "kafka"
topic = "orders.dead-letter"

[[job]]
name = "city_minutes"
[job.source]
stream = ["orders"]
[job.aggregate]
group_by = ["city"]
window = { column = "placed_at", size = "1m" }
measures = { orders = "count()" }
[[job.sink]]
table = "shop.city_minutes"
"#;

    /// A one-core rollup of the job above tapping route `orders`, and the route's mapper.
    struct Fixture {
        rollup: Arc<Rollup>,
        tap: Arc<dyn Tap>,
        mapper: RouteMapper,
    }

    impl Fixture {
        fn new() -> Fixture {
            let config = Config::parse(CONFIG, "t").expect("config");
            let native = |t| ColumnType::Native(t);
            let columns = [
                ("order_id", native(NativeType::Text), ColumnKind::PartitionKey),
                ("city", native(NativeType::Text), ColumnKind::Regular),
                ("placed_at", native(NativeType::Timestamp), ColumnKind::Regular),
            ];
            let schema = TableSchema {
                columns: columns.into_iter().map(|(n, t, k)| (n.to_string(), (t, k))).collect(),
                partition_key: vec!["order_id".into()],
                clustering_key: vec![],
            };
            let mapper = RouteMapper::new(&config.routes[0], &[schema]).expect("mapper");
            let rollup = Rollup::new(&config.jobs[0], 1).expect("rollup");
            let tap = rollup
                .tap("orders", "orders", &mapper)
                .expect("columns")
                .expect("a tap");
            assert!(rollup.tap("payments", "payments", &mapper).expect("no error").is_none());
            Fixture { rollup, tap, mapper }
        }

        /// Order `offset` of partition 0, read in `epoch`, placed in minute 10, through the tap.
        fn fold(&self, epoch: u64, offset: i64) {
            let (completions, _) = crossbeam_channel::bounded(1);
            let message = SourceMessage {
                position: offset,
                timestamp_ms: None,
                write_timestamp_us: Some(1),
                key: Some(Bytes::from(format!("o{offset}"))),
                headers: Vec::new(),
                payload: Some(Bytes::from(format!(
                    r#"{{"city":"Oslo","placed_at":{}}}"#,
                    10 * 60_000 + offset
                ))),
                origin: Box::new(KafkaOrigin {
                    partition: 0,
                    epoch,
                    offset,
                    completions,
                }),
            };
            let rows = self.mapper.map(&message.envelope("orders"), 1).expect("mapped");
            self.tap.fold(0, &message, Some(&rows));
        }

        /// Installs `stored` (a part stored at that next offset, none if `None`) as the loaded state.
        fn load(&self, stored: Option<i64>) {
            let loaded = Part {
                position: stored,
                stored,
                ..Part::default()
            };
            let mut state = lock(&self.rollup.cores[0]);
            let state = &mut *state;
            let part = state.parts.get_mut(&(0, 0)).expect("a loading part");
            self.rollup.install((0, 0), part, loaded, &mut state.spill);
        }

        /// When the part is ready: its next offset, and the rows the rollup folded so far.
        fn ready(&self) -> Option<(Option<i64>, u64)> {
            let state = lock(&self.rollup.cores[0]);
            match &state.parts.get(&(0, 0))?.phase {
                Phase::Ready(part) => Some((part.position, state.spill.counts.rows_kept)),
                _ => None,
            }
        }
    }

    /// Messages seen while the part loads wait; those below the stored offset are skipped
    /// (counted already), the rest folded; the offsets are held until a checkpoint.
    #[test]
    fn a_loaded_part_skips_what_its_checkpoint_counted() {
        let fixture = Fixture::new();
        for offset in 5..10 {
            fixture.fold(1, offset);
        }
        assert_eq!(fixture.ready(), None, "loading");
        assert_eq!(fixture.tap.durable(0), None, "nothing durable: no offset stored");
        fixture.load(Some(7));
        assert_eq!(fixture.ready(), Some((Some(10), 3)), "7, 8 and 9 folded");
        assert_eq!(fixture.rollup.counts().replayed, 2);
        assert_eq!(fixture.tap.durable(0), Some(7), "the stored offset is durable");
        fixture.fold(1, 10);
        assert_eq!(fixture.ready(), Some((Some(11), 4)));
        assert!(fixture.tap.rewinds().is_empty());
    }

    /// A stored offset behind the first message seen asks the route to read the partition
    /// again from it (once); the stale epoch's messages are ignored, the new epoch loads afresh.
    #[test]
    fn a_part_behind_the_first_message_asks_for_a_rewind() {
        let fixture = Fixture::new();
        fixture.fold(3, 50);
        fixture.load(Some(20));
        assert_eq!(fixture.ready(), None, "stale");
        let rewinds = fixture.tap.rewinds();
        assert_eq!(
            rewinds,
            [Rewind {
                partition: 0,
                offset: 20,
                epoch: 3
            }]
        );
        assert!(fixture.tap.rewinds().is_empty(), "asked once");
        fixture.fold(3, 51);
        fixture.fold(2, 52);
        assert_eq!(fixture.ready(), None, "the old epochs' messages are ignored");
        // Read again from 20 in epoch 4.
        fixture.fold(4, 20);
        fixture.load(Some(20));
        assert_eq!(fixture.ready(), Some((Some(21), 1)));
        // A topic that no longer holds offset 20 starts later: taken as it is, not rewound again.
        fixture.fold(5, 60);
        fixture.load(Some(20));
        assert!(fixture.tap.rewinds().is_empty());
        assert_eq!(fixture.ready(), Some((Some(61), 2)));
    }

    /// Cancelled, the rollup lets go of the route's offsets and forgets its parts.
    #[test]
    fn a_detached_rollup_releases_the_offsets() {
        let fixture = Fixture::new();
        fixture.fold(1, 0);
        fixture.load(None);
        assert_eq!(
            fixture.tap.durable(0),
            None,
            "a fresh part holds everything until stored"
        );
        fixture.rollup.detach(true);
        assert_eq!(fixture.tap.durable(0), Some(i64::MAX));
        assert_eq!(fixture.ready(), None);
        fixture.fold(1, 1);
        assert!(lock(&fixture.rollup.cores[0]).parts.is_empty(), "not folding");
    }
}
