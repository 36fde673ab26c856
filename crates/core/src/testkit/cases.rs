//! The conformance cases. Each panics with a message naming the case when the transport
//! breaks the contract.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::{Instant, sleep, timeout};

use super::{TransportFactory, missing_requirement};
use crate::dead_letters::REDRIVEN_PROPERTY;
use crate::{
    DeadLetter, DeadLetterQueues, Delivery, MessageSink, MessageSource, OutgoingMessage, Redrive,
    TransportError,
};

/// How long a receive waits in the cases unless a case says otherwise.
const WAIT: Duration = Duration::from_secs(1);
/// How long a case waits for something that should happen promptly.
const PROMPTLY: Duration = Duration::from_secs(10);
/// Slack on top of a lock duration before a lock is surely expired.
const EXPIRY_SLACK: Duration = Duration::from_secs(1);

fn ok<T>(case: &str, what: &str, result: Result<T, TransportError>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{case}: {what} failed: {}", crate::error_chain(&error)),
    }
}

struct Fixture<'a> {
    case: &'static str,
    factory: &'a dyn TransportFactory,
    queue: String,
    sink: Arc<dyn MessageSink>,
}

impl<'a> Fixture<'a> {
    async fn new(case: &'static str, factory: &'a dyn TransportFactory) -> Self {
        let queue = ok(case, "create_queue", factory.create_queue("steward-conformance").await);
        let sink = ok(case, "sink", factory.sink().await);
        Self { case, factory, queue, sink }
    }

    async fn source(&self) -> Box<dyn MessageSource> {
        ok(self.case, "source", self.factory.source(&self.queue).await)
    }

    async fn send(&self, message: OutgoingMessage) {
        ok(self.case, "send", self.sink.send(&self.queue, message).await);
    }

    async fn send_text(&self, id: &str) {
        self.send(OutgoingMessage::new(format!("body of {id}")).with_message_id(id)).await;
    }

    /// Receives until `n` deliveries arrived or `within` passed.
    async fn receive_n(
        &self,
        source: &dyn MessageSource,
        n: usize,
        within: Duration,
    ) -> Vec<Delivery> {
        receive_n(self.case, source, n, within).await
    }

    /// Receives exactly one delivery within `within`, or panics.
    async fn receive_one(&self, source: &dyn MessageSource, within: Duration) -> Delivery {
        let mut got = self.receive_n(source, 1, within).await;
        assert_eq!(got.len(), 1, "{}: expected one message within {within:?}", self.case);
        got.remove(0)
    }

    /// Asserts that `source` receives nothing for `wait`.
    async fn assert_nothing(&self, source: &dyn MessageSource, wait: Duration, why: &str) {
        let got = ok(self.case, "receive", source.receive(10, wait).await);
        let ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
        assert!(ids.is_empty(), "{}: {why}, but received {ids:?}", self.case);
    }

    fn lock_duration(&self) -> Duration {
        self.factory.lock_duration().unwrap_or(Duration::ZERO)
    }

    fn counts_deliveries(&self) -> bool {
        self.factory.capabilities().delivery_count
    }
}

async fn receive_n(
    case: &str,
    source: &dyn MessageSource,
    n: usize,
    within: Duration,
) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wait = (deadline - now).min(WAIT);
        let batch = ok(case, "receive", source.receive(n - got.len(), wait).await);
        assert!(batch.len() <= n - got.len(), "{case}: receive returned more than max");
        got.extend(batch);
    }
    got
}

async fn settle(case: &str, what: &str, result: impl Future<Output = Result<(), TransportError>>) {
    ok(case, what, result.await);
}

/// Sends a message with a body, a message id, a session id, a correlation id, a content
/// type and custom properties; receives it with all of them intact.
pub async fn round_trip_preserves_body_and_properties(factory: &dyn TransportFactory) {
    const CASE: &str = "round_trip_preserves_body_and_properties";
    let fx = Fixture::new(CASE, factory).await;
    let id = super::unique_name("round-trip");
    let sent = OutgoingMessage::json(r#"{"hello":"world","n":1}"#)
        .with_message_id(&id)
        .with_session_id("session-1")
        .with_correlation_id("correlation-1")
        .with_property("custom", "value")
        .with_property("spaced-out", "two words, one comma");
    fx.send(sent.clone()).await;

    let source = fx.source().await;
    let delivery = fx.receive_one(source.as_ref(), PROMPTLY).await;
    let got = delivery.message().clone();
    assert_eq!(got.id, id, "{CASE}: message id");
    assert_eq!(got.body, sent.body, "{CASE}: body");
    assert_eq!(got.session_id.as_deref(), Some("session-1"), "{CASE}: session id");
    assert_eq!(got.correlation_id.as_deref(), Some("correlation-1"), "{CASE}: correlation id");
    assert_eq!(got.content_type.as_deref(), Some("application/json"), "{CASE}: content type");
    for (key, value) in &sent.properties {
        assert_eq!(got.properties.get(key), Some(value), "{CASE}: property {key}");
    }
    assert!(got.delivery_count >= 1, "{CASE}: delivery count starts at 1");
    if fx.counts_deliveries() {
        assert_eq!(got.delivery_count, 1, "{CASE}: first delivery count");
    }
    settle(CASE, "complete", delivery.complete()).await;
}

/// A 1 MiB body (or the transport's `max_body_bytes` less room for headers) arrives
/// byte for byte.
pub async fn send_large_body_round_trips(factory: &dyn TransportFactory) {
    const CASE: &str = "send_large_body_round_trips";
    let fx = Fixture::new(CASE, factory).await;
    let size =
        factory.capabilities().max_body_bytes.map_or(1 << 20, |max| max.saturating_sub(4096));
    let body: String = (0..size).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    fx.send(OutgoingMessage::new(body.clone()).with_message_id("large")).await;

    let source = fx.source().await;
    let delivery = fx.receive_one(source.as_ref(), PROMPTLY).await;
    assert_eq!(delivery.message().body.len(), size, "{CASE}: body length");
    assert!(delivery.message().body == body.as_bytes(), "{CASE}: body bytes differ");
    settle(CASE, "complete", delivery.complete()).await;
}

/// A body holding every byte value, including invalid UTF-8, arrives byte for byte.
pub async fn send_binary_body_round_trips(factory: &dyn TransportFactory) {
    const CASE: &str = "send_binary_body_round_trips";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    let body: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, 0x00, 0xc3]).collect();
    fx.send(OutgoingMessage::new(body.clone()).with_content_type("application/octet-stream")).await;

    let source = fx.source().await;
    let delivery = fx.receive_one(source.as_ref(), PROMPTLY).await;
    assert_eq!(delivery.message().body.as_ref(), body.as_slice(), "{CASE}: body bytes");
    settle(CASE, "complete", delivery.complete()).await;
}

/// `receive` on an empty queue waits at least `wait`, then returns an empty `Vec`
/// within `wait` + 5 s.
pub async fn receive_on_empty_queue_returns_empty_after_wait(factory: &dyn TransportFactory) {
    const CASE: &str = "receive_on_empty_queue_returns_empty_after_wait";
    let fx = Fixture::new(CASE, factory).await;
    let source = fx.source().await;
    let wait = Duration::from_secs(2);
    let started = Instant::now();
    let got = timeout(wait + Duration::from_secs(5), source.receive(10, wait)).await;
    let elapsed = started.elapsed();
    let got = got.unwrap_or_else(|_| panic!("{CASE}: receive did not return within wait + 5 s"));
    let got = ok(CASE, "receive", got);
    assert!(got.is_empty(), "{CASE}: expected no messages, got {}", got.len());
    assert!(elapsed >= wait, "{CASE}: returned after {elapsed:?}, before the wait of {wait:?}");
}

