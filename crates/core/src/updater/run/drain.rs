//! The drain: how a run stops, by its [`Deadlines`].

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until, timeout, timeout_at};

use super::Run;
use crate::updater::held::Held;
use crate::updater::settlement::{SessionStep, Settlement, Settlements};
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
        let grace = self.config.shutdown_grace;
        if shutting_down {
            deadlines = deadlines.with_grace_up_to(grace);
        }
        let mut tightened = shutting_down;
        // `stop_receiving` runs beside the drain, bounded by `broker_timeout`: handler
        // results are taken and locks renewed meanwhile. The messages that have not
        // started are released once it answered (so a transport that buffers does not
        // hand them straight back to this consumer), or when it gives up.
        let limit = self.config.broker_timeout;
        let mut stopping =
            shutting_down.then(|| Box::pin(timeout(limit, self.source.stop_receiving())));
        if stopping.is_none() {
            self.release_unstarted();
        }
        self.ctx.set_in_flight(self.handlers.len());
        while stopping.is_some() || !self.handlers.is_empty() || !self.settlements.is_empty() {
            let renewal = self.held().filter_map(|held| held.renew_at).min();
            let timer = renewal.map_or(deadlines.drain(), |at| at.min(deadlines.drain()));
            tokio::select! {
                (running, ended) = self.handlers.next() => self.finish(running, ended),
                (settling, result) = self.settlements.next() => self.settled(settling, result),
                (key, answer) = self.renewals.next() => self.renewed(key, answer),
                answer = super::maybe(stopping.as_mut()), if stopping.is_some() => {
                    stopping = None;
                    match answer {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::warn!(
                            error = %error_chain(&error),
                            "stop_receiving failed; buffered messages return when their locks expire"
                        ),
                        Err(_) => tracing::warn!(
                            broker_timeout = ?limit,
                            "stop_receiving did not answer in time; buffered messages return when their locks expire"
                        ),
                    }
                    self.release_unstarted();
                }
                () = self.ctx.cancelled(), if !tightened => {
                    tightened = true;
                    if self.ctx.is_shutting_down() {
                        deadlines = deadlines.min(self.ctx.deadlines().with_grace_up_to(grace));
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
        if stopping.take().is_some() {
            tracing::warn!("stop_receiving did not finish by the drain deadline");
            self.release_unstarted();
        }
        self.abort_running(deadlines).await;
        self.wait_settlements(deadlines.abandon_by()).await;
        self.report_unabandoned();
        self.renewals.abort_all();
        self.ctx.set_in_flight(0);
        self.ctx.set_overdue_handlers(0);
    }

    /// Abandons the messages that have not started (waiting for their session or a
    /// slot, or held for a local delayed retry), so another consumer gets them at once.
    fn release_unstarted(&mut self) {
        let unstarted: Vec<Held> = self
            .pending
            .drain(..)
            .chain(self.delayed.take_all())
            .filter(|held| !held.lost)
            .collect();
        for held in unstarted {
            self.settlements.start(held, Settlement::Abandon(None), None, None);
        }
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
            if running.held.lost {
                self.report_aborted(running.held.id(), blocked, false);
                // Back at the broker already: its session waits for it.
                if let Some(session) = running.held.session() {
                    let (key, id, now) = (running.held.key, running.held.id(), Instant::now());
                    self.await_return(session, key, id, now, Duration::ZERO);
                }
            } else {
                // Reported once the broker answered the abandon, or did not in time.
                self.aborting.insert(running.held.key, (running.held.id().to_owned(), blocked));
                let record = Some(Settled::Retried);
                self.settlements.start(running.held, Settlement::Abandon(None), record, None);
            }
        }
    }

    /// Reports a handler the drain deadline cut short, in a shutdown's report.
    pub(super) fn report_aborted(&self, message_id: &str, blocked: bool, abandoned: bool) {
        if self.ctx.is_shutting_down() {
            self.ctx.record_aborted(message_id, blocked, abandoned);
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
                let Some(session) = &unsettled.session else { continue };
                if let SessionStep::AwaitReturn { due, delay } = unsettled.session_step(now) {
                    self.await_return(session, unsettled.key, &unsettled.id, due, delay);
                }
            }
        }
    }

    /// The handlers cut short whose abandon did not answer by the deadline: reported as
    /// not abandoned.
    fn report_unabandoned(&mut self) {
        for (id, blocked) in std::mem::take(&mut self.aborting).into_values() {
            self.report_aborted(&id, blocked, false);
        }
    }
}

impl Drop for Run<'_> {
    /// A run dropped before its drain ended (the supervisor aborted the worker at its
    /// abort-at deadline) abandons every message it still holds, in a tracked task
    /// bounded by the hard deadline, rather than leave them to lock expiry; the
    /// settlements under way (abandons among them) go on in that task too. Its handler
    /// tasks are aborted.
    fn drop(&mut self) {
        let settlements =
            std::mem::replace(&mut self.settlements, Settlements::new(self.config.broker_timeout));
        let held: Vec<Arc<Delivery>> = self
            .handlers
            .take_all()
            .into_iter()
            .chain(self.pending.drain(..))
            .chain(self.delayed.take_all())
            .filter(|held| !held.lost)
            .map(|held| held.delivery)
            .collect();
        if held.is_empty() && settlements.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let hard = self.ctx.deadlines().hard();
        tracing::warn!(
            messages = held.len(),
            settling = settlements.len(),
            "worker stopped before its drain ended; abandoning what it held"
        );
        let abandons = futures::future::join_all(held.into_iter().map(|delivery| async move {
            let _ = delivery.settle_handle().abandon(None).await;
        }));
        runtime.spawn(self.ctx.track(async move {
            let _ = timeout_at(hard, futures::future::join(abandons, settlements.wait_all())).await;
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

    /// Ensures that a run dropped while settlements are under way (the error drain's
    /// abandons, when a shutdown aborts the worker) lets them finish rather than
    /// aborting them with the run.
    #[tokio::test(start_paused = true)]
    async fn a_run_dropped_lets_its_settlements_under_way_finish() {
        let ctx = WorkerContext::for_tests("dropped-settling");
        let handler: Arc<dyn Handler> = Arc::new(handler_fn(|_| async { Outcome::Complete }));
        let config = UpdaterConfig::default();
        let settle = TestSettle { latency: Duration::from_millis(300), ..TestSettle::default() };
        let mut run = Run::new(&ctx, &SilentSource, &handler, &config, Waiting::default());
        let held = held_with(1, "abandoning", None, settle.clone());
        run.settlements.start(held, Settlement::Abandon(None), None, None);
        tokio::task::yield_now().await;
        drop(run);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(settle.abandoned.load(Ordering::SeqCst), 1);
    }

    /// Ensures that a run with no handler at all is never busy, even with a concurrency
    /// of 0 (every one of no slots busy): it is not progress.
    #[tokio::test(start_paused = true)]
    async fn no_handler_is_never_busy_whatever_the_concurrency() {
        let ctx = WorkerContext::for_tests("idle");
        let handler: Arc<dyn Handler> = Arc::new(handler_fn(|_| async { Outcome::Complete }));
        let config = UpdaterConfig { concurrency: 0, ..UpdaterConfig::default() };
        let run = Run::new(&ctx, &SilentSource, &handler, &config, Waiting::default());
        assert!(!run.is_busy_and_healthy());
    }

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
