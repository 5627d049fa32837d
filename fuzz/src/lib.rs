//! Generators of hostile input for Flotilla's property-based fuzz tests (`tests/all/`).
//!
//! Each test runs on stable Rust with [`proptest`]: a bounded number of cases in `cargo test`
//! (256 by default), as many as `PROPTEST_CASES` asks for in a longer run. A failing case is
//! shrunk to a minimal one and saved under `tests/all/proptest-regressions/`, which is
//! committed, so that every later run tries it first.
//!
//! The generators aim near the valid: a manifest is a real `WasmWorkload` with some fields
//! replaced by strings that parsers get wrong (`..` segments, NUL bytes, huge numbers,
//! non-ASCII, empty values), so that validation code is reached, not only the first type check.

use proptest::prelude::*;
use serde_json::{Value, json};

/// Strings that parsers and path handlers get wrong, mixed with plausible ones.
pub fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?",
        "[a-zA-Z0-9_./-]{0,24}",
        Just(String::new()),
        Just("..".to_string()),
        Just("../etc/passwd".to_string()),
        Just("a/../../b".to_string()),
        Just("/etc/shadow".to_string()),
        Just("a//b".to_string()),
        Just("./a".to_string()),
        Just("..hidden".to_string()),
        Just("a\0b".to_string()),
        Just("x".repeat(300)),
        Just("ünïcødé/ñame".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e309".to_string()),
        Just("99999999999Ti".to_string()),
        Just("0.0001m".to_string()),
        Just("1.5".to_string()),
        Just("NaN".to_string()),
        any::<String>(),
    ]
}

/// Quantities as users write them, and ones that overflow or do not parse.
pub fn quantity() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[0-9]{1,4}(Ki|Mi|Gi|m|s|ms)?".prop_map(Value::from),
        (0u64..u64::MAX).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        hostile_string().prop_map(Value::from),
    ]
}

/// Integers of every size and sign, as JSON.
pub fn integer() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..200).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(2_147_483_648_i64)),
        hostile_string().prop_map(Value::from),
    ]
}

/// One volume: emptyDir, configMap or secret with items, or hostPath.
fn volume() -> impl Strategy<Value = Value> {
    let items = || {
        prop::collection::vec(
            (hostile_string(), hostile_string())
                .prop_map(|(key, path)| json!({"key": key, "path": path})),
            0..3,
        )
    };
    prop_oneof![
        (hostile_string(), prop::option::of(quantity())).prop_map(|(name, size)| match size {
            Some(size) => json!({"name": name, "emptyDir": {"sizeLimit": size}}),
            None => json!({"name": name, "emptyDir": {}}),
        }),
        (hostile_string(), hostile_string(), items())
            .prop_map(|(name, map, items)| json!({"name": name, "configMap": {"name": map, "items": items}})),
        (hostile_string(), hostile_string(), items())
            .prop_map(|(name, secret, items)| json!({"name": name, "secret": {"secretName": secret, "items": items}})),
        (hostile_string(), hostile_string())
            .prop_map(|(name, path)| json!({"name": name, "hostPath": {"path": path}})),
    ]
}

