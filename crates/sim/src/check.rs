//! The invariants, checked on one seed's event log and the broker's final state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use steward_core::WorkerState;
use tokio::time::Instant;

use crate::scenario::{Family, FaultKind, Scenario};
use crate::world::{End, Event, Key, Op};

/// The invariant a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// 1. Every sent message is completed, dead-lettered with a reason, or still queued.
    NothingLost,
    /// 2. A message is handled again only for a recorded reason.
    DuplicatesExplained,
    /// 3. Within a session, handling starts in send order and never overlaps.
    Order,
    /// 4. A stuck worker ends `failed`; a healthy or backing-off one never does.
    Liveness,
    /// 5. Shutdown returns by its deadline and leaves no message to lock expiry.
    Deadlines,
    /// 6. A running handler keeps its lock while the transport answers.
    Renewal,
    /// The schedule spun without time passing.
    Livelock,
}

impl Invariant {
    /// Its short name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NothingLost => "nothing-lost",
            Self::DuplicatesExplained => "duplicates-explained",
            Self::Order => "order",
            Self::Liveness => "liveness",
            Self::Deadlines => "deadlines",
            Self::Renewal => "renewal",
            Self::Livelock => "livelock",
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// What happened, naming the messages.
    pub detail: String,
    /// The messages involved, to pick trace lines.
    pub messages: Vec<String>,
}

/// What the run observed besides the log.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    /// Ids still in the queue at the end.
    pub(crate) queued: BTreeSet<String>,
    /// Ids in the dead-letter queue at the end, with their reason.
    pub(crate) dead_lettered: BTreeMap<String, String>,
    /// When the run began.
    pub(crate) start: Instant,
    /// Ids locked at the broker when the shutdown returned.
    pub(crate) locked_after_shutdown: Vec<String>,
    /// When the shutdown began and returned, and its deadline.
    pub(crate) shutdown: Option<(Instant, Instant, Instant)>,
    /// When the shutdown's drain gives up on the abandons still unanswered
    /// (`Deadlines::abandon_by`, the grace widened to the Updater's `shutdown_grace`).
    pub(crate) abandon_by: Option<Instant>,
    /// The worker's state at the end of the liveness window, and whether it was live.
    pub(crate) final_state: WorkerState,
    /// Whether the snapshot was live at the end of the liveness window.
    pub(crate) final_live: bool,
    /// The stall timeout in effect.
    pub(crate) stall_timeout: Duration,
    /// The bound within which a stuck worker must be failed.
    pub(crate) failure_bound: Duration,
    /// The log overflowed.
    pub(crate) livelock: bool,
}

/// The slack allowed past the shutdown deadline.
pub const SHUTDOWN_EPSILON: Duration = Duration::from_millis(100);

struct Run {
    key: Key,
    start: usize,
    end: Option<(usize, End)>,
}

struct Call {
    key: Key,
    op: Op,
    begin: usize,
    answer: Option<(usize, Result<Option<Instant>, ()>)>,
    dropped: Option<usize>,
}

/// The log, indexed for the checks.
struct Index<'a> {
    events: &'a [(Instant, Event)],
    runs: Vec<Run>,
    calls: Vec<Call>,
    received: BTreeMap<Key, (usize, Option<Instant>)>,
    /// Indices of events that release every lock or restart the worker.
    resets: Vec<usize>,
}

impl<'a> Index<'a> {
    fn new(events: &'a [(Instant, Event)]) -> Self {
        let mut runs: Vec<Run> = Vec::new();
        let mut calls: Vec<Call> = Vec::new();
        let mut call_at: BTreeMap<u64, usize> = BTreeMap::new();
        let mut received = BTreeMap::new();
        let mut resets = Vec::new();
        let mut connects = 0;
        for (i, (_, event)) in events.iter().enumerate() {
            match event {
                Event::Start { key, .. } => {
                    runs.push(Run { key: key.clone(), start: i, end: None })
                }
                Event::Finish { key, end } => {
                    if let Some(run) =
                        runs.iter_mut().rev().find(|r| r.key == *key && r.end.is_none())
                    {
                        run.end = Some((i, *end));
                    }
                }
                Event::Received { keys, until } => {
                    for (key, until) in keys.iter().zip(until) {
                        received.insert(key.clone(), (i, *until));
                    }
                }
                Event::Call { call, key, op, .. } => {
                    call_at.insert(*call, calls.len());
                    calls.push(Call {
                        key: key.clone(),
                        op: *op,
                        begin: i,
                        answer: None,
                        dropped: None,
                    });
                }
                Event::Answer { call, error, until } => {
                    if let Some(&at) = call_at.get(call) {
                        let result = if error.is_some() { Err(()) } else { Ok(*until) };
                        calls[at].answer = Some((i, result));
                    }
                }
                Event::CallDropped { call } => {
                    if let Some(&at) = call_at.get(call) {
                        calls[at].dropped = Some(i);
                    }
                }
                Event::FaultOn { releases_locks: true, .. } => resets.push(i),
                Event::Connect { .. } => {
                    connects += 1;
                    if connects > 1 {
                        resets.push(i);
                    }
                }
                _ => {}
            }
        }
        Self { events, runs, calls, received, resets }
    }

