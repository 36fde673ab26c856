//! Fault injection for dispositions and renewals, lock expiry on demand and the broker
//! without sessions, one test each, under paused time.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use steward_core::{Delivery, ErrorKind, MessageSink, MessageSource, OutgoingMessage};
use steward_inmem::{InMemoryBroker, InMemorySource, QueueOptions};
use tokio::time::{Instant, sleep, timeout};

const WAIT: Duration = Duration::from_secs(1);
const LOCK: Duration = Duration::from_secs(30);

fn broker() -> InMemoryBroker {
    let broker = InMemoryBroker::builder().with_strict(true).build();
    broker.declare_queue("q", QueueOptions::default().with_lock_duration(LOCK));
    broker
}

async fn send(broker: &InMemoryBroker, id: &str, session: Option<&str>) {
    let mut message = OutgoingMessage::new(id.to_owned()).with_message_id(id);
    message.session_id = session.map(str::to_owned);
    broker.send("q", message).await.unwrap();
}

/// A broker on which `ids` were sent, a source on it and the deliveries of `ids`, locked.
async fn holding(ids: &[&str]) -> (InMemoryBroker, InMemorySource, Vec<Delivery>) {
    let broker = broker();
    for id in ids {
        send(&broker, id, None).await;
    }
    let source = broker.source("q").unwrap();
    let got = source.receive(ids.len(), WAIT).await.unwrap();
    assert_eq!(got.len(), ids.len());
    (broker, source, got)
}

/// Ensures that failing renewals leave dispositions alone, and failing dispositions
/// leave renewals alone.
#[tokio::test(start_paused = true)]
async fn renewal_and_disposition_failures_are_separate() {
    let (broker, _source, mut got) = holding(&["a", "b"]).await;
    let b = got.pop().unwrap();
    let a = got.pop().unwrap();

    broker.faults("q").fail_renewals(1, ErrorKind::Timeout);
    assert_eq!(a.renew_lock().await.unwrap_err().kind(), ErrorKind::Timeout);
    assert!(a.renew_lock().await.is_ok(), "one renewal failure was armed");

    broker.faults("q").fail_dispositions(1, ErrorKind::Connection);
    assert!(b.renew_lock().await.is_ok(), "renewals do not consume disposition failures");
    assert_eq!(a.complete().await.unwrap_err().kind(), ErrorKind::Connection);
    assert_eq!(broker.message_count("q"), 2, "the failed complete removed nothing");
    b.complete().await.unwrap();
    assert_eq!(broker.message_count("q"), 1);
}

/// Ensures that the older settlement failures still apply to dispositions and renewals
/// alike.
#[tokio::test(start_paused = true)]
async fn settlement_failures_still_cover_renewals() {
    let (broker, source, mut got) = holding(&["a"]).await;
    let a = got.pop().unwrap();
    broker.faults("q").fail_settlements(2, ErrorKind::Connection);
    assert!(a.renew_lock().await.is_err());
    assert_eq!(broker.locked_message_ids("q"), ["a"], "a failed renewal keeps the lock");
    assert!(a.complete().await.is_err());
    assert_eq!(broker.message_count("q"), 1);
    assert!(a_renewal_works(&source).await, "both armed failures were used");
}

async fn a_renewal_works(source: &impl MessageSource) -> bool {
    // The lock of the failed complete is still held: wait it out and take the message.
    let again = source.receive(1, LOCK * 2).await.unwrap().pop().unwrap();
    again.renew_lock().await.is_ok()
}

/// Ensures that a hung disposition takes no effect while hung, goes on when the hang
/// ends, and does not hold up renewals.
#[tokio::test(start_paused = true)]
async fn hung_disposition_waits_until_released() {
    let (broker, _source, mut got) = holding(&["a", "b"]).await;
    let b = got.pop().unwrap();
    let a = got.pop().unwrap();
    broker.faults("q").hang_dispositions(true);

    let started = Instant::now();
    let completing = tokio::spawn(a.complete());
    sleep(Duration::from_secs(10)).await;
    assert!(!completing.is_finished());
    assert_eq!(broker.message_count("q"), 2, "a hung complete takes no effect");
    let renewed = b.renew_lock().await.unwrap().unwrap();
    assert_eq!(renewed, Instant::now() + LOCK, "renewals go on meanwhile");

    broker.faults("q").hang_dispositions(false);
    completing.await.unwrap().unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(10), "released at once");
    assert_eq!(broker.message_count("q"), 1);
}

