//! The README's kubectl steps, with a real kubectl, against the fake API server (real HTTP on
//! loopback, standing in for the cluster this machine cannot run), the control-plane binary in
//! Kubernetes mode and a node-agent binary.
//!
//! kubectl talks to the fake through a kubeconfig: it installs the CRDs with server-side apply,
//! applies `examples/kubernetes/hello.yaml` (with its module URL pointed at a local copy, as the
//! machine has no route to GitHub), lists and describes it, scales it through the `scale`
//! subresource, lists `wasmnodes`, reads the placements with a jsonpath, and deletes it.
//! kubectl comes from `$KUBECTL` or `PATH`; `.ci/setup` installs one where none is.

use std::path::Path;

use flotilla_tests::apiserver::FakeApiServer;
use support::{Agent, ControlPlane, Kubectl, flotilla, http_get, serve_http, sha256_hex};

use crate::support;

#[test]
fn the_readme_kubectl_steps_work_against_the_operator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let api = runtime.block_on(FakeApiServer::start());
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("default")).expect("write kubeconfig");
    let kubectl = Kubectl::with_kubeconfig(&kubeconfig);

    // The CRDs, as the README installs them outside Helm.
    kubectl.run(&[
        "apply",
        "--server-side",
        "-f",
        &root.join("charts/flotilla/crds").to_string_lossy(),
    ]);
    let crds = kubectl.json(&["get", "customresourcedefinitions"]);
    assert_eq!(crds["items"].as_array().map(Vec::len), Some(2), "{crds}");

    let kubeconfig_path = dir.path().join("kubeconfig");
    let control_plane = ControlPlane::start_with(&dir.path().join("cp"), "127.0.0.1:0", |c| {
        c.args(["--store", "kubernetes"])
            .env("KUBECONFIG", &kubeconfig_path);
    });
    let node = Agent::start(&control_plane.url(), "node-a");

    // examples/kubernetes/hello.yaml, with its module served from here.
    let hello = std::fs::read(root.join("examples/guests/hello.wasm")).expect("guest");
    let web = serve_http(vec![("/hello.wasm", hello)]);
    let example =
        std::fs::read_to_string(root.join("examples/kubernetes/hello.yaml")).expect("example");
    let github = "https://raw.githubusercontent.com/flotilla-dev/flotilla/main/examples/guests";
    assert!(example.contains(github), "the example's URL changed");
    let manifest = dir.path().join("hello.yaml");
    std::fs::write(&manifest, example.replace(github, &web)).expect("write manifest");

    let applied = kubectl.run(&["apply", "-f", &manifest.to_string_lossy()]);
    assert!(
        applied.contains("wasmworkload.flotilla.dev/hello created"),
        "{applied}"
    );
    // hello's two replicas print and complete.
    let done = kubectl.wait("hello completed", &["get", "wasmworkload", "hello"], |o| {
        o["status"]["succeededReplicas"] == 2
    });
    assert_eq!(done["metadata"]["finalizers"][0], "flotilla.dev/sandboxes");
    let listed = kubectl.run(&["get", "wasmworkloads"]);
    assert!(listed.contains("hello"), "{listed}");
    let short = kubectl.run(&["get", "ww", "hello", "-o", "name"]);
    assert_eq!(short.trim(), "wasmworkload.flotilla.dev/hello");
    let described = kubectl.run(&["describe", "wasmworkload", "hello"]);
    assert!(described.contains("Scheduled"), "{described}");

    let scaled = kubectl.run(&["scale", "wasmworkload", "hello", "--replicas=5"]);
    assert!(scaled.contains("scaled"), "{scaled}");
    kubectl.wait("5 completed", &["get", "wasmworkload", "hello"], |o| {
        o["status"]["succeededReplicas"] == 5
    });
    let nodes = kubectl.run(&["get", "wasmnodes"]);
    assert!(nodes.contains("node-a"), "{nodes}");
    let placements = kubectl.run(&[
        "get",
        "wasmworkload",
        "hello",
        "-o",
        "jsonpath={.status.placements}",
    ]);
    assert_eq!(placements, r#"{"node-a":5}"#);

    let deleted = kubectl.run(&["delete", "wasmworkload", "hello", "--timeout=60s"]);
    assert!(deleted.contains("deleted"), "{deleted}");
    let (ok, _, stderr) = kubectl.try_run(&["get", "wasmworkload", "hello"]);
    assert!(!ok && stderr.contains("NotFound"), "{stderr}");

    // examples/kubernetes/http-echo.yaml: an HTTP workload, answered through the agent's ingress.
    let echo = std::fs::read(root.join("examples/guests/http/echo.wasm")).expect("guest");
    let web = serve_http(vec![("/http/echo.wasm", echo)]);
    let example =
        std::fs::read_to_string(root.join("examples/kubernetes/http-echo.yaml")).expect("example");
    assert!(example.contains(github), "the example's URL changed");
    let manifest = dir.path().join("http-echo.yaml");
    std::fs::write(&manifest, example.replace(github, &web)).expect("write manifest");
    kubectl.run(&["apply", "-f", &manifest.to_string_lossy()]);
    let ready = kubectl.wait("http-echo ready", &["get", "ww", "http-echo"], |o| {
        o["status"]["readyReplicas"] == 2
    });
    assert_eq!(
        ready["status"]["endpoints"],
        serde_json::json!([format!("http://{}/echo", node.ingress)])
    );
    let answer = http_get(node.ingress, "/echo/info");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        answer.text().contains(r#""requests":1"#),
        "{}",
        answer.text()
    );
    kubectl.run(&["delete", "ww", "http-echo", "--timeout=60s"]);

    // A ConfigMap and a Secret applied with kubectl reach a guest's files and environment.
    // (kubectl create configmap|secret speaks protobuf, which the fake API server does not.)
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app-config\n\
         data:\n  greeting: hello from kubernetes\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: app-secret\n\
         data:\n  token: azhzLXRva2Vu\n",
    )
    .expect("write config");
    kubectl.run(&["apply", "-f", &config.to_string_lossy()]);
    let files = std::fs::read(root.join("examples/guests/files.wasm")).expect("guest");
    let sha = sha256_hex(&files);
    let web = serve_http(vec![("/files.wasm", files)]);
    let manifest = dir.path().join("files.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: files\n\
             spec:\n  module:\n    url: {web}/files.wasm\n    sha256: {sha}\n  \
             restartPolicy: Never\n  args: [read, /config/greeting, env, API_TOKEN]\n  \
             env:\n  - name: API_TOKEN\n    valueFrom:\n      \
             secretKeyRef: {{name: app-secret, key: token}}\n  \
             volumes:\n  - {{name: config, configMap: {{name: app-config}}}}\n  \
             volumeMounts:\n  - {{name: config, mountPath: /config}}\n"
        ),
    )
    .expect("write manifest");
    kubectl.run(&["apply", "-f", &manifest.to_string_lossy()]);
    kubectl.wait("files completed", &["get", "ww", "files"], |o| {
        o["status"]["succeededReplicas"] == 1
    });
    let logs = flotilla(&["--server", &control_plane.url(), "logs", "files"]);
    assert!(
        logs.contains("read /config/greeting: ok: hello from kubernetes"),
        "{logs}"
    );
    assert!(logs.contains("env API_TOKEN: k8s-token"), "{logs}");
    let yaml = kubectl.run(&["get", "ww", "files", "-o", "yaml"]);
    assert!(!yaml.contains("k8s-token"), "{yaml}");
    drop(node);
    control_plane.stop();
}
