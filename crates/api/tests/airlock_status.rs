//! The airlock status handler: every case of reference §10.2, the DESIGN §6 deviations
//! that concern it, replays and files-only results. Each case runs on SQLite and on
//! PostgreSQL (`*_postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};
use steward_api::domain::{AirlockFile, AirlockRequest, AirlockRequestStatus as S, Resource};
use steward_api::rules::airlock::{self, AirlockQueues};
use steward_api::workers::{
    AirlockStatusHandler, RecipientError, RecipientProvider, RecipientsByRole, StaticRecipients,
};
use steward_core::{BoxError, Handler, Message, Outcome, RetryCause};
use support::{
    CORRELATION_ID, Logs, TestDb, airlock_request, only_error, outbox, outbox_for, raw_message,
    step_result_body, step_result_message, templates, user, workspace,
};

mod cases {
    use super::*;

    pub(super) fn recipients() -> StaticRecipients {
        "WorkspaceOwner=owner@example.com,WorkspaceResearcher=r1@example.com;r2@example.com,AirlockManager=am@example.com"
            .parse()
            .unwrap()
    }

    pub(super) fn handler(db: &TestDb) -> AirlockStatusHandler {
        AirlockStatusHandler::new(db.store.clone(), Arc::new(recipients()))
    }

    pub(super) async fn handle(handler: &AirlockStatusHandler, message: Message) -> Outcome {
        handler.handle(Arc::new(message)).await
    }

    /// Handles `message` with `handler`, capturing the log lines from then on for as
    /// long as the returned guard lives.
    async fn handle_logged(
        handler: &AirlockStatusHandler,
        message: Message,
    ) -> (Outcome, Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let guard = logs.install();
        (handle(handler, message).await, logs, guard)
    }

    async fn setup(db: &TestDb, status: S) -> (Resource, AirlockRequest) {
        let ws = workspace(&db.store, &templates()).await;
        let request = airlock_request(&db.store, &ws, status).await;
        (ws, request)
    }

    async fn stored(db: &TestDb, id: &str) -> AirlockRequest {
        db.store.read().airlock_request(id).await.unwrap()
    }

    fn files_message(request_id: &str, completed: &str, files: Value) -> Message {
        let body = step_result_body(request_id, completed, None, Some(files), None);
        raw_message(&body.to_string(), "s")
    }

    /// Ensures that (reference §10.2.1) a good step result for a request in `submitted`
    /// completes, moves the request to `in_review` keeping the last human actor as
    /// `updatedBy`, leaves files and status message alone, records the previous status
    /// in the history, writes two events (`statusChanged` v2.0 and
    /// `airlockNotification` v4.0) to the outbox, and logs no error.
    pub(super) async fn tre_10_2_01_good_message_moves_the_request(db: &TestDb) {
        let (ws, request) = setup(db, S::Submitted).await;
        let (outcome, logs, _guard) = handle_logged(
            &handler(db),
            step_result_message(&request.id, "submitted", Some("in_review")),
        )
        .await;
        assert_eq!(outcome, Outcome::Complete);
        assert!(logs.errors().is_empty(), "{:?}", logs.errors());

        let after = stored(db, &request.id).await;
        assert_eq!(after.status, S::InReview);
        assert_eq!(after.updated_by, request.updated_by);
        assert_eq!(
            (after.files.clone(), after.status_message.clone()),
            (request.files.clone(), None)
        );
        assert_eq!(after.resource_version, request.resource_version + 1);
        assert_eq!(after.history.len(), 1);
        assert_eq!(after.history[0].properties["previousStatus"], "submitted");

        let events = outbox_for(&db.store, &request.id).await;
        assert_eq!(events.len(), 2, "statusChanged and airlockNotification");
        let (changed_row, changed) = &events[0];
        assert_eq!(changed_row.message.queue, "airlock-status-changed");
        assert_eq!(changed["eventType"], "statusChanged");
        assert_eq!(changed["dataVersion"], "2.0");
        assert_eq!(changed["subject"], format!("{}/statusChanged", request.id));
        assert_eq!(
            changed["data"],
            json!({
                "request_id": request.id,
                "new_status": "in_review",
                "previous_status": "submitted",
                "type": "import",
                "workspace_id": ws.id[ws.id.len() - 4..],
            })
        );
        let (notification_row, notification) = &events[1];
        assert_eq!(notification_row.message.queue, "airlock-notification");
        assert_eq!(notification["eventType"], "airlockNotification");
        assert_eq!(notification["dataVersion"], "4.0");
        let data = &notification["data"];
        assert_eq!(data["event_type"], "status_changed");
        assert_eq!(
            data["recipient_emails_by_role"],
            json!({
                "workspace_owner": ["owner@example.com"],
                "workspace_researcher": ["r1@example.com", "r2@example.com"],
                "airlock_manager": ["am@example.com"],
            })
        );
        assert_eq!(
            data["workspace"],
            json!({"id": ws.id, "display_name": "Genomics", "description": "Sequencing data"})
        );
        assert_eq!(data["request"]["status"], "in_review");
        assert_eq!(
            data["request"]["created_by"],
            json!({"name": "Jane", "email": "jane@example.com"})
        );
    }