    fn time(&self, i: usize) -> Instant {
        self.events[i].0
    }

    /// Whether a call on message `id` begun in `[from, to)` failed, was dropped, had
    /// not answered by `to`, or was an abandon.
    fn call_explains(&self, id: &str, from: usize, to: usize) -> bool {
        self.calls.iter().filter(|c| c.key.0 == id && c.begin >= from && c.begin < to).any(|c| {
            match c.answer {
                Some((_, Err(()))) | None => true,
                Some((at, Ok(_))) => at > to || c.op == Op::Abandon,
            }
        })
    }

    fn reset_between(&self, from: usize, to: usize) -> bool {
        self.resets.iter().any(|&i| i > from && i < to)
    }

    /// Where message `id` was settled for good (completed or dead-lettered), if it was.
    fn gone_at(&self, id: &str) -> Option<usize> {
        self.calls
            .iter()
            .filter(|c| c.key.0 == id && matches!(c.op, Op::Complete | Op::DeadLetter))
            .filter_map(|c| match c.answer {
                Some((at, Ok(_))) => Some(at),
                _ => None,
            })
            .min()
    }
}

/// Checks every invariant of one finished seed.
#[must_use]
pub(crate) fn check(
    scenario: &Scenario,
    events: &[(Instant, Event)],
    seen: &Observed,
) -> Vec<Violation> {
    let index = Index::new(events);
    let mut violations = Vec::new();
    if seen.livelock {
        violations.push(Violation {
            invariant: Invariant::Livelock,
            detail: format!("{} events without the scenario ending", events.len()),
            messages: Vec::new(),
        });
        return violations;
    }
    nothing_lost(scenario, &index, seen, &mut violations);
    liveness(scenario, &index, seen, &mut violations);
    deadlines(scenario, &index, seen, &mut violations);
    // A transport that reports lock expiries in the past breaks the transport contract
    // (docs/transports.md): it gives the Updater nothing to time renewals by, nor to
    // know when a message whose settlement failed is back at the broker, which a
    // session's order waits for. Such seeds check that nothing spins, is lost or
    // overruns a deadline, and that liveness holds, but not duplicates, order or
    // renewal (docs/simulation.md).
    if scenario.skew_within_contract() {
        order(scenario, &index, &mut violations);
        duplicates_explained(&index, &mut violations);
        renewal(scenario, &index, seen.start, &mut violations);
    }
    violations
}

fn sent(index: &Index<'_>) -> Vec<(usize, String, Option<String>)> {
    index
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, (_, e))| match e {
            Event::Sent { id, session } => Some((i, id.clone(), session.clone())),
            _ => None,
        })
        .collect()
}

fn nothing_lost(
    scenario: &Scenario,
    index: &Index<'_>,
    seen: &Observed,
    violations: &mut Vec<Violation>,
) {
    for (_, id, _) in sent(index) {
        let completed = index.calls.iter().find(|c| {
            c.key.0 == id && c.op == Op::Complete && matches!(c.answer, Some((_, Ok(_))))
        });
        if let Some(call) = completed {
            let handled = index.runs.iter().any(|r| {
                r.key == call.key && matches!(r.end, Some((at, End::Complete)) if at < call.begin)
            });
            if !handled {
                violations.push(Violation {
                    invariant: Invariant::NothingLost,
                    detail: format!("{id} was completed without its handler completing it"),
                    messages: vec![id.clone()],
                });
            }
            continue;
        }
        if let Some(reason) = seen.dead_lettered.get(&id) {
            let by_handler = index
                .runs
                .iter()
                .any(|r| r.key.0 == id && matches!(r.end, Some((_, End::DeadLetter))));
            let too_often = index
                .received
                .keys()
                .any(|(m, count)| *m == id && *count > scenario.settings.max_deliveries);
            if reason.is_empty() || !(by_handler || too_often) {
                violations.push(Violation {
                    invariant: Invariant::NothingLost,
                    detail: format!("{id} was dead-lettered without cause (reason {reason:?})"),
                    messages: vec![id.clone()],
                });
            }
            continue;
        }
        if !seen.queued.contains(&id) {
            violations.push(Violation {
                invariant: Invariant::NothingLost,
                detail: format!("{id} is neither completed, dead-lettered nor queued"),
                messages: vec![id.clone()],
            });
        }
    }
}

