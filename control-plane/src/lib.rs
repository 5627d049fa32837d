//! Flotilla's control plane. It keeps the desired state of `WasmWorkload` objects, knows the
//! connected node agents and schedules workload replicas onto them.
//!
//! This crate is a placeholder until the control-plane work lands; the node agent runs on its own
//! with static manifests in the meantime.

pub use flotilla_proto as proto;
