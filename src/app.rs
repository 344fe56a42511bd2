//! Wiring: the one place that starts subsystems, in order, and stops them in reverse.
//!
//! Start: island → metrics exporter → session → ownership snapshot (+ refresher) → per route
//! (schema check, prepare, dead-letter producer, consumer subscribed) → core executors (each binds
//! its ingest listeners and reports back) → poll threads. Any refusal (unreachable cluster or
//! broker, missing table or column, a port in use) stops start-up with the reason before a
//! message is read.
//! Stop (SIGTERM or Ctrl-C): ingest listeners close, poll threads stop polling and drain
//! in-flight messages up to the deadline, commit stored offsets, close the core queues; cores
//! finish and exit.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::scylla::client::session::Session;
use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use futures::future::LocalBoxFuture;
use tokio::sync::watch;

use crate::bridge::handoff::CORE_QUEUE_BATCHES_MAX;
use crate::bridge::kafka::{self, Poller};
use crate::bridge::message::SourceMessage;
use crate::bridge::route::{self, RouteCounters, RouteWriter};
use crate::bridge::{amqp, nats, zeromq};
use crate::config::{Config, IngestConfig, SourceConfig};
use crate::ingest::service::{IngestService, IngestShared};
use crate::runtime::mesh::{self, Mesh};
use crate::runtime::{data_plane_cpus, spawn_housekeeping, Cores, Island};
use crate::server::http2;
use crate::sink::broker::nats::connect as nats_connect;
use crate::sink::dead_letter::DeadLetterSink;
use crate::sink::scylla;
use crate::spool::drain::{self, Replay};
use crate::spool::record::RouteRecord;
use crate::spool::service::{self as spool, Spooled};
use crate::telemetry::{self, RowMetrics};
use crate::topology::Ownership;
use crate::wire::proto::ingest_server::IngestServer;

/// How often the island checks the driver's cluster state for a topology change.
const TOPOLOGY_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long start-up waits for every core to bind its listeners.
const BIND_TIMEOUT: Duration = Duration::from_secs(30);

/// One core's share of the ingest API.
struct CoreIngest {
    shared: Arc<IngestShared>,
    config: IngestConfig,
}

/// One route's share of a core: its writer and the queue the poll thread fills.
struct CoreRoute {
    writer: Arc<RouteWriter>,
    queue: tokio::sync::mpsc::Receiver<Vec<SourceMessage>>,
}

