//! Prometheus metrics of the node agent, served at `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use flotilla_proto::agent::v1::SandboxPhase;

type Labels = Vec<(&'static str, &'static str)>;

/// The agent's metrics. Cheap to clone; every handle shares one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    phases: [Gauge; 5],
    starts: Counter,
    start_latency: Histogram,
    exits: Family<Labels, Counter>,
    /// Exact start latencies in nanoseconds, kept only when a benchmark asks for them.
    latency_samples: Option<Arc<Mutex<Vec<u32>>>>,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new() -> Self {
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
        Self {
            registry: Arc::new(registry),
            phases,
            starts,
            start_latency,
            exits,
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

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
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
