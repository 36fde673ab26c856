//! The conformance suite every transport must pass (feature `testkit`).
//!
//! Not semver-stable. Each case is a public `async fn` taking a [`TransportFactory`];
//! [`conformance_tests!`](crate::conformance_tests) generates one `#[tokio::test]` per
//! case, named `conformance_<case>`, for a transport crate's `tests/conformance.rs`.
//! The cases create their own uniquely named queues through the factory and leave them
//! with whatever is left in them; run them against a broker or namespace meant for tests.
//!
//! A case that needs a capability the transport lacks prints
//! `skipped <case>: <transport> lacks <capability>` and returns. A transport lists the
//! cases it cannot run in the macro's `skip` block, with a reason; those are generated
//! as `#[ignore = "reason"]`, and the generated `conformance_skips_are_justified` test
//! asserts that each skipped case needs something the transport really lacks, so a
//! claimed capability must pass its case.
//!
//! # Examples
//!
//! In `crates/<transport>/tests/conformance.rs`:
//!
//! ```ignore
//! steward_core::conformance_tests! {
//!     factory: my_transport::testing::Factory::connect().await,
//!     skip: {
//!         sessions_deliver_in_order_one_lock_per_session: "no broker-side sessions",
//!     },
//! }
//! ```
//!
//! With `runtime: (start_paused = true),` the tests run under tokio's paused clock, which
//! suits an in-process transport on tokio time.

mod cases;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Capabilities, Capability, DeadLetter, MessageSink, MessageSource, TransportError};

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
}

/// Ways a [`TransportFactory`] can break its transport on purpose.
#[async_trait]
pub trait FaultHooks: Send + Sync {
    /// Makes the next `receive` of the existing sources of `queue` fail, for example by
    /// closing their connections or failing the next request.
    async fn break_receive(&self, queue: &str) -> Result<(), TransportError>;
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
}

