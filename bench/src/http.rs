//! `http`: one wasi:http guest served by Flotilla's node agent (its ingress, a fresh sandbox
//! per request) and by `wasmtime serve` twice (a fresh instance per request, as it always
//! serves): once with its defaults and once tuned as a skilled user would tune it
//! ([`TUNED_SERVE_OPTIONS`], mimalloc preloaded where installed). All three are separate
//! processes on loopback, driven in the same run by one load generator, `wrk`, for a bounded
//! duration each. Rounds alternate between the servers so that drift on the machine affects
//! each alike; the figures are the medians over rounds. The targets are against the tuned
//! server. Any socket error or timeout that `wrk` counts, on any side, makes the run invalid:
//! timed-out requests would otherwise drop out of the percentiles.
//!
//! `http-p3` is the same with a WASI 0.3 handler (`examples/guests/p3-http.wasm`,
//! `wasi:http/handler@0.3.0`): the agent offers `component-model-async` and the workload
//! enables it; both `wasm serve`s get `-Scli` (the guest's Rust `std` imports WASI 0.2's CLI
//! interfaces, which the agent links for every component) and `--max-instance-reuse-count 1`,
//! a fresh instance per request as the agent does: for WASI 0.3 `wasmtime serve` would
//! otherwise reuse an instance for up to 128 requests, so one request would see another's
//! state. Its metrics are `http_p3_*`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::Server;
use crate::{machine, result};

/// `http` options.
#[derive(clap::Args, Clone, Debug)]
pub struct HttpArgs {
    /// The `wasmtime` CLI to compare with (the version Flotilla embeds: 48.0.x).
    #[arg(long, env = "WASMTIME", default_value = "wasmtime")]
    wasmtime: PathBuf,
    /// The guest component (default: examples/guests/http/hello.wasm).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Open connections of the load generator.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Threads of the load generator.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Measured time per round and server.
    #[arg(long, default_value = "10s")]
    duration: humantime::Duration,
    /// Rounds per server.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// mimalloc to preload into the tuned `wasmtime serve` (default: the first of
    /// [`MIMALLOC_PATHS`] that exists; none found, it runs with glibc's malloc and says so).
    #[arg(long)]
    mimalloc: Option<PathBuf>,
}

/// What the tuned `wasmtime serve` sets, each what the agent does for the same work:
/// - keep the first 1 MiB of each linear memory and 64 KiB of each table resident between
///   instances and reset it in place, instead of an madvise per request (the agent's
///   `--memory-keep-resident` default and its table setting);
/// - reset memories with the `PAGEMAP_SCAN` ioctl where the kernel has it (the agent's
///   `pagemap_scan(Auto)`), so only dirtied pages are touched.
///
/// The rest of `wasmtime serve`'s defaults already match a fresh-instance-per-request server:
/// the pooling allocator, copy-on-write memory images, warm slots reused.
pub const TUNED_SERVE_OPTIONS: [&str; 6] = [
    "-O",
    "pooling-memory-keep-resident=1048576",
    "-O",
    "pooling-table-keep-resident=65536",
    "-O",
    "pooling-pagemap-scan=auto",
];

/// Where Debian's `libmimalloc2.0` puts mimalloc, the allocator the agent links.
pub const MIMALLOC_PATHS: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libmimalloc.so.2",
];

/// What one `wrk` run measured, and the server's CPU time over it.
#[derive(Clone, Copy, Debug)]
struct Run {
    requests_per_second: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_request: f64,
}

/// Which `wasi:http` a run serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wasi {
    /// WASI 0.2's `incoming-handler` (`http`).
    P2,
    /// WASI 0.3's `handler` (`http-p3`).
    P3,
}

