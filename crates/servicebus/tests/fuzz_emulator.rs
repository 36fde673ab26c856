//! Structure-aware fuzzing of the Service Bus emulator's REST surface over loopback
//! HTTP: request paths and queries, the `Authorization` header with shared access
//! signatures (valid ones, then fields dropped, duplicated, reordered and mutated),
//! `BrokerProperties`, custom property headers, content types and batch bodies.
//!
//! The property: the emulator never panics (a panic would drop the connection) and
//! answers every request, with a 4xx for bad input and never a 5xx. The corpus is
//! `tests/corpus/servicebus-emulator/` at the workspace root; `cargo test` runs a few
//! cases, `cargo xtask fuzz --runs N --target servicebus-emulator` runs N in release.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../api/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use fuzz_support::{Counter, NASTY, fuzz, json_corpus, json_value, mutate, mutation, nasty_string};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use steward_servicebus::emulator::{Emulator, EmulatorHandle, sas_token};

const NAMESPACE: &str = "https://steward-fuzz.servicebus.windows.net";
const KEY_NAME: &str = "RootManageSharedAccessKey";
const KEY: &str = "c3Rld2FyZC1mdXp6LWtleQ==";
/// 2100-01-01: a token expiry that stays valid, so saved cases replay the same way.
const FAR_EXPIRY: u64 = 4_102_444_800;

/// A header value: text, or bytes that are not UTF-8 (HTTP allows obsolete text).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum HeaderText {
    Text(String),
    Bytes(Vec<u8>),
}

/// One request, as stored in `tests/corpus/servicebus-emulator/`. In the path,
/// `{lock}` stands for the lock (message id and token) of the last message received
/// with peek-lock; in a header value, `{sas}` for a valid signature for the request's
/// path.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EmulatorCase {
    method: String,
    path: String,
    #[serde(default)]
    query: String,
    #[serde(default)]
    headers: Vec<(String, HeaderText)>,
    #[serde(default)]
    body: String,
}

/// Keys of `BrokerProperties` and batch entries.
const PROPERTY_KEYS: &[&str] = &[
    "MessageId",
    "SessionId",
    "CorrelationId",
    "ContentType",
    "Label",
    "ReplyTo",
    "To",
    "ReplyToSessionId",
    "PartitionKey",
    "ViaPartitionKey",
    "TimeToLive",
    "ScheduledEnqueueTimeUtc",
    "Body",
    "BrokerProperties",
    "UserProperties",
];

fn broker_properties_seed() -> Value {
    json!({
        "MessageId": "m-1", "SessionId": "s-1", "CorrelationId": "c-1", "ContentType": "application/json",
        "Label": "l", "ReplyTo": "r", "To": "t", "ReplyToSessionId": "rs", "PartitionKey": "p",
        "ViaPartitionKey": "v", "TimeToLive": 60.5, "ScheduledEnqueueTimeUtc": "Sun, 06 Nov 1994 08:49:37 GMT"
    })
}

fn batch_seed() -> Value {
    json!([
        {"Body": "one", "BrokerProperties": {"SessionId": "s-1", "TimeToLive": 10}, "UserProperties": {"n": 1, "b": true, "s": "x"}},
        {"Body": "two", "BrokerProperties": {"SessionId": "s-2", "ScheduledEnqueueTimeUtc": "Thu, 01 Jan 2099 00:00:00 GMT"}}
    ])
}

