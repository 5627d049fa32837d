//! arm64 for real: the node agent and the CLI cross-built for aarch64 (`.ci/build-arm64`, which
//! this test runs) under qemu-user beside the x86-64 control plane.
//!
//! The aarch64 agent registers as `arm64` and runs what users run: a WASI p1 module in C with
//! args and env (precompiled for aarch64 by the x86-64 agent binary and loaded, not compiled,
//! by the aarch64 one), a trap, a memory limit, a module summing on four threads (atomics and
//! futex waits on aarch64) and a `wasi:http` component (a WASI p2 component) answering through
//! its ingress, placed there by `kubernetes.io/arch`. So the agent's platform
//! assumptions (page size, the signal handling that turns faults into traps, the pooling
//! allocator's reservations, the `vm.max_map_count` arithmetic, Cranelift's aarch64 backend)
//! are checked on aarch64 code, and the aarch64 CLI talks to the control plane too.
//!
//! Under qemu every instruction is emulated, so the agent gets a small pool (64 sandboxes); the
//! README gives pool set-up times natively and under qemu.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use support::{Agent, ControlPlane, apply, condition, flotilla, wait_for};

use crate::support;

/// The directory of the aarch64 binaries, built (or found up to date) by `.ci/build-arm64`.
fn arm64_binaries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/build-arm64");
        let mut command = Command::new("bash");
        command.arg(&script);
        let built = stdout_of(
            command,
            ".ci/build-arm64 (install the cross toolchain with `bash .ci/setup`)",
        );
        PathBuf::from(built.trim())
    })
}

/// What `command` printed, failing the test with its stderr unless it succeeds.
fn stdout_of(mut command: Command, what: &str) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `binary` under qemu-user, with the aarch64 libraries Debian's cross packages install.
fn under_qemu(binary: &str) -> Command {
    let mut command = Command::new("qemu-aarch64");
    command
        .args(["-L", "/usr/aarch64-linux-gnu"])
        .arg(arm64_binaries().join(binary));
    command
}

fn guest(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/guests")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

/// A workload on arm64 nodes, its spec's other fields in `fields` (YAML, two-space indented).
fn on_arm64(name: &str, module: &str, fields: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: {name}\n\
         spec:\n  module:\n    path: {module}\n  nodeSelector:\n    kubernetes.io/arch: arm64\n\
         {fields}"
    )
}

