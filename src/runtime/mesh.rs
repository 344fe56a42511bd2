//! The cross-core mesh: one bounded inbox per core through which any core (or thread) runs a
//! task on the core that owns the rows it carries. Every source uses it the same way: the
//! receiving core groups rows by owner core, keeps its own, and sends each other owner one task
//! holding that owner's rows (one batched hop), then awaits the task's answer. Because the sender
//! awaits, its own in-flight budget covers the forwarded rows; because inboxes are bounded, a
//! slow owner makes senders wait instead of queueing without limit.
//!
//! The task is a `Send` closure; the future it returns runs on the owner core with
//! `spawn_local`, so it may hold core-local (`!Send`) state.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// Tasks one core's inbox holds before senders wait.
pub const INBOX_TASKS_MAX: usize = 64;

/// A task to run on its owner core.
type Task = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// The sending side, shared by every core and source.
pub struct Mesh {
    inboxes: Vec<mpsc::Sender<Task>>,
}

/// The receiving side of one core's inbox; served by [`serve`] on that core.
pub struct Inbox {
    tasks: mpsc::Receiver<Task>,
}

/// The owner core stopped serving its inbox (the gateway is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("core {core} is shutting down")]
pub struct OwnerGone {
    /// The core that did not answer.
    pub core: usize,
}

impl Mesh {
    /// A mesh of `cores` inboxes.
    pub fn new(cores: usize) -> (Arc<Mesh>, Vec<Inbox>) {
        let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..cores).map(|_| mpsc::channel(INBOX_TASKS_MAX)).unzip();
        let inboxes_rx = receivers.into_iter().map(|tasks| Inbox { tasks }).collect();
        (Arc::new(Mesh { inboxes }), inboxes_rx)
    }

    /// Number of cores.
    pub fn cores(&self) -> usize {
        self.inboxes.len()
    }

    /// Runs `task` on core `core` and returns its output. Waits while that core's inbox is full.
    pub async fn run_on<T, F, Fut>(&self, core: usize, task: F) -> Result<T, OwnerGone>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let boxed: Task = Box::new(move || {
            Box::pin(async move {
                let _ = reply.send(task().await);
            })
        });
        let inbox = self.inboxes.get(core).ok_or(OwnerGone { core })?;
        inbox.send(boxed).await.map_err(|_| OwnerGone { core })?;
        answer.await.map_err(|_| OwnerGone { core })
    }
}

/// Serves a core's inbox until `until` completes: each task runs as its own local task, so a
/// slow write does not hold up the next. Runs on that core.
pub async fn serve(mut inbox: Inbox, until: impl Future<Output = ()>) {
    let receive = async {
        while let Some(task) = inbox.tasks.recv().await {
            glommio::spawn_local(task()).detach();
        }
    };
    futures::pin_mut!(receive);
    futures::pin_mut!(until);
    futures::future::select(receive, until).await;
}
