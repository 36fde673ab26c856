//! Airlock request rules (reference §5.6, §7.3, §10.6): creation as a draft, submit,
//! review and cancel, each change checked against the transition table, recorded in the
//! request's history and, when the status changes, announced with `statusChanged` and
//! `airlockNotification` events written to the outbox in the same transaction.

use std::collections::BTreeMap;

use crate::domain::{
    AirlockFile, AirlockRequest, AirlockRequestHistoryItem, AirlockRequestStatus,
    AirlockRequestType, AirlockReview, AirlockReviewDecision, Properties, ResourceType,
    ReviewUserResource, User, airlock_notification_event, status_changed_event,
};
use crate::domain::{new_id, queues};
use crate::storage::{OutboxMessage, StoreError, Tx};

/// TRE's answer to an illegal status change (HTTP 400). TRE log string: verbatim.
pub const ILLEGAL_STATUS_CHANGE: &str = "Airlock request status change was illegal";

/// Where airlock events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AirlockQueues {
    /// `statusChanged` events (`STEWARD_AIRLOCK_STATUS_CHANGED_QUEUE`).
    pub status_changed: String,
    /// `airlockNotification` events (`STEWARD_AIRLOCK_NOTIFICATION_QUEUE`).
    pub notification: String,
}

impl Default for AirlockQueues {
    fn default() -> Self {
        AirlockQueues {
            status_changed: queues::AIRLOCK_STATUS_CHANGED.to_owned(),
            notification: queues::AIRLOCK_NOTIFICATION.to_owned(),
        }
    }
}

/// Why an airlock change was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AirlockError {
    /// The transition table does not allow this change; HTTP 400 with
    /// [`ILLEGAL_STATUS_CHANGE`].
    #[error("airlock request status change from {from} to {to} is illegal")]
    IllegalStatusChange {
        /// The current status.
        from: AirlockRequestStatus,
        /// The status asked for.
        to: AirlockRequestStatus,
    },
    /// The workspace does not exist or is not a workspace.
    #[error("workspace {id} does not exist")]
    WorkspaceNotFound {
        /// The workspace id.
        id: String,
    },
    /// An event could not be serialized.
    #[error("cannot serialize the airlock event")]
    Encode(#[source] serde_json::Error),
    /// The database failed, or the request is missing or changed twice.
    #[error("storage failed")]
    Store(#[from] StoreError),
}

impl AirlockError {
    /// Whether the request was wrong (HTTP 400, or 404 for
    /// [`is_not_found`](Self::is_not_found)).
    #[must_use]
    pub fn is_client_error(&self) -> bool {
        match self {
            AirlockError::IllegalStatusChange { .. } | AirlockError::WorkspaceNotFound { .. } => {
                true
            }
            AirlockError::Store(error) => error.is_not_found(),
            AirlockError::Encode(_) => false,
        }
    }

    /// Whether the airlock request does not exist.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, AirlockError::Store(error) if error.is_not_found())
    }

    /// Whether the database is unreachable, so the same request may succeed later.
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AirlockError::Store(error) if error.is_unavailable())
    }
}

/// Checks a status change against the transition table (TRE `validate_status_update`).
///
/// # Errors
///
/// [`AirlockError::IllegalStatusChange`] for every pair the table does not list,
/// including a same-status change.
pub fn validate_status_change(
    from: AirlockRequestStatus,
    to: AirlockRequestStatus,
) -> Result<(), AirlockError> {
    if from.can_change_to(to) {
        Ok(())
    } else {
        Err(AirlockError::IllegalStatusChange { from, to })
    }
}

/// A new airlock request (the body of `POST /api/airlock-requests`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAirlockRequest {
    /// The workspace.
    pub workspace_id: String,
    /// Import or export.
    pub request_type: AirlockRequestType,
    /// A title; TRE's default `"Airlock Request"` when `None`.
    pub title: Option<String>,
    /// Why; TRE's default `"Business Justification"` when `None`.
    pub business_justification: Option<String>,
}

/// A change to an airlock request (the arguments of TRE's `update_airlock_request`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AirlockUpdate {
    /// The status to move to, validated against the transition table.
    pub new_status: Option<AirlockRequestStatus>,
    /// Replaces the files (not merged).
    pub request_files: Option<Vec<AirlockFile>>,
    /// Replaces the status message.
    pub status_message: Option<String>,
    /// A review to add.
    pub airlock_review: Option<AirlockReview>,
    /// A review user resource for the updating user (dropped on the etag retry, as TRE
    /// drops it).
    pub review_user_resource: Option<ReviewUserResource>,
}

