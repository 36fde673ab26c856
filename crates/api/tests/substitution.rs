//! Property substitution: one test per case of reference §10.4 (TRE
//! `tests_ma/test_service_bus/test_substitutions.py`), plus the rules of §6.7 those
//! tests leave implicit.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use steward_api::domain::{Properties, Resource};
use steward_api::rules::{SubstitutionError, substitute_properties, substitute_value};
use steward_api::templates::{ArraySubstitutionAction, PipelineStep, PipelineStepProperty};

fn resource(resource_type: &str, extra: Value) -> Resource {
    let mut json = json!({
        "id": "123",
        "templateName": "template name",
        "templateVersion": "7",
        "resourceType": resource_type,
        "properties": {
            "display_name": "test_resource name",
            "address_prefix": ["172.0.0.1", "192.168.0.1"],
            "fqdn": ["*.pypi.org", "files.pythonhosted.org", "security.ubuntu.com"],
            "my_protocol": "MyCoolProtocol",
            "enabled": true,
            "count": 42,
            "ratio": 1.5,
            "nothing": null
        }
    });
    json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::from_value(json).unwrap()
}

fn primary_resource() -> Resource {
    resource("workspace", json!({}))
}

fn primary_user_resource() -> Resource {
    resource(
        "user-resource",
        json!({"workspaceId": "ws", "parentWorkspaceServiceId": "svc", "ownerId": "u1"}),
    )
}

fn primary_workspace_service_resource() -> Resource {
    resource("workspace-service", json!({"workspaceId": "ws"}))
}

fn basic_shared_service() -> Resource {
    let mut shared = resource("shared-service", json!({}));
    shared.properties.insert("display_name".to_owned(), json!("shared_service_resource name"));
    shared
}

fn resource_ws_parent() -> Resource {
    resource(
        "workspace",
        json!({"id": "ws", "templateName": "ws template name", "templateVersion": "8", "properties": {
            "display_name": "ImTheParentWS",
            "address_prefix": ["172.1.1.1", "192.168.1.1"],
            "fqdn": ["*.pypi.org", "security.ubuntu.com"]
        }}),
    )
}

fn resource_ws_svc_parent() -> Resource {
    resource(
        "workspace-service",
        json!({"id": "svc", "templateName": "svc template name", "templateVersion": "9", "workspaceId": "ws",
               "properties": {
            "display_name": "ImTheParentWSSvc",
            "address_prefix": ["172.2.2.2", "192.168.2.2"],
            "fqdn": ["*.pypi.org", "files.pythonhosted.org"]
        }}),
    )
}

fn resource_to_update() -> Resource {
    let mut firewall = resource(
        "shared-service",
        json!({"id": "fw", "templateName": "tre-shared-service-firewall"}),
    );
    firewall.properties = Properties::new();
    firewall
}

fn dict(resource: &Resource) -> Value {
    serde_json::to_value(resource).unwrap()
}

fn sub(
    value: &str,
    primary: &Resource,
    ws: Option<&Resource>,
    svc: Option<&Resource>,
) -> Result<Value, SubstitutionError> {
    let (ws, svc) = (ws.map(dict), svc.map(dict));
    substitute_value(value, Some(&dict(primary)), ws.as_ref(), svc.as_ref())
}

fn step(properties: Value) -> PipelineStep {
    serde_json::from_value(json!({"stepId": "pre-step-1", "properties": properties})).unwrap()
}

fn simple_pipeline_step() -> PipelineStep {
    step(json!([
        {"name": "just_text", "type": "string", "value": "Updated by {{resource.id}}"},
        {"name": "just_text_2", "type": "string", "value": "No substitution, just a fixed string here"},
        {"name": "just_text_3", "type": "string",
         "value": "Multiple substitutions -> {{resource.id}} and {{resource.templateName}}"}
    ]))
}

fn pipeline_step() -> PipelineStep {
    step(json!([{
        "name": "rule_collections",
        "type": "array",
        "arraySubstitutionAction": "replace",
        "arrayMatchField": "name",
        "value": {
            "name": "arc-web_app_subnet_{{ resource.id }}",
            "action": "Allow",
            "rules": [{
                "name": "nexus",
                "description": "Deployed by {{ resource.id }}",
                "protocols": [{"port": "443", "type": "Https"}, {"port": "80", "type": "{{ resource.properties.my_protocol }}"}],
                "target_fqdns": "{{ resource.properties.fqdn }}",
                "source_addresses": "{{ resource.properties.address_prefix }}"
            }]
        }
    }]))
}

