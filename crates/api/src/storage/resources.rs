//! Resources: insert, read, list, compare-and-swap replace, patch with history.

use std::future::Future;

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, Executor};

use super::document::{Listed, Listing, PageKey, Window, fetch, from_row, with_new_etag};
use super::error::{Entity, StoreError, inserted};
use super::{Reader, Store, Tx};
use crate::domain::new_id;
use crate::domain::{Properties, Resource, ResourcePatch, ResourceType, Status, User};
use crate::storage::millis;

const COLUMNS: &str = "id, etag, doc";

/// `query` with the columns a replace may change, but the times and the document, bound
/// in table order: `template_version`, `deployment_status`, `resource_path`,
/// `workspace_id`, `parent_workspace_service_id`, `etag`.
fn bind_changing_columns<'q>(
    query: Query<'q, Any, AnyArguments<'q>>,
    stored: &Resource,
) -> Query<'q, Any, AnyArguments<'q>> {
    query
        .bind(stored.template_version.clone())
        .bind(stored.deployment_status.map(|status| status.as_str().to_owned()))
        .bind(stored.resource_path.clone())
        .bind(stored.workspace_id().map(str::to_owned))
        .bind(stored.parent_workspace_service_id().map(str::to_owned))
        .bind(stored.etag.clone())
}

/// What [`Tx::set_resource_status`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWrite {
    /// The status (and outputs) were written.
    Written,
    /// A newer operation already wrote the resource's status: nothing was written.
    Superseded {
        /// The creation time (ms) of the operation that wrote the current status.
        by_operation_created_at: i64,
    },
}

/// How many times [`Tx::set_resource_status`] retries a lost etag race.
const STATUS_WRITE_RETRIES: u32 = 3;

/// Which resources to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceFilter {
    /// Only this type.
    pub resource_type: Option<ResourceType>,
    /// Only this deployment status.
    pub status: Option<Status>,
    /// Only resources of this workspace (workspace services and user resources).
    pub workspace_id: Option<String>,
    /// Only user resources of this workspace service.
    pub parent_workspace_service_id: Option<String>,
    /// Only this template.
    pub template_name: Option<String>,
    /// Include resources whose status is `deleted` (left out by default).
    pub include_deleted: bool,
    /// Only shared services, and resources of these workspaces (the workspaces
    /// themselves included); `None` for all.
    pub visible_workspaces: Option<Vec<String>>,
    /// Of the user resources, only those this caller may see; `None` for all.
    pub user_resources: Option<UserResourceScope>,
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

/// The user resources a caller sees (TRE's rule): those they own, and every one in the
/// workspaces where they are `WorkspaceOwner`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserResourceScope {
    /// The caller: user resources whose `ownerId` this is.
    pub owner_id: String,
    /// The workspaces whose user resources the caller sees all of.
    pub all_in_workspaces: Vec<String>,
}

async fn list<'c, E: Executor<'c, Database = Any>>(
    executor: E,
    filter: &ResourceFilter,
) -> Result<Listed<Resource>, StoreError> {
    let mut listing = Listing::of::<Resource>();
    listing.equal("resource_type", filter.resource_type.map(ResourceType::as_str));
    listing.equal("deployment_status", filter.status.map(Status::as_str));
    listing.equal("workspace_id", filter.workspace_id.as_deref());
    listing.equal("parent_workspace_service_id", filter.parent_workspace_service_id.as_deref());
    listing.equal("template_name", filter.template_name.as_deref());
    if !filter.include_deleted {
        listing.only("(deployment_status IS NULL OR deployment_status <> 'deleted')");
    }
    listing.any_of(
        "resource_type = 'shared-service'",
        &["id", "workspace_id"],
        filter.visible_workspaces.as_deref(),
    );
    if let Some(scope) = &filter.user_resources {
        listing.either(
            "resource_type <> 'user-resource'",
            &[
                ("owner_id", std::slice::from_ref(&scope.owner_id)),
                ("workspace_id", &scope.all_in_workspaces),
            ],
        );
    }
    let window = Window {
        after: filter.after.as_ref(),
        skip: filter.skip,
        limit: filter.limit,
        max_bytes: filter.max_bytes,
    };
    listing.page(executor, window).await
}