    /// Ensures that (reference §10.2.2) bad JSON and a body of the wrong shape are
    /// logged with TRE's exact line, now dead-lettered with reason
    /// `MessageFormatIncorrect` (DESIGN §6: "invalid JSON/schema", TRE completes and
    /// drops them).
    pub(super) async fn tre_10_2_02_bad_json_and_bad_schema_are_dead_lettered(db: &TestDb) {
        let handler = handler(db);
        for body in [
            "bad".to_owned(),
            r#"{"good": "json", "bad": "message"}"#.to_owned(),
            step_result_body("r", "not_a_status", Some("in_review"), None, None).to_string(),
        ] {
            let (outcome, logs, _guard) = handle_logged(&handler, raw_message(&body, "s")).await;
            match &outcome {
                Outcome::DeadLetter { reason, description } => {
                    assert_eq!(reason, "MessageFormatIncorrect");
                    assert!(description.starts_with(
                        "Service bus message of step result is not formatted correctly"
                    ));
                }
                other => panic!("{body}: {other:?}"),
            }
            only_error(
                &logs,
                &format!(
                    "Service bus message of step result is not formatted correctly: {CORRELATION_ID}"
                ),
            );
        }
        assert!(outbox(&db.store).await.is_empty());
    }

    /// Ensures that (reference §10.2.3) a result for a request that does not exist
    /// completes with TRE's not-found line, once.
    pub(super) async fn tre_10_2_03_request_not_found_completes(db: &TestDb) {
        let id = "5dbc15ae-40e1-49a5-834b-595f59d626b7";
        let (outcome, logs, _guard) =
            handle_logged(&handler(db), step_result_message(id, "submitted", Some("in_review")))
                .await;
        assert_eq!(outcome, Outcome::Complete);
        let error = only_error(
            &logs,
            &format!(
                "Service bus message of step result refers to resource id = {id} which does not exist"
            ),
        );
        assert_eq!(error.fields["airlock_request_id"], id);
    }

    /// Ensures that (reference §10.2.4) a database error logs "Failed updating request
    /// status" once and does not complete: the message is retried with backoff (DESIGN
    /// §6: "DB failure"), nothing is written.
    pub(super) async fn tre_10_2_04_database_error_retries(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        db.execute("ALTER TABLE airlock_requests RENAME TO airlock_requests_elsewhere").await;
        let (outcome, logs, _guard) = handle_logged(
            &handler(db),
            step_result_message(&request.id, "submitted", Some("in_review")),
        )
        .await;
        assert!(
            matches!(&outcome, Outcome::Retry { cause: RetryCause::Message, after: None, .. }),
            "{outcome:?}"
        );
        let error = only_error(&logs, "Failed updating request status");
        assert_eq!(error.fields["airlock_request_id"], request.id);
        assert!(outbox_for(&db.store, &request.id).await.is_empty());
    }

    /// Ensures that (reference §10.2.5) a result whose `completed_step` is not the
    /// request's status logs TRE's mismatch line once and is not completed: it is
    /// retried with the worker's backoff as an ordering race (DESIGN §6: "current status
    /// ≠ completed_step", TRE abandons at once).
    pub(super) async fn tre_10_2_05_status_mismatch_is_retried(db: &TestDb) {
        let (_, request) = setup(db, S::Draft).await;
        let (outcome, logs, _guard) = handle_logged(
            &handler(db),
            step_result_message(&request.id, "submitted", Some("in_review")),
        )
        .await;
        assert!(
            matches!(&outcome, Outcome::Retry { cause: RetryCause::Message, after: None, .. }),
            "{outcome:?}"
        );
        only_error(
            &logs,
            &format!(
                "Service bus message of step result current status does not match the one in state store for request id = {}, status in step result = submitted, status in state store = draft",
                request.id
            ),
        );
        assert_eq!(stored(db, &request.id).await, request);
    }

