//! The examples a newcomer runs: their guests are built from the committed sources, and every
//! manifest does what its comment says.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use flotilla_node_agent::manifest;
use flotilla_proto::agent::v1::SandboxPhase;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Compares a freshly built guest with the committed binary; rewrites it and fails when stale.
fn check_committed(built: &[u8], committed: &Path, stale: &mut Vec<String>) {
    if std::fs::read(committed).ok().as_deref() != Some(built) {
        std::fs::write(committed, built).expect("rewrite guest binary");
        stale.push(committed.display().to_string());
    }
}

#[test]
fn committed_guests_are_built_from_their_sources() {
    let guests = examples().join("guests");
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(&guests).expect("guests dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) == Some("wat") {
            let built = wat::parse_file(&path).expect("wat parses");
            check_committed(&built, &path.with_extension("wasm"), &mut stale);
        }
    }
    // C guests: Debian's clang with wasi-libc (installed by .ci/run).
    let out = tempfile::tempdir().expect("temp dir");
    let wasm = out.path().join("hello-c.wasm");
    let status = Command::new("clang")
        .args(["--target=wasm32-wasi", "-O2", "-Wl,--strip-all", "-o"])
        .arg(&wasm)
        .arg(guests.join("hello-c.c"))
        .status()
        .expect(
            "clang is installed (apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32)",
        );
    assert!(status.success(), "clang failed to build hello-c.c");
    let built = std::fs::read(&wasm).expect("built wasm");
    check_committed(&built, &guests.join("hello-c.wasm"), &mut stale);
    assert!(
        stale.is_empty(),
        "stale guest binaries were rebuilt; commit them: {stale:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_manifests_run_as_documented() {
    let sup = supervisor(runtime_config());
    let specs = manifest::load_dir(&examples()).expect("examples dir");
    assert_eq!(specs.len(), 4);
    for spec in specs {
        let spec = spec.expect("example manifest is valid");
        sup.apply(spec).await.expect("example applies");
    }
    wait_for(&sup, "hello", "hello", all_in(SandboxPhase::Succeeded)).await;
    assert_eq!(logs(&sup, "hello", 1), "hello from flotilla\n");
    wait_for(&sup, "hello-c", "hello-c", all_in(SandboxPhase::Succeeded)).await;
    assert_eq!(logs(&sup, "hello-c", 0), "Ahoy from C and welcome aboard\n");
    let idle = wait_for(&sup, "idle", "idle", all_in(SandboxPhase::Running)).await;
    assert_eq!(idle.len(), 1000);
    let crash = wait_for(&sup, "crashloop", "crash loop", |s| {
        s.first().is_some_and(|s| s.reason == "CrashLoopBackOff")
    })
    .await;
    let last = crash[0].last_termination.as_ref().expect("terminated");
    assert_eq!(last.reason, "Trap");
    assert!(last.message.contains("divide"), "{}", last.message);
    assert!(
        last.message.contains("integer divide by zero"),
        "{}",
        last.message
    );
}
