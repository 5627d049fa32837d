//! Flotilla's benchmarks. Each scenario runs Flotilla (through the node agent's supervisor) and
//! bare wasmtime (same engine configuration, a fresh WASI context per instance, a cached
//! `InstancePre`, nothing around it) and prints `RESULT <metric> <value> <unit>` lines, including
//! Flotilla's figure as a ratio to bare wasmtime.
//!
//! Memory is measured in a fresh child process per variant so that one variant's freed heap does
//! not flatter the other.
//!
//! ```text
//! cargo run --release -p flotilla-bench -- density --sandboxes 100000
//! cargo run --release -p flotilla-bench -- startup --sandboxes 100000
//! cargo run --release -p flotilla-bench -- churn --runs 100000
//! cargo run --release -p flotilla-bench -- scheduler --nodes 1000 --replicas 100000
//! cargo run --release -p flotilla-bench -- e2e --agents 10 --replicas 10000
//! cargo run --release -p flotilla-bench -- fleet --agents 1000 --per-agent 100
//! cargo run --release -p flotilla-bench -- http --wasmtime /path/to/wasmtime-48
//! cargo run --release -p flotilla-bench -- isolation
//! cargo run --release -p flotilla-bench -- features --sandboxes 10000
//! # save a run for the README, then regenerate its tables:
//! cargo run --release -p flotilla-bench -- record -- density --sandboxes 100000
//! cargo run --release -p flotilla-bench -- report
//! ```

