//! Bounds on what tenants send, across real processes: no object over 1 MiB is stored, and a
//! node whose workloads add up to more than one gRPC message (70 MiB) runs all of them. How a
//! complete set that large is split is tested on the protocol itself, in the control plane's
//! `agents_tests`.

use support::{Agent, ControlPlane, flotilla, ready, running_sandboxes, wait_for};

use crate::support;

/// Workloads of nearly 1 MiB each, 70 MiB together: more than one message takes (65 MiB).
const WORKLOADS: usize = 70;
const ARG_BYTES: usize = 1_000_000;

#[test]
fn a_node_gets_every_workload_however_large_its_desired_set_grows() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let agent = Agent::start(&url, "node-1");
    agent.process.wait_line("connected to the control plane");
    let guest = support::example("guests/idle.wasm");
    let arg = "x".repeat(ARG_BYTES);
    let manifest: String = (0..WORKLOADS)
        .map(|i| {
            format!(
                "---\napiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\n\
                 metadata: {{name: big-{i}}}\n\
                 spec: {{module: {{path: {guest}}}, args: [\"{arg}\"]}}\n"
            )
        })
        .collect();
    support::apply(&url, &data.path().join("big.yaml"), &manifest, false);
    let last = format!("big-{}", WORKLOADS - 1);
    wait_for(&url, &last, "running", |o| ready(o) == 1);
    // One list of all of them: 70 MiB of workloads in one answer.
    let deadline = std::time::Instant::now() + support::SETTLE_TIMEOUT;
    loop {
        let listed: serde_json::Value = serde_json::from_str(&flotilla(&[
            "--server",
            &url,
            "get",
            "workloads",
            "-o",
            "json",
        ]))
        .expect("JSON");
        let items = listed["items"].as_array().map_or(&[][..], Vec::as_slice);
        if items.len() == WORKLOADS && items.iter().all(|w| ready(w) == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every workload runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let nodes = flotilla(&["--server", &url, "get", "nodes"]);
    assert!(
        nodes.contains("Ready") && !nodes.contains("NotReady"),
        "{nodes}"
    );
    assert_eq!(running_sandboxes(agent.admin).len(), WORKLOADS);

    // One object over 1 MiB is refused at apply, with nothing stored.
    let (ok, _, stderr) = support::try_apply(
        &url,
        &data.path().join("huge.yaml"),
        &format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: huge}}\n\
             spec: {{module: {{path: {guest}}}, args: [\"{}\"]}}\n",
            "x".repeat(2 * ARG_BYTES)
        ),
        false,
    );
    assert!(!ok);
    assert!(
        stderr.contains("over the limit of 1048576 (1 MiB)"),
        "{stderr}"
    );
}
