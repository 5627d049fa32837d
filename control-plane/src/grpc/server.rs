//! [`WorkloadService`]: the user API (`flotilla.control.v1.Workloads`) over a store.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use flotilla_proto::agent::v1::{ConfigKind, ConfigObject, LogChunk};
use flotilla_proto::control::v1::workloads_server::{Workloads, WorkloadsServer};
use flotilla_proto::control::v1::{
    ApplyConfigRequest, ApplyRequest, AttachRequest, AttachResponse, ConfigSummary,
    DeleteConfigRequest, DeleteNodeRequest, DeleteNodeResponse, DeleteRequest,
    Event as EventMessage, GetRequest, ListConfigRequest, ListConfigResponse, ListEventsRequest,
    ListEventsResponse, ListNodesRequest, ListNodesResponse, ListRequest, ListResponse,
    Node as NodeMessage, NodeResources as NodeResourcesMessage, PushModuleRequest,
    PushModuleResponse, StdinChunk, Taint as TaintMessage, WatchEvent as WatchEventMessage,
    WatchRequest, WorkloadLogsRequest, WorkloadObject, attach_request, watch_event,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{module_status, parse_manifest, store_status, to_object, url_module_status};
use crate::auth::{Access, Resource, User, UserAuth, Verb};
use crate::cluster::{Cluster, ConfigKey};
use crate::model::WorkloadKey;
use crate::modules::{FetchGuard, ModuleStore, UrlModules};
use crate::scheduler::framework::{NodeResources, WorkloadRequest};
use crate::store::{ConfigError, ConfigStore, WatchEvent, WorkloadStore};

/// Implements the user API on a [`WorkloadStore`], a [`ModuleStore`] and the live [`Cluster`].
pub struct WorkloadService<S> {
    store: S,
    modules: ModuleStore,
    downloads: UrlModules,
    cluster: Arc<Cluster>,
    /// Where ConfigMaps and Secrets are written; none: the config calls are unavailable.
    config: Option<ConfigStore>,
    /// Who may do what; open by default.
    auth: Arc<UserAuth>,
}

impl<S: WorkloadStore + Clone> WorkloadService<S> {
    /// Creates the service, with no nodes until [`with_cluster`](Self::with_cluster).
    pub fn new(store: S, modules: ModuleStore) -> Self {
        Self {
            store,
            downloads: UrlModules::new(modules.clone(), FetchGuard::default()),
            modules,
            cluster: Arc::default(),
            config: None,
            auth: Arc::new(UserAuth::open()),
        }
    }

    /// Authenticates and authorizes callers with `auth`.
    #[must_use]
    pub fn with_auth(mut self, auth: Arc<UserAuth>) -> Self {
        self.auth = auth;
        self
    }

    /// Lets the caller of `request` do `verb` on `resource` in `namespace` (empty: every
    /// namespace, or cluster-wide), or says why not.
    async fn allow<T>(
        &self,
        request: &Request<T>,
        verb: Verb,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<User, Status> {
        let access = Access::new(verb, resource, namespace, name);
        self.auth.check(request, access).await
    }

    /// Downloads modules named by URL with `downloads` (shared with the agent API, and with
    /// its fetch guard) instead of its own.
    #[must_use]
    pub(crate) fn with_downloads(mut self, downloads: UrlModules) -> Self {
        self.downloads = downloads;
        self
    }

    /// Serves ConfigMaps and Secrets from `config`.
    #[must_use]
    pub fn with_config(mut self, config: ConfigStore) -> Self {
        self.config = Some(config);
        self
    }

    /// Finds sandbox `replica` on `node` (empty: the first node, by name, the workload is
    /// placed on) of a workload: its key, its node, and whether it has `spec.stdin`.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown workload, one not placed yet, or a replica it does not have.
    async fn locate(
        &self,
        namespace: &str,
        name: &str,
        node: String,
        replica: u32,
    ) -> Result<(WorkloadKey, String, bool), Status> {
        let key = WorkloadKey::new(namespace, name);
        let workload = self
            .store
            .get(&key)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("workload {key} not found")))?;
        let placements = workload
            .status
            .as_ref()
            .map(|s| s.placements.clone())
            .unwrap_or_default();
        let node = if node.is_empty() {
            placements
                .iter()
                .find(|(_, count)| **count > 0)
                .map(|(node, _)| node.clone())
                .ok_or_else(|| {
                    Status::not_found(format!("workload {key} has no replicas placed yet"))
                })?
        } else {
            node
        };
        let on_node = placements.get(&node).copied().unwrap_or(0);
        if u64::from(replica) >= on_node {
            return Err(Status::not_found(format!(
                "workload {key} has {on_node} replicas on node {node}; replica {replica} does not \
                 exist"
            )));
        }
        Ok((key, node, workload.spec.stdin))
    }

    /// Refuses a workload whose module (in the module store) uses WebAssembly features that
    /// its `spec.wasm.features` does not enable.
    async fn check_features(&self, workload: &flotilla_model::Workload) -> Result<(), Status> {
        let modules = self.modules.clone();
        let sha256 = workload.spec.module.sha256.clone();
        let requires = tokio::task::spawn_blocking(move || modules.required_features(&sha256))
            .await
            .map_err(|e| Status::internal(format!("checking the module's features: {e}")))?
            .map_err(module_status)?;
        workload
            .spec
            .wasm_features()
            .check(requires)
            .map_err(|e| Status::invalid_argument(format!("invalid workload: {e}")))
    }

    fn config(&self) -> Result<&ConfigStore, Status> {
        self.config.as_ref().ok_or_else(|| {
            Status::unimplemented("this control plane serves no ConfigMaps or Secrets")
        })
    }

    /// Serves nodes, events and logs from `cluster`, which the agent protocol fills.
    #[must_use]
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Wraps the service for a tonic server.
    pub fn into_server(self) -> WorkloadsServer<Self> {
        WorkloadsServer::new(self).max_decoding_message_size(super::MAX_MODULE_MESSAGE_BYTES)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<S: WorkloadStore + Clone> Workloads for WorkloadService<S> {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<WorkloadObject>, Status> {
        let user = self.auth.authenticate(&request).await?;
        let manifest = request.into_inner().manifest;
        if manifest.len() > crate::model::MAX_OBJECT_BYTES {
            return Err(Status::invalid_argument(format!(
                "invalid workload: the manifest is {} bytes, over the limit of {} (1 MiB)",
                manifest.len(),
                crate::model::MAX_OBJECT_BYTES
            )));
        }
        let workload = parse_manifest(&manifest)
            .map_err(|e| Status::invalid_argument(format!("invalid workload: {e}")))?;
        let key = workload.key();
        let creates = self.auth.distinguishes_creates()
            && self.store.get(&key).await.map_err(store_status)?.is_none();
        let access = Access {
            creates,
            ..Access::new(Verb::Apply, Resource::Workloads, &key.namespace, &key.name)
        };
        self.auth.authorize(&user, access).await?;
        workload
            .validate()
            .map_err(|e| Status::invalid_argument(format!("invalid workload: {e}")))?;
        let module = &workload.spec.module;
        if !self.modules.contains(&module.sha256) {
            match &module.url {
                None => {
                    return Err(Status::failed_precondition(format!(
                        "spec.module.sha256: no module {} was pushed to the control plane; \
                         `flotilla apply` pushes local files named by spec.module.path, or set \
                         spec.module.url",
                        module.sha256
                    )));
                }
                // Fetched now, so that an unreachable URL or a wrong digest fails the apply
                // and nothing is stored.
                Some(url) => self
                    .downloads
                    .fetch_into_store(url, &module.sha256)
                    .await
                    .map_err(url_module_status)?,
            }
        }
        self.check_features(&workload).await?;
        let stored = self.store.apply(workload).await.map_err(store_status)?;
        Ok(Response::new(to_object(&stored)?))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<WorkloadObject>, Status> {
        let key = WorkloadKey::new(&request.get_ref().namespace, &request.get_ref().name);
        self.allow(
            &request,
            Verb::Get,
            Resource::Workloads,
            &key.namespace,
            &key.name,
        )
        .await?;
        match self.store.get(&key).await.map_err(store_status)? {
            Some(workload) => Ok(Response::new(to_object(&workload)?)),
            None => Err(Status::not_found(format!("workload {key} not found"))),
        }
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let namespace = &request.get_ref().namespace;
        self.allow(&request, Verb::List, Resource::Workloads, namespace, "")
            .await?;
        let namespace = request.into_inner().namespace;
        let items = self
            .store
            .list()
            .await
            .map_err(store_status)?
            .iter()
            .filter(|w| namespace.is_empty() || w.key().namespace == namespace)
            .map(to_object)
            .collect::<Result<_, _>>()?;
        Ok(Response::new(ListResponse { items }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<WorkloadObject>, Status> {
        let key = WorkloadKey::new(&request.get_ref().namespace, &request.get_ref().name);
        self.allow(
            &request,
            Verb::Delete,
            Resource::Workloads,
            &key.namespace,
            &key.name,
        )
        .await?;
        match self.store.delete(&key).await.map_err(store_status)? {
            Some(workload) => Ok(Response::new(to_object(&workload)?)),
            None => Err(Status::not_found(format!("workload {key} not found"))),
        }
    }

    type WatchStream = BoxStream<WatchEventMessage>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let namespace = request.get_ref().namespace.clone();
        self.allow(&request, Verb::Watch, Resource::Workloads, &namespace, "")
            .await?;
        let mut watch = self.store.watch().await.map_err(store_status)?;
        // Ends when the control plane shuts down, as when the client leaves.
        let mut stopped = Box::pin(self.cluster.shutdown.clone().cancelled_owned());
        let (tx, rx) = mpsc::channel(64);
        self.cluster.tasks.spawn(async move {
            loop {
                let event = tokio::select! {
                    () = &mut stopped => return,
                    event = watch.next() => event,
                };
                let Some(event) = event else {
                    return;
                };
                let in_scope = |w: &crate::model::Workload| {
                    namespace.is_empty() || w.key().namespace == namespace
                };
                let event = match event {
                    Ok(WatchEvent::Applied(w) | WatchEvent::Deleted(w)) if !in_scope(&w) => {
                        continue;
                    }
                    Ok(WatchEvent::Restarted(mut all)) => {
                        all.retain(|w| in_scope(w));
                        Ok(WatchEvent::Restarted(all))
                    }
                    other => other,
                };
                let message = event.map_err(store_status).and_then(|event| {
                    let (kind, workloads) = match event {
                        WatchEvent::Restarted(all) => (watch_event::Type::Restarted, all),
                        WatchEvent::Applied(w) => (watch_event::Type::Applied, vec![w]),
                        WatchEvent::Deleted(w) => (watch_event::Type::Deleted, vec![w]),
                    };
                    Ok(WatchEventMessage {
                        r#type: kind as i32,
                        objects: workloads.iter().map(to_object).collect::<Result<_, _>>()?,
                    })
                });
                if tx.send(message).await.is_err() {
                    // The client has gone.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn push_module(
        &self,
        request: Request<PushModuleRequest>,
    ) -> Result<Response<PushModuleResponse>, Status> {
        let namespace = &request.get_ref().namespace;
        self.allow(&request, Verb::Create, Resource::Modules, namespace, "")
            .await?;
        let request = request.into_inner();
        let modules = self.modules.clone();
        let size = request.module.len() as u64;
        let sha256 = tokio::task::spawn_blocking(move || {
            modules.put(&request.module, Some(&request.sha256))
        })
        .await
        .map_err(|e| Status::internal(format!("module store task failed: {e}")))?
        .map_err(module_status)?;
        Ok(Response::new(PushModuleResponse { sha256, size }))
    }

    type LogsStream = BoxStream<LogChunk>;

    async fn logs(
        &self,
        request: Request<WorkloadLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let key = WorkloadKey::new(&request.get_ref().namespace, &request.get_ref().name);
        self.allow(
            &request,
            Verb::Get,
            Resource::WorkloadLogs,
            &key.namespace,
            &key.name,
        )
        .await?;
        let request = request.into_inner();
        let (key, node, _) = self
            .locate(
                &request.namespace,
                &request.name,
                request.node,
                request.replica,
            )
            .await?;
        let rx = self
            .cluster
            .sessions
            .request_logs(
                &node,
                &key.to_string(),
                request.replica,
                request.follow,
                request.options,
            )
            .await?;
        self.cluster.metrics.log_stream();
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type AttachStream = BoxStream<AttachResponse>;

    async fn attach(
        &self,
        request: Request<Streaming<AttachRequest>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let user = self.auth.authenticate(&request).await?;
        let mut input = request.into_inner();
        let sandbox = match input.next().await {
            Some(Ok(AttachRequest {
                kind: Some(attach_request::Kind::Sandbox(sandbox)),
            })) => sandbox,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must name the sandbox",
                ));
            }
        };
        let key = WorkloadKey::new(&sandbox.namespace, &sandbox.name);
        let access = Access::new(
            Verb::Create,
            Resource::WorkloadAttach,
            &key.namespace,
            &key.name,
        );
        self.auth.authorize(&user, access).await?;
        let (key, node, stdin) = self
            .locate(
                &sandbox.namespace,
                &sandbox.name,
                sandbox.node,
                sandbox.replica,
            )
            .await?;
        if !stdin {
            return Err(Status::failed_precondition(format!(
                "workload {key} has no stdin: set spec.stdin (flotilla run -i)"
            )));
        }
        let opened = self
            .cluster
            .sessions
            .request_stdin(&node, &key.to_string(), sandbox.replica)
            .await?;
        let agent = opened
            .await
            .map_err(|_| Status::unavailable(format!("node {node} went away")))??;
        tracing::info!(workload = %key, %node, replica = sandbox.replica, "stdin attached");
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Ok(AttachResponse { attached: true }));
        let shutdown = self.cluster.shutdown.clone();
        self.cluster.tasks.spawn(async move {
            // Each chunk waits for room towards the agent, which waits for the guest to read.
            loop {
                tokio::select! {
                    message = input.next() => match message {
                        Some(Ok(AttachRequest { kind: Some(attach_request::Kind::Stdin(data)) })) => {
                            if agent.send(Ok(StdinChunk { data })).await.is_err() {
                                break; // The sandbox ended.
                            }
                        }
                        Some(Ok(_)) => {}
                        // The user closed their input, or went away: the guest reads EOF.
                        Some(Err(_)) | None => break,
                    },
                    () = agent.closed() => break,
                    () = shutdown.cancelled() => break,
                }
            }
            // Dropping `agent` ends the agent's stream; dropping `tx` ends the user's call.
            drop(tx);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delete_node(
        &self,
        request: Request<DeleteNodeRequest>,
    ) -> Result<Response<DeleteNodeResponse>, Status> {
        self.allow(
            &request,
            Verb::Delete,
            Resource::Nodes,
            "",
            &request.get_ref().name,
        )
        .await?;
        let name = request.into_inner().name;
        let cluster = self.cluster.clone();
        let node = name.clone();
        let released = tokio::task::spawn_blocking(move || cluster.identities.release(&node))
            .await
            .map_err(|e| Status::internal(format!("node identity task failed: {e}")))?
            .map_err(|e| {
                Status::unavailable(format!(
                    "releasing node {name}'s name: {}",
                    flotilla_telemetry::error_chain(&e)
                ))
            })?;
        // Its agent's session ends; the controller moves the node's replicas elsewhere.
        self.cluster.sessions.end(&name);
        let registered = self.cluster.nodes.remove(&name);
        if !registered && !released {
            return Err(Status::not_found(format!("node {name} not found")));
        }
        tracing::info!(node = %name, registered, released, "node deleted");
        Ok(Response::new(DeleteNodeResponse {
            registered,
            released,
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.allow(&request, Verb::List, Resource::Nodes, "", "")
            .await?;
        // What each node has allocated, from the placements in the workloads' status.
        let mut allocated: BTreeMap<String, NodeResources> = BTreeMap::new();
        for workload in self.store.list().await.map_err(store_status)? {
            let per_replica = WorkloadRequest::from_workload(&workload).requests;
            for (node, &count) in workload.status.iter().flat_map(|s| &s.placements) {
                allocated
                    .entry(node.clone())
                    .or_default()
                    .allocate(&per_replica, i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
        let nodes = self
            .cluster
            .nodes
            .statuses()
            .into_iter()
            .map(|status| NodeMessage {
                allocated: Some(NodeResourcesMessage::from(
                    &allocated.remove(&status.info.name).unwrap_or_default(),
                )),
                allocatable: Some(NodeResourcesMessage::from(&status.info.allocatable)),
                name: status.info.name,
                ready: status.info.ready,
                labels: status.info.labels.into_iter().collect(),
                taints: status
                    .info
                    .taints
                    .into_iter()
                    .map(|t| TaintMessage {
                        key: t.key,
                        value: t.value,
                        effect: format!("{:?}", t.effect),
                    })
                    .collect(),
                running: status.running,
                ingress_url: status.info.ingress_url,
                last_heartbeat_age_ms: u64::try_from(status.since_heartbeat.as_millis())
                    .unwrap_or(u64::MAX),
            })
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let key = WorkloadKey::new(&request.get_ref().namespace, &request.get_ref().name);
        self.allow(
            &request,
            Verb::List,
            Resource::Events,
            &key.namespace,
            &key.name,
        )
        .await?;
        let events = self
            .cluster
            .events
            .of(&key.to_string())
            .into_iter()
            .map(|e| EventMessage {
                node: e.node,
                generation: e.generation,
                reason: e.reason,
                message: e.message,
                count: e.count,
                first_at_ms: e.first_at_ms,
                last_at_ms: e.last_at_ms,
            })
            .collect();
        Ok(Response::new(ListEventsResponse { events }))
    }

    async fn apply_config(
        &self,
        request: Request<ApplyConfigRequest>,
    ) -> Result<Response<ConfigSummary>, Status> {
        let user = self.auth.authenticate(&request).await?;
        let request = request.into_inner();
        let mut object = request
            .object
            .ok_or_else(|| Status::invalid_argument("object: required"))?;
        if object.namespace.is_empty() {
            object.namespace = crate::model::DEFAULT_NAMESPACE.to_string();
        }
        let access = Access {
            creates: request.create_only,
            ..Access::new(
                Verb::Apply,
                config_resource(object.kind()),
                &object.namespace,
                &object.name,
            )
        };
        self.auth.authorize(&user, access).await?;
        let summary = summary(&object);
        self.config()?
            .apply(object, request.create_only)
            .await
            .map_err(config_status)?;
        Ok(Response::new(summary))
    }

    async fn list_config(
        &self,
        request: Request<ListConfigRequest>,
    ) -> Result<Response<ListConfigResponse>, Status> {
        let resource = config_resource(request.get_ref().kind());
        let namespace = &request.get_ref().namespace;
        // One object by name is a get, as `kubectl get secret NAME` is.
        let verb = if request.get_ref().name.is_empty() {
            Verb::List
        } else {
            Verb::Get
        };
        self.allow(&request, verb, resource, namespace, &request.get_ref().name)
            .await?;
        let request = request.into_inner();
        let items = self
            .config()?
            .current()
            .values()
            .filter(|o| o.kind == request.kind)
            .filter(|o| request.namespace.is_empty() || o.namespace == request.namespace)
            .filter(|o| request.name.is_empty() || o.name == request.name)
            .map(|o| summary(o))
            .collect();
        Ok(Response::new(ListConfigResponse { items }))
    }

    async fn delete_config(
        &self,
        request: Request<DeleteConfigRequest>,
    ) -> Result<Response<ConfigSummary>, Status> {
        let user = self.auth.authenticate(&request).await?;
        let request = request.into_inner();
        let key = ConfigKey {
            kind: request.kind(),
            namespace: if request.namespace.is_empty() {
                crate::model::DEFAULT_NAMESPACE.to_string()
            } else {
                request.namespace
            },
            name: request.name,
        };
        let access = Access::new(
            Verb::Delete,
            config_resource(key.kind),
            &key.namespace,
            &key.name,
        );
        self.auth.authorize(&user, access).await?;
        let object = self.config()?.delete(key).await.map_err(config_status)?;
        Ok(Response::new(summary(&object)))
    }
}

/// The policy's resource for a ConfigMap or Secret.
fn config_resource(kind: ConfigKind) -> Resource {
    match kind {
        ConfigKind::Secret => Resource::Secrets,
        ConfigKind::ConfigMap | ConfigKind::Unspecified => Resource::ConfigMaps,
    }
}

/// An object's name and the sizes of its values, never the values.
fn summary(object: &ConfigObject) -> ConfigSummary {
    ConfigSummary {
        kind: object.kind,
        namespace: object.namespace.clone(),
        name: object.name.clone(),
        sizes: object
            .data
            .iter()
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect(),
    }
}

fn config_status(error: ConfigError) -> Status {
    match error {
        ConfigError::ReadOnly => Status::failed_precondition(error.to_string()),
        ConfigError::AlreadyExists(_) => Status::already_exists(error.to_string()),
        ConfigError::NotFound(_) => Status::not_found(error.to_string()),
        ConfigError::Invalid(_) => Status::invalid_argument(error.to_string()),
        ConfigError::Store(error) => store_status(error),
    }
}
