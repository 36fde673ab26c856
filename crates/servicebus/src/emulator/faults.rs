//! Faults injected at the HTTP level: error statuses, dropped connections, latency.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::StatusCode;

/// A REST operation of the emulator, as fault injection addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// `POST /{queue}/messages`.
    Send,
    /// `POST /{queue}/messages/head`.
    PeekLock,
    /// `DELETE /{queue}/messages/head`.
    ReceiveAndDelete,
    /// `PUT /{queue}/messages/{id}/{lockToken}`.
    Unlock,
    /// `DELETE /{queue}/messages/{id}/{lockToken}`.
    Complete,
    /// `POST /{queue}/messages/{id}/{lockToken}`.
    RenewLock,
}

impl Operation {
    /// The operation's name as Microsoft's REST reference calls it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::PeekLock => "peek-lock",
            Self::ReceiveAndDelete => "receive-and-delete",
            Self::Unlock => "unlock",
            Self::Complete => "delete",
            Self::RenewLock => "renew-lock",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an armed fault does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Answer with this status and an error body, doing nothing else.
    Fail(StatusCode),
    /// Close the connection without answering.
    Drop,
}

#[derive(Debug, Default)]
struct State {
    /// Armed actions, by operation (`None`: any operation) with how many are left.
    armed: HashMap<Option<Operation>, (u32, Action)>,
    latency: Duration,
}

/// Injects faults into an emulator's HTTP handling; get it from
/// [`EmulatorHandle::faults`](super::EmulatorHandle::faults).
///
/// A fault armed for one [`Operation`] is used before a fault armed for any operation.
/// Arming replaces what was armed for the same target. A failed or dropped request
/// leaves the broker untouched. For broker-level faults (a receive failing with a given
/// error kind, a hung receive) use the broker's own
/// [`faults`](steward_inmem::InMemoryBroker::faults); the emulator answers those with
/// the status the service would give.
///
/// Cloning is cheap and shares the faults.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), steward_servicebus::emulator::EmulatorError> {
/// use std::time::Duration;
/// use steward_servicebus::emulator::{Emulator, Operation, StatusCode};
///
/// let emulator = Emulator::builder().start().await?;
/// emulator
///     .faults()
///     .fail_next_on(Operation::PeekLock, 2, StatusCode::SERVICE_UNAVAILABLE)
///     .drop_next_on(Operation::Complete, 1)
///     .set_latency(Duration::from_millis(5));
/// # emulator.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Faults {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("Faults")
            .field("armed", &state.armed)
            .field("latency", &state.latency)
            .finish()
    }
}

impl Faults {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a few counters; a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn arm(&self, target: Option<Operation>, n: u32, action: Action) -> &Self {
        let mut state = self.state();
        if n == 0 {
            state.armed.remove(&target);
        } else {
            state.armed.insert(target, (n, action));
        }
        self
    }

    /// The next `n` requests, of any operation, are answered with `status` (for example
    /// 500 or 503) and an error body.
    pub fn fail_next(&self, n: u32, status: StatusCode) -> &Self {
        self.arm(None, n, Action::Fail(status))
    }

    /// The next `n` requests of `operation` are answered with `status` and an error body.
    pub fn fail_next_on(&self, operation: Operation, n: u32, status: StatusCode) -> &Self {
        self.arm(Some(operation), n, Action::Fail(status))
    }

    /// The next `n` requests, of any operation, have their connection closed without an
    /// answer.
    pub fn drop_next(&self, n: u32) -> &Self {
        self.arm(None, n, Action::Drop)
    }

    /// The next `n` requests of `operation` have their connection closed without an
    /// answer.
    pub fn drop_next_on(&self, operation: Operation, n: u32) -> &Self {
        self.arm(Some(operation), n, Action::Drop)
    }

    /// Every request first waits `latency` (a slow service). Zero turns it off.
    pub fn set_latency(&self, latency: Duration) -> &Self {
        self.state().latency = latency;
        self
    }

    /// Disarms every fault and removes the latency.
    pub fn clear(&self) -> &Self {
        *self.state() = State::default();
        self
    }

    /// The latency to apply and the armed action, if any, for one request of
    /// `operation`; consumes the action.
    pub(crate) fn take(&self, operation: Operation) -> (Duration, Option<Action>) {
        let mut state = self.state();
        let latency = state.latency;
        for target in [Some(operation), None] {
            if let Some((left, action)) = state.armed.get_mut(&target) {
                let action = *action;
                *left -= 1;
                if *left == 0 {
                    state.armed.remove(&target);
                }
                return (latency, Some(action));
            }
        }
        (latency, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_fault_is_used_before_any_operation_fault_and_runs_out() {
        let faults = Faults::default();
        faults.fail_next(1, StatusCode::INTERNAL_SERVER_ERROR).drop_next_on(Operation::Send, 1);
        assert_eq!(faults.take(Operation::Send).1, Some(Action::Drop));
        assert_eq!(
            faults.take(Operation::Send).1,
            Some(Action::Fail(StatusCode::INTERNAL_SERVER_ERROR))
        );
        assert_eq!(faults.take(Operation::Send).1, None);
    }

    #[test]
    fn arming_zero_disarms_and_clear_resets_latency() {
        let faults = Faults::default();
        faults.fail_next_on(Operation::PeekLock, 3, StatusCode::SERVICE_UNAVAILABLE);
        faults.fail_next_on(Operation::PeekLock, 0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(faults.take(Operation::PeekLock).1, None);
        faults.set_latency(Duration::from_millis(7));
        assert_eq!(faults.take(Operation::Complete).0, Duration::from_millis(7));
        faults.clear();
        assert_eq!(faults.take(Operation::Complete), (Duration::ZERO, None));
    }
}
