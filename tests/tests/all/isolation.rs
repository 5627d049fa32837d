//! One agent, a tenant that compiles a costly module and spins, and a neighbour that only wants
//! to run: the node stays Ready, the neighbour starts, and the spinners share the CPU by their
//! requests.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Agent, ControlPlane, flotilla, ready, wait_for};

/// Functions of the generated module: seconds of Cranelift work for the agent's compile pool.
const COSTLY_FUNCTIONS: usize = 50_000;
/// The two spinning workloads and their replicas' `requests.cpu`.
const SPLIT: [(&str, u64); 2] = [("light", 100), ("heavy", 300)];
/// How long a neighbour whose module is small may take to run, compile included, on a slow CI
/// machine with debug binaries: a stalled agent takes far longer (a compile-bound agent took
/// 17.8 s for a hello workload before the compile pool).
const NEIGHBOUR_BOUND: Duration = Duration::from_secs(15);

#[test]
fn a_noisy_tenant_neither_stalls_the_node_nor_takes_more_than_its_cpu_share() {
    // The shares are measured on a machine whose CPUs no emulator is taking.
    let _cpus = crate::support::cpu_bound_test();
    let data = tempfile::tempdir().expect("tempdir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    // One guest thread: the four spinners contend for it whatever the machine.
    let agent = Agent::start_with(&url, "node-1", |c| {
        c.args(["--guest-threads", "1", "--compile-timeout", "60s"]);
    });
    agent.process.wait_line("connected to the control plane");
    let admin = agent.admin.to_string();

    let sampler = ReadinessSampler::start(&url);
    let spin = write_module(data.path(), "spin.wasm", &spin_module());
    for (name, millicores) in SPLIT {
        apply(
            data.path(),
            &url,
            &format!(
                "metadata: {{name: {name}}}\nspec: {{module: {{path: {spin}}}, replicas: 2, \
                 resources: {{requests: {{cpu: {millicores}m}}}}}}\n"
            ),
        );
    }
    for (name, _) in SPLIT {
        wait_for(&url, name, "2 spinners running", |o| ready(o) == 2);
    }
    let costly = write_module(data.path(), "costly.wasm", &costly_module());
    apply(
        data.path(),
        &url,
        &format!("metadata: {{name: costly}}\nspec: {{module: {{path: {costly}}}}}\n"),
    );
    // The neighbour, applied while the costly module compiles and the spinners spin.
    std::thread::sleep(Duration::from_millis(500));
    let idle = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests/idle.wasm");
    let applied = Instant::now();
    apply(
        data.path(),
        &url,
        &format!(
            "metadata: {{name: neighbour}}\nspec: {{module: {{path: {}}}}}\n",
            idle.display()
        ),
    );
    wait_for(&url, "neighbour", "the neighbour running", |o| {
        ready(o) == 1
    });
    let took = applied.elapsed();
    assert!(
        took < NEIGHBOUR_BOUND,
        "the neighbour took {took:?} to run beside the noisy tenant"
    );

    // Shares: CPU used over a window by each workload's two sandboxes.
    let before = cpu_by_workload(&admin);
    std::thread::sleep(Duration::from_secs(4));
    let after = cpu_by_workload(&admin);
    let used = |name: &str| {
        let at = |snapshot: &std::collections::BTreeMap<String, u64>| {
            snapshot.get(name).copied().unwrap_or(0)
        };
        at(&after).saturating_sub(at(&before))
    };
    let (light, heavy) = (used("light"), used("heavy"));
    // 200 slices of 2 ms at least: one slice more or less moves the split by under 1%.
    assert!(
        heavy >= 400,
        "the spinners hardly ran: {before:?} → {after:?}"
    );
    let ratio = light as f64 / heavy as f64;
    assert!(
        (ratio * 3.0 - 1.0).abs() <= 0.1,
        "light used {light} ms and heavy {heavy} ms: {ratio:.3} instead of 1:3 within 10%"
    );

    // The same CPU in `describe sandbox` and in the agent's metrics.
    let sandboxes: Vec<Value> = serde_json::from_str(&flotilla(&[
        "--agent",
        &admin,
        "get",
        "sandboxes",
        "-o",
        "json",
    ]))
    .expect("sandboxes as JSON");
    let heavy_id = sandboxes
        .iter()
        .filter(|s| {
            s["workload"]
                .as_str()
                .is_some_and(|w| w.contains(".heavy-"))
        })
        .find_map(|s| s["sandboxId"].as_str())
        .expect("a heavy sandbox");
    let described = flotilla(&["--agent", &admin, "describe", "sandbox", heavy_id]);
    assert!(described.contains("Phase:          Running"), "{described}");
    let cpu_line = described
        .lines()
        .find(|l| l.starts_with("CPU used:"))
        .unwrap_or_else(|| panic!("no CPU line in {described}"));
    assert!(cpu_line.ends_with('s'), "{cpu_line}");
    let metrics = agent.metrics();
    let heavy_seconds: f64 = metrics
        .lines()
        .find(|l| l.starts_with("flotilla_workload_cpu_seconds_total{") && l.contains("heavy"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no CPU counter for heavy in {metrics}"));
    assert!(
        heavy_seconds * 1000.0 >= used("heavy") as f64,
        "the counter ({heavy_seconds} s) holds at least the window's {heavy} ms"
    );
    assert!(
        metrics.contains("flotilla_cpu_run_queue_waiting "),
        "{metrics}"
    );

    let not_ready = sampler.stop();
    assert!(
        not_ready.is_empty(),
        "the node was not ready at {not_ready:?} into the test"
    );
}

/// Polls the node's readiness every 250 ms on a thread of its own until stopped.
struct ReadinessSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Duration>>,
}

impl ReadinessSampler {
    fn start(url: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let url = url.to_string();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut not_ready = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                let node: Value = serde_json::from_str(&flotilla(&[
                    "--server", &url, "get", "nodes", "node-1", "-o", "json",
                ]))
                .expect("node as JSON");
                if node["ready"] != true {
                    not_ready.push(started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            not_ready
        });
        Self { stop, thread }
    }

    /// Stops sampling; returns when the node was seen not ready.
    fn stop(self) -> Vec<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler panicked")
    }
}

/// Applies a WasmWorkload whose `metadata` and `spec` are `body`.
fn apply(dir: &Path, url: &str, body: &str) {
    let manifest = dir.join("workload.yaml");
    std::fs::write(
        &manifest,
        format!("apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\n{body}"),
    )
    .expect("write manifest");
    flotilla(&["--server", url, "apply", "-f", &manifest.to_string_lossy()]);
}

fn write_module(dir: &Path, name: &str, wasm: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, wasm).expect("write module");
    path.to_string_lossy().into_owned()
}

