//! Modules with threads (`spec.wasm.features: [threads]`, `wasi-threads`): they sum in
//! parallel; a trap or an exit in any thread ends the run and every other thread with it, a
//! stop ends them all, even those parked in `memory.atomic.wait`; and their number, CPU and
//! memory stay within the sandbox's limits.
//!
//! The tests take turns ([`SERIAL`]): they count the process's guest threads.

use std::time::{Duration, Instant};

use crate::common::*;
use flotilla_model::wasm::FeatureSet;
use flotilla_node_agent::guests::GuestRuntime;
use flotilla_node_agent::metrics::Metrics;
use flotilla_node_agent::runtime::{GUEST_THREAD_NAME, RuntimeConfig};
use flotilla_node_agent::supervisor::{ApplyError, Supervisor, SupervisorConfig};
use flotilla_proto::agent::v1::{Resources, SandboxPhase, WorkloadSpec};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A runtime whose node offers every feature, threads included.
fn threads_config(max_threads: u32) -> RuntimeConfig {
    RuntimeConfig {
        wasm_features: FeatureSet::ALL,
        max_threads_per_sandbox: max_threads,
        ..runtime_config()
    }
}

fn threads_supervisor(max_threads: u32) -> Supervisor {
    supervisor(threads_config(max_threads))
}

/// `module` as a workload enabling threads, with `resources`.
fn threaded(name: &str, module: Vec<u8>, resources: Resources) -> WorkloadSpec {
    let mut spec = spec(name, module);
    spec.wasm_features = vec!["threads".into()];
    spec.resources = Some(resources);
    spec
}

/// A module with threads: a shared memory of `memory` (`min max`, in pages), `_start` running
/// `main` and each spawned thread running `thread` (with its argument in `$arg`). `$park`
/// waits forever on an address nobody notifies; `$spin` never returns.
fn guest(memory: &str, main: &str, thread: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             (import "env" "memory" (memory {memory} shared))
             (export "memory" (memory 0))
             (import "wasi" "thread-spawn" (func $spawn (param i32) (result i32)))
             (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (func $park
               (loop $again
                 (drop (memory.atomic.wait32 (i32.const 256) (i32.const 0) (i64.const -1)))
                 (br $again)))
             (func $spin (loop $again (br $again)))
             (func (export "wasi_thread_start") (param $id i32) (param $arg i32) {thread})
             (func (export "_start") (local $n i32) {main}))"#
    ))
    .expect("valid wat")
}

/// The nice values of this process's threads whose name `name` accepts.
fn nice_values(name: impl Fn(&str) -> bool) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| name(comm.trim()))
        })
        .filter_map(|task| {
            // The fields after the name; the nice value is the 19th field of the line.
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let (_, fields) = stat.rsplit_once(')')?;
            fields.split_whitespace().nth(16)?.parse().ok()
        })
        .collect()
}

/// The OS threads of this process that run guest threads.
fn guest_threads() -> usize {
    nice_values(|name| name == GUEST_THREAD_NAME).len()
}