impl Store {
    /// Patches a resource outside any caller transaction, retrying on etag mismatches
    /// like TRE's `try_update_with_retries`: each attempt reads the resource, asks
    /// `make_patch` for the change, and writes it (with its history item) in a
    /// transaction of its own if the etag still matches. There are at most
    /// `num_retries + 1` attempts.
    ///
    /// Returns the updated resource (TRE's version returns `None` after a retry; DESIGN
    /// §6).
    ///
    /// # Errors
    ///
    /// The last [`StoreError::EtagMismatch`] after `num_retries + 1` attempts, any
    /// other store error at once, or the error of `make_patch`.
    ///
    /// # Cancellation safety
    ///
    /// Not cancel safe: an attempt that was committing may or may not be applied.
    pub async fn patch_resource_with_retries<E, F, Fut>(
        &self,
        id: &str,
        num_retries: u32,
        user: &User,
        mut make_patch: F,
    ) -> Result<Resource, E>
    where
        E: From<StoreError>,
        F: FnMut(Resource) -> Fut,
        Fut: Future<Output = Result<ResourcePatch, E>>,
    {
        let mut attempt = 0;
        loop {
            let current = self.read().resource(id).await?;
            let patch = make_patch(current.clone()).await?;
            let result = async {
                let mut tx = self.begin().await?;
                let patched = tx.patch_resource(&current, &patch, user).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(patched)
            }
            .await;
            match result {
                Err(error) if error.is_etag_mismatch() && attempt < num_retries => {
                    attempt += 1;
                    tracing::debug!(resource_id = id, attempt, "etag mismatch, retrying the patch");
                }
                other => return other.map_err(E::from),
            }
        }
    }
}

