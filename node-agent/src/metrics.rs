//! Prometheus metrics of the node agent, served at `/metrics`.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use flotilla_proto::agent::v1::SandboxPhase;

type Labels = Vec<(&'static str, &'static str)>;
/// Labels that carry values known only at run time: a workload's name, a status code.
type WorkloadLabels = Vec<(&'static str, String)>;

/// The agent's metrics. Cheap to clone; every handle shares one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    phases: [Gauge; 5],
    starts: Counter,
    start_latency: Histogram,
    exits: Family<Labels, Counter>,
    http: HttpMetrics,
    scraped: Scraped,
    /// Exact start latencies in nanoseconds, kept only when a benchmark asks for them.
    latency_samples: Option<Arc<Mutex<Vec<u32>>>>,
}

impl Metrics {
    /// Creates the metrics and registers them, with HTTP metrics of their own.
    pub fn new() -> Self {
        Self::with_http(HttpMetrics::default())
    }

    /// Creates the metrics and registers them, with `http` (the runtime's) among them.
    pub fn with_http(http: HttpMetrics) -> Self {
        let mut registry = Registry::with_prefix("flotilla");
        let sandboxes = Family::<Labels, Gauge>::default();
        registry.register(
            "sandboxes",
            "Sandboxes on this agent by phase",
            sandboxes.clone(),
        );
        let phases = [
            SandboxPhase::Unspecified,
            SandboxPhase::Pending,
            SandboxPhase::Running,
            SandboxPhase::Succeeded,
            SandboxPhase::Failed,
        ]
        .map(|p| {
            sandboxes
                .get_or_create(&vec![("phase", phase_label(p))])
                .clone()
        });
        let starts = Counter::default();
        registry.register("sandbox_starts", "Sandbox runs started", starts.clone());
        let start_latency = Histogram::new(exponential_buckets(1e-6, 2.0, 24));
        registry.register(
            "sandbox_start_latency_seconds",
            "Time from a sandbox run beginning (fresh store, instantiation) to its guest running",
            start_latency.clone(),
        );
        let exits = Family::<Labels, Counter>::default();
        registry.register(
            "sandbox_exits",
            "Sandbox runs ended, by reason (Completed, Error, Trap, OutOfMemory, CpuLimit, ...)",
            exits.clone(),
        );
        http.register(&mut registry);
        let scraped = Scraped::default();
        registry.register_collector(Box::new(scraped.clone()));
        Self {
            registry: Arc::new(registry),
            phases,
            starts,
            start_latency,
            exits,
            http,
            scraped,
            latency_samples: None,
        }
    }

    /// Also keeps every start latency exactly, for benchmarks; see [`Self::take_latency_samples`].
    #[must_use]
    pub fn with_latency_samples(mut self, capacity: usize) -> Self {
        self.latency_samples = Some(Arc::new(Mutex::new(Vec::with_capacity(capacity))));
        self
    }