/// A `receive` waiting on an empty queue returns a message sent during the wait without
/// waiting out the rest of it.
pub async fn receive_returns_message_sent_while_waiting(factory: &dyn TransportFactory) {
    const CASE: &str = "receive_returns_message_sent_while_waiting";
    let fx = Fixture::new(CASE, factory).await;
    let source = fx.source().await;
    let wait = Duration::from_secs(20);
    let started = Instant::now();
    let (got, ()) = tokio::join!(source.receive(1, wait), async {
        sleep(Duration::from_millis(300)).await;
        fx.send_text("late").await;
    });
    let got = ok(CASE, "receive", got);
    let elapsed = started.elapsed();
    assert_eq!(got.len(), 1, "{CASE}: the message sent during the wait");
    assert_eq!(got[0].message().id, "late", "{CASE}: message id");
    assert!(elapsed < wait, "{CASE}: receive waited out its whole wait ({elapsed:?})");
    for delivery in got {
        settle(CASE, "complete", delivery.complete()).await;
    }
}

/// `receive(10, 20 s)` with one message available returns it promptly: a receive does
/// not hold messages it has until `max` arrived or `wait` ran out (a message held for
/// the whole wait would spend its lock waiting).
pub async fn receive_returns_early_when_fewer_than_max_messages_are_available(
    factory: &dyn TransportFactory,
) {
    const CASE: &str = "receive_returns_early_when_fewer_than_max_messages_are_available";
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("alone").await;
    let source = fx.source().await;
    let wait = Duration::from_secs(20);
    let started = Instant::now();
    let got = timeout(wait + Duration::from_secs(5), source.receive(10, wait)).await;
    let elapsed = started.elapsed();
    let got = got.unwrap_or_else(|_| panic!("{CASE}: receive did not return within wait + 5 s"));
    let got = ok(CASE, "receive", got);
    let ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids, ["alone"], "{CASE}: the one message available");
    assert!(
        elapsed < Duration::from_secs(5),
        "{CASE}: receive held the message it had for {elapsed:?}, waiting for more (wait {wait:?})"
    );
    for delivery in got {
        settle(CASE, "complete", delivery.complete()).await;
    }
}

/// `receive(max)` never returns more than `max` messages, and repeated receives get
/// every message.
pub async fn receive_never_returns_more_than_max(factory: &dyn TransportFactory) {
    const CASE: &str = "receive_never_returns_more_than_max";
    let fx = Fixture::new(CASE, factory).await;
    for i in 0..10 {
        fx.send_text(&format!("m{i}")).await;
    }
    let source = fx.source().await;
    let mut ids = HashSet::new();
    let deadline = Instant::now() + PROMPTLY;
    while ids.len() < 10 && Instant::now() < deadline {
        for max in [1, 3] {
            let batch = ok(CASE, "receive", source.receive(max, WAIT).await);
            assert!(batch.len() <= max, "{CASE}: receive({max}) returned {}", batch.len());
            for delivery in batch {
                assert!(ids.insert(delivery.message().id.clone()), "{CASE}: duplicate");
                settle(CASE, "complete", delivery.complete()).await;
            }
        }
    }
    assert_eq!(ids.len(), 10, "{CASE}: all messages received");
}

/// A completed message is gone: not redelivered after its lock would have expired, not
/// seen by a new consumer.
pub async fn complete_removes_message(factory: &dyn TransportFactory) {
    const CASE: &str = "complete_removes_message";
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("done").await;
    let source = fx.source().await;
    let delivery = fx.receive_one(source.as_ref(), PROMPTLY).await;
    settle(CASE, "complete", delivery.complete()).await;

    sleep(fx.lock_duration() + EXPIRY_SLACK).await;
    fx.assert_nothing(source.as_ref(), WAIT, "the message was completed").await;
    let other = fx.source().await;
    fx.assert_nothing(other.as_ref(), WAIT, "the message was completed").await;
}

/// An abandoned message is delivered again, with its delivery count one higher.
pub async fn abandon_redelivers_with_incremented_count(factory: &dyn TransportFactory) {
    const CASE: &str = "abandon_redelivers_with_incremented_count";
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("again").await;
    let source = fx.source().await;
    let first = fx.receive_one(source.as_ref(), PROMPTLY).await;
    let first_count = first.message().delivery_count;
    settle(CASE, "abandon", first.abandon(None)).await;

    let second = fx.receive_one(source.as_ref(), PROMPTLY).await;
    assert_eq!(second.message().id, "again", "{CASE}: the same message");
    assert_eq!(second.message().body, "body of again", "{CASE}: the same body");
    if fx.counts_deliveries() {
        assert_eq!(second.message().delivery_count, first_count + 1, "{CASE}: delivery count");
    }
    settle(CASE, "complete", second.complete()).await;
}

/// A message abandoned with a delay is not delivered before the delay, and is after it.
pub async fn abandon_with_delay_hides_until_delay(factory: &dyn TransportFactory) {
    const CASE: &str = "abandon_with_delay_hides_until_delay";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("later").await;
    let source = fx.source().await;
    let delivery = fx.receive_one(source.as_ref(), PROMPTLY).await;
    let delay = Duration::from_secs(3);
    let abandoned_at = Instant::now();
    settle(CASE, "abandon", delivery.abandon(Some(delay))).await;

    let early = ok(CASE, "receive", source.receive(10, Duration::from_secs(2)).await);
    let waited = abandoned_at.elapsed();
    if waited < delay {
        assert!(early.is_empty(), "{CASE}: delivered {waited:?} into a {delay:?} delay");
    }
    let again = fx.receive_one(source.as_ref(), delay + PROMPTLY).await;
    let waited = abandoned_at.elapsed();
    assert_eq!(again.message().id, "later", "{CASE}: the same message");
    assert!(waited >= delay, "{CASE}: delivered after {waited:?}, before the delay {delay:?}");
    settle(CASE, "complete", again.complete()).await;
}

/// A message whose lock expires is delivered again, to another consumer, with its
/// delivery count one higher.
pub async fn lock_expiry_redelivers(factory: &dyn TransportFactory) {
    const CASE: &str = "lock_expiry_redelivers";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("expires").await;
    let first_source = fx.source().await;
    let started = Instant::now();
    let held = fx.receive_one(first_source.as_ref(), PROMPTLY).await;
    assert!(held.locked_until().is_some(), "{CASE}: a timed lock has an expiry");

    let second_source = fx.source().await;
    let lock = fx.lock_duration();
    let again = fx.receive_one(second_source.as_ref(), lock + PROMPTLY).await;
    let elapsed = started.elapsed();
    assert_eq!(again.message().id, "expires", "{CASE}: the same message");
    assert!(elapsed >= lock, "{CASE}: redelivered after {elapsed:?}, before the lock {lock:?}");
    if fx.counts_deliveries() {
        assert_eq!(again.message().delivery_count, 2, "{CASE}: delivery count");
    }
    settle(CASE, "complete", again.complete()).await;
    drop(held);
}

/// Renewing a lock keeps the message from everyone else past its first lock, and the
/// holder can still complete it.
pub async fn renew_lock_keeps_message_invisible(factory: &dyn TransportFactory) {
    const CASE: &str = "renew_lock_keeps_message_invisible";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("renewed").await;
    let source = fx.source().await;
    let held = fx.receive_one(source.as_ref(), PROMPTLY).await;
    let first_expiry = held.locked_until();
    let lock = fx.lock_duration();
    let other = fx.source().await;

    let until = Instant::now() + lock * 2 + EXPIRY_SLACK;
    let mut last_expiry = first_expiry;
    while Instant::now() < until {
        let renewed = ok(CASE, "renew_lock", held.renew_lock().await);
        assert!(renewed.is_some(), "{CASE}: a timed lock renews to a new expiry");
        assert!(renewed >= last_expiry, "{CASE}: a renewal moved the lock back");
        last_expiry = renewed;
        fx.assert_nothing(other.as_ref(), lock / 3, "the lock was renewed").await;
    }
    assert!(last_expiry > first_expiry, "{CASE}: renewals extended the lock");
    settle(CASE, "complete", held.complete()).await;
}

