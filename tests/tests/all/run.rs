//! `flotilla run`: a module once, its output on the CLI's stdout and stderr byte for byte, its
//! exit code as the CLI's, WebAssembly features it enables; and `flotilla logs` choosing a stream, a tail and timestamps.

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

    // A GC guest runs with --wasm-feature gc, and is refused at apply without it, with the
    // field to set.
    let gc = guest("gc.wasm");
    let out = run(
        &url,
        &["job-gc", "--module", &gc, "--rm", "--wasm-feature", "gc"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "summed a GC list of 100000 structs: 5000050000\n"
    );
    let out = run(&url, &["job-no-gc", "--module", &gc, "--rm"]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("add `gc` to spec.wasm.features"),
        "{stderr}"
    );
}

/// `flotilla --server URL run ARGS...` with `input` on its stdin.
fn run_with_input(url: &str, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(workspace_binary("flotilla"))
        .args(["--server", url, "run"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("flotilla run starts");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // A writer of its own: the guest's output must be read while the input is still going in.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("flotilla run ends");
    writer.join().expect("writer");
    out
}

#[test]
fn run_dash_i_feeds_our_stdin_to_the_guest_and_ctrl_c_cleans_up() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let _agent = Agent::start_connected(&url, "runner");
    let stdio = guest("stdio.wasm");

    // 1 MiB through a 64 KiB pipe: the guest's slow reading holds the CLI back, nothing is lost,
    // and our EOF is the guest's.
    let input: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let out = run_with_input(
        &url,
        &[
            "cat", "--module", &stdio, "-i", "--rm", "--limits", "logs=4Mi",
        ],
        &input,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = [&b"out: \xff\n"[..], &input].concat();
    assert!(out.stdout == expected, "{} bytes back", out.stdout.len());

    // A guest that never reads its stdin may end before we attach: not worth a word.
    let hello = guest("hello.wasm");
    let out = run_with_input(
        &url,
        &["quick", "--module", &hello, "-i", "--rm"],
        b"unread",
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"hello from flotilla\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");

    // Without -i the guest's stdin is empty: it ends at once, whatever we have.
    let out = run_with_input(&url, &["no-stdin", "--module", &stdio, "--rm"], b"ignored");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"out: \xff\n");

    // Ctrl-C while the guest waits on its stdin: 130, and --rm deletes the workload.
    let child = Command::new(workspace_binary("flotilla"))
        .args([
            "--server", &url, "run", "waiting", "--module", &stdio, "-i", "--rm",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("flotilla run starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, json, _) = try_flotilla(&[
            "--server",
            &url,
            "get",
            "workloads",
            "waiting",
            "-o",
            "json",
        ]);
        let running = serde_json::from_str(&json).is_ok_and(|o| support::ready(&o) == 1);
        if running {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the guest never ran");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = i32::try_from(child.id()).expect("pid");
    let killed = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = child.wait_with_output().expect("flotilla run ends");
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let (ok, _, stderr) = try_flotilla(&["--server", &url, "get", "workloads", "waiting"]);
    assert!(!ok && stderr.contains("not found"), "{stderr}");
}
