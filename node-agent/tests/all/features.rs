//! WebAssembly proposals a workload opts into with `spec.wasm.features`: each runs when
//! enabled, and a module that uses one its workload does not enable is refused with the field
//! to set, even when another workload compiled the same module with it.

use crate::common::*;
use flotilla_model::wasm::FeatureSet;
use flotilla_node_agent::runtime::RuntimeConfig;
use flotilla_node_agent::runtime::volumes::HostPathRule;
use flotilla_node_agent::supervisor::{ApplyError, Supervisor};
use flotilla_proto::agent::v1::{Resources, SandboxPhase, Volume, WorkloadSpec, volume};

/// `spec` with `features` enabled.
fn with_features(mut spec: WorkloadSpec, features: &[&str]) -> WorkloadSpec {
    spec.wasm_features = features.iter().map(|f| f.to_string()).collect();
    spec
}

fn with_memory_limit(mut spec: WorkloadSpec, bytes: u64) -> WorkloadSpec {
    spec.resources = Some(Resources {
        memory_limit_bytes: bytes,
        ..Resources::default()
    });
    spec
}

/// Applies `spec` and returns the message of its refusal, checking that it is an
/// `InvalidModule` in the workload's status too.
async fn refused(sup: &Supervisor, spec: WorkloadSpec) -> String {
    refused_as(sup, spec, "InvalidModule").await
}

/// Applies `spec` and returns the message of its refusal, checking its reason and that the
/// workload's status shows it failed.
async fn refused_as(sup: &Supervisor, spec: WorkloadSpec, reason: &str) -> String {
    let name = spec.name.clone();
    let err = sup.apply(spec).await.expect_err("refused");
    let ApplyError::Prepare { source, .. } = &err else {
        panic!("{name}: unexpected error {err:?}");
    };
    assert_eq!(source.reason(), reason, "{name}");
    let status = only(&sup.list(Some(&name))).clone();
    assert_eq!(status.phase, SandboxPhase::Failed as i32, "{name}");
    flotilla_telemetry::error_chain(source)
}

/// A guest that keeps a linked list of 64 KiB GC arrays alive until its memory runs out, or,
/// with `keep = false`, drops each array at once: 4,096 of them, 256 MiB in all.
fn gc_guest(keep: bool) -> Vec<u8> {
    let next = if keep {
        "(local.get $head)"
    } else {
        "(ref.null $node)"
    };
    wat::parse_str(format!(
        r#"(module
             (type $bytes (array (mut i8)))
             (type $node (struct (field (ref null $node)) (field (ref $bytes))))
             (memory (export "memory") 1)
             (func (export "_start")
               (local $head (ref null $node))
               (local $i i32)
               (loop $again
                 (local.set $head
                   (struct.new $node {next} (array.new_default $bytes (i32.const 65536))))
                 (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br_if $again (i32.lt_u (local.get $i) (i32.const 4096))))))"#
    ))
    .expect("valid wat")
}

/// A GC guest's heap counts against its memory limit: keeping everything it allocates ends it
/// as `OutOfMemory`; dropping what it allocates lets the collector free it, and the same 256
/// MiB of allocations run to the end within 16 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_heaps_are_collected_and_bounded_by_the_memory_limit() {
    let sup = supervisor(runtime_config());
    let limit = 16 << 20;
    let keeper = with_memory_limit(spec("keeper", gc_guest(true)), limit);
    let (reason, message, _) = run_to_end(&sup, with_features(keeper, &["gc"])).await;
    assert_eq!(reason, "OutOfMemory", "{message}");
    assert!(message.contains(&limit.to_string()), "{message}");

    let dropper = with_memory_limit(spec("dropper", gc_guest(false)), limit);
    let (reason, message, code) = run_to_end(&sup, with_features(dropper, &["gc"])).await;
    assert_eq!((reason.as_str(), code), ("Completed", Some(0)), "{message}");
}

