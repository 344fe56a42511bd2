//! The per-core half of every source: one [`RouteWriter`] per route, shared by all cores.
//! A source's consumer (Kafka poll thread, JetStream puller on the island) hands batches of
//! [`SourceMessage`]s to cores over bounded queues; [`run_on_core`] maps each message to a row,
//! places the row (token → replica, shard, owner core), keeps the rows the core owns and hands
//! every other owner its rows in one task over the cross-core mesh (`runtime::mesh`). Owners
//! write UNLOGGED batches of one replica and shard, retrying transient failures forever. What
//! cannot be mapped or written goes to the route's dead-letter destination; only then, or once
//! the row is confirmed, is the message settled — by its origin, which each source implements in
//! its own folder (Kafka: contiguous watermark on the poll thread; JetStream: ack, or term after
//! a dead letter; RabbitMQ: ack, or reject). Each batch is admitted into the route's share of
//! the core's row budget (`runtime::budget`) and held until the owners answer, and the queues are bounded, so a slow database stops consumption instead
//! of growing memory.
//!
//! Threads: every core (`run_on_core`, the writes on each row's owner core).
//!
//! One message may become several rows (several target tables, upserts or deletes): it completes
//! once all of them are written, or is dead-lettered once if any is refused.
//!
//! Replays are idempotent: each write carries a timestamp derived from the message
//! (`mapping::write_timestamp_us` of its time and position, or the Kafka partition clock).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use scylla::client::session::Session;

use super::message::{Origin, Settlement, Settlements, SourceMessage};
use super::tap::Taps;
use crate::config::RouteConfig;
use crate::mapping::{MappedRow, RouteMapper};
use crate::runtime::budget::{Admitted, Budget};
use crate::runtime::mesh::Mesh;
use crate::sink::dead_letter::{DeadLetter, DeadLetterSink};
use crate::sink::scylla as scylla_sink;
use crate::sink::scylla::bound::{RowBuilder, SerializedRow};
use crate::sink::scylla::retry::Retries;
use crate::sink::scylla::writer::{self, owner_of, place_row, Statements, WriteOptions, WriteStatement};
use crate::spool::record::{self, RouteEncoder, RouteRecord};
use crate::spool::service::{self as spool, Spooled};
use crate::telemetry::RowMetrics;
use crate::topology::{Ownership, ReplicaShard};

/// Counters of one route, shared by its poll thread and cores.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// Messages handed to cores.
    pub received: AtomicU64,
    /// Rows confirmed by the database.
    pub written: AtomicU64,
    /// Messages sent to the dead-letter destination.
    pub dead_lettered: AtomicU64,
    /// Messages skipped by the route's filter (or sent to no target).
    pub filtered: AtomicU64,
}

impl RouteCounters {
    /// The route's closing log line.
    pub fn log_stopped(&self, route: &str) {
        tracing::info!(
            route,
            received = self.received.load(Ordering::Relaxed),
            written = self.written.load(Ordering::Relaxed),
            dead_lettered = self.dead_lettered.load(Ordering::Relaxed),
            filtered = self.filtered.load(Ordering::Relaxed),
            "stopped"
        );
    }
}

/// A row with the replica and shard it belongs to.
type PlacedRow = (ReplicaShard, RowWork);

/// The prepared statements of one target table.
pub struct TargetStatements {
    /// `INSERT ... USING [TTL ? AND] TIMESTAMP ?`.
    pub upsert: WriteStatement,
    /// `DELETE ... USING TIMESTAMP ? WHERE <primary key>`.
    pub delete: WriteStatement,
}

impl TargetStatements {
    /// The statement a mapped row is written with: its target's delete or upsert.
    pub fn of<'a, V>(statements: &'a [TargetStatements], row: &MappedRow<V>) -> &'a WriteStatement {
        let target = &statements[row.target];
        if row.delete {
            &target.delete
        } else {
            &target.upsert
        }
    }
}

/// The messages of one batch whose rows are being written, possibly on several cores: a row
/// names its message by index, and each owner core's share of the rows holds the batch once
/// (no count or allocation per row or message). The batch is kept as it was received, filtered
/// and unmappable messages included (they have no rows), so no message is moved out of it.
struct Pending {
    messages: Vec<SourceMessage>,
    /// Each message's rows in flight, by the same index.
    states: Vec<PendingState>,
}

