-- Workspace roles (WorkspaceOwner, WorkspaceResearcher, AirlockManager) of each user,
-- stored by the service since it has no Microsoft Graph to read them from. `roles` is
-- a JSON array; a user with no roles in a workspace has no row.

CREATE TABLE workspace_roles (
    workspace_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    roles TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (workspace_id, user_id)
);
CREATE INDEX workspace_roles_user ON workspace_roles (user_id);
