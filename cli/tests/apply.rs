//! The `flotilla` binary against a control plane served on loopback.

use std::path::Path;
use std::process::Command;

use flotilla_control_plane::grpc::WorkloadService;
use flotilla_control_plane::model::Workload;
use flotilla_control_plane::modules::ModuleStore;
use flotilla_control_plane::store::EmbeddedStore;
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
    for name in ["crashloop", "hello", "hello-c", "idle"] {
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
    assert_eq!(workloads.len(), 4);
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

/// Serves `routes` (path → body; anything else is 404) over HTTP/1.1 on loopback, one request
/// per connection, on a thread that lives as long as the test process.
fn serve_http(routes: Vec<(&'static str, Vec<u8>)>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match routes.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => ("200 OK", body.clone()),
                None => ("404 Not Found", b"not found".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manifests_fail_with_the_error_the_user_needs_and_change_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(dir.path()).await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let idle = std::fs::read(examples.join("guests/idle.wasm")).expect("guest");
    let idle_sha = sha256_hex(&idle);
    let web = serve_http(vec![
        ("/idle.wasm", idle.clone()),
        ("/other.wasm", b"\0asm\x01\0\0\0".to_vec()),
    ]);
    std::fs::write(
        dir.path().join("malformed.wasm"),
        b"\0asm\x01\0\0\0\x01\xff\xff",
    )
    .expect("write");

    // One workload exists before; no bad apply may touch it.
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: good}}\n\
             spec: {{module: {{url: \"{web}/idle.wasm\", sha256: \"{idle_sha}\"}}}}\n"
        ),
    )
    .expect("write");
    let (ok, stdout, stderr) = flotilla(&server, &["apply", "-f", &good.to_string_lossy()]).await;
    assert!(ok, "a module URL is fetched and verified: {stderr}");
    assert!(stdout.contains("wasmworkload.flotilla.dev/good applied"));
    let (_, before, _) = flotilla(&server, &["get", "workloads", "-o", "json"]).await;

    let zeros = "0".repeat(64);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "missing local module",
            "{module: {path: missing.wasm}}".into(),
            vec!["bad.yaml", "missing.wasm"],
        ),
        (
            "unknown field",
            "{modul: {}}".into(),
            vec!["bad.yaml", "unknown field `modul`"],
        ),
        (
            "negative replicas",
            format!("{{module: {{sha256: \"{idle_sha}\"}}, replicas: -1}}"),
            vec!["spec.replicas: must be >= 0"],
        ),
        (
            "bad digest",
            format!("{{module: {{url: \"{web}/idle.wasm\", sha256: \"ABC\"}}}}"),
            vec!["spec.module.sha256", "must be 64 lower-case hex digits"],
        ),
        (
            "unreachable module URL",
            format!("{{module: {{url: \"http://127.0.0.1:1/m.wasm\", sha256: \"{zeros}\"}}}}"),
            vec![
                "spec.module.url: fetching http://127.0.0.1:1/m.wasm",
                "Connection refused",
            ],
        ),
        (
            "module URL not found",
            format!("{{module: {{url: \"{web}/nope.wasm\", sha256: \"{zeros}\"}}}}"),
            vec!["the server answered 404 Not Found"],
        ),
        (
            "module URL with another digest",
            format!("{{module: {{url: \"{web}/other.wasm\", sha256: \"{zeros}\"}}}}"),
            vec!["but spec.module.sha256 pins 000"],
        ),
        (
            "malformed wasm",
            "{module: {path: malformed.wasm}}".into(),
            vec![
                "malformed.wasm",
                "not a valid WebAssembly module or component",
            ],
        ),
    ];
    let bad = dir.path().join("bad.yaml");
    for (case, spec, needles) in cases {
        std::fs::write(
            &bad,
            format!(
                "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata: {{name: bad}}\n\
                 spec: {spec}\n"
            ),
        )
        .expect("write");
        let (ok, _, stderr) = flotilla(&server, &["apply", "-f", &bad.to_string_lossy()]).await;
        assert!(!ok, "{case}: applied");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{case}: {needle:?} not in {stderr}"
            );
        }
    }
    let (_, after, _) = flotilla(&server, &["get", "workloads", "-o", "json"]).await;
    assert_eq!(before, after, "a bad apply changed something");

    let (ok, _, stderr) = flotilla("http://127.0.0.1:1", &["get", "workloads"]).await;
    assert!(
        !ok && stderr.contains("cannot reach the control plane"),
        "{stderr}"
    );
}
