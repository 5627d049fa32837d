//! A real cluster on loopback: the control-plane binary, three node-agent binaries and the
//! `flotilla` CLI, each its own process.
//!
//! One workload of 300 replicas reaches Ready across the three agents; an agent claiming a live
//! node's name is refused; SIGKILLing an agent moves its replicas to the others; restarting the
//! control plane loses nothing and restarts no sandbox. Bad manifests get the error the user
//! needs and change nothing; the CLI waits, relays logs, describes and scales.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use support::{
    Agent, ControlPlane, example, flotilla, placements, ready, serve_http, sha256_hex,
    try_flotilla, wait_for,
};

use crate::support;

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
    let metrics = control_plane.metrics();
    for line in [
        "flotilla_control_plane_nodes{state=\"ready\"} 3",
        "flotilla_control_plane_agent_sessions 3",
        "flotilla_control_plane_workloads 1",
        "flotilla_control_plane_replicas{state=\"desired\"} 300",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in {metrics}"
        );
    }

    // An agent without the join token cannot register a node.
    let stranger = Agent::start_with_token(&url, "node-4", "not-the-token");
    stranger.process.wait_line("invalid join token");
    drop(stranger);

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

    // Another agent installation (its own credential) cannot take node-2's name while its
    // agent is away, join token or not...
    let elsewhere = data.path().join("another-installation");
    let taker = Agent::start_with(&url, "node-2", |c| {
        c.env("FLOTILLA_STATE_DIR", &elsewhere);
    });
    taker
        .process
        .wait_line("node node-2 is bound to another agent's credential");
    assert!(
        control_plane
            .metrics()
            .contains("flotilla_control_plane_agent_refusals_total{reason=\"CredentialMismatch\"}"),
        "the refusal is counted"
    );
    // ... until an operator deletes the node, which releases the name.
    let deleted = flotilla(&["--server", &url, "delete", "node", "node-2"]);
    assert!(deleted.contains("node/node-2 deleted"), "{deleted}");
    taker.process.wait_line("connected to the control plane");
    drop(taker);
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

#[test]
fn the_cli_waits_for_readiness_shows_failures_relays_logs_and_scales() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let agent = Agent::start_connected(&url, "solo");

    // apply --wait returns once the run-to-completion workload has completed.
    let out = flotilla(&[
        "--server",
        &url,
        "apply",
        "--wait",
        "-f",
        &example("hello.yaml"),
    ]);
    assert!(out.contains("hello: 0/2 ready, 2 completed"), "{out}");

    // Logs come from the agent through the control plane.
    let logs = flotilla(&["--server", &url, "logs", "hello", "--replica", "1"]);
    assert_eq!(logs, "hello from flotilla\n");
    let (ok, _, stderr) = try_flotilla(&["--server", &url, "logs", "hello", "--replica", "9"]);
    assert!(!ok);
    assert!(stderr.contains("replica 9 does not exist"), "{stderr}");

    // A failing workload: --wait gives up with the reason, describe shows the events.
    let (ok, stdout, stderr) = try_flotilla(&[
        "--server",
        &url,
        "apply",
        "--wait",
        "--timeout",
        "4s",
        "-f",
        &example("crashloop.yaml"),
    ]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("timed out after 4s"), "{stderr}");
    assert!(stdout.contains("(Trap: "), "{stdout}");
    let described = flotilla(&["--server", &url, "describe", "workload", "crashloop"]);
    assert!(described.contains("Ready      False   Trap"), "{described}");
    assert!(described.contains("solo"), "{described}");
    assert!(described.contains("integer divide by zero"), "{described}");

    // Nodes, and scaling that restarts nothing.
    let nodes: Value = serde_json::from_str(&flotilla(&[
        "--server", &url, "get", "nodes", "solo", "-o", "json",
    ]))
    .expect("node as JSON");
    assert_eq!(nodes["ready"], true);
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    assert_eq!(nodes["labels"]["kubernetes.io/arch"], arch);
    let out = flotilla(&[
        "--server",
        &url,
        "apply",
        "--wait",
        "-f",
        &example("idle.yaml"),
    ]);
    assert!(out.contains("idle: 1000/1000 ready"), "{out}");
    let before = agent.running();
    flotilla(&["--server", &url, "scale", "idle", "--replicas", "1200"]);
    wait_for(&url, "idle", "1200 ready", |o| ready(o) == 1200);
    let after = agent.running();
    assert!(
        before
            .iter()
            .all(|(id, started)| after.get(id) == Some(started)),
        "scaling up restarted sandboxes"
    );
    let completion = flotilla(&["completion", "bash"]);
    assert!(completion.contains("flotilla"), "{completion}");
}