/// A shared access signature: valid, or with its parts changed.
fn authorization() -> impl Strategy<Value = String> {
    let resource = prop_oneof![
        4 => Just("{path}".to_owned()),
        1 => Just(NAMESPACE.to_owned()),
        1 => Just(format!("{NAMESPACE}/other")),
        1 => nasty_string(),
    ];
    let name = prop_oneof![4 => Just(KEY_NAME.to_owned()), 1 => nasty_string()];
    let key = prop_oneof![4 => Just(KEY.to_owned()), 1 => nasty_string()];
    let expiry = prop_oneof![4 => Just(FAR_EXPIRY), 1 => Just(0_u64), 1 => any::<u64>()];
    let edit = prop_oneof![
        4 => Just(TokenEdit::None),
        1 => any::<usize>().prop_map(TokenEdit::Drop),
        1 => any::<usize>().prop_map(TokenEdit::Duplicate),
        1 => Just(TokenEdit::Reverse),
        2 => (any::<usize>(), nasty_string()).prop_map(|(n, v)| TokenEdit::Value(n, v)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(n, b)| TokenEdit::Flip(n, b)),
        1 => any::<usize>().prop_map(TokenEdit::Truncate),
        1 => prop::sample::select(&["sharedaccesssignature ", "Bearer ", "", " SharedAccessSignature  ", "SharedAccessSignature"][..])
            .prop_map(|s| TokenEdit::Scheme(s.to_owned())),
    ];
    (resource, name, key, expiry, edit).prop_map(|(resource, name, key, expiry, edit)| {
        let expiry = UNIX_EPOCH + Duration::from_secs(expiry.min(FAR_EXPIRY * 4));
        let token = if resource == "{path}" {
            // Signed at request time for the request's own path.
            "{sas}".to_owned()
        } else {
            sas_token(&resource, &name, &key, expiry)
        };
        edit.apply(token)
    })
}

#[derive(Debug, Clone)]
enum TokenEdit {
    None,
    Drop(usize),
    Duplicate(usize),
    Reverse,
    Value(usize, String),
    Flip(usize, u8),
    Truncate(usize),
    Scheme(String),
}

impl TokenEdit {
    fn apply(self, token: String) -> String {
        if token == "{sas}" && !matches!(self, TokenEdit::None) {
            // Edits need the text: sign for the namespace root instead.
            let expiry = UNIX_EPOCH + Duration::from_secs(FAR_EXPIRY);
            return self.apply(sas_token(NAMESPACE, KEY_NAME, KEY, expiry));
        }
        let Some((scheme, fields)) = token.split_once(' ') else { return token };
        let mut pairs: Vec<String> = fields.split('&').map(str::to_owned).collect();
        let n = pairs.len();
        match self {
            TokenEdit::None => return token,
            TokenEdit::Drop(i) => {
                pairs.remove(i % n);
            }
            TokenEdit::Duplicate(i) => pairs.push(pairs[i % n].clone()),
            TokenEdit::Reverse => pairs.reverse(),
            TokenEdit::Value(i, value) => {
                let name = pairs[i % n].split('=').next().unwrap_or_default().to_owned();
                pairs[i % n] = format!("{name}={value}");
            }
            TokenEdit::Flip(i, byte) => {
                let mut bytes = token.into_bytes();
                let at = i % bytes.len();
                bytes[at] = byte;
                return String::from_utf8_lossy(&bytes).into_owned();
            }
            TokenEdit::Truncate(i) => {
                let cut = i % (token.len() + 1);
                return String::from_utf8_lossy(&token.as_bytes()[..cut]).into_owned();
            }
            TokenEdit::Scheme(scheme) => return format!("{scheme}{fields}"),
        }
        format!("{scheme} {}", pairs.join("&"))
    }
}

/// A header value no client refuses to send: controls replaced.
fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| if (c.is_control() && c != '\t') || c == '\u{7f}' { '?' } else { c })
        .collect()
}

fn header() -> impl Strategy<Value = (String, HeaderText)> {
    let text = |s: String| HeaderText::Text(header_text(&s));
    prop_oneof![
        3 => authorization().prop_map(move |t| ("authorization".to_owned(), text(t))),
        3 => prop::collection::vec(mutation(PROPERTY_KEYS), 0..4)
            .prop_map(move |m| ("brokerproperties".to_owned(), text(String::from_utf8_lossy(&mutate(&broker_properties_seed(), &m)).into_owned()))),
        2 => prop::sample::select(&["application/json", "application/vnd.microsoft.servicebus.json", "APPLICATION/VND.MICROSOFT.SERVICEBUS.JSON; charset=utf-8", "text/plain", ""][..])
            .prop_map(move |c| ("content-type".to_owned(), text(c.to_owned()))),
        2 => (prop::sample::select(&["x-custom", "priority", "when", "host", "x-forwarded-host", "x-forwarded-proto", "forwarded", "x-ms-steward-meta"][..]),
              prop_oneof![nasty_string(), prop::sample::select(NASTY).prop_map(|s| format!("\"{s}\"")), json_value(PROPERTY_KEYS).prop_map(|v| v.to_string())])
            .prop_map(move |(name, value)| (name.to_owned(), text(value))),
        1 => ("[a-z][a-z0-9-]{0,12}", prop::collection::vec(any::<u8>(), 0..24))
            .prop_map(|(name, bytes)| {
                let bytes: Vec<u8> = bytes.into_iter().map(|b| if b < 0x20 || b == 0x7f { b'?' } else { b }).collect();
                (name, HeaderText::Bytes(bytes))
            }),
    ]
}

