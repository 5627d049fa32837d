//! Property-based fuzz tests, one module per input (see the crate's documentation).

mod manifests;
mod modules;
mod paths;
mod protocol;
mod scheduler;
