//! The Service Bus emulator over real loopback HTTP, driven by a plain HTTP client the
//! way Microsoft's REST reference describes the protocol: every route with its status
//! codes and headers, shared access signatures, lock expiry and renewal, the dead-letter
//! queue, scheduled messages, properties, long polling, faults and connection counting.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use steward_core::{ErrorKind, MessageSink, OutgoingMessage};
use steward_servicebus::emulator::{
    Emulator, EmulatorBuilder, EmulatorHandle, Operation, format_date, parse_date, sas_token,
};

const NAMESPACE: &str = "https://steward-test.servicebus.windows.net";
const KEY_NAME: &str = "RootManageSharedAccessKey";
const KEY: &str = "c3Rld2FyZC10ZXN0LWtleQ==";

/// A client as a user of the REST reference writes it: full URLs on the emulator,
/// a shared access signature per request (signed for the namespace's real URL).
struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<(String, String)>,
}

impl Client {
    fn new(emulator: &EmulatorHandle) -> Self {
        Self { http: reqwest::Client::new(), base: emulator.endpoint(), key: None }
    }

    fn signed(emulator: &EmulatorHandle) -> Self {
        Self { key: Some((KEY_NAME.into(), KEY.into())), ..Self::new(emulator) }
    }

    fn request(&self, method: Method, path_and_query: &str) -> reqwest::RequestBuilder {
        let url = if path_and_query.starts_with("http") {
            path_and_query.to_owned()
        } else {
            format!("{}{path_and_query}", self.base)
        };
        let builder = self.http.request(method, &url);
        match &self.key {
            Some((name, key)) => {
                let path = url.split_once("://").unwrap().1;
                let path = &path[path.find('/').unwrap_or(path.len())..];
                let resource = format!("{NAMESPACE}{path}");
                let expiry = SystemTime::now() + Duration::from_secs(3600);
                builder.header("Authorization", sas_token(&resource, name, key, expiry))
            }
            None => builder,
        }
    }

    async fn send(&self, queue: &str, body: &str) -> reqwest::Response {
        self.request(Method::POST, &format!("/{queue}/messages"))
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// Sends a batch: `batch` is a JSON array of messages.
    async fn send_batch(&self, queue: &str, batch: &str) -> reqwest::Response {
        self.request(Method::POST, &format!("/{queue}/messages"))
            .header("Content-Type", "application/vnd.microsoft.servicebus.json")
            .body(batch.to_owned())
            .send()
            .await
            .unwrap()
    }

    async fn send_with(
        &self,
        queue: &str,
        body: &str,
        broker_properties: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .request(Method::POST, &format!("/{queue}/messages"))
            .header("BrokerProperties", broker_properties)
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    async fn peek_lock(&self, queue: &str, timeout: u64) -> reqwest::Response {
        self.request(Method::POST, &format!("/{queue}/messages/head?timeout={timeout}"))
            .send()
            .await
            .unwrap()
    }

    async fn receive_and_delete(&self, queue: &str, timeout: u64) -> reqwest::Response {
        self.request(Method::DELETE, &format!("/{queue}/messages/head?timeout={timeout}"))
            .send()
            .await
            .unwrap()
    }

    /// Unlock (`PUT`), complete (`DELETE`) or renew (`POST`) at a lock URI.
    async fn settle(&self, method: Method, lock_uri: &str) -> reqwest::Response {
        self.request(method, lock_uri).send().await.unwrap()
    }
}

async fn start(builder: EmulatorBuilder) -> EmulatorHandle {
    builder.start().await.unwrap()
}

/// Peek-locks `queue` (waiting up to `timeout` seconds) and checks that a message comes,
/// delivered for the first time.
async fn assert_first_delivery(client: &Client, queue: &str, timeout: u64) {
    let response = client.peek_lock(queue, timeout).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(broker_properties(response.headers())["DeliveryCount"], 1);
}

fn broker_properties(headers: &HeaderMap) -> Value {
    serde_json::from_str(headers["brokerproperties"].to_str().unwrap()).unwrap()
}

fn location(response: &reqwest::Response) -> String {
    response.headers()["location"].to_str().unwrap().to_owned()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).unwrap_or_else(|| panic!("no {name} header")).to_str().unwrap()
}

fn date(value: &Value) -> SystemTime {
    parse_date(value.as_str().unwrap()).unwrap()
}

/// Ensures that a sent message comes back from a peek-lock with the body, every
/// broker property the REST reference (and the azure_messaging_servicebus crate)
/// needs, and a lock URI on the emulator.
#[tokio::test]
async fn send_then_peek_lock_returns_message_broker_properties_and_lock_uri() {
    let emulator = start(Emulator::builder().with_lock_duration(Duration::from_secs(30))).await;
    let client = Client::new(&emulator);

    let sent = client.send("orders", "This is a message.").await;
    assert_eq!(sent.status(), StatusCode::CREATED);
    assert_eq!(header(sent.headers(), "content-type"), "application/xml; charset=utf-8");

    let before = SystemTime::now();
    let response = client.peek_lock("orders", 5).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let props = broker_properties(response.headers());
    let uri = location(&response);
    assert_eq!(
        header(response.headers(), "content-type"),
        "application/atom+xml;type=entry;charset=utf-8"
    );
    assert_eq!(response.text().await.unwrap(), "This is a message.");

    assert_eq!(props["DeliveryCount"], 1);
    assert_eq!(props["SequenceNumber"], 1);
    assert_eq!(props["State"], "Active");
    assert!(props["TimeToLive"].as_f64().unwrap() > 1.0e11, "default time to live: {props}");
    assert_eq!(props["MessageId"].as_str().unwrap().len(), 32, "a generated id: {props}");
    let token = props["LockToken"].as_str().unwrap();
    uuid::Uuid::parse_str(token).unwrap();
    let until = date(&props["LockedUntilUtc"]);
    assert!(props["LockedUntilUtc"].as_str().unwrap().ends_with(" GMT"), "RFC 1123: {props}");
    assert!(until >= before + Duration::from_secs(29), "locked for the lock duration: {props}");
    assert!(until <= SystemTime::now() + Duration::from_secs(31));
    let enqueued = date(&props["EnqueuedTimeUtc"]);
    assert!(enqueued <= SystemTime::now() && enqueued + Duration::from_secs(60) > before);
    assert_eq!(uri, format!("http://{}/orders/messages/1/{token}", emulator.addr()));
}

/// Ensures that the lock URI names the host and scheme the client used, so a client
/// behind a URL rewrite or a TLS proxy gets a URI on the name it knows.
#[tokio::test]
async fn lock_uri_uses_the_request_host_and_forwarded_scheme() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    client.send("hosted", "x").await;
    let response = client
        .request(Method::POST, "/hosted/messages/head?timeout=1")
        .header("Host", "steward-test.servicebus.windows.net")
        .header("X-Forwarded-Proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let token = broker_properties(response.headers())["LockToken"].as_str().unwrap().to_owned();
    assert_eq!(location(&response), format!("{NAMESPACE}/hosted/messages/1/{token}"));
}

/// Ensures that deleting at the lock URI completes the message, and that the lock is
/// then gone (404).
#[tokio::test]
async fn complete_at_lock_uri_removes_message_and_repeat_is_404() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    client.send("work", "job").await;
    let uri = location(&client.peek_lock("work", 1).await);

