//! The two status updaters of the service, as core [`Handler`](steward_core::Handler)s:
//!
//! - [`DeploymentStatusHandler`] consumes the resource processor's status reports
//!   (queue `deploymentstatus`, reference §6): step and operation statuses, outputs
//!   merged into properties, and the next pipeline step's resource request written to
//!   the outbox;
//! - [`AirlockStatusHandler`] consumes the airlock processor's step results (queue
//!   `airlock-step-result`, reference §7): the request's status, files and message, and
//!   the `statusChanged` and `airlockNotification` events written to the outbox.
//!
//! Both decide settlement as DESIGN §6 says where it differs from TRE (malformed
//! messages and unknown steps dead-lettered at once, database outages retried with the
//! worker's circuit breaker, ordering races retried with backoff), keep TRE's log
//! strings (reference §11, see [`tre`]) as log messages with the queue, message id and
//! operation or request id as fields, and are replay safe (DESIGN §5): handling a message
//! twice leaves one state change and one outbox row, and a late in-progress status
//! never overwrites a final one.
//!
//! # Examples
//!
//! Build both handlers for a service (the lead wires them into updaters):
//!
//! ```
//! use std::sync::Arc;
//! use steward_api::storage::Store;
//! use steward_api::templates::TemplateRegistry;
//! use steward_api::workers::{AirlockStatusHandler, DeploymentStatusHandler, StaticRecipients};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::connect(&format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display())).await?;
//! let templates = Arc::new(TemplateRegistry::builtin()?);
//!
//! let deployment = DeploymentStatusHandler::new(store.clone(), templates)
//!     .with_queue("deploymentstatus")
//!     .with_resource_request_queue("workspacequeue");
//! let recipients: StaticRecipients = "WorkspaceOwner=owner@example.com".parse()?;
//! let airlock = AirlockStatusHandler::new(store, Arc::new(recipients))
//!     .with_queue("airlock-step-result");
//! # let _ = (deployment, airlock);
//! # Ok(())
//! # }
//! ```

pub(super) mod airlock_status;
pub(super) mod deployment_status;
pub(super) mod recipients;

use steward_core::{Outcome, error_chain};

use crate::domain::UnknownValue;

pub use airlock_status::{AirlockStatusHandler, StepResult, parse_step_result};
pub use deployment_status::{DeploymentStatusHandler, parse_deployment_status};
pub use recipients::{
    RecipientError, RecipientProvider, RecipientSpecError, RecipientsByRole, StaticRecipients,
};

/// Dead-letter reasons the handlers give (DESIGN §6).
pub mod reason {
    /// The body is not JSON, or does not fit the message's schema.
    pub const MESSAGE_FORMAT_INCORRECT: &str = "MessageFormatIncorrect";
    /// A deployment status names a step (and resource) the operation does not have.
    pub const UNKNOWN_STEP: &str = "UnknownStep";
    /// An airlock step result asks for a change the transition table forbids.
    pub const ILLEGAL_STATUS_TRANSITION: &str = "IllegalStatusTransition";
}

