//! The agent protocol on a loopback socket, with scripted fake agents and the real controller.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::agent::v1::LogChunk;
use flotilla_proto::control::v1::agents_client::AgentsClient;
use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{
    AgentMessage, ApplyRequest, ClusterRoute, ControlMessage, DeleteNodeRequest, DeleteRequest,
    DesiredState, GetRequest, Heartbeat, Hello, ListEventsRequest, ListNodesRequest, LogUpload,
    LogUploadHeader, NodeResources, RegisterRequest, SandboxEvent, StreamLogs, WorkloadCounts,
    WorkloadLogsRequest, agent_message, control_message, log_upload,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Code;
use tonic::transport::Channel;

use super::tests::from_object;
use super::{AgentService, WorkloadService};
use crate::cluster::Cluster as ClusterState;
use crate::controller::Controller;
use crate::model::WorkloadStatus;
use crate::modules::ModuleStore;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::store::EmbeddedStore;

struct Cluster {
    agents: AgentsClient<Channel>,
    workloads: WorkloadsClient<Channel>,
    state: Arc<ClusterState>,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    cluster_with_token(None).await
}

async fn cluster_with_token(join_token: Option<&str>) -> Cluster {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("store");
    let modules = ModuleStore::open(&dir.path().join("modules"), 1 << 20).expect("modules");
    let cluster = Arc::new(ClusterState::default());
    let scheduler = Scheduler::new(&SchedulerConfig::default()).expect("scheduler");
    let controller = Controller::new(store.clone(), scheduler, cluster.clone());
    tokio::spawn(controller.run(Duration::from_secs(30), std::future::pending()));
    tokio::spawn(
        cluster
            .desired
            .clone()
            .run(store.clone(), std::future::pending()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                WorkloadService::new(store.clone(), modules.clone())
                    .with_cluster(cluster.clone())
                    .with_config(
                        crate::store::ConfigStore::open(
                            &dir.path().join("config.redb"),
                            cluster.clone(),
                        )
                        .expect("config store"),
                    )
                    .into_server(),
            )
            .add_service(
                AgentService::new(store, modules, cluster.clone(), Duration::from_secs(1))
                    .with_join_token(join_token.map(str::to_string))
                    .into_server(),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let url = format!("http://{addr}");
    Cluster {
        agents: AgentsClient::connect(url.clone()).await.expect("connect"),
        workloads: WorkloadsClient::connect(url).await.expect("connect"),
        state: cluster,
        _dir: dir,
    }
}

/// A credential of the agent installation named `installation` (base64url, long enough).
fn credential(installation: &str) -> String {
    format!("{installation}-{}", "x".repeat(43))
}

fn registration(node: &str, agent_id: &str, arch: &str) -> RegisterRequest {
    RegisterRequest {
        node_name: node.into(),
        agent_id: agent_id.into(),
        node_credential: credential(node),
        arch: arch.into(),
        os: "linux".into(),
        allocatable: Some(NodeResources {
            memory_bytes: 1 << 30,
            cpu_millis: 4000,
            sandboxes: 100,
        }),
        ..RegisterRequest::default()
    }
}

/// A scripted agent: registered, with its Session open.
struct FakeAgent {
    up: mpsc::Sender<AgentMessage>,
    down: tonic::Streaming<ControlMessage>,
    session_id: String,
}

impl FakeAgent {
    async fn join(cluster: &mut Cluster, node: &str) -> Self {
        Self::join_with(
            cluster,
            registration(node, &format!("agent-{node}"), "amd64"),
        )
        .await
    }

    async fn join_with(cluster: &mut Cluster, registration: RegisterRequest) -> Self {
        let node = registration.node_name.clone();
        let session_id = cluster
            .agents
            .register(registration)
            .await
            .expect("register")
            .into_inner()
            .session_id;
        let (up, rx) = mpsc::channel(8);
        up.send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(Hello {
                node_name: node,
                session_id: session_id.clone(),
            })),
        })
        .await
        .expect("hello queued");
        up.send(AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(Heartbeat::default())),
        })
        .await
        .expect("heartbeat queued");
        let down = cluster
            .agents
            .session(ReceiverStream::new(rx))
            .await
            .expect("session")
            .into_inner();
        Self {
            up,
            down,
            session_id,
        }
    }

    /// Fetches a module as this agent's session.
    async fn fetch(&self, cluster: &mut Cluster, sha256: &str) -> Result<Vec<u8>, tonic::Status> {
        let mut request = tonic::Request::new(flotilla_proto::control::v1::FetchModuleRequest {
            sha256: sha256.into(),
        });
        flotilla_proto::auth::insert_session(&mut request, &self.session_id);
        Ok(cluster
            .agents
            .fetch_module(request)
            .await?
            .into_inner()
            .module)
    }

    /// The next message down the session, past route tables and config objects (sent on open
    /// and on changes).
    async fn next(&mut self) -> control_message::Kind {
        loop {
            let kind = self.next_with_config().await;
            if !matches!(kind, control_message::Kind::Config(_)) {
                return kind;
            }
        }
    }

    /// The next message down the session, past route tables.
    async fn next_with_config(&mut self) -> control_message::Kind {
        loop {
            let kind = tokio::time::timeout(Duration::from_secs(10), self.down.next())
                .await
                .expect("a message within 10 s")
                .expect("open")
                .expect("message")
                .kind
                .expect("a kind");
            if !matches!(kind, control_message::Kind::Routes(_)) {
                return kind;
            }
        }
    }

    /// The next message, which must be a desired state.
    async fn next_desired(&mut self) -> DesiredState {
        match self.next().await {
            control_message::Kind::Desired(desired) => desired,
            other => panic!("expected a desired state, got {other:?}"),
        }
    }

    /// Reads route tables until one satisfies `pred`.
    async fn routes_until(&mut self, pred: impl Fn(&[ClusterRoute]) -> bool) -> Vec<ClusterRoute> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let message = self.down.next().await.expect("open").expect("message");
                if let Some(control_message::Kind::Routes(table)) = message.kind
                    && pred(&table.routes)
                {
                    return table.routes;
                }
            }
        })
        .await
        .expect("a route table within 10 s")
    }

    async fn heartbeat(&self, beat: Heartbeat) {
        self.up
            .send(AgentMessage {
                kind: Some(agent_message::Kind::Heartbeat(beat)),
            })
            .await
            .expect("heartbeat queued");
    }

    /// Reads desired states until one satisfies `pred`.
    async fn desired_until(&mut self, pred: impl Fn(&DesiredState) -> bool) -> DesiredState {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let message = self.down.next().await.expect("open").expect("message");
                if let Some(control_message::Kind::Desired(desired)) = message.kind
                    && pred(&desired)
                {
                    return desired;
                }
            }
        })
        .await
        .expect("desired state within 10 s")
    }
}

