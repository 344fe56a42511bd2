//! One admission budget per core, in rows: `runtime.inflight_rows_per_core_max` rows may be in
//! flight on a core across everything that admits work there — every route's batches (a source
//! message counts as one row until it is mapped) and every ingest batch. Work is admitted before
//! it is read on, so a full budget stops the sources and streams feeding that core: a slow
//! database slows intake instead of growing memory. Rows forwarded to another core stay counted
//! on the core that admitted them, until their owner answers.
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

    /// [`Budget::admit`], waiting at most `wait`: `Err(())` when the rows did not fit in time (a
    /// unary call is refused then — it cannot be slowed by flow control the way a stream is).
    /// `Ok(None)` once the budget is closed. Runs where tokio's timer is available (the cores
    /// enter the island's handle).
    pub async fn admit_within(&self, rows: usize, wait: std::time::Duration) -> Result<Option<Admitted>, ()> {
        tokio::time::timeout(wait, self.admit(rows)).await.map_err(|_| ())
    }

    /// Rows the budget holds at most.
    pub fn rows_max(&self) -> usize {
        self.rows_max
    }

    /// Rows admitted now.
    pub fn rows_in_flight(&self) -> usize {
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