    let completed = client.settle(Method::DELETE, &uri).await;
    assert_eq!(completed.status(), StatusCode::OK);
    assert_eq!(emulator.broker().message_count("work"), 0);

    let again = client.settle(Method::DELETE, &uri).await;
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    assert!(again.text().await.unwrap().starts_with("<Error><Code>404</Code><Detail>"));
    assert_eq!(client.peek_lock("work", 0).await.status(), StatusCode::NO_CONTENT);
}

/// Ensures that settlement accepts the message id as well as the sequence number in
/// the path, as the real service does.
#[tokio::test]
async fn settlement_accepts_message_id_or_sequence_number() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    client.send_with("ids", "a", r#"{"MessageId":"order-17"}"#, &[]).await;
    let props = broker_properties(client.peek_lock("ids", 1).await.headers());
    assert_eq!(props["MessageId"], "order-17");
    let token = props["LockToken"].as_str().unwrap();
    let sequence = props["SequenceNumber"].as_u64().unwrap();

    let by_id = client.settle(Method::POST, &format!("/ids/messages/order-17/{token}")).await;
    assert_eq!(by_id.status(), StatusCode::OK, "renew by message id");
    let by_sequence =
        client.settle(Method::DELETE, &format!("/ids/messages/{sequence}/{token}")).await;
    assert_eq!(by_sequence.status(), StatusCode::OK, "complete by sequence number");
    assert_eq!(emulator.broker().message_count("ids"), 0);
}

/// Ensures that unlocking (`PUT`) releases the message at once for the next receiver,
/// with its delivery count one higher.
#[tokio::test]
async fn unlock_releases_message_with_delivery_count_incremented() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    client.send("retry", "r").await;
    let first = client.peek_lock("retry", 1).await;
    let first_token = broker_properties(first.headers())["LockToken"].clone();

    let unlocked = client.settle(Method::PUT, &location(&first)).await;
    assert_eq!(unlocked.status(), StatusCode::OK);

    let second = client.peek_lock("retry", 0).await;
    assert_eq!(second.status(), StatusCode::CREATED);
    let props = broker_properties(second.headers());
    assert_eq!(props["DeliveryCount"], 2);
    assert_ne!(props["LockToken"], first_token);
    assert_eq!(client.settle(Method::PUT, &location(&first)).await.status(), StatusCode::NOT_FOUND);
}

