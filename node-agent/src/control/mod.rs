//! The agent's side of the agent protocol: dial the control plane, register the node, hold a
//! `Session`, apply the desired set and its deltas to the [`Supervisor`], heartbeat with
//! per-workload counts and aggregated failures (never one message per sandbox), answer log
//! requests by uploading a sandbox's output, and attach a user's input to a sandbox's stdin.
//!
//! Workloads are applied and stopped off the session loop ([`operations`]): a module that
//! takes long to compile holds up neither the heartbeats nor any other workload.
//!
//! A lost session is retried with jittered exponential backoff. On reconnect the control plane
//! sends the full desired set again; workloads still wanted keep their generation and spec, so
//! the supervisor scales them in place and restarts nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use flotilla_proto::agent::v1::{ModuleSource, SandboxPhase, module_source};
use flotilla_proto::control::v1::agents_client::AgentsClient;
use flotilla_proto::control::v1::{
    AgentMessage, ConfigObjects, ControlMessage, DesiredState, DesiredWorkload, FetchModuleRequest,
    Heartbeat, Hello, LogUpload, LogUploadHeader, NodeResources, RegisterRequest, SandboxEvent,
    StreamLogs, WorkloadCounts, agent_message, control_message, log_upload,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use self::operations::{Operation, Operations};
use crate::admin::stream_logs;
use crate::runtime::logs::{LogFilter, unix_nanos};
use crate::runtime::volumes::ConfigKey;
use crate::supervisor::Supervisor;

pub mod identity;
mod operations;
mod stdin;

/// After a sandbox changes, the control plane hears of it this soon (and no more often),
/// rather than at the next periodic heartbeat.
const STATUS_REPORT_DELAY: Duration = Duration::from_millis(100);

/// First wait before fetching a module again after a failure; it doubles up to
/// [`MAX_FETCH_BACKOFF`], as Kubernetes backs off image pulls.
const FETCH_BACKOFF: Duration = Duration::from_secs(1);
const MAX_FETCH_BACKOFF: Duration = Duration::from_secs(30);

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
    /// The token the control plane requires of agents, if any.
    pub join_token: Option<String>,
    /// This node's credential, which its name is bound to ([`identity`]).
    pub node_credential: String,
    /// TLS towards an `https://` control plane (trust, and a client identity for mutual TLS).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Base URL of this node's HTTP ingress, told to the control plane; empty without one.
    pub ingress_url: String,
}

/// Adds the join token to every call to the control plane and, once the node is registered,
/// the session's id, which scopes what the agent may fetch to what is placed on its node.
#[derive(Clone)]
struct Credentials {
    join_token: Option<std::sync::Arc<str>>,
    session: Option<std::sync::Arc<str>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.join_token {
            flotilla_proto::auth::insert_bearer(&mut request, token);
        }
        if let Some(session) = &self.session {
            flotilla_proto::auth::insert_session(&mut request, session);
        }
        Ok(request)
    }
}

/// A client of the agent protocol that presents the join token and the session.
type Client = AgentsClient<tonic::service::interceptor::InterceptedService<Channel, Credentials>>;

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

/// The parts of complete sets that continue in a later message (`continued`): the control
/// plane splits a large set to stay within message limits, and it applies once whole.
#[derive(Default)]
struct ContinuedParts {
    desired: Vec<DesiredWorkload>,
    config: Vec<flotilla_proto::agent::v1::ConfigObject>,
}

impl ContinuedParts {
    /// `desired`, whole: `None` while the set continues.
    fn desired(&mut self, mut desired: DesiredState) -> Option<DesiredState> {
        if desired.incremental {
            return Some(desired);
        }
        self.desired.append(&mut desired.workloads);
        if desired.continued {
            return None;
        }
        desired.workloads = std::mem::take(&mut self.desired);
        Some(desired)
    }

    /// `config`, whole: `None` while the set continues.
    fn config(&mut self, mut config: ConfigObjects) -> Option<ConfigObjects> {
        if config.incremental {
            return Some(config);
        }
        self.config.append(&mut config.objects);
        if config.continued {
            return None;
        }
        config.objects = std::mem::take(&mut self.config);
        Some(config)
    }
}