/// The same module, compiled once, is refused for a workload that does not enable `gc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_is_refused_where_its_feature_is_not_enabled() {
    let sup = supervisor(runtime_config());
    let (reason, ..) =
        run_to_end(&sup, with_features(spec("with", gc_guest(false)), &["gc"])).await;
    assert_eq!(reason, "Completed");
    let message = refused(&sup, spec("without", gc_guest(false))).await;
    assert!(
        message.contains("garbage collection")
            && message.contains("add `gc` to spec.wasm.features"),
        "{message}"
    );
    let message = refused(
        &sup,
        with_features(spec("unknown", fixture("hello")), &["gc", "threadz"]),
    )
    .await;
    assert!(
        message.contains("unknown WebAssembly feature \"threadz\""),
        "{message}"
    );
}

/// A guest that throws `$boom` with 42 from one function and, when `catch` is set, catches it
/// in another and exits with the value it carried.
fn exceptions_guest(catch: bool) -> Vec<u8> {
    let start = if catch {
        "(call $exit (call $catcher))"
    } else {
        "(call $thrower (i32.const 7))"
    };
    wat::parse_str(format!(
        r#"(module
             (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (tag $boom (param i32))
             (memory (export "memory") 1)
             (func $thrower (param i32)
               (throw $boom (local.get 0)))
             (func $catcher (result i32)
               (block $caught (result i32)
                 (try_table (catch $boom $caught)
                   (call $thrower (i32.const 42)))
                 (i32.const 0)))
             (func (export "_start")
               {start}))"#
    ))
    .expect("valid wat")
}

/// Exceptions cross functions and are caught; one that nothing catches ends the run as a trap
/// with its message; without `exceptions` the module is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_are_caught_across_functions_and_uncaught_ones_trap() {
    let sup = supervisor(runtime_config());
    let caught = with_features(spec("caught", exceptions_guest(true)), &["exceptions"]);
    let (reason, message, code) = run_to_end(&sup, caught).await;
    assert_eq!((reason.as_str(), code), ("Error", Some(42)), "{message}");

    let uncaught = with_features(spec("uncaught", exceptions_guest(false)), &["exceptions"]);
    let (reason, message, code) = run_to_end(&sup, uncaught).await;
    assert_eq!((reason.as_str(), code), ("Trap", None), "{message}");
    assert!(message.contains("exception"), "{message}");

    let message = refused(&sup, spec("refused", exceptions_guest(true))).await;
    assert!(
        message.contains("add `exceptions` to spec.wasm.features"),
        "{message}"
    );
}

/// Wide arithmetic and custom page sizes run when enabled and are refused otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_arithmetic_and_custom_page_sizes_run_when_enabled() {
    let sup = supervisor(runtime_config());
    // (2^64 - 1) + 1 as 128-bit numbers: the high half is the carry, 1.
    let wide = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (memory (export "memory") 1)
             (func (export "_start")
               (i64.add128 (i64.const -1) (i64.const 0) (i64.const 1) (i64.const 0))
               (call $exit (i32.wrap_i64))
               drop))"#,
    )
    .expect("valid wat");
    // A memory of 100 one-byte pages: byte 99 can be stored to, byte 100 cannot.
    let small_pages = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (memory (export "memory") 100 (pagesize 1))
             (func (export "_start")
               (i32.store8 (i32.const 99) (i32.const 5))
               (call $exit (i32.add (memory.size) (i32.load8_u (i32.const 99))))))"#,
    )
    .expect("valid wat");
    for (name, module, feature, code) in [
        ("wide", wide, "wide-arithmetic", 1),
        ("pages", small_pages, "custom-page-sizes", 105),
    ] {
        let enabled = with_features(spec(name, module.clone()), &[feature]);
        let (reason, message, exit) = run_to_end(&sup, enabled).await;
        assert_eq!(
            (reason.as_str(), exit),
            ("Error", Some(code)),
            "{name}: {message}"
        );
        let message = refused(&sup, spec(&format!("{name}-refused"), module)).await;
        assert!(
            message.contains(&format!("add `{feature}` to spec.wasm.features")),
            "{name}: {message}"
        );
    }
}

