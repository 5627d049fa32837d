//! The node agent's integration tests: one binary with a module per topic, as wasmtime's
//! `tests/all`, so the agent and wasmtime are linked once rather than once per topic.
//!
//! - `sandboxes`, `lifecycle`, `restarts` (paused clock), `isolation` (1,000 faulty sandboxes
//!   beside 100 healthy ones): the supervisor over a real wasmtime runtime;
//! - `features`: WebAssembly proposals a workload opts into (GC, exceptions, ...); `threads`:
//!   modules with threads (`wasi-threads`);
//! - `http`: the ingress and HTTP workloads; `volumes`: preopens, escapes, ConfigMap and Secret
//!   files; `examples`: the repository's example manifests;
//! - `cluster`: an agent against an in-process control plane.
//!
//! `tests/process.rs`, the agent binary as a real process stopped by SIGTERM within its grace
//! period, stays a binary of its own: its timing should not share two cores with these.
//!
//! Each test that makes a runtime gets a volume directory of its own
//! ([`common::runtime_config`]): one process runs them all, and an in-process agent clears the
//! default directory when it starts.

mod cluster;
mod common;
mod examples;
mod features;
mod http;
mod isolation;
mod lifecycle;
mod restarts;
mod sandboxes;
mod threads;
mod volumes;
