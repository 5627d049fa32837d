//! End-to-end against a real Kubernetes cluster (kind, say): run with
//! `KUBECONFIG=... cargo test -p flotilla-tests --test all -- --ignored kind::`.
//!
//! The test installs the CRDs with `kubectl apply --server-side`, runs the control-plane binary
//! on this machine with `--store kubernetes` against the cluster and two node-agent binaries
//! beside it (no images needed), then drives the workload with kubectl only: apply, wait for
//! Ready, scale, a rolling update to a template mounting a ConfigMap and back, delete, and
//! reads `kubectl get wasmnodes`. It leaves the CRDs installed and
//! deletes what it created.

use std::path::Path;

use support::{Agent, ControlPlane, Kubectl, serve_http, sha256_hex};

use crate::support;

#[test]
#[ignore = "needs a Kubernetes cluster"]
fn a_workload_applied_with_kubectl_runs_scales_and_goes() {
    let kubectl = Kubectl::ambient();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let crds = root.join("charts/flotilla/crds");
    kubectl.run(&["apply", "--server-side", "-f", &crds.to_string_lossy()]);
    let namespace = format!("flotilla-e2e-{}", std::process::id());
    kubectl.run(&["create", "namespace", &namespace]);

    let dir = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start_with(&dir.path().join("cp"), "127.0.0.1:0", |c| {
        c.args(["--store", "kubernetes"]);
    });
    let server = control_plane.url();
    let _node_a = Agent::start(&server, "e2e-node-a");
    let _node_b = Agent::start(&server, "e2e-node-b");

    let idle = std::fs::read(root.join("examples/guests/idle.wasm")).expect("guest");
    let web = serve_http(vec![("/idle.wasm", idle.clone())]);
    let manifest = dir.path().join("web.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: web\n  \
             namespace: {namespace}\nspec:\n  replicas: 4\n  module:\n    url: {web}/idle.wasm\n    \
             sha256: {}\n",
            sha256_hex(&idle)
        ),
    )
    .expect("write manifest");
    kubectl.run(&["apply", "-f", &manifest.to_string_lossy()]);

    let workload = ["-n", namespace.as_str(), "get", "wasmworkload", "web"];
    kubectl.wait("4 ready replicas", &workload, |o| {
        o["status"]["readyReplicas"] == 4
    });
    let nodes = kubectl.json(&["get", "wasmnodes"]);
    let names: Vec<&str> = nodes["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"e2e-node-a") && names.contains(&"e2e-node-b"),
        "{names:?}"
    );

    kubectl.run(&[
        "-n",
        &namespace,
        "scale",
        "wasmworkload",
        "web",
        "--replicas=6",
    ]);
    kubectl.wait("6 ready replicas", &workload, |o| {
        o["status"]["readyReplicas"] == 6
    });

    // A new template that mounts a ConfigMap rolls out; re-applying the first rolls back.
    // (Both manifests say 4 replicas, which undoes the scale.)
    kubectl.run(&[
        "-n",
        &namespace,
        "create",
        "configmap",
        "web-config",
        "--from-literal=mode=v2",
    ]);
    let first = std::fs::read_to_string(&manifest).expect("manifest");
    let second = dir.path().join("web-v2.yaml");
    std::fs::write(
        &second,
        format!(
            "{first}  args: [v2]\n  volumes:\n  - {{name: config, configMap: {{name: web-config}}}}\n  \
             volumeMounts:\n  - {{name: config, mountPath: /config}}\n"
        ),
    )
    .expect("write manifest");
    kubectl.run(&["apply", "-f", &second.to_string_lossy()]);
    let rolled = kubectl.wait("revision 2 everywhere", &workload, |o| {
        o["status"]["revision"] == 2
            && o["status"]["updatedReplicas"] == 4
            && o["status"]["replicas"] == 4
            && o["status"]["availableReplicas"] == 4
    });
    assert_eq!(
        rolled["status"]["revisions"].as_array().map(Vec::len),
        Some(2)
    );
    kubectl.run(&["apply", "-f", &manifest.to_string_lossy()]);
    kubectl.wait("back to the first template", &workload, |o| {
        o["status"]["revision"] == 3
            && o["status"]["templateGeneration"] == 1
            && o["status"]["updatedReplicas"] == 4
            && o["status"]["replicas"] == 4
    });

    kubectl.run(&[
        "-n",
        &namespace,
        "delete",
        "wasmworkload",
        "web",
        "--wait=true",
        "--timeout=60s",
    ]);
    let left = kubectl.run(&["-n", &namespace, "get", "wasmworkloads", "-o", "name"]);
    assert!(left.trim().is_empty(), "{left}");
    kubectl.run(&["delete", "namespace", &namespace, "--wait=false"]);
    control_plane.stop();
}
