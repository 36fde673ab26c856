//! Faults against real servers: a server that goes away mid-stream, a consumer deleted
//! under a running source, refused credentials, and topology that exists with other
//! settings. Servers the tests stop are private ones on free ports; the shared server
//! only ever gets uniquely named streams, deleted afterwards (also when a test fails).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::stream::{self, RetentionPolicy};
use steward_core::{ErrorKind, MessageSink, MessageSource, OutgoingMessage, error_chain};
use steward_nats::{Credentials, NatsBuilder};
use support::PrivateServer;
use tokio::time::Instant;

/// Receives until `n` distinct messages arrived or `within` passed, completing each.
async fn drain(source: &dyn MessageSource, n: usize, within: Duration) -> HashSet<String> {
    let deadline = Instant::now() + within;
    let mut ids = HashSet::new();
    while ids.len() < n && Instant::now() < deadline {
        for delivery in source.receive(n, Duration::from_millis(500)).await.unwrap() {
            ids.insert(delivery.message().id.clone());
            delivery.complete().await.unwrap();
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_gone_mid_stream_fails_receive_retryably_and_loses_nothing() {
    let Some(mut server) = PrivateServer::start("server_gone_mid_stream", &[]).await else {
        return;
    };
    let (queue, builder) = support::unique_queue(&server.url(), "gone");
    let nats = builder.build().unwrap();
    nats.declare_topology().await.unwrap();
    let sink = nats.sink();
    for i in 0..3 {
        sink.send(&queue, OutgoingMessage::new("b").with_message_id(format!("m{i}")))
            .await
            .unwrap();
    }
    let source = nats.source(&queue).await.unwrap();
    let held = source.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(held.len(), 1, "one message held when the server goes away");

    server.kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    let error = loop {
        assert!(Instant::now() < deadline, "receive never failed after the server went away");
        match source.receive(10, Duration::from_millis(500)).await {
            Err(error) => break error,
            Ok(got) => assert!(got.is_empty(), "received from a dead server"),
        }
    };
    assert!(error.is_retryable(), "not retryable: {}", error_chain(&error));
    assert_eq!(error.kind(), ErrorKind::Connection, "{}", error_chain(&error));
    drop(held);
    drop(source);

    // The messages are on disk: back with the server, all three come (the held one once
    // its lock runs out).
    server.restart().await;
    let again = nats.source(&queue).await.unwrap();
    let ids = drain(&again, 3, support::ACK_WAIT + Duration::from_secs(15)).await;
    assert_eq!(ids, HashSet::from(["m0".into(), "m1".into(), "m2".into()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_deleted_while_running_is_not_found_and_comes_back_with_a_new_source() {
    let Some(support::Declared { url, queue, nats, _cleanup }) =
        support::declared("consumer_deleted", "deleted").await
    else {
        return;
    };
    let source = nats.source(&queue).await.unwrap();
    nats.sink().send(&queue, OutgoingMessage::new("b").with_message_id("kept")).await.unwrap();

    support::delete_consumer(&url, &nats, &queue).await;
    let error = source.receive(10, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{}", error_chain(&error));
    assert!(!error.is_retryable());

    let reopened = nats.source(&queue).await.unwrap();
    let ids = drain(&reopened, 1, Duration::from_secs(10)).await;
    assert_eq!(ids, HashSet::from(["kept".into()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_copy_fails_and_leaves_the_message_redeliverable() {
    let Some(support::Declared { url, queue, nats, _cleanup }) =
        support::declared("refused_dead_letter", "refused-dlq").await
    else {
        return;
    };
    nats.sink().send(&queue, OutgoingMessage::new("b").with_message_id("kept")).await.unwrap();
    let source = nats.source(&queue).await.unwrap();
    let delivery = source.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();

    support::delete_dead_letter_stream(&url, &nats, &queue).await;
    let error = delivery.dead_letter("Poison", "refused").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{}", error_chain(&error));
    // Not terminated: the same consumer gets it again once the lock runs out.
    let ids = drain(&source, 1, support::ACK_WAIT + Duration::from_secs(10)).await;
    assert_eq!(ids, HashSet::from(["kept".into()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_auth_and_right_ones_connect() {
    let args = ["--user", "steward", "--pass", "right-password"];
    let Some(server) = PrivateServer::start("wrong_credentials", &args).await else {
        return;
    };
    let build = |password: &str| {
        NatsBuilder::new()
            .with_url(server.url())
            .with_credentials(Credentials::UserPassword {
                user: "steward".into(),
                password: password.into(),
            })
            .with_queue("jobs")
            .build()
            .unwrap()
    };
    let error = build("wrong-password").declare_topology().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Auth, "{}", error_chain(&error));
    assert!(!error.is_retryable());
    let error = build("wrong-password").source("jobs").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Auth, "{}", error_chain(&error));

    let right = build("right-password");
    right.declare_topology().await.unwrap();
    right.sink().send("jobs", OutgoingMessage::new("b")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_other_settings_stops_the_start_naming_the_setting() {
    if !support::server_available("stream_mismatch").await {
        return;
    }
    let url = support::server_url();
    let (queue, builder) = support::unique_queue(&url, "mismatch");
    let nats = builder.build().unwrap();
    let _cleanup = support::Cleanup(nats.clone());
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    js.create_stream(stream::Config {
        name: nats.stream_name(&queue),
        subjects: vec![queue.clone()],
        retention: RetentionPolicy::Limits,
        ..Default::default()
    })
    .await
    .unwrap();
    let error = nats.declare_topology().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Protocol, "{}", error_chain(&error));
    let text = error.to_string();
    assert!(text.contains("retention") && text.contains(&nats.stream_name(&queue)), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_with_another_ack_wait_stops_the_start_naming_the_setting() {
    let Some(support::Declared { url, queue, nats: _, _cleanup }) =
        support::declared("consumer_mismatch", "mismatch").await
    else {
        return;
    };
    let other = NatsBuilder::new()
        .with_url(&url)
        .with_queue(&queue)
        .with_ack_wait(support::ACK_WAIT * 2)
        .build()
        .unwrap();
    let error = other.declare_topology().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Protocol, "{}", error_chain(&error));
    assert!(error.to_string().contains("ack_wait"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_of_an_unconfigured_queue_is_not_found_before_connecting() {
    // Nothing listens on port 1: connecting would be a Connection error.
    let nats =
        NatsBuilder::new().with_url("nats://127.0.0.1:1").with_queue("jobs").build().unwrap();
    let error = nats.source("payments").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{}", error_chain(&error));
    let error = nats.source("jobs").await.unwrap_err();
    assert!(error.is_retryable(), "{}", error_chain(&error));
}

/// Sets one setting of a stream or consumer configuration to what steward must refuse.
type Spoil<T> = fn(&mut T);

/// Ensures that each stream setting that loses or drops messages stops the start when a
/// stream exists with it, naming the setting: per-subject and total limits (5 sends
/// acked, fewer stored), the discard policy, the duplicate window, and no publish acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_settings_that_lose_messages_stop_the_start_naming_the_setting() {
    if !support::server_available("stream_settings_that_lose_messages").await {
        return;
    }
    let url = support::server_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let cases: [(&str, Spoil<stream::Config>); 8] = [
        ("max_msgs_per_subject", |c| c.max_messages_per_subject = 2),
        ("max_msgs", |c| c.max_messages = 2),
        ("max_bytes", |c| c.max_bytes = 1 << 20),
        ("max_age", |c| c.max_age = Duration::from_secs(3600)),
        ("discard", |c| c.discard = stream::DiscardPolicy::New),
        ("duplicate_window", |c| c.duplicate_window = Duration::from_secs(1)),
        ("no_ack", |c| c.no_ack = true),
        ("discard_new_per_subject", |c| {
            c.discard = stream::DiscardPolicy::New;
            c.max_messages_per_subject = 2;
            c.discard_new_per_subject = true;
        }),
    ];
    for (setting, spoil) in cases {
        let (queue, builder) = support::unique_queue(&url, "settings");
        let nats = builder.build().unwrap();
        let _cleanup = support::Cleanup(nats.clone());
        let mut config = stream::Config {
            name: nats.stream_name(&queue),
            subjects: vec![queue.clone()],
            retention: RetentionPolicy::WorkQueue,
            ..Default::default()
        };
        spoil(&mut config);
        js.create_stream(config).await.unwrap();
        let error = nats.declare_topology().await.expect_err(setting);
        assert_eq!(error.kind(), ErrorKind::Protocol, "{setting}: {}", error_chain(&error));
        let text = error.to_string();
        let expected = if setting == "discard_new_per_subject" { "discard" } else { setting };
        assert!(text.contains(&format!(" {expected} = ")), "{setting}: {text}");
        assert!(text.contains(&nats.stream_name(&queue)), "{setting}: {text}");
    }
}

/// Ensures that a consumer delivering headers only (the body is lost) or with a
/// redelivery backoff (which overrides `ack_wait`, the lock) stops the start, naming the
/// setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_settings_that_lose_bodies_or_the_lock_stop_the_start_naming_the_setting() {
    if !support::server_available("consumer_settings").await {
        return;
    }
    let url = support::server_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let cases: [(&str, Spoil<pull::Config>); 2] = [
        ("headers_only", |c| c.headers_only = true),
        ("backoff", |c| c.backoff = vec![Duration::from_secs(1), Duration::from_secs(2)]),
    ];
    for (setting, spoil) in cases {
        let (queue, builder) = support::unique_queue(&url, "consumer");
        let nats = builder.build().unwrap();
        let _cleanup = support::Cleanup(nats.clone());
        let publisher =
            NatsBuilder::new().with_url(&url).with_publish_queue(&queue).build().unwrap();
        publisher.declare_topology().await.unwrap();
        let stream = js.get_stream(nats.stream_name(&queue)).await.unwrap();
        let mut config = pull::Config {
            durable_name: Some(steward_nats::CONSUMER_NAME.to_owned()),
            filter_subject: queue.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: support::ACK_WAIT,
            max_deliver: 20,
            ..Default::default()
        };
        spoil(&mut config);
        stream.create_consumer(config).await.unwrap();
        let error = nats.declare_topology().await.expect_err(setting);
        assert_eq!(error.kind(), ErrorKind::Protocol, "{setting}: {}", error_chain(&error));
        let text = error.to_string();
        assert!(text.contains(&format!(" {setting} = ")), "{setting}: {text}");
    }
}

/// Ensures that settlements and renewals wait for the server's confirmation: with the
/// server gone, a renewal does not report a lock the server never extended, and an
/// abandon or dead-letter's `+TERM` does not report success; each fails retryably within
/// the request timeout, leaving the local lock where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_and_settlements_without_the_server_fail_instead_of_reporting_success() {
    let Some(mut server) = PrivateServer::start("unconfirmed_settlements", &[]).await else {
        return;
    };
    let (queue, builder) = support::unique_queue(&server.url(), "unconfirmed");
    let nats = builder
        .with_ack_wait(Duration::from_secs(30))
        .with_request_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    nats.declare_topology().await.unwrap();
    for i in 0..2 {
        nats.sink()
            .send(&queue, OutgoingMessage::new("b").with_message_id(format!("m{i}")))
            .await
            .unwrap();
    }
    let source = nats.source(&queue).await.unwrap();
    let mut held = drain_held(&source, 2).await;
    server.kill();

    let before = held[0].locked_until();
    let started = Instant::now();
    let renewed = held[0].renew_lock().await;
    let error = renewed.expect_err("a renewal the server never confirmed");
    assert!(error.is_retryable(), "{}", error_chain(&error));
    assert_eq!(held[0].locked_until(), before, "the local lock was not extended");
    let error =
        held.remove(1).abandon(None).await.expect_err("an abandon the server never confirmed");
    assert!(error.is_retryable(), "{}", error_chain(&error));
    assert!(started.elapsed() < Duration::from_secs(10), "bounded by the request timeout");
}

/// Receives `n` messages without settling them.
async fn drain_held(source: &dyn MessageSource, n: usize) -> Vec<steward_core::Delivery> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = Vec::new();
    while held.len() < n && Instant::now() < deadline {
        held.extend(source.receive(n - held.len(), Duration::from_millis(500)).await.unwrap());
    }
    assert_eq!(held.len(), n);
    held
}

/// Ensures that a queue stream that rewrites the subject of what it stores (a subject
/// transform, nats-server 2.10) stops the start: its messages are stored under another
/// subject, which the queue's consumer (filtered on the queue) never delivers, while
/// every publish is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_transforms_the_subject_stops_the_start() {
    let Some((url, client)) = support::client_at_least("stream_subject_transform", (2, 10)).await
    else {
        return;
    };
    let (queue, builder) = support::unique_queue(&url, "transform");
    let nats = builder.build().unwrap();
    let _cleanup = support::Cleanup(nats.clone());
    let name = nats.stream_name(&queue);
    // Raw API request: the client library shows this setting only with a feature.
    let request = serde_json::json!({
        "name": name,
        "subjects": [queue],
        "retention": "workqueue",
        "storage": "file",
        "discard": "old",
        "duplicate_window": 120_000_000_000_u64,
        "subject_transform": { "src": queue, "dest": format!("{queue}.moved") },
    });
    let reply = client
        .request(format!("$JS.API.STREAM.CREATE.{name}"), request.to_string().into())
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(reply.get("error").is_none(), "stream created: {reply}");

    match nats.declare_topology().await {
        Err(error) => {
            assert_eq!(error.kind(), ErrorKind::Protocol, "{}", error_chain(&error));
            assert!(error.to_string().contains("subject_transform"), "{error}");
        }
        Ok(()) => {
            // Show what the start-up check let through: an acked message never delivered.
            nats.sink()
                .send(&queue, OutgoingMessage::new("b").with_message_id("m1"))
                .await
                .unwrap();
            let source = nats.source(&queue).await.unwrap();
            let got = source.receive(1, Duration::from_secs(2)).await.unwrap();
            panic!("the start-up check passed; the acked message delivered {} times", got.len());
        }
    }
}

/// Ensures that a consumer whose pulls may not wait as long as the sources wait
/// (`max_expires`) stops the start: otherwise every receive fails at run time with a
/// server error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_limits_how_long_a_pull_waits_stops_the_start() {
    if !support::server_available("consumer_max_expires").await {
        return;
    }
    let url = support::server_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let (queue, builder) = support::unique_queue(&url, "expires");
    let nats = builder.build().unwrap();
    let _cleanup = support::Cleanup(nats.clone());
    let publisher = NatsBuilder::new().with_url(&url).with_publish_queue(&queue).build().unwrap();
    publisher.declare_topology().await.unwrap();
    let stream = js.get_stream(nats.stream_name(&queue)).await.unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some(steward_nats::CONSUMER_NAME.to_owned()),
            filter_subject: queue.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: support::ACK_WAIT,
            max_deliver: 20,
            max_expires: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap();
    match nats.declare_topology().await {
        Err(error) => {
            assert_eq!(error.kind(), ErrorKind::Protocol, "{}", error_chain(&error));
            assert!(error.to_string().contains("max_expires"), "{error}");
        }
        Ok(()) => {
            let source = nats.source(&queue).await.unwrap();
            let got = source.receive(1, Duration::from_secs(5)).await;
            panic!("the start-up check passed; a 5 s receive gave {got:?}");
        }
    }
}

/// Ensures that a server shut down gracefully (SIGTERM, as on every upgrade or restart
/// by a service manager) while a receive waits on it fails that receive retryably: the
/// server ends the waiting pull with a status of its own before it closes the
/// connection, and that must not read as a permanent server error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shut_down_during_a_pull_fails_the_receive_retryably() {
    let Some(mut server) = PrivateServer::start("shut_down_during_a_pull", &[]).await else {
        return;
    };
    let (queue, builder) = support::unique_queue(&server.url(), "shutdown");
    let nats = builder.build().unwrap();
    nats.declare_topology().await.unwrap();
    let source = nats.source(&queue).await.unwrap();
    let receive = source.receive(1, Duration::from_secs(10));
    let stop = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::block_in_place(|| server.terminate());
    };
    let (got, ()) = tokio::join!(receive, stop);
    match got {
        Ok(got) => assert!(got.is_empty(), "nothing was published"),
        Err(error) => assert!(error.is_retryable(), "{}", error_chain(&error)),
    }
}

/// Ensures that a receive dropped while its pull waits (a worker shutting down, a
/// `select!` taking another branch) leaves no pull behind on the server that swallows
/// the next message: a message published right after is received at once, with
/// delivery count 1, not after its lock ran out in a pull nobody reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_dropped_while_waiting_leaves_no_pull_that_swallows_the_next_message() {
    let Some(support::Declared { queue, nats, _cleanup, .. }) =
        support::declared("dropped_receive", "dropped").await
    else {
        return;
    };
    let source = nats.source(&queue).await.unwrap();
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        source.receive(1, Duration::from_secs(20)),
    )
    .await;
    assert!(dropped.is_err(), "the receive was still waiting when dropped");
    nats.sink().send(&queue, OutgoingMessage::new("b").with_message_id("m1")).await.unwrap();
    let got = source.receive(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1, "the message is received by the next receive");
    assert_eq!(got[0].message().delivery_count, 1);
    got.into_iter().next().unwrap().complete().await.unwrap();
}

/// Ensures that a consumer steward cannot pull from as it does stops the start: one
/// paused until a later time (nats-server 2.11; every receive comes back empty until
/// then, while messages wait) and one with a priority policy (2.11; every pull without
/// a priority group is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_consumer_or_one_with_priority_groups_stops_the_start() {
    let Some((url, client)) =
        support::client_at_least("consumer_paused_or_prioritised", (2, 11)).await
    else {
        return;
    };
    let cases = [
        ("pause_until", serde_json::json!({ "pause_until": "2100-01-01T00:00:00Z" })),
        (
            "priority_policy",
            serde_json::json!({ "priority_policy": "overflow", "priority_groups": ["g"] }),
        ),
    ];
    for (setting, extra) in cases {
        let (queue, builder) = support::unique_queue(&url, "paused");
        let nats = builder.build().unwrap();
        let _cleanup = support::Cleanup(nats.clone());
        let publisher =
            NatsBuilder::new().with_url(&url).with_publish_queue(&queue).build().unwrap();
        publisher.declare_topology().await.unwrap();
        let stream = nats.stream_name(&queue);
        let mut config = serde_json::json!({
            "durable_name": steward_nats::CONSUMER_NAME,
            "filter_subject": queue,
            "ack_policy": "explicit",
            "deliver_policy": "all",
            "ack_wait": u64::try_from(support::ACK_WAIT.as_nanos()).unwrap(),
            "max_deliver": 20,
        });
        for (key, value) in extra.as_object().unwrap() {
            config[key] = value.clone();
        }
        let request = serde_json::json!({ "stream_name": stream, "config": config });
        let subject = format!("$JS.API.CONSUMER.CREATE.{stream}.{}", steward_nats::CONSUMER_NAME);
        let reply = client.request(subject, request.to_string().into()).await.unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert!(reply.get("error").is_none(), "{setting}: consumer created: {reply}");

        match nats.declare_topology().await {
            Err(error) => {
                assert_eq!(error.kind(), ErrorKind::Protocol, "{}", error_chain(&error));
                assert!(error.to_string().contains(setting), "{error}");
            }
            Ok(()) => {
                nats.sink()
                    .send(&queue, OutgoingMessage::new("b").with_message_id("m1"))
                    .await
                    .unwrap();
                let source = nats.source(&queue).await.unwrap();
                let got = source.receive(1, Duration::from_secs(1)).await.map(|got| got.len());
                panic!("{setting}: the start-up check passed; a receive gave {got:?}");
            }
        }
    }
}