/// Runs the comparison and prints its `RESULT` lines.
pub fn http(args: HttpArgs, wasi: Wasi) -> anyhow::Result<()> {
    machine();
    let (default_guest, prefix, manifest_features, agent_features, serve_options) = match wasi {
        Wasi::P2 => ("http/hello.wasm", "http", "", None, &[][..]),
        Wasi::P3 => (
            "p3-http.wasm",
            "http_p3",
            "  wasm:\n    features: [component-model-async]\n",
            Some("gc,exceptions,wide-arithmetic,custom-page-sizes,component-model-async"),
            &["-Scli", "--max-instance-reuse-count", "1"][..],
        ),
    };
    let guest = match &args.guest {
        Some(guest) => guest.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/guests")
            .join(default_guest),
    };
    let guest = guest
        .canonicalize()
        .with_context(|| format!("guest {}", guest.display()))?;
    let wrk = Command::new("wrk").arg("--version").output();
    if wrk.is_err() {
        bail!("wrk is not installed (apt-get install wrk)");
    }
    let version = Command::new(&args.wasmtime)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "running {} (cargo install wasmtime-cli --version =48.0.8 --locked, or pass \
                 --wasmtime)",
                args.wasmtime.display()
            )
        })?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    println!(
        "# guest: {} ({} bytes)",
        guest.display(),
        std::fs::metadata(&guest)?.len()
    );
    println!("# compared with: {version}");
    println!(
        "# load: wrk -t{} -c{} -d{}, {} rounds per server",
        args.threads, args.connections, args.duration, args.rounds
    );

    // Flotilla: the node agent in its own process, the guest from a static manifest. The
    // replica serves as many requests at once as the load generator has connections, so no
    // request is turned away (wasmtime serve sets no such limit).
    let manifests = tempfile::tempdir()?;
    std::fs::write(
        manifests.path().join("hello.yaml"),
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: hello\n\
             spec:\n  module:\n    path: {}\n  http:\n    pathPrefix: /\n    maxConcurrency: \
             {}\n  resources:\n    limits:\n      memory: 4Mi\n{manifest_features}",
            guest.display(),
            args.connections
                .clamp(1, flotilla_model::HttpSpec::MAX_MAX_CONCURRENCY),
        ),
    )?;
    let flotilla_addr = free_port()?;
    let features = agent_features
        .map(|features| vec!["--wasm-features".to_string(), features.into()])
        .unwrap_or_default();
    let (agent, _) = Server::spawn(
        &[
            &[
                "serve-agent".into(),
                "--".into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
                "--http-listen".into(),
                flotilla_addr.to_string(),
                "--manifests".into(),
                manifests.path().to_string_lossy().into_owned(),
                "--no-cache".into(),
            ][..],
            &features,
        ]
        .concat(),
    )?;
    wait_until_serving(flotilla_addr)?;

    // wasmtime serve, with its defaults (pooling allocator, a fresh instance per request), and
    // tuned.
    let serve =
        |options: &[&str], preload: Option<&Path>| -> anyhow::Result<(Server, SocketAddr)> {
            let addr = free_port()?;
            let mut command = Command::new(&args.wasmtime);
            command
                .arg("serve")
                .args(serve_options)
                .args(options)
                .args(["--addr", &addr.to_string()])
                .arg(&guest)
                // As the agent runs (see `Server::spawn`).
                .env_remove("RUST_BACKTRACE")
                .env_remove("RUST_LIB_BACKTRACE")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(preload) = preload {
                command.env("LD_PRELOAD", preload);
            }
            let server = Server::adopt(command.spawn().context("starting wasmtime serve")?);
            wait_until_serving(addr)?;
            Ok((server, addr))
        };
    let mimalloc = match &args.mimalloc {
        Some(path) if path.exists() => Some(path.clone()),
        Some(path) => bail!("--mimalloc {} does not exist", path.display()),
        None => MIMALLOC_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|path| path.exists()),
    };
    println!(
        "# tuned wasmtime serve: {}, allocator {}",
        TUNED_SERVE_OPTIONS.join(" "),
        match &mimalloc {
            Some(path) => format!("mimalloc (LD_PRELOAD={})", path.display()),
            None => "glibc malloc (no mimalloc found: apt-get install libmimalloc2.0)".into(),
        }
    );
    let (wasmtime, wasmtime_addr) = serve(&[], None)?;
    let (tuned, tuned_addr) = serve(&TUNED_SERVE_OPTIONS, mimalloc.as_deref())?;

    let targets = [
        ("flotilla", flotilla_addr, agent.pid()),
        ("wasmtime_serve", wasmtime_addr, wasmtime.pid()),
        ("wasmtime_serve_tuned", tuned_addr, tuned.pid()),
    ];
    // Warm each up: compiled code, pool slots and page tables.
    for (name, addr, pid) in targets {
        wrk_run(&args, name, addr, pid, Duration::from_secs(2))?;
    }
    let mut runs: [Vec<Run>; 3] = Default::default();
    for round in 0..args.rounds {
        for (i, (name, addr, pid)) in targets.into_iter().enumerate() {
            let run = wrk_run(&args, name, addr, pid, *args.duration)?;
            println!(
                "# round {round} {name}: {:.0} req/s, p50 {:.0} us, p99 {:.0} us, {:.1} us of \
                 server CPU per request",
                run.requests_per_second, run.p50_us, run.p99_us, run.cpu_us_per_request
            );
            runs[i].push(run);
        }
    }
    let [flotilla, defaults, tuned_run] = runs.map(|r| median(&r));
    for (name, run) in [
        ("flotilla", flotilla),
        ("wasmtime_serve", defaults),
        ("wasmtime_serve_tuned", tuned_run),
    ] {
        result(
            &format!("{prefix}_{name}_throughput"),
            run.requests_per_second,
            "req/s",
        );
        result(&format!("{prefix}_{name}_p50"), run.p50_us, "us");
        result(&format!("{prefix}_{name}_p99"), run.p99_us, "us");
        result(
            &format!("{prefix}_{name}_cpu_per_request"),
            run.cpu_us_per_request,
            "us",
        );
    }
    // The targets are against the tuned server; the ratios to its defaults follow.
    result(
        &format!("{prefix}_throughput_ratio"),
        flotilla.requests_per_second / tuned_run.requests_per_second,
        "x",
    );
    result(
        &format!("{prefix}_p99_ratio"),
        flotilla.p99_us / tuned_run.p99_us,
        "x",
    );
    result(
        &format!("{prefix}_throughput_ratio_to_defaults"),
        flotilla.requests_per_second / defaults.requests_per_second,
        "x",
    );
    result(
        &format!("{prefix}_p99_ratio_to_defaults"),
        flotilla.p99_us / defaults.p99_us,
        "x",
    );
    drop(agent);
    drop(wasmtime);
    drop(tuned);
    Ok(())
}