impl Tx {
    /// Inserts a new resource with a fresh etag and returns it as stored.
    ///
    /// # Errors
    ///
    /// [`StoreError::AlreadyExists`] if the id is taken, or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn insert_resource(&mut self, resource: &Resource) -> Result<Resource, StoreError> {
        let (stored, doc) = with_new_etag(resource)?;
        let now = millis(self.now());
        let query = sqlx::query(
            "INSERT INTO resources (id, resource_type, template_name, template_version, deployment_status, \
             resource_path, workspace_id, parent_workspace_service_id, etag, created_at, updated_at, doc, \
             owner_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (id) DO NOTHING",
        )
        .bind(stored.id.clone())
        .bind(stored.resource_type().as_str())
        .bind(stored.template_name.clone());
        let result = bind_changing_columns(query, &stored)
            .bind(now)
            .bind(now)
            .bind(doc)
            // Only at insert: a user resource's owner never changes.
            .bind(stored.owner_id().map(str::to_owned))
            .execute(self.conn())
            .await?;
        inserted(&result, Entity::Resource, &stored.id)?;
        Ok(stored)
    }

    /// Replaces a resource if its stored etag still equals `resource.etag`; returns it
    /// with its new etag.
    ///
    /// # Errors
    ///
    /// [`StoreError::EtagMismatch`] if it changed since it was read,
    /// [`StoreError::NotFound`] if it is gone, or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn replace_resource(&mut self, resource: &Resource) -> Result<Resource, StoreError> {
        let (stored, doc) = with_new_etag(resource)?;
        let now = millis(self.now());
        let query = sqlx::query(
            "UPDATE resources SET template_version = $1, deployment_status = $2, resource_path = $3, \
             workspace_id = $4, parent_workspace_service_id = $5, etag = $6, updated_at = $7, doc = $8 \
             WHERE id = $9 AND etag = $10",
        );
        let result = bind_changing_columns(query, &stored)
            .bind(now)
            .bind(doc)
            .bind(stored.id.clone())
            .bind(resource.etag.clone())
            .execute(self.conn())
            .await?;
        if result.rows_affected() == 1 {
            return Ok(stored);
        }
        Err(self.missing_or_changed(Entity::Resource, "resources", &resource.id).await)
    }

    /// TRE's `patch_resource`: bumps `resourceVersion`, stamps `user` and
    /// `updatedWhen`, merges the patch, writes it if `current.etag` still matches, and
    /// records `current` as a [`ResourceHistoryItem`](crate::domain::ResourceHistoryItem).
    /// The patch is not validated here; see
    /// [`Template::validate_patch`](crate::templates::Template::validate_patch).
    ///
    /// # Errors
    ///
    /// As [`replace_resource`](Self::replace_resource).
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn patch_resource(
        &mut self,
        current: &Resource,
        patch: &ResourcePatch,
        user: &User,
    ) -> Result<Resource, StoreError> {
        let mut updated = current.clone();
        updated.resource_version += 1;
        updated.user = user.clone();
        updated.updated_when = self.now();
        if let Some(is_enabled) = patch.is_enabled {
            updated.is_enabled = is_enabled;
        }
        if let Some(properties) = &patch.properties {
            for (name, value) in properties {
                updated.properties.insert(name.clone(), value.clone());
            }
        }
        // Write first: a lost race must not leave a history item behind.
        let stored = self.replace_resource(&updated).await?;
        self.insert_history(&current.history_item(new_id())).await?;
        Ok(stored)
    }

    /// [`patch_resource`](Self::patch_resource) with TRE's etag retries, inside this
    /// transaction: each attempt reads the resource, asks `make_patch` for the change
    /// and writes it; at most `num_retries + 1` attempts. Returns the updated resource.
    ///
    /// # Errors
    ///
    /// The last [`StoreError::EtagMismatch`], any other store error at once, or the
    /// error of `make_patch`.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn patch_resource_with_retries<E>(
        &mut self,
        id: &str,
        num_retries: u32,
        user: &User,
        mut make_patch: impl FnMut(&Resource) -> Result<ResourcePatch, E>,
    ) -> Result<Resource, E>
    where
        E: From<StoreError>,
    {
        let mut attempt = 0;
        loop {
            let current = self.read().resource(id).await?;
            let patch = make_patch(&current)?;
            match self.patch_resource(&current, &patch, user).await {
                Err(error) if error.is_etag_mismatch() && attempt < num_retries => {
                    attempt += 1;
                    tracing::debug!(resource_id = id, attempt, "etag mismatch, retrying the patch");
                }
                other => return other.map_err(E::from),
            }
        }
    }

    /// Sets a resource's `deploymentStatus` for an operation created at
    /// `operation_created_at` (ms), and merges `outputs` into its properties (overwriting,
    /// as `dict.update`), retrying a lost etag race.
    ///
    /// The write is guarded by operation order: if an operation created later already
    /// wrote the resource's status, nothing is written and
    /// [`StatusWrite::Superseded`] is returned, so a late message of an older operation
    /// (a delayed `deployed` after a newer uninstall's `deleted`) cannot bring the
    /// resource back. Operations created in the same millisecond both write.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the resource does not exist, the last
    /// [`StoreError::EtagMismatch`] after the retries, or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe: the transaction is rolled back when dropped.
    pub async fn set_resource_status(
        &mut self,
        id: &str,
        status: Status,
        outputs: Option<&Properties>,
        operation_created_at: i64,
    ) -> Result<StatusWrite, StoreError> {
        let mut attempt = 0;
        loop {
            let row =
                sqlx::query("SELECT status_operation_created_at FROM resources WHERE id = $1")
                    .bind(id.to_owned())
                    .fetch_optional(self.conn())
                    .await?
                    .ok_or_else(|| StoreError::not_found(Entity::Resource, id))?;
            let written_by: Option<i64> = sqlx::Row::try_get(&row, 0)?;
            if let Some(newer) = written_by.filter(|&newer| newer > operation_created_at) {
                return Ok(StatusWrite::Superseded { by_operation_created_at: newer });
            }
            let mut resource = self.read().resource(id).await?;
            resource.deployment_status = Some(status);
            if let Some(outputs) = outputs {
                for (name, value) in outputs {
                    resource.properties.insert(name.clone(), value.clone());
                }
            }
            match self.replace_resource(&resource).await {
                Ok(_) => {
                    sqlx::query(
                        "UPDATE resources SET status_operation_created_at = $1 WHERE id = $2",
                    )
                    .bind(operation_created_at)
                    .bind(id.to_owned())
                    .execute(self.conn())
                    .await?;
                    return Ok(StatusWrite::Written);
                }
                Err(error) if error.is_etag_mismatch() && attempt < STATUS_WRITE_RETRIES => {
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// After an update matched no row: the record is gone, or its etag changed.
    pub(crate) async fn missing_or_changed(
        &mut self,
        entity: Entity,
        table: &str,
        id: &str,
    ) -> StoreError {
        let exists = sqlx::query(&format!("SELECT 1 FROM {table} WHERE id = $1"))
            .bind(id.to_owned())
            .fetch_optional(self.conn())
            .await;
        match exists {
            Ok(Some(_)) => StoreError::EtagMismatch { entity, id: id.to_owned() },
            Ok(None) => StoreError::not_found(entity, id),
            Err(error) => error.into(),
        }
    }
}

impl Reader<'_> {
    /// The resource with this id.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`], or the database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn resource(self, id: &str) -> Result<Resource, StoreError> {
        self.find_resource(id).await?.ok_or_else(|| StoreError::not_found(Entity::Resource, id))
    }

    /// The resource with this id, if there is one.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn find_resource(self, id: &str) -> Result<Option<Resource>, StoreError> {
        fetch(&mut *self.connection().await?, id).await
    }

    /// Resources matching `filter`, in creation order.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn resources(self, filter: &ResourceFilter) -> Result<Vec<Resource>, StoreError> {
        Ok(self.resources_page(filter).await?.items)
    }

    /// One page of the resources matching `filter` (its `skip`, `limit` and
    /// `max_bytes`), in creation order, and whether more follow.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn resources_page(
        self,
        filter: &ResourceFilter,
    ) -> Result<Listed<Resource>, StoreError> {
        list(&mut *self.connection().await?, filter).await
    }

    /// The first shared service of this template that is not gone: not deleted, being
    /// deleted, or failed to deploy. Pipelines use it as a step target.
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn active_shared_service(
        self,
        template_name: &str,
    ) -> Result<Option<Resource>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM resources WHERE resource_type = 'shared-service' AND template_name = $1 \
             AND (deployment_status IS NULL OR deployment_status NOT IN \
             ('deleted', 'deleting', 'awaiting_deletion', 'deployment_failed')) \
             ORDER BY created_at, id LIMIT 1"
        ))
        .bind(template_name.to_owned())
        .fetch_optional(&mut *self.connection().await?)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// The resource and everything under it that is not deleted, deepest first (TRE
    /// `get_resource_dependency_list`, for cascading uninstalls).
    ///
    /// # Errors
    ///
    /// The database failed.
    ///
    /// # Cancellation safety
    ///
    /// Cancel safe.
    pub async fn resource_dependency_list(
        self,
        resource: &Resource,
    ) -> Result<Vec<Resource>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM resources WHERE (id = $1 OR resource_path LIKE $2) \
             AND (deployment_status IS NULL OR deployment_status <> 'deleted')"
        ))
        .bind(resource.id.clone())
        .bind(format!("{}/%", resource.resource_path))
        .fetch_all(&mut *self.connection().await?)
        .await?;
        let mut resources = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        resources.sort_by(|a, b| {
            let depth = |r: &Resource| r.resource_path.matches('/').count();
            depth(b).cmp(&depth(a)).then_with(|| a.resource_path.cmp(&b.resource_path))
        });
        Ok(resources)
    }
}
