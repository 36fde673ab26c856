//! Structure-aware fuzzing of everything the service reads from outside: the three TRE
//! messages (deployment status, airlock step result, resource request), property
//! substitution, and every HTTP request body and query string.
//!
//! Each `fuzz_<target>` test replays the corpus in `tests/corpus/<target>/` at the
//! workspace root, then runs generated cases: mutations of corpus entries (fields
//! dropped, retyped, mutated, duplicated; Unicode and huge values; text truncated and
//! bytes flipped), arbitrary JSON and raw bytes. `cargo test` runs a few cases per
//! target; `cargo xtask fuzz --runs N` runs N in release. A failing case is shrunk and
//! saved to the corpus, so it is replayed from then on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fuzz_support;
mod support;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fuzz_support::{Counter, fuzz, json_corpus, message_bodies, mutate, mutation, nasty_string};
use proptest::prelude::*;
use serde_json::{Value, json};
use steward_api::domain::{
    AirlockRequestStatus, Resource, ResourceRequest, Status, outputs_to_properties,
};
use steward_api::rules::{substitute_properties, substitute_recursively};
use steward_api::templates::PipelineStep;
use steward_api::workers::{
    MessageFormatError, ResourceProcessor, parse_deployment_status, parse_step_result, tre,
};
use steward_core::{Handler, Message, MessageSink, Outcome, OutgoingMessage, TransportError};

/// Field names of the message schemas, so generated objects often look almost right.
const MESSAGE_KEYS: &[&str] = &[
    "operationId",
    "stepId",
    "id",
    "status",
    "message",
    "outputs",
    "name",
    "value",
    "type",
    "Name",
    "Value",
    "Type",
    "subject",
    "data",
    "eventType",
    "eventTime",
    "topic",
    "dataVersion",
    "metadataVersion",
    "completed_step",
    "new_status",
    "request_id",
    "request_files",
    "status_message",
    "size",
    "action",
    "version",
    "parameters",
    "workspaceId",
    "ownerId",
    "parentWorkspaceServiceId",
];

fn bytes(input: &[u8]) -> Vec<u8> {
    input.to_vec()
}

/// A parse error must become the `MessageFormatIncorrect` dead-letter with TRE's text.
fn assert_dead_letter(outcome: &Outcome, tre_text: &str) -> Result<(), TestCaseError> {
    match outcome {
        Outcome::DeadLetter { reason, description } => {
            prop_assert_eq!(reason.as_str(), "MessageFormatIncorrect");
            prop_assert!(description.starts_with(tre_text), "{}", description);
            Ok(())
        }
        other => Err(TestCaseError::fail(format!("not a dead-letter: {other:?}"))),
    }
}

fn format_error(error: &MessageFormatError, tre_text: &str) -> Result<(), TestCaseError> {
    assert_dead_letter(&error.outcome(tre_text), tre_text)
}

/// Ensures that every deployment status body either parses into a valid message that
/// round-trips (and whose outputs convert, or fail only for a `boolean` list/object),
/// or maps to the `MessageFormatIncorrect` dead-letter; nothing panics.
#[test]
fn fuzz_deployment_status() {
    let (valid, invalid) = (Counter::default(), Counter::default());
    fuzz(
        "deployment-status",
        message_bodies(json_corpus("deployment-status"), MESSAGE_KEYS),
        bytes,
        Clone::clone,
        |body| {
            match parse_deployment_status(body) {
                Ok(update) => {
                    valid.add();
                    let text = serde_json::to_string(&update).unwrap();
                    prop_assert_eq!(
                        parse_deployment_status(text.as_bytes()).ok(),
                        Some(update.clone())
                    );
                    prop_assert_eq!(update.operation_id.as_uuid().get_version_num(), 4);
                    prop_assert_eq!(update.id.as_uuid().get_version_num(), 4);
                    prop_assert!(Status::ALL.contains(&update.status));
                    if let Err(error) = outputs_to_properties(&update.outputs) {
                        let output = update.outputs.iter().find(|o| o.name == error.name).unwrap();
                        prop_assert_eq!(output.output_type.as_str(), "boolean");
                        prop_assert!(
                            output.value.as_ref().is_some_and(|v| v.is_array() || v.is_object())
                        );
                    }
                }
                Err(error) => {
                    invalid.add();
                    format_error(&error, tre::DEPLOYMENT_STATUS_MESSAGE_FORMAT_INCORRECT)?;
                }
            }
            Ok(())
        },
        || format!("valid={} dead_lettered={}", valid.get(), invalid.get()),
    );
}

