//! The template registry: shipped templates, `STEWARD_TEMPLATES_DIR`, clear errors for
//! bad files, and property validation against a template.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::{Value, json};
use steward_api::domain::{Properties, ResourceType};
use steward_api::templates::{PropertyError, REDACTED, TemplateError, TemplateRegistry};

fn props(value: Value) -> Properties {
    value.as_object().cloned().unwrap()
}

fn write(dir: &Path, file: &str, value: &Value) {
    std::fs::write(dir.join(file), serde_json::to_string_pretty(value).unwrap()).unwrap();
}

fn minimal(name: &str) -> Value {
    json!({"name": name, "version": "1.0.0", "resourceType": "shared-service",
           "properties": {"display_name": {"type": "string", "updateable": true}}})
}

/// Ensures that the four sample templates ship, with the linuxvm pipeline of DESIGN §5
/// (firewall upgrade → main → firewall upgrade) and the flags operations rely on.
#[test]
fn shipped_templates_load() {
    let registry = TemplateRegistry::builtin().unwrap();
    let names: Vec<(&str, ResourceType)> =
        registry.iter().map(|t| (t.name.as_str(), t.resource_type)).collect();
    assert_eq!(
        names,
        [
            ("tre-service-guacamole", ResourceType::WorkspaceService),
            ("tre-shared-service-firewall", ResourceType::SharedService),
            ("tre-user-resource-linuxvm", ResourceType::UserResource),
            ("tre-workspace-base", ResourceType::Workspace),
        ]
    );
    let linuxvm = registry.get("tre-user-resource-linuxvm").unwrap();
    let install = linuxvm.pipeline_for("install").unwrap();
    let shape: Vec<(&str, Option<&str>, Option<&str>)> = install
        .iter()
        .map(|s| {
            (s.step_id.as_str(), s.resource_template_name.as_deref(), s.resource_action.as_deref())
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("pre-step-1", Some("tre-shared-service-firewall"), Some("upgrade")),
            ("main", None, None),
            ("post-step-1", Some("tre-shared-service-firewall"), Some("upgrade")),
        ]
    );
    assert!(linuxvm.pipeline_for("upgrade").is_none());
    assert!(linuxvm.pipeline_for("start").is_none(), "custom actions have no pipeline");
    assert!(linuxvm.has_custom_action("start") && !linuxvm.has_custom_action("reboot"));
    assert_eq!(linuxvm.sensitive_properties().collect::<Vec<_>>(), ["admin_password"]);
    assert_eq!(linuxvm.parent_workspace_service.as_deref(), Some("tre-service-guacamole"));
    assert_eq!(registry.file_of("tre-workspace-base"), Some("builtin:tre-workspace-base.json"));
    assert_eq!(registry.len(), 4);
}

/// Ensures that a directory adds templates, replaces a shipped one of the same name,
/// and ignores files that are not `*.json`.
#[test]
fn templates_dir_adds_and_replaces() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "extra.json", &minimal("my-shared-service"));
    let mut replacement = minimal("tre-shared-service-firewall");
    replacement["version"] = json!("9.9.9");
    replacement["properties"]["rule_collections"] = json!({"type": "array", "updateable": true});
    replacement["properties"]["network_rule_collections"] =
        json!({"type": "array", "updateable": true});
    write(dir.path(), "firewall.json", &replacement);
    std::fs::write(dir.path().join("README.md"), "not a template").unwrap();
    let registry = TemplateRegistry::load(Some(dir.path())).unwrap();
    assert_eq!(registry.len(), 5);
    assert_eq!(registry.get("my-shared-service").unwrap().version, "1.0.0");
    assert_eq!(registry.get("tre-shared-service-firewall").unwrap().version, "9.9.9");
    assert!(registry.file_of("tre-shared-service-firewall").unwrap().ends_with("firewall.json"));
}

/// Ensures that each kind of bad template is an error naming the file and the field.
#[test]
fn bad_templates_name_file_and_field() {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"name": "x", "version": "1", "resourceType": "shared-service", "required": ["nope"]}),
            "required[0]",
        ),
        (json!({"name": "x", "version": "1", "resourceType": "planet"}), "resourceType"),
        (json!({"name": "", "version": "1", "resourceType": "workspace"}), "name"),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "properties": {"size": {"type": "string", "enum": ["s"], "default": "m"}}}),
            "properties.size.default",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "properties": {"n": {"type": "integer", "default": "one"}}}),
            "properties.n.default",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "pipeline": {"install": [{"stepId": 7}]}}),
            "pipeline.install[0].stepId",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "pipeline": {"install": [{"stepId": "main", "stepTittle": "typo"}]}}),
            "pipeline.install[0].stepTittle",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "pipeline": {"install": [{"stepId": "a", "resourceTemplateName": "tre-shared-service-firewall",
                                             "resourceType": "shared-service", "resourceAction": "upgrade"}]}}),
            "pipeline.install",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "pipeline": {"install": [{"stepId": "main"}, {"stepId": "a", "resourceType": "shared-service",
                                             "resourceAction": "upgrade"}]}}),
            "pipeline.install[1].resourceTemplateName",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "pipeline": {"install": [{"stepId": "main"}, {"stepId": "a", "resourceTemplateName": "w",
                                             "resourceType": "workspace", "resourceAction": "upgrade"}]}}),
            "pipeline.install[1].resourceType",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "pipeline": {"install": [{"stepId": "main"}, {"stepId": "a",
                       "resourceTemplateName": "tre-shared-service-firewall", "resourceType": "shared-service",
                       "resourceAction": "upgrade", "properties": [{"name": "rule_collections", "type": "array",
                       "arraySubstitutionAction": "remove", "value": {"name": "n"}}]}]}}),
            "pipeline.install[1].properties[0].arrayMatchField",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "pipeline": {"install": [{"stepId": "main"}, {"stepId": "a",
                       "resourceTemplateName": "no-such-template", "resourceType": "shared-service",
                       "resourceAction": "upgrade"}]}}),
            "pipeline.install[1].resourceTemplateName",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace",
                   "pipeline": {"install": [{"stepId": "main"}, {"stepId": "a",
                       "resourceTemplateName": "tre-shared-service-firewall", "resourceType": "shared-service",
                       "resourceAction": "upgrade", "properties": [{"name": "bogus", "type": "string", "value": "v"}]}]}}),
            "pipeline.install[1].properties[0].name",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "user-resource", "parentWorkspaceService": "nope"}),
            "parentWorkspaceService",
        ),
        (
            json!({"name": "x", "version": "1", "resourceType": "workspace", "customActions": [{"name": "install"}]}),
            "customActions[0].name",
        ),
    ];
    for (template, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "bad.json", &template);
        let error = TemplateRegistry::load(Some(dir.path())).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("bad.json"), "{text}");
        assert!(text.contains(&format!("`{field}`")), "expected field {field}: {text}");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.json"), "{ not json").unwrap();
    let error = TemplateRegistry::load(Some(dir.path())).unwrap_err();
    assert!(
        matches!(&error, TemplateError::Parse { file, .. } if file.ends_with("broken.json")),
        "{error:?}"
    );
    assert!(std::error::Error::source(&error).is_some(), "the JSON error is kept as the source");
}