/// One change to a valid manifest's spec: a field set to hostile values.
fn spec_change() -> impl Strategy<Value = (&'static str, Value)> {
    let strings = || prop::collection::vec(hostile_string(), 0..4);
    prop_oneof![
        integer().prop_map(|v| ("replicas", v)),
        strings().prop_map(|v| ("args", json!(v))),
        prop::collection::vec((hostile_string(), hostile_string()), 0..3)
            .prop_map(|env| ("env", json!(env.into_iter().map(|(n, v)| json!({"name": n, "value": v})).collect::<Vec<_>>()))),
        (quantity(), quantity(), quantity(), quantity()).prop_map(|(cpu, mem, lcpu, lmem)| (
            "resources",
            json!({"requests": {"cpu": cpu, "memory": mem}, "limits": {"cpu": lcpu, "memory": lmem, "cpuTime": "2s"}})
        )),
        prop::collection::vec(volume(), 0..3).prop_map(|v| ("volumes", json!(v))),
        prop::collection::vec(
            (hostile_string(), hostile_string(), hostile_string(), any::<bool>()),
            0..3
        )
        .prop_map(|mounts| (
            "volumeMounts",
            json!(mounts.into_iter().map(|(name, path, sub, ro)| json!({"name": name, "mountPath": path, "subPath": sub, "readOnly": ro})).collect::<Vec<_>>())
        )),
        prop::collection::btree_map(hostile_string(), hostile_string(), 0..3)
            .prop_map(|m| ("nodeSelector", json!(m))),
        prop::collection::vec((hostile_string(), hostile_string(), "Equal|Exists|Other", "NoSchedule|NoExecute|PreferNoSchedule|Bad"), 0..3)
            .prop_map(|t| ("tolerations", json!(t.into_iter().map(|(k, v, op, e)| json!({"key": k, "value": v, "operator": op, "effect": e})).collect::<Vec<_>>()))),
        (prop::option::of(hostile_string()), prop::option::of(hostile_string()), prop::option::of(integer()), prop::option::of(quantity()))
            .prop_map(|(host, prefix, conc, timeout)| ("http", json!({"host": host, "pathPrefix": prefix, "maxConcurrency": conc, "timeout": timeout}))),
        prop::collection::vec(prop_oneof![hostile_string(), Just("gc".to_string()), Just("component-model-async".to_string())], 0..4)
            .prop_map(|f| ("wasm", json!({"features": f}))),
        prop::collection::vec(hostile_string(), 0..3)
            .prop_map(|to| ("network", json!({"egress": to.into_iter().map(|t| json!({"to": [t]})).collect::<Vec<_>>()}))),
        "Always|OnFailure|Never|Sometimes".prop_map(|p| ("restartPolicy", json!(p))),
        integer().prop_map(|v| ("activeDeadlineSeconds", v)),
        (quantity(), quantity()).prop_map(|(s, u)| ("strategy", json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": s, "maxUnavailable": u}}))),
        hostile_string().prop_map(|s| ("module", json!({"sha256": s}))),
        hostile_string().prop_map(|p| ("module", json!({"path": p}))),
        hostile_string().prop_map(|u| ("module", json!({"url": u}))),
        (hostile_string(), hostile_string()).prop_map(|(k, v)| ("unknownField", json!({k: v}))),
    ]
}

/// A `WasmWorkload` manifest (YAML) near the valid: a valid one with up to three fields
/// changed, its name mostly valid and its namespace, when it has one, drawn from
/// [`hostile_string`].
pub fn manifest() -> impl Strategy<Value = String> {
    manifest_of(&"a".repeat(64))
}

/// Like [`manifest`], running the module of digest `sha256` unless a change replaces it.
pub fn manifest_of(sha256: &str) -> impl Strategy<Value = String> + use<> {
    let sha256 = sha256.to_string();
    let name = prop_oneof![
        4 => "[a-z]([-a-z0-9]{0,12}[a-z0-9])?",
        1 => hostile_string(),
    ];
    (
        name,
        prop::option::weighted(0.2, hostile_string()),
        prop::collection::vec(spec_change(), 0..4),
    )
        .prop_map(move |(name, namespace, changes)| {
            let mut spec = json!({
                "module": {"sha256": sha256},
                "replicas": 1,
            });
            for (field, value) in changes {
                spec[field] = value;
            }
            let mut metadata = json!({"name": name});
            if let Some(namespace) = namespace {
                metadata["namespace"] = json!(namespace);
            }
            let manifest = json!({
                "apiVersion": "flotilla.dev/v1alpha1",
                "kind": "WasmWorkload",
                "metadata": metadata,
                "spec": spec,
            });
            serde_yaml::to_string(&manifest).unwrap_or_default()
        })
}