/// Ensures that every airlock step result body either parses into a valid event that
/// round-trips, with statuses in range, or maps to the `MessageFormatIncorrect`
/// dead-letter; nothing panics.
#[test]
fn fuzz_step_result() {
    let (valid, invalid) = (Counter::default(), Counter::default());
    fuzz(
        "step-result",
        message_bodies(json_corpus("step-result"), MESSAGE_KEYS),
        bytes,
        Clone::clone,
        |body| {
            match parse_step_result(body) {
                Ok(result) => {
                    valid.add();
                    let text = serde_json::to_string(&result.event).unwrap();
                    prop_assert_eq!(parse_step_result(text.as_bytes()).ok(), Some(result.clone()));
                    prop_assert!(AirlockRequestStatus::ALL.contains(&result.completed_step));
                    if let Some(status) = result.new_status {
                        prop_assert!(AirlockRequestStatus::ALL.contains(&status));
                    }
                    prop_assert_eq!(result.event.id.as_uuid().get_version_num(), 4);
                }
                Err(error) => {
                    invalid.add();
                    format_error(&error, tre::STEP_RESULT_MESSAGE_FORMAT_INCORRECT)?;
                }
            }
            Ok(())
        },
        || format!("valid={} dead_lettered={}", valid.get(), invalid.get()),
    );
}

/// A sink that keeps what the simulated resource processor sends.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<(String, OutgoingMessage)>>);

#[async_trait]
impl MessageSink for Recorder {
    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        self.0.lock().unwrap().push((queue.to_owned(), message));
        Ok(())
    }
}

/// Ensures that every resource request body the resource processor receives either is
/// a valid request, which round-trips and is answered with two status reports on the
/// status queue (in progress, then the result) keyed by its operation, or is
/// dead-lettered as `MessageFormatIncorrect` without sending anything.
#[test]
fn fuzz_resource_request() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let recorder = Arc::new(Recorder::default());
    let processor = ResourceProcessor::new(recorder.clone(), "deploymentstatus")
        .with_pause(std::time::Duration::ZERO, std::time::Duration::ZERO);
    let (valid, invalid) = (Counter::default(), Counter::default());
    fuzz(
        "resource-request",
        message_bodies(json_corpus("resource-request"), MESSAGE_KEYS),
        bytes,
        Clone::clone,
        |body| {
            recorder.0.lock().unwrap().clear();
            let outcome =
                runtime.block_on(processor.handle(Arc::new(Message::new("m", body.clone()))));
            let sent = std::mem::take(&mut *recorder.0.lock().unwrap());
            match serde_json::from_slice::<ResourceRequest>(body) {
                Ok(request) => {
                    valid.add();
                    let text = serde_json::to_string(&request).unwrap();
                    prop_assert_eq!(
                        serde_json::from_str::<ResourceRequest>(&text).ok(),
                        Some(request.clone())
                    );
                    prop_assert!(matches!(outcome, Outcome::Complete), "{:?}", outcome);
                    prop_assert_eq!(sent.len(), 2);
                    for (queue, message) in &sent {
                        prop_assert_eq!(queue.as_str(), "deploymentstatus");
                        prop_assert_eq!(
                            message.session_id.as_deref(),
                            Some(request.operation_id.as_str())
                        );
                        let report: Value = serde_json::from_slice(&message.body).unwrap();
                        prop_assert_eq!(&report["id"], &json!(request.id));
                    }
                }
                Err(_) => {
                    invalid.add();
                    prop_assert!(sent.is_empty());
                    prop_assert!(
                        matches!(&outcome, Outcome::DeadLetter { reason, .. } if reason == "MessageFormatIncorrect"),
                        "{:?}",
                        outcome
                    );
                }
            }
            Ok(())
        },
        || format!("valid={} dead_lettered={}", valid.get(), invalid.get()),
    );
}

/// Keys of resources, pipeline step properties and tokens.
const SUBSTITUTION_KEYS: &[&str] = &[
    "value",
    "primary",
    "parentWorkspace",
    "parentWorkspaceService",
    "target",
    "properties",
    "name",
    "type",
    "arraySubstitutionAction",
    "arrayMatchField",
    "id",
    "templateName",
    "templateVersion",
    "resourceType",
    "workspaceId",
    "parentWorkspaceServiceId",
    "ownerId",
    "display_name",
    "address_prefix",
    "parent",
    "resource",
];

