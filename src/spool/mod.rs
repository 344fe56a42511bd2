//! The per-core spool (DESIGN §5): an append-only log of segments on the core's NVMe
//! directory. A batch of records is appended and made durable with one sync (group commit);
//! each record gets a [`RecordId`]; once the caller has written a record to the database it
//! [`Spool::complete`]s it, and a sealed segment whose records are all complete is removed. On
//! open, the records of every remaining segment are replayed to the caller, an unreadable tail
//! (a record the crash cut, or the padding of the last sync) is skipped with a log line, and new
//! appends go to a fresh segment.
//! The bytes of live segments are capped: an append over the cap is refused with
//! [`SpoolError::Full`], which callers turn into backpressure, never into loss.
//!
//! Records are opaque bytes to the engine (framed with a length and a CRC32C, [`frame`]); what
//! they carry is [`record`]'s (an explicit kind: a route's message or a gRPC batch). The
//! per-core service every spooling caller goes through — group commit, memory budget,
//! complete — is [`service`]; [`drain`] writes what waits on disk through the writers the
//! application registers. Every file operation goes
//! through [`storage::Storage`], so tests run the same engine on a fault-injecting in-memory
//! directory. One spool per core, used from that core only (no locks).

pub mod drain;
pub mod frame;
pub mod record;
pub mod service;
pub mod storage;

use std::collections::BTreeMap;

use bytes::Bytes;

use self::storage::{SegmentWriter, Storage};

/// Where a record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    /// Segment number.
    pub segment: u64,
    /// Index of the record in its segment.
    pub index: u32,
}

/// The ids of the records a previous run left, oldest first; [`Spool::read`] reads them.
pub type Replay = Vec<RecordId>;

/// Size limits.
#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    /// A segment is sealed once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// Bytes of live segments beyond which appends are refused.
    pub cap_bytes: u64,
}

/// Why the spool refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The cap is reached: the caller must wait for completions (backpressure).
    #[error("spool full: {live_bytes} of {cap_bytes} bytes in use")]
    Full {
        /// Bytes in live segments.
        live_bytes: u64,
        /// The configured cap.
        cap_bytes: u64,
    },
    /// A record over the frame limit.
    #[error("record of {0} bytes is over the spool's record limit")]
    TooLarge(usize),
    /// The storage failed; the records of the failed append are not durable (not acked).
    #[error("spool {operation} failed on `{segment}`: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The segment file.
        segment: String,
        /// The error.
        source: std::io::Error,
    },
}

/// What [`Spool::open`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Segments read.
    pub segments: usize,
    /// Records replayed.
    pub records: usize,
    /// Torn tails skipped: (segment, offset, reason).
    pub torn: Vec<(String, usize, String)>,
}

#[derive(Debug)]
struct Segment {
    name: String,
    bytes: u64,
    records: u32,
    /// Where each record's frame starts, by index: a read of some records reads only their
    /// bytes.
    offsets: Vec<u32>,
    outstanding: u32,
    sealed: bool,
}

impl Segment {
    /// Where the frame of record `index` starts and ends in the segment's file; `None` past
    /// its records.
    fn frame_range(&self, index: u32) -> Option<(u64, u64)> {
        let start = u64::from(*self.offsets.get(index as usize)?);
        let end = self
            .offsets
            .get(index as usize + 1)
            .map_or(self.bytes, |&next| u64::from(next));
        Some((start, end))
    }
}

/// `indexes` cut into runs of consecutive record indexes, in order.
fn consecutive_runs(indexes: &[u32]) -> impl Iterator<Item = &[u32]> {
    indexes.chunk_by(|a, b| a.checked_add(1) == Some(*b))
}

struct Active<W> {
    id: u64,
    writer: W,
    /// A failed write or sync leaves the file's tail unknown: no more appends go to it.
    broken: bool,
}

/// One core's spool.
pub struct Spool<S: Storage> {
    storage: S,
    limits: SpoolLimits,
    segments: BTreeMap<u64, Segment>,
    active: Option<Active<S::Writer>>,
    next_segment: u64,
    live_bytes: u64,
}

fn segment_name(id: u64) -> String {
    format!("segment-{id:020}.log")
}

fn segment_id(name: &str) -> Option<u64> {
    name.strip_prefix("segment-")?.strip_suffix(".log")?.parse().ok()
}

