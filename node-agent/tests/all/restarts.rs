//! Restart policies and crash-loop backoff, with tokio's clock paused.

use std::time::Duration;

use crate::common::*;
use flotilla_node_agent::metrics::Metrics;
use flotilla_node_agent::supervisor::{Supervisor, SupervisorConfig};
use flotilla_proto::agent::v1::{RestartPolicy, SandboxPhase};

#[tokio::test(start_paused = true)]
async fn crash_loop_backs_off_ten_twenty_forty_seconds() {
    let sup = supervisor(runtime_config());
    let mut s = spec("crasher", fixture("exit3"));
    s.restart_policy = RestartPolicy::OnFailure as i32;
    let started = tokio::time::Instant::now();
    sup.apply(s).await.expect("applied");

    let statuses = wait_for(&sup, "crasher", "three restarts", |s| {
        s.first().is_some_and(|s| s.restart_count == 3)
    })
    .await;
    let elapsed = started.elapsed();
    // Restarts after 10 s, 20 s and 40 s of backoff; guest runs take no virtual time.
    assert!(
        elapsed >= Duration::from_secs(70) && elapsed < Duration::from_secs(71),
        "{elapsed:?}"
    );
    let status = &statuses[0];
    let last = status.last_termination.as_ref().expect("terminated before");
    assert_eq!(last.exit_code, Some(3));

    // Next it waits 80 s in CrashLoopBackOff.
    let statuses = wait_for(&sup, "crasher", "back-off", |s| {
        s.first().is_some_and(|s| s.reason == "CrashLoopBackOff")
    })
    .await;
    assert!(
        statuses[0].message.contains("back-off 80s"),
        "{:?}",
        statuses[0].message
    );
    assert_eq!(statuses[0].phase, SandboxPhase::Pending as i32);
}

#[tokio::test(start_paused = true)]
async fn on_failure_does_not_restart_success_and_always_does() {
    let sup = supervisor(runtime_config());
    let mut once = spec("once", fixture("hello"));
    once.restart_policy = RestartPolicy::OnFailure as i32;
    sup.apply(once).await.expect("applied");
    let statuses = wait_for(&sup, "once", "success", all_in(SandboxPhase::Succeeded)).await;
    assert_eq!(statuses[0].restart_count, 0);

    let mut always = spec("always", fixture("hello"));
    always.restart_policy = RestartPolicy::Always as i32;
    sup.apply(always).await.expect("applied");
    wait_for(&sup, "always", "two restarts", |s| {
        s.first().is_some_and(|s| s.restart_count >= 2)
    })
    .await;
    // Every run printed its greeting into the same ring.
    assert!(
        logs(&sup, "always", 0)
            .matches("hello from flotilla")
            .count()
            >= 3
    );
}

#[tokio::test(start_paused = true)]
async fn a_long_run_resets_the_backoff() {
    let config = SupervisorConfig {
        backoff: flotilla_node_agent::supervisor::backoff::BackoffConfig {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_millis(500),
        },
        ..SupervisorConfig::default()
    };
    let sup = Supervisor::new(runtime(runtime_config()), config, Metrics::new());
    // Sleeps an hour in WASI, then is cut by its 1 s deadline: each run lasts past reset_after.
    let mut s = spec("sleeper", fixture("sleep"));
    s.restart_policy = RestartPolicy::Always as i32;
    s.resources = Some(flotilla_proto::agent::v1::Resources {
        deadline_ms: 1000,
        ..Default::default()
    });
    sup.apply(s).await.expect("applied");
    let statuses = wait_for(&sup, "sleeper", "third back-off", |s| {
        s.first()
            .is_some_and(|s| s.restart_count == 3 && s.reason == "CrashLoopBackOff")
    })
    .await;
    assert!(
        statuses[0].message.contains("back-off 10s"),
        "{}",
        statuses[0].message
    );
}
