//! Sandboxes end to end through the supervisor and a real wasmtime runtime.

use std::time::{Duration, Instant};

use crate::common::*;
use flotilla_node_agent::metrics::Metrics;
use flotilla_node_agent::runtime::{EpochTicker, SEGMENT_COST};
use flotilla_node_agent::supervisor::{ApplyError, Supervisor, SupervisorConfig};
use flotilla_proto::agent::v1::{ModuleSource, Resources, SandboxPhase, module_source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_world_p1_module_logs_its_output() {
    let sup = supervisor(runtime_config());
    sup.apply(spec("hello", fixture("hello")))
        .await
        .expect("applied");
    let statuses = wait_for(&sup, "hello", "hello to finish", all_ended()).await;
    let status = only(&statuses);
    assert_eq!(status.phase, SandboxPhase::Succeeded as i32);
    assert_eq!(
        termination(status),
        ("Completed", "exited with code 0", Some(0))
    );
    assert_eq!(logs(&sup, "hello", 0), "hello from flotilla\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_world_p2_component_logs_its_output() {
    let sup = supervisor(runtime_config());
    sup.apply(spec("hello-p2", component_fixture("hello")))
        .await
        .expect("applied");
    let statuses = wait_for(&sup, "hello-p2", "component to finish", all_ended()).await;
    assert_eq!(termination(only(&statuses)).0, "Completed");
    assert_eq!(logs(&sup, "hello-p2", 0), "hello from flotilla\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn args_and_env_reach_the_guest() {
    let sup = supervisor(runtime_config());
    let mut s = spec("echo", fixture("echo_args"));
    s.args = vec!["--greeting".into(), "hi there".into()];
    s.env = vec![env("COLOR", "blue"), env("EMPTY", "")];
    sup.apply(s).await.expect("applied");
    wait_for(&sup, "echo", "echo to finish", all_ended()).await;
    assert_eq!(
        logs(&sup, "echo", 0),
        "echo\0--greeting\0hi there\0|COLOR=blue\0EMPTY=\0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_is_reported_and_stderr_logged() {
    let sup = supervisor(runtime_config());
    sup.apply(spec("exit3", fixture("exit3")))
        .await
        .expect("applied");
    let statuses = wait_for(&sup, "exit3", "exit", all_ended()).await;
    let status = only(&statuses);
    assert_eq!(status.phase, SandboxPhase::Failed as i32);
    assert_eq!(
        termination(status),
        ("Error", "exited with code 3", Some(3))
    );
    assert_eq!(logs(&sup, "exit3", 0), "giving up\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_reports_message_and_wasm_backtrace() {
    let sup = supervisor(runtime_config());
    sup.apply(spec("trap", fixture("trap")))
        .await
        .expect("applied");
    let statuses = wait_for(&sup, "trap", "trap", all_ended()).await;
    let (reason, message, code) = termination(only(&statuses));
    assert_eq!(reason, "Trap");
    assert_eq!(code, None);
    assert!(message.contains("unreachable"), "{message}");
    assert!(
        message.contains("explode"),
        "backtrace names the function: {message}"
    );
    assert!(
        message.contains("middle"),
        "backtrace names the caller: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_traps_with_stack_overflow() {
    let sup = supervisor(runtime_config());
    sup.apply(spec("recurse", fixture("recurse")))
        .await
        .expect("applied");
    let statuses = wait_for(&sup, "recurse", "overflow", all_ended()).await;
    let (reason, message, _) = termination(only(&statuses));
    assert_eq!(reason, "Trap");
    assert!(message.contains("call stack exhausted"), "{message}");
    assert!(
        message.lines().count() <= 40,
        "backtrace is capped: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_stops_at_its_limit() {
    let sup = supervisor(runtime_config());
    let mut s = spec("bomb", fixture("membomb"));
    s.resources = Some(Resources {
        memory_limit_bytes: 8 << 20,
        ..Resources::default()
    });
    sup.apply(s).await.expect("applied");
    let statuses = wait_for(&sup, "bomb", "oom", all_ended()).await;
    let (reason, message, _) = termination(only(&statuses));
    assert_eq!(reason, "OutOfMemory");
    assert!(message.contains("8388608"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_memories_hit_one_aggregate_limit() {
    let sup = supervisor(runtime_config());
    let mut s = spec("memories", fixture("many_memories"));
    s.resources = Some(Resources {
        memory_limit_bytes: 40 << 20,
        ..Resources::default()
    });
    sup.apply(s).await.expect("applied");
    let statuses = wait_for(&sup, "memories", "oom", all_ended()).await;
    assert_eq!(termination(only(&statuses)).0, "OutOfMemory");
}

/// A guest that grows its table by `elements` in one `table.grow`, trapping if that fails.
fn table_grower(elements: u32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             (memory (export "memory") 1)
             (table 1 funcref)
             (func (export "_start")
               (if (i32.eq (table.grow (ref.null func) (i32.const {elements})) (i32.const -1))
                 (then unreachable))))"#
    ))
    .expect("valid wat")
}

/// A table grown past the agent's element limit, or past the memory limit (each element costs
/// a pointer), ends the sandbox as memory does: `OutOfMemory`, with the limit in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_growth_past_a_limit_is_reported_as_memory_is() {
    let sup = supervisor(runtime_config());
    // Past the default limit of 100,000 elements, well within memory.
    sup.apply(spec("elements", table_grower(200_000)))
        .await
        .expect("applied");
    let statuses = wait_for(&sup, "elements", "oom", all_ended()).await;
    let (reason, message, _) = termination(only(&statuses));
    assert_eq!(reason, "OutOfMemory");
    assert!(
        message.contains("table limit of 100000 elements"),
        "{message}"
    );

    // 50,000 elements (400 KB of pointers) past a 256 KiB memory limit.
    let mut s = spec("pointers", table_grower(50_000));
    s.resources = Some(Resources {
        memory_limit_bytes: 256 << 10,
        ..Resources::default()
    });
    sup.apply(s).await.expect("applied");
    let statuses = wait_for(&sup, "pointers", "oom", all_ended()).await;
    let (reason, message, _) = termination(only(&statuses));
    assert_eq!(reason, "OutOfMemory");
    assert!(
        message.contains("memory limit of 262144 bytes"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_guest_is_stopped_by_cpu_limit() {
    let sup = supervisor(runtime_config());
    let mut s = spec("spin", fixture("spin"));
    s.resources = Some(Resources {
        cpu_limit_ms: 100,
        ..Resources::default()
    });
    sup.apply(s).await.expect("applied");
    let statuses = wait_for(&sup, "spin", "cpu limit", all_ended()).await;
    let (reason, message, _) = termination(only(&statuses));
    assert_eq!(reason, "CpuLimit");
    assert!(message.contains("100 ms"), "{message}");
}

/// A CPU limit caps a spinning sandbox's rate (it pauses after each slice), and each sandbox's
/// CPU used is in its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_limit_caps_the_rate_and_the_cpu_used_is_reported() {
    let sup = supervisor(runtime_config());
    let mut capped = spec("capped", fixture("spin"));
    capped.resources = Some(Resources {
        cpu_limit_millicores: 250,
        ..Resources::default()
    });
    sup.apply(capped).await.expect("applied");
    sup.apply(spec("free", fixture("spin")))
        .await
        .expect("applied");
    wait_for(&sup, "capped", "running", all_in(SandboxPhase::Running)).await;
    wait_for(&sup, "free", "running", all_in(SandboxPhase::Running)).await;
    let used = |name: &str| only(&sup.list(Some(name))).cpu_used_ms;
    let (capped_before, free_before, started) = (used("capped"), used("free"), Instant::now());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let elapsed = started.elapsed().as_millis() as f64;
    let rate = |before: u64, name: &str| (used(name) - before) as f64 / elapsed;
    let (capped_rate, free_rate) = (rate(capped_before, "capped"), rate(free_before, "free"));
    // 250m of one core, within the granularity of 10 ms ticks; lower on a loaded machine.
    assert!(
        (0.05..=0.30).contains(&capped_rate),
        "the capped sandbox ran at {capped_rate:.2} of a core"
    );
    assert!(
        free_rate > capped_rate,
        "the uncapped sandbox ran at {free_rate:.2}, the capped one at {capped_rate:.2}"
    );
    sup.stop("capped", None).await;
    sup.stop("free", None).await;
}

/// Two spinners on one CPU slot share it by their requests, 1:3: the one that ends a slice
/// competes for the slot it gives back, rather than handing it to the other every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spinners_on_one_slot_share_it_by_request() {
    let sup = supervisor(flotilla_node_agent::runtime::RuntimeConfig {
        guest_threads: 1,
        ..runtime_config()
    });
    for (name, millicores) in [("light", 100), ("heavy", 300)] {
        let mut spinner = spec(name, fixture("spin"));
        spinner.resources = Some(Resources {
            cpu_request_millicores: millicores,
            ..Resources::default()
        });
        sup.apply(spinner).await.expect("applied");
        wait_for(&sup, name, "running", all_in(SandboxPhase::Running)).await;
    }
    let used = || {
        let of = |name| only(&sup.list(Some(name))).cpu_used_ms;
        (of("light"), of("heavy"))
    };
    let before = used();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = used();
    let (light, heavy) = (after.0 - before.0, after.1 - before.1);
    assert!(
        heavy >= 400,
        "the spinners hardly ran: {light} and {heavy} ms"
    );
    let ratio = light as f64 / heavy as f64;
    assert!(
        (0.2..=0.45).contains(&ratio),
        "light used {light} ms and heavy {heavy} ms: {ratio:.2} instead of about 1:3"
    );
    sup.stop("light", None).await;
    sup.stop("heavy", None).await;
}

/// CPU time is counted in the epochs a guest sees, not on the wall clock: with the test
/// advancing the epoch itself, a spinning guest with a budget of 100 ms (ten ticks of 10 ms)
/// runs on while no epoch passes, and ends with `CpuLimit` once it has seen its eleventh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_time_is_counted_in_the_epochs_that_pass() {
    let mut config = runtime_config();
    config.epoch_ticker = EpochTicker::Manual;
    let runtime = runtime(config);
    let runtime_epoch = runtime.epoch().clone();
    // The guest spins without yielding until an epoch passes, so it runs where the agent runs
    // guests, on a runtime of its own: on the test's, it could hold the worker that drives the
    // timers this test sleeps on, and nothing would advance the epoch.
    let guests = flotilla_node_agent::guests::GuestRuntime::new(1).expect("guest runtime");
    let config = SupervisorConfig {
        guests: guests.handle(),
        ..SupervisorConfig::default()
    };
    let sup = Supervisor::new(runtime, config, Metrics::new());
    let mut s = spec("spin", fixture("spin"));
    s.resources = Some(Resources {
        cpu_limit_ms: 100,
        ..Resources::default()
    });
    sup.apply(s).await.expect("applied");
    wait_for(&sup, "spin", "running", all_in(SandboxPhase::Running)).await;
    // Three budgets' worth of wall-clock time without an epoch: still running.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        only(&sup.list(Some("spin"))).phase,
        SandboxPhase::Running as i32
    );
    let mut epochs = 0;
    let statuses = loop {
        let statuses = sup.list(Some("spin"));
        if all_ended()(&statuses) {
            break statuses;
        }
        assert!(epochs < 10_000, "still running after {epochs} epochs");
        runtime_epoch.advance();
        epochs += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    // A guest is charged at most one tick per epoch.
    assert!(epochs >= 11, "ended after {epochs} epochs");
    let (reason, message, _) = termination(only(&statuses));
    assert_eq!(reason, "CpuLimit");
    assert!(message.contains("100 ms"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_holds_during_instantiation() {
    let sup = supervisor(runtime_config());
    let mut s = spec("spin-start", fixture("spin_in_start"));
    s.resources = Some(Resources {
        deadline_ms: 200,
        ..Resources::default()
    });
    sup.apply(s).await.expect("applied");
    let statuses = wait_for(&sup, "spin-start", "deadline", all_ended()).await;
    assert_eq!(termination(only(&statuses)).0, "DeadlineExceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_covers_a_guest_blocked_in_wasi() {
    let sup = supervisor(runtime_config());
    let mut s = spec("sleeper", fixture("sleep"));
    s.resources = Some(Resources {
        deadline_ms: 200,
        ..Resources::default()
    });
    sup.apply(s).await.expect("applied");
    let statuses = wait_for(&sup, "sleeper", "deadline", all_ended()).await;
    assert_eq!(termination(only(&statuses)).0, "DeadlineExceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_a_spinning_guest() {
    let sup = supervisor(runtime_config());
    sup.apply(spec("spin", fixture("spin")))
        .await
        .expect("applied");
    wait_for(&sup, "spin", "running", all_in(SandboxPhase::Running)).await;
    let started = Instant::now();
    let stopped = sup
        .stop("spin", Some(Duration::from_secs(5)))
        .await
        .expect("workload known");
    assert_eq!(stopped, 1);
    assert!(sup.list(Some("spin")).is_empty());
    // The sandbox ends at its next epoch yield, long before the grace period runs out.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sup.metrics().in_phase(SandboxPhase::Running), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_flood_is_bounded_by_the_ring() {
    let sup = supervisor(runtime_config());
    let mut s = spec("flood", fixture("flood"));
    s.resources = Some(Resources {
        log_limit_bytes: 4096,
        cpu_limit_ms: 200,
        ..Resources::default()
    });
    sup.apply(s).await.expect("applied");
    wait_for(&sup, "flood", "cpu limit", all_ended()).await;
    let buffer = sup.output("flood", 0).expect("sandbox").logs;
    let read = buffer.read_from(0);
    // Bytes and the bookkeeping of each run of one stream fill the limit.
    let retained = read.data().len() + read.pieces.len() * SEGMENT_COST;
    assert!(
        (4096 - 2 * SEGMENT_COST..=4096).contains(&retained),
        "{retained}"
    );
    assert!(read.skipped > 0);
    assert!(buffer.allocated_bytes() <= 8192);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_modules_are_rejected_with_clear_errors() {
    let mut config = runtime_config();
    config.max_module_bytes = 1 << 20;
    let sup = supervisor(config);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "garbage",
            b"this is not wasm".to_vec(),
            "InvalidModule",
            "\\0asm magic",
        ),
        (
            "text",
            b"(module (func (export \"_start\")))".to_vec(),
            "InvalidModule",
            "WAT text is not accepted",
        ),
        (
            "truncated",
            fixture("hello")[..20].to_vec(),
            "InvalidModule",
            "invalid module",
        ),
        (
            "oversize",
            {
                let mut m = fixture("hello");
                m.resize(2 << 20, 0);
                m
            },
            "InvalidModule",
            "over the limit of 1048576 bytes",
        ),
        ("library", fixture("no_start"), "InvalidModule", "_start"),
        (
            "threads",
            fixture("shared_memory"),
            "InvalidModule",
            "threads",
        ),
    ];
    for (name, module, reason, needle) in cases {
        let err = sup.apply(spec(name, module)).await.expect_err(name);
        let ApplyError::Prepare { source, .. } = &err else {
            panic!("{name}: unexpected error {err:?}");
        };
        assert_eq!(source.reason(), reason, "{name}");
        // As the status shows it: the error and its causes.
        let shown = flotilla_telemetry::error_chain(source);
        assert!(shown.contains(needle), "{name}: {shown}");
        // The failure is visible in the workload's status too.
        let status = only(&sup.list(Some(name))).clone();
        assert_eq!(status.phase, SandboxPhase::Failed as i32, "{name}");
        assert_eq!(status.reason, reason, "{name}");
    }
    // A wrong digest is caught before compiling.
    let mut s = spec("digest", fixture("hello"));
    s.module = Some(ModuleSource {
        source: Some(module_source::Source::Inline(fixture("hello"))),
        sha256: "00".repeat(32),
    });
    let err = sup.apply(s).await.expect_err("digest mismatch");
    assert!(format!("{:?}", err).contains("DigestMismatch"), "{err:?}");
    // The agent keeps serving good workloads.
    sup.apply(spec("hello", fixture("hello")))
        .await
        .expect("applied");
    wait_for(&sup, "hello", "hello", all_in(SandboxPhase::Succeeded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_sandboxes_are_available_after_min_ready_seconds() {
    let sup = supervisor(runtime_config());
    // An hour: running, and not available, however slow this machine is.
    let mut patient = spec("patient", fixture("sleep"));
    patient.replicas = 2;
    patient.min_ready_seconds = 3600;
    sup.apply(patient).await.expect("applies");
    let mut spec = spec("steady", fixture("sleep"));
    spec.replicas = 3;
    spec.min_ready_seconds = 1;
    sup.apply(spec).await.expect("applies");
    wait_for(&sup, "patient", "running", all_in(SandboxPhase::Running)).await;
    assert_eq!(
        sup.available("patient"),
        0,
        "not available before minReadySeconds"
    );
    wait_for(&sup, "steady", "running", all_in(SandboxPhase::Running)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(sup.available("steady"), 3, "all have run for 1 s");
    assert_eq!(sup.available("patient"), 0);
    assert_eq!(sup.available("unknown"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_stdin_reaches_the_guest_once_and_its_end_is_eof() {
    let stdio = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/guests/stdio.wasm"
    ))
    .expect("examples/guests/stdio.wasm");
    let sup = supervisor(runtime_config());
    let mut s = spec("cat", stdio.clone());
    s.stdin = true;
    sup.apply(s).await.expect("applied");
    let mut writer = sup.attach_stdin("cat", 0).expect("attach");
    let again = sup
        .attach_stdin("cat", 0)
        .err()
        .expect("one writer at a time");
    assert!(again.contains("attached already"), "{again}");
    assert!(writer.write(b"line one\n").await);
    assert!(writer.write(b"line two\n").await);
    writer.close().await;
    wait_for(&sup, "cat", "EOF to end the guest", all_ended()).await;
    assert_eq!(
        logs(&sup, "cat", 0),
        "out: \u{fffd}\nerr: to stderr\nline one\nline two\n"
    );
    let ended = sup
        .attach_stdin("cat", 0)
        .err()
        .expect("the sandbox has ended");
    assert!(ended.contains("ended"), "{ended}");

    // Without spec.stdin there is nothing to attach to, and the guest reads EOF at once.
    sup.apply(spec("no-stdin", stdio)).await.expect("applied");
    let refused = sup.attach_stdin("no-stdin", 0).err().expect("no stdin");
    assert!(refused.contains("set spec.stdin"), "{refused}");
    wait_for(&sup, "no-stdin", "the guest to end", all_ended()).await;
}