/// Ensures that two templates of one name in the directory, and a directory that
/// cannot be read, are errors.
#[test]
fn duplicate_names_and_missing_dirs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.json", &minimal("same"));
    write(dir.path(), "b.json", &minimal("same"));
    let error = TemplateRegistry::load(Some(dir.path())).unwrap_err();
    assert!(matches!(&error, TemplateError::Duplicate { name, .. } if name == "same"), "{error:?}");
    let error = TemplateRegistry::load(Some(&dir.path().join("missing"))).unwrap_err();
    assert!(matches!(error, TemplateError::Read { .. }), "{error:?}");
}

/// Ensures that install validation checks required, unknown, type and allowed values,
/// after defaults are added.
#[test]
fn install_properties_are_validated() {
    let registry = TemplateRegistry::builtin().unwrap();
    let linuxvm = registry.get("tre-user-resource-linuxvm").unwrap();
    let mut properties = props(json!({"display_name": "vm"}));
    linuxvm.apply_defaults(&mut properties);
    assert_eq!(properties["os_image"], "Ubuntu 22.04 LTS");
    assert_eq!(properties["vm_size"], "2 CPU | 8GB RAM");
    assert!(properties.get("admin_password").is_none(), "no default, not added");
    linuxvm.validate_install(&properties).unwrap();

    let check = |value: Value| linuxvm.validate_install(&props(value)).unwrap_err();
    assert!(
        matches!(check(json!({"os_image": "Ubuntu 22.04 LTS"})), PropertyError::Required { property, .. } if property == "display_name")
    );
    assert!(matches!(
        check(json!({"display_name": null, "os_image": "Ubuntu 22.04 LTS"})),
        PropertyError::Required { .. }
    ));
    assert!(
        matches!(check(json!({"display_name": "v", "os_image": "Ubuntu 22.04 LTS", "x": 1})), PropertyError::Unknown { property, .. } if property == "x")
    );
    assert!(matches!(
        check(json!({"display_name": 5, "os_image": "Ubuntu 22.04 LTS"})),
        PropertyError::WrongType { .. }
    ));
    assert!(matches!(
        check(json!({"display_name": "v", "os_image": "Windows"})),
        PropertyError::NotAllowed { .. }
    ));
}

/// Ensures that on upgrade only `updateable` properties may change, while a pipeline
/// install step may set any template property.
#[test]
fn patch_properties_are_validated_by_action() {
    let registry = TemplateRegistry::builtin().unwrap();
    let linuxvm = registry.get("tre-user-resource-linuxvm").unwrap();
    linuxvm.validate_patch(&props(json!({"display_name": "new"})), "upgrade").unwrap();
    let error = linuxvm
        .validate_patch(&props(json!({"os_image": "Ubuntu 24.04 LTS"})), "upgrade")
        .unwrap_err();
    assert!(
        matches!(error, PropertyError::NotUpdateable { property, .. } if property == "os_image")
    );
    linuxvm.validate_patch(&props(json!({"os_image": "Ubuntu 24.04 LTS"})), "install").unwrap();
    assert!(matches!(
        linuxvm.validate_patch(&props(json!({"bogus": 1})), "install").unwrap_err(),
        PropertyError::Unknown { .. }
    ));
}

/// Ensures that sensitive values are replaced by `REDACTED` and nothing else changes.
#[test]
fn sensitive_values_are_redacted() {
    let registry = TemplateRegistry::builtin().unwrap();
    let linuxvm = registry.get("tre-user-resource-linuxvm").unwrap();
    let properties = props(json!({"display_name": "vm", "admin_password": "s3cret"}));
    let redacted = linuxvm.redact(&properties);
    assert_eq!(
        Value::Object(redacted.clone()),
        json!({"display_name": "vm", "admin_password": REDACTED})
    );
    assert_eq!(properties["admin_password"], "s3cret", "the input is untouched");
    // A stored REDACTED value still validates (it is what a read-back resource holds).
    linuxvm.validate_install(&props(json!({"display_name": "vm", "os_image": "Ubuntu 22.04 LTS", "admin_password": REDACTED}))).unwrap();
}