/// A string with `{{ … }}` tokens: paths of `resource`, `parent` and property names,
/// among nasty text.
fn token_string() -> impl Strategy<Value = Value> {
    let segment = prop_oneof![
        prop::sample::select(
            &[
                "resource",
                "parent",
                "properties",
                "id",
                "display_name",
                "address_prefix",
                "templateName",
                ""
            ][..]
        )
        .prop_map(str::to_owned),
        nasty_string(),
    ];
    let token = (prop::collection::vec(segment, 0..6), " {0,2}")
        .prop_map(|(path, pad)| format!("{{{{{pad}{}{pad}}}}}", path.join(".")));
    prop::collection::vec(prop_oneof![token, nasty_string()], 0..5)
        .prop_map(|pieces| Value::String(pieces.concat()))
}

fn has_token(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains("{{"),
        Value::Array(items) => items.iter().any(has_token),
        Value::Object(map) => map.values().any(has_token),
        _ => false,
    }
}

/// Ensures that property substitution never panics on any value, resources and
/// pipeline step: a value without tokens comes back unchanged, and the properties a
/// step sets are only those it names.
#[test]
fn fuzz_substitution() {
    let (substituted, stepped) = (Counter::default(), Counter::default());
    let seeds = json_corpus("substitution");
    let strategy = (
        prop::sample::select(seeds),
        prop::collection::vec(mutation(SUBSTITUTION_KEYS), 0..4),
        prop::option::of(token_string()),
        any::<usize>(),
    )
        .prop_map(|(seed, mutations, token, at)| {
            let mut input: Value =
                serde_json::from_slice(&mutate(&seed, &mutations)).unwrap_or_else(|_| seed.clone());
            if let (Some(token), Some(map)) = (token, input.as_object_mut()) {
                // Put the token string at the value or into one step property.
                match map.get_mut("properties").and_then(Value::as_array_mut) {
                    Some(properties) if !properties.is_empty() && at % 2 == 0 => {
                        let index = at % properties.len();
                        if let Some(property) = properties[index].as_object_mut() {
                            property.insert("value".to_owned(), token);
                        }
                    }
                    _ => {
                        map.insert("value".to_owned(), token);
                    }
                }
            }
            input
        });
    fuzz(
        "substitution",
        strategy,
        |bytes| serde_json::from_slice(bytes).expect("substitution corpus entries are JSON"),
        |input| serde_json::to_vec_pretty(input).unwrap(),
        |input| {
            let value = &input["value"];
            let present = |key: &str| input.get(key).filter(|v| !v.is_null());
            let result = substitute_recursively(
                value,
                present("primary"),
                present("parentWorkspace"),
                present("parentWorkspaceService"),
            );
            substituted.add();
            if !has_token(value) {
                prop_assert_eq!(result.ok(), Some(value.clone()));
            }
            let resource = |key: &str| -> Option<Option<Resource>> {
                match present(key) {
                    None => Some(None),
                    Some(value) => serde_json::from_value(value.clone()).ok().map(Some),
                }
            };
            let step: Option<PipelineStep> = serde_json::from_value(
                json!({"stepId": "main", "properties": input.get("properties").cloned().unwrap_or(json!([]))}),
            )
            .ok();
            if let (
                Some(step),
                Some(Some(primary)),
                Some(workspace),
                Some(service),
                Some(Some(target)),
            ) = (
                step,
                resource("primary"),
                resource("parentWorkspace"),
                resource("parentWorkspaceService"),
                resource("target"),
            ) {
                stepped.add();
                if let Ok(properties) = substitute_properties(
                    &step,
                    &primary,
                    workspace.as_ref(),
                    service.as_ref(),
                    &target,
                ) {
                    let names: Vec<&str> =
                        step.properties.iter().flatten().map(|p| p.name.as_str()).collect();
                    prop_assert!(properties.keys().all(|key| names.contains(&key.as_str())));
                }
            }
            Ok(())
        },
        || format!("values={} steps={}", substituted.get(), stepped.get()),
    );
}

// ---- HTTP ------------------------------------------------------------------------------

mod http_fuzz {
    use std::time::Duration;

