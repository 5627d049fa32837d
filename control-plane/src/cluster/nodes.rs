//! The node registry: which agents are known, what they offer, and whether they are alive.
//!
//! Agents register and heartbeat through the agent protocol; the registry turns missed
//! heartbeats into a node that is not ready, so the reconciler moves its replicas elsewhere.
//! Every change bumps a version on a `watch` channel that the reconciler waits on.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::model::wasm::WasmFeature;
use crate::scheduler::framework::NodeInfo;

/// A node as `flotilla get nodes` lists it (its `WasmNode` status, in Kubernetes mode, is made
/// from this).
#[derive(Clone, Debug)]
pub struct ListedNode {
    /// What the node registered, and whether it is ready.
    pub info: NodeInfo,
    /// Sandboxes its agent last reported running.
    pub running: u64,
    /// Time since its last heartbeat.
    pub since_heartbeat: Duration,
}

/// Known nodes. Cheap to share behind an `Arc`.
pub struct NodeRegistry {
    nodes: Mutex<BTreeMap<String, Entry>>,
    changed: watch::Sender<u64>,
}

struct Entry {
    /// What the agent registered, with `cluster_labels` merged into its labels.
    info: NodeInfo,
    /// The labels the agent registered (they win over the cluster's).
    agent_labels: BTreeMap<String, String>,
    /// Labels of the Kubernetes Node of the same name (zone, instance type, ...), if any.
    cluster_labels: BTreeMap<String, String>,
    last_seen: Instant,
    /// Sandbox counts per workload key and generation (one per revision on the node), from
    /// the last heartbeat.
    running: BTreeMap<(String, u64), Reported>,
}

/// What an agent reported for one workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// The generation its sandboxes run.
    pub generation: u64,
    /// Sandboxes running.
    pub running: u64,
    /// Of those, sandboxes that have run for the workload's `minReadySeconds`.
    pub available: u64,
    /// Sandboxes that completed and stay done.
    pub succeeded: u64,
}

/// Sandbox counts of one workload generation, summed over nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sandboxes running.
    pub running: u64,
    /// Of those, sandboxes that have run for the workload's `minReadySeconds`.
    pub available: u64,
    /// Sandboxes that completed and stay done.
    pub succeeded: u64,
}

