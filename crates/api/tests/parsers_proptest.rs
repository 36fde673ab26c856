//! Property tests of the two message parsers and of the handlers behind them: arbitrary
//! JSON values, arbitrary bytes and mutated valid messages never panic, and each maps
//! either to a valid message or to a dead-letter with reason `MessageFormatIncorrect`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fuzz_support;
mod support;

use std::sync::Arc;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};
use steward_api::domain::{AirlockRequestStatus, Status, outputs_to_properties};
use steward_api::workers::{
    AirlockStatusHandler, DeploymentStatusHandler, MessageFormatError, StaticRecipients,
    parse_deployment_status, parse_step_result, tre,
};
use steward_core::{Handler, Message, Outcome};

use fuzz_support::{paths, pointer};

/// Field names of both schemas, so generated objects often look almost right.
const KEYS: &[&str] = &[
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
    "completed_step",
    "new_status",
    "request_id",
    "request_files",
    "status_message",
    "size",
];

/// Strings that are valid somewhere in the schemas.
const STRINGS: &[&str] = &[
    "deployed",
    "deploying",
    "updated",
    "deployment_failed",
    "pipeline_running",
    "submitted",
    "in_review",
    "approved",
    "draft",
    "string",
    "boolean",
    "true",
    "'quoted'",
    "0000c8e7-5c42-4fcb-a7fd-294cfc27aa76",
    "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76",
    "59B5C8E75C424FCBA7FD294CFC27AA76",
    "59b5c8e7-5c42-1fcb-a7fd-294cfc27aa76",
    "",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-zA-Z_]{0,8}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Eighths print and parse back exactly (serde_json's default float parser is not
        // exact for every f64, which would break the round-trip check, not the parser).
        any::<i32>().prop_map(|n| json!(f64::from(n) / 8.0)),
        prop::sample::select(STRINGS).prop_map(|s| Value::String(s.to_owned())),
        ".{0,16}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// One change to a valid message.
#[derive(Debug, Clone)]
enum Mutation {
    /// Remove the member or element at the n-th path.
    Remove(usize),
    /// Replace the value at the n-th path.
    Replace(usize, Value),
    /// Add a member to the object at the n-th path (or the root).
    Add(usize, String, Value),
    /// Cut the serialized text after this many bytes.
    Truncate(usize),
    /// Overwrite one byte of the serialized text.
    Flip(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), json_value()).prop_map(|(n, v)| Mutation::Replace(n, v)),
        (any::<usize>(), key(), json_value()).prop_map(|(n, k, v)| Mutation::Add(n, k, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(n, b)| Mutation::Flip(n, b)),
    ]
}

/// The mutated body, as bytes.
fn mutate(base: &Value, mutation: &Mutation) -> Vec<u8> {
    let mut value = base.clone();
    let mut all = Vec::new();
    paths(base, &mut Vec::new(), &mut all);
    let pick = |n: usize| all[n % all.len()].clone();
    match mutation {
        Mutation::Remove(n) => {
            let path = pick(*n);
            let (last, parent) = path.split_last().unwrap();
            match value.pointer_mut(&pointer(parent)).unwrap() {
                Value::Object(map) => {
                    map.remove(last);
                }
                Value::Array(items) => {
                    items.remove(last.parse::<usize>().unwrap());
                }
                _ => unreachable!("a parent is a container"),
            }
        }
        Mutation::Replace(n, new) => *value.pointer_mut(&pointer(&pick(*n))).unwrap() = new.clone(),
        Mutation::Add(n, key, new) => {
            let path = pointer(&pick(*n));
            let path = if value.pointer(&path).is_some_and(Value::is_object) {
                path
            } else {
                String::new()
            };
            let target = value.pointer_mut(&path).and_then(Value::as_object_mut).unwrap();
            target.insert(key.clone(), new.clone());
        }
        Mutation::Truncate(n) => {
            let text = base.to_string().into_bytes();
            return text[..n % (text.len() + 1)].to_vec();
        }
        Mutation::Flip(n, byte) => {
            let mut text = base.to_string().into_bytes();
            let index = n % text.len();
            text[index] = *byte;
            return text;
        }
    }
    value.to_string().into_bytes()
}

/// A parse error must become the `MessageFormatIncorrect` dead-letter with TRE's text.
fn assert_dead_letter(error: &MessageFormatError, tre_text: &str) -> Result<(), TestCaseError> {
    match error.outcome(tre_text) {
        Outcome::DeadLetter { reason, description } => {
            prop_assert_eq!(reason, "MessageFormatIncorrect");
            prop_assert!(description.starts_with(tre_text), "{}", description);
            Ok(())
        }
        other => Err(TestCaseError::fail(format!("not a dead-letter: {other:?}"))),
    }
}

