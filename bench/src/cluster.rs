//! Cluster benchmarks over real processes and real gRPC on loopback.
//!
//! - `e2e`: a control plane and N node agents, each its own process (this binary re-executed
//!   in a hidden `serve-*` mode that runs the same library entry points as
//!   `flotilla-control-plane` and `flotilla-node-agent`); one apply of R idle replicas, timed
//!   until the workload's status says every replica runs.
//! - `fleet`: a control-plane process and N lightweight simulated agents in this process (one
//!   gRPC connection, registration and session each), holding R replicas each; the control
//!   plane's RSS and CPU are read from `/proc`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_control_plane::model::Workload;
use flotilla_proto::control::v1::agents_client::AgentsClient;
use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{
    AgentMessage, ApplyRequest, ControlMessage, Heartbeat, Hello, ListNodesRequest, NodeResources,
    PushModuleRequest, RegisterRequest, WatchRequest, WorkloadCounts, agent_message,
    control_message,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{IDLE_GUEST, machine, result};

/// A child process that is killed when dropped.
pub(crate) struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Takes ownership of a process started elsewhere, to kill it when dropped.
    pub(crate) fn adopt(child: Child) -> Self {
        Self { child }
    }

    /// Re-executes this binary with `args`; waits for the `LISTENING <addr>` line it prints.
    ///
    /// Servers run as in production: warnings only, and no `RUST_BACKTRACE` from the shell,
    /// which makes every error capture a backtrace (wasmtime creates some per WASI 0.3 HTTP
    /// request: about 8% more server CPU per request in one 5-second `http-p3` round each).
    pub(crate) fn spawn(args: &[String]) -> anyhow::Result<(Self, SocketAddr)> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .env("FLOTILLA_LOG", "warn")
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a server process")?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let server = Self { child };
        let line = lines
            .next()
            .context("the server exited before listening")??;
        let addr = line
            .strip_prefix("LISTENING ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok((server, addr))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The bench control plane's node heartbeat timeout; agents heartbeat three times per timeout.
pub(crate) const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// `serve-control-plane`: what `flotilla-control-plane` runs, printing its address.
pub async fn serve_control_plane(data_dir: &Path) -> anyhow::Result<()> {
    raise_fd_limit();
    // As the shipped binary does.
    flotilla_control_plane::disable_transparent_huge_pages();
    let control_plane =
        flotilla_control_plane::ControlPlane::start(flotilla_control_plane::ServerConfig {
            listen: "127.0.0.1:0".parse()?,
            // As the shipped binary: its metrics endpoint serves (on a free port).
            metrics_listen: Some("127.0.0.1:0".parse()?),
            store: flotilla_control_plane::StoreBackend::Embedded,
            data_dir: data_dir.to_path_buf(),
            node_heartbeat_timeout: HEARTBEAT_TIMEOUT,
            node_startup_grace: Duration::from_secs(15),
            join_token: None,
            tls: None,
            shutdown_grace: Duration::from_secs(1),
            fetch_guard: flotilla_control_plane::FetchGuard::defaults(),
            user_auth: Default::default(),
            insecure_allow_anonymous: false,
        })
        .await?;
    println!("LISTENING {}", control_plane.addr());
    std::future::pending::<()>().await;
    Ok(())
}

/// `serve-agent`: what `flotilla-node-agent` runs, printing its admin address.
pub async fn serve_agent(argv: Vec<String>) -> anyhow::Result<()> {
    use clap::Parser;
    let args = flotilla_node_agent::config::Args::try_parse_from(
        std::iter::once("flotilla-node-agent".to_string()).chain(argv),
    )?;
    let config = flotilla_node_agent::config::Config::try_from(args)?;
    let agent = flotilla_node_agent::agent::Agent::start(config).await?;
    println!("LISTENING {}", agent.admin_addr());
    std::future::pending::<()>().await;
    Ok(())
}

/// Lets one process hold thousands of connections (soft limit up to the hard limit).
pub fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

pub(crate) async fn workloads_client(addr: SocketAddr) -> anyhow::Result<WorkloadsClient<Channel>> {
    Ok(WorkloadsClient::connect(format!("http://{addr}")).await?)
}

/// Pushes the idle guest; returns its digest.
pub(crate) async fn push_idle(client: &mut WorkloadsClient<Channel>) -> anyhow::Result<String> {
    push_module(client, wat::parse_str(IDLE_GUEST)?).await
}

/// Pushes `module` through the control plane; returns its digest.
pub(crate) async fn push_module(
    client: &mut WorkloadsClient<Channel>,
    module: Vec<u8>,
) -> anyhow::Result<String> {
    Ok(client
        .push_module(PushModuleRequest {
            module,
            sha256: String::new(),
            namespace: String::new(),
        })
        .await?
        .into_inner()
        .sha256)
}

pub(crate) async fn wait_nodes(
    client: &mut WorkloadsClient<Channel>,
    count: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let nodes = client
            .list_nodes(ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        if nodes.iter().filter(|n| n.ready).count() >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {} of {count} nodes registered", nodes.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn manifest(name: &str, sha256: &str, replicas: u64) -> Vec<u8> {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: {name}}}\n\
         spec: {{module: {{sha256: \"{sha256}\"}}, replicas: {replicas}, \
         resources: {{requests: {{memory: 64Ki}}, limits: {{memory: 1Mi}}}}}}\n"
    )
    .into_bytes()
}

/// Follows the watch until every named workload reports `ready` replicas ready.
async fn until_ready(
    watch: &mut tonic::Streaming<flotilla_proto::control::v1::WatchEvent>,
    want: &BTreeMap<String, u64>,
    limit: Duration,
) -> anyhow::Result<()> {
    let mut ready: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + limit;
    while want.iter().any(|(name, n)| ready.get(name) != Some(n)) {
        let event = tokio::time::timeout_at(deadline, watch.next())
            .await
            .map_err(|_| anyhow::anyhow!("not ready within {limit:?}: {ready:?}"))?
            .context("the watch ended")??;
        for object in event.objects {
            let workload: Workload = serde_json::from_slice(&object.json)?;
            let count = workload.status.map_or(0, |s| s.ready_replicas);
            ready.insert(workload.metadata.name, count);
        }
    }
    Ok(())
}

/// How long `e2e` waits for a workload to be ready.
const LIMIT: Duration = Duration::from_secs(120);

/// Applies each workload of `want` (name → idle replicas) and returns the time until the watch
/// shows all of them ready.
async fn apply_until_ready(
    client: &mut WorkloadsClient<Channel>,
    watch: &mut tonic::Streaming<flotilla_proto::control::v1::WatchEvent>,
    sha256: &str,
    want: &BTreeMap<String, u64>,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for (name, &n) in want {
        client
            .apply(ApplyRequest {
                manifest: manifest(name, sha256, n),
            })
            .await?;
    }
    until_ready(watch, want, limit).await?;
    Ok(started.elapsed())
}

/// Starts `count` node-agent processes against the control plane at `addr`, each with room
/// for `max_sandboxes`; returns them with their admin addresses.
pub(crate) fn spawn_agents(
    addr: SocketAddr,
    count: u32,
    max_sandboxes: u64,
) -> anyhow::Result<Vec<(Server, SocketAddr)>> {
    let any_port: SocketAddr = "127.0.0.1:0".parse()?;
    (0..count)
        .map(|i| spawn_agent(addr, &format!("bench-{i:02}"), max_sandboxes, any_port))
        .collect()
}

/// One agent process named `node` joining the control plane at `addr`, with its HTTP ingress
/// on `ingress`; returns it with its admin address.
pub(crate) fn spawn_agent(
    addr: SocketAddr,
    node: &str,
    max_sandboxes: u64,
    ingress: SocketAddr,
) -> anyhow::Result<(Server, SocketAddr)> {
    Server::spawn(&[
        "serve-agent".into(),
        "--".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--http-listen".into(),
        ingress.to_string(),
        "--control-plane".into(),
        format!("http://{addr}"),
        "--node-name".into(),
        node.into(),
        "--max-sandboxes".into(),
        max_sandboxes.to_string(),
        "--no-cache".into(),
    ])
}

/// `e2e`: apply → `replicas` running across `agents` agent processes.
pub async fn e2e(agents: u32, replicas: u64) -> anyhow::Result<()> {
    machine();
    let data = tempfile::tempdir()?;
    let (_control_plane, addr) = Server::spawn(&[
        "serve-control-plane".into(),
        "--data-dir".into(),
        data.path().to_string_lossy().into_owned(),
    ])?;
    let servers = spawn_agents(addr, agents, replicas.div_ceil(u64::from(agents)) * 2)?;
    let mut client = workloads_client(addr).await?;
    wait_nodes(&mut client, agents as usize).await?;
    let sha256 = push_idle(&mut client).await?;

    let mut watch = client.watch(WatchRequest::default()).await?.into_inner();
    let want = |n: u64| BTreeMap::from([("e2e".to_string(), n)]);
    let elapsed = apply_until_ready(&mut client, &mut watch, &sha256, &want(replicas), LIMIT)
        .await?
        .as_secs_f64();
    result("e2e_agents", f64::from(agents), "agents");
    result("e2e_replicas", replicas as f64, "replicas");
    result("e2e_apply_to_ready", elapsed, "s");
    result(
        "e2e_replicas_ready_per_second",
        replicas as f64 / elapsed,
        "replicas/s",
    );

    // Scaling up by half again, with the module already compiled everywhere.
    let scaled = replicas + replicas / 2;
    let took = apply_until_ready(&mut client, &mut watch, &sha256, &want(scaled), LIMIT).await?;
    result("e2e_scale_up_to_ready", took.as_secs_f64(), "s");
    drop(servers);
    Ok(())
}

/// One simulated agent: registers, holds a session, reports its desired replicas as running.
async fn simulated_agent(
    channel: Channel,
    node: String,
    sandboxes: u64,
    placed: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut client = AgentsClient::new(channel);
    let registered = client
        .register(RegisterRequest {
            node_name: node.clone(),
            agent_id: format!("sim-{node}"),
            // Each simulated agent is its own installation, with its own credential.
            node_credential: flotilla_node_agent::control::identity::generate(),
            arch: "amd64".into(),
            os: "linux".into(),
            allocatable: Some(NodeResources {
                memory_bytes: 64 << 30,
                cpu_millis: 64_000,
                sandboxes,
            }),
            ..RegisterRequest::default()
        })
        .await?
        .into_inner();
    let (up, rx) = mpsc::channel(4);
    up.send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node_name: node,
            session_id: registered.session_id,
        })),
    })
    .await?;
    let mut down = client.session(ReceiverStream::new(rx)).await?.into_inner();
    // Agent workload name → (workload key, generation, replicas).
    let mut desired: BTreeMap<String, (String, u64, u32)> = BTreeMap::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(
        registered.heartbeat_interval_ms.max(50),
    ));
    loop {
        let send_now = tokio::select! {
            _ = ticker.tick() => true,
            message = down.next() => {
                let Some(ControlMessage { kind: Some(control_message::Kind::Desired(d)) }) =
                    message.transpose()?
                else {
                    continue;
                };
                let before: u64 = desired.values().map(|(_, _, n)| u64::from(*n)).sum();
                if !d.incremental {
                    desired.clear();
                }
                for name in d.removed {
                    desired.remove(&name);
                }
                for w in d.workloads {
                    if let Some(spec) = w.spec {
                        desired.insert(spec.name, (w.key, spec.generation, spec.replicas));
                    }
                }
                let after: u64 = desired.values().map(|(_, _, n)| u64::from(*n)).sum();
                if after >= before {
                    placed.fetch_add(after - before, Ordering::Relaxed);
                } else {
                    placed.fetch_sub(before - after, Ordering::Relaxed);
                }
                true
            }
        };
        if send_now {
            let workloads = desired
                .values()
                .map(|(key, generation, replicas)| WorkloadCounts {
                    key: key.clone(),
                    generation: *generation,
                    running: *replicas,
                    available: *replicas,
                    ..WorkloadCounts::default()
                })
                .collect();
            up.send(AgentMessage {
                kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
                    workloads,
                    events: vec![],
                })),
            })
            .await?;
        }
    }
}

