//! The scheduler: places a workload's replicas on nodes with filter and score plugins, as
//! kube-scheduler's framework does, but a whole batch per cycle.
//!
//! One cycle takes a snapshot of the nodes, runs the pre-filters, filters every node once, then
//! places the replicas one at a time from a max-heap of weighted scores. Scores depend only on
//! the node they rate, so after a placement only that node is re-filtered (dynamic filters such
//! as resources) and re-scored: a workload of 10,000 replicas costs one filter pass and 10,000
//! heap operations, not 10,000 cycles. Replicas that find no node are reported with the reasons
//! the nodes gave (`0/12 nodes are available: 8 insufficient memory, 4 node(s) didn't match the
//! node selector`). Plugins do no I/O.

pub mod cycle_state;
pub mod framework;
pub mod plugins;
pub mod registry;
pub mod status;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use self::cycle_state::CycleState;
use self::framework::{NodeInfo, NodeView, WorkloadRequest};
pub use self::registry::{Profile, SchedulerConfig, UnknownPlugin};
use self::status::Status;

/// The result of one scheduling cycle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// New replicas per node.
    pub assigned: BTreeMap<String, u64>,
    /// Replicas that found no node.
    pub unschedulable: u64,
    /// Why, when `unschedulable > 0`.
    pub message: Option<String>,
}

/// A plugin failed; the cycle placed nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("plugin {plugin} failed: {message}")]
pub struct PluginError {
    /// The plugin.
    pub plugin: &'static str,
    /// What it said.
    pub message: String,
}

/// Places replicas on nodes. Cycles run one at a time; the scheduler itself holds no state.
#[derive(Clone)]
pub struct Scheduler {
    profile: Profile,
}

impl Scheduler {
    /// A scheduler running the plugins of `config`.
    ///
    /// # Errors
    /// [`UnknownPlugin`] for a name that is not a plugin.
    pub fn new(config: &SchedulerConfig) -> Result<Self, UnknownPlugin> {
        Ok(Self {
            profile: Profile::from_config(config)?,
        })
    }

    /// Places `replicas` more replicas of `workload`, which already has `existing` replicas per
    /// node, on `nodes`.
    ///
    /// # Errors
    /// [`PluginError`] when a plugin fails (as opposed to rejecting a node).
    pub fn schedule(
        &self,
        workload: &WorkloadRequest,
        nodes: &[NodeInfo],
        existing: &BTreeMap<String, u64>,
        replicas: u64,
    ) -> Result<Placement, PluginError> {
        let mut placement = Placement::default();
        if replicas == 0 {
            return Ok(placement);
        }
        let mut state = CycleState::default();
        for plugin in &self.profile.pre_filters {
            match plugin.pre_filter(&mut state, workload) {
                status if status.is_success() => {}
                Status::Error(message) => {
                    return Err(PluginError {
                        plugin: plugin.name(),
                        message,
                    });
                }
                status => {
                    placement.unschedulable = replicas;
                    placement.message = Some(format!(
                        "0/{} nodes are available: {}",
                        nodes.len(),
                        status.reason().unwrap_or_default()
                    ));
                    return Ok(placement);
                }
            }
        }

        let mut views: Vec<NodeView<'_>> = nodes
            .iter()
            .map(|info| NodeView {
                info,
                allocated: info.allocated,
                replicas_of_workload: existing.get(&info.name).copied().unwrap_or(0),
            })
            .collect();
        let mut rejections: BTreeMap<String, u64> = BTreeMap::new();
        let mut feasible = Vec::with_capacity(views.len());
        for (index, view) in views.iter().enumerate() {
            match self.filter(&state, workload, view, false)? {
                None => feasible.push(index),
                Some(reason) => *rejections.entry(reason).or_default() += 1,
            }
        }
        let feasible_views: Vec<NodeView<'_>> =
            feasible.iter().map(|&i| views[i].clone()).collect();
        for plugin in &self.profile.pre_scores {
            plugin.pre_score(&mut state, workload, &feasible_views, replicas);
        }

        let mut heap: BinaryHeap<(i64, Reverse<usize>)> = feasible
            .iter()
            .map(|&i| (self.score(&state, workload, &views[i]), Reverse(i)))
            .collect();
        let mut remaining = replicas;
        while remaining > 0 {
            let Some((_, Reverse(index))) = heap.pop() else {
                break;
            };
            let view = &mut views[index];
            view.allocated = view.with_one_more(workload);
            view.replicas_of_workload += 1;
            *placement
                .assigned
                .entry(view.info.name.clone())
                .or_default() += 1;
            remaining -= 1;
            // Can it take another? Only this node changed.
            match self.filter(&state, workload, &views[index], true)? {
                None => heap.push((self.score(&state, workload, &views[index]), Reverse(index))),
                Some(reason) => *rejections.entry(reason).or_default() += 1,
            }
        }
        if remaining > 0 {
            placement.unschedulable = remaining;
            let mut reasons: Vec<(String, u64)> = rejections.into_iter().collect();
            reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let reasons: Vec<String> = reasons
                .into_iter()
                .map(|(reason, count)| format!("{count} {reason}"))
                .collect();
            placement.message = Some(if nodes.is_empty() {
                "0/0 nodes are available: no node agent is registered".to_string()
            } else {
                format!(
                    "0/{} nodes are available: {}",
                    nodes.len(),
                    reasons.join(", ")
                )
            });
        }
        Ok(placement)
    }

