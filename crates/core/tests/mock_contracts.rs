//! The core types against `mockall` doubles, for behaviour no real broker produces on
//! demand.

use std::sync::Arc;
use std::time::Duration;

use steward_core::testkit::{CASES, Suite, TransportFactory, assert_skips_justified};
use steward_core::{
    Capabilities, DeadLetter, Delivery, Message, MessageSink, MessageSource, MockMessageSink,
    MockMessageSource, MockSettle, TransportError, error_chain,
};

/// Ensures that a delivery forwards to its settle handle exactly once and passes a
/// transport without timed locks (no expiry, renewals that return `None`) through as is.
#[tokio::test]
async fn delivery_forwards_to_settle_handle_without_timed_locks() {
    let mut settle = MockSettle::new();
    settle.expect_locked_until().return_const(None);
    settle.expect_renew_lock().times(2).returning(|| Ok(None));
    settle.expect_complete().times(1).returning(|| {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        Err(TransportError::timeout("waiting for the publisher confirm").with_source(cause))
    });
    settle.expect_abandon().never();
    settle.expect_dead_letter().never();

    let delivery = Delivery::new(Message::new("m-1", "body"), settle);
    assert_eq!(delivery.locked_until(), None);
    assert_eq!(delivery.renew_lock().await.unwrap(), None);
    assert_eq!(delivery.renew_lock().await.unwrap(), None);
    let error = delivery.complete().await.unwrap_err();
    assert!(error.is_retryable());
    assert_eq!(error_chain(&error), "timed out: waiting for the publisher confirm: reset by peer");
}

struct BrokenFactory;

#[async_trait::async_trait]
impl TransportFactory for BrokenFactory {
    fn name(&self) -> &str {
        "broken"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn lock_duration(&self) -> Option<Duration> {
        None
    }
    async fn create_queue(&self, prefix: &str) -> Result<String, TransportError> {
        Ok(format!("{prefix}-q"))
    }
    async fn source(&self, _queue: &str) -> Result<Box<dyn MessageSource>, TransportError> {
        // A source that ignores `max`: it always hands out three messages.
        let mut source = MockMessageSource::new();
        source.expect_queue().return_const("q".to_owned());
        source.expect_capabilities().return_const(Capabilities::default());
        source.expect_receive().returning(|_max, _wait| {
            Ok((0..3)
                .map(|i| {
                    let mut settle = MockSettle::new();
                    settle.expect_locked_until().return_const(None);
                    settle.expect_complete().returning(|| Ok(()));
                    Delivery::new(Message::new(format!("m{i}"), "x"), settle)
                })
                .collect())
        });
        Ok(Box::new(source))
    }
    async fn sink(&self) -> Result<Arc<dyn MessageSink>, TransportError> {
        let mut sink = MockMessageSink::new();
        sink.expect_send().returning(|_, _| Ok(()));
        Ok(Arc::new(sink))
    }
    async fn dead_letters(&self, _queue: &str) -> Result<Vec<DeadLetter>, TransportError> {
        Ok(Vec::new())
    }
}

/// Ensures that the conformance suite catches a transport returning more than `max`
/// messages from one receive.
#[tokio::test]
#[should_panic(expected = "receive(1) returned 3")]
async fn conformance_suite_rejects_source_exceeding_max() {
    steward_core::testkit::receive_never_returns_more_than_max(&BrokenFactory).await;
}

/// Ensures that the conformance suite catches a sink that "succeeds" sending to a
/// queue that does not exist.
#[tokio::test]
#[should_panic(expected = "not NotFound")]
async fn conformance_suite_rejects_silent_send_to_missing_queue() {
    steward_core::testkit::send_to_missing_queue_returns_not_found(&BrokenFactory).await;
}

/// Ensures that a transport's suite has one test per case, named `conformance::<case>`,
/// ignores exactly the skipped cases, and ends with the guard on the skips.
#[test]
fn suite_has_one_named_test_per_case_and_ignores_the_skipped() {
    const SKIPPED: &str = "sessions_deliver_in_order_one_lock_per_session";
    let trials = Suite::new(|| async { Some(BrokenFactory) })
        .with_skip(SKIPPED, "no broker-side sessions")
        .trials();
    assert_eq!(trials.len(), CASES.len() + 1);
    for (trial, case) in trials.iter().zip(CASES) {
        assert_eq!(trial.name(), format!("conformance::{}", case.name));
        assert_eq!(trial.has_ignored_flag(), case.name == SKIPPED, "{}", case.name);
    }
    let guard = trials.last().unwrap();
    assert_eq!(guard.name(), "conformance::skips_are_justified");
    assert!(!guard.has_ignored_flag());
}

/// Ensures that the guard on the skips refuses a skip of a case the transport can run,
/// of an unknown case, and one without a reason, and accepts a justified skip.
#[test]
fn skips_must_name_a_case_the_transport_cannot_run() {
    use std::panic::catch_unwind;
    let refused = [
        ("round_trip_preserves_body_and_properties", "the basic contract"),
        ("no_such_case", "unknown"),
        ("sessions_deliver_in_order_one_lock_per_session", " "),
    ];
    for skip in refused {
        let result = catch_unwind(|| assert_skips_justified(&BrokenFactory, &[skip]));
        assert!(result.is_err(), "{skip:?} was accepted");
    }
    assert_skips_justified(
        &BrokenFactory,
        &[("sessions_deliver_in_order_one_lock_per_session", "no broker-side sessions")],
    );
}
