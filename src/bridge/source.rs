//! What a source is to the gateway: a [`Source`] is opened at start-up (connect, check, subscribe —
//! a wrong address or a missing stream stops the gateway with the reason) and then becomes a
//! [`Consumer`]: a loop on the thread that suits its client library, handing batches of
//! [`SourceMessage`]s to the cores ([`Handoff`]) until the gateway stops. The source decides its
//! thread, not the caller. Acknowledgements are the source's too: each message carries its
//! `message::Origin`, implemented in the source's folder.
//!
//! Threads: `open` runs on the main thread (async clients through the island's `block_on`); the
//! consumer on the island or on its own housekeeping thread, as it says.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::message::SourceMessage;
use super::route::RouteCounters;
use crate::runtime::shutdown::Stop;
use crate::runtime::Island;

/// A source's consumer loop, with the thread it runs on.
pub enum Consumer {
    /// An async loop on the island (async-nats and lapin are tokio-bound).
    Island(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// A blocking loop on a housekeeping thread of its own (librdkafka's poll, libzmq's recv).
    Thread(Box<dyn FnOnce() + Send>),
}

/// Where a source's consumer hands its batches, and when it stops.
pub struct Handoff {
    /// Route name.
    pub route: String,
    /// One bounded queue per core (`handoff::CORE_QUEUE_BATCHES_MAX` batches).
    pub queues: Vec<mpsc::Sender<Vec<SourceMessage>>>,
    /// The route's counters.
    pub counters: Arc<RouteCounters>,
    /// The gateway's stop signal.
    pub stop: Stop,
    /// The route's taps (stream jobs folding its rows; Kafka routes only): its offsets are
    /// stored no further than they made durable, and read again where they ask.
    pub taps: super::tap::Taps,
}

/// What opening a source may need besides its own config.
pub struct Start<'a> {
    /// Route name.
    pub route: &'a str,
    /// The island, for async clients' start-up calls.
    pub island: &'a Island,
    /// The gateway's id (Kafka static membership), if any.
    pub gateway_id: Option<&'a str>,
    /// Data-plane cores.
    pub cores: usize,
    /// Rows a core may have in flight (`runtime.inflight_rows_per_core_max`).
    pub inflight_rows_max: usize,
    /// How long a stopping consumer waits for messages in flight.
    pub shutdown_deadline: Duration,
}

/// A source of one route.
pub trait Source: Sized {
    /// Its `[route.source]` table, validated.
    type Config;

    /// Connects and checks at start-up.
    fn open(config: &Self::Config, start: &Start<'_>) -> anyhow::Result<Self>;

    /// What dead-letter headers name as the source: topic, stream, queue, subject or endpoint.
    fn name(&self) -> String;

    /// A NATS connection the gateway flushes before it exits (acks and letters published on
    /// it leave first), if the source has one.
    fn connection(&self) -> Option<async_nats::Client> {
        None
    }

    /// The consumer loop, on the thread this source runs on.
    fn consumer(self, handoff: Handoff) -> Consumer;
}

/// A source opened for a route: its name for dead letters, its consumer, its connection.
pub struct Opened {
    /// What dead-letter headers name as the source.
    pub name: String,
    /// The consumer loop, not yet started.
    pub consumer: Consumer,
    /// A NATS connection to flush at shutdown.
    pub connection: Option<async_nats::Client>,
}

/// Opens `S` and readies its consumer.
pub fn open<S: Source>(config: &S::Config, start: &Start<'_>, handoff: Handoff) -> anyhow::Result<Opened> {
    let source = S::open(config, start)?;
    Ok(Opened {
        name: source.name(),
        connection: source.connection(),
        consumer: source.consumer(handoff),
    })
}
