//! `NodeSelector`: a node must carry every label of the workload's node selector (including
//! `kubernetes.io/arch` for arch-aware placement).

use crate::scheduler::cycle_state::CycleState;
use crate::scheduler::framework::{FilterPlugin, NodeView, Plugin, WorkloadRequest};
use crate::scheduler::status::Status;

/// The plugin's name.
pub const NAME: &str = "NodeSelector";

/// Filters out nodes that lack a selected label.
#[derive(Debug, Default)]
pub struct NodeSelector;

impl Plugin for NodeSelector {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl FilterPlugin for NodeSelector {
    fn filter(&self, _: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>) -> Status {
        let matches = workload
            .node_selector
            .iter()
            .all(|(k, v)| node.info.labels.get(k) == Some(v));
        if matches {
            Status::Success
        } else {
            Status::UnschedulableAndUnresolvable("node(s) didn't match the node selector".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::plugins::testing::*;

    type Labels<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn selector_must_be_a_subset_of_labels() {
        let cases: [(Labels<'_>, Labels<'_>, bool); 4] = [
            (&[], &[], true),
            (
                &[("kubernetes.io/arch", "arm64")],
                &[("kubernetes.io/arch", "arm64"), ("zone", "a")],
                true,
            ),
            (
                &[("kubernetes.io/arch", "arm64")],
                &[("kubernetes.io/arch", "amd64")],
                false,
            ),
            (&[("zone", "a"), ("disk", "ssd")], &[("zone", "a")], false),
        ];
        for (selector, labels, fits) in cases {
            let mut info = node("n");
            info.labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let mut w = workload(0, 0);
            w.node_selector = selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let status = NodeSelector.filter(&CycleState::default(), &w, &view(&info));
            assert_eq!(status.is_success(), fits, "{selector:?} on {labels:?}");
        }
    }
}
