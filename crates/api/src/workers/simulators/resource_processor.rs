//! A simulated resource processor: answers each resource request with an in-progress
//! status and then a final one, with outputs, as TRE's porter-based processor does.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use steward_core::{Handler, Message, MessageSink, Outcome, OutgoingMessage, error_chain};

use crate::domain::{ResourceRequest, Status, rfc3339_utc};
use crate::opaque::Opaque;

/// Decides whether the simulated processor reports a failure for a request.
#[derive(Clone)]
pub enum FailurePolicy {
    /// Fail when the request's parameter `simulate_failure` names its action (e.g.
    /// `"upgrade"`), or is `"all"`. The default.
    ByParameter,
    /// Fail when the function says so.
    Custom(Arc<dyn Fn(&ResourceRequest) -> bool + Send + Sync>),
}

impl fmt::Debug for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailurePolicy::ByParameter => f.write_str("ByParameter"),
            FailurePolicy::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl FailurePolicy {
    fn fails(&self, request: &ResourceRequest) -> bool {
        match self {
            FailurePolicy::ByParameter => request
                .parameters
                .get("simulate_failure")
                .and_then(Value::as_str)
                .is_some_and(|action| action == request.action || action == "all"),
            FailurePolicy::Custom(fails) => fails(request),
        }
    }
}

/// The simulated resource processor: a [`Handler`] for the resource-request queue.
///
/// For each request it sends to the deployment-status queue (session id = operation
/// id, correlation id = resource id) first `"<id>: Job starting"` with the action's
/// in-progress status, then, after a short pause, the success status with outputs
/// (`address_spaces` and `workspace_url` for a workspace install; `ip_address`,
/// `connection_uri`, `is_exposed_externally` for other installs; `last_action`
/// otherwise) or the failure status.
#[derive(Debug)]
pub struct ResourceProcessor {
    sink: Opaque<Arc<dyn MessageSink>>,
    status_queue: String,
    pause: (Duration, Duration),
    failures: FailurePolicy,
}

impl ResourceProcessor {
    /// A simulator answering on `status_queue` through `sink`, pausing 20–200 ms.
    #[must_use]
    pub fn new(sink: Arc<dyn MessageSink>, status_queue: impl Into<String>) -> Self {
        ResourceProcessor {
            sink: Opaque(sink),
            status_queue: status_queue.into(),
            pause: (Duration::from_millis(20), Duration::from_millis(200)),
            failures: FailurePolicy::ByParameter,
        }
    }

    /// Sets how long the simulated work takes, at least `min` and at most `max`.
    #[must_use]
    pub fn with_pause(mut self, min: Duration, max: Duration) -> Self {
        self.pause = (min, max.max(min));
        self
    }

    /// Sets which requests fail.
    #[must_use]
    pub fn with_failures(mut self, failures: FailurePolicy) -> Self {
        self.failures = failures;
        self
    }

    async fn report(
        &self,
        request: &ResourceRequest,
        status: Status,
        text: &str,
        outputs: Value,
    ) -> Result<(), steward_core::TransportError> {
        let body = json!({
            "operationId": request.operation_id,
            "stepId": request.step_id,
            "id": request.id,
            "status": status,
            "message": format!("{}: {text}", request.id),
            "outputs": outputs,
        });
        let message = OutgoingMessage::json(body.to_string())
            .with_session_id(request.operation_id.clone())
            .with_correlation_id(request.id.clone());
        self.sink.send(&self.status_queue, message).await
    }
}

fn outputs(request: &ResourceRequest) -> Value {
    match request.action.as_str() {
        // A workspace has no parent: it gets an address space, as TRE's base workspace
        // bundle outputs one (pipeline steps of its user resources refer to it).
        "install"
            if request.workspace_id.is_none() && request.name.starts_with("tre-workspace") =>
        {
            json!([
                {"name": "address_spaces", "value": ["10.1.0.0/24"], "type": "string"},
                {"name": "workspace_url", "value": format!("https://{}.steward.example", request.id), "type": "string"},
            ])
        }
        "install" => json!([
            {"name": "ip_address", "value": "10.1.0.4", "type": "string"},
            {"name": "connection_uri", "value": format!("https://{}.steward.example", request.id), "type": "string"},
            {"name": "is_exposed_externally", "value": "false", "type": "boolean"},
        ]),
        "uninstall" => json!([]),
        action => json!([
            {"name": "last_action", "value": action, "type": "string"},
            {"name": "last_action_at", "value": rfc3339_utc(crate::Clock::system().now()), "type": "string"},
        ]),
    }
}

#[async_trait]
impl Handler for ResourceProcessor {
    async fn handle(&self, message: Arc<Message>) -> Outcome {
        let request: ResourceRequest = match serde_json::from_slice(&message.body) {
            Ok(request) => request,
            Err(error) => {
                return Outcome::dead_letter(
                    "MessageFormatIncorrect",
                    format!("not a resource request: {error}"),
                );
            }
        };
        tracing::info!(resource_id = %request.id, operation_id = %request.operation_id, action = %request.action, "simulating the resource processor");
        let action = request.action.as_str();
        let result = async {
            self.report(&request, Status::in_progress(action), "Job starting", json!([])).await?;
            tokio::time::sleep(super::jitter(self.pause.0, self.pause.1)).await;
            if self.failures.fails(&request) {
                let text = format!("{action} action failed (simulated)");
                self.report(&request, Status::failed(action), &text, json!([])).await
            } else {
                let text = format!("{action} action completed successfully.");
                self.report(&request, Status::succeeded(action), &text, outputs(&request)).await
            }
        }
        .await;
        match result {
            Ok(()) => Outcome::Complete,
            Err(error) => {
                Outcome::retry(format!("could not send a status: {}", error_chain(&error)))
            }
        }
    }
}
