//! The agent's side of the agent protocol: dial the control plane, register the node, hold a
//! `Session`, apply each desired set to the [`Supervisor`], and heartbeat with per-workload
//! counts (never one message per sandbox).
//!
//! A lost session is retried with jittered exponential backoff. On reconnect the control plane
//! sends the full desired set again; workloads still wanted keep their generation and spec, so
//! the supervisor scales them in place and restarts nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use flotilla_proto::agent::v1::{ModuleSource, SandboxPhase, module_source};
use flotilla_proto::control::v1::agents_client::AgentsClient;
use flotilla_proto::control::v1::{
    AgentMessage, ControlMessage, DesiredState, FetchModuleRequest, Heartbeat, Hello,
    NodeResources, RegisterRequest, WorkloadCounts, agent_message, control_message,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::supervisor::Supervisor;

/// Largest message the agent accepts: a module of up to 64 MiB plus its envelope.
const MAX_MESSAGE_BYTES: usize = 65 << 20;

/// How the agent reaches the control plane.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// The control plane's URL, e.g. `http://127.0.0.1:7080`.
    pub url: String,
    /// This node's name.
    pub node_name: String,
    /// Identifies this agent installation; another id cannot take the node's name while it lives.
    pub agent_id: String,
    /// Node labels (besides `kubernetes.io/arch`, which the control plane sets).
    pub labels: BTreeMap<String, String>,
    /// First reconnect delay; doubles up to `backoff_max`, with jitter.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connecting to the control plane")]
    Connect(#[source] tonic::transport::Error),
    #[error("the control plane refused: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the control plane closed the session")]
    Closed,
}

/// Runs sessions until `shutdown` is cancelled.
pub async fn run(config: ControlConfig, supervisor: Supervisor, shutdown: CancellationToken) {
    let mut state = AgentState::default();
    let mut delay = config.backoff_initial;
    let mut attempt: u64 = 0;
    loop {
        let mut established = false;
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = session(&config, &supervisor, &mut state, &mut established) => result,
        };
        if let Err(error) = result {
            tracing::warn!(
                url = %config.url,
                error = %flotilla_telemetry::error_chain(&error),
                "control-plane session ended; reconnecting"
            );
        }
        if established {
            delay = config.backoff_initial;
        }
        attempt += 1;
        // Up to 50% jitter, so that a fleet does not reconnect in lockstep.
        let jitter =
            delay.mul_f64(f64::from((attempt.wrapping_mul(2_654_435_761) % 1000) as u32) / 2000.0);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay + jitter) => {}
        }
        delay = (delay * 2).min(config.backoff_max);
    }
}

/// What the agent remembers across sessions.
#[derive(Default)]
struct AgentState {
    /// Module blobs by digest, fetched once.
    modules: HashMap<String, Vec<u8>>,
    /// Workloads applied from the control plane: agent workload name → control-plane key.
    managed: BTreeMap<String, String>,
}

async fn session(
    config: &ControlConfig,
    supervisor: &Supervisor,
    state: &mut AgentState,
    established: &mut bool,
) -> Result<(), SessionError> {
    let channel = Endpoint::from_shared(config.url.clone())
        .map_err(SessionError::Connect)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(SessionError::Connect)?;
    let mut client = AgentsClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let capacity = supervisor.capacity();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let registered = client
        .register(RegisterRequest {
            node_name: config.node_name.clone(),
            agent_id: config.agent_id.clone(),
            arch: capacity.arch.clone(),
            os: std::env::consts::OS.to_string(),
            labels: config.labels.clone().into_iter().collect(),
            taints: vec![],
            allocatable: Some(NodeResources {
                memory_bytes: capacity.memory_bytes,
                cpu_millis: cpus * 1000,
                sandboxes: capacity.max_sandboxes,
            }),
        })
        .await?
        .into_inner();
    let interval = Duration::from_millis(registered.heartbeat_interval_ms.max(50));
    let (up, rx) = mpsc::channel(16);
    let hello = AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node_name: config.node_name.clone(),
            session_id: registered.session_id,
        })),
    };
    up.send(hello).await.map_err(|_| SessionError::Closed)?;
    let mut down = client.session(ReceiverStream::new(rx)).await?.into_inner();
    *established = true;
    tracing::info!(url = %config.url, node = %config.node_name, "connected to the control plane");

    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let beat = heartbeat(supervisor, &state.managed);
                if up.send(beat).await.is_err() {
                    return Err(SessionError::Closed);
                }
            }
            message = down.next() => match message {
                None => return Err(SessionError::Closed),
                Some(Err(status)) => return Err(SessionError::Rpc(status)),
                Some(Ok(ControlMessage { kind: Some(control_message::Kind::Desired(desired)) })) => {
                    apply_desired(&mut client, supervisor, state, desired).await;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Makes the supervisor run exactly the desired set (of the workloads the control plane owns).
async fn apply_desired(
    client: &mut AgentsClient<Channel>,
    supervisor: &Supervisor,
    state: &mut AgentState,
    desired: DesiredState,
) {
    let mut wanted = BTreeMap::new();
    for workload in desired.workloads {
        let Some(mut spec) = workload.spec else {
            continue;
        };
        wanted.insert(spec.name.clone(), workload.key.clone());
        let sha256 = spec
            .module
            .as_ref()
            .map(|m| m.sha256.clone())
            .unwrap_or_default();
        if !state.modules.contains_key(&sha256) {
            match client
                .fetch_module(FetchModuleRequest {
                    sha256: sha256.clone(),
                })
                .await
            {
                Ok(response) => {
                    state
                        .modules
                        .insert(sha256.clone(), response.into_inner().module);
                }
                Err(status) => {
                    tracing::warn!(workload = %workload.key, %status, "cannot fetch module");
                    continue;
                }
            }
        }
        spec.module = Some(ModuleSource {
            source: state
                .modules
                .get(&sha256)
                .map(|bytes| module_source::Source::Inline(bytes.clone())),
            sha256,
        });
        if let Err(error) = supervisor.apply(spec).await {
            tracing::warn!(
                workload = %workload.key,
                error = %flotilla_telemetry::error_chain(&error),
                "desired workload not applied"
            );
        }
    }
    for name in state.managed.keys() {
        if !wanted.contains_key(name) {
            supervisor.stop(name, None).await;
        }
    }
    state.managed = wanted;
    // Forget module blobs that no wanted workload uses.
    let in_use: std::collections::BTreeSet<String> = state
        .managed
        .keys()
        .filter_map(|name| supervisor.module_digest(name))
        .collect();
    state.modules.retain(|digest, _| in_use.contains(digest));
}

/// Counts per workload the control plane owns.
fn heartbeat(supervisor: &Supervisor, managed: &BTreeMap<String, String>) -> AgentMessage {
    let workloads = managed
        .iter()
        .map(|(name, key)| {
            let statuses = supervisor.list(Some(name));
            let count = |phase: SandboxPhase| {
                statuses.iter().filter(|s| s.phase == phase as i32).count() as u32
            };
            WorkloadCounts {
                key: key.clone(),
                generation: statuses.first().map_or(0, |s| s.generation),
                running: count(SandboxPhase::Running),
                pending: count(SandboxPhase::Pending),
                failed: count(SandboxPhase::Failed),
            }
        })
        .collect();
    AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(Heartbeat { workloads })),
    }
}
