//! Per-sandbox resource limits enforced inside wasmtime.
//!
//! Memory is limited by a [`ResourceLimiter`] that sums every linear memory and table of the
//! sandbox, so a module with many memories hits one aggregate limit. CPU is counted in epoch ticks
//! by the epoch deadline callback at the end of each slice (see [`super::cpu`]). Both hold from
//! before instantiation, so a start function or a data segment cannot escape them.

use std::time::Duration;

use wasmtime::ResourceLimiter;

/// Limits resolved for one workload from its spec and the agent's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Bytes of linear memory plus table storage one sandbox may hold.
    pub memory_bytes: u64,
    /// Bytes of memory the sandbox is accounted for at admission (its request).
    pub memory_request_bytes: u64,
    /// Epoch ticks of CPU one run may consume; `None` for no limit.
    pub cpu_ticks: Option<u64>,
    /// Wall-clock time one run may take; `None` for no limit.
    pub deadline: Option<Duration>,
    /// Bytes retained in the sandbox's log ring.
    pub log_bytes: usize,
    /// Elements one table may hold.
    pub table_elements: usize,
    /// Core instances one sandbox may create (a component holds several).
    pub instances: usize,
    /// Linear memories one sandbox may create.
    pub memories: usize,
    /// Tables one sandbox may create.
    pub tables: usize,
    /// The most CPU it may use, in millicores (`resources.limits.cpu`); `None` for no cap.
    pub cpu_rate: Option<u64>,
    /// Its share of contended CPU, in millicores (`resources.requests.cpu`, else its limit);
    /// `None` for the least share.
    pub cpu_weight: Option<u64>,
}

impl SandboxLimits {
    /// The limits a workload asks for (`requested`), with `defaults` for those it leaves
    /// unset, within the agent's `max_memory` per sandbox; CPU time is counted in epoch ticks
    /// of `epoch_tick`.
    ///
    /// # Errors
    /// [`LimitsError`] naming the field over its maximum, or a memory request over the memory
    /// limit. Checked here as at the control plane: the admin API and static
    /// manifests reach the agent without the control plane's validation.
    pub fn resolve(
        requested: &flotilla_model::SandboxLimits,
        defaults: &SandboxLimits,
        max_memory: u64,
        epoch_tick: Duration,
    ) -> Result<Self, LimitsError> {
        let memory_bytes = requested.memory.unwrap_or(defaults.memory_bytes);
        if memory_bytes > max_memory {
            return Err(LimitsError::MemoryOverMaximum {
                requested: memory_bytes,
                maximum: max_memory,
            });
        }
        let memory_request_bytes = match (requested.memory_request, requested.memory) {
            (Some(request), _) if request > memory_bytes => {
                return Err(LimitsError::RequestOverLimit {
                    request,
                    limit: memory_bytes,
                });
            }
            (Some(request), _) => request,
            // As with a Pod, a limit without a request requests the limit.
            (None, Some(limit)) => limit,
            (None, None) => defaults.memory_request_bytes,
        };
        if let Some(logs) = requested
            .logs
            .filter(|l| *l > flotilla_model::MAX_LOG_BYTES)
        {
            return Err(LimitsError::LogsOverMaximum {
                requested: logs,
                maximum: flotilla_model::MAX_LOG_BYTES,
            });
        }
        let max = Duration::from_secs(flotilla_model::MAX_DURATION_SECONDS as u64);
        for (field, duration) in [
            ("resources.limits.cpuTime", requested.cpu_time),
            ("activeDeadlineSeconds", requested.deadline),
        ] {
            if let Some(duration) = duration.filter(|d| *d > max) {
                return Err(LimitsError::DurationOverMaximum {
                    field,
                    requested: duration,
                    maximum: max,
                });
            }
        }
        if let (Some(request), Some(limit)) = (requested.cpu_request, requested.cpu_limit)
            && request > limit
        {
            return Err(LimitsError::CpuRequestOverLimit { request, limit });
        }
        let tick = epoch_tick.as_millis().max(1) as u64;
        Ok(SandboxLimits {
            memory_bytes,
            memory_request_bytes,
            cpu_ticks: requested
                .cpu_time
                .map(|cpu| (cpu.as_millis() as u64).div_ceil(tick))
                .or(defaults.cpu_ticks),
            deadline: requested.deadline.or(defaults.deadline),
            log_bytes: requested.logs.map_or(defaults.log_bytes, |b| {
                usize::try_from(b).unwrap_or(usize::MAX)
            }),
            table_elements: requested
                .table_elements
                .map_or(defaults.table_elements, |e| e as usize),
            cpu_rate: requested.cpu_limit.or(defaults.cpu_rate),
            cpu_weight: requested
                .cpu_request
                .or(requested.cpu_limit)
                .or(defaults.cpu_weight),
            ..*defaults
        })
    }

