//! Threads: one glommio `LocalExecutor` pinned per data-plane core, and the tokio "driver island".
//!
//! Why two runtimes (DESIGN §2): the scylla driver and librdkafka's async wrappers are
//! tokio-bound. The island is a small multi-thread tokio runtime that owns the sockets (the
//! scylla Session's connection tasks). Each core executor enters the island's handle once, so
//! tokio timers and driver futures can be awaited from glommio tasks; request serialization and
//! response parsing then run on the core, and only socket IO hops to the island.
//!
//! This module is the one place that knows about both runtimes, so a pinned tokio runtime per
//! core stays a contained change if a benchmark ever says so.

pub mod budget;
pub mod context;
pub mod mesh;
pub mod shutdown;

use std::future::Future;
use std::thread::JoinHandle;

use glommio::{LocalExecutorBuilder, Placement};
use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::object::types::ObjectType;
use hwlocality::Topology;

/// Bytes of io_uring-registered memory per executor. The spool (a later stage) raises it; the
/// default 10 MiB would need a memlock limit most hosts do not grant.
const EXECUTOR_IO_MEMORY_BYTES: usize = 512 * 1024;

/// Errors starting the runtimes.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// hwloc could not read the machine topology.
    #[error("cannot read the CPU topology with hwloc: {0}")]
    Topology(String),
    /// The tokio island could not be built.
    #[error("cannot start the driver island: {0}")]
    Island(std::io::Error),
    /// A glommio executor could not be started (io_uring unavailable, memlock too low, ...).
    #[error("cannot start the executor of core {core} on CPU {cpu}: {reason}")]
    Executor {
        /// Data-plane core index.
        core: usize,
        /// CPU it was to be pinned on.
        cpu: usize,
        /// glommio's error.
        reason: String,
    },
}

/// The tokio runtime that owns driver and broker sockets.
pub struct Island {
    runtime: tokio::runtime::Runtime,
}

impl Island {
    /// Starts the island with `threads` worker threads.
    pub fn start(threads: usize) -> Result<Island, RuntimeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("island")
            .enable_all()
            .build()
            .map_err(RuntimeError::Island)?;
        Ok(Island { runtime })
    }

    /// A handle that cores enter, and that spawns onto the island.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime.handle().clone()
    }

    /// Runs a future to completion on the island (start-up and shutdown only).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

/// CPUs for the data-plane executors: the first hardware thread of each physical core this
/// process may run on (its CPU affinity: `taskset`, systemd `CPUAffinity=`), as hwloc
/// reports them. With `requested` cores, the list is cut or repeated to that length.
pub fn data_plane_cpus(requested: Option<usize>) -> Result<Vec<usize>, RuntimeError> {
    let topology = Topology::new().map_err(|e| RuntimeError::Topology(e.to_string()))?;
    // The CPUs this thread may run on (`taskset`, systemd's `CPUAffinity=`, a container's
    // cpuset): a core is used through its first allowed CPU, a core with none is left alone.
    let allowed = topology.cpu_binding(CpuBindingFlags::THREAD).ok();
    let mut cpus: Vec<usize> = topology
        .objects_with_type(ObjectType::Core)
        .filter_map(|core| {
            let set = core.cpuset()?;
            match &allowed {
                Some(allowed) => set.iter_set().find(|cpu| allowed.is_set(*cpu)),
                None => set.first_set(),
            }
        })
        .map(usize::from)
        .collect();
    if cpus.is_empty() {
        return Err(RuntimeError::Topology(
            "hwloc reports no cores with CPUs this process may run on".into(),
        ));
    }
    cpus.sort_unstable();
    let count = requested.unwrap_or(cpus.len());
    Ok((0..count).map(|i| cpus[i % cpus.len()]).collect())
}

/// Handles of the running core executors.
pub struct Cores {
    threads: Vec<(usize, glommio::ExecutorJoinHandle<()>)>,
}

impl Cores {
    /// Starts one executor per entry of `cpus`, pinned to it; core `i` runs `bodies[i]()` on its
    /// own thread with the island entered and its context (`context`) installed.
    pub fn start<B, Fut>(cpus: &[usize], island: tokio::runtime::Handle, bodies: Vec<B>) -> Result<Cores, RuntimeError>
    where
        B: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        assert_eq!(cpus.len(), bodies.len(), "one body per core");
        let mut threads = Vec::with_capacity(cpus.len());
        for ((core, &cpu), body) in cpus.iter().enumerate().zip(bodies) {
            let handle = island.clone();
            let spawned = LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("core-{core}"))
                .io_memory(EXECUTOR_IO_MEMORY_BYTES)
                .spawn(move || async move {
                    // Held for the executor's life: tokio timers and driver futures need it.
                    let _island = handle.enter();
                    // The core's state (spool service, writer cache, log limiters) lives and
                    // goes with its body.
                    let _context = context::install(core);
                    body().await;
                });
            match spawned {
                Ok(join) => threads.push((core, join)),
                Err(e) => {
                    return Err(RuntimeError::Executor {
                        core,
                        cpu,
                        reason: e.to_string(),
                    })
                }
            }
        }
        Ok(Cores { threads })
    }

    /// Number of running cores.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// True when no core runs.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Waits for every core's main future to finish.
    pub fn join(self) {
        for (core, handle) in self.threads {
            if let Err(e) = handle.join() {
                tracing::error!(core, error = %e, "core executor ended with an error");
            }
        }
    }
}

/// Spawns a named OS thread for blocking work (librdkafka polling) off the data plane.
pub fn spawn_housekeeping<F: FnOnce() + Send + 'static>(name: &str, body: F) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.to_string()).spawn(body)
}