/// A command that spins without end.
fn spin_module() -> Vec<u8> {
    wat::parse_str(include_str!("../../../node-agent/tests/fixtures/spin.wat")).expect("spin.wat")
}

/// A command of [`COSTLY_FUNCTIONS`] small functions that exits at once.
fn costly_module() -> Vec<u8> {
    let mut wat = String::with_capacity(COSTLY_FUNCTIONS * 64);
    wat.push_str("(module (memory (export \"memory\") 1)");
    for i in 0..COSTLY_FUNCTIONS {
        wat.push_str(&format!(
            "(func (param i32) (result i32) local.get 0 i32.const {i} i32.mul)"
        ));
    }
    wat.push_str("(func (export \"_start\")))");
    wat::parse_str(&wat).expect("generated module")
}

/// CPU used by each workload's sandboxes on the agent whose admin API is at `admin`, in ms.
fn cpu_by_workload(admin: &str) -> std::collections::BTreeMap<String, u64> {
    let sandboxes: Vec<Value> = serde_json::from_str(&flotilla(&[
        "--agent",
        admin,
        "get",
        "sandboxes",
        "-o",
        "json",
    ]))
    .expect("sandboxes as JSON");
    let mut used = std::collections::BTreeMap::new();
    for sandbox in sandboxes {
        // The agent keys workloads `<namespace>.<name>-<spec hash>`.
        let key = sandbox["workload"].as_str().expect("workload");
        let name = key.split_once('.').map_or(key, |(_, rest)| rest);
        let name = name.rsplit_once('-').map_or(name, |(name, _)| name);
        *used.entry(name.to_string()).or_default() +=
            sandbox["cpuUsedMs"].as_u64().expect("cpuUsedMs");
    }
    used
}