/// `pipeline_step` with `action` and the collection named `name` (and `action_text`).
fn array_step(
    action: ArraySubstitutionAction,
    name: &str,
    action_text: Option<&str>,
) -> PipelineStep {
    let mut step = pipeline_step();
    let property: &mut PipelineStepProperty = &mut step.properties.as_mut().unwrap()[0];
    property.array_substitution_action = action;
    property.value["name"] = json!(name);
    if let Some(text) = action_text {
        property.value["action"] = json!(text);
    }
    step
}

fn collections(properties: &Properties) -> &Vec<Value> {
    properties["rule_collections"].as_array().unwrap()
}

/// Ensures that tokens read the primary resource: a list replaces the whole value
/// (text dropped), strings concatenate, and a missing primary is an error.
#[test]
fn tre_10_4_01_substitution_for_primary_resource_no_parents() {
    let primary = primary_resource();
    let value = "{{ resource.properties.address_prefix }}";
    assert!(matches!(
        substitute_value(value, None, None, None),
        Err(SubstitutionError::MissingPrimary { .. })
    ));
    let ws = dict(&resource_ws_parent());
    assert!(substitute_value(value, None, Some(&ws), None).is_err());
    assert!(substitute_value(value, None, None, Some(&ws)).is_err());

    assert_eq!(sub(value, &primary, None, None).unwrap(), json!(["172.0.0.1", "192.168.0.1"]));
    let with_text = "{{ resource.properties.fqdn }} - this text will be removed because fqdn is a list and shouldn't be concatenated into a string";
    assert_eq!(
        sub(with_text, &primary, None, None).unwrap(),
        json!(["*.pypi.org", "files.pythonhosted.org", "security.ubuntu.com"])
    );
    assert_eq!(
        sub("I think {{ resource.templateName }} is the best template!", &primary, None, None)
            .unwrap(),
        json!("I think template name is the best template!")
    );
    assert_eq!(
        sub(
            "I think {{ resource.templateName }} is the best template, and {{ resource.templateVersion }} is a good version!",
            &primary,
            None,
            None
        )
        .unwrap(),
        json!("I think template name is the best template, and 7 is a good version!")
    );
}

/// Ensures that for a user resource `parent` is the workspace service and
/// `parent.parent` the workspace, that a missing parent is an error, and that a third
/// level is a `ValueError`.
#[test]
fn tre_10_4_02_substitution_for_user_resource_primary_resource_with_parents() {
    let (primary, ws, svc) =
        (primary_user_resource(), resource_ws_parent(), resource_ws_svc_parent());
    assert_eq!(
        sub("{{ resource.parent.parent.properties.address_prefix }}", &primary, Some(&ws), None)
            .unwrap(),
        json!(["172.1.1.1", "192.168.1.1"])
    );
    assert_eq!(
        sub("{{ resource.parent.parent.properties.fqdn }} - dropped", &primary, Some(&ws), None)
            .unwrap(),
        json!(["*.pypi.org", "security.ubuntu.com"])
    );
    assert_eq!(
        sub(
            "I think {{ resource.parent.parent.templateName }} is the best template!",
            &primary,
            Some(&ws),
            None
        )
        .unwrap(),
        json!("I think ws template name is the best template!")
    );
    assert_eq!(
        sub(
            "I think {{ resource.parent.parent.templateName }} is the best template, and {{ resource.parent.parent.templateVersion }} is a good version!",
            &primary,
            Some(&ws),
            None
        )
        .unwrap(),
        json!("I think ws template name is the best template, and 8 is a good version!")
    );
    assert!(matches!(
        sub("{{ resource.parent.properties.display_name }}", &primary, None, None),
        Err(SubstitutionError::MissingParent { parent: "workspace service", .. })
    ));
    assert_eq!(
        sub("{{ resource.parent.properties.address_prefix }}", &primary, None, Some(&svc)).unwrap(),
        json!(["172.2.2.2", "192.168.2.2"])
    );
    assert_eq!(
        sub("{{ resource.parent.properties.fqdn }} - dropped", &primary, None, Some(&svc)).unwrap(),
        json!(["*.pypi.org", "files.pythonhosted.org"])
    );
    assert_eq!(
        sub(
            "I think {{ resource.parent.templateName }} is the best template!",
            &primary,
            None,
            Some(&svc)
        )
        .unwrap(),
        json!("I think svc template name is the best template!")
    );
    assert_eq!(
        sub(
            "I think {{ resource.parent.templateName }} is the best template, and {{ resource.parent.templateVersion }} is a good version!",
            &primary,
            None,
            Some(&svc)
        )
        .unwrap(),
        json!("I think svc template name is the best template, and 9 is a good version!")
    );
    assert_eq!(
        sub(
            "I am the primary resource ( a user resource - {{ resource.properties.display_name }}), my workspace service parent is {{ resource.parent.properties.display_name }} and my parent workspace is {{ resource.parent.parent.properties.display_name }}",
            &primary,
            Some(&ws),
            Some(&svc)
        )
        .unwrap(),
        json!("I am the primary resource ( a user resource - test_resource name), my workspace service parent is ImTheParentWSSvc and my parent workspace is ImTheParentWS")
    );
    assert!(matches!(
        sub("{{ resource.parent.parent.properties.display_name }}", &primary, None, None),
        Err(SubstitutionError::MissingParent { parent: "workspace", .. })
    ));
    assert!(matches!(
        sub(
            "{{ resource.parent.parent.parent.properties.display_name }}",
            &primary,
            Some(&ws),
            Some(&svc)
        ),
        Err(SubstitutionError::TooManyParents { levels: 3, .. })
    ));
}