/// Creates a draft request in an existing workspace.
///
/// # Errors
///
/// [`AirlockError::WorkspaceNotFound`], or a store error.
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn create_request(
    tx: &mut Tx,
    new: NewAirlockRequest,
    user: &User,
) -> Result<AirlockRequest, AirlockError> {
    match tx.read().find_resource(&new.workspace_id).await? {
        Some(workspace)
            if workspace.resource_type() == ResourceType::Workspace && !workspace.is_deleted() => {}
        _ => return Err(AirlockError::WorkspaceNotFound { id: new.workspace_id }),
    }
    let now = tx.now();
    let request = AirlockRequest {
        id: new_id(),
        resource_version: 0,
        created_by: user.clone(),
        created_when: Some(now),
        updated_by: user.clone(),
        updated_when: now,
        history: Vec::new(),
        workspace_id: new.workspace_id,
        request_type: Some(new.request_type),
        files: Vec::new(),
        title: new.title.unwrap_or_else(|| "Airlock Request".to_owned()),
        business_justification: new
            .business_justification
            .unwrap_or_else(|| "Business Justification".to_owned()),
        status: AirlockRequestStatus::Draft,
        status_message: None,
        reviews: None,
        etag: String::new(),
        review_user_resources: BTreeMap::new(),
    };
    Ok(tx.insert_airlock_request(&request).await?)
}

/// The request after `update` (TRE `_update_one_airlock_request_item`): the status
/// validated and set, files and message replaced, the review added, a history item
/// `{previousStatus}` for the version before, `resourceVersion + 1`, `updatedBy` and
/// `updatedWhen` stamped.
///
/// # Errors
///
/// [`AirlockError::IllegalStatusChange`].
pub fn apply_update(
    original: &AirlockRequest,
    update: &AirlockUpdate,
    updated_by: &User,
    now: f64,
) -> Result<AirlockRequest, AirlockError> {
    let mut updated = original.clone();
    if let Some(new_status) = update.new_status {
        validate_status_change(original.status, new_status)?;
        updated.status = new_status;
    }
    if let Some(message) = &update.status_message {
        updated.status_message = Some(message.clone());
    }
    if let Some(files) = &update.request_files {
        updated.files.clone_from(files);
    }
    if let Some(review) = &update.airlock_review {
        updated.reviews.get_or_insert_with(Vec::new).push(review.clone());
    }
    if let Some(review_user_resource) = &update.review_user_resource {
        updated.review_user_resources.insert(updated_by.id.clone(), review_user_resource.clone());
    }
    let mut properties = Properties::new();
    properties.insert("previousStatus".to_owned(), original.status.as_str().into());
    updated.history.push(AirlockRequestHistoryItem {
        resource_version: original.resource_version,
        updated_when: original.updated_when,
        updated_by: original.updated_by.clone(),
        properties,
    });
    updated.resource_version += 1;
    updated.updated_by = updated_by.clone();
    updated.updated_when = now;
    Ok(updated)
}

/// Reading and compare-and-swap writing of airlock requests: the [`Tx`] methods, or a
/// double in tests of the retry rule.
pub(crate) trait RequestStore {
    async fn read(&mut self, id: &str) -> Result<AirlockRequest, StoreError>;
    async fn replace(&mut self, request: &AirlockRequest) -> Result<AirlockRequest, StoreError>;
    fn now(&self) -> f64;
}

impl RequestStore for Tx {
    async fn read(&mut self, id: &str) -> Result<AirlockRequest, StoreError> {
        self.read().airlock_request(id).await
    }

    async fn replace(&mut self, request: &AirlockRequest) -> Result<AirlockRequest, StoreError> {
        self.replace_airlock_request(request).await
    }

    fn now(&self) -> f64 {
        Tx::now(self)
    }
}

/// TRE's retry rule: on an etag mismatch, re-read and rebuild once (without the review
/// user resource); a second mismatch propagates.
pub(crate) async fn update_with_retry(
    store: &mut impl RequestStore,
    original: &AirlockRequest,
    updated_by: &User,
    update: AirlockUpdate,
) -> Result<AirlockRequest, AirlockError> {
    let updated = apply_update(original, &update, updated_by, store.now())?;
    match store.replace(&updated).await {
        Err(error) if error.is_etag_mismatch() => {
            tracing::debug!(airlock_request_id = %original.id, "etag mismatch, retrying the airlock update once");
            let fresh = store.read(&original.id).await?;
            let retry = AirlockUpdate { review_user_resource: None, ..update };
            let updated = apply_update(&fresh, &retry, updated_by, store.now())?;
            Ok(store.replace(&updated).await?)
        }
        other => Ok(other?),
    }
}