impl Default for NodeRegistry {
    fn default() -> Self {
        Self {
            nodes: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl NodeRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Adds or replaces a node; it is ready and seen now. Labels learnt from the cluster stay.
    pub fn upsert(&self, mut info: NodeInfo) {
        info.ready = true;
        let mut nodes = self.lock();
        let cluster_labels = nodes
            .get(&info.name)
            .map(|e| e.cluster_labels.clone())
            .unwrap_or_default();
        let agent_labels = info.labels.clone();
        info.labels = merged_labels(&agent_labels, &cluster_labels);
        nodes.insert(
            info.name.clone(),
            Entry {
                info,
                agent_labels,
                cluster_labels,
                last_seen: Instant::now(),
                running: BTreeMap::new(),
            },
        );
        drop(nodes);
        self.bump();
    }

    /// Sets the labels a node has in the cluster (its Kubernetes Node's); the agent's own
    /// labels keep precedence. Returns whether the node's labels changed.
    pub fn set_cluster_labels(&self, name: &str, labels: BTreeMap<String, String>) -> bool {
        let mut nodes = self.lock();
        let Some(entry) = nodes.get_mut(name) else {
            return false;
        };
        if entry.cluster_labels == labels {
            return false;
        }
        entry.info.labels = merged_labels(&entry.agent_labels, &labels);
        entry.cluster_labels = labels;
        drop(nodes);
        self.bump();
        true
    }

    /// Records a heartbeat; a node that was not ready becomes ready again. Returns whether the
    /// node is known.
    pub fn heartbeat(&self, name: &str) -> bool {
        let mut nodes = self.lock();
        let Some(entry) = nodes.get_mut(name) else {
            return false;
        };
        entry.last_seen = Instant::now();
        let revived = !entry.info.ready;
        entry.info.ready = true;
        drop(nodes);
        if revived {
            self.bump();
        }
        true
    }

    /// Records what a node reported per workload key and generation. Counts as a heartbeat.
    pub fn report(&self, name: &str, running: BTreeMap<(String, u64), Reported>) {
        let changed = {
            let mut nodes = self.lock();
            let Some(entry) = nodes.get_mut(name) else {
                return;
            };
            entry.last_seen = Instant::now();
            let changed = entry.running != running || !entry.info.ready;
            entry.running = running;
            entry.info.ready = true;
            changed
        };
        if changed {
            self.bump();
        }
    }

    /// Sandbox counts per workload key and generation, summed over ready nodes.
    pub fn running(&self) -> BTreeMap<String, BTreeMap<u64, Counts>> {
        let mut out: BTreeMap<String, BTreeMap<u64, Counts>> = BTreeMap::new();
        for entry in self.lock().values().filter(|e| e.info.ready) {
            for ((key, _), reported) in &entry.running {
                let counts = out
                    .entry(key.clone())
                    .or_default()
                    .entry(reported.generation)
                    .or_default();
                counts.running += reported.running;
                counts.available += reported.available;
                counts.succeeded += reported.succeeded;
            }
        }
        out
    }

    /// Marks nodes not seen for `timeout` as not ready; returns their names.
    pub fn expire(&self, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut expired = Vec::new();
        for entry in self.lock().values_mut() {
            if entry.info.ready && now.duration_since(entry.last_seen) >= timeout {
                entry.info.ready = false;
                expired.push(entry.info.name.clone());
            }
        }
        if !expired.is_empty() {
            self.bump();
        }
        expired
    }

    /// Marks a node not ready at once (its agent disconnected).
    pub fn mark_lost(&self, name: &str) {
        if let Some(entry) = self.lock().get_mut(name) {
            entry.info.ready = false;
        }
        self.bump();
    }

    /// Forgets a node; returns whether it was known.
    pub fn remove(&self, name: &str) -> bool {
        let removed = self.lock().remove(name).is_some();
        if removed {
            self.bump();
        }
        removed
    }

    /// A snapshot of every node, sorted by name.
    pub fn snapshot(&self) -> Vec<NodeInfo> {
        self.lock().values().map(|e| e.info.clone()).collect()
    }

    /// Every node with what it runs and how long ago it was heard from, sorted by name.
    pub fn statuses(&self) -> Vec<ListedNode> {
        let now = Instant::now();
        self.lock()
            .values()
            .map(|e| ListedNode {
                info: e.info.clone(),
                running: e.running.values().map(|r| r.running).sum(),
                since_heartbeat: now.duration_since(e.last_seen),
            })
            .collect()
    }

    /// The names of every known node.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Wakes when the set of nodes or their readiness changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

fn merged_labels(
    agent: &BTreeMap<String, String>,
    cluster: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    // What a node offers guests is the agent's to say (its registration), never a Node's label.
    let mut labels: BTreeMap<_, _> = cluster
        .iter()
        .filter(|(k, _)| !k.starts_with(WasmFeature::NODE_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(agent.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ..NodeInfo::default()
        }
    }

    #[test]
    fn cluster_labels_merge_under_the_agents_and_survive_reregistration() {
        let registry = NodeRegistry::default();
        let mut info = node("a");
        info.labels = [("kubernetes.io/arch".to_string(), "arm64".to_string())].into();
        registry.upsert(info.clone());
        let cluster: BTreeMap<String, String> = [
            ("kubernetes.io/arch", "amd64"),
            ("topology.kubernetes.io/zone", "z1"),
            // Only the agent says what it offers guests.
            ("wasm.flotilla.dev/component-model-async", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert!(registry.set_cluster_labels("a", cluster.clone()));
        assert!(
            !registry.set_cluster_labels("a", cluster),
            "no change the second time"
        );
        assert!(!registry.set_cluster_labels("unknown", BTreeMap::new()));
        let labels = |r: &NodeRegistry| r.snapshot()[0].labels.clone();
        assert_eq!(
            labels(&registry)["kubernetes.io/arch"],
            "arm64",
            "the agent's label wins"
        );
        assert_eq!(labels(&registry)["topology.kubernetes.io/zone"], "z1");
        assert!(!labels(&registry).contains_key("wasm.flotilla.dev/component-model-async"));
        // The agent reconnects: the cluster's labels stay until the next sync says otherwise.
        registry.upsert(info);
        assert_eq!(labels(&registry)["topology.kubernetes.io/zone"], "z1");
        assert!(registry.set_cluster_labels("a", BTreeMap::new()));
        assert!(!labels(&registry).contains_key("topology.kubernetes.io/zone"));
    }

    #[test]
    fn missed_heartbeats_make_a_node_not_ready_and_a_heartbeat_revives_it() {
        let registry = NodeRegistry::default();
        let mut changes = registry.subscribe();
        registry.upsert(node("a"));
        registry.upsert(node("b"));
        assert!(changes.has_changed().expect("open"));
        changes.mark_unchanged();

        assert_eq!(
            registry.expire(Duration::from_secs(3600)),
            Vec::<String>::new()
        );
        assert!(!changes.has_changed().expect("open"));
        assert_eq!(registry.expire(Duration::ZERO), vec!["a", "b"]);
        assert!(changes.has_changed().expect("open"));
        assert!(registry.snapshot().iter().all(|n| !n.ready));

        assert!(registry.heartbeat("a"));
        assert!(!registry.heartbeat("unknown"));
        let ready: Vec<bool> = registry.snapshot().iter().map(|n| n.ready).collect();
        assert_eq!(ready, [true, false]);
    }
}
