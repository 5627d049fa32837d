//! The control-plane binary as a real process: serve, stop on SIGTERM, restart with its data.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use flotilla_tests::{Process, logged_addr};

use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use std::time::Duration;

use flotilla_proto::control::v1::{ApplyRequest, GetRequest, PushModuleRequest, WatchRequest};
use tokio_stream::StreamExt;

/// The control-plane binary with its API address, read from its log.
struct ControlPlane {
    process: Process,
    addr: SocketAddr,
}

impl ControlPlane {
    fn start(data_dir: &Path) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla-control-plane"));
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--shutdown-grace",
                "1s",
                "--data-dir",
            ])
            .arg(data_dir);
        let process = Process::spawn(command, "control-plane");
        let addr = logged_addr(&process.wait_line("serving"), "addr");
        Self { process, addr }
    }

    fn stop(mut self) {
        self.process.signal(libc::SIGTERM);
        self.process.wait_line("stopped");
        let status = self.process.wait();
        assert!(status.success(), "{status:?}");
    }
}

#[tokio::test]
async fn a_restarted_control_plane_loses_nothing() {
    let data = tempfile::tempdir().expect("temp dir");
    let first = ControlPlane::start(data.path());
    // Desired state and Secrets are for the control plane's user alone.
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (data.path().to_path_buf(), 0o700),
        (data.path().join("store.redb"), 0o600),
        (data.path().join("config.redb"), 0o600),
    ] {
        let got = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(got, mode, "{}", path.display());
    }
    let mut client = WorkloadsClient::connect(format!("http://{}", first.addr))
        .await
        .expect("connect");
    let sha = client
        .push_module(PushModuleRequest {
            module: b"\0asm\x01\0\0\0".to_vec(),
            sha256: String::new(),
            namespace: String::new(),
        })
        .await
        .expect("push")
        .into_inner()
        .sha256;
    let manifest = format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: web}}\n\
         spec: {{module: {{sha256: \"{sha}\"}}, replicas: 300}}\n"
    );
    let created = client
        .apply(ApplyRequest {
            manifest: manifest.into_bytes(),
        })
        .await
        .expect("apply")
        .into_inner();
    drop(client);
    first.stop();

    let second = ControlPlane::start(data.path());
    let mut client = WorkloadsClient::connect(format!("http://{}", second.addr))
        .await
        .expect("connect");
    let got = client
        .get(GetRequest {
            namespace: String::new(),
            name: "web".into(),
        })
        .await
        .expect("still there")
        .into_inner();
    // Same object, same spec and generation; with no agent registered the controller reports
    // why nothing is placed.
    let got: serde_json::Value = serde_json::from_slice(&got.json).expect("json");
    let created: serde_json::Value = serde_json::from_slice(&created.json).expect("json");
    assert_eq!(got["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(got["spec"], created["spec"]);
    assert_eq!(got["metadata"]["generation"], 1);
    // With no agent registered, the controller in the new process reports why nothing is
    // placed. Wait for its status write through the Watch API.
    let mut events = client
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let scheduled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.next().await.expect("watch open").expect("event");
            for object in event.objects {
                let w: serde_json::Value = serde_json::from_slice(&object.json).expect("json");
                let found = w["status"]["conditions"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["type"] == "Scheduled").cloned());
                if let Some(condition) = found {
                    return condition;
                }
            }
        }
    })
    .await
    .expect("the controller writes a Scheduled condition");
    assert_eq!(scheduled["status"], "False");
    assert!(
        scheduled["message"]
            .as_str()
            .is_some_and(|m| m.contains("no node agent is registered")),
        "{scheduled}"
    );
    // The pushed module survived too: a workload naming it is accepted.
    let again = format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: api}}\n\
         spec: {{module: {{sha256: \"{sha}\"}}}}\n"
    );
    client
        .apply(ApplyRequest {
            manifest: again.into_bytes(),
        })
        .await
        .expect("module still stored");
    second.stop();
}