    /// Bytes a replica of `slots` sandboxes is accounted for at admission: each sandbox's
    /// memory request, and the replica's log ring, which lives in the agent's heap.
    pub fn admitted_bytes(&self, slots: u64) -> u64 {
        self.memory_request_bytes
            .saturating_mul(slots)
            .saturating_add(u64::try_from(self.log_bytes).unwrap_or(u64::MAX))
    }
}

/// Why a workload's limits are refused.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// A memory limit over the agent's per-sandbox maximum (its pool slot).
    #[error(
        "resources.limits.memory: {requested} bytes is over the agent's per-sandbox maximum of \
         {maximum}"
    )]
    MemoryOverMaximum {
        /// The limit asked for.
        requested: u64,
        /// The agent's maximum.
        maximum: u64,
    },
    /// A memory request over the memory limit.
    #[error("resources.requests.memory: {request} bytes is over the memory limit of {limit}")]
    RequestOverLimit {
        /// The request.
        request: u64,
        /// The limit.
        limit: u64,
    },
    /// A CPU request over the CPU limit.
    #[error("resources.requests.cpu: {request}m is over the CPU limit of {limit}m")]
    CpuRequestOverLimit {
        /// The request, in millicores.
        request: u64,
        /// The limit, in millicores.
        limit: u64,
    },
    /// A log ring over the per-sandbox ceiling.
    #[error(
        "resources.limits.logs: {requested} bytes is over the per-sandbox maximum of {maximum}"
    )]
    LogsOverMaximum {
        /// The ring asked for.
        requested: u64,
        /// The ceiling.
        maximum: u64,
    },
    /// A duration over the ceiling of every duration.
    #[error("{field}: {requested:?} is over the maximum of {maximum:?}")]
    DurationOverMaximum {
        /// The field.
        field: &'static str,
        /// The duration asked for.
        requested: Duration,
        /// The ceiling.
        maximum: Duration,
    },
}

/// The error with which a sandbox traps when it grows past its memory limit.
#[derive(Clone, Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded: the sandbox asked for {desired} bytes in all")]
pub(crate) struct MemoryLimitExceeded {
    /// The limit in bytes.
    pub limit: u64,
    /// The total the sandbox would have held after the growth.
    pub desired: u64,
}

/// The error with which a sandbox traps when a table grows past the agent's element limit;
/// reported as `OutOfMemory`, as memory is.
#[derive(Debug, thiserror::Error)]
#[error("table limit of {limit} elements exceeded: the sandbox asked for {desired} elements")]
pub(crate) struct TableLimitExceeded {
    /// The limit in elements per table.
    pub limit: usize,
    /// The elements the table would have held after the growth.
    pub desired: usize,
}

/// The error with which a sandbox traps when it has used up its CPU time.
#[derive(Debug, thiserror::Error)]
#[error("CPU limit of {limit_ms} ms exceeded")]
pub(crate) struct CpuLimitExceeded {
    /// The limit in milliseconds.
    pub limit_ms: u64,
}

/// Store-resident state that enforces [`SandboxLimits`].
#[derive(Debug)]
pub(crate) struct Limiter {
    memory_limit: u64,
    table_elements: usize,
    instances: usize,
    memories: usize,
    tables: usize,
    /// Bytes held by all memories, tables and the GC heap of the sandbox.
    used: u64,
    /// The last growth refused for the memory limit: wasmtime reports a GC heap that could not
    /// grow as the allocation that failed, without the limiter's error.
    refused: Option<MemoryLimitExceeded>,
    /// CPU ticks spent so far in this run.
    pub cpu_ticks: u64,
    /// CPU tick budget of this run.
    pub cpu_limit: Option<u64>,
}

