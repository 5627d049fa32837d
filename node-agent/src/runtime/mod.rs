//! The sandbox runtime: compiles workloads and runs sandboxes.
//!
//! [`SandboxRuntime`] is the boundary the [`Supervisor`](crate::supervisor::Supervisor) drives;
//! [`WasmtimeRuntime`] implements it with wasmtime. Work happens in three stages, as in Spin:
//! 1. once per process: the engines, the WASI linkers and the epoch ticker;
//! 2. once per module digest ([`SandboxRuntime::prepare`]): compile, cache on disk, pre-link;
//! 3. once per run ([`SandboxRuntime::instantiate`], then [`SandboxInstance::run`]): a fresh
//!    `Store` with its own WASI context, limits and log ring.
//!
//! One concept per file, each depending only on those listed before it:
//!
//! | file | what it holds |
//! |---|---|
//! | `limits`, `exit` | what one sandbox may use; how one run ended |
//! | `logs`, `volumes/` | a sandbox's log ring and its directories |
//! | `error` | why a workload could not be prepared |
//! | `config`, `capacity` | [`RuntimeConfig`], the process-wide settings; what the agent holds |
//! | `sandbox` | the [`SandboxRuntime`] boundary |
//! | `run_queue` | the queue of sandboxes waiting for a CPU slot, by weighted virtual runtime |
//! | `engine` | [`Engines`]: engine configuration, pooling allocator, epoch ticker, cross-compiling |
//! | `source` | a module from a file or a spec, read within bounds and verified |
//! | `egress`, `outgoing` | what a sandbox may connect to; its outgoing HTTP, sent under that |
//! | `environment` | arguments, environment variables, ConfigMaps, Secrets, the downward API, egress |
//! | `store` | per-run state (`SandboxState`, WASI views) and the [`Stores`] that make it |
//! | `linker` | the host functions guests may import |
//! | `cpu` | CPU slices, shares by request, rate caps by limit, CPU used |
//! | `priority` | thread priorities (nice values) of guests and compiles |
//! | `threads` | modules with threads: an OS thread per guest thread, over one shared memory |
//! | `cost`, `compiler` | what a compile would cost; where compiles run (low priority, bounded, round-robin) |
//! | `artifacts` | the compile cache, in memory and on disk |
//! | `http` | HTTP replicas: a fresh sandbox per request |
//! | `prepared` | a workload ready to start sandboxes |
//! | `instantiate` | instantiation of each kind of artifact |
//! | `wasmtime` | [`WasmtimeRuntime`], which puts them together |

mod artifacts;
pub mod capacity;
mod compiler;
mod config;
mod cost;
mod cpu;
mod egress;
mod engine;
mod environment;
mod error;
mod exit;
pub(crate) mod http;
mod instantiate;
pub(crate) mod limits;
mod linker;
pub(crate) mod logs;
mod outgoing;
mod prepared;
mod priority;
mod run_queue;
mod sandbox;
mod source;
pub(crate) mod stdin;
mod store;
mod threads;
pub mod volumes;
mod wasmtime;

pub use self::artifacts::CacheStats;
pub use self::artifacts::write_sealed;
pub use self::capacity::Capacity;
pub use self::compiler::{CHEAP_CODE_BYTES, COMPILE_NICE, CompilerError};
pub use self::config::{EpochTicker, RuntimeConfig, host_name};
pub use self::cost::{
    CostError, CostLimits, DEFAULT_MAX_CODE_BYTES, DEFAULT_MAX_FUNCTIONS, ModuleCost,
};
pub use self::cpu::{CORE_MILLICORES, CpuUsage, FRESH_SLICE_TICKS, MIN_RATE_MILLICORES};
pub use self::egress::{DEFAULT_DENIED_RANGES, DeniedRanges, EgressPolicy, EgressRules, Refusal};
pub use self::engine::{Engines, Epoch, host_target, precompile_for_target, precompiled_suffix};
pub use self::environment::{Environment, EnvironmentSources};
pub use self::error::SandboxError;
pub use self::exit::Exit;
pub use self::instantiate::WasmtimeInstance;
pub use self::limits::{LimitsError, SandboxLimits};
pub use self::logs::{LogBuffer, LogPiece, LogRead, SEGMENT_COST};
pub use self::prepared::PreparedWorkload;
#[cfg(all(test, target_os = "linux"))]
pub(crate) use self::priority::current_thread_slice;
pub use self::priority::{
    LATENCY_SLICE, batch_current_thread, latency_slice_current_thread, nice_current_thread,
};
pub use self::run_queue::{LEASE_TICKS, MIN_WEIGHT_MILLICORES, RunQueue};
pub use self::sandbox::{Prepared, SandboxInstance, SandboxName, SandboxRuntime};
pub use self::stdin::{AttachError, STDIN_BUFFER_BYTES, StdinPipe, StdinWriter};
pub use self::store::{P2State, Stores};
pub use self::threads::GUEST_THREAD_NAME;
pub use self::wasmtime::{RuntimeError, WasmtimeRuntime};