/// Settling after the lock expired is `LockLost`, and the message is not lost.
pub async fn settle_after_lock_loss_returns_lock_lost(factory: &dyn TransportFactory) {
    const CASE: &str = "settle_after_lock_loss_returns_lock_lost";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("lost").await;
    let source = fx.source().await;
    let held = fx.receive_one(source.as_ref(), PROMPTLY).await;
    sleep(fx.lock_duration() + EXPIRY_SLACK).await;
    match held.complete().await {
        Err(TransportError::LockLost { .. }) => {}
        other => panic!("{CASE}: complete after lock loss returned {other:?}, not LockLost"),
    }
    let again = fx.receive_one(source.as_ref(), PROMPTLY).await;
    assert_eq!(again.message().id, "lost", "{CASE}: the message is still there");
    settle(CASE, "complete", again.complete()).await;
}

/// A stale delivery settled after its message went to another consumer is `LockLost`,
/// whichever way it is settled, and the new holder's lock is untouched.
pub async fn stale_delivery_returns_lock_lost_and_spares_new_holder(
    factory: &dyn TransportFactory,
) {
    const CASE: &str = "stale_delivery_returns_lock_lost_and_spares_new_holder";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    for id in ["stale-complete", "stale-abandon", "stale-dead-letter"] {
        fx.send_text(id).await;
    }
    let old_source = fx.source().await;
    let stale = fx.receive_n(old_source.as_ref(), 3, PROMPTLY).await;
    assert_eq!(stale.len(), 3, "{CASE}: received the three messages");

    let new_source = fx.source().await;
    let fresh = fx.receive_n(new_source.as_ref(), 3, fx.lock_duration() + PROMPTLY).await;
    assert_eq!(fresh.len(), 3, "{CASE}: redelivered to the new consumer after the lock expired");

    for delivery in stale {
        let id = delivery.message().id.clone();
        let result = match id.as_str() {
            "stale-complete" => delivery.complete().await,
            "stale-abandon" => delivery.abandon(None).await,
            _ => delivery.dead_letter("Stale", "settled by a stale consumer").await,
        };
        assert!(
            matches!(result, Err(TransportError::LockLost { .. })),
            "{CASE}: stale settlement of {id} returned {result:?}, not LockLost"
        );
    }
    for delivery in &fresh {
        ok(CASE, "renew_lock by the new holder", delivery.renew_lock().await);
    }
    fx.assert_nothing(old_source.as_ref(), WAIT, "the new holder still holds every message").await;
    for delivery in fresh {
        settle(CASE, "complete by the new holder", delivery.complete()).await;
    }
    let dead = ok(CASE, "dead_letters", factory.dead_letters(&fx.queue).await);
    assert!(dead.is_empty(), "{CASE}: a stale dead-letter moved a message: {dead:?}");
}

/// A dead-lettered message leaves the queue and sits in the dead-letter queue with its
/// body, id, reason and description.
pub async fn dead_letter_keeps_reason_and_description(factory: &dyn TransportFactory) {
    const CASE: &str = "dead_letter_keeps_reason_and_description";
    let fx = Fixture::new(CASE, factory).await;
    fx.send(
        OutgoingMessage::new("poison")
            .with_message_id("poison-1")
            .with_correlation_id("c-poison")
            .with_property("origin", "test"),
    )
    .await;
    let source = fx.source().await;
    let delivery = fx.receive_one(source.as_ref(), PROMPTLY).await;
    settle(
        CASE,
        "dead_letter",
        delivery.dead_letter("MessageFormatIncorrect", "body is not JSON: poison"),
    )
    .await;

    sleep(fx.lock_duration() + EXPIRY_SLACK).await;
    fx.assert_nothing(source.as_ref(), WAIT, "the message was dead-lettered").await;
    let dead = ok(CASE, "dead_letters", factory.dead_letters(&fx.queue).await);
    assert_eq!(dead.len(), 1, "{CASE}: one dead letter");
    let dead = &dead[0];
    assert_eq!(dead.reason, "MessageFormatIncorrect", "{CASE}: reason");
    assert_eq!(dead.description, "body is not JSON: poison", "{CASE}: description");
    assert_eq!(dead.message.id, "poison-1", "{CASE}: message id");
    assert_eq!(dead.message.body, "poison", "{CASE}: body");
    assert_eq!(dead.message.correlation_id.as_deref(), Some("c-poison"), "{CASE}: correlation");
    assert_eq!(dead.message.properties.get("origin").map(String::as_str), Some("test"));
}

/// Two consumers holding messages at the same time never hold the same one.
pub async fn concurrent_consumers_never_hold_same_message(factory: &dyn TransportFactory) {
    const CASE: &str = "concurrent_consumers_never_hold_same_message";
    let fx = Fixture::new(CASE, factory).await;
    for i in 0..20 {
        fx.send_text(&format!("shared-{i}")).await;
    }
    let a = fx.source().await;
    let b = fx.source().await;
    let (held_a, held_b) = tokio::join!(
        fx.receive_n(a.as_ref(), 10, PROMPTLY),
        fx.receive_n(b.as_ref(), 10, PROMPTLY)
    );
    let ids_a: HashSet<_> = held_a.iter().map(|d| d.message().id.clone()).collect();
    let ids_b: HashSet<_> = held_b.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids_a.len(), held_a.len(), "{CASE}: one consumer got a message twice");
    assert_eq!(ids_b.len(), held_b.len(), "{CASE}: one consumer got a message twice");
    let both: Vec<_> = ids_a.intersection(&ids_b).collect();
    assert!(both.is_empty(), "{CASE}: both consumers hold {both:?}");
    assert_eq!(ids_a.len() + ids_b.len(), 20, "{CASE}: all messages handed out");
    for delivery in held_a.into_iter().chain(held_b) {
        settle(CASE, "complete", delivery.complete()).await;
    }
}

/// Messages of one session come one at a time and in order: the next only after the
/// previous is settled, an abandoned one again before its successors; other sessions
/// are not blocked.
pub async fn sessions_deliver_in_order_one_lock_per_session(factory: &dyn TransportFactory) {
    const CASE: &str = "sessions_deliver_in_order_one_lock_per_session";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    for i in 0..3 {
        for session in ["s1", "s2"] {
            let id = format!("{session}-{i}");
            fx.send(OutgoingMessage::new(id.clone()).with_message_id(id).with_session_id(session))
                .await;
        }
    }
    let source = fx.source().await;
    let other = fx.source().await;
    let mut next = BTreeMap::from([("s1".to_owned(), 0), ("s2".to_owned(), 0)]);
    let mut abandoned_once = false;
    let deadline = Instant::now() + PROMPTLY * 3;
    while next.values().any(|n| *n < 3) {
        assert!(Instant::now() < deadline, "{CASE}: sessions not drained, at {next:?}");
        let batch = ok(CASE, "receive", source.receive(10, WAIT).await);
        let mut sessions = HashSet::new();
        for delivery in &batch {
            let message = delivery.message();
            let session = message.session_id.clone().unwrap_or_default();
            assert!(sessions.insert(session.clone()), "{CASE}: two locked messages of {session}");
            let expected = format!("{session}-{}", next[&session]);
            assert_eq!(message.id, expected, "{CASE}: order within {session}");
        }
        if !batch.is_empty() {
            fx.assert_nothing(other.as_ref(), Duration::from_millis(200), "sessions are locked")
                .await;
        }
        for delivery in batch {
            let message = delivery.message().clone();
            let session = message.session_id.clone().unwrap_or_default();
            if session == "s2" && next[&session] == 1 && !abandoned_once {
                abandoned_once = true;
                settle(CASE, "abandon", delivery.abandon(None)).await;
            } else {
                settle(CASE, "complete", delivery.complete()).await;
                *next.entry(session).or_default() += 1;
            }
        }
    }
    assert!(abandoned_once, "{CASE}: the abandon path ran");
}