/// Ensures that renewing returns a later `LockedUntilUtc` and really extends the lock:
/// the message can still be completed after its first lock would have expired.
#[tokio::test]
async fn renew_extends_locked_until_past_the_first_expiry() {
    let lock = Duration::from_secs(6);
    let emulator = start(Emulator::builder().with_lock_duration(lock)).await;
    let client = Client::new(&emulator);
    client.send("long", "slow job").await;
    let started = Instant::now();
    let response = client.peek_lock("long", 1).await;
    let first_until = date(&broker_properties(response.headers())["LockedUntilUtc"]);
    let uri = location(&response);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let renewed = client.settle(Method::POST, &uri).await;
    assert_eq!(renewed.status(), StatusCode::OK);
    let renewed_until = date(&broker_properties(renewed.headers())["LockedUntilUtc"]);
    assert!(renewed_until > first_until, "{renewed_until:?} after {first_until:?}");

    // Past the first lock's end, within the renewed one.
    tokio::time::sleep(
        (started + Duration::from_millis(7500)).saturating_duration_since(Instant::now()),
    )
    .await;
    let completed = client.settle(Method::DELETE, &uri).await;
    assert_eq!(completed.status(), StatusCode::OK);
}

/// Ensures that a lock left to expire makes the message available again with
/// `DeliveryCount` one higher and a new lock, while the old lock URI is 404.
#[tokio::test]
async fn lock_expiry_redelivers_with_delivery_count_plus_one() {
    let emulator = start(Emulator::builder().with_lock_duration(Duration::from_secs(1))).await;
    let client = Client::new(&emulator);
    client.send("expiring", "e").await;
    let first = client.peek_lock("expiring", 1).await;
    let first_props = broker_properties(first.headers());
    assert_eq!(first_props["DeliveryCount"], 1);

    // Waits out the lock inside the long poll.
    let second = client.peek_lock("expiring", 10).await;
    assert_eq!(second.status(), StatusCode::CREATED);
    let second_props = broker_properties(second.headers());
    assert_eq!(second_props["DeliveryCount"], 2);
    assert_eq!(second_props["MessageId"], first_props["MessageId"]);
    assert_ne!(second_props["LockToken"], first_props["LockToken"]);
    assert_eq!(
        client.settle(Method::DELETE, &location(&first)).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(client.settle(Method::DELETE, &location(&second)).await.status(), StatusCode::OK);
}

/// Ensures that a message released more often than the maximum delivery count lands in
/// `$DeadLetterQueue` with reason `MaxDeliveryCountExceeded`, readable and completable
/// over the `$DeadLetterQueue` paths.
#[tokio::test]
async fn max_delivery_count_moves_message_to_dead_letter_queue() {
    let emulator = start(Emulator::builder().with_max_delivery_count(2)).await;
    let client = Client::new(&emulator);
    client.send_with("poison", "bad", r#"{"MessageId":"p-1"}"#, &[("Origin-Id", "\"o\"")]).await;
    for delivery in 1..=2 {
        let response = client.peek_lock("poison", 1).await;
        assert_eq!(broker_properties(response.headers())["DeliveryCount"], delivery);
        assert_eq!(client.settle(Method::PUT, &location(&response)).await.status(), StatusCode::OK);
    }
    assert_eq!(client.peek_lock("poison", 0).await.status(), StatusCode::NO_CONTENT);

    let dead = client.peek_lock("poison/$DeadLetterQueue", 1).await;
    assert_eq!(dead.status(), StatusCode::CREATED);
    assert_eq!(header(dead.headers(), "deadletterreason"), "\"MaxDeliveryCountExceeded\"");
    assert!(header(dead.headers(), "deadlettererrordescription").contains("2 delivery attempts"));
    assert_eq!(header(dead.headers(), "origin-id"), "\"o\"");
    assert_eq!(broker_properties(dead.headers())["MessageId"], "p-1");
    let uri = location(&dead);
    assert!(uri.contains("/poison/$DeadLetterQueue/messages/"), "{uri}");
    assert_eq!(dead.text().await.unwrap(), "bad");

    assert_eq!(client.settle(Method::DELETE, &uri).await.status(), StatusCode::OK);
    assert_eq!(emulator.broker().dead_letter_count("poison"), 0);
}

/// Ensures that a lock expiring on the last allowed delivery also dead-letters, and
/// that the percent-encoded `%24DeadLetterQueue` path reaches the same queue.
#[tokio::test]
async fn max_delivery_count_by_lock_expiry_dead_letters_too() {
    let emulator = start(
        Emulator::builder().with_max_delivery_count(1).with_lock_duration(Duration::from_secs(1)),
    )
    .await;
    let client = Client::new(&emulator);
    client.send("slowpoison", "x").await;
    assert_eq!(client.peek_lock("slowpoison", 1).await.status(), StatusCode::CREATED);
    assert_eq!(client.peek_lock("slowpoison", 3).await.status(), StatusCode::NO_CONTENT);

    let dead = client.receive_and_delete("slowpoison/%24DeadLetterQueue", 1).await;
    assert_eq!(dead.status(), StatusCode::OK);
    assert_eq!(header(dead.headers(), "deadletterreason"), "\"MaxDeliveryCountExceeded\"");
}

/// Ensures that a message with `ScheduledEnqueueTimeUtc` cannot be received before that
/// time and can be after it, and reports its schedule.
#[tokio::test]
async fn scheduled_message_is_invisible_before_its_time() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    let at = format_date(SystemTime::now() + Duration::from_secs(3));
    let scheduled = parse_date(&at).unwrap();
    let props = format!(r#"{{"ScheduledEnqueueTimeUtc":"{at}"}}"#);
    assert_eq!(client.send_with("later", "soon", &props, &[]).await.status(), StatusCode::CREATED);

    assert_eq!(client.peek_lock("later", 0).await.status(), StatusCode::NO_CONTENT);
    let response = client.peek_lock("later", 15).await;
    let received_at = SystemTime::now();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(received_at >= scheduled, "received before its time");
    let props = broker_properties(response.headers());
    assert_eq!(props["ScheduledEnqueueTimeUtc"], at);
    assert!(date(&props["EnqueuedTimeUtc"]) >= scheduled);
}

/// Ensures that every settable broker property and every custom property survives the
/// trip: custom values keep their JSON type (strings and dates quoted, numbers and
/// booleans bare; a value that is not JSON is a string, as in the reference's example).
#[tokio::test]
async fn custom_properties_and_broker_properties_round_trip() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    let sent = r#"{"MessageId":"m-42","CorrelationId":"corr-1","SessionId":"s-1","Label":"M1",
        "ReplyTo":"replies","To":"orders","ReplyToSessionId":"rs","PartitionKey":"s-1",
        "TimeToLive":3600,"State":"Active","Unknown":"ignored"}"#
        .replace('\n', "");
    let custom = [
        ("Priority", "High"),
        ("Customer", "\"12345,ABC\""),
        ("Count", "12"),
        ("Ratio", "-1.5"),
        ("Flag", "true"),
        ("Quoted-Number", "\"12\""),
        ("When", "\"Wed, 02 Jul 2014 01:32:27 GMT\""),
        ("Content-Type", "application/json"),
        ("x-ms-client-request-id", "not-a-property"),
    ];
    let response = client.send_with("props", r#"{"id":1}"#, &sent, &custom).await;
    assert_eq!(response.status(), StatusCode::CREATED);

    let received = client.peek_lock("props", 1).await;
    let headers = received.headers().clone();
    let props = broker_properties(&headers);
    for (key, value) in [
        ("MessageId", "m-42"),
        ("CorrelationId", "corr-1"),
        ("SessionId", "s-1"),
        ("Label", "M1"),
        ("ReplyTo", "replies"),
        ("To", "orders"),
        ("ReplyToSessionId", "rs"),
        ("PartitionKey", "s-1"),
        ("ContentType", "application/json"),
    ] {
        assert_eq!(props[key], value, "{key} in {props}");
    }
    assert_eq!(props["TimeToLive"], 3600.0);
    assert!(props.get("Unknown").is_none());
    assert_eq!(header(&headers, "content-type"), "application/json");
    assert_eq!(header(&headers, "priority"), "\"High\"");
    assert_eq!(header(&headers, "customer"), "\"12345,ABC\"");
    assert_eq!(header(&headers, "count"), "12");
    assert_eq!(header(&headers, "ratio"), "-1.5");
    assert_eq!(header(&headers, "flag"), "true");
    assert_eq!(header(&headers, "quoted-number"), "\"12\"");
    assert_eq!(header(&headers, "when"), "\"Wed, 02 Jul 2014 01:32:27 GMT\"");
    assert!(headers.get("x-ms-client-request-id").is_none());
    assert!(headers.get("sb-emulator:meta").is_none());
    assert_eq!(received.text().await.unwrap(), r#"{"id":1}"#);

    // What the broker holds: steward's message fields and the decoded properties.
    let stored = &emulator.broker().peek("props")[0];
    assert_eq!(stored.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(stored.content_type.as_deref(), Some("application/json"));
    assert_eq!(stored.properties["priority"], "High");
    assert_eq!(stored.properties["count"], "12");
}

/// Ensures that the date formats other clients send (RFC 2822 with `+0000`, as the
/// azure_messaging_servicebus crate serializes) are understood.
#[tokio::test]
async fn scheduled_time_with_numeric_offset_is_understood() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    let props =
        r#"{"ScheduledEnqueueTimeUtc":"Wed, 02 Jul 2014 01:32:27 +0000","MessageId":"old"}"#;
    assert_eq!(client.send_with("offsets", "x", props, &[]).await.status(), StatusCode::CREATED);
    let response = client.receive_and_delete("offsets", 1).await;
    assert_eq!(
        broker_properties(response.headers())["ScheduledEnqueueTimeUtc"],
        "Wed, 02 Jul 2014 01:32:27 GMT"
    );
    let bad = client.send_with("offsets", "x", r#"{"ScheduledEnqueueTimeUtc":"soon"}"#, &[]).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let bad = client.send_with("offsets", "x", "{not json", &[]).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert!(bad.text().await.unwrap().contains("BrokerProperties"));
    assert_eq!(emulator.broker().message_count("offsets"), 0);
}

/// Ensures that Receive and Delete (`DELETE .../messages/head`) answers 200 with the
/// message and no lock, removes it, and answers 204 on an empty queue.
#[tokio::test]
async fn receive_and_delete_returns_message_without_lock_and_removes_it() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    client.send_with("rd", "gone", r#"{"Label":"L"}"#, &[("Step", "3")]).await;

    let response = client.receive_and_delete("rd", 1).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("location").is_none());
    let props = broker_properties(response.headers());
    assert!(props.get("LockToken").is_none() && props.get("LockedUntilUtc").is_none());
    assert_eq!(props["Label"], "L");
    assert_eq!(header(response.headers(), "step"), "3");
    assert_eq!(response.text().await.unwrap(), "gone");
    assert_eq!(emulator.broker().message_count("rd"), 0);

    let empty = client.receive_and_delete("rd", 0).await;
    assert_eq!(empty.status(), StatusCode::NO_CONTENT);
    assert!(empty.headers().get("brokerproperties").is_none());
}

/// Ensures that `timeout=N` on an empty queue holds the request about N seconds, then
/// answers 204 without broker properties; `api-version` is tolerated.
#[tokio::test]
async fn empty_queue_peek_lock_waits_the_timeout_then_204() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    let started = Instant::now();
    let response = client
        .request(Method::POST, "/idle/messages/head?api-version=2015-01&timeout=2")
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.headers().get("brokerproperties").is_none());
    assert!(response.headers().get("location").is_none());
    assert!(waited >= Duration::from_millis(1900), "answered after {waited:?}");
    assert!(waited < Duration::from_secs(15), "answered after {waited:?}");
}

