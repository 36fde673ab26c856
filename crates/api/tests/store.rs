//! Storage tests: every case runs on SQLite and on PostgreSQL (`*_postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::json;
use steward_api::domain::{
    AirlockRequest, AirlockRequestStatus, AirlockRequestType, Operation, Resource, ResourceKind,
    ResourcePatch, Status, User,
};
use steward_api::storage::{
    AirlockRequestFilter, Backend, OperationPage, OutboxMessage, ResourceFilter, Store, StoreError,
    StoreOptions,
};
use support::{NOW, props, user};

mod cases {
    use super::*;

    pub(super) fn resource(id: &str, kind: ResourceKind, path: &str) -> Resource {
        Resource {
            id: id.to_owned(),
            template_name: "tre-workspace-base".to_owned(),
            template_version: "1.0.0".to_owned(),
            properties: props(
                json!({"display_name": "A", "count": 3, "flag": true, "tags": ["x", "y"], "nothing": null}),
            ),
            available_upgrades: None,
            is_enabled: true,
            kind,
            deployment_status: Some(Status::Deployed),
            etag: String::new(),
            resource_path: path.to_owned(),
            resource_version: 0,
            user: user(),
            updated_when: NOW,
        }
    }

    pub(super) fn workspace(id: &str) -> Resource {
        resource(
            id,
            ResourceKind::Workspace { workspace_url: String::new() },
            &format!("/workspaces/{id}"),
        )
    }

    pub(super) async fn insert(store: &Store, resource: &Resource) -> Resource {
        let mut tx = store.begin().await.unwrap();
        let stored = tx.insert_resource(resource).await.unwrap();
        tx.commit().await.unwrap();
        stored
    }

    /// Ensures that all four resource types, with text, numbers, booleans, lists and nulls,
    /// come back as they went in, inside and outside a transaction.
    pub(super) async fn resources_round_trip(store: &Store) {
        let ws = workspace("w1");
        let svc = resource(
            "s1",
            ResourceKind::WorkspaceService { workspace_id: "w1".to_owned() },
            "/workspaces/w1/workspace-services/s1",
        );
        let mut vm = resource(
            "v1",
            ResourceKind::UserResource {
                workspace_id: "w1".to_owned(),
                owner_id: "u1".to_owned(),
                parent_workspace_service_id: "s1".to_owned(),
                azure_status: props(json!({"powerState": "VM running"})),
            },
            "/workspaces/w1/workspace-services/s1/user-resources/v1",
        );
        vm.deployment_status = None;
        let shared = resource("f1", ResourceKind::SharedService, "/shared-services/f1");
        for original in [&ws, &svc, &vm, &shared] {
            let stored = insert(store, original).await;
            assert!(!stored.etag.is_empty());
            assert_eq!(Resource { etag: String::new(), ..stored.clone() }, *original);
            assert_eq!(store.read().resource(&original.id).await.unwrap(), stored);
            let mut tx = store.begin().await.unwrap();
            assert_eq!(tx.read().resource(&original.id).await.unwrap(), stored);
            tx.commit().await.unwrap();
        }
        let error = store.read().resource("missing").await.unwrap_err();
        assert!(error.is_not_found(), "{error:?}");
    }

    /// Ensures that inserting an id twice is `AlreadyExists`, not a generic error.
    pub(super) async fn duplicate_insert_is_already_exists(store: &Store) {
        insert(store, &workspace("w1")).await;
        let mut tx = store.begin().await.unwrap();
        let error = tx.insert_resource(&workspace("w1")).await.unwrap_err();
        assert!(matches!(error, StoreError::AlreadyExists { .. }), "{error:?}");
    }

    /// Ensures that a replace with a stale etag fails as a mismatch and writes nothing, and
    /// a replace of a missing resource is not found.
    pub(super) async fn stale_etag_replace_is_a_mismatch(store: &Store) {
        let first = insert(store, &workspace("w1")).await;
        let mut tx = store.begin().await.unwrap();
        let mut changed = first.clone();
        changed.properties.insert("display_name".to_owned(), json!("B"));
        let second = tx.replace_resource(&changed).await.unwrap();
        assert_ne!(second.etag, first.etag);
        let mut stale = first.clone();
        stale.properties.insert("display_name".to_owned(), json!("C"));
        let error = tx.replace_resource(&stale).await.unwrap_err();
        assert!(error.is_etag_mismatch(), "{error:?}");
        let error = tx.replace_resource(&workspace("nope")).await.unwrap_err();
        assert!(error.is_not_found(), "{error:?}");
        tx.commit().await.unwrap();
        assert_eq!(store.read().resource("w1").await.unwrap().properties["display_name"], "B");
    }

