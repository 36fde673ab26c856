//! Fault injection: failures, hangs, disconnects and latency, per queue.

use std::sync::Arc;
use std::time::Duration;

use steward_core::{ErrorKind, TransportError};
use tokio::sync::Notify;

use crate::InMemoryBroker;

/// The faults armed for one queue.
#[derive(Debug, Default, Clone)]
pub(crate) struct QueueFaults {
    pub(crate) fail_receives: Option<(u32, ErrorKind)>,
    pub(crate) fail_settlements: Option<(u32, ErrorKind)>,
    pub(crate) fail_sends: Option<(u32, ErrorKind)>,
    pub(crate) hang_receives: bool,
    pub(crate) latency: Duration,
    /// Failures only dispositions (complete, abandon, dead-letter) consume.
    pub(crate) fail_dispositions: Option<(u32, ErrorKind)>,
    /// Failures only lock renewals consume.
    pub(crate) fail_renewals: Option<(u32, ErrorKind)>,
    pub(crate) hang_dispositions: bool,
    pub(crate) hang_renewals: bool,
    pub(crate) hang_sends: bool,
    /// Wakes operations waiting out a hang whenever the faults change.
    pub(crate) changed: Arc<Notify>,
}

/// Which operation a fault applies to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operation {
    Receive,
    /// Complete, abandon or dead-letter.
    Disposition,
    Renew,
    Send,
}

/// Consumes one failure from `slot`, if armed.
fn take(slot: &mut Option<(u32, ErrorKind)>) -> Option<ErrorKind> {
    let (left, kind) = slot.as_mut()?;
    let kind = *kind;
    *left -= 1;
    if *left == 0 {
        *slot = None;
    }
    Some(kind)
}

impl QueueFaults {
    /// Consumes one armed failure for `op`, if any: first a failure armed for `op`
    /// alone, then one armed for every settlement.
    pub(crate) fn take_failure(&mut self, op: Operation, queue: &str) -> Option<TransportError> {
        let kind = match op {
            Operation::Receive => take(&mut self.fail_receives),
            Operation::Disposition => {
                take(&mut self.fail_dispositions).or_else(|| take(&mut self.fail_settlements))
            }
            Operation::Renew => {
                take(&mut self.fail_renewals).or_else(|| take(&mut self.fail_settlements))
            }
            Operation::Send => take(&mut self.fail_sends),
        }?;
        let what = match op {
            Operation::Receive => "receive from",
            Operation::Disposition => "settle on",
            Operation::Renew => "renew a lock on",
            Operation::Send => "send to",
        };
        Some(TransportError::new(kind, format!("injected fault: {what} queue {queue}")))
    }

    /// Whether `op` waits out a hang that ends when the hang is switched off.
    pub(crate) fn is_held(&self, op: Operation) -> bool {
        match op {
            Operation::Receive => false,
            Operation::Disposition => self.hang_dispositions,
            Operation::Renew => self.hang_renewals,
            Operation::Send => self.hang_sends,
        }
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
        self.broker.with_faults(&self.queue, |faults| {
            f(faults);
            faults.changed.notify_waiters();
        });
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

    /// The next `n` dispositions (complete, abandon, dead-letter) on the queue fail with
    /// an error of `kind`, leaving the message as it was. Lock renewals are unaffected.
    pub fn fail_dispositions(&self, n: u32, kind: ErrorKind) -> &Self {
        self.arm(|f| f.fail_dispositions = (n > 0).then_some((n, kind)))
    }

    /// The next `n` lock renewals on the queue fail with an error of `kind`, leaving the
    /// lock as it was. Dispositions are unaffected.
    pub fn fail_renewals(&self, n: u32, kind: ErrorKind) -> &Self {
        self.arm(|f| f.fail_renewals = (n > 0).then_some((n, kind)))
    }

    /// While `hang` is true, dispositions (complete, abandon, dead-letter) on the queue
    /// wait without taking effect: a broker that does not answer. Switching it off lets
    /// the waiting calls go on, as a slow answer would; a call cancelled while it waits
    /// changes nothing.
    pub fn hang_dispositions(&self, hang: bool) -> &Self {
        self.arm(|f| f.hang_dispositions = hang)
    }

    /// While `hang` is true, lock renewals on the queue wait without taking effect;
    /// switching it off lets them go on (see [`hang_dispositions`](Self::hang_dispositions)).
    pub fn hang_renewals(&self, hang: bool) -> &Self {
        self.arm(|f| f.hang_renewals = hang)
    }

    /// While `hang` is true, sends to the queue wait without storing the message;
    /// switching it off lets them go on (see [`hang_dispositions`](Self::hang_dispositions)).
    pub fn hang_sends(&self, hang: bool) -> &Self {
        self.arm(|f| f.hang_sends = hang)
    }

    /// Ends every lock held on the queue now, as if each had expired: the messages are
    /// available again at once, and settling or renewing those deliveries returns
    /// `LockLost`. Unlike [`disconnect`](Self::disconnect), the sources keep working.
    pub fn expire_locks(&self) -> &Self {
        self.broker.expire_locks(&self.queue);
        self
    }

    /// Disarms every fault of the queue; calls waiting out a hang go on.
    pub fn clear(&self) -> &Self {
        self.arm(|f| {
            let changed = f.changed.clone();
            *f = QueueFaults { changed, ..QueueFaults::default() };
        })
    }
}
