//! Workspace roles: what a user may do in one workspace.
//!
//! TRE reads them from the workspace's app registration in Microsoft Graph; this
//! service has no Graph, so it stores them itself (DESIGN §6).

use serde::{Deserialize, Serialize};

/// A role a user holds in one workspace, with TRE's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WorkspaceRole {
    /// Owns the workspace: everything in it, and assigning its roles.
    WorkspaceOwner,
    /// Works in the workspace: its services and user resources, airlock requests.
    WorkspaceResearcher,
    /// Reviews the workspace's airlock requests.
    AirlockManager,
}

impl WorkspaceRole {
    /// TRE's name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceRole::WorkspaceOwner => "WorkspaceOwner",
            WorkspaceRole::WorkspaceResearcher => "WorkspaceResearcher",
            WorkspaceRole::AirlockManager => "AirlockManager",
        }
    }
}

impl std::fmt::Display for WorkspaceRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