/// An unused loopback port (closed again before the server binds it).
pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Waits (bounded) until `GET /` on `addr` answers 200.
pub(crate) fn wait_until_serving(addr: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answered = (|| -> std::io::Result<bool> {
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"))
        })();
        if answered.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} did not answer 200 within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One `wrk` run against `name` at `addr`, with the CPU time process `pid` used meanwhile.
/// Errors when `wrk` counted any socket error or timeout, or any response was not 2xx/3xx.
fn wrk_run(
    args: &HttpArgs,
    name: &str,
    addr: SocketAddr,
    pid: u32,
    duration: Duration,
) -> anyhow::Result<Run> {
    let cpu_before = cpu_time(pid)?;
    let output = Command::new("wrk")
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--latency")
        .arg(format!("http://{addr}/"))
        .output()
        .context("running wrk")?;
    let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses"))
    {
        bail!(
            "invalid run: {name} ({addr}) answered errors: {}",
            line.trim()
        );
    }
    if let Some(errors) = socket_errors(&text) {
        bail!(
            "invalid run: wrk counted socket errors against {name} ({addr}): {errors} \
             (timed-out requests would drop out of the percentiles)"
        );
    }
    let requests_per_second = field(&text, "Requests/sec:")?;
    let total_requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .context("no request count in wrk's output")?;
    Ok(Run {
        requests_per_second,
        p50_us: latency(&text, "50%")?,
        p99_us: latency(&text, "99%")?,
        cpu_us_per_request: cpu.as_secs_f64() * 1e6 / total_requests.max(1.0),
    })
}

/// wrk's `Socket errors:` line when it counts any error (it prints the line only then).
fn socket_errors(text: &str) -> Option<String> {
    let counts = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))?
        .trim();
    // "connect 0, read 12, write 0, timeout 3": any count that is not 0, or a line in another
    // form, is an error.
    let all_zero = counts.split(',').all(|count| {
        count
            .split_whitespace()
            .nth(1)
            .is_some_and(|n| n.parse::<u64>() == Ok(0))
    });
    (!all_zero).then(|| counts.to_string())
}

/// The number after `label` on its line of wrk's output.
fn field(text: &str, label: &str) -> anyhow::Result<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {label} in wrk's output:\n{text}"))
}

/// A latency percentile from wrk's `--latency` distribution, in microseconds.
fn latency(text: &str, percentile: &str) -> anyhow::Result<f64> {
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(percentile))
        .map(str::trim)
        .with_context(|| format!("no {percentile} latency in wrk's output:\n{text}"))?;
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .context("latency without unit")?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse()?;
    Ok(match unit {
        "us" => number,
        "ms" => number * 1e3,
        "s" => number * 1e6,
        _ => bail!("unknown latency unit {unit:?}"),
    })
}

/// User plus system CPU time of process `pid`, from /proc.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        |i: usize| -> anyhow::Result<u64> { Ok(fields.get(i).context("short stat")?.parse()?) };
    // Fields are numbered from 3 after the name: utime is index 11, stime 12.
    let total = ticks(11)? + ticks(12)?;
    let per_second = rustix::param::clock_ticks_per_second();
    Ok(Duration::from_secs_f64(total as f64 / per_second as f64))
}

/// The run with the median throughput (its latencies and CPU with it).
fn median(runs: &[Run]) -> Run {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.requests_per_second.total_cmp(&b.requests_per_second));
    sorted[sorted.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_socket_error_or_timeout_makes_a_run_invalid() {
        let clean =
            "  Latency   1.00ms\n  1000 requests in 1.00s, 100.00KB read\nRequests/sec: 1000.00\n";
        assert_eq!(socket_errors(clean), None);
        let zeros = "  Socket errors: connect 0, read 0, write 0, timeout 0\n";
        assert_eq!(socket_errors(zeros), None);
        let timeouts =
            "  1000 requests in 1.00s\n  Socket errors: connect 0, read 0, write 0, timeout 7\n";
        assert_eq!(
            socket_errors(timeouts).as_deref(),
            Some("connect 0, read 0, write 0, timeout 7")
        );
        let reads = "  Socket errors: connect 0, read 12, write 0, timeout 0\n";
        assert!(socket_errors(reads).is_some());
        assert!(socket_errors("  Socket errors: garbled\n").is_some());
    }

    #[test]
    fn latencies_are_read_in_microseconds() {
        let text = "  Latency Distribution\n     50%  812.00us\n     99%    3.25ms\n";
        assert_eq!(latency(text, "50%").ok(), Some(812.0));
        assert_eq!(latency(text, "99%").ok(), Some(3250.0));
        assert!(latency(text, "90%").is_err());
    }
}
