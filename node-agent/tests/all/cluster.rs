//! The core loop in one process over loopback gRPC: a control plane (embedded store,
//! controller, user API, agent protocol) and two agents with real wasmtime supervisors.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use flotilla_control_plane::model::WorkloadKey;
use flotilla_control_plane::scheduler::{Scheduler, SchedulerConfig};
use flotilla_control_plane::{
    AgentService, Cluster, Controller, EmbeddedStore, ModuleStore, WatchEvent, WorkloadService,
    WorkloadStore,
};
use flotilla_node_agent::control::{self, ControlConfig};
use flotilla_node_agent::supervisor::Supervisor;
use flotilla_proto::agent::v1::SandboxPhase;
use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{ApplyRequest, PushModuleRequest};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

async fn control_plane(dir: &std::path::Path) -> (String, EmbeddedStore) {
    let store = EmbeddedStore::open(&dir.join("store.redb")).expect("store");
    let modules = ModuleStore::open(&dir.join("modules"), 1 << 20).expect("modules");
    let cluster = Arc::new(Cluster::default());
    let scheduler = Scheduler::new(&SchedulerConfig::default()).expect("scheduler");
    let controller = Controller::new(store.clone(), scheduler, cluster.clone());
    tokio::spawn(controller.run(Duration::from_secs(3), std::future::pending()));
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
    let agents = AgentService::new(
        store.clone(),
        modules.clone(),
        cluster.clone(),
        Duration::from_millis(200),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                WorkloadService::new(store.clone(), modules)
                    .with_cluster(cluster)
                    .into_server(),
            )
            .add_service(agents.into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), store)
}

fn join(url: &str, node: &str) -> (Supervisor, CancellationToken) {
    let sup = supervisor(runtime_config());
    let token = CancellationToken::new();
    let config = ControlConfig {
        url: url.to_string(),
        node_name: node.to_string(),
        agent_id: format!("test-{node}"),
        labels: Default::default(),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        join_token: None,
        node_credential: control::identity::generate(),
        tls: None,
        ingress_url: String::new(),
    };
    tokio::spawn(control::run(config, sup.clone(), token.clone()));
    (sup, token)
}

/// Sandboxes of the control plane's `default/idle`, whichever revision they run.
fn idle_sandboxes(sup: &Supervisor) -> Vec<flotilla_proto::agent::v1::SandboxStatus> {
    sup.list(None)
        .into_iter()
        .filter(|s| s.workload.starts_with("default.idle-"))
        .collect()
}

fn running(sup: &Supervisor) -> usize {
    idle_sandboxes(sup)
        .iter()
        .filter(|s| s.phase == SandboxPhase::Running as i32)
        .count()
}

/// Waits (bounded) until `pred` holds, re-checking on every sandbox status change.
async fn until(sups: &[&Supervisor], what: &str, pred: impl Fn() -> bool) {
    let mut watches: Vec<_> = sups.iter().map(|s| s.watch()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // Subscribed before the first check, so no change between check and wait is missed.
    while !pred() {
        let any = futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.recv())));
        if tokio::time::timeout_at(deadline, any).await.is_err() {
            panic!("timed out waiting for {what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_workloads_run_on_agents_and_move_when_an_agent_leaves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (url, store) = control_plane(dir.path()).await;
    let (a, _a_token) = join(&url, "node-a");
    let (b, b_token) = join(&url, "node-b");

    let mut client = WorkloadsClient::connect(url.clone())
        .await
        .expect("connect");
    let sha = client
        .push_module(PushModuleRequest {
            module: fixture("sleep"),
            sha256: String::new(),
            namespace: String::new(),
        })
        .await
        .expect("push")
        .into_inner()
        .sha256;
    let manifest = |replicas: u32| {
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: idle}}\n\
             spec: {{module: {{sha256: \"{sha}\"}}, replicas: {replicas}, \
             resources: {{limits: {{memory: 1Mi}}}}}}\n"
        )
        .into_bytes()
    };
    client
        .apply(ApplyRequest {
            manifest: manifest(6),
        })
        .await
        .expect("apply");

    until(&[&a, &b], "6 sandboxes across both agents", || {
        running(&a) + running(&b) == 6 && running(&a) > 0 && running(&b) > 0
    })
    .await;

    // The agents' heartbeats reach the workload's status.
    let key = WorkloadKey::new("", "idle");
    let mut watch = store.watch().await.expect("watch");
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let ready = match watch.next().await.expect("open").expect("event") {
                WatchEvent::Applied(w) if w.key() == key => {
                    w.status.map_or(0, |s| s.ready_replicas)
                }
                WatchEvent::Restarted(all) => all
                    .into_iter()
                    .find(|w| w.key() == key)
                    .and_then(|w| w.status)
                    .map_or(0, |s| s.ready_replicas),
                _ => 0,
            };
            if ready == 6 {
                return;
            }
        }
    })
    .await
    .expect("status.readyReplicas reaches 6");

    // node-b's agent leaves the control plane: its share moves to node-a.
    b_token.cancel();
    until(&[&a], "all 6 sandboxes on node-a", || running(&a) == 6).await;
    let status = store
        .get(&key)
        .await
        .expect("get")
        .and_then(|w| w.status)
        .expect("status");
    assert_eq!(
        status.placements.get("node-a"),
        Some(&6),
        "{:?}",
        status.placements
    );

    // Scaling keeps the template: the six sandboxes keep running and three join them.
    let before = started(&a);
    client
        .apply(ApplyRequest {
            manifest: manifest(9),
        })
        .await
        .expect("scale");
    until(&[&a], "9 sandboxes on node-a", || running(&a) == 9).await;
    let after = started(&a);
    for (id, at) in &before {
        assert_eq!(after.get(id), Some(at), "{id} was restarted by scaling");
    }
}

