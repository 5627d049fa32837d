//! The CustomResourceDefinitions of Kubernetes mode, generated from the model's types.
//!
//! Kubernetes requires structural schemas, in which `additionalProperties` may not sit beside
//! `properties`; the model rejects unknown fields with serde (`deny_unknown_fields`), which
//! schemars renders as `additionalProperties: false`, so that is removed here. The API server
//! prunes unknown fields instead, and the control plane's validation still names them.

use std::path::PathBuf;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::model::WasmWorkload;
use crate::model::node::WasmNode;

/// Where the chart keeps its CRDs.
pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/flotilla/crds")
}

/// Every CRD as (file name, YAML), with a header saying where it comes from.
///
/// # Errors
/// Serialisation fails (it does not for these types).
pub fn render() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    [
        ("wasmworkloads.flotilla.dev.yaml", WasmWorkload::crd()),
        ("wasmnodes.flotilla.dev.yaml", WasmNode::crd()),
    ]
    .into_iter()
    .map(|(file, crd)| {
        let mut value = serde_json::to_value(&crd).unwrap_or(Value::Null);
        make_structural(&mut value);
        let yaml = serde_yaml::to_string(&value)?;
        Ok((
            file,
            format!(
                "# Generated from the Rust types by `cargo run -p flotilla-control-plane --bin \
                 crdgen`; do not edit.\n{yaml}"
            ),
        ))
    })
    .collect()
}

/// Drops `additionalProperties: false` wherever `properties` is set.
fn make_structural(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.contains_key("properties")
                && map.get("additionalProperties") == Some(&Value::Bool(false))
            {
                map.remove("additionalProperties");
            }
            map.values_mut().for_each(make_structural);
        }
        Value::Array(items) => items.iter_mut().for_each(make_structural),
        _ => {}
    }
}
