//! Whole scenarios drawn from one seed: the broker, the configs, the messages with their
//! handlers' scripts, the transport faults and the moment of the shutdown.

use std::fmt;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// What kind of run a seed is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Traffic with handler outcomes, transport faults and restarts, then a shutdown at
    /// a random moment.
    Mixed,
    /// Some traffic, then every receive hangs for good: the worker must end `failed`.
    HungReceive,
    /// Connecting fails with a retryable error for a long while: the worker backs off
    /// and stays live, then recovers and works through the traffic.
    RefusedConnect,
    /// Connecting fails with a non-retryable error on every start: the worker must end
    /// `failed`.
    FatalConnect,
}

impl Family {
    /// The family's name in traces and reports.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Mixed => "mixed",
            Self::HungReceive => "hung-receive",
            Self::RefusedConnect => "refused-connect",
            Self::FatalConnect => "fatal-connect",
        }
    }
}

/// What a handler does on one delivery of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Works for a while, then completes.
    Complete(Duration),
    /// Works, then asks for a retry with the configured backoff.
    Retry(Duration),
    /// Works, then asks for a retry after a given delay.
    RetryAfter(Duration, Duration),
    /// Works, then reports a failing dependency (which stays down for a while).
    Dependency(Duration),
    /// Works, then dead-letters the message.
    DeadLetter(Duration),
    /// Works, then panics.
    Panic(Duration),
    /// Works longer than the lock lasts, then completes.
    Slow(Duration),
    /// Never returns (until aborted).
    Hang,
}

impl Step {
    /// Whether the message's script ends with this step.
    fn is_final(&self) -> bool {
        matches!(self, Self::Complete(_) | Self::DeadLetter(_) | Self::Hang | Self::Slow(_))
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Complete(d) => write!(f, "complete after {}ms", d.as_millis()),
            Self::Retry(d) => write!(f, "retry after {}ms", d.as_millis()),
            Self::RetryAfter(d, delay) => {
                write!(f, "retry(delay {}ms) after {}ms", delay.as_millis(), d.as_millis())
            }
            Self::Dependency(d) => write!(f, "dependency-failed after {}ms", d.as_millis()),
            Self::DeadLetter(d) => write!(f, "dead-letter after {}ms", d.as_millis()),
            Self::Panic(d) => write!(f, "panic after {}ms", d.as_millis()),
            Self::Slow(d) => write!(f, "slow complete after {}ms", d.as_millis()),
            Self::Hang => f.write_str("hang"),
        }
    }
}

/// One message of a scenario.
#[derive(Debug, Clone)]
pub struct SimMessage {
    /// Its id, `m<n>` in send order.
    pub id: String,
    /// Its session, if any.
    pub session: Option<String>,
    /// When it is sent, from the start.
    pub send_at: Duration,
    /// What the handler does on its first, second, … handling; after the script ends,
    /// it completes at once.
    pub script: Vec<Step>,
}

/// A transport fault, at a moment or over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The next `n` receives fail with a retryable error.
    FailReceives(u32),
    /// Receives hang (those begun in the window hang until cancelled).
    HangReceives,
    /// Complete, abandon and dead-letter fail.
    FailDispositions,
    /// Complete, abandon and dead-letter hang until the window ends.
    HangDispositions,
    /// Lock renewals fail.
    FailRenewals,
    /// Lock renewals hang until the window ends.
    HangRenewals,
    /// Every broker call first waits this many milliseconds.
    Latency(u64),
    /// The connection drops: locks are released, the source breaks.
    Disconnect,
    /// Every lock expires at once.
    ExpireLocks,
    /// The next `n` connects are refused (retryable).
    RefuseConnects(u32),
}

impl FaultKind {
    /// Whether the fault is a window (switched on at `at`, off at `until`).
    #[must_use]
    pub const fn is_window(self) -> bool {
        matches!(
            self,
            Self::HangReceives
                | Self::FailDispositions
                | Self::HangDispositions
                | Self::FailRenewals
                | Self::HangRenewals
                | Self::Latency(_)
        )
    }
}

/// A fault of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What.
    pub kind: FaultKind,
    /// When it starts, from the start.
    pub at: Duration,
    /// When a window ends (equal to `at` for a moment's fault).
    pub until: Duration,
}

/// The Updater's and Supervisor's settings of a scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `UpdaterConfig::batch_size`.
    pub batch_size: usize,
    /// `UpdaterConfig::concurrency`.
    pub concurrency: usize,
    /// `UpdaterConfig::wait`.
    pub wait: Duration,
    /// `UpdaterConfig::renew_margin`.
    pub renew_margin: Duration,
    /// `UpdaterConfig::max_deliveries`.
    pub max_deliveries: u32,
    /// Seeds of the retry, probe and restart backoff jitter.
    pub jitter_seeds: [u64; 3],
}

