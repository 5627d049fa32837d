//! The `flotilla-node-agent` binary (being filled in).
fn main() {}
