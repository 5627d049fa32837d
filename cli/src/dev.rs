//! `flotilla dev`: a control plane with its embedded store and one node agent in one process,
//! like `nomad agent -dev`. It applies the examples, shows them running, and stops everything on
//! Ctrl-C.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser};
use flotilla_control_plane::{ControlPlane, ServerConfig};
use flotilla_node_agent::agent::Agent;
use flotilla_proto::agent::v1::{SandboxPhase, SandboxStatus};

/// `flotilla dev` options.
#[derive(Args, Clone, Debug)]
pub struct DevArgs {
    /// The control plane's address.
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
    /// The agent's admin API address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    agent_listen: SocketAddr,
    /// The agent's metrics address.
    #[arg(long, default_value = "127.0.0.1:9090")]
    metrics_listen: SocketAddr,
    /// The agent's HTTP ingress, which serves the HTTP workloads.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// Where the store, pushed modules and compiled modules live (default: a fresh temporary
    /// directory, removed on exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Manifests to apply at startup (a file or directory); `none` to apply nothing.
    #[arg(long, default_value = "examples")]
    manifests: String,
    /// The agent's node name.
    #[arg(long, default_value = "dev")]
    node_name: String,
    /// WebAssembly proposals workloads may enable, as the agent's `--wasm-features` (default:
    /// all but the experimental `component-model-async` and `threads`).
    #[arg(long)]
    wasm_features: Option<String>,
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    // Installed first: a signal during startup must still stop everything cleanly.
    let shutdown = flotilla_telemetry::shutdown_signal()?;
    let temp;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().context("creating a data directory")?;
            temp.path().to_path_buf()
        }
    };
    let control_plane = ControlPlane::start(ServerConfig {
        listen: args.listen,
        // The agent's metrics are on --metrics-listen; the control plane's are not served.
        metrics_listen: None,
        store: flotilla_control_plane::StoreBackend::Embedded,
        data_dir: data_dir.join("control-plane"),
        node_heartbeat_timeout: Duration::from_secs(5),
        // The one agent lives in this process and reconnects at once.
        node_startup_grace: Duration::from_secs(5),
        // One process on loopback: the agent is the only one.
        join_token: None,
        tls: None,
        shutdown_grace: Duration::from_secs(2),
        fetch_guard: flotilla_control_plane::FetchGuard::defaults(),
        // One user on their own machine: open on loopback, and refused elsewhere.
        user_auth: Default::default(),
        insecure_allow_anonymous: false,
    })
    .await?;
    let url = format!("http://{}", control_plane.addr());
    let mut agent_argv = vec![
        "flotilla-node-agent".to_string(),
        "--listen".into(),
        args.agent_listen.to_string(),
        "--metrics-listen".into(),
        args.metrics_listen.to_string(),
        "--http-listen".into(),
        args.http_listen.to_string(),
        "--control-plane".into(),
        url.clone(),
        "--node-name".into(),
        args.node_name.clone(),
        "--cache-dir".into(),
        data_dir.join("compiled").to_string_lossy().into_owned(),
        "--state-dir".into(),
        data_dir.join("agent").to_string_lossy().into_owned(),
        "--shutdown-grace".into(),
        "5s".into(),
    ];
    if let Some(features) = &args.wasm_features {
        agent_argv.extend(["--wasm-features".into(), features.clone()]);
    }
    let agent_config = flotilla_node_agent::config::Config::try_from(
        flotilla_node_agent::config::Args::try_parse_from(agent_argv)?,
    )?;
    let agent = Agent::start(agent_config).await?;
    let agent_url = format!("http://{}", agent.admin_addr());
    println!("flotilla dev: control plane at {url}");
    println!(
        "flotilla dev: node agent {:?} (admin {}, metrics http://{}/metrics, HTTP ingress http://{})",
        args.node_name,
        agent.admin_addr(),
        agent.metrics_addr(),
        agent.ingress_addr().unwrap_or(args.http_listen)
    );

    if args.manifests != "none" {
        let applied = crate::control::apply(&url, std::slice::from_ref(&args.manifests)).await?;
        let replicas: usize = applied
            .iter()
            .map(|w| usize::try_from(w.spec.replicas).unwrap_or(0))
            .sum();
        settle(&agent, replicas, Duration::from_secs(30)).await;
        print_summary(&agent.supervisor().list(None));
        print_output(&agent_url, &agent.supervisor().list(None)).await;
        if let Some(ingress) = agent.ingress_addr() {
            print_http(ingress, &applied).await;
        }
    }
    println!(
        "flotilla dev: running. Try `flotilla get workloads`, `flotilla get nodes`, \
         `flotilla describe workload crashloop`, `flotilla logs hello`, \
         `curl http://{}/echo/info`. Ctrl-C stops everything.",
        agent.ingress_addr().unwrap_or(args.http_listen)
    );

    shutdown.await;
    println!("flotilla dev: stopping");
    let report = agent.shutdown().await;
    control_plane.shutdown().await?;
    println!(
        "flotilla dev: stopped {} sandboxes ({} aborted)",
        report.sandboxes, report.aborted
    );
    Ok(())
}

