//! Single active consumer against the local RabbitMQ broker: several updaters (the
//! replicas of a service) on one queue, one receiving and the others standing by; a
//! standby's health, its take-over when the active one's connection closes or goes
//! silent, and a queue declared without the argument.
//!
//! Without a reachable broker each test prints one skip line and passes, unless
//! `CI=true`, where it fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use steward_core::{
    Backoff, ConsumerRole, ErrorKind, HealthHandle, Jitter, MessageSink, MessageSource, Outcome,
    OutgoingMessage, Supervisor, SupervisorConfig, Updater, UpdaterConfig, WorkerHealth,
    WorkerState, handler_fn,
};
use steward_rabbitmq::RabbitMq;
use tokio::time::{Instant, sleep};

use support::{PROMPTLY, require_broker};

/// What the replicas handled, in order: (replica, message id).
type Handled = Arc<Mutex<Vec<(String, String)>>>;

/// One replica: an updater of `queue` on `rabbit` under a supervisor of its own, with a
/// short wait and stall timeout.
struct Replica {
    name: String,
    supervisor: Supervisor,
    health: HealthHandle,
}

impl Replica {
    fn start(
        name: &str,
        rabbit: &RabbitMq,
        queue: &str,
        stall: Duration,
        handled: &Handled,
    ) -> Self {
        let handler = {
            let (handled, name) = (handled.clone(), name.to_owned());
            handler_fn(move |message| {
                let (handled, name) = (handled.clone(), name.clone());
                async move {
                    handled.lock().unwrap().push((name, message.id.clone()));
                    Outcome::Complete
                }
            })
        };
        let updater = Updater::new(name, support::connector(rabbit, queue), handler).with_config(
            UpdaterConfig::default()
                .with_wait(Duration::from_millis(100))
                .with_stall_timeout(stall),
        );
        let supervisor = Supervisor::new(
            SupervisorConfig::default().with_backoff(
                Backoff::new(Duration::from_millis(100), Duration::from_millis(400))
                    .with_jitter(Jitter::none()),
            ),
        );
        supervisor.spawn(updater);
        let health = supervisor.health();
        Self { name: name.to_owned(), supervisor, health }
    }

    fn worker(&self) -> WorkerHealth {
        self.health.snapshot().worker(&self.name).cloned().unwrap()
    }