// === impl Limiter ===

impl Limiter {
    /// Creates the limiter for one run of a sandbox.
    pub(crate) fn new(limits: &SandboxLimits) -> Self {
        Self {
            memory_limit: limits.memory_bytes,
            table_elements: limits.table_elements,
            instances: limits.instances,
            memories: limits.memories,
            tables: limits.tables,
            used: 0,
            refused: None,
            cpu_ticks: 0,
            cpu_limit: limits.cpu_ticks,
        }
    }

    fn grow(&mut self, current: u64, desired: u64) -> wasmtime::Result<bool> {
        let total = self.used - current.min(self.used) + desired;
        if total > self.memory_limit {
            let refusal = MemoryLimitExceeded {
                limit: self.memory_limit,
                desired: total,
            };
            self.refused = Some(refusal.clone());
            return Err(wasmtime::Error::new(refusal));
        }
        self.used = total;
        Ok(true)
    }

    /// The last growth refused for the memory limit in this run.
    pub(crate) fn refused(&self) -> Option<&MemoryLimitExceeded> {
        self.refused.as_ref()
    }

    /// Records `ticks` epoch ticks of CPU; fails once the budget is spent.
    pub(crate) fn charge(&mut self, ticks: u64, tick: Duration) -> wasmtime::Result<()> {
        self.cpu_ticks += ticks;
        match self.cpu_limit {
            Some(limit) if self.cpu_ticks > limit => Err(wasmtime::Error::new(CpuLimitExceeded {
                limit_ms: limit.saturating_mul(tick.as_millis() as u64),
            })),
            _ => Ok(()),
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(current as u64, desired as u64)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            return Err(wasmtime::Error::new(TableLimitExceeded {
                limit: self.table_elements,
                desired,
            }));
        }
        // A table element costs a pointer on the host.
        let size = std::mem::size_of::<usize>() as u64;
        self.grow(current as u64 * size, desired as u64 * size)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn memories(&self) -> usize {
        self.memories
    }

    fn tables(&self) -> usize {
        self.tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(memory: u64) -> SandboxLimits {
        SandboxLimits {
            memory_bytes: memory,
            memory_request_bytes: 0,
            cpu_ticks: Some(2),
            deadline: None,
            log_bytes: 1024,
            table_elements: 100,
            instances: 1,
            memories: 2,
            tables: 2,
            cpu_rate: None,
            cpu_weight: None,
        }
    }

    #[test]
    fn memory_limit_is_aggregate_over_memories() {
        let mut l = Limiter::new(&limits(100));
        assert!(l.memory_growing(0, 60, None).expect("first fits"));
        // A second memory of 60 bytes pushes the total past 100.
        let err = l.memory_growing(0, 60, None).expect_err("aggregate limit");
        assert!(err.downcast_ref::<MemoryLimitExceeded>().is_some());
        // Growing the first memory in place is accounted as a delta.
        assert!(l.memory_growing(60, 100, None).expect("delta fits"));
    }

    #[test]
    fn table_growth_past_either_limit_fails_as_memory_does() {
        let mut l = Limiter::new(&limits(1 << 20));
        let err = l
            .table_growing(0, 101, None)
            .expect_err("over the element limit");
        assert_eq!(
            err.downcast_ref::<TableLimitExceeded>().map(|e| e.desired),
            Some(101)
        );
        assert!(l.table_growing(0, 100, None).expect("fits"));
        // Elements cost a pointer each against the memory limit.
        let mut small = Limiter::new(&limits(64 * 8));
        assert!(small.table_growing(0, 64, None).expect("fits"));
        let err = small
            .table_growing(64, 65, None)
            .expect_err("over the memory limit");
        assert!(err.downcast_ref::<MemoryLimitExceeded>().is_some());
    }

    #[test]
    fn cpu_budget_is_counted_in_ticks() {
        let mut l = Limiter::new(&limits(1));
        let tick = Duration::from_millis(10);
        l.charge(1, tick).expect("tick 1");
        l.charge(1, tick).expect("tick 2");
        let err = l.charge(1, tick).expect_err("tick 3 is over");
        assert_eq!(
            err.downcast_ref::<CpuLimitExceeded>().map(|e| e.limit_ms),
            Some(20)
        );
    }
}