/// What is left of one message's rows.
struct PendingState {
    rows_left: AtomicUsize,
    /// The first permanent failure among its rows: (reason code, reason). Set at most once,
    /// so a row written fine reads it without a lock.
    failure: OnceLock<(&'static str, String)>,
}

/// One row on its way to its owner core, its values serialized: its message's index in the
/// batch's [`Pending`], and the row.
type RowWork = (usize, MappedRow<SerializedRow>);

/// What a core needs to turn a route's messages into rows. Shared by all cores.
pub struct RouteWriter {
    /// Route name.
    pub route: String,
    /// Source topic or stream (for dead-letter headers).
    pub source: String,
    /// Message → rows.
    pub mapper: RouteMapper,
    /// The cluster session (sockets on the island).
    pub session: Arc<Session>,
    /// Prepared statements, by target index.
    pub statements: Vec<TargetStatements>,
    /// Where failed messages go.
    pub dead_letter: DeadLetterSink,
    /// Route counters.
    pub counters: Arc<RouteCounters>,
    /// Ring snapshot: each row's replica, shard and owner core.
    pub ownership: Arc<ArcSwap<Ownership>>,
    /// Rows per UNLOGGED batch.
    pub batch_rows_max: usize,
    /// The cross-core mesh rows travel to their owner core on.
    pub mesh: Arc<Mesh>,
    /// Metric handles of the route's tables, one per core.
    pub metrics: Vec<RowMetrics>,
    /// `ack = "spooled"`: messages are acknowledged once in the core's spool.
    pub spooled: bool,
    /// Stream jobs folding the route's rows as they are mapped (`super::tap`).
    pub taps: Taps,
}

impl Statements<RowWork> for RouteWriter {
    type Values = SerializedRow;

    fn statement(&self, (_, row): &RowWork) -> &WriteStatement {
        TargetStatements::of(&self.statements, row)
    }

    fn values<'r>(&self, (_, row): &'r RowWork) -> &'r SerializedRow {
        &row.values
    }
}

/// Reads a route's tables from the cluster, builds its mapper and prepares its statements: the
/// one route set-up, shared by `serve` and `shardgate replay`. Runs on the island.
pub async fn prepare_route(
    session: &Session,
    route: &RouteConfig,
) -> anyhow::Result<(RouteMapper, Vec<TargetStatements>)> {
    let mut schemas = Vec::with_capacity(route.targets.len());
    for target in &route.targets {
        schemas.push(scylla_sink::table_schema(session, &route.name, &target.keyspace, &target.table).await?);
    }
    let mapper = RouteMapper::new(route, &schemas)?;
    let mut statements = Vec::with_capacity(route.targets.len());
    for target in 0..route.targets.len() {
        statements.push(TargetStatements {
            upsert: WriteStatement::new(scylla_sink::prepare_insert(session, &mapper.upsert_statement(target)).await?),
            delete: WriteStatement::new(scylla_sink::prepare_insert(session, &mapper.delete_statement(target)).await?),
        });
    }
    Ok((mapper, statements))
}

