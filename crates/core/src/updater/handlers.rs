//! The running handlers: their tasks, their messages, and their timeouts.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tokio::time::Instant;

use super::held::Held;
use crate::Outcome;
use crate::deadlines::saturating_add;

/// A handler task and the message it handles.
pub(super) struct Running {
    pub(super) held: Held,
    pub(super) started: Instant,
    abort: AbortHandle,
    /// When `handler_timeout` aborts it.
    due: Option<Instant>,
    /// Aborted for running past `handler_timeout`.
    pub(super) timed_out: bool,
}

/// How a handler task ended.
pub(super) enum Ended {
    /// It returned an outcome, after running this long.
    Returned(Outcome, Duration),
    /// It panicked, with this payload.
    Panicked(String),
    /// It was aborted: past its timeout (`timed_out`) or by the drain.
    Aborted,
}

/// The handler tasks, at most `concurrency` of them (the caller checks).
///
/// Kept in spawn order, so that everything done to several of them at one instant
/// (renewals falling due together, timeouts, the drain's aborts) happens in the same
/// order on every run: the deterministic simulation replays byte for byte.
pub(super) struct Handlers {
    tasks: JoinSet<(Outcome, Duration)>,
    /// By spawn order.
    running: BTreeMap<u64, Running>,
    /// The spawn order of each task, to find a task that ended (looked up, never
    /// iterated).
    order: HashMap<Id, u64>,
    next: u64,
    timeout: Option<Duration>,
}

impl Handlers {
    pub(super) fn new(timeout: Option<Duration>) -> Self {
        Self {
            tasks: JoinSet::new(),
            running: BTreeMap::new(),
            order: HashMap::new(),
            next: 0,
            timeout,
        }
    }

    /// Runs `task`, the handler of `held`.
    pub(super) fn start<F>(&mut self, held: Held, task: F)
    where
        F: Future<Output = (Outcome, Duration)> + Send + 'static,
    {
        let abort = self.tasks.spawn(task);
        let now = Instant::now();
        let due = self.timeout.map(|limit| saturating_add(now, limit));
        self.next += 1;
        self.order.insert(abort.id(), self.next);
        self.running
            .insert(self.next, Running { held, started: now, abort, due, timed_out: false });
    }

