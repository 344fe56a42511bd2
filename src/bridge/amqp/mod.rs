//! RabbitMQ (AMQP 0-9-1) source: a queue consumer with prefetch, at-least-once into a table.
//!
//! The consumer loop runs on the island: connect, set the prefetch (`basic.qos`), consume, and
//! hand ready chunks of deliveries to the cores round robin over the route's bounded queues; the
//! cores' side is `bridge::route`. A delivery is acked (`basic.ack`) only after its row is
//! confirmed, or rejected without requeue after its dead letter is confirmed. Prefetch bounds
//! what the broker hands out unacked; full core queues stop the loop. Several gateways on one
//! queue are competing consumers. A lost connection is re-established with capped backoff; its
//! unacked deliveries are redelivered by the broker (to this or another gateway).
//!
//! Write timestamps come from the message's `timestamp` property (seconds) when the producer
//! sets it, else from the receipt time; the position that orders one millisecond is the
//! delivery tag. AMQP has no stable offset, so a redelivered message writes the same values with
//! a write time derived anew (set `timestamp` on the producer side for identical cells).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub mod ack;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio::sync::mpsc;

use super::handoff::{self, RoundRobin};
use super::message::SourceMessage;
use super::route::RouteCounters;
use super::source::{Consumer, Handoff, Source, Start};
use crate::config::AmqpSourceConfig;
use crate::runtime::shutdown::Stop;
use crate::sink::broker::amqp::{connect, redact};
use ack::AmqpOrigin;

/// Deliveries a hand-off to one core gathers before it goes ([`handoff::linger`]; lapin's
/// last chunk may take it past, by less than this again).
const CHUNK_MESSAGES_MAX: usize = 512;
/// How long a hand-off waits for more deliveries after its first ([`handoff::linger`]): lapin
/// yields deliveries one frame at a time, so without it a core got hand-offs of 4–5 messages
/// and the database batches of as many rows. Bounded by [`CHUNK_MESSAGES_MAX`] and, through the
/// unacknowledged window, by the prefetch.
const HANDOFF_LINGER: Duration = Duration::from_millis(5);
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(200);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A RabbitMQ route's source: checked at start-up (the broker answers, the queue exists or is
/// declared); the consumer connects on the island and reconnects itself.
pub struct AmqpSource {
    config: AmqpSourceConfig,
    shutdown_deadline: Duration,
}

impl Source for AmqpSource {
    type Config = AmqpSourceConfig;

    fn open(config: &AmqpSourceConfig, start: &Start<'_>) -> anyhow::Result<AmqpSource> {
        start
            .island
            .block_on(check(config))
            .map_err(|reason| anyhow::anyhow!("route `{}`: {reason}", start.route))?;
        Ok(AmqpSource {
            config: config.clone(),
            shutdown_deadline: start.shutdown_deadline,
        })
    }

    fn name(&self) -> String {
        self.config.queue.clone()
    }

    fn consumer(self, handoff: Handoff) -> Consumer {
        Consumer::Island(Box::pin(consume(
            handoff.route,
            self.config,
            handoff.queues,
            handoff.counters,
            handoff.stop,
            self.shutdown_deadline,
        )))
    }
}

/// Checks at start-up that the broker answers and the queue exists (declaring it durable when
/// `declare` is set), so a wrong URL or queue stops the gateway with the reason.
pub async fn check(source: &AmqpSourceConfig) -> Result<(), String> {
    let connection = connect(&source.url, source.security.as_ref())
        .await
        .map_err(|e| format!("cannot connect to RabbitMQ at `{}`: {e}", redact(&source.url)))?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    declare(&channel, source)
        .await
        .map_err(|e| format!("queue `{}`: {e}", source.queue))?;
    let _ = connection.close(200, "checked").await;
    Ok(())
}

async fn declare(channel: &lapin::Channel, source: &AmqpSourceConfig) -> Result<(), lapin::Error> {
    let options = QueueDeclareOptions {
        passive: !source.declare,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(source.queue.as_str(), options, FieldTable::default())
        .await
        .map(|_| ())
}

/// The consume loop of one route; returns when `stop` turns true (dropping the core queues, so
/// the cores finish what they hold). Reconnects with backoff when the connection is lost.
pub async fn consume(
    route: String,
    source: AmqpSourceConfig,
    queues: Vec<mpsc::Sender<Vec<SourceMessage>>>,
    counters: Arc<RouteCounters>,
    mut stop: Stop,
    drain_deadline: Duration,
) {
    let mut cores = Some(RoundRobin::new(queues));
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        let stopped = stop.is_stopped();
        if stopped {
            break;
        }
        match consume_once(&route, &source, &mut cores, &counters, &mut stop, drain_deadline).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%route, %error, backoff_ms = backoff.as_millis() as u64, "RabbitMQ connection lost; reconnecting");
                tokio::select! {
                    _ = stop.stopped() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
        }
    }
    counters.log_stopped(&route);
}

