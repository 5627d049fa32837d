//! The plugin framework: extension points, the workload being placed and the nodes it may go to.

use std::collections::BTreeMap;

use super::cycle_state::CycleState;
use super::status::Status;
pub use crate::model::node::NodeResources;
use crate::model::{Requests, Taint, Toleration, Workload};

/// Everything a plugin has.
pub trait Plugin: Send + Sync {
    /// The plugin's name, as used in configuration.
    fn name(&self) -> &'static str;
}

/// Runs once per cycle before filtering; may store state for the filter.
pub trait PreFilterPlugin: Plugin {
    /// Checks the workload and prepares cycle state. A failure makes every node unschedulable.
    fn pre_filter(&self, state: &mut CycleState, workload: &WorkloadRequest) -> Status;
}

/// Decides whether a node can take one more replica.
pub trait FilterPlugin: Plugin {
    /// Filters one node.
    fn filter(&self, state: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>)
    -> Status;

    /// Whether the answer can change as replicas are placed within the cycle (resources do; a
    /// node selector does not). Dynamic filters are re-run on a node after each placement.
    fn is_dynamic(&self) -> bool {
        false
    }
}

/// Runs once per cycle before scoring, with the feasible nodes.
pub trait PreScorePlugin: Plugin {
    /// Prepares cycle state for scoring `replicas` replicas over `feasible` nodes.
    fn pre_score(
        &self,
        state: &mut CycleState,
        workload: &WorkloadRequest,
        feasible: &[NodeView<'_>],
        replicas: u64,
    );
}

/// Ranks a feasible node for one more replica.
pub trait ScorePlugin: Plugin {
    /// A score in `0..=100` (higher is better) for placing one more replica on `node`. Scores
    /// depend on the node alone, so that a batch only rescores the node it placed on.
    fn score(&self, state: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>) -> i64;
}

/// A node as the scheduler sees it at the start of a cycle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Whether the agent is connected and heartbeating.
    pub ready: bool,
    /// Labels, including `kubernetes.io/arch`.
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// What the node can hold.
    pub allocatable: NodeResources,
    /// What is placed on it already, all workloads together.
    pub allocated: NodeResources,
    /// Base URL of its agent's HTTP ingress; empty when it has none.
    pub ingress_url: String,
}

/// A node during a cycle: its snapshot plus what this cycle placed on it so far.
#[derive(Clone, Debug)]
pub struct NodeView<'a> {
    /// The snapshot.
    pub info: &'a NodeInfo,
    /// Allocated resources including this cycle's placements.
    pub allocated: NodeResources,
    /// Replicas of the workload being scheduled on this node, including this cycle's.
    pub replicas_of_workload: u64,
}

/// The workload being placed, reduced to what plugins need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadRequest {
    /// `namespace/name`, for messages.
    pub key: String,
    /// What one replica requests.
    pub requests: Requests,
    /// Labels a node must have.
    pub node_selector: BTreeMap<String, String>,
    /// Taints tolerated.
    pub tolerations: Vec<Toleration>,
    /// Whether it serves HTTP (needs a node with an ingress).
    pub http: bool,
    /// WebAssembly proposals it enables (`spec.wasm.features`), which its node must offer.
    pub wasm_features: crate::model::wasm::FeatureSet,
}

impl WorkloadRequest {
    /// The request for a workload object.
    pub fn from_workload(workload: &Workload) -> Self {
        Self {
            key: workload.key().to_string(),
            requests: workload.spec.requests(),
            node_selector: workload.spec.node_selector.clone(),
            tolerations: workload.spec.tolerations.clone(),
            http: workload.spec.http.is_some(),
            wasm_features: workload.spec.wasm_features(),
        }
    }
}

impl NodeView<'_> {
    /// Resources this node would have allocated after one more replica of `workload`.
    pub fn with_one_more(&self, workload: &WorkloadRequest) -> NodeResources {
        NodeResources {
            memory: self
                .allocated
                .memory
                .saturating_add(workload.requests.memory),
            cpu_millis: self
                .allocated
                .cpu_millis
                .saturating_add(workload.requests.cpu_millis),
            sandboxes: self
                .allocated
                .sandboxes
                .saturating_add(workload.requests.sandboxes),
        }
    }
}
