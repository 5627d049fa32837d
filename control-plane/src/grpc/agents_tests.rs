//! The agent protocol on a loopback socket, with scripted fake agents and the real controller.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::control::v1::agents_client::AgentsClient;
use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{
    AgentMessage, ApplyRequest, ControlMessage, DesiredState, Heartbeat, Hello, NodeResources,
    RegisterRequest, agent_message, control_message,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Code;
use tonic::transport::Channel;

use super::{AgentService, WorkloadService};
use crate::controller::Controller;
use crate::modules::ModuleStore;
use crate::nodes::NodeRegistry;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::store::EmbeddedStore;

struct Cluster {
    agents: AgentsClient<Channel>,
    workloads: WorkloadsClient<Channel>,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("store");
    let modules = ModuleStore::open(&dir.path().join("modules"), 1 << 20).expect("modules");
    let nodes = Arc::new(NodeRegistry::default());
    let scheduler = Scheduler::new(&SchedulerConfig::default()).expect("scheduler");
    let controller = Controller::new(store.clone(), scheduler, nodes.clone());
    tokio::spawn(controller.run(Duration::from_secs(30), std::future::pending()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkloadService::new(store.clone(), modules.clone()).into_server())
            .add_service(
                AgentService::new(store, modules, nodes, Duration::from_secs(1)).into_server(),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let url = format!("http://{addr}");
    Cluster {
        agents: AgentsClient::connect(url.clone()).await.expect("connect"),
        workloads: WorkloadsClient::connect(url).await.expect("connect"),
        _dir: dir,
    }
}

fn registration(node: &str, agent_id: &str, arch: &str) -> RegisterRequest {
    RegisterRequest {
        node_name: node.into(),
        agent_id: agent_id.into(),
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
}

impl FakeAgent {
    async fn join(cluster: &mut Cluster, node: &str) -> Self {
        let session_id = cluster
            .agents
            .register(registration(node, &format!("agent-{node}"), "amd64"))
            .await
            .expect("register")
            .into_inner()
            .session_id;
        let (up, rx) = mpsc::channel(8);
        up.send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(Hello {
                node_name: node.into(),
                session_id,
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
        Self { up, down }
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
    let manifest = format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: web}}\n\
         spec: {{module: {{sha256: \"{sha}\"}}, replicas: 10, args: [serve]}}\n"
    );
    cluster
        .workloads
        .apply(ApplyRequest {
            manifest: manifest.into_bytes(),
        })
        .await
        .expect("apply");

    let on_a = a.desired_until(|d| replicas_of(d, "default/web") > 0).await;
    let on_b = b.desired_until(|d| replicas_of(d, "default/web") > 0).await;
    assert_eq!(
        replicas_of(&on_a, "default/web") + replicas_of(&on_b, "default/web"),
        10
    );
    let spec = on_a.workloads[0].spec.as_ref().expect("spec");
    assert_eq!(spec.name, "default.web");
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
