//! NATS sources. Core subscriptions (`subscribe`, optionally in a queue group so that several
//! gateways split the subject) are at-most-once: core NATS has no acknowledgement.
//!
//! JetStream source: a durable pull consumer with explicit acks, at-least-once into a table.
//!
//! The puller runs on the island (async-nats is tokio-bound): it reads the consumer's message
//! stream in ready chunks and hands each chunk to the next core (round robin) over the route's
//! bounded per-core queues; the cores' side is `bridge::route`. A message is acked only after its
//! row is confirmed, or terminated (`AckKind::Term`) after its dead letter is delivered, so a
//! poison message is never redelivered. `max_ack_pending` bounds what the server hands out
//! unacked, and full core queues stop the puller: memory stays bounded. A message not acked
//! within `ack_wait` (a crashed gateway) is redelivered, to this or another gateway sharing the
//! durable; replays write identical cells (timestamp from publish time and stream sequence).

pub mod ack;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, stream};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::handoff::{self, RoundRobin};
use super::message::SourceMessage;
use super::route::RouteCounters;
use super::source::{Consumer, Handoff, Source, Start};
use crate::config::{JetStreamSourceConfig, NatsSecurity, NatsSourceConfig};
use crate::runtime::shutdown::Stop;
use crate::sink::broker::nats::{connect, nats_error, NatsError};
use crate::telemetry::metric;
use ack::{JetStreamOrigin, NatsOrigin};

/// A JetStream route's source: its connection and durable pull consumer.
pub struct JetStreamSource {
    client: async_nats::Client,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    stream: String,
}

impl Source for JetStreamSource {
    type Config = JetStreamSourceConfig;

    fn open(config: &JetStreamSourceConfig, start: &Start<'_>) -> anyhow::Result<JetStreamSource> {
        let route = start.route;
        let client = connected(&config.url, config.security.as_ref(), start)?;
        let consumer = start
            .island
            .block_on(consumer(client.clone(), config))
            .map_err(|e| anyhow::anyhow!("route `{route}`: {e}"))?;
        Ok(JetStreamSource {
            client,
            consumer,
            stream: config.stream.clone(),
        })
    }

    fn name(&self) -> String {
        self.stream.clone()
    }

    fn connection(&self) -> Option<async_nats::Client> {
        Some(self.client.clone())
    }

    fn consumer(self, handoff: Handoff) -> Consumer {
        Consumer::Island(Box::pin(pull(
            handoff.route,
            self.client,
            self.consumer,
            handoff.queues,
            handoff.counters,
            handoff.stop,
        )))
    }
}

/// A route's NATS connection, opened at start-up on the island.
fn connected(url: &str, security: Option<&NatsSecurity>, start: &Start<'_>) -> anyhow::Result<async_nats::Client> {
    start
        .island
        .block_on(connect(url, start.route, security))
        .map_err(|e| anyhow::anyhow!("route `{}`: {e}", start.route))
}

/// A core NATS route's source: its connection and subscription (in a queue group if set).
pub struct NatsSource {
    client: async_nats::Client,
    subscriber: async_nats::Subscriber,
    subject: String,
}

impl Source for NatsSource {
    type Config = NatsSourceConfig;

    fn open(config: &NatsSourceConfig, start: &Start<'_>) -> anyhow::Result<NatsSource> {
        let route = start.route;
        let client = connected(&config.url, config.security.as_ref(), start)?;
        let subscriber = start
            .island
            .block_on(async {
                match &config.queue_group {
                    Some(group) => client.queue_subscribe(config.subject.clone(), group.clone()).await,
                    None => client.subscribe(config.subject.clone()).await,
                }
            })
            .map_err(|e| anyhow::anyhow!("route `{route}`: cannot subscribe to `{}`: {e}", config.subject))?;
        Ok(NatsSource {
            client,
            subscriber,
            subject: config.subject.clone(),
        })
    }

    fn name(&self) -> String {
        self.subject.clone()
    }

    fn connection(&self) -> Option<async_nats::Client> {
        Some(self.client.clone())
    }

    fn consumer(self, handoff: Handoff) -> Consumer {
        Consumer::Island(Box::pin(subscribe(
            handoff.route,
            self.subscriber,
            handoff.queues,
            handoff.counters,
            handoff.stop,
        )))
    }
}

