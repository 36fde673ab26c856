//! The deployment status handler: every case of reference §10.1, the DESIGN §6
//! deviations that concern it, replays and monotonic statuses. Each case runs on SQLite
//! and on PostgreSQL (`*_postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;

use serde_json::{Value, json};
use steward_api::domain::{Operation, ResourceRequest, Status};
use steward_api::workers::DeploymentStatusHandler;
use steward_core::{Handler, Message, Outcome, RetryCause};
use support::{
    CORRELATION_ID, Logs, TestDb, linuxvm_pipeline, only_error, outbox, props, raw_message,
    requests_of, set_properties, status_body, status_message, status_message_with_outputs,
    templates, tre_outputs_example, workspace, workspace_installing,
};

mod cases {
    use super::*;

    pub(super) fn handler(db: &TestDb) -> DeploymentStatusHandler {
        DeploymentStatusHandler::new(db.store.clone(), templates())
    }

    pub(super) async fn handle(handler: &DeploymentStatusHandler, message: Message) -> Outcome {
        handler.handle(Arc::new(message)).await
    }

    /// The deployment status of resource `id`.
    async fn deployment_status(db: &TestDb, id: &str) -> Option<Status> {
        db.store.read().resource(id).await.unwrap().deployment_status
    }

    async fn operation(db: &TestDb, id: &str) -> Operation {
        db.store.read().operation(id).await.unwrap()
    }

    fn dead_letter_reason(outcome: &Outcome) -> &str {
        match outcome {
            Outcome::DeadLetter { reason, .. } => reason,
            other => panic!("expected a dead-letter, got {other:?}"),
        }
    }

    /// Ensures that (reference §10.1.1) bad JSON and a JSON body of the wrong shape are
    /// refused with TRE's log line, now dead-lettered at once with reason
    /// `MessageFormatIncorrect` (DESIGN §6: "invalid JSON/schema", TRE abandons ×10).
    pub(super) async fn tre_10_1_01_bad_json_and_bad_schema_are_dead_lettered(db: &TestDb) {
        let handler = handler(db);
        for body in ["bad", r#"{"good": "json", "bad": "message"}"#] {
            let logs = Logs::default();
            let _guard = logs.install();
            let outcome = handle(&handler, raw_message(body, "s")).await;
            assert_eq!(dead_letter_reason(&outcome), "MessageFormatIncorrect", "{body}");
            let Outcome::DeadLetter { description, .. } = &outcome else { unreachable!() };
            assert!(description.starts_with("Service bus message is not formatted correctly"));
            let error = only_error(
                &logs,
                &format!("Service bus message is not formatted correctly: {CORRELATION_ID}"),
            );
            assert!(error.fields.contains_key("queue") && error.fields.contains_key("message_id"));
            assert!(error.fields.contains_key("error"), "{error:?}");
        }
        assert!(outbox(&db.store).await.is_empty());
    }

    /// Ensures that (reference §10.1.2) a good single-step `deployed` message completes,
    /// sets the step, the operation and the resource to `deployed`, leaves the
    /// properties as they were (no outputs) and logs no error.
    pub(super) async fn tre_10_1_02_good_single_step_message_completes(db: &TestDb) {
        let registry = templates();
        let (ws, op) = workspace_installing(&db.store, &registry).await;
        let logs = Logs::default();
        let _guard = logs.install();
        let outcome = handle(&handler(db), status_message(&op, 0, Status::Deployed, "done")).await;
        assert_eq!(outcome, Outcome::Complete);
        let stored = db.store.read().resource(&ws.id).await.unwrap();
        assert_eq!(stored.deployment_status, Some(Status::Deployed));
        assert_eq!(stored.properties, ws.properties, "no outputs, properties unchanged");
        let op = operation(db, &op.id).await;
        assert_eq!((op.status, op.message.as_str()), (Status::Deployed, "done"));
        assert_eq!(op.steps()[0].status, Some(Status::Deployed));
        assert!(logs.errors().is_empty(), "{:?}", logs.errors());
        let info = logs
            .events()
            .into_iter()
            .find(|event| event.message == format!("Update status in DB for {} - deployed", op.id))
            .expect("TRE's update line");
        assert_eq!(info.fields["operation_id"], op.id);
        assert_eq!(info.fields["queue"], "deploymentstatus");
    }