/// Ensures that for a workspace service `parent` is the workspace and deeper levels are
/// a `ValueError`.
#[test]
fn tre_10_4_03_substitution_for_workspace_service_primary_resource_with_parents() {
    let (primary, ws) = (primary_workspace_service_resource(), resource_ws_parent());
    assert_eq!(
        sub("I am a ws service, but my ws parent is '{{ resource.parent.properties.display_name }}'", &primary, Some(&ws), None)
            .unwrap(),
        json!("I am a ws service, but my ws parent is 'ImTheParentWS'")
    );
    for value in [
        "{{ resource.parent.parent.properties.display_name }}",
        "{{ resource.parent.parent.parent.properties.display_name }}",
    ] {
        assert!(
            matches!(
                sub(value, &primary, Some(&ws), None),
                Err(SubstitutionError::TooManyParents { .. })
            ),
            "{value}"
        );
    }
}

/// Ensures that a workspace has no parents.
#[test]
fn tre_10_4_04_substitution_for_workspace_primary_resource_parents() {
    let primary = primary_resource();
    assert_eq!(
        sub(
            "I am a ws WITHOUT any parents, my name is '{{ resource.properties.display_name }}'",
            &primary,
            None,
            None
        )
        .unwrap(),
        json!("I am a ws WITHOUT any parents, my name is 'test_resource name'")
    );
    for value in [
        "{{ resource.parent.properties.display_name }}",
        "{{ resource.parent.parent.properties.display_name }}",
    ] {
        assert!(
            matches!(
                sub(value, &primary, None, None),
                Err(SubstitutionError::TooManyParents { .. })
            ),
            "{value}"
        );
    }
}

/// Ensures that a shared service has no parents.
#[test]
fn tre_10_4_05_substitution_for_shared_service_primary_resource_parents() {
    let primary = basic_shared_service();
    assert_eq!(
        sub("I am a shared service WITHOUT any parents, my name is '{{ resource.properties.display_name }}'", &primary, None, None)
            .unwrap(),
        json!("I am a shared service WITHOUT any parents, my name is 'shared_service_resource name'")
    );
    for value in [
        "{{ resource.parent.properties.display_name }}",
        "{{ resource.parent.parent.properties.display_name }}",
    ] {
        assert!(
            matches!(
                sub(value, &primary, None, None),
                Err(SubstitutionError::TooManyParents { .. })
            ),
            "{value}"
        );
    }
}

/// Ensures that a step's string properties substitute one or more tokens and keep
/// fixed strings.
#[test]
fn tre_10_4_06_simple_substitution() {
    let properties = substitute_properties(
        &simple_pipeline_step(),
        &primary_resource(),
        None,
        None,
        &resource_to_update(),
    )
    .unwrap();
    assert_eq!(properties["just_text"], "Updated by 123");
    assert_eq!(properties["just_text_2"], "No substitution, just a fixed string here");
    assert_eq!(properties["just_text_3"], "Multiple substitutions -> 123 and template name");
}

/// Ensures that tokens inside lists nested in an object value are substituted.
#[test]
fn tre_10_4_07_substitution_list_strings() {
    let step = step(json!([{
        "name": "obj_list_strings",
        "type": "string",
        "value": {
            "name": "nrc_guacamole_svc_{{ resource.id }}",
            "action": "Allow",
            "rules": [{
                "name": "AllowAzureAD",
                "description": "AAD access for authNZ",
                "source_addresses": "",
                "destination_addresses": ["AzureActiveDirectory"],
                "destination_ports": ["*", "{{resource.id}}"],
                "protocols": ["TCP"]
            }]
        }
    }]));
    let properties =
        substitute_properties(&step, &primary_resource(), None, None, &resource_to_update())
            .unwrap();
    assert_eq!(
        properties["obj_list_strings"]["rules"][0]["destination_ports"],
        json!(["*", "123"])
    );
    assert_eq!(properties["obj_list_strings"]["name"], "nrc_guacamole_svc_123");
}