fn duplicates_explained(index: &Index<'_>, violations: &mut Vec<Violation>) {
    let mut by_message: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for run in &index.runs {
        by_message.entry(run.key.0.as_str()).or_default().push(run);
    }
    for (id, runs) in by_message {
        for pair in runs.windows(2) {
            let (before, again) = (pair[0], pair[1]);
            let from = index.received.get(&before.key).map_or(before.start, |(at, _)| *at);
            let asked = matches!(
                before.end,
                Some((at, End::Retry | End::Dependency | End::Panicked | End::Dropped))
                    if at < again.start
            );
            if asked
                || index.call_explains(id, from, again.start)
                || index.reset_between(from, again.start)
            {
                continue;
            }
            violations.push(Violation {
                invariant: Invariant::DuplicatesExplained,
                detail: format!(
                    "{id} handled again (delivery {} at {}) after delivery {} (started at {}) with no retry, panic, release, lock loss, failed settlement, disconnect or restart",
                    again.key.1,
                    secs(index, again.start),
                    before.key.1,
                    secs(index, before.start),
                ),
                messages: vec![id.to_owned()],
            });
        }
    }
}

/// How many messages the Updater may hold parked (waiting for their session, or for a
/// local delayed retry) beyond its intake before it stops receiving for good: twice its
/// parked bound of 4 × (`concurrency` + `batch_size`), as it goes on receiving one
/// message at a time past that bound while a session waits for a message due back.
fn parked_bound(scenario: &Scenario) -> usize {
    2 * 4 * (scenario.settings.concurrency + scenario.settings.batch_size)
}

/// Whether the Updater held at least `bound` messages that were not running just before
/// event `at`: deliveries received by the current attempt, not yet settled or
/// abandoned, minus the handlers running.
fn parked_full_before(index: &Index<'_>, at: usize, bound: usize) -> bool {
    let attempt = index.events[..at]
        .iter()
        .rposition(|(_, e)| matches!(e, Event::Connect { refused: false, .. }))
        .unwrap_or(0);
    let mut held: BTreeSet<&Key> = BTreeSet::new();
    for (_, event) in &index.events[attempt..at] {
        match event {
            Event::Received { keys, .. } => held.extend(keys.iter()),
            Event::Call { key, op, .. } if *op != Op::Renew => {
                held.remove(key);
            }
            _ => {}
        }
    }
    let running = index
        .runs
        .iter()
        .filter(|r| r.start < at && r.end.is_none_or(|(end, _)| end >= at))
        .count();
    held.len().saturating_sub(running) >= bound
}

fn order(scenario: &Scenario, index: &Index<'_>, violations: &mut Vec<Violation>) {
    let parked_bound = parked_bound(scenario);
    let sent = sent(index);
    let session_of: BTreeMap<&str, &str> =
        sent.iter().filter_map(|(_, id, s)| s.as_deref().map(|s| (id.as_str(), s))).collect();
    let position: BTreeMap<&str, usize> =
        sent.iter().enumerate().map(|(n, (_, id, _))| (id.as_str(), n)).collect();
    for run in &index.runs {
        let id = run.key.0.as_str();
        let Some(&session) = session_of.get(id) else { continue };
        // Earlier messages of the session must be gone for good.
        for (_, earlier, _) in sent.iter().filter(|(_, e, s)| {
            s.as_deref() == Some(session) && position[e.as_str()] < position[id]
        }) {
            let gone = index.gone_at(earlier).is_some_and(|at| at < run.start);
            // Documented limit (docs/workers.md): with twice the parked bound full,
            // intake stops until the stall watchdog restarts the worker.
            if !gone && !parked_full_before(index, run.start, parked_bound) {
                violations.push(Violation {
                    invariant: Invariant::Order,
                    detail: format!(
                        "session {session}: {id} (delivery {}) started at {} before {earlier}, sent earlier, was settled",
                        run.key.1,
                        secs(index, run.start)
                    ),
                    messages: vec![id.to_owned(), earlier.clone()],
                });
                break;
            }
        }
        // No other handler of the session may be running.
        let overlapping = index.runs.iter().find(|other| {
            other.start < run.start
                && session_of.get(other.key.0.as_str()) == Some(&session)
                && other.end.is_none_or(|(end, _)| end > run.start)
        });
        if let Some(other) = overlapping {
            violations.push(Violation {
                invariant: Invariant::Order,
                detail: format!(
                    "session {session}: {id} (delivery {}) started at {} while {} (delivery {}) was still running",
                    run.key.1,
                    secs(index, run.start),
                    other.key.0,
                    other.key.1
                ),
                messages: vec![id.to_owned(), other.key.0.clone()],
            });
        }
    }
}

