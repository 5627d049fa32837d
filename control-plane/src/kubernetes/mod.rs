//! What Kubernetes mode adds around the [`KubeStore`](crate::store::KubeStore): the CRDs
//! ([`crds`]), leader election on a Lease ([`leader`]), a `WasmNode` object per connected agent
//! (`nodes`), Kubernetes Events for what users should see about their workloads
//! (`events`) and a watch of the ConfigMaps and Secrets workloads use ([`config`]). Everything here writes under [`FIELD_MANAGER`].

pub mod config;
pub mod crds;
pub(crate) mod events;
pub mod leader;
pub(crate) mod nodes;

pub use crate::store::kube::{FIELD_MANAGER, error_line};

/// The label that marks objects the control plane owns (and may delete).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "flotilla-control-plane");
