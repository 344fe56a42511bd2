use std::collections::{BTreeMap, BTreeSet};

use futures::executor::block_on;
use proptest::prelude::*;

use super::storage::{DmaStorage, Fault, MemoryStorage};
use super::*;

const LIMITS: SpoolLimits = SpoolLimits {
    segment_bytes_max: 256,
    cap_bytes: 4096,
};

/// Records read back, with their ids.
type Records = Vec<(RecordId, Vec<u8>)>;

/// Opens the spool and reads back every record it replays, with its id.
fn open(storage: &MemoryStorage) -> (Spool<MemoryStorage>, Records, Recovery) {
    let (spool, ids, recovery) = block_on(Spool::open(storage.clone(), LIMITS)).expect("open");
    let replay = block_on(read_all(&spool, &ids));
    (spool, replay, recovery)
}

/// Reads records `ids` back, one read per segment.
async fn read_all<S: Storage>(spool: &Spool<S>, ids: &[RecordId]) -> Records {
    let mut by_segment: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for id in ids {
        by_segment.entry(id.segment).or_default().push(id.index);
    }
    let mut records = Vec::new();
    for (segment, indexes) in by_segment {
        let bodies = spool.read(segment, &indexes).await.expect("read");
        records.extend(indexes.into_iter().zip(bodies).map(|(index, body)| {
            let body = body.expect("every asked record is there");
            (RecordId { segment, index }, body.to_vec())
        }));
    }
    records
}

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Complete(usize),
    Fault(Fault),
    Crash(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..6).prop_map(Op::Append),
        4 => any::<usize>().prop_map(Op::Complete),
        1 => prop_oneof![
            Just(Fault::WriteError),
            Just(Fault::ShortWrite),
            Just(Fault::SyncError),
            Just(Fault::CreateError),
            Just(Fault::RemoveError),
        ]
        .prop_map(Op::Fault),
        1 => (0usize..40).prop_map(Op::Crash),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Against a model under random appends, completions, injected faults, crashes (with torn
    /// tails) and reopens: every acknowledged record that was not completed is replayed, nothing
    /// is replayed that was never appended, nothing twice, and completed segments go away.
    #[test]
    fn spool_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        let storage = MemoryStorage::default();
        let (mut spool, replay, _) = open(&storage);
        prop_assert!(replay.is_empty());
        let mut counter = 0u32;
        let mut attempted: BTreeSet<Vec<u8>> = BTreeSet::new();
        // Acknowledged records not yet completed.
        let mut outstanding: BTreeMap<Vec<u8>, RecordId> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Append(n) => {
                    let payloads: Vec<Vec<u8>> = (0..n)
                        .map(|_| {
                            counter += 1;
                            format!("record-{counter:06}-{}", "x".repeat((counter % 7) as usize)).into_bytes()
                        })
                        .collect();
                    attempted.extend(payloads.iter().cloned());
                    if let Ok(ids) = block_on(spool.append(&[&framed(&payloads)])) {
                        prop_assert_eq!(ids.len(), n);
                        for (payload, id) in payloads.into_iter().zip(ids) {
                            outstanding.insert(payload, id);
                        }
                    }
                    prop_assert!(spool.live_bytes() <= LIMITS.cap_bytes);
                }
                Op::Complete(pick) => {
                    if !outstanding.is_empty() {
                        let key = outstanding.keys().nth(pick % outstanding.len()).cloned().expect("key");
                        let id = outstanding.remove(&key).expect("id");
                        block_on(spool.complete(id));
                    }
                }
                Op::Fault(fault) => storage.inject(fault),
                Op::Crash(_) | Op::Reopen => {
                    if let Op::Crash(torn) = op {
                        drop(spool);
                        storage.crash(torn);
                    } else {
                        block_on(spool.close());
                    }
                    let (reopened, replay, _) = open(&storage);
                    spool = reopened;
                    let replayed: BTreeMap<Vec<u8>, RecordId> = replay.iter().map(|(id, p)| (p.clone(), *id)).collect();
                    prop_assert_eq!(replayed.len(), replay.len(), "no record replayed twice");
                    for payload in outstanding.keys() {
                        prop_assert!(replayed.contains_key(payload), "acknowledged record lost: {:?}", String::from_utf8_lossy(payload));
                    }
                    for payload in replayed.keys() {
                        prop_assert!(attempted.contains(payload), "replayed a record never appended");
                    }
                    // Acknowledged records stay outstanding under their new ids. Anything else
                    // that replays (completed but not yet removed, or from a refused append) is
                    // written again by the caller and completed.
                    let mut still = BTreeMap::new();
                    for (payload, id) in replayed {
                        if outstanding.contains_key(&payload) {
                            still.insert(payload, id);
                        } else {
                            block_on(spool.complete(id));
                        }
                    }
                    outstanding = still;
                }
            }
        }
        // Completing everything empties the spool once the active segment is sealed.
        storage.clear_faults();
        for (_, id) in std::mem::take(&mut outstanding) {
            block_on(spool.complete(id));
        }
        block_on(spool.close());
        let (spool, replay, _) = open(&storage);
        prop_assert!(replay.is_empty());
        prop_assert_eq!(spool.live_bytes(), 0);
    }
}