/// What the agent remembers across sessions.
#[derive(Default)]
struct AgentState {
    /// Module blobs by digest, fetched once.
    modules: HashMap<String, Vec<u8>>,
    /// Workloads applied from the control plane: agent workload name → control-plane key.
    managed: BTreeMap<String, String>,
    /// The module digest of each managed workload, whose blob is kept while it is wanted.
    digests: HashMap<String, String>,
    /// Applies and stops in flight, off the session loop.
    operations: Operations,
    /// Workloads that could not be applied since the last heartbeat, as events.
    not_applied: Vec<SandboxEvent>,
    /// Workloads whose module could not be fetched, by agent workload name: the workload,
    /// failures so far, and when to try again.
    unfetched: BTreeMap<String, (DesiredWorkload, u32, tokio::time::Instant)>,
}

impl AgentState {
    /// The workloads whose next fetch attempt is due (applying them again updates `unfetched`).
    fn due_fetches(&mut self) -> Vec<DesiredWorkload> {
        let now = tokio::time::Instant::now();
        let due: Vec<String> = self
            .unfetched
            .iter()
            .filter(|(_, (_, _, at))| *at <= now)
            .map(|(key, _)| key.clone())
            .collect();
        due.iter()
            .filter_map(|key| self.unfetched.get(key).map(|(w, _, _)| w.clone()))
            .collect()
    }

    fn next_fetch(&self) -> Option<tokio::time::Instant> {
        self.unfetched.values().map(|(_, _, at)| *at).min()
    }
}

