//! Airlock requests, their statuses and the transition table (reference §5.6).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, Serializer};

use super::resource::{Properties, User};

named_enum! {
    /// The status of an airlock request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum AirlockRequestStatus: "airlock request status" {
        /// Being prepared by its creator.
        Draft => "draft",
        /// Submitted; the processor is checking the files.
        Submitted => "submitted",
        /// Waiting for a reviewer.
        InReview => "in_review",
        /// Approved; the files are being moved.
        ApprovalInProgress => "approval_in_progress",
        /// Approved and done.
        Approved => "approved",
        /// Rejected; the files are being moved.
        RejectionInProgress => "rejection_in_progress",
        /// Rejected and done.
        Rejected => "rejected",
        /// Cancelled by a user.
        Cancelled => "cancelled",
        /// The scan found a threat; the files are being moved.
        BlockingInProgress => "blocking_in_progress",
        /// Blocked by the scan.
        BlockedByScan => "blocked_by_scan",
        /// Processing failed.
        Failed => "failed",
        /// An approval was revoked.
        Revoked => "revoked",
    }
}

impl AirlockRequestStatus {
    /// The statuses a request in this status may move to (TRE
    /// `AirlockRequestRepository.validate_status_update`). Empty for final statuses.
    #[must_use]
    pub const fn allowed_next(self) -> &'static [AirlockRequestStatus] {
        use AirlockRequestStatus::*;
        match self {
            Draft => &[Submitted, Cancelled, Failed],
            Submitted => &[InReview, BlockingInProgress, Failed],
            InReview => &[ApprovalInProgress, RejectionInProgress, Cancelled, Failed],
            ApprovalInProgress => &[Approved, Failed],
            RejectionInProgress => &[Rejected, Failed],
            BlockingInProgress => &[BlockedByScan, Failed],
            Approved => &[Revoked],
            Rejected | BlockedByScan | Cancelled | Failed | Revoked => &[],
        }
    }

    /// Whether a request in this status may move to `next`. A same-status change is
    /// never allowed.
    #[must_use]
    pub fn can_change_to(self, next: AirlockRequestStatus) -> bool {
        self.allowed_next().contains(&next)
    }

    /// Whether no further change is allowed.
    #[must_use]
    pub const fn is_final(self) -> bool {
        self.allowed_next().is_empty()
    }
}

named_enum! {
    /// The direction of an airlock request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum AirlockRequestType {
        /// Data comes into the workspace.
        Import => "import",
        /// Data leaves the workspace.
        Export => "export",
    }
}

/// A file in an airlock request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AirlockFile {
    /// The file name.
    pub name: String,
    /// The size in bytes (a float in TRE; whole numbers are written without a fraction).
    #[serde(serialize_with = "whole_as_integer")]
    pub size: f64,
}

/// Writes whole numbers as JSON integers, so `1024` reads back as `1024`, not `1024.0`.
fn whole_as_integer<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if value.fract() == 0.0 && value.abs() <= MAX_EXACT {
        // Exact: a whole number within 2^53 converts to i64 without loss.
        #[allow(clippy::cast_possible_truncation)]
        let whole = *value as i64;
        serializer.serialize_i64(whole)
    } else {
        serializer.serialize_f64(*value)
    }
}

/// A reviewer's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AirlockReviewDecision {
    /// The request is approved.
    Approved,
    /// The request is rejected.
    Rejected,
    /// An earlier approval is revoked.
    Revoked,
}

impl AirlockReviewDecision {
    /// The status a request moves to after this decision.
    #[must_use]
    pub const fn next_status(self) -> AirlockRequestStatus {
        match self {
            AirlockReviewDecision::Approved => AirlockRequestStatus::ApprovalInProgress,
            AirlockReviewDecision::Rejected => AirlockRequestStatus::RejectionInProgress,
            AirlockReviewDecision::Revoked => AirlockRequestStatus::Revoked,
        }
    }
}

/// A review of an airlock request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AirlockReview {
    /// The review id.
    pub id: String,
    /// Who reviewed.
    #[serde(default)]
    pub reviewer: User,
    /// When, in POSIX seconds.
    pub date_created: f64,
    /// The decision.
    pub review_decision: AirlockReviewDecision,
    /// Why.
    pub decision_explanation: String,
}

/// One change of an airlock request: who and when before the change, and the previous
/// status in `properties.previousStatus`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AirlockRequestHistoryItem {
    /// The version before the change.
    pub resource_version: i64,
    /// When the previous version was written.
    pub updated_when: f64,
    /// Who wrote the previous version.
    #[serde(default)]
    pub updated_by: User,
    /// `{"previousStatus": <status before the change>}`.
    #[serde(default)]
    pub properties: Properties,
}

/// The user resource a reviewer uses to look at a request's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewUserResource {
    /// The review workspace.
    pub workspace_id: String,
    /// The workspace service.
    pub workspace_service_id: String,
    /// The user resource.
    pub user_resource_id: String,
}

fn default_title() -> String {
    "Airlock Request".to_owned()
}

fn default_justification() -> String {
    "Business Justification".to_owned()
}

fn default_airlock_status() -> AirlockRequestStatus {
    AirlockRequestStatus::Draft
}

/// A request to move data into or out of a workspace (container `Requests`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AirlockRequest {
    /// The request id.
    pub id: String,
    /// Incremented by every change.
    #[serde(default)]
    pub resource_version: i64,
    /// Who created it.
    #[serde(default)]
    pub created_by: User,
    /// When it was created, in POSIX seconds.
    #[serde(default)]
    pub created_when: Option<f64>,
    /// Who changed it last.
    #[serde(default)]
    pub updated_by: User,
    /// When it was changed last, in POSIX seconds.
    #[serde(default)]
    pub updated_when: f64,
    /// One item per change.
    #[serde(default)]
    pub history: Vec<AirlockRequestHistoryItem>,
    /// The workspace.
    #[serde(default)]
    pub workspace_id: String,
    /// Import or export (legacy requests may lack it).
    #[serde(rename = "type", default)]
    pub request_type: Option<AirlockRequestType>,
    /// The files.
    #[serde(default)]
    pub files: Vec<AirlockFile>,
    /// A title.
    #[serde(default = "default_title")]
    pub title: String,
    /// Why the data must move.
    #[serde(default = "default_justification")]
    pub business_justification: String,
    /// The status.
    #[serde(default = "default_airlock_status")]
    pub status: AirlockRequestStatus,
    /// A message about the status (a scan verdict, a failure reason).
    #[serde(default)]
    pub status_message: Option<String>,
    /// The reviews.
    #[serde(default)]
    pub reviews: Option<Vec<AirlockReview>>,
    /// The optimistic-concurrency tag; changes on every write.
    #[serde(rename = "_etag", alias = "etag", default)]
    pub etag: String,
    /// Review user resources, by reviewer id.
    #[serde(default)]
    pub review_user_resources: BTreeMap<String, ReviewUserResource>,
}