/// A delivery dropped unsettled, with its consumer, is received again at the latest when
/// its lock expires.
pub async fn dropped_delivery_is_received_again(factory: &dyn TransportFactory) {
    const CASE: &str = "dropped_delivery_is_received_again";
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("dropped").await;
    let source = fx.source().await;
    let delivery = fx.receive_one(source.as_ref(), PROMPTLY).await;
    drop(delivery);
    drop(source);

    let again_source = fx.source().await;
    let again = fx.receive_one(again_source.as_ref(), fx.lock_duration() + PROMPTLY).await;
    assert_eq!(again.message().id, "dropped", "{CASE}: the same message");
    if fx.counts_deliveries() {
        assert_eq!(again.message().delivery_count, 2, "{CASE}: delivery count");
    }
    settle(CASE, "complete", again.complete()).await;
}

/// Receives cancelled at various points lose no message: a fresh consumer gets every
/// message within the lock duration + 1 s.
pub async fn cancelled_receive_loses_no_message(factory: &dyn TransportFactory) {
    const CASE: &str = "cancelled_receive_loses_no_message";
    let fx = Fixture::new(CASE, factory).await;
    let source = fx.source().await;
    // Cancelled while waiting on an empty queue.
    let waiting = timeout(Duration::from_millis(100), source.receive(10, Duration::from_secs(5)));
    assert!(waiting.await.is_err(), "{CASE}: receive on an empty queue returned early");
    for i in 0..5 {
        fx.send_text(&format!("cancelled-{i}")).await;
    }
    // Cancelled after its first poll, and after a few milliseconds of running.
    let _ = source.receive(10, WAIT).now_or_never();
    for millis in [1, 5, 20] {
        let _ = timeout(Duration::from_millis(millis), source.receive(2, WAIT)).await;
    }
    drop(source);

    let fresh = fx.source().await;
    // A fresh consumer must see every message within the lock duration + 1 s; real
    // brokers get a little more for the round trips themselves.
    let deadline = Instant::now() + fx.lock_duration() + EXPIRY_SLACK + Duration::from_secs(2);
    let mut ids = HashSet::new();
    while ids.len() < 5 && Instant::now() < deadline {
        let wait = WAIT.min(deadline.saturating_duration_since(Instant::now()));
        for delivery in ok(CASE, "receive", fresh.receive(5, wait).await) {
            ids.insert(delivery.message().id.clone());
            // Settled at once: a message that came back early must not lose its lock
            // while the ones the cancelled receives still hold wait out theirs.
            settle(CASE, "complete", delivery.complete()).await;
        }
    }
    assert_eq!(ids.len(), 5, "{CASE}: messages lost, only {ids:?} came back");
}

/// 1,000 messages received by 4 concurrent consumers that complete them: each message
/// exactly once.
pub async fn many_messages_each_received_exactly_once(factory: &dyn TransportFactory) {
    const CASE: &str = "many_messages_each_received_exactly_once";
    const TOTAL: usize = 1000;
    let fx = Fixture::new(CASE, factory).await;
    for i in 0..TOTAL {
        fx.send(OutgoingMessage::new(format!("{i}")).with_message_id(format!("many-{i}"))).await;
    }
    let mut sources = Vec::new();
    for _ in 0..4 {
        sources.push(fx.source().await);
    }
    let seen = std::sync::Mutex::new(Vec::with_capacity(TOTAL));
    let deadline = Instant::now() + Duration::from_secs(120);
    futures::future::join_all(sources.iter().map(|s| consume(s.as_ref(), &seen, deadline))).await;
    let seen = seen.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "{CASE}: some messages were received twice");
    assert_eq!(seen.len(), TOTAL, "{CASE}: messages missing");
}

/// Receives and completes until `TOTAL` ids are in `seen` or the deadline passes.
async fn consume(
    source: &dyn MessageSource,
    seen: &std::sync::Mutex<Vec<String>>,
    deadline: Instant,
) {
    const CASE: &str = "many_messages_each_received_exactly_once";
    let done = || seen.lock().map_or(true, |s| s.len() >= 1000);
    while !done() && Instant::now() < deadline {
        let batch = ok(CASE, "receive", source.receive(32, Duration::from_millis(500)).await);
        for delivery in batch {
            let id = delivery.message().id.clone();
            settle(CASE, "complete", delivery.complete()).await;
            if let Ok(mut seen) = seen.lock() {
                seen.push(id);
            }
        }
    }
}

/// After `stop_receiving`, messages the consumer buffered go to another consumer at
/// once, and deliveries it already returned can still be settled.
pub async fn stop_receiving_releases_buffered_messages(factory: &dyn TransportFactory) {
    const CASE: &str = "stop_receiving_releases_buffered_messages";
    let fx = Fixture::new(CASE, factory).await;
    for i in 0..10 {
        fx.send_text(&format!("buffered-{i}")).await;
    }
    let first = fx.source().await;
    let held = fx.receive_one(first.as_ref(), PROMPTLY).await;
    ok(CASE, "stop_receiving", first.stop_receiving().await);
    // Settled before anything else can take time, well within its lock.
    settle(CASE, "complete of a delivery returned before stop_receiving", held.complete()).await;

    let second = fx.source().await;
    // "At once": well before any lock could expire.
    let rest = fx.receive_n(second.as_ref(), 9, Duration::from_secs(3)).await;
    assert_eq!(rest.len(), 9, "{CASE}: the other messages were not released at once");
    for delivery in rest {
        settle(CASE, "complete", delivery.complete()).await;
    }
}

/// Sending to a queue that does not exist is `NotFound`, never a silent success.
pub async fn send_to_missing_queue_returns_not_found(factory: &dyn TransportFactory) {
    const CASE: &str = "send_to_missing_queue_returns_not_found";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let Some(missing) = factory.missing_queue() else { return };
    let sink = ok(CASE, "sink", factory.sink().await);
    let result = sink.send(&missing, OutgoingMessage::new("nowhere")).await;
    assert!(
        matches!(result, Err(TransportError::NotFound { .. })),
        "{CASE}: send to {missing} returned {result:?}, not NotFound"
    );
}

/// A broken receive path surfaces as an error within seconds instead of hanging, and
/// loses no message.
pub async fn receive_fault_surfaces_as_error(factory: &dyn TransportFactory) {
    const CASE: &str = "receive_fault_surfaces_as_error";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let Some(faults) = factory.faults() else { return };
    let fx = Fixture::new(CASE, factory).await;
    let source = fx.source().await;
    fx.send_text("survivor").await;
    ok(CASE, "break_receive", faults.break_receive(&fx.queue).await);

    let deadline = Instant::now() + PROMPTLY;
    let mut outcome = None;
    while Instant::now() < deadline {
        match timeout(PROMPTLY, source.receive(10, WAIT)).await {
            Err(_) => panic!("{CASE}: receive hung after the fault"),
            Ok(Err(error)) => {
                outcome = Some(error);
                break;
            }
            // The fault may take a moment to reach the consumer; a message received in
            // the meantime goes back.
            Ok(Ok(batch)) => {
                for delivery in batch {
                    let _ = delivery.abandon(None).await;
                }
            }
        }
    }
    assert!(outcome.is_some(), "{CASE}: the fault never surfaced as an error");
    drop(source);

    let fresh = fx.source().await;
    let again = fx.receive_one(fresh.as_ref(), fx.lock_duration() + PROMPTLY).await;
    assert_eq!(again.message().id, "survivor", "{CASE}: the message survived the fault");
    settle(CASE, "complete", again.complete()).await;
}