/// Runs the gateway until SIGTERM or Ctrl-C.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let island = Island::start(config.runtime.island_threads)?;
    if let Some(addr) = config.admin {
        let _island = island.handle().enter();
        telemetry::start_metrics(addr).with_context(|| format!("cannot serve metrics on `{addr}`"))?;
    }
    let Some(session) = island.block_on(connect_within_wait(&config.cluster))? else {
        tracing::info!("stopped before the database answered");
        return Ok(());
    };
    let session = Arc::new(session);
    let cpus = data_plane_cpus(config.runtime.cores)?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let ownership = Arc::new(ArcSwap::from_pointee(Ownership::from_cluster_state(
        &session.get_cluster_state(),
        cpus.len(),
    )));
    island.handle().spawn(refresh_ownership(
        Arc::clone(&session),
        Arc::clone(&ownership),
        cpus.len(),
    ));
    let (mesh, inboxes) = Mesh::new(cpus.len());
    if config.ingest.is_some() {
        warn_replay_unsafe_tables(&session.get_cluster_state());
    }
    let gateway_id = config.gateway_id();
    if config.routes.iter().any(|r| matches!(r.source, SourceConfig::Kafka(_))) {
        match &gateway_id {
            Some(id) => tracing::info!(gateway_id = %id, "Kafka routes join their groups as static members"),
            None => tracing::info!(
                "no `runtime.gateway_id` and no fixed listener port: Kafka routes join their groups as dynamic members (a restarted gateway waits for the group's session timeout)"
            ),
        }
    }

    let mut per_core: Vec<Vec<CoreRoute>> = (0..cpus.len()).map(|_| Vec::new()).collect();
    let mut pollers = Vec::with_capacity(config.routes.len());
    let mut jetstream_pullers = Vec::new();
    let mut amqp_consumers = Vec::new();
    let mut zmq_receivers = Vec::new();
    let mut nats_subscribers = Vec::new();
    let mut nats_clients = Vec::new();
    for route in &config.routes {
        let (mapper, statements) = island.block_on(route::prepare_route(&session, route))?;
        let (dead_letter, dead_letter_nats) = island
            .block_on(DeadLetterSink::open(&route.dead_letter, &route.name, &session))
            .map_err(|reason| anyhow::anyhow!("route `{}`: {reason}", route.name))?;
        nats_clients.extend(dead_letter_nats);
        let counters = Arc::new(RouteCounters::default());
        let mut queues = Vec::with_capacity(cpus.len());
        let mut receivers = Vec::with_capacity(cpus.len());
        for _ in 0..cpus.len() {
            let (tx, rx) = tokio::sync::mpsc::channel(CORE_QUEUE_BATCHES_MAX);
            queues.push(tx);
            receivers.push(rx);
        }
        let (source_name, completions) = match &route.source {
            SourceConfig::Kafka(source) => {
                let instance_id = gateway_id
                    .as_deref()
                    .map(|id| kafka::group_instance_id(id, &route.name));
                let consumer = kafka::subscribe(source, &route.name, instance_id.as_deref())
                    .with_context(|| format!("route `{}`: cannot reach Kafka at `{}`", route.name, source.brokers))?;
                let capacity = kafka::completions_capacity(cpus.len(), config.runtime.inflight_rows_per_core_max);
                let (completions_tx, completions_rx) = crossbeam_channel::bounded(capacity);
                pollers.push(Poller {
                    route: route.name.clone(),
                    topic: source.topic.clone(),
                    consumer,
                    source: source.clone(),
                    instance_id,
                    queues,
                    completions: completions_rx,
                    shutdown: Arc::clone(&shutdown),
                    drain_deadline: config.runtime.shutdown_deadline,
                    counters: Arc::clone(&counters),
                });
                (source.topic.clone(), Some(completions_tx))
            }
            SourceConfig::JetStream(source) => {
                let client = island
                    .block_on(nats_connect(&source.url, &route.name))
                    .with_context(|| format!("route `{}`", route.name))?;
                nats_clients.push(client.clone());
                let consumer = island
                    .block_on(nats::consumer(client, source))
                    .with_context(|| format!("route `{}`", route.name))?;
                jetstream_pullers.push((route.name.clone(), consumer, queues, Arc::clone(&counters)));
                (source.stream.clone(), None)
            }
            SourceConfig::Amqp(source) => {
                island
                    .block_on(amqp::check(source))
                    .map_err(|reason| anyhow::anyhow!("route `{}`: {reason}", route.name))?;
                amqp_consumers.push((route.name.clone(), source.clone(), queues, Arc::clone(&counters)));
                (source.queue.clone(), None)
            }
            SourceConfig::Nats(source) => {
                let client = island
                    .block_on(nats_connect(&source.url, &route.name))
                    .with_context(|| format!("route `{}`", route.name))?;
                nats_clients.push(client.clone());
                let subscriber = island
                    .block_on(async {
                        match &source.queue_group {
                            Some(group) => client.queue_subscribe(source.subject.clone(), group.clone()).await,
                            None => client.subscribe(source.subject.clone()).await,
                        }
                    })
                    .with_context(|| format!("route `{}`: cannot subscribe to `{}`", route.name, source.subject))?;
                nats_subscribers.push((route.name.clone(), subscriber, queues, Arc::clone(&counters)));
                (source.subject.clone(), None)
            }
            SourceConfig::Zmq(source) => {
                let socket =
                    zeromq::open(source).map_err(|reason| anyhow::anyhow!("route `{}`: {reason}", route.name))?;
                zmq_receivers.push((
                    route.name.clone(),
                    source.endpoint.clone(),
                    socket,
                    queues,
                    Arc::clone(&counters),
                ));
                (source.endpoint.clone(), None)
            }
        };
        let writer = Arc::new(RouteWriter {
            route: route.name.clone(),
            source: source_name,
            mapper,
            session: Arc::clone(&session),
            statements,
            dead_letter,
            completions,
            counters,
            ownership: Arc::clone(&ownership),
            batch_rows_max: config.runtime.write_batch_rows_max,
            mesh: Arc::clone(&mesh),
            metrics: RowMetrics::per_core(&route.name, &route.tables_label(), cpus.len()),
            spooled: route.ack == crate::config::AckMode::Spooled,
        });
        for (core_routes, queue) in per_core.iter_mut().zip(receivers) {
            core_routes.push(CoreRoute {
                writer: Arc::clone(&writer),
                queue,
            });
        }
        tracing::info!(route = %route.name, tables = %route.tables_label(), "route ready");
    }

    let inflight_max = config.runtime.inflight_rows_per_core_max;
    let ingest_parts: Vec<Option<CoreIngest>> = match &config.ingest {
        Some(ingest) => {
            let endpoints = (0..cpus.len())
                .filter_map(|core| {
                    ingest
                        .core_addr(core)
                        .map(|a| format!("{}:{}", ingest.advertise_host, a.port()))
                })
                .collect();
            let shared = IngestShared::new(
                Arc::clone(&session),
                Arc::clone(&ownership),
                Arc::clone(&mesh),
                inflight_max,
                config.runtime.write_batch_rows_max,
                endpoints,
            );
            (0..cpus.len())
                .map(|_| {
                    Some(CoreIngest {
                        shared: Arc::clone(&shared),
                        config: ingest.clone(),
                    })
                })
                .collect()
        }
        None => (0..cpus.len()).map(|_| None).collect(),
    };
    let (bound_tx, bound_rx) = crossbeam_channel::bounded::<Result<(), String>>(cpus.len());
    drop(mesh);
    // A core keeps serving its mesh inbox until every core has finished its own sources: only
    // then can no forwarded task arrive any more.
    let sources_done = Arc::new(tokio::sync::Barrier::new(cpus.len()));
    // Cores open their spools when a route or the ingest API (per-call ACK_MODE_SPOOLED) may
    // use them.
    let spool =
        config.runtime.spool.clone().filter(|_| {
            config.ingest.is_some() || config.routes.iter().any(|r| r.ack == crate::config::AckMode::Spooled)
        });
    let bodies: Vec<_> = per_core
        .into_iter()
        .zip(ingest_parts)
        .zip(inboxes)
        .enumerate()
        .map(|(core, ((routes, ingest), inbox))| {
            let stop = stop_rx.clone();
            let drain_stop = stop_rx.clone();
            let shutdown_deadline = config.runtime.shutdown_deadline;
            let bound = bound_tx.clone();
            let sources_done = Arc::clone(&sources_done);
            let spool = spool.clone();
            move || async move {
                if let Some(config) = &spool {
                    if let Err(reason) = spool::open_on_core(config, core).await {
                        let _ = bound.send(Err(reason));
                        return;
                    }
                }
                let replay = Rc::new(Replayers {
                    core,
                    routes: routes
                        .iter()
                        .map(|r| (r.writer.route.clone(), Arc::clone(&r.writer)))
                        .collect(),
                    ingest: ingest
                        .as_ref()
                        .map(|part| IngestService::new(core, Arc::clone(&part.shared))),
                });
                let draining = drain::drain_on_core(core, replay, drain_stop);
                let tasks = routes
                    .into_iter()
                    .map(|r| route::run_on_core(core, r.writer, r.queue, inflight_max));
                let ingest = async move {
                    match ingest {
                        Some(part) => serve_ingest_on_core(core, part, stop, bound).await,
                        None => {
                            let _ = bound.send(Ok(()));
                        }
                    }
                };
                let sources = async move {
                    futures::join!(futures::future::join_all(tasks), ingest, draining);
                    spool::finish_on_core(core, shutdown_deadline).await;
                    sources_done.wait().await;
                };
                mesh::serve(inbox, sources).await;
                spool::close_on_core().await;
            }
        })
        .collect();
    let cores = Cores::start(&cpus, island.handle(), bodies)?;
    for _ in 0..cpus.len() {
        match bound_rx.recv_timeout(BIND_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => bail!("cannot start the ingest API: {reason}"),
            Err(_) => bail!("cores did not start within {} s", BIND_TIMEOUT.as_secs()),
        }
    }
    let mut poll_threads = Vec::with_capacity(pollers.len() + zmq_receivers.len());
    for (name, endpoint, socket, queues, counters) in zmq_receivers {
        let shutdown = Arc::clone(&shutdown);
        let thread_name = format!("zmq-{name}");
        poll_threads.push(
            spawn_housekeeping(&thread_name, move || {
                zeromq::receive(name, endpoint, socket, queues, counters, shutdown)
            })
            .context("cannot start a ZeroMQ thread")?,
        );
    }
    for poller in pollers {
        let name = format!("poll-{}", poller.route);
        poll_threads.push(spawn_housekeeping(&name, move || poller.run()).context("cannot start a poll thread")?);
    }
    let mut pull_tasks: Vec<_> = jetstream_pullers
        .into_iter()
        .map(|(name, consumer, queues, counters)| {
            island
                .handle()
                .spawn(nats::pull(name, consumer, queues, counters, stop_rx.clone()))
        })
        .collect();
    pull_tasks.extend(
        nats_subscribers
            .into_iter()
            .map(|(name, subscriber, queues, counters)| {
                island
                    .handle()
                    .spawn(nats::subscribe(name, subscriber, queues, counters, stop_rx.clone()))
            }),
    );
    pull_tasks.extend(amqp_consumers.into_iter().map(|(name, source, queues, counters)| {
        island.handle().spawn(amqp::consume(
            name,
            source,
            queues,
            counters,
            stop_rx.clone(),
            config.runtime.shutdown_deadline,
        ))
    }));
    if let Some(ingest) = &config.ingest {
        tracing::info!(listen = %ingest.listen, core_port_base = ingest.core_port_base, "ingest API listening");
    }
    tracing::info!(cores = cores.len(), cpus = ?cpus, routes = config.routes.len(), "shardgate serving");
    let ready = metrics::gauge!(crate::telemetry::metric::READY);
    ready.set(1.0);

    island.block_on(wait_for_stop_signal());
    ready.set(0.0);
    tracing::info!("stopping: draining in-flight messages");
    let _ = stop_tx.send(true);
    shutdown.store(true, Ordering::Relaxed);
    for thread in poll_threads {
        let _ = thread.join();
    }
    for task in pull_tasks {
        let _ = island.block_on(task);
    }
    join_cores_within(cores, config.runtime.shutdown_deadline);
    // Acks and dead letters the cores published leave before the process does.
    for client in nats_clients {
        let _ = island.block_on(async { tokio::time::timeout(Duration::from_secs(5), client.flush()).await });
    }
    Ok(())
}

