//! Prometheus metrics of the control plane, served at `/metrics` on `--metrics-listen`.
//!
//! Counters and histograms are updated where things happen; the gauges of nodes and sessions
//! are read from the cluster when scraped ([`Cluster::encode_metrics`](crate::cluster::Cluster::encode_metrics)),
//! and the workload gauges are set by each controller pass, so a scrape never touches the store.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// The control plane's metrics. Cheap to clone; every handle shares one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    nodes: Family<Labels, Gauge>,
    sessions: Gauge,
    workloads: Gauge,
    replicas: Family<Labels, Gauge>,
    passes: Counter,
    reconciles: Counter,
    pass_duration: Histogram,
    status_writes: Counter,
    reconcile_errors: Family<Labels, Counter>,
    heartbeats: Counter,
    log_streams: Counter,
    agent_refusals: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flotilla_control_plane");
        let nodes = Family::<Labels, Gauge>::default();
        registry.register("nodes", "Registered nodes by readiness", nodes.clone());
        let sessions = Gauge::default();
        registry.register("agent_sessions", "Open agent sessions", sessions.clone());
        let workloads = Gauge::default();
        registry.register("workloads", "WasmWorkload objects", workloads.clone());
        let replicas = Family::<Labels, Gauge>::default();
        registry.register(
            "replicas",
            "Replicas over all workloads: desired, placed, ready",
            replicas.clone(),
        );
        let passes = Counter::default();
        registry.register("reconcile_passes", "Controller passes", passes.clone());
        let reconciles = Counter::default();
        registry.register(
            "reconciles",
            "Workloads reconciled, over every pass",
            reconciles.clone(),
        );
        let pass_duration = Histogram::new(exponential_buckets(1e-5, 2.0, 22));
        registry.register(
            "reconcile_duration_seconds",
            "Time of one controller pass (the workloads it reconciles, over a snapshot of all)",
            pass_duration.clone(),
        );
        let status_writes = Counter::default();
        registry.register(
            "status_writes",
            "Workload statuses written by the controller",
            status_writes.clone(),
        );
        let reconcile_errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Workloads whose reconcile failed, by reason (Store, Schedule, Panicked)",
            reconcile_errors.clone(),
        );
        let heartbeats = Counter::default();
        registry.register(
            "heartbeats",
            "Agent heartbeats received",
            heartbeats.clone(),
        );
        let log_streams = Counter::default();
        registry.register(
            "log_streams",
            "Log streams relayed from agents to users",
            log_streams.clone(),
        );
        let agent_refusals = Family::<Labels, Counter>::default();
        registry.register(
            "agent_refusals",
            "What agents sent that was refused, by reason: registrations with another node's \
             credential (CredentialMismatch) or a malformed one (CredentialMalformed), reports \
             of workloads not placed on the node (UnplacedWorkload) or of more sandboxes than \
             placed (OverPlacement), and fetches of modules no workload on the node runs \
             (UnplacedModule)",
            agent_refusals.clone(),
        );
        Self {
            registry: Arc::new(registry),
            nodes,
            sessions,
            workloads,
            replicas,
            passes,
            reconciles,
            pass_duration,
            status_writes,
            reconcile_errors,
            heartbeats,
            log_streams,
            agent_refusals,
        }
    }

    /// Records a controller pass that reconciled `reconciled` workloads and wrote `written`
    /// statuses.
    pub fn pass(&self, took: Duration, reconciled: usize, written: usize) {
        self.passes.inc();
        self.reconciles.inc_by(reconciled as u64);
        self.pass_duration.observe(took.as_secs_f64());
        self.status_writes.inc_by(written as u64);
    }

    /// Counts a workload whose reconcile failed with `reason`.
    pub fn reconcile_error(&self, reason: &'static str) {
        self.reconcile_errors
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Sets the workload gauges, as of the latest pass.
    pub fn workloads(&self, workloads: usize, desired: u64, placed: u64, ready: u64) {
        self.workloads.set(workloads as i64);
        for (state, value) in [("desired", desired), ("placed", placed), ("ready", ready)] {
            self.replicas
                .get_or_create(&vec![("state", state)])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// Counts an agent heartbeat.
    pub fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    /// Counts something an agent sent that was refused, by `reason`.
    pub fn agent_refusal(&self, reason: &'static str) {
        self.agent_refusals
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts a log stream opened for a user.
    pub fn log_stream(&self) {
        self.log_streams.inc();
    }

    /// The metrics in Prometheus text format, with the gauges read at the scrape: nodes `ready`
    /// and `not_ready`, and the agent `sessions` open.
    pub fn encode(&self, ready: usize, not_ready: usize, sessions: usize) -> String {
        self.nodes
            .get_or_create(&vec![("state", "ready")])
            .set(ready as i64);
        self.nodes
            .get_or_create(&vec![("state", "not_ready")])
            .set(not_ready as i64);
        self.sessions.set(sessions as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
