//! `flotilla run`: a module once, its output on the CLI's stdout and stderr byte for byte, its
//! exit code as the CLI's; and `flotilla logs` choosing a stream, a tail and timestamps.

use std::process::{Command, Output};

use crate::support::{self, Agent, ControlPlane, try_flotilla};
use flotilla_tests::workspace_binary;

fn guest(name: &str) -> String {
    support::example(&format!("guests/{name}"))
}

/// `flotilla --server URL run ARGS...`: its output, with bytes as they came.
fn run(url: &str, args: &[&str]) -> Output {
    Command::new(workspace_binary("flotilla"))
        .args(["--server", url, "run"])
        .args(args)
        .output()
        .expect("flotilla run runs")
}

#[test]
fn run_copies_each_stream_and_exits_with_the_guests_code() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let _agent = Agent::start_connected(&url, "runner");
    let stdio = guest("stdio.wasm");

    // Exit code 0; stdout and stderr apart, byte for byte (0xff is not UTF-8).
    let out = run(
        &url,
        &["job-ok", "--module", &stdio, "--rm", "--", "a", "b c"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, b"out: a b c \xff\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err: to stderr\n");
    // --rm deleted it.
    let (ok, _, stderr) = try_flotilla(&["--server", &url, "get", "workloads", "job-ok"]);
    assert!(!ok && stderr.contains("not found"), "{stderr}");

    // The guest's exit code is ours; without --rm the workload stays, with its logs.
    let out = run(&url, &["job-3", "--module", &stdio, "--env", "EXIT_CODE=3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(out.stdout, b"out: \xff\n");
    let (ok, stdout, _) = try_flotilla(&["--server", &url, "logs", "job-3", "--stream", "stderr"]);
    assert!(ok);
    assert_eq!(stdout, "err: to stderr\n");
    let (_, stdout, _) = try_flotilla(&["--server", &url, "logs", "job-3", "--tail", "1"]);
    assert_eq!(stdout, "err: to stderr\n", "the last line of both streams");
    let (_, stdout, _) = try_flotilla(&[
        "--server",
        &url,
        "logs",
        "job-3",
        "--stream",
        "stdout",
        "--timestamps",
    ]);
    let (stamp, line) = stdout.split_once(' ').expect("a timestamp, then the line");
    assert!(
        stamp.len() == 30 && stamp.ends_with('Z') && stamp.contains('T'),
        "{stdout:?}"
    );
    assert_eq!(line, "out: \u{fffd}\n");
    let (_, stdout, _) = try_flotilla(&["--server", &url, "logs", "job-3", "--since", "1h"]);
    assert_eq!(stdout.lines().count(), 2, "{stdout:?}");

    // Running it again under the same name is refused; nothing else changes.
    let out = run(&url, &["job-3", "--module", &stdio]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    // A trap: 134 and the reason on stderr.
    let out = run(
        &url,
        &["job-trap", "--module", &guest("crash.wasm"), "--rm"],
    );
    assert_eq!(out.status.code(), Some(134), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("job-trap ended: Trap:"), "{stderr}");

    // A module that is not wasm never gets a workload.
    let bad = data.path().join("bad.wasm");
    std::fs::write(&bad, b"not wasm").expect("write");
    let out = run(
        &url,
        &["job-bad", "--module", bad.to_str().expect("utf-8"), "--rm"],
    );
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let (ok, _, _) = try_flotilla(&["--server", &url, "get", "workloads", "job-bad"]);
    assert!(!ok, "no workload for a module that was refused");
}
