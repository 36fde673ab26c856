//! Airlock requests: insert, read, list, compare-and-swap replace. The rules for
//! changing them are in [`crate::airlock`].

use sqlx::any::AnyRow;
use sqlx::{Any, Executor, Row};

use super::error::{Entity, StoreError, inserted};
use super::{Reader, Store, Tx};
use crate::domain::new_id;
use crate::domain::{AirlockRequest, AirlockRequestStatus};
use crate::storage::millis;

/// Which airlock requests to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AirlockRequestFilter {
    /// Only requests of this workspace.
    pub workspace_id: Option<String>,
    /// Only requests in this status.
    pub status: Option<AirlockRequestStatus>,
    /// Only requests of these workspaces; `None` for all.
    pub visible_workspaces: Option<Vec<String>>,
    /// Skip this many (in creation order).
    pub skip: u64,
    /// Return at most this many; `None` for all.
    pub limit: Option<u64>,
}

fn from_row(row: &AnyRow) -> Result<AirlockRequest, StoreError> {
    let id: String = row.try_get("id")?;
    let etag: String = row.try_get("etag")?;
    let doc: String = row.try_get("doc")?;
    let mut request: AirlockRequest = serde_json::from_str(&doc)
        .map_err(|error| StoreError::corrupt(Entity::AirlockRequest, &id, error))?;
    request.etag = etag;
    Ok(request)
}

fn to_doc(request: &AirlockRequest) -> Result<String, StoreError> {
    serde_json::to_string(request)
        .map_err(|error| StoreError::corrupt(Entity::AirlockRequest, &request.id, error))
}

async fn fetch<'c, E: Executor<'c, Database = Any>>(
    executor: E,
    id: &str,
) -> Result<Option<AirlockRequest>, StoreError> {
    let row = sqlx::query("SELECT id, etag, doc FROM airlock_requests WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(from_row).transpose()
}

async fn list<'c, E: Executor<'c, Database = Any>>(
    executor: E,
    filter: &AirlockRequestFilter,
) -> Result<Vec<AirlockRequest>, StoreError> {
    let mut sql = "SELECT id, etag, doc FROM airlock_requests WHERE 1 = 1".to_owned();
    let mut binds: Vec<String> = Vec::new();
    if let Some(workspace_id) = &filter.workspace_id {
        binds.push(workspace_id.clone());
        sql.push_str(&format!(" AND workspace_id = ${}", binds.len()));
    }
    if let Some(status) = filter.status {
        binds.push(status.as_str().to_owned());
        sql.push_str(&format!(" AND status = ${}", binds.len()));
    }
    if let Some(workspaces) = &filter.visible_workspaces {
        sql.push_str(" AND (1 = 0");
        for workspace_id in workspaces {
            binds.push(workspace_id.clone());
            sql.push_str(&format!(" OR workspace_id = ${}", binds.len()));
        }
        sql.push(')');
    }
    let n = binds.len();
    sql.push_str(&format!(" ORDER BY created_at, id LIMIT ${} OFFSET ${}", n + 1, n + 2));
    let mut query = sqlx::query(&sql);
    for bind in binds {
        query = query.bind(bind);
    }
    let limit = filter.limit.map_or(i64::MAX, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
    let skip = i64::try_from(filter.skip).unwrap_or(i64::MAX);
    let rows = query.bind(limit).bind(skip).fetch_all(executor).await?;
    rows.iter().map(from_row).collect()
}

impl Store {}

impl Tx {
    /// Inserts a new airlock request with a fresh etag and returns it as stored.
    ///
    /// # Errors
    ///
    /// [`StoreError::AlreadyExists`] if the id is taken, or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn insert_airlock_request(
        &mut self,
        request: &AirlockRequest,
    ) -> Result<AirlockRequest, StoreError> {
        let mut stored = request.clone();
        stored.etag = new_id();
        let doc = to_doc(&stored)?;
        let result = sqlx::query(
            "INSERT INTO airlock_requests (id, workspace_id, request_type, status, etag, created_at, updated_at, doc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
        )
        .bind(stored.id.clone())
        .bind(stored.workspace_id.clone())
        .bind(stored.request_type.map(|kind| kind.as_str().to_owned()))
        .bind(stored.status.as_str())
        .bind(stored.etag.clone())
        .bind(millis(stored.created_when.unwrap_or(stored.updated_when)))
        .bind(millis(stored.updated_when))
        .bind(doc)
        .execute(self.conn())
        .await?;
        inserted(&result, Entity::AirlockRequest, &stored.id)?;
        Ok(stored)
    }

    /// Replaces an airlock request if its stored etag still equals `request.etag`;
    /// returns it with its new etag.
    ///
    /// # Errors
    ///
    /// [`StoreError::EtagMismatch`], [`StoreError::NotFound`], or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn replace_airlock_request(
        &mut self,
        request: &AirlockRequest,
    ) -> Result<AirlockRequest, StoreError> {
        let mut stored = request.clone();
        stored.etag = new_id();
        let doc = to_doc(&stored)?;
        let result = sqlx::query(
            "UPDATE airlock_requests SET status = $1, etag = $2, updated_at = $3, doc = $4 WHERE id = $5 AND etag = $6",
        )
        .bind(stored.status.as_str())
        .bind(stored.etag.clone())
        .bind(millis(stored.updated_when))
        .bind(doc)
        .bind(stored.id.clone())
        .bind(request.etag.clone())
        .execute(self.conn())
        .await?;
        if result.rows_affected() == 1 {
            return Ok(stored);
        }
        Err(self.missing_or_changed(Entity::AirlockRequest, "airlock_requests", &request.id).await)
    }
}

impl Reader<'_> {
    /// The airlock request with this id.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`], or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn airlock_request(self, id: &str) -> Result<AirlockRequest, StoreError> {
        fetch(&mut *self.connection().await?, id)
            .await?
            .ok_or_else(|| StoreError::not_found(Entity::AirlockRequest, id))
    }

    /// Airlock requests matching `filter`, in creation order.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn airlock_requests(
        self,
        filter: &AirlockRequestFilter,
    ) -> Result<Vec<AirlockRequest>, StoreError> {
        list(&mut *self.connection().await?, filter).await
    }
}