/// Path segments: the queues, the protocol's words, locks and junk.
fn path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        4 => prop::sample::select(&["jobs", "sessions", "missing", "messages", "head", "$DeadLetterQueue", "$deadletterqueue", "subscriptions", "{lock}", "00000000-0000-4000-8000-000000000000", ""][..])
            .prop_map(str::to_owned),
        1 => nasty_string().prop_map(|s| s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()),
    ];
    let shaped = prop_oneof![
        Just("/jobs/messages".to_owned()),
        Just("/sessions/messages".to_owned()),
        Just("/jobs/messages/head".to_owned()),
        Just("/sessions/messages/head".to_owned()),
        Just("/jobs/$DeadLetterQueue/messages/head".to_owned()),
        Just("/jobs/messages/{lock}".to_owned()),
    ];
    prop_oneof![
        3 => shaped,
        2 => prop::collection::vec(segment, 0..6).prop_map(|segments| format!("/{}", segments.join("/"))),
    ]
}

fn query() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        2 => prop::sample::select(&["timeout=0", "timeout=-1", "timeout=abc", "timeout=", "timeout", "TIMEOUT=0", "timeout=99999999999999999999999", "api-version=2015-01&timeout=0", "timeout=0x10", "timeout=%20", "a=b&&c"][..])
            .prop_map(str::to_owned),
        1 => nasty_string().prop_map(|s| s.bytes().map(|b| if b.is_ascii_alphabetic() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()),
    ]
}

fn body() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => nasty_string(),
        2 => prop::collection::vec(mutation(PROPERTY_KEYS), 0..4)
            .prop_map(|m| String::from_utf8_lossy(&mutate(&batch_seed(), &m)).into_owned()),
        1 => (0_usize..400_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn cases(seeds: Vec<EmulatorCase>) -> impl Strategy<Value = EmulatorCase> {
    let method = prop::sample::select(&["POST", "POST", "DELETE", "PUT", "GET", "PATCH"][..])
        .prop_map(str::to_owned);
    let generated = (method, path(), query(), prop::collection::vec(header(), 0..5), body())
        .prop_map(|(method, path, query, headers, body)| EmulatorCase {
            method,
            path,
            query,
            headers,
            body,
        });
    let from_seed = (
        prop::sample::select(seeds),
        prop::collection::vec(header(), 0..3),
        prop::option::of(query()),
    )
        .prop_map(|(mut case, headers, query)| {
            case.headers.extend(headers);
            if let Some(query) = query {
                case.query = query;
            }
            case
        });
    prop_oneof![3 => generated, 2 => from_seed]
}

/// Header bytes above which the HTTP server may refuse a request before reading it.
const OVERSIZED_HEADERS: usize = 64 * 1024;
/// What [`Harness::send`] reports for a request whose headers are too large to send.
const OVERSIZED: u16 = 1;

fn header_bytes(case: &EmulatorCase) -> usize {
    case.headers
        .iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    HeaderText::Text(text) => text.len(),
                    HeaderText::Bytes(bytes) => bytes.len(),
                }
        })
        .sum::<usize>()
        + case.path.len()
        + case.query.len()
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    emulator: EmulatorHandle,
    client: reqwest::Client,
    lock: Mutex<String>,
}

