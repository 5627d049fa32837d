//! `BalancedAllocation`: prefers nodes whose memory, CPU and sandbox use stay even, so that no
//! resource runs out while the others sit idle.

use crate::scheduler::cycle_state::CycleState;
use crate::scheduler::framework::{NodeView, Plugin, ScorePlugin, WorkloadRequest};

/// The plugin's name.
pub const NAME: &str = "BalancedAllocation";

/// Scores how even a node's resource use would be.
#[derive(Debug, Default)]
pub struct BalancedAllocation;

impl Plugin for BalancedAllocation {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl ScorePlugin for BalancedAllocation {
    fn score(&self, _: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>) -> i64 {
        let after = node.with_one_more(workload);
        let cap = node.info.allocatable;
        let fractions: Vec<f64> = [
            (after.memory, cap.memory),
            (after.cpu_millis, cap.cpu_millis),
            (after.sandboxes, cap.sandboxes),
        ]
        .into_iter()
        .filter(|&(_, c)| c > 0)
        .map(|(u, c)| (u as f64 / c as f64).min(1.0))
        .collect();
        if fractions.len() < 2 {
            return 100;
        }
        let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
        let variance =
            fractions.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / fractions.len() as f64;
        ((1.0 - variance.sqrt()) * 100.0).round() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::framework::NodeResources;
    use crate::scheduler::plugins::testing::*;

    #[test]
    fn even_use_scores_higher() {
        let mut even = node("even");
        even.allocated = NodeResources {
            memory: 400,
            cpu_millis: 400,
            sandboxes: 4,
        };
        let mut skewed = node("skewed");
        skewed.allocated = NodeResources {
            memory: 800,
            cpu_millis: 0,
            sandboxes: 4,
        };
        let w = workload(100, 100);
        let state = CycleState::default();
        assert_eq!(BalancedAllocation.score(&state, &w, &view(&even)), 100);
        let s = BalancedAllocation.score(&state, &w, &view(&skewed));
        assert!(s < 70, "{s}");
    }
}
