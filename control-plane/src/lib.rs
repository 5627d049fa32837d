//! Flotilla's control plane. It keeps the desired state of `WasmWorkload` objects in a
//! [`store`], knows the connected node agents and [`scheduler`]s workload replicas onto them.
//!
//! [`model`] holds the domain types shared by every part; nothing here depends on Kubernetes or
//! gRPC except at the edges.

pub mod cluster;
pub mod controller;
pub mod grpc;
pub mod kubernetes;
pub mod metrics;
pub mod modules;
pub mod scheduler;
pub mod server;
pub mod store;

pub use flotilla_model as model;
pub use flotilla_proto as proto;