fn states(index: &Index<'_>) -> Vec<(usize, WorkerState)> {
    index
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, (_, e))| match e {
            Event::State { state } => Some((i, *state)),
            _ => None,
        })
        .collect()
}

fn liveness(
    scenario: &Scenario,
    index: &Index<'_>,
    seen: &Observed,
    violations: &mut Vec<Violation>,
) {
    let mut fail = |detail: String| {
        violations.push(Violation { invariant: Invariant::Liveness, detail, messages: Vec::new() });
    };
    let states = states(index);
    match scenario.family {
        Family::HungReceive if scenario.hung_handlers() >= scenario.settings.concurrency => {
            // Documented limit: without `handler_timeout`, handlers that hang with their
            // locks renewed are busy, not stuck, and while they fill every slot no
            // receive is made that could hang.
        }
        Family::HungReceive | Family::FatalConnect => {
            if seen.final_state != WorkerState::Failed || seen.final_live {
                let cause = if scenario.family == Family::HungReceive {
                    "every receive hangs"
                } else {
                    "every start fails with a non-retryable error"
                };
                let restarts = index.resets.len();
                fail(format!(
                    "{cause}, yet after {:?} the worker is {} (live: {}) after {restarts} restarts",
                    seen.failure_bound, seen.final_state, seen.final_live
                ));
            }
        }
        Family::RefusedConnect => {
            if let Some((i, _)) = states.iter().find(|(_, s)| *s == WorkerState::Failed) {
                fail(format!(
                    "connections were refused (retryable), yet the worker failed at {}",
                    secs(index, *i)
                ));
            }
        }
        Family::Mixed => {
            if scenario.has_hangs() {
                return;
            }
            let bad = states
                .iter()
                .find(|(_, s)| matches!(s, WorkerState::Stalled | WorkerState::Failed));
            if let Some((i, state)) = bad {
                fail(format!(
                    "nothing hung, yet the worker was {state} at {} (stall timeout {:?})",
                    secs(index, *i),
                    seen.stall_timeout
                ));
            }
        }
    }
}

/// Whether a fault of `kinds` was on at some moment in `[from, to]`.
fn fault_during(scenario: &Scenario, kinds: &[FaultKind], from: Duration, to: Duration) -> bool {
    scenario.faults.iter().any(|f| {
        kinds.iter().any(|k| std::mem::discriminant(k) == std::mem::discriminant(&f.kind))
            && f.at <= to
            && f.until >= from
    })
}