    use axum::Router;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};
    use serde_json::{Value, json};
    use steward_api::http::auth::Authentication;
    use steward_api::http::{ApiSettings, AppState, openapi, router};
    use steward_api::storage::Database;
    use steward_core::{Supervisor, SupervisorConfig, Worker, WorkerContext, WorkerError};
    use tower::ServiceExt;

    use super::fuzz_support::{
        Counter, NASTY, json_corpus, json_value, mutate, mutation, nasty_string,
    };
    use super::support;

    /// A worker that runs until cancelled, so that the probes see a healthy service.
    struct Idle(&'static str);

    #[async_trait::async_trait]
    impl Worker for Idle {
        fn name(&self) -> &str {
            self.0
        }

        fn stall_timeout(&self) -> Option<Duration> {
            None
        }

        async fn run(&self, ctx: WorkerContext) -> Result<(), WorkerError> {
            ctx.set_running();
            ctx.cancelled().await;
            Ok(())
        }
    }

    /// One HTTP request, as stored in `tests/corpus/http/`. `{workspaceId}`,
    /// `{serviceId}`, `{airlockId}` and `{draftId}` in the path stand for records the
    /// fuzz run creates first.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub(super) struct HttpCase {
        pub(super) method: String,
        path: String,
        #[serde(default)]
        query: String,
        #[serde(default)]
        headers: Vec<(String, String)>,
        /// A JSON body, sent as its text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<Value>,
        /// A body that is not JSON, byte for byte.
        #[serde(default, skip_serializing_if = "Option::is_none", rename = "bodyBytes")]
        body_bytes: Option<Vec<u8>>,
    }

    /// Query parameter names of the documented routes, and other likely ones.
    const QUERY_KEYS: &[&str] =
        &["limit", "cursor", "resourceType", "status", "workspaceId", "api-version", "timeout", ""];

    /// Keys of the request bodies.
    const BODY_KEYS: &[&str] = &[
        "templateName",
        "resourceType",
        "properties",
        "workspaceId",
        "parentWorkspaceServiceId",
        "display_name",
        "description",
        "os_image",
        "type",
        "title",
        "businessJustification",
        "reviewDecision",
        "decisionExplanation",
        "roles",
        "etag",
        "_etag",
        "isEnabled",
    ];

    const CONTENT_TYPES: &[&str] = &[
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/merge-patch+json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        "application/json; charset=latin1",
        "\u{1f600}",
    ];

    /// Path parameter values: the records that exist, ids that do not, and junk.
    fn path_value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(&["{workspaceId}", "{serviceId}", "{airlockId}", "{draftId}"][..])
                .prop_map(str::to_owned),
            1 => Just("00000000-0000-4000-8000-000000000000".to_owned()),
            1 => prop::sample::select(&["start", "stop", "upgrade", "install", "uninstall", "u-1", "WorkspaceOwner"][..])
                .prop_map(str::to_owned),
            2 => nasty_string().prop_map(|text| encode(&text)),
        ]
    }

    /// `text` with the characters no header value may hold (controls but tab) replaced,
    /// so that the request can be sent; bytes above ASCII stay (obsolete text).
    fn header_text(text: &str) -> String {
        text.chars()
            .map(|c| if (c.is_control() && c != '\t') || c == '\u{7f}' { '?' } else { c })
            .collect()
    }

    /// Percent-encodes everything but unreserved characters.
    fn encode(text: &str) -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn query() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            prop::sample::select(NASTY).prop_map(str::to_owned),
            prop::sample::select(
                &[
                    "0",
                    "1",
                    "500",
                    "501",
                    "-1",
                    "18446744073709551616",
                    "workspace",
                    "deployed",
                    "user-resource"
                ][..]
            )
            .prop_map(str::to_owned),
            any::<u64>().prop_map(|n| n.to_string()),
            nasty_string(),
        ];
        let key = prop_oneof![
            4 => prop::sample::select(QUERY_KEYS).prop_map(str::to_owned),
            1 => nasty_string(),
        ];
        let pair = (key, value, any::<bool>()).prop_map(|(k, v, raw)| {
            if raw && v.bytes().all(|b| b.is_ascii_graphic() && !b"#%&=+".contains(&b)) {
                format!("{k}={v}")
            } else {
                format!("{}={}", encode(&k), encode(&v))
            }
        });
        prop::collection::vec(pair, 0..4).prop_map(|pairs| pairs.join("&"))
    }

    fn body(seeds: Vec<Value>) -> impl Strategy<Value = (Option<Value>, Option<Vec<u8>>)> {
        prop_oneof![
            1 => Just((None, None)),
            6 => (prop::sample::select(seeds), prop::collection::vec(mutation(BODY_KEYS), 0..4))
                .prop_map(|(seed, mutations)| {
                    let text = mutate(&seed, &mutations);
                    match serde_json::from_slice::<Value>(&text) {
                        Ok(value) => (Some(value), None),
                        Err(_) => (None, Some(text)),
                    }
                }),
            2 => json_value(BODY_KEYS).prop_map(|value| (Some(value), None)),
            1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(|bytes| (None, Some(bytes))),
            1 => (1_usize..4_000_000).prop_map(|n| (Some(json!({"properties": {"display_name": "x".repeat(n)}})), None)),
        ]
    }

    /// Requests: a corpus request mutated in its parts, or a documented route with
    /// generated path parameters, query, headers and body.
    pub(super) fn requests(
        seeds: Vec<HttpCase>,
        routes: Vec<(String, String)>,
    ) -> impl Strategy<Value = HttpCase> {
        let bodies: Vec<Value> = seeds.iter().filter_map(|case| case.body.clone()).collect();
        let method = prop_oneof![
            8 => Just(None),
            1 => prop::sample::select(&["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"][..]).prop_map(Some),
        ];
        let content_type = prop_oneof![
            6 => Just(Some("application/json".to_owned())),
            1 => Just(None),
            2 => prop::sample::select(CONTENT_TYPES).prop_map(|c| Some(c.to_owned())),
            1 => nasty_string().prop_map(|text| Some(header_text(&text))),
        ];
        let extra_header = prop_oneof![
                Just(None),
                (
                    prop::sample::select(
                        &[
                            "if-match",
                            "accept",
                            "content-length",
                            "authorization",
                            "x-forwarded-for"
                        ][..]
                    ),
                    nasty_string()
                )
                    .prop_map(|(k, v)| Some((k.to_owned(), header_text(&v)))),
            ];
        let from_route =
            (prop::sample::select(routes), prop::collection::vec(path_value(), 2), method.clone())
                .prop_map(|((method, path), values, other)| {
                    let mut filled = String::new();
                    let mut next = values.into_iter();
                    for segment in path.split('/').skip(1) {
                        filled.push('/');
                        if segment.starts_with('{') {
                            filled.push_str(&next.next().unwrap_or_default());
                        } else {
                            filled.push_str(segment);
                        }
                    }
                    (other.map_or(method, str::to_owned), filled)
                });
        let from_seed = (prop::sample::select(seeds), method)
            .prop_map(|(case, other)| (other.map_or(case.method, str::to_owned), case.path));
        (prop_oneof![from_route, from_seed], query(), content_type, extra_header, body(bodies))
            .prop_map(|((method, path), query, content_type, extra, (body, body_bytes))| {
                let mut headers: Vec<(String, String)> =
                    content_type.into_iter().map(|c| ("content-type".to_owned(), c)).collect();
                headers.extend(extra);
                HttpCase { method, path, query, headers, body, body_bytes }
            })
    }

    /// The service over a fresh SQLite database with a deployed workspace, a Guacamole
    /// service and two airlock requests.
    pub(super) struct App {
        pub(super) router: Router,
        pub(super) ids: Vec<(&'static str, String)>,
        _supervisor: Supervisor,
        _db: support::TestDb,
    }

    pub(super) async fn app() -> App {
        let db = support::TestDb::sqlite().await;
        let templates = support::templates();
        let workspace = support::workspace(&db.store, &templates).await;
        let service = support::guacamole(&db.store, &templates, &workspace).await;
        let submitted = support::airlock_request(
            &db.store,
            &workspace,
            steward_api::domain::AirlockRequestStatus::Submitted,
        )
        .await;
        let draft = support::airlock_request(
            &db.store,
            &workspace,
            steward_api::domain::AirlockRequestStatus::Draft,
        )
        .await;
        let supervisor = Supervisor::new(SupervisorConfig::default());
        for name in ["database", "transport", "deployment-status", "airlock-status"] {
            supervisor.spawn(Idle(name));
        }
        // The operator routes see an in-memory broker's dead letters, as the service
        // on the `inmem` transport does.
        let broker = steward_inmem::InMemoryBroker::builder().build();
        let consumed = ["deploymentstatus", "airlock-step-result"].map(str::to_owned);
        for queue in &consumed {
            broker.declare_queue(queue, steward_inmem::QueueOptions::default());
        }
        let operator = steward_api::http::OperatorSettings {
            dead_letters: Some(std::sync::Arc::new(broker.dead_letter_queues())),
            consumed_queues: consumed.to_vec(),
            controls: supervisor.controls(),
        };
        let state = AppState {
            db: Database::migrated(db.store.clone()),
            templates,
            health: supervisor.health(),
            settings: std::sync::Arc::new(ApiSettings {
                resource_request_queue: "workspacequeue".to_owned(),
                auth: Authentication::none(),
                transport: "inmem".to_owned(),
                operator,
                ..ApiSettings::default()
            }),
            metrics: None,
        };
        for _ in 0..200 {
            let snapshot = state.health.snapshot();
            if snapshot.workers.len() == 4
                && snapshot.workers.iter().all(|w| w.state == steward_core::WorkerState::Running)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        App {
            router: router(state),
            ids: vec![
                ("{workspaceId}", workspace.id),
                ("{serviceId}", service.id),
                ("{airlockId}", submitted.id),
                ("{draftId}", draft.id),
            ],
            _supervisor: supervisor,
            _db: db,
        }
    }

    /// The documented (method, path) pairs.
    pub(super) fn routes() -> Vec<(String, String)> {
        let doc = serde_json::to_value(openapi()).unwrap();
        let mut routes = Vec::new();
        for (path, methods) in doc["paths"].as_object().unwrap() {
            for method in methods.as_object().unwrap().keys() {
                routes.push((method.to_uppercase(), path.clone()));
            }
        }
        routes.sort();
        routes
    }

    /// The request, or `None` when no client could send it (an invalid URI or header).
    pub(super) fn build(case: &HttpCase, ids: &[(&str, String)]) -> Option<Request<Body>> {
        let mut path = case.path.clone();
        let mut body = case.body.as_ref().map(Value::to_string);
        for (placeholder, id) in ids {
            path = path.replace(placeholder, id);
            body = body.map(|text| text.replace(placeholder, id));
        }
        let uri = if case.query.is_empty() { path } else { format!("{path}?{}", case.query) };
        let mut builder = Request::builder().method(case.method.as_str()).uri(uri);
        for (name, value) in &case.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let body = match (body, &case.body_bytes) {
            (Some(text), _) => Body::from(text),
            (None, Some(bytes)) => Body::from(bytes.clone()),
            (None, None) => Body::empty(),
        };
        builder.body(body).ok()
    }

    pub(super) fn seeds() -> Vec<HttpCase> {
        json_corpus("http")
            .into_iter()
            .map(|value| serde_json::from_value(value).expect("an HTTP corpus entry"))
            .collect()
    }

    /// The status and body of one request.
    pub(super) async fn send(router: &Router, request: Request<Body>) -> (u16, Vec<u8>) {
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, body)
    }

    pub(super) fn counters() -> [Counter; 4] {
        Default::default()
    }
}