/// RSS in bytes and CPU time in seconds (user + system) of a process, from `/proc`.
fn process_usage(pid: u32) -> anyhow::Result<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((rss_kib * 1024, ticks as f64 / hz))
}

/// `fleet`: `agents` simulated agents holding `per_agent` replicas each.
pub async fn fleet(agents: u32, per_agent: u64, steady: Duration) -> anyhow::Result<()> {
    machine();
    raise_fd_limit();
    let data = tempfile::tempdir()?;
    let (control_plane, addr) = Server::spawn(&[
        "serve-control-plane".into(),
        "--data-dir".into(),
        data.path().to_string_lossy().into_owned(),
    ])?;
    let (idle_rss, _) = process_usage(control_plane.pid())?;

    let placed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..agents {
        // One connection per agent, as real agents have.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        tasks.spawn(simulated_agent(
            channel,
            format!("sim-{i:05}"),
            per_agent,
            placed.clone(),
        ));
    }
    let mut client = workloads_client(addr).await?;
    wait_nodes(&mut client, agents as usize).await?;
    result("fleet_agents_connect", started.elapsed().as_secs_f64(), "s");

    // Workloads of mixed sizes filling every node.
    let total = u64::from(agents) * per_agent;
    let sha256 = push_idle(&mut client).await?;
    let sizes = [total / 2, total / 4, total / 8, total / 16];
    let mut want = BTreeMap::new();
    let mut left = total;
    let mut i = 0;
    while left > 0 {
        let n = sizes.get(i).copied().unwrap_or(100).min(left).max(1);
        want.insert(format!("fleet-{i}"), n);
        left -= n;
        i += 1;
    }
    let mut watch = client.watch(WatchRequest::default()).await?.into_inner();
    let to_ready = apply_until_ready(
        &mut client,
        &mut watch,
        &sha256,
        &want,
        Duration::from_secs(300),
    )
    .await?
    .as_secs_f64();
    if placed.load(Ordering::Relaxed) != total {
        bail!(
            "agents hold {} replicas, not {total}",
            placed.load(Ordering::Relaxed)
        );
    }

    // Steady state: heartbeats only.
    let (_, cpu_before) = process_usage(control_plane.pid())?;
    let steady_started = Instant::now();
    tokio::time::sleep(steady).await;
    let (rss, cpu_after) = process_usage(control_plane.pid())?;
    let cpu_percent = (cpu_after - cpu_before) / steady_started.elapsed().as_secs_f64() * 100.0;
    if let Some(Ok(Err(error))) = tasks.try_join_next() {
        bail!("a simulated agent failed: {error:#}");
    }
    result("fleet_agents", f64::from(agents), "agents");
    result("fleet_replicas", total as f64, "replicas");
    result("fleet_workloads", want.len() as f64, "workloads");
    result("fleet_apply_to_ready", to_ready, "s");
    result(
        "fleet_control_plane_rss_idle",
        idle_rss as f64 / 1048576.0,
        "MiB",
    );
    result("fleet_control_plane_rss", rss as f64 / 1048576.0, "MiB");
    result("fleet_control_plane_cpu_steady", cpu_percent, "%");
    tasks.abort_all();
    Ok(())
}
