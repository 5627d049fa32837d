//! Every benchmark at a smoke size, as CI runs it: each must exit 0 and print every one of its
//! `RESULT <metric> <value> <unit>` lines once, with a finite value, so that a harness or a
//! parser that rots is seen. Nothing here says anything about speed: debug builds, tiny sizes.

use std::collections::BTreeMap;
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_flotilla-bench");

/// Runs `flotilla-bench ARGS` and returns its results by metric.
fn results(args: &[&str], env: &[(&str, &str)]) -> BTreeMap<String, (f64, String)> {
    let out = Command::new(BENCH)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("flotilla-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "flotilla-bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut results = BTreeMap::new();
    for line in stdout.lines().filter(|l| l.starts_with("RESULT ")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, metric, value, unit] = fields[..] else {
            panic!("{args:?}: not `RESULT <metric> <value> <unit>`: {line:?}");
        };
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("{args:?}: {line:?}: {e}"));
        assert!(value.is_finite(), "{args:?}: {line:?}");
        let earlier = results.insert(metric.to_string(), (value, unit.to_string()));
        assert!(earlier.is_none(), "{args:?}: {metric} printed twice");
    }
    results
}

/// Checks that `args` print exactly `metrics`.
fn check(args: &[&str], env: &[(&str, &str)], metrics: &[&str]) {
    let results = results(args, env);
    let printed: Vec<&str> = results.keys().map(String::as_str).collect();
    let mut expected = metrics.to_vec();
    expected.sort_unstable();
    assert_eq!(printed, expected, "flotilla-bench {args:?}");
    println!(
        "flotilla-bench {}: {} results",
        args.join(" "),
        results.len()
    );
}

#[test]
fn every_benchmark_prints_all_its_results_at_a_smoke_size() {
    check(
        &["density", "--sandboxes", "200"],
        &[],
        &[
            "density_live_sandboxes",
            "density_rss_per_sandbox",
            "density_host_overhead_per_sandbox",
            "density_time_to_start_all",
            "density_bare_live_sandboxes",
            "density_bare_rss_per_sandbox",
            "density_bare_host_overhead_per_sandbox",
            "density_bare_time_to_start_all",
            "density_rss_ratio_to_bare",
        ],
    );
    check(
        &["startup", "--sandboxes", "200"],
        &[],
        &[
            "startup_sandboxes",
            "startup_p50",
            "startup_p99",
            "startup_rate",
            "startup_bare_p50",
            "startup_bare_p99",
            "startup_bare_rate",
            "startup_p50_ratio_to_bare",
            "startup_p99_ratio_to_bare",
            "startup_rate_ratio_to_bare",
        ],
    );
    check(
        &["churn", "--runs", "200", "--processes", "10"],
        &[],
        &[
            "churn_rate",
            "churn_bare_rate",
            "churn_bin_true_rate",
            "churn_ratio_to_bin_true",
            "churn_bare_ratio_to_bin_true",
            "churn_ratio_to_bare",
        ],
    );
    check(
        &["scheduler", "--nodes", "20", "--replicas", "2000"],
        &[],
        &[
            "scheduler_nodes",
            "scheduler_replicas",
            "scheduler_workloads",
            "scheduler_elapsed",
            "scheduler_placements_per_second",
        ],
    );
    check(
        &["e2e", "--agents", "2", "--replicas", "20"],
        &[],
        &[
            "e2e_agents",
            "e2e_replicas",
            "e2e_apply_to_ready",
            "e2e_replicas_ready_per_second",
            "e2e_scale_up_to_ready",
        ],
    );
    check(
        &["rollout", "--agents", "2", "--replicas", "20"],
        &[],
        &[
            "rollout_agents",
            "rollout_replicas",
            "rollout_seconds",
            "rollout_min_running_fraction_agents",
            "rollout_sandbox_changes_seen",
            "rollout_min_ready_fraction_status",
        ],
    );
    check(
        &[
            "fleet",
            "--agents",
            "5",
            "--per-agent",
            "4",
            "--steady-seconds",
            "1",
        ],
        &[],
        &[
            "fleet_agents_connect",
            "fleet_agents",
            "fleet_replicas",
            "fleet_workloads",
            "fleet_apply_to_ready",
            "fleet_control_plane_rss_idle",
            "fleet_control_plane_rss",
            "fleet_control_plane_cpu_steady",
        ],
    );
    check(
        &[
            "features",
            "--sandboxes",
            "200",
            "--runs",
            "2",
            "--thread-runs",
            "4",
        ],
        &[],
        &[
            "features_gc_start_p50",
            "features_gc_start_p99",
            "features_gc_rss_per_sandbox",
            "features_plain_start_p50",
            "features_plain_rss_per_sandbox",
            "features_bare_gc_start_p50",
            "features_bare_gc_start_p99",
            "features_gc_start_p50_ratio_to_plain",
            "features_gc_rss_ratio_to_plain",
            "features_gc_start_p50_ratio_to_bare",
            "features_gc_start_p99_ratio_to_bare",
            "features_gc_heavy_runs",
            "features_gc_heavy_time",
            "features_bare_gc_heavy_time",
            "features_gc_heavy_time_ratio_to_bare",
            "features_threads_runs",
            "features_threads_start_p50",
            "features_threads_start_p99",
            "features_threads_time",
            "features_bare_threads_start_p50",
            "features_bare_threads_start_p99",
            "features_bare_threads_time",
            "features_threads_start_p50_ratio_to_bare",
            "features_threads_time_ratio_to_bare",
        ],
    );
    check(
        &["isolation", "--spinners", "4", "--burst", "10"],
        &[],
        &[
            "isolation_costly_module_functions",
            "isolation_costly_module_bytes",
            "isolation_costly_compile_to_ready",
            "isolation_neighbours_quiet",
            "isolation_neighbours_during_compile",
            "isolation_neighbour_start_p99_quiet",
            "isolation_neighbour_start_p99_during_compile",
            "isolation_churned_workloads_per_s",
            "isolation_neighbour_start_p99_churning",
            "isolation_neighbour_start_p99_ratio_churning",
            "isolation_neighbour_start_p99_ratio",
            "isolation_heartbeat_interval",
            "isolation_heartbeat_age_max",
            "isolation_heartbeats_missed",
            "isolation_not_ready_transitions",
            "isolation_neighbour_start_p50_beside_spinners",
            "isolation_spinners",
            "isolation_neighbour_start_p99_beside_spinners",
            "isolation_neighbour_start_p99_ratio_spinners",
            "isolation_heartbeat_age_max_spinners",
            "isolation_heartbeats_missed_spinners",
            "isolation_not_ready_transitions_spinners",
            "isolation_http_rate",
            "isolation_http_p50_quiet",
            "isolation_http_p99_quiet",
            "isolation_http_p50_beside_spinners",
            "isolation_http_p99_beside_spinners",
            "isolation_http_p99_ratio_spinners",
            "isolation_cpu_split_light",
            "isolation_cpu_split_heavy",
            "isolation_cpu_split_ratio",
            "isolation_cpu_split_error",
        ],
    );
}

