//! The conformance suite every transport must pass (feature `testkit`).
//!
//! Not semver-stable. Each case is a public `async fn` taking a [`TransportFactory`], and
//! [`CASES`] is the table of them: name, what the case needs beyond the basic contract,
//! and the function. A transport crate runs the table from a test target of its own
//! with `harness = false` ([`Suite::run`]): one test per case, named
//! `conformance::<case>`, so each runs, times out and is retried on its own, plus
//! `conformance::skips_are_justified`. The cases create their own uniquely named queues
//! through the factory and leave them with whatever is left in them; run them against a
//! broker or namespace meant for tests.
//!
//! A case that needs a capability the transport lacks prints
//! `skipped <case>: <transport> lacks <capability>` and returns. A transport lists the
//! cases it cannot run with [`Suite::with_skip`], each with a reason; those tests are
//! ignored (they still run, and pass by skipping, under `--include-ignored`), and
//! `conformance::skips_are_justified` asserts that each skipped case needs something the
//! transport really lacks, so a claimed capability must pass its case.
//!
//! # Examples
//!
//! In `crates/<transport>/Cargo.toml`:
//!
//! ```toml
//! [[test]]
//! name = "conformance"
//! harness = false
//! ```
//!
//! and in `crates/<transport>/tests/conformance.rs`:
//!
//! ```ignore
//! fn main() -> std::process::ExitCode {
//!     Suite::new(|| async { Some(MyFactory::connect().await) })
//!         .with_runtime(|| tokio::runtime::Builder::new_multi_thread().enable_all().build())
//!         .with_skip("sessions_deliver_in_order_one_lock_per_session", "no broker-side sessions")
//!         .run()
//! }
//! ```
//!
//! The default runtime is a current-thread runtime under tokio's paused clock, which
//! suits an in-process transport on tokio time.

mod cases;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libtest_mimic::{Arguments, Failed, Trial};
use tokio::runtime::Runtime;

use crate::{
    Capabilities, Capability, DeadLetter, DeadLetterQueues, MessageSink, MessageSource,
    TransportError,
};

pub use cases::*;

/// Builds the queues, sources and sinks of one transport for the conformance cases.
#[async_trait]
pub trait TransportFactory: Send + Sync + 'static {
    /// The transport's name, for skip messages.
    fn name(&self) -> &str;

    /// What the transport's sources support.
    fn capabilities(&self) -> Capabilities;

    /// The lock duration of the queues [`create_queue`](Self::create_queue) makes, for
    /// transports with timed locks. Keep it short (a few seconds) on real brokers: lock
    /// expiry cases wait for it.
    fn lock_duration(&self) -> Option<Duration>;

    /// Creates a new, empty queue whose name starts with `prefix` and is unique to this
    /// call, and returns the name.
    async fn create_queue(&self, prefix: &str) -> Result<String, TransportError>;

    /// A new consumer of `queue`, with its own connection where the transport has them.
    async fn source(&self, queue: &str) -> Result<Box<dyn MessageSource>, TransportError>;

    /// A sink that can send to every queue made by [`create_queue`](Self::create_queue).
    async fn sink(&self) -> Result<Arc<dyn MessageSink>, TransportError>;

    /// The messages dead-lettered from `queue`, oldest first.
    async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, TransportError>;

    /// A queue name that does not exist and that sends are refused for, or `None` when
    /// the broker creates queues on first use. The default is a unique name.
    fn missing_queue(&self) -> Option<String> {
        Some(unique_name("steward-missing"))
    }

    /// Fault injection, where the transport's test setup can break things.
    fn faults(&self) -> Option<&dyn FaultHooks> {
        None
    }

    /// The transport's [`DeadLetterQueues`], for the queues made by
    /// [`create_queue`](Self::create_queue), where it has them.
    fn dead_letter_queues(&self) -> Option<Arc<dyn DeadLetterQueues>> {
        None
    }
}

/// Ways a [`TransportFactory`] can break its transport on purpose.
#[async_trait]
pub trait FaultHooks: Send + Sync {
    /// Makes the next `receive` of the existing sources of `queue` fail, for example by
    /// closing their connections or failing the next request.
    async fn break_receive(&self, queue: &str) -> Result<(), TransportError>;