impl RouteWriter {
    /// Processes a batch received on `core`. A spooled route first appends the batch to the
    /// core's spool, acknowledges the source once it is durable and releases the batch's
    /// admission into the core's budget (the source may read on while the rows are written), then writes the
    /// rows and completes the records. Otherwise the admission is held until the rows are written.
    async fn process_batch(self: &Arc<Self>, core: usize, mut batch: Vec<SourceMessage>, admitted: (Admitted, Task)) {
        let metrics = &self.metrics[core];
        if !self.spooled {
            metrics.received.increment(batch.len() as u64);
            metrics.received_batch_rows.record(batch.len() as f64);
            self.write_batch(core, batch, true).await;
            drop(admitted);
            return;
        }
        // The taps fold each message as received, before it is the spool's (a message written
        // later from the spool is not folded again); mapped once more for them.
        if !self.taps.is_empty() {
            for work in &batch {
                let mapped = self.mapper.map(&work.envelope(&self.source), work.write_timestamp_us());
                self.fold(core, work, mapped.as_deref().ok());
            }
        }
        // Each message becomes the spool's (nothing left to settle when its rows are written);
        // its source origin is kept to be settled once the records are durable.
        let key_and_payload_bytes = batch
            .iter()
            .map(|work| {
                work.payload.as_ref().map_or(0, bytes::Bytes::len) + work.key.as_ref().map_or(0, bytes::Bytes::len)
            })
            .sum();
        let mut records = record::route_batch(batch.len(), key_and_payload_bytes);
        let mut encoder = RouteEncoder::default();
        let origins: Vec<Box<dyn Origin>> = batch
            .iter_mut()
            .map(|work| work.into_spool(&self.route, &self.source, &mut encoder, &mut records))
            .collect();
        drop(encoder);
        let appended = spool::append(&self.route, records).await;
        metrics.received.increment(batch.len() as u64);
        metrics.received_batch_rows.record(batch.len() as f64);
        let now_ms = now_ms();
        let mut settlements = Settlements::expecting(&self.route, batch.len());
        for (work, origin) in batch.iter().zip(&origins) {
            self.settle(
                core,
                work.timestamp_ms,
                origin.as_ref(),
                false,
                now_ms,
                &mut settlements,
            );
        }
        settlements.hand_over();
        drop(admitted);
        // Written from memory while the core's budget allows; beyond, the records wait on disk
        // and the core's drain reads them back (`spool::drain`).
        let Some(spooled) = appended.hold() else {
            return;
        };
        self.write_batch(core, batch, false).await;
        spooled.written().await;
    }

    /// Hands one mapped message to the route's taps.
    fn fold(&self, core: usize, work: &SourceMessage, rows: Option<&[MappedRow]>) {
        for tap in self.taps.iter() {
            tap.fold(core, work, rows);
        }
    }

    /// Writes messages read back from the core's spool (left by the previous run, or deferred),
    /// then completes their records.
    pub async fn write_replayed(self: &Arc<Self>, core: usize, messages: Vec<RouteRecord>, spooled: Spooled) {
        let batch = messages.into_iter().map(SourceMessage::from_record).collect();
        self.write_batch(core, batch, false).await;
        spooled.written().await;
    }

    /// Maps a batch of messages received on `core`, writes each row on its owner core (in
    /// UNLOGGED batches of one replica and shard), dead-letters what cannot be mapped or
    /// written, and reports every message's completion only after all its rows are written or
    /// its dead letter delivered. Returns once every owner has answered. With `fold`, each
    /// mapped message goes to the route's taps first.
    async fn write_batch(self: &Arc<Self>, core: usize, batch: Vec<SourceMessage>, fold: bool) {
        let ownership = self.ownership.load();
        let metrics = &self.metrics[core];
        let mut unmappable = Vec::new();
        let mapped_ms = now_ms();
        let fold = fold && !self.taps.is_empty();
        // Every row's cells go into one buffer the batch's rows share; each message keeps how
        // many rows it became, in order.
        let mut builder = RowBuilder::for_rows(batch.len());
        let mut spans = Vec::with_capacity(batch.len());
        // (index in the batch, rows) of each message that became rows.
        let mut mapped = Vec::with_capacity(batch.len());
        // Filtered messages are finished here; handed over once the batch is mapped.
        let mut filtered = Settlements::new(&self.route);
        for (index, work) in batch.iter().enumerate() {
            let envelope = work.envelope(&self.source);
            let timestamp_us = work.write_timestamp_us();
            let mapped_rows = if fold {
                // Taps read CQL values: mapped once into both.
                let rows = self
                    .mapper
                    .map_cells_and_values(&envelope, timestamp_us, &mut builder, &mut spans);
                self.fold(core, work, rows.as_deref().ok());
                rows.map(|rows| rows.len())
            } else {
                self.mapper.map_cells(&envelope, timestamp_us, &mut builder, &mut spans)
            };
            match mapped_rows {
                Ok(0) => {
                    self.counters.filtered.fetch_add(1, Ordering::Relaxed);
                    metrics.filtered.increment(1);
                    self.complete(core, work, false, mapped_ms, &mut filtered);
                }
                Ok(rows) => mapped.push((index, rows)),
                Err(error) => unmappable.push((index, error)),
            }
        }
        filtered.hand_over();
        let cells = builder.seal();
        let capacity = spans.len();
        let mut spans = spans.into_iter();
        let mut by_owner: BTreeMap<usize, Vec<PlacedRow>> = BTreeMap::new();
        let mut states: Vec<PendingState> = batch
            .iter()
            .map(|_| PendingState {
                rows_left: AtomicUsize::new(0),
                failure: OnceLock::new(),
            })
            .collect();
        for (index, rows) in mapped {
            states[index].rows_left = AtomicUsize::new(rows);
            for row in spans.by_ref().take(rows) {
                let row = MappedRow {
                    target: row.target,
                    delete: row.delete,
                    values: SerializedRow::new(&cells, row.values),
                };
                let statement = TargetStatements::of(&self.statements, &row);
                let (owner, replica_shard) = owner_of(place_row(statement.prepared(), &row.values, &ownership), core);
                // Sized for the whole batch: growing by pushes moved every row several times.
                by_owner
                    .entry(owner)
                    .or_insert_with(|| Vec::with_capacity(capacity))
                    .push((replica_shard, (index, row)));
            }
        }
        let pending = Arc::new(Pending {
            messages: batch,
            states,
        });
        let dead_letters = unmappable.into_iter().map(|(index, error)| {
            let work = &pending.messages[index];
            async move {
                self.dead_letter(core, work, error.code().as_str(), &error.to_string())
                    .await;
                self.complete(core, work, true, now_ms(), &mut Settlements::new(&self.route));
            }
        });
        let writes = by_owner.into_iter().map(|(owner, rows)| {
            let pending = Arc::clone(&pending);
            async move {
                if owner == core {
                    return self.write_rows(core, &pending, rows).await;
                }
                metrics.forwarded.increment(rows.len() as u64);
                let writer = Arc::clone(self);
                let forwarded = self
                    .mesh
                    .run_on(
                        owner,
                        move || async move { writer.write_rows(owner, &pending, rows).await },
                    )
                    .await;
                if let Err(gone) = forwarded {
                    // Only at shutdown. The rows' messages are never completed, so their offsets
                    // are not stored and they replay on the next start.
                    tracing::warn!(route = %self.route, %gone, "rows not forwarded; they replay on restart");
                }
            }
        });
        futures::join!(
            futures::future::join_all(dead_letters),
            futures::future::join_all(writes)
        );
    }

