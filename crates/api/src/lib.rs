//! The TRE-style control plane of steward: domain model, templates, storage and the
//! rules that change state.
//!
//! steward re-implements the part of the Azure TRE API that keeps resources,
//! operations and airlock requests, and that talks to the resource and airlock
//! processors through queues. This crate holds:
//!
//! - [`domain`]: resources, operations, airlock requests, and the wire messages and
//!   events, with TRE's camelCase names and values;
//! - [`templates`]: resource templates (properties with `required`, `updateable`,
//!   `sensitive`; pipelines per action) and the registry, with four shipped samples;
//! - [`db`]: the [`Store`](db::Store) on SQLite or PostgreSQL (sqlx `Any`), with
//!   transactions, etag compare-and-swap, resource history and the transactional outbox;
//! - [`operations`]: creating operations (steps from the template pipeline, property
//!   validation, `"REDACTED"` sensitive values, the first resource request in the
//!   outbox) and advancing pipelines ([`operations::update_resource_for_step`]);
//! - [`substitution`]: the `{{ resource.… }}` property substitution of pipeline steps;
//! - [`airlock`]: the airlock transition rules and their events;
//! - [`outbox`]: the worker that publishes the outbox;
//! - [`simulators`]: stand-ins for TRE's resource and airlock processors;
//! - [`updaters`]: the deployment-status and airlock-status handlers (core
//!   [`Handler`](steward_core::Handler)s), replay safe, with TRE's log strings.
//!
//! # Examples
//!
//! Install a workspace on a SQLite database in a temporary directory:
//!
//! ```
//! use serde_json::json;
//! use steward_api::db::Store;
//! use steward_api::domain::{ResourceType, Status, User};
//! use steward_api::operations::{self, NewResource, OperationContext};
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
//! assert_eq!(store.resource(&created.resource.id).await?.properties["display_name"], "Genomics");
//! // The resource request for the processor waits in the outbox.
//! let outbox = store.outbox_messages(10).await?;
//! assert_eq!(outbox[0].message.correlation_id.as_deref(), Some(created.operation.id.as_str()));
//! # Ok(())
//! # }
//! ```

pub mod airlock;
pub mod app;
pub mod clock;
pub mod config;
pub mod db;
pub mod domain;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod http;
pub mod metrics;
pub mod operations;
pub mod outbox;
pub mod service;
pub mod simulators;
pub mod substitution;
pub mod templates;
pub mod transport;
pub mod updaters;
pub mod workers;

pub use clock::Clock;

/// Compile-time checks that the futures handlers will spawn are `Send`.
#[cfg(test)]
#[allow(dead_code, clippy::too_many_arguments)]
mod send_checks {
    use crate::airlock::{self, AirlockQueues, AirlockUpdate};
    use crate::db::{Store, StoreError, Tx};
    use crate::domain::{AirlockRequest, OperationStep, Resource, ResourcePatch, User};
    use crate::operations::{self, NewResource, OperationContext, StepUpdate};

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
        is_send(operations::update_resource_for_step(
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