/// The delivery count keeps growing through an abandon with delay.
pub async fn delivery_count_survives_delayed_abandon(factory: &dyn TransportFactory) {
    const CASE: &str = "delivery_count_survives_delayed_abandon";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("counted").await;
    let source = fx.source().await;
    let first = fx.receive_one(source.as_ref(), PROMPTLY).await;
    assert_eq!(first.message().delivery_count, 1, "{CASE}: first delivery");
    settle(CASE, "abandon", first.abandon(None)).await;
    let second = fx.receive_one(source.as_ref(), PROMPTLY).await;
    assert_eq!(second.message().delivery_count, 2, "{CASE}: after an abandon");
    settle(CASE, "abandon with delay", second.abandon(Some(Duration::from_secs(1)))).await;
    let third = fx.receive_one(source.as_ref(), PROMPTLY).await;
    assert_eq!(third.message().id, "counted", "{CASE}: the same message");
    assert_eq!(third.message().delivery_count, 3, "{CASE}: after an abandon with delay");
    settle(CASE, "complete", third.complete()).await;
}

/// Renewing a lock that already expired is `LockLost`, and does not take the lock back:
/// another consumer gets the message, and the stale delivery can settle nothing.
pub async fn renew_after_lock_expiry_returns_lock_lost(factory: &dyn TransportFactory) {
    const CASE: &str = "renew_after_lock_expiry_returns_lock_lost";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("expired").await;
    let source = fx.source().await;
    let held = fx.receive_one(source.as_ref(), PROMPTLY).await;
    sleep(fx.lock_duration() + EXPIRY_SLACK).await;
    match held.renew_lock().await {
        Err(TransportError::LockLost { .. }) => {}
        other => {
            panic!("{CASE}: renew_lock after the lock expired returned {other:?}, not LockLost")
        }
    }
    let other = fx.source().await;
    let again = fx.receive_one(other.as_ref(), PROMPTLY).await;
    assert_eq!(again.message().id, "expired", "{CASE}: the failed renewal kept the message");
    if fx.counts_deliveries() {
        assert_eq!(again.message().delivery_count, 2, "{CASE}: delivery count");
    }
    match held.complete().await {
        Err(TransportError::LockLost { .. }) => {}
        other => panic!("{CASE}: complete after a failed renewal returned {other:?}, not LockLost"),
    }
    ok(CASE, "renew_lock by the new holder", again.renew_lock().await);
    settle(CASE, "complete by the new holder", again.complete()).await;
}

/// Asserts that `locked_until` lies after now and at most a lock duration plus slack
/// after `asked_at`, the moment the receive or renewal was asked for.
fn assert_lock_window(
    case: &str,
    what: &str,
    locked_until: Option<Instant>,
    asked_at: Instant,
    lock: Duration,
) {
    let Some(until) = locked_until else {
        panic!("{case}: {what}: a timed lock has an expiry");
    };
    let now = Instant::now();
    assert!(until > now, "{case}: {what}: the lock ends {:?} before now", now - until);
    let latest = asked_at + lock + EXPIRY_SLACK;
    assert!(
        until <= latest,
        "{case}: {what}: the lock ends {:?} after the lock duration {lock:?} plus slack",
        until - (asked_at + lock)
    );
}

/// `locked_until` lies between now and now + the lock duration + slack, at receive and
/// after each renewal, and the delivery reports what the renewal returned.
pub async fn locked_until_lies_within_the_lock_duration(factory: &dyn TransportFactory) {
    const CASE: &str = "locked_until_lies_within_the_lock_duration";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("window").await;
    let source = fx.source().await;
    let lock = fx.lock_duration();
    let asked_at = Instant::now();
    let held = fx.receive_one(source.as_ref(), PROMPTLY).await;
    assert_lock_window(CASE, "at receive", held.locked_until(), asked_at, lock);
    for renewal in 1..=3 {
        sleep(lock / 3).await;
        let asked_at = Instant::now();
        let renewed = ok(CASE, "renew_lock", held.renew_lock().await);
        let what = format!("renewal {renewal}");
        assert_lock_window(CASE, &what, renewed, asked_at, lock);
        assert_eq!(
            held.locked_until(),
            renewed,
            "{CASE}: {what}: locked_until is the renewed expiry"
        );
    }
    settle(CASE, "complete", held.complete()).await;
}

/// Ten deliveries held by one consumer, settled all at once in reverse order: the even
/// ones completed, the odd ones abandoned. Each settlement applies to its own message
/// (what batched acknowledgements must survive): the odd ones come back, once each,
/// the even ones never.
pub async fn out_of_order_concurrent_settlements_each_apply_to_their_message(
    factory: &dyn TransportFactory,
) {
    const CASE: &str = "out_of_order_concurrent_settlements_each_apply_to_their_message";
    let fx = Fixture::new(CASE, factory).await;
    for i in 0..10 {
        fx.send_text(&format!("m{i}")).await;
    }
    let source = fx.source().await;
    let mut held = fx.receive_n(source.as_ref(), 10, PROMPTLY).await;
    assert_eq!(held.len(), 10, "{CASE}: received the ten messages");
    held.sort_by_key(|d| d.message().id[1..].parse::<u32>().unwrap_or(u32::MAX));
    let settlements = held.into_iter().rev().map(|delivery| {
        let id = delivery.message().id.clone();
        let even = id[1..].parse::<u32>().is_ok_and(|n| n % 2 == 0);
        async move {
            let result =
                if even { delivery.complete().await } else { delivery.abandon(None).await };
            (id, result)
        }
    });
    for (id, result) in futures::future::join_all(settlements).await {
        ok(CASE, &format!("settlement of {id}"), result);
    }

    let odd: HashSet<String> = (0..10).filter(|n| n % 2 == 1).map(|n| format!("m{n}")).collect();
    let back = fx.receive_n(source.as_ref(), 5, PROMPTLY).await;
    let back_ids: HashSet<String> = back.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(back.len(), 5, "{CASE}: the abandoned messages came back as {back_ids:?}");
    assert_eq!(back_ids, odd, "{CASE}: exactly the abandoned messages came back");
    if fx.counts_deliveries() {
        for delivery in &back {
            let count = delivery.message().delivery_count;
            assert_eq!(count, 2, "{CASE}: delivery count of {}", delivery.message().id);
        }
    }
    for delivery in back {
        settle(CASE, "complete", delivery.complete()).await;
    }
    sleep(fx.lock_duration() + EXPIRY_SLACK).await;
    let other = fx.source().await;
    fx.assert_nothing(other.as_ref(), WAIT, "every message was completed").await;
}

