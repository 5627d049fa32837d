//! The sandbox runtime: compiles workloads and runs sandboxes.
//!
//! [`SandboxRuntime`] is the boundary the [`Supervisor`](crate::supervisor::Supervisor) drives;
//! [`WasmtimeRuntime`] implements it with one wasmtime `Engine` (pooling allocator, epoch
//! interruption) per process. Work happens in three stages, as in Spin:
//! 1. once per process: the engine, the WASI linkers and the epoch ticker;
//! 2. once per module digest ([`SandboxRuntime::prepare`]): compile, cache on disk, pre-link;
//! 3. once per run ([`SandboxRuntime::instantiate`], then [`SandboxInstance::run`]): a fresh
//!    `Store` with its own WASI context, limits and log ring.

pub mod capacity;
pub mod http;
pub mod limits;
pub mod logs;
pub mod volumes;
mod wasmtime;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::agent::v1::WorkloadSpec;

pub use self::capacity::Capacity;
pub use self::limits::SandboxLimits;
pub use self::logs::LogBuffer;
pub use self::wasmtime::{
    CacheStats, PreparedWorkload, WasmtimeInstance, WasmtimeRuntime, precompile_for_target,
};

/// Compiles workloads and runs their sandboxes.
pub trait SandboxRuntime: Send + Sync + 'static {
    /// A workload ready to be instantiated any number of times.
    type Prepared: Prepared;
    /// One instantiated sandbox, ready to run.
    type Instance: SandboxInstance;
    /// A sandbox's volumes, kept across its runs and removed when it is dropped.
    type Volumes: Send + Sync + 'static;

    /// Loads, verifies and compiles a workload's module, or takes it from the cache.
    ///
    /// # Errors
    /// Fails with a [`SandboxError`] whose [`reason`](SandboxError::reason) says what the user
    /// must fix: an unreadable, oversize, mis-digested, malformed or non-command module.
    fn prepare(
        &self,
        spec: &WorkloadSpec,
    ) -> impl Future<Output = Result<Arc<Self::Prepared>, SandboxError>> + Send;

    /// Creates a fresh sandbox named `sandbox` (its `metadata.name`): a new store, WASI
    /// context and limits, then instantiation (which already runs guest code: start functions
    /// and data segments). `volumes` holds the sandbox's volumes between runs: set up on its
    /// first run, reused by its restarts.
    ///
    /// # Errors
    /// Fails with the [`Exit`] that ended the sandbox during instantiation.
    fn instantiate(
        &self,
        prepared: &Arc<Self::Prepared>,
        sandbox: SandboxName<'_>,
        logs: Arc<LogBuffer>,
        volumes: &mut Option<Arc<Self::Volumes>>,
    ) -> impl Future<Output = Result<Self::Instance, Exit>> + Send;

    /// What this runtime can hold.
    fn capacity(&self) -> &Capacity;

    /// Drops cached compiled artifacts that no prepared workload uses any more.
    fn evict_unused(&self) {}
}

/// A sandbox's name, `<workload>-<generation>-<replica>`: its id in listings and its
/// `metadata.name`. Formatted only when shown, not at every start.
#[derive(Clone, Copy, Debug)]
pub struct SandboxName<'a> {
    /// The workload's name on the agent.
    pub workload: &'a str,
    /// The workload's generation the sandbox runs.
    pub generation: u64,
    /// Its replica index.
    pub replica: u32,
}

impl std::fmt::Display for SandboxName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.workload, self.generation, self.replica)
    }
}

/// A prepared workload.
pub trait Prepared: Send + Sync + 'static {
    /// Lower-case hex SHA-256 of the module.
    fn digest(&self) -> &str;
    /// The limits every sandbox of this workload runs under.
    fn limits(&self) -> &SandboxLimits;
}

/// An instantiated sandbox.
pub trait SandboxInstance: Send + 'static {
    /// Runs the guest's entry point to completion. Dropping the future kills the sandbox: at once
    /// if it is blocked in WASI, at its next epoch yield if it is computing.
    fn run(self) -> impl Future<Output = Exit> + Send;
}

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

/// Why a workload could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The spec names no module source.
    #[error("workload has no module source")]
    MissingModule,
    /// The module file could not be read.
    #[error("reading module {path}")]
    ReadModule {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The module is larger than the agent accepts.
    #[error("module is {size} bytes, over the agent's limit of {limit} bytes")]
    ModuleTooLarge {
        /// The module's size.
        size: u64,
        /// The agent's limit.
        limit: u64,
    },
    /// The module's digest is not the one the spec pins.
    #[error("module digest mismatch: spec pins sha256 {expected}, module is sha256 {actual}")]
    DigestMismatch {
        /// The digest in the spec.
        expected: String,
        /// The digest of the bytes.
        actual: String,
    },
    /// The bytes are not a binary WebAssembly module or component.
    #[error("not a binary WebAssembly module or component ({0}); WAT text is not accepted")]
    NotBinaryWasm(&'static str),
    /// Validation or compilation failed.
    #[error("invalid module: {0}")]
    Compile(String),
    /// Compilation took longer than the agent allows.
    #[error("compiling the module took longer than {0:?}; it is too costly for this agent")]
    CompileTimeout(Duration),
    /// The module cannot be linked against WASI (an unknown import, for example).
    #[error("cannot link module: {0}")]
    Link(String),
    /// `spec.http` is set, but the component is no `wasi:http/incoming-handler`.
    #[error(
        "spec.http is set, but the module is not a component exporting \
         wasi:http/incoming-handler"
    )]
    NotHttpHandler,
    /// The component is an HTTP handler, but `spec.http` is not set.
    #[error(
        "the component exports wasi:http/incoming-handler but not wasi:cli/run; set spec.http \
         to serve it"
    )]
    HttpWithoutRoute,
    /// A command module without a callable `_start`.
    #[error("module has no callable `_start: func()` export; only WASI command modules can run")]
    MissingStart,
    /// The workload asks for more than the agent allows per sandbox.
    #[error("{0}")]
    Limits(String),
    /// A `hostPath` volume the agent does not allow, or `items` that would leave a volume.
    #[error("{0}")]
    VolumeNotAllowed(String),
}

// === impl SandboxError ===

impl SandboxError {
    /// The machine-readable reason shown in sandbox status.
    pub fn reason(&self) -> &'static str {
        match self {
            SandboxError::ReadModule { .. } | SandboxError::MissingModule => "ModuleUnavailable",
            SandboxError::Limits(_) => "InvalidLimits",
            SandboxError::VolumeNotAllowed(_) => "VolumeNotAllowed",
            _ => "InvalidModule",
        }
    }
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
    /// Interval between epoch ticks; the CPU time slice. Default 10 ms.
    pub epoch_tick: Duration,
    /// Largest module accepted, in bytes. Default 32 MiB.
    pub max_module_bytes: u64,
    /// Modules compiled at once. Default: the number of CPUs.
    pub compile_concurrency: usize,
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
            epoch_tick: Duration::from_millis(10),
            max_module_bytes: 32 << 20,
            compile_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            compile_timeout: Duration::from_secs(60),
            cache_dir: None,
            volumes: volumes::VolumeConfig {
                dir: std::env::temp_dir().join(format!("flotilla-volumes-{}", std::process::id())),
                host_paths: Vec::new(),
                secrets_dir: None,
            },
            node_name: host_name(),
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
            },
        }
    }
}
