//! `http`: one wasi:http guest served by Flotilla's node agent (its ingress, a fresh sandbox
//! per request) and by `wasmtime serve` (a fresh instance per request, its default), both as
//! separate processes on loopback, driven in the same run by one load generator, `wrk`, for a
//! bounded duration each. Rounds alternate between the two servers so that drift on the
//! machine affects both alike; the figures are the medians over rounds.

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
}

/// What one `wrk` run measured, and the server's CPU time over it.
#[derive(Clone, Copy, Debug)]
struct Run {
    requests_per_second: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_request: f64,
}

/// Runs the comparison and prints its `RESULT` lines.
pub fn http(args: HttpArgs) -> anyhow::Result<()> {
    machine();
    let guest = match &args.guest {
        Some(guest) => guest.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests/http/hello.wasm"),
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
             {}\n  resources:\n    limits:\n      memory: 4Mi\n",
            guest.display(),
            args.connections
                .clamp(1, flotilla_model::HttpSpec::MAX_MAX_CONCURRENCY),
        ),
    )?;
    let flotilla_addr = free_port()?;
    let (agent, _) = Server::spawn(&[
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
    ])?;
    wait_until_serving(flotilla_addr)?;

    // wasmtime serve, with its defaults (pooling allocator, a fresh instance per request).
    let wasmtime_addr = free_port()?;
    let wasmtime = Server::adopt(
        Command::new(&args.wasmtime)
            .args(["serve", "--addr", &wasmtime_addr.to_string()])
            .arg(&guest)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting wasmtime serve")?,
    );
    wait_until_serving(wasmtime_addr)?;

    let targets = [
        ("flotilla", flotilla_addr, agent.pid()),
        ("wasmtime_serve", wasmtime_addr, wasmtime.pid()),
    ];
    // Warm both up: compiled code, pool slots and page tables.
    for (_, addr, pid) in targets {
        wrk_run(&args, addr, pid, Duration::from_secs(2))?;
    }
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        for (i, (name, addr, pid)) in targets.into_iter().enumerate() {
            let run = wrk_run(&args, addr, pid, *args.duration)?;
            println!(
                "# round {round} {name}: {:.0} req/s, p50 {:.0} us, p99 {:.0} us, {:.1} us of \
                 server CPU per request",
                run.requests_per_second, run.p50_us, run.p99_us, run.cpu_us_per_request
            );
            runs[i].push(run);
        }
    }
    let [flotilla, wasmtime_serve] = runs.map(|r| median(&r));
    for (name, run) in [("flotilla", flotilla), ("wasmtime_serve", wasmtime_serve)] {
        result(
            &format!("http_{name}_throughput"),
            run.requests_per_second,
            "req/s",
        );
        result(&format!("http_{name}_p50"), run.p50_us, "us");
        result(&format!("http_{name}_p99"), run.p99_us, "us");
        result(
            &format!("http_{name}_cpu_per_request"),
            run.cpu_us_per_request,
            "us",
        );
    }
    result(
        "http_throughput_ratio",
        flotilla.requests_per_second / wasmtime_serve.requests_per_second,
        "x",
    );
    result(
        "http_p99_ratio",
        flotilla.p99_us / wasmtime_serve.p99_us,
        "x",
    );
    drop(agent);
    drop(wasmtime);
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

/// One `wrk` run against `addr`, with the CPU time process `pid` used meanwhile.
fn wrk_run(args: &HttpArgs, addr: SocketAddr, pid: u32, duration: Duration) -> anyhow::Result<Run> {
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
        bail!("{addr} answered errors: {}", line.trim());
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