/// Two messages abandoned with different delays, the longer first: the shorter comes
/// back first, neither before its delay, and messages waiting without a delay are
/// received meanwhile, before either.
pub async fn shorter_delay_returns_first_while_undelayed_messages_flow(
    factory: &dyn TransportFactory,
) {
    const CASE: &str = "shorter_delay_returns_first_while_undelayed_messages_flow";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    // One second and four: different delay buckets where the transport has them.
    let (short, long) = (Duration::from_secs(1), Duration::from_secs(4));
    let fx = Fixture::new(CASE, factory).await;
    for id in ["long", "short", "now-1", "now-2"] {
        fx.send_text(id).await;
    }
    let source = fx.source().await;
    let delayed = fx.receive_n(source.as_ref(), 2, PROMPTLY).await;
    let ids: Vec<_> = delayed.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids, ["long", "short"], "{CASE}: received the first two in order");
    let Ok([first, second]) = <[Delivery; 2]>::try_from(delayed) else {
        panic!("{CASE}: expected two deliveries");
    };
    let abandoned_at = Instant::now();
    settle(CASE, "abandon with the long delay", first.abandon(Some(long))).await;
    settle(CASE, "abandon with the short delay", second.abandon(Some(short))).await;

    let mut arrived = Vec::new();
    let deadline = abandoned_at + long + PROMPTLY;
    while arrived.len() < 4 && Instant::now() < deadline {
        let wait = WAIT.min(deadline.saturating_duration_since(Instant::now()));
        for delivery in ok(CASE, "receive", source.receive(4, wait).await) {
            let id = delivery.message().id.clone();
            let waited = abandoned_at.elapsed();
            let delay = match id.as_str() {
                "long" => long,
                "short" => short,
                _ => Duration::ZERO,
            };
            assert!(waited >= delay, "{CASE}: {id} came back after {waited:?}, before {delay:?}");
            settle(CASE, "complete", delivery.complete()).await;
            arrived.push(id);
        }
    }
    assert_eq!(arrived.len(), 4, "{CASE}: only {arrived:?} arrived");
    let position = |id: &str| arrived.iter().position(|a| a == id);
    assert!(position("short") < position("long"), "{CASE}: arrival order {arrived:?}");
    for undelayed in ["now-1", "now-2"] {
        assert!(
            position(undelayed) < position("short"),
            "{CASE}: {undelayed} waited behind a delayed message: arrival order {arrived:?}"
        );
    }
}

/// A message abandoned 11 times is delivered a 12th time: whatever delivery limit the
/// broker has lies above the updater's default `max_deliveries` (10), so the updater,
/// not the broker, dead-letters a message delivered too often, with its own reason.
pub async fn broker_delivery_limit_lies_above_max_deliveries(factory: &dyn TransportFactory) {
    const CASE: &str = "broker_delivery_limit_lies_above_max_deliveries";
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("persistent").await;
    let source = fx.source().await;
    for delivery in 1..=12u32 {
        let got = fx.receive_one(source.as_ref(), PROMPTLY).await;
        assert_eq!(got.message().id, "persistent", "{CASE}: delivery {delivery}");
        if fx.counts_deliveries() {
            assert_eq!(got.message().delivery_count, delivery, "{CASE}: delivery count");
        }
        if delivery < 12 {
            settle(CASE, "abandon", got.abandon(None)).await;
        } else {
            settle(CASE, "complete", got.complete()).await;
        }
    }
    let dead = ok(CASE, "dead_letters", factory.dead_letters(&fx.queue).await);
    assert!(dead.is_empty(), "{CASE}: the broker dead-lettered {dead:?}");
}