/// Ensures that a hung renewal cancelled while it waits changes nothing, and that a
/// hung renewal's lock runs out meanwhile as on a broker that does not answer.
#[tokio::test(start_paused = true)]
async fn hung_renewal_lets_the_lock_expire() {
    let (broker, source, mut got) = holding(&["a"]).await;
    let a = got.pop().unwrap();
    broker.faults("q").hang_renewals(true);
    assert!(timeout(LOCK * 2, a.renew_lock()).await.is_err(), "hung past the lock");
    assert_eq!(broker.locked_message_ids("q"), Vec::<String>::new());
    broker.faults("q").clear();
    assert!(a.renew_lock().await.unwrap_err().is_lock_lost());
    let again = source.receive(1, WAIT).await.unwrap();
    assert_eq!(again[0].message().delivery_count, 2);
}

/// Ensures that a hung send stores nothing until released.
#[tokio::test(start_paused = true)]
async fn hung_send_stores_nothing_until_released() {
    let broker = broker();
    broker.faults("q").hang_sends(true);
    let sender = broker.clone();
    let sending = tokio::spawn(async move { send(&sender, "a", None).await });
    sleep(Duration::from_secs(5)).await;
    assert_eq!(broker.message_count("q"), 0);
    broker.faults("q").hang_sends(false);
    sending.await.unwrap();
    assert_eq!(broker.message_count("q"), 1);
}

/// Ensures that expiring locks on demand redelivers at once, refuses the old lock and
/// keeps the source working.
#[tokio::test(start_paused = true)]
async fn expire_locks_releases_messages_and_keeps_sources() {
    let (broker, source, mut got) = holding(&["a"]).await;
    let held = got.pop().unwrap();
    assert_eq!(broker.locked_message_ids("q"), ["a"]);
    broker.faults("q").expire_locks();
    assert!(broker.locked_message_ids("q").is_empty());

    let started = Instant::now();
    let again = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO, "available at once");
    assert_eq!(again.message().delivery_count, 2);
    assert!(held.renew_lock().await.unwrap_err().is_lock_lost());
    assert!(held.complete().await.unwrap_err().is_lock_lost());
    again.complete().await.unwrap();
    assert_eq!(broker.message_count("q"), 0);
}

/// Ensures that a broker without sessions hands out a session's messages together,
/// lets a delayed one hold nothing back, and claims no sessions.
#[tokio::test(start_paused = true)]
async fn broker_without_sessions_does_not_order_sessions() {
    let broker = InMemoryBroker::builder().with_strict(true).with_sessions(false).build();
    broker.declare_queue("q", QueueOptions::default().with_lock_duration(LOCK));
    for id in ["a1", "a2", "a3"] {
        send(&broker, id, Some("a")).await;
    }
    let source = broker.source("q").unwrap();
    assert!(!source.capabilities().sessions);
    let mut got = source.receive(10, WAIT).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|d| d.message().id.as_str()).collect();
    assert_eq!(ids, ["a1", "a2", "a3"], "all of the session at once");
    assert_eq!(got[0].message().session_id.as_deref(), Some("a"), "the id is still carried");

    let a3 = got.pop().unwrap();
    let a2 = got.pop().unwrap();
    let a1 = got.pop().unwrap();
    a1.abandon(Some(Duration::from_secs(60))).await.unwrap();
    a2.abandon(None).await.unwrap();
    let next = source.receive(10, WAIT).await.unwrap();
    assert_eq!(next[0].message().id, "a2", "the delayed head holds nothing back");
    a3.complete().await.unwrap();

    let with = InMemoryBroker::new();
    assert!(with.capabilities().sessions, "sessions are on by default");
}