/// Waits (bounded) until exactly `n` guest threads run.
async fn wait_for_guest_threads(n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while guest_threads() != n {
        assert!(
            Instant::now() < deadline,
            "{} guest threads, expected {n}",
            guest_threads()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The example guest's four threads sum 1..4,000,000 into one shared total; the module is
/// refused where its workload does not enable threads, and where the node does not offer them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threads_guest_sums_in_parallel() {
    let _serial = SERIAL.lock().await;
    let module = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests/threads.wasm"),
    )
    .expect("examples/guests/threads.wasm");
    let sup = threads_supervisor(16);
    let (reason, message, code) =
        run_to_end(&sup, threaded("sum", module.clone(), Resources::default())).await;
    assert_eq!((reason.as_str(), code), ("Completed", Some(0)), "{message}");
    assert_eq!(
        logs(&sup, "sum", 0),
        "summed 1..4000000 on 4 threads: 8000002000000\n"
    );
    wait_for_guest_threads(0).await;

    let err = sup
        .apply(spec("without", module.clone()))
        .await
        .expect_err("threads not enabled");
    let ApplyError::Prepare { source, .. } = &err else {
        panic!("unexpected error {err:?}");
    };
    let message = flotilla_telemetry::error_chain(source);
    assert!(
        message.contains("WebAssembly threads")
            && message.contains("add `threads` to spec.wasm.features"),
        "{message}"
    );

    let default_node = supervisor(runtime_config());
    let err = default_node
        .apply(threaded("not-offered", module, Resources::default()))
        .await
        .expect_err("threads not offered");
    let ApplyError::Prepare { source, .. } = &err else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(source.reason(), "WasmFeatureNotOffered");
}

/// A trap in a spawned thread, or its `proc_exit`, ends the run with that trap or code, and
/// the main thread, parked in `memory.atomic.wait32` with no timeout, is woken and stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_or_an_exit_in_any_thread_ends_every_thread() {
    let _serial = SERIAL.lock().await;
    let sup = threads_supervisor(16);
    let main = "(drop (call $spawn (i32.const 0))) (call $park)";
    let trapping = guest("1 1", main, "unreachable");
    let (reason, message, _) =
        run_to_end(&sup, threaded("trap", trapping, Resources::default())).await;
    assert_eq!(reason, "Trap", "{message}");
    assert!(message.contains("unreachable"), "{message}");
    wait_for_guest_threads(0).await;

    let exiting = guest("1 1", main, "(call $exit (i32.const 3))");
    let (reason, message, code) =
        run_to_end(&sup, threaded("exit", exiting, Resources::default())).await;
    assert_eq!((reason.as_str(), code), ("Error", Some(3)), "{message}");
    wait_for_guest_threads(0).await;
}

/// Stopping a sandbox stops all its threads: one spinning, one parked with no timeout, and
/// the main thread parked too. Its sandboxes run on the agent's replica workers, as in the
/// agent, and its threads are at their nice value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_sandbox_stops_every_thread() {
    let _serial = SERIAL.lock().await;
    let guests = GuestRuntime::new(1).expect("guest runtimes");
    let sup = Supervisor::new(
        runtime(threads_config(16)),
        SupervisorConfig {
            guests: guests.handle(),
            ..SupervisorConfig::default()
        },
        Metrics::new(),
    );
    let main = "(drop (call $spawn (i32.const 0))) (drop (call $spawn (i32.const 1))) (call $park)";
    let thread = "(if (local.get $arg) (then (call $park)) (else (call $spin)))";
    sup.apply(threaded(
        "stopped",
        guest("1 1", main, thread),
        Resources::default(),
    ))
    .await
    .expect("applied");
    wait_for(
        &sup,
        "stopped",
        "the sandbox to run",
        all_in(SandboxPhase::Running),
    )
    .await;
    wait_for_guest_threads(3).await;
    // Guest threads are made from the replica worker that ran the sandbox: at its nice value,
    // below the process's.
    let replica_workers = nice_values(|name| name.starts_with("flotilla-guest"));
    let guest_threads = nice_values(|name| name == GUEST_THREAD_NAME);
    let process = nice_values(|name| name.starts_with("threads::"));
    assert_eq!(replica_workers.len(), 1, "{replica_workers:?}");
    assert_eq!(
        guest_threads,
        vec![replica_workers[0]; 3],
        "guest threads against the replica worker"
    );
    assert!(
        !process.is_empty() && process.iter().all(|n| *n < replica_workers[0]),
        "the test's thread at {process:?}, replica workers at {replica_workers:?}"
    );
    sup.stop("stopped", Some(Duration::from_secs(5))).await;
    wait_for_guest_threads(0).await;
}

