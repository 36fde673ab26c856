//! The `azure_messaging_servicebus` 0.21 queue client, unchanged, against the emulator:
//! only its HTTP client rewrites `https://<namespace>.servicebus.windows.net` to the
//! emulator's address, as a user of the real crate would.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::error::ErrorKind;
use azure_core::headers::{HeaderName, HeaderValue, Headers};
use azure_core::{Body, HttpClient, StatusCode};
use azure_messaging_servicebus::service_bus::{
    QueueClient, SendMessageOptions, SettableBrokerProperties,
};
use steward_servicebus::emulator::{Emulator, EmulatorHandle};
use time::OffsetDateTime;

const NAMESPACE: &str = "steward-sdk";
const KEY_NAME: &str = "RootManageSharedAccessKey";
const KEY: &str = "c2RrLWNvbXBhdGliaWxpdHk=";

/// An `HttpClient` that sends the namespace's requests to the emulator instead.
#[derive(Debug)]
struct Rewrite {
    http: reqwest::Client,
    from: String,
    to: String,
}

#[async_trait]
impl HttpClient for Rewrite {
    async fn execute_request(
        &self,
        request: &azure_core::Request,
    ) -> azure_core::Result<azure_core::Response> {
        let url = request.url().as_str().replacen(&self.from, &self.to, 1);
        let method = reqwest::Method::from_bytes(request.method().as_ref().as_bytes()).unwrap();
        let mut builder = self.http.request(method, url);
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let Body::Bytes(body) = request.body() else {
            panic!("the queue client sends whole bodies");
        };
        let response = builder
            .body(body.clone())
            .send()
            .await
            .map_err(|e| azure_core::Error::full(ErrorKind::Io, e, "request failed"))?;
        let status = StatusCode::try_from(response.status().as_u16()).unwrap();
        let headers: HashMap<HeaderName, HeaderValue> = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from(k.as_str().to_owned()),
                    HeaderValue::from(v.to_str().unwrap().to_owned()),
                )
            })
            .collect();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| azure_core::Error::full(ErrorKind::Io, e, "body failed"))?;
        let body = Box::pin(futures::stream::once(async move { Ok(bytes) }));
        Ok(azure_core::Response::new(status, Headers::from(headers), body))
    }
}

fn client(emulator: &EmulatorHandle, queue: &str, key: &str) -> QueueClient {
    let http: Arc<dyn HttpClient> = Arc::new(Rewrite {
        http: reqwest::Client::new(),
        from: format!("https://{NAMESPACE}.servicebus.windows.net"),
        to: emulator.endpoint(),
    });
    QueueClient::new(http, NAMESPACE, queue, KEY_NAME, key.to_owned()).unwrap()
}

async fn emulator() -> EmulatorHandle {
    Emulator::builder()
        .with_sas_key(KEY_NAME, KEY)
        .with_lock_duration(Duration::from_secs(30))
        .start()
        .await
        .unwrap()
}

/// Ensures that the crate's send, peek-lock (with its `BrokerProperties` parsing),
/// renew, unlock and delete through the lock URI all work against the emulator.
#[tokio::test]
async fn queue_client_sends_peek_locks_renews_unlocks_and_deletes() {
    let emulator = emulator().await;
    let queue = client(&emulator, "sdk-jobs", KEY);
    let options = SendMessageOptions {
        content_type: Some("application/json".into()),
        broker_properties: Some(SettableBrokerProperties {
            message_id: Some("sdk-1".into()),
            correlation_id: Some("corr".into()),
            label: Some("L".into()),
            time_to_live: Some(Duration::from_secs(600)),
            ..SettableBrokerProperties::default()
        }),
        custom_properties: Some(HashMap::from([("attempt".to_owned(), "1".to_owned())])),
    };
    queue.send_message(r#"{"n":1}"#, Some(options)).await.unwrap();

    let locked = queue.peek_lock_message2(Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(*locked.status(), StatusCode::Created);
    assert_eq!(locked.body(), r#"{"n":1}"#);
    let props = locked.broker_properties().expect("BrokerProperties parse with the crate");
    assert_eq!(props.message_id, "sdk-1");
    assert_eq!(props.delivery_count, 1);
    assert!((props.time_to_live - 600.0).abs() < f64::EPSILON);
    assert!(props.locked_until_utc > OffsetDateTime::now_utc() + Duration::from_secs(25));
    assert!(props.enqueued_time_utc.is_some());
    let custom: Headers = locked.custom_properties().unwrap();
    assert_eq!(custom.get_optional_str(&HeaderName::from_static("attempt")), Some("1"));

    locked.renew_message_lock().await.unwrap();
    locked.unlock_message().await.unwrap();
    let again = queue.peek_lock_message2(Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(again.broker_properties().unwrap().delivery_count, 2);
    again.delete_message().await.unwrap();
    assert_eq!(emulator.broker().message_count("sdk-jobs"), 0);
    assert!(locked.delete_message().await.is_err(), "the first lock is gone");

    let empty = queue.peek_lock_message2(Some(Duration::from_secs(1))).await.unwrap();
    assert_eq!(*empty.status(), StatusCode::NoContent);
    assert!(empty.broker_properties().is_none());
}

/// Ensures that the crate's receive-and-delete and scheduled sends work, and that a
/// wrong key shows up as a 401 status on peek-lock (which the crate does not check).
#[tokio::test]
async fn queue_client_receive_and_delete_schedule_and_wrong_key() {
    let emulator = emulator().await;
    let queue = client(&emulator, "sdk-later", KEY);
    let options = SendMessageOptions {
        broker_properties: Some(SettableBrokerProperties {
            scheduled_enqueue_time_utc: Some(OffsetDateTime::now_utc() + Duration::from_secs(2)),
            ..SettableBrokerProperties::default()
        }),
        ..SendMessageOptions::default()
    };
    queue.send_message("scheduled", Some(options)).await.unwrap();
    let early = queue.peek_lock_message2(Some(Duration::ZERO)).await.unwrap();
    assert_eq!(*early.status(), StatusCode::NoContent);
    assert_eq!(queue.receive_and_delete_message().await.unwrap(), "scheduled");

    let intruder = client(&emulator, "sdk-later", "bm90LXRoZS1rZXk=");
    let refused = intruder.peek_lock_message2(Some(Duration::ZERO)).await.unwrap();
    assert_eq!(*refused.status(), StatusCode::Unauthorized);
    assert!(intruder.send_message("x", None).await.is_err());
}
