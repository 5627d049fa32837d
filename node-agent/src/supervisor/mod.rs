//! The supervisor: desired workloads in, running sandboxes out.
//!
//! [`Supervisor::apply`] takes a [`WorkloadSpec`]. The same generation with another replica count
//! scales the workload; a new generation replaces its sandboxes. Each sandbox is one tokio task
//! that instantiates the prepared workload, runs it, and restarts it by its restart policy with
//! kubelet-style crash-loop [`backoff`]. Admission refuses work beyond the runtime's
//! [`Capacity`](crate::runtime::Capacity) instead of degrading the sandboxes already running.
//!
//! Status is kept per sandbox behind a small lock and published on a broadcast channel for
//! watchers; nothing is allocated for logs until a sandbox prints.

pub mod backoff;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_proto::agent::v1::{
    Capacity as CapacityMessage, RestartPolicy, SandboxPhase, SandboxStatus, Termination,
    WorkloadSpec,
};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use self::backoff::{Backoff, BackoffConfig};
use crate::metrics::Metrics;
use crate::runtime::{
    AttachError, CpuUsage, Exit, LogBuffer, Prepared, SandboxError, SandboxInstance, SandboxName,
    SandboxRuntime, StdinPipe, StdinWriter, WasmtimeRuntime,
};

/// Supervisor settings.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// Crash-loop backoff. See [`BackoffConfig`].
    pub backoff: BackoffConfig,
    /// Time sandboxes get to end when stopped without an explicit grace period. Default 5 s.
    pub default_grace: Duration,
    /// Status events buffered for slow watchers before they must resynchronise. Default 16,384.
    pub event_buffer: usize,
    /// The tokio runtime sandboxes run on; default the one that starts them. The agent gives
    /// them one of their own, so that guests never hold up its own work.
    pub guests: Option<tokio::runtime::Handle>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            backoff: BackoffConfig::default(),
            default_grace: Duration::from_secs(5),
            event_buffer: 16_384,
            guests: None,
        }
    }
}

/// Why a workload was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The spec itself is invalid.
    #[error("invalid workload: {0}")]
    InvalidSpec(String),
    /// The module could not be prepared; the failure is also recorded in sandbox status.
    #[error("preparing workload {workload}")]
    Prepare {
        /// The workload.
        workload: String,
        /// The cause.
        #[source]
        source: SandboxError,
    },
    /// The agent lacks the capacity; the workloads already running are untouched.
    #[error("admission refused: {0}")]
    AdmissionRefused(String),
    /// The agent is shutting down.
    #[error("the agent is shutting down")]
    ShuttingDown,
}

impl ApplyError {
    /// The machine-readable reason, as a sandbox status or an event shows it.
    pub fn reason(&self) -> &'static str {
        match self {
            ApplyError::InvalidSpec(_) => "InvalidSpec",
            ApplyError::Prepare { source, .. } => source.reason(),
            ApplyError::AdmissionRefused(_) => "AdmissionRefused",
            ApplyError::ShuttingDown => "ShuttingDown",
        }
    }
}

/// What [`Supervisor::apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The module's SHA-256.
    pub digest: String,
    /// Sandboxes now desired.
    pub replicas: u32,
}

/// How a shutdown went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Sandboxes the agent held when shutdown began.
    pub sandboxes: usize,
    /// Of those, sandboxes whose task was still alive and was stopped.
    pub stopped: usize,
    /// Sandboxes that did not end within the grace period and were aborted.
    pub aborted: usize,
}

/// One sandbox's output, for log readers.
pub struct SandboxOutput {
    /// Its stdout and stderr.
    pub logs: Arc<LogBuffer>,
    cell: Arc<SandboxCell>,
}

impl SandboxOutput {
    /// How its last run ended, once it has ended for good (its log ring is closed then).
    pub fn ended(&self) -> Option<Termination> {
        if !self.logs.is_closed() {
            return None;
        }
        self.cell.lock().last.as_deref().cloned()
    }
}

/// Owns every sandbox of the agent. Cheap to clone.
pub struct Supervisor<R: SandboxRuntime = WasmtimeRuntime> {
    shared: Arc<Shared<R>>,
}

/// A handle on a [`Supervisor`] that does not keep it alive.
pub struct WeakSupervisor<R: SandboxRuntime> {
    shared: std::sync::Weak<Shared<R>>,
}

