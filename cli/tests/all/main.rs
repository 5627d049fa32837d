//! The `flotilla` CLI's integration tests, one binary with a module per topic: commands against
//! a control plane on loopback, and `flotilla dev` as a real process.

mod apply;
mod dev;
