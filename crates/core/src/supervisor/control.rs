//! Pausing, resuming and restarting one worker while the others run.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

/// What an operator asks of one worker; its supervision loop follows.
#[derive(Debug)]
pub(crate) struct Control {
    /// Whether the worker should be paused.
    pub(crate) paused: watch::Sender<bool>,
    /// Counts restart requests; each new value asks for one.
    pub(crate) restarts: watch::Sender<u64>,
    /// Whether its supervision loop still runs (not `failed`, not shut down).
    pub(crate) supervised: AtomicBool,
}

impl Control {
    pub(crate) fn new() -> Self {
        Self {
            paused: watch::Sender::new(false),
            restarts: watch::Sender::new(0),
            supervised: AtomicBool::new(true),
        }
    }
}

/// Why a worker could not be paused, resumed or restarted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The supervisor has no worker of that name.
    #[error("no worker is named {0}")]
    Unknown(String),
    /// The worker is no longer supervised: it failed (past its restart limit) or the
    /// supervisor shut down.
    #[error(
        "worker {0} is no longer supervised (failed or shut down); only a process restart brings it back"
    )]
    NotSupervised(String),
}

/// Pauses, resumes and restarts a supervisor's workers one at a time
/// ([`Supervisor::controls`](crate::Supervisor::controls)); cheap to clone, for a web
/// layer's state.
///
/// - [`pause`](Self::pause) cancels the worker's current run, as a restart does: an
///   [`Updater`](crate::Updater) stops its intake, lets its running handlers finish and
///   releases the messages it had not started. The worker then stays `paused` (which
///   counts as ready) and is not started again until [`resume`](Self::resume).
/// - [`restart`](Self::restart) cancels the current run the same way and starts the
///   worker again at once (a paused worker stays paused). Neither counts toward the
///   restart intensity.
#[derive(Clone, Default)]
pub struct WorkerControls {
    workers: Arc<Mutex<BTreeMap<String, Arc<Control>>>>,
}

impl fmt::Debug for WorkerControls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.lock().iter().map(|(name, control)| (name, *control.paused.borrow())))
            .finish()
    }
}

impl WorkerControls {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Control>>> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn add(&self, name: &str) -> Arc<Control> {
        let control = Arc::new(Control::new());
        self.lock().insert(name.to_owned(), control.clone());
        control
    }

    fn supervised(&self, name: &str) -> Result<Arc<Control>, ControlError> {
        let control =
            self.lock().get(name).cloned().ok_or_else(|| ControlError::Unknown(name.to_owned()))?;
        if control.supervised.load(Ordering::Acquire) {
            Ok(control)
        } else {
            Err(ControlError::NotSupervised(name.to_owned()))
        }
    }

    /// Whether the worker named `name` is asked to be paused; `None` for no such worker.
    #[must_use]
    pub fn is_paused(&self, name: &str) -> Option<bool> {
        self.lock().get(name).map(|control| *control.paused.borrow())
    }

    /// Pauses the worker named `name` (nothing changes if it already is).
    ///
    /// # Errors
    ///
    /// No worker of that name, or it is no longer supervised.
    pub fn pause(&self, name: &str) -> Result<(), ControlError> {
        self.set_paused(name, true)
    }

    /// Resumes the worker named `name` (nothing changes if it is not paused).
    ///
    /// # Errors
    ///
    /// No worker of that name, or it is no longer supervised.
    pub fn resume(&self, name: &str) -> Result<(), ControlError> {
        self.set_paused(name, false)
    }

    /// Pauses (`true`) or resumes the worker named `name`.
    ///
    /// # Errors
    ///
    /// No worker of that name, or it is no longer supervised.
    pub fn set_paused(&self, name: &str, paused: bool) -> Result<(), ControlError> {
        let control = self.supervised(name)?;
        let changed = control.paused.send_if_modified(|current| {
            let changed = *current != paused;
            *current = paused;
            changed
        });
        if changed {
            tracing::info!(worker = name, paused, "worker pause changed");
        }
        Ok(())
    }

    /// Restarts the worker named `name` now: its current run stops as in a pause, and
    /// it starts again at once.
    ///
    /// # Errors
    ///
    /// No worker of that name, or it is no longer supervised.
    pub fn restart(&self, name: &str) -> Result<(), ControlError> {
        let control = self.supervised(name)?;
        control.restarts.send_modify(|n| *n = n.wrapping_add(1));
        tracing::info!(worker = name, "worker restart requested");
        Ok(())
    }
}
