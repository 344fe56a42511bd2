//! ZeroMQ source: a PULL or SUB socket, bound or connected, into a table.
//!
//! One housekeeping thread per route owns the socket (libzmq sockets are not thread-safe and the
//! `zmq` crate is blocking): it receives multipart messages — the last frame is the payload;
//! with two or more frames the first is the key (a SUB topic, for example) — and hands batches
//! to the cores round robin over the route's bounded queues; the cores' side is
//! `bridge::route`. When the queues are full the thread stops receiving and libzmq's high-water
//! mark pushes back on (PUSH) or drops for (PUB) the senders.
//!
//! With `security` (CURVE), the socket is a CURVE server with the configured secret key and a
//! ZAP handler — a thread of its own on the socket's context, answering libzmq's
//! authentication requests on `inproc://zeromq.zap.01` — admits only the listed client public
//! keys; any other peer is refused in the handshake (nothing it sends is received) and counted.
//!
//! Delivery: ZeroMQ has no acknowledgement, so this source is **at-most-once**: messages received
//! but not yet written when the gateway dies are lost (the NVMe spool of issue 5 makes it
//! at-least-once from receipt). Malformed messages still go to the dead-letter destination.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::handoff::RoundRobin;
use super::message::{Origin, Settlement, Settlements, SourceMessage};
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

/// The ZAP endpoint libzmq asks (ZeroMQ RFC 27), and the domain the route's socket names.
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
const ZAP_DOMAIN: &str = "shardgate";

/// Stops the route's ZAP handler thread when dropped (with the socket it guards).
pub struct ZapGuard(Arc<AtomicBool>);

impl Drop for ZapGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Opens, configures and binds or connects the socket. Called at start-up so a bad endpoint
/// or key stops the gateway with the reason. With CURVE, the ZAP handler runs until the
/// returned guard drops.
pub fn open(source: &ZmqSourceConfig, route: &str) -> Result<(zmq::Socket, Option<ZapGuard>), String> {
    let context = zmq::Context::new();
    let guard = match &source.security {
        Some(security) => Some(start_zap_handler(&context, route, security.client_keys.clone())?),
        None => None,
    };
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
    if let Some(security) = &source.security {
        let path = security.curve_secret_key_file.display().to_string();
        let secret =
            crate::config::read_curve_secret_key("security.curve_secret_key_file", &path).map_err(|e| e.to_string())?;
        socket.set_curve_server(true).map_err(|e| format!("CURVE: {e}"))?;
        socket
            .set_curve_secretkey(&secret)
            .map_err(|e| format!("CURVE secret key: {e}"))?;
        socket
            .set_zap_domain(ZAP_DOMAIN)
            .map_err(|e| format!("ZAP domain: {e}"))?;
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
    Ok((socket, guard))
}

/// Binds the context's ZAP endpoint and answers its requests on a thread of its own: CURVE
/// peers whose public key is in `allowed` get 200, every other request 400.
fn start_zap_handler(context: &zmq::Context, route: &str, allowed: Vec<[u8; 32]>) -> Result<ZapGuard, String> {
    let handler = context.socket(zmq::REP).map_err(|e| format!("ZAP handler: {e}"))?;
    handler.set_linger(0).map_err(|e| format!("ZAP handler: {e}"))?;
    handler
        .set_rcvtimeo(RECEIVE_TIMEOUT_MS)
        .map_err(|e| format!("ZAP handler: {e}"))?;
    handler
        .bind(ZAP_ENDPOINT)
        .map_err(|e| format!("ZAP handler: cannot bind `{ZAP_ENDPOINT}`: {e}"))?;
    let stopped = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&stopped);
    let route = route.to_string();
    let refused = metrics::counter!(crate::telemetry::metric::ZEROMQ_PEERS_REFUSED, "source" => route.clone());
    std::thread::Builder::new()
        .name(format!("zap-{route}"))
        .spawn(move || {
            // A refused peer reconnects every 100 ms: one line per interval says so.
            let log = crate::telemetry::LogEvery::new();
            while !stop.load(Ordering::Relaxed) {
                let request = match handler.recv_multipart(0) {
                    Ok(request) => request,
                    Err(zmq::Error::EAGAIN) => continue,
                    Err(error) => {
                        tracing::warn!(%route, %error, "ZAP handler receive error; peers are refused");
                        break;
                    }
                };
                let (reply, admitted) = zap_reply(&request, &allowed);
                if !admitted {
                    refused.increment(1);
                    if let Some(suppressed) = log.due(Duration::from_secs(10)) {
                        tracing::info!(%route, peer = %zap_address(&request), suppressed, "ZeroMQ peer refused: its CURVE key is not in `security.curve_client_keys_file`");
                    }
                }
                if let Err(error) = handler.send_multipart(reply, 0) {
                    tracing::warn!(%route, %error, "ZAP handler send error");
                }
            }
        })
        .map_err(|e| format!("ZAP handler thread: {e}"))?;
    Ok(ZapGuard(stopped))
}

/// The peer address of a ZAP request (its fourth frame), for the log.
fn zap_address(request: &[Vec<u8>]) -> String {
    request
        .get(3)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .unwrap_or_default()
}

/// The reply to one ZAP request (RFC 27: version, request id, domain, address, identity,
/// mechanism, credentials…) and whether the peer is admitted: a CURVE peer whose key (the one
/// credential) is allowed.
fn zap_reply(request: &[Vec<u8>], allowed: &[[u8; 32]]) -> (Vec<Vec<u8>>, bool) {
    let request_id = request.get(1).cloned().unwrap_or_default();
    let matched = match request {
        [version, _, _, _, _, mechanism, key] if version == b"1.0" && mechanism == b"CURVE" => {
            allowed.iter().find(|allowed| allowed.as_slice() == key.as_slice())
        }
        _ => None,
    };
    let reply = |code: &[u8], text: &[u8], user: Vec<u8>| {
        vec![
            b"1.0".to_vec(),
            request_id.clone(),
            code.to_vec(),
            text.to_vec(),
            user,
            Vec::new(),
        ]
    };
    match matched {
        // The user id is the client's public key, as Z85 text.
        Some(key) => (
            reply(b"200", b"OK", crate::config::curve_key_text(key).into_bytes()),
            true,
        ),
        None => (reply(b"400", b"key not allowed", Vec::new()), false),
    }
}

/// A ZeroMQ route's source: its socket, bound or connected at start-up.
pub struct ZmqSource {
    socket: zmq::Socket,
    endpoint: String,
    /// The ZAP handler's lifetime, with CURVE.
    zap: Option<ZapGuard>,
}

impl Source for ZmqSource {
    type Config = ZmqSourceConfig;

    fn open(config: &ZmqSourceConfig, start: &Start<'_>) -> anyhow::Result<ZmqSource> {
        let (socket, zap) =
            open(config, start.route).map_err(|reason| anyhow::anyhow!("route `{}`: {reason}", start.route))?;
        Ok(ZmqSource {
            socket,
            endpoint: config.endpoint.clone(),
            zap,
        })
    }

    fn name(&self) -> String {
        self.endpoint.clone()
    }

    fn consumer(self, handoff: Handoff) -> Consumer {
        Consumer::Thread(Box::new(move || {
            // The ZAP handler stops when the receive loop has.
            let _zap = self.zap;
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
    fn settle(&self, _: Settlement, _: &mut Settlements<'_>) {}

    fn coordinates(&self, _: &str, position: i64) -> Vec<(&'static str, String)> {
        vec![
            (headers::SOURCE_ENDPOINT, self.endpoint.clone()),
            (headers::SOURCE_SEQUENCE, position.to_string()),
        ]
    }
}