    /// Ensures that (reference §10.1.3) a message whose resource does not exist completes
    /// and logs TRE's not-found line exactly once (and, being one transaction, writes
    /// nothing).
    pub(super) async fn tre_10_1_03_resource_missing_completes(db: &TestDb) {
        let registry = templates();
        let (ws, op) = workspace_installing(&db.store, &registry).await;
        db.execute(&format!("DELETE FROM resources WHERE id = '{}'", ws.id)).await;
        let logs = Logs::default();
        let _guard = logs.install();
        let outcome = handle(&handler(db), status_message(&op, 0, Status::Deployed, "done")).await;
        assert_eq!(outcome, Outcome::Complete);
        only_error(
            &logs,
            &format!("Service bus message refers to resource id = {} which does not exist", ws.id),
        );
        assert_eq!(operation(db, &op.id).await, op, "nothing committed");
    }

    /// Ensures that (reference §10.1.4) a state store error on the resource read logs
    /// "Failed to update status" exactly once and does not complete: the message is
    /// retried with backoff (DESIGN §6: "DB failure", TRE abandons at once), and nothing
    /// is committed.
    pub(super) async fn tre_10_1_04_state_store_error_retries(db: &TestDb) {
        let registry = templates();
        let (_, op) = workspace_installing(&db.store, &registry).await;
        db.execute("ALTER TABLE resources RENAME TO resources_elsewhere").await;
        let logs = Logs::default();
        let _guard = logs.install();
        let outcome = handle(&handler(db), status_message(&op, 0, Status::Deployed, "done")).await;
        assert!(
            matches!(&outcome, Outcome::Retry { cause: RetryCause::Message, after: None, .. }),
            "{outcome:?}"
        );
        let error = only_error(&logs, "Failed to update status");
        assert_eq!(error.fields["operation_id"], op.id);
        assert_eq!(operation(db, &op.id).await, op, "nothing committed");
    }

