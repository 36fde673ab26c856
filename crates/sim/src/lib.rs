//! Deterministic simulation of steward's Updater and Supervisor.
//!
//! Each seed draws a whole [`Scenario`] (broker with or without sessions, configs,
//! messages with scripted handler outcomes, transport faults, restarts and a shutdown at
//! a random moment), runs it on the in-memory broker in a single-threaded tokio runtime
//! under paused time, and checks the invariants of [`check`] on the event log and the
//! broker's final state. The same seed replays the same run: all randomness comes from
//! the seed, and when built with `--cfg tokio_unstable` (as `cargo xtask sim` does)
//! tokio's own RNG, which orders `select!` branches, is seeded from it too.

mod check;
pub mod scenario;
mod world;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use steward_core::{
    Backoff, Deadlines, Jitter, Supervisor, SupervisorConfig, Updater, UpdaterConfig, WorkerState,
};
use steward_inmem::{InMemoryBroker, QueueOptions};
use tokio::time::{Instant, sleep, sleep_until};

pub use check::{Invariant, SHUTDOWN_EPSILON, Violation};
pub use scenario::{Family, Scenario};
pub use world::Sabotage;

use check::Observed;
use scenario::{Fault, FaultKind, Step};
use world::{Event, Log, QUEUE, SimConnect, SimHandler};

/// What one seed gave.
#[derive(Debug, Clone)]
pub struct SeedReport {
    /// The scenario.
    pub scenario: Scenario,
    /// The trace: one line per event.
    pub trace: Vec<String>,
    /// The broken invariants; empty when the seed passed.
    pub violations: Vec<Violation>,
}

impl SeedReport {
    /// Whether every invariant held.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The violations and the trace lines about the messages they involve (at most
    /// `lines` of them, the last ones), for a failure report.
    #[must_use]
    pub fn summary(&self, lines: usize) -> String {
        let mut out = String::new();
        let s = &self.scenario;
        let _ = writeln!(out, "{} broke:", s.describe());
        let mut involved: Vec<&str> = Vec::new();
        for violation in &self.violations {
            let _ = writeln!(out, "  {}: {}", violation.invariant, violation.detail);
            involved.extend(violation.messages.iter().map(String::as_str));
        }
        let relevant: Vec<&String> = self
            .trace
            .iter()
            .filter(|line| {
                !line.contains(" m")
                    || involved.iter().any(|id| {
                        line.split(|c: char| !c.is_alphanumeric()).any(|word| word == *id)
                    })
            })
            .collect();
        let skip = relevant.len().saturating_sub(lines);
        let _ = writeln!(out, "  trace ({} of {} lines):", relevant.len() - skip, self.trace.len());
        for line in &relevant[skip..] {
            let _ = writeln!(out, "    {line}");
        }
        let _ = writeln!(out, "  replay: STEWARD_SIM_SEED={} cargo xtask sim", s.seed);
        out
    }
}

/// Keeps the scripted handler panics out of stderr; other panics still print.
pub fn quiet_scripted_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&world::PANIC_TEXT) {
                previous(info);
            }
        }));
    });
}

/// Runs the scenario of `seed` and checks it.
///
/// # Panics
///
/// If the tokio runtime cannot be built.
#[must_use]
pub fn run_seed(seed: u64) -> SeedReport {
    run_scenario(Scenario::generate(seed), None)
}

/// Runs `scenario`, optionally with a deliberately broken transport, and checks it.
///
/// # Panics
///
/// If the tokio runtime cannot be built.
#[must_use]
pub fn run_scenario(scenario: Scenario, sabotage: Option<Sabotage>) -> SeedReport {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&scenario.seed.to_le_bytes()));
    let runtime = builder.build().expect("a current-thread runtime builds");
    let (events, seen) = runtime.block_on(simulate(&scenario, sabotage));
    drop(runtime);
    let violations = check::check(&scenario, &events, &seen);
    let trace = render(seen.start, &events);
    SeedReport { scenario, trace, violations }
}

