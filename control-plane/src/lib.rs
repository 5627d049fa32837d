//! Flotilla's control plane. It keeps the desired state of `WasmWorkload` objects in a
//! workload store, knows the connected node agents and [`scheduler`]s workload replicas onto
//! them.
//!
//! The data flows one way: the store (embedded or Kubernetes) → the controller, which places
//! replicas with the scheduler and writes status → the per-node desired-state index → the
//! agent sessions of the gRPC services. [`ControlPlane`] assembles them; the types below are
//! what tests, the CLI's all-in-one mode and the benchmarks put together themselves.
//!
//! | module | concept |
//! |--------|---------|
//! | `store` | desired state behind [`WorkloadStore`]: [`EmbeddedStore`], [`KubeStore`] |
//! | `cluster` | what the control plane knows of its agents: [`Cluster`] |
//! | `controller` | per-workload reconciling: [`Controller`] |
//! | [`scheduler`] | filters and scores, as the Kubernetes scheduler framework's |
//! | `grpc` | the user API ([`WorkloadService`]) and the agent protocol ([`AgentService`]) |
//! | `modules` | the module store ([`ModuleStore`]), URL and OCI fetches |
//! | [`kubernetes`] | CRDs, leader election and what Kubernetes mode publishes |
//! | `memory` | how the process uses memory: [`disable_transparent_huge_pages`] |
//! | `metrics` | the control plane's Prometheus metrics |
//! | `server` | [`ControlPlane`]: everything on one listener |
//!
//! [`model`] holds the domain types shared by every part; nothing here depends on Kubernetes or
//! gRPC except at the edges.

#![warn(unreachable_pub)]

pub mod auth;
mod cluster;
mod controller;
mod grpc;
pub mod kubernetes;
mod memory;
mod metrics;
mod modules;
pub mod scheduler;
mod server;
mod store;

pub use flotilla_model as model;
pub use flotilla_proto as proto;

pub use self::cluster::{Cluster, DesiredIndex};
pub use self::controller::{Action, Batch, Controller, PassReport};
pub use self::grpc::{AgentService, WorkloadService};
pub use self::memory::disable_transparent_huge_pages;
pub use self::modules::{DeniedAddress, FetchGuard, ModuleError, ModuleStore};
pub use self::server::{ControlPlane, ServerConfig, StoreBackend};
pub use self::store::{
    EmbeddedStore, Error as StoreError, KubeStore, Watch, WatchEvent, WorkloadStore,
};
