//! What the process-level tests share: starting the control plane and agents, running the CLI,
//! and serving module files over HTTP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_tests::{Process, logged_addr, workspace_binary};
use serde_json::Value;

/// The join token of the clusters these tests run.
pub const JOIN_TOKEN: &str = "test-join-token-0123456789";

/// How long a test waits for the cluster to reach a state.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

pub struct ControlPlane {
    pub process: Process,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl ControlPlane {
    pub fn start(data_dir: &Path, listen: &str) -> Self {
        Self::start_with(data_dir, listen, |_| {})
    }

    /// Starts one with more arguments or environment from `configure`.
    pub fn start_with(data_dir: &Path, listen: &str, configure: impl FnOnce(&mut Command)) -> Self {
        let process = Self::spawn(data_dir, listen, configure);
        let serving = process.wait_line("serving");
        let addr = logged_addr(&serving, "addr");
        let metrics = logged_addr(&serving, "metrics_addr");
        Self {
            process,
            addr,
            metrics,
        }
    }

    /// Starts one without waiting for it to serve (a standby replica, say).
    pub fn spawn(data_dir: &Path, listen: &str, configure: impl FnOnce(&mut Command)) -> Process {
        let mut command = Command::new(workspace_binary("flotilla-control-plane"));
        command
            .args(["--listen", listen, "--shutdown-grace", "1s"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("FLOTILLA_JOIN_TOKEN", JOIN_TOKEN)
            .args(["--node-heartbeat-timeout", "3s"])
            .args(["--node-startup-grace", "3s"])
            // The tests' module servers and registries are on loopback, which the default
            // denies: only link-local (cloud metadata) stays denied here.
            .args(["--fetch-deny", "169.254.0.0/16"])
            .arg("--data-dir")
            .arg(data_dir);
        configure(&mut command);
        Process::spawn(command, "control-plane")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics(&self) -> String {
        scrape(self.metrics)
    }

    pub fn stop(mut self) {
        self.process.signal(libc::SIGTERM);
        let status = self.process.wait();
        assert!(status.success(), "control plane exit: {status:?}");
    }
}

/// Held for their whole run by the tests that load the CPUs for long (the arm64 test's
/// emulator) or that measure CPU shares, so that the first never skews the second.
pub fn cpu_bound_test() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Agent {
    pub process: Process,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    /// The HTTP ingress.
    pub ingress: SocketAddr,
}

impl Agent {
    pub fn start(control_plane: &str, node: &'static str) -> Self {
        Self::start_with_token(control_plane, node, JOIN_TOKEN)
    }

    /// Starts an agent and waits until it is connected to the control plane.
    pub fn start_connected(control_plane: &str, node: &'static str) -> Self {
        let agent = Self::start(control_plane, node);
        agent.process.wait_line("connected to the control plane");
        agent
    }

    pub fn start_with_token(control_plane: &str, node: &'static str, token: &str) -> Self {
        Self::start_with(control_plane, node, |c| {
            c.env("FLOTILLA_JOIN_TOKEN", token);
        })
    }

    /// Starts one with more arguments or environment from `configure`.
    pub fn start_with(
        control_plane: &str,
        node: &'static str,
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let command = Command::new(workspace_binary("flotilla-node-agent"));
        Self::start_command(command, control_plane, node, configure)
    }

    /// Starts the agent that `command` runs (another build, or one under an emulator), with
    /// the usual test flags and more from `configure`.
    pub fn start_command(
        mut command: Command,
        control_plane: &str,
        node: &'static str,
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        // One state directory (node credentials) for the test run, not the user's home: an
        // agent restarted for the same node name takes it back.
        let state_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agent-state");
        command
            .env("FLOTILLA_JOIN_TOKEN", JOIN_TOKEN)
            .env("FLOTILLA_STATE_DIR", state_dir)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--control-plane", control_plane, "--node-name", node])
            .args(["--max-sandboxes", "2000", "--no-cache"])
            .args(["--shutdown-grace", "1s"]);
        configure(&mut command);
        let process = Process::spawn(command, node);
        let serving = process.wait_line("serving");
        let admin = logged_addr(&serving, "admin_addr");
        let metrics = logged_addr(&serving, "metrics_addr");
        let ingress = logged_addr(&process.wait_line("serving HTTP workloads"), "ingress_addr");
        Self {
            process,
            admin,
            metrics,
            ingress,
        }
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics(&self) -> String {
        scrape(self.metrics)
    }

    /// Running sandboxes: id → start time. Equal snapshots mean nothing was restarted.
    pub fn running(&self) -> BTreeMap<String, i64> {
        running_sandboxes(self.admin)
            .iter()
            .map(|s| {
                (
                    s["sandboxId"].as_str().expect("sandboxId").to_string(),
                    s["startedAtMs"].as_i64().expect("startedAtMs"),
                )
            })
            .collect()
    }
}

/// The Prometheus text from `/metrics` at `addr`.
fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: flotilla\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// The running sandboxes of the agent whose admin API is at `admin`, as
/// `flotilla get sandboxes -o json` shows them.
pub fn running_sandboxes(admin: SocketAddr) -> Vec<Value> {
    let json = flotilla(&[
        "--agent",
        &admin.to_string(),
        "get",
        "sandboxes",
        "-o",
        "json",
    ]);
    let sandboxes: Vec<Value> = serde_json::from_str(&json).expect("sandboxes as JSON");
    sandboxes
        .into_iter()
        .filter(|s| s["phase"] == "Running")
        .collect()
}

/// Runs the CLI; returns its stdout, failing the test on a non-zero exit.
pub fn flotilla(args: &[&str]) -> String {
    let (ok, stdout, stderr) = try_flotilla(args);
    assert!(ok, "flotilla {args:?}: {stderr}");
    stdout
}

/// Writes `yaml` to `path` and runs `flotilla apply -f` on it (with `--wait` when `wait`);
/// returns whether it succeeded, its stdout and its stderr.
pub fn try_apply(server: &str, path: &Path, yaml: &str, wait: bool) -> (bool, String, String) {
    std::fs::write(path, yaml).expect("write manifest");
    let file = path.to_str().expect("utf-8 path");
    let mut args = vec!["--server", server, "apply", "-f", file];
    if wait {
        args.push("--wait");
    }
    try_flotilla(&args)
}

/// Like [`try_apply`], failing the test unless it succeeds; returns its stdout.
pub fn apply(server: &str, path: &Path, yaml: &str, wait: bool) -> String {
    let (ok, stdout, stderr) = try_apply(server, path, yaml, wait);
    assert!(ok, "flotilla apply {}: {stderr}", path.display());
    stdout
}

/// Runs the CLI; returns whether it succeeded, its stdout and its stderr.
pub fn try_flotilla(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(workspace_binary("flotilla"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("flotilla runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Serves `routes` (path → body; anything else is 404) over HTTP/1.1 on loopback, one request
/// per connection, on a thread that lives as long as the test process.
pub fn serve_http(routes: Vec<(&'static str, Vec<u8>)>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match routes.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => ("200 OK", body.clone()),
                None => ("404 Not Found", b"not found".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}")
}

/// Runs `future` to completion, for tests that are not async.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// `GET path` on `addr`, for tests that are not async.
pub fn http_get(addr: SocketAddr, path: &str) -> flotilla_tests::http::Response {
    block_on(flotilla_tests::http::get(addr, path)).expect("response")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// kubectl, from `$KUBECTL` or `PATH`, against one cluster.
pub struct Kubectl {
    /// A kubeconfig of its own (with `HOME` beside it, so no cache is shared), or the
    /// environment's.
    kubeconfig: Option<std::path::PathBuf>,
}

impl Kubectl {
    /// kubectl as the environment configures it (`KUBECONFIG` or `~/.kube/config`).
    pub fn ambient() -> Self {
        Self { kubeconfig: None }
    }

    /// kubectl against the cluster of `kubeconfig`.
    pub fn with_kubeconfig(kubeconfig: &Path) -> Self {
        Self {
            kubeconfig: Some(kubeconfig.to_path_buf()),
        }
    }

    /// Runs kubectl; returns (success, stdout, stderr).
    pub fn try_run(&self, args: &[&str]) -> (bool, String, String) {
        let binary = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let mut command = Command::new(binary);
        command.args(args);
        if let Some(kubeconfig) = &self.kubeconfig {
            command
                .env("KUBECONFIG", kubeconfig)
                .env("HOME", kubeconfig.parent().unwrap_or(Path::new("/tmp")));
        }
        let output = command.output().expect("kubectl runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs kubectl; returns stdout, failing the test on a non-zero exit.
    pub fn run(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.try_run(args);
        assert!(ok, "kubectl {}: {stderr}{stdout}", args.join(" "));
        stdout
    }

    /// Runs kubectl with `-o json`.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.run(&args)).expect("kubectl JSON")
    }

    /// Polls `kubectl ... -o json` until `done` holds; returns that object.
    pub fn wait(&self, what: &str, args: &[&str], done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
        loop {
            let object = self.json(args);
            if done(&object) {
                return object;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} not reached: {object}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Polls `get workload NAME -o json` until `done` holds, and returns that object.
/// Polls workload `name` (`namespace/name` outside `default`) until `done`.
pub fn wait_for(server: &str, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let (namespace, name) = name.split_once('/').unwrap_or(("default", name));
    loop {
        let object: Value = serde_json::from_str(&flotilla(&[
            "--server",
            server,
            "get",
            "workloads",
            name,
            "-n",
            namespace,
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

/// The status condition of `type_` of a workload object (`null` when it has none).
pub fn condition<'a>(object: &'a Value, type_: &str) -> &'a Value {
    object["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

pub fn placements(object: &Value) -> BTreeMap<String, u64> {
    object["status"]["placements"]
        .as_object()
        .map(|p| {
            p.iter()
                .map(|(node, n)| (node.clone(), n.as_u64().expect("count")))
                .collect()
        })
        .unwrap_or_default()
}

pub fn ready(object: &Value) -> u64 {
    object["status"]["readyReplicas"].as_u64().unwrap_or(0)
}

/// The path of `examples/<name>`.
pub fn example(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "examples", name]
        .iter()
        .collect();
    path.to_string_lossy().into_owned()
}