fn render(start: Instant, events: &[(Instant, Event)]) -> Vec<String> {
    let mut calls: BTreeMap<u64, String> = BTreeMap::new();
    events
        .iter()
        .map(|(at, event)| {
            if let Event::Call { call, key, .. } = event {
                calls.insert(*call, format!("{}#{}", key.0, key.1));
            }
            let of = |call: &u64| calls.get(call).cloned().unwrap_or_default();
            let t = at.saturating_duration_since(start).as_secs_f64();
            let text = match event {
                Event::Sent { id, session } => match session {
                    Some(s) => format!("send {id} session {s}"),
                    None => format!("send {id}"),
                },
                Event::Connect { attempt, refused } => {
                    format!("connect #{attempt}{}", if *refused { " refused" } else { "" })
                }
                Event::Received { keys, until } => {
                    let items: Vec<String> = keys
                        .iter()
                        .zip(until)
                        .map(|((id, n), u)| match u {
                            Some(u) => format!(
                                "{id}#{n} (lock to {:.3}s)",
                                u.saturating_duration_since(start).as_secs_f64()
                            ),
                            None => format!("{id}#{n}"),
                        })
                        .collect();
                    format!("receive {}", items.join(" "))
                }
                Event::ReceiveFailed { error } => format!("receive failed: {error}"),
                Event::Start { key, step } => format!("start {}#{} {step}", key.0, key.1),
                Event::Finish { key, end } => format!("end {}#{} {end:?}", key.0, key.1),
                Event::Call { call, key, op, detail } => {
                    format!("call {call} {op:?} {}#{} {detail}", key.0, key.1)
                }
                Event::Answer { call, error, until } => match (error, until) {
                    (Some(kind), _) => format!("answer {call} {} error {kind:?}", of(call)),
                    (None, Some(u)) => format!(
                        "answer {call} {} ok, lock to {:.3}s",
                        of(call),
                        u.saturating_duration_since(start).as_secs_f64()
                    ),
                    (None, None) => format!("answer {call} {} ok", of(call)),
                },
                Event::CallDropped { call } => {
                    format!("call {call} {} dropped unanswered", of(call))
                }
                Event::FaultOn { fault, .. } => format!("fault {fault}"),
                Event::FaultOff { fault } => format!("fault {fault} off"),
                Event::State { state } => format!("worker {state}"),
                Event::ShutdownStart { deadline } => format!(
                    "shutdown by {:.3}s",
                    deadline.saturating_duration_since(start).as_secs_f64()
                ),
                Event::ShutdownEnd { report } => format!("shutdown returned: {report}"),
                Event::Probe { ok } => format!("probe {}", if *ok { "ok" } else { "failed" }),
            };
            format!("{t:>10.3} {text}")
        })
        .collect()
}

/// The restart backoff's longest delay, the stall grace and the restart limit of the
/// supervisor the simulation uses (the defaults).
fn supervisor_config(seed: u64) -> SupervisorConfig {
    let backoff = Backoff::default();
    SupervisorConfig::default().with_backoff(
        Backoff::new(backoff.initial(), backoff.max()).with_jitter(Jitter::seeded(0.2, seed)),
    )
}

/// How long a worker that can never make progress may take to end `failed`, from the
/// moment it can no longer progress, by the Supervisor's documented bounds
/// (docs/workers.md): [`SupervisorConfig::fatal_bound`] for a start that fails at once
/// with a non-retryable error, and for a hung receive, the time the run under way may
/// still progress (`slack`), its stall ([`UpdaterConfig::effective_stall_timeout`] and
/// the stall grace), one backoff, then [`SupervisorConfig::stuck_bound`].
#[must_use]
pub fn failure_bound(family: Family, stall_timeout: Duration, slack: Duration) -> Duration {
    let config = SupervisorConfig::default();
    match family {
        Family::FatalConnect => config.fatal_bound(),
        _ => slack
            .saturating_add(stall_timeout)
            .saturating_add(config.stall_grace)
            .saturating_add(config.backoff.max())
            .saturating_add(config.stuck_bound(stall_timeout)),
    }
}

/// How long a run under way when every receive begins to hang may still make real
/// progress: the receive under way ends (`wait`); renewals are progress until a receive
/// has gone unanswered for `wait + broker_timeout`; handlers finish their longest work,
/// retries held locally their longest delay, a failing dependency its outage, and each
/// settlement answers within `broker_timeout`.
fn progress_slack(scenario: &Scenario, config: &UpdaterConfig) -> Duration {
    let longest = scenario
        .messages
        .iter()
        .flat_map(|m| m.script.iter())
        .map(|step| match *step {
            Step::Complete(d)
            | Step::Retry(d)
            | Step::Dependency(d)
            | Step::DeadLetter(d)
            | Step::Panic(d)
            | Step::Slow(d) => d,
            Step::RetryAfter(d, after) => d + after,
            Step::Hang => Duration::ZERO,
        })
        .max()
        .unwrap_or_default();
    let intake = config.wait * 2 + config.broker_timeout;
    intake.max(longest + scenario.dependency_outage + config.broker_timeout) + config.wait
}

