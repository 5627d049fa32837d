//! `WasmNode`: one per connected node agent, cluster-scoped, so that `kubectl get wasmnodes`
//! shows the fleet (arch, capacity, sandboxes, readiness and heartbeat) in Kubernetes mode.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Condition, Requests, Taint};

/// What a node agent registered when it joined.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
// Each printcolumn(...) repeats name/type_/json_path, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "flotilla.dev",
        version = "v1alpha1",
        kind = "WasmNode",
        status = "NodeStatus",
        shortname = "wn",
        category = "flotilla",
        doc = "A node agent connected to Flotilla's control plane.",
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Ready\")].status"
        ),
        printcolumn(name = "Arch", type_ = "string", json_path = ".spec.arch"),
        printcolumn(name = "Sandboxes", type_ = "integer", json_path = ".status.sandboxes"),
        printcolumn(
            name = "Max",
            type_ = "integer",
            json_path = ".status.allocatable.sandboxes"
        ),
        printcolumn(
            name = "Heartbeat",
            type_ = "date",
            json_path = ".status.lastHeartbeatTime"
        ),
        printcolumn(
            name = "Ingress",
            type_ = "string",
            json_path = ".spec.ingressUrl",
            priority = "1"
        )
    )
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSpec {
    /// `kubernetes.io/arch`: `amd64` or `arm64`.
    pub arch: String,
    /// Operating system, e.g. `linux`.
    #[serde(default)]
    pub os: String,
    /// Taints that keep workloads without a matching toleration off the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    /// Base URL of the agent's HTTP ingress, which serves the HTTP workloads placed here.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ingress_url: String,
}

/// Resources of a node, as the scheduler counts them: what it has, or what is allocated on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeResources {
    /// Bytes of memory.
    #[serde(default)]
    pub memory: u64,
    /// CPU in millicores.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Sandboxes.
    #[serde(default)]
    pub sandboxes: u64,
}

// === impl NodeResources ===

impl NodeResources {
    /// Adds `count` replicas of a workload requesting `requests` each (removes them when
    /// `count` is negative), saturating rather than overflowing.
    pub fn allocate(&mut self, requests: &Requests, count: i64) {
        let apply = |value: u64, per: u64| {
            let delta = per.saturating_mul(count.unsigned_abs());
            if count >= 0 {
                value.saturating_add(delta)
            } else {
                value.saturating_sub(delta)
            }
        };
        self.memory = apply(self.memory, requests.memory);
        self.cpu_millis = apply(self.cpu_millis, requests.cpu_millis);
        self.sandboxes = apply(self.sandboxes, requests.sandboxes);
    }
}

/// What the control plane observes of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeStatus {
    /// What the agent can hold at most.
    #[serde(default)]
    pub allocatable: NodeResources,
    /// Summed requests of the replicas placed on the node.
    #[serde(default)]
    pub allocated: NodeResources,
    /// Sandboxes the agent reported running in its last heartbeat.
    #[serde(default)]
    pub sandboxes: u64,
    /// Running sandboxes per workload (`namespace/name`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub workloads: BTreeMap<String, u64>,
    /// `Ready`: the agent holds a session and heartbeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// RFC 3339 time of the last heartbeat.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_heartbeat_time: String,
}
