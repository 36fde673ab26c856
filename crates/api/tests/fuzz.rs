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