/// Ensures that no HTTP request — any documented route and method, path parameters,
/// query string, headers and body, mutated from the corpus or generated — panics the
/// service or gets a 5xx answer; every 4xx carries the `{error, detail}` JSON shape.
#[test]
fn fuzz_http() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let app = runtime.block_on(http_fuzz::app());
    let [ok, client_error, unsendable, _] = http_fuzz::counters();
    fuzz(
        "http",
        http_fuzz::requests(http_fuzz::seeds(), http_fuzz::routes()),
        |bytes| serde_json::from_slice(bytes).expect("an HTTP corpus entry"),
        |case| serde_json::to_vec_pretty(case).unwrap(),
        |case| {
            let Some(request) = http_fuzz::build(case, &app.ids) else {
                unsendable.add();
                return Ok(());
            };
            let (status, body) = runtime.block_on(http_fuzz::send(&app.router, request));
            prop_assert!(status < 500, "{} {}", status, String::from_utf8_lossy(&body));
            if status >= 400 {
                client_error.add();
                if case.method == "HEAD" {
                    // A HEAD answer has no body.
                    return Ok(());
                }
                let error: Value = serde_json::from_slice(&body).map_err(|e| {
                    TestCaseError::fail(format!(
                        "{status} without a JSON body ({e}): {}",
                        String::from_utf8_lossy(&body)
                    ))
                })?;
                prop_assert!(
                    error["error"].is_string() && error["detail"].is_string(),
                    "{}",
                    error
                );
            } else {
                ok.add();
            }
            Ok(())
        },
        || {
            format!(
                "2xx_3xx={} 4xx={} unsendable={}",
                ok.get(),
                client_error.get(),
                unsendable.get()
            )
        },
    );
    drop(app);
}