    /// Ensures that (reference §10.1.5) a single-step uninstall reported `deleted` gives
    /// the operation and its step status `deleted`, the message "Has been deleted", and
    /// the same `updatedWhen` (the handler's clock reading) for the operation and the
    /// step, in one write of the operation.
    pub(super) async fn tre_10_1_05_deployed_to_deleted_single_step(db: &TestDb) {
        let registry = templates();
        let ws = workspace(&db.store, &registry).await;
        let mut tx = db.store.begin().await.unwrap();
        let op = steward_api::rules::operations::uninstall_resource(
            &mut tx,
            steward_api::rules::operations::OperationContext::new(&registry),
            &ws.id,
            &support::user(),
            false,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let outcome =
            handle(&handler(db), status_message(&op, 0, Status::Deleted, "Has been deleted")).await;
        assert_eq!(outcome, Outcome::Complete);
        let stored = operation(db, &op.id).await;
        assert_eq!((stored.status, stored.message.as_str()), (Status::Deleted, "Has been deleted"));
        let step = &stored.steps()[0];
        assert_eq!(
            (step.status, step.message.as_deref()),
            (Some(Status::Deleted), Some("Has been deleted"))
        );
        assert!(stored.updated_when > op.updated_when);
        assert_eq!(step.updated_when, Some(stored.updated_when));
        assert_ne!(stored.etag, op.etag);
        assert_eq!(deployment_status(db, &ws.id).await, Some(Status::Deleted));
    }

    /// Ensures that (reference §10.1.6) outputs given with capitalised keys are merged
    /// into the existing properties by TRE's rules: quotes stripped from strings,
    /// booleans from `"True"`, `"true"` and `"\"true\""`, a string that looks like a
    /// list kept as a string, a list kept as a list.
    pub(super) async fn tre_10_1_06_outputs_are_merged_into_properties(db: &TestDb) {
        let registry = templates();
        let (ws, op) = workspace_installing(&db.store, &registry).await;
        set_properties(&db.store, &ws.id, props(json!({"exitingName": "exitingValue"}))).await;
        let (outputs, mut expected) = tre_outputs_example();
        let message =
            status_message_with_outputs(&op, 0, Status::Deployed, "done", Value::from(outputs));
        assert_eq!(handle(&handler(db), message).await, Outcome::Complete);
        let stored = db.store.read().resource(&ws.id).await.unwrap();
        expected.insert("exitingName".to_owned(), json!("exitingValue"));
        assert_eq!(stored.properties, expected);
    }

    /// Ensures that (reference §10.1.7) a success without outputs leaves the properties
    /// unchanged.
    pub(super) async fn tre_10_1_07_no_outputs_leaves_properties_unchanged(db: &TestDb) {
        let registry = templates();
        let (ws, op) = workspace_installing(&db.store, &registry).await;
        let message = status_message_with_outputs(&op, 0, Status::Deployed, "done", json!([]));
        assert_eq!(handle(&handler(db), message).await, Outcome::Complete);
        let stored = db.store.read().resource(&ws.id).await.unwrap();
        assert_eq!(stored.properties, ws.properties);
        assert_eq!(stored.deployment_status, Some(Status::Deployed));
    }

    /// Ensures that (reference §10.1.8) when step 1 of 3 completes, the operation is
    /// `pipeline_running` with TRE's message, step 1 has the reported status and message,
    /// the next step's resource (the operation's own) is patched for the step, and
    /// exactly one resource request for step 2 is written: correlation id = operation id,
    /// session id = the step's resource id.
    pub(super) async fn tre_10_1_08_first_of_three_steps_completes(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let op = &pipeline.operation;
        assert_eq!(requests_of(&db.store, &op.id).await.len(), 1, "the first step's request");
        let vm_before = db.store.read().resource(&pipeline.vm.id).await.unwrap();

        let message = status_message(op, 0, Status::Updated, "upgrade succeeded");
        assert_eq!(handle(&handler(db), message).await, Outcome::Complete);

        let stored = operation(db, &op.id).await;
        assert_eq!(stored.status, Status::PipelineRunning);
        assert_eq!(stored.message, "Multi step pipeline running. See steps for details.");
        assert_eq!(stored.steps()[0].status, Some(Status::Updated));
        assert_eq!(stored.steps()[0].message.as_deref(), Some("upgrade succeeded"));
        let vm = db.store.read().resource(&pipeline.vm.id).await.unwrap();
        assert_eq!(vm.resource_version, vm_before.resource_version + 1, "patched for the step");
        assert_eq!(deployment_status(db, &pipeline.firewall.id).await, Some(Status::Updated));

        let sent = requests_of(&db.store, &op.id).await;
        assert_eq!(sent.len(), 2, "exactly one new request");
        let (row, body) = &sent[1];
        let request: ResourceRequest = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(row.message.queue, "workspacequeue");
        assert_eq!(row.message.outgoing.correlation_id.as_deref(), Some(op.id.as_str()));
        assert_eq!(row.message.outgoing.session_id.as_deref(), Some(op.resource_id.as_str()));
        assert_eq!(row.message.aggregate_id, op.resource_id);
        assert_eq!(request.id, op.resource_id);
        assert_eq!(request.step_id, op.steps()[1].id);
        assert_eq!(request.action, "install");
        assert_eq!(stored.steps()[1].resource_request_message_id, Some(row.message_id()));
        assert_eq!(stored.steps()[1].status, Some(Status::AwaitingDeployment), "the RP moves it");
    }

    /// Drives the linuxvm pipeline to its last step through the handler.
    async fn to_last_step(db: &TestDb, handler: &DeploymentStatusHandler, op: &Operation) {
        let outputs = json!([{"name": "ip_address", "value": "10.2.1.4", "type": "string"}]);
        for message in [
            status_message(op, 0, Status::Updating, "Job starting"),
            status_message(op, 0, Status::Updated, "upgrade succeeded"),
            status_message(op, 1, Status::Deploying, "Job starting"),
            status_message_with_outputs(op, 1, Status::Deployed, "install succeeded", outputs),
            status_message(op, 2, Status::Updating, "Job starting"),
        ] {
            assert_eq!(handle(handler, message).await, Outcome::Complete);
        }
        assert_eq!(requests_of(&db.store, &op.id).await.len(), 3);
    }

    /// Ensures that (reference §10.1.9) when the last of three steps completes, the
    /// operation gets the action's success status (`deployed`, although the last step is
    /// an upgrade) with TRE's message, and no further request is written.
    pub(super) async fn tre_10_1_09_last_of_three_steps_completes(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let op = &pipeline.operation;
        let handler = handler(db);
        to_last_step(db, &handler, op).await;

        let message = status_message(op, 2, Status::Updated, "upgrade succeeded");
        assert_eq!(handle(&handler, message).await, Outcome::Complete);
        let stored = operation(db, &op.id).await;
        assert_eq!(
            (stored.status, stored.message.as_str()),
            (Status::Deployed, "Multi step pipeline completed successfully")
        );
        assert_eq!(stored.steps()[2].status, Some(Status::Updated));
        assert_eq!(stored.steps()[2].message.as_deref(), Some("upgrade succeeded"));
        assert_eq!(requests_of(&db.store, &op.id).await.len(), 3, "no request after the last step");
        let vm = db.store.read().resource(&pipeline.vm.id).await.unwrap();
        assert_eq!(vm.deployment_status, Some(Status::Deployed));
        assert_eq!(vm.properties["ip_address"], "10.2.1.4");
        // The post-step substituted the main step's output into the firewall rules, and
        // its request carries the patched resource (DESIGN §6: TRE's retry returns None).
        let firewall = db.store.read().resource(&pipeline.firewall.id).await.unwrap();
        let rules = firewall.properties["network_rule_collections"].to_string();
        assert!(rules.contains("10.2.1.4"), "{rules}");
        let sent = requests_of(&db.store, &op.id).await;
        let (row, body) = &sent[2];
        assert_eq!(row.message.outgoing.session_id.as_deref(), Some(pipeline.firewall.id.as_str()));
        assert_eq!(body["stepId"], op.steps()[2].id);
        assert_eq!(body["action"], "upgrade");
        assert_eq!(
            body["parameters"]["network_rule_collections"],
            firewall.properties["network_rule_collections"]
        );
    }

    /// Ensures that (DESIGN §6: "step id not in operation", TRE abandons ×10) a step the
    /// operation lacks — or the right step id with another resource id — is
    /// dead-lettered with reason `UnknownStep`, writing nothing.
    pub(super) async fn design_6_unknown_step_is_dead_lettered(db: &TestDb) {
        let registry = templates();
        let (ws, op) = workspace_installing(&db.store, &registry).await;
        let other = uuid::Uuid::new_v4().to_string();
        for (step_id, resource_id) in
            [("no-such-step", ws.id.as_str()), (op.steps()[0].id.as_str(), other.as_str())]
        {
            let logs = Logs::default();
            let _guard = logs.install();
            let body = status_body(&op.id, step_id, resource_id, "deployed", "x", json!([]));
            let outcome = handle(&handler(db), raw_message(&body.to_string(), &op.id)).await;
            assert_eq!(dead_letter_reason(&outcome), "UnknownStep");
            let error = only_error(&logs, "Failed to update status");
            assert_eq!(error.fields["reason"], "UnknownStep");
        }
        assert_eq!(operation(db, &op.id).await, op);
    }

    /// Ensures that a missing operation completes with TRE's not-found line, which names
    /// the resource id as TRE's does.
    pub(super) async fn operation_missing_completes(db: &TestDb) {
        let logs = Logs::default();
        let _guard = logs.install();
        let resource_id = uuid::Uuid::new_v4().to_string();
        let body = status_body(
            &uuid::Uuid::new_v4().to_string(),
            "s1",
            &resource_id,
            "deploying",
            "x",
            json!([]),
        );
        let outcome = handle(&handler(db), raw_message(&body.to_string(), "s")).await;
        assert_eq!(outcome, Outcome::Complete);
        only_error(
            &logs,
            &format!(
                "Service bus message refers to resource id = {resource_id} which does not exist"
            ),
        );
    }

    /// Ensures that (DESIGN §6: "DB failure", TRE abandons at once in a hot loop) an
    /// unreachable database retries with cause `Dependency`, so the worker's circuit
    /// breaker pauses it, and the handler's probe fails until the database answers.
    pub(super) async fn design_6_database_down_is_a_dependency_retry(db: &TestDb) {
        let registry = templates();
        let (_, op) = workspace_installing(&db.store, &registry).await;
        let handler = handler(db);
        handler.probe().await.expect("the database answers");
        db.store.close().await;
        let logs = Logs::default();
        let _guard = logs.install();
        let outcome = handle(&handler, status_message(&op, 0, Status::Deployed, "done")).await;
        assert!(
            matches!(&outcome, Outcome::Retry { cause: RetryCause::Dependency, .. }),
            "{outcome:?}"
        );
        let error = only_error(&logs, "Failed to update status");
        assert!(error.fields["error"].contains("database unavailable"), "{error:?}");
        assert!(handler.probe().await.is_err());
    }

    /// Ensures that (DESIGN §6: "last pipeline step fails → op reported success") a
    /// failing last step gives the operation the action's failure status, TRE's failure
    /// message, and the main resource the failure status too.
    pub(super) async fn design_6_failing_last_step_fails_the_operation(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let op = &pipeline.operation;
        let handler = handler(db);
        to_last_step(db, &handler, op).await;
        let message = status_message(op, 2, Status::UpdatingFailed, "firewall rejected the rule");
        assert_eq!(handle(&handler, message).await, Outcome::Complete);
        let stored = operation(db, &op.id).await;
        assert_eq!(stored.status, Status::DeploymentFailed);
        assert_eq!(stored.message, "Multi step pipeline failed on step post-step-1");
        assert_eq!(stored.steps()[2].status, Some(Status::UpdatingFailed));
        assert_eq!(deployment_status(db, &pipeline.vm.id).await, Some(Status::DeploymentFailed));
        assert_eq!(
            deployment_status(db, &pipeline.firewall.id).await,
            Some(Status::UpdatingFailed)
        );
    }

    /// Ensures that a failing middle step fails the operation at once and queues
    /// nothing more (reference §6.4).
    pub(super) async fn failing_main_step_stops_the_pipeline(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let op = &pipeline.operation;
        let handler = handler(db);
        for message in [
            status_message(op, 0, Status::Updated, "upgrade succeeded"),
            status_message(op, 1, Status::DeploymentFailed, "quota exceeded"),
        ] {
            assert_eq!(handle(&handler, message).await, Outcome::Complete);
        }
        let stored = operation(db, &op.id).await;
        assert_eq!(
            (stored.status, stored.message.as_str()),
            (Status::DeploymentFailed, "Multi step pipeline failed on step main")
        );
        assert_eq!(requests_of(&db.store, &op.id).await.len(), 2, "post-step never queued");
        assert_eq!(deployment_status(db, &pipeline.vm.id).await, Some(Status::DeploymentFailed));
    }

    /// Ensures that (reference §12, "failure while dispatching the next pipeline step")
    /// when the next step cannot be prepared, the message completes, the next step is
    /// `updating_failed` with the error as its message, the operation gets the failure
    /// status, the main resource too, and no request or half-done patch is written.
    pub(super) async fn next_step_dispatch_failure_marks_step_and_operation_failed(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let op = &pipeline.operation;
        // The post-step substitutes into the firewall: without a template the step
        // cannot be prepared.
        db.execute(&format!(
            "UPDATE resources SET template_name = 'gone', doc = REPLACE(doc, '\"templateName\":\"tre-shared-service-firewall\"', '\"templateName\":\"gone\"') WHERE id = '{}'",
            pipeline.firewall.id
        ))
        .await;
        let handler = handler(db);
        for message in [
            status_message(op, 0, Status::Updated, "upgrade succeeded"),
            status_message(op, 1, Status::Deploying, "Job starting"),
        ] {
            assert_eq!(handle(&handler, message).await, Outcome::Complete);
        }
        let firewall_before = db.store.read().resource(&pipeline.firewall.id).await.unwrap();
        let logs = Logs::default();
        let _guard = logs.install();
        let outcome =
            handle(&handler, status_message(op, 1, Status::Deployed, "install succeeded")).await;
        assert_eq!(outcome, Outcome::Complete);
        let stored = operation(db, &op.id).await;
        assert_eq!(stored.steps()[1].status, Some(Status::Deployed));
        let next = &stored.steps()[2];
        assert_eq!(next.status, Some(Status::UpdatingFailed));
        assert!(next.message.as_deref().unwrap().contains("gone"), "{next:?}");
        assert_eq!(next.resource_request_message_id, None);
        assert_eq!(stored.status, Status::DeploymentFailed);
        assert_eq!(stored.message, "Multi step pipeline failed on step post-step-1");
        assert_eq!(deployment_status(db, &pipeline.vm.id).await, Some(Status::DeploymentFailed));
        assert_eq!(requests_of(&db.store, &op.id).await.len(), 2);
        assert_eq!(db.store.read().resource(&pipeline.firewall.id).await.unwrap(), firewall_before);
        let error = only_error(&logs, "Unable to send update for resource in pipeline step");
        assert_eq!(error.fields["next_step"], "post-step-1");

        // A replay of the message changes nothing more.
        let outcome =
            handle(&handler, status_message(op, 1, Status::Deployed, "install succeeded")).await;
        assert_eq!(outcome, Outcome::Complete);
        assert_eq!(operation(db, &op.id).await, stored);
    }

    /// Ensures that a `boolean` output with a list value, which TRE fails on after
    /// ten abandons, is dead-lettered as `MessageFormatIncorrect` and writes nothing.
    pub(super) async fn boolean_output_with_a_list_is_dead_lettered(db: &TestDb) {
        let registry = templates();
        let (_, op) = workspace_installing(&db.store, &registry).await;
        let outputs = json!([{"name": "flag", "value": ["x"], "type": "boolean"}]);
        let message =
            status_message_with_outputs(&op, 0, Status::Deployed, "done", outputs.clone());
        assert_eq!(
            dead_letter_reason(&handle(&handler(db), message).await),
            "MessageFormatIncorrect"
        );
        assert_eq!(operation(db, &op.id).await, op);
        // Outputs of a failure are not converted (reference §6.5), so the same outputs
        // do not stop a failure report.
        let message =
            status_message_with_outputs(&op, 0, Status::DeploymentFailed, "failed", outputs);
        assert_eq!(handle(&handler(db), message).await, Outcome::Complete);
        assert_eq!(operation(db, &op.id).await.status, Status::DeploymentFailed);
    }

    /// Ensures that outputs are merged only on success: a failure's outputs never reach
    /// the properties.
    pub(super) async fn outputs_of_a_failure_are_not_merged(db: &TestDb) {
        let registry = templates();
        let (ws, op) = workspace_installing(&db.store, &registry).await;
        let outputs = json!([{"name": "leak", "value": "x", "type": "string"}]);
        let message =
            status_message_with_outputs(&op, 0, Status::DeploymentFailed, "failed", outputs);
        assert_eq!(handle(&handler(db), message).await, Outcome::Complete);
        let stored = db.store.read().resource(&ws.id).await.unwrap();
        assert!(!stored.properties.contains_key("leak"));
        assert_eq!(stored.deployment_status, Some(Status::DeploymentFailed));
    }

    /// Ensures that (DESIGN §5) the same in-progress, success and failure messages
    /// handled twice leave one state change: the second completes without a write.
    pub(super) async fn replayed_single_step_messages_change_nothing(db: &TestDb) {
        let registry = templates();
        let handler = handler(db);
        for status in [Status::Deploying, Status::Deployed, Status::DeploymentFailed] {
            let (ws, op) = workspace_installing(&db.store, &registry).await;
            let message = status_message_with_outputs(
                &op,
                0,
                status,
                "report",
                json!([{"name": "o", "value": "v", "type": "string"}]),
            );
            assert_eq!(handle(&handler, message.clone()).await, Outcome::Complete);
            let (after_op, after_ws) =
                (operation(db, &op.id).await, db.store.read().resource(&ws.id).await.unwrap());
            let logs = Logs::default();
            let _guard = logs.install();
            assert_eq!(handle(&handler, message).await, Outcome::Complete, "{status}");
            assert_eq!(operation(db, &op.id).await, after_op, "{status}: no second write");
            assert_eq!(db.store.read().resource(&ws.id).await.unwrap(), after_ws, "{status}");
            assert!(logs.events().iter().any(|e| e.message.contains("(replay)")), "{status}");
        }
    }

    /// Ensures that (DESIGN §5) a replayed success of a pipeline step whose next step
    /// was already requested writes neither a state change nor a second request.
    pub(super) async fn replayed_pipeline_success_writes_one_request(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let op = &pipeline.operation;
        let handler = handler(db);
        let message = status_message(op, 0, Status::Updated, "upgrade succeeded");
        assert_eq!(handle(&handler, message.clone()).await, Outcome::Complete);
        let (stored, vm) =
            (operation(db, &op.id).await, db.store.read().resource(&pipeline.vm.id).await.unwrap());
        assert_eq!(handle(&handler, message.clone()).await, Outcome::Complete);
        // Even after the next step moved on, the replay stays a no-op.
        assert_eq!(
            handle(&handler, status_message(op, 1, Status::Deploying, "Job starting")).await,
            Outcome::Complete
        );
        let moved_on = operation(db, &op.id).await;
        assert_eq!(handle(&handler, message).await, Outcome::Complete);
        assert_eq!(requests_of(&db.store, &op.id).await.len(), 2, "one request for step 2");
        assert_eq!(operation(db, &op.id).await, moved_on);
        assert_eq!(moved_on.steps()[0], stored.steps()[0]);
        assert_eq!(
            db.store.read().resource(&pipeline.vm.id).await.unwrap().resource_version,
            vm.resource_version
        );
    }

    /// Ensures that (DESIGN §5) two deliveries of the same success handled at the same
    /// time (two replicas) leave one state change and one request in the outbox.
    pub(super) async fn concurrent_duplicates_write_one_request(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let op = &pipeline.operation;
        let (a, b) = (handler(db), handler(db));
        let message = status_message(op, 0, Status::Updated, "upgrade succeeded");
        let (first, second) = tokio::join!(handle(&a, message.clone()), handle(&b, message));
        assert_eq!((first, second), (Outcome::Complete, Outcome::Complete));
        assert_eq!(requests_of(&db.store, &op.id).await.len(), 2, "one request for step 2");
        let history = db.store.read().resource_history(&pipeline.vm.id).await.unwrap();
        assert_eq!(history.len(), 1, "the next step's resource was patched once");
    }

    /// Ensures that (DESIGN §5, §6: "late in-progress status overwrites a final one") an
    /// in-progress status arriving after the step's final status is logged and
    /// completed, not applied: step, operation and resource keep the final status.
    pub(super) async fn late_in_progress_status_is_not_applied(db: &TestDb) {
        let registry = templates();
        let (ws, op) = workspace_installing(&db.store, &registry).await;
        let handler = handler(db);
        assert_eq!(
            handle(&handler, status_message(&op, 0, Status::Deployed, "done")).await,
            Outcome::Complete
        );
        let (after, resource) =
            (operation(db, &op.id).await, db.store.read().resource(&ws.id).await.unwrap());
        for late in [Status::Deploying, Status::AwaitingDeployment] {
            let logs = Logs::default();
            let _guard = logs.install();
            let outcome = handle(&handler, status_message(&op, 0, late, "Job starting")).await;
            assert_eq!(outcome, Outcome::Complete);
            assert_eq!(operation(db, &op.id).await, after, "{late}");
            assert_eq!(db.store.read().resource(&ws.id).await.unwrap(), resource, "{late}");
            let warning = logs
                .events()
                .into_iter()
                .find(|e| e.level == tracing::Level::WARN)
                .expect("the late status is logged");
            assert_eq!(warning.fields["current_status"], "deployed");
            assert_eq!(warning.fields["status"], late.as_str());
            assert!(logs.errors().is_empty());
        }
    }

    /// Ensures that monotonic statuses hold inside a pipeline too: a late `updating` for
    /// the finished pre-step changes neither the step nor the firewall, and a final
    /// status that differs from the stored final one is still applied (TRE's rule).
    pub(super) async fn late_in_progress_in_a_pipeline_is_not_applied(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let op = &pipeline.operation;
        let handler = handler(db);
        assert_eq!(
            handle(&handler, status_message(op, 0, Status::Updated, "ok")).await,
            Outcome::Complete
        );
        let after = operation(db, &op.id).await;
        assert_eq!(
            handle(&handler, status_message(op, 0, Status::Updating, "Job starting")).await,
            Outcome::Complete
        );
        assert_eq!(operation(db, &op.id).await, after);
        assert_eq!(deployment_status(db, &pipeline.firewall.id).await, Some(Status::Updated));
        assert_eq!(
            handle(&handler, status_message(op, 0, Status::UpdatingFailed, "rolled back")).await,
            Outcome::Complete
        );
        assert_eq!(operation(db, &op.id).await.status, Status::DeploymentFailed);
    }

    /// Ensures that the in-progress status of a single-step operation is mirrored to the
    /// operation and the resource (reference §6.4) before the final one.
    pub(super) async fn in_progress_status_is_mirrored(db: &TestDb) {
        let registry = templates();
        let (ws, op) = workspace_installing(&db.store, &registry).await;
        let outcome =
            handle(&handler(db), status_message(&op, 0, Status::Deploying, "Job starting")).await;
        assert_eq!(outcome, Outcome::Complete);
        let stored = operation(db, &op.id).await;
        assert_eq!((stored.status, stored.message.as_str()), (Status::Deploying, "Job starting"));
        assert_eq!(deployment_status(db, &ws.id).await, Some(Status::Deploying));
    }
}

db_test!(
    tre_10_1_01_bad_json_and_bad_schema_are_dead_lettered,
    tre_10_1_01_bad_json_and_bad_schema_are_dead_lettered_postgres,
    cases::tre_10_1_01_bad_json_and_bad_schema_are_dead_lettered
);
db_test!(
    tre_10_1_02_good_single_step_message_completes,
    tre_10_1_02_good_single_step_message_completes_postgres,
    cases::tre_10_1_02_good_single_step_message_completes
);
db_test!(
    tre_10_1_03_resource_missing_completes,
    tre_10_1_03_resource_missing_completes_postgres,
    cases::tre_10_1_03_resource_missing_completes
);
db_test!(
    tre_10_1_04_state_store_error_retries,
    tre_10_1_04_state_store_error_retries_postgres,
    cases::tre_10_1_04_state_store_error_retries
);
db_test!(
    tre_10_1_05_deployed_to_deleted_single_step,
    tre_10_1_05_deployed_to_deleted_single_step_postgres,
    cases::tre_10_1_05_deployed_to_deleted_single_step
);
db_test!(
    tre_10_1_06_outputs_are_merged_into_properties,
    tre_10_1_06_outputs_are_merged_into_properties_postgres,
    cases::tre_10_1_06_outputs_are_merged_into_properties
);
db_test!(
    tre_10_1_07_no_outputs_leaves_properties_unchanged,
    tre_10_1_07_no_outputs_leaves_properties_unchanged_postgres,
    cases::tre_10_1_07_no_outputs_leaves_properties_unchanged
);
db_test!(
    tre_10_1_08_first_of_three_steps_completes,
    tre_10_1_08_first_of_three_steps_completes_postgres,
    cases::tre_10_1_08_first_of_three_steps_completes
);
db_test!(
    tre_10_1_09_last_of_three_steps_completes,
    tre_10_1_09_last_of_three_steps_completes_postgres,
    cases::tre_10_1_09_last_of_three_steps_completes
);
db_test!(
    design_6_unknown_step_is_dead_lettered,
    design_6_unknown_step_is_dead_lettered_postgres,
    cases::design_6_unknown_step_is_dead_lettered
);
db_test!(
    operation_missing_completes,
    operation_missing_completes_postgres,
    cases::operation_missing_completes
);
db_test!(
    design_6_database_down_is_a_dependency_retry,
    design_6_database_down_is_a_dependency_retry_postgres,
    cases::design_6_database_down_is_a_dependency_retry
);
db_test!(
    design_6_failing_last_step_fails_the_operation,
    design_6_failing_last_step_fails_the_operation_postgres,
    cases::design_6_failing_last_step_fails_the_operation
);
db_test!(
    failing_main_step_stops_the_pipeline,
    failing_main_step_stops_the_pipeline_postgres,
    cases::failing_main_step_stops_the_pipeline
);
db_test!(
    next_step_dispatch_failure_marks_step_and_operation_failed,
    next_step_dispatch_failure_marks_step_and_operation_failed_postgres,
    cases::next_step_dispatch_failure_marks_step_and_operation_failed
);
db_test!(
    boolean_output_with_a_list_is_dead_lettered,
    boolean_output_with_a_list_is_dead_lettered_postgres,
    cases::boolean_output_with_a_list_is_dead_lettered
);
db_test!(
    outputs_of_a_failure_are_not_merged,
    outputs_of_a_failure_are_not_merged_postgres,
    cases::outputs_of_a_failure_are_not_merged
);
db_test!(
    replayed_single_step_messages_change_nothing,
    replayed_single_step_messages_change_nothing_postgres,
    cases::replayed_single_step_messages_change_nothing
);
db_test!(
    replayed_pipeline_success_writes_one_request,
    replayed_pipeline_success_writes_one_request_postgres,
    cases::replayed_pipeline_success_writes_one_request
);
db_test!(
    concurrent_duplicates_write_one_request,
    concurrent_duplicates_write_one_request_postgres,
    cases::concurrent_duplicates_write_one_request
);
db_test!(
    late_in_progress_status_is_not_applied,
    late_in_progress_status_is_not_applied_postgres,
    cases::late_in_progress_status_is_not_applied
);
db_test!(
    late_in_progress_in_a_pipeline_is_not_applied,
    late_in_progress_in_a_pipeline_is_not_applied_postgres,
    cases::late_in_progress_in_a_pipeline_is_not_applied
);
db_test!(
    in_progress_status_is_mirrored,
    in_progress_status_is_mirrored_postgres,
    cases::in_progress_status_is_mirrored
);
