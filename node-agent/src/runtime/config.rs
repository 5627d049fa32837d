//! [`RuntimeConfig`]: the process-wide settings of the sandbox runtime, with their defaults.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_model::wasm::FeatureSet;

use super::compiler::CHEAP_CODE_BYTES;
use super::cost::CostLimits;
use super::egress::DeniedRanges;
use super::limits::SandboxLimits;
use super::volumes;

/// How epochs advance: the CPU time slice of every sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EpochTicker {
    /// A thread bumps the epoch every [`RuntimeConfig::epoch_tick`] for as long as the engine
    /// lives. The default.
    #[default]
    Thread,
    /// Nothing bumps it: whoever holds the engine calls [`Engine::increment_epoch`](wasmtime::Engine::increment_epoch). For tests
    /// that spend a guest's CPU time tick by tick instead of waiting for the clock.
    Manual,
}

/// Process-wide runtime settings; every field has a documented default in [`Default`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Sandboxes the pool is sized for, before the `vm.max_map_count` ceiling. Default 100,000.
    pub max_sandboxes: u32,
    /// Largest linear memory a sandbox may have; the size of a pool slot. Default 256 MiB.
    pub max_memory_per_sandbox: u64,
    /// Virtual address space reserved per linear memory. Default: the slot size.
    pub memory_reservation: Option<u64>,
    /// Guard region after each linear memory. Default 0: bounds checks are explicit.
    pub memory_guard: u64,
    /// Bytes of a freed memory slot reset in place (memset) rather than released with madvise.
    /// Default 1 MiB: a small guest's whole memory, so a fresh sandbox per request costs no
    /// system call and no page fault.
    pub memory_keep_resident: u64,
    /// Stack available to wasm code. Default 512 KiB.
    pub max_wasm_stack: usize,
    /// Size of each sandbox's fiber stack (wasm stack plus host headroom). Default 1 MiB.
    pub async_stack_size: usize,
    /// Interval between epoch ticks; the CPU time slice. Default 2 ms.
    pub epoch_tick: Duration,
    /// What advances the epoch. Default: a thread, every `epoch_tick`.
    pub epoch_ticker: EpochTicker,
    /// Worker threads that run sandboxes, and so the sandboxes that run beyond their first
    /// slice at once (the run queue's slots). Default: the number of CPUs.
    pub guest_threads: usize,
    /// Largest module accepted, in bytes. Default 32 MiB.
    pub max_module_bytes: u64,
    /// Modules compiled at once. Default: the number of CPUs, at least 2 and at most 4.
    pub compile_concurrency: usize,
    /// Threads of each compile (Cranelift compiles a module's functions in parallel). Default:
    /// the number of CPUs.
    pub compile_threads: usize,
    /// The most a module may cost to compile. Default: [`CostLimits::default`].
    pub compile_cost_limits: CostLimits,
    /// Code bytes up to which a compile may take the slot kept for cheap compiles. Default:
    /// [`CHEAP_CODE_BYTES`].
    pub cheap_compile_code_bytes: u64,
    /// Longest a compilation may take before the module is reported as too costly. Default 60 s.
    pub compile_timeout: Duration,
    /// Where compiled artifacts are kept across restarts. Default: none (memory only).
    pub cache_dir: Option<PathBuf>,
    /// Limits for workloads that set none. See [`SandboxLimits`].
    pub default_limits: SandboxLimits,
    /// Where volumes live and which node directories they may mount. Default: a directory
    /// under the system's temporary directory, no `hostPath`.
    pub volumes: volumes::VolumeConfig,
    /// The node's name, as sandboxes' `spec.nodeName` field reads it. Default: the host name.
    pub node_name: String,
    /// Addresses no sandbox may connect to, whatever its egress rules list. Default:
    /// [`DEFAULT_DENIED_RANGES`](super::DEFAULT_DENIED_RANGES).
    pub egress_denied: DeniedRanges,
    /// The WebAssembly proposals beyond the default set that the engine accepts and workloads
    /// may enable (`spec.wasm.features`). Default: [`FeatureSet::NODE_DEFAULT`], every one but
    /// the experimental `component-model-async` (incomplete in wasmtime 48) and `threads`
    /// (shared memories: tier 2, no security fixes in patch releases).
    pub wasm_features: FeatureSet,
    /// The most threads one sandbox with threads runs at once, its main thread included.
    pub max_threads_per_sandbox: u32,
}

/// The CPUs this process may use.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The host's name, lower-cased (empty when unknown): the default node name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_default()
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_sandboxes: 100_000,
            max_memory_per_sandbox: 256 << 20,
            memory_reservation: None,
            memory_guard: 0,
            memory_keep_resident: 1 << 20,
            max_wasm_stack: 512 << 10,
            async_stack_size: 1 << 20,
            epoch_tick: Duration::from_millis(2),
            epoch_ticker: EpochTicker::Thread,
            guest_threads: cpus(),
            max_module_bytes: 32 << 20,
            compile_concurrency: cpus().clamp(2, 4),
            compile_threads: cpus(),
            compile_cost_limits: CostLimits::default(),
            cheap_compile_code_bytes: CHEAP_CODE_BYTES,
            compile_timeout: Duration::from_secs(60),
            cache_dir: None,
            volumes: volumes::VolumeConfig {
                dir: default_volumes_dir(),
                host_paths: Vec::new(),
                secrets_dir: None,
            },
            node_name: host_name(),
            egress_denied: DeniedRanges::defaults(),
            wasm_features: FeatureSet::NODE_DEFAULT,
            max_threads_per_sandbox: 16,
            default_limits: SandboxLimits {
                memory_bytes: 64 << 20,
                memory_request_bytes: 0,
                cpu_ticks: None,
                deadline: None,
                log_bytes: flotilla_model::DEFAULT_LOG_BYTES as usize,
                table_elements: 100_000,
                instances: 16,
                memories: 8,
                tables: 8,
                cpu_rate: None,
                cpu_weight: None,
            },
        }
    }
}

/// The volume directory when none is given: under the system's temporary directory, named
/// with the process id and a random part. Nobody can create it before the agent does (a
/// directory of another user's is refused, so a predictable name would let any local user
/// keep the agent from starting), and no leftover of an earlier agent with the same process
/// id is taken for it.
fn default_volumes_dir() -> std::path::PathBuf {
    use std::hash::{BuildHasher, Hasher};
    // Keys drawn from the OS's random source, once per process.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    std::env::temp_dir().join(format!(
        "flotilla-volumes-{}-{random:016x}",
        std::process::id()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_volume_directory_cannot_be_guessed() {
        let (a, b) = (default_volumes_dir(), default_volumes_dir());
        assert_ne!(a, b, "a random part in each");
        let prefix = format!("flotilla-volumes-{}-", std::process::id());
        for dir in [a, b] {
            assert_eq!(dir.parent(), Some(std::env::temp_dir().as_path()));
            let name = dir.file_name().and_then(|n| n.to_str()).expect("a name");
            assert!(
                name.starts_with(&prefix) && name.len() == prefix.len() + 16,
                "{name}"
            );
        }
    }
}
