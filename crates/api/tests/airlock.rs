//! Airlock rules: every case runs on SQLite and on PostgreSQL (`*_postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use steward_api::domain::{
    AirlockFile, AirlockRequest, AirlockRequestStatus as S, AirlockRequestType,
    AirlockReviewDecision, Resource, ResourceKind, ReviewUserResource, Status, User,
};
use steward_api::rules::airlock::{
    self, AirlockError, AirlockQueues, AirlockUpdate, NewAirlockRequest,
};
use steward_api::storage::Store;
use support::{NOW, user, workspace_props};

/// The transition table of reference §5.6, written out again so the test does not
/// trust the code it checks.
const ALLOWED: &[(S, S)] = &[
    (S::Draft, S::Submitted),
    (S::Draft, S::Cancelled),
    (S::Draft, S::Failed),
    (S::Submitted, S::InReview),
    (S::Submitted, S::BlockingInProgress),
    (S::Submitted, S::Failed),
    (S::InReview, S::ApprovalInProgress),
    (S::InReview, S::RejectionInProgress),
    (S::InReview, S::Cancelled),
    (S::InReview, S::Failed),
    (S::ApprovalInProgress, S::Approved),
    (S::ApprovalInProgress, S::Failed),
    (S::RejectionInProgress, S::Rejected),
    (S::RejectionInProgress, S::Failed),
    (S::BlockingInProgress, S::BlockedByScan),
    (S::BlockingInProgress, S::Failed),
    (S::Approved, S::Revoked),
];

mod cases {
    use super::*;

    pub(super) async fn workspace(store: &Store) -> Resource {
        let mut tx = store.begin().await.unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        let workspace = tx
            .insert_resource(&Resource {
                id: id.clone(),
                template_name: "tre-workspace-base".to_owned(),
                template_version: "1.0.0".to_owned(),
                properties: workspace_props(),
                available_upgrades: None,
                is_enabled: true,
                kind: ResourceKind::Workspace { workspace_url: String::new() },
                deployment_status: Some(Status::Deployed),
                etag: String::new(),
                resource_path: format!("/workspaces/{id}"),
                resource_version: 0,
                user: user(),
                updated_when: NOW,
            })
            .await
            .unwrap();
        tx.commit().await.unwrap();
        workspace
    }

    pub(super) async fn request_in(
        store: &Store,
        workspace: &Resource,
        status: S,
    ) -> AirlockRequest {
        let mut tx = store.begin().await.unwrap();
        let new = NewAirlockRequest {
            workspace_id: workspace.id.clone(),
            request_type: AirlockRequestType::Import,
            title: None,
            business_justification: None,
        };
        let mut request = airlock::create_request(&mut tx, new, &user()).await.unwrap();
        if status != S::Draft {
            request.status = status;
            request = tx.replace_airlock_request(&request).await.unwrap();
        }
        tx.commit().await.unwrap();
        request
    }

    /// Ensures that (reference §10.6) for every pair of statuses an allowed change is
    /// applied with a history item, and every other change is refused and writes
    /// nothing.
    pub(super) async fn tre_10_6_01_every_status_pair_follows_the_transition_table(store: &Store) {
        let ws = workspace(store).await;
        let reviewer = User::new("u2", "Rev", "rev@example.com");
        let mut applied = 0;
        for from in S::ALL {
            for to in S::ALL {
                let original = request_in(store, &ws, from).await;
                let mut tx = store.begin().await.unwrap();
                let update = AirlockUpdate { new_status: Some(to), ..AirlockUpdate::default() };
                let result = airlock::update_request(&mut tx, &original, &reviewer, update).await;
                tx.commit().await.unwrap();
                let stored = store.read().airlock_request(&original.id).await.unwrap();
                if ALLOWED.contains(&(from, to)) {
                    let updated =
                        result.unwrap_or_else(|error| panic!("{from} -> {to}: {error:?}"));
                    applied += 1;
                    assert_eq!(updated, stored);
                    assert_eq!(stored.status, to);
                    assert_eq!(stored.resource_version, original.resource_version + 1);
                    assert_eq!(stored.updated_by, reviewer);
                    assert_eq!(stored.history.len(), 1);
                    assert_eq!(stored.history[0].properties["previousStatus"], from.as_str());
                    assert_eq!(stored.history[0].updated_by, original.updated_by);
                    assert_eq!(stored.history[0].resource_version, original.resource_version);
                } else {
                    let error = result.unwrap_err();
                    assert!(
                        matches!(error, AirlockError::IllegalStatusChange { from: f, to: t } if f == from && t == to),
                        "{from} -> {to}: {error:?}"
                    );
                    assert!(error.is_client_error());
                    assert_eq!(stored, original, "{from} -> {to} must write nothing");
                }
            }
        }
        assert_eq!(applied, ALLOWED.len());
        assert_eq!(airlock::ILLEGAL_STATUS_CHANGE, "Airlock request status change was illegal");
    }

