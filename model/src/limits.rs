//! What one sandbox may use, typed: [`SandboxLimits`] (what an agent enforces, `None` where the
//! spec sets nothing and the agent's default applies) and [`Requests`] (what placement counts),
//! both resolved from a workload's quantities. The wire and the agent convert from these, beside
//! their own types, rather than parse the quantities again.

use std::time::Duration;

use crate::{DEFAULT_LOG_BYTES, WorkloadSpec, parse_bytes, parse_cpu_millis};

/// The limits an agent enforces on each sandbox of a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Bytes of memory one sandbox may hold: `resources.limits.memory`.
    pub memory: Option<u64>,
    /// Bytes of memory it is accounted for at admission: `resources.requests.memory`.
    pub memory_request: Option<u64>,
    /// CPU time of one run: `resources.limits.cpuTime`.
    pub cpu_time: Option<Duration>,
    /// Wall-clock time of one run: `activeDeadlineSeconds`.
    pub deadline: Option<Duration>,
    /// Bytes of its log ring: `resources.limits.logs`.
    pub logs: Option<u64>,
    /// Elements one table may hold. No manifest field sets it: the agent's default applies.
    pub table_elements: Option<u32>,
    /// Millicores guaranteed under contention, its weight against other sandboxes:
    /// `resources.requests.cpu`, or `resources.limits.cpu` when only the limit is set.
    pub cpu_request: Option<u64>,
    /// Millicores it may use at most: `resources.limits.cpu`.
    pub cpu_limit: Option<u64>,
}

/// Placement requests of one replica, parsed from its quantities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// Bytes of memory.
    pub memory: u64,
    /// Millicores of CPU.
    pub cpu_millis: u64,
    /// Sandboxes it may hold at once: one, or for an HTTP workload the requests a replica serves
    /// at once (`spec.http.maxConcurrency`), each in a sandbox of its own.
    pub sandboxes: u64,
}

// === impl WorkloadSpec ===

impl WorkloadSpec {
    /// The limits an agent enforces. Call on a validated spec; unparsable quantities count as
    /// unset.
    pub fn sandbox_limits(&self) -> SandboxLimits {
        let bytes = |q: &Option<String>| q.as_deref().and_then(|q| parse_bytes(q).ok());
        let millicores = |q: &Option<String>| q.as_deref().and_then(|q| parse_cpu_millis(q).ok());
        let limits = &self.resources.limits;
        let cpu_limit = millicores(&limits.cpu);
        SandboxLimits {
            memory: bytes(&limits.memory),
            memory_request: bytes(&self.resources.requests.memory),
            cpu_time: limits
                .cpu_time
                .as_deref()
                .and_then(|t| humantime::parse_duration(t).ok()),
            deadline: self
                .active_deadline_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
            logs: bytes(&limits.logs),
            table_elements: None,
            cpu_request: millicores(&self.resources.requests.cpu).or(cpu_limit),
            cpu_limit,
        }
    }

    /// Placement requests of one replica. As for a Pod, a resource with a limit and no request
    /// requests its limit. An HTTP replica runs a sandbox per request, up to
    /// `spec.http.maxConcurrency` at once, so it requests that many sandboxes and that many
    /// times the memory: one tenant's traffic can never take what was promised to another.
    /// Memory also counts the replica's log ring (`resources.limits.logs`, or
    /// [`DEFAULT_LOG_BYTES`]), which lives in the agent's heap. Call on a validated spec;
    /// unparsable quantities count as zero.
    pub fn requests(&self) -> Requests {
        let limits = self.sandbox_limits();
        let per_sandbox = limits.memory_request.or(limits.memory).unwrap_or(0);
        let sandboxes = self
            .http
            .as_ref()
            .map_or(1, |http| u64::from(http.max_concurrency()));
        Requests {
            memory: per_sandbox
                .saturating_mul(sandboxes)
                .saturating_add(limits.logs.unwrap_or(DEFAULT_LOG_BYTES)),
            cpu_millis: limits.cpu_request.unwrap_or(0),
            sandboxes,
        }
    }
}