fn payloads(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range.map(|i| format!("payload {i}").into_bytes()).collect()
}

/// `payloads` framed as one caller's batch.
fn framed(payloads: &[Vec<u8>]) -> frame::Framed {
    let mut framed = frame::Framed::default();
    payloads.iter().for_each(|payload| framed.push(payload));
    framed
}

fn append(spool: &mut Spool<MemoryStorage>, payloads: &[Vec<u8>]) -> Result<Vec<RecordId>, SpoolError> {
    block_on(spool.append(&[&framed(payloads)]))
}

fn replayed(replay: &[(RecordId, Vec<u8>)]) -> Vec<Vec<u8>> {
    replay.iter().map(|(_, p)| p.clone()).collect()
}

/// Records waiting on disk only are read back from the live spool — the active segment and
/// sealed ones — in the order asked; an index past the segment's records reads as `None`.
#[test]
fn live_records_read_back_from_active_and_sealed_segments() {
    let storage = MemoryStorage::default();
    let (mut spool, _, _) = open(&storage);
    let mut ids = Vec::new();
    for chunk in payloads(0..30).chunks(3) {
        ids.extend(append(&mut spool, chunk).expect("append"));
    }
    assert!(ids.last().expect("ids").segment > 0, "several segments");
    let back = block_on(read_all(&spool, &ids));
    assert_eq!(replayed(&back), payloads(0..30));
    // Any subset of a segment, read as a byte range, in the order asked.
    for window in ids.windows(3).filter(|w| w[0].segment == w[2].segment) {
        let asked = [window[2].index, window[1].index];
        let read: Vec<Option<Vec<u8>>> = block_on(spool.read(window[0].segment, &asked))
            .expect("read")
            .into_iter()
            .map(|body| body.map(|body| body.to_vec()))
            .collect();
        let expected: Vec<Option<Vec<u8>>> = [window[2], window[1]]
            .iter()
            .map(|id| back.iter().find(|(i, _)| i == id).map(|(_, p)| p.clone()))
            .collect();
        assert_eq!(read, expected);
    }
    let last = ids.last().expect("ids");
    let asked = block_on(spool.read(last.segment, &[last.index, last.index + 1])).expect("read");
    assert_eq!(asked, vec![Some(payloads(29..30).remove(0).into()), None]);
    // Records of two callers in one commit: their frames back to back, each read back whole.
    let batches = [framed(&payloads(30..32)), framed(&payloads(32..35))];
    let both = block_on(spool.append(&[&batches[0], &batches[1]])).expect("append");
    let back = block_on(read_all(&spool, &both));
    assert_eq!(replayed(&back), payloads(30..35));
    let frames: u64 = batches.iter().map(|batch| batch.bytes().len() as u64).sum();
    let indexes: Vec<u32> = both.iter().map(|id| id.index).collect();
    assert_eq!(spool.frame_bytes(both[0].segment, &indexes), Some(frames));
    assert_eq!(spool.frame_bytes(both[0].segment, &[indexes[4] + 1]), None);
    // Records apart (two runs) read as two ranges, each body a view of its run's buffer.
    let apart = block_on(spool.read(both[0].segment, &[indexes[0], indexes[3], indexes[4]])).expect("read");
    let apart: Vec<Option<Vec<u8>>> = apart.into_iter().map(|body| body.map(|b| b.to_vec())).collect();
    let expected = payloads(30..35);
    assert_eq!(
        apart,
        vec![
            Some(expected[0].clone()),
            Some(expected[3].clone()),
            Some(expected[4].clone())
        ]
    );
}

#[test]
fn write_and_sync_errors_refuse_the_batch_and_the_next_one_lands() {
    for fault in [
        Fault::WriteError,
        Fault::ShortWrite,
        Fault::SyncError,
        Fault::CreateError,
    ] {
        let storage = MemoryStorage::default();
        let (mut spool, _, _) = open(&storage);
        if fault != Fault::CreateError {
            append(&mut spool, &payloads(0..2)).expect("first batch");
        }
        storage.inject(fault);
        let failed = append(&mut spool, &payloads(2..4));
        assert!(matches!(failed, Err(SpoolError::Io { .. })), "{fault:?}: {failed:?}");
        append(&mut spool, &payloads(4..6)).expect("the next batch lands in a fresh segment");
        drop(spool);
        storage.crash(0);
        let (_, replay, recovery) = open(&storage);
        let replayed = replayed(&replay);
        let mut expected = if fault == Fault::CreateError {
            vec![]
        } else {
            payloads(0..2)
        };
        expected.extend(payloads(4..6));
        // The failed batch may or may not be on disk (its records were never acknowledged);
        // the acknowledged ones are all there.
        for payload in &expected {
            assert!(replayed.contains(payload), "{fault:?}: lost {payload:?}");
        }
        if fault == Fault::ShortWrite {
            assert_eq!(recovery.torn.len(), 1, "the half-written frame is a torn tail");
        }
    }
}