/// A whole scenario, drawn from one seed.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The seed it was drawn from.
    pub seed: u64,
    /// Its family.
    pub family: Family,
    /// Whether the broker keeps sessions (else the Updater orders sessions itself).
    pub broker_sessions: bool,
    /// The queue's lock duration.
    pub lock: Duration,
    /// The configs.
    pub settings: Settings,
    /// How long a dependency failure keeps the dependency down.
    pub dependency_outage: Duration,
    /// The messages, in send order.
    pub messages: Vec<SimMessage>,
    /// The faults, in time order.
    pub faults: Vec<Fault>,
    /// When the shutdown begins.
    pub shutdown_at: Duration,
    /// How long the shutdown may take.
    pub shutdown_within: Duration,
    /// Hung-receive family: when receives start to hang for good. Connect families:
    /// how long connects fail.
    pub outage_at: Duration,
    /// The source claims no delayed abandon, so the Updater holds delayed retries
    /// itself (as on a transport without delays).
    pub local_delays: bool,
    /// The source reports every lock expiry this much too early; the broker's real
    /// locks are unchanged. Within the transport contract ([`Self::skew_within_contract`])
    /// it is a transport's own margin and a round trip, at most `wait`, or just short of
    /// the contract's limit (2 × `wait` + `LOCK_REPORT_SLACK`); beyond it, more
    /// than a whole lock (a broker clock far ahead of ours), so every reported expiry
    /// lies in the past.
    pub lock_clock_skew: Option<Duration>,
}

fn millis(rng: &mut SmallRng, from: u64, to: u64) -> Duration {
    Duration::from_millis(rng.random_range(from..=to))
}

/// How early the transport contract lets a transport report a lock's expiry, exclusive:
/// 2 × `wait` + `LOCK_REPORT_SLACK`.
fn contract_limit(wait: Duration) -> Duration {
    wait.saturating_mul(2).saturating_add(steward_core::LOCK_REPORT_SLACK)
}

