//! The control plane's gRPC APIs, decoded and handled for real: arbitrary bytes decoded as each
//! message an agent or a user sends, and hostile but well-formed messages, go over a real
//! socket to one running control plane (embedded store), which answers each with a response or
//! a status a client can act on, never an internal error or a dropped connection, and keeps
//! serving.

use std::sync::OnceLock;
use std::time::Duration;

use flotilla_control_plane::{ControlPlane, FetchGuard, ServerConfig, StoreBackend};
use flotilla_fuzz::{hostile_string, manifest_of};
use flotilla_proto::control::v1::agents_client::AgentsClient;
use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{
    ApplyRequest, DeleteRequest, GetRequest, ListNodesRequest, NodeResources, PushModuleRequest,
    RegisterRequest, Taint,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

/// One control plane for every case: its runtime, its data directory and its channel.
struct Server {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    /// The digest of a module pushed at the start, which generated manifests run.
    module: String,
    _data: tempfile::TempDir,
    _control_plane: ControlPlane,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let data = tempfile::tempdir().expect("data directory");
        let control_plane = runtime
            .block_on(ControlPlane::start(ServerConfig {
                listen: "127.0.0.1:0".parse().expect("address"),
                metrics_listen: None,
                store: StoreBackend::Embedded,
                data_dir: data.path().to_path_buf(),
                node_heartbeat_timeout: Duration::from_secs(5),
                node_startup_grace: Duration::from_secs(1),
                join_token: None,
                tls: None,
                shutdown_grace: Duration::from_secs(1),
                fetch_guard: FetchGuard::defaults(),
                user_auth: Default::default(),
                insecure_allow_anonymous: false,
            }))
            .expect("control plane starts");
        let url = format!("http://{}", control_plane.addr());
        let channel = runtime
            .block_on(Channel::from_shared(url).expect("url").connect())
            .expect("connects");
        let mut client = WorkloadsClient::new(channel.clone());
        let module = runtime
            .block_on(client.push_module(PushModuleRequest {
                module: b"\0asm\x01\0\0\0".to_vec(),
                sha256: String::new(),
                namespace: String::new(),
            }))
            .expect("push")
            .into_inner()
            .sha256;
        Server {
            runtime,
            channel,
            module,
            _data: data,
            _control_plane: control_plane,
        }
    })
}

/// Codes that tell the client what was wrong with its request.
const ANSWERS: [Code; 6] = [
    Code::InvalidArgument,
    Code::FailedPrecondition,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::Aborted,
];

fn answered<T>(call: &str, result: Result<T, tonic::Status>) -> Result<Option<T>, TestCaseError> {
    match result {
        Ok(response) => Ok(Some(response)),
        Err(status) if ANSWERS.contains(&status.code()) => Ok(None),
        Err(status) => Err(TestCaseError::fail(format!(
            "{call}: {:?} {}",
            status.code(),
            status.message()
        ))),
    }
}

fn registration() -> impl Strategy<Value = RegisterRequest> {
    let features =
        prop::collection::vec(prop_oneof![hostile_string(), Just("gc".to_string())], 0..3);
    (
        (
            hostile_string(),
            hostile_string(),
            "amd64|arm64|x86|",
            hostile_string(),
        ),
        prop::collection::btree_map(hostile_string(), hostile_string(), 0..3),
        prop::collection::vec(
            (
                hostile_string(),
                hostile_string(),
                "NoSchedule|NoExecute|Bad|",
            ),
            0..2,
        ),
        // Capacities as agents derive them: a node's sandboxes are bounded by its pool (and the
        // scheduler places replicas one at a time up to capacity).
        prop::option::of((any::<u64>(), any::<u64>(), 0u64..1_000)),
        prop_oneof![hostile_string(), "http://[a-z]{1,8}:[0-9]{1,5}"],
        prop_oneof![hostile_string(), "[A-Za-z0-9_-]{43,60}"],
        features,
    )
        .prop_map(
            |(
                (node_name, agent_id, arch, os),
                labels,
                taints,
                allocatable,
                ingress_url,
                node_credential,
                wasm_features,
            )| {
                RegisterRequest {
                    node_name,
                    agent_id,
                    arch,
                    os,
                    labels: labels.into_iter().collect(),
                    taints: taints
                        .into_iter()
                        .map(|(key, value, effect)| Taint { key, value, effect })
                        .collect(),
                    allocatable: allocatable.map(|(memory_bytes, cpu_millis, sandboxes)| {
                        NodeResources {
                            memory_bytes,
                            cpu_millis,
                            sandboxes,
                        }
                    }),
                    ingress_url,
                    node_credential,
                    wasm_features,
                }
            },
        )
}