#[test]
fn torn_tail_is_skipped_and_earlier_records_survive() {
    let storage = MemoryStorage::default();
    let (mut spool, _, _) = open(&storage);
    append(&mut spool, &payloads(0..3)).expect("append");
    drop(spool);
    let name = segment_name(0);
    storage
        .with_durable(&name, |bytes| {
            let len = bytes.len();
            bytes[len - 2] ^= 0xff;
        })
        .expect("segment exists");
    let (_, replay, recovery) = open(&storage);
    assert_eq!(replayed(&replay), payloads(0..2));
    assert_eq!(recovery.torn.len(), 1);
    assert!(recovery.torn[0].2.contains("checksum"), "{:?}", recovery.torn);
}

#[test]
fn the_cap_refuses_appends_until_completions_free_segments() {
    let storage = MemoryStorage::default();
    let limits = SpoolLimits {
        segment_bytes_max: 64,
        cap_bytes: 200,
    };
    let (mut spool, _, _) = block_on(Spool::open(storage.clone(), limits)).expect("open");
    let mut ids = Vec::new();
    let full = loop {
        match append(&mut spool, &payloads(0..1)) {
            Ok(mut new) => ids.append(&mut new),
            Err(error) => break error,
        }
    };
    assert!(matches!(full, SpoolError::Full { .. }), "{full:?}");
    for id in ids {
        block_on(spool.complete(id));
    }
    append(&mut spool, &payloads(0..1)).expect("room again once sealed segments are removed");
}

#[test]
fn a_failed_removal_is_retried_and_never_loses_outstanding_records() {
    let storage = MemoryStorage::default();
    let (mut spool, _, _) = open(&storage);
    let first = append(&mut spool, &payloads(0..10)).expect("append");
    // 10 records of ~17 bytes: over 256 bytes the next append rotates and seals segment 0.
    let more = append(&mut spool, &payloads(10..20)).expect("append");
    let more2 = append(&mut spool, &payloads(20..30)).expect("append");
    storage.inject(Fault::RemoveError);
    for id in first {
        block_on(spool.complete(id));
    }
    drop(spool);
    storage.crash(0);
    let (_, replay, _) = open(&storage);
    let replayed = replayed(&replay);
    // Segment 0 could not be removed: its records replay (at-least-once); nothing is lost.
    for payload in payloads(10..30) {
        assert!(replayed.contains(&payload));
    }
    assert!(more.len() + more2.len() == 20);
}

/// The glommio DMA files: 20,000 records in batches, a reopen replays the uncompleted ones, a
/// torn last record on disk is skipped.
#[test]
fn dma_storage_appends_replays_and_skips_a_torn_tail() {
    let dir = std::env::temp_dir().join(format!("shardgate-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.clone();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let storage = DmaStorage::new(path.clone()).expect("dir");
            let limits = SpoolLimits {
                segment_bytes_max: 1 << 20,
                cap_bytes: 1 << 30,
            };
            let (mut spool, replay, _) = Spool::open(storage.clone(), limits).await.expect("open");
            assert!(replay.is_empty());
            let records = payloads(0..20_000);
            let mut ids = Vec::new();
            for batch in records.chunks(100) {
                ids.extend(spool.append(&[&framed(batch)]).await.expect("append"));
            }
            // Read back from the DMA files while the writer is open, the active segment too.
            let back = read_all(&spool, &ids[9_000..]).await;
            assert_eq!(replayed(&back), records[9_000..].to_vec());
            for id in &ids[..10_000] {
                spool.complete(*id).await;
            }
            drop(spool);
            let (reopened, ids, recovery) = Spool::open(storage.clone(), limits).await.expect("reopen");
            let replayed: BTreeSet<Vec<u8>> = read_all(&reopened, &ids).await.into_iter().map(|(_, p)| p).collect();
            drop(reopened);
            for payload in &records[10_000..] {
                assert!(
                    replayed.contains(payload),
                    "lost {:?}",
                    String::from_utf8_lossy(payload)
                );
            }
            assert!(recovery.torn.is_empty(), "{:?}", recovery.torn);
            // Cut the newest segment inside its last record.
            let newest = std::fs::read_dir(&path)
                .expect("dir")
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .max()
                .expect("a segment");
            let len = std::fs::metadata(&newest).expect("meta").len();
            let file = std::fs::OpenOptions::new().write(true).open(&newest).expect("open");
            file.set_len(len - 3).expect("truncate");
            let (_, replay, recovery) = Spool::open(storage, limits).await.expect("reopen");
            assert_eq!(recovery.torn.len(), 1, "{recovery:?}");
            assert!(replay.len() >= records.len() - 10_000 - 1);
        })
        .expect("executor")
        .join()
        .expect("join");
    let _ = std::fs::remove_dir_all(&dir);
}