/// `thread-spawn` fails past `--max-threads-per-sandbox`; the threads' CPU counts against the
/// sandbox's `cpuTime` and is kept to its `limits.cpu` rate; the shared memory grows no further
/// than the memory limit, and one that starts above it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_are_bounded_in_number_cpu_and_memory() {
    let _serial = SERIAL.lock().await;
    let sup = threads_supervisor(4);
    // Spawns parked threads until refused, then exits with how many it got.
    let main = "(block $refused (loop $again
                  (br_if $refused (i32.lt_s (call $spawn (i32.const 0)) (i32.const 1)))
                  (local.set $n (i32.add (local.get $n) (i32.const 1)))
                  (br $again)))
                (call $exit (local.get $n))";
    let many = guest("1 1", main, "(call $park)");
    let (reason, message, code) =
        run_to_end(&sup, threaded("many", many, Resources::default())).await;
    assert_eq!((reason.as_str(), code), ("Error", Some(3)), "{message}");
    wait_for_guest_threads(0).await;

    // Two spinning threads and a parked main thread, with 100 ms of CPU at 250m: 400 ms at
    // least, where two cores would spend it in 50 ms.
    let main = "(drop (call $spawn (i32.const 0))) (drop (call $spawn (i32.const 0))) (call $park)";
    let spinners = guest("1 1", main, "(call $spin)");
    let limited = Resources {
        cpu_limit_ms: 100,
        cpu_limit_millicores: 250,
        ..Resources::default()
    };
    let started = Instant::now();
    let (reason, message, _) = run_to_end(&sup, threaded("spinners", spinners, limited)).await;
    let took = started.elapsed();
    assert_eq!(reason, "CpuLimit", "{message}");
    assert!(took >= Duration::from_millis(300), "took {took:?}");
    let used = only(&sup.list(Some("spinners"))).cpu_used_ms;
    assert!(used >= 100, "cpu used {used} ms");
    wait_for_guest_threads(0).await;

    // Declared up to 64 pages (4 MiB), limited to 1 MiB: growing by 16 pages from 1 fails.
    let main = "(call $exit (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))";
    let growing = guest("1 64", main, "");
    let one_mib = Resources {
        memory_limit_bytes: 1 << 20,
        ..Resources::default()
    };
    let (reason, message, code) = run_to_end(&sup, threaded("grow", growing, one_mib)).await;
    assert_eq!((reason.as_str(), code), ("Error", Some(1)), "{message}");
    let large = guest("32 64", "", "");
    let (reason, message, _) = run_to_end(&sup, threaded("large", large, one_mib)).await;
    assert_eq!(reason, "OutOfMemory", "{message}");
    assert!(message.contains("above the memory limit"), "{message}");
}

/// Guest threads take turns in the agent's run queue as any sandbox does: beside an ordinary
/// spinner requesting 300m, with one CPU slot between them, a sandbox requesting 100m whose two
/// threads spin gets a third of the spinner's CPU, not cores of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_share_the_cpu_with_other_sandboxes_by_request() {
    let _serial = SERIAL.lock().await;
    let sup = supervisor(RuntimeConfig {
        guest_threads: 1,
        ..threads_config(16)
    });
    let request = |millicores| Resources {
        cpu_request_millicores: millicores,
        ..Resources::default()
    };
    let spin = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#,
    )
    .expect("valid wat");
    let mut plain = spec("plain", spin);
    plain.resources = Some(request(300));
    sup.apply(plain).await.expect("applied");
    let main = "(drop (call $spawn (i32.const 0))) (drop (call $spawn (i32.const 0))) (call $park)";
    sup.apply(threaded(
        "threaded",
        guest("1 1", main, "(call $spin)"),
        request(100),
    ))
    .await
    .expect("applied");
    for name in ["plain", "threaded"] {
        wait_for(&sup, name, "running", all_in(SandboxPhase::Running)).await;
    }
    wait_for_guest_threads(3).await;
    let used = || {
        let of = |name| only(&sup.list(Some(name))).cpu_used_ms;
        (of("plain"), of("threaded"))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = used();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = used();
    let (plain, threaded) = (after.0 - before.0, after.1 - before.1);
    println!("CPU over 3 s: plain {plain} ms, threaded {threaded} ms");
    assert!(plain >= 500, "the spinner hardly ran: {plain} ms");
    let ratio = threaded as f64 / plain as f64;
    assert!(
        (0.2..=0.5).contains(&ratio),
        "threaded used {threaded} ms and plain {plain} ms: {ratio:.2} instead of about 1:3"
    );
    sup.stop("plain", Some(Duration::from_secs(5))).await;
    sup.stop("threaded", Some(Duration::from_secs(5))).await;
    wait_for_guest_threads(0).await;
}