/// Ensures that a waiting peek-lock returns as soon as a message arrives.
#[tokio::test]
async fn waiting_peek_lock_returns_message_sent_meanwhile() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    let waiting = client.peek_lock("meanwhile", 30);
    let sender = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Client::new(&emulator).send("meanwhile", "arrived").await
    };
    let started = Instant::now();
    let (response, sent) = tokio::join!(waiting, sender);
    assert_eq!(sent.status(), StatusCode::CREATED);
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(response.text().await.unwrap(), "arrived");
}

/// Ensures that on a queue without sessions, `SessionId` is only a property: messages
/// of one session are not held back one at a time.
#[tokio::test]
async fn session_id_on_plain_queue_does_not_serialize_delivery() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    for body in ["a1", "a2"] {
        client.send_with("plain", body, r#"{"SessionId":"a"}"#, &[]).await;
    }
    let first = client.peek_lock("plain", 1).await;
    let second = client.peek_lock("plain", 0).await;
    assert_eq!(second.status(), StatusCode::CREATED, "the second message is not held back");
    assert_eq!(broker_properties(second.headers())["SessionId"], "a");
    assert_eq!(first.text().await.unwrap(), "a1");
    assert_eq!(second.text().await.unwrap(), "a2");
}

/// Ensures that signed requests are accepted, whether the token covers the namespace,
/// the queue or the exact path.
#[tokio::test]
async fn sas_tokens_signed_with_the_key_are_accepted() {
    let emulator = start(Emulator::builder().with_sas_key(KEY_NAME, KEY)).await;
    let client = Client::signed(&emulator);
    assert_eq!(client.send("secure", "s").await.status(), StatusCode::CREATED);
    let response = client.peek_lock("secure", 1).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(client.settle(Method::DELETE, &location(&response)).await.status(), StatusCode::OK);

    let expiry = SystemTime::now() + Duration::from_secs(60);
    for resource in [
        "steward-test.servicebus.windows.net",
        "https://steward-test.servicebus.windows.net/secure",
    ] {
        let token = sas_token(resource, KEY_NAME, KEY, expiry);
        let response = client
            .http
            .post(format!("{}/secure/messages", emulator.endpoint()))
            .header("Authorization", token)
            .body("t")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "token for {resource}");
    }
}

