//! The wasmtime engines: their configuration, the pooling allocator, the epoch ticker, and
//! engines configured alike for other architectures.
//!
//! [`Engines`] holds one engine per kind of sandbox the agent runs: the host engine (the pooling
//! allocator sized for the agent's capacity, copy-on-write memory images, epoch interruption)
//! and, on a node that offers `threads`, the threads engine, whose modules import a shared
//! memory that the pool cannot hold: it allocates on demand, and each of its sandboxes is
//! bounded by its own limits (see `threads`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_model::wasm::WasmFeature;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::capacity::Capacity;
use super::config::{EpochTicker, RuntimeConfig};
use super::error::SandboxError;
use super::run_queue::RunQueue;

/// Frames kept in a trap's wasm backtrace.
const MAX_BACKTRACE_FRAMES: usize = 32;

/// The engines of one agent. Cheap to clone.
#[derive(Clone)]
pub struct Engines {
    host: Engine,
    threads: Option<Engine>,
    epoch: Epoch,
}

/// The host engine's epoch, counted where it can be read (wasmtime only increments its own),
/// and the run queue its ticks drive. The threads engine's epoch moves with it, so that guest
/// threads reach their deadlines at the same ticks as other sandboxes. Cheap to clone.
#[derive(Clone)]
pub struct Epoch {
    engine: Engine,
    threads: Option<Engine>,
    count: Arc<AtomicU64>,
    run_queue: Arc<RunQueue>,
}

// === impl Engines ===

impl Engines {
    /// Creates the host engine with a pool sized for `capacity`, and starts its epoch ticker.
    ///
    /// # Errors
    /// The engine rejected the configuration (a pool the host cannot map, for example).
    pub fn new(config: &RuntimeConfig, capacity: &Capacity) -> wasmtime::Result<Self> {
        let mut engine_config = engine_config(config);
        engine_config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(
            config, capacity,
        )));
        let host = Engine::new(&engine_config)?;
        let threads = if config.wasm_features.contains(WasmFeature::Threads) {
            let mut threads_config = self::engine_config(config);
            threads_config.wasm_threads(true).shared_memory(true);
            Some(Engine::new(&threads_config)?)
        } else {
            None
        };
        let epoch = Epoch::new(
            host.clone(),
            threads.clone(),
            RunQueue::new(config.guest_threads),
        );
        if config.epoch_ticker == EpochTicker::Thread {
            spawn_epoch_ticker(&epoch, config.epoch_tick);
        }
        Ok(Self {
            host,
            threads,
            epoch,
        })
    }

    /// The engine of modules with threads, on a node that offers them.
    pub fn threads(&self) -> Option<&Engine> {
        self.threads.as_ref()
    }

    /// The engine of ordinary sandboxes, on the pooling allocator.
    pub fn host(&self) -> &Engine {
        &self.host
    }

    /// The host engine's epoch.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }
}

// === impl Epoch ===

impl Epoch {
    fn new(engine: Engine, threads: Option<Engine>, run_queue: Arc<RunQueue>) -> Self {
        Self {
            engine,
            threads,
            count: Arc::new(AtomicU64::new(0)),
            run_queue,
        }
    }

    /// An epoch of a default engine with a run queue of `slots`, advanced by hand.
    #[cfg(test)]
    pub(crate) fn manual_for_tests(slots: usize) -> Self {
        Self::new(Engine::default(), None, RunQueue::new(slots))
    }

    /// Advances the epoch by one tick and expires the run queue's stale leases: what the
    /// ticker thread does every `--epoch-tick`, and tests with [`EpochTicker::Manual`] do
    /// themselves.
    pub fn advance(&self) {
        self.engine.increment_epoch();
        if let Some(threads) = &self.threads {
            threads.increment_epoch();
        }
        let now = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        self.run_queue.expire(now);
    }

    /// The queue of sandboxes waiting for a CPU slot.
    pub fn run_queue(&self) -> &Arc<RunQueue> {
        &self.run_queue
    }

