//! The Service Bus transport's gotchas, against the in-process emulator over loopback
//! HTTP: error statuses on peek-lock, lost locks, connection reuse, the startup probe,
//! bearer tokens and managed identity (against a fake token endpoint), timeouts,
//! unreadable and unsendable messages, and secrets kept out of logs.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use steward_core::{ErrorKind, MessageSink, MessageSource, OutgoingMessage, TransportError};
use steward_servicebus::emulator::{
    Emulator, EmulatorBuilder, EmulatorHandle, Operation, StatusCode,
};
use steward_servicebus::{
    AccessToken, AuthMethod, DELIVERY_COUNT_PROPERTY, PROTOCOL_HEADER_PREFIXES, PROTOCOL_HEADERS,
    ServiceBusBuilder, ServiceBusTransport, StaticToken,
};
use support::KEY_NAME;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

const KEY: &str = "dHJhbnNwb3J0LXRlc3Qta2V5";
const WAIT: Duration = Duration::from_secs(1);

/// An emulator with the test key, and a transport signing with `key`.
async fn start(emulator: EmulatorBuilder, key: &str) -> (EmulatorHandle, ServiceBusTransport) {
    support::start(emulator, KEY, key).await
}

async fn send_text(transport: &ServiceBusTransport, queue: &str, id: &str) {
    let message = OutgoingMessage::new(format!("body of {id}")).with_message_id(id);
    transport.sink().send(queue, message).await.unwrap();
}

fn kind<T: std::fmt::Debug>(result: Result<T, TransportError>) -> ErrorKind {
    result.unwrap_err().kind()
}

/// Ensures that a 401 on peek-lock is an `Auth` error, not an empty receive and not a
/// message, and that the message stays untouched for a consumer with the right key.
#[tokio::test]
async fn unauthorised_peek_lock_is_an_auth_error_not_empty() {
    let (emulator, transport) = start(Emulator::builder(), KEY).await;
    send_text(&transport, "jobs", "m-1").await;

    let wrong = ServiceBusBuilder::new()
        .with_namespace("tre")
        .with_endpoint(emulator.endpoint())
        .with_sas_key(KEY_NAME, "bm90LXRoZS1rZXk=")
        .build()
        .unwrap();
    let result = wrong.source("jobs").receive(10, WAIT).await;
    let error = result.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Auth, "{error}");
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("401"), "{error}");

    // An injected 401 with the right key: the same, and the message is still there.
    emulator.faults().fail_next_on(Operation::PeekLock, 1, StatusCode::UNAUTHORIZED);
    let source = transport.source("jobs");
    assert_eq!(kind(source.receive(10, WAIT).await), ErrorKind::Auth);
    let got = source.receive(10, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message().id, "m-1");
    assert_eq!(got[0].message().delivery_count, 1, "the refused receives locked nothing");
}

/// Ensures that server errors and dropped connections are retryable, on receive, send
/// and settlement.
#[tokio::test]
async fn server_errors_and_dropped_connections_are_retryable() {
    let (emulator, transport) =
        start(Emulator::builder().with_lock_duration(Duration::from_secs(1)), KEY).await;
    let source = transport.source("jobs");
    for status in [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::SERVICE_UNAVAILABLE] {
        emulator.faults().fail_next_on(Operation::PeekLock, 1, status);
        let error = source.receive(10, WAIT).await.unwrap_err();
        assert!(error.is_retryable(), "{status}: {error}");
    }
    emulator.faults().fail_next_on(Operation::Send, 1, StatusCode::INTERNAL_SERVER_ERROR);
    let sent = transport.sink().send("jobs", OutgoingMessage::new("x")).await;
    assert!(sent.unwrap_err().is_retryable());

    send_text(&transport, "jobs", "m-1").await;
    let delivery = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    emulator.faults().drop_next_on(Operation::Complete, 1);
    let error = delivery.complete().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    // The complete never reached the broker: the message comes back after its lock.
    let again = source.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again[0].message().id, "m-1");
    assert_eq!(again[0].message().delivery_count, 2);
}

