//! The `flotilla` binary against a control plane served on loopback.

use std::path::Path;
use std::process::Command;

use flotilla_control_plane::model::Workload;
use flotilla_control_plane::{EmbeddedStore, ModuleStore, WorkloadService};
use tokio_stream::wrappers::TcpListenerStream;

async fn serve(dir: &Path) -> String {
    let store = EmbeddedStore::open(&dir.join("store.redb")).expect("store");
    let modules = ModuleStore::open(&dir.join("modules"), 1 << 20).expect("modules");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkloadService::new(store, modules).into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// Runs the CLI off the async runtime and returns (success, stdout, stderr).
async fn flotilla(server: &str, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    command.arg("--server").arg(server).args(args);
    let out = tokio::task::spawn_blocking(move || command.output().expect("cli runs"))
        .await
        .expect("join");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_pushes_local_modules_and_get_shows_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(dir.path()).await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let (ok, stdout, stderr) =
        flotilla(&server, &["apply", "-f", &examples.to_string_lossy()]).await;
    assert!(ok, "{stderr}");
    for name in [
        "crashloop",
        "hello",
        "hello-c",
        "http-echo",
        "http-hello",
        "idle",
    ] {
        assert!(
            stdout.contains(&format!(
                "wasmworkload.flotilla.dev/{name} applied (generation 1)"
            )),
            "{stdout}"
        );
    }
    let (ok, json, stderr) = flotilla(&server, &["get", "workloads", "-o", "json"]).await;
    assert!(ok, "{stderr}");
    #[derive(serde::Deserialize)]
    struct List {
        kind: String,
        items: Vec<Workload>,
    }
    let list: List = serde_json::from_str(&json).expect("json list");
    assert_eq!(list.kind, "List");
    let workloads = list.items;
    assert_eq!(workloads.len(), 7);
    let hello_c = workloads
        .iter()
        .find(|w| w.metadata.name == "hello-c")
        .expect("hello-c");
    let wasm = std::fs::read(examples.join("guests/hello-c.wasm")).expect("guest");
    use sha2::Digest;
    assert_eq!(
        hello_c.spec.module.sha256,
        hex::encode(sha2::Sha256::digest(&wasm))
    );
    assert_eq!(hello_c.spec.module.path, None);

    // Re-applying an unchanged manifest keeps the generation; deleting works.
    let (ok, stdout, _) = flotilla(
        &server,
        &[
            "apply",
            "-f",
            &examples.join("hello.yaml").to_string_lossy(),
        ],
    )
    .await;
    assert!(
        ok && stdout.contains("hello applied (generation 1)"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = flotilla(&server, &["delete", "workload", "hello"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wasmworkload.flotilla.dev/hello deleted"));
    let (ok, _, stderr) = flotilla(&server, &["get", "workloads", "hello"]).await;
    assert!(!ok && stderr.contains("not found"), "{stderr}");
}
