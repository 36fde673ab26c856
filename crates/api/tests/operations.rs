//! Operation creation and pipeline steps: every case runs on SQLite and on PostgreSQL
//! (`*_postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use steward_api::domain::{
    MAIN_STEP_ID, Operation, Properties, Resource, ResourceRequest, ResourceType, Status, User,
};
use steward_api::rules::operations::{
    self, Created, NewResource, OperationContext, OperationError,
};
use steward_api::rules::pipelines::{self, StepUpdate};
use steward_api::storage::{OutboxRecord, Store};
use steward_api::templates::{PropertyError, REDACTED, TemplateRegistry};
use support::{
    firewall, guacamole, linuxvm_request, new_resource, props, set_status, templates, user,
    workspace_props,
};

mod cases {
    use super::*;

    /// Gives an operation a final status, as the resource processor's last report would.
    async fn finish_operation(
        tx: &mut steward_api::storage::Tx,
        operation: &Operation,
        status: Status,
    ) {
        let mut stored = tx.read().operation(&operation.id).await.unwrap();
        stored.status = status;
        tx.replace_operation(&stored).await.unwrap();
    }

    pub(super) async fn install(
        store: &Store,
        registry: &TemplateRegistry,
        new: NewResource,
    ) -> Result<Created, OperationError> {
        let mut tx = store.begin().await.unwrap();
        let created =
            operations::install_resource(&mut tx, OperationContext::new(registry), new, &user())
                .await?;
        tx.commit().await.unwrap();
        Ok(created)
    }

    /// Uninstalls resource `id` (and, with `cascade`, its children) in a transaction of
    /// its own, committed when the operation was created.
    pub(super) async fn uninstall(
        store: &Store,
        registry: &TemplateRegistry,
        id: &str,
        cascade: bool,
    ) -> Result<Operation, OperationError> {
        let mut tx = store.begin().await.unwrap();
        let operation = operations::uninstall_resource(
            &mut tx,
            OperationContext::new(registry),
            id,
            &user(),
            cascade,
        )
        .await?;
        tx.commit().await.unwrap();
        Ok(operation)
    }

    pub(super) async fn workspace(
        store: &Store,
        registry: &TemplateRegistry,
        extra: Value,
    ) -> Resource {
        let mut properties = workspace_props();
        properties.extend(props(extra));
        let created = install(
            store,
            registry,
            new_resource("tre-workspace-base", ResourceType::Workspace, properties),
        )
        .await
        .unwrap();
        set_status(store, &created.resource.id, Status::Deployed).await
    }

    /// The outbox rows of one operation, with their bodies parsed.
    pub(super) async fn requests(
        store: &Store,
        operation: &Operation,
    ) -> Vec<(OutboxRecord, ResourceRequest)> {
        store
            .outbox_messages(1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|row| {
                row.message.outgoing.correlation_id.as_deref() == Some(operation.id.as_str())
            })
            .map(|row| {
                let body = serde_json::from_slice(&row.message.outgoing.body).unwrap();
                (row, body)
            })
            .collect()
    }

    /// Ensures that (reference §10.3.1) install and uninstall each write exactly one
    /// resource request, with correlation id = operation id, session id = resource id,
    /// and the resource id and action in the body.
    pub(super) async fn tre_10_3_01_install_and_uninstall_send_one_request(store: &Store) {
        let registry = templates();
        let ws = workspace(store, &registry, json!({})).await;
        let install_op = store.read().operations_for_resource(&ws.id).await.unwrap().remove(0);
        let uninstall_op = uninstall(store, &registry, &ws.id, false).await.unwrap();
        for (operation, action) in [(&install_op, "install"), (&uninstall_op, "uninstall")] {
            let sent = requests(store, operation).await;
            assert_eq!(sent.len(), 1, "{action}");
            let (row, body) = &sent[0];
            assert_eq!(row.message.queue, "workspacequeue");
            assert_eq!(row.message.outgoing.correlation_id.as_deref(), Some(operation.id.as_str()));
            assert_eq!(row.message.outgoing.session_id.as_deref(), Some(ws.id.as_str()));
            assert_eq!(row.message.aggregate_id, ws.id);
            assert_eq!(body.id, ws.id);
            assert_eq!(body.action, action);
            assert_eq!(body.operation_id, operation.id);
            assert_eq!(body.step_id, operation.steps()[0].id);
            assert_eq!(
                (body.name.as_str(), body.version.as_str()),
                ("tre-workspace-base", "1.0.0")
            );
        }
        assert_eq!(store.outbox_backlog().await.unwrap(), 2);
    }

