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

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use futures::lock::Mutex;

use super::dead_letter::headers;
use super::route::{Origin, SourceMessage};
use crate::config::SpoolConfig;
use crate::spool::storage::DmaStorage;
use crate::spool::{RecordId, Replay, Spool, SpoolError, SpoolLimits};

#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, missing_docs, unused_imports, dead_code, mismatched_lifetime_syntaxes)]
#[path = "spool_record_generated.rs"]
mod spool_record_generated;
use spool_record_generated::shardgate::spool as fb;

/// How long an append waits before retrying when the spool is full (backpressure).
const FULL_WAIT: Duration = Duration::from_millis(20);
/// Longest wait between retries of a failing disk.
const IO_BACKOFF_MAX: Duration = Duration::from_secs(2);

type CoreSpool = Rc<Mutex<Spool<DmaStorage>>>;

thread_local! {
    static SPOOL: RefCell<Option<CoreSpool>> = const { RefCell::new(None) };
}

fn core_spool() -> Option<CoreSpool> {
    SPOOL.with(|s| s.borrow().clone())
}

/// Opens core `core`'s spool and installs it for this thread; returns the records left by the
/// previous run.
pub async fn open_on_core(config: &SpoolConfig, core: usize) -> Result<Replay, String> {
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
    SPOOL.with(|s| *s.borrow_mut() = Some(Rc::new(Mutex::new(spool))));
    Ok(replay)
}

/// Appends records and waits until they are durable: retries while the spool is full (the
/// caller's source pauses meanwhile) or the disk fails (logged), so it returns only with
/// every record synced.
pub async fn append(route: &str, records: &[Vec<u8>]) -> Vec<RecordId> {
    let Some(spool) = core_spool() else {
        unreachable!("spooled routes only run on cores whose spool is open");
    };
    let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
    let mut backoff = Duration::from_millis(50);
    let mut full_since: Option<std::time::Instant> = None;
    loop {
        let result = spool.lock().await.append(&refs).await;
        match result {
            Ok(ids) => return ids,
            Err(SpoolError::Full { live_bytes, cap_bytes }) => {
                if full_since.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(
                        route,
                        live_bytes,
                        cap_bytes,
                        "spool full: the route waits for rows to be written"
                    );
                    full_since = Some(std::time::Instant::now());
                }
                tokio::time::sleep(FULL_WAIT).await;
            }
            Err(error) => {
                tracing::error!(route, %error, "spool append failed; retrying (the source is not acknowledged)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(IO_BACKOFF_MAX);
            }
        }
    }
}

/// Whether this core's spool is open (routes or the ingest API may spool).
pub fn is_open() -> bool {
    SPOOL.with(|s| s.borrow().is_some())
}

/// Appends one record once, without waiting: the gRPC path answers RESOURCE_EXHAUSTED when the
/// spool is full and UNAVAILABLE when the disk fails.
pub async fn try_append(record: &[u8]) -> Result<Vec<RecordId>, SpoolError> {
    let Some(spool) = core_spool() else {
        unreachable!("callers check `is_open` first");
    };
    let result = spool.lock().await.append(&[record]).await;
    result
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

/// Writes the records `replay` (left in this core's spool by the previous run) through their
/// routes on this core, in batches, completing each record once its rows are written. Records
/// of routes no longer configured stay in the spool (logged) until such a route returns.
pub async fn replay_on_core(
    core: usize,
    replay: Replay,
    writers: &std::collections::HashMap<String, std::sync::Arc<super::route::RouteWriter>>,
    ingest: Option<crate::ingest::service::IngestService>,
) {
    const REPLAY_BATCH: usize = 512;
    if replay.is_empty() {
        return;
    }
    let total = replay.len();
    let mut by_route: std::collections::BTreeMap<String, Vec<(RecordId, SourceMessage)>> = Default::default();
    let mut unusable = Vec::new();
    let mut grpc = Vec::new();
    for (id, bytes) in replay {
        match decode(&bytes) {
            Ok((route, message)) if route == GRPC_RECORD => match (&ingest, message.payload.as_deref()) {
                (Some(_), Some(payload)) => match <crate::ingest::proto::RowBatch as prost::Message>::decode(payload) {
                    Ok(batch) => grpc.push((id, batch)),
                    Err(error) => {
                        tracing::error!(core, %error, "spool: undecodable gRPC batch skipped");
                        unusable.push(id);
                    }
                },
                _ => tracing::warn!(core, "spool: gRPC batch kept (the ingest API is not configured)"),
            },
            Ok((route, message)) if writers.contains_key(&route) => {
                by_route.entry(route).or_default().push((id, message))
            }
            Ok((route, _)) => tracing::warn!(core, %route, "spool: record of a route not in the config; kept"),
            Err(reason) => {
                tracing::error!(core, %reason, "spool: undecodable record skipped");
                unusable.push(id);
            }
        }
    }
    complete(&unusable).await;
    if let Some(service) = &ingest {
        for (id, batch) in grpc {
            service.write_spooled(batch, vec![id]).await;
        }
    }
    for (route, records) in by_route {
        let writer = &writers[&route];
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let (ids, batch): (Vec<RecordId>, Vec<SourceMessage>) = records.by_ref().take(REPLAY_BATCH).unzip();
            writer.write_replayed(core, batch, ids).await;
        }
    }
    tracing::info!(core, records = total, "spool: replay written");
}

#[cfg(test)]
mod tests {
    use super::*;

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