    /// Waits until the worker runs with `role`.
    async fn reaches(&self, role: ConsumerRole) {
        let deadline = Instant::now() + PROMPTLY;
        loop {
            let worker = self.worker();
            if worker.state == WorkerState::Running && worker.role == Some(role) {
                return;
            }
            assert!(Instant::now() < deadline, "{} never {role}: {worker:?}", self.name);
            sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        let report = self.supervisor.shutdown(Instant::now() + Duration::from_secs(10)).await;
        assert!(report.overran.is_empty(), "{report:?}");
    }
}

/// A transport for `queue` (declared with a single active consumer) whose connections
/// are named `replica-<name> …`, at `url`, with a 1 s heartbeat.
fn replica_transport(name: &str, queue: &str, url: String) -> RabbitMq {
    support::builder()
        .with_url(url)
        .with_connection_name(format!("replica-{name}"))
        .with_queue(queue)
        .with_single_active_consumer(queue)
        .with_heartbeat(Duration::from_secs(1))
        .with_connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

async fn send(rabbit: &RabbitMq, queue: &str, id: &str) {
    rabbit
        .sink()
        .send(queue, OutgoingMessage::new(id.to_owned()).with_message_id(id))
        .await
        .unwrap();
}

/// Waits until `id` was handled; returns by which replica, and when.
async fn handled_by(handled: &Handled, id: &str) -> (String, Instant) {
    let deadline = Instant::now() + PROMPTLY;
    loop {
        if let Some((replica, _)) = handled.lock().unwrap().iter().find(|(_, m)| m == id) {
            return (replica.clone(), Instant::now());
        }
        assert!(Instant::now() < deadline, "{id} never handled: {:?}", handled.lock().unwrap());
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_without_the_argument_stops_the_start_naming_it() {
    require_broker!("a_queue_declared_without_the_argument_stops_the_start_naming_it");
    let plain = support::TestQueue::declare("steward-sac-plain", |b| b).await;
    let single = support::builder()
        .with_queue(&plain.name)
        .with_single_active_consumer(&plain.name)
        .build()
        .unwrap();
    let error = single.declare_topology().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Protocol, "{}", steward_core::error_chain(&error));
    assert!(!error.is_retryable());
    let text = steward_core::error_chain(&error);
    assert!(text.contains(&format!("queue {}", plain.name)), "{text}");
    assert!(text.contains("x-single-active-consumer"), "{text}");
    // And the other way round: a queue with the argument refuses a plain declare.
    let (name, builder) = support::unique_queue("steward-sac-on");
    let sac = builder.with_single_active_consumer(&name).build().unwrap();
    sac.declare_topology().await.unwrap();
    let _cleanup = Cleanup(sac);
    let plain_again = support::builder().with_queue(&name).build().unwrap();
    let text = steward_core::error_chain(&plain_again.declare_topology().await.unwrap_err());
    assert!(text.contains("x-single-active-consumer"), "{text}");
}

/// Ensures that of two replicas the second stands by: it is running, ready and live,
/// reports `standby`, and is neither stalled nor failed after ten stall timeouts, while
/// the first handles every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_waits_healthy_for_ten_stall_timeouts() {
    require_broker!("a_standby_waits_healthy_for_ten_stall_timeouts");
    let queue = steward_core::testkit::unique_name("steward-sac-standby");
    let url = support::broker_url();
    let a = replica_transport("a", &queue, url.clone());
    a.declare_topology().await.unwrap();
    let _cleanup = Cleanup(a.clone());
    let handled = Handled::default();
    let stall = Duration::from_millis(500);
    let first = Replica::start("first", &a, &queue, stall, &handled);
    first.reaches(ConsumerRole::Active).await;
    let second =
        Replica::start("second", &replica_transport("b", &queue, url), &queue, stall, &handled);
    second.reaches(ConsumerRole::Standby).await;

    for n in 0..20 {
        send(&a, &queue, &format!("m{n}")).await;
    }
    let waited = Instant::now();
    handled_by(&handled, "m19").await;
    sleep((stall * 10).saturating_sub(waited.elapsed())).await;

    let standby = second.worker();
    assert_eq!(standby.state, WorkerState::Running, "{standby:?}");
    assert_eq!(standby.restarts, 0, "{standby:?}");
    assert_eq!(standby.role, Some(ConsumerRole::Standby));
    assert_eq!(standby.outcomes.completed, 0, "{standby:?}");
    assert!(second.health.snapshot().is_ready() && second.health.snapshot().is_live());
    // The broker agrees: one consumer active, one waiting.
    let owned = queue.clone();
    let activity =
        tokio::task::spawn_blocking(move || support::consumer_activity(&owned)).await.unwrap();
    assert_eq!(activity, ["single_active", "waiting"]);
    let active = first.worker();
    assert_eq!((active.state, active.restarts), (WorkerState::Running, 0), "{active:?}");
    assert_eq!(active.outcomes.completed, 20);
    let order: Vec<String> = handled.lock().unwrap().iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(order, (0..20).map(|n| format!("m{n}")).collect::<Vec<_>>());
    first.stop().await;
    second.stop().await;
}

/// Ensures that consumers subscribing at the same time to a queue without an active
/// consumer report one `active` and one `standby`, and that the broker delivers to the
/// one that reports `active` (each of twenty pairs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_subscribing_together_report_one_active_and_one_standby() {
    require_broker!("consumers_subscribing_together_report_one_active_and_one_standby");
    for attempt in 0..20 {
        let (queue, builder) = support::unique_queue("steward-sac-together");
        let rabbit = builder.with_single_active_consumer(&queue).build().unwrap();
        rabbit.declare_topology().await.unwrap();
        let _cleanup = Cleanup(rabbit.clone());
        let (a, b) = tokio::join!(rabbit.source(&queue), rabbit.source(&queue));
        let (a, b) = (a.unwrap(), b.unwrap());
        let roles = [a.role(), b.role()];
        assert!(
            roles.contains(&Some(ConsumerRole::Active))
                && roles.contains(&Some(ConsumerRole::Standby)),
            "pair {attempt}: {roles:?}"
        );
        let (active, standby) =
            if a.role() == Some(ConsumerRole::Active) { (a, b) } else { (b, a) };
        send(&rabbit, &queue, "probe").await;
        let mut got = support::receive_n(&active, 1, PROMPTLY).await;
        let probe = got.pop().expect("the consumer reporting active receives the probe");
        probe.complete().await.unwrap();
        assert!(standby.receive(1, Duration::ZERO).await.unwrap().is_empty());
    }
}

/// Ensures that when the active consumer's connection closes while it holds messages
/// unsettled, the waiting one receives them first, in queue order, then the rest (what
/// keeps an operation's order across a killed replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_taking_over_receives_the_unsettled_messages_first_in_order() {
    require_broker!("a_standby_taking_over_receives_the_unsettled_messages_first_in_order");
    let queue = steward_core::testkit::unique_name("steward-sac-redeliver");
    let transport = |name: &str| {
        support::builder()
            .with_connection_name(format!("replica-{name}"))
            .with_queue(&queue)
            .with_single_active_consumer(&queue)
            .with_prefetch(8)
            .build()
            .unwrap()
    };
    let rabbit = transport("a");
    rabbit.declare_topology().await.unwrap();
    let _cleanup = Cleanup(rabbit.clone());
    let active = rabbit.source(&queue).await.unwrap();
    let standby = transport("b").source(&queue).await.unwrap();
    assert_eq!(
        (active.role(), standby.role()),
        (Some(ConsumerRole::Active), Some(ConsumerRole::Standby))
    );
    for n in 0..12 {
        send(&rabbit, &queue, &format!("m{n:02}")).await;
    }
    // The active one holds the first eight (its prefetch) and settles the first two.
    let mut held = support::receive_n(&active, 8, PROMPTLY).await;
    let ids: Vec<String> = held.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids, (0..8).map(|n| format!("m{n:02}")).collect::<Vec<_>>());
    let unsettled = held.split_off(2);
    for delivery in held {
        delivery.complete().await.unwrap();
    }
    // Its connection goes, as a killed process's does.
    let closed = support::close_connections_containing(&format!("replica-a source {queue}")).await;
    assert_eq!(closed, 1);
    let taken = support::receive_n(&standby, 8, PROMPTLY).await;
    let order: Vec<String> = taken.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(order, (2..10).map(|n| format!("m{n:02}")).collect::<Vec<_>>());
    assert_eq!(standby.role(), Some(ConsumerRole::Active));
    drop(unsettled);
    drop(active);
}