/// A register request from arbitrary bytes where they decode, else a hostile one.
fn decoded_or_hostile_registration() -> impl Strategy<Value = RegisterRequest> {
    prop_oneof![
        // Decoding never panics; what decodes is sent as it is, what does not as the default.
        prop::collection::vec(any::<u8>(), 0..128)
            .prop_map(|b| RegisterRequest::decode(&b[..]).unwrap_or_default()),
        registration(),
    ]
}

proptest! {
    #[test]
    fn agent_registrations_are_answered(request in decoded_or_hostile_registration()) {
        let server = server();
        let mut client = AgentsClient::new(server.channel.clone());
        let result = server.runtime.block_on(client.register(request));
        answered("register", result)?;
    }

    #[test]
    fn user_manifests_are_answered(text in manifest_of(&server().module), raw in prop::collection::vec(any::<u8>(), 0..96)) {
        let server = server();
        let mut client = WorkloadsClient::new(server.channel.clone());
        server.runtime.block_on(async {
            // Arbitrary bytes decoded as the user's request, then a near-valid manifest.
            if let Ok(request) = ApplyRequest::decode(&raw[..]) {
                answered("apply of decoded bytes", client.apply(request).await)?;
            }
            let applied = client.apply(ApplyRequest { manifest: text.into_bytes() }).await;
            let Some(applied) = answered("apply", applied)? else {
                return Ok(());
            };
            // What was accepted can be read back and deleted.
            let object: serde_json::Value =
                serde_json::from_slice(&applied.into_inner().json).expect("the object is JSON");
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
            let get = client.get(GetRequest { namespace: namespace.clone(), name: name.clone() }).await;
            prop_assert!(get.is_ok(), "get {namespace}/{name}: {get:?}");
            let deleted = client.delete(DeleteRequest { namespace, name }).await;
            prop_assert!(deleted.is_ok(), "{deleted:?}");
            Ok(())
        })?;
    }
}

/// The control plane serves both APIs beside (and, in one run, after) the hostile cases.
#[test]
fn the_control_plane_still_serves_after_hostile_input() {
    let server = server();
    let runner = |bytes: &[u8]| {
        let mut client = WorkloadsClient::new(server.channel.clone());
        let request = ApplyRequest::decode(bytes).unwrap_or_default();
        server.runtime.block_on(client.apply(request))
    };
    // An empty manifest is a plain invalid argument.
    let status = runner(&[]).expect_err("empty manifest");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut client = WorkloadsClient::new(server.channel.clone());
    let nodes = server
        .runtime
        .block_on(client.list_nodes(ListNodesRequest {}));
    assert!(nodes.is_ok(), "{nodes:?}");
}

/// Generated manifests reach past validation: some are accepted, so the read-back and delete
/// above run.
#[test]
fn generated_manifests_are_accepted_too() {
    let server = server();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = manifest_of(&server.module);
    let mut client = WorkloadsClient::new(server.channel.clone());
    let (mut accepted, total) = (0, 128);
    for i in 0..total {
        let text = strategy.new_tree(&mut runner).expect("a case").current();
        // A name of its own, so that no other case's workload is replaced.
        let text = text.replacen("name: ", &format!("name: coverage-{i}-"), 1);
        let applied = server.runtime.block_on(client.apply(ApplyRequest {
            manifest: text.into_bytes(),
        }));
        accepted += usize::from(applied.is_ok());
    }
    assert!(
        accepted * 10 >= total,
        "only {accepted} of {total} accepted"
    );
}
