//! The control-plane binary as a real process: serve, stop on SIGTERM, restart with its data.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{ApplyRequest, GetRequest, PushModuleRequest};

struct ControlPlane {
    child: Child,
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
}

impl ControlPlane {
    fn start(data_dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-control-plane"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--shutdown-grace",
                "1s",
                "--data-dir",
            ])
            .arg(data_dir)
            .env("FLOTILLA_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("control plane starts");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[control-plane] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let serving = wait_line(&lines, "serving");
        let start = serving.find("addr=").expect("address logged") + "addr=".len();
        let rest = &serving[start..];
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let addr = rest[..end].parse().expect("socket address");
        Self { child, lines, addr }
    }

    fn stop(mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        assert_eq!(kill(pid, libc::SIGTERM), 0);
        wait_line(&self.lines, "stopped");
        let status = self.child.wait().expect("exits");
        assert!(status.success(), "{status:?}");
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unsafe_code)]
fn kill(pid: i32, signal: i32) -> i32 {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) }
}

fn wait_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("never logged {needle:?}: {e}"),
        }
    }
}

#[tokio::test]
async fn a_restarted_control_plane_loses_nothing() {
    let data = tempfile::tempdir().expect("temp dir");
    let first = ControlPlane::start(data.path());
    let mut client = WorkloadsClient::connect(format!("http://{}", first.addr))
        .await
        .expect("connect");
    let sha = client
        .push_module(PushModuleRequest {
            module: b"\0asm\x01\0\0\0".to_vec(),
            sha256: String::new(),
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
    assert_eq!(got.json, created.json);
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
