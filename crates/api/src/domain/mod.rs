//! The TRE domain model: resources, operations, airlock requests, and the messages and
//! events on the wire, with TRE's camelCase names and values.

pub mod airlock;
pub mod events;
pub mod messages;
pub mod operation;
pub mod resource;
pub mod status;

pub use airlock::{
    AirlockFile, AirlockRequest, AirlockRequestHistoryItem, AirlockRequestStatus,
    AirlockRequestType, AirlockReview, AirlockReviewDecision, ReviewUserResource,
};
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
pub use resource::{Properties, Resource, ResourceHistoryItem, ResourceKind, ResourcePatch, User};
pub use status::{ResourceType, Status, UnknownValue, action};
