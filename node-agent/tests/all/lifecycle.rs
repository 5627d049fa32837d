//! Workload lifecycle on one agent: scaling, new generations, admission, the compiled-module
//! cache and cross-architecture precompilation.

use std::time::Duration;

use crate::common::*;
use flotilla_node_agent::runtime::{
    RuntimeConfig, SandboxError, SandboxRuntime, capacity, host_target, precompile_for_target,
};
use flotilla_node_agent::supervisor::ApplyError;
use flotilla_proto::agent::v1::{Resources, RestartPolicy, SandboxPhase};

fn idle(name: &str, replicas: u32) -> flotilla_proto::agent::v1::WorkloadSpec {
    let mut s = spec(name, fixture("sleep"));
    s.replicas = replicas;
    s.restart_policy = RestartPolicy::Always as i32;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_generation_scales_in_place_and_a_new_one_replaces() {
    let sup = supervisor(runtime_config());
    sup.apply(idle("web", 3)).await.expect("applied");
    let first = wait_for(&sup, "web", "3 running", all_in(SandboxPhase::Running)).await;
    assert_eq!(first.len(), 3);

    // Scale up: the running sandboxes keep their start time.
    sup.apply(idle("web", 5)).await.expect("scaled up");
    let scaled = wait_for(&sup, "web", "5 running", |s| {
        s.len() == 5 && all_in(SandboxPhase::Running)(s)
    })
    .await;
    for (before, after) in first.iter().zip(&scaled) {
        assert_eq!(before.sandbox_id, after.sandbox_id);
        assert_eq!(before.started_at_ms, after.started_at_ms);
    }

    // Scale down removes the highest replicas.
    sup.apply(idle("web", 2)).await.expect("scaled down");
    let down = sup.list(Some("web"));
    assert_eq!(
        down.iter().map(|s| s.replica).collect::<Vec<_>>(),
        vec![0, 1]
    );

    // A new generation replaces every sandbox.
    let mut next = idle("web", 2);
    next.generation = 2;
    next.args = vec!["--v2".into()];
    sup.apply(next).await.expect("replaced");
    let replaced = wait_for(&sup, "web", "generation 2", |s| {
        s.len() == 2
            && s.iter()
                .all(|s| s.generation == 2 && s.phase == SandboxPhase::Running as i32)
    })
    .await;
    assert!(replaced.iter().all(|s| s.sandbox_id.starts_with("web-2-")));
    // The old sandboxes are gone from the metrics too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sup.metrics().in_phase(SandboxPhase::Running) != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old sandboxes still counted"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_work_beyond_capacity_and_spares_the_rest() {
    let mut config = runtime_config();
    config.max_sandboxes = 10;
    let rt = {
        let capacity = capacity::derive(&config, capacity::read_max_map_count(), Some(64 << 20));
        flotilla_node_agent::runtime::WasmtimeRuntime::with_capacity(config, capacity)
            .expect("runtime")
    };
    let sup = flotilla_node_agent::supervisor::Supervisor::new(
        rt,
        Default::default(),
        flotilla_node_agent::metrics::Metrics::new(),
    );
    sup.apply(idle("a", 8)).await.expect("fits");
    wait_for(&sup, "a", "8 running", all_in(SandboxPhase::Running)).await;

    let err = sup
        .apply(idle("b", 3))
        .await
        .expect_err("over the sandbox count");
    let ApplyError::AdmissionRefused(reason) = &err else {
        panic!("{err:?}")
    };
    assert!(
        reason.contains("needs 3 sandboxes but only 2 of 10 are free"),
        "{reason}"
    );

    let mut hungry = idle("c", 2);
    hungry.resources = Some(Resources {
        memory_request_bytes: 40 << 20,
        memory_limit_bytes: 48 << 20,
        ..Resources::default()
    });
    let err = sup.apply(hungry).await.expect_err("over the memory");
    // Two sandboxes, each its 40 MiB request and its 64 KiB log ring.
    assert!(
        err.to_string()
            .contains(&format!("requests {} bytes", 2 * ((40 << 20) + (64 << 10)))),
        "{err}"
    );

    // A log ring beyond the per-sandbox ceiling is refused at the agent too (the admin API and
    // static manifests do not pass the control plane's validation).
    let mut chatty = idle("d", 1);
    chatty.resources = Some(Resources {
        log_limit_bytes: 1 << 40,
        ..Resources::default()
    });
    let err = sup.apply(chatty).await.expect_err("over the log ceiling");
    assert!(
        flotilla_telemetry::error_chain(&err)
            .contains("is over the per-sandbox maximum of 16777216"),
        "{err}"
    );

    let err = sup
        .apply(idle("Bad_Name", 1))
        .await
        .expect_err("invalid name");
    let ApplyError::InvalidSpec(reason) = &err else {
        panic!("{err:?}")
    };
    assert!(
        reason.starts_with("name \"Bad_Name\": must be a lowercase RFC 1123"),
        "{reason}"
    );

    // Nothing else changed: the 8 sandboxes still run, the refused workloads do not exist.
    assert_eq!(sup.list(Some("a")).len(), 8);
    assert!(sup.list(Some("b")).is_empty() && sup.list(Some("c")).is_empty());
    assert!(
        sup.list(Some("a"))
            .iter()
            .all(|s| s.phase == SandboxPhase::Running as i32)
    );
    // Scaling the admitted workload within capacity still works.
    sup.apply(idle("a", 10)).await.expect("fits exactly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_modules_survive_a_restart_and_incompatible_ones_are_rebuilt() {
    let cache = tempfile::tempdir().expect("cache dir");
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..runtime_config()
    };
    let hello = spec("hello", fixture("hello"));

    let first = runtime(config.clone());
    first.prepare(&hello).await.expect("compiles");
    assert_eq!(first.cache_stats().compiled, 1);
    let files: Vec<_> = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");

    // A restarted agent loads the artifact instead of compiling.
    let second = runtime(config.clone());
    second.prepare(&hello).await.expect("loads");
    let stats = second.cache_stats();
    assert_eq!((stats.compiled, stats.loaded_from_disk), (0, 1));

    // Only the agent's user may read the cache or write to it.
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(cache.path()), 0o700);
    assert_eq!(mode(&files[0]), 0o600);

    // The file is sealed with the SHA-256 of what the agent wrote: one changed byte, and it
    // is compiled again instead of deserialized.
    let mut sealed = std::fs::read(&files[0]).expect("read");
    assert!(sealed.starts_with(b"flotilla-cwasm/1"));
    let last = sealed.len() - 1;
    sealed[last] ^= 0xff;
    let tmp = files[0].with_extension("tmp");
    std::fs::write(&tmp, &sealed).expect("write");
    std::fs::rename(&tmp, &files[0]).expect("replace");
    let tampered = runtime(config.clone());
    tampered.prepare(&hello).await.expect("recompiles");
    let stats = tampered.cache_stats();
    assert_eq!((stats.compiled, stats.loaded_from_disk), (1, 0));

    // An artifact for another architecture is refused on load and rebuilt.
    let arm = precompile_for_target(&config, "aarch64-unknown-linux-gnu", &fixture("hello"))
        .expect("cross-compiles");
    // Replace it the way the agent writes artifacts: a new file renamed over the old one. Loaded
    // modules map their artifact file, so rewriting it in place would corrupt them.
    drop((first, second, tampered));
    let tmp = files[0].with_extension("tmp");
    std::fs::write(&tmp, arm).expect("write");
    std::fs::rename(&tmp, &files[0]).expect("replace");
    let third = runtime(config);
    third.prepare(&hello).await.expect("recompiles");
    let stats = third.cache_stats();
    assert_eq!((stats.compiled, stats.loaded_from_disk), (1, 0));
}

