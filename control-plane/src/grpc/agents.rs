//! [`AgentService`]: the agent protocol (`flotilla.control.v1.Agents`).
//!
//! `Register` admits a node into the [`NodeRegistry`]; a live node's name cannot be taken by
//! another agent. `Session` is one long-lived stream per agent: the agent says Hello, then
//! heartbeats; the control plane sends the node's full desired set when the stream opens and
//! whenever the placements on that node change. When the stream ends the node is marked not
//! ready, and the controller moves its replicas elsewhere.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::agent::v1::{
    EnvVar, ModuleSource, Resources, RestartPolicy as RestartPolicyMessage, WorkloadSpec,
};
use flotilla_proto::control::v1::agents_server::{Agents, AgentsServer};
use flotilla_proto::control::v1::{
    AgentMessage, ControlMessage, DesiredState, DesiredWorkload, FetchModuleRequest,
    FetchModuleResponse, RegisterRequest, RegisterResponse, agent_message, control_message,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{module_status, store_status};
use crate::model::{RestartPolicy, TaintEffect, Workload, validate_name};
use crate::modules::ModuleStore;
use crate::nodes::NodeRegistry;
use crate::scheduler::framework::{NodeInfo, NodeResources};
use crate::store::{WatchEvent, WorkloadStore};

/// The agent protocol over a store and a node registry.
pub struct AgentService<S> {
    store: S,
    modules: ModuleStore,
    nodes: Arc<NodeRegistry>,
    heartbeat_interval: Duration,
    /// Node name → (agent id, session id) of the agent that registered it last.
    sessions: Arc<Mutex<BTreeMap<String, (String, String)>>>,
}

impl<S: WorkloadStore + Clone> AgentService<S> {
    /// Creates the service; agents are asked to heartbeat every `heartbeat_interval`.
    pub fn new(
        store: S,
        modules: ModuleStore,
        nodes: Arc<NodeRegistry>,
        heartbeat_interval: Duration,
    ) -> Self {
        Self {
            store,
            modules,
            nodes,
            heartbeat_interval,
            sessions: Arc::default(),
        }
    }

    /// Wraps the service for a tonic server.
    pub fn into_server(self) -> AgentsServer<Self> {
        AgentsServer::new(self).max_encoding_message_size(super::MAX_MODULE_MESSAGE_BYTES)
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, String)>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<S: WorkloadStore + Clone> Agents for AgentService<S> {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let r = request.into_inner();
        validate_name(&r.node_name)
            .map_err(|m| Status::invalid_argument(format!("node_name: {m}")))?;
        if !matches!(r.arch.as_str(), "amd64" | "arm64") {
            return Err(Status::invalid_argument(format!(
                "arch: {:?}: must be amd64 or arm64",
                r.arch
            )));
        }
        if r.agent_id.is_empty() {
            return Err(Status::invalid_argument("agent_id: required"));
        }
        let mut taints = Vec::with_capacity(r.taints.len());
        for (i, t) in r.taints.iter().enumerate() {
            let effect = match t.effect.as_str() {
                "NoSchedule" => TaintEffect::NoSchedule,
                "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
                "NoExecute" => TaintEffect::NoExecute,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "taints[{i}].effect: {other:?}: must be NoSchedule, PreferNoSchedule or \
                         NoExecute"
                    )));
                }
            };
            taints.push(crate::model::Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect,
            });
        }
        let live = self
            .nodes
            .snapshot()
            .into_iter()
            .any(|n| n.name == r.node_name && n.ready);
        let session_id = uuid::Uuid::new_v4().to_string();
        {
            let mut sessions = self.lock_sessions();
            if let Some((holder, _)) = sessions.get(&r.node_name)
                && *holder != r.agent_id
                && live
            {
                return Err(Status::already_exists(format!(
                    "node {} is held by another live agent; choose another node name",
                    r.node_name
                )));
            }
            sessions.insert(
                r.node_name.clone(),
                (r.agent_id.clone(), session_id.clone()),
            );
        }
        let mut labels = r.labels.into_iter().collect::<BTreeMap<_, _>>();
        labels.insert("kubernetes.io/arch".into(), r.arch.clone());
        labels.insert("kubernetes.io/hostname".into(), r.node_name.clone());
        let allocatable = r.allocatable.unwrap_or_default();
        self.nodes.upsert(NodeInfo {
            name: r.node_name.clone(),
            ready: true,
            labels,
            taints,
            allocatable: NodeResources {
                memory: allocatable.memory_bytes,
                cpu_millis: allocatable.cpu_millis,
                sandboxes: allocatable.sandboxes,
            },
            allocated: NodeResources::default(),
        });
        tracing::info!(node = %r.node_name, arch = %r.arch, "node registered");
        Ok(Response::new(RegisterResponse {
            session_id,
            heartbeat_interval_ms: u64::try_from(self.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
        }))
    }

    type SessionStream = BoxStream<ControlMessage>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello)),
            })) => hello,
            Some(Err(status)) => return Err(status),
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let registered = self
            .lock_sessions()
            .get(&hello.node_name)
            .is_some_and(|(_, session)| *session == hello.session_id);
        if !registered {
            return Err(Status::failed_precondition(format!(
                "node {} has no registration with this session id; call Register first",
                hello.node_name
            )));
        }
        let node = hello.node_name;
        self.nodes.heartbeat(&node);
        let mut watch = self.store.watch().await.map_err(store_status)?;
        let (tx, rx) = mpsc::channel(16);

        // Down: the desired set, on open and whenever it changes.
        let down_node = node.clone();
        let down = tokio::spawn(async move {
            let mut workloads: BTreeMap<String, Workload> = BTreeMap::new();
            let mut last_sent: Option<DesiredState> = None;
            while let Some(event) = watch.next().await {
                match event {
                    Ok(WatchEvent::Restarted(all)) => {
                        workloads = all.into_iter().map(|w| (w.key().to_string(), w)).collect();
                    }
                    Ok(WatchEvent::Applied(w)) => {
                        workloads.insert(w.key().to_string(), w);
                    }
                    Ok(WatchEvent::Deleted(w)) => {
                        workloads.remove(&w.key().to_string());
                    }
                    Err(error) => {
                        let _ = tx.send(Err(store_status(error))).await;
                        return;
                    }
                }
                let desired = desired_state(&down_node, workloads.values());
                if last_sent.as_ref() != Some(&desired) {
                    let message = ControlMessage {
                        kind: Some(control_message::Kind::Desired(desired.clone())),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        return; // The agent has gone.
                    }
                    last_sent = Some(desired);
                }
            }
        });

        // Up: heartbeats until the stream ends, then the node is lost.
        let nodes = self.nodes.clone();
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                match message {
                    Ok(AgentMessage {
                        kind: Some(agent_message::Kind::Heartbeat(beat)),
                    }) => {
                        let running = beat
                            .workloads
                            .into_iter()
                            .map(|w| (w.key, (w.generation, u64::from(w.running))))
                            .collect();
                        nodes.report(&node, running);
                    }
                    Ok(_) => {}
                    Err(status) => {
                        tracing::info!(%node, %status, "agent stream failed");
                        break;
                    }
                }
            }
            tracing::warn!(%node, "agent disconnected; node marked not ready");
            nodes.mark_lost(&node);
            down.abort();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_module(
        &self,
        request: Request<FetchModuleRequest>,
    ) -> Result<Response<FetchModuleResponse>, Status> {
        let sha256 = request.into_inner().sha256;
        let modules = self.modules.clone();
        let module = tokio::task::spawn_blocking(move || modules.get(&sha256))
            .await
            .map_err(|e| Status::internal(format!("module store task failed: {e}")))?
            .map_err(module_status)?;
        Ok(Response::new(FetchModuleResponse { module }))
    }
}