/// Running sandboxes of the workload: id → start time.
fn started(sup: &Supervisor) -> std::collections::BTreeMap<String, i64> {
    idle_sandboxes(sup)
        .into_iter()
        .filter(|s| s.phase == SandboxPhase::Running as i32)
        .map(|s| (s.sandbox_id, s.started_at_ms))
        .collect()
}

/// A module that takes long to compile holds up neither the node's heartbeats nor its other
/// workloads: applied first, it is still compiling when a small workload applied after it runs,
/// and the control plane hears from the node all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_costly_compile_holds_up_neither_heartbeats_nor_other_workloads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (url, _store) = control_plane(dir.path()).await;
    let (a, _token) = join(&url, "node-a");
    let mut client = WorkloadsClient::connect(url.clone())
        .await
        .expect("connect");
    let mut push = async |module: Vec<u8>| {
        client
            .push_module(PushModuleRequest {
                module,
                sha256: String::new(),
                namespace: String::new(),
            })
            .await
            .expect("push")
            .into_inner()
            .sha256
    };
    let costly = push(costly_module(40_000, 1)).await;
    let idle = push(fixture("sleep")).await;
    let mut client = WorkloadsClient::connect(url.clone())
        .await
        .expect("connect");
    for (name, sha) in [("costly", &costly), ("idle", &idle)] {
        let manifest = format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: {name}}}\n\
             spec: {{module: {{sha256: \"{sha}\"}}, replicas: 1, \
             resources: {{limits: {{memory: 1Mi}}}}}}\n"
        );
        client
            .apply(ApplyRequest {
                manifest: manifest.into_bytes(),
            })
            .await
            .expect("apply");
    }
    // The heartbeats, as the control plane sees them, while the costly module compiles.
    let sampler = tokio::spawn({
        let mut client = client.clone();
        async move {
            let mut oldest = 0;
            let mut always_ready = true;
            for _ in 0..100 {
                let nodes = client
                    .list_nodes(flotilla_proto::control::v1::ListNodesRequest {})
                    .await
                    .expect("list nodes")
                    .into_inner()
                    .nodes;
                if let Some(node) = nodes.first() {
                    oldest = oldest.max(node.last_heartbeat_age_ms);
                    always_ready &= node.ready;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (oldest, always_ready)
        }
    });
    until(&[&a], "the idle workload runs", || running(&a) == 1).await;
    let stats = a.runtime().cache_stats();
    assert_eq!(
        stats.compiles_running, 1,
        "the idle workload ran only after the costly module compiled: {stats:?}"
    );
    let (oldest, always_ready) = sampler.await.expect("sampler");
    // Heartbeats every 200 ms; the node's last one is never much older than that.
    assert!(
        oldest < 1_000,
        "a heartbeat {oldest} ms old during the compile"
    );
    assert!(always_ready, "the node turned NotReady during the compile");
    // Its guest returns at once; that it has sandboxes at all says it compiled.
    let costly_runs = || {
        a.list(None)
            .iter()
            .any(|s| s.workload.starts_with("default.costly-"))
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        while !costly_runs() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the costly module compiles and runs too");
}