    /// Ensures that a template without a pipeline gives one main step, with TRE's
    /// initial status and message, and that the resource is stored with defaults.
    pub(super) async fn single_step_install_creates_one_main_step(store: &Store) {
        let registry = templates();
        let created = install(
            store,
            &registry,
            new_resource("tre-workspace-base", ResourceType::Workspace, workspace_props()),
        )
        .await
        .unwrap();
        let (resource, operation) = (&created.resource, &created.operation);
        assert_eq!(resource.resource_path, format!("/workspaces/{}", resource.id));
        assert_eq!(resource.deployment_status, Some(Status::AwaitingDeployment));
        assert_eq!(resource.properties["address_space_size"], "small", "default added");
        assert_eq!(resource.user, user());
        assert_eq!(store.read().resource(&resource.id).await.unwrap(), *resource);

        assert_eq!(operation.status, Status::AwaitingDeployment);
        assert_eq!(operation.message, "This resource is waiting to be deployed");
        assert_eq!(
            (operation.action.as_str(), operation.resource_id.as_str()),
            ("install", resource.id.as_str())
        );
        assert_eq!(operation.resource_path, resource.resource_path);
        assert_eq!(operation.created_when, operation.updated_when);
        assert_eq!(operation.steps().len(), 1);
        let step = &operation.steps()[0];
        assert_eq!(step.template_step_id, MAIN_STEP_ID);
        assert_eq!(
            step.step_title.as_deref(),
            Some(format!("Main step for {}", resource.id).as_str())
        );
        assert_eq!(step.resource_id.as_deref(), Some(resource.id.as_str()));
        assert_eq!(step.resource_type, Some(ResourceType::Workspace));
        assert_eq!(step.resource_action.as_deref(), Some("install"));
        assert_eq!(step.status, Some(Status::AwaitingDeployment));
        assert_eq!(step.message.as_deref(), Some("This resource is waiting to be deployed"));
        assert_eq!(step.source_template_resource_id.as_deref(), Some(resource.id.as_str()));
        assert_eq!(store.read().operation(&operation.id).await.unwrap(), *operation);
    }

