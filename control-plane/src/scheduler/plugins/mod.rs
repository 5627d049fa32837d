//! The built-in plugins, one per file, each named for its `NAME`.

pub mod balanced_allocation;
pub mod http_ingress;
pub mod least_allocated;
pub mod node_ready;
pub mod node_selector;
pub mod resource_fit;
pub mod taint_toleration;
pub mod wasm_features;
pub mod workload_spread;

#[cfg(test)]
pub(crate) mod testing {
    //! Builders shared by the plugin tests.
    use std::collections::BTreeMap;

    use crate::model::Requests;
    use crate::scheduler::framework::{NodeInfo, NodeResources, NodeView, WorkloadRequest};

    pub(crate) fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ready: true,
            labels: BTreeMap::new(),
            taints: vec![],
            allocatable: NodeResources {
                memory: 1000,
                cpu_millis: 1000,
                sandboxes: 10,
            },
            allocated: NodeResources::default(),
            ingress_url: String::new(),
        }
    }

    pub(crate) fn view(info: &NodeInfo) -> NodeView<'_> {
        NodeView {
            info,
            allocated: info.allocated,
            replicas_of_workload: 0,
        }
    }

    pub(crate) fn workload(memory: u64, cpu_millis: u64) -> WorkloadRequest {
        WorkloadRequest {
            key: "default/w".into(),
            requests: Requests {
                memory,
                cpu_millis,
                sandboxes: 1,
            },
            ..WorkloadRequest::default()
        }
    }
}