    /// Makes dead-lettering a message of `queue` fail, at least the next time, while the
    /// sources' connections stay up: the broker refuses the copy, or answers the call
    /// with an error.
    async fn break_dead_letter(&self, queue: &str) -> Result<(), TransportError>;
}

/// A name unique within this process and, with high probability, across processes:
/// `<prefix>-<pid>-<counter>-<nanos>`.
#[must_use]
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Whether `service` (a broker a test needs) accepts TCP connections at `address`
/// within three seconds. When it does not, the test `test` prints one skip line (and
/// should return), or, with `CI=true`, fails: CI must not skip silently.
///
/// # Panics
///
/// When the service is unreachable and `CI=true`.
pub async fn service_available(test: &str, service: &str, address: &str) -> bool {
    let connect = tokio::net::TcpStream::connect(address);
    let reachable =
        matches!(tokio::time::timeout(std::time::Duration::from_secs(3), connect).await, Ok(Ok(_)));
    if !reachable {
        assert!(
            !std::env::var("CI").is_ok_and(|ci| ci == "true"),
            "{test}: {service} is not reachable at {address} and CI=true"
        );
        eprintln!("skipped {test}: {service} is not reachable at {address}");
    }
    reachable
}

/// Runs `clean_up` on each of `items` on a thread and a runtime of its own, and waits
/// for it: for the `Drop` handlers of test fixtures, which cannot await (and may run on
/// a runtime that is shutting down). A failure is printed with its chain, not raised.
pub fn clean_up_blocking<T, E, F, Fut>(items: Vec<T>, clean_up: F)
where
    T: Send + 'static,
    E: std::error::Error + 'static,
    F: Fn(T) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    if items.is_empty() {
        return;
    }
    let cleaning = std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => return eprintln!("cleanup failed: no runtime: {error}"),
        };
        runtime.block_on(async {
            for item in items {
                if let Err(error) = clean_up(item).await {
                    eprintln!("cleanup failed: {}", crate::error_chain(&error));
                }
            }
        });
    });
    let _ = cleaning.join();
}

/// What a case needs from the transport beyond the basic contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Requirement {
    /// A capability of [`Capabilities`].
    Capability(Capability),
    /// [`TransportFactory::faults`] returns hooks.
    Faults,
    /// [`TransportFactory::missing_queue`] returns a name (the broker refuses unknown queues).
    StrictQueues,
    /// [`TransportFactory::dead_letter_queues`] returns them.
    DeadLetterAdmin,
}

impl Requirement {
    /// Whether `factory` meets the requirement.
    pub fn is_met(self, factory: &dyn TransportFactory) -> bool {
        match self {
            Self::Capability(cap) => factory.capabilities().has(cap),
            Self::Faults => factory.faults().is_some(),
            Self::StrictQueues => factory.missing_queue().is_some(),
            Self::DeadLetterAdmin => factory.dead_letter_queues().is_some(),
        }
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Capability(cap) => cap.fmt(f),
            Self::Faults => f.write_str("fault hooks"),
            Self::StrictQueues => f.write_str("strict queues"),
            Self::DeadLetterAdmin => f.write_str("dead-letter administration"),
        }
    }
}

/// Checks that every skipped case exists and needs something `factory` lacks.
///
/// # Panics
///
/// When a skipped case is unknown, needs nothing beyond the basic contract, or needs
/// only what the transport has (then it must run, not be skipped), or when a reason is
/// empty.
pub fn assert_skips_justified(factory: &dyn TransportFactory, skips: &[(&str, &str)]) {
    for (case, reason) in skips {
        let Some(needs) = CASES.iter().find(|c| c.name == *case).map(|c| c.needs) else {
            panic!("skipped case {case} is not a conformance case");
        };
        assert!(!reason.trim().is_empty(), "skipped case {case} needs a reason");
        assert!(
            !needs.is_empty(),
            "case {case} needs only the basic contract; {} must pass it, not skip it",
            factory.name()
        );
        assert!(
            needs.iter().any(|need| !need.is_met(factory)),
            "case {case} is skipped ({reason}) but {} has everything it needs ({})",
            factory.name(),
            needs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        );
    }
}

