//! One context per core: the state each module keeps per core — the spool service (spool,
//! memory budget, group-commit queue, wake-ups, its log limiter and sync count), the ingest
//! API's prepared-writer cache, the write engine's retry log — lives in one [`CoreContext`]
//! with one lifetime: installed when the core starts ([`install`]), dropped with everything in
//! it when the core's body returns. Each module owns the type of its state and reaches it with
//! [`state`]; the context holds states by type, so this module — the lowest layer — imports
//! none of the modules whose state it holds, and no module can touch another's state.
//!
//! Not in here, and why: each consumer's admission budget (`runtime::budget`) is handed to its
//! consumer when the core starts (a route's or the ingest API's share, by value); the metric
//! handles (`telemetry::RowMetrics`) are per route and indexed by core.
//!
//! Threads: every core; a thread with no installed context (the `replay` command's runtime,
//! unit tests) gets one of its own on first use, without a core index.

use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// One core's state, by type.
pub struct CoreContext {
    core: Option<usize>,
    states: RefCell<HashMap<TypeId, Rc<dyn Any>>>,
}

thread_local! {
    /// The context of the core this thread runs: the one thread-local of the data plane.
    static CURRENT: RefCell<Option<Rc<CoreContext>>> = const { RefCell::new(None) };
}

/// The installed context; dropping it drops the context and every state in it.
#[must_use = "the context lives as long as this guard"]
pub struct Installed(());

impl Drop for Installed {
    fn drop(&mut self) {
        let context = CURRENT.with(|current| current.borrow_mut().take());
        drop(context);
    }
}

/// Installs a fresh context for `core` on this thread, replacing any other.
pub fn install(core: usize) -> Installed {
    let context = Rc::new(CoreContext {
        core: Some(core),
        states: RefCell::new(HashMap::new()),
    });
    let previous = CURRENT.with(|current| current.borrow_mut().replace(context));
    drop(previous);
    Installed(())
}

/// This thread's context (made on first use where none is installed).
fn current() -> Rc<CoreContext> {
    CURRENT.with(|current| {
        Rc::clone(current.borrow_mut().get_or_insert_with(|| {
            Rc::new(CoreContext {
                core: None,
                states: RefCell::new(HashMap::new()),
            })
        }))
    })
}

/// The core this thread runs, if it is a core.
pub fn core() -> Option<usize> {
    current().core
}

/// This core's state of type `T`, made with `T::default()` on its first use.
pub fn state<T: Default + 'static>() -> Rc<T> {
    let context = current();
    let existing = context.states.borrow().get(&TypeId::of::<T>()).map(Rc::clone);
    let any = match existing {
        Some(any) => any,
        None => {
            // Made outside the borrow: a state's `default` may reach for another state.
            let made: Rc<dyn Any> = Rc::new(T::default());
            Rc::clone(context.states.borrow_mut().entry(TypeId::of::<T>()).or_insert(made))
        }
    };
    match any.downcast::<T>() {
        Ok(state) => state,
        Err(_) => unreachable!("states are keyed by their own type"),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::{core, install, state};

    #[derive(Default)]
    struct Count(Cell<u32>);

    #[test]
    fn a_state_lives_as_long_as_its_core_context() {
        std::thread::spawn(|| {
            state::<Count>().0.set(7);
            assert_eq!(core(), None, "a thread that is not a core has no core index");
            assert_eq!(state::<Count>().0.get(), 7, "one state per type per thread");
            let installed = install(3);
            assert_eq!(core(), Some(3));
            assert_eq!(state::<Count>().0.get(), 0, "a core starts with fresh state");
            state::<Count>().0.set(1);
            let held = state::<Count>();
            drop(installed);
            assert_eq!(held.0.get(), 1);
            assert_eq!(state::<Count>().0.get(), 0, "the core's state went with its context");
            assert_eq!(core(), None);
        })
        .join()
        .expect("the test thread finishes");
    }
}
