//! The examples a newcomer runs: their guests are built from the committed sources, and every
//! manifest does what its comment says.

use std::path::{Path, PathBuf};

use crate::common::*;
use flotilla_node_agent::manifest;
use flotilla_proto::agent::v1::SandboxPhase;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn committed_guests_are_built_from_their_sources() {
    // WAT through the wat crate; C through Debian's clang and wasi-libc (installed by .ci/run),
    // HTTP components through wit-component: see flotilla_tests::guests.
    let mut stale = Vec::new();
    for (path, built) in flotilla_tests::guests::build_all().expect("guests build") {
        if std::fs::read(&path).ok().as_deref() != Some(built.as_slice()) {
            std::fs::write(&path, &built).expect("rewrite guest binary");
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale guest binaries were rebuilt; commit them: {stale:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_manifests_run_as_documented() {
    let sup = supervisor(runtime_config());
    let specs = manifest::load_dir(&examples()).expect("examples dir");
    assert_eq!(specs.len(), 7);
    for spec in specs {
        let spec = spec.expect("example manifest is valid");
        sup.apply(spec).await.expect("example applies");
    }
    wait_for(&sup, "hello", "hello", all_in(SandboxPhase::Succeeded)).await;
    assert_eq!(logs(&sup, "hello", 1), "hello from flotilla\n");
    wait_for(&sup, "hello-c", "hello-c", all_in(SandboxPhase::Succeeded)).await;
    assert_eq!(logs(&sup, "hello-c", 0), "Ahoy from C and welcome aboard\n");
    wait_for(&sup, "gc", "gc", all_in(SandboxPhase::Succeeded)).await;
    assert_eq!(
        logs(&sup, "gc", 0),
        "summed a GC list of 100000 structs: 5000050000\n"
    );
    for http in ["http-hello", "http-echo"] {
        let replicas = wait_for(&sup, http, http, all_in(SandboxPhase::Running)).await;
        assert_eq!(replicas.len(), 1);
    }
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