    /// Ensures that (reference §10.2.6) an illegal transition logs TRE's line once and
    /// writes nothing; it is dead-lettered with reason `IllegalStatusTransition` (DESIGN
    /// §6: "illegal airlock transition", TRE completes and drops it).
    pub(super) async fn tre_10_2_06_illegal_transition_is_dead_lettered(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        let (outcome, logs, _guard) = handle_logged(
            &handler(db),
            step_result_message(&request.id, "submitted", Some("approved")),
        )
        .await;
        let text = format!(
            "Service bus message has invalid status change request for request id = {}, current status is = submitted, new status is = approved",
            request.id
        );
        assert_eq!(outcome, Outcome::dead_letter("IllegalStatusTransition", text.clone()));
        only_error(&logs, &text);
        assert_eq!(stored(db, &request.id).await, request);
        assert!(outbox_for(&db.store, &request.id).await.is_empty());
    }

    /// Ensures that an illegal pair is dead-lettered even when the request is elsewhere:
    /// it could never apply, so it is not retried.
    pub(super) async fn illegal_pair_is_dead_lettered_whatever_the_status(db: &TestDb) {
        let (_, request) = setup(db, S::Draft).await;
        let outcome =
            handle(&handler(db), step_result_message(&request.id, "rejected", Some("approved")))
                .await;
        assert!(
            matches!(&outcome, Outcome::DeadLetter { reason, .. } if reason == "IllegalStatusTransition"),
            "{outcome:?}"
        );
    }