fn replicas_of(desired: &DesiredState, key: &str) -> u32 {
    desired
        .workloads
        .iter()
        .find(|w| w.key == key)
        .and_then(|w| w.spec.as_ref())
        .map_or(0, |s| s.replicas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_their_share_and_a_departed_agents_share_moves() {
    let mut cluster = cluster().await;
    let mut a = FakeAgent::join(&mut cluster, "node-a").await;
    let mut b = FakeAgent::join(&mut cluster, "node-b").await;

    let sha = super::tests::push(&mut cluster.workloads).await;
    apply_spec(&mut cluster, "web", &sha, "replicas: 10, args: [serve]").await;

    let on_a = a.desired_until(|d| replicas_of(d, "default/web") > 0).await;
    let on_b = b.desired_until(|d| replicas_of(d, "default/web") > 0).await;
    assert_eq!(
        replicas_of(&on_a, "default/web") + replicas_of(&on_b, "default/web"),
        10
    );
    let spec = on_a.workloads[0].spec.as_ref().expect("spec");
    assert!(spec.name.starts_with("default.web-"), "{}", spec.name);
    assert_eq!(spec.owner, "default.web");
    assert_eq!(spec.args, ["serve"]);
    assert_eq!(
        spec.module.as_ref().map(|m| m.sha256.as_str()),
        Some(sha.as_str())
    );

    // An imposter cannot take node-a's name while node-a is live.
    let err = cluster
        .agents
        .register(registration("node-a", "imposter", "amd64"))
        .await
        .expect_err("name taken");
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());

    // node-b leaves: all ten replicas land on node-a.
    drop(b);
    let all = a
        .desired_until(|d| replicas_of(d, "default/web") == 10)
        .await;
    assert_eq!(all.workloads.len(), 1);
    // Keep node-a's session open to the end.
    drop(a.up);
}

#[tokio::test]
async fn bad_registrations_and_sessions_are_refused() {
    let mut cluster = cluster().await;
    let cases = [
        (registration("Node_A", "x", "amd64"), "node_name"),
        (registration("node-a", "x", "riscv64"), "arch"),
        (registration("node-a", "", "amd64"), "agent_id"),
    ];
    for (request, needle) in cases {
        let err = cluster.agents.register(request).await.expect_err(needle);
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}");
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    // A session without a registration.
    let (up, rx) = mpsc::channel(1);
    up.send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node_name: "ghost".into(),
            session_id: "nope".into(),
        })),
    })
    .await
    .expect("queued");
    let err = cluster
        .agents
        .session(ReceiverStream::new(rx))
        .await
        .expect_err("unregistered");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
}

async fn apply(cluster: &mut Cluster, name: &str, sha: &str, replicas: u32) {
    apply_spec(cluster, name, sha, &format!("replicas: {replicas}")).await;
}

