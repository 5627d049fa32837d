//! [`AgentService`]: the agent protocol (`flotilla.control.v1.Agents`).
//!
//! `Register` admits a node into the [`NodeRegistry`](crate::cluster::NodeRegistry): its name
//! is bound to the first agent credential that registers it
//! ([`NodeIdentities`](crate::cluster::NodeIdentities)), and a live node's name cannot be taken
//! by another agent process either. `Session` is one long-lived stream per agent: the agent
//! says Hello, then heartbeats with per-workload counts and aggregated failure events, each
//! checked against what was placed on the node ([`NodePlacements`]); the control plane sends
//! the node's full desired set when the stream opens, then only the workloads whose share on
//! that node changed, as the [`DesiredIndex`](crate::cluster::DesiredIndex) publishes them. The session also carries log and stdin
//! requests, which the agent answers with `UploadLogs` and `OpenStdin`. When the stream ends the node is marked not
//! ready, and the controller moves its replicas elsewhere.

use flotilla_proto::auth::BearerError;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::control::v1::agents_server::{Agents, AgentsServer};
use flotilla_proto::control::v1::{
    AgentMessage, ClusterRoutes, ControlMessage, FetchModuleRequest, FetchModuleResponse,
    LogUpload, OpenStdinRequest, RegisterRequest, RegisterResponse, StdinChunk, UploadLogsResponse,
    agent_message, control_message, log_upload,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert::{module_status, store_status, url_module_status};
use super::reports::{NodePlacements, Refusal};
use crate::cluster::config::{NodeConfigRefs, NodeConfigState};
use crate::cluster::identity::{Admitted, IdentityError};
use crate::cluster::sessions::STDIN_BUFFER;
use crate::cluster::{Cluster, Reported};
use crate::model::wasm::WasmFeature;
use crate::model::{TaintEffect, validate_name};
use crate::modules::{FetchGuard, ModuleError, ModuleStore, UrlModules};
use crate::scheduler::framework::{NodeInfo, NodeResources};
use crate::store::WorkloadStore;

/// The agent protocol over a store and a node registry.
pub struct AgentService<S> {
    store: S,
    modules: ModuleStore,
    downloads: UrlModules,
    cluster: Arc<Cluster>,
    heartbeat_interval: Duration,
    /// The join token agents must present, if any.
    join_token: Option<String>,
    /// Whether agents must present a verified client certificate (mutual TLS).
    client_certs_required: bool,
    /// Node name → (agent id, session id) of the agent that registered it last.
    sessions: Arc<Mutex<BTreeMap<String, (String, String)>>>,
    /// Open session id → what it placed on its node, which scopes `FetchModule`.
    placements: Arc<Mutex<HashMap<String, Arc<Mutex<NodePlacements>>>>>,
}

impl<S: WorkloadStore + Clone> AgentService<S> {
    /// Creates the service; agents are asked to heartbeat every `heartbeat_interval`.
    pub fn new(
        store: S,
        modules: ModuleStore,
        cluster: Arc<Cluster>,
        heartbeat_interval: Duration,
    ) -> Self {
        Self {
            store,
            downloads: UrlModules::new(modules.clone(), FetchGuard::default()),
            modules,
            cluster,
            heartbeat_interval,
            join_token: None,
            client_certs_required: false,
            sessions: Arc::default(),
            placements: Arc::default(),
        }
    }

    /// Downloads modules named by URL with `downloads` (shared with the user API, and with
    /// its fetch guard) instead of its own.
    #[must_use]
    pub(crate) fn with_downloads(mut self, downloads: UrlModules) -> Self {
        self.downloads = downloads;
        self
    }

    /// Admits only agents that present `token` as `authorization: Bearer <token>`.
    #[must_use]
    pub fn with_join_token(mut self, token: Option<String>) -> Self {
        self.join_token = token.filter(|t| !t.is_empty());
        self
    }

    /// Reads a blob from the module store off the async threads; the outer error is the
    /// blocking task failing.
    async fn read_module(&self, sha256: &str) -> Result<Result<Vec<u8>, ModuleError>, Status> {
        let modules = self.modules.clone();
        let sha256 = sha256.to_string();
        tokio::task::spawn_blocking(move || modules.get(&sha256))
            .await
            .map_err(|e| Status::internal(format!("module store task failed: {e}")))
    }

    /// Admits only agents that present a client certificate the TLS layer verified against
    /// the client CA (mutual TLS).
    #[must_use]
    pub fn with_client_certs_required(mut self, required: bool) -> Self {
        self.client_certs_required = required;
        self
    }

    /// Checks a request's client certificate and join token, where they are required.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.client_certs_required && request.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated(
                "this control plane requires agents to present a client certificate (mutual \
                 TLS); start the agent with --tls-cert-file and --tls-key-file",
            ));
        }
        let Some(expected) = &self.join_token else {
            return Ok(());
        };
        flotilla_proto::auth::check_bearer(request, expected).map_err(|error| match error {
            BearerError::Missing => Status::unauthenticated(
                "this control plane requires a join token; start the agent with \
                 --join-token-file or FLOTILLA_JOIN_TOKEN",
            ),
            BearerError::Invalid => Status::unauthenticated("invalid join token"),
        })
    }

    /// Wraps the service for a tonic server.
    pub fn into_server(self) -> AgentsServer<Self> {
        AgentsServer::new(self).max_encoding_message_size(super::MAX_MODULE_MESSAGE_BYTES)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<S: WorkloadStore + Clone> Agents for AgentService<S> {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        self.authenticate(&request)?;
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
        if !(r.ingress_url.is_empty()
            || r.ingress_url.starts_with("http://")
            || r.ingress_url.starts_with("https://"))
        {
            return Err(Status::invalid_argument(format!(
                "ingress_url: {:?} must be an http:// or https:// URL",
                r.ingress_url
            )));
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
        // The name's credential binding, written before anything else changes.
        let admitted = self
            .cluster
            .identities
            .admit_queued(&r.node_name, &r.node_credential)
            .await;
        match admitted {
            Ok(Admitted::Bound) => {
                tracing::info!(node = %r.node_name, "node name bound to its agent's credential");
            }
            Ok(Admitted::Matched) => {}
            Err(error @ IdentityError::Malformed) => {
                self.cluster.metrics.agent_refusal("CredentialMalformed");
                return Err(Status::invalid_argument(error.to_string()));
            }
            Err(error @ IdentityError::Taken(_)) => {
                self.cluster.metrics.agent_refusal("CredentialMismatch");
                tracing::warn!(node = %r.node_name, agent = %r.agent_id, "registration with another credential than the node name's refused");
                return Err(Status::permission_denied(error.to_string()));
            }
            Err(error) => {
                return Err(Status::unavailable(flotilla_telemetry::error_chain(&error)));
            }
        }
        let live = self
            .cluster
            .nodes
            .snapshot()
            .into_iter()
            .any(|n| n.name == r.node_name && n.ready);
        let session_id = uuid::Uuid::new_v4().to_string();
        {
            let mut sessions = lock(&self.sessions);
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
        let mut labels = r
            .labels
            .into_iter()
            .filter(|(key, _)| !key.starts_with(WasmFeature::NODE_LABEL_PREFIX))
            .collect::<BTreeMap<_, _>>();
        // What the agent offers, as labels the WasmFeatures filter reads and users see; a
        // feature this control plane does not know is of no use to its workloads.
        for name in &r.wasm_features {
            match name.parse::<WasmFeature>() {
                Ok(feature) => {
                    labels.insert(feature.node_label().into(), "true".into());
                }
                Err(unknown) => {
                    tracing::warn!(node = %r.node_name, %unknown, "offered wasm feature ignored");
                }
            }
        }
        labels.insert("kubernetes.io/arch".into(), r.arch.clone());
        labels.insert("kubernetes.io/hostname".into(), r.node_name.clone());
        self.cluster.nodes.upsert(NodeInfo {
            name: r.node_name.clone(),
            ready: true,
            labels,
            taints,
            allocatable: NodeResources::from(&r.allocatable.unwrap_or_default()),
            allocated: NodeResources::default(),
            ingress_url: r.ingress_url.clone(),
        });
        tracing::info!(node = %r.node_name, arch = %r.arch, ingress = %r.ingress_url, "node registered");
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
        self.authenticate(&request)?;
        let mut inbound = request.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello)),
            })) => hello,
            Some(Err(status)) => return Err(status),
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let registered = lock(&self.sessions)
            .get(&hello.node_name)
            .is_some_and(|(_, session)| *session == hello.session_id);
        if !registered {
            return Err(Status::failed_precondition(format!(
                "node {} has no registration with this session id; call Register first",
                hello.node_name
            )));
        }
        let node = hello.node_name;
        let session_id = hello.session_id;
        self.cluster.nodes.heartbeat(&node);
        let mut desired = self.cluster.desired.subscribe(&node);
        // What the node may report on; known before its first heartbeat is read.
        let placements = Arc::new(Mutex::new(NodePlacements::default()));
        if let Some(complete) = desired.complete() {
            lock(&placements).apply(complete);
        }
        let sent = placements.clone();
        lock(&self.placements).insert(session_id.clone(), placements.clone());
        let open_placements = self.placements.clone();
        // Both directions end when the control plane shuts down or deletes the node, as when
        // the agent leaves.
        let ended = self.cluster.shutdown.child_token();
        let stopped = || Box::pin(ended.clone().cancelled_owned());
        let mut inbound = futures::StreamExt::take_until(inbound, stopped());
        let mut down_stopped = stopped();
        let (tx, rx) = mpsc::channel(16);
        self.cluster
            .sessions
            .open(&node, &session_id, tx.clone(), ended.clone());

        // Down: the full desired set on open, then what changes; the ConfigMaps and Secrets its
        // workloads use, before the workloads that need them; and the cluster's HTTP routes, on
        // open and whenever they change.
        let mut routes = self.cluster.routes.subscribe();
        routes.mark_changed();
        let mut config = self.cluster.config.subscribe();
        let span = tracing::info_span!("agent_session", node = %node);
        let down = self.cluster.tasks.spawn(
            async move {
                let mut node_refs = NodeConfigRefs::default();
                let mut node_config = NodeConfigState::default();
                let mut routes_open = true;
                let mut config_open = true;
                loop {
                    let mut messages = Vec::with_capacity(2);
                    tokio::select! {
                        biased;
                        () = &mut down_stopped => return,
                        update = desired.next() => {
                            let Some(update) = update else { return };
                            lock(&sent).apply(&update);
                            node_refs.apply(&update);
                            let objects = config.borrow().clone();
                            messages.extend(
                                node_config
                                    .update(&node_refs.all(), &objects)
                                    .map(control_message::Kind::Config),
                            );
                            messages.push(control_message::Kind::Desired(
                                Arc::unwrap_or_clone(update),
                            ));
                        }
                        changed = config.changed(), if config_open => {
                            config_open = changed.is_ok();
                            let objects = config.borrow_and_update().clone();
                            messages.extend(
                                node_config
                                    .update(&node_refs.all(), &objects)
                                    .map(control_message::Kind::Config),
                            );
                        }
                        changed = routes.changed(), if routes_open => {
                            routes_open = changed.is_ok();
                            let table = routes.borrow_and_update().clone();
                            if routes_open {
                                messages.push(control_message::Kind::Routes(ClusterRoutes {
                                    routes: table.to_vec(),
                                }));
                            }
                        }
                    };
                    let parts = messages
                        .into_iter()
                        .flat_map(|kind| super::chunks::split(kind, super::chunks::PART_BYTES));
                    for kind in parts {
                        let message = ControlMessage { kind: Some(kind) };
                        if tx.send(Ok(message)).await.is_err() {
                            return; // The agent has gone.
                        }
                    }
                }
            }
            .instrument(span.clone()),
        );

        // Up: heartbeats until the stream ends, then the node is lost.
        let cluster = self.cluster.clone();
        self.cluster.tasks.spawn(
            async move {
                while let Some(message) = inbound.next().await {
                    match message {
                        Ok(AgentMessage {
                            kind: Some(agent_message::Kind::Heartbeat(beat)),
                        }) => {
                            let running = beat
                                .workloads
                                .into_iter()
                                .map(|w| {
                                    let reported = Reported {
                                        generation: w.generation,
                                        running: u64::from(w.running),
                                        available: u64::from(w.available),
                                        succeeded: u64::from(w.succeeded),
                                    };
                                    ((w.key, w.generation), reported)
                                })
                                .collect();
                            let refused = |r: Refusal| cluster.metrics.agent_refusal(r.reason());
                            let (running, events) = {
                                let mut placements = lock(&placements);
                                let running = placements.check(running, refused);
                                (running, placements.check_events(beat.events, refused))
                            };
                            cluster.metrics.heartbeat();
                            cluster.nodes.report(&node, running);
                            cluster.events.record(&node, events);
                        }
                        Ok(_) => {}
                        Err(status) => {
                            tracing::info!(%node, %status, "agent stream failed");
                            break;
                        }
                    }
                }
                if !cluster.shutdown.is_cancelled() {
                    tracing::warn!(%node, "agent disconnected; node marked not ready");
                }
                cluster.sessions.close(&node, &session_id);
                lock(&open_placements).remove(&session_id);
                cluster.nodes.mark_lost(&node);
                down.abort();
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_module(
        &self,
        request: Request<FetchModuleRequest>,
    ) -> Result<Response<FetchModuleResponse>, Status> {
        self.authenticate(&request)?;
        // Only the modules of workloads placed on the caller's node: never another tenant's.
        let placed = flotilla_proto::auth::session_of(&request)
            .and_then(|session| lock(&self.placements).get(session).cloned());
        let Some(placed) = placed else {
            return Err(Status::failed_precondition(
                "FetchModule names no open session (the flotilla-session metadata); open the \
                 node's Session first",
            ));
        };
        let sha256 = request.into_inner().sha256;
        if !lock(&placed).uses_module(&sha256) {
            self.cluster
                .metrics
                .agent_refusal(Refusal::UnplacedModule.reason());
            return Err(Status::permission_denied(format!(
                "module {sha256} is not run by any workload placed on this node"
            )));
        }
        match self.read_module(&sha256).await? {
            Err(ModuleError::NotFound(_)) => {}
            result => {
                return Ok(Response::new(FetchModuleResponse {
                    module: result.map_err(module_status)?,
                }));
            }
        }
        // Not here yet: a workload created straight in the cluster may name it by URL.
        let url = self
            .store
            .list()
            .await
            .map_err(store_status)?
            .into_iter()
            .find(|w| w.spec.module.sha256 == sha256)
            .and_then(|w| w.spec.module.url)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "module {sha256} was neither pushed nor named by a workload's spec.module.url"
                ))
            })?;
        self.downloads
            .fetch_into_store(&url, &sha256)
            .await
            .map_err(url_module_status)?;
        let module = self.read_module(&sha256).await?.map_err(module_status)?;
        Ok(Response::new(FetchModuleResponse { module }))
    }

    async fn upload_logs(
        &self,
        request: Request<Streaming<LogUpload>>,
    ) -> Result<Response<UploadLogsResponse>, Status> {
        self.authenticate(&request)?;
        let mut upload = request.into_inner();
        let header = match upload.next().await {
            Some(Ok(LogUpload {
                kind: Some(log_upload::Kind::Header(header)),
            })) => header,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a header",
                ));
            }
        };
        let Some(user) = self.cluster.sessions.take_pending(&header.request_id) else {
            return Err(Status::not_found(format!(
                "no log request {} is waiting (it timed out or was cancelled)",
                header.request_id
            )));
        };
        if !header.error.is_empty() {
            let _ = user.send(Err(Status::not_found(header.error))).await;
            return Ok(Response::new(UploadLogsResponse {}));
        }
        loop {
            tokio::select! {
                message = upload.next() => match message {
                    Some(Ok(LogUpload { kind: Some(log_upload::Kind::Chunk(chunk)) })) => {
                        if user.send(Ok(chunk)).await.is_err() {
                            break; // The user stopped reading.
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(status)) => {
                        let _ = user
                            .send(Err(Status::unavailable(format!(
                                "the agent's log stream failed: {}",
                                status.message()
                            ))))
                            .await;
                        break;
                    }
                    None => break,
                },
                () = user.closed() => break,
            }
        }
        // Ending the call tells a following agent to stop.
        Ok(Response::new(UploadLogsResponse {}))
    }

    type OpenStdinStream = BoxStream<StdinChunk>;

    async fn open_stdin(
        &self,
        request: Request<OpenStdinRequest>,
    ) -> Result<Response<Self::OpenStdinStream>, Status> {
        self.authenticate(&request)?;
        let session = flotilla_proto::auth::session_of(&request).map(str::to_string);
        let open = request.into_inner();
        let Some(user) = self
            .cluster
            .sessions
            .take_pending_stdin(&open.request_id, session.as_deref())
        else {
            return Err(Status::not_found(format!(
                "no stdin request {} is waiting for this session (it timed out, was cancelled \
                 or went to another node)",
                open.request_id
            )));
        };
        if !open.error.is_empty() {
            let _ = user.send(Err(Status::failed_precondition(open.error)));
            return Ok(Response::new(Box::pin(tokio_stream::empty())));
        }
        let (tx, rx) = mpsc::channel(STDIN_BUFFER);
        if user.send(Ok(tx)).is_err() {
            return Err(Status::cancelled("the user went away"));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
