//! A real cluster on loopback: the control-plane binary, three node-agent binaries and the
//! `flotilla` CLI, each its own process.
//!
//! One workload of 300 replicas reaches Ready across the three agents; an agent claiming a live
//! node's name is refused; SIGKILLing an agent moves its replicas to the others; restarting the
//! control plane loses nothing and restarts no sandbox.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_tests::{Process, logged_addr, workspace_binary};
use serde_json::Value;

/// How long a test waits for the cluster to reach a state.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

struct ControlPlane {
    process: Process,
    addr: SocketAddr,
}

impl ControlPlane {
    fn start(data_dir: &Path, listen: &str) -> Self {
        let mut command = Command::new(workspace_binary("flotilla-control-plane"));
        command
            .args(["--listen", listen, "--shutdown-grace", "1s"])
            .args(["--node-heartbeat-timeout", "3s"])
            .args(["--node-startup-grace", "3s"])
            .arg("--data-dir")
            .arg(data_dir);
        let process = Process::spawn(command, "control-plane");
        let addr = logged_addr(&process.wait_line("serving"), "addr");
        Self { process, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn stop(mut self) {
        self.process.signal(libc::SIGTERM);
        let status = self.process.wait();
        assert!(status.success(), "control plane exit: {status:?}");
    }
}

struct Agent {
    process: Process,
    admin: SocketAddr,
}

impl Agent {
    fn start(control_plane: &str, node: &'static str) -> Self {
        let mut command = Command::new(workspace_binary("flotilla-node-agent"));
        command
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--control-plane", control_plane, "--node-name", node])
            .args(["--max-sandboxes", "1000", "--no-cache"])
            .args(["--shutdown-grace", "1s"]);
        let process = Process::spawn(command, node);
        let admin = logged_addr(&process.wait_line("serving"), "admin_addr");
        Self { process, admin }
    }

    /// Running sandboxes: id → start time. Equal snapshots mean nothing was restarted.
    fn running(&self) -> BTreeMap<String, i64> {
        let json = flotilla(&[
            "--agent",
            &self.admin.to_string(),
            "get",
            "sandboxes",
            "-o",
            "json",
        ]);
        let sandboxes: Vec<Value> = serde_json::from_str(&json).expect("sandboxes as JSON");
        sandboxes
            .iter()
            .filter(|s| s["phase"] == "Running")
            .map(|s| {
                (
                    s["sandboxId"].as_str().expect("sandboxId").to_string(),
                    s["startedAtMs"].as_i64().expect("startedAtMs"),
                )
            })
            .collect()
    }
}

/// Runs the CLI; returns its stdout, failing the test on a non-zero exit.
fn flotilla(args: &[&str]) -> String {
    let output = Command::new(workspace_binary("flotilla"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("flotilla runs");
    assert!(
        output.status.success(),
        "flotilla {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// Polls `get workload NAME -o json` until `done` holds, and returns that object.
fn wait_for(server: &str, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let object: Value = serde_json::from_str(&flotilla(&[
            "--server",
            server,
            "get",
            "workloads",
            name,
            "-o",
            "json",
        ]))
        .expect("workload as JSON");
        if done(&object) {
            return object;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached; last status: {}",
            object["status"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn placements(object: &Value) -> BTreeMap<String, u64> {
    object["status"]["placements"]
        .as_object()
        .map(|p| {
            p.iter()
                .map(|(node, n)| (node.clone(), n.as_u64().expect("count")))
                .collect()
        })
        .unwrap_or_default()
}

fn ready(object: &Value) -> u64 {
    object["status"]["readyReplicas"].as_u64().unwrap_or(0)
}

#[test]
fn three_agents_run_300_replicas_through_an_agent_kill_and_a_control_plane_restart() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let agents = [
        Agent::start(&url, "node-1"),
        Agent::start(&url, "node-2"),
        Agent::start(&url, "node-3"),
    ];
    for agent in &agents {
        agent.process.wait_line("connected to the control plane");
    }

    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests/idle.wasm");
    let manifest = data.path().join("idle.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: idle\n\
             spec:\n  module:\n    path: {}\n  replicas: 300\n  resources:\n    requests:\n      \
             memory: 64Ki\n    limits:\n      memory: 1Mi\n",
            guest.display()
        ),
    )
    .expect("write manifest");
    let applied = flotilla(&["--server", &url, "apply", "-f", &manifest.to_string_lossy()]);
    assert!(
        applied.contains("wasmworkload.flotilla.dev/idle applied"),
        "{applied}"
    );

    let object = wait_for(&url, "idle", "300 ready replicas on three nodes", |o| {
        ready(o) == 300 && placements(o).len() == 3
    });
    let expected: BTreeMap<String, u64> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| (n.to_string(), 100))
        .collect();
    assert_eq!(placements(&object), expected, "replicas spread evenly");
    for agent in &agents {
        assert_eq!(agent.running().len(), 100);
    }

    // An agent claiming a live node's name is refused and changes nothing.
    let before = agents[0].running();
    let impostor = Agent::start(&url, "node-1");
    impostor
        .process
        .wait_line("node node-1 is held by another live agent");
    drop(impostor);
    assert_eq!(agents[0].running(), before);

    // SIGKILL node-2: its replicas move to node-1 and node-3; theirs stay where they are.
    let [node_1, mut node_2, node_3] = agents;
    let (before_1, before_3) = (node_1.running(), node_3.running());
    node_2.process.signal(libc::SIGKILL);
    node_2.process.wait();
    let object = wait_for(&url, "idle", "node-2's replicas moved", |o| {
        !placements(o).contains_key("node-2") && ready(o) == 300
    });
    assert_eq!(placements(&object).values().sum::<u64>(), 300);
    let (after_1, after_3) = (node_1.running(), node_3.running());
    assert_eq!(after_1.len() + after_3.len(), 300);
    for (before, after) in [(&before_1, &after_1), (&before_3, &after_3)] {
        assert!(
            before
                .iter()
                .all(|(id, started)| after.get(id) == Some(started)),
            "surviving sandboxes were not restarted"
        );
    }

    // Restart the control plane on the same address: nothing is lost and nothing restarts.
    let listen = control_plane.addr.to_string();
    control_plane.stop();
    let control_plane = ControlPlane::start(data.path(), &listen);
    for agent in [&node_1, &node_3] {
        agent.process.wait_line("connected to the control plane");
    }
    control_plane.process.wait_line("startup grace over");
    let object = wait_for(&url, "idle", "300 ready after the restart", |o| {
        ready(o) == 300
    });
    assert_eq!(placements(&object).values().sum::<u64>(), 300);
    assert_eq!(node_1.running(), after_1, "node-1 restarted nothing");
    assert_eq!(node_3.running(), after_3, "node-3 restarted nothing");
}
