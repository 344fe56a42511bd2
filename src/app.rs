//! Wiring: the one place that starts subsystems, in order, and stops them in reverse.
//!
//! Start: island → metrics exporter → session → ownership snapshot (+ refresher) → per route
//! (schema check, prepare, dead-letter producer, source opened: `bridge::open_source`) → core
//! executors (each opens its spool, binds its ingest listeners and reports back) → each source's
//! consumer on the thread it asks for (`bridge::source::Consumer`). Any refusal (unreachable cluster or
//! broker, missing table or column, a port in use) stops start-up with the reason before a
//! message is read.
//! Stop (SIGTERM or Ctrl-C): one signal (`runtime::shutdown`) — ingest listeners close, consumers
//! stop reading and drain in-flight messages up to the deadline (Kafka commits stored offsets),
//! closing the core queues; cores finish and exit.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ::scylla::client::session::Session;
use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use futures::future::LocalBoxFuture;

use crate::bridge;
use crate::bridge::handoff::CORE_QUEUE_BATCHES_MAX;
use crate::bridge::message::SourceMessage;
use crate::bridge::route::{self, RouteCounters, RouteWriter};
use crate::bridge::source::{Consumer, Handoff, Opened, Start};
use crate::bridge::tap::{Tap, Taps};
use crate::config::{Config, IngestConfig, JobConfig, RouteConfig, SourceConfig};
use crate::ingest::service::{IngestService, IngestShared};
use crate::job::control::{JobControl, JobsService};
use crate::job::tap::Rollup;
use crate::query::service::{QueryService, QueryShared};
use crate::query::token::Keys;
use crate::runtime::budget::{self, Budget};
use crate::runtime::mesh::{self, Mesh};
use crate::runtime::shutdown::{self, Stop};
use crate::runtime::{data_plane_cpus, spawn_housekeeping, Cores, Island};
use crate::server::http2;
use crate::sink::dead_letter::DeadLetterSink;
use crate::sink::scylla;
use crate::spool::drain::{self, Replay};
use crate::spool::record::RouteRecord;
use crate::spool::service::{self as spool, Spooled};
use crate::telemetry::{self, RowMetrics};
use crate::tls::Reloadable;
use crate::topology::Ownership;
use crate::wire::proto::jobs_server::JobsServer;
use crate::wire::proto::query_server::QueryServer;
use crate::wire::server_view::ingest_server::IngestServer;

/// How often the island checks the driver's cluster state for a topology change.
const TOPOLOGY_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long start-up waits for every core to bind its listeners.
const BIND_TIMEOUT: Duration = Duration::from_secs(30);

/// One core's share of the ingest API.
struct CoreIngest {
    shared: Arc<IngestShared>,
    /// The query API, served on the same listeners.
    query: Arc<QueryShared>,
    /// The jobs' control, served on the same listeners.
    jobs: Arc<JobControl>,
    config: IngestConfig,
    /// The listeners' TLS, when `[ingest.tls]` is set (re-read on SIGHUP).
    tls: Option<Arc<Reloadable>>,
}

/// One route's share of a core: its writer and the queue its source fills.
struct CoreRoute {
    writer: Arc<RouteWriter>,
    queue: tokio::sync::mpsc::Receiver<Vec<SourceMessage>>,
}

/// What every part of the gateway is built on.
struct Base<'a> {
    config: &'a Config,
    island: &'a Island,
    session: Arc<Session>,
    ownership: Arc<ArcSwap<Ownership>>,
    mesh: Arc<Mesh>,
    cores: usize,
    stop: Stop,
}