impl Harness {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let emulator = runtime.block_on(async {
            Emulator::builder()
                .with_listen_addr("127.0.0.1:0".parse().unwrap())
                .with_sas_key(KEY_NAME, KEY)
                .with_queue("jobs")
                .with_session_queue("sessions")
                .with_default_receive_timeout(Duration::ZERO)
                .start()
                .await
                .unwrap()
        });
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        Harness {
            runtime,
            emulator,
            client,
            lock: Mutex::new(
                "00000000-0000-4000-8000-000000000000/00000000-0000-4000-8000-000000000000"
                    .to_owned(),
            ),
        }
    }

    /// Sends one case: `Some(status)`, or `None` when the client could not build it.
    ///
    /// Requests share keep-alive connections, and a failure is not retried: the emulator
    /// reads every request's body to its end, so a connection is never closed under a
    /// request.
    fn send(&self, case: &EmulatorCase) -> Result<Option<u16>, String> {
        // Headers beyond the HTTP server's limit never reach the emulator: the server
        // answers 431 and closes the connection while the client is still writing,
        // which the client sees as a broken pipe. They are counted, not sent.
        if header_bytes(case) > OVERSIZED_HEADERS {
            return Ok(Some(OVERSIZED));
        }
        let client = &self.client;
        let path = case.path.replace("{lock}", &self.lock.lock().unwrap());
        let url = format!(
            "{}{path}{}{}",
            self.emulator.endpoint(),
            if case.query.is_empty() { "" } else { "?" },
            case.query
        );
        let Ok(method) = reqwest::Method::from_bytes(case.method.as_bytes()) else {
            return Ok(None);
        };
        let mut request = client.request(method, &url);
        for (name, value) in &case.headers {
            let value = match value {
                HeaderText::Text(text) => {
                    let signed = sas_token(
                        &format!("{NAMESPACE}{path}"),
                        KEY_NAME,
                        KEY,
                        UNIX_EPOCH + Duration::from_secs(FAR_EXPIRY),
                    );
                    text.replace("{sas}", &signed).into_bytes()
                }
                HeaderText::Bytes(bytes) => bytes.clone(),
            };
            let (Ok(name), Ok(value)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_bytes(&value),
            ) else {
                return Ok(None);
            };
            request = request.header(name, value);
        }
        let Ok(request) = request.body(case.body.clone()).build() else { return Ok(None) };
        self.runtime.block_on(async {
            let response = match client.execute(request).await {
                Ok(response) => response,
                // The client refused to send it (a URL too long for it, say).
                Err(error) if error.is_builder() => return Ok(None),
                Err(error) => return Err(format!("no answer: {error:?}")),
            };
            let status = response.status().as_u16();
            if let Some(location) = response.headers().get("location").and_then(|v| v.to_str().ok())
            {
                // `…/<queue>/messages/<id>/<token>`: keep the lock for `{lock}`.
                let parts: Vec<&str> = location.rsplitn(3, '/').collect();
                if parts.len() == 3 {
                    *self.lock.lock().unwrap() = format!("{}/{}", parts[1], parts[0]);
                }
            }
            response.bytes().await.map_err(|e| format!("no body: {e:?}"))?;
            Ok(Some(status))
        })
    }
}

/// Ensures that the emulator answers every request without panicking: 2xx for what
/// the protocol accepts, 4xx for bad paths, methods, queries, signatures, properties
/// and bodies, never a 5xx.
#[test]
fn fuzz_emulator() {
    let harness = Harness::new();
    let [ok, client_error, unsendable, oversized] =
        [Counter::default(), Counter::default(), Counter::default(), Counter::default()];
    let seeds: Vec<EmulatorCase> = json_corpus("servicebus-emulator")
        .into_iter()
        .map(|value| serde_json::from_value(value).expect("an emulator corpus entry"))
        .collect();
    fuzz(
        "servicebus-emulator",
        cases(seeds),
        |bytes| serde_json::from_slice(bytes).expect("an emulator corpus entry"),
        |case| serde_json::to_vec_pretty(case).unwrap(),
        |case| {
            match harness.send(case).map_err(TestCaseError::fail)? {
                None => unsendable.add(),
                Some(OVERSIZED) => oversized.add(),
                Some(status) => {
                    prop_assert!(status < 500, "answered {}", status);
                    if status >= 400 { client_error.add() } else { ok.add() }
                }
            }
            Ok(())
        },
        || {
            format!(
                "2xx={} 4xx={} oversized_headers_not_sent={} unsendable={}",
                ok.get(),
                client_error.get(),
                oversized.get(),
                unsendable.get()
            )
        },
    );
    harness.runtime.block_on(harness.emulator.shutdown());
}
