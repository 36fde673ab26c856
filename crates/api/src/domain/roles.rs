//! Workspace roles: what a user may do in one workspace.
//!
//! TRE reads them from the workspace's app registration in Microsoft Graph; this
//! service has no Graph, so it stores them itself (DESIGN §6).

use serde::{Deserialize, Serialize};

named_enum! {
    /// A role a user holds in one workspace, with TRE's name.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
    pub enum WorkspaceRole {
        /// Owns the workspace: everything in it, and assigning its roles.
        WorkspaceOwner => "WorkspaceOwner",
        /// Works in the workspace: its services and user resources, airlock requests.
        WorkspaceResearcher => "WorkspaceResearcher",
        /// Reviews the workspace's airlock requests.
        AirlockManager => "AirlockManager",
    }
}