/// Ensures that a nested object gets lists and strings injected at every depth.
#[test]
fn tre_10_4_08_substitution_props() {
    let properties = substitute_properties(
        &pipeline_step(),
        &primary_resource(),
        None,
        None,
        &resource_to_update(),
    )
    .unwrap();
    let rule = &properties["rule_collections"][0]["rules"][0];
    assert_eq!(
        rule["target_fqdns"],
        json!(["*.pypi.org", "files.pythonhosted.org", "security.ubuntu.com"])
    );
    assert_eq!(rule["source_addresses"], json!(["172.0.0.1", "192.168.0.1"]));
    assert_eq!(rule["protocols"][1]["type"], "MyCoolProtocol");
    assert_eq!(rule["description"], "Deployed by 123");
}

/// Ensures that `append` adds and `remove` deletes the matching element, and removing
/// from an empty array is a no-op.
#[test]
fn tre_10_4_09_substitution_array_append_remove() {
    let (primary, mut target) = (primary_resource(), resource_to_update());
    let mut apply = |action, name: &str| {
        let properties =
            substitute_properties(&array_step(action, name, None), &primary, None, None, &target)
                .unwrap();
        target.properties = properties.clone(); // what the resource processor does
        properties
    };
    use ArraySubstitutionAction::{Append, Remove};
    assert_eq!(collections(&apply(Append, "object 1")).len(), 1);
    assert_eq!(collections(&apply(Append, "object 2")).len(), 2);
    assert_eq!(collections(&apply(Append, "object 3")).len(), 3);
    let after = apply(Remove, "object 2");
    let names: Vec<&Value> = collections(&after).iter().map(|c| &c["name"]).collect();
    assert_eq!(names, [&json!("object 1"), &json!("object 3")]);
    let after = apply(Remove, "object 1");
    assert_eq!(collections(&after).len(), 1);
    assert_eq!(collections(&after)[0]["name"], "object 3");
    assert!(collections(&apply(Remove, "object 3")).is_empty());
    assert!(collections(&apply(Remove, "object 1")).is_empty());
}

/// Ensures that `replace` swaps the element whose match field matches.
#[test]
fn tre_10_4_10_substitution_array_append_replace() {
    let (primary, mut target) = (primary_resource(), resource_to_update());
    let mut apply = |action, name: &str, text: Option<&str>| {
        let properties =
            substitute_properties(&array_step(action, name, text), &primary, None, None, &target)
                .unwrap();
        target.properties = properties.clone();
        properties
    };
    use ArraySubstitutionAction::{Append, Replace};
    let after = apply(Append, "Object 1", None);
    assert_eq!(
        (collections(&after).len(), &collections(&after)[0]["name"]),
        (1, &json!("Object 1"))
    );
    let after = apply(Append, "Object 2", None);
    assert_eq!(
        (collections(&after).len(), &collections(&after)[1]["name"]),
        (2, &json!("Object 2"))
    );
    let after = apply(Replace, "Object 1", Some("Deny Object 1"));
    assert_eq!(
        (collections(&after).len(), &collections(&after)[0]["action"]),
        (2, &json!("Deny Object 1"))
    );
    let after = apply(Replace, "Object 2", Some("Deny Object 2"));
    assert_eq!(
        (collections(&after).len(), &collections(&after)[1]["action"]),
        (2, &json!("Deny Object 2"))
    );
}

/// Ensures that replacing an element that is not there appends it.
#[test]
fn tre_10_4_11_substitution_array_replace_not_found() {
    let step = array_step(ArraySubstitutionAction::Replace, "Object 1", None);
    let properties =
        substitute_properties(&step, &primary_resource(), None, None, &resource_to_update())
            .unwrap();
    assert_eq!(collections(&properties).len(), 1);
    assert_eq!(collections(&properties)[0]["name"], "Object 1");
}

