//! Multi-step operations end to end in one process: the deployment-status updater, the
//! outbox worker and the simulated resource processor, on the in-memory broker.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use steward_api::domain::{Properties, ResourceType, Status, User};
use steward_api::rules::operations::{self, NewResource, OperationContext};
use steward_api::storage::Store;
use steward_api::templates::TemplateRegistry;
use steward_api::workers::DeploymentStatusHandler;
use steward_api::workers::{FailurePolicy, ResourceProcessor};
use steward_api::workers::{OutboxConfig, OutboxWorker};
use steward_core::{Handler, Supervisor, SupervisorConfig, Updater, UpdaterConfig};
use steward_inmem::InMemoryBroker;
use tokio::time::{Instant, sleep};

fn properties(value: serde_json::Value) -> Properties {
    value.as_object().cloned().unwrap_or_default()
}

/// The service's workers for resource operations, on `broker`.
fn start(store: &Store, broker: &InMemoryBroker, failures: FailurePolicy) -> Supervisor {
    let templates = Arc::new(TemplateRegistry::builtin().unwrap());
    let supervisor = Supervisor::new(SupervisorConfig::default());
    let handler = DeploymentStatusHandler::new(store.clone(), templates);
    supervisor.spawn(updater("deployment-status", broker, "deploymentstatus", handler));
    supervisor.spawn(
        OutboxWorker::new(store.clone(), Arc::new(broker.clone()))
            .with_config(OutboxConfig::default().with_poll_interval(Duration::from_millis(50))),
    );
    let processor = ResourceProcessor::new(Arc::new(broker.clone()), "deploymentstatus")
        .with_pause(Duration::from_millis(5), Duration::from_millis(20))
        .with_failures(failures);
    supervisor.spawn(updater("resource-processor-simulator", broker, "workspacequeue", processor));
    supervisor
}

/// Updater `name`: `handler` on `queue` of `broker`, retrying after 200 ms.
fn updater(
    name: &str,
    broker: &InMemoryBroker,
    queue: &'static str,
    handler: impl Handler,
) -> Updater {
    let broker = broker.clone();
    let connect = move || {
        let broker = broker.clone();
        async move { broker.source(queue) }
    };
    Updater::new(name, connect, handler)
        .with_config(UpdaterConfig::default().with_wait(Duration::from_millis(200)))
}

async fn install(store: &Store, new: NewResource) -> (String, String) {
    let templates = TemplateRegistry::builtin().unwrap();
    let user = User::new("u1", "Jane", "jane@example.com");
    let mut tx = store.begin().await.unwrap();
    let created =
        operations::install_resource(&mut tx, OperationContext::new(&templates), new, &user)
            .await
            .unwrap();
    tx.commit().await.unwrap();
    (created.resource.id, created.operation.id)
}