#[test]
fn precompiles_for_arm64_nodes() {
    let config = runtime_config();
    for (name, wasm) in [
        ("module", fixture("hello")),
        ("component", component_fixture("hello")),
    ] {
        let artifact = precompile_for_target(&config, "aarch64-unknown-linux-gnu", &wasm)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&artifact[..4], b"\x7fELF", "{name}");
        // e_machine (little-endian u16 at offset 18): 183 is EM_AARCH64.
        assert_eq!(
            u16::from_le_bytes([artifact[18], artifact[19]]),
            183,
            "{name}"
        );
        assert!(
            wasmtime::Engine::detect_precompiled(&artifact).is_some(),
            "{name}"
        );
    }
    let err =
        precompile_for_target(&config, "not-a-target", &fixture("hello")).expect_err("bad target");
    assert!(err.to_string().contains("not-a-target"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_precompiled_elsewhere_are_loaded_instead_of_compiled() {
    let cache = tempfile::tempdir().expect("cache dir");
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().join("modules")),
        ..runtime_config()
    };
    // As `flotilla-node-agent --precompile` does on a build machine, for this agent's target
    // with its baseline CPU features.
    let written = flotilla_node_agent::precompile::precompile(
        &config,
        &host_target(),
        &[flotilla_tests::guests::guests_dir().join("hello-c.wasm")],
    )
    .expect("precompiles");
    assert_eq!(written.len(), 1);
    let loader = runtime(config.clone());
    let hello = spec(
        "hello-c",
        std::fs::read(flotilla_tests::guests::guests_dir().join("hello-c.wasm")).expect("read"),
    );
    loader.prepare(&hello).await.expect("loads");
    let stats = loader.cache_stats();
    assert_eq!((stats.compiled, stats.loaded_from_disk), (0, 1));
    // Made for other settings (another memory reservation), it is not this agent's: compiled.
    let other = RuntimeConfig {
        memory_reservation: Some(8 << 30),
        ..config
    };
    let other = runtime(other);
    other.prepare(&hello).await.expect("compiles");
    let stats = other.cache_stats();
    assert_eq!((stats.compiled, stats.loaded_from_disk), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_compiles_too_long_is_reported() {
    // 20,000 functions take far longer than 1 ms to compile, even on a fast machine.
    let mut wat = String::from("(module (memory (export \"memory\") 1)");
    for i in 0..20_000 {
        wat.push_str(&format!(
            "(func (param i32) (result i32) local.get 0 i32.const {i} i32.mul)"
        ));
    }
    wat.push_str("(func (export \"_start\")))");
    let big = wat::parse_str(&wat).expect("valid module");
    let config = RuntimeConfig {
        compile_timeout: Duration::from_millis(1),
        ..runtime_config()
    };
    let rt = runtime(config);
    let err = match rt.prepare(&spec("slow", big)).await {
        Err(err) => err,
        Ok(_) => panic!("20,000 functions compiled within 1 ms"),
    };
    assert!(matches!(err, SandboxError::CompileTimeout(_)), "{err:?}");
    assert_eq!(err.reason(), "ModuleTooCostly");
    assert!(err.to_string().contains("too costly"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_over_the_cost_limits_is_refused_before_compiling() {
    let mut config = runtime_config();
    config.compile_cost_limits.max_functions = 1_000;
    let rt = runtime(config);
    let err = match rt.prepare(&spec("huge", costly_module(1_001, 0))).await {
        Err(err) => err,
        Ok(_) => panic!("1,002 functions passed a limit of 1,000"),
    };
    assert!(matches!(err, SandboxError::TooCostly(_)), "{err:?}");
    assert_eq!(err.reason(), "ModuleTooCostly");
    assert!(err.to_string().contains("--max-module-functions"), "{err}");
    assert_eq!(rt.cache_stats().compiled, 0, "refused without compiling");
    // A module within the limit still runs.
    rt.prepare(&spec("hello", fixture("hello")))
        .await
        .expect("within the limits");
}

/// Costly compiles hold back no other workload: with every general compile slot taken by one
/// costly module and another queued behind it, a small module compiles in the slot kept for
/// cheap compiles and is ready while they still compile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_module_is_ready_while_costly_ones_compile() {
    let config = RuntimeConfig {
        compile_concurrency: 1,
        compile_timeout: Duration::from_secs(300),
        // The costly modules are costly at this size; the small one is far below it.
        cheap_compile_code_bytes: 64 << 10,
        ..runtime_config()
    };
    let rt = runtime(config);
    let costly: Vec<_> = (0..2)
        .map(|seed| {
            let rt = rt.clone();
            let spec = spec(&format!("costly-{seed}"), costly_module(30_000, seed));
            tokio::spawn(async move { rt.prepare(&spec).await.map(|_| ()) })
        })
        .collect();
    // One compiles in the general slot, the other waits for it.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let stats = rt.cache_stats();
            if stats.compiles_running + stats.compiles_waiting == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("both costly modules reach the compiler");
    rt.prepare(&spec("hello", fixture("hello")))
        .await
        .expect("the small module compiles");
    assert!(
        costly.iter().all(|task| !task.is_finished()),
        "the costly modules were compiled first; the test proves nothing on this machine"
    );
    for task in costly {
        task.await
            .expect("no panic")
            .expect("the costly modules compile too");
    }
    assert_eq!(rt.cache_stats().compiled, 3);
}