    /// Ensures that a patch bumps `resourceVersion`, stamps user and time, merges the
    /// properties and records the pre-patch resource in the history.
    pub(super) async fn patch_bumps_version_and_records_history(store: &Store) {
        let before = insert(store, &workspace("w1")).await;
        let editor = User::new("u2", "Ed", "ed@example.com");
        let mut tx = store.begin().await.unwrap();
        let patch = ResourcePatch {
            is_enabled: Some(false),
            properties: Some(props(json!({"display_name": "New"}))),
        };
        let after = tx.patch_resource(&before, &patch, &editor).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(after.resource_version, 1);
        assert_eq!(after.user, editor);
        assert!(!after.is_enabled);
        assert_eq!(after.properties["display_name"], "New");
        assert_eq!(after.properties["count"], 3, "other properties are kept");
        assert_eq!(store.read().resource("w1").await.unwrap(), after);
        let history = store.read().resource_history("w1").await.unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].resource_version, 0);
        assert_eq!(history[0].properties, before.properties);
        assert_eq!(history[0].user, before.user);
        assert_eq!(history[0].template_version.as_deref(), Some("1.0.0"));
    }

    /// Ensures that (reference §10.3.3) with `num_retries = 5` and the etag changing every
    /// time, there are exactly 6 reads and 6 patch attempts, none applied, and the mismatch
    /// propagates.
    pub(super) async fn tre_10_3_03_etag_retries_make_num_retries_plus_one_attempts(store: &Store) {
        insert(store, &workspace("w1")).await;
        let attempts = &AtomicU32::new(0);
        let result = store
            .patch_resource_with_retries("w1", 5, &user(), |current: Resource| async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                // Someone else writes between this read and the patch.
                let mut tx = store.begin().await?;
                tx.patch_resource(&current, &ResourcePatch::default(), &user()).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(ResourcePatch::properties(props(json!({"mine": true}))))
            })
            .await;
        let error = result.unwrap_err();
        assert!(error.is_etag_mismatch(), "{error:?}");
        assert_eq!(attempts.load(Ordering::SeqCst), 6);
        let stored = store.read().resource("w1").await.unwrap();
        assert_eq!(stored.resource_version, 6, "only the six interfering writes landed");
        assert!(!stored.properties.contains_key("mine"));
    }

    /// Ensures that after one lost race the retry applies the patch and returns the
    /// updated resource (TRE returns `None`; DESIGN §6).
    pub(super) async fn etag_retry_returns_the_updated_resource(store: &Store) {
        insert(store, &workspace("w1")).await;
        let attempts = &AtomicU32::new(0);
        let updated = store
            .patch_resource_with_retries("w1", 3, &user(), |current: Resource| async move {
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    let mut tx = store.begin().await?;
                    tx.patch_resource(&current, &ResourcePatch::default(), &user()).await?;
                    tx.commit().await?;
                }
                Ok::<_, StoreError>(ResourcePatch::properties(props(json!({"mine": true}))))
            })
            .await
            .unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert_eq!(updated.properties["mine"], true);
        assert_eq!(updated.resource_version, 2);
        assert_eq!(store.read().resource("w1").await.unwrap(), updated);
    }

    /// Ensures that two tasks patching one resource at once both land: both read version 0,
    /// one wins, the other gets an etag mismatch, re-reads and applies its patch on top.
    pub(super) async fn concurrent_patches_retry_on_etag_and_both_apply(store: &Store) {
        insert(store, &workspace("w1")).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let attempts = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|key| {
                let (store, barrier, attempts) = (store.clone(), barrier.clone(), attempts.clone());
                tokio::spawn(async move {
                    let first_read = &std::sync::atomic::AtomicBool::new(true);
                    let (barrier, attempts) = (&barrier, &attempts);
                    store
                        .patch_resource_with_retries("w1", 3, &user(), |_: Resource| async move {
                            attempts.fetch_add(1, Ordering::SeqCst);
                            if first_read.swap(false, Ordering::SeqCst) {
                                // Both tasks have read version 0 before either writes.
                                barrier.wait().await;
                            }
                            Ok::<_, StoreError>(ResourcePatch::properties(props(
                                json!({ key: key }),
                            )))
                        })
                        .await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 3, "exactly one retry");
        let stored = store.read().resource("w1").await.unwrap();
        assert_eq!(stored.properties["a"], "a");
        assert_eq!(stored.properties["b"], "b");
        assert_eq!(stored.resource_version, 2);
        assert_eq!(store.read().resource_history("w1").await.unwrap().len(), 2);
    }

    /// Ensures that many transactions patching one resource at once all commit (on SQLite
    /// without `SQLITE_BUSY`; on PostgreSQL a losing compare-and-swap retries inside its
    /// transaction).
    pub(super) async fn concurrent_transactions_on_one_resource_all_commit(store: &Store) {
        insert(store, &workspace("w1")).await;
        let tasks: Vec<_> = (0..8)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut tx = store.begin().await?;
                    let key = format!("k{n}");
                    tx.patch_resource_with_retries("w1", 10, &user(), |_: &Resource| {
                        Ok::<_, StoreError>(ResourcePatch::properties(props(
                            json!({ key.clone(): n }),
                        )))
                    })
                    .await?;
                    tx.commit().await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let stored = store.read().resource("w1").await.unwrap();
        assert_eq!(stored.resource_version, 8);
        for n in 0..8 {
            assert_eq!(stored.properties[&format!("k{n}")], n);
        }
    }

    /// Ensures that a transaction dropped without commit leaves nothing behind.
    pub(super) async fn dropped_transaction_rolls_back(store: &Store) {
        {
            let mut tx = store.begin().await.unwrap();
            tx.insert_resource(&workspace("w1")).await.unwrap();
            tx.insert_outbox(OutboxMessage::json("q", &json!({"a": 1}), "w1").unwrap())
                .await
                .unwrap();
        }
        let mut tx = store.begin().await.unwrap();
        tx.insert_resource(&workspace("w2")).await.unwrap();
        tx.rollback().await.unwrap();
        assert!(store.read().resource("w1").await.unwrap_err().is_not_found());
        assert!(store.read().resource("w2").await.unwrap_err().is_not_found());
        assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    }

    /// Ensures that outbox rows keep every message field, get increasing ids (the message
    /// ids), and that a commit wakes the outbox worker.
    pub(super) async fn outbox_keeps_messages_in_order(store: &Store) {
        let mut tx = store.begin().await.unwrap();
        let mut first = OutboxMessage::json("workspacequeue", &json!({"n": 1}), "r1")
            .unwrap()
            .with_session_id("r1")
            .with_correlation_id("op1")
            .with_subject("install");
        first.outgoing.properties.insert("kind".to_owned(), "resource-request".to_owned());
        let id1 = tx.insert_outbox(first.clone()).await.unwrap();
        let id2 = tx
            .insert_outbox(OutboxMessage::json("other", &json!({"n": 2}), "r2").unwrap())
            .await
            .unwrap();
        let id3 = tx
            .insert_outbox(OutboxMessage::json("workspacequeue", &json!({"n": 3}), "r1").unwrap())
            .await
            .unwrap();
        assert!(id1 < id2 && id2 < id3);
        tx.commit().await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), store.outbox_written())
            .await
            .expect("commit wakes the worker");

        let rows = store.outbox_messages(10).await.unwrap();
        assert_eq!(rows.iter().map(|row| row.id).collect::<Vec<_>>(), [id1, id2, id3]);
        assert_eq!(rows[0].message, first);
        assert!(rows[0].message_id().starts_with(&format!("{id1}-")), "{}", rows[0].message_id());
        assert_eq!(rows[0].attempts, 0);
        assert_eq!(rows[0].lease_owner, None);
        assert_eq!(rows[0].lease_until, None);
        assert_eq!(rows[1].message.outgoing.session_id, None);
        assert_eq!(rows[1].message.outgoing.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&rows[2].message.outgoing.body).unwrap(),
            json!({"n": 3})
        );
        assert_eq!(store.outbox_backlog().await.unwrap(), 3);
        assert_eq!(store.outbox_messages(1).await.unwrap().len(), 1);
    }

    pub(super) fn operation(id: &str, resource_id: &str) -> Operation {
        serde_json::from_value(json!({
            "id": id, "resourceId": resource_id, "resourcePath": "/workspaces/w1", "action": "install",
            "createdWhen": NOW, "updatedWhen": NOW,
            "steps": [{"id": "s1", "templateStepId": "main", "resourceId": resource_id, "status": "awaiting_deployment"}]
        }))
        .unwrap()
    }

    /// Ensures that operations with their steps round-trip, list by resource, and are
    /// replaced only with a current etag.
    pub(super) async fn operations_round_trip(store: &Store) {
        let mut tx = store.begin().await.unwrap();
        let stored = tx.insert_operation(&operation("op1", "w1")).await.unwrap();
        tx.insert_operation(&operation("op2", "w1")).await.unwrap();
        tx.insert_operation(&operation("op3", "other")).await.unwrap();
        let mut changed = stored.clone();
        changed.status = Status::Deploying;
        changed.steps.as_mut().unwrap()[0].status = Some(Status::Deploying);
        let replaced = tx.replace_operation(&changed).await.unwrap();
        let error = tx.replace_operation(&stored).await.unwrap_err();
        assert!(error.is_etag_mismatch(), "{error:?}");
        let error = tx.insert_operation(&operation("op1", "w1")).await.unwrap_err();
        assert!(matches!(error, StoreError::AlreadyExists { .. }));
        tx.commit().await.unwrap();
        assert_eq!(store.read().operation("op1").await.unwrap(), replaced);
        assert_eq!(replaced.steps()[0].status, Some(Status::Deploying));
        let ids: Vec<String> = store
            .read()
            .operations_for_resource("w1")
            .await
            .unwrap()
            .into_iter()
            .map(|op| op.id)
            .collect();
        assert_eq!(ids, ["op1", "op2"]);
        assert!(store.read().operation("nope").await.unwrap_err().is_not_found());
        let page = |skip, limit, max_bytes| OperationPage { after: None, skip, limit, max_bytes };
        let listed = store.read().operations_page("w1", page(0, Some(1), None)).await.unwrap();
        assert_eq!(listed.items.iter().map(|op| op.id.as_str()).collect::<Vec<_>>(), ["op1"]);
        assert!(listed.more);
        let listed = store.read().operations_page("w1", page(1, Some(1), None)).await.unwrap();
        assert_eq!(listed.items.iter().map(|op| op.id.as_str()).collect::<Vec<_>>(), ["op2"]);
        assert!(!listed.more, "op3 is another resource's");
        // A budget of one byte: each page holds the one record it always takes.
        let listed = store.read().operations_page("w1", page(0, Some(10), Some(1))).await.unwrap();
        assert_eq!((listed.items.len(), listed.more), (1, true));
        let listed = store.read().operations_page("w1", page(0, None, None)).await.unwrap();
        assert_eq!((listed.items.len(), listed.more), (2, false));
        // The next page starts after the last record of the previous one.
        let first = store.read().operations_page("w1", page(0, Some(1), None)).await.unwrap();
        let after = OperationPage { after: first.last.as_ref(), ..page(0, Some(5), None) };
        let next = store.read().operations_page("w1", after).await.unwrap();
        assert_eq!(next.items.iter().map(|op| op.id.as_str()).collect::<Vec<_>>(), ["op2"]);
        assert!(!next.more);
    }

    pub(super) fn airlock_request(
        id: &str,
        workspace_id: &str,
        status: AirlockRequestStatus,
    ) -> AirlockRequest {
        let mut request: AirlockRequest = serde_json::from_value(
            json!({"id": id, "workspaceId": workspace_id, "type": "import", "createdWhen": NOW}),
        )
        .unwrap();
        request.status = status;
        request
    }

    /// Ensures that airlock requests round-trip (TRE defaults included), filter by
    /// workspace and status, and are replaced only with a current etag.
    pub(super) async fn airlock_requests_round_trip(store: &Store) {
        let mut tx = store.begin().await.unwrap();
        let stored = tx
            .insert_airlock_request(&airlock_request("a1", "w1", AirlockRequestStatus::Draft))
            .await
            .unwrap();
        tx.insert_airlock_request(&airlock_request("a2", "w1", AirlockRequestStatus::Submitted))
            .await
            .unwrap();
        tx.insert_airlock_request(&airlock_request("a3", "w2", AirlockRequestStatus::Draft))
            .await
            .unwrap();
        let mut changed = stored.clone();
        changed.status = AirlockRequestStatus::Cancelled;
        let replaced = tx.replace_airlock_request(&changed).await.unwrap();
        assert!(tx.replace_airlock_request(&stored).await.unwrap_err().is_etag_mismatch());
        tx.commit().await.unwrap();

        let read = store.read().airlock_request("a1").await.unwrap();
        assert_eq!(read, replaced);
        assert_eq!(read.title, "Airlock Request");
        assert_eq!(read.business_justification, "Business Justification");
        assert_eq!(read.request_type, Some(AirlockRequestType::Import));
        let ids =
            |requests: Vec<AirlockRequest>| requests.into_iter().map(|r| r.id).collect::<Vec<_>>();
        let filter =
            AirlockRequestFilter { workspace_id: Some("w1".to_owned()), ..Default::default() };
        assert_eq!(ids(store.read().airlock_requests(&filter).await.unwrap()), ["a1", "a2"]);
        let filter = AirlockRequestFilter {
            status: Some(AirlockRequestStatus::Draft),
            ..Default::default()
        };
        assert_eq!(ids(store.read().airlock_requests(&filter).await.unwrap()), ["a3"]);
        let filter = AirlockRequestFilter { skip: 1, limit: Some(1), ..Default::default() };
        assert_eq!(ids(store.read().airlock_requests(&filter).await.unwrap()), ["a2"]);
    }

    /// Ensures that resource lists filter by type, status, workspace, parent and template,
    /// leave deleted resources out unless asked, and page.
    pub(super) async fn resource_lists_filter_and_page(store: &Store) {
        insert(store, &workspace("w1")).await;
        let mut deleted = workspace("w2");
        deleted.deployment_status = Some(Status::Deleted);
        insert(store, &deleted).await;
        let mut svc = resource(
            "s1",
            ResourceKind::WorkspaceService { workspace_id: "w1".to_owned() },
            "/workspaces/w1/workspace-services/s1",
        );
        svc.template_name = "tre-service-guacamole".to_owned();
        svc.deployment_status = Some(Status::AwaitingDeployment);
        insert(store, &svc).await;
        let vm = resource(
            "v1",
            ResourceKind::UserResource {
                workspace_id: "w1".to_owned(),
                owner_id: "u1".to_owned(),
                parent_workspace_service_id: "s1".to_owned(),
                azure_status: Default::default(),
            },
            "/workspaces/w1/workspace-services/s1/user-resources/v1",
        );
        insert(store, &vm).await;

        let ids =
            |resources: Vec<Resource>| resources.into_iter().map(|r| r.id).collect::<Vec<_>>();
        let all = store.read().resources(&ResourceFilter::default()).await.unwrap();
        assert_eq!(ids(all), ["w1", "s1", "v1"]);
        let filter = ResourceFilter { include_deleted: true, ..Default::default() };
        assert_eq!(store.read().resources(&filter).await.unwrap().len(), 4);
        let filter = ResourceFilter {
            resource_type: Some(steward_api::domain::ResourceType::Workspace),
            ..Default::default()
        };
        assert_eq!(ids(store.read().resources(&filter).await.unwrap()), ["w1"]);
        let filter =
            ResourceFilter { status: Some(Status::AwaitingDeployment), ..Default::default() };
        assert_eq!(ids(store.read().resources(&filter).await.unwrap()), ["s1"]);
        let filter = ResourceFilter { workspace_id: Some("w1".to_owned()), ..Default::default() };
        assert_eq!(ids(store.read().resources(&filter).await.unwrap()), ["s1", "v1"]);
        let filter = ResourceFilter {
            parent_workspace_service_id: Some("s1".to_owned()),
            ..Default::default()
        };
        assert_eq!(ids(store.read().resources(&filter).await.unwrap()), ["v1"]);
        let filter = ResourceFilter {
            template_name: Some("tre-service-guacamole".to_owned()),
            ..Default::default()
        };
        assert_eq!(ids(store.read().resources(&filter).await.unwrap()), ["s1"]);
        let filter = ResourceFilter { skip: 1, limit: Some(1), ..Default::default() };
        assert_eq!(ids(store.read().resources(&filter).await.unwrap()), ["s1"]);
        let page = store.read().resources_page(&filter).await.unwrap();
        assert_eq!((ids(page.items), page.more), (vec!["s1".to_owned()], true));
        let filter = ResourceFilter { skip: 1, limit: Some(2), ..Default::default() };
        let page = store.read().resources_page(&filter).await.unwrap();
        assert_eq!((ids(page.items), page.more), (vec!["s1".to_owned(), "v1".to_owned()], false));
        // The byte budget cuts the page after the record that fills it, and says so.
        let w1_bytes =
            serde_json::to_string(&store.read().resource("w1").await.unwrap()).unwrap().len();
        let filter = ResourceFilter { max_bytes: Some(w1_bytes), ..Default::default() };
        let page = store.read().resources_page(&filter).await.unwrap();
        assert_eq!((ids(page.items), page.more), (vec!["w1".to_owned()], true));
        let filter = ResourceFilter { max_bytes: Some(1 << 20), ..Default::default() };
        let page = store.read().resources_page(&filter).await.unwrap();
        assert_eq!((page.items.len(), page.more), (3, false));
        // Paging by key: a page starts after the last record of the previous one, even
        // when that record left the list meanwhile (offsets would skip one).
        let filter = ResourceFilter { limit: Some(1), ..Default::default() };
        let first = store.read().resources_page(&filter).await.unwrap();
        assert_eq!(ids(first.items), ["w1"]);
        let mut tx = store.begin().await.unwrap();
        let mut w1 = tx.read().resource("w1").await.unwrap();
        let w1_status = w1.deployment_status;
        w1.deployment_status = Some(Status::Deleted);
        let w1 = tx.replace_resource(&w1).await.unwrap();
        tx.commit().await.unwrap();
        let filter = ResourceFilter { after: first.last, limit: Some(1), ..Default::default() };
        let second = store.read().resources_page(&filter).await.unwrap();
        assert_eq!((ids(second.items), second.more), (vec!["s1".to_owned()], true));
        let filter = ResourceFilter { after: second.last, limit: Some(5), ..Default::default() };
        let third = store.read().resources_page(&filter).await.unwrap();
        assert_eq!((ids(third.items), third.more), (vec!["v1".to_owned()], false));
        let mut tx = store.begin().await.unwrap();
        tx.replace_resource(&Resource { deployment_status: w1_status, ..w1 }).await.unwrap();
        tx.commit().await.unwrap();

        let mut tx = store.begin().await.unwrap();
        let ws = tx.read().resource("w1").await.unwrap();
        let dependents = tx.read().resource_dependency_list(&ws).await.unwrap();
        assert_eq!(ids(dependents), ["v1", "s1", "w1"], "deepest first");
    }

    /// Ensures that only a shared service that is not gone counts as an active one.
    pub(super) async fn active_shared_service_skips_gone_ones(store: &Store) {
        let mut gone = resource("f0", ResourceKind::SharedService, "/shared-services/f0");
        gone.template_name = "tre-shared-service-firewall".to_owned();
        gone.deployment_status = Some(Status::Deleted);
        insert(store, &gone).await;
        let mut tx = store.begin().await.unwrap();
        assert_eq!(
            tx.read().active_shared_service("tre-shared-service-firewall").await.unwrap(),
            None
        );
        let mut live = gone.clone();
        live.id = "f1".to_owned();
        live.deployment_status = Some(Status::Deployed);
        tx.insert_resource(&live).await.unwrap();
        let found =
            tx.read().active_shared_service("tre-shared-service-firewall").await.unwrap().unwrap();
        assert_eq!(found.id, "f1");
    }

    /// Ensures that a closed store reports the database as unavailable (so handlers retry
    /// with `RetryCause::Dependency`), not as a defect.
    pub(super) async fn closed_store_is_unavailable(store: &Store) {
        store.ping().await.unwrap();
        store.close().await;
        let error = store.ping().await.unwrap_err();
        assert!(error.is_unavailable(), "{error:?}");
        let error = store.begin().await.unwrap_err();
        assert!(error.is_unavailable(), "{error:?}");
        let error = store.read().resource("w1").await.unwrap_err();
        assert!(error.is_unavailable() && !error.is_not_found(), "{error:?}");
    }

    /// Ensures that running the migrations again changes nothing.
    pub(super) async fn migrations_are_idempotent(store: &Store) {
        insert(store, &workspace("w1")).await;
        store.migrate().await.unwrap();
        assert_eq!(store.read().resource("w1").await.unwrap().id, "w1");
    }

    /// Ensures that a user's roles in a workspace are replaced as a whole, kept apart
    /// per workspace and per user, listed per user, and removed by an empty set.
    pub(super) async fn workspace_roles_are_set_read_and_removed(store: &Store) {
        use steward_api::domain::WorkspaceRole::{
            AirlockManager, WorkspaceOwner, WorkspaceResearcher,
        };
        assert!(store.read().workspace_roles("w1", "ada").await.unwrap().is_empty());
        let mut tx = store.begin().await.unwrap();
        tx.set_workspace_roles(
            "w1",
            "ada",
            &[WorkspaceResearcher, WorkspaceOwner, WorkspaceOwner],
            "admin",
        )
        .await
        .unwrap();
        tx.set_workspace_roles("w2", "ada", &[AirlockManager], "admin").await.unwrap();
        tx.set_workspace_roles("w1", "bob", &[AirlockManager], "admin").await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            store.read().workspace_roles("w1", "ada").await.unwrap(),
            [WorkspaceOwner, WorkspaceResearcher],
            "sorted, without duplicates"
        );
        assert_eq!(store.read().workspace_roles("w1", "bob").await.unwrap(), [AirlockManager]);

        let mut tx = store.begin().await.unwrap();
        tx.set_workspace_roles("w1", "ada", &[AirlockManager], "owner").await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(store.read().workspace_roles("w1", "ada").await.unwrap(), [AirlockManager]);
        assert_eq!(
            store.read().roles_of_user("ada").await.unwrap(),
            [("w1".to_owned(), vec![AirlockManager]), ("w2".to_owned(), vec![AirlockManager])]
        );

        let mut tx = store.begin().await.unwrap();
        tx.set_workspace_roles("w1", "ada", &[], "owner").await.unwrap();
        tx.commit().await.unwrap();
        assert!(store.read().workspace_roles("w1", "ada").await.unwrap().is_empty());
        assert_eq!(store.read().roles_of_user("ada").await.unwrap().len(), 1);
        assert_eq!(store.read().workspace_roles("w1", "bob").await.unwrap(), [AirlockManager]);
    }
}