/// Ensures that a consumer that stops receiving (a graceful shutdown's drain) while its
/// handlers still hold messages does not let the standby handle later messages before
/// those are settled: the standby's first message is the first one not settled.
///
/// On RabbitMQ 3.10 a `basic.cancel` (or a client's own `connection.close`) would make
/// the broker activate the standby at once, which would then get the next ready
/// message (here m08) while m00 and m01 are still in flight and before m02..m07 came
/// back; so the source keeps its consumer until they are settled, then closes its
/// channel. See the crate docs, "Several replicas".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_graceful_stop_hands_the_standby_nothing_after_the_messages_still_in_flight() {
    require_broker!("a_graceful_stop_hands_the_standby_nothing_after_the_messages_still_in_flight");
    let queue = steward_core::testkit::unique_name("steward-sac-drain");
    let transport = |name: &str| {
        support::builder()
            .with_connection_name(format!("replica-{name}"))
            .with_queue(&queue)
            .with_single_active_consumer(&queue)
            .with_prefetch(8)
            .build()
            .unwrap()
    };
    let rabbit = transport("a");
    rabbit.declare_topology().await.unwrap();
    let _cleanup = Cleanup(rabbit.clone());
    let active = rabbit.source(&queue).await.unwrap();
    let standby = transport("b").source(&queue).await.unwrap();
    for n in 0..12 {
        send(&rabbit, &queue, &format!("m{n:02}")).await;
    }
    // Two handed out and still being handled when the drain begins; six buffered.
    let in_flight = support::receive_n(&active, 2, PROMPTLY).await;
    active.stop_receiving().await.unwrap();
    let first = support::receive_n(&standby, 1, Duration::from_secs(2)).await;
    let first: Vec<String> = first.iter().map(|d| d.message().id.clone()).collect();
    // Nothing may reach the standby before m00 and m01 are settled; once they are, m02.
    assert!(first.is_empty(), "the standby got {first:?} while m00 and m01 were in flight");
    for delivery in in_flight {
        delivery.complete().await.unwrap();
    }
    // Then the rest, in queue order: the buffered m02..m07 ahead of m08 and m09 (its
    // prefetch is eight).
    let rest = support::receive_n(&standby, 8, PROMPTLY).await;
    let rest: Vec<String> = rest.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(rest, (2..10).map(|n| format!("m{n:02}")).collect::<Vec<_>>());
    assert_eq!(standby.role(), Some(ConsumerRole::Active));
}

