//! One stop signal for the whole gateway: [`signal`] makes the pair; `app` keeps the
//! [`Stopper`] and every source, core task and drain holds a clone of [`Stop`]. Async code awaits
//! [`Stop::stopped`]; a plain thread (the Kafka poll thread, the ZeroMQ receiver) checks
//! [`Stop::is_stopped`] between polls. A dropped `Stopper` counts as stopped.
//!
//! Threads: any; the signal is a `tokio::sync::watch` channel, which is runtime-agnostic.

use tokio::sync::watch;

/// Raises the stop signal.
#[derive(Debug)]
pub struct Stopper(watch::Sender<bool>);

/// Observes the stop signal.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

/// A new stop signal, not raised.
pub fn signal() -> (Stopper, Stop) {
    let (sender, receiver) = watch::channel(false);
    (Stopper(sender), Stop(receiver))
}

impl Stopper {
    /// Raises the signal: every [`Stop`] sees it.
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl Stop {
    /// Whether the gateway is stopping.
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Returns once the gateway is stopping.
    pub async fn stopped(&mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_clone_sees_the_signal_and_a_dropped_stopper_stops() {
        let (stopper, stop) = super::signal();
        let mut waiting = stop.clone();
        assert!(!stop.is_stopped());
        stopper.stop();
        assert!(stop.is_stopped());
        futures::executor::block_on(waiting.stopped());
        let (stopper, mut stop) = super::signal();
        drop(stopper);
        assert!(stop.is_stopped());
        futures::executor::block_on(stop.stopped());
    }
}