fn deadlines(
    scenario: &Scenario,
    index: &Index<'_>,
    seen: &Observed,
    violations: &mut Vec<Violation>,
) {
    let Some((began, returned, deadline)) = seen.shutdown else { return };
    if returned > deadline + SHUTDOWN_EPSILON {
        violations.push(Violation {
            invariant: Invariant::Deadlines,
            detail: format!(
                "shutdown returned {:?} after its deadline",
                returned.saturating_duration_since(deadline)
            ),
            messages: Vec::new(),
        });
    }
    let from = began.saturating_duration_since(seen.start);
    let to = returned.saturating_duration_since(seen.start);
    // Abandons are dispositions: while those fail or hang, the transport does not answer
    // what the drain needs. Hung renewals do not excuse it: the drain must not wait on them.
    let silent = [FaultKind::HangDispositions, FaultKind::FailDispositions];
    // A broker call slower than a tenth of the whole shutdown does not answer within any
    // timeout such a shutdown can give it.
    let slow = scenario.faults.iter().any(|f| {
        matches!(f.kind, FaultKind::Latency(ms) if Duration::from_millis(ms) * 10 > scenario.shutdown_within)
            && f.at <= to
            && f.until >= from
    });
    if slow || fault_during(scenario, &silent, from, to) {
        return;
    }
    // Only what the attempt running at the shutdown received is its to release: an
    // attempt aborted earlier (a stall) may have left locks to expire on their own.
    let shutdown_at = index
        .events
        .iter()
        .position(|(_, e)| matches!(e, Event::ShutdownStart { .. }))
        .unwrap_or(index.events.len());
    let attempt_began = index.events[..shutdown_at]
        .iter()
        .rposition(|(_, e)| matches!(e, Event::Connect { refused: false, .. }))
        .unwrap_or(0);
    let left: Vec<String> = seen
        .locked_after_shutdown
        .iter()
        .filter(|id| {
            // The delivery that holds the lock: the last one received.
            let Some((key, _)) = index
                .received
                .iter()
                .filter(|((m, _), (at, _))| m == *id && *at > attempt_began)
                .max_by_key(|(_, (at, _))| *at)
            else {
                return false;
            };
            // A disposition that failed or never answered before the shutdown left the
            // message to its lock, as the Settle contract allows: not the drain's doing.
            // So does an abandon during the shutdown that the transport failed, or did
            // not answer before the drain gave up on it (at the shutdown's `abandon_by`,
            // up to ⅜ of the `shutdown_grace` before the deadline): the transport was
            // not answering.
            let given_up = seen.abandon_by.unwrap_or(deadline);
            let settled_badly = index.calls.iter().any(|c| {
                c.key == *key
                    && c.op != Op::Renew
                    && match c.answer {
                        Some((_, Ok(_))) => false,
                        Some((_, Err(()))) => true,
                        None if c.begin < shutdown_at => true,
                        None => c.dropped.is_none_or(|at| index.time(at) >= given_up),
                    }
            });
            !settled_badly
        })
        .cloned()
        .collect();
    if left.is_empty() {
        return;
    }
    violations.push(Violation {
        invariant: Invariant::Deadlines,
        detail: format!(
            "shutdown left {} locked, to return only when the lock expires",
            left.join(", ")
        ),
        messages: left,
    });
}

fn renewal(
    scenario: &Scenario,
    index: &Index<'_>,
    start: Instant,
    violations: &mut Vec<Violation>,
) {
    let end_of_log = index.events.len().saturating_sub(1);
    for run in &index.runs {
        let Some(&(received, Some(mut until))) = index.received.get(&run.key) else { continue };
        let run_end = run.end.map_or(end_of_log, |(at, _)| at);
        let mut renewals: Vec<(usize, Instant)> = index
            .calls
            .iter()
            .filter(|c| c.key == run.key && c.op == Op::Renew)
            .filter_map(|c| match c.answer {
                Some((at, Ok(Some(new)))) => Some((at, new)),
                _ => None,
            })
            .collect();
        renewals.sort_unstable();
        let mut lapsed = None;
        for (at, new) in renewals {
            if at > run_end {
                break;
            }
            if index.time(at) >= until {
                lapsed = Some(until);
                break;
            }
            until = new;
        }
        if lapsed.is_none() && index.time(run_end) > until {
            lapsed = Some(until);
        }
        let Some(lapsed) = lapsed else { continue };
        if lapsed <= index.time(run.start) {
            // Lapsed before the handler started: not a running handler's lock.
            continue;
        }
        let from = index.time(received).saturating_duration_since(start);
        let to = lapsed.saturating_duration_since(start);
        let excused = [FaultKind::FailRenewals, FaultKind::HangRenewals];
        let released = index.resets.iter().any(|&i| {
            i > received
                && index.time(i) <= lapsed
                && matches!(index.events[i].1, Event::FaultOn { .. })
        });
        if fault_during(scenario, &excused, from, to) || released {
            continue;
        }
        violations.push(Violation {
            invariant: Invariant::Renewal,
            detail: format!(
                "{} (delivery {}) lost its lock at {:.3}s while its handler ran ({}..{}), with renewals answering",
                run.key.0,
                run.key.1,
                to.as_secs_f64(),
                secs(index, run.start),
                run.end.map_or_else(|| "end".to_owned(), |(at, _)| secs(index, at)),
            ),
            messages: vec![run.key.0.clone()],
        });
    }
}

fn secs(index: &Index<'_>, i: usize) -> String {
    let start = index.events.first().map_or(index.time(i), |(at, _)| *at);
    format!("{:.3}s", index.time(i).saturating_duration_since(start).as_secs_f64())
}
