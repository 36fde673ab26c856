//! The drain: how a run stops, by its [`Deadlines`].

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until, timeout_at};

use super::Run;
use crate::updater::held::Held;
use crate::updater::settlement::Settlement;
use crate::{Deadlines, Delivery, Settled, error_chain};

impl Run<'_> {
    /// Stops, by `deadlines` (see [`Deadlines`]): stops intake and releases what has not
    /// started by the drain deadline, lets running handlers finish and settles them
    /// (locks still renewed) until it, then aborts the rest, waits for their tasks until
    /// `aborted_by` and abandons their messages by `abandon_by`. A shutdown that begins
    /// meanwhile (during the drain after a receive error) brings the deadlines forward.
    pub(in crate::updater) async fn drain(
        &mut self,
        shutting_down: bool,
        mut deadlines: Deadlines,
    ) {
        self.draining = true;
        let mut tightened = shutting_down;
        if shutting_down {
            match timeout_at(deadlines.drain(), self.source.stop_receiving()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(
                    error = %error_chain(&error),
                    "stop_receiving failed; buffered messages return when their locks expire"
                ),
                Err(_) => tracing::warn!("stop_receiving did not finish by the drain deadline"),
            }
        }
        let unstarted: Vec<Held> = self
            .pending
            .drain(..)
            .chain(self.delayed.take_all())
            .filter(|held| !held.lost)
            .collect();
        for held in unstarted {
            self.settlements.start(held, Settlement::Abandon(None), None, None);
        }
        self.ctx.set_in_flight(self.handlers.len());
        while !self.handlers.is_empty() || !self.settlements.is_empty() {
            let renewal = self.handlers.iter().filter_map(|r| r.held.renew_at).min();
            let timer = renewal.map_or(deadlines.drain(), |at| at.min(deadlines.drain()));
            tokio::select! {
                (running, ended) = self.handlers.next() => self.finish(running, ended),
                (settling, result) = self.settlements.next() => self.settled(settling, result),
                (key, answer) = self.renewals.next() => self.renewed(key, answer),
                () = self.ctx.cancelled(), if !tightened => {
                    tightened = true;
                    if self.ctx.is_shutting_down() {
                        deadlines = deadlines.min(self.ctx.deadlines());
                    }
                }
                () = sleep_until(timer) => {
                    let now = Instant::now();
                    if now >= deadlines.drain() {
                        break;
                    }
                    self.renew_due(now);
                }
            }
            self.ctx.set_in_flight(self.handlers.len());
        }
        self.abort_running(deadlines).await;
        self.wait_settlements(deadlines.abandon_by()).await;
        self.renewals.abort_all();
        self.ctx.set_in_flight(0);
        self.ctx.set_overdue_handlers(0);
    }

    /// Aborts the handlers still running at the drain deadline and abandons their
    /// messages. Their tasks get until `aborted_by` to end first, so no handler is still
    /// at work on a message another consumer already has; a task that does not end
    /// blocks a thread, and its message goes back anyway.
    async fn abort_running(&mut self, deadlines: Deadlines) {
        if self.handlers.is_empty() {
            return;
        }
        let (ended, left) = self.handlers.abort_all(deadlines.aborted_by()).await;
        for (running, ended) in ended {
            self.finish(running, ended);
        }
        for (running, blocked) in left {
            tracing::warn!(
                message_id = %running.held.id(),
                blocked,
                "handler did not finish by the drain deadline; abandoning its message"
            );
            if self.ctx.is_shutting_down() {
                self.ctx.record_aborted(running.held.id(), blocked);
            }
            if running.held.lost {
                // Back at the broker already: its session waits for it, ahead of the
                // messages that waited behind it.
                if let Some(session) = running.held.session() {
                    let place = (running.held.key, running.held.rank);
                    let (id, now) = (running.held.id(), Instant::now());
                    self.gate.release_awaiting(session, place, id, now, Duration::ZERO);
                }
            } else {
                let record = Some(Settled::Retried);
                self.settlements.start(running.held, Settlement::Abandon(None), record, None);
            }
        }
    }

    /// Takes the results of the settlements under way until `by`; what is left then
    /// returns to the broker when its lock expires.
    async fn wait_settlements(&mut self, by: Instant) {
        let finished = timeout_at(by, async {
            while !self.settlements.is_empty() {
                let (settling, result) = self.settlements.next().await;
                self.settled(settling, result);
            }
        })
        .await;
        if finished.is_err() {
            tracing::error!(
                unsettled = self.settlements.len(),
                "settlements did not finish by the deadline; those messages return when their locks expire"
            );
            // Back at the broker when their locks run out: each session waits for its
            // message, ahead of the messages that waited behind it.
            let now = Instant::now();
            for unsettled in self.settlements.abort_all() {
                if let Some(session) = &unsettled.session {
                    let place = (unsettled.key, unsettled.rank);
                    self.gate.release_awaiting(session, place, &unsettled.id, now, Duration::ZERO);
                }
            }
        }
    }
}

impl Drop for Run<'_> {
    /// A run dropped before its drain ended (the supervisor aborted the worker at its
    /// abort-at deadline) abandons every message it still holds, in a tracked task
    /// bounded by the hard deadline, rather than leave them to lock expiry. Its handler
    /// tasks are aborted.
    fn drop(&mut self) {
        let held: Vec<Arc<Delivery>> = self
            .handlers
            .take_all()
            .into_iter()
            .chain(self.pending.drain(..))
            .chain(self.delayed.take_all())
            .filter(|held| !held.lost)
            .map(|held| held.delivery)
            .collect();
        if held.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let hard = self.ctx.deadlines().hard();
        tracing::warn!(
            messages = held.len(),
            "worker stopped before its drain ended; abandoning what it held"
        );
        let abandons = futures::future::join_all(held.into_iter().map(|delivery| async move {
            let _ = delivery.settle_handle().abandon(None).await;
        }));
        runtime.spawn(self.ctx.track(async move {
            let _ = timeout_at(hard, abandons).await;
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::updater::UpdaterConfig;
    use crate::updater::sessions::Waiting;
    use crate::updater::testing::{SilentSource, TestSettle, held_with};
    use crate::{Handler, Outcome, WorkerContext, handler_fn};

    /// Ensures that a run dropped before its drain ended (the supervisor aborted the
    /// worker at its abort-at deadline) abandons the messages it held, running and
    /// waiting alike, rather than leave them to lock expiry.
    #[tokio::test(start_paused = true)]
    async fn a_run_dropped_before_its_drain_ends_abandons_what_it_held() {
        let ctx = WorkerContext::for_tests("dropped");
        let handler: Arc<dyn Handler> = Arc::new(handler_fn(|_| async {
            std::future::pending::<()>().await;
            Outcome::Complete
        }));
        let config = UpdaterConfig::default();
        let settle = TestSettle::default();
        let mut run = Run::new(&ctx, &SilentSource, &handler, &config, Waiting::default());
        run.start(held_with(1, "running", None, settle.clone()));
        run.pending.push_back(held_with(2, "waiting", None, settle.clone()));
        drop(run);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(settle.abandons.load(Ordering::SeqCst), 2);
    }
}