    /// Runs the filters (only the dynamic ones when `dynamic_only`); returns the first reason a
    /// node was rejected for.
    fn filter(
        &self,
        state: &CycleState,
        workload: &WorkloadRequest,
        view: &NodeView<'_>,
        dynamic_only: bool,
    ) -> Result<Option<String>, PluginError> {
        for plugin in &self.profile.filters {
            if dynamic_only && !plugin.is_dynamic() {
                continue;
            }
            match plugin.filter(state, workload, view) {
                status if status.is_success() => {}
                Status::Error(message) => {
                    return Err(PluginError {
                        plugin: plugin.name(),
                        message,
                    });
                }
                status => return Ok(status.reason().map(str::to_string)),
            }
        }
        Ok(None)
    }

    fn score(&self, state: &CycleState, workload: &WorkloadRequest, view: &NodeView<'_>) -> i64 {
        self.profile
            .scores
            .iter()
            .map(|(plugin, weight)| weight * plugin.score(state, workload, view).clamp(0, 100))
            .sum()
    }

    /// Chooses `count` replicas to remove from `existing`, taking them from the most loaded
    /// nodes first (nodes that are not ready before all others).
    pub fn select_removals(
        &self,
        workload: &WorkloadRequest,
        nodes: &[NodeInfo],
        existing: &BTreeMap<String, u64>,
        count: u64,
    ) -> BTreeMap<String, u64> {
        let by_name: BTreeMap<&str, &NodeInfo> =
            nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        let load = |name: &str, allocated_memory: u64, sandboxes: u64| -> (bool, u64) {
            match by_name.get(name) {
                Some(node) => {
                    let cap = node.allocatable;
                    let mem = permille(allocated_memory, cap.memory);
                    let slots = permille(sandboxes, cap.sandboxes);
                    (!node.ready, mem.max(slots))
                }
                // A node that is gone first of all.
                None => (true, u64::MAX),
            }
        };
        let mut state: BTreeMap<&str, (u64, u64, u64)> = existing
            .iter()
            .filter(|&(_, &n)| n > 0)
            .map(|(name, &n)| {
                let node = by_name.get(name.as_str());
                let allocated =
                    node.map_or((0, 0), |n| (n.allocated.memory, n.allocated.sandboxes));
                (name.as_str(), (n, allocated.0, allocated.1))
            })
            .collect();
        let mut heap: BinaryHeap<((bool, u64), Reverse<&str>)> = state
            .iter()
            .map(|(&name, &(_, mem, slots))| (load(name, mem, slots), Reverse(name)))
            .collect();
        let mut removals = BTreeMap::new();
        let mut left = count;
        while left > 0 {
            let Some((_, Reverse(name))) = heap.pop() else {
                break;
            };
            let Some(entry) = state.get_mut(name) else {
                continue;
            };
            entry.0 -= 1;
            entry.1 = entry.1.saturating_sub(workload.requests.memory);
            entry.2 = entry.2.saturating_sub(1);
            *removals.entry(name.to_string()).or_default() += 1;
            left -= 1;
            if entry.0 > 0 {
                heap.push((load(name, entry.1, entry.2), Reverse(name)));
            }
        }
        removals
    }
}

fn permille(used: u64, capacity: u64) -> u64 {
    if capacity == 0 {
        0
    } else {
        (used as u128 * 1000 / capacity as u128) as u64
    }
}

#[cfg(test)]
mod tests;