/// Changes an airlock request (TRE `update_airlock_request`), retrying once on an etag
/// mismatch. Writes no events; see [`update_and_publish`].
///
/// # Errors
///
/// [`AirlockError::IllegalStatusChange`], or a store error (a second etag mismatch
/// included).
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn update_request(
    tx: &mut Tx,
    original: &AirlockRequest,
    updated_by: &User,
    update: AirlockUpdate,
) -> Result<AirlockRequest, AirlockError> {
    update_with_retry(tx, original, updated_by, update).await
}

/// TRE's `update_and_publish_event_airlock_request`: changes the request and, when the
/// status changed, writes `statusChanged` (previous status = `original.status`) and
/// `airlockNotification` to the outbox in the same transaction (DESIGN §6: no event is
/// lost after the commit).
///
/// `recipient_emails_by_role` fills the notification (TRE reads it from Microsoft
/// Graph).
///
/// # Errors
///
/// As [`update_request`], plus a store error writing the events.
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn update_and_publish(
    tx: &mut Tx,
    queues: &AirlockQueues,
    original: &AirlockRequest,
    updated_by: &User,
    update: AirlockUpdate,
    recipient_emails_by_role: BTreeMap<String, Vec<String>>,
) -> Result<AirlockRequest, AirlockError> {
    let status_changes = update.new_status.is_some();
    let updated = update_request(tx, original, updated_by, update).await?;
    if !status_changes {
        return Ok(updated);
    }
    let previous = updated
        .history
        .last()
        .and_then(|item| item.properties.get("previousStatus"))
        .and_then(|status| status.as_str())
        .and_then(|status| status.parse().ok())
        .unwrap_or(original.status);
    let workspace = tx
        .read()
        .find_resource(&updated.workspace_id)
        .await?
        .ok_or_else(|| AirlockError::WorkspaceNotFound { id: updated.workspace_id.clone() })?;
    let now = tx.now();
    let status_changed = status_changed_event(&updated, Some(previous), new_id(), now);
    let notification =
        airlock_notification_event(&updated, &workspace, recipient_emails_by_role, new_id(), now);
    for message in [
        OutboxMessage::json(&queues.status_changed, &status_changed, &updated.id),
        OutboxMessage::json(&queues.notification, &notification, &updated.id),
    ] {
        let message = message.map_err(AirlockError::Encode)?.with_correlation_id(&updated.id);
        tx.insert_outbox(message).await?;
    }
    tracing::info!(
        airlock_request_id = %updated.id,
        previous_status = %previous,
        new_status = %updated.status,
        "airlock request status changed"
    );
    Ok(updated)
}

/// Submits a draft request (`draft → submitted`) and publishes the change.
///
/// # Errors
///
/// As [`update_and_publish`]; a request not in `draft` is an illegal change.
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn submit(
    tx: &mut Tx,
    queues: &AirlockQueues,
    id: &str,
    user: &User,
) -> Result<AirlockRequest, AirlockError> {
    change_status(tx, queues, id, user, AirlockRequestStatus::Submitted, None).await
}

/// Cancels a request (`draft` or `in_review` → `cancelled`) and publishes the change.
///
/// # Errors
///
/// As [`update_and_publish`]; other statuses are an illegal change.
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn cancel(
    tx: &mut Tx,
    queues: &AirlockQueues,
    id: &str,
    user: &User,
) -> Result<AirlockRequest, AirlockError> {
    change_status(tx, queues, id, user, AirlockRequestStatus::Cancelled, None).await
}

/// Reviews a request in review: adds an [`AirlockReview`] by `user` and moves
/// `approved → approval_in_progress` or `rejected → rejection_in_progress`, then
/// publishes the change.
///
/// # Errors
///
/// As [`update_and_publish`]; a request not in review is an illegal change.
///
/// # Cancellation safety
///
/// Cancel safe: nothing is committed; a dropped transaction rolls back.
pub async fn review(
    tx: &mut Tx,
    queues: &AirlockQueues,
    id: &str,
    user: &User,
    decision: AirlockReviewDecision,
    explanation: &str,
) -> Result<AirlockRequest, AirlockError> {
    let original = tx.read().airlock_request(id).await?;
    let to = decision.next_status();
    let review = AirlockReview {
        id: new_id(),
        reviewer: user.clone(),
        date_created: tx.now(),
        review_decision: decision,
        decision_explanation: explanation.to_owned(),
    };
    let update = AirlockUpdate {
        new_status: Some(to),
        airlock_review: Some(review),
        ..AirlockUpdate::default()
    };
    update_and_publish(tx, queues, &original, user, update, BTreeMap::new()).await
}

