//! Deployment statuses and the action → status maps (reference §5.1).

use serde::{Deserialize, Serialize};

/// The actions TRE knows by name. Any other action name is a custom action.
pub mod action {
    /// Deploy a new resource.
    pub const INSTALL: &str = "install";
    /// Change the properties of a deployed resource.
    pub const UPGRADE: &str = "upgrade";
    /// Delete a resource.
    pub const UNINSTALL: &str = "uninstall";
}

named_enum! {
    /// The status of an operation, of one of its steps, or of a resource's deployment.
    ///
    /// The serialized names are TRE's (`awaiting_deployment`, `deploying`, …).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Status: "status" {
        /// An install is queued.
        AwaitingDeployment => "awaiting_deployment",
        /// An install is running.
        Deploying => "deploying",
        /// An install succeeded.
        Deployed => "deployed",
        /// An install failed.
        DeploymentFailed => "deployment_failed",
        /// An upgrade is queued.
        AwaitingUpdate => "awaiting_update",
        /// An upgrade is running.
        Updating => "updating",
        /// An upgrade succeeded.
        Updated => "updated",
        /// An upgrade failed.
        UpdatingFailed => "updating_failed",
        /// An uninstall is queued.
        AwaitingDeletion => "awaiting_deletion",
        /// An uninstall is running.
        Deleting => "deleting",
        /// An uninstall succeeded.
        Deleted => "deleted",
        /// An uninstall failed.
        DeletingFailed => "deleting_failed",
        /// A custom action is queued.
        AwaitingAction => "awaiting_action",
        /// A custom action is running.
        InvokingAction => "invoking_action",
        /// A custom action succeeded.
        ActionSucceeded => "action_succeeded",
        /// A custom action failed.
        ActionFailed => "action_failed",
        /// A multi-step operation is between its first and last step.
        PipelineRunning => "pipeline_running",
    }
}

impl Status {
    /// Whether this is a success status (TRE `OperationStep.is_success`).
    #[must_use]
    pub const fn is_success(self) -> bool {
        matches!(
            self,
            Status::ActionSucceeded | Status::Deployed | Status::Deleted | Status::Updated
        )
    }

    /// Whether this is a failure status (TRE `OperationStep.is_failure`).
    #[must_use]
    pub const fn is_failure(self) -> bool {
        matches!(
            self,
            Status::ActionFailed
                | Status::DeletingFailed
                | Status::DeploymentFailed
                | Status::UpdatingFailed
        )
    }

    /// Whether this status belongs to a custom action (TRE `OperationStep.is_action`).
    #[must_use]
    pub const fn is_action(self) -> bool {
        matches!(self, Status::ActionSucceeded | Status::ActionFailed | Status::InvokingAction)
    }

    /// Whether this is one of the queued (`awaiting_*`) statuses.
    #[must_use]
    pub const fn is_awaiting(self) -> bool {
        matches!(
            self,
            Status::AwaitingDeployment
                | Status::AwaitingUpdate
                | Status::AwaitingDeletion
                | Status::AwaitingAction
        )
    }

    /// Whether this is one of the running statuses the resource processor reports first.
    #[must_use]
    pub const fn is_in_progress(self) -> bool {
        matches!(
            self,
            Status::Deploying | Status::Updating | Status::Deleting | Status::InvokingAction
        )
    }

    /// Whether this status is final: a success or a failure.
    #[must_use]
    pub const fn is_terminal(self) -> bool {
        self.is_success() || self.is_failure()
    }

    /// The queued status of a new operation or step for `action`
    /// (TRE `OperationRepository.get_initial_status`).
    #[must_use]
    pub fn awaiting(action: &str) -> Status {
        match action {
            action::INSTALL => Status::AwaitingDeployment,
            action::UNINSTALL => Status::AwaitingDeletion,
            action::UPGRADE => Status::AwaitingUpdate,
            _ => Status::AwaitingAction,
        }
    }