#[test]
fn an_arm64_agent_under_qemu_runs_modules_components_traps_and_limits() {
    // qemu takes a CPU for most of the test; CPU-share measurements wait for it.
    let _cpus = support::cpu_bound_test();
    let dir = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(&dir.path().join("cp"), "127.0.0.1:0");
    let url = control_plane.url();
    // The C module precompiled for aarch64 by the x86-64 agent binary, as a build machine
    // would, into the cache directory the aarch64 agent starts with.
    let cache = dir.path().join("cache");
    let mut precompile = Command::new(flotilla_tests::workspace_binary("flotilla-node-agent"));
    precompile
        .args(["--precompile", &guest("hello-c.wasm")])
        .args([
            "--precompile-for",
            "aarch64-unknown-linux-gnu",
            "--cache-dir",
        ])
        .arg(&cache);
    let written = stdout_of(precompile, "the x86-64 agent's --precompile");
    assert!(written.contains("-aarch64-unknown-linux-gnu-"), "{written}");

    let agent = Agent::start_command(under_qemu("flotilla-node-agent"), &url, "arm-1", |c| {
        c.args(["--max-sandboxes", "64", "--cache-dir"])
            .arg(&cache)
            // The default features, whose engine settings the precompiled module was built
            // with, and threads.
            .args([
                "--wasm-features",
                "gc,exceptions,wide-arithmetic,custom-page-sizes,threads",
            ]);
    });
    agent.process.wait_line("connected to the control plane");

    // The aarch64 CLI, under qemu too, reads the node: arm64, as the agent registered it.
    let mut cli = under_qemu("flotilla");
    cli.args(["--server", &url, "get", "nodes", "arm-1", "-o", "json"]);
    let node: Value =
        serde_json::from_str(&stdout_of(cli, "the aarch64 CLI")).expect("node as JSON");
    assert_eq!(node["labels"]["kubernetes.io/arch"], "arm64", "{node}");
    assert_eq!(node["ready"], true, "{node}");

    // A WASI p1 module in C: args, env and its output.
    let manifest = dir.path().join("manifest.yaml");
    apply(
        &url,
        &manifest,
        &on_arm64(
            "hello-c",
            &guest("hello-c.wasm"),
            "  args: [on, arm64]\n  env: [{name: GREETING, value: Ahoy}]\n  restartPolicy: Never\n",
        ),
        false,
    );
    // Loaded, not compiled: the aarch64 agent runs what x86-64 compiled for it.
    let loaded = agent.process.wait_line("artifact loaded from the cache");
    assert!(loaded.contains("-aarch64-unknown-linux-gnu-"), "{loaded}");
    wait_for(&url, "hello-c", "hello-c completed on arm64", |o| {
        o["status"]["succeededReplicas"] == 1
    });
    let logs = flotilla(&["--server", &url, "logs", "hello-c"]);
    assert_eq!(logs, "Ahoy from C on arm64\n");

    // A trap: a signal on aarch64 that the agent reports as the guest's trap.
    apply(
        &url,
        &manifest,
        &on_arm64(
            "crash",
            &guest("crash.wasm"),
            "  restartPolicy: Never\n  resources: {limits: {memory: 1Mi}}\n",
        ),
        false,
    );
    let crashed = wait_for(&url, "crash", "the trap reported", |o| {
        condition(o, "Ready")["reason"] == "Trap"
    });
    let message = condition(&crashed, "Ready")["message"].to_string();
    assert!(message.contains("integer divide by zero"), "{message}");

    // A memory limit: growth past 1 MiB is refused and reported as such.
    let membomb = wat::parse_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../node-agent/tests/fixtures/membomb.wat"),
    )
    .expect("membomb.wat");
    let membomb_path = dir.path().join("membomb.wasm");
    std::fs::write(&membomb_path, membomb).expect("write membomb.wasm");
    apply(
        &url,
        &manifest,
        &on_arm64(
            "membomb",
            &membomb_path.to_string_lossy(),
            "  restartPolicy: Never\n  resources: {limits: {memory: 1Mi, cpuTime: 5s}}\n",
        ),
        false,
    );
    wait_for(&url, "membomb", "the memory limit reported", |o| {
        condition(o, "Ready")["reason"] == "OutOfMemory"
    });

    // Threads: four OS threads over one shared memory, atomics and waits on aarch64.
    apply(
        &url,
        &manifest,
        &on_arm64(
            "threads",
            &guest("threads.wasm"),
            "  restartPolicy: Never\n  wasm: {features: [threads]}\n",
        ),
        false,
    );
    wait_for(
        &url,
        "threads",
        "the threads guest completed on arm64",
        |o| o["status"]["succeededReplicas"] == 1,
    );
    let logs = flotilla(&["--server", &url, "logs", "threads"]);
    assert_eq!(logs, "summed 1..4000000 on 4 threads: 8000002000000\n");

    // A wasi:http component, a fresh sandbox per request, through the aarch64 ingress.
    apply(
        &url,
        &manifest,
        &on_arm64(
            "echo",
            &guest("http/echo.wasm"),
            "  http: {pathPrefix: /echo, maxConcurrency: 4}\n  resources: {limits: {memory: 8Mi}}\n",
        ),
        false,
    );
    wait_for(&url, "echo", "the HTTP replica ready", |o| {
        support::ready(o) == 1
    });
    for request in 1..=3 {
        let response = support::block_on(flotilla_tests::http::get(agent.ingress, "/echo/info"))
            .expect("GET /echo/info");
        assert_eq!(
            response.status,
            200,
            "request {request}: {}",
            response.text()
        );
        assert!(
            response.text().contains("\"path\":\"/echo/info\""),
            "{}",
            response.text()
        );
    }
}