    /// Ensures that (reference §10.6) an update from a stale copy retries once: it
    /// re-reads, rebuilds from the current request (dropping the review user resource,
    /// as TRE does) and applies; and that the rebuilt change is validated again.
    pub(super) async fn tre_10_6_02_etag_mismatch_retries_once(store: &Store) {
        let ws = workspace(store).await;
        let stale = request_in(store, &ws, S::Draft).await;
        let files = vec![AirlockFile { name: "data.csv".to_owned(), size: 10.0 }];
        let mut tx = store.begin().await.unwrap();
        let update =
            AirlockUpdate { request_files: Some(files.clone()), ..AirlockUpdate::default() };
        airlock::update_request(&mut tx, &stale, &user(), update).await.unwrap();
        let update = AirlockUpdate {
            new_status: Some(S::Submitted),
            review_user_resource: Some(ReviewUserResource {
                workspace_id: "w".to_owned(),
                workspace_service_id: "s".to_owned(),
                user_resource_id: "v".to_owned(),
            }),
            ..AirlockUpdate::default()
        };
        let updated = airlock::update_request(&mut tx, &stale, &user(), update).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(updated.status, S::Submitted);
        assert_eq!(updated.files, files, "the concurrent change is kept");
        assert_eq!(updated.resource_version, 2);
        assert_eq!(updated.history.len(), 2);
        assert!(updated.review_user_resources.is_empty(), "dropped on the retry");
        assert_eq!(store.read().airlock_request(&stale.id).await.unwrap(), updated);

        // The retry validates against the current status: submitted -> cancelled is illegal.
        let mut tx = store.begin().await.unwrap();
        let update = AirlockUpdate { new_status: Some(S::Cancelled), ..AirlockUpdate::default() };
        let error = airlock::update_request(&mut tx, &stale, &user(), update).await.unwrap_err();
        assert!(
            matches!(
                error,
                AirlockError::IllegalStatusChange { from: S::Submitted, to: S::Cancelled }
            ),
            "{error:?}"
        );
    }

    fn events(
        store_rows: &[steward_api::storage::OutboxRecord],
        request_id: &str,
    ) -> Vec<(String, Value)> {
        store_rows
            .iter()
            .filter(|row| row.message.aggregate_id == request_id)
            .map(|row| {
                (
                    row.message.queue.clone(),
                    serde_json::from_slice(&row.message.outgoing.body).unwrap(),
                )
            })
            .collect()
    }

