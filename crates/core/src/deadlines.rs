//! The named instants of a shutdown (or of a worker's stop before a restart).

use std::time::Duration;

use tokio::time::Instant;

/// The most a shutdown keeps back from its hard deadline for the steps after the drain.
const MAX_GRACE: Duration = Duration::from_secs(1);

/// How much of the time left a shutdown keeps back for those steps, when that is less
/// than [`MAX_GRACE`]: one part in this many.
const GRACE_PARTS: u32 = 5;

/// The most a shutdown waits for the service's in-flight HTTP requests.
const MAX_REQUESTS: Duration = Duration::from_secs(5);

/// How much of the whole shutdown the in-flight HTTP requests get, when that is less
/// than [`MAX_REQUESTS`]: one part in this many.
const REQUESTS_PARTS: u32 = 5;

/// How long past the hard deadline a process may take to save what is left and close
/// its resources (database connections) before it exits.
const CLOSE_SLACK: Duration = Duration::from_secs(4);

/// Every instant of one shutdown, in order, so the supervisor, the Updater and the
/// service agree on them; no part computes its own fraction of a deadline.
///
/// The *grace* is the time between [`drain`](Self::drain) and [`hard`](Self::hard):
/// a fifth of the time left, at most 1 s, for a shutdown; 1 s for a worker's stop before
/// a restart.
///
/// | instant | at | what must have happened |
/// |---|---|---|
/// | [`requests_by`](Self::requests_by) | start + ⅕ of the shutdown, at most 5 s | the service's in-flight HTTP requests finished (it stops waiting for them) |
/// | [`drain`](Self::drain) | hard − grace | running handlers finished; the rest are aborted |
/// | [`aborted_by`](Self::aborted_by) | drain + ¼ grace | aborted handler tasks ended (one that has not blocks a thread) |
/// | [`abandon_by`](Self::abandon_by) | drain + ⅝ grace | the messages of aborted handlers are abandoned |
/// | [`abort_at`](Self::abort_at) | drain + ¾ grace | the supervisor aborts workers still running, abandoning what they held |
/// | [`hard`](Self::hard) | the deadline | `Supervisor::shutdown` has returned |
/// | [`close_by`](Self::close_by) | hard + 4 s | the process has saved what it must and closed its resources |
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use steward_core::Deadlines;
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let now = Instant::now();
/// let deadlines = Deadlines::until(now + Duration::from_secs(25));
/// assert_eq!(deadlines.drain(), now + Duration::from_secs(24));
/// assert_eq!(deadlines.hard(), now + Duration::from_secs(25));
/// assert!(deadlines.abandon_by() < deadlines.abort_at());
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    start: Instant,
    drain: Instant,
    grace: Duration,
}

impl Deadlines {
    /// The deadlines of a shutdown that must be over by `hard`, starting now.
    #[must_use]
    pub fn until(hard: Instant) -> Self {
        let now = Instant::now();
        let grace = (hard.saturating_duration_since(now) / GRACE_PARTS).min(MAX_GRACE);
        let drain = hard.checked_sub(grace).unwrap_or(hard).max(now);
        Self { start: now, drain, grace: hard.saturating_duration_since(drain) }
    }

    /// Deadlines with running handlers due at `drain` and `grace` after it for the rest.
    #[must_use]
    pub fn after_drain(drain: Instant, grace: Duration) -> Self {
        Self { start: Instant::now().min(drain), drain, grace }
    }

    /// The service's in-flight HTTP requests must have finished: it waits for them a
    /// fifth of the whole shutdown, at most 5 s, while the workers drain.
    #[must_use]
    pub fn requests_by(&self) -> Instant {
        let whole = self.hard().saturating_duration_since(self.start);
        saturating_add(self.start, (whole / REQUESTS_PARTS).min(MAX_REQUESTS))
    }

    /// The deadlines of a worker stopped to be restarted (not a shutdown): its handlers
    /// are aborted now and it has the usual grace of 1 s.
    #[must_use]
    pub fn restart() -> Self {
        Self::after_drain(Instant::now(), MAX_GRACE)
    }

    /// Running handlers must have finished; those still running are aborted.
    #[must_use]
    pub fn drain(&self) -> Instant {
        self.drain
    }

    /// Aborted handler tasks must have ended; one still running blocks a thread.
    #[must_use]
    pub fn aborted_by(&self) -> Instant {
        self.at(1, 4)
    }

    /// The messages of aborted handlers must be abandoned.
    #[must_use]
    pub fn abandon_by(&self) -> Instant {
        self.at(5, 8)
    }

    /// The supervisor aborts workers still running; what they held is abandoned.
    #[must_use]
    pub fn abort_at(&self) -> Instant {
        self.at(3, 4)
    }

    /// Everything has stopped: `Supervisor::shutdown` returns.
    #[must_use]
    pub fn hard(&self) -> Instant {
        saturating_add(self.drain, self.grace)
    }

    /// The process has saved what it must and closed its resources, and exits.
    #[must_use]
    pub fn close_by(&self) -> Instant {
        saturating_add(self.hard(), CLOSE_SLACK)
    }