/// Ensures that a wrong key, an unknown key name, an expired token, a path outside the
/// token's resource and a missing header are all 401, and store nothing.
#[tokio::test]
async fn sas_tokens_with_wrong_key_name_expiry_or_scope_are_401() {
    let emulator = start(Emulator::builder().with_sas_key(KEY_NAME, KEY)).await;
    let http = reqwest::Client::new();
    let url = format!("{}/guarded/messages", emulator.endpoint());
    let resource = format!("{NAMESPACE}/guarded");
    let later = SystemTime::now() + Duration::from_secs(60);
    let cases = [
        ("wrong key", Some(sas_token(&resource, KEY_NAME, "bm90LXRoZS1rZXk=", later))),
        ("unknown key name", Some(sas_token(&resource, "listen-only", KEY, later))),
        (
            "expired",
            Some(sas_token(&resource, KEY_NAME, KEY, SystemTime::now() - Duration::from_secs(5))),
        ),
        ("path outside sr", Some(sas_token(&format!("{NAMESPACE}/other"), KEY_NAME, KEY, later))),
        (
            "prefix of another name",
            Some(sas_token(&format!("{NAMESPACE}/guard"), KEY_NAME, KEY, later)),
        ),
        ("missing", None),
    ];
    for (case, token) in cases {
        let mut request = http.post(&url).body("nope");
        if let Some(token) = token {
            request = request.header("Authorization", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
        assert!(response.text().await.unwrap().contains("<Code>401</Code>"), "{case}");
    }
    assert_eq!(emulator.broker().message_count("guarded"), 0);
}

/// Ensures that an unknown lock is 404, a malformed lock token 400, and that without
/// auto-creation an undeclared queue is 410 Gone for every operation.
#[tokio::test]
async fn unknown_lock_is_404_and_missing_queue_is_410() {
    let emulator =
        start(Emulator::builder().with_auto_create_queues(false).with_queue("known")).await;
    let client = Client::new(&emulator);
    let token = uuid::Uuid::new_v4();

    assert_eq!(client.send("known", "k").await.status(), StatusCode::CREATED);
    let unknown_lock = client.settle(Method::DELETE, &format!("/known/messages/1/{token}")).await;
    assert_eq!(unknown_lock.status(), StatusCode::NOT_FOUND);
    let bad_token = client.settle(Method::DELETE, "/known/messages/1/not-a-guid").await;
    assert_eq!(bad_token.status(), StatusCode::BAD_REQUEST);

    assert_eq!(client.send("missing", "m").await.status(), StatusCode::GONE);
    assert_eq!(client.peek_lock("missing", 0).await.status(), StatusCode::GONE);
    assert_eq!(client.receive_and_delete("missing", 0).await.status(), StatusCode::GONE);
    for method in [Method::PUT, Method::DELETE, Method::POST] {
        let response = client.settle(method.clone(), &format!("/missing/messages/1/{token}")).await;
        assert_eq!(response.status(), StatusCode::GONE, "{method}");
    }
    assert!(!emulator.broker().has_queue("missing"));
}

/// Ensures that a session-enabled queue refuses REST receives with the service's 405
/// and text, refuses messages without a session id the same way, and takes messages
/// with one.
#[tokio::test]
async fn session_enabled_queue_refuses_non_session_receive_with_405() {
    let emulator = start(Emulator::builder().with_session_queue("deploymentstatus")).await;
    let client = Client::new(&emulator);

    let refused = client.peek_lock("deploymentstatus", 0).await;
    assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(refused.text().await.unwrap().contains(
        "It is not possible for an entity that requires sessions to create a non-sessionful message receiver."
    ));
    assert_eq!(
        client.receive_and_delete("deploymentstatus", 0).await.status(),
        StatusCode::METHOD_NOT_ALLOWED
    );

    let no_session = client.send("deploymentstatus", "x").await;
    assert_eq!(no_session.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(no_session.text().await.unwrap().contains("The SessionId was not set on a message"));
    let with_session =
        client.send_with("deploymentstatus", "y", r#"{"SessionId":"ws-1"}"#, &[]).await;
    assert_eq!(with_session.status(), StatusCode::CREATED);
    assert_eq!(emulator.broker().peek("deploymentstatus")[0].session_id.as_deref(), Some("ws-1"));
    // Its dead-letter queue has no sessions.
    assert_eq!(
        client.peek_lock("deploymentstatus/$DeadLetterQueue", 0).await.status(),
        StatusCode::NO_CONTENT
    );
}

/// Ensures that injected error statuses are answered without touching the broker, and
/// that broker faults come back as the statuses the service gives.
#[tokio::test]
async fn injected_statuses_fail_requests_and_leave_the_broker_untouched() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    emulator.faults().fail_next_on(Operation::Send, 1, StatusCode::SERVICE_UNAVAILABLE);
    emulator.faults().fail_next(1, StatusCode::INTERNAL_SERVER_ERROR);

    let failed = client.send("flaky", "f").await;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(failed.text().await.unwrap().contains("<Code>503</Code>"));
    assert_eq!(emulator.broker().message_count("flaky"), 0);
    assert_eq!(client.send("flaky", "f").await.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(client.send("flaky", "f").await.status(), StatusCode::CREATED);

    emulator.broker().faults("flaky").fail_receives(1, ErrorKind::Connection);
    assert_eq!(client.peek_lock("flaky", 0).await.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_first_delivery(&client, "flaky", 0).await;
}

/// Ensures that a dropped connection gives the client a transport error, not an HTTP
/// answer, and loses nothing: the message is still there, unlocked.
#[tokio::test]
async fn dropped_connection_gives_no_answer_and_loses_nothing() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    client.send("dropping", "d").await;
    emulator.faults().drop_next_on(Operation::PeekLock, 1);

    let dropped = client.request(Method::POST, "/dropping/messages/head?timeout=0").send().await;
    let error = dropped.unwrap_err();
    assert!(error.is_request() || error.is_connect(), "{error:?}");

    assert_first_delivery(&client, "dropping", 0).await;
}

/// Ensures that injected latency slows every answer down.
#[tokio::test]
async fn injected_latency_delays_answers() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    emulator.faults().set_latency(Duration::from_millis(400));
    let started = Instant::now();
    assert_eq!(client.send("slow", "s").await.status(), StatusCode::CREATED);
    assert!(started.elapsed() >= Duration::from_millis(400));
    emulator.faults().clear();
    assert_eq!(client.peek_lock("slow", 1).await.status(), StatusCode::CREATED);
}

/// Ensures that the connection counter counts accepted TCP connections: a pooling
/// client reuses one, a client without a pool opens one per request.
#[tokio::test]
async fn connection_count_counts_accepted_tcp_connections() {
    let emulator = start(Emulator::builder()).await;
    assert_eq!(emulator.connection_count(), 0);
    let pooled = Client::new(&emulator);
    for _ in 0..5 {
        assert_eq!(pooled.send("count", "c").await.status(), StatusCode::CREATED);
    }
    assert_eq!(emulator.connection_count(), 1);

    let unpooled = Client {
        http: reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap(),
        ..Client::new(&emulator)
    };
    for _ in 0..3 {
        assert_eq!(unpooled.peek_lock("count", 0).await.status(), StatusCode::CREATED);
    }
    assert_eq!(emulator.connection_count(), 4);
}

/// Ensures that requests outside the protocol get clear errors: an unknown path 404,
/// a method the path does not take 405, topics 400, an oversized body 413, a send to a
/// dead-letter queue 400.
#[tokio::test]
async fn requests_outside_the_protocol_get_clear_errors() {
    let emulator = start(Emulator::builder().with_max_message_bytes(16)).await;
    let client = Client::new(&emulator);
    let status = |response: reqwest::Response| response.status();

    assert_eq!(
        status(client.request(Method::POST, "/only-a-queue").send().await.unwrap()),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status(client.request(Method::GET, "/q/messages/head").send().await.unwrap()),
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        status(
            client.request(Method::POST, "/t/subscriptions/s/messages/head").send().await.unwrap()
        ),
        StatusCode::BAD_REQUEST
    );
    let too_big = client.send("q", "0123456789abcdefX").await;
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(client.send("q", "0123456789abcdef").await.status(), StatusCode::CREATED);
    assert_eq!(client.send("q/$DeadLetterQueue", "x").await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        status(
            client.request(Method::POST, "/q/messages/head?timeout=never").send().await.unwrap()
        ),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(emulator.broker().message_count("q"), 1);
}

/// Ensures that Send Message Batch stores every message in order with its properties,
/// and that a bad entry stores none.
#[tokio::test]
async fn send_batch_stores_each_message_with_its_properties() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    let batch = r#"[
        {"Body":"first","UserProperties":{"Message number":"1","n":1}},
        {"Body":"second","BrokerProperties":{"Label":"M2","MessageId":"b-2"},"UserProperties":{"ok":true}}
    ]"#;
    let sent = client.send_batch("batch", batch).await;
    assert_eq!(sent.status(), StatusCode::CREATED);

    let first = client.receive_and_delete("batch", 1).await;
    assert_eq!(header(first.headers(), "n"), "1");
    assert_eq!(first.text().await.unwrap(), "first");
    let second = client.receive_and_delete("batch", 1).await;
    assert_eq!(broker_properties(second.headers())["Label"], "M2");
    assert_eq!(broker_properties(second.headers())["MessageId"], "b-2");
    assert_eq!(header(second.headers(), "ok"), "true");

    let bad = r#"[{"Body":"fine"},{"Body":"bad","UserProperties":{"nested":{"a":1}}}]"#;
    let refused = client.send_batch("batch", bad).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(emulator.broker().message_count("batch"), 0);
}

/// Ensures that a message whose `TimeToLive` has passed is removed, not delivered.
#[tokio::test]
async fn expired_time_to_live_removes_message_instead_of_delivering() {
    let emulator = start(Emulator::builder()).await;
    let client = Client::new(&emulator);
    client.send_with("ttl", "stale", r#"{"TimeToLive":1}"#, &[]).await;
    client.send_with("ttl", "fresh", r#"{"TimeToLive":600}"#, &[]).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let response = client.peek_lock("ttl", 0).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.text().await.unwrap(), "fresh");
    assert_eq!(emulator.broker().message_count("ttl"), 1);
}

/// Ensures that messages put straight into the broker are received over REST, with
/// their properties as quoted strings.
#[tokio::test]
async fn messages_sent_to_the_broker_directly_are_received_over_rest() {
    let emulator = start(Emulator::builder()).await;
    let message =
        OutgoingMessage::json("{}").with_message_id("direct-1").with_property("Kind", "x");
    emulator.broker().send("direct", message).await.unwrap();
    let response = Client::new(&emulator).peek_lock("direct", 1).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(broker_properties(response.headers())["MessageId"], "direct-1");
    assert_eq!(header(response.headers(), "kind"), "\"x\"");
    assert_eq!(header(response.headers(), "content-type"), "application/json");
}

/// Ensures that shutdown ends a waiting receive at once (with 204) and stops listening.
#[tokio::test]
async fn shutdown_ends_waiting_receives_and_stops_listening() {
    let emulator = start(Emulator::builder()).await;
    let endpoint = emulator.endpoint();
    let client = Client::new(&emulator);
    let started = Instant::now();
    let waiting = tokio::spawn(async move { client.peek_lock("closing", 60).await.status() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    emulator.shutdown().await;
    assert_eq!(waiting.await.unwrap(), StatusCode::NO_CONTENT);
    assert!(started.elapsed() < Duration::from_secs(30));
    let refused = reqwest::Client::new().post(format!("{endpoint}/closing/messages")).send().await;
    assert!(refused.is_err(), "still listening after shutdown");
}

/// Ensures that a waiting receive whose client went away does not lock a message that
/// arrives afterwards: nobody would get it until its lock expired.
#[tokio::test]
async fn abandoned_waiting_receive_does_not_lock_later_messages() {
    let emulator = start(Emulator::builder()).await;
    let impatient = Client {
        http: reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap(),
        ..Client::new(&emulator)
    };
    let gave_up = impatient.request(Method::POST, "/ghost/messages/head?timeout=10").send().await;
    assert!(gave_up.unwrap_err().is_timeout());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = Client::new(&emulator);
    client.send("ghost", "for the living").await;
    assert_first_delivery(&client, "ghost", 2).await;
}

/// Ensures that an unusable configuration or a taken address is an error at start,
/// not a half-working emulator.
#[tokio::test]
async fn start_refuses_unusable_configuration_and_taken_address() {
    use steward_servicebus::emulator::EmulatorError;
    let config_error = |builder: EmulatorBuilder| async move {
        matches!(builder.start().await, Err(EmulatorError::Config(_)))
    };
    assert!(config_error(Emulator::builder().with_max_delivery_count(0)).await);
    assert!(config_error(Emulator::builder().with_lock_duration(Duration::ZERO)).await);
    assert!(
        config_error(Emulator::builder().with_lock_duration(Duration::from_secs(90_000))).await
    );
    assert!(config_error(Emulator::builder().with_queue("a/$DeadLetterQueue")).await);
    assert!(config_error(Emulator::builder().with_session_queue("")).await);

    let running = start(Emulator::builder()).await;
    let taken = Emulator::builder().with_listen_addr(running.addr()).start().await;
    assert!(matches!(taken, Err(EmulatorError::Bind { addr, .. }) if addr == running.addr()));
}

/// One HTTP/1.1 connection to the emulator, written and read by hand, so that a test
/// sees what the server does with the connection itself.
struct RawConnection {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    /// `None` while a request is being written.
    writer: Option<tokio::net::tcp::OwnedWriteHalf>,
}

impl RawConnection {
    async fn open(emulator: &EmulatorHandle) -> Self {
        let address = emulator.endpoint().trim_start_matches("http://").to_owned();
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let (reader, writer) = stream.into_split();
        Self { reader: tokio::io::BufReader::new(reader), writer: Some(writer) }
    }

    /// Writes a request with a body of `body_len` bytes in a task of its own, so that
    /// the answer can be read while the body is still being written; the task gives the
    /// write half back once the whole request is written.
    fn write(
        mut writer: tokio::net::tcp::OwnedWriteHalf,
        method: &str,
        path: &str,
        body_len: usize,
    ) -> tokio::task::JoinHandle<std::io::Result<tokio::net::tcp::OwnedWriteHalf>> {
        use tokio::io::AsyncWriteExt as _;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: emulator\r\ncontent-length: {body_len}\r\n\r\n"
        );
        tokio::spawn(async move {
            writer.write_all(head.as_bytes()).await?;
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = body_len;
            while left > 0 {
                let n = left.min(chunk.len());
                writer.write_all(&chunk[..n]).await?;
                left -= n;
            }
            writer.flush().await?;
            Ok(writer)
        })
    }

    /// Reads one answer: its status, or the error that ended the connection first.
    async fn read_status(&mut self) -> std::io::Result<u16> {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
        let mut content_length = 0;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; content_length];
        self.reader.read_exact(&mut body).await?;
        Ok(status)
    }

    /// Sends a request with a body of `body_len` bytes and reads its answer, which must
    /// come after the whole body is written.
    async fn exchange(&mut self, method: &str, path: &str, body_len: usize) -> u16 {
        let writer = self.writer.take().unwrap();
        let writing = Self::write(writer, method, path, body_len);
        let status = self.read_status().await;
        let written = writing.await.unwrap();
        self.writer = Some(written.expect("the whole request body is written"));
        status.expect("an answer on the connection")
    }
}

/// Ensures that a request's body is read to its end whatever the answer, so that the
/// client can finish writing, read the answer and use the connection again: a receive
/// and a settlement with large bodies, a send over the size limit (413) and an unknown
/// path (404), one after another on one keep-alive connection.
#[tokio::test]
async fn large_request_bodies_are_read_before_the_answer_and_keep_the_connection() {
    let emulator = start(Emulator::builder().with_max_message_bytes(1024)).await;
    let mut connection = RawConnection::open(&emulator).await;
    let large = 4 * 1024 * 1024;

    assert_eq!(connection.exchange("POST", "/q/messages/head?timeout=0", large).await, 204);
    assert_eq!(connection.exchange("DELETE", "/q/messages/head?timeout=0", large).await, 204);
    let lock =
        "/q/messages/00000000-0000-4000-8000-000000000000/00000000-0000-4000-8000-000000000000";
    assert_eq!(connection.exchange("DELETE", lock, large).await, 404);
    assert_eq!(connection.exchange("POST", "/q/messages", large).await, 413);
    assert_eq!(connection.exchange("POST", "/only-a-queue", large).await, 404);
    assert_eq!(connection.exchange("POST", "/q/messages", 1024).await, 201);
    assert_eq!(connection.exchange("DELETE", "/q/messages/head?timeout=0", 0).await, 200);
    assert_eq!(emulator.connection_count(), 1);
    emulator.shutdown().await;
}