/// Ensures that a single-token value keeps the looked-up type, and concatenation
/// writes values as Python's `str()` does.
#[test]
fn tre_10_4_12_substitution_boolean_preservation() {
    let primary = primary_resource();
    assert_eq!(
        sub("{{ resource.properties.enabled }}", &primary, None, None).unwrap(),
        json!(true)
    );
    assert_eq!(sub("{{resource.properties.count}}", &primary, None, None).unwrap(), json!(42));
    assert_eq!(sub("{{ resource.properties.ratio }}", &primary, None, None).unwrap(), json!(1.5));
    assert_eq!(
        sub("{{ resource.properties.nothing }}", &primary, None, None).unwrap(),
        Value::Null
    );
    assert_eq!(
        sub("Count is {{ resource.properties.count }}", &primary, None, None).unwrap(),
        json!("Count is 42")
    );
    assert_eq!(
        sub("on={{ resource.properties.enabled }}", &primary, None, None).unwrap(),
        json!("on=True")
    );
    assert_eq!(
        sub("x={{ resource.properties.nothing }}", &primary, None, None).unwrap(),
        json!("x=None")
    );
    let step = step(
        json!([{"name": "flag", "type": "boolean", "value": "{{ resource.properties.enabled }}"}]),
    );
    let properties =
        substitute_properties(&step, &primary, None, None, &resource_to_update()).unwrap();
    assert_eq!(properties["flag"], json!(true));
}

/// Ensures that a path that does not exist makes the whole value empty (TRE's backward
/// compatibility), even next to tokens that do exist.
#[test]
fn missing_path_gives_an_empty_string() {
    let primary = primary_resource();
    assert_eq!(sub("{{ resource.properties.missing }}", &primary, None, None).unwrap(), json!(""));
    assert_eq!(
        sub("{{ resource.id }} and {{ resource.nope.deeper }}", &primary, None, None).unwrap(),
        json!("")
    );
    assert_eq!(
        sub("{{ resource.properties.display_name.deeper }}", &primary, None, None).unwrap(),
        json!("")
    );
}

/// Ensures that spacing inside the braces does not matter, unknown roots and unclosed
/// braces stay text, and values without tokens need no primary resource.
#[test]
fn token_syntax_edge_cases() {
    let primary = primary_resource();
    for value in ["{{resource.id}}", "{{ resource.id }}", "{{  resource.id\t}}"] {
        assert_eq!(
            sub(&format!("id={value}"), &primary, None, None).unwrap(),
            json!("id=123"),
            "{value}"
        );
    }
    assert_eq!(
        sub("{{ other.id }} {{ resource.id }}", &primary, None, None).unwrap(),
        json!("{{ other.id }} 123")
    );
    assert_eq!(
        sub("open {{ resource.id", &primary, None, None).unwrap(),
        json!("open {{ resource.id")
    );
    assert_eq!(substitute_value("plain", None, None, None).unwrap(), json!("plain"));
}

/// Ensures that `overwrite` replaces the whole array, an empty action keeps it, values
/// without the match field are an error, and non-string scalars in step values are
/// kept.
#[test]
fn array_overwrite_keep_and_errors() {
    let primary = primary_resource();
    let mut target = resource_to_update();
    target.properties.insert("rule_collections".to_owned(), json!([{"name": "a"}, {"name": "b"}]));
    let overwrite = array_step(ArraySubstitutionAction::Overwrite, "only", None);
    let properties = substitute_properties(&overwrite, &primary, None, None, &target).unwrap();
    assert_eq!(collections(&properties).len(), 1);
    assert_eq!(collections(&properties)[0]["name"], "only");

    let keep = array_step(ArraySubstitutionAction::None, "ignored", None);
    let properties = substitute_properties(&keep, &primary, None, None, &target).unwrap();
    assert_eq!(properties["rule_collections"], json!([{"name": "a"}, {"name": "b"}]));

    let mut no_match_field = array_step(ArraySubstitutionAction::Remove, "x", None);
    no_match_field.properties.as_mut().unwrap()[0].value.as_object_mut().unwrap().remove("name");
    assert!(matches!(
        substitute_properties(&no_match_field, &primary, None, None, &target),
        Err(SubstitutionError::MissingMatchField { .. })
    ));

    target.properties.insert("rule_collections".to_owned(), json!("not a list"));
    let append = array_step(ArraySubstitutionAction::Append, "x", None);
    assert!(matches!(
        substitute_properties(&append, &primary, None, None, &target),
        Err(SubstitutionError::NotAList { .. })
    ));

    let scalars = step(json!([{"name": "obj", "type": "object",
        "value": {"enabled": true, "port": 443, "none": null, "id": "{{ resource.id }}"}}]));
    let properties =
        substitute_properties(&scalars, &primary, None, None, &resource_to_update()).unwrap();
    assert_eq!(properties["obj"], json!({"enabled": true, "port": 443, "none": null, "id": "123"}));
    assert!(
        substitute_properties(&step(json!(null)), &primary, None, None, &target)
            .unwrap()
            .is_empty()
    );
}
