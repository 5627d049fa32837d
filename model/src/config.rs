//! Configuration from ConfigMaps and Secrets: the references a workload's environment makes
//! to them (`env[].valueFrom`, `envFrom`), as a container's.

use serde::{Deserialize, Serialize};

use crate::validate_name;

/// Where an environment variable's value comes from: one key of a ConfigMap or a Secret, or
/// a field of the sandbox (the downward API).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct EnvVarSource {
    /// A key of a ConfigMap of the workload's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeySelector>,
    /// A key of a Secret of the workload's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeySelector>,
    /// A field of the sandbox, one of [`FIELD_PATHS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_ref: Option<ObjectFieldSelector>,
}

/// A field of the sandbox an environment variable takes, as a Pod's `fieldRef`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct ObjectFieldSelector {
    /// One of [`FIELD_PATHS`].
    pub field_path: String,
    /// Accepted as Kubernetes writes it (`v1`); nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
}

/// The fields of a sandbox its environment can take: its name (as `flotilla get sandboxes`
/// lists it), its workload's namespace, and the node it runs on.
pub const FIELD_PATHS: &[&str] = &["metadata.name", "metadata.namespace", "spec.nodeName"];

/// One key of a named object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct KeySelector {
    /// The object.
    pub name: String,
    /// The key.
    pub key: String,
    /// Leave the variable unset, rather than fail the sandbox, when the object or key is
    /// missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// Every key of a ConfigMap or a Secret as environment variables.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct EnvFromSource {
    /// Put before every key's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// A ConfigMap of the workload's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ObjectRef>,
    /// A Secret of the workload's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<ObjectRef>,
}

/// A named object of the workload's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct ObjectRef {
    /// The object.
    pub name: String,
    /// Run without it when it does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// Checks `spec.env[].valueFrom` and `spec.envFrom`.
pub(crate) fn validate(
    env: &[crate::EnvVar],
    env_from: &[EnvFromSource],
    fail: &mut impl FnMut(&str, String),
) {
    for (i, var) in env.iter().enumerate() {
        let Some(source) = &var.value_from else {
            continue;
        };
        let field = format!("spec.env[{i}].valueFrom");
        if !var.value.is_empty() {
            fail(&field, "may not be set together with value".into());
        }
        match (
            &source.config_map_key_ref,
            &source.secret_key_ref,
            &source.field_ref,
        ) {
            (Some(selector), None, None) => {
                validate_selector(selector, &format!("{field}.configMapKeyRef"), fail)
            }
            (None, Some(selector), None) => {
                validate_selector(selector, &format!("{field}.secretKeyRef"), fail)
            }
            (None, None, Some(selector)) => {
                if !FIELD_PATHS.contains(&selector.field_path.as_str()) {
                    fail(
                        &format!("{field}.fieldRef.fieldPath"),
                        format!(
                            "{:?}: must be one of {}",
                            selector.field_path,
                            FIELD_PATHS.join(", ")
                        ),
                    );
                }
                if selector.api_version.as_deref().is_some_and(|v| v != "v1") {
                    fail(&format!("{field}.fieldRef.apiVersion"), "must be v1".into());
                }
            }
            _ => fail(
                &field,
                "must have exactly one of configMapKeyRef, secretKeyRef, fieldRef".into(),
            ),
        }
    }
    for (i, source) in env_from.iter().enumerate() {
        let field = format!("spec.envFrom[{i}]");
        let name = match (&source.config_map_ref, &source.secret_ref) {
            (Some(r), None) => (r, "configMapRef"),
            (None, Some(r)) => (r, "secretRef"),
            _ => {
                fail(
                    &field,
                    "must have exactly one of configMapRef, secretRef".into(),
                );
                continue;
            }
        };
        if let Err(message) = validate_name(&name.0.name) {
            fail(&format!("{field}.{}.name", name.1), message.to_string());
        }
        if source.prefix.as_deref().is_some_and(|p| p.contains('=')) {
            fail(&format!("{field}.prefix"), "must not contain '='".into());
        }
    }
}

fn validate_selector(selector: &KeySelector, field: &str, fail: &mut impl FnMut(&str, String)) {
    if let Err(message) = validate_name(&selector.name) {
        fail(&format!("{field}.name"), message.to_string());
    }
    if !is_config_key(&selector.key) {
        fail(
            &format!("{field}.key"),
            format!(
                "{:?}: must be a ConfigMap or Secret key ([-._a-zA-Z0-9]+)",
                selector.key
            ),
        );
    }
}

/// A valid ConfigMap or Secret key, as Kubernetes defines it: also a safe file name.
pub fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && !key.starts_with("..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
