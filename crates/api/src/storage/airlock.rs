//! Airlock requests: insert, read, list, compare-and-swap replace. The rules for
//! changing them are in [`crate::airlock`].

use sqlx::{Any, Executor};

use super::document::{Listed, Listing, PageKey, Window, fetch, with_new_etag};
use super::error::{Entity, StoreError, inserted};
use super::{Reader, Store, Tx};
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
    /// Only records after this one (in creation order).
    pub after: Option<PageKey>,
    /// Skip this many (in creation order, after `after`).
    pub skip: u64,
    /// Return at most this many; `None` for all.
    pub limit: Option<u64>,
    /// Stop before the documents pass this many bytes (the first is always returned);
    /// `None` for no limit.
    pub max_bytes: Option<usize>,
}

async fn list<'c, E: Executor<'c, Database = Any>>(
    executor: E,
    filter: &AirlockRequestFilter,
) -> Result<Listed<AirlockRequest>, StoreError> {
    let mut listing = Listing::of::<AirlockRequest>();
    listing.equal("workspace_id", filter.workspace_id.as_deref());
    listing.equal("status", filter.status.map(AirlockRequestStatus::as_str));
    listing.any_of("1 = 0", &["workspace_id"], filter.visible_workspaces.as_deref());
    let window = Window {
        after: filter.after.as_ref(),
        skip: filter.skip,
        limit: filter.limit,
        max_bytes: filter.max_bytes,
    };
    listing.page(executor, window).await
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
        let (stored, doc) = with_new_etag(request)?;
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
        self.replace_document(request, request.status.as_str(), request.updated_when).await
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
        Ok(self.airlock_requests_page(filter).await?.items)
    }

    /// One page of the airlock requests matching `filter` (its `skip`, `limit` and
    /// `max_bytes`), in creation order, and whether more follow.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn airlock_requests_page(
        self,
        filter: &AirlockRequestFilter,
    ) -> Result<Listed<AirlockRequest>, StoreError> {
        list(&mut *self.connection().await?, filter).await
    }
}
