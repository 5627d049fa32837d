//! 1,000 faulty sandboxes beside 100 healthy ones: every healthy one completes correctly.

use std::time::Duration;

use crate::common::*;
use flotilla_node_agent::metrics::Metrics;
use flotilla_node_agent::supervisor::backoff::BackoffConfig;
use flotilla_node_agent::supervisor::{Supervisor, SupervisorConfig};
use flotilla_proto::agent::v1::{Resources, RestartPolicy, SandboxPhase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_sandboxes_do_not_harm_healthy_ones() {
    let config = SupervisorConfig {
        // Crash-loop fast so the faulty sandboxes keep failing while the healthy ones run.
        backoff: BackoffConfig {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            reset_after: Duration::from_secs(600),
        },
        ..SupervisorConfig::default()
    };
    let sup = Supervisor::new(runtime(runtime_config()), config, Metrics::new());

    let faults = [
        "trap",
        "exit3",
        "membomb",
        "spin",
        "recurse",
        "flood",
        "spin_in_start",
        "many_memories",
    ];
    let per_fault = 1000 / faults.len() as u32;
    for fault in faults {
        let mut s = spec(&fault.replace('_', "-"), fixture(fault));
        s.replicas = per_fault;
        s.restart_policy = RestartPolicy::Always as i32;
        s.resources = Some(Resources {
            memory_limit_bytes: 4 << 20,
            cpu_limit_ms: 30,
            log_limit_bytes: 1024,
            ..Resources::default()
        });
        sup.apply(s).await.expect("faulty workload admitted");
    }

    let healthy = 100;
    for i in 0..healthy {
        let mut s = spec(&format!("healthy-{i}"), fixture("echo_args"));
        s.args = vec![format!("job-{i}")];
        s.env = vec![env("INDEX", &i.to_string())];
        sup.apply(s).await.expect("healthy workload admitted");
    }
    for i in 0..healthy {
        let name = format!("healthy-{i}");
        let statuses = wait_for(&sup, &name, "healthy sandbox", all_ended()).await;
        assert_eq!(
            statuses[0].phase,
            SandboxPhase::Succeeded as i32,
            "{statuses:?}"
        );
        assert_eq!(
            logs(&sup, &name, 0),
            format!("{name}\0job-{i}\0|INDEX={i}\0")
        );
    }

    // The faulty ones really were failing, each for its own reason. Spinners need a few ticks
    // of CPU each before their limit ends them, so wait for every workload's first failure.
    let mut reasons = std::collections::BTreeSet::new();
    for fault in faults {
        let name = fault.replace('_', "-");
        let statuses = wait_for(&sup, &name, "a faulty sandbox to fail", |s| {
            s.iter().any(|s| s.last_termination.is_some())
        })
        .await;
        for status in statuses {
            if let Some(t) = status.last_termination {
                reasons.insert(t.reason);
            }
        }
    }
    for reason in ["Trap", "Error", "OutOfMemory", "CpuLimit"] {
        assert!(
            reasons.contains(reason),
            "{reason} missing from {reasons:?}"
        );
    }
    let report = sup.shutdown(Duration::from_secs(10)).await;
    assert_eq!(report.sandboxes, 1000 + healthy);
    assert_eq!(report.aborted, 0);
}
