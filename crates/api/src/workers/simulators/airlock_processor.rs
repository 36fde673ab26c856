//! A simulated airlock processor: answers `statusChanged` events with the step results
//! TRE's airlock processor sends (reference §4.3), malware scanning off.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use steward_core::{Handler, Message, MessageSink, Outcome, OutgoingMessage, error_chain};

use crate::domain::{AirlockRequestStatus, StatusChangedEvent, rfc3339_utc};
use crate::opaque::Opaque;

/// The simulated airlock processor: a [`Handler`] for the status-changed queue.
///
/// | status changed to | step results sent |
/// |---|---|
/// | `submitted` | files-only (`submitted` → none, one file), then `submitted` → `in_review` |
/// | `approval_in_progress` | `approval_in_progress` → `approved` |
/// | `rejection_in_progress` | `rejection_in_progress` → `rejected` |
/// | `blocking_in_progress` | `blocking_in_progress` → `blocked_by_scan` |
/// | anything else | nothing |
#[derive(Debug)]
pub(crate) struct AirlockProcessor {
    sink: Opaque<Arc<dyn MessageSink>>,
    step_result_queue: String,
    pause: (Duration, Duration),
}

impl AirlockProcessor {
    /// A simulator answering on `step_result_queue` through `sink`, pausing 20–200 ms.
    #[must_use]
    pub(crate) fn new(sink: Arc<dyn MessageSink>, step_result_queue: impl Into<String>) -> Self {
        AirlockProcessor {
            sink: Opaque(sink),
            step_result_queue: step_result_queue.into(),
            pause: (Duration::from_millis(20), Duration::from_millis(200)),
        }
    }

    async fn step_result(
        &self,
        request_id: &str,
        data: Value,
    ) -> Result<(), steward_core::TransportError> {
        let event = json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "topic": "",
            "subject": request_id,
            "eventType": "Airlock.StepResult",
            "eventTime": rfc3339_utc(crate::Clock::system().now()),
            "data": data,
            "dataVersion": "1.0",
        });
        // Step results are about one request; sessions keep a transport with them in order.
        let message = OutgoingMessage::json(event.to_string()).with_session_id(request_id);
        self.sink.send(&self.step_result_queue, message).await
    }
}

#[async_trait]
impl Handler for AirlockProcessor {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        let event: StatusChangedEvent = match serde_json::from_slice(&message.body) {
            Ok(event) => event,
            Err(error) => {
                return Outcome::dead_letter(
                    "MessageFormatIncorrect",
                    format!("not a statusChanged event: {error}"),
                );
            }
        };
        let id = event.data.request_id.as_str();
        let next = match event.data.new_status {
            AirlockRequestStatus::ApprovalInProgress => Some("approved"),
            AirlockRequestStatus::RejectionInProgress => Some("rejected"),
            AirlockRequestStatus::BlockingInProgress => Some("blocked_by_scan"),
            AirlockRequestStatus::Submitted => Some("in_review"),
            _ => None,
        };
        let Some(next) = next else { return Outcome::Complete };
        tracing::info!(request_id = %id, status = %event.data.new_status, "simulating the airlock processor");
        tokio::time::sleep(super::jitter(self.pause.0, self.pause.1)).await;
        let completed = event.data.new_status.as_str();
        let result = async {
            if event.data.new_status == AirlockRequestStatus::Submitted {
                let files = json!({
                    "completed_step": "submitted",
                    "new_status": null,
                    "request_id": id,
                    "request_files": [{"name": "data.csv", "size": 1024}],
                    "status_message": null,
                });
                self.step_result(id, files).await?;
            }
            let step = json!({
                "completed_step": completed,
                "new_status": next,
                "request_id": id,
                "request_files": null,
                "status_message": null,
            });
            self.step_result(id, step).await
        }
        .await;
        match result {
            Ok(()) => Outcome::Complete,
            Err(error) => {
                Outcome::retry(format!("could not send a step result: {}", error_chain(&error)))
            }
        }
    }
}