    /// The next handler to end, with its message; pends while none runs.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub(super) async fn next(&mut self) -> (Running, Ended) {
        loop {
            if self.tasks.is_empty() {
                std::future::pending::<()>().await;
            }
            let Some(joined) = self.tasks.join_next_with_id().await else { continue };
            if let Some(ended) = self.take(joined) {
                return ended;
            }
        }
    }

    fn take(
        &mut self,
        joined: Result<(Id, (Outcome, Duration)), JoinError>,
    ) -> Option<(Running, Ended)> {
        let (id, ended) = match joined {
            Ok((id, (outcome, elapsed))) => (id, Ended::Returned(outcome, elapsed)),
            Err(error) if error.is_panic() => {
                let id = error.id();
                (id, Ended::Panicked(crate::supervisor::panic_message(error.into_panic())))
            }
            Err(error) => (error.id(), Ended::Aborted),
        };
        let seq = self.order.remove(&id)?;
        self.running.remove(&seq).map(|running| (running, ended))
    }

    /// Aborts the handlers past their timeout; they end as [`Ended::Aborted`] with
    /// `timed_out` set (or return later, if they block a thread). Returns their messages'
    /// ids.
    pub(super) fn time_out(&mut self, now: Instant) -> Vec<String> {
        let mut timed_out = Vec::new();
        for running in self.running.values_mut() {
            if !running.timed_out && running.due.is_some_and(|due| due <= now) {
                running.timed_out = true;
                running.abort.abort();
                timed_out.push(running.held.id().to_owned());
            }
        }
        timed_out
    }

    /// When the next handler runs past its timeout.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.running.values().filter(|r| !r.timed_out).filter_map(|r| r.due).min()
    }

    /// Handlers aborted for their timeout that have not ended: they block a thread.
    pub(super) fn overdue(&self) -> usize {
        self.running.values().filter(|r| r.timed_out).count()
    }

    /// Aborts every handler, waits for their tasks until `by`, and returns the ones that
    /// returned meanwhile, and the ones still running (`true`: it did not end even when
    /// aborted, so it blocks a thread).
    pub(super) async fn abort_all(
        &mut self,
        by: Instant,
    ) -> (Vec<(Running, Ended)>, Vec<(Running, bool)>) {
        self.tasks.abort_all();
        let mut ended = Vec::new();
        let mut stopped = Vec::new();
        let _ = tokio::time::timeout_at(by, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                match joined {
                    Err(error) if error.is_cancelled() => stopped.push(error.id()),
                    other => ended.extend(self.take(other)),
                }
            }
        })
        .await;
        let stopped: Vec<u64> =
            stopped.iter().filter_map(|id| self.order.get(id).copied()).collect();
        self.order.clear();
        let left = std::mem::take(&mut self.running)
            .into_iter()
            .map(|(seq, running)| {
                let blocked = !stopped.contains(&seq);
                (running, blocked)
            })
            .collect();
        (ended, left)
    }

    /// Takes every running handler's message, aborting the tasks (a run dropped early).
    pub(super) fn take_all(&mut self) -> Vec<Held> {
        self.tasks.abort_all();
        self.order.clear();
        std::mem::take(&mut self.running).into_values().map(|r| r.held).collect()
    }

    pub(super) fn len(&self) -> usize {
        self.running.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Running> {
        self.running.values()
    }

    pub(super) fn held_mut(&mut self) -> impl Iterator<Item = &mut Held> {
        self.running.values_mut().map(|r| &mut r.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::updater::testing::held;

    #[tokio::test(start_paused = true)]
    async fn a_handler_past_its_timeout_is_aborted_and_its_message_returned() {
        let mut handlers = Handlers::new(Some(Duration::from_secs(5)));
        handlers.start(held(1, "hangs"), async {
            std::future::pending::<()>().await;
            (Outcome::Complete, Duration::ZERO)
        });
        handlers.start(held(2, "quick"), async { (Outcome::Complete, Duration::from_secs(1)) });
        let (running, ended) = handlers.next().await;
        assert_eq!(running.held.id(), "quick");
        assert!(matches!(ended, Ended::Returned(Outcome::Complete, _)));
        let now = Instant::now();
        assert_eq!(handlers.next_timeout(), Some(now + Duration::from_secs(5)));
        assert!(handlers.time_out(now + Duration::from_secs(4)).is_empty());
        assert_eq!(handlers.time_out(now + Duration::from_secs(5)), ["hangs"]);
        assert_eq!(handlers.overdue(), 1);
        let (running, ended) = handlers.next().await;
        assert!(running.timed_out && matches!(ended, Ended::Aborted));
        assert!(handlers.is_empty());
        assert_eq!(handlers.overdue(), 0);
    }

    /// Ensures that handlers are visited, timed out and aborted in the order they were
    /// started, whatever their task ids hash to: same-instant renewals and aborts come
    /// out the same on every run.
    #[tokio::test(start_paused = true)]
    async fn handlers_are_visited_in_start_order() {
        let names = ["c", "a", "e", "b", "d", "f", "h", "g"];
        let mut handlers = Handlers::new(Some(Duration::from_secs(5)));
        for (n, name) in (1..).zip(names) {
            handlers.start(held(n, name), async {
                std::future::pending::<()>().await;
                (Outcome::Complete, Duration::ZERO)
            });
        }
        let visited: Vec<_> = handlers.iter().map(|r| r.held.id().to_owned()).collect();
        assert_eq!(visited, names);
        let timed_out = handlers.time_out(Instant::now() + Duration::from_secs(5));
        assert_eq!(timed_out, names);
        let (_, left) = handlers.abort_all(Instant::now()).await;
        let left: Vec<_> = left.iter().map(|(r, _)| r.held.id().to_owned()).collect();
        assert_eq!(left, names);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_is_caught_with_its_payload() {
        let mut handlers = Handlers::new(None);
        handlers.start(held(1, "fragile"), async {
            if true {
                panic!("boom");
            }
            (Outcome::Complete, Duration::ZERO)
        });
        let (_, ended) = handlers.next().await;
        assert!(matches!(ended, Ended::Panicked(payload) if payload == "boom"));
    }

    #[tokio::test(start_paused = true)]
    async fn abort_all_reports_the_handlers_it_stopped() {
        let mut handlers = Handlers::new(None);
        handlers.start(held(1, "stubborn"), async {
            std::future::pending::<()>().await;
            (Outcome::Complete, Duration::ZERO)
        });
        let (ended, left) = handlers.abort_all(Instant::now() + Duration::from_secs(1)).await;
        assert!(ended.is_empty());
        let left: Vec<_> =
            left.iter().map(|(r, blocked)| (r.held.id().to_owned(), *blocked)).collect();
        assert_eq!(left, [("stubborn".to_owned(), false)], "aborted in time, not blocking");
        assert!(handlers.is_empty());
    }
}