db_test!(
    workspace_roles_are_set_read_and_removed_sqlite,
    workspace_roles_are_set_read_and_removed_postgres,
    cases::workspace_roles_are_set_read_and_removed
);

db_test!(resources_round_trip_sqlite, resources_round_trip_postgres, cases::resources_round_trip);
db_test!(
    duplicate_insert_is_already_exists_sqlite,
    duplicate_insert_is_already_exists_postgres,
    cases::duplicate_insert_is_already_exists
);
db_test!(
    stale_etag_replace_is_a_mismatch_sqlite,
    stale_etag_replace_is_a_mismatch_postgres,
    cases::stale_etag_replace_is_a_mismatch
);
db_test!(
    patch_bumps_version_and_records_history_sqlite,
    patch_bumps_version_and_records_history_postgres,
    cases::patch_bumps_version_and_records_history
);
db_test!(
    tre_10_3_03_etag_retries_make_num_retries_plus_one_attempts,
    tre_10_3_03_etag_retries_make_num_retries_plus_one_attempts_postgres,
    cases::tre_10_3_03_etag_retries_make_num_retries_plus_one_attempts
);
db_test!(
    etag_retry_returns_the_updated_resource_sqlite,
    etag_retry_returns_the_updated_resource_postgres,
    cases::etag_retry_returns_the_updated_resource
);
db_test!(
    concurrent_patches_retry_on_etag_and_both_apply_sqlite,
    concurrent_patches_retry_on_etag_and_both_apply_postgres,
    cases::concurrent_patches_retry_on_etag_and_both_apply
);
db_test!(
    concurrent_transactions_on_one_resource_all_commit_sqlite,
    concurrent_transactions_on_one_resource_all_commit_postgres,
    cases::concurrent_transactions_on_one_resource_all_commit
);
db_test!(
    dropped_transaction_rolls_back_sqlite,
    dropped_transaction_rolls_back_postgres,
    cases::dropped_transaction_rolls_back
);
db_test!(
    outbox_keeps_messages_in_order_sqlite,
    outbox_keeps_messages_in_order_postgres,
    cases::outbox_keeps_messages_in_order
);
db_test!(
    operations_round_trip_sqlite,
    operations_round_trip_postgres,
    cases::operations_round_trip
);
db_test!(
    airlock_requests_round_trip_sqlite,
    airlock_requests_round_trip_postgres,
    cases::airlock_requests_round_trip
);
db_test!(
    resource_lists_filter_and_page_sqlite,
    resource_lists_filter_and_page_postgres,
    cases::resource_lists_filter_and_page
);
db_test!(
    active_shared_service_skips_gone_ones_sqlite,
    active_shared_service_skips_gone_ones_postgres,
    cases::active_shared_service_skips_gone_ones
);
db_test!(
    closed_store_is_unavailable_sqlite,
    closed_store_is_unavailable_postgres,
    cases::closed_store_is_unavailable
);
db_test!(
    migrations_are_idempotent_sqlite,
    migrations_are_idempotent_postgres,
    cases::migrations_are_idempotent
);