impl Requirement {
    /// Whether `factory` meets the requirement.
    pub fn is_met(self, factory: &dyn TransportFactory) -> bool {
        match self {
            Self::Capability(cap) => factory.capabilities().has(cap),
            Self::Faults => factory.faults().is_some(),
            Self::StrictQueues => factory.missing_queue().is_some(),
        }
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Capability(cap) => cap.fmt(f),
            Self::Faults => f.write_str("fault hooks"),
            Self::StrictQueues => f.write_str("strict queues"),
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
        let Some((_, needs)) = CASES.iter().find(|(name, _)| name == case) else {
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
    let needs = CASES.iter().find(|(name, _)| *name == case).map_or(&[][..], |(_, needs)| *needs);
    let missing = needs.iter().copied().find(|need| !need.is_met(factory))?;
    eprintln!("skipped {case}: {} lacks {missing}", factory.name());
    Some(missing)
}

/// Calls `callback! { <args> <test> <case> [<requirements>] ... }` with every case: the
/// single list of conformance cases, their test names and what each needs.
#[doc(hidden)]
#[macro_export]
macro_rules! __steward_for_each_case {
    ([$($callback:tt)+] { $($args:tt)* }) => {
        $($callback)+ ! { $($args)*
            conformance_round_trip_preserves_body_and_properties round_trip_preserves_body_and_properties []
            conformance_send_large_body_round_trips send_large_body_round_trips []
            conformance_send_binary_body_round_trips send_binary_body_round_trips [Cap(BinaryBody)]
            conformance_receive_on_empty_queue_returns_empty_after_wait receive_on_empty_queue_returns_empty_after_wait []
            conformance_receive_returns_message_sent_while_waiting receive_returns_message_sent_while_waiting []
            conformance_receive_never_returns_more_than_max receive_never_returns_more_than_max []
            conformance_complete_removes_message complete_removes_message []
            conformance_abandon_redelivers_with_incremented_count abandon_redelivers_with_incremented_count []
            conformance_abandon_with_delay_hides_until_delay abandon_with_delay_hides_until_delay [Cap(DelayedAbandon)]
            conformance_lock_expiry_redelivers lock_expiry_redelivers [Cap(LockRenewal)]
            conformance_renew_lock_keeps_message_invisible renew_lock_keeps_message_invisible [Cap(LockRenewal)]
            conformance_settle_after_lock_loss_returns_lock_lost settle_after_lock_loss_returns_lock_lost [Cap(LockRenewal)]
            conformance_stale_delivery_returns_lock_lost_and_spares_new_holder stale_delivery_returns_lock_lost_and_spares_new_holder [Cap(LockRenewal)]
            conformance_dead_letter_keeps_reason_and_description dead_letter_keeps_reason_and_description []
            conformance_concurrent_consumers_never_hold_same_message concurrent_consumers_never_hold_same_message []
            conformance_sessions_deliver_in_order_one_lock_per_session sessions_deliver_in_order_one_lock_per_session [Cap(Sessions)]
            conformance_dropped_delivery_is_received_again dropped_delivery_is_received_again []
            conformance_cancelled_receive_loses_no_message cancelled_receive_loses_no_message []
            conformance_many_messages_each_received_exactly_once many_messages_each_received_exactly_once []
            conformance_stop_receiving_releases_buffered_messages stop_receiving_releases_buffered_messages []
            conformance_send_to_missing_queue_returns_not_found send_to_missing_queue_returns_not_found [StrictQueues]
            conformance_receive_fault_surfaces_as_error receive_fault_surfaces_as_error [Faults]
            conformance_delivery_count_survives_delayed_abandon delivery_count_survives_delayed_abandon [Cap(DelayedAbandon), Cap(DeliveryCount)]
        }
    };
}

macro_rules! define_case_list {
    ($( $test:ident $case:ident [$($need:expr),*] )*) => {
        /// Every conformance case by name, with what it needs beyond the basic contract.
        pub const CASES: &[(&str, &[Requirement])] = &[
            $( (stringify!($case), &[$($need),*]), )*
        ];
    };
}

#[allow(non_snake_case)]
const fn Cap(cap: Capability) -> Requirement {
    Requirement::Capability(cap)
}
use Capability::{BinaryBody, DelayedAbandon, DeliveryCount, LockRenewal, Sessions};
use Requirement::{Faults, StrictQueues};

__steward_for_each_case!([define_case_list] {});

/// Generates one `#[tokio::test]` per conformance case, named `conformance_<case>`, plus
/// `conformance_skips_are_justified`.
///
/// - `factory:` an expression (it may `.await`) giving a [`TransportFactory`]; it is
///   evaluated once per test.
/// - `runtime:` (optional) arguments for `#[tokio::test(...)]`, e.g. `(start_paused = true)`
///   or `(flavor = "multi_thread")`.
/// - `skip:` cases this transport cannot run, each with the reason, generated as
///   `#[ignore = "reason"]`.
///
/// The calling crate needs `tokio` (with `macros` and `rt`) as a dev-dependency.
///
/// # Examples
///
/// ```ignore
/// steward_core::conformance_tests! {
///     factory: steward_inmem::testing::ConformanceFactory::new(),
///     runtime: (start_paused = true),
///     skip: {},
/// }
/// ```
#[macro_export]
macro_rules! conformance_tests {
    (
        factory: $factory:expr,
        $( runtime: ( $($rt:tt)* ), )?
        skip: { $( $skip:ident : $reason:literal ),* $(,)? } $(,)?
    ) => {
        $crate::__steward_for_each_case! {
            [$crate::__steward_conformance_tests] { ($) ($factory) ($($($rt)*)?) [$($skip : $reason),*] }
        }

        #[::tokio::test( $($($rt)*)? )]
        async fn conformance_skips_are_justified() {
            let factory = $factory;
            $crate::testkit::assert_skips_justified(
                &factory,
                &[$((stringify!($skip), $reason)),*],
            );
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __steward_conformance_tests {
    (($d:tt) ($factory:expr) $rt:tt $skips:tt $( $test:ident $case:ident [$($need:tt)*] )*) => {
        $(
            // A local macro named like the test (tests and macros live in different
            // namespaces) finds the case in the skip list by matching its name literally.
            macro_rules! $test {
                ($case : $d reason:literal $d(, $d k:ident : $d v:literal)*) => {
                    #[::tokio::test $rt]
                    #[ignore = $d reason]
                    async fn $test() {
                        let factory = $factory;
                        $crate::testkit::$case(&factory).await;
                    }
                };
                ($d other:ident : $d reason:literal $d(, $d k:ident : $d v:literal)*) => {
                    $test! { $d($d k : $d v),* }
                };
                () => {
                    #[::tokio::test $rt]
                    async fn $test() {
                        let factory = $factory;
                        $crate::testkit::$case(&factory).await;
                    }
                };
            }
            $test! $skips;
        )*
    };
}
