//! The control plane's integration tests, one binary with a module per topic: the committed
//! CRDs against the Rust types, and the binary as a real process.

mod crds;
mod process;