/// The writers of one core's spooled records: its routes by name, and the ingest API.
struct Replayers {
    core: usize,
    routes: std::collections::HashMap<String, Arc<RouteWriter>>,
    ingest: Option<IngestService>,
}

impl Replay for Replayers {
    fn route(&self, route: &str, messages: Vec<RouteRecord>, spooled: Spooled) -> Option<LocalBoxFuture<'static, ()>> {
        let writer = Arc::clone(self.routes.get(route)?);
        let core = self.core;
        Some(Box::pin(
            async move { writer.write_replayed(core, messages, spooled).await },
        ))
    }

    fn knows_route(&self, route: &str) -> bool {
        self.routes.contains_key(route)
    }

    fn grpc(&self, batch: Vec<u8>, spooled: Spooled) -> Option<LocalBoxFuture<'static, ()>> {
        let service = self.ingest.clone()?;
        Some(Box::pin(async move { service.write_replayed(batch, spooled).await }))
    }

    fn knows_grpc(&self) -> bool {
        self.ingest.is_some()
    }
}

/// Binds this core's ingest listeners (shared port and own port), reports the outcome, and
/// serves until the stop signal. Runs on core `core`.
async fn serve_ingest_on_core(
    core: usize,
    part: CoreIngest,
    mut stop: watch::Receiver<bool>,
    bound: crossbeam_channel::Sender<Result<(), String>>,
) {
    // `ingest.message_bytes_max` is enforced on the body (server::limit), before tonic, so an
    // oversized message is answered TOO_LARGE and a stream goes on; tonic's own limit is off.
    let limit = part.config.message_bytes_max;
    let routes = tonic::service::Routes::new(
        IngestServer::new(IngestService::new(core, Arc::clone(&part.shared))).max_decoding_message_size(usize::MAX),
    );
    let shared_listener = match http2::bind(part.config.listen) {
        Ok(listener) => listener,
        Err(e) => {
            let _ = bound.send(Err(format!(
                "core {core} cannot listen on `{}`: {e}",
                part.config.listen
            )));
            return;
        }
    };
    let core_listener = match part.config.core_addr(core).map(http2::bind).transpose() {
        Ok(listener) => listener,
        Err(e) => {
            let _ = bound.send(Err(format!("core {core} cannot listen on its own port: {e}")));
            return;
        }
    };
    let _ = bound.send(Ok(()));
    let own_port = {
        let routes = routes.clone();
        async move {
            if let Some(listener) = core_listener {
                http2::serve(listener, routes, limit).await;
            }
        }
    };
    let servers = async { futures::join!(http2::serve(shared_listener, routes, limit), own_port) };
    futures::pin_mut!(servers);
    let stopped = stop.wait_for(|stop| *stop);
    futures::pin_mut!(stopped);
    futures::future::select(servers, stopped).await;
}

