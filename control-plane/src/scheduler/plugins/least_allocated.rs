//! `LeastAllocated`: prefers nodes with the most room left after one more replica, averaged
//! over memory, CPU and sandbox slots.

use crate::scheduler::cycle_state::CycleState;
use crate::scheduler::framework::{NodeView, Plugin, ScorePlugin, WorkloadRequest};

/// The plugin's name.
pub const NAME: &str = "LeastAllocated";

/// Scores free capacity.
#[derive(Debug, Default)]
pub struct LeastAllocated;

impl Plugin for LeastAllocated {
    fn name(&self) -> &'static str {
        NAME
    }
}

/// Percentage of `capacity` left after `used`; `None` for a resource the node does not have.
pub(crate) fn free_percent(used: u64, capacity: u64) -> Option<i64> {
    (capacity > 0).then(|| (capacity.saturating_sub(used) as u128 * 100 / capacity as u128) as i64)
}

impl ScorePlugin for LeastAllocated {
    fn score(&self, _: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>) -> i64 {
        let after = node.with_one_more(workload);
        let cap = node.info.allocatable;
        let parts = [
            free_percent(after.memory, cap.memory),
            free_percent(after.cpu_millis, cap.cpu_millis),
            free_percent(after.sandboxes, cap.sandboxes),
        ];
        let (sum, n) = parts
            .iter()
            .flatten()
            .fold((0, 0), |(s, n), p| (s + p, n + 1));
        if n == 0 { 0 } else { sum / n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::framework::NodeResources;
    use crate::scheduler::plugins::testing::*;

    #[test]
    fn emptier_nodes_score_higher() {
        let cases = [
            ((0, 0, 0), 90), // one replica of 100 leaves 90% of each resource
            ((500, 500, 5), 40),
            ((900, 900, 9), 0),
        ];
        for ((memory, cpu_millis, sandboxes), score) in cases {
            let mut info = node("n");
            info.allocated = NodeResources {
                memory,
                cpu_millis,
                sandboxes,
            };
            let s = LeastAllocated.score(&CycleState::default(), &workload(100, 100), &view(&info));
            assert_eq!(s, score, "{memory}");
        }
    }
}
