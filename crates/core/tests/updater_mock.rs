//! The Updater against mockall doubles.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use steward_core::{
    Capabilities, Delivery, Message, MockHandler, MockMessageSource, MockSettle, Outcome,
    TransportError, Updater,
};
use support::{Paced, config, eventually, supervise, worker};
use tokio::time::Instant;

/// Ensures that when `complete` fails with `LockLost`, the message is not settled again
/// (no abandon, no dead-letter, no second complete), its lock (not a timed one) is never
/// renewed, and `lease_lost` is counted.
///
/// The mock records every call instead of using `never()`: a panicking expectation
/// would panic inside the Updater's settlement task, where it cannot fail the test.
#[tokio::test(start_paused = true)]
async fn complete_lock_lost_is_counted_and_not_settled_again() {
    let calls: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let record = |name: &'static str| {
        let calls = calls.clone();
        move || calls.lock().unwrap().push(name)
    };
    let mut settle = MockSettle::new();
    settle.expect_locked_until().return_const(None);
    let complete = record("complete");
    settle.expect_complete().returning(move || {
        complete();
        Err(TransportError::lock_lost("m-1"))
    });
    let abandon = record("abandon");
    settle.expect_abandon().returning(move |_| {
        abandon();
        Ok(())
    });
    let dead_letter = record("dead_letter");
    settle.expect_dead_letter().returning(move |_, _| {
        dead_letter();
        Ok(())
    });
    let renew = record("renew_lock");
    settle.expect_renew_lock().returning(move || {
        renew();
        Ok(None)
    });
    let mut delivery = Some(Delivery::new(Message::new("m-1", "{}"), settle));

    let mut source = MockMessageSource::new();
    source.expect_queue().return_const("mocked".to_owned());
    source.expect_capabilities().return_const(Capabilities::default());
    source.expect_role().return_const(None);
    source.expect_receive().returning(move |_, _| Ok(delivery.take().into_iter().collect()));
    source.expect_stop_receiving().times(1).returning(|| Ok(()));

    let mut handler = MockHandler::new();
    handler.expect_handle().times(1).returning(|_: Arc<Message>| Outcome::Complete);

    let (supervisor, health) =
        supervise(Updater::with_source("mocked", Paced(source), handler).with_config(config()));
    eventually("lease lost counted", Duration::from_secs(10), || {
        worker(&health, "mocked").outcomes.lease_lost == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let counts = worker(&health, "mocked").outcomes;
    assert_eq!((counts.completed, counts.retried, counts.dead_lettered), (0, 0, 0));
    assert_eq!(counts.lease_lost, 1);
    assert_eq!(worker(&health, "mocked").restarts, 0);
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(*calls.lock().unwrap(), ["complete"], "settled or renewed again");
}
