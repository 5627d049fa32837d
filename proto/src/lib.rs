//! Flotilla's wire contract: the protobuf messages and gRPC services shared by the control plane,
//! the node agent and the CLI.
//!
//! The Rust code under `src/gen` is generated from `proto/` and committed, so building needs no
//! `protoc`. `tests/bootstrap.rs` regenerates it with the pure-Rust `protox` compiler and fails when
//! the committed code is stale.

/// The node agent's API and the types every component shares.
pub mod agent {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!("gen/flotilla.agent.v1.rs");
    }
}

pub mod auth;
pub mod config;
#[cfg(feature = "model")]
pub mod from_model;
#[cfg(feature = "model")]
mod limits;
#[cfg(feature = "model")]
mod node;
pub mod serve;
pub mod tls;

/// The control plane's APIs.
pub mod control {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        include!("gen/flotilla.control.v1.rs");
    }
}