/// Ensures that when a statement fails inside a PostgreSQL transaction (which aborts
/// it), `commit` reports `Aborted` rather than pretending to commit. (SQLite keeps a
/// transaction usable after a failed statement, so this is PostgreSQL only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_statement_aborts_the_transaction_postgres() {
    let Some(db) =
        support::TestDb::postgres("failed_statement_aborts_the_transaction_postgres").await
    else {
        return;
    };
    let mut tx = db.store.begin().await.unwrap();
    tx.insert_resource(&cases::workspace("w1")).await.unwrap();
    db.execute("DROP TABLE resource_history").await;
    let item = cases::workspace("w1").history_item("h1");
    let error = tx.insert_history(&item).await.unwrap_err();
    assert!(matches!(error, StoreError::Database { .. }), "{error:?}");
    let error = tx.commit().await.unwrap_err();
    assert!(matches!(error, StoreError::Aborted { .. }), "{error:?}");
    assert!(db.store.read().resource("w1").await.unwrap_err().is_not_found());
    db.finish().await;
}

/// Ensures that a SQLite store runs in WAL mode.
#[tokio::test]
async fn sqlite_store_runs_in_wal_mode() {
    use sqlx::{Connection, Row};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("steward.db").display());
    let store = Store::connect(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    let row = sqlx::query("PRAGMA journal_mode").fetch_one(&mut conn).await.unwrap();
    assert_eq!(row.try_get::<String, _>(0).unwrap().to_lowercase(), "wal");
    store.close().await;
}