/// Messages a hand-off to one core gathers before it goes ([`handoff::linger`]; the client's
/// last chunk may take it past, by less than this again).
const CHUNK_MESSAGES_MAX: usize = 256;

/// Finds (or creates, when subjects are configured) the stream and gets or creates the durable
/// consumer. Run on the island at start-up.
pub async fn consumer(
    client: async_nats::Client,
    source: &JetStreamSourceConfig,
) -> Result<jetstream::consumer::Consumer<pull::Config>, NatsError> {
    let context = jetstream::new(client);
    let stream = if source.subjects.is_empty() {
        context
            .get_stream(&source.stream)
            .await
            .map_err(|e| nats_error(format!("JetStream stream `{}`", source.stream), e))?
    } else {
        context
            .get_or_create_stream(stream::Config {
                name: source.stream.clone(),
                subjects: source.subjects.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| nats_error(format!("cannot create JetStream stream `{}`", source.stream), e))?
    };
    stream
        .get_or_create_consumer(
            &source.durable,
            pull::Config {
                durable_name: Some(source.durable.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: source.ack_wait,
                max_ack_pending: source.max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            nats_error(
                format!("JetStream consumer `{}` on `{}`", source.durable, source.stream),
                e,
            )
        })
}

/// Messages a JetStream pull request asks for (fewer when the consumer's `max_ack_pending` is
/// lower); the client asks again when half of them have arrived. The client's default, 200,
/// kept hand-offs to the cores under about 90 messages.
const PULL_BATCH: usize = 1024;
/// How long a JetStream or core NATS hand-off waits for more messages after its first
/// ([`handoff::linger`]), up to [`CHUNK_MESSAGES_MAX`].
const HANDOFF_LINGER: Duration = Duration::from_millis(2);
/// Bytes a JetStream pull request asks for at most, so the client's buffer stays bounded for
/// large messages too (1,024 of them could otherwise be buffered): twice NATS's largest
/// `max_payload` (64 MiB), so any one message with its headers fits (the server refuses a pull
/// whose byte limit a message exceeds).
const PULL_BYTES_MAX: usize = 128 << 20;
/// The pull requests' idle heartbeat (the client's default): a silent server is noticed.
const PULL_HEARTBEAT: Duration = Duration::from_secs(15);

/// The pull loop of one route; returns when `stop` turns true (dropping the core queues, so the
/// cores finish what they hold) or when the consumer's stream ends.
pub async fn pull(
    route: String,
    client: async_nats::Client,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    queues: Vec<mpsc::Sender<Vec<SourceMessage>>>,
    counters: Arc<RouteCounters>,
    mut stop: Stop,
) {
    let batch = usize::try_from(consumer.cached_info().config.max_ack_pending)
        .ok()
        .filter(|pending| *pending > 0)
        .map_or(PULL_BATCH, |pending| pending.min(PULL_BATCH));
    let messages = match consumer
        .stream()
        .max_messages_per_batch(batch)
        .max_bytes_per_batch(PULL_BYTES_MAX)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
    {
        Ok(messages) => messages,
        Err(error) => {
            tracing::error!(%route, %error, "cannot read the JetStream consumer; the route is stopped");
            return;
        }
    };
    tracing::info!(%route, cores = queues.len(), pull_batch = batch, "consuming");
    let (acks, settled) = mpsc::unbounded_channel();
    tokio::spawn(ack::run_acker(route.clone(), client, settled));
    tokio::spawn(watch_pending(route.clone(), consumer, stop.clone()));
    let mut chunks = messages.ready_chunks(CHUNK_MESSAGES_MAX);
    let mut cores = RoundRobin::new(queues);
    loop {
        let chunk = tokio::select! {
            _ = stop.stopped() => break,
            chunk = chunks.next() => match chunk {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let chunk = handoff::linger(&mut chunks, chunk, CHUNK_MESSAGES_MAX, HANDOFF_LINGER).await;
        let mut batch = Vec::with_capacity(chunk.len());
        for message in chunk {
            match message {
                Ok(message) => batch.push(source_message(message, &acks)),
                Err(error) => tracing::warn!(%route, %error, "JetStream pull error"),
            }
        }
        if !batch.is_empty() && !cores.hand_off(batch, &counters, &mut stop).await {
            break;
        }
    }
    counters.log_stopped(&route);
}

/// How often a JetStream route reads its durable consumer's pending counts.
const PENDING_INTERVAL: Duration = Duration::from_secs(5);

/// Exports the durable consumer's `num_pending` and `num_ack_pending` (every gateway sharing it
/// together) as `shardgate_jetstream_pending` / `shardgate_jetstream_ack_pending` until `stop`.
async fn watch_pending(route: String, consumer: jetstream::consumer::Consumer<pull::Config>, mut stop: Stop) {
    let pending = metrics::gauge!(metric::JETSTREAM_PENDING, "source" => route.clone());
    let ack_pending = metrics::gauge!(metric::JETSTREAM_ACK_PENDING, "source" => route.clone());
    loop {
        match consumer.get_info().await {
            Ok(info) => {
                pending.set(info.num_pending as f64);
                ack_pending.set(info.num_ack_pending as f64);
            }
            Err(error) => tracing::debug!(%route, %error, "cannot read the JetStream consumer's info"),
        }
        tokio::select! {
            _ = stop.stopped() => return,
            _ = tokio::time::sleep(PENDING_INTERVAL) => {}
        }
    }
}

/// The subscription loop of a NATS core route (at-most-once: core NATS has no acknowledgement);
/// returns when `stop` turns true, dropping the core queues.
pub async fn subscribe(
    route: String,
    subscriber: async_nats::Subscriber,
    queues: Vec<mpsc::Sender<Vec<SourceMessage>>>,
    counters: Arc<RouteCounters>,
    mut stop: Stop,
) {
    tracing::info!(%route, cores = queues.len(), "subscribed (at-most-once)");
    let mut sequence: i64 = 0;
    let mut cores = RoundRobin::new(queues);
    let mut chunks = subscriber.ready_chunks(CHUNK_MESSAGES_MAX);
    loop {
        let chunk = tokio::select! {
            _ = stop.stopped() => break,
            chunk = chunks.next() => match chunk {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let chunk = handoff::linger(&mut chunks, chunk, CHUNK_MESSAGES_MAX, HANDOFF_LINGER).await;
        let batch = chunk
            .into_iter()
            .map(|message| core_message(message, &mut sequence))
            .collect();
        if !cores.hand_off(batch, &counters, &mut stop).await {
            break;
        }
    }
    let mut subscriber = chunks.into_inner();
    let _ = subscriber.unsubscribe().await;
    counters.log_stopped(&route);
}

fn core_message(message: async_nats::Message, sequence: &mut i64) -> SourceMessage {
    *sequence += 1;
    SourceMessage {
        write_timestamp_us: None,
        position: *sequence,
        timestamp_ms: Some(chrono::Utc::now().timestamp_millis()),
        key: None,
        headers: text_headers(message.headers.as_ref()),
        payload: Some(message.payload),
        origin: Box::new(NatsOrigin {
            subject: message.subject,
        }),
    }
}

/// NATS headers as text, the first value of each name.
fn text_headers(headers: Option<&async_nats::HeaderMap>) -> Vec<(String, String)> {
    headers.map_or_else(Vec::new, |headers| {
        headers
            .iter()
            .filter_map(|(name, values)| Some((name.to_string(), values.first()?.as_str().to_string())))
            .collect()
    })
}

/// A JetStream message on its way to a core. Its write timestamp is the stream's own store time
/// in microseconds: deterministic (a redelivery writes identical cells) and, as the server
/// stamps messages in stream order, ordered for any burst slower than one message per
/// microsecond per stream — unlike time-plus-sequence, it has no wrap within a millisecond.
pub(crate) fn source_message(
    message: jetstream::Message,
    acks: &mpsc::UnboundedSender<Vec<ack::Settled>>,
) -> SourceMessage {
    let (position, timestamp_ms, write_timestamp_us) = message
        .info()
        .map(|info| {
            (
                info.stream_sequence as i64,
                Some(info.published.timestamp_millis()),
                Some(info.published.timestamp_micros()),
            )
        })
        .unwrap_or((0, None, None));
    // The client's context (a clone per message) goes now, on the island, not on a core.
    let message = message.message;
    SourceMessage {
        write_timestamp_us,
        position,
        timestamp_ms,
        key: None,
        headers: text_headers(message.headers.as_ref()),
        origin: Box::new(JetStreamOrigin {
            subject: message.subject,
            reply: message.reply,
            acks: acks.clone(),
        }),
        payload: Some(message.payload),
    }
}