impl<R: SandboxRuntime> WeakSupervisor<R> {
    /// The supervisor, while it lives.
    pub fn upgrade(&self) -> Option<Supervisor<R>> {
        self.shared.upgrade().map(|shared| Supervisor { shared })
    }
}

impl<R: SandboxRuntime> Clone for Supervisor<R> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<R: SandboxRuntime> {
    runtime: R,
    config: SupervisorConfig,
    metrics: Metrics,
    workloads: Mutex<HashMap<String, Workload<R>>>,
    events: broadcast::Sender<SandboxStatus>,
    /// Bumped on every status change: a cheap "something changed" signal.
    changed: tokio::sync::watch::Sender<u64>,
    /// Failed runs since the last [`Supervisor::take_failures`], one entry per workload,
    /// generation and reason.
    failures: Mutex<HashMap<FailureKey, Failures>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Wakes sandboxes waiting out a backoff after a `ConfigError`: the ConfigMaps or Secrets
    /// changed, so they may start now.
    config_changed: tokio::sync::Notify,
}

/// Workload, generation and reason of aggregated failures.
type FailureKey = (Arc<str>, u64, &'static str);

/// Failed runs of one workload generation with one reason, aggregated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failures {
    /// The workload.
    pub workload: String,
    /// The generation that ran.
    pub generation: u64,
    /// Why the runs ended: Error, Trap, OutOfMemory, CpuLimit, DeadlineExceeded.
    pub reason: &'static str,
    /// The latest run's message.
    pub message: String,
    /// How many runs.
    pub count: u32,
    /// Unix milliseconds of the latest.
    pub last_at_ms: i64,
}

struct Workload<R: SandboxRuntime> {
    spec: WorkloadSpec,
    /// `None` when preparing failed; its sandboxes are then placeholders that show why.
    prepared: Option<Arc<R::Prepared>>,
    cancel: CancellationToken,
    sandboxes: Vec<SandboxEntry>,
    /// CPU used by the replicas scaled away, in milliseconds: the workload's CPU counter
    /// never goes down while it lives.
    retired_cpu_ms: u64,
}

struct SandboxEntry {
    cell: Arc<SandboxCell>,
    task: Option<JoinHandle<()>>,
}

/// The shared record of one sandbox: identity, status, logs and CPU used.
struct SandboxCell {
    workload: Arc<str>,
    replica: u32,
    generation: u64,
    cancel: CancellationToken,
    logs: Arc<LogBuffer>,
    /// Its attachable stdin, when the workload asks for one.
    stdin: Option<Arc<StdinPipe>>,
    cpu: Arc<CpuUsage>,
    status: Mutex<CellStatus>,
}

struct CellStatus {
    phase: SandboxPhase,
    reason: &'static str,
    message: String,
    restart_count: u32,
    started_at_ms: i64,
    last: Option<Box<Termination>>,
}

// === impl Supervisor ===

