//! The wire's [`NodeResources`] and the model's, which the scheduler counts with.

use flotilla_model::node::NodeResources as ModelNodeResources;

use crate::control::v1::NodeResources;

impl From<&ModelNodeResources> for NodeResources {
    fn from(resources: &ModelNodeResources) -> Self {
        Self {
            memory_bytes: resources.memory,
            cpu_millis: resources.cpu_millis,
            sandboxes: resources.sandboxes,
        }
    }
}

impl From<&NodeResources> for ModelNodeResources {
    fn from(resources: &NodeResources) -> Self {
        Self {
            memory: resources.memory_bytes,
            cpu_millis: resources.cpu_millis,
            sandboxes: resources.sandboxes,
        }
    }
}