    /// Ticks since the engine started.
    pub fn now(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The pooling allocator, sized for `capacity`.
fn pool_config(config: &RuntimeConfig, capacity: &Capacity) -> PoolingAllocationConfig {
    let sandboxes = capacity.max_sandboxes.max(1);
    let defaults = &config.default_limits;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(sandboxes)
        .total_core_instances(sandboxes.saturating_mul(2))
        .total_memories(sandboxes.saturating_mul(2))
        .total_tables(sandboxes.saturating_mul(2))
        .total_stacks(sandboxes)
        // A GC heap takes a slot of the memory pool, which holds two per sandbox.
        .total_gc_heaps(sandboxes)
        .max_memory_size(usize::try_from(config.max_memory_per_sandbox).unwrap_or(usize::MAX))
        .max_memories_per_module(defaults.memories as u32)
        .max_tables_per_module(defaults.tables as u32)
        .max_memories_per_component(defaults.memories as u32)
        .max_tables_per_component(defaults.tables as u32)
        .max_core_instances_per_component(defaults.instances as u32)
        .table_elements(defaults.table_elements)
        // Reset freed slots with memset instead of madvise: madvise's TLB shootdowns (an IPI to
        // every core running the agent) keep sandbox churn, and per-request sandboxes above all,
        // from scaling past one core. PAGEMAP_SCAN (Linux 6.7+) limits the reset to the pages
        // the guest dirtied; older kernels reset the low `memory_keep_resident` bytes.
        .linear_memory_keep_resident(usize::try_from(config.memory_keep_resident).unwrap_or(0))
        .table_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
    pool
}

/// Everything but the allocator: shared by the host engine and cross-compiling engines.
fn engine_config(config: &RuntimeConfig) -> Config {
    let mut cfg = Config::new();
    cfg.epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        .async_stack_size(config.async_stack_size)
        .memory_reservation(
            config
                .memory_reservation
                .unwrap_or(config.max_memory_per_sandbox),
        )
        .memory_guard_size(config.memory_guard)
        .memory_reservation_for_growth(0)
        .memory_init_cow(true)
        // A runaway recursion must not produce a megabyte of status message.
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(MAX_BACKTRACE_FRAMES))
        // Post-MVP features that wasmtime 48 supports and Flotilla enables: the default set of
        // every workload, and those the node offers (`--wasm-features`) for a workload to opt
        // into (`spec.wasm.features`), which the artifacts check per workload. Threads (shared
        // memories, which the pool cannot hold) are only on the threads engine.
        .wasm_simd(true)
        .wasm_relaxed_simd(true)
        .wasm_bulk_memory(true)
        .wasm_multi_value(true)
        .wasm_multi_memory(true)
        .wasm_tail_call(true)
        .wasm_extended_const(true)
        .wasm_component_model(true)
        .wasm_function_references(true)
        .wasm_threads(false)
        .collector(wasmtime::Collector::DeferredReferenceCounting);
    let offered = |feature| config.wasm_features.contains(feature);
    cfg.wasm_gc(offered(WasmFeature::Gc))
        .wasm_exceptions(offered(WasmFeature::Exceptions))
        .wasm_wide_arithmetic(offered(WasmFeature::WideArithmetic))
        .wasm_custom_page_sizes(offered(WasmFeature::CustomPageSizes));
    // Stores set up for concurrent (async ABI) execution take more memory (about 0.1 KiB per
    // sandbox, measured), so only a node that offers the async ABI sets them up.
    let concurrent = offered(WasmFeature::ComponentModelAsync);
    cfg.concurrency_support(concurrent)
        .wasm_component_model_async(concurrent);
    cfg
}

/// Compiles a module or component for another architecture (a target triple such as
/// `aarch64-unknown-linux-gnu`) with the agent's engine settings, for nodes of that architecture.
///
/// # Errors
/// Fails for an unknown target or an invalid module.
pub fn precompile_for_target(
    config: &RuntimeConfig,
    target: &str,
    wasm: &[u8],
) -> Result<Vec<u8>, SandboxError> {
    flotilla_model::module::check_header(wasm).map_err(SandboxError::Module)?;
    let engine = target_engine(config, target)?;
    let compiled = if flotilla_model::module::is_component(wasm) {
        engine.precompile_component(wasm)
    } else {
        engine.precompile_module(wasm)
    };
    compiled.map_err(|e| SandboxError::Compile(e.into()))
}

/// An engine with the agent's settings that compiles for `target` with the target's baseline
/// CPU features (no host detection), so that its artifacts run on every CPU of that target.
fn target_engine(config: &RuntimeConfig, target: &str) -> Result<Engine, SandboxError> {
    let mut cfg = engine_config(config);
    cfg.target(target).map_err(|e| SandboxError::Target {
        target: target.to_string(),
        source: e.into(),
    })?;
    Engine::new(&cfg).map_err(|e| SandboxError::Target {
        target: target.to_string(),
        source: e.into(),
    })
}

/// The target triple this agent was built for, as [`precompile_for_target`] takes it.
pub fn host_target() -> String {
    let env = if cfg!(target_env = "musl") {
        "musl"
    } else {
        "gnu"
    };
    format!("{}-unknown-linux-{env}", std::env::consts::ARCH)
}

/// What follows the module's digest in the file name, in an agent's cache directory, of an
/// artifact [`precompile_for_target`] made for `target` with `config`'s settings: an agent for
/// that target with the same settings loads it instead of compiling (its own CPU may have more
/// features than the baseline; never fewer).
///
/// # Errors
/// Fails for an unknown target.
pub fn precompiled_suffix(config: &RuntimeConfig, target: &str) -> Result<String, SandboxError> {
    use std::hash::{Hash, Hasher};
    let engine = target_engine(config, target)?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    Ok(format!("-{target}-{:016x}.cwasm", hasher.finish()))
}

/// Advances `epoch` every `tick` until its engine is dropped.
fn spawn_epoch_ticker(epoch: &Epoch, tick: Duration) {
    let weak = epoch.engine.weak();
    let threads = epoch.threads.as_ref().map(Engine::weak);
    let count = epoch.count.clone();
    let run_queue = epoch.run_queue.clone();
    let spawned = std::thread::Builder::new()
        .name("flotilla-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                Epoch {
                    engine,
                    threads: threads.as_ref().and_then(|t| t.upgrade()),
                    count: count.clone(),
                    run_queue: run_queue.clone(),
                }
                .advance();
                std::thread::sleep(tick);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the epoch ticker; guests will not be preempted");
    }
}
