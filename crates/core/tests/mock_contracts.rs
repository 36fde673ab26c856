//! The core types against `mockall` doubles, for behaviour no real broker produces on
//! demand.

use std::sync::Arc;
use std::time::Duration;

use steward_core::testkit::TransportFactory;
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