    /// Writes rows on `core` through the write engine (UNLOGGED batches of one replica and
    /// shard, transient failures retried until they pass, a refused batch split so only the
    /// refused rows fail their messages), then settles each row; the messages it finishes are
    /// handed to their sources together.
    async fn write_rows(&self, core: usize, pending: &Pending, rows: Vec<PlacedRow>) {
        let options = WriteOptions {
            batch_rows_max: self.batch_rows_max,
            retries: Retries::Forever,
        };
        let outcomes = writer::write_rows(&self.session, self, rows, options, &self.metrics[core]).await;
        let written = outcomes.iter().filter(|(_, outcome)| outcome.is_ok()).count();
        self.counters.written.fetch_add(written as u64, Ordering::Relaxed);
        // One clock read for the whole write: every message it completes was confirmed now.
        let written_ms = now_ms();
        let mut settlements = Settlements::expecting(&self.route, outcomes.len());
        for ((index, _), outcome) in outcomes {
            let refused = outcome.err().map(|error| error.reason().to_string());
            // Every row's index is its message's in `pending` (`write_batch`).
            match pending.messages.get(index).zip(pending.states.get(index)) {
                Some((message, state)) => {
                    self.row_done(core, message, state, refused, written_ms, &mut settlements)
                        .await
                }
                None => tracing::error!(route = %self.route, index, "a written row names no message of its batch"),
            }
        }
    }

    /// One row of a message is written (or refused, with the reason) at `written_ms`. The last
    /// row completes the message: acknowledged when every row was written, else dead-lettered
    /// with the first refusal and then acknowledged.
    async fn row_done(
        &self,
        core: usize,
        message: &SourceMessage,
        pending: &PendingState,
        refused: Option<String>,
        written_ms: i64,
        settlements: &mut Settlements<'_>,
    ) {
        if let Some(reason) = refused {
            // The first refusal wins.
            let _ = pending
                .failure
                .set((crate::mapping::ReasonCode::WriteRejected.as_str(), reason));
        }
        // The last row sees every refusal set before it counted down (release/acquire).
        if pending.rows_left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        match pending.failure.get() {
            Some((code, reason)) => {
                // What finished before is not held up while the dead letter is delivered.
                settlements.hand_over();
                self.dead_letter(core, message, code, reason).await;
                self.complete(core, message, true, now_ms(), settlements);
            }
            None => self.complete(core, message, false, written_ms, settlements),
        }
    }