/// Returns the first requirement of `case` that `factory` lacks, after printing the
/// skip line; `None` when the case can run.
pub(crate) fn missing_requirement(
    factory: &dyn TransportFactory,
    case: &str,
) -> Option<Requirement> {
    let needs = CASES.iter().find(|c| c.name == case).map_or(&[][..], |c| c.needs);
    let missing = needs.iter().copied().find(|need| !need.is_met(factory))?;
    eprintln!("skipped {case}: {} lacks {missing}", factory.name());
    Some(missing)
}

/// A conformance case as [`CASES`] lists it.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// The case's name: its function's name and its test's, after `conformance::`.
    pub name: &'static str,
    /// What it needs beyond the basic contract; empty when every transport must pass it.
    pub needs: &'static [Requirement],
    /// The case itself.
    pub run: CaseFn,
}

/// A case's function: runs the case against a factory, panicking when the transport
/// breaks the contract.
pub type CaseFn = for<'a> fn(&'a dyn TransportFactory) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

/// One row of [`CASES`]: the case named like its function, with what it needs.
macro_rules! row {
    ($case:ident, [$($need:expr),*]) => {
        Case { name: stringify!($case), needs: &[$($need),*], run: |f| Box::pin($case(f)) }
    };
}

const fn cap(cap: Capability) -> Requirement {
    Requirement::Capability(cap)
}
use Capability::{BinaryBody, DelayedAbandon, DeliveryCount, LockRenewal, Sessions};
use Requirement::{DeadLetterAdmin, Faults, StrictQueues};

/// Every conformance case, with what it needs beyond the basic contract.
pub const CASES: &[Case] = &[
    row!(round_trip_preserves_body_and_properties, []),
    row!(send_large_body_round_trips, []),
    row!(send_binary_body_round_trips, [cap(BinaryBody)]),
    row!(receive_on_empty_queue_returns_empty_after_wait, []),
    row!(receive_returns_message_sent_while_waiting, []),
    row!(receive_returns_early_when_fewer_than_max_messages_are_available, []),
    row!(receive_never_returns_more_than_max, []),
    row!(complete_removes_message, []),
    row!(abandon_redelivers_with_incremented_count, []),
    row!(abandon_with_delay_hides_until_delay, [cap(DelayedAbandon)]),
    row!(lock_expiry_redelivers, [cap(LockRenewal)]),
    row!(renew_lock_keeps_message_invisible, [cap(LockRenewal)]),
    row!(settle_after_lock_loss_returns_lock_lost, [cap(LockRenewal)]),
    row!(stale_delivery_returns_lock_lost_and_spares_new_holder, [cap(LockRenewal)]),
    row!(dead_letter_keeps_reason_and_description, []),
    row!(concurrent_consumers_never_hold_same_message, []),
    row!(sessions_deliver_in_order_one_lock_per_session, [cap(Sessions)]),
    row!(dropped_delivery_is_received_again, []),
    row!(cancelled_receive_loses_no_message, []),
    row!(many_messages_each_received_exactly_once, []),
    row!(stop_receiving_releases_buffered_messages, []),
    row!(send_to_missing_queue_returns_not_found, [StrictQueues]),
    row!(receive_fault_surfaces_as_error, [Faults]),
    row!(delivery_count_survives_delayed_abandon, [cap(DelayedAbandon), cap(DeliveryCount)]),
    row!(renew_after_lock_expiry_returns_lock_lost, [cap(LockRenewal)]),
    row!(locked_until_lies_within_the_lock_duration, [cap(LockRenewal)]),
    row!(out_of_order_concurrent_settlements_each_apply_to_their_message, []),
    row!(shorter_delay_returns_first_while_undelayed_messages_flow, [cap(DelayedAbandon)]),
    row!(broker_delivery_limit_lies_above_max_deliveries, []),
    row!(dead_letter_keeps_any_description_and_the_message_fields, []),
    row!(
        session_stays_locked_across_consumers_through_a_delayed_abandon,
        [cap(Sessions), cap(DelayedAbandon)]
    ),
    row!(
        session_head_whose_lock_expired_comes_before_its_followers,
        [cap(Sessions), cap(LockRenewal)]
    ),
    row!(receive_after_stop_receiving_takes_nothing, []),
    row!(failed_settlement_leaves_message_redeliverable, [Faults]),
    row!(peek_dead_letters_loses_and_reorders_nothing, [DeadLetterAdmin]),
    row!(redriven_dead_letters_are_received_afresh, [DeadLetterAdmin]),
    row!(purged_dead_letters_are_gone, [DeadLetterAdmin]),
    row!(concurrent_redrives_never_duplicate, [DeadLetterAdmin]),
];

