//! The Helm chart, with real Helm: `helm lint` and `helm template` with the default values and
//! with every option switched on, then every rendered manifest parsed into its `k8s-openapi`
//! type. The type's serialisation must hold every field the template wrote, so a misspelt or
//! misplaced field fails here rather than in a cluster.
//!
//! Helm comes from `$HELM` or `PATH`; `.ci/setup` installs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::support;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/flotilla")
}

/// `helm template` of the chart as release `flotilla` in namespace `flotilla`, CRDs included.
fn render(chart: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "template",
        "flotilla",
        chart,
        "-n",
        "flotilla",
        "--include-crds",
    ];
    args.extend(extra);
    helm(&args)
}

fn helm(args: &[&str]) -> String {
    let helm = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let output = Command::new(&helm).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {helm:?} ({e}); install Helm with `bash .ci/setup` or set HELM")
    });
    assert!(
        output.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// Paths of fields in `written` that `parsed` lacks or holds with another value.
fn lost_fields(written: &Value, parsed: &Value, path: &str, out: &mut Vec<String>) {
    match (written, parsed) {
        (Value::Object(w), Value::Object(p)) => {
            for (key, value) in w {
                let here = format!("{path}.{key}");
                match p.get(key) {
                    Some(parsed_value) => lost_fields(value, parsed_value, &here, out),
                    // Empty values a type drops on serialisation change nothing.
                    None if value.is_null() || value == &Value::Object(Default::default()) => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(w), Value::Array(p)) if w.len() == p.len() => {
            for (i, (wv, pv)) in w.iter().zip(p).enumerate() {
                lost_fields(wv, pv, &format!("{path}[{i}]"), out);
            }
        }
        (w, p) if w == p => {}
        // Numbers Helm renders as floats but the type holds as integers.
        (Value::Number(w), Value::Number(p)) if w.as_f64() == p.as_f64() => {}
        _ => out.push(format!("{path}: {written} became {parsed}")),
    }
}

fn check<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Vec<String> {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", doc["metadata"]["name"]));
    let parsed = serde_json::to_value(&typed).expect("serialise");
    let mut lost = Vec::new();
    lost_fields(doc, &parsed, "", &mut lost);
    lost
}

/// Parses every document of a render; returns the kinds seen.
fn parse_render(rendered: &str) -> Vec<String> {
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let yaml = serde_yaml::Value::deserialize(doc).expect("YAML");
        if yaml.is_null() {
            continue;
        }
        let doc: Value = serde_json::to_value(&yaml).expect("JSON");
        let kind = doc["kind"].as_str().expect("kind").to_string();
        let lost = match kind.as_str() {
            "ServiceAccount" => check::<ServiceAccount>(&doc),
            "Secret" => check::<Secret>(&doc),
            "ConfigMap" => check::<ConfigMap>(&doc),
            "ClusterRole" => check::<ClusterRole>(&doc),
            "ClusterRoleBinding" => check::<ClusterRoleBinding>(&doc),
            "Role" => check::<Role>(&doc),
            "RoleBinding" => check::<RoleBinding>(&doc),
            "NetworkPolicy" => check::<NetworkPolicy>(&doc),
            "Deployment" => check::<Deployment>(&doc),
            "DaemonSet" => check::<DaemonSet>(&doc),
            "Service" => check::<Service>(&doc),
            "PersistentVolumeClaim" => check::<PersistentVolumeClaim>(&doc),
            "PodDisruptionBudget" => check::<PodDisruptionBudget>(&doc),
            "CustomResourceDefinition" => check::<CustomResourceDefinition>(&doc),
            // Prometheus Operator kinds have no k8s-openapi type: check what can be checked.
            "ServiceMonitor" | "PodMonitor" => {
                assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1");
                let _: ObjectMeta =
                    serde_json::from_value(doc["metadata"].clone()).expect("metadata");
                assert!(doc["spec"]["selector"]["matchLabels"].is_object(), "{doc}");
                vec![]
            }
            other => panic!("the chart renders a {other} the test does not check"),
        };
        assert!(
            lost.is_empty(),
            "{kind} {}: {lost:?}",
            doc["metadata"]["name"]
        );
        kinds.push(kind);
    }
    kinds.sort();
    kinds
}

use serde::Deserialize;

#[test]
fn the_chart_lints_renders_and_parses_with_default_and_maximal_values() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let maximal = format!("{chart}/ci/maximal-values.yaml");
    helm(&["lint", "--strict", chart]);
    helm(&["lint", "--strict", chart, "-f", &maximal]);

    let default = render(chart, &[]);
    let kinds = parse_render(&default);
    for kind in [
        "ClusterRole",
        "CustomResourceDefinition",
        "DaemonSet",
        "Deployment",
        "NetworkPolicy",
        "Secret",
        "Service",
        "ServiceAccount",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    assert!(
        !kinds.iter().any(|k| k == "ServiceMonitor"),
        "off by default"
    );
    // Kubernetes mode by default: the CRD store, a Lease, and the pod's identity for it.
    for expected in [
        "--store=kubernetes",
        "--leader-elect",
        "--leader-election-id=flotilla-control-plane",
        "fieldPath: metadata.namespace",
        // HTTP workloads: every agent's ingress, advertised at the pod's address, behind a
        // Service.
        "--http-listen=0.0.0.0:8080",
        "--http-advertise-url=http://$(POD_IP):8080",
        "targetPort: http",
        // Volumes of the sandboxes in the pod; ConfigMaps and Secrets readable for them.
        "--volumes-dir=/var/lib/flotilla/volumes",
        "--cache-dir=/var/cache/flotilla/modules",
        "resources: [\"configmaps\", \"secrets\"]",
        // Secrets' files in memory, never on the node's disk.
        "--secrets-dir=/run/flotilla/secrets",
        "medium: Memory",
        "sizeLimit: 64Mi",
        // No sandbox reaches the metadata address or its own node, whatever it lists.
        "--egress-deny=127.0.0.0/8,0.0.0.0/8,169.254.0.0/16,",
        ",ff00::/8,$(HOST_IP),$(POD_IP)",
        // Nor do module downloads, nor do they reach the control plane's own pod.
        "--fetch-deny=127.0.0.0/8,0.0.0.0/8,169.254.0.0/16,",
        ",ff00::/8,$(POD_IP),$(HOST_IP)",
        // Agents verify the control plane with the generated CA...
        "--control-plane=https://flotilla-control-plane.flotilla.svc:7080",
        "--tls-ca-file=/etc/flotilla/tls/ca.crt",
        "type: kubernetes.io/tls",
        // ... and keep their node credential on the node, in a directory made theirs.
        "--state-dir=/var/lib/flotilla-agent",
        "--prepare-state-dir-for=65532:65532",
        "type: DirectoryOrCreate",
        // Users present their Kubernetes tokens and the cluster's RBAC decides: the control
        // plane may review tokens and access, and write the workloads users may write.
        "--kubernetes-auth",
        "resources: [\"tokenreviews\"]",
        "resources: [\"subjectaccessreviews\"]",
        "verbs: [\"get\", \"list\", \"watch\", \"create\", \"patch\", \"update\", \"delete\"]",
        // The default roles include Flotilla's resources.
        "rbac.authorization.k8s.io/aggregate-to-edit: \"true\"",
        "rbac.authorization.k8s.io/aggregate-to-view: \"true\"",
        "resources: [\"wasmworkloads/log\"]",
    ] {
        assert!(
            default.contains(expected),
            "no {expected} in the default render"
        );
    }
    assert!(
        !default.contains("livenessProbe"),
        "a standby would fail it"
    );
    // No token file, nor anyone anonymous, in Kubernetes mode.
    for absent in [
        "--token-auth-file",
        "flotilla-users",
        "--insecure-allow-anonymous",
    ] {
        assert!(!default.contains(absent), "{absent} in the default render");
    }
    // With userAuth.mode=tokens, a generated admin token instead, and no reviews.
    let tokens = helm(&[
        "template",
        "flotilla",
        chart,
        "--set",
        "userAuth.mode=tokens",
    ]);
    parse_render(&tokens);
    for expected in [
        "--token-auth-file=/etc/flotilla/users/tokens.csv",
        "secretName: flotilla-users",
    ] {
        assert!(tokens.contains(expected), "no {expected} with mode=tokens");
    }
    assert!(!tokens.contains("--kubernetes-auth") && !tokens.contains("tokenreviews"));
    // The agents admit their ingress and metrics ports, never the admin API's.
    let agent_policy = default
        .split("\n---")
        .find(|doc| doc.contains("kind: NetworkPolicy") && doc.contains("node-agent"))
        .expect("the agents' NetworkPolicy");
    assert!(agent_policy.contains("port: 8080"), "{agent_policy}");
    assert!(agent_policy.contains("port: 9090"), "{agent_policy}");
    assert!(!agent_policy.contains("7070"), "{agent_policy}");

    // The embedded store keeps one writer: Recreate, a liveness probe, no Lease.
    let embedded = helm(&[
        "template",
        "flotilla",
        chart,
        "--set",
        "controlPlane.store=embedded",
    ]);
    parse_render(&embedded);
    assert!(embedded.contains("type: Recreate"), "{embedded}");
    assert!(embedded.contains("livenessProbe"), "{embedded}");
    // The embedded store has no cluster to ask: users have tokens.
    assert!(embedded.contains("--token-auth-file"), "{embedded}");
    assert!(!embedded.contains("--kubernetes-auth"), "{embedded}");
    assert!(!embedded.contains("--leader-elect"), "{embedded}");

    let all = render(chart, &["-f", &maximal]);
    let kinds = parse_render(&all);
    // TLS from cert-manager-style Secrets: agents dial https and present client certificates.
    for expected in [
        "--control-plane=https://flotilla-max-control-plane.flotilla.svc:7080",
        "--tls-client-ca-file=/etc/flotilla/tls/ca.crt",
        "--tls-cert-file=/etc/flotilla/tls/tls.crt",
        "secretName: flotilla-agent-tls",
        // The ingress on each node's own address, and a NodePort Service over them.
        "hostPort: 8081",
        "--http-advertise-url=http://$(HOST_IP):8081",
        "nodePort: 30880",
        // Node directories for hostPath volumes, mounted at the same path, read-only unless
        // writable.
        "--allow-host-path=/srv/models",
        "--allow-host-path=/var/spool/wasm:rw",
        "path: /var/spool/wasm",
        // Users from an existing Secret, and a policy in a ConfigMap.
        "secretName: flotilla-users-from-vault",
        "--authorization-policy-file=/etc/flotilla/policy/policy.yaml",
        "name: flotilla-max-policy",
    ] {
        assert!(
            all.contains(expected),
            "no {expected} in the maximal render"
        );
    }
    for kind in [
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PodMonitor",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    assert!(
        all.contains("--node-labels=flotilla.dev/pool=wasm,tier=edge"),
        "{all}"
    );
    assert!(
        all.contains("--wasm-features=gc,component-model-async"),
        "{all}"
    );
    assert!(
        default.contains("--wasm-features=gc,exceptions,wide-arithmetic,custom-page-sizes"),
        "{default}"
    );
    // Secrets of the listed namespaces only: a Role in each, none cluster-wide.
    assert!(all.contains("--config-namespaces=team-a,team-b"), "{all}");
    for namespace in ["team-a", "team-b"] {
        assert!(
            all.contains(&format!(
                "name: flotilla-max-config\n  namespace: {namespace}"
            )),
            "no Role in {namespace}"
        );
    }
    let cluster_role = all
        .split("\n---")
        .find(|doc| doc.contains("kind: ClusterRole\n") && doc.contains("wasmworkloads"))
        .expect("the control plane's ClusterRole");
    assert!(!cluster_role.contains("secrets"), "{cluster_role}");
    assert!(default.contains("resources: [\"configmaps\", \"secrets\"]"));
    // With an existing Secret the chart generates none and both components read that one.
    assert!(!kinds.iter().any(|k| k == "Secret"), "{kinds:?}");
    assert_eq!(
        all.matches("name: flotilla-join-token-from-vault").count(),
        2,
        "{all}"
    );
}

#[test]
fn values_outside_the_schema_are_refused() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let helm_bin = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    for bad in [
        "controlPlane.store=embedded,controlPlane.replicas=2",
        "controlPlane.leaderElection.enabled=false,controlPlane.replicas=2",
        "controlPlane.leaderElection.leaseName=Not_A_Name",
        "controlPlane.store=etcd",
        "userAuth.mode=oidc",
        "tls.agentSecret=agent-tls",
        "agent.maxSandboxes=0",
        "controlPlane.nodeHeartbeatTimeout=soon",
        "notAKey=1",
    ] {
        let output = Command::new(&helm_bin)
            .args(["template", "flotilla", chart, "--set", bad])
            .output()
            .expect("helm runs");
        assert!(!output.status.success(), "{bad} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("schema"), "{bad}: {stderr}");
    }
}

/// Runs `kubernetes-validate --strict` (the Kubernetes 1.33 schemas, offline) on a rendered
/// chart; returns whether it passed and what it said.
fn kubernetes_validate(rendered: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, rendered).expect("write");
    let validator =
        std::env::var("KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let output = Command::new(&validator)
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {validator:?} ({e}); install it with `bash .ci/setup`")
        });
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn rendered_manifests_pass_the_kubernetes_schemas_strictly() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let maximal = format!("{chart}/ci/maximal-values.yaml");
    for values in [None, Some(maximal.as_str())] {
        let rendered = match values {
            None => render(chart, &[]),
            Some(values) => render(chart, &["-f", values]),
        };
        let (ok, report) = kubernetes_validate(&rendered);
        assert!(ok, "{values:?}: {report}");
        for kind in [
            "deployment",
            "daemonset",
            "customresourcedefinition",
            "clusterrole",
        ] {
            assert!(
                report.contains(&format!("passed for resource {kind}/")),
                "{kind} not checked: {report}"
            );
        }
        // A misspelt field fails, so the check is real.
        let broken = rendered.replacen("serviceAccountName:", "serviceAcountName:", 1);
        let (ok, report) = kubernetes_validate(&broken);
        assert!(!ok, "a misspelt field passed: {report}");
        assert!(report.contains("serviceAcountName"), "{report}");
    }
}

