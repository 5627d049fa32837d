//! `NodeReady`: only nodes whose agent is connected and heartbeating take replicas.

use crate::scheduler::cycle_state::CycleState;
use crate::scheduler::framework::{FilterPlugin, NodeView, Plugin, WorkloadRequest};
use crate::scheduler::status::Status;

/// The plugin's name.
pub const NAME: &str = "NodeReady";

/// Filters out nodes that are not ready.
#[derive(Debug, Default)]
pub struct NodeReady;

impl Plugin for NodeReady {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl FilterPlugin for NodeReady {
    fn filter(&self, _: &CycleState, _: &WorkloadRequest, node: &NodeView<'_>) -> Status {
        if node.info.ready {
            Status::Success
        } else {
            Status::UnschedulableAndUnresolvable("node(s) were not ready".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::plugins::testing::*;

    #[test]
    fn filters_by_readiness() {
        for (ready, fits) in [(true, true), (false, false)] {
            let mut info = node("n");
            info.ready = ready;
            let status = NodeReady.filter(&CycleState::default(), &workload(0, 0), &view(&info));
            assert_eq!(status.is_success(), fits);
        }
    }
}
