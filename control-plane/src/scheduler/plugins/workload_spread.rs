//! `WorkloadSpread`: spreads one workload's replicas across the feasible nodes, preferring
//! nodes below their even share.

use crate::scheduler::cycle_state::CycleState;
use crate::scheduler::framework::{NodeView, Plugin, PreScorePlugin, ScorePlugin, WorkloadRequest};

/// The plugin's name.
pub const NAME: &str = "WorkloadSpread";

/// Scores a node by how far it is below the workload's even share per node.
#[derive(Debug, Default)]
pub struct WorkloadSpread;

/// The even share per feasible node, computed once per cycle.
struct EvenShare(u64);

impl Plugin for WorkloadSpread {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl PreScorePlugin for WorkloadSpread {
    fn pre_score(
        &self,
        state: &mut CycleState,
        _: &WorkloadRequest,
        feasible: &[NodeView<'_>],
        replicas: u64,
    ) {
        let existing: u64 = feasible.iter().map(|n| n.replicas_of_workload).sum();
        let nodes = feasible.len().max(1) as u64;
        state.write(
            NAME,
            EvenShare((existing + replicas).div_ceil(nodes).max(1)),
        );
    }
}

impl ScorePlugin for WorkloadSpread {
    fn score(&self, state: &CycleState, _: &WorkloadRequest, node: &NodeView<'_>) -> i64 {
        let share = state.read::<EvenShare>(NAME).map_or(1, |s| s.0);
        let below = share.saturating_sub(node.replicas_of_workload);
        (below as u128 * 100 / share as u128) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::plugins::testing::*;

    #[test]
    fn nodes_below_their_share_score_higher() {
        let (a, b) = (node("a"), node("b"));
        let mut views = vec![view(&a), view(&b)];
        views[0].replicas_of_workload = 4;
        let mut state = CycleState::default();
        // 4 existing + 4 new over 2 nodes: a share of 4 each.
        WorkloadSpread.pre_score(&mut state, &workload(0, 0), &views, 4);
        let w = workload(0, 0);
        assert_eq!(WorkloadSpread.score(&state, &w, &views[0]), 0);
        assert_eq!(WorkloadSpread.score(&state, &w, &views[1]), 100);
    }
}
