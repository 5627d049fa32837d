//! Support for Flotilla's process-level tests: start a real binary, read its log, signal it.
//!
//! The cross-component tests under `tests/tests/all/` and the crates' own process tests share it.

pub mod apiserver;
pub mod guests;
pub mod http;
pub mod privileges;
pub mod registry;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Serves every request on `listener` with `handle` (the fake servers' one route), until the
/// returned task is aborted.
fn serve<F, Fut>(listener: tokio::net::TcpListener, handle: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(axum::http::Request<axum::body::Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = axum::http::Response<axum::body::Body>> + Send + 'static,
{
    let app = axum::Router::new().fallback(handle);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// How long a test waits for a log line before it fails.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(60);

/// A binary started for a test; killed and reaped when dropped.
pub struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Starts `command` with stdout and stderr captured as one stream of lines (and echoed,
    /// prefixed by `name`, for failed tests) and `FLOTILLA_LOG=info`, without colours.
    ///
    /// # Panics
    /// If the binary cannot be started.
    pub fn spawn(mut command: Command, name: &'static str) -> Self {
        let mut child = command
            .env("FLOTILLA_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        forward(stdout, name, tx.clone());
        forward(stderr, name, tx);
        Self { child, lines }
    }

    /// Waits for a log line containing `needle` and returns it.
    ///
    /// # Panics
    /// If no such line arrives within [`LOG_TIMEOUT`] or the process closes its log.
    pub fn wait_line(&self, needle: &str) -> String {
        // One deadline for the whole wait: a process that keeps logging other lines (a retry
        // loop, say) must not hold the test forever.
        let deadline = std::time::Instant::now() + LOG_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("never logged {needle:?} within {LOG_TIMEOUT:?}: {e}"),
            }
        }
    }

    /// Every line logged and not yet read, without waiting.
    pub fn lines_so_far(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    ///
    /// # Panics
    /// If the signal cannot be sent.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits in i32");
        assert_eq!(kill(pid, signal), 0, "kill({pid}, {signal})");
    }

    /// Waits for the process to exit.
    ///
    /// # Panics
    /// If waiting fails.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("process exits")
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Reap the child if a test failed before stopping it; errors mean it is gone already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary of this workspace, built beside the running test (`cargo test --workspace` builds
/// every package's binaries because each has process tests).
///
/// # Panics
/// If the binary is missing.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo test --workspace` does)",
        path.display()
    );
    path
}

/// The socket address logged as `key=ADDR` in `line` (tracing's plain format).
///
/// # Panics
/// If the line has no such field.
pub fn logged_addr(line: &str, key: &str) -> SocketAddr {
    // A whole field name: `addr` must not match inside `metrics_addr`.
    let needle = format!(" {key}=");
    let start = line
        .find(&needle)
        .unwrap_or_else(|| panic!("{key} in {line:?}"))
        + needle.len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {line:?}: {e}"))
}

/// Sends each line of `stream` to `tx` (without colour codes) and echoes it for test output.
fn forward(
    stream: impl std::io::Read + Send + 'static,
    name: &'static str,
    tx: mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[{name}] {line}");
            if tx.send(strip_ansi(&line)).is_err() {
                break;
            }
        }
    });
}

#[allow(unsafe_code)]
fn kill(pid: i32, signal: i32) -> i32 {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_logged_addresses_and_strips_colours() {
        let line = strip_ansi(
            "\u{1b}[2mINFO\u{1b}[0m serving admin_addr=127.0.0.1:7070 metrics_addr=[::1]:9090",
        );
        assert_eq!(
            logged_addr(&line, "admin_addr"),
            "127.0.0.1:7070".parse().expect("addr")
        );
        assert_eq!(
            logged_addr(&line, "metrics_addr"),
            "[::1]:9090".parse().expect("addr")
        );
    }
}
