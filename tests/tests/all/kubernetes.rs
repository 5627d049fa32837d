//! Kubernetes mode with real processes: the control-plane binary with `--store kubernetes` and
//! leader election, two node-agent binaries, and a fake API server (real HTTP on loopback, in
//! place of the cluster this machine cannot run) reached through a kubeconfig.
//!
//! The test does what a user does with kubectl, through the API: apply a `WasmWorkload` that
//! names its module by URL (and one from an OCI registry), scale it, delete it; and what the operator must do in return:
//! schedule onto both agents, write status by server-side apply, hold a finalizer until the
//! sandboxes stopped, keep a second replica waiting on the Lease until the first steps down.

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_tests::apiserver::FakeApiServer;
use flotilla_tests::registry::FakeRegistry;
use serde_json::{Value, json};
use support::{Agent, ControlPlane, SETTLE_TIMEOUT, condition, flotilla, serve_http, sha256_hex};

use crate::support;

const WORKLOADS: &str = "/apis/flotilla.dev/v1alpha1/namespaces/default/wasmworkloads";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/flotilla/leases/flotilla-control-plane";

/// Polls the API server's copy of `path` until `done` holds; returns it.
fn wait_object(
    server: &FakeApiServer,
    path: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let object = server.object(path).unwrap_or(Value::Null);
        if done(&object) {
            return object;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached; last: {object}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kubectl apply` of a WasmWorkload named `name` in the default namespace.
fn apply_workload(runtime: &tokio::runtime::Runtime, api: &FakeApiServer, name: &str, spec: Value) {
    runtime
        .block_on(api.apply_object(
            WORKLOADS,
            json!({
                "apiVersion": "flotilla.dev/v1alpha1",
                "kind": "WasmWorkload",
                "metadata": {"name": name},
                "spec": spec,
            }),
        ))
        .expect("apply");
}

fn kube_control_plane(
    data_dir: &Path,
    kubeconfig: &Path,
    identity: &str,
) -> impl FnOnce(&mut std::process::Command) {
    let data_dir = data_dir.to_path_buf();
    let kubeconfig = kubeconfig.to_path_buf();
    let identity = identity.to_string();
    move |command| {
        command
            .args(["--store", "kubernetes", "--leader-elect"])
            .args(["--leader-election-namespace", "flotilla"])
            .env("POD_NAME", identity)
            .env("KUBECONFIG", kubeconfig)
            .env("FLOTILLA_DATA_DIR", data_dir);
    }
}

#[test]
fn kubectl_style_apply_scale_and_delete_against_the_operator_with_two_agents() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let api = runtime.block_on(FakeApiServer::start());
    let api = api
        .with_status_subresource("wasmworkloads")
        .with_status_subresource("wasmnodes");
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("default")).expect("write kubeconfig");

    let first = ControlPlane::start_with(
        &dir.path().join("cp-0"),
        "127.0.0.1:0",
        kube_control_plane(&dir.path().join("cp-0"), &kubeconfig, "cp-0"),
    );
    let lease = wait_object(&api, LEASE, "the first replica leads", |l| {
        l["spec"]["holderIdentity"] == "cp-0"
    });
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
    // The cluster's Nodes, with the labels a cloud gives them.
    for (node, zone) in [("node-a", "zone-a"), ("node-b", "zone-b")] {
        runtime
            .block_on(api.apply_object(
                "/api/v1/nodes",
                json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": node, "labels": {"topology.kubernetes.io/zone": zone}},
                }),
            ))
            .expect("create Node");
    }
    let server = first.url();
    let node_a = Agent::start(&server, "node-a");
    let node_b = Agent::start(&server, "node-b");
    for node in ["node-a", "node-b"] {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while !support::try_flotilla(&["--server", &server, "get", "nodes", node]).0 {
            assert!(Instant::now() < deadline, "{node} never registered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // `kubectl apply`: a workload whose module is a URL the control plane has never seen.
    let idle =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests/idle.wasm"))
            .expect("guest");
    let crash =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests/crash.wasm"))
            .expect("guest");
    let web = serve_http(vec![("/idle.wasm", idle.clone())]);
    // The trapping guest comes from an OCI registry, as runwasi and SpinKube artifacts do.
    let registry = runtime.block_on(FakeRegistry::start());
    let crash_manifest = registry.push_wasm("flotilla/crash", "v1", &crash);
    let crash_url = format!("oci://{}/flotilla/crash@{crash_manifest}", registry.host());
    let manifest = json!({
        "apiVersion": "flotilla.dev/v1alpha1",
        "kind": "WasmWorkload",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": 4,
            "module": {"url": format!("{web}/idle.wasm"), "sha256": sha256_hex(&idle)},
        },
    });
    runtime
        .block_on(api.apply_object(WORKLOADS, manifest.clone()))
        .expect("create");
    let path = format!("{WORKLOADS}/web");
    let object = wait_object(&api, &path, "4 ready replicas", |o| {
        o["status"]["readyReplicas"] == 4 && condition(o, "Available")["status"] == "True"
    });
    assert_eq!(object["status"]["observedGeneration"], 1);
    assert_eq!(condition(&object, "Scheduled")["status"], "True");
    assert_eq!(condition(&object, "Ready")["reason"], "AllReplicasReady");
    assert_eq!(
        condition(&object, "Progressing")["reason"],
        "TemplateAvailable"
    );
    assert_eq!(
        object["metadata"]["finalizers"],
        json!(["flotilla.dev/sandboxes"])
    );
    let placements = object["status"]["placements"]
        .as_object()
        .expect("placements");
    assert_eq!(placements.get("node-a"), Some(&json!(2)), "{placements:?}");
    assert_eq!(placements.get("node-b"), Some(&json!(2)), "{placements:?}");

    // `kubectl get wasmnodes`: one object per agent, Ready, with what it offers and runs.
    for (node, agent) in [("node-a", &node_a), ("node-b", &node_b)] {
        let path = format!("/apis/flotilla.dev/v1alpha1/wasmnodes/{node}");
        let published = wait_object(&api, &path, "the WasmNode", |n| {
            condition(n, "Ready")["status"] == "True" && n["status"]["sandboxes"] == 2
        });
        let arch = if cfg!(target_arch = "aarch64") {
            "arm64"
        } else {
            "amd64"
        };
        assert_eq!(published["spec"]["arch"], arch);
        assert_eq!(published["status"]["allocatable"]["sandboxes"], 2000);
        assert_eq!(
            published["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "flotilla-control-plane"
        );
        assert!(published["status"]["lastHeartbeatTime"].is_string());
        assert_eq!(
            published["spec"]["ingressUrl"],
            format!("http://{}", agent.ingress)
        );
    }

    // Node labels from the cluster steer placement, as for pods.
    apply_workload(
        &runtime,
        &api,
        "zonal",
        json!({
            "replicas": 3,
            "nodeSelector": {"topology.kubernetes.io/zone": "zone-b"},
            "module": {"url": format!("{web}/idle.wasm"), "sha256": sha256_hex(&idle)},
        }),
    );
    let zonal = wait_object(
        &api,
        &format!("{WORKLOADS}/zonal"),
        "3 zonal replicas",
        |o| o["status"]["readyReplicas"] == 3,
    );
    assert_eq!(zonal["status"]["placements"], json!({"node-b": 3}));
    let published = api
        .object("/apis/flotilla.dev/v1alpha1/wasmnodes/node-b")
        .expect("WasmNode");
    assert_eq!(
        published["metadata"]["labels"]["topology.kubernetes.io/zone"],
        "zone-b"
    );
    runtime
        .block_on(api.delete_object(&format!("{WORKLOADS}/zonal")))
        .expect("delete");
    wait_object(
        &api,
        &format!("{WORKLOADS}/zonal"),
        "zonal gone",
        Value::is_null,
    );

    // `kubectl describe`/`get events`: the scheduling decision, as an Event on the workload.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let events = api.objects("/apis/events.k8s.io/v1/namespaces/default/events");
        let scheduled = events.iter().find(|e| {
            e["reason"] == "Scheduled" && e["regarding"]["name"] == "web" && e["type"] == "Normal"
        });
        if let Some(event) = scheduled {
            assert_eq!(event["regarding"]["kind"], "WasmWorkload");
            assert_eq!(event["regarding"]["uid"], object["metadata"]["uid"]);
            assert_eq!(event["reportingController"], "flotilla-control-plane");
            assert_eq!(event["reportingInstance"], "cp-0");
            break;
        }
        assert!(Instant::now() < deadline, "no Scheduled Event: {events:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A workload that traps: a Warning Event with the reason, and the Ready condition says why.
    apply_workload(
        &runtime,
        &api,
        "crashloop",
        json!({
            "restartPolicy": "Always",
            "module": {"url": crash_url, "sha256": sha256_hex(&crash)},
        }),
    );
    let failing = wait_object(
        &api,
        &format!("{WORKLOADS}/crashloop"),
        "the trap reported",
        |o| condition(o, "Ready")["reason"] == "Trap",
    );
    assert!(
        condition(&failing, "Ready")["message"]
            .as_str()
            .is_some_and(|m| m.contains("integer divide by zero")),
        "{failing}"
    );
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !api
        .objects("/apis/events.k8s.io/v1/namespaces/default/events")
        .iter()
        .any(|e| {
            e["reason"] == "Trap" && e["type"] == "Warning" && e["regarding"]["name"] == "crashloop"
        })
    {
        assert!(Instant::now() < deadline, "no Warning Event for the trap");
        std::thread::sleep(Duration::from_millis(100));
    }
    runtime
        .block_on(api.delete_object(&format!("{WORKLOADS}/crashloop")))
        .expect("delete");

    // Every status write was a server-side apply under the control plane's field manager.
    let status_writes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/wasmworkloads/") && r.path.ends_with("/status"))
        .collect();
    assert!(!status_writes.is_empty());
    for request in &status_writes {
        assert_eq!(request.content_type, "application/apply-patch+yaml");
        assert_eq!(
            request.query.get("fieldManager").map(String::as_str),
            Some("flotilla-control-plane")
        );
    }

    // The CLI reads the same object through the control plane.
    let through_cli: Value = serde_json::from_str(&flotilla(&[
        "--server",
        &server,
        "get",
        "workloads",
        "web",
        "-o",
        "json",
    ]))
    .expect("JSON");
    assert_eq!(through_cli["status"]["readyReplicas"], 4);

    // `kubectl scale`: two more replicas, and no running sandbox restarts.
    let before_a = node_a.running();
    let before_b = node_b.running();
    runtime
        .block_on(api.patch_object(&path, json!({"spec": {"replicas": 6}})))
        .expect("scale");
    let object = wait_object(&api, &path, "6 ready replicas", |o| {
        o["status"]["readyReplicas"] == 6 && o["status"]["observedGeneration"] == 2
    });
    assert_eq!(
        object["status"]["templateGeneration"], 1,
        "scaling kept the template"
    );
    let after_a = node_a.running();
    let after_b = node_b.running();
    assert!(
        before_a.iter().all(|(id, t)| after_a.get(id) == Some(t)),
        "node-a restarted a sandbox"
    );
    assert!(
        before_b.iter().all(|(id, t)| after_b.get(id) == Some(t)),
        "node-b restarted a sandbox"
    );

    // A second replica campaigns but does not serve while the first leads.
    let standby = ControlPlane::spawn(
        &dir.path().join("cp-1"),
        "127.0.0.1:0",
        kube_control_plane(&dir.path().join("cp-1"), &kubeconfig, "cp-1"),
    );
    standby.wait_line("waiting for the leader's lease to expire");

    // `kubectl delete`: the finalizer holds the object until both agents stopped its sandboxes.
    let marked = runtime.block_on(api.delete_object(&path)).expect("delete");
    assert!(
        marked["metadata"]["deletionTimestamp"].is_string(),
        "{marked}"
    );
    wait_object(&api, &path, "the workload gone", Value::is_null);
    assert!(node_a.running().is_empty(), "node-a still runs sandboxes");
    assert!(node_b.running().is_empty(), "node-b still runs sandboxes");

    // The leader steps down on SIGTERM and hands the Lease over.
    first.stop();
    standby.wait_line("became the leader");
    let lease = wait_object(&api, LEASE, "the standby leads", |l| {
        l["spec"]["holderIdentity"] == "cp-1"
    });
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[test]
fn the_kubectl_examples_pin_the_committed_guests() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for (manifest, guest) in [
        ("kubernetes/hello.yaml", "guests/hello.wasm"),
        ("kubernetes/http-echo.yaml", "guests/http/echo.wasm"),
    ] {
        let manifest: Value = serde_yaml::from_str(
            &std::fs::read_to_string(examples.join(manifest)).expect("example"),
        )
        .expect("YAML");
        let bytes = std::fs::read(examples.join(guest)).expect("guest");
        assert_eq!(manifest["spec"]["module"]["sha256"], sha256_hex(&bytes));
        assert!(
            manifest["spec"]["module"]["url"]
                .as_str()
                .is_some_and(|u| u.ends_with(&format!("/examples/{guest}"))),
            "{manifest}"
        );
    }
}