/// Ensures that in-memory SQLite (a different database per pooled connection) and
/// unknown schemes are refused with a clear error.
#[test]
fn unsupported_urls_are_refused() {
    for url in
        ["sqlite::memory:", "sqlite://steward.db?mode=memory", "mysql://localhost/db", "steward.db"]
    {
        let error = Store::connect_lazy(StoreOptions::new(url)).unwrap_err();
        assert!(matches!(error, StoreError::InvalidUrl { .. }), "{url}: {error:?}");
    }
    assert_eq!(Backend::from_url("postgresql://h/db").unwrap(), Backend::Postgres);
}

/// Ensures that a PostgreSQL server that does not answer is reported as unavailable.
#[tokio::test]
async fn unreachable_postgres_is_unavailable() {
    let options = StoreOptions::new("postgres://postgres@127.0.0.1:1/test")
        .with_acquire_timeout(Duration::from_secs(1));
    let error = Store::connect_with(options).await.unwrap_err();
    assert!(error.is_unavailable(), "{error:?}");
}

/// Pages through resources that were all created in the same millisecond (a clock
/// that stands still), two at a time: each appears exactly once, in id order, and the
/// last page has no cursor. Ties in the creation time are broken by the id, in SQL and
/// in the cursor alike.
async fn pages_of_records_created_in_the_same_millisecond(db: &support::TestDb) {
    let registry = support::templates();
    let mut ids = Vec::new();
    for _ in 0..7 {
        let (workspace, _) = support::workspace_installing(&db.store, &registry).await;
        ids.push(workspace.id);
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let filter = ResourceFilter { after: after.clone(), limit: Some(2), ..Default::default() };
        let page = db.store.read().resources_page(&filter).await.unwrap();
        seen.extend(page.items.iter().map(|resource| resource.id.clone()));
        if !page.more {
            break;
        }
        after = page.last;
    }
    assert_eq!(seen, ids);
}

fn standing_clock(url: String) -> StoreOptions {
    support::options(url).with_clock(steward_api::Clock::from_fn(|| NOW))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_records_created_in_the_same_millisecond_sqlite() {
    let db = support::TestDb::sqlite_with(standing_clock).await;
    pages_of_records_created_in_the_same_millisecond(&db).await;
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_records_created_in_the_same_millisecond_postgres() {
    let test = "pages_of_records_created_in_the_same_millisecond_postgres";
    let Some(db) = support::TestDb::postgres_with(test, standing_clock).await else { return };
    pages_of_records_created_in_the_same_millisecond(&db).await;
    db.finish().await;
}
