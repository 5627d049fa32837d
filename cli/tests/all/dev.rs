//! `flotilla dev` as a real process: control plane, store and agent in one, the examples
//! applied and running, then a clean stop on SIGTERM.

use std::path::Path;
use std::process::Command;

use flotilla_tests::Process;

/// `flotilla dev` with every listener on a free loopback port.
fn dev_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    command.arg("dev");
    for flag in [
        "--listen",
        "--agent-listen",
        "--metrics-listen",
        "--http-listen",
    ] {
        command.args([flag, "127.0.0.1:0"]);
    }
    command
}

#[test]
fn dev_runs_the_examples_and_stops_cleanly() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut command = dev_command();
    command.arg("--manifests").arg(&examples);
    let mut dev = Process::spawn(command, "flotilla dev");
    dev.wait_line("wasmworkload.flotilla.dev/idle applied (generation 1)");
    let crash = dev.wait_line("  default.crashloop-");
    assert!(
        crash.contains("last: Trap: wasm trap: integer divide by zero"),
        "{crash}"
    );
    let gc = dev.wait_line("  default.gc-");
    assert!(gc.contains("1 Succeeded"), "{gc}");
    let hello = dev.wait_line("  default.hello-");
    assert!(hello.contains("2 Succeeded"), "{hello}");
    let idle = dev.wait_line("  default.idle-");
    assert!(idle.contains("1000 Running"), "{idle}");
    // Outputs in workload order: gc, hello, hello-c.
    dev.wait_line("summed a GC list of 100000 structs: 5000050000");
    dev.wait_line("hello from flotilla");
    dev.wait_line("Ahoy from C and welcome aboard");
    // One request to each HTTP example through the agent's ingress.
    let echo = dev.wait_line("/echo/info (http-echo)");
    assert!(echo.contains("GET http://127.0.0.1:"), "{echo}");
    let json = dev.wait_line(r#"200 {"method":"GET","path":"/echo/info","requests":1"#);
    assert!(json.ends_with('}'), "{json}");
    let hello = dev.wait_line("/hello/info (http-hello)");
    assert!(hello.contains("GET http://127.0.0.1:"), "{hello}");
    dev.wait_line("200 Hello from Flotilla");
    dev.wait_line("flotilla dev: running");

    dev.signal(libc::SIGTERM);
    let stopped = dev.wait_line("flotilla dev: stopped");
    assert!(
        stopped.contains("stopped 1007 sandboxes (0 aborted)"),
        "{stopped}"
    );
    assert!(dev.wait().success());
}

#[test]
fn a_signal_during_startup_still_stops_cleanly() {
    let mut command = dev_command();
    command.args(["--manifests", "none"]);
    let mut dev = Process::spawn(command, "flotilla dev");
    // As early as the first line: before "running", while the agent may still be starting.
    dev.wait_line("flotilla dev: control plane at");
    dev.signal(libc::SIGTERM);
    dev.wait_line("flotilla dev: stopped");
    assert!(dev.wait().success());
}
