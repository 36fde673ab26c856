//! Fault injection: failures, hangs, disconnects and latency, per queue.

use std::time::Duration;

use steward_core::{ErrorKind, TransportError};

use crate::InMemoryBroker;

/// The faults armed for one queue.
#[derive(Debug, Default, Clone)]
pub(crate) struct QueueFaults {
    pub(crate) fail_receives: Option<(u32, ErrorKind)>,
    pub(crate) fail_settlements: Option<(u32, ErrorKind)>,
    pub(crate) fail_sends: Option<(u32, ErrorKind)>,
    pub(crate) hang_receives: bool,
    pub(crate) latency: Duration,
}

/// Which operation a fault applies to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operation {
    Receive,
    Settle,
    Send,
}

impl QueueFaults {
    /// Consumes one armed failure for `op`, if any.
    pub(crate) fn take_failure(&mut self, op: Operation, queue: &str) -> Option<TransportError> {
        let slot = match op {
            Operation::Receive => &mut self.fail_receives,
            Operation::Settle => &mut self.fail_settlements,
            Operation::Send => &mut self.fail_sends,
        };
        let (left, kind) = slot.as_mut()?;
        let kind = *kind;
        *left -= 1;
        if *left == 0 {
            *slot = None;
        }
        let what = match op {
            Operation::Receive => "receive from",
            Operation::Settle => "settle on",
            Operation::Send => "send to",
        };
        Some(TransportError::new(kind, format!("injected fault: {what} queue {queue}")))
    }
}

/// Arms faults on one queue of an [`InMemoryBroker`]; see [`InMemoryBroker::faults`].
///
/// Faults apply to the named queue whether or not it exists yet.
#[derive(Debug, Clone)]
#[must_use]
pub struct Faults {
    pub(crate) broker: InMemoryBroker,
    pub(crate) queue: String,
}

impl Faults {
    fn arm(&self, f: impl FnOnce(&mut QueueFaults)) -> &Self {
        self.broker.with_faults(&self.queue, f);
        self
    }

    /// The next `n` receives from the queue fail with an error of `kind`.
    pub fn fail_receives(&self, n: u32, kind: ErrorKind) -> &Self {
        self.arm(|f| f.fail_receives = (n > 0).then_some((n, kind)))
    }

    /// The next `n` settlements (complete, abandon, dead-letter, renew) on the queue fail
    /// with an error of `kind`, leaving the message as it was.
    pub fn fail_settlements(&self, n: u32, kind: ErrorKind) -> &Self {
        self.arm(|f| f.fail_settlements = (n > 0).then_some((n, kind)))
    }

    /// The next `n` sends to the queue fail with an error of `kind`.
    pub fn fail_sends(&self, n: u32, kind: ErrorKind) -> &Self {
        self.arm(|f| f.fail_sends = (n > 0).then_some((n, kind)))
    }

    /// While `hang` is true, receives from the queue never return (until cancelled).
    pub fn hang_receives(&self, hang: bool) -> &Self {
        self.arm(|f| f.hang_receives = hang)
    }

    /// Every receive, settlement and send on the queue first waits `latency`.
    pub fn set_latency(&self, latency: Duration) -> &Self {
        self.arm(|f| f.latency = latency)
    }

    /// Drops the queue's "connections": every existing source of the queue fails all
    /// further receives with a connection error, every lock they hold is released (the
    /// messages are available at once) and settling those deliveries returns `LockLost`.
    /// Sources created afterwards work.
    pub fn disconnect(&self) -> &Self {
        self.broker.disconnect(&self.queue);
        self
    }

    /// Disarms every fault of the queue.
    pub fn clear(&self) -> &Self {
        self.arm(|f| *f = QueueFaults::default())
    }
}
