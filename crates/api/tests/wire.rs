//! Serde round trips of every wire type against the JSON of the reference (§4, §5),
//! and TRE's validation rules for incoming messages.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use steward_api::domain::{
    AirlockNotificationEvent, AirlockRequest, AirlockRequestStatus, AirlockRequestType,
    DeploymentStatusUpdate, Operation, Output, Resource, ResourceHistoryItem, ResourceKind,
    ResourceRequest, ResourceType, Status, StatusChangedEvent, StepResultEvent, User,
    airlock_notification_event, outputs_to_properties, status_changed_event,
};

/// Parses `json` as `T`, writes it back, and checks nothing changed.
fn round_trip<T: Serialize + DeserializeOwned>(json: &Value) -> T {
    let typed: T = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(&serde_json::to_value(&typed).unwrap(), json);
    typed
}

/// The resource request of reference §4.1: install the VM of [`user_resource`] in
/// operation `operation_id`, step `step_id`.
fn vm_install_request(operation_id: &str, step_id: &str) -> Value {
    json!({
        "operationId": operation_id,
        "stepId": step_id,
        "action": "install",
        "id": "933ad738-7265-4b5f-9eae-a1a62928772e",
        "name": "tre-service-guacamole-linuxvm",
        "version": "1.2.3",
        "parameters": {"display_name": "My VM", "os_image": "Ubuntu 22.04 LTS", "tre_id": "mytre"},
        "workspaceId": "a1b2c3d4-....",
        "ownerId": "user-object-id",
        "parentWorkspaceServiceId": "e5f6...."
    })
}

/// Ensures that the resource request example of reference §4.1 round-trips.
#[test]
fn resource_request_matches_reference_example() {
    let example = vm_install_request(
        "7ac667f0-fd3f-4a6c-815b-82d0cb7a2132",
        "7d96130f-b323-4b95-8351-a05e943d51a2",
    );
    let request: ResourceRequest = round_trip(&example);
    assert_eq!(request.parameters["os_image"], "Ubuntu 22.04 LTS");
}

fn user_resource() -> Resource {
    serde_json::from_value(json!({
        "id": "933ad738-7265-4b5f-9eae-a1a62928772e",
        "templateName": "tre-service-guacamole-linuxvm",
        "templateVersion": "1.2.3",
        "properties": {"display_name": "My VM", "os_image": "Ubuntu 22.04 LTS", "tre_id": "mytre"},
        "resourceType": "user-resource",
        "workspaceId": "a1b2c3d4-....",
        "ownerId": "user-object-id",
        "parentWorkspaceServiceId": "e5f6....",
        "_etag": "\"0000-etag\""
    }))
    .unwrap()
}

/// Ensures that (reference §10.3.1) the resource request built for a step carries the
/// operation, step, action and resource, with the workspace fields only where TRE puts
/// them.
#[test]
fn tre_10_3_01_resource_request_payload_per_resource_type() {
    let vm = user_resource();
    assert_eq!(vm.etag, "0000-etag", "escaped quotes are stripped");
    let request = vm.resource_request("op-1", "step-1", "install");
    let expected = vm_install_request("op-1", "step-1");
    assert_eq!(serde_json::to_value(&request).unwrap(), expected);

    let mut service = vm.clone();
    service.kind = ResourceKind::WorkspaceService { workspace_id: "w1".to_owned() };
    let body =
        serde_json::to_value(service.resource_request("op-1", "step-1", "uninstall")).unwrap();
    assert_eq!(body["workspaceId"], "w1");
    assert_eq!(body["action"], "uninstall");
    assert!(body.get("ownerId").is_none() && body.get("parentWorkspaceServiceId").is_none());

    for kind in
        [ResourceKind::Workspace { workspace_url: String::new() }, ResourceKind::SharedService]
    {
        let mut resource = vm.clone();
        resource.kind = kind;
        let body =
            serde_json::to_value(resource.resource_request("op-1", "step-1", "start")).unwrap();
        assert!(body.get("workspaceId").is_none(), "{body}");
        assert_eq!(body["action"], "start");
    }
}

