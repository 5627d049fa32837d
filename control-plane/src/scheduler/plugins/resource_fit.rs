//! `ResourceFit`: a node must have room for one more replica's memory, CPU and sandbox.

use crate::scheduler::cycle_state::CycleState;
use crate::scheduler::framework::{FilterPlugin, NodeView, Plugin, WorkloadRequest};
use crate::scheduler::status::Status;

/// The plugin's name.
pub const NAME: &str = "ResourceFit";

/// Filters out nodes without room.
#[derive(Debug, Default)]
pub struct ResourceFit;

impl Plugin for ResourceFit {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl FilterPlugin for ResourceFit {
    fn filter(&self, _: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>) -> Status {
        let after = node.with_one_more(workload);
        let cap = node.info.allocatable;
        if after.sandboxes > cap.sandboxes {
            Status::Unschedulable("too many sandboxes".into())
        } else if after.memory > cap.memory {
            Status::Unschedulable("insufficient memory".into())
        } else if after.cpu_millis > cap.cpu_millis {
            Status::Unschedulable("insufficient cpu".into())
        } else {
            Status::Success
        }
    }

    fn is_dynamic(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::framework::NodeResources;
    use crate::scheduler::plugins::testing::*;

    #[test]
    fn each_resource_is_checked() {
        let cases = [
            ((0, 0, 0), (100, 100), None),
            ((900, 0, 0), (100, 100), None),
            ((901, 0, 0), (100, 100), Some("insufficient memory")),
            ((0, 950, 0), (100, 100), Some("insufficient cpu")),
            ((0, 0, 10), (0, 0), Some("too many sandboxes")),
            ((0, 0, 9), (0, 0), None),
        ];
        for ((memory, cpu_millis, sandboxes), (req_mem, req_cpu), reason) in cases {
            let mut info = node("n");
            info.allocated = NodeResources {
                memory,
                cpu_millis,
                sandboxes,
            };
            let status = ResourceFit.filter(
                &CycleState::default(),
                &workload(req_mem, req_cpu),
                &view(&info),
            );
            assert_eq!(status.reason(), reason, "{memory} {cpu_millis} {sandboxes}");
        }
    }
}
