//! Workspace roles: the roles each user holds in each workspace.

use sqlx::Row;

use super::error::StoreError;
use super::{Reader, Tx, millis};
use crate::domain::WorkspaceRole;

fn parse(workspace_id: &str, user_id: &str, text: &str) -> Result<Vec<WorkspaceRole>, StoreError> {
    serde_json::from_str(text).map_err(|error| {
        StoreError::corrupt(
            super::Entity::WorkspaceRoles,
            &format!("{workspace_id}/{user_id}"),
            error,
        )
    })
}

impl Tx {
    /// Sets the roles of `user_id` in `workspace_id`, replacing those it had; no roles
    /// removes the user from the workspace.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn set_workspace_roles(
        &mut self,
        workspace_id: &str,
        user_id: &str,
        roles: &[WorkspaceRole],
        updated_by: &str,
    ) -> Result<(), StoreError> {
        let mut roles = roles.to_vec();
        roles.sort();
        roles.dedup();
        if roles.is_empty() {
            sqlx::query("DELETE FROM workspace_roles WHERE workspace_id = $1 AND user_id = $2")
                .bind(workspace_id.to_owned())
                .bind(user_id.to_owned())
                .execute(self.conn())
                .await?;
            return Ok(());
        }
        let text = serde_json::to_string(&roles).map_err(|error| {
            StoreError::corrupt(super::Entity::WorkspaceRoles, workspace_id, error)
        })?;
        let now = millis(self.store().clock().now());
        sqlx::query(
            "INSERT INTO workspace_roles (workspace_id, user_id, roles, updated_at, updated_by) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (workspace_id, user_id) DO UPDATE SET roles = excluded.roles, updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(workspace_id.to_owned())
        .bind(user_id.to_owned())
        .bind(text)
        .bind(now)
        .bind(updated_by.to_owned())
        .execute(self.conn())
        .await?;
        Ok(())
    }
}

impl Reader<'_> {
    /// The roles of `user_id` in `workspace_id`, in a fixed order; none when it has none.
    ///
    /// # Errors
    ///
    /// The database failed, or the stored roles are corrupt.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn workspace_roles(
        self,
        workspace_id: &str,
        user_id: &str,
    ) -> Result<Vec<WorkspaceRole>, StoreError> {
        let row = sqlx::query(
            "SELECT roles FROM workspace_roles WHERE workspace_id = $1 AND user_id = $2",
        )
        .bind(workspace_id.to_owned())
        .bind(user_id.to_owned())
        .fetch_optional(&mut *self.connection().await?)
        .await?;
        match row {
            Some(row) => parse(workspace_id, user_id, &row.try_get::<String, _>("roles")?),
            None => Ok(Vec::new()),
        }
    }

    /// Every user who holds a role in `workspace_id`, with the roles, by user id.
    ///
    /// # Errors
    ///
    /// The database failed, or the stored roles are corrupt.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn workspace_members(
        self,
        workspace_id: &str,
    ) -> Result<Vec<(String, Vec<WorkspaceRole>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT user_id, roles FROM workspace_roles WHERE workspace_id = $1 ORDER BY user_id",
        )
        .bind(workspace_id.to_owned())
        .fetch_all(&mut *self.connection().await?)
        .await?;
        rows.iter()
            .map(|row| {
                let user_id: String = row.try_get("user_id")?;
                let roles = parse(workspace_id, &user_id, &row.try_get::<String, _>("roles")?)?;
                Ok((user_id, roles))
            })
            .collect()
    }

    /// Every workspace where `user_id` holds a role, with the roles, by workspace id.
    ///
    /// # Errors
    ///
    /// The database failed, or the stored roles are corrupt.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn roles_of_user(
        self,
        user_id: &str,
    ) -> Result<Vec<(String, Vec<WorkspaceRole>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT workspace_id, roles FROM workspace_roles WHERE user_id = $1 ORDER BY workspace_id",
        )
        .bind(user_id.to_owned())
        .fetch_all(&mut *self.connection().await?)
        .await?;
        rows.iter()
            .map(|row| {
                let workspace_id: String = row.try_get("workspace_id")?;
                let roles = parse(&workspace_id, user_id, &row.try_get::<String, _>("roles")?)?;
                Ok((workspace_id, roles))
            })
            .collect()
    }
}