    /// Widens the grace to `grace`, at most a fifth of the time left, keeping the hard
    /// deadline: the drain deadline comes earlier, leaving the steps after it (aborting
    /// handlers, abandoning their messages over a slow broker) more time. A grace
    /// already wider is kept.
    #[must_use]
    pub fn with_grace_up_to(self, grace: Duration) -> Self {
        let now = Instant::now();
        let hard = self.hard();
        let grace = grace.min(hard.saturating_duration_since(now) / GRACE_PARTS);
        if grace <= self.grace {
            return self;
        }
        let drain = hard.checked_sub(grace).unwrap_or(self.drain).max(now);
        Self { start: self.start, drain, grace: hard.saturating_duration_since(drain) }
    }

    /// Brings every instant forward to `other`'s where `other`'s is earlier (a shutdown
    /// that begins while a worker drains for a restart).
    #[must_use]
    pub fn min(self, other: Self) -> Self {
        let drain = self.drain.min(other.drain);
        let hard = self.hard().min(other.hard());
        Self {
            start: self.start.min(other.start),
            drain,
            grace: hard.saturating_duration_since(drain),
        }
    }

    fn at(&self, numerator: u32, denominator: u32) -> Instant {
        saturating_add(self.drain, (self.grace / denominator).saturating_mul(numerator))
    }
}

impl From<Instant> for Deadlines {
    /// The deadlines of a shutdown that must be over by this instant.
    fn from(hard: Instant) -> Self {
        Self::until(hard)
    }
}

/// `at + duration`, or a moment decades away when that does not fit.
pub(crate) fn saturating_add(at: Instant, duration: Duration) -> Instant {
    at.checked_add(duration)
        .or_else(|| at.checked_add(Duration::from_secs(30 * 365 * 24 * 60 * 60)))
        .unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn instants_are_in_order_and_named_fractions_of_the_grace() {
        let now = Instant::now();
        let d = Deadlines::until(now + Duration::from_secs(25));
        let ms = |at: Instant| at.duration_since(now).as_millis();
        assert_eq!(
            [ms(d.drain()), ms(d.aborted_by()), ms(d.abandon_by()), ms(d.abort_at()), ms(d.hard())],
            [24_000, 24_250, 24_625, 24_750, 25_000]
        );
        assert_eq!(ms(d.close_by()), 29_000);
        assert_eq!(ms(d.requests_by()), 5_000, "a fifth of 25 s");
        let long = Deadlines::until(now + Duration::from_secs(60));
        assert_eq!(ms(long.requests_by()), 5_000, "at most 5 s");
        let short = Deadlines::until(now + Duration::from_secs(2));
        assert_eq!(ms(short.requests_by()), 400);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_shutdown_keeps_a_fifth_for_the_grace() {
        let now = Instant::now();
        let d = Deadlines::until(now + Duration::from_millis(2000));
        assert_eq!(d.drain(), now + Duration::from_millis(1600));
        assert_eq!(d.hard(), now + Duration::from_millis(2000));
        let past = Deadlines::until(now);
        assert_eq!((past.drain(), past.hard()), (now, now), "a deadline already due");
    }

    /// Ensures that widening the grace keeps the hard deadline, moves the drain
    /// earlier, takes at most a fifth of the time left and never narrows it.
    #[tokio::test(start_paused = true)]
    async fn a_wider_grace_moves_the_drain_earlier() {
        let now = Instant::now();
        let d = Deadlines::until(now + Duration::from_secs(25))
            .with_grace_up_to(Duration::from_secs(5));
        assert_eq!(
            (d.drain(), d.hard()),
            (now + Duration::from_secs(20), now + Duration::from_secs(25))
        );
        assert_eq!(d.abandon_by(), now + Duration::from_millis(23_125));
        let short = Deadlines::until(now + Duration::from_secs(10))
            .with_grace_up_to(Duration::from_secs(5));
        assert_eq!(short.drain(), now + Duration::from_secs(8), "a fifth of 10 s");
        let narrower =
            Deadlines::until(now + Duration::from_secs(25)).with_grace_up_to(Duration::ZERO);
        assert_eq!(narrower.drain(), now + Duration::from_secs(24));
    }

    #[tokio::test(start_paused = true)]
    async fn min_takes_the_earlier_instants() {
        let now = Instant::now();
        let restart = Deadlines::after_drain(now + Duration::from_secs(10), Duration::from_secs(1));
        let shutdown = Deadlines::until(now + Duration::from_secs(5));
        let both = restart.min(shutdown);
        assert_eq!(both.drain(), shutdown.drain());
        assert_eq!(both.hard(), shutdown.hard());
    }

    #[tokio::test(start_paused = true)]
    async fn far_instants_saturate_instead_of_panicking() {
        let now = Instant::now();
        let d = Deadlines::after_drain(now, Duration::MAX);
        assert!(d.hard() > now + Duration::from_secs(365 * 24 * 60 * 60));
        assert!(saturating_add(now, Duration::MAX) > now);
    }
}
