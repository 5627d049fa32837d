//! [`Exit`]: how one run of a sandbox ended, and how a wasmtime error from a guest becomes one.

use std::time::Duration;

use wasmtime_wasi::I32Exit;

use super::limits::{CpuLimitExceeded, Limiter, MemoryLimitExceeded, TableLimitExceeded};

/// How one run of a sandbox ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest returned from its entry point or called `proc_exit`.
    Exited(i32),
    /// The guest trapped; the message carries the wasm backtrace.
    Trap(String),
    /// The guest grew past its memory limit.
    OutOfMemory(String),
    /// The guest used up its CPU time.
    CpuLimit(String),
    /// The run took longer than its wall-clock deadline.
    DeadlineExceeded(Duration),
    /// The sandbox was stopped by the agent.
    Stopped,
    /// An HTTP replica's host and path are served by another workload on this node.
    RouteConflict(String),
    /// An HTTP replica's readiness request did not answer 2xx.
    NotReady(String),
    /// A ConfigMap or Secret (or one of its keys) that the sandbox needs is missing.
    Config(String),
    /// A volume could not be set up.
    Volume(String),
}

// === impl Exit ===

impl Exit {
    /// Whether the run counts as a success for the restart policy.
    pub fn is_success(&self) -> bool {
        matches!(self, Exit::Exited(0))
    }

    /// The machine-readable reason, as shown in sandbox status.
    pub fn reason(&self) -> &'static str {
        match self {
            Exit::Exited(0) => "Completed",
            Exit::Exited(_) => "Error",
            Exit::Trap(_) => "Trap",
            Exit::OutOfMemory(_) => "OutOfMemory",
            Exit::CpuLimit(_) => "CpuLimit",
            Exit::DeadlineExceeded(_) => "DeadlineExceeded",
            Exit::Stopped => "Stopped",
            Exit::RouteConflict(_) => "RouteConflict",
            Exit::NotReady(_) => "ReadinessFailed",
            Exit::Config(_) => "ConfigError",
            Exit::Volume(_) => "VolumeError",
        }
    }

    /// A human-readable explanation.
    pub fn message(&self) -> String {
        match self {
            Exit::Exited(code) => format!("exited with code {code}"),
            Exit::Trap(msg)
            | Exit::OutOfMemory(msg)
            | Exit::CpuLimit(msg)
            | Exit::RouteConflict(msg)
            | Exit::NotReady(msg)
            | Exit::Config(msg)
            | Exit::Volume(msg) => msg.clone(),
            Exit::DeadlineExceeded(d) => format!("run exceeded its deadline of {d:?}"),
            Exit::Stopped => "stopped by the agent".to_string(),
        }
    }

    /// The guest's exit code, when it exited.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Exit::Exited(code) => Some(*code),
            _ => None,
        }
    }
}

/// Turns a wasmtime error from a guest run, whose store's limiter is `limiter`, into the
/// [`Exit`] a user can act on: the guest's own exit code, a limit it hit, or a trap with its
/// wasm backtrace.
pub(super) fn classify(err: wasmtime::Error, limiter: &Limiter) -> Exit {
    if let Some(exit) = err.downcast_ref::<I32Exit>() {
        return Exit::Exited(exit.0);
    }
    if let Some(oom) = err.downcast_ref::<MemoryLimitExceeded>() {
        return Exit::OutOfMemory(oom.to_string());
    }
    if let Some(oom) = err.downcast_ref::<TableLimitExceeded>() {
        return Exit::OutOfMemory(oom.to_string());
    }
    if err
        .downcast_ref::<wasmtime::GcHeapOutOfMemory<()>>()
        .is_some()
    {
        // The GC heap could not grow: past the memory limit, or past the agent's most per
        // sandbox (the pool's slot).
        return Exit::OutOfMemory(match limiter.refused() {
            Some(refusal) => format!("{refusal} (growing its GC heap)"),
            None => err.root_cause().to_string(),
        });
    }
    if let Some(cpu) = err.downcast_ref::<CpuLimitExceeded>() {
        return Exit::CpuLimit(cpu.to_string());
    }
    let mut message = err.root_cause().to_string();
    if let Some(backtrace) = err.downcast_ref::<wasmtime::WasmBacktrace>() {
        message.push('\n');
        message.push_str(backtrace.to_string().trim_end());
    }
    Exit::Trap(message)
}