/// Warns once per table with non-frozen list columns, for every user table of the cluster: the
/// ingest API may write any of them. System keyspaces are skipped.
fn warn_replay_unsafe_tables(state: &::scylla::cluster::ClusterState) {
    for (keyspace, meta) in state.keyspaces_iter() {
        if keyspace.starts_with("system") {
            continue;
        }
        for (table, table_meta) in &meta.tables {
            let schema = crate::mapping::TableSchema::from_driver(table_meta);
            crate::sink::scylla::schema::warn_replay_unsafe_columns(keyspace, table, &schema);
        }
    }
}

/// Rebuilds the ownership snapshot whenever the driver's cluster state changes. Runs on the
/// island for the gateway's life.
async fn refresh_ownership(session: Arc<Session>, ownership: Arc<ArcSwap<Ownership>>, cores: usize) {
    let mut last = session.get_cluster_state();
    loop {
        tokio::time::sleep(TOPOLOGY_CHECK_INTERVAL).await;
        let state = session.get_cluster_state();
        if Arc::ptr_eq(&state, &last) {
            continue;
        }
        let next = Ownership::from_cluster_state(&state, cores);
        if **ownership.load() != next {
            tracing::info!(
                ring_tokens = next.ring().len(),
                nodes = next.nodes().len(),
                "topology changed; routing table swapped"
            );
            ownership.store(Arc::new(next));
        }
        last = state;
    }
}

/// Waits for the cores, but not past `deadline`: writes still retrying then are abandoned, and
/// their messages replay on the next start because their offsets were never stored.
fn join_cores_within(cores: Cores, deadline: Duration) {
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        cores.join();
        let _ = done_tx.send(());
    });
    if done_rx.recv_timeout(deadline).is_err() {
        tracing::warn!("cores did not finish within the shutdown deadline; exiting anyway");
    }
}

/// Connects to the cluster, retrying for up to `cluster.connect_wait` (a gateway restarted
/// during a database outage waits for it, its spool intact); `None` when stopped meanwhile.
async fn connect_within_wait(cluster: &crate::config::ClusterConfig) -> anyhow::Result<Option<Session>> {
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        let error = match scylla::connect(cluster).await {
            Ok(session) => return Ok(Some(session)),
            Err(error) => error,
        };
        let waited = started.elapsed();
        if waited + backoff > cluster.connect_wait {
            return Err(error.into());
        }
        tracing::warn!(
            %error,
            waited_s = waited.as_secs(),
            gives_up_after_s = cluster.connect_wait.as_secs(),
            "database unreachable at start-up; retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = wait_for_stop_signal() => return Ok(None),
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the gateway");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
