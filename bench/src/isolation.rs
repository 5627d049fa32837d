//! `isolation`: how much one tenant's work disturbs its neighbours on one agent.
//!
//! A control plane and one node agent, each its own process (as `e2e`), and:
//! - neighbour start latency: one-replica workloads of an already compiled module, applied one
//!   every 200 ms, each timed from apply to the status saying its replica runs; first with
//!   nothing else happening, then while a generated module of 100,000 functions (1.3 MB, as
//!   a hostile tenant would send) compiles on the same agent. The figure is the ratio of the
//!   two p99s.
//! - the agent's heartbeats as the control plane sees them during that compile, sampled every
//!   50 ms: the oldest heartbeat age, the heartbeats missed (an age of two intervals is one
//!   missed) and the times the node turned NotReady.
//! - the same neighbour start latency while another tenant churns workloads: it applies
//!   `--burst` one-replica workloads (200 by default) at once, waits until they run, deletes them all at once,
//!   waits until they are gone, and again, as a CI pipeline might. Each of those is several
//!   store writes and placements in the control plane, which the neighbours share.
//! - the same neighbour start latency and heartbeats beside `--spinners` guests that spin
//!   without end (1,000 by default), against the quiet p99.
//! - healthy HTTP requests (a wasi:http guest, a fresh sandbox per request, each request on a
//!   fresh connection, sent at a fixed rate whatever the answers' latency) beside the
//!   spinners: the p99 from connect to the whole response, against the same load when quiet.
//! - the CPU split of two spinning workloads whose replicas request 100m and 300m, each with
//!   more replicas than the agent has guest threads: the CPU each used over a window, read
//!   from the agent's sandbox status. The target is 1:3.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_control_plane::model::Workload;
use flotilla_proto::agent::v1::ListSandboxesRequest;
use flotilla_proto::agent::v1::agent_admin_client::AgentAdminClient;
use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{
    ApplyRequest, DeleteRequest, ListNodesRequest, ListRequest, WatchEvent, WatchRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::cluster::{HEARTBEAT_TIMEOUT, Server, push_idle, push_module, spawn_agent, wait_nodes};
use crate::http::free_port;
use crate::{machine, result};

/// Neighbours applied in each phase, at most.
const NEIGHBOURS: usize = 40;
/// Time between two neighbours' applies.
const CADENCE: Duration = Duration::from_millis(200);
/// Functions of the costly module.
const COSTLY_FUNCTIONS: usize = 100_000;

/// Its applies and deletes in flight at once.
const BURST_CONCURRENCY: usize = 32;
/// Neighbours applied while it churns.
const CHURN_NEIGHBOURS: usize = 20;

/// A guest that spins without end.
const SPIN_GUEST: &str = include_str!("../../node-agent/tests/fixtures/spin.wat");
/// Neighbours applied beside the spinning guests.
const SPINNING_NEIGHBOURS: usize = 20;

/// The wasi:http guest that answers the healthy requests.
const HTTP_GUEST: &[u8] = include_bytes!("../../examples/guests/http/hello.wasm");
/// Healthy HTTP requests sent per second, and for how long.
const HTTP_RATE: u32 = 200;
const HTTP_DURATION: Duration = Duration::from_secs(5);
/// Longest a healthy request may take before the run fails.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The two workloads whose CPU split is measured: their replicas' `requests.cpu`.
const SPLIT: [(&str, u64); 2] = [("light", 100), ("heavy", 300)];
/// Replicas of each: more than a 2-CPU agent's guest threads, so that they contend.
const SPLIT_REPLICAS: u64 = 4;
/// How long the split is measured, after they all run.
const SPLIT_WINDOW: Duration = Duration::from_secs(10);

/// `isolation`: neighbour start latency beside a costly compile and beside `spinners` spinning
/// guests and beside a tenant churning `burst` workloads at once, and the agent's heartbeats
/// meanwhile.
pub async fn isolation(spinners: u64, burst: usize) -> anyhow::Result<()> {
    machine();
    let data = tempfile::tempdir()?;
    let (_control_plane, addr) = Server::spawn(&[
        "serve-control-plane".into(),
        "--data-dir".into(),
        data.path().to_string_lossy().into_owned(),
    ])?;
    let ingress = free_port()?;
    let (_agent, admin) = spawn_agent(addr, "bench-00", 10_000, ingress)?;
    let mut client = crate::cluster::workloads_client(addr).await?;
    wait_nodes(&mut client, 1).await?;
    let idle = push_idle(&mut client).await?;
    let mut watch = client.watch(WatchRequest::default()).await?.into_inner();
    let mut ready = Ready::default();

    // The neighbours' module compiled once, before anything is timed.
    apply(&mut client, "warm-up", &idle).await?;
    ready.wait(&mut watch, "warm-up").await?;

    let quiet = neighbours(&mut client, &mut watch, &mut ready, &idle, "quiet", || {
        false
    })
    .await?;
    // Beside a tenant that churns workloads.
    let (stop_churn, stopped) = tokio::sync::watch::channel(false);
    let churn = tokio::spawn(churn(client.clone(), idle.clone(), burst, stopped));
    let mut count = 0;
    let churning = neighbours(&mut client, &mut watch, &mut ready, &idle, "churn", || {
        count += 1;
        count > CHURN_NEIGHBOURS
    })
    .await?;
    let _ = stop_churn.send(true);
    let (churned, churn_time) = churn.await??;
    result(
        "isolation_churned_workloads_per_s",
        churned as f64 / churn_time.as_secs_f64(),
        "workloads/s",
    );
    result(
        "isolation_neighbour_start_p99_churning",
        p99(&churning) * 1e3,
        "ms",
    );
    result(
        "isolation_neighbour_start_p99_ratio_churning",
        p99(&churning) / p99(&quiet),
        "x",
    );

    let http_sha = push_module(&mut client, HTTP_GUEST.to_vec()).await?;
    client
        .apply(ApplyRequest {
            manifest: format!(
                "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: web}}\n\
                 spec: {{module: {{sha256: \"{http_sha}\"}}, http: {{pathPrefix: /}}, \
                 resources: {{limits: {{memory: 4Mi}}}}}}\n"
            )
            .into_bytes(),
        })
        .await?;
    ready.wait(&mut watch, "web").await?;
    http_latencies(ingress).await?;
    let http_quiet = http_latencies(ingress).await?;

    let costly = costly_module()?;
    let costly_bytes = costly.len();
    let sha = push_module(&mut client, costly).await?;
    let (compile_done, done) = tokio::sync::watch::channel(false);
    let heartbeats = tokio::spawn(sample_heartbeats(client.clone(), done.clone()));
    let compile_started = Instant::now();
    apply(&mut client, "costly", &sha).await?;
    let mut costly_watch = client.watch(WatchRequest::default()).await?.into_inner();
    let compiled = tokio::spawn(async move {
        let mut ready = Ready::default();
        let outcome = ready.wait(&mut costly_watch, "costly").await;
        let _ = compile_done.send(true);
        outcome.map(|()| compile_started.elapsed())
    });
    let busy = neighbours(&mut client, &mut watch, &mut ready, &idle, "busy", || {
        *done.borrow()
    })
    .await?;
    let compile_time = compiled.await??;
    let samples = heartbeats.await?;
    if samples.is_empty() {
        bail!("no heartbeat samples");
    }

    result(
        "isolation_costly_module_functions",
        COSTLY_FUNCTIONS as f64,
        "functions",
    );
    result(
        "isolation_costly_module_bytes",
        costly_bytes as f64,
        "bytes",
    );
    result(
        "isolation_costly_compile_to_ready",
        compile_time.as_secs_f64(),
        "s",
    );
    result(
        "isolation_neighbours_quiet",
        quiet.len() as f64,
        "workloads",
    );
    result(
        "isolation_neighbours_during_compile",
        busy.len() as f64,
        "workloads",
    );
    let (quiet_p99, busy_p99) = (p99(&quiet), p99(&busy));
    result("isolation_neighbour_start_p99_quiet", quiet_p99 * 1e3, "ms");
    result(
        "isolation_neighbour_start_p99_during_compile",
        busy_p99 * 1e3,
        "ms",
    );
    result(
        "isolation_neighbour_start_p99_ratio",
        busy_p99 / quiet_p99,
        "x",
    );
    let interval = HEARTBEAT_TIMEOUT / 3;
    result(
        "isolation_heartbeat_interval",
        interval.as_secs_f64() * 1e3,
        "ms",
    );
    report_heartbeats(&samples, interval, "");

    // Beside guests that spin without end.
    let spin = push_module(&mut client, wat::parse_str(SPIN_GUEST)?).await?;
    let manifest = format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: spinners}}\n\
         spec: {{module: {{sha256: \"{spin}\"}}, replicas: {spinners}, \
         resources: {{requests: {{memory: 64Ki}}, limits: {{memory: 1Mi}}}}}}\n"
    );
    client
        .apply(ApplyRequest {
            manifest: manifest.into_bytes(),
        })
        .await?;
    ready.wait_for(&mut watch, "spinners", spinners).await?;
    let (spinning_done, done) = tokio::sync::watch::channel(false);
    let heartbeats = tokio::spawn(sample_heartbeats(client.clone(), done));
    let mut count = 0;
    let spinning = neighbours(
        &mut client,
        &mut watch,
        &mut ready,
        &idle,
        "spinning",
        || {
            count += 1;
            count > SPINNING_NEIGHBOURS
        },
    )
    .await?;
    let http_spinning = http_latencies(ingress).await?;
    let _ = spinning_done.send(true);
    let samples = heartbeats.await?;
    let spinning_p99 = p99(&spinning);
    result(
        "isolation_neighbour_start_p50_beside_spinners",
        p50(&spinning) * 1e3,
        "ms",
    );
    result("isolation_spinners", spinners as f64, "sandboxes");
    result(
        "isolation_neighbour_start_p99_beside_spinners",
        spinning_p99 * 1e3,
        "ms",
    );
    result(
        "isolation_neighbour_start_p99_ratio_spinners",
        spinning_p99 / quiet_p99,
        "x",
    );
    report_heartbeats(&samples, interval, "_spinners");
    result("isolation_http_rate", f64::from(HTTP_RATE), "req/s");
    for (latencies, phase) in [(&http_quiet, "quiet"), (&http_spinning, "beside_spinners")] {
        result(
            &format!("isolation_http_p50_{phase}"),
            p50(latencies) * 1e3,
            "ms",
        );
        result(
            &format!("isolation_http_p99_{phase}"),
            p99(latencies) * 1e3,
            "ms",
        );
    }
    result(
        "isolation_http_p99_ratio_spinners",
        p99(&http_spinning) / p99(&http_quiet),
        "x",
    );

    client
        .delete(DeleteRequest {
            namespace: String::new(),
            name: "spinners".into(),
        })
        .await?;
    let [light, heavy] = cpu_split(&mut client, &mut watch, &mut ready, &spin, admin).await?;
    result("isolation_cpu_split_light", light as f64, "ms");
    result("isolation_cpu_split_heavy", heavy as f64, "ms");
    let ratio = light as f64 / heavy as f64;
    let target = SPLIT[0].1 as f64 / SPLIT[1].1 as f64;
    result("isolation_cpu_split_ratio", ratio, "x");
    result(
        "isolation_cpu_split_error",
        (ratio / target - 1.0).abs() * 100.0,
        "%",
    );
    Ok(())
}

/// Applies `burst` one-replica workloads of `sha` in the namespace `burst` at once, waits
/// until they all run, deletes them at once, waits until they are gone, and again, until
/// `stop`; returns the workloads it ran and the time it took.
async fn churn(
    mut client: WorkloadsClient<Channel>,
    sha: String,
    burst: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(usize, Duration)> {
    let started = Instant::now();
    let mut churned = 0;
    for round in 0.. {
        if *stop.borrow_and_update() {
            break;
        }
        let applies = (0..burst).map(|i| {
            let mut client = client.clone();
            let manifest = format!(
                "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\n\
                 metadata: {{name: burst-{round}-{i:03}, namespace: burst}}\n\
                 spec: {{module: {{sha256: \"{sha}\"}}, replicas: 1, \
                 resources: {{requests: {{memory: 64Ki}}, limits: {{memory: 1Mi}}}}}}\n"
            );
            async move {
                client
                    .apply(ApplyRequest {
                        manifest: manifest.into_bytes(),
                    })
                    .await
            }
        });
        for outcome in all(applies).await {
            outcome.context("the churning tenant's apply")?;
        }
        wait_namespace(&mut client, "burst", |workloads| {
            workloads.len() == burst
                && workloads
                    .iter()
                    .all(|w| w.status.as_ref().is_some_and(|s| s.ready_replicas == 1))
        })
        .await?;
        let deletes = (0..burst).map(|i| {
            let mut client = client.clone();
            async move {
                client
                    .delete(DeleteRequest {
                        namespace: "burst".into(),
                        name: format!("burst-{round}-{i:03}"),
                    })
                    .await
            }
        });
        for outcome in all(deletes).await {
            outcome.context("the churning tenant's delete")?;
        }
        wait_namespace(&mut client, "burst", <[Workload]>::is_empty).await?;
        churned += burst;
    }
    Ok((churned, started.elapsed()))
}

/// Runs `requests`, [`BURST_CONCURRENCY`] at a time; returns their outcomes.
async fn all<T>(requests: impl Iterator<Item = impl Future<Output = T>>) -> Vec<T> {
    let running =
        futures::StreamExt::buffer_unordered(futures::stream::iter(requests), BURST_CONCURRENCY);
    futures::StreamExt::collect(running).await
}

/// Polls `namespace`'s workloads until `done` says so, for at most two minutes.
async fn wait_namespace(
    client: &mut WorkloadsClient<Channel>,
    namespace: &str,
    done: impl Fn(&[Workload]) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let workloads = client
            .list(ListRequest {
                namespace: namespace.into(),
            })
            .await?
            .into_inner()
            .items
            .iter()
            .map(|object| serde_json::from_slice(&object.json))
            .collect::<Result<Vec<Workload>, _>>()?;
        if done(&workloads) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{namespace} not as awaited after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `GET /` to the ingress at `addr`, [`HTTP_RATE`] times a second for [`HTTP_DURATION`],
/// each on a fresh connection and whether or not earlier ones were answered; returns each
/// request's time from connect to the whole response. Any failure fails the run.
async fn http_latencies(addr: SocketAddr) -> anyhow::Result<Vec<f64>> {
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / HTTP_RATE);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let count = u64::from(HTTP_RATE) * HTTP_DURATION.as_secs();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..count {
        ticker.tick().await;
        requests.spawn(tokio::time::timeout(HTTP_TIMEOUT, timed_get(addr)));
    }
    let mut times = Vec::new();
    while let Some(time) = requests.join_next().await {
        times.push(time?.context("a healthy request took over 10 s")??);
    }
    Ok(times)
}

/// One `GET /` on a fresh connection: its time from connect to the whole response.
async fn timed_get(addr: SocketAddr) -> anyhow::Result<f64> {
    use http_body_util::{BodyExt, Empty};
    let started = Instant::now();
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/")
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "GET / answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Runs the two [`SPLIT`] workloads of the spinning module `spin` and returns the CPU each
/// used over [`SPLIT_WINDOW`], in milliseconds, as the agent at `admin` reports it.
async fn cpu_split(
    client: &mut WorkloadsClient<Channel>,
    watch: &mut tonic::Streaming<WatchEvent>,
    ready: &mut Ready,
    spin: &str,
    admin: SocketAddr,
) -> anyhow::Result<[u64; 2]> {
    for (name, millicores) in SPLIT {
        let manifest = format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: {name}}}\n\
             spec: {{module: {{sha256: \"{spin}\"}}, replicas: {SPLIT_REPLICAS}, \
             resources: {{requests: {{cpu: {millicores}m, memory: 64Ki}}, \
             limits: {{memory: 1Mi}}}}}}\n"
        );
        client
            .apply(ApplyRequest {
                manifest: manifest.into_bytes(),
            })
            .await?;
    }
    for (name, _) in SPLIT {
        ready.wait_for(watch, name, SPLIT_REPLICAS).await?;
    }
    let mut admin = AgentAdminClient::connect(format!("http://{admin}")).await?;
    // Until the deleted spinners have all stopped, the split is not theirs alone.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cpu_by_workload(&mut admin).await?.contains_key("spinners") {
        if Instant::now() > deadline {
            bail!("the spinners did not stop within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = cpu_by_workload(&mut admin).await?;
    tokio::time::sleep(SPLIT_WINDOW).await;
    let after = cpu_by_workload(&mut admin).await?;
    let used = |name: &str| {
        after
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.get(name).copied().unwrap_or(0))
    };
    Ok([used(SPLIT[0].0), used(SPLIT[1].0)])
}

/// CPU used by the running sandboxes of each workload, in milliseconds.
async fn cpu_by_workload(
    admin: &mut AgentAdminClient<Channel>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let sandboxes = admin
        .list_sandboxes(ListSandboxesRequest::default())
        .await?
        .into_inner()
        .sandboxes;
    let mut used = BTreeMap::new();
    for sandbox in sandboxes
        .into_iter()
        .filter(|s| s.phase() == flotilla_proto::agent::v1::SandboxPhase::Running)
    {
        // The agent keys workloads `<namespace>.<name>-<spec hash>`.
        let key = sandbox.workload.as_str();
        let name = key.split_once('.').map_or(key, |(_, rest)| rest);
        let name = name.rsplit_once('-').map_or(name, |(name, _)| name);
        *used.entry(name.to_string()).or_default() += sandbox.cpu_used_ms;
    }
    Ok(used)
}

/// Prints the oldest heartbeat, the heartbeats missed (an age of two intervals is one) and the
/// NotReady transitions in `samples`, with `suffix` on each metric's name.
fn report_heartbeats(samples: &[Sample], interval: Duration, suffix: &str) {
    let oldest = samples.iter().map(|s| s.age).max().unwrap_or_default();
    let missed = (oldest.as_millis() / interval.as_millis()).saturating_sub(1);
    let not_ready = samples
        .windows(2)
        .filter(|w| w[0].ready && !w[1].ready)
        .count();
    let age = oldest.as_secs_f64() * 1e3;
    result(&format!("isolation_heartbeat_age_max{suffix}"), age, "ms");
    result(
        &format!("isolation_heartbeats_missed{suffix}"),
        missed as f64,
        "heartbeats",
    );
    result(
        &format!("isolation_not_ready_transitions{suffix}"),
        not_ready as f64,
        "transitions",
    );
}

/// One sample of the agent's node as the control plane lists it.
struct Sample {
    ready: bool,
    age: Duration,
}

/// Samples the (only) node every 50 ms until `done` turns true.
async fn sample_heartbeats(
    mut client: WorkloadsClient<Channel>,
    done: tokio::sync::watch::Receiver<bool>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    while !*done.borrow() {
        ticker.tick().await;
        let Ok(nodes) = client.list_nodes(ListNodesRequest {}).await else {
            continue;
        };
        if let Some(node) = nodes.into_inner().nodes.first() {
            samples.push(Sample {
                ready: node.ready,
                age: Duration::from_millis(node.last_heartbeat_age_ms),
            });
        }
    }
    samples
}

/// Applies one-replica neighbours of the compiled module every [`CADENCE`] until `stop` says
/// so or [`NEIGHBOURS`] ran; returns each one's apply → running time.
async fn neighbours(
    client: &mut WorkloadsClient<Channel>,
    watch: &mut tonic::Streaming<WatchEvent>,
    ready: &mut Ready,
    sha: &str,
    prefix: &str,
    mut stop: impl FnMut() -> bool,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for i in 0..NEIGHBOURS {
        if stop() {
            break;
        }
        let name = format!("{prefix}-{i:03}");
        let started = Instant::now();
        apply(client, &name, sha).await?;
        ready.wait(watch, &name).await?;
        times.push(started.elapsed().as_secs_f64());
        tokio::time::sleep(CADENCE).await;
    }
    if times.is_empty() {
        bail!("no {prefix} neighbour ran");
    }
    Ok(times)
}

async fn apply(client: &mut WorkloadsClient<Channel>, name: &str, sha: &str) -> anyhow::Result<()> {
    let manifest = format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: {name}}}\n\
         spec: {{module: {{sha256: \"{sha}\"}}, replicas: 1, \
         resources: {{requests: {{memory: 64Ki}}, limits: {{memory: 1Mi}}}}}}\n"
    );
    client
        .apply(ApplyRequest {
            manifest: manifest.into_bytes(),
        })
        .await
        .with_context(|| format!("applying {name}"))?;
    Ok(())
}

/// Ready replicas per workload, as the watch has shown them.
#[derive(Default)]
struct Ready(BTreeMap<String, u64>);

impl Ready {
    /// Follows `watch` until `name` has a ready replica.
    async fn wait(
        &mut self,
        watch: &mut tonic::Streaming<WatchEvent>,
        name: &str,
    ) -> anyhow::Result<()> {
        self.wait_for(watch, name, 1).await
    }

    /// Follows `watch` until `name` has `replicas` ready.
    async fn wait_for(
        &mut self,
        watch: &mut tonic::Streaming<WatchEvent>,
        name: &str,
        replicas: u64,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while self.0.get(name).copied().unwrap_or(0) < replicas {
            let event = tokio::time::timeout_at(deadline, watch.next())
                .await
                .map_err(|_| anyhow::anyhow!("{name} not ready within 300 s"))?
                .context("the watch ended")??;
            for object in event.objects {
                let workload: Workload = serde_json::from_slice(&object.json)?;
                let count = workload.status.map_or(0, |s| s.ready_replicas);
                self.0.insert(workload.metadata.name, count);
            }
        }
        Ok(())
    }
}

/// The middle of `times` (the upper one of an even count).
fn p50(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The 99th percentile of `times` (the largest below 100 samples).
fn p99(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() as f64) * 0.99).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

/// A command module of [`COSTLY_FUNCTIONS`] small functions: 1.3 MB that Cranelift takes
/// seconds to compile.
/// Its `_start` is the idle guest's, so that once running it sleeps like its neighbours.
fn costly_module() -> anyhow::Result<Vec<u8>> {
    let idle = crate::IDLE_GUEST;
    let body = idle
        .find("(memory")
        .and_then(|start| idle.rfind(')').map(|end| &idle[start..end]))
        .context("the idle guest has a memory and a body")?;
    let mut wat = String::with_capacity(COSTLY_FUNCTIONS * 80);
    wat.push_str(
        "(module (import \"wasi_snapshot_preview1\" \"poll_oneoff\" \
         (func $poll (param i32 i32 i32 i32) (result i32)))",
    );
    for i in 0..COSTLY_FUNCTIONS {
        wat.push_str(&format!(
            "(func (param i32) (result i32) local.get 0 i32.const {i} i32.mul)"
        ));
    }
    wat.push_str(body);
    wat.push(')');
    Ok(wat::parse_str(&wat)?)
}