/// TRE's log strings (reference §11 and the inline literals of the updaters), kept
/// verbatim so operators' log queries still match. Templates with `{}` are filled by
/// the functions below, in TRE's argument order.
pub mod tre {
    // TRE log string: verbatim
    /// `DEPLOYMENT_STATUS_MESSAGE_FORMAT_INCORRECT`.
    pub const DEPLOYMENT_STATUS_MESSAGE_FORMAT_INCORRECT: &str =
        "Service bus message is not formatted correctly";
    // TRE log string: verbatim
    /// `STEP_RESULT_MESSAGE_FORMAT_INCORRECT`.
    pub const STEP_RESULT_MESSAGE_FORMAT_INCORRECT: &str =
        "Service bus message of step result is not formatted correctly";
    // TRE log string: verbatim
    /// The deployment updater's generic failure.
    pub const FAILED_TO_UPDATE_STATUS: &str = "Failed to update status";
    // TRE log string: verbatim
    /// The airlock updater's generic failure.
    pub const FAILED_UPDATING_REQUEST_STATUS: &str = "Failed updating request status";
    // TRE log string: verbatim
    /// `STATE_STORE_ENDPOINT_NOT_RESPONDING`.
    pub const STATE_STORE_ENDPOINT_NOT_RESPONDING: &str = "State Store endpoint is not responding";
    // TRE log string: verbatim
    /// A pipeline's next step could not be prepared or queued.
    pub const UNABLE_TO_SEND_PIPELINE_STEP: &str =
        "Unable to send update for resource in pipeline step";
    // TRE log string: verbatim
    /// The operation message while a multi-step pipeline runs.
    pub const PIPELINE_RUNNING: &str = "Multi step pipeline running. See steps for details.";
    // TRE log string: verbatim
    /// The operation message when the last step of a pipeline succeeded.
    pub const PIPELINE_COMPLETED: &str = "Multi step pipeline completed successfully";

    /// `DEPLOYMENT_STATUS_ID_NOT_FOUND`.
    #[must_use]
    pub fn deployment_status_id_not_found(resource_id: &str) -> String {
        // TRE log string: verbatim
        format!("Service bus message refers to resource id = {resource_id} which does not exist")
    }

    /// `STEP_RESULT_ID_NOT_FOUND`.
    #[must_use]
    pub fn step_result_id_not_found(request_id: &str) -> String {
        // TRE log string: verbatim
        format!(
            "Service bus message of step result refers to resource id = {request_id} which does not exist"
        )
    }

    /// `STEP_RESULT_MESSAGE_STATUS_DOES_NOT_MATCH`.
    #[must_use]
    pub fn step_result_status_does_not_match(
        request_id: &str,
        completed_step: &str,
        stored_status: &str,
    ) -> String {
        // TRE log string: verbatim
        format!(
            "Service bus message of step result current status does not match the one in state store for request id = {request_id}, status in step result = {completed_step}, status in state store = {stored_status}"
        )
    }

    /// `STEP_RESULT_MESSAGE_INVALID_STATUS`.
    #[must_use]
    pub fn step_result_invalid_status(
        request_id: &str,
        current_status: &str,
        new_status: &str,
    ) -> String {
        // TRE log string: verbatim
        format!(
            "Service bus message has invalid status change request for request id = {request_id}, current status is = {current_status}, new status is = {new_status}"
        )
    }

    /// The operation message when a step of a pipeline failed.
    #[must_use]
    pub fn pipeline_failed(template_step_id: &str) -> String {
        // TRE log string: verbatim
        format!("Multi step pipeline failed on step {template_step_id}")
    }

    /// Logged before a pipeline's next step is queued.
    #[must_use]
    pub fn sending_next_step(template_step_id: &str, action: &str) -> String {
        // TRE log string: verbatim
        format!(
            "Sending next step in operation to deployment queue -> step_id: {template_step_id}, action: {action}"
        )
    }

    /// Logged after a deployment status was parsed.
    #[must_use]
    pub fn received_and_parsed(correlation_id: &str) -> String {
        // TRE log string: verbatim
        format!("Received and parsed JSON for: {correlation_id}")
    }

    /// Logged after a deployment status was handled.
    #[must_use]
    pub fn update_status_in_db(operation_id: &str, status: &str) -> String {
        // TRE log string: verbatim
        format!("Update status in DB for {operation_id} - {status}")
    }
}

/// Why a message body is not a valid message. The handlers dead-letter such a message
/// at once with reason [`reason::MESSAGE_FORMAT_INCORRECT`] (DESIGN §6).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageFormatError {
    /// The body is not UTF-8 text.
    #[error("the body is not UTF-8 text")]
    NotText(#[source] std::str::Utf8Error),
    /// The body is not JSON.
    #[error("the body is not JSON")]
    NotJson(#[source] serde_json::Error),
    /// The body is JSON but does not fit the message's schema.
    #[error("the body does not fit the schema at `{path}`")]
    Schema {
        /// Where in the document (`.` for the root).
        path: String,
        /// The mismatch.
        #[source]
        source: serde_json::Error,
    },
    /// A field holds a value the message type does not know.
    #[error("`{field}` is not valid")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// The value.
        #[source]
        source: UnknownValue,
    },
}