mod cluster;
mod http;
mod isolation;
mod report;
mod rollout;
mod threads;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use flotilla_node_agent::metrics::Metrics;
use flotilla_node_agent::runtime::{RuntimeConfig, WasmtimeRuntime, capacity};
use flotilla_node_agent::supervisor::{Supervisor, SupervisorConfig};
use flotilla_proto::agent::v1::{
    ModuleSource, RestartPolicy, SandboxPhase, WorkloadSpec, module_source,
};
use wasmtime::{InstancePre, Linker, Module, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

// The agent binary's allocator, so both variants run as the agent would.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An idle guest: sleeps an hour in `poll_oneoff`.
const IDLE_GUEST: &str = include_str!("../../node-agent/tests/fixtures/sleep.wat");
/// A guest that returns from `_start` at once.
const EXIT_GUEST: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;
/// An idle guest with a GC heap (`spec.wasm.features: [gc]`).
const GC_IDLE_GUEST: &str = include_str!("../guests/gc_idle.wat");
/// A guest that allocates 2,000,000 GC structs and keeps 1,024 alive.
const GC_HEAVY_GUEST: &str = include_str!("../guests/gc_heavy.wat");
/// A guest that sums 1..4,000,000 on four threads (`spec.wasm.features: [threads]`).
const THREADS_GUEST: &str = include_str!("../../examples/guests/threads.wat");

#[derive(Parser)]
#[command(about = "Flotilla benchmarks; results are printed as `RESULT <metric> <value> <unit>`")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// HTTP requests through the agent's ingress (a fresh sandbox each) against
    /// `wasmtime serve`: throughput, latency, server CPU per request.
    Http(http::HttpArgs),
    /// `http` with a WASI 0.3 handler (`wasi:http/handler@0.3.0`, component-model-async).
    #[command(name = "http-p3")]
    HttpP3(http::HttpArgs),
    /// Live idle sandboxes: RSS per sandbox, host overhead, time to start them all.
    Density {
        /// Idle sandboxes to start.
        #[arg(long, default_value_t = 100_000)]
        sandboxes: u32,
    },
    /// Start latency (p50/p99) and starts per second for a cached module.
    Startup {
        /// Sandboxes to start.
        #[arg(long, default_value_t = 100_000)]
        sandboxes: u32,
    },
    /// Short-lived sandboxes run to exit per second, against spawning `/bin/true`.
    Churn {
        /// Sandbox runs per variant.
        #[arg(long, default_value_t = 100_000)]
        runs: u32,
        /// `/bin/true` processes to spawn.
        #[arg(long, default_value_t = 2_000)]
        processes: u32,
    },
    /// Placements per second: simulated nodes, workloads of mixed sizes, in-process.
    Scheduler {
        /// Simulated nodes (10% arm64, 5% tainted).
        #[arg(long, default_value_t = 1_000)]
        nodes: u32,
        /// Replicas in all, over workloads of 1 to 5,000 replicas.
        #[arg(long, default_value_t = 100_000)]
        replicas: u64,
    },
    /// Apply → replicas running across agent processes, timed until the status says so.
    E2e {
        /// Agent processes.
        #[arg(long, default_value_t = 10)]
        agents: u32,
        /// Replicas of one workload.
        #[arg(long, default_value_t = 10_000)]
        replicas: u64,
    },
    /// A rolling update across agent processes: time until every replica runs the new
    /// revision, and the lowest ready fraction on the way.
    Rollout {
        /// Agent processes.
        #[arg(long, default_value_t = 10)]
        agents: u32,
        /// Replicas of the workload.
        #[arg(long, default_value_t = 10_000)]
        replicas: u64,
        /// `strategy.rollingUpdate.maxSurge`.
        #[arg(long, default_value = "25%")]
        max_surge: String,
        /// `strategy.rollingUpdate.maxUnavailable`.
        #[arg(long, default_value = "25%")]
        max_unavailable: String,
    },
    /// Control-plane RSS and CPU with many simulated agents (real gRPC streams, one process).
    Fleet {
        /// Simulated agents.
        #[arg(long, default_value_t = 1_000)]
        agents: u32,
        /// Replicas each agent holds.
        #[arg(long, default_value_t = 100)]
        per_agent: u64,
        /// Seconds of steady state over which CPU is measured.
        #[arg(long, default_value_t = 10)]
        steady_seconds: u64,
    },
    /// What a WebAssembly feature costs (`spec.wasm.features`): start latency and RSS of idle
    /// GC sandboxes against plain ones, a GC-heavy guest's run time, and the start latency and
    /// run time of a guest summing on four threads, each against bare wasmtime with the same
    /// engine.
    Features {
        /// Idle sandboxes started per variant.
        #[arg(long, default_value_t = 10_000)]
        sandboxes: u32,
        /// GC-heavy runs at once per variant.
        #[arg(long, default_value_t = 8)]
        runs: u32,
        /// Runs of the threads guest at once per variant.
        #[arg(long, default_value_t = 100)]
        thread_runs: u32,
    },
    /// Tenant isolation on one agent: neighbour start latency while a 100,000-function module
    /// compiles and beside spinning guests, and the agent's heartbeats meanwhile.
    Isolation {
        /// Guests that spin without end beside the neighbours.
        #[arg(long, default_value_t = 1_000)]
        spinners: u64,
        /// Workloads another tenant applies at once, and deletes at once, again and again,
        /// beside the neighbours.
        #[arg(long, default_value_t = 200)]
        burst: usize,
    },
    /// Runs one scenario (its name and flags after `--`) and saves its output, headed by the
    /// command, commit, date and machine, as DIR/SCENARIO.txt for `report`.
    Record {
        /// Where saved runs go.
        #[arg(long, default_value = "bench/results")]
        dir: std::path::PathBuf,
        /// The scenario and its flags.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Writes the README's benchmark tables from the saved runs.
    Report {
        /// The saved runs.
        #[arg(long, default_value = "bench/results")]
        dir: std::path::PathBuf,
        /// The README to update.
        #[arg(long, default_value = "README.md")]
        readme: std::path::PathBuf,
        /// Change nothing; fail if the README's tables differ from the saved runs.
        #[arg(long)]
        check: bool,
    },
    /// Runs a control plane as `flotilla-control-plane` does (used by the scenarios above).
    #[command(hide = true)]
    ServeControlPlane {
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
    /// Runs a node agent as `flotilla-node-agent` does, with its flags after `--`.
    #[command(hide = true)]
    ServeAgent {
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// One measurement in this process (used by the scenarios above).
    #[command(hide = true)]
    Child {
        #[arg(long)]
        variant: Variant,
        #[arg(long)]
        guest: Guest,
        #[arg(long)]
        count: u32,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Variant {
    Flotilla,
    Bare,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Guest {
    Idle,
    Exit,
    GcIdle,
    GcHeavy,
    Threads,
}

impl Guest {
    fn wat(self) -> &'static str {
        match self {
            Guest::Idle => IDLE_GUEST,
            Guest::Exit => EXIT_GUEST,
            Guest::GcIdle => GC_IDLE_GUEST,
            Guest::GcHeavy => GC_HEAVY_GUEST,
            Guest::Threads => THREADS_GUEST,
        }
    }

    /// Whether a sandbox counts as done once running (it sleeps) rather than once it ended.
    fn is_idle(self) -> bool {
        matches!(self, Guest::Idle | Guest::GcIdle)
    }

    /// `spec.wasm.features` of its workload.
    fn features(self) -> Vec<String> {
        match self {
            Guest::Idle | Guest::Exit => vec![],
            Guest::GcIdle | Guest::GcHeavy => vec!["gc".into()],
            Guest::Threads => vec!["threads".into()],
        }
    }
}

/// What one child measurement reports.
#[derive(Debug, Default)]
struct Measurement {
    count: f64,
    elapsed_s: f64,
    rss_delta_bytes: f64,
    p50_ns: f64,
    p99_ns: f64,
}

fn main() -> anyhow::Result<()> {
    match Args::parse().scenario {
        Scenario::Density { sandboxes } => density(sandboxes),
        Scenario::Startup { sandboxes } => startup(sandboxes),
        Scenario::Churn { runs, processes } => churn(runs, processes),
        Scenario::Scheduler { nodes, replicas } => scheduler(nodes, replicas),
        Scenario::E2e { agents, replicas } => tokio_main(cluster::e2e(agents, replicas)),
        Scenario::Http(args) => http::http(args, http::Wasi::P2),
        Scenario::HttpP3(args) => http::http(args, http::Wasi::P3),
        Scenario::Isolation { spinners, burst } => {
            tokio_main(isolation::isolation(spinners, burst))
        }
        Scenario::Features {
            sandboxes,
            runs,
            thread_runs,
        } => features(sandboxes, runs, thread_runs),
        Scenario::Rollout {
            agents,
            replicas,
            max_surge,
            max_unavailable,
        } => tokio_main(rollout::rollout(
            agents,
            replicas,
            &max_surge,
            &max_unavailable,
        )),
        Scenario::Fleet {
            agents,
            per_agent,
            steady_seconds,
        } => tokio_main(cluster::fleet(
            agents,
            per_agent,
            Duration::from_secs(steady_seconds),
        )),
        Scenario::Record { dir, args } => report::record(&dir, &args),
        Scenario::Report { dir, readme, check } => report::report(&dir, &readme, check),
        Scenario::ServeControlPlane { data_dir } => {
            flotilla_telemetry::init("flotilla_control_plane");
            tokio_main(cluster::serve_control_plane(&data_dir))
        }
        Scenario::ServeAgent { argv } => {
            flotilla_telemetry::init("flotilla_node_agent");
            tokio_main(cluster::serve_agent(argv))
        }
        Scenario::Child {
            variant,
            guest,
            count,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let m = runtime.block_on(child(variant, guest, count))?;
            println!(
                "MEASURE {} {} {} {} {}",
                m.count, m.elapsed_s, m.rss_delta_bytes, m.p50_ns, m.p99_ns
            );
            // Leave without tearing down 100,000 sandboxes one by one.
            std::process::exit(0);
        }
    }
}

fn tokio_main(future: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

fn result(metric: &str, value: f64, unit: &str) {
    println!("RESULT {metric} {value:.2} {unit}");
}

fn machine() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = capacity::read_mem_total().unwrap_or(0) >> 30;
    let maps = capacity::read_max_map_count().unwrap_or(0);
    println!(
        "# machine: {} {cpus} CPUs, {mem} GiB, vm.max_map_count={maps}",
        std::env::consts::ARCH
    );
}

fn density(sandboxes: u32) -> anyhow::Result<()> {
    machine();
    let flotilla = run_child(Variant::Flotilla, Guest::Idle, sandboxes)?;
    let bare = run_child(Variant::Bare, Guest::Idle, sandboxes)?;
    // The idle guest writes its poll_oneoff subscription and event into one 4 KiB page.
    let guest_page = 4096.0;
    let f_per = flotilla.rss_delta_bytes / flotilla.count;
    let b_per = bare.rss_delta_bytes / bare.count;
    result("density_live_sandboxes", flotilla.count, "sandboxes");
    result("density_rss_per_sandbox", f_per / 1024.0, "KiB");
    result(
        "density_host_overhead_per_sandbox",
        (f_per - guest_page) / 1024.0,
        "KiB",
    );
    result("density_time_to_start_all", flotilla.elapsed_s, "s");
    result("density_bare_live_sandboxes", bare.count, "sandboxes");
    result("density_bare_rss_per_sandbox", b_per / 1024.0, "KiB");
    result(
        "density_bare_host_overhead_per_sandbox",
        (b_per - guest_page) / 1024.0,
        "KiB",
    );
    result("density_bare_time_to_start_all", bare.elapsed_s, "s");
    result("density_rss_ratio_to_bare", f_per / b_per, "x");
    Ok(())
}

fn startup(sandboxes: u32) -> anyhow::Result<()> {
    machine();
    let flotilla = run_child(Variant::Flotilla, Guest::Idle, sandboxes)?;
    let bare = run_child(Variant::Bare, Guest::Idle, sandboxes)?;
    let f_rate = flotilla.count / flotilla.elapsed_s;
    let b_rate = bare.count / bare.elapsed_s;
    result("startup_sandboxes", flotilla.count, "sandboxes");
    result("startup_p50", flotilla.p50_ns / 1000.0, "us");
    result("startup_p99", flotilla.p99_ns / 1000.0, "us");
    result("startup_rate", f_rate, "starts/s");
    result("startup_bare_p50", bare.p50_ns / 1000.0, "us");
    result("startup_bare_p99", bare.p99_ns / 1000.0, "us");
    result("startup_bare_rate", b_rate, "starts/s");
    result(
        "startup_p50_ratio_to_bare",
        flotilla.p50_ns / bare.p50_ns,
        "x",
    );
    result(
        "startup_p99_ratio_to_bare",
        flotilla.p99_ns / bare.p99_ns,
        "x",
    );
    result("startup_rate_ratio_to_bare", f_rate / b_rate, "x");
    Ok(())
}

fn features(sandboxes: u32, runs: u32, thread_runs: u32) -> anyhow::Result<()> {
    machine();
    let plain = run_child(Variant::Flotilla, Guest::Idle, sandboxes)?;
    let gc = run_child(Variant::Flotilla, Guest::GcIdle, sandboxes)?;
    let bare_gc = run_child(Variant::Bare, Guest::GcIdle, sandboxes)?;
    let per_sandbox = |m: &Measurement| m.rss_delta_bytes / m.count / 1024.0;
    result("features_gc_start_p50", gc.p50_ns / 1000.0, "us");
    result("features_gc_start_p99", gc.p99_ns / 1000.0, "us");
    result("features_gc_rss_per_sandbox", per_sandbox(&gc), "KiB");
    result("features_plain_start_p50", plain.p50_ns / 1000.0, "us");
    result("features_plain_rss_per_sandbox", per_sandbox(&plain), "KiB");
    result("features_bare_gc_start_p50", bare_gc.p50_ns / 1000.0, "us");
    result("features_bare_gc_start_p99", bare_gc.p99_ns / 1000.0, "us");
    result(
        "features_gc_start_p50_ratio_to_plain",
        gc.p50_ns / plain.p50_ns,
        "x",
    );
    result(
        "features_gc_rss_ratio_to_plain",
        per_sandbox(&gc) / per_sandbox(&plain),
        "x",
    );
    result(
        "features_gc_start_p50_ratio_to_bare",
        gc.p50_ns / bare_gc.p50_ns,
        "x",
    );
    result(
        "features_gc_start_p99_ratio_to_bare",
        gc.p99_ns / bare_gc.p99_ns,
        "x",
    );
    let heavy = run_child(Variant::Flotilla, Guest::GcHeavy, runs)?;
    let bare_heavy = run_child(Variant::Bare, Guest::GcHeavy, runs)?;
    result("features_gc_heavy_runs", heavy.count, "runs");
    result("features_gc_heavy_time", heavy.elapsed_s, "s");
    result("features_bare_gc_heavy_time", bare_heavy.elapsed_s, "s");
    result(
        "features_gc_heavy_time_ratio_to_bare",
        heavy.elapsed_s / bare_heavy.elapsed_s,
        "x",
    );
    let threads = run_child(Variant::Flotilla, Guest::Threads, thread_runs)?;
    let bare_threads = run_child(Variant::Bare, Guest::Threads, thread_runs)?;
    result("features_threads_runs", threads.count, "runs");
    result("features_threads_start_p50", threads.p50_ns / 1000.0, "us");
    result("features_threads_start_p99", threads.p99_ns / 1000.0, "us");
    result("features_threads_time", threads.elapsed_s, "s");
    result(
        "features_bare_threads_start_p50",
        bare_threads.p50_ns / 1000.0,
        "us",
    );
    result(
        "features_bare_threads_start_p99",
        bare_threads.p99_ns / 1000.0,
        "us",
    );
    result("features_bare_threads_time", bare_threads.elapsed_s, "s");
    result(
        "features_threads_start_p50_ratio_to_bare",
        threads.p50_ns / bare_threads.p50_ns,
        "x",
    );
    result(
        "features_threads_time_ratio_to_bare",
        threads.elapsed_s / bare_threads.elapsed_s,
        "x",
    );
    Ok(())
}

fn churn(runs: u32, processes: u32) -> anyhow::Result<()> {
    machine();
    let flotilla = run_child(Variant::Flotilla, Guest::Exit, runs)?;
    let bare = run_child(Variant::Bare, Guest::Exit, runs)?;
    let true_rate = spawn_true(processes)?;
    let f_rate = flotilla.count / flotilla.elapsed_s;
    let b_rate = bare.count / bare.elapsed_s;
    result("churn_rate", f_rate, "runs/s");
    result("churn_bare_rate", b_rate, "runs/s");
    result("churn_bin_true_rate", true_rate, "processes/s");
    result("churn_ratio_to_bin_true", f_rate / true_rate, "x");
    result("churn_bare_ratio_to_bin_true", b_rate / true_rate, "x");
    result("churn_ratio_to_bare", f_rate / b_rate, "x");
    Ok(())
}

fn scheduler(node_count: u32, replicas: u64) -> anyhow::Result<()> {
    use std::collections::BTreeMap;

    use flotilla_control_plane::model::{Requests, Taint, TaintEffect};
    use flotilla_control_plane::scheduler::framework::{NodeInfo, NodeResources, WorkloadRequest};
    use flotilla_control_plane::scheduler::{Scheduler, SchedulerConfig};

    machine();
    let mut nodes: Vec<NodeInfo> = (0..node_count)
        .map(|i| {
            let arch = if i % 10 == 0 { "arm64" } else { "amd64" };
            NodeInfo {
                name: format!("node-{i:05}"),
                ready: true,
                labels: [("kubernetes.io/arch".to_string(), arch.to_string())].into(),
                taints: if i % 20 == 1 {
                    vec![Taint {
                        key: "dedicated".into(),
                        value: "batch".into(),
                        effect: TaintEffect::NoSchedule,
                    }]
                } else {
                    vec![]
                },
                allocatable: NodeResources {
                    memory: 64 << 30,
                    cpu_millis: 64_000,
                    sandboxes: 100_000,
                },
                allocated: NodeResources::default(),
                ingress_url: String::new(),
            }
        })
        .collect();
    let scheduler = Scheduler::new(&SchedulerConfig::default())?;
    let sizes = [1u64, 10, 100, 1_000, 5_000];
    let (mut placed, mut workloads, mut i) = (0u64, 0u64, 0usize);
    let started = Instant::now();
    while placed < replicas {
        let count = sizes[i % sizes.len()].min(replicas - placed);
        let mut request = WorkloadRequest {
            key: format!("default/w{i}"),
            requests: Requests {
                memory: 1 << (16 + i % 8),
                cpu_millis: 10 * (1 + i as u64 % 5),
                sandboxes: 1,
            },
            ..WorkloadRequest::default()
        };
        if i % 7 == 0 {
            request
                .node_selector
                .insert("kubernetes.io/arch".into(), "arm64".into());
        }
        let placement = scheduler.schedule(&request, &nodes, &BTreeMap::new(), count)?;
        if placement.unschedulable > 0 {
            bail!("unexpectedly unschedulable: {:?}", placement.message);
        }
        // Commit the placements to the snapshot, as the control plane does between cycles.
        for node in &mut nodes {
            if let Some(&n) = placement.assigned.get(&node.name) {
                node.allocated.allocate(&request.requests, n as i64);
            }
        }
        placed += count;
        workloads += 1;
        i += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    result("scheduler_nodes", f64::from(node_count), "nodes");
    result("scheduler_replicas", placed as f64, "replicas");
    result("scheduler_workloads", workloads as f64, "workloads");
    result("scheduler_elapsed", elapsed, "s");
    result(
        "scheduler_placements_per_second",
        placed as f64 / elapsed,
        "placements/s",
    );
    Ok(())
}

/// Spawns `/bin/true` from one thread per CPU and returns processes per second.
fn spawn_true(processes: u32) -> anyhow::Result<f64> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<()> {
                for _ in 0..processes / threads {
                    Command::new("/bin/true").status()?;
                }
                Ok(())
            })
        })
        .collect();
    for handle in handles {
        match handle.join() {
            Ok(result) => result.context("spawning /bin/true")?,
            Err(_) => bail!("a spawning thread panicked"),
        }
    }
    Ok(f64::from(processes / threads * threads) / started.elapsed().as_secs_f64())
}

/// How clap spells `value` on the command line.
fn value_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

fn run_child(variant: Variant, guest: Guest, count: u32) -> anyhow::Result<Measurement> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["child", "--variant"])
        .arg(format!("{variant:?}").to_lowercase())
        .args(["--guest", &value_name(guest)])
        .args(["--count", &count.to_string()])
        .output()
        .context("running the measurement child")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find(|l| l.starts_with("MEASURE ")) else {
        bail!(
            "{variant:?} measurement failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [count, elapsed_s, rss_delta_bytes, p50_ns, p99_ns] = v[..] else {
        bail!("malformed measurement {line:?}");
    };
    Ok(Measurement {
        count,
        elapsed_s,
        rss_delta_bytes,
        p50_ns,
        p99_ns,
    })
}

fn runtime_config(count: u32) -> RuntimeConfig {
    let mut config = RuntimeConfig {
        max_sandboxes: count,
        cache_dir: None,
        ..RuntimeConfig::default()
    };
    config.default_limits.memory_bytes = 1 << 20;
    // What the node offers, as the agent's `--wasm-features` reads it from the environment:
    // to measure what offering a feature costs every sandbox.
    if let Ok(list) = std::env::var("FLOTILLA_WASM_FEATURES") {
        match flotilla_model::wasm::FeatureSet::parse_list(&list) {
            Ok(features) => config.wasm_features = features,
            Err(error) => {
                eprintln!("FLOTILLA_WASM_FEATURES: {error}");
                std::process::exit(64);
            }
        }
    }
    config
}

async fn child(variant: Variant, guest: Guest, count: u32) -> anyhow::Result<Measurement> {
    let mut config = runtime_config(count);
    if let Guest::Threads = guest {
        config.wasm_features = config
            .wasm_features
            .with(flotilla_model::wasm::WasmFeature::Threads);
    }
    let capacity = capacity::derive(&config, capacity::read_max_map_count(), None);
    if capacity.max_sandboxes < count {
        bail!(
            "this host holds {} sandboxes: {}",
            capacity.max_sandboxes,
            capacity.limited_by
        );
    }
    let runtime = WasmtimeRuntime::with_capacity(config, capacity)?;
    let wasm = wat::parse_str(guest.wat())?;
    match variant {
        Variant::Flotilla => flotilla(runtime, wasm, guest, count).await,
        Variant::Bare => bare(runtime, wasm, guest, count).await,
    }
}

async fn flotilla(
    runtime: WasmtimeRuntime,
    wasm: Vec<u8>,
    guest: Guest,
    count: u32,
) -> anyhow::Result<Measurement> {
    let metrics = Metrics::new().with_latency_samples(count as usize);
    let supervisor = Supervisor::new(runtime, SupervisorConfig::default(), metrics.clone());
    let spec = |replicas| WorkloadSpec {
        name: "bench".into(),
        generation: 1,
        module: Some(ModuleSource {
            source: Some(module_source::Source::Inline(wasm.clone())),
            sha256: String::new(),
        }),
        replicas,
        restart_policy: RestartPolicy::Never as i32,
        wasm_features: guest.features(),
        ..WorkloadSpec::default()
    };
    // Compile once (a cached module), then measure the starts alone.
    supervisor.apply(spec(0)).await?;
    let rss_before = rss_bytes();
    let started = Instant::now();
    supervisor.apply(spec(count)).await?;
    let done_phase = if guest.is_idle() {
        SandboxPhase::Running
    } else {
        SandboxPhase::Succeeded
    };
    while metrics.in_phase(done_phase) < i64::from(count) {
        if metrics.in_phase(SandboxPhase::Failed) > 0 {
            let failed = supervisor
                .list(None)
                .into_iter()
                .find(|s| s.phase == SandboxPhase::Failed as i32);
            bail!("a sandbox failed: {failed:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let rss_delta = rss_bytes().saturating_sub(rss_before);
    let samples = metrics.take_latency_samples();
    Ok(measurement(count, elapsed, rss_delta, samples))
}

async fn bare(
    runtime: WasmtimeRuntime,
    wasm: Vec<u8>,
    guest: Guest,
    count: u32,
) -> anyhow::Result<Measurement> {
    if let Guest::Threads = guest {
        let engine = runtime.threads_engine().context("no threads engine")?;
        return threads::bare(engine, &wasm, count);
    }
    let engine = runtime.engine().clone();
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |cx| cx)?;
    let module = Module::new(&engine, &wasm)?;
    let pre: InstancePre<WasiP1Ctx> = linker.instantiate_pre(&module)?;
    let pre = Arc::new(pre);
    let done = Arc::new(AtomicUsize::new(0));
    // The first error of any sandbox: a broken bare run fails, never prints plausible numbers.
    let failure = Arc::new(std::sync::OnceLock::<String>::new());
    let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(count as usize)));

    let rss_before = rss_bytes();
    let started = Instant::now();
    for _ in 0..count {
        let (pre, engine, done, failure, samples) = (
            pre.clone(),
            engine.clone(),
            done.clone(),
            failure.clone(),
            samples.clone(),
        );
        tokio::spawn(async move {
            let begun = Instant::now();
            let mut store = Store::new(&engine, WasiCtxBuilder::new().build_p1());
            store.set_epoch_deadline(1);
            store.epoch_deadline_async_yield_and_update(1);
            let instance = Box::pin(pre.instantiate_async(&mut store)).await;
            let start = match instance
                .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            {
                Ok(start) => start,
                Err(e) => {
                    let _ = failure.set(format!("instantiating: {e:#}"));
                    return;
                }
            };
            let latency = begun.elapsed();
            if let Ok(mut samples) = samples.lock() {
                samples.push(u32::try_from(latency.as_nanos()).unwrap_or(u32::MAX));
            }
            if guest.is_idle() {
                done.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = Box::pin(start.call_async(&mut store, ())).await {
                let _ = failure.set(format!("running: {e:#}"));
                return;
            }
            if !guest.is_idle() {
                drop(store);
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while done.load(Ordering::Relaxed) < count as usize {
        if let Some(failure) = failure.get() {
            bail!("a bare sandbox failed: {failure}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let rss_delta = rss_bytes().saturating_sub(rss_before);
    let samples = std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(measurement(count, elapsed, rss_delta, samples))
}

fn measurement(
    count: u32,
    elapsed: Duration,
    rss_delta: u64,
    mut samples: Vec<u32>,
) -> Measurement {
    samples.sort_unstable();
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        f64::from(samples[i])
    };
    Measurement {
        count: f64::from(count),
        elapsed_s: elapsed.as_secs_f64(),
        rss_delta_bytes: rss_delta as f64,
        p50_ns: pct(0.50),
        p99_ns: pct(0.99),
    }
}

/// Resident set size of this process, from `VmRSS` in `/proc/self/status`.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