/// One connection's life: `Ok` when stopped, `Err` when the connection or consumer failed.
async fn consume_once(
    route: &str,
    source: &AmqpSourceConfig,
    cores: &mut Option<RoundRobin>,
    counters: &RouteCounters,
    stop: &mut Stop,
    drain_deadline: Duration,
) -> Result<(), String> {
    let connection = connect(&source.url, source.security.as_ref()).await?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    declare(&channel, source).await.map_err(|e| e.to_string())?;
    channel
        .basic_qos(source.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let consumer = channel
        .basic_consume(
            source.queue.as_str(),
            format!("shardgate-{route}").as_str(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(%route, queue = %source.queue, prefetch = source.prefetch, "consuming");
    let (acks, settled) = mpsc::unbounded_channel();
    let unacked = ack::Unacked::new(route);
    tokio::spawn(ack::run_acker(
        route.to_string(),
        channel.clone(),
        settled,
        Arc::clone(&unacked),
    ));
    let queue: Arc<str> = source.queue.as_str().into();
    let mut chunks = consumer.ready_chunks(CHUNK_MESSAGES_MAX);
    loop {
        let chunk = tokio::select! {
            _ = stop.stopped() => None,
            chunk = chunks.next() => Some(chunk.ok_or_else(|| "consumer cancelled".to_string())?),
        };
        let Some(chunk) = chunk else {
            drain(cores, counters, drain_deadline).await;
            let _ = connection.close(200, "shardgate stopping").await;
            return Ok(());
        };
        let chunk = handoff::linger(&mut chunks, chunk, CHUNK_MESSAGES_MAX, HANDOFF_LINGER).await;
        let mut batch = Vec::with_capacity(chunk.len());
        for delivery in chunk {
            batch.push(source_message(delivery.map_err(|e| e.to_string())?, &queue, &acks));
        }
        if let Some(newest) = batch.last() {
            unacked.delivered(newest.position as u64);
        }
        let Some(round_robin) = cores.as_mut() else {
            return Ok(());
        };
        let handed = round_robin.hand_off(batch, counters, stop).await;
        // Not handed: stopping (the next turn drains), or a core gone without a stop.
        if !handed && !stop.is_stopped() {
            return Ok(());
        }
    }
}

/// At stop: closes the core queues (the cores finish what they hold) and keeps the connection
/// open until every received delivery is written or dead-lettered, or the deadline passes, so
/// their acks still go out on the channel that delivered them.
async fn drain(cores: &mut Option<RoundRobin>, counters: &RouteCounters, deadline: Duration) {
    cores.take();
    let started = tokio::time::Instant::now();
    let done = || {
        counters.written.load(Ordering::Relaxed) + counters.dead_lettered.load(Ordering::Relaxed)
            >= counters.received.load(Ordering::Relaxed)
    };
    while !done() && started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The acks are spawned right after completion; give them a moment to be written.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

fn source_message(
    delivery: lapin::message::Delivery,
    queue: &Arc<str>,
    acks: &mpsc::UnboundedSender<Vec<ack::Settled>>,
) -> SourceMessage {
    let timestamp_ms = delivery
        .properties
        .timestamp()
        .map(|seconds| seconds as i64 * 1000)
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let headers = text_headers(&delivery.properties);
    SourceMessage {
        write_timestamp_us: None,
        position: delivery.delivery_tag as i64,
        timestamp_ms: Some(timestamp_ms),
        key: None,
        headers,
        payload: Some(delivery.data.into()),
        origin: Box::new(AmqpOrigin {
            queue: Arc::clone(queue),
            routing_key: delivery.routing_key.into(),
            redelivered: delivery.redelivered,
            tag: delivery.delivery_tag,
            acks: acks.clone(),
        }),
    }
}

/// A message's headers whose values are text, booleans or integers, as text.
pub fn text_headers(properties: &BasicProperties) -> Vec<(String, String)> {
    properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), header_text(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        AMQPValue::LongLongInt(i) => Some(i.to_string()),
        AMQPValue::LongInt(i) => Some(i.to_string()),
        _ => None,
    }
}