async fn session(
    config: &ControlConfig,
    supervisor: &Supervisor,
    state: &mut AgentState,
    established: &mut bool,
) -> Result<(), SessionError> {
    let mut endpoint = Endpoint::from_shared(config.url.clone())
        .map_err(SessionError::Connect)?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = &config.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(SessionError::Connect)?;
    }
    let channel = endpoint.connect().await.map_err(SessionError::Connect)?;
    let mut credentials = Credentials {
        join_token: config.join_token.as_deref().map(std::sync::Arc::from),
        session: None,
    };
    let mut client = AgentsClient::with_interceptor(channel.clone(), credentials.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
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
            ingress_url: config.ingress_url.clone(),
            node_credential: config.node_credential.clone(),
            wasm_features: capacity.wasm_features.clone(),
        })
        .await?
        .into_inner();
    credentials.session = Some(registered.session_id.as_str().into());
    let mut client = AgentsClient::with_interceptor(channel, credentials)
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
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
    let mut changes = supervisor.changes();
    let early = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(early);
    let mut early_pending = false;
    // Parts of a complete set that continues in the next message; this session's alone.
    let mut parts = ContinuedParts::default();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                early_pending = false;
                let beat = heartbeat(supervisor, state);
                if up.send(beat).await.is_err() {
                    return Err(SessionError::Closed);
                }
            }
            // Changes are reported early, batched over STATUS_REPORT_DELAY.
            Ok(()) = changes.changed(), if !early_pending => {
                early_pending = true;
                early.as_mut().reset(tokio::time::Instant::now() + STATUS_REPORT_DELAY);
            }
            () = &mut early, if early_pending => {
                early_pending = false;
                ticker.reset();
                let beat = heartbeat(supervisor, state);
                if up.send(beat).await.is_err() {
                    return Err(SessionError::Closed);
                }
            }
            () = sleep_until(state.next_fetch()) => {
                let due = state.due_fetches();
                let retry = DesiredState {
                    workloads: due,
                    incremental: true,
                    ..DesiredState::default()
                };
                apply_desired(&mut client, supervisor, state, retry).await;
            }
            message = down.next() => match message {
                None => return Err(SessionError::Closed),
                Some(Err(status)) => return Err(SessionError::Rpc(status)),
                Some(Ok(ControlMessage { kind: Some(control_message::Kind::Desired(desired)) })) => {
                    if let Some(desired) = parts.desired(desired) {
                        apply_desired(&mut client, supervisor, state, desired).await;
                    }
                }
                Some(Ok(ControlMessage { kind: Some(control_message::Kind::Routes(routes)) })) => {
                    supervisor
                        .runtime()
                        .http_routes()
                        .set_remote(routes.routes, &config.ingress_url);
                }
                Some(Ok(ControlMessage { kind: Some(control_message::Kind::Config(config)) })) => {
                    let Some(config) = parts.config(config) else {
                        continue;
                    };
                    let removed = config
                        .removed
                        .into_iter()
                        .map(ConfigKey::from)
                        .collect();
                    let files = supervisor.runtime().config_files();
                    if let Err(error) = files.apply(config.objects, !config.incremental, removed) {
                        tracing::error!(%error, "cannot write ConfigMap and Secret files");
                    }
                    supervisor.config_changed();
                }
                Some(Ok(ControlMessage { kind: Some(control_message::Kind::Logs(request)) })) => {
                    let name = sandbox_workload(state, supervisor, &request.key, request.replica);
                    upload_logs(client.clone(), supervisor, name, request);
                }
                Some(Ok(ControlMessage { kind: Some(control_message::Kind::Stdin(request)) })) => {
                    let name = sandbox_workload(state, supervisor, &request.key, request.replica);
                    stdin::open(client.clone(), supervisor, name.as_deref(), request);
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Applies a desired set, or a delta of one, to the supervisor (for the workloads the control
/// plane owns; workloads from static manifests are left alone).
async fn apply_desired(
    client: &mut Client,
    supervisor: &Supervisor,
    state: &mut AgentState,
    desired: DesiredState,
) {
    let mut stop = Vec::new();
    if desired.incremental {
        for name in &desired.removed {
            if state.managed.remove(name).is_some() {
                stop.push(name.clone());
            }
        }
    } else {
        // A complete set: whatever it does not list should stop.
        let listed: BTreeSet<&str> = desired
            .workloads
            .iter()
            .filter_map(|w| w.spec.as_ref().map(|s| s.name.as_str()))
            .collect();
        let (kept, dropped) = std::mem::take(&mut state.managed)
            .into_iter()
            .partition(|(name, _)| listed.contains(name.as_str()));
        state.managed = kept;
        stop.extend(dropped.into_keys());
    }
    for name in stop {
        state.digests.remove(&name);
        state.operations.submit(supervisor, name, Operation::Stop);
    }
    if desired.incremental {
        for name in &desired.removed {
            state.unfetched.remove(name);
        }
    } else {
        state.unfetched.clear();
    }

    for workload in desired.workloads {
        let Some(mut spec) = workload.spec.clone() else {
            continue;
        };
        state
            .managed
            .insert(spec.name.clone(), workload.key.clone());
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
                    state.unfetched.remove(&spec.name);
                    state
                        .modules
                        .insert(sha256.clone(), response.into_inner().module);
                }
                Err(status) => {
                    let failures = state.unfetched.get(&spec.name).map_or(0, |(_, n, _)| *n) + 1;
                    let backoff =
                        (FETCH_BACKOFF * 2u32.saturating_pow(failures - 1)).min(MAX_FETCH_BACKOFF);
                    tracing::warn!(workload = %workload.key, %status, retry_in = ?backoff, "cannot fetch module");
                    state.unfetched.insert(
                        spec.name.clone(),
                        (
                            workload.clone(),
                            failures,
                            tokio::time::Instant::now() + backoff,
                        ),
                    );
                    state.not_applied.push(event(
                        &workload.key,
                        spec.generation,
                        "ModuleUnavailable",
                        format!("fetching module {sha256}: {}", status.message()),
                    ));
                    continue;
                }
            }
        }
        state.digests.insert(spec.name.clone(), sha256.clone());
        spec.module = Some(ModuleSource {
            source: state
                .modules
                .get(&sha256)
                .map(|bytes| module_source::Source::Inline(bytes.clone())),
            sha256,
        });
        state.operations.submit(
            supervisor,
            spec.name.clone(),
            Operation::Apply {
                key: workload.key.clone(),
                spec: Box::new(spec),
            },
        );
    }
    // Forget module blobs that no wanted workload uses.
    let in_use: BTreeSet<&String> = state.digests.values().collect();
    state.modules.retain(|digest, _| in_use.contains(digest));
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn event(key: &str, generation: u64, reason: &str, message: String) -> SandboxEvent {
    SandboxEvent {
        key: key.to_string(),
        generation,
        reason: reason.to_string(),
        message,
        count: 1,
        last_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    }
}

/// The agent workload of the newest revision of `key` that has sandbox `replica`.
fn sandbox_workload(
    state: &AgentState,
    supervisor: &Supervisor,
    key: &str,
    replica: u32,
) -> Option<String> {
    state
        .managed
        .iter()
        .filter(|(name, k)| *k == key && supervisor.output(name, replica).is_some())
        .max_by_key(|(name, _)| {
            supervisor
                .list(Some(name))
                .first()
                .map_or(0, |s| s.generation)
        })
        .map(|(name, _)| name.clone())
}

/// Answers a log request: opens `UploadLogs`, sends the header, then the sandbox's output
/// until it ends or the control plane ends the call (the user stopped reading).
fn upload_logs(
    mut client: Client,
    supervisor: &Supervisor,
    name: Option<String>,
    request: StreamLogs,
) {
    let output = name
        .as_deref()
        .and_then(|name| supervisor.output(name, request.replica));
    let filter = LogFilter::from_options(request.options.as_ref(), unix_nanos());
    tokio::spawn(async move {
        let (tx, rx) = mpsc::channel(16);
        let header = |error: String| LogUpload {
            kind: Some(log_upload::Kind::Header(LogUploadHeader {
                request_id: request.request_id.clone(),
                error,
            })),
        };
        let forward = match output {
            None => {
                let error = format!(
                    "sandbox {} of workload {} not found on this node",
                    request.replica, request.key
                );
                // The channel has room: the header cannot wait.
                let _ = tx.try_send(header(error));
                drop(tx);
                None
            }
            Some(output) => {
                let _ = tx.try_send(header(String::new()));
                let mut chunks = stream_logs(output, request.follow, filter);
                Some(tokio::spawn(async move {
                    while let Some(chunk) = chunks.recv().await {
                        let message = LogUpload {
                            kind: Some(log_upload::Kind::Chunk(chunk)),
                        };
                        if tx.send(message).await.is_err() {
                            return;
                        }
                    }
                }))
            }
        };
        if let Err(status) = client.upload_logs(ReceiverStream::new(rx)).await {
            tracing::debug!(%status, request = %request.request_id, "log upload ended");
        }
        if let Some(forward) = forward {
            forward.abort();
        }
    });
}

/// Counts per workload the control plane owns, and the failures since the last heartbeat.
fn heartbeat(supervisor: &Supervisor, state: &mut AgentState) -> AgentMessage {
    let workloads = state
        .managed
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
                succeeded: count(SandboxPhase::Succeeded),
                available: supervisor.available(name),
            }
        })
        .collect();
    let mut events = std::mem::take(&mut state.not_applied);
    events.extend(state.operations.take_failures());
    for failures in supervisor.take_failures() {
        // Failures of workloads from static manifests stay local.
        if let Some(key) = state.managed.get(&failures.workload) {
            events.push(SandboxEvent {
                key: key.clone(),
                generation: failures.generation,
                reason: failures.reason.to_string(),
                message: failures.message,
                count: failures.count,
                last_at_ms: failures.last_at_ms,
            });
        }
    }
    AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(Heartbeat {
            workloads,
            events,
        })),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::agent::v1::{ConfigObject, WorkloadSpec};

    use super::*;

    fn workload(name: &str) -> DesiredWorkload {
        DesiredWorkload {
            spec: Some(WorkloadSpec {
                name: name.into(),
                ..WorkloadSpec::default()
            }),
            ..DesiredWorkload::default()
        }
    }

    fn names(desired: &DesiredState) -> Vec<String> {
        desired
            .workloads
            .iter()
            .filter_map(|w| w.spec.as_ref().map(|s| s.name.clone()))
            .collect()
    }

    #[test]
    fn a_complete_set_in_parts_applies_once_whole() {
        let mut parts = ContinuedParts::default();
        let part = |names: &[&str], continued| DesiredState {
            workloads: names.iter().map(|n| workload(n)).collect(),
            incremental: false,
            removed: Vec::new(),
            continued,
        };
        assert!(parts.desired(part(&["a", "b"], true)).is_none());
        assert!(parts.desired(part(&["c"], true)).is_none());
        let whole = parts.desired(part(&["d"], false)).expect("whole");
        assert_eq!(names(&whole), ["a", "b", "c", "d"]);
        assert!(!whole.incremental);
        // Deltas pass as they are, and the next complete set starts afresh.
        let delta = DesiredState {
            workloads: vec![workload("e")],
            incremental: true,
            ..DesiredState::default()
        };
        assert_eq!(names(&parts.desired(delta).expect("delta")), ["e"]);
        assert_eq!(
            names(&parts.desired(part(&["f"], false)).expect("whole")),
            ["f"]
        );

        let config = |name: &str, continued| ConfigObjects {
            objects: vec![ConfigObject {
                name: name.into(),
                ..ConfigObject::default()
            }],
            continued,
            ..ConfigObjects::default()
        };
        assert!(parts.config(config("x", true)).is_none());
        let whole = parts.config(config("y", false)).expect("whole");
        assert_eq!(whole.objects.len(), 2);
    }
}