    /// The message that goes with [`Status::awaiting`].
    #[must_use]
    pub fn awaiting_message(action: &str) -> &'static str {
        match action {
            action::INSTALL => "This resource is waiting to be deployed",
            action::UNINSTALL => "This resource is waiting to be deleted",
            action::UPGRADE => "This resource is waiting to be updated",
            _ => "This resource is waiting for an action to be invoked",
        }
    }

    /// The status the resource processor reports while it runs `action`.
    #[must_use]
    pub fn in_progress(action: &str) -> Status {
        match action {
            action::INSTALL => Status::Deploying,
            action::UNINSTALL => Status::Deleting,
            action::UPGRADE => Status::Updating,
            _ => Status::InvokingAction,
        }
    }

    /// The status of a successful `action`.
    #[must_use]
    pub fn succeeded(action: &str) -> Status {
        match action {
            action::INSTALL => Status::Deployed,
            action::UNINSTALL => Status::Deleted,
            action::UPGRADE => Status::Updated,
            _ => Status::ActionSucceeded,
        }
    }

    /// The status of a failed `action`.
    #[must_use]
    pub fn failed(action: &str) -> Status {
        match action {
            action::INSTALL => Status::DeploymentFailed,
            action::UNINSTALL => Status::DeletingFailed,
            action::UPGRADE => Status::UpdatingFailed,
            _ => Status::ActionFailed,
        }
    }
}

/// A string that names no known value of an enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownValue {
    /// What was being parsed (`status`, `resource type`, …).
    pub kind: &'static str,
    /// The string that was given.
    pub value: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_match_tre_step_predicates() {
        let success: Vec<_> = Status::ALL.into_iter().filter(|s| s.is_success()).collect();
        assert_eq!(
            success,
            [Status::Deployed, Status::Updated, Status::Deleted, Status::ActionSucceeded]
        );
        let failure: Vec<_> = Status::ALL.into_iter().filter(|s| s.is_failure()).collect();
        assert_eq!(
            failure,
            [
                Status::DeploymentFailed,
                Status::UpdatingFailed,
                Status::DeletingFailed,
                Status::ActionFailed
            ]
        );
        let action: Vec<_> = Status::ALL.into_iter().filter(|s| s.is_action()).collect();
        assert_eq!(action, [Status::InvokingAction, Status::ActionSucceeded, Status::ActionFailed]);
        assert!(!Status::PipelineRunning.is_terminal());
        assert!(Status::Deploying.is_in_progress() && !Status::Deploying.is_terminal());
    }

    #[test]
    fn action_maps_match_tre() {
        let table = [
            (
                "install",
                Status::AwaitingDeployment,
                Status::Deploying,
                Status::Deployed,
                Status::DeploymentFailed,
            ),
            (
                "upgrade",
                Status::AwaitingUpdate,
                Status::Updating,
                Status::Updated,
                Status::UpdatingFailed,
            ),
            (
                "uninstall",
                Status::AwaitingDeletion,
                Status::Deleting,
                Status::Deleted,
                Status::DeletingFailed,
            ),
            (
                "start",
                Status::AwaitingAction,
                Status::InvokingAction,
                Status::ActionSucceeded,
                Status::ActionFailed,
            ),
        ];
        for (action, awaiting, running, success, failure) in table {
            assert_eq!(Status::awaiting(action), awaiting, "{action}");
            assert_eq!(Status::in_progress(action), running, "{action}");
            assert_eq!(Status::succeeded(action), success, "{action}");
            assert_eq!(Status::failed(action), failure, "{action}");
        }
        assert_eq!(Status::awaiting_message("install"), "This resource is waiting to be deployed");
        assert_eq!(Status::awaiting_message("uninstall"), "This resource is waiting to be deleted");
        assert_eq!(Status::awaiting_message("upgrade"), "This resource is waiting to be updated");
        assert_eq!(
            Status::awaiting_message("restart"),
            "This resource is waiting for an action to be invoked"
        );
    }
}
