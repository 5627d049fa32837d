//! Flotilla's node agent: one process hosting tens of thousands of WASI sandboxes.
//!
//! Data flows one way: a [`WorkloadSpec`](flotilla_proto::agent::v1::WorkloadSpec) (from a static
//! [`manifest`], the `admin` API or the control plane) goes to the [`supervisor`], which
//! prepares it through the [`runtime`] and keeps the desired number of sandboxes running,
//! restarting them by their policy and publishing their status. HTTP workloads are served by the
//! `ingress`, which runs every request in a fresh sandbox. [`agent::Agent`] assembles the
//! pieces into a running process.

#![warn(unreachable_pub)]

mod admin;
pub mod agent;
pub mod config;
pub mod control;
pub mod guests;
mod ingress;
pub mod manifest;
pub mod metrics;
pub mod precompile;
pub mod runtime;
pub mod supervisor;

pub use self::ingress::IngressConfig;
