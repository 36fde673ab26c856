//! Issue 16 §3: a resource's status cannot go backwards across operations. A second
//! operation on a resource is refused while its first runs, and a late status report of
//! an older operation does not overwrite what a newer one wrote. Each case runs on
//! SQLite and on PostgreSQL (`*_postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;

use steward_api::domain::{Operation, Status};
use steward_api::rules::operations::{self, OperationContext, OperationError};
use steward_api::workers::DeploymentStatusHandler;
use steward_core::{Handler, Outcome};
use support::{
    Logs, TestDb, install, linuxvm_pipeline, linuxvm_request, status_message, templates, user,
    workspace_installing,
};

mod cases {
    use super::*;

    async fn report(db: &TestDb, operation: &Operation, index: usize, status: Status) {
        let handler = DeploymentStatusHandler::new(db.store.clone(), templates());
        let outcome =
            handler.handle(Arc::new(status_message(operation, index, status, "report"))).await;
        assert_eq!(outcome, Outcome::Complete, "{status}");
    }

    async fn uninstall(db: &TestDb, id: &str) -> Result<Operation, OperationError> {
        let registry = templates();
        let mut tx = db.store.begin().await.unwrap();
        let result = operations::uninstall_resource(
            &mut tx,
            OperationContext::new(&registry),
            id,
            &user(),
            false,
        )
        .await;
        if result.is_ok() {
            tx.commit().await.unwrap();
        }
        result
    }

    /// Ensures that an uninstall (or upgrade, or action) is refused while the resource's
    /// install runs, naming the install; once the install reports a final status the
    /// uninstall goes ahead.
    pub(super) async fn a_second_operation_waits_for_the_first(db: &TestDb) {
        let registry = templates();
        let (ws, install_op) = workspace_installing(&db.store, &registry).await;
        report(db, &install_op, 0, Status::Deploying).await;
        let error = uninstall(db, &ws.id).await.unwrap_err();
        match &error {
            OperationError::OperationInProgress { resource_id, operation_id, action, status } => {
                assert_eq!(
                    (resource_id, operation_id, action.as_str(), *status),
                    (&ws.id, &install_op.id, "install", Status::Deploying)
                );
            }
            other => panic!("expected OperationInProgress, got {other:?}"),
        }
        assert!(error.to_string().contains(&install_op.id), "{error}");
        let mut tx = db.store.begin().await.unwrap();
        let upgrade = operations::upgrade_resource(
            &mut tx,
            OperationContext::new(&registry),
            &ws.id,
            support::props(serde_json::json!({"description": "new"})),
            None,
            &user(),
        )
        .await
        .unwrap_err();
        assert!(matches!(upgrade, OperationError::OperationInProgress { .. }), "{upgrade:?}");
        drop(tx);
        report(db, &install_op, 0, Status::Deployed).await;
        let uninstall_op = uninstall(db, &ws.id).await.unwrap();
        assert_eq!(uninstall_op.status, Status::AwaitingDeletion);
    }

    /// Ensures the reordering of issue 16 §3: operation 1 (install) fails, operation 2
    /// (uninstall) deletes the resource, and then a delayed `deployed` of operation 1
    /// arrives. The resource stays deleted; the late report is logged, not applied to
    /// the resource.
    pub(super) async fn a_late_report_of_an_older_operation_does_not_revive(db: &TestDb) {
        let registry = templates();
        let (ws, first) = workspace_installing(&db.store, &registry).await;
        report(db, &first, 0, Status::Deploying).await;
        report(db, &first, 0, Status::DeploymentFailed).await;
        let second = uninstall(db, &ws.id).await.unwrap();
        report(db, &second, 0, Status::Deleting).await;
        report(db, &second, 0, Status::Deleted).await;
        let logs = Logs::default();
        let _guard = logs.install();
        report(db, &first, 0, Status::Deployed).await;
        let resource = db.store.read().resource(&ws.id).await.unwrap();
        assert_eq!(resource.deployment_status, Some(Status::Deleted), "not brought back");
        let listed = db.store.read().operation(&second.id).await.unwrap();
        assert_eq!(listed.status, Status::Deleted);
        let warning = logs
            .events()
            .into_iter()
            .find(|event| event.level == tracing::Level::WARN)
            .expect("the superseded write is logged");
        assert_eq!(warning.fields["operation_id"], first.id);
        assert_eq!(warning.fields["resource_id"], ws.id);
    }

    /// Ensures that uninstalling a workspace or a workspace service is refused while an
    /// operation runs on anything under it (here a user resource's install), naming
    /// that operation and its resource, cascading or not; once it has finished, the
    /// uninstall goes ahead.
    pub(super) async fn an_uninstall_waits_for_operations_under_it(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let ws_id = pipeline.vm.workspace_id().unwrap().to_owned();
        let service_id = pipeline.vm.parent_workspace_service_id().unwrap().to_owned();
        for parent in [&ws_id, &service_id] {
            for cascade in [false, true] {
                let mut tx = db.store.begin().await.unwrap();
                let error = operations::uninstall_resource(
                    &mut tx,
                    OperationContext::new(&registry),
                    parent,
                    &user(),
                    cascade,
                )
                .await
                .unwrap_err();
                drop(tx);
                match &error {
                    OperationError::OperationInProgress {
                        resource_id,
                        operation_id,
                        action,
                        ..
                    } => {
                        assert_eq!(
                            (resource_id, operation_id, action.as_str()),
                            (&pipeline.vm.id, &pipeline.operation.id, "install"),
                            "uninstalling {parent} (cascade {cascade})"
                        );
                    }
                    other => panic!("expected OperationInProgress, got {other:?}"),
                }
                assert!(error.to_string().contains(&pipeline.operation.id), "{error}");
            }
        }
        assert!(
            db.store
                .read()
                .operations_for_resource(&ws_id)
                .await
                .unwrap()
                .iter()
                .all(|operation| operation.action == "install"),
            "no uninstall was created"
        );
        support::set_status(&db.store, &pipeline.vm.id, Status::Deployed).await;
        let operation = uninstall(db, &service_id).await.unwrap();
        assert_eq!(operation.resource_id, service_id);
    }

