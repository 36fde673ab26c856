//! Built-in stand-ins for TRE's resource processor and airlock processor, so the
//! service does real work with nothing else installed.
//!
//! Each is a [`Handler`](steward_core::Handler) run by an ordinary
//! [`Updater`](steward_core::Updater) under the service's supervisor: they consume the
//! queues the real processors consume and answer on the queues the real processors
//! answer on, with the same wire formats (reference §4.2 and §4.3).

mod airlock_processor;
mod resource_processor;

use std::time::Duration;

pub(crate) use airlock_processor::AirlockProcessor;
pub use resource_processor::{FailurePolicy, ResourceProcessor};

/// A pause of between `min` and `max`, different each call: the simulated work.
fn jitter(min: Duration, max: Duration) -> Duration {
    let spread = max.saturating_sub(min).as_millis().max(1);
    let draw = uuid::Uuid::new_v4().as_u128() % spread;
    min + Duration::from_millis(u64::try_from(draw).unwrap_or(0))
}

/// The simulated airlock notifier: logs each `airlockNotification` and completes it, as
/// TRE's Logic App would send its e-mails.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Notifier;

#[async_trait::async_trait]
impl steward_core::Handler for Notifier {
    async fn handle(
        &self,
        message: std::sync::Arc<steward_core::Message>,
    ) -> steward_core::Outcome {
        match serde_json::from_slice::<crate::domain::AirlockNotificationEvent>(&message.body) {
            Ok(event) => {
                tracing::info!(
                    request_id = %event.data.request.id,
                    status = %event.data.request.status,
                    roles = event.data.recipient_emails_by_role.len(),
                    "airlock notification (simulated: not e-mailed)"
                );
                steward_core::Outcome::Complete
            }
            Err(error) => steward_core::Outcome::dead_letter(
                "MessageFormatIncorrect",
                format!("not an airlockNotification event: {error}"),
            ),
        }
    }
}