/// Applies workload `name` running module `sha` with more spec fields (flow-style YAML).
async fn apply_spec(cluster: &mut Cluster, name: &str, sha: &str, fields: &str) {
    let manifest = format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: {name}}}\n\
         spec: {{module: {{sha256: \"{sha}\"}}, {fields}}}\n"
    );
    cluster
        .workloads
        .apply(ApplyRequest {
            manifest: manifest.into_bytes(),
        })
        .await
        .expect("apply");
}

/// Polls workload `name` (bounded) until `found` picks something out of its status.
async fn status_until<T>(
    cluster: &mut Cluster,
    name: &str,
    found: impl Fn(WorkloadStatus) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let object = cluster
                .workloads
                .get(GetRequest {
                    namespace: String::new(),
                    name: name.into(),
                })
                .await
                .expect("get")
                .into_inner();
            let workload = from_object(&object).expect("decodes");
            if let Some(value) = found(workload.status.unwrap_or_default()) {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("status within 10 s")
}

fn keys(desired: &DesiredState) -> Vec<(&str, u32)> {
    desired
        .workloads
        .iter()
        .map(|w| (w.key.as_str(), w.spec.as_ref().map_or(0, |s| s.replicas)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_desired_set_comes_whole_then_as_deltas() {
    let mut cluster = cluster().await;
    let mut a = FakeAgent::join(&mut cluster, "node-a").await;
    let first = a.next_desired().await;
    assert!(!first.incremental);
    assert!(first.workloads.is_empty());

    let sha = super::tests::push(&mut cluster.workloads).await;
    apply(&mut cluster, "web", &sha, 2).await;
    let added = a.next_desired().await;
    assert!(added.incremental);
    assert_eq!(keys(&added), [("default/web", 2)]);

    apply(&mut cluster, "api", &sha, 1).await;
    assert_eq!(keys(&a.next_desired().await), [("default/api", 1)]);

    // Scaling one workload sends only that workload.
    apply(&mut cluster, "web", &sha, 3).await;
    let scaled = a.next_desired().await;
    assert_eq!(keys(&scaled), [("default/web", 3)]);
    assert!(scaled.removed.is_empty());

    cluster
        .workloads
        .delete(DeleteRequest {
            namespace: String::new(),
            name: "api".into(),
        })
        .await
        .expect("delete");
    let removed = a.next_desired().await;
    assert!(removed.incremental && removed.workloads.is_empty());
    assert_eq!(removed.removed.len(), 1);
    assert!(removed.removed[0].starts_with("default.api-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_set_larger_than_a_message_comes_in_parts() {
    let mut cluster = cluster().await;
    let mut a = FakeAgent::join(&mut cluster, "node-a").await;
    assert!(a.next_desired().await.workloads.is_empty());
    let sha = super::tests::push(&mut cluster.workloads).await;
    // Ten workloads of 600 KB each: 6 MB, more than one part (4 MiB).
    let arg = "x".repeat(600_000);
    for i in 0..10 {
        apply_spec(
            &mut cluster,
            &format!("big-{i}"),
            &sha,
            &format!("args: [\"{arg}\"]"),
        )
        .await;
    }
    let mut seen = 0;
    while seen < 10 {
        seen += a.next_desired().await.workloads.len();
    }
    // The agent reconnects: its new session opens with the node's complete set, in parts.
    drop(a);
    let mut again = FakeAgent::join(&mut cluster, "node-a").await;
    let mut parts = Vec::new();
    loop {
        let part = again.next_desired().await;
        assert!(!part.incremental);
        assert!(part.encoded_len() <= 4 << 20, "{}", part.encoded_len());
        let continued = part.continued;
        parts.push(part);
        if !continued {
            break;
        }
    }
    assert!(parts.len() >= 2, "{} part(s)", parts.len());
    let total: usize = parts.iter().map(|p| p.workloads.len()).sum();
    assert_eq!(total, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_events_and_nodes_reach_the_user_through_the_control_plane() {
    let mut cluster = cluster().await;
    let mut a = FakeAgent::join(&mut cluster, "node-a").await;
    a.next_desired().await;
    let sha = super::tests::push(&mut cluster.workloads).await;
    apply(&mut cluster, "web", &sha, 2).await;
    a.next_desired().await;

    // Logs: the request goes down the session; the agent uploads; the user reads.
    let mut workloads = cluster.workloads.clone();
    let reader = tokio::spawn(async move {
        let mut stream = workloads
            .logs(WorkloadLogsRequest {
                name: "web".into(),
                replica: 1,
                ..WorkloadLogsRequest::default()
            })
            .await?
            .into_inner();
        let mut text = Vec::new();
        while let Some(chunk) = stream.next().await {
            text.extend(chunk?.data);
        }
        Ok::<_, tonic::Status>(text)
    });
    let control_message::Kind::Logs(request) = a.next().await else {
        panic!("expected a log request");
    };
    assert_eq!((request.key.as_str(), request.replica), ("default/web", 1));
    let upload = |request: &StreamLogs, error: &str, data: &[u8]| {
        let mut messages = vec![LogUpload {
            kind: Some(log_upload::Kind::Header(LogUploadHeader {
                request_id: request.request_id.clone(),
                error: error.into(),
            })),
        }];
        if !data.is_empty() {
            messages.push(LogUpload {
                kind: Some(log_upload::Kind::Chunk(LogChunk {
                    data: data.to_vec(),
                    ..LogChunk::default()
                })),
            });
        }
        tokio_stream::iter(messages)
    };
    cluster
        .agents
        .upload_logs(upload(&request, "", b"hello from replica 1\n"))
        .await
        .expect("upload");
    let text = reader.await.expect("reader task").expect("logs");
    assert_eq!(text, b"hello from replica 1\n");

    // The agent's error reaches the user; a replica the node does not have is refused at once.
    let mut workloads = cluster.workloads.clone();
    let reader = tokio::spawn(async move {
        let mut stream = workloads
            .logs(WorkloadLogsRequest {
                name: "web".into(),
                node: "node-a".into(),
                ..WorkloadLogsRequest::default()
            })
            .await?
            .into_inner();
        stream.next().await.transpose()
    });
    let control_message::Kind::Logs(request) = a.next().await else {
        panic!("expected a log request");
    };
    cluster
        .agents
        .upload_logs(upload(
            &request,
            "sandbox 0 of workload default/web not found",
            b"",
        ))
        .await
        .expect("upload");
    let err = reader.await.expect("reader").expect_err("agent error");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("not found"), "{}", err.message());
    let err = cluster
        .workloads
        .logs(WorkloadLogsRequest {
            name: "web".into(),
            replica: 7,
            ..WorkloadLogsRequest::default()
        })
        .await
        .expect_err("no replica 7");
    assert_eq!(err.code(), Code::NotFound);

    // Failures in a heartbeat become events and the Ready condition's reason.
    a.heartbeat(Heartbeat {
        workloads: vec![WorkloadCounts {
            key: "default/web".into(),
            generation: 1,
            running: 1,
            pending: 1,
            ..WorkloadCounts::default()
        }],
        events: vec![SandboxEvent {
            key: "default/web".into(),
            generation: 1,
            reason: "Trap".into(),
            message: "wasm trap: unreachable\n  0: main".into(),
            count: 3,
            last_at_ms: 1_000,
        }],
    })
    .await;
    let ready = status_until(&mut cluster, "web", |status| {
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.reason == "Trap")
    })
    .await;
    assert_eq!(ready.status, "False");
    assert_eq!(
        ready.message,
        "1 of 2 replicas running; sandboxes on node node-a ended with wasm trap: unreachable"
    );
    let events = cluster
        .workloads
        .list_events(ListEventsRequest {
            namespace: String::new(),
            name: "web".into(),
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (
            events[0].node.as_str(),
            events[0].reason.as_str(),
            events[0].count
        ),
        ("node-a", "Trap", 3)
    );

    let nodes = cluster
        .workloads
        .list_nodes(ListNodesRequest {})
        .await
        .expect("nodes")
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (nodes[0].name.as_str(), nodes[0].ready, nodes[0].running),
        ("node-a", true, 1)
    );
    assert_eq!(nodes[0].allocated.as_ref().map(|a| a.sandboxes), Some(2));
    assert_eq!(
        nodes[0]
            .labels
            .get("kubernetes.io/arch")
            .map(String::as_str),
        Some("amd64")
    );
    drop(a.up);
}

#[tokio::test]
async fn with_a_join_token_only_agents_that_present_it_register() {
    let mut cluster = cluster_with_token(Some("s3cret-token")).await;
    let err = cluster
        .agents
        .register(registration("node-a", "a", "amd64"))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("requires a join token"),
        "{}",
        err.message()
    );

    for (token, ok) in [("wrong-token!", false), ("s3cret-token", true)] {
        let mut request = tonic::Request::new(registration("node-a", "a", "amd64"));
        flotilla_proto::auth::insert_bearer(&mut request, token);
        let result = cluster.agents.register(request).await;
        assert_eq!(result.is_ok(), ok, "{token}: {result:?}");
        if let Err(err) = result {
            assert_eq!(err.code(), Code::Unauthenticated);
            assert_eq!(err.message(), "invalid join token");
        }
    }
    // Every call of the protocol is guarded, not only Register.
    let err = cluster
        .agents
        .fetch_module(flotilla_proto::control::v1::FetchModuleRequest {
            sha256: "0".repeat(64),
        })
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_learns_which_ingresses_serve_each_http_workload() {
    let mut cluster = cluster().await;
    let mut a = FakeAgent::join_with(
        &mut cluster,
        RegisterRequest {
            ingress_url: "http://10.0.0.1:8080".into(),
            ..registration("node-a", "agent-a", "amd64")
        },
    )
    .await;
    // No ingress: HTTP replicas never go here, but it still learns the routes.
    let mut b = FakeAgent::join(&mut cluster, "node-b").await;
    let sha = super::tests::push(&mut cluster.workloads).await;
    let fields = "replicas: 2, http: {pathPrefix: /api, host: api.example.com, maxConcurrency: 40}";
    apply_spec(&mut cluster, "web", &sha, fields).await;
    let expected = [ClusterRoute {
        workload: "default.web".into(),
        host: "api.example.com".into(),
        path_prefix: "/api".into(),
        endpoints: vec!["http://10.0.0.1:8080".into()],
    }];
    // The node with the replicas gets both its share and the table, in either order.
    let (mut table, mut share) = (None, None);
    tokio::time::timeout(Duration::from_secs(10), async {
        while table.is_none() || share.is_none() {
            let message = a.down.next().await.expect("open").expect("message");
            match message.kind {
                Some(control_message::Kind::Routes(t)) if !t.routes.is_empty() => {
                    table = Some(t.routes);
                }
                Some(control_message::Kind::Desired(d)) if replicas_of(&d, "default/web") == 2 => {
                    share = Some(d);
                }
                _ => {}
            }
        }
    })
    .await
    .expect("routes and a share within 10 s");
    assert_eq!(table.as_deref(), Some(&expected[..]));
    let http = share
        .and_then(|d| d.workloads.into_iter().next())
        .and_then(|w| w.spec)
        .and_then(|s| s.http)
        .expect("the agent's spec carries the route");
    assert_eq!(
        (http.host.as_str(), http.path_prefix.as_str()),
        ("api.example.com", "/api")
    );
    // The node without an ingress runs nothing of it, yet knows where it is served.
    assert_eq!(b.routes_until(|r| !r.is_empty()).await, expected);

    // Deleted, the route leaves every agent's table.
    cluster
        .workloads
        .delete(DeleteRequest {
            namespace: String::new(),
            name: "web".into(),
        })
        .await
        .expect("delete");
    b.routes_until(<[ClusterRoute]>::is_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_available_only_once_agents_count_them_past_min_ready_seconds() {
    let mut cluster = cluster().await;
    let a = FakeAgent::join(&mut cluster, "node-a").await;
    let sha = super::tests::push(&mut cluster.workloads).await;
    apply_spec(
        &mut cluster,
        "web",
        &sha,
        "replicas: 2, minReadySeconds: 30",
    )
    .await;
    let mut status_when = async |available: u32, wanted: (u64, u64, &str)| {
        a.heartbeat(Heartbeat {
            workloads: vec![WorkloadCounts {
                key: "default/web".into(),
                generation: 1,
                running: 2,
                available,
                ..WorkloadCounts::default()
            }],
            events: vec![],
        })
        .await;
        status_until(&mut cluster, "web", |status| {
            let available = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Available")
                .map(|c| c.status.as_str())
                .unwrap_or_default();
            (status.ready_replicas, status.available_replicas, available)
                .eq(&wanted)
                .then_some(())
        })
        .await;
    };
    // Running but not yet for minReadySeconds: ready, not available.
    status_when(0, (2, 0, "False")).await;
    status_when(1, (2, 1, "False")).await;
    status_when(2, (2, 2, "True")).await;
}

/// What a fake agent runs, by agent workload name: (generation, replicas, args).
type Running = std::collections::BTreeMap<String, (u64, u32, Vec<String>)>;

/// Applies a desired state (whole or a delta) to `running`.
fn follow(running: &mut Running, desired: &DesiredState) {
    if !desired.incremental {
        running.clear();
    }
    for name in &desired.removed {
        running.remove(name);
    }
    for w in &desired.workloads {
        let spec = w.spec.as_ref().expect("spec");
        running.insert(
            spec.name.clone(),
            (spec.generation, spec.replicas, spec.args.clone()),
        );
    }
}

/// A heartbeat saying every sandbox of `running` is available (`broken` args never are).
fn beat_all_available(running: &Running, broken: &str) -> Heartbeat {
    Heartbeat {
        workloads: running
            .values()
            .map(|(generation, replicas, args)| {
                let up = if args.iter().any(|a| a == broken) {
                    0
                } else {
                    *replicas
                };
                WorkloadCounts {
                    key: "default/web".into(),
                    generation: *generation,
                    running: up,
                    available: up,
                    ..WorkloadCounts::default()
                }
            })
            .collect(),
        events: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_runs_two_revisions_side_by_side_within_its_limits() {
    let mut cluster = cluster().await;
    let mut a = FakeAgent::join(&mut cluster, "node-a").await;
    let mut running = Running::new();
    follow(&mut running, &a.next_desired().await);
    let sha = super::tests::push(&mut cluster.workloads).await;
    let strategy = "strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 1}}";
    apply_spec(
        &mut cluster,
        "web",
        &sha,
        &format!("replicas: 4, args: [v1], {strategy}"),
    )
    .await;
    follow(&mut running, &a.next_desired().await);
    assert_eq!(running.len(), 1);
    a.heartbeat(beat_all_available(&running, "")).await;
    status_until(&mut cluster, "web", |s| {
        (s.available_replicas == 4).then_some(())
    })
    .await;

    apply_spec(
        &mut cluster,
        "web",
        &sha,
        &format!("replicas: 4, args: [v2], {strategy}"),
    )
    .await;
    // Each step: one old sandbox goes and one new one comes, never fewer than 3 available.
    let mut steps = 0;
    while running.values().any(|(_, _, args)| args == &["v1"]) {
        follow(&mut running, &a.next_desired().await);
        let total: u32 = running.values().map(|(_, r, _)| r).sum();
        assert_eq!(total, 4, "maxSurge 0 keeps 4 in all: {running:?}");
        a.heartbeat(beat_all_available(&running, "")).await;
        steps += 1;
        assert!(steps <= 8, "the update should finish: {running:?}");
    }
    let (_, replicas, args) = running.values().next().expect("the new revision");
    assert_eq!(
        (running.len(), *replicas, args.as_slice()),
        (1, 4, &["v2".to_string()][..])
    );
    let status = status_until(&mut cluster, "web", |s| {
        (s.updated_replicas == 4 && s.replicas == 4 && s.available_replicas == 4).then_some(s)
    })
    .await;
    assert_eq!(status.revision, 2);
    let numbers: Vec<u64> = status.revisions.iter().map(|r| r.revision).collect();
    assert_eq!(numbers, [2, 1], "revision 1 is kept for rollback");
    let old = status.revisions[1].template.as_ref().expect("old template");
    assert_eq!(old.args, ["v1"]);

    // A new revision that never runs: the update stops after one step, three v2 serving.
    apply_spec(
        &mut cluster,
        "web",
        &sha,
        &format!("replicas: 4, args: [v3], {strategy}"),
    )
    .await;
    follow(&mut running, &a.next_desired().await);
    a.heartbeat(beat_all_available(&running, "v3")).await;
    let status = status_until(&mut cluster, "web", |s| {
        (s.revision == 3 && s.updated_replicas == 1).then_some(s)
    })
    .await;
    assert_eq!(status.replicas, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = status_until(&mut cluster, "web", Some).await;
    assert_eq!(
        (held.updated_replicas, held.replicas),
        (1, 4),
        "the update waits"
    );

    // Back to v2 (a rollback): revision 2 returns as revision 4, keeping its sandboxes.
    apply_spec(
        &mut cluster,
        "web",
        &sha,
        &format!("replicas: 4, args: [v2], {strategy}"),
    )
    .await;
    let status = status_until(&mut cluster, "web", |s| {
        (s.revision == 4 && s.updated_replicas == 4 && s.replicas == 4).then_some(s)
    })
    .await;
    assert_eq!(status.revisions[0].generation, 2, "revision 2's generation");
    let numbers: Vec<u64> = status.revisions.iter().map(|r| r.revision).collect();
    assert_eq!(numbers, [4, 3, 1]);
}

fn secret(name: &str, value: &str) -> flotilla_proto::agent::v1::ConfigObject {
    flotilla_proto::agent::v1::ConfigObject {
        kind: flotilla_proto::agent::v1::ConfigKind::Secret as i32,
        namespace: "default".into(),
        name: name.into(),
        data: [("password".to_string(), value.as_bytes().to_vec())].into(),
    }
}

async fn apply_secret(cluster: &mut Cluster, name: &str, value: &str) {
    cluster
        .workloads
        .apply_config(flotilla_proto::control::v1::ApplyConfigRequest {
            object: Some(secret(name, value)),
            create_only: false,
        })
        .await
        .expect("apply config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_the_secrets_their_workloads_use_before_the_workloads() {
    let mut cluster = cluster().await;
    let mut a = FakeAgent::join(&mut cluster, "node-a").await;
    let config = |kind: control_message::Kind| match kind {
        control_message::Kind::Config(config) => config,
        other => panic!("expected config objects, got {other:?}"),
    };
    assert!(
        config(a.next_with_config().await).objects.is_empty(),
        "the complete, empty set"
    );
    assert!(a.next_desired().await.workloads.is_empty());
    apply_secret(&mut cluster, "creds", "one").await;
    apply_secret(&mut cluster, "unused", "never sent").await;

    let sha = super::tests::push(&mut cluster.workloads).await;
    apply_spec(
        &mut cluster,
        "web",
        &sha,
        "replicas: 1, env: [{name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}]",
    )
    .await;
    // The secret comes first, then the workload that needs it.
    let sent = config(a.next_with_config().await);
    assert!(sent.incremental);
    assert_eq!(sent.objects.len(), 1);
    assert_eq!(sent.objects[0].name, "creds");
    assert_eq!(sent.objects[0].data["password"], b"one");
    let desired = a.next_desired().await;
    let spec = desired.workloads[0].spec.as_ref().expect("spec");
    assert_eq!(spec.env[0].value, "", "the value is not in the spec");
    assert_eq!(spec.namespace, "default");

    // A change reaches the node; a change to a secret it does not use does not.
    apply_secret(&mut cluster, "unused", "still never sent").await;
    apply_secret(&mut cluster, "creds", "two").await;
    let update = config(a.next_with_config().await);
    assert_eq!(update.objects.len(), 1);
    assert_eq!(update.objects[0].data["password"], b"two");

    // Secrets are listed by name and size, never value.
    let listed = cluster
        .workloads
        .list_config(flotilla_proto::control::v1::ListConfigRequest {
            kind: flotilla_proto::agent::v1::ConfigKind::Secret as i32,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.items.len(), 2);
    assert_eq!(listed.items[0].sizes["password"], 3);

    // The workload leaves the node: so does the secret.
    cluster
        .workloads
        .delete(DeleteRequest {
            namespace: String::new(),
            name: "web".into(),
        })
        .await
        .expect("delete");
    loop {
        if let control_message::Kind::Config(gone) = a.next_with_config().await {
            assert_eq!(gone.removed.len(), 1);
            assert_eq!(gone.removed[0].name, "creds");
            break;
        }
    }
}

/// Waits (bounded) until the control plane's metrics contain `line`.
async fn metric_until(cluster: &Cluster, line: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !cluster.state.encode_metrics().contains(line) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("metric {line:?} within 10 s"));
}

/// A workload that enables WebAssembly features goes only to nodes whose agents offer them, as
/// their registrations say (labels the agent sets itself are not believed); with no such node it
/// is unschedulable, and says which feature no node offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_go_only_to_nodes_that_offer_their_wasm_features() {
    let mut cluster = cluster().await;
    let mut offering = registration("node-a", "agent-a", "amd64");
    offering.wasm_features = vec!["gc".into(), "component-model-async".into(), "warp".into()];
    offering.labels = [("wasm.flotilla.dev/exceptions".into(), "true".into())].into();
    let _a = FakeAgent::join_with(&mut cluster, offering).await;
    let _b = FakeAgent::join(&mut cluster, "node-b").await;
    let labels = list_nodes(&mut cluster)
        .await
        .into_iter()
        .map(|n| {
            (
                n.name,
                n.labels.into_iter().filter(|(k, _)| k.starts_with("wasm.")),
            )
        })
        .map(|(name, wasm)| {
            (
                name,
                wasm.map(|(k, v)| format!("{k}={v}"))
                    .collect::<BTreeSet<_>>(),
            )
        })
        .collect::<BTreeMap<_, _>>();
    assert_eq!(
        labels["node-a"],
        [
            "wasm.flotilla.dev/component-model-async=true".to_string(),
            "wasm.flotilla.dev/gc=true".to_string()
        ]
        .into()
    );
    assert!(labels["node-b"].is_empty(), "{labels:?}");

    let sha = super::tests::push(&mut cluster.workloads).await;
    let async_abi = "replicas: 4, wasm: {features: [component-model-async]}";
    apply_spec(&mut cluster, "p3", &sha, async_abi).await;
    let placements = status_until(&mut cluster, "p3", |status| {
        (status.placements.values().sum::<u64>() == 4).then_some(status.placements)
    })
    .await;
    assert_eq!(placements, [("node-a".to_string(), 4)].into());

    apply_spec(&mut cluster, "eh", &sha, "wasm: {features: [exceptions]}").await;
    let scheduled = status_until(&mut cluster, "eh", |status| {
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Scheduled" && c.status == "False")
    })
    .await;
    assert_eq!(
        scheduled.message,
        "1 of 1 replicas cannot be placed: 0/2 nodes are available: 2 node(s) did not offer \
         wasm feature exceptions"
    );
}

async fn list_nodes(cluster: &mut Cluster) -> Vec<flotilla_proto::control::v1::Node> {
    cluster
        .workloads
        .list_nodes(ListNodesRequest {})
        .await
        .expect("list nodes")
        .into_inner()
        .nodes
}

async fn node_ready(cluster: &mut Cluster, node: &str) -> Option<bool> {
    let nodes = list_nodes(cluster).await;
    nodes.into_iter().find(|n| n.name == node).map(|n| n.ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_name_stays_with_its_credential_until_the_node_is_deleted() {
    let mut cluster = cluster().await;
    let a = FakeAgent::join(&mut cluster, "node-a").await;
    // node-a's agent goes away: its name is free of any live agent, not of its credential.
    drop(a);
    tokio::time::timeout(Duration::from_secs(10), async {
        while node_ready(&mut cluster, "node-a").await != Some(false) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("node-a not ready within 10 s");
    let imposter = RegisterRequest {
        node_credential: credential("mallory"),
        ..registration("node-a", "mallory", "amd64")
    };
    let err = cluster
        .agents
        .register(imposter.clone())
        .await
        .expect_err("another credential");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("flotilla delete node node-a"),
        "{}",
        err.message()
    );
    metric_until(
        &cluster,
        "flotilla_control_plane_agent_refusals_total{reason=\"CredentialMismatch\"} 1",
    )
    .await;
    let weak = RegisterRequest {
        node_credential: "guessable".into(),
        ..registration("node-b", "mallory", "amd64")
    };
    let err = cluster.agents.register(weak).await.expect_err("weak");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(node_ready(&mut cluster, "node-b").await, None);

    // Its own agent, restarted (another process, the same credential), takes it back.
    let back =
        FakeAgent::join_with(&mut cluster, registration("node-a", "restarted", "amd64")).await;
    assert_eq!(node_ready(&mut cluster, "node-a").await, Some(true));
    drop(back);

    // An operator deletes the node: the name is released for whoever registers it next.
    let deleted = cluster
        .workloads
        .delete_node(DeleteNodeRequest {
            name: "node-a".into(),
        })
        .await
        .expect("delete node")
        .into_inner();
    assert!(deleted.registered && deleted.released, "{deleted:?}");
    assert_eq!(node_ready(&mut cluster, "node-a").await, None);
    let _replacement = FakeAgent::join_with(&mut cluster, imposter).await;
    assert_eq!(node_ready(&mut cluster, "node-a").await, Some(true));
    let err = cluster
        .workloads
        .delete_node(DeleteNodeRequest {
            name: "node-z".into(),
        })
        .await
        .expect_err("unknown node");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_live_node_ends_its_session_and_moves_its_replicas() {
    let mut cluster = cluster().await;
    let mut a = FakeAgent::join(&mut cluster, "node-a").await;
    let mut b = FakeAgent::join(&mut cluster, "node-b").await;
    let sha = super::tests::push(&mut cluster.workloads).await;
    apply(&mut cluster, "web", &sha, 4).await;
    a.desired_until(|d| replicas_of(d, "default/web") > 0).await;
    cluster
        .workloads
        .delete_node(DeleteNodeRequest {
            name: "node-a".into(),
        })
        .await
        .expect("delete node");
    // node-a's session ends from the control plane's side...
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = a.down.next().await {}
    })
    .await
    .expect("node-a's session ends within 10 s");
    // ... and node-b gets all four replicas.
    b.desired_until(|d| replicas_of(d, "default/web") == 4)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_count_only_what_was_placed_on_the_reporting_node() {
    let mut cluster = cluster().await;
    let mut a = FakeAgent::join(&mut cluster, "node-a").await;
    let b = FakeAgent::join(&mut cluster, "node-b").await;
    let sha = super::tests::push(&mut cluster.workloads).await;
    apply_spec(
        &mut cluster,
        "victim",
        &sha,
        "replicas: 1, nodeSelector: {kubernetes.io/hostname: node-a}",
    )
    .await;
    a.desired_until(|d| replicas_of(d, "default/victim") == 1)
        .await;
    // node-b, which runs none of it, claims five running replicas and a trap.
    let claim = |running| Heartbeat {
        workloads: vec![WorkloadCounts {
            key: "default/victim".into(),
            generation: 1,
            running,
            available: running,
            ..WorkloadCounts::default()
        }],
        events: vec![SandboxEvent {
            key: "default/victim".into(),
            generation: 1,
            reason: "Trap".into(),
            message: "forged".into(),
            count: 1,
            last_at_ms: 1,
        }],
    };
    b.heartbeat(claim(5)).await;
    metric_until(
        &cluster,
        "flotilla_control_plane_agent_refusals_total{reason=\"UnplacedWorkload\"} 2",
    )
    .await;
    // node-a, which runs one, claims three.
    a.heartbeat(claim(3)).await;
    metric_until(
        &cluster,
        "flotilla_control_plane_agent_refusals_total{reason=\"OverPlacement\"} 1",
    )
    .await;
    let nodes = list_nodes(&mut cluster).await;
    let running: Vec<(String, u64)> = nodes.into_iter().map(|n| (n.name, n.running)).collect();
    assert_eq!(
        running,
        [("node-a".to_string(), 1), ("node-b".to_string(), 0)]
    );
    let events = cluster
        .workloads
        .list_events(ListEventsRequest {
            name: "victim".into(),
            ..ListEventsRequest::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    assert!(
        events.iter().all(|e| e.node != "node-b"),
        "a forged event got through: {events:?}"
    );
    assert!(events.iter().any(|e| e.node == "node-a"), "{events:?}");

    // Modules likewise: node-a fetches the victim's module, node-b may not, nor may a call
    // that names no session.
    assert!(
        !a.fetch(&mut cluster, &sha)
            .await
            .expect("own module")
            .is_empty()
    );
    let err = b.fetch(&mut cluster, &sha).await.expect_err("not node-b's");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    metric_until(
        &cluster,
        "flotilla_control_plane_agent_refusals_total{reason=\"UnplacedModule\"} 1",
    )
    .await;
    let err = cluster
        .agents
        .fetch_module(flotilla_proto::control::v1::FetchModuleRequest {
            sha256: sha.clone(),
        })
        .await
        .expect_err("no session");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
}