#[test]
fn bad_manifests_fail_with_the_error_the_user_needs_and_change_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(&dir.path().join("data"), "127.0.0.1:0");
    let server = control_plane.url();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let idle = std::fs::read(examples.join("guests/idle.wasm")).expect("guest");
    let idle_sha = sha256_hex(&idle);
    let web = serve_http(vec![
        ("/idle.wasm", idle.clone()),
        ("/other.wasm", b"\0asm\x01\0\0\0".to_vec()),
    ]);
    std::fs::write(
        dir.path().join("malformed.wasm"),
        b"\0asm\x01\0\0\0\x01\xff\xff",
    )
    .expect("write");

    // One workload exists before; no bad apply may touch it.
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: good}}\n\
             spec: {{module: {{url: \"{web}/idle.wasm\", sha256: \"{idle_sha}\"}}}}\n"
        ),
    )
    .expect("write");
    let (ok, stdout, stderr) =
        try_flotilla(&["--server", &server, "apply", "-f", &good.to_string_lossy()]);
    assert!(ok, "a module URL is fetched and verified: {stderr}");
    assert!(stdout.contains("wasmworkload.flotilla.dev/good applied"));
    let before = flotilla(&["--server", &server, "get", "workloads", "-o", "json"]);

    let zeros = "0".repeat(64);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "missing local module",
            "{module: {path: missing.wasm}}".into(),
            vec!["bad.yaml", "missing.wasm"],
        ),
        (
            "unknown field",
            "{modul: {}}".into(),
            vec!["bad.yaml", "unknown field `modul`"],
        ),
        (
            "negative replicas",
            format!("{{module: {{sha256: \"{idle_sha}\"}}, replicas: -1}}"),
            vec!["spec.replicas: must be >= 0"],
        ),
        (
            "bad digest",
            format!("{{module: {{url: \"{web}/idle.wasm\", sha256: \"ABC\"}}}}"),
            vec!["spec.module.sha256", "must be 64 lower-case hex digits"],
        ),
        (
            "unreachable module URL",
            format!("{{module: {{url: \"http://127.0.0.1:1/m.wasm\", sha256: \"{zeros}\"}}}}"),
            vec![
                "spec.module.url: fetching http://127.0.0.1:1/m.wasm",
                "Connection refused",
            ],
        ),
        (
            "module URL at the cloud metadata address",
            format!("{{module: {{url: \"http://169.254.169.254/m.wasm\", sha256: \"{zeros}\"}}}}"),
            vec![
                "spec.module.url: fetching http://169.254.169.254/m.wasm",
                "169.254.169.254 is in the control plane's denied range 169.254.0.0/16",
            ],
        ),
        (
            "OCI registry at the cloud metadata address",
            format!("{{module: {{url: \"oci://169.254.169.254/x/y:v1\", sha256: \"{zeros}\"}}}}"),
            vec!["169.254.169.254 is in the control plane's denied range 169.254.0.0/16"],
        ),
        (
            "module URL not found",
            format!("{{module: {{url: \"{web}/nope.wasm\", sha256: \"{zeros}\"}}}}"),
            vec!["the server answered 404 Not Found"],
        ),
        (
            "module URL with another digest",
            format!("{{module: {{url: \"{web}/other.wasm\", sha256: \"{zeros}\"}}}}"),
            vec!["but spec.module.sha256 pins 000"],
        ),
        (
            "malformed wasm",
            "{module: {path: malformed.wasm}}".into(),
            vec![
                "malformed.wasm",
                "not a valid WebAssembly module or component",
            ],
        ),
    ];
    let bad = dir.path().join("bad.yaml");
    for (case, spec, needles) in cases {
        std::fs::write(
            &bad,
            format!(
                "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: bad}}\n\
                 spec: {spec}\n"
            ),
        )
        .expect("write");
        let (ok, _, stderr) =
            try_flotilla(&["--server", &server, "apply", "-f", &bad.to_string_lossy()]);
        assert!(!ok, "{case}: applied");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{case}: {needle:?} not in {stderr}"
            );
        }
    }
    let after = flotilla(&["--server", &server, "get", "workloads", "-o", "json"]);
    assert_eq!(before, after, "a bad apply changed something");

    let (ok, _, stderr) = try_flotilla(&["--server", "http://127.0.0.1:1", "get", "workloads"]);
    assert!(
        !ok && stderr.contains("cannot reach the control plane"),
        "{stderr}"
    );
}