/// The description of a dead letter comes back exactly, whatever it holds: non-ASCII
/// text, quotes, backslashes, newlines, over 1 KiB. The session id, content type and
/// delivery count the message had are kept.
pub async fn dead_letter_keeps_any_description_and_the_message_fields(
    factory: &dyn TransportFactory,
) {
    const CASE: &str = "dead_letter_keeps_any_description_and_the_message_fields";
    let fx = Fixture::new(CASE, factory).await;
    let line = "Zürich → Åre ☃ 𝄞 \"quoted\" 'single' back\\slash <tag> & 100%\r\n\ttabbed line\n";
    let description = line.repeat(16);
    assert!(description.len() > 1024, "{CASE}: the description is over 1 KiB");
    fx.send(
        OutgoingMessage::json(r#"{"poison":true}"#)
            .with_message_id("poison-2")
            .with_session_id("session-dl")
            .with_correlation_id("c-poison-2"),
    )
    .await;
    let source = fx.source().await;
    let first = fx.receive_one(source.as_ref(), PROMPTLY).await;
    settle(CASE, "abandon", first.abandon(None)).await;
    let second = fx.receive_one(source.as_ref(), PROMPTLY).await;
    let count = second.message().delivery_count;
    settle(CASE, "dead_letter", second.dead_letter("Rejected: ünïcode", &description)).await;

    let dead = ok(CASE, "dead_letters", factory.dead_letters(&fx.queue).await);
    assert_eq!(dead.len(), 1, "{CASE}: one dead letter");
    let dead = &dead[0];
    assert_eq!(dead.reason, "Rejected: ünïcode", "{CASE}: reason");
    assert!(
        dead.description == description,
        "{CASE}: description came back as {:?}",
        dead.description
    );
    assert_eq!(dead.message.id, "poison-2", "{CASE}: message id");
    assert_eq!(dead.message.body, r#"{"poison":true}"#, "{CASE}: body");
    assert_eq!(dead.message.session_id.as_deref(), Some("session-dl"), "{CASE}: session id");
    assert_eq!(dead.message.correlation_id.as_deref(), Some("c-poison-2"), "{CASE}: correlation");
    assert_eq!(
        dead.message.content_type.as_deref(),
        Some("application/json"),
        "{CASE}: content type"
    );
    if fx.counts_deliveries() {
        assert_eq!(count, 2, "{CASE}: delivery count before dead-lettering");
        assert_eq!(dead.message.delivery_count, count, "{CASE}: delivery count of the dead letter");
    }
}

fn session_message(session: &str, i: u32) -> OutgoingMessage {
    let id = format!("{session}-{i}");
    OutgoingMessage::new(id.clone()).with_message_id(id).with_session_id(session)
}

/// A session whose head was abandoned with a delay stays locked, for every consumer,
/// until the head comes back; other sessions flow meanwhile, and the head comes back
/// before its followers.
pub async fn session_stays_locked_across_consumers_through_a_delayed_abandon(
    factory: &dyn TransportFactory,
) {
    const CASE: &str = "session_stays_locked_across_consumers_through_a_delayed_abandon";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    for i in 0..2 {
        fx.send(session_message("held", i)).await;
    }
    fx.send(session_message("free", 0)).await;
    let first = fx.source().await;
    let head = fx.receive_one(first.as_ref(), PROMPTLY).await;
    assert_eq!(head.message().id, "held-0", "{CASE}: the head of the session");
    let delay = Duration::from_secs(3);
    let abandoned_at = Instant::now();
    settle(CASE, "abandon with delay", head.abandon(Some(delay))).await;

    let second = fx.source().await;
    let during = ok(CASE, "receive", second.receive(10, delay / 2).await);
    let ids: Vec<_> = during.iter().map(|d| d.message().id.clone()).collect();
    if abandoned_at.elapsed() < delay {
        assert_eq!(ids, ["free-0"], "{CASE}: only the other session flows during the delay");
    }
    for delivery in during {
        settle(CASE, "complete", delivery.complete()).await;
    }
    for consumer in [&first, &second] {
        if abandoned_at.elapsed() + WAIT < delay {
            fx.assert_nothing(consumer.as_ref(), WAIT, "the session waits for its delayed head")
                .await;
        }
    }
    let again = fx.receive_one(second.as_ref(), delay + PROMPTLY).await;
    assert_eq!(again.message().id, "held-0", "{CASE}: the head comes back before its followers");
    assert!(abandoned_at.elapsed() >= delay, "{CASE}: the head came back before its delay");
    fx.assert_nothing(first.as_ref(), Duration::from_millis(200), "the head holds its session")
        .await;
    settle(CASE, "complete", again.complete()).await;
    let next = fx.receive_one(first.as_ref(), PROMPTLY).await;
    assert_eq!(next.message().id, "held-1", "{CASE}: the follower after its head");
    settle(CASE, "complete", next.complete()).await;
}

/// A session's head whose lock expired goes, to another consumer, before the messages
/// that follow it.
pub async fn session_head_whose_lock_expired_comes_before_its_followers(
    factory: &dyn TransportFactory,
) {
    const CASE: &str = "session_head_whose_lock_expired_comes_before_its_followers";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let fx = Fixture::new(CASE, factory).await;
    for i in 0..3 {
        fx.send(session_message("s", i)).await;
    }
    let first = fx.source().await;
    let head = fx.receive_one(first.as_ref(), PROMPTLY).await;
    assert_eq!(head.message().id, "s-0", "{CASE}: the head of the session");

    let second = fx.source().await;
    let lock = fx.lock_duration();
    let again = fx.receive_one(second.as_ref(), lock + PROMPTLY).await;
    assert_eq!(again.message().id, "s-0", "{CASE}: the expired head before its followers");
    if fx.counts_deliveries() {
        assert_eq!(again.message().delivery_count, 2, "{CASE}: delivery count");
    }
    fx.assert_nothing(first.as_ref(), Duration::from_millis(200), "the head holds its session")
        .await;
    match head.complete().await {
        Err(TransportError::LockLost { .. }) => {}
        other => panic!("{CASE}: complete by the expired holder returned {other:?}, not LockLost"),
    }
    settle(CASE, "complete", again.complete()).await;
    for i in 1..3 {
        let next = fx.receive_one(first.as_ref(), PROMPTLY).await;
        assert_eq!(next.message().id, format!("s-{i}"), "{CASE}: order within the session");
        settle(CASE, "complete", next.complete()).await;
    }
}

/// After `stop_receiving` (called twice, which is safe), `receive` returns nothing,
/// waits its `wait` instead of spinning, and takes no message: another consumer gets
/// them all.
pub async fn receive_after_stop_receiving_takes_nothing(factory: &dyn TransportFactory) {
    const CASE: &str = "receive_after_stop_receiving_takes_nothing";
    let fx = Fixture::new(CASE, factory).await;
    let stopped = fx.source().await;
    // A receive first, so a pushing transport has started consuming.
    fx.assert_nothing(stopped.as_ref(), Duration::from_millis(100), "the queue is empty").await;
    for i in 0..3 {
        fx.send_text(&format!("after-stop-{i}")).await;
    }
    ok(CASE, "stop_receiving", stopped.stop_receiving().await);
    ok(CASE, "stop_receiving again", stopped.stop_receiving().await);
    for _ in 0..2 {
        let started = Instant::now();
        let got = timeout(WAIT + PROMPTLY, stopped.receive(10, WAIT)).await;
        let got = got.unwrap_or_else(|_| panic!("{CASE}: receive after stop_receiving hung"));
        let got = ok(CASE, "receive after stop_receiving", got);
        let ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
        assert!(ids.is_empty(), "{CASE}: a stopped source returned {ids:?}");
        let elapsed = started.elapsed();
        assert!(elapsed >= WAIT, "{CASE}: a stopped source's receive returned after {elapsed:?}");
    }
    let other = fx.source().await;
    let got = fx.receive_n(other.as_ref(), 3, PROMPTLY).await;
    assert_eq!(got.len(), 3, "{CASE}: another consumer gets every message");
    for delivery in got {
        settle(CASE, "complete", delivery.complete()).await;
    }
    ok(CASE, "stop_receiving after the end", stopped.stop_receiving().await);
}

/// A dead-letter that fails leaves its message to be received again soon: at once, or
/// when its lock expires, by its consumer or another, while its consumer stays
/// connected; not stranded with that consumer until its connection closes.
pub async fn failed_settlement_leaves_message_redeliverable(factory: &dyn TransportFactory) {
    const CASE: &str = "failed_settlement_leaves_message_redeliverable";
    if missing_requirement(factory, CASE).is_some() {
        return;
    }
    let Some(faults) = factory.faults() else { return };
    let fx = Fixture::new(CASE, factory).await;
    fx.send_text("unsettled").await;
    let source = fx.source().await;
    let held = fx.receive_one(source.as_ref(), PROMPTLY).await;
    ok(CASE, "break_dead_letter", faults.break_dead_letter(&fx.queue).await);
    let result = held.dead_letter("Broken", "the dead-letter fails").await;
    assert!(result.is_err(), "{CASE}: the dead-letter succeeded despite the fault");

    // A pushing broker may hand the message back to the same consumer: poll both.
    let other = fx.source().await;
    let deadline = Instant::now() + fx.lock_duration() + PROMPTLY;
    let mut again = Vec::new();
    while again.is_empty() && Instant::now() < deadline {
        for consumer in [&source, &other] {
            let wait = (WAIT / 2).min(deadline.saturating_duration_since(Instant::now()));
            again.extend(ok(CASE, "receive", consumer.receive(1, wait).await));
        }
    }
    let ids: Vec<_> = again.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids, ["unsettled"], "{CASE}: the message is received again, and once");
    for delivery in again {
        if fx.counts_deliveries() {
            assert_eq!(delivery.message().delivery_count, 2, "{CASE}: delivery count");
        }
        settle(CASE, "complete", delivery.complete()).await;
    }
    for consumer in [&source, &other] {
        fx.assert_nothing(consumer.as_ref(), WAIT, "the message was completed").await;
    }
}

/// The dead-letter queues of `factory`, or `None` after printing why the case skips.
fn dead_letter_queues(
    factory: &dyn TransportFactory,
    case: &str,
) -> Option<Arc<dyn DeadLetterQueues>> {
    if missing_requirement(factory, case).is_some() {
        return None;
    }
    factory.dead_letter_queues()
}

/// Sends `n` messages `<prefix>-<i>` (each with a correlation id and the property
/// `origin`), receives them and dead-letters them in that order with reason `Invalid`
/// and description `bad <id>`; returns their ids, in that order.
async fn dead_letter_in_order(fx: &Fixture<'_>, prefix: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for id in &ids {
        fx.send(
            OutgoingMessage::new(format!("body of {id}"))
                .with_message_id(id)
                .with_correlation_id(format!("c-{id}"))
                .with_property("origin", "conformance"),
        )
        .await;
    }
    let source = fx.source().await;
    let mut held: BTreeMap<String, Delivery> = fx
        .receive_n(source.as_ref(), n, PROMPTLY)
        .await
        .into_iter()
        .map(|delivery| (delivery.message().id.clone(), delivery))
        .collect();
    assert_eq!(held.len(), n, "{}: received every message to dead-letter", fx.case);
    for id in &ids {
        let delivery =
            held.remove(id).unwrap_or_else(|| panic!("{}: {id} was not received", fx.case));
        settle(fx.case, "dead_letter", delivery.dead_letter("Invalid", &format!("bad {id}"))).await;
    }
    ok(fx.case, "stop_receiving", source.stop_receiving().await);
    ids
}

fn dead_ids(dead: &[DeadLetter]) -> Vec<String> {
    dead.iter().map(|d| d.message.id.clone()).collect()
}