    /// Ensures that (DESIGN §5, §6: "current status ≠ completed_step … replay →
    /// complete") a status result handled twice leaves one change and one pair of
    /// events; the replay completes with no new event, also after the request moved on.
    pub(super) async fn replayed_status_result_writes_one_event_pair(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        let handler = handler(db);
        let message = step_result_message(&request.id, "submitted", Some("in_review"));
        assert_eq!(handle(&handler, message.clone()).await, Outcome::Complete);
        let after = stored(db, &request.id).await;
        let logs = Logs::default();
        let _guard = logs.install();
        assert_eq!(handle(&handler, message.clone()).await, Outcome::Complete);
        assert!(logs.errors().is_empty());
        assert!(logs.events().iter().any(|e| e.message.contains("(replay)")));
        assert_eq!(stored(db, &request.id).await, after);
        assert_eq!(outbox_for(&db.store, &request.id).await.len(), 2);

        // The reviewer approves; the old result arrives again.
        let mut tx = db.store.begin().await.unwrap();
        airlock::review(
            &mut tx,
            &AirlockQueues::default(),
            &request.id,
            &user(),
            steward_api::domain::AirlockReviewDecision::Approved,
            "fine",
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let reviewed = stored(db, &request.id).await;
        assert_eq!(handle(&handler, message).await, Outcome::Complete);
        assert_eq!(stored(db, &request.id).await, reviewed);
        assert_eq!(outbox_for(&db.store, &request.id).await.len(), 4, "only the review's events");
    }

    /// Ensures that (DESIGN §5) two deliveries of one result handled at the same time
    /// leave one state change and one pair of events.
    pub(super) async fn concurrent_duplicates_write_one_event_pair(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        let (a, b) = (handler(db), handler(db));
        let message = step_result_message(&request.id, "submitted", Some("in_review"));
        let (first, second) = tokio::join!(handle(&a, message.clone()), handle(&b, message));
        assert_eq!((first, second), (Outcome::Complete, Outcome::Complete));
        let after = stored(db, &request.id).await;
        assert_eq!((after.status, after.history.len()), (S::InReview, 1));
        assert_eq!(outbox_for(&db.store, &request.id).await.len(), 2);
    }

    /// Ensures that (reference §4.3) a files-only result for a request in
    /// `completed_step` replaces the files and status message, writes a history item,
    /// and publishes no event; handled again it changes nothing (DESIGN §5).
    pub(super) async fn files_only_result_updates_files_without_events(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        let handler = handler(db);
        let body = step_result_body(
            &request.id,
            "submitted",
            None,
            Some(json!([{"name": "data.csv", "size": 1024}])),
            Some("1 file"),
        );
        let message = raw_message(&body.to_string(), "s");
        assert_eq!(handle(&handler, message.clone()).await, Outcome::Complete);
        let after = stored(db, &request.id).await;
        assert_eq!(after.status, S::Submitted);
        assert_eq!(after.files, vec![AirlockFile { name: "data.csv".to_owned(), size: 1024.0 }]);
        assert_eq!(after.status_message.as_deref(), Some("1 file"));
        assert_eq!(after.history.len(), 1);
        assert!(
            outbox_for(&db.store, &request.id).await.is_empty(),
            "a files-only update publishes nothing"
        );
        assert_eq!(handle(&handler, message).await, Outcome::Complete);
        assert_eq!(stored(db, &request.id).await, after, "replay: no second write");
    }

    /// Ensures that (DESIGN §6: "files-only result racing `in_review` ends in the DLQ")
    /// the files-only result that arrives after `submitted → in_review` is still
    /// applied, and the scan's move stays in place.
    pub(super) async fn design_6_files_only_result_after_in_review_is_applied(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        let handler = handler(db);
        let moved = step_result_message(&request.id, "submitted", Some("in_review"));
        assert_eq!(handle(&handler, moved.clone()).await, Outcome::Complete);
        let files = json!([{"name": "data.csv", "size": 1024}]);
        let outcome = handle(&handler, files_message(&request.id, "submitted", files)).await;
        assert_eq!(outcome, Outcome::Complete);
        let after = stored(db, &request.id).await;
        assert_eq!(after.status, S::InReview);
        assert_eq!(after.files, vec![AirlockFile { name: "data.csv".to_owned(), size: 1024.0 }]);
        assert_eq!(outbox_for(&db.store, &request.id).await.len(), 2, "no event for the files");
        // The status result replayed after the files update is still recognised.
        assert_eq!(handle(&handler, moved).await, Outcome::Complete);
        assert_eq!(stored(db, &request.id).await, after);
    }

    /// Ensures that a files-only result for a status the request never had is an
    /// ordering race: retried, nothing written.
    pub(super) async fn files_only_result_for_a_later_status_is_retried(db: &TestDb) {
        let (_, request) = setup(db, S::Draft).await;
        let outcome = handle(
            &handler(db),
            files_message(&request.id, "submitted", json!([{"name": "a", "size": 1}])),
        )
        .await;
        assert!(
            matches!(outcome, Outcome::Retry { cause: RetryCause::Message, .. }),
            "{outcome:?}"
        );
        assert_eq!(stored(db, &request.id).await, request);
    }

    /// Ensures that a status message and the files of the result are applied with the
    /// status change (a failed scan reports both).
    pub(super) async fn failure_result_sets_status_message_and_files(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        let body = step_result_body(
            &request.id,
            "submitted",
            Some("failed"),
            Some(json!([{"name": "a.csv", "size": 1}, {"name": "b.csv", "size": 2}])),
            Some("Request contained more than 1 file."),
        );
        let outcome = handle(&handler(db), raw_message(&body.to_string(), "s")).await;
        assert_eq!(outcome, Outcome::Complete);
        let after = stored(db, &request.id).await;
        assert_eq!(after.status, S::Failed);
        assert_eq!(after.status_message.as_deref(), Some("Request contained more than 1 file."));
        assert_eq!(after.files.len(), 2);
        let events = outbox_for(&db.store, &request.id).await;
        assert_eq!(events[0].1["data"]["new_status"], "failed");
        assert_eq!(events[1].1["data"]["request"]["files"].as_array().unwrap().len(), 2);
    }

    /// A recipient provider whose directory is down.
    struct DirectoryDown;

    #[async_trait]
    impl RecipientProvider for DirectoryDown {
        async fn recipient_emails_by_role(
            &self,
            workspace: &Resource,
        ) -> Result<RecipientsByRole, RecipientError> {
            Err(RecipientError {
                workspace_id: workspace.id.clone(),
                source: "connection refused".into(),
            })
        }

        async fn probe(&self) -> Result<(), BoxError> {
            Err("directory still down".into())
        }
    }

    /// Ensures that a recipient directory outage is a dependency failure: the message is
    /// retried with cause `Dependency`, nothing is written, and the probe fails.
    pub(super) async fn recipient_outage_is_a_dependency_retry(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        let handler = AirlockStatusHandler::new(db.store.clone(), Arc::new(DirectoryDown));
        let (outcome, logs, _guard) = handle_logged(
            &handler,
            step_result_message(&request.id, "submitted", Some("in_review")),
        )
        .await;
        assert!(
            matches!(&outcome, Outcome::Retry { cause: RetryCause::Dependency, .. }),
            "{outcome:?}"
        );
        let error = only_error(&logs, "State Store endpoint is not responding");
        assert!(error.fields["error"].contains("connection refused"), "{error:?}");
        assert_eq!(stored(db, &request.id).await, request);
        assert!(handler.probe().await.is_err());
    }

    /// Ensures that (DESIGN §6: "DB failure") an unreachable database is a dependency
    /// failure logged with TRE's 503 line, and the probe fails while it lasts.
    pub(super) async fn design_6_database_down_is_a_dependency_retry(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        let handler = handler(db);
        handler.probe().await.expect("database and recipients answer");
        db.store.close().await;
        let (outcome, logs, _guard) = handle_logged(
            &handler,
            step_result_message(&request.id, "submitted", Some("in_review")),
        )
        .await;
        assert!(
            matches!(&outcome, Outcome::Retry { cause: RetryCause::Dependency, .. }),
            "{outcome:?}"
        );
        only_error(&logs, "State Store endpoint is not responding");
        assert!(handler.probe().await.is_err());
    }

    /// Ensures that events go to the configured queues and that an empty recipient
    /// configuration sends an empty map.
    pub(super) async fn events_use_configured_queues(db: &TestDb) {
        let (_, request) = setup(db, S::Submitted).await;
        let handler =
            AirlockStatusHandler::new(db.store.clone(), Arc::new(StaticRecipients::none()))
                .with_queue("results")
                .with_airlock_queues(AirlockQueues {
                    status_changed: "changed".to_owned(),
                    notification: "notify".to_owned(),
                });
        let outcome = handle(
            &handler,
            step_result_message(&request.id, "submitted", Some("blocking_in_progress")),
        )
        .await;
        assert_eq!(outcome, Outcome::Complete);
        let events = outbox_for(&db.store, &request.id).await;
        let queues: Vec<_> = events.iter().map(|(row, _)| row.message.queue.as_str()).collect();
        assert_eq!(queues, ["changed", "notify"]);
        assert_eq!(events[1].1["data"]["recipient_emails_by_role"], json!({}));
    }
}

db_test!(
    tre_10_2_01_good_message_moves_the_request,
    tre_10_2_01_good_message_moves_the_request_postgres,
    cases::tre_10_2_01_good_message_moves_the_request
);
db_test!(
    tre_10_2_02_bad_json_and_bad_schema_are_dead_lettered,
    tre_10_2_02_bad_json_and_bad_schema_are_dead_lettered_postgres,
    cases::tre_10_2_02_bad_json_and_bad_schema_are_dead_lettered
);
db_test!(
    tre_10_2_03_request_not_found_completes,
    tre_10_2_03_request_not_found_completes_postgres,
    cases::tre_10_2_03_request_not_found_completes
);
db_test!(
    tre_10_2_04_database_error_retries,
    tre_10_2_04_database_error_retries_postgres,
    cases::tre_10_2_04_database_error_retries
);
db_test!(
    tre_10_2_05_status_mismatch_is_retried,
    tre_10_2_05_status_mismatch_is_retried_postgres,
    cases::tre_10_2_05_status_mismatch_is_retried
);
db_test!(
    tre_10_2_06_illegal_transition_is_dead_lettered,
    tre_10_2_06_illegal_transition_is_dead_lettered_postgres,
    cases::tre_10_2_06_illegal_transition_is_dead_lettered
);
db_test!(
    illegal_pair_is_dead_lettered_whatever_the_status,
    illegal_pair_is_dead_lettered_whatever_the_status_postgres,
    cases::illegal_pair_is_dead_lettered_whatever_the_status
);
db_test!(
    replayed_status_result_writes_one_event_pair,
    replayed_status_result_writes_one_event_pair_postgres,
    cases::replayed_status_result_writes_one_event_pair
);
db_test!(
    concurrent_duplicates_write_one_event_pair,
    concurrent_duplicates_write_one_event_pair_postgres,
    cases::concurrent_duplicates_write_one_event_pair
);
db_test!(
    files_only_result_updates_files_without_events,
    files_only_result_updates_files_without_events_postgres,
    cases::files_only_result_updates_files_without_events
);
db_test!(
    design_6_files_only_result_after_in_review_is_applied,
    design_6_files_only_result_after_in_review_is_applied_postgres,
    cases::design_6_files_only_result_after_in_review_is_applied
);
db_test!(
    files_only_result_for_a_later_status_is_retried,
    files_only_result_for_a_later_status_is_retried_postgres,
    cases::files_only_result_for_a_later_status_is_retried
);
db_test!(
    failure_result_sets_status_message_and_files,
    failure_result_sets_status_message_and_files_postgres,
    cases::failure_result_sets_status_message_and_files
);
db_test!(
    recipient_outage_is_a_dependency_retry,
    recipient_outage_is_a_dependency_retry_postgres,
    cases::recipient_outage_is_a_dependency_retry
);
db_test!(
    design_6_database_down_is_a_dependency_retry,
    design_6_database_down_is_a_dependency_retry_postgres,
    cases::design_6_database_down_is_a_dependency_retry
);
db_test!(
    events_use_configured_queues,
    events_use_configured_queues_postgres,
    cases::events_use_configured_queues
);
