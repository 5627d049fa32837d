//! Rolling updates across real processes: a control plane, two node agents and the CLI. The
//! running sandboxes are sampled from the agents themselves throughout each update.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use support::{Agent, ControlPlane, example, flotilla, running_sandboxes, try_flotilla, wait_for};

use crate::support;

/// Writes the manifest of `idle`: 100 replicas of `guest` with `args`, updated at most 10%
/// above and 10% below the count, each sandbox available after `min_ready_seconds`.
fn manifest(dir: &std::path::Path, guest: &str, args: &str, min_ready_seconds: u32) -> String {
    let path = dir.join(format!("idle-{args}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: idle\n\
             spec:\n  module:\n    path: {guest}\n  args: [{args}]\n  replicas: 100\n  \
             minReadySeconds: {min_ready_seconds}\n  progressDeadlineSeconds: 4\n  strategy:\n    \
             rollingUpdate:\n      maxSurge: 10%\n      maxUnavailable: 10%\n"
        ),
    )
    .expect("write manifest");
    path.to_string_lossy().into_owned()
}

/// Running sandboxes on the agents, by agent workload name (one per revision).
fn running_by_revision(agents: &[&Agent]) -> BTreeMap<String, Vec<(String, i64)>> {
    let mut out: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    for s in agents
        .iter()
        .flat_map(|agent| running_sandboxes(agent.admin))
    {
        out.entry(s["workload"].as_str().expect("workload").to_string())
            .or_default()
            .push((
                s["sandboxId"].as_str().expect("sandboxId").to_string(),
                s["startedAtMs"].as_i64().expect("startedAtMs"),
            ));
    }
    out
}

/// Samples the running sandboxes on both agents until stopped; returns every sample's total.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<usize>>,
}

impl Sampler {
    fn start(admins: [std::net::SocketAddr; 2]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let total: usize = admins.iter().map(|a| running_sandboxes(*a).len()).sum();
                samples.push(total);
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        Self { stop, thread }
    }

    fn finish(self) -> Vec<usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler")
    }
}

#[test]
fn a_rolling_update_keeps_90_of_100_running_stops_on_a_crashing_revision_and_rolls_back() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let node_a = Agent::start(&url, "node-a");
    let node_b = Agent::start(&url, "node-b");
    for agent in [&node_a, &node_b] {
        agent.process.wait_line("connected to the control plane");
    }
    let idle = example("guests/idle.wasm");
    let crash = example("guests/crash.wasm");
    let apply = |path: &str| flotilla(&["--server", &url, "apply", "-f", path]);
    let rollout_status = || {
        try_flotilla(&[
            "--server",
            &url,
            "rollout",
            "status",
            "idle",
            "--timeout",
            "60s",
        ])
    };

    let out = flotilla(&[
        "--server",
        &url,
        "apply",
        "--wait",
        "-f",
        &manifest(data.path(), &idle, "v1", 0),
    ]);
    assert!(out.contains("idle: 100/100 ready"), "{out}");

    // v2: every replica replaced, never fewer than 90 running.
    let sampler = Sampler::start([node_a.admin, node_b.admin]);
    apply(&manifest(data.path(), &idle, "v2", 0));
    let (ok, out, err) = rollout_status();
    let samples = sampler.finish();
    assert!(ok, "{out}{err}");
    assert!(out.contains("revision 2 rolled out"), "{out}");
    let low = samples.iter().min().copied().unwrap_or(0);
    assert!(
        low >= 90,
        "{low} running at the lowest; samples {samples:?}"
    );
    assert!(samples.len() >= 3, "sampled throughout: {samples:?}");
    let revisions = running_by_revision(&[&node_a, &node_b]);
    assert_eq!(
        revisions.len(),
        1,
        "only the new revision runs: {revisions:?}"
    );
    let (v2_name, v2_sandboxes) = revisions.into_iter().next().expect("one revision");
    assert_eq!(v2_sandboxes.len(), 100);
    let object = wait_for(&url, "idle", "revision 2 everywhere", |o| {
        o["status"]["updatedReplicas"] == 100 && o["status"]["replicas"] == 100
    });
    assert_eq!(object["status"]["revision"], 2);

    // v3 crashes: the update stops at its first step and v2 keeps serving.
    let sampler = Sampler::start([node_a.admin, node_b.admin]);
    // With minReadySeconds 0, a crashing sandbox caught running between its start and its trap
    // counts as available (as a Pod Ready for an instant does for a Deployment), and one more
    // v2 sandbox may go; a second of readiness keeps it from counting.
    apply(&manifest(data.path(), &crash, "v3", 1));
    let (ok, out, err) = rollout_status();
    assert!(!ok, "the update must fail: {out}");
    assert!(err.contains("ProgressDeadlineExceeded"), "{err}");
    let samples = sampler.finish();
    let low = samples.iter().min().copied().unwrap_or(0);
    assert!(
        low >= 90,
        "{low} running at the lowest; samples {samples:?}"
    );
    let revisions = running_by_revision(&[&node_a, &node_b]);
    let v2_left = revisions.get(&v2_name).map_or(0, Vec::len);
    assert_eq!(
        v2_left, 90,
        "maxUnavailable of v2 went, no more: {revisions:?}"
    );
    let object = wait_for(&url, "idle", "the deadline", |o| {
        o["status"]["revision"] == 3
    });
    let described = flotilla(&["--server", &url, "describe", "workload", "idle"]);
    assert!(
        described.contains("ProgressDeadlineExceeded"),
        "{described}"
    );
    assert!(
        described.contains("Trap"),
        "the crash is shown: {described}"
    );
    let updated = object["status"]["updatedReplicas"]
        .as_u64()
        .unwrap_or_else(|| panic!("no updatedReplicas in {}", object["status"]));
    assert!(updated <= 20, "{updated} updated replicas past maxSurge");

    // Undo: revision 2's template comes back as revision 4, its sandboxes untouched.
    let out = flotilla(&["--server", &url, "rollout", "undo", "idle"]);
    assert!(out.contains("rolled back to revision 2"), "{out}");
    let (ok, out, err) = rollout_status();
    assert!(ok, "{out}{err}");
    assert!(out.contains("revision 4 rolled out"), "{out}");
    let revisions = running_by_revision(&[&node_a, &node_b]);
    assert_eq!(revisions.keys().collect::<Vec<_>>(), [&v2_name]);
    let kept: Vec<&(String, i64)> = revisions[&v2_name]
        .iter()
        .filter(|s| v2_sandboxes.contains(s))
        .collect();
    assert_eq!(kept.len(), 90, "the 90 v2 sandboxes were not restarted");
    let history = flotilla(&["--server", &url, "rollout", "history", "idle"]);
    assert!(history.contains("args [v2] (current)"), "{history}");
    assert!(history.contains("args [v3]"), "{history}");
    assert!(history.contains("args [v1]"), "{history}");
}