/// Peeking a dead-letter queue, part of it or all of it and again, shows its messages
/// oldest first with their reason, description, body and properties, and leaves every
/// one of them there in the same order.
pub async fn peek_dead_letters_loses_and_reorders_nothing(factory: &dyn TransportFactory) {
    const CASE: &str = "peek_dead_letters_loses_and_reorders_nothing";
    let Some(dlqs) = dead_letter_queues(factory, CASE) else { return };
    let fx = Fixture::new(CASE, factory).await;
    let ids = dead_letter_in_order(&fx, "peeked", 5).await;

    let first = ok(CASE, "peek 3", dlqs.peek(&fx.queue, 3).await);
    assert_eq!(dead_ids(&first), ids[..3], "{CASE}: the first three, oldest first");
    for dead in &first {
        let id = &dead.message.id;
        assert_eq!(dead.reason, "Invalid", "{CASE}: reason of {id}");
        assert_eq!(dead.description, format!("bad {id}"), "{CASE}: description of {id}");
        assert_eq!(dead.message.body, format!("body of {id}"), "{CASE}: body of {id}");
        assert_eq!(dead.message.correlation_id, Some(format!("c-{id}")), "{CASE}: correlation");
        assert_eq!(
            dead.message.properties.get("origin").map(String::as_str),
            Some("conformance"),
            "{CASE}: properties of {id}"
        );
    }
    let mut counts = None;
    for round in 0..3 {
        let all = ok(CASE, "peek all", dlqs.peek(&fx.queue, 100).await);
        assert_eq!(dead_ids(&all), ids, "{CASE}: peek {round} shows every message in order");
        let now: Vec<u32> = all.iter().map(|d| d.message.delivery_count).collect();
        if !dlqs.peek_counts_as_delivery() {
            if let Some(before) = counts.replace(now.clone()) {
                assert_eq!(now, before, "{CASE}: a true peek leaves delivery counts alone");
            }
        }
        assert_eq!(ok(CASE, "count", dlqs.count(&fx.queue).await), 5, "{CASE}: count");
    }
    assert!(ok(CASE, "peek 0", dlqs.peek(&fx.queue, 0).await).is_empty(), "{CASE}: peek 0");
    let read = ok(CASE, "dead_letters", fx.factory.dead_letters(&fx.queue).await);
    assert_eq!(dead_ids(&read), ids, "{CASE}: the dead-letter queue still holds all, in order");
}

/// A redrive sends the chosen dead letters back to their queue, where they are received
/// with their body and properties, a fresh delivery count and a redriven count; the
/// others stay. Redriven and dead-lettered again, a message counts two redrives.
pub async fn redriven_dead_letters_are_received_afresh(factory: &dyn TransportFactory) {
    const CASE: &str = "redriven_dead_letters_are_received_afresh";
    let Some(dlqs) = dead_letter_queues(factory, CASE) else { return };
    let fx = Fixture::new(CASE, factory).await;
    let ids = dead_letter_in_order(&fx, "redriven", 3).await;

    let chosen = Redrive::Ids([ids[0].clone(), ids[2].clone(), "not-there".to_owned()].into());
    assert_eq!(ok(CASE, "redrive", dlqs.redrive(&fx.queue, &chosen).await), 2, "{CASE}: redriven");
    assert_eq!(ok(CASE, "count", dlqs.count(&fx.queue).await), 1, "{CASE}: one left");
    let left = ok(CASE, "peek", dlqs.peek(&fx.queue, 10).await);
    assert_eq!(dead_ids(&left), ids[1..2], "{CASE}: the one not chosen stays");

    let source = fx.source().await;
    let mut got = fx.receive_n(source.as_ref(), 2, PROMPTLY).await;
    got.sort_by(|a, b| a.message().id.cmp(&b.message().id));
    let got_ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(got_ids, [ids[0].clone(), ids[2].clone()], "{CASE}: the chosen come back");
    for delivery in &got {
        let message = delivery.message();
        let id = &message.id;
        assert_eq!(message.body, format!("body of {id}"), "{CASE}: body of {id}");
        assert_eq!(message.correlation_id, Some(format!("c-{id}")), "{CASE}: correlation");
        assert_eq!(message.properties.get("origin").map(String::as_str), Some("conformance"));
        assert_eq!(
            message.properties.get(REDRIVEN_PROPERTY).map(String::as_str),
            Some("1"),
            "{CASE}: {id} says it was redriven once"
        );
        if fx.counts_deliveries() {
            assert_eq!(message.delivery_count, 1, "{CASE}: {id} has a fresh delivery count");
        }
    }
    let mut got = got.into_iter();
    if let (Some(first), Some(second)) = (got.next(), got.next()) {
        settle(CASE, "dead_letter again", first.dead_letter("Invalid", "again")).await;
        settle(CASE, "complete", second.complete()).await;
    }

    let all = ok(CASE, "redrive all", dlqs.redrive(&fx.queue, &Redrive::All).await);
    assert_eq!(all, 2, "{CASE}: redrive all takes the rest");
    assert_eq!(ok(CASE, "count", dlqs.count(&fx.queue).await), 0, "{CASE}: none left");
    let again = fx.receive_n(source.as_ref(), 2, PROMPTLY).await;
    let mut redriven: Vec<(String, Option<String>)> = again
        .iter()
        .map(|d| (d.message().id.clone(), d.message().properties.get(REDRIVEN_PROPERTY).cloned()))
        .collect();
    redriven.sort();
    assert_eq!(
        redriven,
        [(ids[0].clone(), Some("2".to_owned())), (ids[1].clone(), Some("1".to_owned()))],
        "{CASE}: redriven counts"
    );
    for delivery in again {
        settle(CASE, "complete", delivery.complete()).await;
    }
    fx.assert_nothing(source.as_ref(), WAIT, "every redriven message was completed").await;
}

/// Purging removes exactly the chosen dead letters, for good; unknown ids are ignored.
pub async fn purged_dead_letters_are_gone(factory: &dyn TransportFactory) {
    const CASE: &str = "purged_dead_letters_are_gone";
    let Some(dlqs) = dead_letter_queues(factory, CASE) else { return };
    let fx = Fixture::new(CASE, factory).await;
    let ids = dead_letter_in_order(&fx, "purged", 3).await;

    let chosen: BTreeSet<String> = [ids[1].clone(), "not-there".to_owned()].into();
    assert_eq!(ok(CASE, "purge", dlqs.purge(&fx.queue, &chosen).await), 1, "{CASE}: purged");
    let left = ok(CASE, "peek", dlqs.peek(&fx.queue, 10).await);
    assert_eq!(dead_ids(&left), [ids[0].clone(), ids[2].clone()], "{CASE}: the others stay");
    let rest: BTreeSet<String> = [ids[0].clone(), ids[2].clone()].into();
    assert_eq!(ok(CASE, "purge rest", dlqs.purge(&fx.queue, &rest).await), 2, "{CASE}: purged");
    assert_eq!(ok(CASE, "count", dlqs.count(&fx.queue).await), 0, "{CASE}: none left");
    let source = fx.source().await;
    fx.assert_nothing(source.as_ref(), WAIT, "purged messages are not redriven").await;
}

/// Two redrives of every dead letter at once send each message back exactly once
/// between them.
pub async fn concurrent_redrives_never_duplicate(factory: &dyn TransportFactory) {
    const CASE: &str = "concurrent_redrives_never_duplicate";
    let Some(dlqs) = dead_letter_queues(factory, CASE) else { return };
    let fx = Fixture::new(CASE, factory).await;
    let ids = dead_letter_in_order(&fx, "raced", 10).await;

    let (a, b) = tokio::join!(
        dlqs.redrive(&fx.queue, &Redrive::All),
        dlqs.redrive(&fx.queue, &Redrive::All)
    );
    let (a, b) = (ok(CASE, "redrive a", a), ok(CASE, "redrive b", b));
    assert_eq!(a + b, ids.len(), "{CASE}: the two redrives sent {a} and {b}");
    let source = fx.source().await;
    let got = fx.receive_n(source.as_ref(), ids.len(), PROMPTLY).await;
    let mut got_ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
    got_ids.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(got_ids, expected, "{CASE}: each message comes back once");
    for delivery in got {
        settle(CASE, "complete", delivery.complete()).await;
    }
    fx.assert_nothing(source.as_ref(), WAIT, "no message came back twice").await;
    assert_eq!(ok(CASE, "count", dlqs.count(&fx.queue).await), 0, "{CASE}: none left");
}
