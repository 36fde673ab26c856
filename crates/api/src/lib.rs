//! The TRE-style control plane of steward: domain model, templates, storage and the
//! rules that change state.
//!
//! steward re-implements the part of the Azure TRE API that keeps resources,
//! operations and airlock requests, and that talks to the resource and airlock
//! processors through queues. Each module is one layer; a layer uses only those above
//! it in this list:
//!
//! - [`domain`]: resources, operations, airlock requests, and the wire messages and
//!   events, with TRE's camelCase names and values;
//! - [`templates`]: resource templates (properties with `required`, `updateable`,
//!   `sensitive`; pipelines per action) and the registry, with four shipped samples;
//! - [`storage`]: the [`Store`](storage::Store) on SQLite or PostgreSQL (sqlx `Any`),
//!   with transactions, etag compare-and-swap, resource history and the transactional
//!   outbox, and the [`Database`](storage::Database) readiness gate;
//! - [`rules`]: creating operations ([`rules::operations`]) and advancing their
//!   pipelines ([`rules::pipelines`]), the airlock transitions and their events
//!   ([`rules::airlock`]), and the `{{ resource.… }}` substitution;
//! - [`http`]: the HTTP API over [`AppState`](http::AppState);
//! - [`workers`]: what runs under the supervisor: the deployment-status and
//!   airlock-status updaters (replay safe, with TRE's log strings), the outbox
//!   publisher, the simulated processors and the watchers;
//! - [`service`]: the wiring: configuration, the transports, and the
//!   [`Service`](service::Service) that starts the workers and serves HTTP.
//!
//! # Examples
//!
//! Install a workspace on a SQLite database in a temporary directory:
//!
//! ```
//! use serde_json::json;
//! use steward_api::storage::Store;
//! use steward_api::domain::{ResourceType, Status, User};
//! use steward_api::rules::operations::{self, NewResource, OperationContext};
//! use steward_api::templates::TemplateRegistry;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::connect(&format!("sqlite://{}?mode=rwc", dir.path().join("steward.db").display())).await?;
//! let templates = TemplateRegistry::builtin()?;
//! let user = User::new("u1", "Jane", "jane@example.com");
//!
//! let mut tx = store.begin().await?;
//! let created = operations::install_resource(
//!     &mut tx,
//!     OperationContext::new(&templates),
//!     NewResource {
//!         template_name: "tre-workspace-base".to_owned(),
//!         resource_type: ResourceType::Workspace,
//!         properties: json!({"display_name": "Genomics", "description": "Sequencing data"})
//!             .as_object()
//!             .cloned()
//!             .unwrap_or_default(),
//!         workspace_id: None,
//!         parent_workspace_service_id: None,
//!     },
//!     &user,
//! )
//! .await?;
//! tx.commit().await?;
//!
//! assert_eq!(created.operation.status, Status::AwaitingDeployment);
//! assert_eq!(store.read().resource(&created.resource.id).await?.properties["display_name"], "Genomics");
//! // The resource request for the processor waits in the outbox.
//! let outbox = store.outbox_messages(10).await?;
//! assert_eq!(outbox[0].message.outgoing.correlation_id.as_deref(), Some(created.operation.id.as_str()));
//! # Ok(())
//! # }
//! ```

#[macro_use]
mod names;
mod opaque;

pub mod domain;
pub mod http;
pub mod rules;
pub mod service;
pub mod storage;
pub mod templates;
pub mod workers;

pub use domain::Clock;

/// Compile-time checks that the futures handlers will spawn are `Send`.
#[cfg(test)]
#[allow(dead_code, clippy::too_many_arguments)]
mod send_checks {
    use crate::domain::{AirlockRequest, OperationStep, Resource, ResourcePatch, User};
    use crate::rules::airlock::{self, AirlockQueues, AirlockUpdate};
    use crate::rules::operations::{self, NewResource, OperationContext};
    use crate::rules::pipelines::{self, StepUpdate};
    use crate::storage::{Store, StoreError, Tx};

    fn is_send<T: Send>(_: T) {}

    fn futures_are_send(
        store: &Store,
        tx: &mut Tx,
        context: OperationContext<'_>,
        new: NewResource,
        step: &OperationStep,
        resource: &Resource,
        request: &AirlockRequest,
        user: &User,
    ) {
        is_send(store.begin());
        is_send(store.patch_resource_with_retries("id", 3, user, |_| async {
            Ok::<_, StoreError>(ResourcePatch::default())
        }));
        is_send(tx.patch_resource_with_retries("id", 3, user, |_| {
            Ok::<_, StoreError>(ResourcePatch::default())
        }));
        is_send(operations::install_resource(tx, context, new, user));
        is_send(operations::create_operation(tx, context, resource, "install", user, false));
        is_send(operations::upgrade_resource(tx, context, "id", Default::default(), None, user));
        is_send(pipelines::update_resource_for_step(
            tx,
            context.templates,
            StepUpdate {
                step,
                root_resource: None,
                step_resource: None,
                resource_to_update_id: "id",
                primary_action: "install",
                user,
            },
        ));
        is_send(airlock::update_request(tx, request, user, AirlockUpdate::default()));
        is_send(airlock::submit(tx, &AirlockQueues::default(), "id", user));
    }
}