fn pick<T: Copy>(rng: &mut SmallRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

impl Scenario {
    /// Draws the scenario of `seed`. The same seed always gives the same scenario.
    #[must_use]
    pub fn generate(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let family = match rng.random_range(0..20) {
            0..=15 => Family::Mixed,
            16 | 17 => Family::HungReceive,
            18 => Family::RefusedConnect,
            _ => Family::FatalConnect,
        };
        let broker_sessions = rng.random_bool(0.5);
        let lock = Duration::from_secs(pick(&mut rng, &[5, 10, 20, 30]));
        let settings = Settings {
            batch_size: rng.random_range(1..=8),
            concurrency: rng.random_range(1..=6),
            wait: Duration::from_secs(pick(&mut rng, &[1, 2, 5])),
            renew_margin: Duration::from_secs(pick(&mut rng, &[2, 5, 10])),
            max_deliveries: rng.random_range(3..=10),
            jitter_seeds: [rng.random(), rng.random(), rng.random()],
        };
        let dependency_outage = millis(&mut rng, 500, 20_000);
        let hangs_allowed = rng.random_bool(0.3);
        let sessions = rng.random_range(1..=5);
        let count = rng.random_range(5..=40);
        let mut send_times: Vec<u64> = (0..count).map(|_| rng.random_range(0..=60_000)).collect();
        send_times.sort_unstable();
        let messages = send_times
            .into_iter()
            .enumerate()
            .map(|(i, at)| SimMessage {
                id: format!("m{i}"),
                session: rng
                    .random_bool(0.7)
                    .then(|| format!("s{}", rng.random_range(0..sessions))),
                send_at: Duration::from_millis(at),
                script: script(&mut rng, lock, hangs_allowed),
            })
            .collect();
        let faults = if family == Family::Mixed && rng.random_bool(0.75) {
            faults(&mut rng)
        } else {
            Vec::new()
        };
        let shutdown_at = millis(&mut rng, 5_000, 240_000);
        let shutdown_within = Duration::from_secs(pick(&mut rng, &[1, 2, 5, 10, 30]));
        let outage_at = match family {
            Family::HungReceive => millis(&mut rng, 0, 60_000),
            Family::RefusedConnect => millis(&mut rng, 600_000, 7_200_000),
            Family::Mixed | Family::FatalConnect => Duration::ZERO,
        };
        // Drawn last, so adding it left every earlier draw of a seed as it was.
        let local_delays = rng.random_bool(0.25);
        // Beyond the contract: past both the lock and the contract's limit.
        let beyond = lock.max(contract_limit(settings.wait));
        let mut lock_clock_skew =
            rng.random_bool(0.05).then(|| beyond + millis(&mut rng, 1_000, 10_000));
        // Drawn after every earlier draw, for the same reason: in one seed in ten of the
        // rest, expiries reported early within the contract; in a third of those, just
        // short of its limit (2 × `wait` + `LOCK_REPORT_SLACK`), where the lock allows
        // it (the reported expiry still ahead at receipt).
        let wait_ms = u64::try_from(settings.wait.as_millis()).unwrap_or(u64::MAX);
        if lock_clock_skew.is_none() && rng.random_bool(0.1) {
            let near_limit = contract_limit(settings.wait)
                .checked_sub(millis(&mut rng, 1, 500))
                .filter(|skew| *skew < lock);
            lock_clock_skew = match near_limit {
                Some(skew) if rng.random_bool(0.34) => Some(skew),
                _ => Some(millis(&mut rng, 100, wait_ms.max(100))),
            };
        }
        Self {
            seed,
            family,
            broker_sessions,
            lock,
            settings,
            dependency_outage,
            messages,
            faults,
            shutdown_at,
            shutdown_within,
            outage_at,
            local_delays,
            lock_clock_skew,
        }
    }

    /// One line naming the scenario's family and settings.
    #[must_use]
    pub fn describe(&self) -> String {
        let s = &self.settings;
        format!(
            "seed {} ({}; broker sessions: {}; local delays: {}; lock {:?}{}; wait {:?}; batch {}; concurrency {}; {} messages; {} faults)",
            self.seed,
            self.family.as_str(),
            self.broker_sessions,
            self.local_delays,
            self.lock,
            self.lock_clock_skew.map_or_else(String::new, |d| format!(" reported {d:?} early")),
            s.wait,
            s.batch_size,
            s.concurrency,
            self.messages.len(),
            self.faults.len()
        )
    }

    /// Whether the reported lock expiries keep the transport contract: not later than
    /// the broker's, and less than 2 × `wait` + `LOCK_REPORT_SLACK` earlier
    /// (docs/transports.md), which the Updater's waits for a message whose settlement
    /// failed rely on.
    #[must_use]
    pub fn skew_within_contract(&self) -> bool {
        self.lock_clock_skew.is_none_or(|skew| skew < contract_limit(self.settings.wait))
    }

    /// How many messages hang in their handler at some delivery.
    #[must_use]
    pub fn hung_handlers(&self) -> usize {
        self.messages.iter().filter(|m| m.script.contains(&Step::Hang)).count()
    }

    /// Whether anything in the scenario may legitimately stop the worker's progress for
    /// longer than its stall timeout: a hang of the transport or of a handler.
    #[must_use]
    pub fn has_hangs(&self) -> bool {
        self.faults.iter().any(|f| {
            matches!(
                f.kind,
                FaultKind::HangReceives | FaultKind::HangDispositions | FaultKind::HangRenewals
            )
        }) || self.messages.iter().any(|m| m.script.contains(&Step::Hang))
    }
}

fn script(rng: &mut SmallRng, lock: Duration, hangs_allowed: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    for _ in 0..4 {
        let work = millis(rng, 0, 3_000);
        let step = match rng.random_range(0..100) {
            0..=39 => Step::Complete(work),
            40..=49 => Step::Retry(work),
            50..=59 => Step::RetryAfter(work, millis(rng, 500, 30_000)),
            60..=64 => Step::Dependency(work),
            65..=69 => Step::DeadLetter(work),
            70..=79 => Step::Panic(work),
            80..=91 => {
                let slow = lock.mul_f64(rng.random_range(1.2..2.5)).min(Duration::from_secs(45));
                Step::Slow(Duration::from_millis(slow.as_millis() as u64))
            }
            _ if hangs_allowed => Step::Hang,
            _ => Step::Complete(work),
        };
        let last = step.is_final();
        steps.push(step);
        if last {
            break;
        }
    }
    steps
}

fn faults(rng: &mut SmallRng) -> Vec<Fault> {
    let mut faults = Vec::new();
    let mut window = |rng: &mut SmallRng, kind: FaultKind, longest: u64| {
        let at = millis(rng, 0, 200_000);
        let until = at + millis(rng, 1_000, longest);
        faults.push(Fault { kind, at, until });
    };
    let windows = [
        (FaultKind::HangReceives, 120_000),
        (FaultKind::FailDispositions, 30_000),
        (FaultKind::HangDispositions, 60_000),
        (FaultKind::FailRenewals, 30_000),
        (FaultKind::HangRenewals, 60_000),
    ];
    for (kind, longest) in windows {
        if rng.random_bool(0.2) {
            window(rng, kind, longest);
        }
    }
    if rng.random_bool(0.3) {
        let latency = FaultKind::Latency(rng.random_range(10..=200));
        window(rng, latency, 60_000);
    }
    for _ in 0..rng.random_range(0..=3) {
        let kind = match rng.random_range(0..4) {
            0 => FaultKind::FailReceives(rng.random_range(1..=3)),
            1 => FaultKind::Disconnect,
            2 => FaultKind::ExpireLocks,
            _ => FaultKind::RefuseConnects(rng.random_range(1..=3)),
        };
        let at = millis(rng, 0, 200_000);
        faults.push(Fault { kind, at, until: at });
    }
    faults.sort_by_key(|f| f.at);
    faults
}