/// Ensures that a stopping consumer with a large buffer (more than 32 messages held)
/// whose handlers abandon one message and complete the others hands the standby the
/// abandoned one first, then the buffered ones, in queue order, then the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_returns_an_abandoned_and_a_large_buffer_first_in_order() {
    require_broker!("a_graceful_stop_returns_an_abandoned_and_a_large_buffer_first_in_order");
    let queue = steward_core::testkit::unique_name("steward-sac-drain-large");
    let transport = |name: &str| {
        support::builder()
            .with_connection_name(format!("replica-{name}"))
            .with_queue(&queue)
            .with_single_active_consumer(&queue)
            .with_prefetch(48)
            .build()
            .unwrap()
    };
    let rabbit = transport("a");
    rabbit.declare_topology().await.unwrap();
    let _cleanup = Cleanup(rabbit.clone());
    let active = rabbit.source(&queue).await.unwrap();
    let standby = transport("b").source(&queue).await.unwrap();
    for n in 0..60 {
        send(&rabbit, &queue, &format!("m{n:02}")).await;
    }
    let mut in_flight = support::receive_n(&active, 3, PROMPTLY).await;
    active.stop_receiving().await.unwrap();
    assert!(active.receive(10, Duration::ZERO).await.unwrap().is_empty());
    // m00 completes, m01 goes back (a retry without delay), m02 completes last.
    let last = in_flight.pop().unwrap();
    let abandoned = in_flight.pop().unwrap();
    in_flight.pop().unwrap().complete().await.unwrap();
    abandoned.abandon(None).await.unwrap();
    let early = support::receive_n(&standby, 1, Duration::from_millis(500)).await;
    assert!(
        early.is_empty(),
        "the standby got {:?} while m02 was in flight",
        early[0].message().id
    );
    last.complete().await.unwrap();
    // More than the standby's prefetch: it completes as it goes.
    let deadline = Instant::now() + PROMPTLY;
    let mut order = Vec::new();
    while order.len() < 58 && Instant::now() < deadline {
        for delivery in standby.receive(58, Duration::from_millis(200)).await.unwrap() {
            order.push(delivery.message().id.clone());
            delivery.complete().await.unwrap();
        }
    }
    let expected: Vec<String> =
        std::iter::once(1).chain(3..60).map(|n| format!("m{n:02}")).collect();
    assert_eq!(order, expected);
}

