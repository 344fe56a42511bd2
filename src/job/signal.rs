//! How a job's task is told to pause, resume, cancel or stop: a watch channel of [`Command`]s.
//! Pure vocabulary, shared by the scan runner, stream jobs and the control.

use tokio::sync::watch;

/// What a job's task is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Run (or go on running).
    Run,
    /// Claim no new split / read no message until told to run again.
    Pause,
    /// End: a scan job's run is marked cancelled; a stream job checkpoints and stops.
    Cancel,
    /// The gateway stops: a scan job stops reading (its run resumes later); a stream job
    /// checkpoints and stops.
    Stop,
}

/// A job task's end of its control channel.
pub type Signal = watch::Receiver<Command>;

/// A control channel nobody commands: the job runs to its end (`shardgate job run`). Keep the
/// sender to stop it.
pub fn steady() -> (watch::Sender<Command>, Signal) {
    watch::channel(Command::Run)
}

/// The next command, once one is given; never, once the sender is gone.
pub async fn next_command(signal: &mut Signal) -> Command {
    match signal.changed().await {
        Ok(()) => *signal.borrow_and_update(),
        Err(_) => std::future::pending().await,
    }
}

/// A scan run ended by [`Command::Cancel`] or [`Command::Stop`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub &'static str);
