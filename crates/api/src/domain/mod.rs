//! The TRE domain model: resources, operations, airlock requests, and the messages and
//! events on the wire, with TRE's camelCase names and values.

mod airlock;
mod clock;
mod events;
mod messages;
mod operation;
pub mod queues;
mod resource;
mod roles;
mod status;

pub use airlock::{
    AirlockFile, AirlockRequest, AirlockRequestHistoryItem, AirlockRequestStatus,
    AirlockRequestType, AirlockReview, AirlockReviewDecision, ReviewUserResource,
};
pub use clock::Clock;
pub use events::{
    AirlockNotificationData, AirlockNotificationEvent, EventGridEvent, NotificationRequest,
    NotificationUser, NotificationWorkspace, StatusChangedData, StatusChangedEvent,
    airlock_notification_event, rfc3339_utc, status_changed_event,
};
pub use messages::{
    DeploymentStatusUpdate, NotUuid4, Output, OutputError, ResourceRequest, StepResultData,
    StepResultEvent, Uuid4, outputs_to_properties,
};
pub use operation::{MAIN_STEP_ID, Operation, OperationStep};
pub use resource::{
    Properties, Resource, ResourceHistoryItem, ResourceKind, ResourcePatch, ResourceType, User,
};
pub use roles::WorkspaceRole;
pub use status::{Status, UnknownValue, action};

/// A new UUIDv4 string: the id of a new record, event or etag.
#[must_use]
pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