/// Ensures that every resource type round-trips with all of TRE's fields (reference
/// §5.4).
#[test]
fn resources_of_every_type_round_trip() {
    let base = json!({
        "id": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76",
        "templateName": "tre-workspace-base",
        "templateVersion": "1.0.0",
        "properties": {"display_name": "W", "nested": {"list": [1, 2.5, true, null]}},
        "availableUpgrades": [{"version": "1.1.0", "forceUpdateRequired": false}],
        "isEnabled": true,
        "deploymentStatus": "deployed",
        "_etag": "etag-1",
        "resourcePath": "/workspaces/59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76",
        "resourceVersion": 3,
        "user": {"id": "u1", "name": "Jane", "email": "jane@x", "roles": ["TREAdmin"], "roleAssignments": []},
        "updatedWhen": 1755424860.2
    });
    let kinds = [
        (
            json!({"resourceType": "workspace", "workspaceURL": "https://w.example"}),
            ResourceType::Workspace,
        ),
        (
            json!({"resourceType": "workspace-service", "workspaceId": "w1"}),
            ResourceType::WorkspaceService,
        ),
        (
            json!({"resourceType": "user-resource", "workspaceId": "w1", "ownerId": "u1",
                   "parentWorkspaceServiceId": "s1", "azureStatus": {"powerState": "VM running"}}),
            ResourceType::UserResource,
        ),
        (json!({"resourceType": "shared-service"}), ResourceType::SharedService),
    ];
    for (extra, kind) in kinds {
        let mut json = base.clone();
        json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let resource: Resource = round_trip(&json);
        assert_eq!(resource.resource_type(), kind);
    }
    // TRE defaults, and the etag read from `etag` as well as `_etag`.
    let minimal: Resource = serde_json::from_value(json!({
        "id": "x", "templateName": "t", "templateVersion": "1", "resourceType": "shared-service", "etag": "e"
    }))
    .unwrap();
    assert!(
        minimal.is_enabled && minimal.properties.is_empty() && minimal.deployment_status.is_none()
    );
    assert_eq!(
        (minimal.etag.as_str(), minimal.resource_version, minimal.updated_when),
        ("e", 0, 0.0)
    );
    assert!(
        serde_json::from_value::<Resource>(
            json!({"id": "x", "templateName": "t", "templateVersion": "1",
        "resourceType": "bogus"})
        )
        .is_err()
    );
}

