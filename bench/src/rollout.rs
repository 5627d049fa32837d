//! `rollout`: a rolling update of one workload across node-agent processes.
//!
//! A control plane and N agents (real processes, real gRPC on loopback) run R idle replicas;
//! then the template changes (new arguments) and the benchmark times the update until the
//! status says every replica runs the new revision and is available. Throughout, it follows
//! every agent's sandbox status stream (admin API `Watch`), so that each sandbox start and stop
//! updates the count of running sandboxes, and the `readyReplicas` the control plane reports;
//! it prints the lowest fraction of the replica count seen by each.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_control_plane::model::Workload;
use flotilla_proto::agent::v1::agent_admin_client::AgentAdminClient;
use flotilla_proto::agent::v1::{
    ListSandboxesRequest, SandboxPhase, SandboxStatus, WatchRequest as AdminWatchRequest,
};
use flotilla_proto::control::v1::{ApplyRequest, WatchRequest};
use tokio_stream::StreamExt;

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

/// Follows every agent's sandbox status stream and keeps the lowest total of running
/// sandboxes seen while `measuring` is set; a stopped sandbox stops counting when its agent
/// reports it stopped.
struct RunningCounter {
    per_agent: Arc<Vec<AtomicU64>>,
    lowest: Arc<AtomicU64>,
    changes: Arc<AtomicU64>,
    measuring: Arc<AtomicBool>,
    /// Why a status stream ended, if one did: the count is wrong from then on.
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl RunningCounter {
    async fn start(admins: &[SocketAddr]) -> anyhow::Result<Self> {
        let counter = Self {
            per_agent: Arc::new(admins.iter().map(|_| AtomicU64::new(0)).collect()),
            lowest: Arc::new(AtomicU64::new(u64::MAX)),
            changes: Arc::new(AtomicU64::new(0)),
            measuring: Arc::new(AtomicBool::new(false)),
            failure: Arc::default(),
        };
        for (i, admin) in admins.iter().enumerate() {
            let mut client = AgentAdminClient::connect(format!("http://{admin}")).await?;
            // Subscribe first, then list: no change falls between the two.
            let mut stream = client
                .watch(AdminWatchRequest::default())
                .await?
                .into_inner();
            let listed = client
                .list_sandboxes(ListSandboxesRequest::default())
                .await?
                .into_inner()
                .sandboxes;
            let mut running: HashMap<String, bool> = listed
                .into_iter()
                .map(|s| (s.sandbox_id.clone(), is_running(&s)))
                .collect();
            let (per_agent, lowest, changes, measuring, failure) = (
                counter.per_agent.clone(),
                counter.lowest.clone(),
                counter.changes.clone(),
                counter.measuring.clone(),
                counter.failure.clone(),
            );
            per_agent[i].store(
                running.values().filter(|r| **r).count() as u64,
                Ordering::SeqCst,
            );
            let agent = *admin;
            tokio::spawn(async move {
                let ended = loop {
                    let status = match stream.next().await {
                        Some(Ok(status)) => status,
                        Some(Err(status)) => {
                            break format!("{}: {}", status.code(), status.message());
                        }
                        None => break "it ended".to_string(),
                    };
                    running.insert(status.sandbox_id.clone(), is_running(&status));
                    let now = running.values().filter(|r| **r).count() as u64;
                    per_agent[i].store(now, Ordering::SeqCst);
                    if measuring.load(Ordering::SeqCst) {
                        let total = per_agent.iter().map(|c| c.load(Ordering::SeqCst)).sum();
                        lowest.fetch_min(total, Ordering::SeqCst);
                        changes.fetch_add(1, Ordering::Relaxed);
                    }
                };
                let mut failure = failure.lock().unwrap_or_else(|e| e.into_inner());
                failure.get_or_insert(format!(
                    "the status stream of the agent at {agent}: {ended}"
                ));
            });
        }
        Ok(counter)
    }

    /// Fails if a status stream ended: its agent's count stopped then.
    fn check(&self) -> anyhow::Result<()> {
        match &*self.failure.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(failure) => anyhow::bail!("{failure}; the running count is not valid"),
            None => Ok(()),
        }
    }

    /// Fails unless, once the streams have settled, each agent's count is what its own list of
    /// sandboxes says: a lost start or stop (a sandbox never forgotten, say) would make the
    /// lowest fraction wrong without a stream error.
    async fn verify(&self, admins: &[SocketAddr]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut mismatches = Vec::new();
            for (i, admin) in admins.iter().enumerate() {
                let mut client = AgentAdminClient::connect(format!("http://{admin}")).await?;
                let listed = client
                    .list_sandboxes(ListSandboxesRequest::default())
                    .await?
                    .into_inner()
                    .sandboxes;
                let listed = listed.iter().filter(|s| is_running(s)).count() as u64;
                let counted = self.per_agent[i].load(Ordering::SeqCst);
                if listed != counted {
                    mismatches.push(format!(
                        "the agent at {admin} lists {listed} running, its stream counted {counted}"
                    ));
                }
            }
            if mismatches.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the status streams missed changes ({}); the running count is not valid",
                    mismatches.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn total(&self) -> u64 {
        self.per_agent
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .sum()
    }
}

fn is_running(status: &SandboxStatus) -> bool {
    status.phase == SandboxPhase::Running as i32 && status.reason != "Stopped"
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
    let admins: Vec<SocketAddr> = servers.iter().map(|(_, admin)| *admin).collect();
    let mut client = workloads_client(addr).await?;
    wait_nodes(&mut client, agents as usize).await?;
    let sha256 = push_idle(&mut client).await?;
    let mut watch = client.watch(WatchRequest::default()).await?.into_inner();
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

    // Count running sandboxes on every agent until the update is done.
    let counter = RunningCounter::start(&admins).await?;
    anyhow::ensure!(
        counter.total() == replicas,
        "{} of {replicas} running before the update",
        counter.total()
    );
    counter.measuring.store(true, Ordering::SeqCst);
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
    counter.measuring.store(false, Ordering::SeqCst);
    counter.check()?;
    counter.verify(&admins).await?;
    counter.check()?;
    let lowest_seen = counter.lowest.load(Ordering::SeqCst).min(replicas);
    let changes = counter.changes.load(Ordering::Relaxed);

    result("rollout_agents", f64::from(agents), "agents");
    result("rollout_replicas", replicas as f64, "replicas");
    result("rollout_seconds", took.as_secs_f64(), "s");
    result(
        "rollout_min_running_fraction_agents",
        lowest_seen as f64 / replicas as f64,
        "fraction",
    );
    result("rollout_sandbox_changes_seen", changes as f64, "changes");
    result(
        "rollout_min_ready_fraction_status",
        lowest_status as f64 / replicas as f64,
        "fraction",
    );
    drop(servers);
    Ok(())
}
