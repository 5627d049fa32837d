//! The boundary the [`Supervisor`](crate::supervisor::Supervisor) drives: [`SandboxRuntime`]
//! prepares workloads and instantiates sandboxes, each a [`SandboxInstance`] that runs to an
//! [`Exit`].

use std::future::Future;
use std::sync::Arc;

use flotilla_proto::agent::v1::WorkloadSpec;

use super::capacity::Capacity;
use super::cpu::CpuUsage;
use super::error::SandboxError;
use super::exit::Exit;
use super::limits::SandboxLimits;
use super::logs::LogBuffer;
use super::stdin::StdinPipe;

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
    /// and data segments). It prints to `logs`, reads `stdin` (empty when `None`) and charges
    /// its CPU to `cpu`, all kept across its runs. `volumes` holds the sandbox's volumes between runs: set up on its first run,
    /// reused by its restarts.
    ///
    /// # Errors
    /// Fails with the [`Exit`] that ended the sandbox during instantiation.
    fn instantiate(
        &self,
        prepared: &Arc<Self::Prepared>,
        sandbox: SandboxName<'_>,
        logs: Arc<LogBuffer>,
        stdin: Option<Arc<StdinPipe>>,
        cpu: Arc<CpuUsage>,
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
    /// Sandboxes one replica may hold at once: one, or an HTTP replica's `maxConcurrency` (a
    /// sandbox per request).
    fn slots(&self) -> u32 {
        1
    }
    /// What one replica is accounted for at admission: its sandbox slots, and their memory
    /// requests with its log ring.
    fn per_replica(&self) -> (u64, u64) {
        let slots = u64::from(self.slots());
        (slots, self.limits().admitted_bytes(slots))
    }
}

/// An instantiated sandbox.
pub trait SandboxInstance: Send + 'static {
    /// Runs the guest's entry point to completion. Dropping the future kills the sandbox: at once
    /// if it is blocked in WASI, at its next epoch yield if it is computing.
    fn run(self) -> impl Future<Output = Exit> + Send;
}