/// The data of the Secret named `name` in a render.
fn secret_data(rendered: &str, name: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let yaml = serde_yaml::Value::deserialize(doc).expect("YAML");
        if yaml["kind"].as_str() != Some("Secret")
            || yaml["metadata"]["name"].as_str() != Some(name)
        {
            continue;
        }
        let secret: Secret = serde_yaml::from_value(yaml).expect("a Secret");
        return secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| (key, value.0))
            .collect();
    }
    panic!("no Secret {name} in the render");
}

#[test]
fn the_generated_certificate_serves_agents_and_the_cli() {
    let chart = chart();
    let rendered = render(chart.to_str().expect("utf-8 path"), &[]);
    let data = secret_data(&rendered, "flotilla-control-plane-tls");
    let dir = tempfile::tempdir().expect("temp dir");
    for file in ["tls.crt", "tls.key", "ca.crt"] {
        let bytes = data.get(file).unwrap_or_else(|| panic!("no {file}"));
        std::fs::write(dir.path().join(file), bytes).expect("write");
    }
    let file = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let control_plane =
        support::ControlPlane::start_with(&dir.path().join("cp"), "127.0.0.1:0", |c| {
            c.args(["--tls-cert-file", &file("tls.crt")])
                .args(["--tls-key-file", &file("tls.key")]);
        });
    // Through a port-forward: `localhost` is among the certificate's names.
    let url = format!("https://localhost:{}", control_plane.addr.port());
    let agent = support::Agent::start_with(&url, "node-chart-tls", |c| {
        c.args(["--tls-ca-file", &file("ca.crt")]);
    });
    agent.process.wait_line("connected to the control plane");
    let (ok, nodes, stderr) = support::try_flotilla(&[
        "--server",
        &url,
        "--tls-ca-file",
        &file("ca.crt"),
        "get",
        "nodes",
    ]);
    assert!(ok && nodes.contains("node-chart-tls"), "{nodes}{stderr}");
    // Without the CA, the CLI refuses the server, as agents would.
    let (ok, _, stderr) = support::try_flotilla(&["--server", &url, "get", "nodes"]);
    assert!(!ok, "an unverified server was trusted");
    assert!(!stderr.is_empty());
}