/// Builds a [`TransportFactory`] for one test, or `None` when the transport's service is
/// unavailable and the test should pass without running (after printing why).
type MakeFactory =
    dyn Fn() -> Pin<Box<dyn Future<Output = Option<Box<dyn TransportFactory>>>>> + Send + Sync;

/// The conformance suite of one transport, as the `main` of a `harness = false` test
/// target: one test per row of [`CASES`], each on its own runtime with its own factory.
///
/// See the [module docs](self) for an example.
#[must_use = "a suite does nothing until it is run"]
pub struct Suite {
    factory: Arc<MakeFactory>,
    runtime: fn() -> std::io::Result<Runtime>,
    skips: Vec<(&'static str, &'static str)>,
}

impl std::fmt::Debug for Suite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite").field("skips", &self.skips).finish_non_exhaustive()
    }
}

impl Suite {
    /// A suite whose tests each build their factory with `factory`, on the test's
    /// runtime. `None` means the transport's service is unavailable: the test passes
    /// without running, and the factory should have printed why.
    pub fn new<T, Fut>(factory: impl Fn() -> Fut + Send + Sync + 'static) -> Self
    where
        T: TransportFactory,
        Fut: Future<Output = Option<T>> + 'static,
    {
        let factory = Arc::new(move || {
            let made = factory();
            Box::pin(async move { made.await.map(|f| Box::new(f) as Box<dyn TransportFactory>) })
                as Pin<Box<dyn Future<Output = _>>>
        });
        Self { factory, runtime: paused_current_thread, skips: Vec::new() }
    }

    /// Sets how each test's runtime is built; the default is a current-thread runtime
    /// under tokio's paused clock.
    pub fn with_runtime(mut self, runtime: fn() -> std::io::Result<Runtime>) -> Self {
        self.runtime = runtime;
        self
    }

    /// Skips `case` because the transport cannot run it, for `reason`: its test is
    /// ignored, and `conformance::skips_are_justified` checks that the transport really
    /// lacks something the case needs.
    pub fn with_skip(mut self, case: &'static str, reason: &'static str) -> Self {
        self.skips.push((case, reason));
        self
    }

    /// The tests: `conformance::<case>` for each of [`CASES`] (ignored when skipped),
    /// and `conformance::skips_are_justified`.
    #[must_use]
    pub fn trials(self) -> Vec<Trial> {
        let mut trials = Vec::with_capacity(CASES.len() + 1);
        for case in CASES {
            let skip = self.skips.iter().find(|(name, _)| *name == case.name).map(|(_, r)| *r);
            let (factory, runtime, run) = (self.factory.clone(), self.runtime, case.run);
            let name = case.name;
            let trial = Trial::test(format!("conformance::{name}"), move || {
                if let Some(reason) = skip {
                    eprintln!("{name} is skipped on this transport ({reason}); running it anyway");
                }
                on_runtime(runtime, async move {
                    if let Some(factory) = factory().await {
                        run(factory.as_ref()).await;
                    }
                })
            });
            trials.push(trial.with_ignored_flag(skip.is_some()));
        }
        let (factory, runtime, skips) = (self.factory, self.runtime, self.skips);
        trials.push(Trial::test("conformance::skips_are_justified", move || {
            on_runtime(runtime, async move {
                if let Some(factory) = factory().await {
                    assert_skips_justified(factory.as_ref(), &skips);
                }
            })
        }));
        trials
    }

    /// Runs the tests with the command line's arguments (filters, `--ignored`,
    /// `--list`, `--test-threads`, ...), as a test binary's `main` does.
    #[must_use]
    pub fn run(self) -> ExitCode {
        libtest_mimic::run(&Arguments::from_args(), self.trials()).exit_code()
    }
}

/// A current-thread runtime under tokio's paused clock.
fn paused_current_thread() -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()
}

/// Runs `test` to completion on a runtime from `runtime`; a panic in it fails the test.
fn on_runtime(
    runtime: fn() -> std::io::Result<Runtime>,
    test: impl Future<Output = ()>,
) -> Result<(), Failed> {
    let runtime = runtime().map_err(|e| Failed::from(format!("cannot build a runtime: {e}")))?;
    runtime.block_on(test);
    Ok(())
}