/// What `http` prints, after its prefix (`http_`, or `http_p3_` for `http-p3`).
const HTTP_METRICS: [&str; 16] = [
    "flotilla_throughput",
    "flotilla_p50",
    "flotilla_p99",
    "flotilla_cpu_per_request",
    "wasmtime_serve_throughput",
    "wasmtime_serve_p50",
    "wasmtime_serve_p99",
    "wasmtime_serve_cpu_per_request",
    "wasmtime_serve_tuned_throughput",
    "wasmtime_serve_tuned_p50",
    "wasmtime_serve_tuned_p99",
    "wasmtime_serve_tuned_cpu_per_request",
    "throughput_ratio",
    "p99_ratio",
    "throughput_ratio_to_defaults",
    "p99_ratio_to_defaults",
];

/// `http` and `http-p3` need `wrk` and the `wasmtime` CLI (`$WASMTIME`, or on the PATH): without them it
/// says what it skips rather than fail the suite of a machine that lacks them.
#[test]
fn the_http_benchmark_prints_all_its_results_at_a_smoke_size() {
    let wasmtime = std::env::var("WASMTIME").unwrap_or_else(|_| "wasmtime".into());
    // Whether `program` can be started (`wrk --version` exits 1 but prints its version).
    let found = |program: &str| Command::new(program).arg("--version").output().is_ok();
    if !found("wrk") || !found(&wasmtime) {
        // On the stream itself: libtest shows what a passing test prints with `println!` to
        // nobody.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "skipped: the http smoke run needs wrk and the wasmtime CLI ({wasmtime}); \
             install wrk and set WASMTIME to run it"
        );
        return;
    }
    for (scenario, prefix) in [("http", "http"), ("http-p3", "http_p3")] {
        let metrics: Vec<String> = HTTP_METRICS
            .iter()
            .map(|metric| format!("{prefix}_{metric}"))
            .collect();
        let metrics: Vec<&str> = metrics.iter().map(String::as_str).collect();
        check(
            &[
                scenario,
                "--duration",
                "1s",
                "--rounds",
                "1",
                "--connections",
                "4",
            ],
            &[("WASMTIME", wasmtime.as_str())],
            &metrics,
        );
    }
}