    /// Ensures that create, submit, review and cancel follow TRE's rules and that each
    /// status change writes `statusChanged` and `airlockNotification` to the outbox.
    pub(super) async fn lifecycle_writes_status_events(store: &Store) {
        let ws = workspace(store).await;
        let queues = AirlockQueues::default();
        let mut tx = store.begin().await.unwrap();
        let new = NewAirlockRequest {
            workspace_id: ws.id.clone(),
            request_type: AirlockRequestType::Export,
            title: Some("Results".to_owned()),
            business_justification: None,
        };
        let created = airlock::create_request(&mut tx, new, &user()).await.unwrap();
        assert_eq!(created.status, S::Draft);
        assert_eq!(created.title, "Results");
        assert_eq!(created.business_justification, "Business Justification");
        assert_eq!(
            (created.created_by.clone(), created.created_when),
            (user(), Some(created.updated_when))
        );

        let submitted = airlock::submit(&mut tx, &queues, &created.id, &user()).await.unwrap();
        assert_eq!(submitted.status, S::Submitted);
        let reviewer = User::new("u2", "Rev", "rev@example.com");
        let error = airlock::review(
            &mut tx,
            &queues,
            &created.id,
            &reviewer,
            AirlockReviewDecision::Approved,
            "ok",
        )
        .await
        .unwrap_err();
        assert!(
            matches!(error, AirlockError::IllegalStatusChange { from: S::Submitted, .. }),
            "{error:?}"
        );

        // The processor's step result: files first (no event), then in_review.
        let files = vec![AirlockFile { name: "out.csv".to_owned(), size: 2048.0 }];
        let files_only =
            AirlockUpdate { request_files: Some(files.clone()), ..AirlockUpdate::default() };
        let current = tx.read().airlock_request(&created.id).await.unwrap();
        let with_files = airlock::update_and_publish(
            &mut tx,
            &queues,
            &current,
            &current.updated_by,
            files_only,
            BTreeMap::new(),
        )
        .await
        .unwrap();
        assert_eq!((with_files.status, &with_files.files), (S::Submitted, &files));
        let to_review = AirlockUpdate { new_status: Some(S::InReview), ..AirlockUpdate::default() };
        let recipients =
            BTreeMap::from([("airlock_manager".to_owned(), vec!["rev@example.com".to_owned()])]);
        airlock::update_and_publish(
            &mut tx,
            &queues,
            &with_files,
            &with_files.updated_by,
            to_review,
            recipients,
        )
        .await
        .unwrap();

        let approved = airlock::review(
            &mut tx,
            &queues,
            &created.id,
            &reviewer,
            AirlockReviewDecision::Approved,
            "fine",
        )
        .await
        .unwrap();
        assert_eq!(approved.status, S::ApprovalInProgress);
        let review = &approved.reviews.as_ref().unwrap()[0];
        assert_eq!(
            (review.reviewer.clone(), review.review_decision),
            (reviewer.clone(), AirlockReviewDecision::Approved)
        );
        assert_eq!(review.decision_explanation, "fine");
        let error = airlock::cancel(&mut tx, &queues, &created.id, &user()).await.unwrap_err();
        assert!(matches!(error, AirlockError::IllegalStatusChange { .. }), "{error:?}");
        tx.commit().await.unwrap();

        let stored = store.read().airlock_request(&created.id).await.unwrap();
        let previous: Vec<&Value> =
            stored.history.iter().map(|item| &item.properties["previousStatus"]).collect();
        assert_eq!(
            previous,
            [&json!("draft"), &json!("submitted"), &json!("submitted"), &json!("in_review")]
        );

        let rows = store.outbox_messages(100).await.unwrap();
        let sent = events(&rows, &created.id);
        let kinds: Vec<(&str, &str, &str)> = sent
            .iter()
            .map(|(queue, body)| {
                (
                    queue.as_str(),
                    body["eventType"].as_str().unwrap(),
                    body["data"]["new_status"]
                        .as_str()
                        .or(body["data"]["request"]["status"].as_str())
                        .unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("airlock-status-changed", "statusChanged", "submitted"),
                ("airlock-notification", "airlockNotification", "submitted"),
                ("airlock-status-changed", "statusChanged", "in_review"),
                ("airlock-notification", "airlockNotification", "in_review"),
                ("airlock-status-changed", "statusChanged", "approval_in_progress"),
                ("airlock-notification", "airlockNotification", "approval_in_progress"),
            ]
        );
        let status_changed = &sent[0].1;
        assert_eq!(status_changed["dataVersion"], "2.0");
        assert_eq!(status_changed["subject"], format!("{}/statusChanged", created.id));
        assert_eq!(status_changed["data"]["previous_status"], "draft");
        assert_eq!(status_changed["data"]["type"], "export");
        assert_eq!(status_changed["data"]["workspace_id"], ws.id[ws.id.len() - 4..]);
        assert_eq!(sent[2].1["data"]["previous_status"], "submitted");
        let notification = &sent[3].1;
        assert_eq!(notification["dataVersion"], "4.0");
        assert_eq!(notification["data"]["workspace"]["display_name"], "Genomics");
        assert_eq!(
            notification["data"]["recipient_emails_by_role"]["airlock_manager"],
            json!(["rev@example.com"])
        );
        assert_eq!(
            notification["data"]["request"]["files"],
            json!([{"name": "out.csv", "size": 2048}])
        );
        assert!(
            rows.iter().filter(|row| row.message.aggregate_id == created.id).all(|row| row
                .message
                .outgoing
                .session_id
                .is_none())
        );
    }

    /// Ensures that a rejection moves to `rejection_in_progress`, a draft can be
    /// cancelled, and a request needs an existing workspace.
    pub(super) async fn reject_cancel_and_missing_workspace(store: &Store) {
        let ws = workspace(store).await;
        let queues = AirlockQueues::default();
        let in_review = request_in(store, &ws, S::InReview).await;
        let draft = request_in(store, &ws, S::Draft).await;
        let mut tx = store.begin().await.unwrap();
        let rejected = airlock::review(
            &mut tx,
            &queues,
            &in_review.id,
            &user(),
            AirlockReviewDecision::Rejected,
            "no",
        )
        .await
        .unwrap();
        assert_eq!(rejected.status, S::RejectionInProgress);
        let cancelled = airlock::cancel(&mut tx, &queues, &draft.id, &user()).await.unwrap();
        assert_eq!(cancelled.status, S::Cancelled);
        let new = NewAirlockRequest {
            workspace_id: "missing".to_owned(),
            request_type: AirlockRequestType::Import,
            title: None,
            business_justification: None,
        };
        let error = airlock::create_request(&mut tx, new, &user()).await.unwrap_err();
        assert!(
            matches!(error, AirlockError::WorkspaceNotFound { .. }) && error.is_client_error(),
            "{error:?}"
        );
        let error = airlock::submit(&mut tx, &queues, "missing", &user()).await.unwrap_err();
        assert!(error.is_not_found(), "{error:?}");
        tx.commit().await.unwrap();
        assert_eq!(store.read().airlock_request(&draft.id).await.unwrap().status, S::Cancelled);
    }
}

db_test!(
    tre_10_6_01_every_status_pair_follows_the_transition_table,
    tre_10_6_01_every_status_pair_follows_the_transition_table_postgres,
    cases::tre_10_6_01_every_status_pair_follows_the_transition_table
);
db_test!(
    tre_10_6_02_etag_mismatch_retries_once,
    tre_10_6_02_etag_mismatch_retries_once_postgres,
    cases::tre_10_6_02_etag_mismatch_retries_once
);
db_test!(
    lifecycle_writes_status_events_sqlite,
    lifecycle_writes_status_events_postgres,
    cases::lifecycle_writes_status_events
);
db_test!(
    reject_cancel_and_missing_workspace_sqlite,
    reject_cancel_and_missing_workspace_postgres,
    cases::reject_cancel_and_missing_workspace
);