fn updater_config(scenario: &Scenario) -> UpdaterConfig {
    let s = &scenario.settings;
    UpdaterConfig::default()
        .with_batch_size(s.batch_size)
        .with_concurrency(s.concurrency)
        .with_wait(s.wait)
        .with_renew_margin(s.renew_margin)
        .with_max_deliveries(s.max_deliveries)
        .with_retry_backoff(
            Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
                .with_jitter(Jitter::seeded(0.2, s.jitter_seeds[0])),
        )
        .with_probe_backoff(
            Backoff::new(Duration::from_secs(1), Duration::from_secs(8))
                .with_jitter(Jitter::seeded(0.2, s.jitter_seeds[1])),
        )
}

async fn simulate(
    scenario: &Scenario,
    sabotage: Option<Sabotage>,
) -> (Vec<(Instant, Event)>, Observed) {
    let log = Log::new();
    let start = log.start();
    let broker =
        InMemoryBroker::builder().with_strict(true).with_sessions(scenario.broker_sessions).build();
    broker.declare_queue(QUEUE, QueueOptions::default().with_lock_duration(scenario.lock));
    let refuse = Arc::new(AtomicU32::new(0));
    let connect = SimConnect {
        broker: broker.clone(),
        log: log.clone(),
        refuse: refuse.clone(),
        refuse_until: (scenario.family == Family::RefusedConnect)
            .then(|| start + scenario.outage_at),
        fatal: scenario.family == Family::FatalConnect,
        attempts: AtomicU32::new(0),
        sabotage,
        local_delays: scenario.local_delays,
        lock_clock_skew: scenario.lock_clock_skew,
    };
    let handler = SimHandler {
        scripts: scenario.messages.iter().map(|m| (m.id.clone(), m.script.clone())).collect(),
        handled: Mutex::new(BTreeMap::new()),
        log: log.clone(),
        dependency_down_until: Mutex::new(None),
        dependency_outage: scenario.dependency_outage,
    };
    let config = updater_config(scenario);
    let stall_timeout = config.effective_stall_timeout();
    let shutdown_grace = config.shutdown_grace;
    let slack = progress_slack(scenario, &config);
    let supervisor = Supervisor::new(supervisor_config(scenario.settings.jitter_seeds[2]));
    let health = supervisor.health();
    supervisor.spawn(Updater::new("sim", connect, handler).with_config(config));

    let monitor = tokio::spawn({
        let log = log.clone();
        let mut changes = health.subscribe();
        async move {
            let mut last = None;
            loop {
                let state = changes.borrow_and_update().worker("sim").map(|w| w.state);
                if let Some(state) = state.filter(|s| Some(*s) != last) {
                    log.push(Event::State { state });
                    last = Some(state);
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        }
    });
    let producer = tokio::spawn(produce(scenario.clone(), broker.clone(), log.clone(), start));
    let faults = tokio::spawn(inject(scenario.clone(), broker.clone(), log.clone(), refuse, start));

    // When the run ends: the shutdown, or, for a stuck worker, the failure bound.
    let bound = failure_bound(scenario.family, stall_timeout, slack);
    let until = match scenario.family {
        Family::Mixed => start + scenario.shutdown_at,
        Family::HungReceive => start + scenario.outage_at + bound,
        Family::FatalConnect => start + bound,
        Family::RefusedConnect => start + scenario.outage_at + scenario.shutdown_at,
    };
    let mut livelock = tokio::select! {
        biased;
        () = log.overflowed() => true,
        () = sleep_until(until) => false,
    };
    let snapshot = health.snapshot();
    let worker = snapshot.worker("sim");
    let final_state = worker.map_or(WorkerState::Stopped, |w| w.state);
    let final_live = snapshot.is_live();
    producer.abort();
    faults.abort();
    let mut shutdown = None;
    let mut abandon_by = None;
    let mut locked_after_shutdown = Vec::new();
    if !livelock {
        let began = Instant::now();
        let deadline = began + scenario.shutdown_within;
        // When the drain gives up on the abandons still unanswered: the shutdown's
        // `abandon_by`, its grace widened to the Updater's `shutdown_grace`.
        abandon_by = Some(Deadlines::until(deadline).with_grace_up_to(shutdown_grace).abandon_by());
        log.push(Event::ShutdownStart { deadline });
        let report = tokio::select! {
            biased;
            () = log.overflowed() => None,
            report = supervisor.shutdown(deadline) => Some(report),
        };
        let returned = Instant::now();
        livelock = report.is_none();
        if let Some(report) = report {
            log.push(Event::ShutdownEnd { report: format!("{report:?}") });
            shutdown = Some((began, returned, deadline));
            locked_after_shutdown = broker.locked_message_ids(QUEUE);
        }
    }
    // Let aborted tasks log their end before the log is read (time passes only once
    // every task is idle, which a livelock never is).
    if !livelock {
        sleep(Duration::from_millis(1)).await;
    }
    monitor.abort();
    let events = log.events();
    let seen = Observed {
        queued: broker.peek(QUEUE).into_iter().map(|m| m.id).collect(),
        dead_lettered: broker
            .dead_letters(QUEUE)
            .into_iter()
            .map(|d| (d.message.id, d.reason))
            .collect(),
        start,
        locked_after_shutdown,
        shutdown,
        abandon_by,
        final_state,
        final_live,
        stall_timeout,
        failure_bound: bound,
        livelock: events.len() >= world::MAX_EVENTS,
    };
    (events, seen)
}

async fn produce(scenario: Scenario, broker: InMemoryBroker, log: Log, start: Instant) {
    use steward_core::{MessageSink, OutgoingMessage};
    for message in &scenario.messages {
        sleep_until(start + message.send_at).await;
        let mut outgoing = OutgoingMessage::new(message.id.clone()).with_message_id(&message.id);
        outgoing.session_id.clone_from(&message.session);
        // The faults never touch sends, so a send fails only if the broker is broken.
        if broker.send(QUEUE, outgoing).await.is_ok() {
            log.push(Event::Sent { id: message.id.clone(), session: message.session.clone() });
        }
    }
}

async fn inject(
    scenario: Scenario,
    broker: InMemoryBroker,
    log: Log,
    refuse: Arc<AtomicU32>,
    start: Instant,
) {
    let faults = broker.faults(QUEUE);
    if scenario.family == Family::HungReceive {
        sleep_until(start + scenario.outage_at).await;
        faults.hang_receives(true);
        log.push(Event::FaultOn { fault: "receives hang for good".into(), releases_locks: false });
        return;
    }
    // Switch-ons and switch-offs, in time order (switch-offs first at the same moment).
    let mut changes: Vec<(Duration, bool, Fault)> = Vec::new();
    for fault in &scenario.faults {
        changes.push((fault.at, true, *fault));
        if fault.kind.is_window() {
            changes.push((fault.until, false, *fault));
        }
    }
    changes.sort_by_key(|(at, on, _)| (*at, *on));
    for (at, on, fault) in changes {
        sleep_until(start + at).await;
        let name = format!("{:?}", fault.kind);
        let mut releases_locks = false;
        match (fault.kind, on) {
            (FaultKind::FailReceives(n), _) => {
                faults.fail_receives(n, steward_core::ErrorKind::Connection);
            }
            (FaultKind::HangReceives, on) => {
                faults.hang_receives(on);
            }
            (FaultKind::FailDispositions, on) => {
                faults.fail_dispositions(
                    if on { u32::MAX } else { 0 },
                    steward_core::ErrorKind::Timeout,
                );
            }
            (FaultKind::HangDispositions, on) => {
                faults.hang_dispositions(on);
            }
            (FaultKind::FailRenewals, on) => {
                faults
                    .fail_renewals(if on { u32::MAX } else { 0 }, steward_core::ErrorKind::Timeout);
            }
            (FaultKind::HangRenewals, on) => {
                faults.hang_renewals(on);
            }
            (FaultKind::Latency(ms), on) => {
                faults.set_latency(if on { Duration::from_millis(ms) } else { Duration::ZERO });
            }
            (FaultKind::Disconnect, _) => {
                faults.disconnect();
                releases_locks = true;
            }
            (FaultKind::ExpireLocks, _) => {
                faults.expire_locks();
                releases_locks = true;
            }
            (FaultKind::RefuseConnects(n), _) => {
                refuse.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if on {
            log.push(Event::FaultOn { fault: name, releases_locks });
        } else {
            log.push(Event::FaultOff { fault: name });
        }
    }
}