    /// Ensures that a linuxvm install is the 3-step pipeline of its template: upgrade the
    /// firewall, install the VM, upgrade the firewall again; that the first request goes
    /// to the firewall with the substituted rule; and that the firewall was patched.
    pub(super) async fn linuxvm_install_builds_the_three_step_pipeline(store: &Store) {
        let registry = templates();
        let ws = workspace(store, &registry, json!({})).await;
        let svc = guacamole(store, &registry, &ws).await;
        let fw = firewall(store, &registry).await;
        let created = install(store, &registry, linuxvm_request(&ws, &svc)).await.unwrap();
        let (vm, operation) = (&created.resource, &created.operation);
        assert_eq!(vm.resource_path, format!("{}/user-resources/{}", svc.resource_path, vm.id));
        assert_eq!(vm.owner_id(), Some("u1"));
        assert_eq!(operation.status, Status::AwaitingDeployment);
        let shape: Vec<_> = operation
            .steps()
            .iter()
            .map(|s| {
                (
                    s.template_step_id.as_str(),
                    s.resource_id.clone().unwrap(),
                    s.resource_type.unwrap(),
                    s.resource_action.clone().unwrap(),
                    s.status.unwrap(),
                    s.message.clone().unwrap(),
                )
            })
            .collect();
        let awaiting_update = "This resource is waiting to be updated".to_owned();
        assert_eq!(
            shape,
            [
                (
                    "pre-step-1",
                    fw.id.clone(),
                    ResourceType::SharedService,
                    "upgrade".to_owned(),
                    Status::AwaitingUpdate,
                    awaiting_update.clone()
                ),
                (
                    "main",
                    vm.id.clone(),
                    ResourceType::UserResource,
                    "install".to_owned(),
                    Status::AwaitingDeployment,
                    "This resource is waiting to be deployed".to_owned()
                ),
                (
                    "post-step-1",
                    fw.id.clone(),
                    ResourceType::SharedService,
                    "upgrade".to_owned(),
                    Status::AwaitingUpdate,
                    awaiting_update
                ),
            ]
        );
        for step in operation.steps() {
            assert_eq!(step.source_template_resource_id.as_deref(), Some(vm.id.as_str()));
        }
        assert_eq!(
            operation.steps()[0].resource_template_name.as_deref(),
            Some("tre-shared-service-firewall")
        );
        assert_eq!(
            operation.steps()[0].step_title.as_deref(),
            Some("Allow package sources through the firewall")
        );

        let sent = requests(store, operation).await;
        assert_eq!(sent.len(), 1);
        let (row, body) = &sent[0];
        assert_eq!(row.message.outgoing.session_id.as_deref(), Some(fw.id.as_str()));
        assert_eq!(
            (body.id.as_str(), body.action.as_str(), body.step_id.as_str()),
            (fw.id.as_str(), "upgrade", operation.steps()[0].id.as_str())
        );
        let rule = &body.parameters["rule_collections"][0];
        assert_eq!(rule["name"], format!("arc_linuxvm_{}", vm.id));
        assert_eq!(rule["description"], "Package sources for My VM in workspace Genomics");
        assert_eq!(rule["rules"][0]["description"], format!("Deployed by {}", vm.id));

        let patched = store.read().resource(&fw.id).await.unwrap();
        assert_eq!(patched.resource_version, fw.resource_version + 1);
        assert_eq!(patched.properties["rule_collections"], body.parameters["rule_collections"]);
        assert_eq!(store.read().resource_history(&fw.id).await.unwrap().len(), 1);
    }

    /// Ensures that a linuxvm without a deployed firewall is a typed client error naming
    /// the firewall, and that nothing is written.
    pub(super) async fn linuxvm_without_firewall_is_missing_prerequisite(store: &Store) {
        let registry = templates();
        let ws = workspace(store, &registry, json!({})).await;
        let svc = guacamole(store, &registry, &ws).await;
        let before = store.outbox_backlog().await.unwrap();
        for firewall_status in [None, Some(Status::Deleted), Some(Status::DeploymentFailed)] {
            if let Some(status) = firewall_status {
                let fw = firewall(store, &registry).await;
                set_status(store, &fw.id, status).await;
            }
            let mut tx = store.begin().await.unwrap();
            let error = operations::install_resource(
                &mut tx,
                OperationContext::new(&registry),
                linuxvm_request(&ws, &svc),
                &user(),
            )
            .await
            .unwrap_err();
            tx.rollback().await.unwrap();
            assert!(matches!(error, OperationError::MissingPrerequisite { .. }), "{error:?}");
            assert!(error.is_client_error() && !error.is_unavailable());
            let text = error.to_string();
            assert!(
                text.contains("tre-shared-service-firewall") && text.contains("pre-step-1"),
                "{text}"
            );
        }
        let filter = steward_api::storage::ResourceFilter {
            resource_type: Some(ResourceType::UserResource),
            ..Default::default()
        };
        assert!(store.read().resources(&filter).await.unwrap().is_empty());
        assert_eq!(
            store.outbox_backlog().await.unwrap(),
            before + 2,
            "only the two firewall installs"
        );
    }