async fn change_status(
    tx: &mut Tx,
    queues: &AirlockQueues,
    id: &str,
    user: &User,
    to: AirlockRequestStatus,
    status_message: Option<String>,
) -> Result<AirlockRequest, AirlockError> {
    let original = tx.read().airlock_request(id).await?;
    let update = AirlockUpdate { new_status: Some(to), status_message, ..AirlockUpdate::default() };
    update_and_publish(tx, queues, &original, user, update, BTreeMap::new()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Entity;

    /// A request store whose every write loses the etag race.
    struct AlwaysChanged {
        request: AirlockRequest,
        reads: u32,
        replaces: u32,
    }

    impl RequestStore for AlwaysChanged {
        async fn read(&mut self, _id: &str) -> Result<AirlockRequest, StoreError> {
            self.reads += 1;
            Ok(self.request.clone())
        }

        async fn replace(
            &mut self,
            request: &AirlockRequest,
        ) -> Result<AirlockRequest, StoreError> {
            self.replaces += 1;
            Err(StoreError::EtagMismatch { entity: Entity::AirlockRequest, id: request.id.clone() })
        }

        fn now(&self) -> f64 {
            1.0
        }
    }

    /// Ensures that (reference §10.6) the airlock update retries an etag mismatch
    /// exactly once: one re-read, two writes, then the mismatch propagates.
    #[tokio::test]
    async fn tre_10_6_03_second_etag_mismatch_propagates() {
        let request: AirlockRequest =
            serde_json::from_value(serde_json::json!({"id": "a1"})).unwrap();
        let mut store = AlwaysChanged { request: request.clone(), reads: 0, replaces: 0 };
        let update = AirlockUpdate {
            new_status: Some(AirlockRequestStatus::Submitted),
            ..AirlockUpdate::default()
        };
        let error =
            update_with_retry(&mut store, &request, &User::default(), update).await.unwrap_err();
        assert!(matches!(&error, AirlockError::Store(e) if e.is_etag_mismatch()), "{error:?}");
        assert_eq!((store.reads, store.replaces), (1, 2));
    }

    /// Ensures that the pure update keeps TRE's bookkeeping: history of the previous
    /// version, version bump, stamps, files replaced, message set, review appended.
    #[test]
    fn apply_update_records_history_and_stamps() {
        let original: AirlockRequest = serde_json::from_value(serde_json::json!({
            "id": "a1", "status": "in_review", "resourceVersion": 4, "updatedWhen": 10.0,
            "updatedBy": {"id": "old"}, "files": [{"name": "a", "size": 1}]
        }))
        .unwrap();
        let review = AirlockReview {
            id: "r".to_owned(),
            reviewer: User::new("rev", "Rev", "r@x"),
            date_created: 20.0,
            review_decision: AirlockReviewDecision::Approved,
            decision_explanation: "ok".to_owned(),
        };
        let update = AirlockUpdate {
            new_status: Some(AirlockRequestStatus::ApprovalInProgress),
            request_files: Some(vec![AirlockFile { name: "b".to_owned(), size: 2.0 }]),
            status_message: Some("m".to_owned()),
            airlock_review: Some(review.clone()),
            review_user_resource: None,
        };
        let updated =
            apply_update(&original, &update, &User::new("rev", "Rev", "r@x"), 20.0).unwrap();
        assert_eq!(updated.status, AirlockRequestStatus::ApprovalInProgress);
        assert_eq!((updated.resource_version, updated.updated_when), (5, 20.0));
        assert_eq!(updated.updated_by.id, "rev");
        assert_eq!(updated.files, vec![AirlockFile { name: "b".to_owned(), size: 2.0 }]);
        assert_eq!(updated.status_message.as_deref(), Some("m"));
        assert_eq!(updated.reviews, Some(vec![review]));
        let item = &updated.history[0];
        assert_eq!(
            (item.resource_version, item.updated_when, item.updated_by.id.as_str()),
            (4, 10.0, "old")
        );
        assert_eq!(item.properties["previousStatus"], "in_review");
    }
}