/// Ensures that every settlement after the lock expired is `LockLost` naming the message,
/// and that settling on a deleted queue is `NotFound`.
#[tokio::test]
async fn settling_after_lock_expiry_is_lock_lost() {
    let (emulator, transport) =
        start(Emulator::builder().with_lock_duration(Duration::from_secs(1)), KEY).await;
    for id in ["complete", "abandon", "delay", "dead", "renew"] {
        send_text(&transport, "jobs", id).await;
    }
    let source = transport.source("jobs");
    let held = source.receive(5, WAIT).await.unwrap();
    assert_eq!(held.len(), 5);
    tokio::time::sleep(Duration::from_millis(2100)).await;

    for delivery in held {
        let id = delivery.message().id.clone();
        let result = match id.as_str() {
            "complete" => delivery.complete().await,
            "abandon" => delivery.abandon(None).await,
            "delay" => delivery.abandon(Some(Duration::from_secs(1))).await,
            "dead" => delivery.dead_letter("Reason", "description").await,
            _ => delivery.renew_lock().await.map(drop),
        };
        let error = result.unwrap_err();
        assert!(error.is_lock_lost(), "{id}: {error}");
        assert_eq!(error.to_string(), format!("lock lost for message {id}"));
    }
    assert_eq!(emulator.broker().message_count("jobs"), 5, "nothing settled, nothing copied");
    assert_eq!(emulator.broker().message_count("jobs.dlq"), 0);

    let delivery = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    emulator.broker().delete_queue("jobs");
    assert!(delivery.complete().await.unwrap_err().is_not_found());
}

/// Ensures that 100 sequential receives (each with its send and complete) reuse the
/// pooled connections instead of opening one per request.
#[tokio::test]
async fn sequential_receives_reuse_pooled_connections() {
    let (emulator, transport) = start(Emulator::builder(), KEY).await;
    let source = transport.source("jobs");
    for i in 0..100 {
        send_text(&transport, "jobs", &format!("m-{i}")).await;
        let delivery = source.receive(1, WAIT).await.unwrap().pop().unwrap();
        assert_eq!(delivery.message().id, format!("m-{i}"));
        delivery.complete().await.unwrap();
    }
    let connections = emulator.connection_count();
    assert!((1..=3).contains(&connections), "300 requests opened {connections} connections");
}

/// Ensures that the startup probe stops on a session-enabled queue with one error naming
/// it and the REST limit.
#[tokio::test]
async fn probe_refuses_a_session_enabled_queue_by_name() {
    let (_emulator, transport) =
        start(Emulator::builder().with_session_queue("deploymentstatus"), KEY).await;
    let error = transport.probe_queues(["deploymentstatus"]).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Protocol);
    let text = error.to_string();
    assert!(text.contains("queue deploymentstatus requires sessions"), "{text}");
    assert!(text.contains("REST protocol cannot receive from session-enabled queues"), "{text}");
    // A source meets the same error on its first receive.
    let received = transport.source("deploymentstatus").receive(1, WAIT).await;
    assert_eq!(kind(received), ErrorKind::Protocol);
}

/// Ensures that the startup probe stops on a missing `<queue>.dlq` (and a missing queue)
/// with one error naming it, and passes queues that have theirs, leaving their messages.
#[tokio::test]
async fn probe_names_a_missing_dead_letter_queue() {
    let emulator = Emulator::builder()
        .with_auto_create_queues(false)
        .with_queue("jobs")
        .with_queue("ready")
        .with_queue("ready.dlq");
    let (_emulator, transport) = start(emulator, KEY).await;

    let error = transport.probe_queues(["ready", "jobs"]).await.unwrap_err();
    assert!(error.is_not_found(), "{error}");
    assert!(
        error.to_string().starts_with("not found: queue jobs.dlq, the dead-letter queue of jobs"),
        "{error}"
    );
    let error = transport.probe_queues(["missing"]).await.unwrap_err();
    assert_eq!(error.to_string(), "not found: queue missing");

    send_text(&transport, "ready", "m-1").await;
    transport.probe_queues(["ready"]).await.unwrap();
    let got = transport.source("ready").receive(1, WAIT).await.unwrap();
    assert_eq!(got[0].message().id, "m-1", "the probe unlocked what it locked");
    assert_eq!(got[0].message().delivery_count, 2, "the probe's lock counts as a delivery");
}