    /// Ensures that sensitive properties are stored as `REDACTED` on install and
    /// upgrade, while the first resource request carries the real value.
    pub(super) async fn sensitive_values_only_in_the_first_request(store: &Store) {
        let registry = templates();
        let created = install(
            store,
            &registry,
            new_resource("tre-workspace-base", ResourceType::Workspace, {
                let mut p = workspace_props();
                p.insert("client_secret".to_owned(), json!("first-secret"));
                p
            }),
        )
        .await
        .unwrap();
        let id = created.resource.id.clone();
        assert_eq!(created.resource.properties["client_secret"], REDACTED);
        assert_eq!(store.read().resource(&id).await.unwrap().properties["client_secret"], REDACTED);
        let sent = requests(store, &created.operation).await;
        assert_eq!(sent[0].1.parameters["client_secret"], "first-secret");

        set_status(store, &id, Status::Deployed).await;
        let mut tx = store.begin().await.unwrap();
        let upgraded = operations::upgrade_resource(
            &mut tx,
            OperationContext::new(&registry),
            &id,
            props(json!({"client_secret": "second-secret", "display_name": "Renamed"})),
            None,
            &user(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let stored = store.read().resource(&id).await.unwrap();
        assert_eq!(stored.properties["client_secret"], REDACTED);
        assert_eq!(stored.properties["display_name"], "Renamed");
        assert_eq!(upgraded.resource, stored);
        let sent = requests(store, &upgraded.operation).await;
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.action, "upgrade");
        assert_eq!(sent[0].1.parameters["client_secret"], "second-secret");
        assert_eq!(sent[0].1.parameters["display_name"], "Renamed");
        let bodies: Vec<String> = store
            .outbox_messages(100)
            .await
            .unwrap()
            .into_iter()
            .map(|row| String::from_utf8_lossy(&row.message.outgoing.body).into_owned())
            .collect();
        assert_eq!(bodies.iter().filter(|body| body.contains("first-secret")).count(), 1);
        assert_eq!(bodies.iter().filter(|body| body.contains("second-secret")).count(), 1);
        let history = store.read().resource_history(&id).await.unwrap();
        assert!(history.iter().all(|item| item.properties["client_secret"] == REDACTED));
    }

    /// Ensures that (reference §10.3.2) advancing a pre-step patches the shared service
    /// once with the step's properties, with the operation's user, as an upgrade.
    pub(super) async fn tre_10_3_02_update_resource_for_step_patches_shared_service(store: &Store) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("svc.json"),
            json!({
                "name": "svc-with-pre-step", "version": "1.0.0", "resourceType": "workspace-service",
                "properties": {"display_name": {"type": "string"}},
                "pipeline": {"install": [
                    {"stepId": "pre-step-1", "resourceTemplateName": "tre-shared-service-firewall",
                     "resourceType": "shared-service", "resourceAction": "upgrade",
                     "properties": [{"name": "display_name", "type": "string", "value": "new name"}]},
                    {"stepId": "main"}
                ]}
            })
            .to_string(),
        )
        .unwrap();
        let registry = TemplateRegistry::load(Some(dir.path())).unwrap();
        let ws = workspace(store, &registry, json!({})).await;
        let fw = firewall(store, &registry).await;
        let operator = User::new("operator", "Op", "op@example.com");
        let mut request = new_resource(
            "svc-with-pre-step",
            ResourceType::WorkspaceService,
            props(json!({"display_name": "S"})),
        );
        request.workspace_id = Some(ws.id.clone());
        let mut tx = store.begin().await.unwrap();
        let created = operations::install_resource(
            &mut tx,
            OperationContext::new(&registry),
            request,
            &operator,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();

        let patched = store.read().resource(&fw.id).await.unwrap();
        assert_eq!(patched.properties["display_name"], "new name");
        assert_eq!(patched.resource_version, fw.resource_version + 1, "patched exactly once");
        assert_eq!(patched.user, operator);
        let history = store.read().resource_history(&fw.id).await.unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].properties["display_name"], "Firewall");
        let sent = requests(store, &created.operation).await;
        assert_eq!(sent[0].1.action, "upgrade");
        assert_eq!(sent[0].1.parameters["display_name"], "new name");
    }

    /// Ensures that `update_resource_for_step` on the linuxvm's post-step reads the
    /// VM's outputs and merges its rule into the firewall, and on uninstall removes it.
    pub(super) async fn update_resource_for_step_runs_post_steps(store: &Store) {
        let registry = templates();
        let ws = workspace(store, &registry, json!({})).await;
        let svc = guacamole(store, &registry, &ws).await;
        firewall(store, &registry).await;
        let created = install(store, &registry, linuxvm_request(&ws, &svc)).await.unwrap();
        // The resource processor deployed the VM and reported its address.
        let mut tx = store.begin().await.unwrap();
        let mut vm = tx.read().resource(&created.resource.id).await.unwrap();
        vm.properties.insert("ip_address".to_owned(), json!("10.1.2.3"));
        vm.deployment_status = Some(Status::Deployed);
        tx.replace_resource(&vm).await.unwrap();
        finish_operation(&mut tx, &created.operation, Status::Deployed).await;
        let post = &created.operation.steps()[2];
        let fw_id = post.resource_id.clone().unwrap();
        let to_send = pipelines::update_resource_for_step(
            &mut tx,
            &registry,
            StepUpdate {
                step: post,
                root_resource: None,
                step_resource: None,
                resource_to_update_id: &fw_id,
                primary_action: "install",
                user: &user(),
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            to_send,
            store.read().resource(&fw_id).await.unwrap(),
            "returns the updated firewall"
        );
        let collection = &to_send.properties["network_rule_collections"][0];
        assert_eq!(collection["name"], format!("nrc_linuxvm_{}", vm.id));
        assert_eq!(collection["rules"][0]["source_addresses"], json!(["10.1.2.3"]));
        assert_eq!(collection["rules"][0]["description"], "Outbound traffic of My VM");
        assert_eq!(
            to_send.properties["rule_collections"].as_array().unwrap().len(),
            1,
            "pre-step rule kept"
        );

        let mut tx = store.begin().await.unwrap();
        let uninstall = operations::uninstall_resource(
            &mut tx,
            OperationContext::new(&registry),
            &vm.id,
            &user(),
            false,
        )
        .await
        .unwrap();
        let steps: Vec<&str> =
            uninstall.steps().iter().map(|s| s.template_step_id.as_str()).collect();
        assert_eq!(steps, ["main", "post-step-1"]);
        assert_eq!(uninstall.status, Status::AwaitingDeletion);
        let remove = &uninstall.steps()[1];
        let after = pipelines::update_resource_for_step(
            &mut tx,
            &registry,
            StepUpdate {
                step: remove,
                root_resource: None,
                step_resource: None,
                resource_to_update_id: &fw_id,
                primary_action: "uninstall",
                user: &user(),
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(after.properties["rule_collections"], json!([]));
        assert_eq!(after.properties["network_rule_collections"], json!([]));
        let sent = requests(store, &uninstall).await;
        assert_eq!(
            (sent[0].1.id.as_str(), sent[0].1.action.as_str()),
            (vm.id.as_str(), "uninstall")
        );
    }

    /// Ensures that an upgrade changes only `updateable` properties, records history,
    /// respects the caller's etag, and queues an `upgrade` operation.
    pub(super) async fn upgrade_checks_properties_and_etag(store: &Store) {
        let registry = templates();
        let ws = workspace(store, &registry, json!({})).await;
        let context = OperationContext::new(&registry);
        let mut tx = store.begin().await.unwrap();
        let error = operations::upgrade_resource(
            &mut tx,
            context,
            &ws.id,
            props(json!({"address_space_size": "large"})),
            None,
            &user(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(error, OperationError::InvalidProperties(PropertyError::NotUpdateable { .. })),
            "{error:?}"
        );
        let error = operations::upgrade_resource(
            &mut tx,
            context,
            &ws.id,
            props(json!({"display_name": "X"})),
            Some("stale"),
            &user(),
        )
        .await
        .unwrap_err();
        assert!(
            error.is_client_error()
                && matches!(&error, OperationError::Store(e) if e.is_etag_mismatch()),
            "{error:?}"
        );
        let upgraded = operations::upgrade_resource(
            &mut tx,
            context,
            &ws.id,
            props(json!({"display_name": "X"})),
            Some(&ws.etag),
            &user(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(upgraded.resource.resource_version, ws.resource_version + 1);
        assert_eq!(upgraded.operation.status, Status::AwaitingUpdate);
        assert_eq!(upgraded.operation.message, "This resource is waiting to be updated");
        assert_eq!(upgraded.operation.resource_version, upgraded.resource.resource_version);
        assert_eq!(
            store.read().resource_history(&ws.id).await.unwrap().last().unwrap().properties["display_name"],
            "Genomics"
        );
        let error = {
            let mut tx = store.begin().await.unwrap();
            operations::upgrade_resource(
                &mut tx,
                context,
                "missing",
                Properties::new(),
                None,
                &user(),
            )
            .await
            .unwrap_err()
        };
        assert!(error.is_not_found() && error.is_client_error(), "{error:?}");
    }

    /// Ensures that only custom actions the template declares can be invoked, with
    /// TRE's `awaiting_action` status.
    pub(super) async fn custom_actions_must_be_declared(store: &Store) {
        let registry = templates();
        let ws = workspace(store, &registry, json!({})).await;
        let svc = guacamole(store, &registry, &ws).await;
        firewall(store, &registry).await;
        let vm = install(store, &registry, linuxvm_request(&ws, &svc)).await.unwrap().resource;
        set_status(store, &vm.id, Status::Deployed).await;
        let context = OperationContext::new(&registry);
        let mut tx = store.begin().await.unwrap();
        let started =
            operations::invoke_action(&mut tx, context, &vm.id, "start", &user()).await.unwrap();
        assert_eq!(started.status, Status::AwaitingAction);
        assert_eq!(started.message, "This resource is waiting for an action to be invoked");
        assert_eq!(started.steps().len(), 1, "custom actions have no pipeline");
        let error = operations::invoke_action(&mut tx, context, &vm.id, "reboot", &user())
            .await
            .unwrap_err();
        assert!(matches!(error, OperationError::ActionNotAvailable { .. }), "{error:?}");
        tx.commit().await.unwrap();
        let sent = requests(store, &started).await;
        assert_eq!((sent[0].1.action.as_str(), sent[0].1.id.as_str()), ("start", vm.id.as_str()));
        assert_eq!(
            sent[0].1.parameters["admin_password"], REDACTED,
            "later requests read the stored values"
        );
    }

    /// Ensures that a cascading uninstall has one step per resource, deepest first, and
    /// sends the first request for the deepest one.
    pub(super) async fn cascade_uninstall_goes_deepest_first(store: &Store) {
        let registry = templates();
        let ws = workspace(store, &registry, json!({})).await;
        let svc = guacamole(store, &registry, &ws).await;
        let operation = uninstall(store, &registry, &ws.id, true).await.unwrap();
        let targets: Vec<_> =
            operation.steps().iter().map(|s| s.resource_id.clone().unwrap()).collect();
        assert_eq!(targets, [svc.id.clone(), ws.id.clone()]);
        assert!(operation.steps().iter().all(|s| s.status == Some(Status::AwaitingDeletion)));
        let sent = requests(store, &operation).await;
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0.message.outgoing.session_id.as_deref(), Some(svc.id.as_str()));
    }

    /// Ensures that installs check the template, the resource type and the parents.
    pub(super) async fn install_checks_templates_and_parents(store: &Store) {
        let registry = templates();
        let ws = workspace(store, &registry, json!({})).await;
        let svc = guacamole(store, &registry, &ws).await;
        let attempt = |request: NewResource| {
            let registry = &registry;
            async move {
                let mut tx = store.begin().await.unwrap();
                operations::install_resource(
                    &mut tx,
                    OperationContext::new(registry),
                    request,
                    &user(),
                )
                .await
                .unwrap_err()
            }
        };
        let error = attempt(new_resource("nope", ResourceType::Workspace, workspace_props())).await;
        assert!(matches!(error, OperationError::TemplateNotFound { .. }), "{error:?}");
        let error = attempt(new_resource(
            "tre-workspace-base",
            ResourceType::SharedService,
            workspace_props(),
        ))
        .await;
        assert!(matches!(error, OperationError::WrongResourceType { .. }), "{error:?}");
        let error = attempt(new_resource(
            "tre-workspace-base",
            ResourceType::Workspace,
            props(json!({"display_name": "x"})),
        ))
        .await;
        assert!(
            matches!(error, OperationError::InvalidProperties(PropertyError::Required { .. })),
            "{error:?}"
        );
        let error = attempt(new_resource(
            "tre-service-guacamole",
            ResourceType::WorkspaceService,
            props(json!({"display_name": "d"})),
        ))
        .await;
        assert!(
            matches!(error, OperationError::MissingField { field: "workspaceId", .. }),
            "{error:?}"
        );
        let mut orphan = new_resource(
            "tre-service-guacamole",
            ResourceType::WorkspaceService,
            props(json!({"display_name": "d"})),
        );
        orphan.workspace_id = Some(svc.id.clone());
        let error = attempt(orphan).await;
        assert!(matches!(error, OperationError::InvalidParent { .. }), "{error:?}");
        let mut vm = linuxvm_request(&ws, &svc);
        vm.parent_workspace_service_id = None;
        let error = attempt(vm).await;
        assert!(
            matches!(error, OperationError::MissingField { field: "parentWorkspaceServiceId", .. }),
            "{error:?}"
        );
        let other_ws = workspace(store, &registry, json!({})).await;
        let error = attempt(linuxvm_request(&other_ws, &svc)).await;
        assert!(
            matches!(error, OperationError::InvalidParent { .. }) && error.is_client_error(),
            "{error:?}"
        );

        set_status(store, &ws.id, Status::Deleted).await;
        let error = uninstall(store, &registry, &ws.id, false).await.unwrap_err();
        assert!(matches!(error, OperationError::ResourceDeleted { .. }), "{error:?}");
    }

    /// Ensures that the configured queue receives the resource requests.
    pub(super) async fn resource_requests_go_to_the_configured_queue(store: &Store) {
        let registry = templates();
        let context =
            OperationContext { templates: &registry, resource_request_queue: "custom-queue" };
        let mut tx = store.begin().await.unwrap();
        let created = operations::install_resource(
            &mut tx,
            context,
            new_resource("tre-workspace-base", ResourceType::Workspace, workspace_props()),
            &user(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let sent = requests(store, &created.operation).await;
        assert_eq!(sent[0].0.message.queue, "custom-queue");
    }
}

db_test!(
    tre_10_3_01_install_and_uninstall_send_one_request,
    tre_10_3_01_install_and_uninstall_send_one_request_postgres,
    cases::tre_10_3_01_install_and_uninstall_send_one_request
);
db_test!(
    tre_10_3_02_update_resource_for_step_patches_shared_service,
    tre_10_3_02_update_resource_for_step_patches_shared_service_postgres,
    cases::tre_10_3_02_update_resource_for_step_patches_shared_service
);
db_test!(
    single_step_install_creates_one_main_step_sqlite,
    single_step_install_creates_one_main_step_postgres,
    cases::single_step_install_creates_one_main_step
);
db_test!(
    linuxvm_install_builds_the_three_step_pipeline_sqlite,
    linuxvm_install_builds_the_three_step_pipeline_postgres,
    cases::linuxvm_install_builds_the_three_step_pipeline
);
db_test!(
    linuxvm_without_firewall_is_missing_prerequisite_sqlite,
    linuxvm_without_firewall_is_missing_prerequisite_postgres,
    cases::linuxvm_without_firewall_is_missing_prerequisite
);
db_test!(
    sensitive_values_only_in_the_first_request_sqlite,
    sensitive_values_only_in_the_first_request_postgres,
    cases::sensitive_values_only_in_the_first_request
);
db_test!(
    update_resource_for_step_runs_post_steps_sqlite,
    update_resource_for_step_runs_post_steps_postgres,
    cases::update_resource_for_step_runs_post_steps
);
db_test!(
    upgrade_checks_properties_and_etag_sqlite,
    upgrade_checks_properties_and_etag_postgres,
    cases::upgrade_checks_properties_and_etag
);
db_test!(
    custom_actions_must_be_declared_sqlite,
    custom_actions_must_be_declared_postgres,
    cases::custom_actions_must_be_declared
);
db_test!(
    cascade_uninstall_goes_deepest_first_sqlite,
    cascade_uninstall_goes_deepest_first_postgres,
    cases::cascade_uninstall_goes_deepest_first
);
db_test!(
    install_checks_templates_and_parents_sqlite,
    install_checks_templates_and_parents_postgres,
    cases::install_checks_templates_and_parents
);
db_test!(
    resource_requests_go_to_the_configured_queue_sqlite,
    resource_requests_go_to_the_configured_queue_postgres,
    cases::resource_requests_go_to_the_configured_queue
);
