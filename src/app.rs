//! Wiring: the one place that starts subsystems, in order, and stops them in reverse.
//!
//! Start: island → session → per route (schema check, prepare, dead-letter producer, consumer
//! subscribed) → core executors → poll threads. Any refusal (unreachable cluster or broker,
//! missing table or column) stops start-up with the reason before a message is read.
//! Stop (SIGTERM or Ctrl-C): poll threads stop polling and drain in-flight messages up to the
//! deadline, commit stored offsets, close the core queues; cores finish and exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::bridge::kafka::{self, Poller, RouteCounters, RouteWriter, CORE_QUEUE_BATCHES_MAX};
use crate::config::{Config, DeadLetterConfig, SourceConfig};
use crate::mapping::RowMapper;
use crate::runtime::{data_plane_cpus, spawn_housekeeping, Cores, Island};
use crate::sink::scylla;

/// One route's share of a core: its writer and the queue the poll thread fills.
struct CoreRoute {
    writer: Arc<RouteWriter>,
    queue: tokio::sync::mpsc::Receiver<Vec<kafka::KafkaWork>>,
}

/// Runs the gateway until SIGTERM or Ctrl-C.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let island = Island::start(config.runtime.island_threads)?;
    let session = Arc::new(island.block_on(scylla::connect(&config.cluster))?);
    let cpus = data_plane_cpus(config.runtime.cores)?;
    let shutdown = Arc::new(AtomicBool::new(false));

    let mut per_core: Vec<Vec<CoreRoute>> = (0..cpus.len()).map(|_| Vec::new()).collect();
    let mut pollers = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        let schema = island.block_on(scylla::table_schema(
            &session,
            &route.name,
            &route.keyspace,
            &route.table,
        ))?;
        let mapper = RowMapper::new(route, &schema)?;
        let insert = island.block_on(scylla::prepare_insert(
            &session,
            &mapper.insert_statement(&route.keyspace, &route.table),
        ))?;
        let SourceConfig::Kafka(source) = &route.source;
        let DeadLetterConfig::Kafka {
            brokers,
            topic: dead_letter_topic,
        } = &route.dead_letter;
        let dead_letter = kafka::dead_letter::DeadLetterTopic::new(brokers, dead_letter_topic, &route.name)
            .with_context(|| format!("route `{}`: cannot create the dead-letter producer", route.name))?;
        let consumer = kafka::subscribe(source, &route.name)
            .with_context(|| format!("route `{}`: cannot reach Kafka at `{}`", route.name, source.brokers))?;
        let (completions_tx, completions_rx) = crossbeam_channel::unbounded();
        let counters = Arc::new(RouteCounters::default());
        let writer = Arc::new(RouteWriter {
            route: route.name.clone(),
            topic: source.topic.clone(),
            mapper,
            session: Arc::clone(&session),
            insert,
            dead_letter,
            completions: completions_tx,
            counters: Arc::clone(&counters),
        });
        let mut queues = Vec::with_capacity(cpus.len());
        for core_routes in &mut per_core {
            let (tx, rx) = tokio::sync::mpsc::channel(CORE_QUEUE_BATCHES_MAX);
            queues.push(tx);
            core_routes.push(CoreRoute {
                writer: Arc::clone(&writer),
                queue: rx,
            });
        }
        pollers.push(Poller {
            route: route.name.clone(),
            topic: source.topic.clone(),
            consumer,
            queues,
            completions: completions_rx,
            shutdown: Arc::clone(&shutdown),
            drain_deadline: config.runtime.shutdown_deadline,
            counters,
        });
        tracing::info!(route = %route.name, table = %format!("{}.{}", route.keyspace, route.table), "route ready");
    }

    let inflight_max = config.runtime.inflight_rows_per_core_max;
    let bodies: Vec<_> = per_core
        .into_iter()
        .map(|routes| {
            move || async move {
                let tasks = routes
                    .into_iter()
                    .map(|r| kafka::run_on_core(r.writer, r.queue, inflight_max));
                futures::future::join_all(tasks).await;
            }
        })
        .collect();
    let cores = Cores::start(&cpus, island.handle(), bodies)?;
    let mut poll_threads = Vec::with_capacity(pollers.len());
    for poller in pollers {
        let name = format!("poll-{}", poller.route);
        poll_threads.push(spawn_housekeeping(&name, move || poller.run()).context("cannot start a poll thread")?);
    }
    tracing::info!(cores = cores.len(), cpus = ?cpus, routes = config.routes.len(), "shardgate serving");

    island.block_on(wait_for_stop_signal());
    tracing::info!("stopping: draining in-flight messages");
    shutdown.store(true, Ordering::Relaxed);
    for thread in poll_threads {
        let _ = thread.join();
    }
    join_cores_within(cores, config.runtime.shutdown_deadline);
    Ok(())
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