impl MessageFormatError {
    /// The dead-letter outcome for this error: reason
    /// [`reason::MESSAGE_FORMAT_INCORRECT`], description `"<tre_message>: <error chain>"`.
    #[must_use]
    pub fn outcome(&self, tre_message: &str) -> Outcome {
        Outcome::dead_letter(
            reason::MESSAGE_FORMAT_INCORRECT,
            format!("{tre_message}: {}", error_chain(self)),
        )
    }
}

/// Parses a JSON body into `T`, telling text, syntax and schema errors apart.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, MessageFormatError> {
    let text = std::str::from_utf8(body).map_err(MessageFormatError::NotText)?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let source = error.into_inner();
        if source.is_data() {
            MessageFormatError::Schema { path, source }
        } else {
            MessageFormatError::NotJson(source)
        }
    })?;
    deserializer.end().map_err(MessageFormatError::NotJson)?;
    Ok(value)
}

/// The prologue of both updaters: parses the body of `message` with `parse`. A
/// malformed body is logged once, with TRE's line `"<tre_message>: <correlation id>"`,
/// the queue, the message id and the error chain, and answered with its dead-letter
/// outcome.
pub(crate) fn parse_message<T>(
    queue: &str,
    message: &steward_core::Message,
    tre_message: &str,
    parse: impl FnOnce(&[u8]) -> Result<T, MessageFormatError>,
) -> Result<T, Outcome> {
    parse(&message.body).map_err(|error| {
        // TRE log string: verbatim
        tracing::error!(
            queue = %queue,
            message_id = %message.id,
            error = %error_chain(&error),
            "{}: {}",
            tre_message,
            correlation_id(message)
        );
        error.outcome(tre_message)
    })
}

/// The correlation id as TRE prints it (`None` when absent).
pub(crate) fn correlation_id(message: &steward_core::Message) -> &str {
    message.correlation_id.as_deref().unwrap_or("None")
}

/// How many times a handler re-runs its whole transaction after losing a
/// compare-and-swap race or an aborted transaction, before it retries the message.
pub(crate) const CONFLICT_ATTEMPTS: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Small {
        #[allow(dead_code)]
        n: u32,
    }

    #[test]
    fn parse_json_tells_text_syntax_and_schema_errors_apart() {
        assert!(matches!(parse_json::<Small>(b"\xff"), Err(MessageFormatError::NotText(_))));
        assert!(matches!(parse_json::<Small>(b"{"), Err(MessageFormatError::NotJson(_))));
        assert!(matches!(
            parse_json::<Small>(br#"{"n": 1} x"#),
            Err(MessageFormatError::NotJson(_))
        ));
        match parse_json::<Small>(br#"{"n": "x"}"#) {
            Err(MessageFormatError::Schema { path, .. }) => assert_eq!(path, "n"),
            other => panic!("{other:?}"),
        }
        assert!(parse_json::<Small>(br#"{"n": 1, "extra": true}"#).is_ok());
    }

    #[test]
    fn format_error_outcome_is_a_dead_letter_keeping_the_tre_text() {
        let error = parse_json::<Small>(b"bad").unwrap_err();
        match error.outcome(tre::DEPLOYMENT_STATUS_MESSAGE_FORMAT_INCORRECT) {
            Outcome::DeadLetter { reason, description } => {
                assert_eq!(reason, "MessageFormatIncorrect");
                assert!(
                    description.starts_with(
                        "Service bus message is not formatted correctly: the body is not JSON"
                    ),
                    "{description}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