    /// Takes the start latencies recorded so far, in nanoseconds.
    pub fn take_latency_samples(&self) -> Vec<u32> {
        self.latency_samples
            .as_ref()
            .map_or_else(Vec::new, |samples| {
                std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()))
            })
    }

    /// Records a sandbox run that reached its guest after `latency`.
    pub fn started(&self, latency: Duration) {
        self.starts.inc();
        self.start_latency.observe(latency.as_secs_f64());
        if let Some(samples) = &self.latency_samples {
            let nanos = u32::try_from(latency.as_nanos()).unwrap_or(u32::MAX);
            samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(nanos);
        }
    }

    /// Sandbox runs started so far.
    pub fn starts(&self) -> u64 {
        self.starts.get()
    }

    /// Moves one sandbox from phase `from` to phase `to` (`None` for entering or leaving).
    pub fn transition(&self, from: Option<SandboxPhase>, to: Option<SandboxPhase>) {
        if from == to {
            return;
        }
        if let Some(from) = from {
            self.phases[from as usize].dec();
        }
        if let Some(to) = to {
            self.phases[to as usize].inc();
        }
    }

    /// Sandboxes currently in `phase`.
    pub fn in_phase(&self, phase: SandboxPhase) -> i64 {
        self.phases[phase as usize].get()
    }

    /// Counts a run that ended for `reason`.
    pub fn exit(&self, reason: &'static str) {
        self.exits.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// Reads the [`Live`] figures from `source` at every scrape; the first source set stays.
    pub fn read_live(&self, source: impl Fn() -> Live + Send + Sync + 'static) {
        let _ = self.scraped.0.set(Box::new(source));
    }

    /// The HTTP workloads' metrics.
    pub fn http(&self) -> &HttpMetrics {
        &self.http
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Figures read from the agent's state at each scrape rather than counted as they change: CPU
/// is charged on every slice of every sandbox, too often for a counter per workload.
#[derive(Debug, Default)]
pub struct Live {
    /// CPU used per workload (as the agent names it), in milliseconds, over its life.
    pub cpu_by_workload: Vec<(String, u64)>,
    /// Sandboxes waiting for a CPU slot.
    pub cpu_waiting: usize,
    /// Modules compiling.
    pub compiles_running: usize,
    /// Modules waiting for a compile slot.
    pub compiles_waiting: usize,
}

type LiveSource = Box<dyn Fn() -> Live + Send + Sync>;

/// The collector of [`Live`] figures, once a source is set.
#[derive(Clone, Default)]
struct Scraped(Arc<OnceLock<LiveSource>>);

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraped").finish_non_exhaustive()
    }
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(source) = self.0.get() else {
            return Ok(());
        };
        let live = source();
        let mut cpu = encoder.encode_descriptor(
            "workload_cpu_seconds",
            "CPU used by each workload's sandboxes, counted in epoch ticks",
            None,
            MetricType::Counter,
        )?;
        for (workload, millis) in &live.cpu_by_workload {
            let labels = [("workload", workload.as_str())];
            ConstCounter::new(*millis as f64 / 1e3).encode(cpu.encode_family(&labels)?)?;
        }
        for (name, help, value) in [
            (
                "cpu_run_queue_waiting",
                "Sandboxes waiting for a CPU slot",
                live.cpu_waiting,
            ),
            (
                "compiles_running",
                "Modules compiling",
                live.compiles_running,
            ),
            (
                "compiles_waiting",
                "Modules waiting for a compile slot",
                live.compiles_waiting,
            ),
        ] {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-workload metrics of HTTP workloads, labelled `workload="namespace/name"` as the agent
/// names it. Cheap to clone.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<WorkloadLabels, Counter>,
    duration: Family<WorkloadLabels, Histogram>,
    failures: Family<WorkloadLabels, Counter>,
    instances: Family<WorkloadLabels, Gauge>,
    forwarded: Family<WorkloadLabels, Counter>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(25e-6, 2.0, 20))
            }),
            failures: Family::default(),
            instances: Family::default(),
            forwarded: Family::default(),
        }
    }
}

impl HttpMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_requests",
            "HTTP requests answered, by workload and status code",
            self.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response headers, by workload",
            self.duration.clone(),
        );
        registry.register(
            "http_request_failures",
            "Requests whose sandbox failed, by workload and reason (Trap, OutOfMemory, CpuLimit, \
             DeadlineExceeded)",
            self.failures.clone(),
        );
        registry.register(
            "http_forwarded_requests",
            "Requests passed on to another node's ingress, by workload",
            self.forwarded.clone(),
        );
        registry.register(
            "http_instances",
            "Per-request sandboxes alive, by workload",
            self.instances.clone(),
        );
    }

    /// Counts a request for `workload` passed on to another node.
    pub fn forwarded(&self, workload: &str) {
        self.forwarded
            .get_or_create(&vec![("workload", workload.to_string())])
            .inc();
    }

    /// The handles of one workload, to update without a label lookup per request.
    pub fn workload(&self, workload: &str) -> WorkloadHttpMetrics {
        let labels = vec![("workload", workload.to_string())];
        WorkloadHttpMetrics {
            workload: workload.into(),
            requests: self.requests.clone(),
            ok: self
                .requests
                .get_or_create(&status_labels(workload, 200))
                .clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            failures: self.failures.clone(),
            instances: self.instances.get_or_create(&labels).clone(),
        }
    }
}

/// One HTTP workload's metric handles.
#[derive(Clone)]
pub struct WorkloadHttpMetrics {
    workload: Arc<str>,
    requests: Family<WorkloadLabels, Counter>,
    ok: Counter,
    duration: Histogram,
    failures: Family<WorkloadLabels, Counter>,
    instances: Gauge,
}

impl WorkloadHttpMetrics {
    /// Records a response with `status`, `elapsed` after the request arrived.
    pub fn responded(&self, status: u16, elapsed: Duration) {
        if status == 200 {
            self.ok.inc();
        } else {
            self.requests
                .get_or_create(&status_labels(&self.workload, status))
                .inc();
        }
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Records a request whose sandbox ended for `reason`.
    pub fn failed(&self, reason: &'static str) {
        self.failures
            .get_or_create(&vec![
                ("workload", self.workload.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    /// The gauge of live per-request sandboxes.
    pub fn instances(&self) -> &Gauge {
        &self.instances
    }
}

fn status_labels(workload: &str, status: u16) -> WorkloadLabels {
    vec![
        ("workload", workload.to_string()),
        ("code", status.to_string()),
    ]
}

fn phase_label(phase: SandboxPhase) -> &'static str {
    match phase {
        SandboxPhase::Unspecified => "Unknown",
        SandboxPhase::Pending => "Pending",
        SandboxPhase::Running => "Running",
        SandboxPhase::Succeeded => "Succeeded",
        SandboxPhase::Failed => "Failed",
    }
}