/// The WASI 0.3 command of `examples/guests/p3/` (Rust, `wasi:cli/run@0.3.0`).
fn p3_command() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests/p3.wasm");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A WASI 0.3 command component runs with `component-model-async`: it gets its arguments and
/// environment, writes to stdout through a stream, reads a file of its volume through
/// `wasi:filesystem@0.3.0`, and exits with the code it chose; without the feature it is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_0_3_command_prints_its_args_and_env_and_exits_with_its_code() {
    let host_dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(host_dir.path().join("greeting.txt"), "ahoy from a volume").expect("write");
    let mut config = RuntimeConfig {
        wasm_features: FeatureSet::ALL,
        ..runtime_config()
    };
    config.volumes.host_paths = vec![HostPathRule {
        prefix: host_dir.path().to_path_buf(),
        writable: false,
    }];
    let sup = supervisor(config);
    let mut command = with_features(spec("p3", p3_command()), &["component-model-async"]);
    command.args = vec!["one".into(), "two words".into()];
    command.env = vec![env("GREETING", "ahoy"), env("EXIT_CODE", "7")];
    let (reason, message, code) = run_to_end(&sup, command).await;
    assert_eq!((reason.as_str(), code), ("Error", Some(7)), "{message}");
    assert_eq!(
        logs(&sup, "p3", 0),
        "args: p3 one two words\nenv: GREETING=ahoy\nenv: EXIT_CODE=7\n"
    );

    let mut ok = with_features(spec("p3-ok", p3_command()), &["component-model-async"]);
    ok.env = vec![env("EXIT_CODE", "0"), env("READ_FILE", "greeting.txt")];
    ok.volumes = vec![Volume {
        name: "data".into(),
        mount_path: "/data".into(),
        read_only: true,
        source: Some(volume::Source::HostPath(
            host_dir.path().to_string_lossy().into_owned(),
        )),
        sub_path: String::new(),
    }];
    let (reason, message, code) = run_to_end(&sup, ok).await;
    assert_eq!((reason.as_str(), code), ("Completed", Some(0)), "{message}");
    assert!(
        logs(&sup, "p3-ok", 0).ends_with("greeting.txt: ahoy from a volume\n"),
        "{}",
        logs(&sup, "p3-ok", 0)
    );

    let message = refused(&sup, spec("p3-refused", p3_command())).await;
    assert!(
        message.contains("async ABI (WASI 0.3)")
            && message.contains("add `component-model-async` to spec.wasm.features"),
        "{message}"
    );
}

/// A node offers what its agent's `--wasm-features` lists: by default not the experimental
/// `component-model-async`, so a WASI 0.3 command is refused there, naming what the node
/// offers, before its module is even read; with none offered, a GC workload is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_is_refused_where_the_node_does_not_offer_its_features() {
    let sup = supervisor(runtime_config());
    let p3 = with_features(spec("p3", p3_command()), &["component-model-async"]);
    let message = refused_as(&sup, p3, "WasmFeatureNotOffered").await;
    assert_eq!(
        message,
        "spec.wasm.features enables component-model-async, which this node does not offer (its \
         agent offers gc, exceptions, wide-arithmetic, custom-page-sizes, set by \
         --wasm-features)"
    );

    let bare = supervisor(RuntimeConfig {
        wasm_features: FeatureSet::NONE,
        ..runtime_config()
    });
    let gc = with_features(spec("gc", gc_guest(false)), &["gc"]);
    let message = refused_as(&bare, gc, "WasmFeatureNotOffered").await;
    assert!(message.contains("its agent offers none"), "{message}");
    // What needs nothing still runs there.
    let (reason, message, _) = run_to_end(&bare, spec("plain", fixture("hello"))).await;
    assert_eq!(reason, "Completed", "{message}");
}
