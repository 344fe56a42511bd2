//! ZeroMQ source: a PULL or SUB socket, bound or connected, into a table.
//!
//! One housekeeping thread per route owns the socket (libzmq sockets are not thread-safe and the
//! `zmq` crate is blocking): it receives multipart messages — the last frame is the payload;
//! with two or more frames the first is the key (a SUB topic, for example) — and hands batches
//! to the cores round robin over the route's bounded queues; the cores' side is
//! `bridge::route`. When the queues are full the thread stops receiving and libzmq's high-water
//! mark pushes back on (PUSH) or drops for (PUB) the senders.
//!
//! Delivery: ZeroMQ has no acknowledgement, so this source is **at-most-once**: messages received
//! but not yet written when the gateway dies are lost (the NVMe spool of issue 5 makes it
//! at-least-once from receipt). Malformed messages still go to the dead-letter destination.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::handoff::RoundRobin;
use super::message::{Origin, Settlement, SourceMessage};
use super::route::RouteCounters;
use super::source::{Consumer, Handoff, Source, Start};
use crate::config::{ZmqSocketKind, ZmqSourceConfig};
use crate::runtime::shutdown::Stop;
use crate::sink::dead_letter::headers;

/// Messages per batch handed to a core, at most.
const BATCH_MESSAGES_MAX: usize = 256;
/// How long one receive waits, so the thread notices shutdown.
const RECEIVE_TIMEOUT_MS: i32 = 100;
/// Messages libzmq buffers per socket before back-pressuring or dropping.
const RECEIVE_HIGH_WATER_MARK: i32 = 10_000;

/// Opens, configures and binds or connects the socket. Called at start-up so a bad endpoint
/// stops the gateway with the reason.
pub fn open(source: &ZmqSourceConfig) -> Result<zmq::Socket, String> {
    let context = zmq::Context::new();
    let socket = context
        .socket(match source.socket {
            ZmqSocketKind::Pull => zmq::PULL,
            ZmqSocketKind::Sub => zmq::SUB,
        })
        .map_err(|e| e.to_string())?;
    socket.set_rcvtimeo(RECEIVE_TIMEOUT_MS).map_err(|e| e.to_string())?;
    socket.set_rcvhwm(RECEIVE_HIGH_WATER_MARK).map_err(|e| e.to_string())?;
    socket.set_linger(0).map_err(|e| e.to_string())?;
    if source.socket == ZmqSocketKind::Sub {
        for prefix in &source.subscribe {
            socket.set_subscribe(prefix.as_bytes()).map_err(|e| e.to_string())?;
        }
    }
    let endpoint = &source.endpoint;
    if source.bind {
        socket
            .bind(endpoint)
            .map_err(|e| format!("cannot bind `{endpoint}`: {e}"))?;
    } else {
        socket
            .connect(endpoint)
            .map_err(|e| format!("cannot connect `{endpoint}`: {e}"))?;
    }
    Ok(socket)
}

/// A ZeroMQ route's source: its socket, bound or connected at start-up.
pub struct ZmqSource {
    socket: zmq::Socket,
    endpoint: String,
}

impl Source for ZmqSource {
    type Config = ZmqSourceConfig;

    fn open(config: &ZmqSourceConfig, start: &Start<'_>) -> anyhow::Result<ZmqSource> {
        let socket = open(config).map_err(|reason| anyhow::anyhow!("route `{}`: {reason}", start.route))?;
        Ok(ZmqSource {
            socket,
            endpoint: config.endpoint.clone(),
        })
    }

    fn name(&self) -> String {
        self.endpoint.clone()
    }

    fn consumer(self, handoff: Handoff) -> Consumer {
        Consumer::Thread(Box::new(move || {
            receive(
                handoff.route,
                self.endpoint,
                self.socket,
                handoff.queues,
                handoff.counters,
                handoff.stop,
            )
        }))
    }
}

/// The receive loop; returns once the gateway stops, dropping the core queues.
pub fn receive(
    route: String,
    endpoint: String,
    socket: zmq::Socket,
    queues: Vec<mpsc::Sender<Vec<SourceMessage>>>,
    counters: Arc<RouteCounters>,
    stop: Stop,
) {
    tracing::info!(%route, %endpoint, cores = queues.len(), "receiving (at-most-once)");
    let mut sequence: i64 = 0;
    let mut cores = RoundRobin::new(queues);
    while !stop.is_stopped() {
        let mut batch = Vec::new();
        let mut flags = 0;
        while batch.len() < BATCH_MESSAGES_MAX {
            match socket.recv_multipart(flags) {
                Ok(frames) => {
                    sequence += 1;
                    batch.push(source_message(frames, sequence, &endpoint));
                    flags = zmq::DONTWAIT;
                }
                Err(zmq::Error::EAGAIN) => break,
                Err(error) => {
                    tracing::warn!(%route, %error, "ZeroMQ receive error");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        if !cores.hand_off_blocking(batch, &counters) {
            tracing::error!(%route, "core queue closed; stopping the route");
            break;
        }
    }
    counters.log_stopped(&route);
}

fn source_message(mut frames: Vec<Vec<u8>>, sequence: i64, endpoint: &str) -> SourceMessage {
    let payload = frames.pop().unwrap_or_default();
    // An empty first frame is no key, as a Kafka message without one.
    let key = if frames.is_empty() {
        None
    } else {
        Some(frames.swap_remove(0))
    }
    .filter(|k| !k.is_empty())
    .map(Into::into);
    SourceMessage {
        write_timestamp_us: None,
        position: sequence,
        timestamp_ms: Some(chrono::Utc::now().timestamp_millis()),
        key,
        headers: Vec::new(),
        payload: Some(payload.into()),
        origin: Box::new(ZmqOrigin {
            endpoint: endpoint.to_string(),
        }),
    }
}

/// Where a ZeroMQ message came from: nothing to acknowledge (at-most-once).
#[derive(Debug)]
pub struct ZmqOrigin {
    /// The socket's endpoint.
    pub endpoint: String,
}

impl Origin for ZmqOrigin {
    fn settle(&self, _: Settlement, _: &str) {}

    fn coordinates(&self, _: &str, position: i64) -> Vec<(&'static str, String)> {
        vec![
            (headers::SOURCE_ENDPOINT, self.endpoint.clone()),
            (headers::SOURCE_SEQUENCE, position.to_string()),
        ]
    }
}