/// Ensures that the operation example of reference §5.3 round-trips.
#[test]
fn operation_matches_reference_example() {
    let example = json!({
      "id": "0000c8e7-5c42-4fcb-a7fd-294cfc27aa76",
      "resourceId": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76",
      "resourcePath": "/workspaces/w1/workspace-services/s1/user-resources/59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76",
      "resourceVersion": 0,
      "status": "pipeline_running",
      "action": "install",
      "message": "Multi step pipeline running. See steps for details.",
      "createdWhen": 1755424800.1, "updatedWhen": 1755424860.2,
      "user": {"id": "u1", "name": "Jane", "email": "jane@x", "roles": ["WorkspaceResearcher"], "roleAssignments": []},
      "steps": [
        {"id": "random-uuid-1", "templateStepId": "pre-step-1", "stepTitle": "Title for pre-step-1",
         "resourceId": "<shared-service-id>", "resourceTemplateName": "tre-shared-service-firewall",
         "resourceType": "shared-service", "resourceAction": "upgrade", "status": "updated",
         "message": "<id>: upgrade action completed successfully.", "updatedWhen": 1755424860.2,
         "sourceTemplateResourceId": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76"},
        {"id": "random-uuid-2", "templateStepId": "main", "stepTitle": "Main step for 59b5c8e7-...",
         "resourceId": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76", "resourceTemplateName": "tre-service-guacamole-linuxvm",
         "resourceType": "user-resource", "resourceAction": "install", "status": "awaiting_deployment",
         "message": "This resource is waiting to be deployed", "updatedWhen": 1755424800.1,
         "sourceTemplateResourceId": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76"}
      ]
    });
    let operation: Operation = round_trip(&example);
    assert_eq!(operation.status, Status::PipelineRunning);
    assert!(operation.steps()[0].is_success() && !operation.steps()[0].is_main());
    assert!(operation.steps()[1].is_main());
    assert_eq!(
        operation.step_index("random-uuid-2", "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76"),
        Some(1)
    );
    assert_eq!(operation.step_index("random-uuid-2", "other"), None);
}

/// Ensures that the deployment status example of reference §4.2 round-trips, and that
/// outputs read with either key spelling.
#[test]
fn deployment_status_update_matches_reference_example() {
    let example = support::status_update_example();
    let update: DeploymentStatusUpdate = round_trip(&example);
    assert_eq!(update.outputs[3].value, None);

    let capitalised = json!({"Name": "x", "Value": {"a": 1}, "Type": "object", "extra": "ignored"});
    let output: Output = serde_json::from_value(capitalised).unwrap();
    assert_eq!((output.name.as_str(), output.output_type.as_str()), ("x", "object"));
}

/// Ensures that ids are version-4 UUIDs in any spelling pydantic accepts, normalised,
/// and that TRE's invalid messages are rejected.
#[test]
fn deployment_status_update_validates_like_tre() {
    let message = |change: Value| {
        let mut json = json!({
            "operationId": "0000c8e7-5c42-4fcb-a7fd-294cfc27aa76", "stepId": "s", "status": "deploying",
            "id": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76", "message": "m"
        });
        json.as_object_mut().unwrap().extend(change.as_object().unwrap().clone());
        serde_json::from_value::<DeploymentStatusUpdate>(json)
    };
    let update =
        message(json!({"operationId": "0000C8E75C424FCBA7FD294CFC27AA76", "unknown": 1})).unwrap();
    assert_eq!(update.operation_id.to_string(), "0000c8e7-5c42-4fcb-a7fd-294cfc27aa76");
    assert!(update.outputs.is_empty(), "outputs default to []");

    let rejected = [
        json!({"operationId": "0000c8e7-5c42-1fcb-a7fd-294cfc27aa76"}), // version 1
        json!({"id": "not-a-uuid"}),
        json!({"status": "pipeline_failed"}),
        json!({"outputs": {}}),
        json!({"outputs": [{"name": "b", "value": true, "type": "boolean"}]}),
        json!({"outputs": [{"name": "n", "value": 42, "type": "string"}]}),
        json!({"outputs": [{"name": "missing_value", "type": "string"}]}),
        json!({"message": null}),
    ];
    for change in rejected {
        assert!(message(change.clone()).is_err(), "{change} must be rejected");
    }
    assert!(serde_json::from_str::<DeploymentStatusUpdate>("bad").is_err());
    assert!(
        serde_json::from_str::<DeploymentStatusUpdate>(r#"{"good": "json", "bad": "message"}"#)
            .is_err()
    );
}

/// Ensures that outputs become properties as TRE's `convert_outputs_to_dict` turns
/// them (reference §6.5, §10.1.6 and §10.1.10).
#[test]
fn tre_10_1_10_outputs_convert_to_properties() {
    assert!(outputs_to_properties(&[]).unwrap().is_empty());
    let (mut outputs, mut expected) = support::tre_outputs_example();
    outputs.push(json!({"Name": "boolean4", "Value": "no", "Type": "boolean"}));
    outputs.push(json!({"Name": "skipped", "Value": null, "Type": "string"}));
    expected.insert("boolean4".to_owned(), json!(false));
    let outputs: Vec<Output> = serde_json::from_value(Value::from(outputs)).unwrap();
    assert_eq!(outputs_to_properties(&outputs).unwrap(), expected);
    let bad: Vec<Output> =
        serde_json::from_value(json!([{"name": "b", "value": ["x"], "type": "boolean"}])).unwrap();
    assert_eq!(outputs_to_properties(&bad).unwrap_err().name, "b");
}

/// Ensures that the airlock step result example of reference §4.3 round-trips, and
/// that a files-only result has no new status.
#[test]
fn step_result_matches_reference_example() {
    let example = support::step_result_example();
    let event: StepResultEvent = round_trip(&example);
    assert_eq!(event.data.completed_status().unwrap(), AirlockRequestStatus::Submitted);
    assert_eq!(event.data.new_status().unwrap(), Some(AirlockRequestStatus::InReview));
    assert_eq!(event.data.request_files.as_ref().unwrap()[0].size, 1024.0);

    // The shape TRE's tests use: eventTime is not parsed, topic may be empty, no versions.
    let files_only = json!({
        "id": "0000c8e7-5c42-4fcb-a7fd-294cfc27aa76", "subject": "main", "eventType": "bla",
        "eventTime": "test message", "topic": "",
        "data": {"completed_step": "submitted", "request_id": "r1"}
    });
    let event: StepResultEvent = serde_json::from_value(files_only).unwrap();
    assert_eq!(event.data.new_status().unwrap(), None);
    let unknown =
        json!({"completed_step": "submitted", "new_status": "approved_maybe", "request_id": "r1"});
    let data: steward_api::domain::StepResultData = serde_json::from_value(unknown).unwrap();
    assert!(data.new_status().is_err());
    for missing in ["id", "subject", "eventType", "eventTime", "topic", "data"] {
        let mut json = example.clone();
        json.as_object_mut().unwrap().remove(missing);
        assert!(serde_json::from_value::<StepResultEvent>(json).is_err(), "{missing} is required");
    }
}

fn airlock_request_json() -> Value {
    json!({
        "id": "5dbc15ae-40e1-49a5-834b-595f59d626b7",
        "resourceVersion": 2,
        "createdBy": {"id": "u1", "name": "Jane", "email": "jane@x", "roles": [], "roleAssignments": []},
        "createdWhen": 1755424800.1,
        "updatedBy": {"id": "u2", "name": "Rev", "email": "rev@x", "roles": ["AirlockManager"], "roleAssignments": []},
        "updatedWhen": 1755424900.5,
        "history": [{
            "resourceVersion": 1, "updatedWhen": 1755424850.0,
            "updatedBy": {"id": "u1", "name": "Jane", "email": "jane@x", "roles": [], "roleAssignments": []},
            "properties": {"previousStatus": "submitted"}
        }],
        "workspaceId": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76",
        "type": "export",
        "files": [{"name": "data.csv", "size": 1024}, {"name": "half.bin", "size": 0.5}],
        "title": "Results",
        "businessJustification": "Paper",
        "status": "approval_in_progress",
        "statusMessage": "No threats found",
        "reviews": [{"id": "r1", "reviewer": {"id": "u2", "name": "Rev", "email": "rev@x", "roles": [],
                     "roleAssignments": []}, "dateCreated": 1755424900.5, "reviewDecision": "approved",
                     "decisionExplanation": "fine"}],
        "_etag": "etag-7",
        "reviewUserResources": {"u2": {"workspaceId": "w9", "workspaceServiceId": "s9", "userResourceId": "v9"}}
    })
}

/// Ensures that an airlock request with history, files, reviews and review user
/// resources round-trips with TRE's names (reference §5.6), and that TRE's defaults
/// apply to a sparse document.
#[test]
fn airlock_request_round_trips() {
    let request: AirlockRequest = round_trip(&airlock_request_json());
    assert_eq!(request.request_type, Some(AirlockRequestType::Export));
    let sparse: AirlockRequest = serde_json::from_value(json!({"id": "a"})).unwrap();
    assert_eq!(sparse.status, AirlockRequestStatus::Draft);
    assert_eq!(
        (sparse.title.as_str(), sparse.business_justification.as_str()),
        ("Airlock Request", "Business Justification")
    );
    assert_eq!(
        (sparse.request_type, sparse.reviews.clone(), sparse.created_when),
        (None, None, None)
    );
}

/// Ensures that a resource history item round-trips (reference §5.5).
#[test]
fn resource_history_item_round_trips() {
    let json = json!({
        "id": "h1", "resourceId": "r1", "properties": {"display_name": "old"}, "isEnabled": false,
        "resourceVersion": 4, "updatedWhen": 1755424800.25,
        "user": {"id": "u1", "name": "Jane", "email": "jane@x", "roles": [], "roleAssignments": []},
        "templateVersion": "1.0.0"
    });
    let item: ResourceHistoryItem = round_trip(&json);
    assert!(!item.is_enabled);
}

fn workspace_json() -> Value {
    json!({
        "id": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76", "templateName": "tre-workspace-base", "templateVersion": "1.0.0",
        "resourceType": "workspace", "properties": {"display_name": "Genomics", "description": "Sequencing"}
    })
}

/// Ensures that `statusChanged` (data version 2.0) carries TRE's fields, with the last
/// four characters of the workspace id, and round-trips.
#[test]
fn status_changed_event_has_tre_fields() {
    let request: AirlockRequest = serde_json::from_value(airlock_request_json()).unwrap();
    let event = status_changed_event(
        &request,
        Some(AirlockRequestStatus::InReview),
        "e1".to_owned(),
        1_755_424_800.5,
    );
    let expected = json!({
        "id": "e1",
        "subject": "5dbc15ae-40e1-49a5-834b-595f59d626b7/statusChanged",
        "eventType": "statusChanged",
        "eventTime": "2025-08-17T10:00:00.500000Z",
        "dataVersion": "2.0",
        "data": {
            "request_id": "5dbc15ae-40e1-49a5-834b-595f59d626b7",
            "new_status": "approval_in_progress",
            "previous_status": "in_review",
            "type": "export",
            "workspace_id": "aa76"
        }
    });
    assert_eq!(serde_json::to_value(&event).unwrap(), expected);
    let _: StatusChangedEvent = round_trip(&expected);
}

/// Ensures that `airlockNotification` (data version 4.0) carries TRE's fields and
/// round-trips.
#[test]
fn airlock_notification_event_has_tre_fields() {
    let request: AirlockRequest = serde_json::from_value(airlock_request_json()).unwrap();
    let workspace: Resource = serde_json::from_value(workspace_json()).unwrap();
    let recipients = BTreeMap::from([("workspace_owner".to_owned(), vec!["owner@x".to_owned()])]);
    let event = airlock_notification_event(&request, &workspace, recipients, "e2".to_owned(), 0.0);
    let expected = json!({
        "id": "e2",
        "subject": "5dbc15ae-40e1-49a5-834b-595f59d626b7/airlockNotification",
        "eventType": "airlockNotification",
        "eventTime": "1970-01-01T00:00:00.000000Z",
        "dataVersion": "4.0",
        "data": {
            "event_type": "status_changed",
            "recipient_emails_by_role": {"workspace_owner": ["owner@x"]},
            "request": {
                "id": "5dbc15ae-40e1-49a5-834b-595f59d626b7",
                "created_when": 1755424800.1,
                "created_by": {"name": "Jane", "email": "jane@x"},
                "updated_when": 1755424900.5,
                "updated_by": {"name": "Rev", "email": "rev@x"},
                "request_type": "export",
                "files": [{"name": "data.csv", "size": 1024}, {"name": "half.bin", "size": 0.5}],
                "status": "approval_in_progress",
                "business_justification": "Paper"
            },
            "workspace": {"id": "59b5c8e7-5c42-4fcb-a7fd-294cfc27aa76", "display_name": "Genomics",
                          "description": "Sequencing"}
        }
    });
    assert_eq!(serde_json::to_value(&event).unwrap(), expected);
    let _: AirlockNotificationEvent = round_trip(&expected);
}

/// Ensures that the user dict keeps TRE's camelCase names.
#[test]
fn user_uses_camel_case() {
    let user = User::new("u1", "Jane", "jane@x");
    assert_eq!(
        serde_json::to_value(&user).unwrap(),
        json!({"id": "u1", "name": "Jane", "email": "jane@x", "roles": [], "roleAssignments": []})
    );
}