impl<S: Storage> Spool<S> {
    /// Opens the spool in `storage` and returns the ids of the records left by the previous
    /// run, oldest first; [`Spool::read`] them and complete them once they are written, as new
    /// ones. Only one segment is in memory at a time.
    pub async fn open(storage: S, limits: SpoolLimits) -> Result<(Spool<S>, Replay, Recovery), SpoolError> {
        let io = |operation: &'static str, segment: String| {
            move |source| SpoolError::Io {
                operation,
                segment,
                source,
            }
        };
        let names = storage.list().await.map_err(io("list", String::new()))?;
        let mut ids: Vec<u64> = names.iter().filter_map(|n| segment_id(n)).collect();
        ids.sort_unstable();
        let mut spool = Spool {
            storage,
            limits,
            segments: BTreeMap::new(),
            active: None,
            next_segment: ids.last().map_or(0, |last| last + 1),
            live_bytes: 0,
        };
        let mut replay = Vec::new();
        let mut recovery = Recovery::default();
        for id in ids {
            let name = segment_name(id);
            let bytes = spool.storage.read(&name).await.map_err(io("read", name.clone()))?;
            let (records, tail) = frame::decode(&bytes);
            if let frame::Tail::Torn { offset, reason } = tail {
                // After a crash this is either the block padding of the last sync (glommio pads
                // with whatever its buffer held) or a record the crash cut: neither was acked.
                tracing::warn!(
                    segment = %name,
                    offset,
                    %reason,
                    kept = records.len(),
                    "spool: unreadable tail skipped (sync padding or a record cut by the crash)"
                );
                recovery.torn.push((name.clone(), offset, reason));
            }
            recovery.segments += 1;
            recovery.records += records.len();
            if records.is_empty() {
                // Nothing to replay; a failed removal is retried on the next open.
                if let Err(error) = spool.storage.remove(&name).await {
                    tracing::warn!(segment = %name, %error, "spool: cannot remove an empty segment");
                }
                continue;
            }
            replay.extend((0..records.len() as u32).map(|index| RecordId { segment: id, index }));
            spool.live_bytes += bytes.len() as u64;
            let offsets = records.iter().map(|r| frame::frame_offset(&bytes, r) as u32).collect();
            spool.segments.insert(
                id,
                Segment {
                    name,
                    bytes: bytes.len() as u64,
                    records: records.len() as u32,
                    offsets,
                    outstanding: records.len() as u32,
                    sealed: true,
                },
            );
        }
        Ok((spool, replay, recovery))
    }

    /// Reads the records `indexes` of `segment` (appended or replayed, not yet complete) back
    /// from storage, in the order asked: records that wait on disk only (DESIGN §5) are written
    /// from here. Each run of consecutive records is one read of exactly their frames, and each
    /// body is a view of its run's buffer (no copy per record). `None` for a record that is not
    /// there (the segment was damaged after the record was acknowledged).
    pub async fn read(&self, segment: u64, indexes: &[u32]) -> Result<Vec<Option<Bytes>>, SpoolError> {
        let name = segment_name(segment);
        let io = |source| SpoolError::Io {
            operation: "read",
            segment: name.clone(),
            source,
        };
        // Each run of consecutive records, with where its frames start and end in the file.
        let runs: Option<Vec<(&[u32], u64, u64)>> = self.segments.get(&segment).and_then(|known| {
            consecutive_runs(indexes)
                .map(|run| {
                    Some((
                        run,
                        known.frame_range(run[0])?.0,
                        known.frame_range(run[run.len() - 1])?.1,
                    ))
                })
                .collect()
        });
        let Some(runs) = runs else {
            // Not records this spool knows of: the whole file, every record found in it.
            let bytes = Bytes::from(self.storage.read(&name).await.map_err(io)?);
            let (records, _) = frame::decode(&bytes);
            return Ok(indexes
                .iter()
                .map(|&index| records.get(index as usize).map(|record| bytes.slice_ref(record)))
                .collect());
        };
        let mut bodies = Vec::with_capacity(indexes.len());
        for (run, start, end) in runs {
            let bytes = self
                .storage
                .read_range(&name, start, (end - start) as usize)
                .await
                .map_err(io)?;
            let bytes = Bytes::from(bytes);
            // Acknowledged records are durable and come before any unreadable tail.
            let (records, _) = frame::decode(&bytes);
            bodies.extend((0..run.len()).map(|at| records.get(at).map(|record| bytes.slice_ref(record))));
        }
        Ok(bodies)
    }

    /// The bytes [`Spool::read`] reads for records `indexes` of `segment` (their frames), for
    /// a caller to admit that memory before it reads; `None` if the spool does not know them.
    pub fn frame_bytes(&self, segment: u64, indexes: &[u32]) -> Option<u64> {
        let known = self.segments.get(&segment)?;
        indexes
            .iter()
            .map(|&index| known.frame_range(index).map(|(start, end)| end - start))
            .sum()
    }

    /// Bytes in live segments.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Records appended or replayed and not yet complete.
    pub fn outstanding(&self) -> u64 {
        self.segments.values().map(|s| u64::from(s.outstanding)).sum()
    }

    /// Appends the records of `batches` (framed by their callers, in order) and makes them
    /// durable with one sync. On success every record is durable and may be acknowledged to its
    /// source; on error none may be (some may still be replayed after a restart, which
    /// idempotent writes absorb).
    pub async fn append(&mut self, batches: &[&frame::Framed]) -> Result<Vec<RecordId>, SpoolError> {
        let records: usize = batches.iter().map(|batch| batch.records()).sum();
        if records == 0 {
            return Ok(Vec::new());
        }
        if let Some(length) = batches.iter().find_map(|batch| batch.refused()) {
            return Err(SpoolError::TooLarge(length));
        }
        let added: u64 = batches.iter().map(|batch| batch.bytes().len() as u64).sum();
        if self.live_bytes + added > self.limits.cap_bytes {
            return Err(SpoolError::Full {
                live_bytes: self.live_bytes,
                cap_bytes: self.limits.cap_bytes,
            });
        }
        let rotate = match &self.active {
            None => true,
            Some(active) => active.broken || self.segments[&active.id].bytes + added > self.limits.segment_bytes_max,
        };
        if rotate {
            self.seal_active().await;
            self.open_segment().await?;
        }
        let Some(active) = self.active.as_mut() else {
            unreachable!("a segment was just opened");
        };
        let Some(segment) = self.segments.get_mut(&active.id) else {
            unreachable!("the active segment is tracked");
        };
        let name = segment.name.clone();
        let io = |operation: &'static str, source| SpoolError::Io {
            operation,
            segment: name,
            source,
        };
        let base = segment.bytes;
        // Whatever the outcome, these bytes may be on disk: count them against the cap.
        segment.bytes += added;
        self.live_bytes += added;
        for batch in batches {
            if let Err(source) = active.writer.write_all(batch.bytes()).await {
                active.broken = true;
                return Err(io("write", source));
            }
        }
        if let Err(source) = active.writer.sync().await {
            active.broken = true;
            return Err(io("sync", source));
        }
        let first = segment.records;
        segment.records += records as u32;
        let mut at = base;
        for batch in batches {
            segment
                .offsets
                .extend(batch.starts().iter().map(|&start| (at + start as u64) as u32));
            at += batch.bytes().len() as u64;
        }
        segment.outstanding += records as u32;
        Ok((0..records as u32)
            .map(|i| RecordId {
                segment: active.id,
                index: first + i,
            })
            .collect())
    }

    /// Marks a record written. Removes segments that are sealed and fully complete; a failed
    /// removal is logged and retried on the next completion (the records would replay, which
    /// is safe).
    pub async fn complete(&mut self, id: RecordId) {
        if let Some(segment) = self.segments.get_mut(&id.segment) {
            // A record completes once: a second completion is a caller's bug.
            debug_assert!(segment.outstanding > 0, "record {id:?} completed twice");
            segment.outstanding = segment.outstanding.saturating_sub(1);
        }
        self.remove_finished().await;
    }

    async fn remove_finished(&mut self) {
        let finished: Vec<u64> = self
            .segments
            .iter()
            .filter(|(_, s)| s.sealed && s.outstanding == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in finished {
            let name = self.segments[&id].name.clone();
            match self.storage.remove(&name).await {
                Ok(()) => {
                    if let Some(segment) = self.segments.remove(&id) {
                        self.live_bytes = self.live_bytes.saturating_sub(segment.bytes);
                    }
                }
                Err(error) => {
                    tracing::warn!(segment = %name, %error, "spool: cannot remove a finished segment; will retry")
                }
            }
        }
    }

    async fn seal_active(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        if let Some(segment) = self.segments.get_mut(&active.id) {
            segment.sealed = true;
        }
        if let Err(error) = active.writer.close().await {
            // Everything acknowledged from it was synced before; the close only trims padding.
            tracing::warn!(segment = active.id, %error, "spool: closing a segment failed");
        }
        self.remove_finished().await;
    }

    async fn open_segment(&mut self) -> Result<(), SpoolError> {
        let id = self.next_segment;
        self.next_segment += 1;
        let name = segment_name(id);
        let writer = self.storage.create(&name).await.map_err(|source| SpoolError::Io {
            operation: "create",
            segment: name.clone(),
            source,
        })?;
        self.segments.insert(
            id,
            Segment {
                name,
                bytes: 0,
                records: 0,
                offsets: Vec::new(),
                outstanding: 0,
                sealed: false,
            },
        );
        self.active = Some(Active {
            id,
            writer,
            broken: false,
        });
        Ok(())
    }

    /// Seals the active segment (graceful shutdown); records still outstanding replay on the
    /// next open.
    pub async fn close(mut self) {
        self.seal_active().await;
        self.remove_finished().await;
    }
}

#[cfg(test)]
mod tests;
