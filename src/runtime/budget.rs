//! Admission in rows: `runtime.inflight_rows_per_core_max` rows may be in flight on a core, in
//! all. [`shares`] splits that per-core budget evenly among the core's consumers — each route
//! and the ingest API get a [`Budget`] of their own share — so the key's value is the core's
//! total (before, each consumer had the whole value: (routes + 1) × it per core), and a route
//! stalled on the database cannot starve the ingest API (which keeps accepting spooled batches
//! through an outage) or another route. A source message counts as one row until it is mapped.
//! Work is admitted before it is read on, so a full share stops the source or stream feeding it:
//! a slow database slows intake instead of growing memory. Rows forwarded to another core stay
//! counted on the core that admitted them, until their owner answers.
//!
//! Threads: admitted and released on the core that owns the budget; the semaphore is tokio's
//! (runtime-agnostic), so a tonic future holding an admission stays `Send`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A core's budget of rows in flight.
#[derive(Debug, Clone)]
pub struct Budget {
    rows: Arc<Semaphore>,
    rows_max: usize,
}

/// Rows admitted into a core's budget; released when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    rows: usize,
}

impl Admitted {
    /// Rows this admission holds (the request clamped to the budget).
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Each consumer's share of a core's `rows_per_core` rows when `consumers` share the core
/// (at least 1 row each).
pub fn shares(rows_per_core: usize, consumers: usize) -> usize {
    (rows_per_core / consumers.max(1)).max(1)
}

impl Budget {
    /// A budget of `rows_max` rows (at least 1).
    pub fn new(rows_max: usize) -> Budget {
        let rows_max = rows_max.max(1);
        Budget {
            rows: Arc::new(Semaphore::new(rows_max)),
            rows_max,
        }
    }

    /// Waits until `rows` rows fit, then holds them. A request larger than the whole budget
    /// takes the whole budget (it runs alone). `None` once the budget is closed (shutdown).
    pub async fn admit(&self, rows: usize) -> Option<Admitted> {
        let rows = rows.clamp(1, self.rows_max);
        let permits = u32::try_from(rows).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.rows).acquire_many_owned(permits).await.ok()?;
        Some(Admitted { _permit: permit, rows })
    }

    /// Rows admitted now.
    #[cfg(test)]
    fn rows_in_flight(&self) -> usize {
        self.rows_max - self.rows.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::Budget;

    #[test]
    fn admissions_share_one_budget_and_release_on_drop() {
        futures::executor::block_on(async {
            let budget = Budget::new(10);
            let route = budget.admit(6).await.expect("open");
            let ingest = budget.admit(4).await.expect("open");
            assert_eq!(budget.rows_in_flight(), 10);
            let too_big = budget.admit(1);
            futures::pin_mut!(too_big);
            assert!(
                futures::poll!(too_big.as_mut()).is_pending(),
                "a full budget makes callers wait"
            );
            drop(route);
            let admitted = too_big.await.expect("open");
            assert_eq!(admitted.rows(), 1);
            assert_eq!(budget.rows_in_flight(), 5);
            drop((ingest, admitted));
            assert_eq!(
                budget.admit(1_000).await.expect("open").rows(),
                10,
                "clamped to the budget"
            );
        });
    }
}