/// Ensures that dead-lettering into a missing `<queue>.dlq` is `NotFound` naming it and
/// loses nothing: the message is delivered again.
#[tokio::test]
async fn dead_letter_without_its_queue_keeps_the_message() {
    let emulator = Emulator::builder()
        .with_auto_create_queues(false)
        .with_queue("jobs")
        .with_lock_duration(Duration::from_secs(1));
    let (emulator, transport) = start(emulator, KEY).await;
    send_text(&transport, "jobs", "poison").await;
    let source = transport.source("jobs");
    let delivery = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    let error = delivery.dead_letter("MessageFormatIncorrect", "bad").await.unwrap_err();
    assert!(error.is_not_found(), "{error}");
    assert!(error.to_string().contains("jobs.dlq"), "{error}");
    let again = source.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again[0].message().id, "poison");
    assert_eq!(emulator.broker().message_count("jobs"), 1);
}

/// Ensures that a dead letter keeps its content type, correlation id and properties, and
/// records the deliveries it had.
#[tokio::test]
async fn dead_letters_keep_metadata_and_the_delivery_count() {
    let (_emulator, transport) = start(Emulator::builder(), KEY).await;
    let message = OutgoingMessage::json(r#"{"bad":"#)
        .with_message_id("m-1")
        .with_correlation_id("c-1")
        .with_property("stage", "deploy");
    transport.sink().send("jobs", message).await.unwrap();
    let source = transport.source("jobs");
    source.receive(1, WAIT).await.unwrap().pop().unwrap().abandon(None).await.unwrap();
    let second = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    second.dead_letter("MessageFormatIncorrect", "not JSON ☃").await.unwrap();

    let dead = transport.dead_letters("jobs").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "MessageFormatIncorrect");
    assert_eq!(dead[0].description, "not JSON ☃");
    let m = &dead[0].message;
    assert_eq!((m.id.as_str(), m.body.as_ref()), ("m-1", br#"{"bad":"#.as_slice()));
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(m.properties.get("stage").map(String::as_str), Some("deploy"));
    assert!(!m.properties.contains_key(DELIVERY_COUNT_PROPERTY));
    // The two deliveries it had; reading the dead-letter queue back is not one of them.
    assert_eq!(m.delivery_count, 2);
}

/// Ensures that a delayed retry goes out as a copy under a new `MessageId` (so duplicate
/// detection cannot drop it) that reads as the original, and that a dead-letter whose
/// delete fails leaves both the copy and the original: at least once, never lost.
#[tokio::test]
async fn copies_keep_the_message_id_and_lose_nothing_when_the_delete_fails() {
    let (emulator, transport) =
        start(Emulator::builder().with_lock_duration(Duration::from_secs(1)), KEY).await;
    send_text(&transport, "jobs", "m-1").await;
    let source = transport.source("jobs");
    let first = source.receive(1, WAIT).await.unwrap().pop().unwrap();
    first.abandon(Some(Duration::from_secs(1))).await.unwrap();
    let stored = emulator.broker().peek("jobs");
    assert_eq!(stored.len(), 1, "the original was deleted, the copy is there");
    assert_ne!(stored[0].id, "m-1", "the copy has its own MessageId");
    assert_eq!(stored[0].properties.get("x-steward-message-id").map(String::as_str), Some("m-1"));

    let second = source.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
    assert_eq!((second.message().id.as_str(), second.message().delivery_count), ("m-1", 2));
    emulator.faults().fail_next_on(Operation::Complete, 1, StatusCode::INTERNAL_SERVER_ERROR);
    let error = second.dead_letter("Reason", "description").await.unwrap_err();
    assert!(error.is_retryable(), "{error}");
    assert_eq!(emulator.broker().message_count("jobs.dlq"), 1, "the copy was sent");
    let again = source.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
    assert_eq!((again.message().id.as_str(), again.message().delivery_count), ("m-1", 3));
}

/// Ensures that the lock expiry comes from the service's clock and a renewal extends it
/// by the observed lock duration.
#[tokio::test]
async fn lock_expiry_follows_the_service_and_renewals_extend_it() {
    let (_emulator, transport) =
        start(Emulator::builder().with_lock_duration(Duration::from_secs(20)), KEY).await;
    send_text(&transport, "jobs", "m-1").await;
    let before = Instant::now();
    let delivery = transport.source("jobs").receive(1, WAIT).await.unwrap().pop().unwrap();
    let until = delivery.locked_until().unwrap();
    // 20 s, less the one second of whole-second precision (and at most one more).
    assert!(until >= before + Duration::from_secs(18), "{:?}", until - before);
    assert!(until <= Instant::now() + Duration::from_secs(19));

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let renewed = delivery.renew_lock().await.unwrap().unwrap();
    assert!(renewed > until, "the renewal moved the expiry on");
    assert_eq!(delivery.locked_until(), Some(renewed));
    delivery.complete().await.unwrap();
}

/// Ensures that a request that takes longer than the request timeout is a retryable
/// `Timeout`, and that a receive's wait is not cut short by it.
#[tokio::test]
async fn slow_answers_time_out_but_receive_waits_are_allowed() {
    let emulator = Emulator::builder().with_sas_key(KEY_NAME, KEY).start().await.unwrap();
    let transport = ServiceBusBuilder::new()
        .with_endpoint(emulator.endpoint())
        .with_sas_key(KEY_NAME, KEY)
        .with_request_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let started = Instant::now();
    let empty = transport.source("jobs").receive(1, Duration::from_secs(2)).await.unwrap();
    assert!(empty.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(2));

    emulator.faults().set_latency(Duration::from_secs(3));
    let error = transport.sink().send("jobs", OutgoingMessage::new("x")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(error.is_retryable());
}

/// Ensures that a message whose body is not UTF-8 is skipped (it stays locked) without
/// failing the receive or holding up the messages behind it.
#[tokio::test]
async fn unreadable_messages_are_skipped_not_fatal() {
    let (emulator, transport) = start(Emulator::builder(), KEY).await;
    let binary = OutgoingMessage::new(vec![0xff, 0xfe, 0x00]).with_message_id("binary");
    emulator.broker().send("jobs", binary).await.unwrap();
    send_text(&transport, "jobs", "text").await;

    let got = transport.source("jobs").receive(10, WAIT).await.unwrap();
    let ids: Vec<_> = got.iter().map(|d| d.message().id.clone()).collect();
    assert_eq!(ids, ["text"]);
    assert_eq!(emulator.broker().message_count("jobs"), 2, "the binary message is kept");
}

/// Ensures that messages the REST protocol cannot carry are refused before sending, as
/// `Protocol` errors naming the problem.
#[tokio::test]
async fn unsendable_messages_are_refused_before_sending() {
    let (emulator, transport) = start(Emulator::builder(), KEY).await;
    let sink = transport.sink();
    let cases = [
        (OutgoingMessage::new(vec![0xff, 0xfe]), "not UTF-8"),
        (OutgoingMessage::new("x").with_property("two words", "v"), "not an HTTP header name"),
        (OutgoingMessage::new("x").with_property("content-type", "v"), "reserved"),
        (OutgoingMessage::new("x").with_message_id("naïve"), "not printable ASCII"),
        (OutgoingMessage::new("x").with_session_id("s".repeat(200)), "at most 128"),
    ];
    for (message, why) in cases {
        let error = sink.send("jobs", message).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Protocol, "{error}");
        assert!(error.to_string().contains(why), "{why}: {error}");
    }
    let too_big = OutgoingMessage::new("x".repeat(300 * 1024));
    assert_eq!(kind(sink.send("jobs", too_big).await), ErrorKind::Protocol);
    assert_eq!(emulator.broker().message_count("jobs"), 0);
}

/// Ensures that the client and the emulator agree on which names are headers of HTTP or
/// of the protocol: the client refuses a property named like any header on the shared
/// list (or with a listed prefix, in any case) with an error naming it, refuses a name
/// that is not all lower-case (headers come back lower-cased), and delivers every other
/// name, trace context included, unchanged.
#[tokio::test]
async fn listed_header_names_are_refused_and_all_others_delivered_unchanged() {
    let (emulator, transport) = start(Emulator::builder(), KEY).await;
    let sink = transport.sink();
    let prefixed = PROTOCOL_HEADER_PREFIXES.iter().map(|prefix| format!("{prefix}custom"));
    let listed: Vec<String> =
        PROTOCOL_HEADERS.iter().map(|name| (*name).to_owned()).chain(prefixed).collect();
    for name in listed.iter().chain([&"Accept-Language".to_owned(), &"X-MS-Custom".to_owned()]) {
        let message = OutgoingMessage::new("x").with_property(name.clone(), "v");
        let error = sink.send("jobs", message).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Protocol, "{name}: {error}");
        assert!(error.to_string().contains(&format!("{name:?} is reserved")), "{name}: {error}");
    }
    // Header names are case-insensitive and come back lower-cased: a name with a capital
    // would arrive renamed, and `Kind` beside `kind` would lose one of them.
    for name in ["Kind", "correlationKind", "X-Custom", "TRACEPARENT"] {
        let message = OutgoingMessage::new("x").with_property("kind", "a").with_property(name, "b");
        let error = sink.send("jobs", message).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Protocol, "{name}: {error}");
        assert!(error.to_string().contains(&format!("{name:?} is not all lower-case")), "{error}");
    }
    assert_eq!(emulator.broker().message_count("jobs"), 0, "no refused message was sent");

    let ordinary = [
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ("diagnostic-id", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("origin", "test"),
        ("referer", "someone"),
        ("accept-version", "2"),
        ("content-kind", "report"),
        ("x-custom", "a value, with a comma"),
        ("spaced-out", "two words"),
    ];
    let mut message = OutgoingMessage::new("x").with_message_id("ordinary");
    for (name, value) in ordinary {
        message = message.with_property(name, value);
    }
    sink.send("jobs", message).await.unwrap();
    let got = transport.source("jobs").receive(1, WAIT).await.unwrap().pop().unwrap();
    for (name, value) in ordinary {
        let delivered = got.message().properties.get(name).map(String::as_str);
        assert_eq!(delivered, Some(value), "property {name}");
    }
    assert_eq!(got.message().properties.len(), ordinary.len(), "{:?}", got.message().properties);
}

/// Ensures that a message sent without a content type reads as having none (not the
/// service's Atom default), and that non-ASCII property values survive.
#[tokio::test]
async fn default_content_type_reads_as_none_and_property_values_round_trip() {
    let (_emulator, transport) = start(Emulator::builder(), KEY).await;
    let message = OutgoingMessage::new("x").with_message_id("m").with_property("note", "naïve ☃");
    transport.sink().send("jobs", message).await.unwrap();
    let got = transport.source("jobs").receive(1, WAIT).await.unwrap().pop().unwrap();
    assert_eq!(got.message().content_type, None);
    assert_eq!(got.message().properties.get("note").map(String::as_str), Some("naïve ☃"));
    assert!(got.message().enqueued_at.is_some());
}

// ---- bearer tokens and managed identity -----------------------------------------------

/// Ensures that bearer tokens from a provider authenticate every request, settlement
/// through lock URIs included, and that a token the namespace refuses is `Auth`.
#[tokio::test]
async fn bearer_tokens_from_a_provider_authenticate_requests() {
    let emulator = Emulator::builder().with_bearer_token("good-token").start().await.unwrap();
    let with = |token: &str| {
        let token = AccessToken::new(token, SystemTime::now() + Duration::from_secs(3600));
        ServiceBusBuilder::new()
            .with_namespace("tre")
            .with_endpoint(emulator.endpoint())
            .with_token_provider(Arc::new(StaticToken::new(token)))
            .build()
            .unwrap()
    };
    let good = with("good-token");
    assert_eq!(good.auth_method(), &AuthMethod::TokenProvider);
    send_text(&good, "jobs", "m-1").await;
    let delivery = good.source("jobs").receive(1, WAIT).await.unwrap().pop().unwrap();
    delivery.renew_lock().await.unwrap();
    delivery.complete().await.unwrap();
    assert_eq!(emulator.broker().message_count("jobs"), 0);

    let bad = with("stolen-token");
    assert_eq!(kind(bad.source("jobs").receive(1, WAIT).await), ErrorKind::Auth);
}

/// A fake managed identity token endpoint: answers each request with the next of
/// `answers` (status and body) and records the request heads.
struct TokenEndpoint {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl TokenEndpoint {
    async fn start(answers: Vec<(u16, String)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/msi/token", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                seen.lock().unwrap().push(String::from_utf8_lossy(&head).to_lowercase());
                let (status, body) = answers.next().unwrap_or((500, "no more answers".into()));
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        Self { url, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn token_answer(token: &str) -> (u16, String) {
    (200, format!(r#"{{"access_token":"{token}","expires_in":"3599","token_type":"Bearer"}}"#))
}

/// Ensures that `MANAGED_IDENTITY_CLIENT_ID` selects the managed identity, which gets
/// its token from the App Service endpoint (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`) for
/// Service Bus and that client id, and that the token authenticates requests.
#[tokio::test]
async fn managed_identity_from_env_uses_the_token_endpoint() {
    let endpoint = TokenEndpoint::start(vec![token_answer("mi-token-1")]).await;
    let emulator = Emulator::builder().with_bearer_token("mi-token-1").start().await.unwrap();
    let vars = HashMap::from([
        ("SERVICE_BUS_FULLY_QUALIFIED_NAMESPACE", "tre.servicebus.windows.net".to_owned()),
        ("STEWARD_SERVICEBUS_ENDPOINT", emulator.endpoint()),
        ("MANAGED_IDENTITY_CLIENT_ID", "client-123".to_owned()),
        ("IDENTITY_ENDPOINT", endpoint.url.clone()),
        ("IDENTITY_HEADER", "identity-header-secret".to_owned()),
    ]);
    let transport = ServiceBusBuilder::from_lookup(|name| vars.get(name).cloned()).build().unwrap();
    assert_eq!(
        transport.auth_method(),
        &AuthMethod::ManagedIdentity { client_id: Some("client-123".into()) }
    );
    send_text(&transport, "jobs", "m-1").await;
    let delivery = transport.source("jobs").receive(1, WAIT).await.unwrap().pop().unwrap();
    delivery.complete().await.unwrap();

    let requests = endpoint.requests();
    assert_eq!(requests.len(), 1, "one token for all requests: {requests:?}");
    let request = &requests[0];
    assert!(request.starts_with("get /msi/token?api-version=2019-08-01&"), "{request}");
    assert!(request.contains("resource=https%3a%2f%2fservicebus.azure.net"), "{request}");
    assert!(request.contains("client_id=client-123"), "{request}");
    assert!(request.contains("x-identity-header: identity-header-secret"), "{request}");
}

/// Ensures that the Instance Metadata Service protocol sends `Metadata: true`, and that
/// a refused identity is `Auth` while an unavailable endpoint is retryable.
#[tokio::test]
async fn managed_identity_over_imds_and_its_failures() {
    let endpoint = TokenEndpoint::start(vec![
        token_answer("imds-token"),
        (400, r#"{"error":"invalid_request","error_description":"Identity not found"}"#.into()),
        (503, "busy".into()),
    ])
    .await;
    let emulator = Emulator::builder().with_bearer_token("imds-token").start().await.unwrap();
    let build = || {
        ServiceBusBuilder::new()
            .with_namespace("tre")
            .with_endpoint(emulator.endpoint())
            .with_managed_identity(Some("client-456".into()))
            .with_managed_identity_endpoint(endpoint.url.clone())
            .build()
            .unwrap()
    };
    let empty = build().source("jobs").receive(1, Duration::ZERO).await.unwrap();
    assert!(empty.is_empty());
    let request = &endpoint.requests()[0];
    assert!(request.starts_with("get /msi/token?api-version=2018-02-01&"), "{request}");
    assert!(request.contains("client_id=client-456") && request.contains("metadata: true"));

    let refused = build().source("jobs").receive(1, Duration::ZERO).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Auth, "{refused}");
    assert!(steward_core::error_chain(&refused).contains("Identity not found"));
    let unavailable = build().source("jobs").receive(1, Duration::ZERO).await.unwrap_err();
    assert!(unavailable.is_retryable(), "{unavailable}");
}

// ---- logs ----------------------------------------------------------------------------

/// The log lines a test's thread writes, for asserting on them.
///
/// Tests share one process under `cargo test`, and tracing caches per call site, for the
/// whole process, whether anyone listens; a subscriber scoped to one test then misses
/// events whose call site another test reached first. So one process-wide subscriber
/// takes every event and writes it to the capture installed on the thread that emitted
/// it (with the current-thread runtime of `#[tokio::test]`, the test's own tasks: the
/// transport's and the emulator's), or nowhere.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static THREAD_CAPTURE: std::cell::RefCell<Option<Captured>> =
        const { std::cell::RefCell::new(None) };
}

/// Removes the thread's capture when dropped.
struct CaptureGuard(std::marker::PhantomData<*const ()>);

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        THREAD_CAPTURE.with(|capture| capture.borrow_mut().take());
    }
}

impl Captured {
    /// Routes everything this thread logs, at every level, here until the guard drops.
    fn install(&self) -> CaptureGuard {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(|| ThreadWriter(THREAD_CAPTURE.with(|c| c.borrow().clone())))
                .with_ansi(false)
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
        });
        THREAD_CAPTURE.with(|capture| *capture.borrow_mut() = Some(self.clone()));
        CaptureGuard(std::marker::PhantomData)
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// The process-wide subscriber's writer: the emitting thread's capture, if any.
struct ThreadWriter(Option<Captured>);

impl Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(captured) = &self.0 {
            captured.0.lock().unwrap().extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Ensures that the transport's logs, at every level, never contain a key, a token or a
/// signature, including when requests fail.
#[tokio::test]
async fn logs_never_contain_secrets() {
    let captured = Captured::default();
    let guard = captured.install();
    let endpoint = TokenEndpoint::start(vec![token_answer("secret-token-value")]).await;
    async {
        let (emulator, transport) =
            start(Emulator::builder().with_bearer_token("secret-token-value"), KEY).await;
        send_text(&transport, "jobs", "m-1").await;
        let delivery = transport.source("jobs").receive(1, WAIT).await.unwrap().pop().unwrap();
        delivery.dead_letter("Reason", "description").await.unwrap();
        emulator.faults().fail_next_on(Operation::PeekLock, 1, StatusCode::UNAUTHORIZED);
        assert!(transport.source("jobs").receive(1, WAIT).await.is_err());
        let wrong = ServiceBusBuilder::new()
            .with_endpoint(emulator.endpoint())
            .with_sas_key(KEY_NAME, "d3Jvbmcta2V5LXZhbHVl")
            .build()
            .unwrap();
        transport.probe_queues(["jobs"]).await.unwrap();
        assert!(wrong.probe_queues(["jobs"]).await.is_err());
        let identity = ServiceBusBuilder::new()
            .with_endpoint(emulator.endpoint())
            .with_managed_identity(None)
            .with_managed_identity_endpoint(endpoint.url.clone())
            .build()
            .unwrap();
        send_text(&identity, "jobs", "m-2").await;
    }
    .await;
    drop(guard);

    let logs = captured.text();
    assert!(logs.contains("service bus request"), "trace logs were captured:\n{logs}");
    for secret in
        [KEY, "d3Jvbmcta2V5LXZhbHVl", "secret-token-value", "sig=", "SharedAccessSignature"]
    {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
}