/// Waits (bounded) until the agent holds `replicas` sandboxes and none is still starting.
async fn settle(agent: &Agent, replicas: usize, limit: Duration) {
    let started = Instant::now();
    let mut events = agent.supervisor().watch();
    loop {
        let sandboxes = agent.supervisor().list(None);
        let starting = sandboxes
            .iter()
            .any(|s| s.phase == SandboxPhase::Pending as i32 && s.reason.is_empty());
        if sandboxes.len() >= replicas && !starting {
            return;
        }
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() || tokio::time::timeout(left, events.recv()).await.is_err() {
            return;
        }
    }
}

/// One line per workload: sandboxes by phase, and why the last one ended if it failed.
fn print_summary(sandboxes: &[SandboxStatus]) {
    let mut by_workload: BTreeMap<&str, Vec<&SandboxStatus>> = BTreeMap::new();
    for s in sandboxes {
        by_workload.entry(&s.workload).or_default().push(s);
    }
    for (workload, list) in by_workload {
        let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &list {
            *phases.entry(crate::agent::phase_name(s.phase)).or_default() += 1;
        }
        let phases: Vec<String> = phases.iter().map(|(p, n)| format!("{n} {p}")).collect();
        let last = list
            .iter()
            .filter_map(|s| s.last_termination.as_ref())
            .find(|t| t.reason != "Completed")
            .map(|t| {
                let first_line = t.message.lines().next().unwrap_or_default();
                format!("  last: {}: {first_line}", t.reason)
            })
            .unwrap_or_default();
        println!("  {workload:<24} {}{last}", phases.join(", "));
    }
}

/// The output of each workload's first sandbox that completed.
async fn print_output(agent_url: &str, sandboxes: &[SandboxStatus]) {
    let mut completed: Vec<&SandboxStatus> = sandboxes
        .iter()
        .filter(|s| s.replica == 0 && s.phase == SandboxPhase::Succeeded as i32)
        .collect();
    completed.sort_by(|a, b| a.workload.cmp(&b.workload));
    for s in completed {
        println!("  --- output of {} ---", s.sandbox_id);
        let logs = crate::agent::logs(
            agent_url,
            s.workload.clone(),
            0,
            false,
            Default::default(),
            Default::default(),
        );
        if let Err(error) = logs.await {
            println!("  (logs unavailable: {error})");
        }
    }
}

/// One request to each HTTP workload applied, through the agent's ingress, with its answer.
async fn print_http(ingress: SocketAddr, applied: &[flotilla_model::Workload]) {
    for workload in applied {
        let Some(http) = &workload.spec.http else {
            continue;
        };
        let path = match http.path_prefix() {
            "/" => "/".to_string(),
            prefix => format!("{prefix}/info"),
        };
        println!(
            "  --- GET http://{ingress}{path} ({}) ---",
            workload.metadata.name
        );
        match http_get(ingress, &path).await {
            Ok((status, body)) => println!("  {status} {}", body.trim_end()),
            Err(error) => println!("  (request failed: {error:#})"),
        }
    }
}

/// A plain HTTP/1.1 GET on loopback: the status and the body as text.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .context("no answer within 10 s")??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