/// The deployment parser's contract on one body.
fn check_status(body: &[u8]) -> Result<(), TestCaseError> {
    match parse_deployment_status(body) {
        Ok(update) => {
            // A valid message: it survives a round trip and its fields are in range.
            let again = parse_deployment_status(serde_json::to_string(&update).unwrap().as_bytes());
            prop_assert_eq!(again.ok(), Some(update.clone()));
            prop_assert_eq!(update.operation_id.as_uuid().get_version_num(), 4);
            prop_assert_eq!(update.id.as_uuid().get_version_num(), 4);
            prop_assert!(Status::ALL.contains(&update.status));
            Ok(())
        }
        Err(error) => assert_dead_letter(&error, tre::DEPLOYMENT_STATUS_MESSAGE_FORMAT_INCORRECT),
    }
}

/// The step result parser's contract on one body.
fn check_step_result(body: &[u8]) -> Result<(), TestCaseError> {
    match parse_step_result(body) {
        Ok(result) => {
            let again = parse_step_result(serde_json::to_string(&result.event).unwrap().as_bytes());
            prop_assert_eq!(again.ok(), Some(result.clone()));
            prop_assert!(AirlockRequestStatus::ALL.contains(&result.completed_step));
            prop_assert_eq!(result.event.id.as_uuid().get_version_num(), 4);
            Ok(())
        }
        Err(error) => assert_dead_letter(&error, tre::STEP_RESULT_MESSAGE_FORMAT_INCORRECT),
    }
}

proptest! {
    #![proptest_config(Config { cases: 512, ..Config::default() })]

    /// Ensures that any JSON value is either a valid deployment status or a
    /// `MessageFormatIncorrect` dead-letter, without panicking.
    #[test]
    fn deployment_parser_maps_arbitrary_json(value in json_value()) {
        check_status(value.to_string().as_bytes())?;
    }

    /// Ensures that arbitrary bytes (not UTF-8, not JSON) never panic the deployment
    /// parser.
    #[test]
    fn deployment_parser_maps_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
        check_status(&body)?;
    }

    /// Ensures that mutations of a valid deployment status never panic the parser and
    /// map to a valid message or the dead-letter; an added unknown member changes
    /// nothing (TRE ignores unknown fields).
    #[test]
    fn deployment_parser_maps_mutated_messages(mutation in mutation()) {
        let base = support::status_update_example();
        let body = mutate(&base, &mutation);
        check_status(&body)?;
        if let Mutation::Add(_, key, _) = &mutation {
            if !KEYS.contains(&key.as_str()) {
                prop_assert_eq!(parse_deployment_status(&body).ok(), parse_deployment_status(base.to_string().as_bytes()).ok());
            }
        }
    }

    /// Ensures that any JSON value is either a valid step result or a
    /// `MessageFormatIncorrect` dead-letter, without panicking.
    #[test]
    fn step_result_parser_maps_arbitrary_json(value in json_value()) {
        check_step_result(value.to_string().as_bytes())?;
    }

    /// Ensures that arbitrary bytes never panic the step result parser.
    #[test]
    fn step_result_parser_maps_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
        check_step_result(&body)?;
    }

    /// Ensures that mutations of a valid step result never panic the parser and map to
    /// a valid message or the dead-letter; an added unknown member changes nothing.
    #[test]
    fn step_result_parser_maps_mutated_messages(mutation in mutation()) {
        let base = support::step_result_example();
        let body = mutate(&base, &mutation);
        check_step_result(&body)?;
        if let Mutation::Add(_, key, _) = &mutation {
            if !KEYS.contains(&key.as_str()) {
                prop_assert_eq!(parse_step_result(&body).ok(), parse_step_result(base.to_string().as_bytes()).ok());
            }
        }
    }
}

#[test]
fn the_reference_examples_are_valid() {
    assert!(
        parse_deployment_status(support::status_update_example().to_string().as_bytes()).is_ok()
    );
    assert!(parse_step_result(support::step_result_example().to_string().as_bytes()).is_ok());
}

