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
//! - the same neighbour start latency and heartbeats beside `--spinners` guests that spin
//!   without end (1,000 by default), against the quiet p99.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_control_plane::model::Workload;
use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{
    ApplyRequest, ListNodesRequest, PushModuleRequest, WatchEvent, WatchRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::cluster::{HEARTBEAT_TIMEOUT, Server, push_idle, spawn_agents, wait_nodes};
use crate::{machine, result};

/// Neighbours applied in each phase, at most.
const NEIGHBOURS: usize = 40;
/// Time between two neighbours' applies.
const CADENCE: Duration = Duration::from_millis(200);
/// Functions of the costly module.
const COSTLY_FUNCTIONS: usize = 100_000;

/// A guest that spins without end.
const SPIN_GUEST: &str = include_str!("../../node-agent/tests/fixtures/spin.wat");
/// Neighbours applied beside the spinning guests.
const SPINNING_NEIGHBOURS: usize = 20;

/// `isolation`: neighbour start latency beside a costly compile and beside `spinners` spinning
/// guests, and the agent's heartbeats meanwhile.
pub async fn isolation(spinners: u64) -> anyhow::Result<()> {
    machine();
    let data = tempfile::tempdir()?;
    let (_control_plane, addr) = Server::spawn(&[
        "serve-control-plane".into(),
        "--data-dir".into(),
        data.path().to_string_lossy().into_owned(),
    ])?;
    let _agent = spawn_agents(addr, 1, 10_000)?;
    let mut client = crate::cluster::workloads_client(addr).await?;
    wait_nodes(&mut client, 1).await?;
    let idle = push_idle(&mut client).await?;
    let mut watch = client.watch(WatchRequest {}).await?.into_inner();
    let mut ready = Ready::default();

    // The neighbours' module compiled once, before anything is timed.
    apply(&mut client, "warm-up", &idle).await?;
    ready.wait(&mut watch, "warm-up").await?;

    let quiet = neighbours(&mut client, &mut watch, &mut ready, &idle, "quiet", || {
        false
    })
    .await?;

    let costly = costly_module()?;
    let costly_bytes = costly.len();
    let sha = client
        .push_module(PushModuleRequest {
            module: costly,
            sha256: String::new(),
        })
        .await?
        .into_inner()
        .sha256;
    let (compile_done, done) = tokio::sync::watch::channel(false);
    let heartbeats = tokio::spawn(sample_heartbeats(client.clone(), done.clone()));
    let compile_started = Instant::now();
    apply(&mut client, "costly", &sha).await?;
    let mut costly_watch = client.watch(WatchRequest {}).await?.into_inner();
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
    let spin = client
        .push_module(PushModuleRequest {
            module: wat::parse_str(SPIN_GUEST)?,
            sha256: String::new(),
        })
        .await?
        .into_inner()
        .sha256;
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
    let _ = spinning_done.send(true);
    let samples = heartbeats.await?;
    let spinning_p99 = p99(&spinning);
    let mut sorted = spinning.clone();
    sorted.sort_by(f64::total_cmp);
    result(
        "isolation_neighbour_start_p50_beside_spinners",
        sorted[sorted.len() / 2] * 1e3,
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
    Ok(())
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
