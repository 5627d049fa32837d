//! The user API served on a real loopback socket, against the embedded store.

use std::time::Duration;

use flotilla_proto::control::v1::workloads_client::WorkloadsClient;
use flotilla_proto::control::v1::{
    ApplyRequest, DeleteRequest, GetRequest, ListRequest, PushModuleRequest, WatchRequest,
    watch_event,
};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::transport::Channel;

use super::server::WorkloadService;
use crate::model::Workload;
use crate::modules::ModuleStore;
use crate::store::EmbeddedStore;

/// Decodes an object from the wire, as the CLI does.
pub(super) fn from_object(
    object: &flotilla_proto::control::v1::WorkloadObject,
) -> Result<Workload, serde_json::Error> {
    serde_json::from_slice(&object.json)
}

const MODULE: &[u8] = b"\0asm\x01\0\0\0";

struct Harness {
    client: WorkloadsClient<Channel>,
    _dir: tempfile::TempDir,
}

async fn serve() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("store");
    let modules = ModuleStore::open(&dir.path().join("modules"), 1 << 20).expect("modules");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = WorkloadService::new(store, modules).into_server();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = WorkloadsClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    Harness { client, _dir: dir }
}

fn manifest(name: &str, sha256: &str, extra: &str) -> Vec<u8> {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: {name}\n\
         spec:\n  module:\n    sha256: \"{sha256}\"\n{extra}"
    )
    .into_bytes()
}

/// Pushes a minimal module and returns its digest.
pub(super) async fn push(client: &mut WorkloadsClient<Channel>) -> String {
    client
        .push_module(PushModuleRequest {
            module: MODULE.to_vec(),
            sha256: String::new(),
            namespace: String::new(),
        })
        .await
        .expect("push")
        .into_inner()
        .sha256
}

/// A module that uses WebAssembly GC (a struct type) is refused at apply unless the workload
/// enables `gc`, with the field to set in the message.
#[tokio::test]
async fn apply_refuses_a_module_whose_features_the_workload_does_not_enable() {
    let mut h = serve().await;
    let mut gc_module = MODULE.to_vec();
    // Type section: one struct type of one mutable i32 field.
    gc_module.extend_from_slice(&[0x01, 0x05, 0x01, 0x5f, 0x01, 0x7f, 0x01]);
    let sha = h
        .client
        .push_module(PushModuleRequest {
            module: gc_module,
            sha256: String::new(),
            namespace: String::new(),
        })
        .await
        .expect("push")
        .into_inner()
        .sha256;
    let err = h
        .client
        .apply(ApplyRequest {
            manifest: manifest("plain", &sha, ""),
        })
        .await
        .expect_err("gc not enabled");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("add `gc` to spec.wasm.features"),
        "{}",
        err.message()
    );
    h.client
        .apply(ApplyRequest {
            manifest: manifest("gc", &sha, "  wasm:\n    features: [gc]\n"),
        })
        .await
        .expect("gc enabled");
    let err = h
        .client
        .apply(ApplyRequest {
            manifest: manifest("unknown", &sha, "  wasm:\n    features: [gc, threadz]\n"),
        })
        .await
        .expect_err("unknown feature");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("threadz"), "{}", err.message());
}

#[tokio::test]
async fn apply_get_list_watch_delete() {
    let mut h = serve().await;
    let sha = push(&mut h.client).await;
    let mut watch = h
        .client
        .watch(WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("event")
        .expect("open")
        .expect("ok");
    assert_eq!(first.r#type, watch_event::Type::Restarted as i32);
    assert!(first.objects.is_empty());

    let applied = h
        .client
        .apply(ApplyRequest {
            manifest: manifest("web", &sha, "  replicas: 3\n"),
        })
        .await
        .expect("apply")
        .into_inner();
    let applied = from_object(&applied).expect("decodes");
    assert_eq!(applied.metadata.generation, 1);
    assert_eq!(applied.spec.replicas, 3);

    let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("event")
        .expect("open")
        .expect("ok");
    assert_eq!(event.r#type, watch_event::Type::Applied as i32);

    // JSON works as well as YAML.
    let json = serde_json::to_vec(&applied).expect("json");
    h.client
        .apply(ApplyRequest { manifest: json })
        .await
        .expect("apply json");

    let got = h
        .client
        .get(GetRequest {
            namespace: String::new(),
            name: "web".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(from_object(&got).expect("decodes").metadata.name, "web");
    let listed = h
        .client
        .list(ListRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.items.len(), 1);

    h.client
        .delete(DeleteRequest {
            namespace: "default".into(),
            name: "web".into(),
        })
        .await
        .expect("delete");
    let err = h
        .client
        .get(GetRequest {
            namespace: String::new(),
            name: "web".into(),
        })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn bad_manifests_get_the_error_the_user_needs_and_change_nothing() {
    let mut h = serve().await;
    let sha = push(&mut h.client).await;
    h.client
        .apply(ApplyRequest {
            manifest: manifest("good", &sha, ""),
        })
        .await
        .expect("good");
    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "bad digest",
            manifest("a", "abc", ""),
            Code::InvalidArgument,
            "spec.module.sha256",
        ),
        (
            "negative replicas",
            manifest("b", &sha, "  replicas: -1\n"),
            Code::InvalidArgument,
            "spec.replicas: must be >= 0",
        ),
        (
            "unknown field",
            manifest("c", &sha, "  replicaz: 2\n"),
            Code::InvalidArgument,
            "unknown field `replicaz`",
        ),
        (
            "bad url",
            manifest("d", &sha, "")
                .into_iter()
                .chain(b"    url: ftp://x\n".iter().copied())
                .collect(),
            Code::InvalidArgument,
            "spec.module.url",
        ),
        (
            "module never pushed",
            manifest("e", &"e".repeat(64), ""),
            Code::FailedPrecondition,
            "no module",
        ),
        (
            "not yaml",
            b"{{{".to_vec(),
            Code::InvalidArgument,
            "invalid workload",
        ),
        (
            // Every object goes to agents: one may not crowd others off their sessions.
            "over 1 MiB",
            manifest(
                "f",
                &sha,
                &format!(
                    "  args: [\"{}\"]\n",
                    "x".repeat(crate::model::MAX_OBJECT_BYTES)
                ),
            ),
            Code::InvalidArgument,
            "over the limit of 1048576 (1 MiB)",
        ),
    ];
    for (case, manifest, code, needle) in cases {
        let err = h
            .client
            .apply(ApplyRequest { manifest })
            .await
            .expect_err(case);
        assert_eq!(err.code(), code, "{case}: {}", err.message());
        assert!(err.message().contains(needle), "{case}: {}", err.message());
    }
    let err = h
        .client
        .push_module(PushModuleRequest {
            module: b"not wasm at all".to_vec(),
            sha256: String::new(),
            namespace: String::new(),
        })
        .await
        .expect_err("malformed wasm");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("\\0asm"), "{}", err.message());
    // Nothing but the good workload exists.
    let listed = h
        .client
        .list(ListRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.items.len(), 1);
}