    /// Settles a finished message at its source (its origin knows how: `kafka::ack`,
    /// `nats::ack`, `amqp::ack`, ...) and records its delivery latency; nothing for a message
    /// that is the spool's. `now_ms`: when it finished (epoch milliseconds). The settlement is
    /// handed over with the rest of `settlements`.
    fn complete(
        &self,
        core: usize,
        work: &SourceMessage,
        dead_lettered: bool,
        now_ms: i64,
        settlements: &mut Settlements<'_>,
    ) {
        self.settle(
            core,
            work.timestamp_ms,
            work.origin.as_ref(),
            dead_lettered,
            now_ms,
            settlements,
        );
    }

    /// Settles `origin` at its source (through `settlements`) and records the message's
    /// delivery latency up to `now_ms`.
    fn settle(
        &self,
        core: usize,
        timestamp_ms: Option<i64>,
        origin: &dyn Origin,
        dead_lettered: bool,
        now_ms: i64,
        settlements: &mut Settlements<'_>,
    ) {
        if !origin.acknowledges() {
            return;
        }
        if let Some(sent_ms) = timestamp_ms {
            let age_ms = now_ms - sent_ms;
            self.metrics[core].delivery_latency.record(age_ms.max(0) as f64 / 1e3);
        }
        let settlement = if dead_lettered {
            Settlement::DeadLettered
        } else {
            Settlement::Written
        };
        origin.settle(settlement, settlements);
    }

    async fn dead_letter(&self, core: usize, work: &SourceMessage, reason_code: &str, reason: &str) {
        self.metrics[core].failed(reason_code, 1);
        tracing::debug!(route = %self.route, position = work.position, reason_code, reason, "dead-lettering message");
        self.dead_letter
            .send(&DeadLetter {
                route: &self.route,
                reason_code,
                reason,
                source: work.coordinates(&self.source),
                headers: &work.headers,
                key: work.key.as_deref(),
                payload: work.payload.as_deref(),
            })
            .await;
        self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
}

/// The wall clock in epoch milliseconds (delivery latency is measured from the source's
/// message time, a wall-clock time).
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs on core `core`: processes the batches this core receives for one route, each admitted
/// into the route's share of the core's row budget first (held until the owners answered,
/// forwarded rows included), until the source closes the queue; then waits for this route's
/// batches still in flight.
pub async fn run_on_core(
    core: usize,
    writer: Arc<RouteWriter>,
    mut queue: tokio::sync::mpsc::Receiver<Vec<SourceMessage>>,
    budget: Budget,
) {
    let in_flight = Rc::new(InFlight::default());
    while let Some(batch) = queue.recv().await {
        let Some(admitted) = budget.admit(batch.len()).await else {
            return;
        };
        let writer = Arc::clone(&writer);
        // The batch counts as in flight while it holds its admission: a spooled batch lets go
        // once it is durable, so a stop waits for the spool, not for the database (the spool's
        // `finish_on_core` then waits for its writes, up to the deadline).
        let admission = (admitted, in_flight.start());
        glommio::spawn_local(async move { writer.process_batch(core, batch, admission).await }).detach();
    }
    in_flight.finished().await;
}

/// Batches of one route in flight on one core.
#[derive(Default)]
struct InFlight {
    tasks: std::cell::Cell<usize>,
    done: tokio::sync::Notify,
}

/// One batch in flight; dropping it counts the batch done.
struct Task(Rc<InFlight>);

impl InFlight {
    fn start(self: &Rc<Self>) -> Task {
        self.tasks.set(self.tasks.get() + 1);
        Task(Rc::clone(self))
    }

    async fn finished(&self) {
        while self.tasks.get() > 0 {
            let done = self.done.notified();
            futures::pin_mut!(done);
            done.as_mut().enable();
            if self.tasks.get() == 0 {
                return;
            }
            done.await;
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.tasks.set(self.0.tasks.get() - 1);
        self.0.done.notify_waiters();
    }
}