/// The workloads placed on `node`, each with the node's share of replicas, sorted by key.
pub fn desired_state<'a>(
    node: &str,
    workloads: impl Iterator<Item = &'a Workload>,
) -> DesiredState {
    let mut desired: Vec<DesiredWorkload> = workloads
        .filter_map(|w| {
            let replicas = *w.status.as_ref()?.placements.get(node)?;
            (replicas > 0).then(|| DesiredWorkload {
                key: w.key().to_string(),
                spec: Some(agent_spec(w, u32::try_from(replicas).unwrap_or(u32::MAX))),
            })
        })
        .collect();
    desired.sort_by(|a, b| a.key.cmp(&b.key));
    DesiredState { workloads: desired }
}

/// The agent's spec for a workload: named `<namespace>.<name>` (unique on the agent), the
/// module pinned by digest, and `replicas` this node's share.
fn agent_spec(workload: &Workload, replicas: u32) -> WorkloadSpec {
    let spec = &workload.spec;
    let limits = spec.sandbox_limits();
    let key = workload.key();
    WorkloadSpec {
        name: format!("{}.{}", key.namespace, key.name),
        generation: workload.metadata.generation,
        module: Some(ModuleSource {
            source: None,
            sha256: spec.module.sha256.clone(),
        }),
        args: spec.args.clone(),
        env: spec
            .env
            .iter()
            .map(|e| EnvVar {
                name: e.name.clone(),
                value: e.value.clone(),
            })
            .collect(),
        replicas,
        resources: Some(Resources {
            memory_limit_bytes: limits.memory_limit_bytes,
            memory_request_bytes: limits.memory_request_bytes,
            cpu_limit_ms: limits.cpu_time_ms,
            deadline_ms: limits.deadline_ms,
            log_limit_bytes: limits.log_bytes,
            max_table_elements: 0,
        }),
        restart_policy: match spec.restart_policy {
            RestartPolicy::Always => RestartPolicyMessage::Always,
            RestartPolicy::OnFailure => RestartPolicyMessage::OnFailure,
            RestartPolicy::Never => RestartPolicyMessage::Never,
        } as i32,
    }
}
