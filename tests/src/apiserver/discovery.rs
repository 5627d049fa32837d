//! Discovery for the fake API server: which resources exist, as `/api`, `/apis` and each
//! group-version's resource list tell clients such as kubectl, and which have `status` and
//! `scale` subresources. Custom resources come from their CustomResourceDefinitions.

use serde_json::{Value, json};

/// One resource the server knows.
#[derive(Clone, Debug)]
pub(crate) struct Resource {
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status: bool,
    /// JSON paths (`.spec.replicas`, `.status.replicas`) of a scale subresource.
    pub scale: Option<(String, String)>,
}

impl Resource {
    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: Vec::new(),
            categories: Vec::new(),
            status: false,
            scale: None,
        }
    }

    pub fn group_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// The built-in resources Flotilla's control plane and tests touch.
pub(crate) fn builtins() -> Vec<Resource> {
    vec![
        Resource::builtin("", "v1", "namespaces", "Namespace", false),
        Resource::builtin("", "v1", "nodes", "Node", false),
        Resource::builtin("", "v1", "events", "Event", true),
        Resource::builtin("", "v1", "configmaps", "ConfigMap", true),
        Resource::builtin("", "v1", "secrets", "Secret", true),
        Resource::builtin("events.k8s.io", "v1", "events", "Event", true),
        Resource::builtin("coordination.k8s.io", "v1", "leases", "Lease", true),
        Resource::builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        ),
    ]
}

/// The collection of CustomResourceDefinitions: creating one there registers its resources.
pub(crate) const CRDS: &str = "apiextensions.k8s.io/v1/customresourcedefinitions";

/// The resources a CustomResourceDefinition defines, one per served version.
pub(crate) fn from_crd(crd: &Value) -> Vec<Resource> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    spec["versions"]
        .as_array()
        .map(|versions| {
            versions
                .iter()
                .filter(|v| v["served"].as_bool().unwrap_or(true))
                .map(|v| Resource {
                    group: spec["group"].as_str().unwrap_or_default().into(),
                    version: v["name"].as_str().unwrap_or_default().into(),
                    plural: names["plural"].as_str().unwrap_or_default().into(),
                    singular: names["singular"].as_str().unwrap_or_default().into(),
                    kind: names["kind"].as_str().unwrap_or_default().into(),
                    namespaced: spec["scope"] == "Namespaced",
                    short_names: strings(&names["shortNames"]),
                    categories: strings(&names["categories"]),
                    status: v["subresources"]["status"].is_object(),
                    scale: v["subresources"]["scale"].as_object().map(|scale| {
                        (
                            scale["specReplicasPath"]
                                .as_str()
                                .unwrap_or_default()
                                .into(),
                            scale["statusReplicasPath"]
                                .as_str()
                                .unwrap_or_default()
                                .into(),
                        )
                    }),
                })
                .collect()
        })
        .unwrap_or_default()
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "get",
    "list",
    "patch",
    "update",
    "watch",
    "deletecollection",
];

/// `GET /api`.
pub(crate) fn api_versions(address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
    })
}

/// `GET /apis`.
pub(crate) fn group_list(resources: &[Resource]) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for resource in resources.iter().filter(|r| !r.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == resource.group) {
            Some((_, versions)) if !versions.contains(&resource.version) => {
                versions.push(resource.version.clone());
            }
            Some(_) => {}
            None => groups.push((resource.group.clone(), vec![resource.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                .collect();
            json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /api/v1` or `GET /apis/{group}/{version}`, if the group-version exists.
pub(crate) fn resource_list(resources: &[Resource], group_version: &str) -> Option<Value> {
    let mut listed = Vec::new();
    for r in resources
        .iter()
        .filter(|r| r.group_version() == group_version)
    {
        listed.push(json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
            "shortNames": r.short_names,
            "categories": r.categories,
        }));
        if r.status {
            listed.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r.scale.is_some() {
            listed.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    (!listed.is_empty()).then(|| {
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": listed,
        })
    })
}

/// Reads the value at a CRD JSON path such as `.spec.replicas`.
pub(crate) fn at_path<'a>(object: &'a Value, path: &str) -> &'a Value {
    path.trim_start_matches('.')
        .split('.')
        .fold(object, |value, field| &value[field])
}

/// Sets the value at a CRD JSON path such as `.spec.replicas`.
pub(crate) fn set_path(object: &mut Value, path: &str, new: Value) {
    let mut value = object;
    for field in path.trim_start_matches('.').split('.') {
        value = &mut value[field];
    }
    *value = new;
}

/// `GET /openapi/v3`: where each group-version's document is.
pub(crate) fn openapi_index(resources: &[Resource]) -> Value {
    let mut paths = serde_json::Map::new();
    for resource in resources {
        let prefix = api_prefix(resource);
        paths.insert(
            prefix.trim_start_matches('/').to_string(),
            json!({"serverRelativeURL": format!("/openapi/v3{prefix}")}),
        );
    }
    json!({"paths": paths})
}

/// `GET /openapi/v3/{api/v1 | apis/group/version}`: enough for kubectl to see that the server
/// validates fields itself (each resource's PATCH takes `fieldValidation`). No schemas.
pub(crate) fn openapi_document(resources: &[Resource], group_version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    for r in resources
        .iter()
        .filter(|r| r.group_version() == group_version)
    {
        let scope = if r.namespaced {
            "/namespaces/{namespace}"
        } else {
            ""
        };
        let operation = json!({
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {"200": {"description": "OK"}},
        });
        paths.insert(
            format!("{}{scope}/{}/{{name}}", api_prefix(r), r.plural),
            json!({"patch": operation, "put": operation, "get": operation}),
        );
        paths.insert(
            format!("{}{scope}/{}", api_prefix(r), r.plural),
            json!({"post": operation}),
        );
    }
    (!paths.is_empty()).then(|| {
        json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.33.0-flotilla-fake"},
            "paths": paths,
            "components": {"schemas": {}},
        })
    })
}

fn api_prefix(resource: &Resource) -> String {
    if resource.group.is_empty() {
        format!("/api/{}", resource.version)
    } else {
        format!("/apis/{}/{}", resource.group, resource.version)
    }
}