impl<R: SandboxRuntime> Supervisor<R> {
    /// Creates a supervisor over `runtime`.
    pub fn new(runtime: R, config: SupervisorConfig, metrics: Metrics) -> Self {
        let (events, _) = broadcast::channel(config.event_buffer.max(1));
        Self {
            shared: Arc::new(Shared {
                runtime,
                config,
                metrics,
                workloads: Mutex::new(HashMap::new()),
                events,
                changed: tokio::sync::watch::channel(0).0,
                failures: Mutex::default(),
                tracker: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                config_changed: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Says that the ConfigMaps and Secrets changed: sandboxes that failed for want of one
    /// retry at once instead of waiting out their backoff, as the kubelet's next sync would.
    pub fn config_changed(&self) {
        self.shared.config_changed.notify_waiters();
    }

    /// Wakes after any sandbox status changes; cheaper than [`watch`](Self::watch) when only
    /// the fact of a change matters.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// Failed runs since the previous call, aggregated per workload, generation and reason,
    /// so that a heartbeat carries one entry per kind of failure however many sandboxes fail.
    pub fn take_failures(&self) -> Vec<Failures> {
        let mut failures = self
            .shared
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failures.drain().map(|(_, f)| f).collect()
    }

    /// CPU used by each workload's sandboxes, in milliseconds, over their lives: a counter
    /// per workload that never goes down while the workload lives.
    pub fn cpu_by_workload(&self) -> Vec<(String, u64)> {
        self.shared
            .lock_workloads()
            .iter()
            .map(|(name, workload)| {
                let running: u64 = workload.sandboxes.iter().map(|s| s.cell.cpu.millis()).sum();
                (name.clone(), workload.retired_cpu_ms + running)
            })
            .collect()
    }

    /// A handle that does not keep the supervisor alive (for what the supervisor's own
    /// state refers back from, such as the metrics).
    pub fn downgrade(&self) -> WeakSupervisor<R> {
        WeakSupervisor {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// The runtime the supervisor drives.
    pub fn runtime(&self) -> &R {
        &self.shared.runtime
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Creates, scales or replaces a workload.
    ///
    /// # Errors
    /// [`ApplyError::InvalidSpec`] for a bad name, [`ApplyError::Prepare`] when the module cannot
    /// be loaded or compiled (recorded in the workload's sandbox status too),
    /// [`ApplyError::AdmissionRefused`] beyond capacity (nothing changes).
    pub async fn apply(&self, spec: WorkloadSpec) -> Result<Applied, ApplyError> {
        flotilla_model::validate_name(&spec.name)
            .map_err(|message| ApplyError::InvalidSpec(format!("name {message}")))?;
        if self.shared.shutdown.is_cancelled() {
            return Err(ApplyError::ShuttingDown);
        }
        if let Some(applied) = self.try_scale(&spec)? {
            return Ok(applied);
        }
        let prepared = match self.shared.runtime.prepare(&spec).await {
            Ok(prepared) => prepared,
            Err(source) => {
                self.record_failed(spec.clone(), &source);
                return Err(ApplyError::Prepare {
                    workload: spec.name,
                    source,
                });
            }
        };

        let mut workloads = self.shared.lock_workloads();
        self.admit(&workloads, &spec, prepared.per_replica())?;
        if let Some(old) = workloads.remove(&spec.name) {
            self.shared.retire(old);
        }
        let digest = prepared.digest().to_string();
        let replicas = spec.replicas;
        let mut workload = Workload {
            cancel: self.shared.shutdown.child_token(),
            prepared: Some(prepared),
            sandboxes: Vec::with_capacity(replicas as usize),
            retired_cpu_ms: 0,
            spec,
        };
        self.shared.scale_to(&mut workload, replicas);
        workloads.insert(workload.spec.name.clone(), workload);
        Ok(Applied { digest, replicas })
    }

    /// Scales a workload in place when only its replica count changed.
    fn try_scale(&self, spec: &WorkloadSpec) -> Result<Option<Applied>, ApplyError> {
        let mut workloads = self.shared.lock_workloads();
        let Some(existing) = workloads.get(&spec.name) else {
            return Ok(None);
        };
        let Some(prepared) = existing.prepared.clone() else {
            return Ok(None);
        };
        let mut same = existing.spec.clone();
        same.replicas = spec.replicas;
        if same != *spec {
            return Ok(None);
        }
        self.admit(&workloads, spec, prepared.per_replica())?;
        let workload = workloads
            .get_mut(&spec.name)
            .expect("the workload was found under the same lock");
        workload.spec.replicas = spec.replicas;
        self.shared.scale_to(workload, spec.replicas);
        Ok(Some(Applied {
            digest: prepared.digest().to_string(),
            replicas: spec.replicas,
        }))
    }

    /// Checks that the agent can hold `spec` in place of its current version.
    fn admit(
        &self,
        workloads: &HashMap<String, Workload<R>>,
        spec: &WorkloadSpec,
        (slots, admitted_bytes): (u64, u64),
    ) -> Result<(), ApplyError> {
        let capacity = self.shared.runtime.capacity();
        let (mut sandboxes, mut memory) = (0u64, 0u64);
        for (name, w) in workloads {
            if *name != spec.name
                && let Some(prepared) = &w.prepared
            {
                let n = u64::from(w.spec.replicas);
                let (slots, bytes) = prepared.per_replica();
                sandboxes = sandboxes.saturating_add(n.saturating_mul(slots));
                memory = memory.saturating_add(n.saturating_mul(bytes));
            }
        }
        let replicas = u64::from(spec.replicas);
        // An HTTP replica holds a sandbox per request it serves at once.
        let wanted = replicas.saturating_mul(slots);
        let free = u64::from(capacity.max_sandboxes).saturating_sub(sandboxes);
        if wanted > free {
            let per_request = if slots > 1 {
                format!(
                    " ({replicas} replicas serving up to {slots} requests at once, each in a \
                     sandbox: spec.http.maxConcurrency)"
                )
            } else {
                String::new()
            };
            return Err(ApplyError::AdmissionRefused(format!(
                "workload {} needs {wanted} sandboxes{per_request} but only {free} of {} are \
                 free ({})",
                spec.name, capacity.max_sandboxes, capacity.limited_by
            )));
        }
        let wanted_memory = replicas.saturating_mul(admitted_bytes);
        let free_memory = capacity.memory_bytes.saturating_sub(memory);
        if wanted_memory > free_memory {
            return Err(ApplyError::AdmissionRefused(format!(
                "workload {} requests {wanted_memory} bytes of memory (requests and log rings) \
                 but only {free_memory} of {} are free",
                spec.name, capacity.memory_bytes
            )));
        }
        Ok(())
    }

    /// Records a workload whose module could not be prepared, so its status shows why.
    fn record_failed(&self, spec: WorkloadSpec, error: &SandboxError) {
        let mut workloads = self.shared.lock_workloads();
        if let Some(old) = workloads.remove(&spec.name) {
            self.shared.retire(old);
        }
        let workload_name: Arc<str> = spec.name.as_str().into();
        let message = flotilla_telemetry::error_chain(error);
        let sandboxes = (0..spec.replicas)
            .map(|replica| {
                let cell = Arc::new(SandboxCell::new(
                    workload_name.clone(),
                    replica,
                    spec.generation,
                    CancellationToken::new(),
                    1,
                    false,
                ));
                self.shared
                    .metrics
                    .transition(None, Some(SandboxPhase::Failed));
                cell.update(|s| {
                    s.phase = SandboxPhase::Failed;
                    s.reason = error.reason();
                    s.message = message.clone();
                });
                SandboxEntry { cell, task: None }
            })
            .collect();
        workloads.insert(
            spec.name.clone(),
            Workload {
                cancel: self.shared.shutdown.child_token(),
                prepared: None,
                sandboxes,
                retired_cpu_ms: 0,
                spec,
            },
        );
    }

    /// Stops every sandbox of a workload, waiting up to `grace` (the default when `None`) before
    /// aborting the stragglers, and forgets the workload. Returns how many sandboxes it held, or
    /// `None` for an unknown workload.
    pub async fn stop(&self, name: &str, grace: Option<Duration>) -> Option<usize> {
        let workload = self.shared.lock_workloads().remove(name)?;
        let count = workload.sandboxes.len();
        let tasks = self.shared.retire(workload);
        let grace = grace.unwrap_or(self.shared.config.default_grace);
        await_or_abort(tasks, grace).await;
        self.shared.runtime.evict_unused();
        Some(count)
    }

    /// Status of every sandbox, or of one workload's.
    pub fn list(&self, workload: Option<&str>) -> Vec<SandboxStatus> {
        let workloads = self.shared.lock_workloads();
        let selected: Vec<&Workload<R>> = match workload {
            Some(name) => workloads.get(name).into_iter().collect(),
            None => workloads.values().collect(),
        };
        selected
            .into_iter()
            .flat_map(|w| w.sandboxes.iter().map(|s| s.cell.snapshot()))
            .collect()
    }

    /// Running sandboxes of `workload` that have run for its `min_ready_seconds`: available, as
    /// a Deployment counts them.
    pub fn available(&self, workload: &str) -> u32 {
        let workloads = self.shared.lock_workloads();
        let Some(w) = workloads.get(workload) else {
            return 0;
        };
        let ready_since = unix_ms() - i64::from(w.spec.min_ready_seconds) * 1000;
        w.sandboxes
            .iter()
            .filter(|s| {
                let status = s.cell.lock();
                status.phase == SandboxPhase::Running && status.started_at_ms <= ready_since
            })
            .count() as u32
    }

    /// The module digest of a workload, once prepared.
    pub fn module_digest(&self, workload: &str) -> Option<String> {
        let workloads = self.shared.lock_workloads();
        let prepared = workloads.get(workload)?.prepared.as_ref()?;
        Some(prepared.digest().to_string())
    }

    /// The output of one sandbox: its log ring, and how it ended once it has.
    pub fn output(&self, workload: &str, replica: u32) -> Option<SandboxOutput> {
        let workloads = self.shared.lock_workloads();
        let entry = workloads.get(workload)?.sandboxes.get(replica as usize)?;
        Some(SandboxOutput {
            logs: entry.cell.logs.clone(),
            cell: entry.cell.clone(),
        })
    }

    /// Takes the write end of one sandbox's stdin.
    ///
    /// # Errors
    /// A message saying why not: no such sandbox, a workload without `stdin`, or an
    /// [`AttachError`].
    pub fn attach_stdin(&self, workload: &str, replica: u32) -> Result<StdinWriter, String> {
        let workloads = self.shared.lock_workloads();
        let entry = workloads
            .get(workload)
            .and_then(|w| w.sandboxes.get(replica as usize))
            .ok_or_else(|| format!("sandbox {replica} of workload {workload} not found"))?;
        let stdin = entry.cell.stdin.as_ref().ok_or_else(|| {
            format!("workload {workload} has no stdin: set spec.stdin (flotilla run -i)")
        })?;
        stdin
            .attach()
            .map_err(|e: AttachError| format!("sandbox {replica} of workload {workload}: {e}"))
    }

    /// Subscribes to status changes.
    pub fn watch(&self) -> broadcast::Receiver<SandboxStatus> {
        self.shared.events.subscribe()
    }

    /// What the agent can hold and holds now.
    pub fn capacity(&self) -> CapacityMessage {
        let capacity = self.shared.runtime.capacity();
        let workloads = self.shared.lock_workloads();
        let (mut sandboxes, mut memory) = (0u64, 0u64);
        for w in workloads.values() {
            if let Some(prepared) = &w.prepared {
                let n = w.sandboxes.len() as u64;
                let (slots, bytes) = prepared.per_replica();
                sandboxes = sandboxes.saturating_add(n.saturating_mul(slots));
                memory = memory.saturating_add(n.saturating_mul(bytes));
            }
        }
        CapacityMessage {
            max_sandboxes: u64::from(capacity.max_sandboxes),
            memory_bytes: capacity.memory_bytes,
            sandboxes,
            memory_reserved_bytes: memory,
            arch: capacity.arch.to_string(),
            limited_by: capacity.limited_by.clone(),
            wasm_features: capacity
                .wasm_features
                .iter()
                .map(|f| f.name().to_string())
                .collect(),
        }
    }

    /// Stops every sandbox: each is cancelled, and those still alive after `grace` are aborted.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let mut report = ShutdownReport::default();
        // Counted before the cancellation: a sandbox that ends at once was still stopped.
        let workloads: Vec<Workload<R>> = {
            let mut workloads = self.shared.lock_workloads();
            report.stopped = workloads
                .values()
                .flat_map(|w| &w.sandboxes)
                .filter(|entry| entry.task.as_ref().is_some_and(|t| !t.is_finished()))
                .count();
            self.shared.shutdown.cancel();
            workloads.drain().map(|(_, w)| w).collect()
        };
        let mut tasks = Vec::new();
        for workload in workloads {
            report.sandboxes += workload.sandboxes.len();
            tasks.extend(self.shared.retire(workload));
        }
        report.aborted = await_or_abort(tasks, grace).await;
        self.shared.tracker.close();
        report
    }
}

// === impl Shared ===

impl<R: SandboxRuntime> Shared<R> {
    fn lock_workloads(&self) -> std::sync::MutexGuard<'_, HashMap<String, Workload<R>>> {
        self.workloads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cancels a workload's sandboxes and returns their tasks.
    fn retire(&self, workload: Workload<R>) -> Vec<JoinHandle<()>> {
        workload.cancel.cancel();
        workload
            .sandboxes
            .into_iter()
            .filter_map(|entry| {
                if entry.task.is_none() {
                    // A placeholder has no task to take it out of the metrics.
                    let phase = entry.cell.lock().phase;
                    self.metrics.transition(Some(phase), None);
                }
                entry.task
            })
            .collect()
    }

    /// Starts or stops sandboxes until the workload has `replicas`.
    fn scale_to(self: &Arc<Self>, workload: &mut Workload<R>, replicas: u32) {
        let target = replicas as usize;
        while workload.sandboxes.len() > target {
            if let Some(entry) = workload.sandboxes.pop() {
                entry.cell.cancel.cancel();
                workload.retired_cpu_ms += entry.cell.cpu.millis();
            }
        }
        let Some(prepared) = workload.prepared.clone() else {
            return;
        };
        let name: Arc<str> = match workload.sandboxes.first() {
            Some(entry) => entry.cell.workload.clone(),
            None => workload.spec.name.as_str().into(),
        };
        let policy = restart_policy(&workload.spec);
        for replica in workload.sandboxes.len()..target {
            let cell = Arc::new(SandboxCell::new(
                name.clone(),
                replica as u32,
                workload.spec.generation,
                workload.cancel.child_token(),
                prepared.limits().log_bytes,
                workload.spec.stdin,
            ));
            self.metrics.transition(None, Some(SandboxPhase::Pending));
            let span = tracing::debug_span!("sandbox", workload = %name, replica);
            let run =
                run_sandbox(self.clone(), cell.clone(), prepared.clone(), policy).instrument(span);
            let task = match &self.config.guests {
                Some(guests) => self.tracker.spawn_on(run, guests),
                None => self.tracker.spawn(run),
            };
            workload.sandboxes.push(SandboxEntry {
                cell,
                task: Some(task),
            });
        }
    }

    fn record_failure(&self, cell: &SandboxCell, reason: &'static str, message: String) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = failures
            .entry((cell.workload.clone(), cell.generation, reason))
            .or_insert_with(|| Failures {
                workload: cell.workload.to_string(),
                generation: cell.generation,
                reason,
                message: String::new(),
                count: 0,
                last_at_ms: 0,
            });
        entry.count = entry.count.saturating_add(1);
        entry.message = message;
        entry.last_at_ms = unix_ms();
    }

    fn publish(&self, cell: &SandboxCell) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        if self.events.receiver_count() > 0 {
            // No receiver left between the check and the send is harmless.
            let _ = self.events.send(cell.snapshot());
        }
    }
}

/// One sandbox's life: run, restart by policy with backoff, until stopped or done.
async fn run_sandbox<R: SandboxRuntime>(
    shared: Arc<Shared<R>>,
    cell: Arc<SandboxCell>,
    prepared: Arc<R::Prepared>,
    policy: RestartPolicy,
) {
    let metrics = &shared.metrics;
    let mut backoff = Backoff::default();
    // The sandbox's volumes: made on its first run, kept by its restarts, removed when it ends.
    let mut volumes = None;
    loop {
        let run_started = Instant::now();
        let exit = tokio::select! {
            biased;
            () = cell.cancel.cancelled() => Exit::Stopped,
            exit = run_once(&shared, &cell, &prepared, &mut volumes) => exit,
        };
        let ran_for = run_started.elapsed();
        metrics.exit(exit.reason());
        if exit != Exit::Stopped {
            let level_is_failure = !exit.is_success();
            if level_is_failure {
                tracing::warn!(
                    workload = %cell.workload,
                    replica = cell.replica,
                    reason = exit.reason(),
                    message = %exit.message(),
                    "sandbox failed"
                );
                shared.record_failure(&cell, exit.reason(), exit.message());
            } else {
                tracing::info!(workload = %cell.workload, replica = cell.replica, "sandbox completed");
            }
        }
        let termination = Box::new(Termination {
            reason: exit.reason().to_string(),
            message: exit.message(),
            exit_code: exit.exit_code(),
            finished_at_ms: unix_ms(),
        });
        if exit == Exit::Stopped {
            // Its volumes go before anyone can see it ended.
            drop(volumes.take());
            let phase = cell.update(|s| {
                s.reason = "Stopped";
                s.message = "stopped by the agent".into();
                s.last = Some(termination);
                s.started_at_ms = 0;
            });
            metrics.transition(Some(phase), None);
            cell.finish();
            shared.publish(&cell);
            return;
        }
        let restart = match policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !exit.is_success(),
            RestartPolicy::Always | RestartPolicy::Unspecified => true,
        };
        if !restart {
            drop(volumes.take());
            let phase = if exit.is_success() {
                SandboxPhase::Succeeded
            } else {
                SandboxPhase::Failed
            };
            let old = cell.update(|s| {
                s.phase = phase;
                s.reason = exit.reason();
                s.message = termination.message.clone();
                s.last = Some(termination);
                s.started_at_ms = 0;
            });
            metrics.transition(Some(old), Some(phase));
            cell.finish();
            shared.publish(&cell);
            return;
        }
        let delay = backoff.next_delay(&shared.config.backoff, ran_for);
        let old = cell.update(|s| {
            s.phase = SandboxPhase::Pending;
            s.reason = "CrashLoopBackOff";
            s.message = format!(
                "back-off {delay:?} restarting; last run: {}: {}",
                termination.reason, termination.message
            );
            s.last = Some(termination);
            s.started_at_ms = 0;
        });
        metrics.transition(Some(old), Some(SandboxPhase::Pending));
        let config_changed = shared.config_changed.notified();
        shared.publish(&cell);
        let waits_for_config = matches!(exit, Exit::Config(_));
        tokio::select! {
            biased;
            () = cell.cancel.cancelled() => {
                drop(volumes.take());
                metrics.transition(Some(SandboxPhase::Pending), None);
                cell.update(|s| s.reason = "Stopped");
                cell.finish();
                shared.publish(&cell);
                return;
            }
            () = tokio::time::sleep(delay) => {}
            () = config_changed, if waits_for_config => {}
        }
        cell.update(|s| s.restart_count += 1);
    }
}

/// Instantiates and runs a sandbox once, under its wall-clock deadline.
async fn run_once<R: SandboxRuntime>(
    shared: &Shared<R>,
    cell: &SandboxCell,
    prepared: &Arc<R::Prepared>,
    volumes: &mut Option<Arc<R::Volumes>>,
) -> Exit {
    let run = async {
        let begun = Instant::now();
        let instance = match shared
            .runtime
            .instantiate(
                prepared,
                cell.name(),
                cell.logs.clone(),
                cell.stdin.clone(),
                cell.cpu.clone(),
                volumes,
            )
            .await
        {
            Ok(instance) => instance,
            Err(exit) => return exit,
        };
        shared.metrics.started(begun.elapsed());
        let old = cell.update(|s| {
            s.phase = SandboxPhase::Running;
            s.reason = "";
            s.message.clear();
            s.started_at_ms = unix_ms();
        });
        shared
            .metrics
            .transition(Some(old), Some(SandboxPhase::Running));
        cell.logs.reopen();
        shared.publish(cell);
        instance.run().await
    };
    match prepared.limits().deadline {
        Some(deadline) => tokio::time::timeout(deadline, run)
            .await
            .unwrap_or(Exit::DeadlineExceeded(deadline)),
        None => run.await,
    }
}

/// Waits for tasks up to `grace`, then aborts the rest. Returns how many were aborted.
async fn await_or_abort(tasks: Vec<JoinHandle<()>>, grace: Duration) -> usize {
    let deadline = Instant::now() + grace;
    let mut aborted = 0;
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            abort.abort();
            aborted += 1;
        }
    }
    aborted
}

// === impl SandboxCell ===

impl SandboxCell {
    fn new(
        workload: Arc<str>,
        replica: u32,
        generation: u64,
        cancel: CancellationToken,
        log_bytes: usize,
        stdin: bool,
    ) -> Self {
        Self {
            workload,
            replica,
            generation,
            cancel,
            logs: Arc::new(LogBuffer::new(log_bytes)),
            stdin: stdin.then(|| Arc::new(StdinPipe::new())),
            cpu: Arc::default(),
            status: Mutex::new(CellStatus {
                phase: SandboxPhase::Pending,
                reason: "",
                message: String::new(),
                restart_count: 0,
                started_at_ms: 0,
                last: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CellStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the end of the sandbox for good: its log ring closes, its stdin ends.
    fn finish(&self) {
        self.logs.close();
        if let Some(stdin) = &self.stdin {
            stdin.end();
        }
    }

    /// Applies `f` to the status and returns the phase it had before.
    /// The sandbox's name, as listings show it.
    fn name(&self) -> SandboxName<'_> {
        SandboxName {
            workload: &self.workload,
            generation: self.generation,
            replica: self.replica,
        }
    }

    fn update(&self, f: impl FnOnce(&mut CellStatus)) -> SandboxPhase {
        let mut status = self.lock();
        let before = status.phase;
        f(&mut status);
        before
    }

    fn snapshot(&self) -> SandboxStatus {
        let s = self.lock();
        SandboxStatus {
            workload: self.workload.to_string(),
            replica: self.replica,
            generation: self.generation,
            sandbox_id: self.name().to_string(),
            phase: s.phase as i32,
            reason: s.reason.to_string(),
            message: s.message.clone(),
            restart_count: s.restart_count,
            started_at_ms: s.started_at_ms,
            last_termination: s.last.as_deref().cloned(),
            cpu_used_ms: self.cpu.millis(),
        }
    }
}

fn restart_policy(spec: &WorkloadSpec) -> RestartPolicy {
    RestartPolicy::try_from(spec.restart_policy).unwrap_or(RestartPolicy::Always)
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