/// Ensures that the mutation strategy is not degenerate: of a few hundred mutated
/// messages, many still parse and many do not, for both parsers, so the properties
/// above exercise both branches.
#[test]
fn mutations_reach_both_valid_and_invalid_messages() {
    let mut runner = TestRunner::deterministic();
    let (mut status, mut result) = ([0_u32; 2], [0_u32; 2]);
    for _ in 0..400 {
        let mutation = mutation().new_tree(&mut runner).unwrap().current();
        status[usize::from(
            parse_deployment_status(&mutate(&support::status_update_example(), &mutation)).is_ok(),
        )] += 1;
        result[usize::from(
            parse_step_result(&mutate(&support::step_result_example(), &mutation)).is_ok(),
        )] += 1;
    }
    assert!(status.iter().all(|&n| n >= 40), "deployment status invalid/valid: {status:?}");
    assert!(result.iter().all(|&n| n >= 40), "step result invalid/valid: {result:?}");
}

/// Bodies for the handler properties: mutations of a valid message about records that
/// exist, or arbitrary JSON.
fn handler_bodies(base: Value) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => mutation().prop_map(move |mutation| mutate(&base, &mutation)),
        1 => json_value().prop_map(|value| value.to_string().into_bytes()),
    ]
}

/// Ensures that the deployment handler, given mutated messages about a real operation
/// (on SQLite), never panics: a body the parser refuses is dead-lettered as
/// `MessageFormatIncorrect`, and a valid one completes, or is dead-lettered as
/// `UnknownStep`, or — only for a success whose `boolean` outputs cannot be converted —
/// as `MessageFormatIncorrect`.
#[test]
fn deployment_handler_maps_mutated_messages_to_settlements() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let db = runtime.block_on(support::TestDb::sqlite());
    let registry = support::templates();
    let (ws, op) = runtime.block_on(support::workspace_installing(&db.store, &registry));
    let handler = DeploymentStatusHandler::new(db.store.clone(), registry);
    let base = support::status_body(
        &op.id,
        &op.steps()[0].id,
        &ws.id,
        "deploying",
        "Job starting",
        support::status_update_example()["outputs"].clone(),
    );
    let mut runner = TestRunner::new(Config { cases: 96, ..Config::default() });
    runner
        .run(&handler_bodies(base), |body| {
            let message = Message::new("m", body.clone());
            let outcome = runtime.block_on(handler.handle(Arc::new(message)));
            match parse_deployment_status(&body) {
                Err(_) => prop_assert!(
                    matches!(&outcome, Outcome::DeadLetter { reason, .. } if reason == "MessageFormatIncorrect"),
                    "{:?}", outcome
                ),
                Ok(update) => match &outcome {
                    Outcome::Complete => {}
                    Outcome::DeadLetter { reason, .. } if reason == "UnknownStep" => {}
                    Outcome::DeadLetter { reason, .. } if reason == "MessageFormatIncorrect" => {
                        prop_assert!(update.status.is_success() && outputs_to_properties(&update.outputs).is_err());
                    }
                    other => return Err(TestCaseError::fail(format!("{update:?} gave {other:?}"))),
                },
            }
            Ok(())
        })
        .unwrap();
    runtime.block_on(db.finish());
}

/// Ensures that the airlock handler, given mutated step results about a real request
/// (on SQLite), never panics: a body the parser refuses is dead-lettered as
/// `MessageFormatIncorrect`; a valid one completes, is retried as an ordering race, or
/// is dead-lettered as `IllegalStatusTransition` — never as a format error.
#[test]
fn airlock_handler_maps_mutated_messages_to_settlements() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let db = runtime.block_on(support::TestDb::sqlite());
    let ws = runtime.block_on(support::workspace(&db.store, &support::templates()));
    let request =
        runtime.block_on(support::airlock_request(&db.store, &ws, AirlockRequestStatus::Submitted));
    let handler = AirlockStatusHandler::new(db.store.clone(), Arc::new(StaticRecipients::none()));
    let mut base = support::step_result_example();
    base["data"]["request_id"] = json!(request.id);
    let mut runner = TestRunner::new(Config { cases: 96, ..Config::default() });
    runner
        .run(&handler_bodies(base), |body| {
            let message = Message::new("m", body.clone());
            let outcome = runtime.block_on(handler.handle(Arc::new(message)));
            let parsed = parse_step_result(&body);
            match (&parsed, &outcome) {
                (Err(_), Outcome::DeadLetter { reason, .. })
                    if reason == "MessageFormatIncorrect" => {}
                (Ok(_), Outcome::Complete) => {}
                (Ok(_), Outcome::Retry { cause: steward_core::RetryCause::Message, .. }) => {}
                (Ok(_), Outcome::DeadLetter { reason, .. })
                    if reason == "IllegalStatusTransition" => {}
                _ => return Err(TestCaseError::fail(format!("{parsed:?} gave {outcome:?}"))),
            }
            Ok(())
        })
        .unwrap();
    runtime.block_on(db.finish());
}
