//! `rollout`: a rolling update of one workload across node-agent processes.
//!
//! A control plane and N agents (real processes, real gRPC on loopback) run R idle replicas;
//! then the template changes (new arguments) and the benchmark times the update until the
//! status says every replica runs the new revision and is available. Throughout, it samples
//! the running sandboxes from every agent's admin API (all agents at once, every few
//! milliseconds) and the `readyReplicas` the control plane reports, and prints the lowest
//! fraction of the replica count seen by each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_control_plane::model::Workload;
use flotilla_proto::agent::v1::ListSandboxesRequest;
use flotilla_proto::agent::v1::SandboxPhase;
use flotilla_proto::agent::v1::agent_admin_client::AgentAdminClient;
use flotilla_proto::control::v1::{ApplyRequest, WatchRequest};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::cluster::{Server, push_idle, spawn_agents, wait_nodes, workloads_client};
use crate::{machine, result};

/// How long the rollout may take before the benchmark gives up.
const LIMIT: Duration = Duration::from_secs(120);

fn manifest(sha256: &str, replicas: u64, version: &str, surge: &str, unavailable: &str) -> Vec<u8> {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: rollout}}\n\
         spec: {{module: {{sha256: \"{sha256}\"}}, args: [{version}], replicas: {replicas}, \
         resources: {{requests: {{memory: 64Ki}}, limits: {{memory: 1Mi}}}}, \
         strategy: {{rollingUpdate: {{maxSurge: \"{surge}\", maxUnavailable: \"{unavailable}\"}}}}}}\n"
    )
    .into_bytes()
}

/// Whether every replica runs revision `revision` and is available.
fn rolled_out(workload: &Workload, revision: u64, replicas: u64) -> bool {
    workload.status.as_ref().is_some_and(|s| {
        s.revision == revision
            && s.updated_replicas == replicas
            && s.replicas == replicas
            && s.available_replicas == replicas
    })
}

/// Running sandboxes over every agent, asked all at once.
async fn running(admins: &[AgentAdminClient<Channel>]) -> anyhow::Result<u64> {
    let calls = admins.iter().cloned().map(|mut admin| async move {
        admin
            .list_sandboxes(ListSandboxesRequest::default())
            .await
            .map(|r| {
                r.into_inner()
                    .sandboxes
                    .iter()
                    .filter(|s| s.phase == SandboxPhase::Running as i32)
                    .count() as u64
            })
    });
    let counts = futures::future::try_join_all(calls).await?;
    Ok(counts.iter().sum())
}

/// `rollout`: time to move `replicas` across `agents` to a new revision, and the lowest ready
/// fraction on the way.
pub async fn rollout(
    agents: u32,
    replicas: u64,
    surge: &str,
    unavailable: &str,
) -> anyhow::Result<()> {
    machine();
    let data = tempfile::tempdir()?;
    let (_control_plane, addr) = Server::spawn(&[
        "serve-control-plane".into(),
        "--data-dir".into(),
        data.path().to_string_lossy().into_owned(),
    ])?;
    let per_agent = replicas.div_ceil(u64::from(agents));
    let servers = spawn_agents(addr, agents, per_agent * 2)?;
    let mut admins = Vec::new();
    for (_, admin) in &servers {
        let admin: SocketAddr = *admin;
        admins.push(AgentAdminClient::connect(format!("http://{admin}")).await?);
    }
    let mut client = workloads_client(addr).await?;
    wait_nodes(&mut client, agents as usize).await?;
    let sha256 = push_idle(&mut client).await?;
    let mut watch = client.watch(WatchRequest {}).await?.into_inner();
    let next = async |watch: &mut tonic::Streaming<_>| -> anyhow::Result<Vec<Workload>> {
        let event: flotilla_proto::control::v1::WatchEvent =
            tokio::time::timeout(LIMIT, watch.next())
                .await
                .context("no status change within the limit")?
                .context("the watch ended")??;
        event
            .objects
            .iter()
            .map(|o| Ok(serde_json::from_slice(&o.json)?))
            .collect()
    };

    client
        .apply(ApplyRequest {
            manifest: manifest(&sha256, replicas, "v1", surge, unavailable),
        })
        .await?;
    'first: loop {
        for workload in next(&mut watch).await? {
            if rolled_out(&workload, 1, replicas) {
                break 'first;
            }
        }
    }

    // Sample the agents until the update is done.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut lowest, mut samples) = (u64::MAX, 0u64);
            while !stop.load(Ordering::Relaxed) {
                lowest = lowest.min(running(&admins).await?);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok((lowest, samples))
        })
    };
    let started = Instant::now();
    client
        .apply(ApplyRequest {
            manifest: manifest(&sha256, replicas, "v2", surge, unavailable),
        })
        .await?;
    let mut lowest_status = replicas;
    'update: loop {
        for workload in next(&mut watch).await? {
            let status = workload.status.clone().unwrap_or_default();
            lowest_status = lowest_status.min(status.ready_replicas);
            if rolled_out(&workload, 2, replicas) {
                break 'update;
            }
        }
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (lowest_sampled, samples) = sampler.await??;

    result("rollout_agents", f64::from(agents), "agents");
    result("rollout_replicas", replicas as f64, "replicas");
    result("rollout_seconds", took.as_secs_f64(), "s");
    result(
        "rollout_min_ready_fraction_sampled",
        lowest_sampled as f64 / replicas as f64,
        "fraction",
    );
    result("rollout_agent_samples", samples as f64, "samples");
    result(
        "rollout_min_ready_fraction_status",
        lowest_status as f64 / replicas as f64,
        "fraction",
    );
    drop(servers);
    Ok(())
}
