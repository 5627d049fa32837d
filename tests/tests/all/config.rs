//! ConfigMaps and Secrets across real processes: created with the CLI in embedded mode, read by
//! a guest as files and environment variables through a node agent, updated in place, and
//! never shown back.

use std::time::{Duration, Instant};

use support::{Agent, ControlPlane, example, flotilla, try_flotilla};

use crate::support;

const SECRET: &str = "s3cret-value-42";

/// Polls `flotilla logs` of the workload until its output contains `needle`.
fn logs_until(url: &str, workload: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out, _) = try_flotilla(&["--server", url, "logs", workload]);
        if out.contains(needle) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never logged; last:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_guest_reads_a_config_map_file_and_a_secret_variable_and_sees_updates() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let agent = Agent::start_connected(&url, "node-a");

    let out = flotilla(&[
        "--server",
        &url,
        "create",
        "configmap",
        "app",
        "--from-literal",
        "greeting=v1",
    ]);
    assert!(out.contains("configmap/app created"), "{out}");
    let secret_file = data.path().join("password");
    std::fs::write(&secret_file, SECRET).expect("write");
    let from_file = format!("password={}", secret_file.display());
    flotilla(&[
        "--server",
        &url,
        "create",
        "secret",
        "generic",
        "creds",
        "--from-file",
        &from_file,
    ]);
    let (ok, _, err) = try_flotilla(&[
        "--server",
        &url,
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal",
        "a=b",
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");

    let guest = example("guests/files.wasm");
    let manifest = data.path().join("reader.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: reader\n\
             spec:\n  module:\n    path: {guest}\n  restartPolicy: Never\n  \
             args: [env, NODE, env, NAMESPACE, env, SANDBOX, read, /config/greeting, env, PASSWORD, \
             read, /etc/passwd, poll, /config/greeting, v2, '60000']\n  \
             env:\n  - name: PASSWORD\n    valueFrom:\n      secretKeyRef: {{name: creds, key: password}}\n  \
             - name: NODE\n    valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}\n  \
             - name: NAMESPACE\n    valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}\n  \
             - name: SANDBOX\n    valueFrom: {{fieldRef: {{fieldPath: metadata.name, apiVersion: v1}}}}\n  \
             volumes:\n  - name: config\n    configMap: {{name: app}}\n  \
             volumeMounts:\n  - {{name: config, mountPath: /config}}\n"
        ),
    )
    .expect("write manifest");
    flotilla(&[
        "--server",
        &url,
        "apply",
        "-f",
        manifest.to_str().expect("utf-8"),
    ]);
    let out = logs_until(&url, "reader", "read /config/greeting: ok: v1");
    assert!(out.contains(&format!("env PASSWORD: {SECRET}")), "{out}");
    assert!(out.contains("read /etc/passwd: error"), "{out}");
    // The downward API: the node, the namespace and the sandbox's own name, as listed.
    assert!(out.contains("env NODE: node-a"), "{out}");
    assert!(out.contains("env NAMESPACE: default"), "{out}");
    let sandboxes = flotilla(&["--agent", &agent.admin.to_string(), "get", "sandboxes"]);
    let sandbox = out
        .lines()
        .find_map(|l| l.strip_prefix("env SANDBOX: "))
        .unwrap_or_else(|| panic!("no SANDBOX in {out}"));
    assert!(
        sandbox.starts_with("default.reader-") && sandboxes.contains(sandbox),
        "{sandbox:?} not in:\n{sandboxes}"
    );

    // An update applied as kubectl would write it reaches the running guest.
    let update = data.path().join("app-v2.yaml");
    std::fs::write(
        &update,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\ndata:\n  greeting: v2\n",
    )
    .expect("write");
    let out = flotilla(&[
        "--server",
        &url,
        "apply",
        "-f",
        update.to_str().expect("utf-8"),
    ]);
    assert!(out.contains("configmap/app applied"), "{out}");
    logs_until(&url, "reader", "poll /config/greeting: saw v2");

    // The secret's value is never shown back.
    let secrets = flotilla(&["--server", &url, "get", "secrets"]);
    assert!(
        secrets.contains("creds") && secrets.contains("password (15 B)"),
        "{secrets}"
    );
    let shown = [
        secrets,
        flotilla(&["--server", &url, "get", "secrets", "creds", "-o", "yaml"]),
        flotilla(&["--server", &url, "get", "workloads", "reader", "-o", "yaml"]),
        flotilla(&["--server", &url, "describe", "workload", "reader"]),
    ];
    for output in &shown {
        assert!(
            !output.contains(SECRET),
            "the secret was printed:\n{output}"
        );
    }
    // describe shows where the value comes from, and the mounts, as kubectl does.
    for expected in [
        "PASSWORD: <set to the key 'password' of secret 'creds'>",
        "/config from config (ro)",
        "config: ConfigMap app",
    ] {
        assert!(
            shown[3].contains(expected),
            "no {expected:?} in:\n{}",
            shown[3]
        );
    }
    for line in control_plane
        .process
        .lines_so_far()
        .iter()
        .chain(&agent.process.lines_so_far())
    {
        assert!(!line.contains(SECRET), "the secret was logged: {line}");
    }

    // Deleting the ConfigMap is refused for an unknown name and done for a known one.
    let (ok, _, err) = try_flotilla(&["--server", &url, "delete", "configmap", "nope"]);
    assert!(
        !ok && err.contains("configmap default/nope not found"),
        "{err}"
    );
    let out = flotilla(&["--server", &url, "delete", "configmap", "app"]);
    assert!(out.contains("configmap/app deleted"), "{out}");
}

#[test]
fn the_config_example_runs_as_documented() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let _agent = Agent::start_connected(&url, "node-a");
    let out = flotilla(&["--server", &url, "apply", "-f", &example("config")]);
    for applied in [
        "configmap/app-config applied",
        "secret/app-secret applied",
        "wasmworkload.flotilla.dev/files-demo applied",
    ] {
        assert!(out.contains(applied), "{out}");
    }
    let out = logs_until(&url, "files-demo", "read /etc/passwd");
    for line in [
        "read /config/greeting: ok: Ahoy from a ConfigMap",
        // One key at a path of its own (items), through the control plane and the agent.
        "read /banner/text/greeting.txt: ok: Ahoy from a ConfigMap",
        "env API_TOKEN: demo-token",
        "write /scratch/note: ok: 4096",
        // The same emptyDir through a subPath.
        "write /notes/seen: ok: 8",
        "read /scratch/notes/seen: ok: xxxxxxxx",
        "read /etc/passwd: error:",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
}
