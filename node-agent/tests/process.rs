//! The agent binary as a real process: static manifests, the admin gRPC API, metrics, SIGTERM.

#[path = "all/common.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::fixture;
use flotilla_proto::agent::v1::agent_admin_client::AgentAdminClient;
use flotilla_proto::agent::v1::{
    GetCapacityRequest, ListSandboxesRequest, LogsRequest, ModuleSource, RunWorkloadRequest,
    SandboxPhase, SandboxStatus, WatchRequest, WorkloadSpec, module_source,
};
use flotilla_tests::{Process, logged_addr};
use tokio_stream::StreamExt;

/// The agent binary with its admin and metrics addresses, read from its log.
struct AgentProcess {
    process: Process,
    admin: SocketAddr,
    metrics: SocketAddr,
}

impl AgentProcess {
    fn start(manifests: &std::path::Path) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla-node-agent"));
        command
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args([
                "--max-sandboxes",
                "1000",
                "--no-cache",
                "--shutdown-grace",
                "5s",
            ])
            .arg("--manifests")
            .arg(manifests);
        let process = Process::spawn(command, "agent");
        let serving = process.wait_line("serving");
        Self {
            admin: logged_addr(&serving, "admin_addr"),
            metrics: logged_addr(&serving, "metrics_addr"),
            process,
        }
    }
}

fn write_manifests(dir: &std::path::Path) {
    std::fs::write(dir.join("hello.wasm"), fixture("hello")).expect("write");
    std::fs::write(dir.join("sleep.wasm"), fixture("sleep")).expect("write");
    std::fs::write(dir.join("broken.wasm"), b"\0asm\x01\0\0\0garbage").expect("write");
    let manifest = |name: &str, module: &str, replicas: u32, policy: &str| {
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: {name}\n\
             spec:\n  module:\n    path: {module}\n  replicas: {replicas}\n  restartPolicy: {policy}\n"
        )
    };
    std::fs::write(
        dir.join("hello.yaml"),
        manifest("hello", "hello.wasm", 2, "Never"),
    )
    .expect("write");
    std::fs::write(
        dir.join("idle.yaml"),
        manifest("idle", "sleep.wasm", 3, "Always"),
    )
    .expect("write");
    std::fs::write(
        dir.join("broken.yaml"),
        manifest("broken", "broken.wasm", 1, "Always"),
    )
    .expect("write");
    std::fs::write(dir.join("typo.yaml"), "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {name: typo}\nspec: {modul: {path: x.wasm}}\n").expect("write");
}

async fn wait_until(
    client: &mut AgentAdminClient<tonic::transport::Channel>,
    what: &str,
    pred: impl Fn(&[SandboxStatus]) -> bool,
) -> Vec<SandboxStatus> {
    let mut events = client
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = client
            .list_sandboxes(ListSandboxesRequest::default())
            .await
            .expect("list")
            .into_inner()
            .sandboxes;
        if pred(&list) {
            return list;
        }
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(_)) => {}
            other => panic!("waiting for {what}: {other:?}; last list {list:#?}"),
        }
    }
}

fn count(list: &[SandboxStatus], workload: &str, phase: SandboxPhase) -> usize {
    list.iter()
        .filter(|s| s.workload == workload && s.phase == phase as i32)
        .count()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_manifests_serves_grpc_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_manifests(dir.path());
    let mut agent = AgentProcess::start(dir.path());
    let mut client = AgentAdminClient::connect(format!("http://{}", agent.admin))
        .await
        .expect("connect admin API");

    let list = wait_until(&mut client, "manifests to run", |l| {
        count(l, "hello", SandboxPhase::Succeeded) == 2
            && count(l, "idle", SandboxPhase::Running) == 3
    })
    .await;
    let broken: Vec<_> = list.iter().filter(|s| s.workload == "broken").collect();
    assert_eq!(broken.len(), 1);
    assert_eq!(broken[0].phase, SandboxPhase::Failed as i32);
    assert_eq!(broken[0].reason, "InvalidModule");
    assert!(list.iter().all(|s| s.workload != "typo"));
    agent.process.wait_line("unknown field `modul`");

    let mut logs = client
        .logs(LogsRequest {
            workload: "hello".into(),
            replica: 1,
            follow: false,
            ..LogsRequest::default()
        })
        .await
        .expect("logs")
        .into_inner();
    let mut output = Vec::new();
    let mut ended = None;
    while let Some(chunk) = logs.next().await {
        let chunk = chunk.expect("chunk");
        output.extend(chunk.data);
        ended = chunk.ended.or(ended);
    }
    assert_eq!(output, b"hello from flotilla\n");
    // The sandbox has completed: the stream's last message says so.
    let ended = ended.expect("how the sandbox ended");
    assert_eq!(
        (ended.reason.as_str(), ended.exit_code),
        ("Completed", Some(0))
    );

    // Malformed wasm over the API: a clear InvalidArgument, and the agent keeps serving.
    let err = client
        .run_workload(RunWorkloadRequest {
            spec: Some(WorkloadSpec {
                name: "malformed".into(),
                generation: 1,
                replicas: 1,
                module: Some(ModuleSource {
                    source: Some(module_source::Source::Inline(
                        b"\0asm\x01\0\0\0\x01".to_vec(),
                    )),
                    sha256: String::new(),
                }),
                ..WorkloadSpec::default()
            }),
        })
        .await
        .expect_err("malformed module rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("invalid module"),
        "{}",
        err.message()
    );

    // The admin API runs the node's own workloads: none that reads a namespace's Secrets,
    // joins another workload's route or replaces or stops what the control plane placed.
    for (spec, expected) in [
        (
            WorkloadSpec {
                name: "peek".into(),
                namespace: "team-a".into(),
                env_from: vec![flotilla_proto::agent::v1::EnvFrom {
                    name: "db-credentials".into(),
                    ..Default::default()
                }],
                ..WorkloadSpec::default()
            },
            "namespace: set only by the control plane",
        ),
        (
            WorkloadSpec {
                name: "join".into(),
                owner: "team-a.shop".into(),
                ..WorkloadSpec::default()
            },
            "owner: set only by the control plane",
        ),
        (
            WorkloadSpec {
                name: "team-a.shop-1234".into(),
                ..WorkloadSpec::default()
            },
            "names with '.' are the control plane's",
        ),
    ] {
        let err = client
            .run_workload(RunWorkloadRequest { spec: Some(spec) })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(expected), "{}", err.message());
    }
    let err = client
        .stop_workload(flotilla_proto::agent::v1::StopWorkloadRequest {
            name: "team-a.shop-1234".into(),
            grace_period_ms: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    let capacity = client
        .get_capacity(GetCapacityRequest {})
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(capacity.max_sandboxes, 1000);
    #[cfg(target_arch = "x86_64")]
    assert_eq!(capacity.arch, "amd64");

    let metrics = http_get(agent.metrics, "/metrics");
    assert!(
        metrics.contains("flotilla_sandboxes{phase=\"Running\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flotilla_sandbox_starts_total"),
        "{metrics}"
    );

    // SIGTERM: every sandbox is stopped and accounted for, and the agent exits cleanly.
    agent.process.signal(libc::SIGTERM);
    let summary = agent.process.wait_line("all sandboxes accounted for");
    assert!(summary.contains("stopped=3"), "{summary}");
    assert!(summary.contains("aborted=0"), "{summary}");
    let status = agent.process.wait();
    assert!(status.success(), "{status:?}");
}