/// Ensures that when the active replica's connection closes (what a killed process's
/// does), the standby handles the next message, and reports `active`; prints the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_when_the_active_connection_closes() {
    require_broker!("the_standby_takes_over_when_the_active_connection_closes");
    let queue = steward_core::testkit::unique_name("steward-sac-close");
    let url = support::broker_url();
    let a = replica_transport("a", &queue, url.clone());
    a.declare_topology().await.unwrap();
    let _cleanup = Cleanup(a.clone());
    let handled = Handled::default();
    let stall = Duration::from_secs(5);
    let first = Replica::start("first", &a, &queue, stall, &handled);
    first.reaches(ConsumerRole::Active).await;
    let second =
        Replica::start("second", &replica_transport("b", &queue, url), &queue, stall, &handled);
    second.reaches(ConsumerRole::Standby).await;
    send(&a, &queue, "before").await;
    assert_eq!(handled_by(&handled, "before").await.0, "first");

    // Only the first replica's consumer connection.
    let closed = support::close_connections_containing(&format!("replica-a source {queue}")).await;
    assert_eq!(closed, 1);
    let closed_at = Instant::now();
    send(&a, &queue, "after").await;
    let (replica, at) = handled_by(&handled, "after").await;
    let failover = at - closed_at;
    println!("failover after a closed connection: {failover:?}");
    assert_eq!(replica, "second");
    assert!(failover <= Duration::from_secs(5), "took {failover:?}");
    second.reaches(ConsumerRole::Active).await;
    // The first reconnects, behind the second.
    first.reaches(ConsumerRole::Standby).await;
    first.stop().await;
    second.stop().await;
}

/// Ensures that when the active replica goes silent (no TCP close), the standby handles
/// the next message within 3 × the heartbeat + 2 s; prints the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_when_the_active_goes_silent() {
    require_broker!("the_standby_takes_over_when_the_active_goes_silent");
    let queue = steward_core::testkit::unique_name("steward-sac-silent");
    let proxy = support::SilentProxy::start().await;
    let a = replica_transport("a", &queue, proxy.url());
    let direct = replica_transport("b", &queue, support::broker_url());
    direct.declare_topology().await.unwrap();
    let _cleanup = Cleanup(direct.clone());
    let handled = Handled::default();
    let stall = Duration::from_secs(5);
    let first = Replica::start("first", &a, &queue, stall, &handled);
    first.reaches(ConsumerRole::Active).await;
    let second = Replica::start("second", &direct, &queue, stall, &handled);
    second.reaches(ConsumerRole::Standby).await;
    send(&direct, &queue, "before").await;
    assert_eq!(handled_by(&handled, "before").await.0, "first");

    proxy.freeze();
    let frozen_at = Instant::now();
    send(&direct, &queue, "after").await;
    let (replica, at) = handled_by(&handled, "after").await;
    let failover = at - frozen_at;
    println!("failover after the active replica went silent (heartbeat 1 s): {failover:?}");
    assert_eq!(replica, "second");
    let bound = Duration::from_secs(3 + 2);
    assert!(failover <= bound, "took {failover:?}, more than {bound:?}");
    second.reaches(ConsumerRole::Active).await;
    second.stop().await;
    // The first cannot reach the broker any more: its stop is not the point here.
    let _report = first.supervisor.shutdown(Instant::now() + Duration::from_secs(3)).await;
}

/// Deletes the topology when dropped.
struct Cleanup(RabbitMq);

impl Drop for Cleanup {
    fn drop(&mut self) {
        support::delete_topologies(vec![self.0.clone()]);
    }
}