/// A source's consumer, started on its thread.
enum Running {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

/// Runs the gateway until SIGTERM or Ctrl-C.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let island = Island::start(config.runtime.island_threads)?;
    let mut tls_listeners = Vec::new();
    if let Some(admin) = &config.admin {
        let tls = match admin.tls.clone() {
            Some((cert, key)) => {
                let reloadable = Reloadable::new("admin", move || crate::tls::https_server_config(&cert, &key))
                    .map_err(|error| anyhow::anyhow!("`admin.{}`: {error}", error.field))?;
                tls_listeners.push(Arc::clone(&reloadable));
                Some(reloadable)
            }
            None => None,
        };
        telemetry::admin::start(&island.handle(), admin.listen, tls, admin.token_sha256)
            .with_context(|| format!("cannot serve the admin port on `{}`", admin.listen))?;
    }
    let ingest_tls = match config.ingest.as_ref().and_then(|ingest| ingest.tls.clone()) {
        Some(tls) => {
            let reloadable = Reloadable::new("ingest.tls", move || tls.server_config())
                .map_err(|error| anyhow::anyhow!("`ingest.tls.{}`: {error}", error.field))?;
            tls_listeners.push(Arc::clone(&reloadable));
            Some(reloadable)
        }
        None => None,
    };
    // SIGHUP re-reads the listeners' certificates (and never stops the gateway).
    island.handle().spawn(crate::tls::reload_on_hangup(tls_listeners));
    let Some(session) = island.block_on(connect_within_wait(&config.cluster))? else {
        tracing::info!("stopped before the database answered");
        return Ok(());
    };
    let session = Arc::new(session);
    let cpus = data_plane_cpus(config.runtime.cores)?;
    let (stopper, stop) = shutdown::signal();
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
    log_start_notes(&config, &session);
    let base = Base {
        config: &config,
        island: &island,
        session,
        ownership,
        mesh,
        cores: cpus.len(),
        stop,
    };
    // Each route and the ingest API get an equal share of every core's row budget.
    let consumers = config.routes.len() + usize::from(config.ingest.is_some());
    let share = budget::shares(config.runtime.inflight_rows_per_core_max, consumers);
    let mut per_core: Vec<Vec<CoreRoute>> = (0..cpus.len()).map(|_| Vec::new()).collect();
    let mut consumers = Vec::with_capacity(config.routes.len());
    let mut connections = Vec::new();
    // Stream jobs over Kafka routes fold their routes' rows on the cores (jobs run with the
    // ingest API on); a stream job reading a JetStream route reads it itself on the island.
    let kafka_only = |job: &JobConfig| {
        job.stream.iter().all(|name| {
            config
                .routes
                .iter()
                .any(|route| &route.name == name && matches!(route.source, SourceConfig::Kafka(_)))
        })
    };
    let rollups: Vec<Arc<Rollup>> = match config.ingest {
        Some(_) => config
            .jobs
            .iter()
            .filter(|job| !job.stream.is_empty() && kafka_only(job))
            .map(|job| Rollup::new(job, cpus.len()))
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    for route in &config.routes {
        let OpenRoute {
            writer,
            receivers,
            opened,
            dead_letter_nats,
        } = open_route(&base, route, &rollups)?;
        connections.extend(opened.connection.into_iter().chain(dead_letter_nats));
        consumers.push((route.name.clone(), opened.consumer));
        for (core_routes, queue) in per_core.iter_mut().zip(receivers) {
            core_routes.push(CoreRoute {
                writer: Arc::clone(&writer),
                queue,
            });
        }
        tracing::info!(route = %route.name, tables = %route.tables_label(), "route ready");
    }
    // The jobs run on the island through this gateway's own listener, controlled over its
    // `Jobs` service.
    let jobs = match &config.ingest {
        None => None,
        Some(ingest) => Some(JobControl::new(
            island.handle(),
            config.cluster.clone(),
            config.routes.clone(),
            config.jobs.clone(),
            ingest.gateway_addr()?,
            Arc::clone(&base.session),
            rollups,
        )),
    };
    let ingest = ingest_parts(&base, share, jobs.as_ref(), ingest_tls)?;
    let cores = start_cores(&base, &cpus, per_core, ingest, inboxes, share)?;
    let running = consumers
        .into_iter()
        .map(|(route, consumer)| start_consumer(&island, &route, consumer))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(ingest) = &config.ingest {
        tracing::info!(listen = %ingest.listen, core_port_base = ingest.core_port_base, "ingest API listening");
    }
    tracing::info!(cores = cores.len(), cpus = ?cpus, routes = config.routes.len(), "shardgate serving");
    telemetry::admin::set_ready(true);
    // Stream jobs and `every` schedules start on the island.
    if let Some(jobs) = &jobs {
        jobs.start_all();
    }

    island.block_on(wait_for_stop_signal());
    telemetry::admin::set_ready(false);
    // Jobs stop first: stream jobs checkpoint what they folded while the routes still run.
    if let Some(jobs) = &jobs {
        island.block_on(jobs.stop_all(config.runtime.shutdown_deadline));
    }
    tracing::info!("stopping: draining in-flight messages");
    stopper.stop();
    stop_in_order(&island, running, cores, connections, config.runtime.shutdown_deadline);
    Ok(())
}

/// The reverse of start-up, once the stop signal is raised: consumers finish (draining what
/// they handed out, up to the deadline), then the cores, then the NATS connections flush (acks
/// and dead letters the cores published leave before the process does).
fn stop_in_order(
    island: &Island,
    running: Vec<Running>,
    cores: Cores,
    connections: Vec<async_nats::Client>,
    deadline: Duration,
) {
    for consumer in running {
        match consumer {
            Running::Thread(thread) => drop(thread.join()),
            Running::Task(task) => drop(island.block_on(task)),
        }
    }
    join_cores_within(cores, deadline);
    for client in connections {
        let _ = island.block_on(async { tokio::time::timeout(Duration::from_secs(5), client.flush()).await });
    }
}

/// Start-up lines worth saying once: replay-unsafe tables (every table, with the ingest API on)
/// and how Kafka routes join their groups.
fn log_start_notes(config: &Config, session: &Session) {
    if config.ingest.is_some() {
        warn_replay_unsafe_tables(&session.get_cluster_state());
    }
    if config.routes.iter().any(|r| matches!(r.source, SourceConfig::Kafka(_))) {
        match config.gateway_id() {
            Some(id) => tracing::info!(gateway_id = %id, "Kafka routes join their groups as static members"),
            None => tracing::info!(
                "no `runtime.gateway_id` and no fixed listener port: Kafka routes join their groups as dynamic members (a restarted gateway waits for the group's session timeout)"
            ),
        }
    }
}

/// The per-core queues of one route and the receiving ends, one per core.
type CoreQueues = (
    Vec<tokio::sync::mpsc::Sender<Vec<SourceMessage>>>,
    Vec<tokio::sync::mpsc::Receiver<Vec<SourceMessage>>>,
);

/// A route, set up: its writer, its queues' receiving ends (one per core), its opened source,
/// and its dead-letter NATS connection (flushed at shutdown), if any.
struct OpenRoute {
    writer: Arc<RouteWriter>,
    receivers: Vec<tokio::sync::mpsc::Receiver<Vec<SourceMessage>>>,
    opened: Opened,
    dead_letter_nats: Option<async_nats::Client>,
}

/// Sets one route up: tables checked and statements prepared, the stream jobs of `rollups` that
/// read it tapped, dead-letter destination open, source opened (its consumer not yet running).
fn open_route(base: &Base<'_>, route: &RouteConfig, rollups: &[Arc<Rollup>]) -> anyhow::Result<OpenRoute> {
    let (mapper, statements) = base.island.block_on(route::prepare_route(&base.session, route))?;
    let topic = match &route.source {
        SourceConfig::Kafka(kafka) => kafka.topic.as_str(),
        _ => route.name.as_str(),
    };
    let mut taps: Vec<Arc<dyn Tap>> = Vec::new();
    for rollup in rollups {
        taps.extend(rollup.tap(&route.name, topic, &mapper)?);
    }
    let taps: Taps = taps.into();
    let (dead_letter, dead_letter_nats) = base
        .island
        .block_on(DeadLetterSink::open(&route.dead_letter, &route.name, &base.session))
        .map_err(|reason| anyhow::anyhow!("route `{}`: {reason}", route.name))?;
    let counters = Arc::new(RouteCounters::default());
    let (queues, receivers): CoreQueues = (0..base.cores)
        .map(|_| tokio::sync::mpsc::channel(CORE_QUEUE_BATCHES_MAX))
        .unzip();
    let gateway_id = base.config.gateway_id();
    let start = Start {
        route: &route.name,
        island: base.island,
        gateway_id: gateway_id.as_deref(),
        cores: base.cores,
        inflight_rows_max: base.config.runtime.inflight_rows_per_core_max,
        shutdown_deadline: base.config.runtime.shutdown_deadline,
    };
    let handoff = Handoff {
        route: route.name.clone(),
        queues,
        counters: Arc::clone(&counters),
        stop: base.stop.clone(),
        taps: Arc::clone(&taps),
    };
    let opened = bridge::open_source(&route.source, &start, handoff)?;
    let writer = Arc::new(RouteWriter {
        route: route.name.clone(),
        source: opened.name.clone(),
        mapper,
        session: Arc::clone(&base.session),
        statements,
        dead_letter,
        counters,
        ownership: Arc::clone(&base.ownership),
        batch_rows_max: base.config.runtime.write_batch_rows_max,
        mesh: Arc::clone(&base.mesh),
        metrics: RowMetrics::per_core(&route.name, &route.tables_label(), base.cores),
        spooled: route.ack == crate::config::AckMode::Spooled,
        taps,
    });
    Ok(OpenRoute {
        writer,
        receivers,
        opened,
        dead_letter_nats,
    })
}

/// Each core's share of the ingest and query APIs, if they are configured.
fn ingest_parts(
    base: &Base<'_>,
    share: usize,
    jobs: Option<&Arc<JobControl>>,
    tls: Option<Arc<Reloadable>>,
) -> anyhow::Result<Vec<Option<CoreIngest>>> {
    let (Some(jobs), Some(ingest)) = (jobs, &base.config.ingest) else {
        return Ok((0..base.cores).map(|_| None).collect());
    };
    let query = Arc::new(QueryShared {
        session: Arc::clone(&base.session),
        ownership: Arc::clone(&base.ownership),
        mesh: Arc::clone(&base.mesh),
        config: base.config.query.clone(),
        keys: page_token_keys(&base.config.query)?,
    });
    let endpoints = (0..base.cores)
        .filter_map(|core| {
            ingest
                .core_addr(core)
                .map(|a| format!("{}:{}", ingest.advertise_host, a.port()))
        })
        .collect();
    let shared = IngestShared::new(
        Arc::clone(&base.session),
        Arc::clone(&base.ownership),
        Arc::clone(&base.mesh),
        (0..base.cores).map(|_| Budget::new(share)).collect(),
        base.config.runtime.write_batch_rows_max,
        endpoints,
    );
    Ok((0..base.cores)
        .map(|_| {
            Some(CoreIngest {
                shared: Arc::clone(&shared),
                query: Arc::clone(&query),
                jobs: Arc::clone(jobs),
                config: ingest.clone(),
                tls: tls.clone(),
            })
        })
        .collect())
}

/// The key page tokens are MAC'd with: `query.page_token_key_file` (or the spool directory's
/// `page-token.key`), created when missing; else one for this process.
fn page_token_keys(query: &crate::config::QueryConfig) -> anyhow::Result<Keys> {
    match &query.page_token_key_file {
        Some(path) => {
            Keys::load(path).with_context(|| format!("query.page_token_key_file: cannot use {}", path.display()))
        }
        None => {
            tracing::warn!("page tokens are MAC'd with a key of this process only: they are refused after a restart; set query.page_token_key_file (or runtime.spool_dir) to keep them");
            Ok(Keys::random()?)
        }
    }
}

/// Starts the core executors and waits until each has opened its spool and bound its ingest
/// listeners (or refused, with the reason).
fn start_cores(
    base: &Base<'_>,
    cpus: &[usize],
    per_core: Vec<Vec<CoreRoute>>,
    ingest: Vec<Option<CoreIngest>>,
    inboxes: Vec<mesh::Inbox>,
    share: usize,
) -> anyhow::Result<Cores> {
    let config = base.config;
    let (bound_tx, bound_rx) = crossbeam_channel::bounded::<Result<(), String>>(cpus.len());
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
        .zip(ingest)
        .zip(inboxes)
        .enumerate()
        .map(|(core, ((routes, ingest), inbox))| {
            let body = CoreBody {
                core,
                routes,
                ingest,
                share,
                spool: spool.clone(),
                stop: base.stop.clone(),
                bound: bound_tx.clone(),
                sources_done: Arc::clone(&sources_done),
                shutdown_deadline: config.runtime.shutdown_deadline,
            };
            move || body.run(inbox)
        })
        .collect();
    let cores = Cores::start(cpus, base.island.handle(), bodies)?;
    for _ in 0..cpus.len() {
        match bound_rx.recv_timeout(BIND_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => bail!("cannot start the ingest API: {reason}"),
            Err(_) => bail!("cores did not start within {} s", BIND_TIMEOUT.as_secs()),
        }
    }
    Ok(cores)
}

/// What one core runs: its spool, its routes, its ingest listeners, its drain, its mesh inbox.
struct CoreBody {
    core: usize,
    routes: Vec<CoreRoute>,
    ingest: Option<CoreIngest>,
    /// Each route's share of the core's row budget.
    share: usize,
    spool: Option<crate::config::SpoolConfig>,
    stop: Stop,
    bound: crossbeam_channel::Sender<Result<(), String>>,
    sources_done: Arc<tokio::sync::Barrier>,
    shutdown_deadline: Duration,
}

impl CoreBody {
    /// Runs on the core until the stop signal and every core's sources are done.
    async fn run(self, inbox: mesh::Inbox) {
        let core = self.core;
        if let Some(config) = &self.spool {
            if let Err(reason) = spool::open_on_core(config, core).await {
                let _ = self.bound.send(Err(reason));
                return;
            }
        }
        glommio::spawn_local(sample_core(core)).detach();
        let replay = Rc::new(Replayers {
            core,
            routes: self
                .routes
                .iter()
                .map(|r| (r.writer.route.clone(), Arc::clone(&r.writer)))
                .collect(),
            ingest: self
                .ingest
                .as_ref()
                .map(|part| IngestService::new(core, Arc::clone(&part.shared))),
        });
        let draining = drain::drain_on_core(core, replay, self.stop.clone());
        let share = self.share;
        let tasks = self
            .routes
            .into_iter()
            .map(|r| route::run_on_core(core, r.writer, r.queue, Budget::new(share)));
        let (stop, bound) = (self.stop, self.bound);
        let ingest = async move {
            match self.ingest {
                Some(part) => serve_ingest_on_core(core, part, stop, bound).await,
                None => {
                    let _ = bound.send(Ok(()));
                }
            }
        };
        let (shutdown_deadline, sources_done) = (self.shutdown_deadline, self.sources_done);
        let sources = async move {
            futures::join!(futures::future::join_all(tasks), ingest, draining);
            spool::finish_on_core(core, shutdown_deadline).await;
            sources_done.wait().await;
        };
        mesh::serve(inbox, sources).await;
        spool::close_on_core().await;
    }
}

/// How often a core samples its own CPU use and spool size.
const CORE_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Runs on core `core` for its life (detached: it ends with the executor): every second, the
/// share of the second the core's thread was on the CPU (`shardgate_core_busy_ratio`) and its
/// spool's live bytes (`shardgate_spool_bytes`, cores with a spool only).
async fn sample_core(core: usize) {
    let busy = metrics::gauge!(telemetry::metric::CORE_BUSY, "core" => core.to_string());
    let spool = metrics::gauge!(telemetry::metric::SPOOL_BYTES, "core" => core.to_string());
    let mut last = (std::time::Instant::now(), telemetry::thread_cpu_time());
    loop {
        glommio::timer::sleep(CORE_SAMPLE_INTERVAL).await;
        let now = (std::time::Instant::now(), telemetry::thread_cpu_time());
        if let (Some(before), Some(after)) = (last.1, now.1) {
            busy.set(telemetry::busy_ratio(after.saturating_sub(before), now.0 - last.0));
        }
        last = now;
        if let Some(bytes) = spool::live_bytes_on_core() {
            spool.set(bytes as f64);
        }
    }
}

/// Starts a source's consumer on the thread it asked for.
fn start_consumer(island: &Island, route: &str, consumer: Consumer) -> anyhow::Result<Running> {
    Ok(match consumer {
        Consumer::Island(future) => Running::Task(island.handle().spawn(future)),
        Consumer::Thread(body) => Running::Thread(
            spawn_housekeeping(&format!("source-{route}"), body)
                .with_context(|| format!("route `{route}`: cannot start its source thread"))?,
        ),
    })
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

    fn grpc(&self, batch: bytes::Bytes, spooled: Spooled) -> Option<LocalBoxFuture<'static, ()>> {
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
    mut stop: Stop,
    bound: crossbeam_channel::Sender<Result<(), String>>,
) {
    // `ingest.message_bytes_max` is enforced on the body (server::limit), before tonic, so an
    // oversized message is answered TOO_LARGE and a stream goes on; tonic's own limit is off.
    let limit = part.config.message_bytes_max;
    let routes = tonic::service::Routes::new(
        IngestServer::new(IngestService::new(core, Arc::clone(&part.shared))).max_decoding_message_size(usize::MAX),
    )
    .add_service(
        QueryServer::new(QueryService::new(core, Arc::clone(&part.query))).max_decoding_message_size(usize::MAX),
    )
    .add_service(JobsServer::new(JobsService::new(Arc::clone(&part.jobs))));
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
    let serving = http2::Serving {
        routes,
        message_bytes_max: limit,
        tls: part.tls,
        principals: part.config.auth.as_ref().map(|auth| Arc::clone(&auth.principals)),
    };
    let own_port = {
        let serving = serving.clone();
        async move {
            if let Some(listener) = core_listener {
                http2::serve(listener, serving).await;
            }
        }
    };
    let servers = async { futures::join!(http2::serve(shared_listener, serving), own_port) };
    futures::pin_mut!(servers);
    let stopped = stop.stopped();
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
            let schema = crate::sink::scylla::TableSchema::from_driver(table_meta);
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
            // Wrong credentials or certificates stay wrong: no point waiting.
            Err(error @ scylla::SinkError::Refused { .. }) => return Err(error.into()),
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

/// Waits for Ctrl-C or SIGTERM.
pub async fn wait_for_stop_signal() {
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