    /// Ensures that nothing new is installed under a workspace or workspace service
    /// whose uninstall runs: the other half of the rule above, or a service installed
    /// right after its workspace's uninstall was accepted would deploy into what is being
    /// torn down. The refusal names the uninstall; once it has finished (the parent is
    /// `deleted`), the parent is gone as before.
    pub(super) async fn nothing_is_installed_under_a_parent_being_uninstalled(db: &TestDb) {
        let registry = templates();
        let ws = support::workspace(&db.store, &registry).await;
        let service = support::guacamole(&db.store, &registry, &ws).await;
        support::firewall(&db.store, &registry).await;
        let service_uninstall = uninstall(db, &service.id).await.unwrap();
        let vm = {
            let mut tx = db.store.begin().await.unwrap();
            let result = operations::install_resource(
                &mut tx,
                OperationContext::new(&registry),
                linuxvm_request(&ws, &service),
                &user(),
            )
            .await;
            drop(tx);
            result
        };
        match &vm {
            Err(OperationError::OperationInProgress {
                resource_id, operation_id, action, ..
            }) => {
                assert_eq!(
                    (resource_id, operation_id, action.as_str()),
                    (&service.id, &service_uninstall.id, "uninstall")
                );
            }
            other => panic!("expected OperationInProgress for the service, got {other:?}"),
        }
        support::set_status(&db.store, &service.id, Status::Deleted).await;
        let ws_uninstall = uninstall(db, &ws.id).await.unwrap();
        let mut new = support::new_resource(
            "tre-service-guacamole",
            steward_api::domain::ResourceType::WorkspaceService,
            support::props(serde_json::json!({"display_name": "Desktops"})),
        );
        new.workspace_id = Some(ws.id.clone());
        let mut tx = db.store.begin().await.unwrap();
        let second =
            operations::install_resource(&mut tx, OperationContext::new(&registry), new, &user())
                .await;
        drop(tx);
        match &second {
            Err(OperationError::OperationInProgress {
                resource_id, operation_id, action, ..
            }) => {
                assert_eq!(
                    (resource_id, operation_id, action.as_str()),
                    (&ws.id, &ws_uninstall.id, "uninstall")
                );
            }
            other => panic!("expected OperationInProgress for the workspace, got {other:?}"),
        }
        let listed = db.store.read().operations_for_resource(&ws.id).await.unwrap();
        assert_eq!(listed.iter().filter(|op| op.action == "uninstall").count(), 1);
    }

    /// Ensures that pipeline steps acting on another resource do not lock it: two VM
    /// installs whose pipelines both update the shared firewall are both accepted, and
    /// the firewall's own upgrade is not refused because of them.
    pub(super) async fn pipeline_steps_do_not_lock_their_targets(db: &TestDb) {
        let registry = templates();
        let pipeline = linuxvm_pipeline(&db.store, &registry).await;
        let ws = db.store.read().resource(pipeline.vm.workspace_id().unwrap()).await.unwrap();
        let service = db
            .store
            .read()
            .resource(pipeline.vm.parent_workspace_service_id().unwrap())
            .await
            .unwrap();
        let (second, _) = install(&db.store, &registry, linuxvm_request(&ws, &service)).await;
        assert_ne!(second.id, pipeline.vm.id);
        let mut tx = db.store.begin().await.unwrap();
        assert!(tx.operation_in_progress(&pipeline.firewall.id).await.unwrap().is_none());
        let running = tx.operation_in_progress(&pipeline.vm.id).await.unwrap().unwrap();
        assert_eq!(running.id, pipeline.operation.id);
        drop(tx);
        let mut tx = db.store.begin().await.unwrap();
        let upgrade = operations::upgrade_resource(
            &mut tx,
            OperationContext::new(&registry),
            &pipeline.firewall.id,
            support::props(serde_json::json!({})),
            None,
            &user(),
        )
        .await;
        assert!(upgrade.is_ok(), "{upgrade:?}");
    }
}

db_test!(
    a_second_operation_waits_for_the_first,
    a_second_operation_waits_for_the_first_postgres,
    cases::a_second_operation_waits_for_the_first
);
db_test!(
    a_late_report_of_an_older_operation_does_not_revive,
    a_late_report_of_an_older_operation_does_not_revive_postgres,
    cases::a_late_report_of_an_older_operation_does_not_revive
);
db_test!(
    an_uninstall_waits_for_operations_under_it,
    an_uninstall_waits_for_operations_under_it_postgres,
    cases::an_uninstall_waits_for_operations_under_it
);
db_test!(
    pipeline_steps_do_not_lock_their_targets,
    pipeline_steps_do_not_lock_their_targets_postgres,
    cases::pipeline_steps_do_not_lock_their_targets
);
db_test!(
    nothing_is_installed_under_a_parent_being_uninstalled,
    nothing_is_installed_under_a_parent_being_uninstalled_postgres,
    cases::nothing_is_installed_under_a_parent_being_uninstalled
);