async fn finished(store: &Store, operation_id: &str) -> steward_api::domain::Operation {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let operation = store.read().operation(operation_id).await.unwrap();
        if operation.status != Status::PipelineRunning
            && !operation.status.is_awaiting()
            && !operation.status.is_in_progress()
        {
            return operation;
        }
        assert!(Instant::now() < deadline, "operation stuck: {operation:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// The firewall, a workspace and a Guacamole service, deployed; returns their ids.
async fn parents(store: &Store) -> (String, String, String) {
    let (firewall, op) = install(
        store,
        NewResource {
            template_name: "tre-shared-service-firewall".to_owned(),
            resource_type: ResourceType::SharedService,
            properties: Properties::new(),
            workspace_id: None,
            parent_workspace_service_id: None,
        },
    )
    .await;
    assert_eq!(finished(store, &op).await.status, Status::Deployed);
    let (workspace, op) = install(
        store,
        NewResource {
            template_name: "tre-workspace-base".to_owned(),
            resource_type: ResourceType::Workspace,
            properties: properties(json!({"display_name": "Genomics", "description": "Data"})),
            workspace_id: None,
            parent_workspace_service_id: None,
        },
    )
    .await;
    assert_eq!(finished(store, &op).await.status, Status::Deployed);
    let (service, op) = install(
        store,
        NewResource {
            template_name: "tre-service-guacamole".to_owned(),
            resource_type: ResourceType::WorkspaceService,
            properties: properties(json!({"display_name": "Desktops"})),
            workspace_id: Some(workspace.clone()),
            parent_workspace_service_id: None,
        },
    )
    .await;
    assert_eq!(finished(store, &op).await.status, Status::Deployed);
    (firewall, workspace, service)
}

fn linuxvm(workspace: &str, service: &str) -> NewResource {
    NewResource {
        template_name: "tre-user-resource-linuxvm".to_owned(),
        resource_type: ResourceType::UserResource,
        properties: properties(json!({"display_name": "VM", "os_image": "Ubuntu 22.04 LTS"})),
        workspace_id: Some(workspace.to_owned()),
        parent_workspace_service_id: Some(service.to_owned()),
    }
}

/// Ensures that a linuxvm install (upgrade the firewall, install the VM, upgrade the
/// firewall again) reaches `deployed` with all three steps final, the VM's outputs
/// merged and the firewall patched by both steps.
async fn linuxvm_pipeline_reaches_deployed(store: &Store) {
    let broker = InMemoryBroker::new();
    let supervisor = start(store, &broker, FailurePolicy::ByParameter);
    let (firewall, workspace, service) = parents(store).await;
    let (vm, op) = install(store, linuxvm(&workspace, &service)).await;
    let operation = finished(store, &op).await;
    assert_eq!(operation.status, Status::Deployed, "{operation:?}");
    assert_eq!(operation.message, "Multi step pipeline completed successfully");
    let steps = operation.steps();
    let statuses: Vec<_> = steps.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [Some(Status::Updated), Some(Status::Deployed), Some(Status::Updated)]);
    let vm = store.read().resource(&vm).await.unwrap();
    assert_eq!(vm.properties["ip_address"], "10.1.0.4", "outputs merged");
    let firewall = store.read().resource(&firewall).await.unwrap();
    assert_eq!(firewall.resource_version, 2, "patched by both firewall steps");
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    assert_eq!(broker.dead_letter_count("deploymentstatus"), 0);
    let report = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
}

db_test!(
    linuxvm_pipeline_reaches_deployed_sqlite,
    linuxvm_pipeline_reaches_deployed_postgres,
    linuxvm_pipeline_reaches_deployed
);

/// Ensures that when the last step (the second firewall upgrade) fails, the operation
/// ends `deployment_failed` and the VM is marked so (DESIGN §6: TRE reported success).
async fn failing_last_step_fails_the_operation(store: &Store) {
    let broker = InMemoryBroker::new();
    let upgrades = Arc::new(AtomicUsize::new(0));
    // Fail the second firewall upgrade of the linuxvm pipeline: its last step.
    let failures = FailurePolicy::Custom(Arc::new({
        let upgrades = upgrades.clone();
        move |request| {
            request.action == "upgrade"
                && request.name == "tre-shared-service-firewall"
                && upgrades.fetch_add(1, Ordering::SeqCst) == 1
        }
    }));
    let supervisor = start(store, &broker, failures);
    let (_, workspace, service) = parents(store).await;
    let (vm, op) = install(store, linuxvm(&workspace, &service)).await;
    let operation = finished(store, &op).await;
    assert_eq!(operation.status, Status::DeploymentFailed, "{operation:?}");
    assert_eq!(operation.message, "Multi step pipeline failed on step post-step-1");
    let statuses: Vec<_> = operation.steps().iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [Some(Status::Updated), Some(Status::Deployed), Some(Status::UpdatingFailed)]
    );
    let vm = store.read().resource(&vm).await.unwrap();
    assert_eq!(vm.deployment_status, Some(Status::DeploymentFailed));
    let _ = supervisor.shutdown(Instant::now() + Duration::from_secs(5)).await;
}

db_test!(
    failing_last_step_fails_the_operation_sqlite,
    failing_last_step_fails_the_operation_postgres,
    failing_last_step_fails_the_operation
);
