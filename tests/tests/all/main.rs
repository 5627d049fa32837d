//! Flotilla's cross-component and end-to-end tests, one binary with a module per topic (as
//! wasmtime's `tests/all`), so the workspace links it once. Most start the real binaries as
//! processes (see `support`); the Kubernetes ones talk to a fake API server, or, when run with
//! `--ignored`, to a real cluster (`kind`).

mod admin;
mod arm64;
mod bounds;
mod chart;
mod cluster;
mod config;
mod egress;
mod http;
mod isolation;
mod kind;
mod kubectl;
mod kubernetes;
mod layout;
mod rollout;
mod run;
mod setup;
mod support;
mod tls;
mod users;
