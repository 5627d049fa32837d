//! Leader election against the fake API server: one winner, hand-over on release, take-over
//! after a crash, and a leader that cannot renew gives up.

use std::time::Duration;

use flotilla_tests::apiserver::{FakeApiServer, Method};

use super::*;
use crate::store::tests::fake_client;

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/flotilla/leases/cp";

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1000),
        retry_period: Duration::from_millis(100),
        ..LeaseConfig::new("flotilla", "cp", identity)
    }
}

fn holder(server: &FakeApiServer) -> Option<String> {
    server.object(LEASE_PATH)?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_prompt_hand_over_on_release() {
    let server = FakeApiServer::start().await;
    let first = acquire(fake_client(&server), config("a")).await;
    assert_eq!(holder(&server).as_deref(), Some("a"));

    let second = tokio::spawn(acquire(fake_client(&server), config("b")));
    // Several renewals of "a" pass; "b" keeps waiting.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!second.is_finished(), "b took a lease that a renews");
    assert_eq!(holder(&server).as_deref(), Some("a"));

    let released = std::time::Instant::now();
    first.release().await;
    let _second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("b leads soon after a releases")
        .expect("campaign task");
    // No waiting out the lease duration after a release.
    assert!(released.elapsed() < Duration::from_millis(1500));
    assert_eq!(holder(&server).as_deref(), Some("b"));
    let lease = server.object(LEASE_PATH).expect("lease");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_after_the_lease_duration() {
    let server = FakeApiServer::start().await;
    let first = acquire(fake_client(&server), config("a")).await;
    drop(first); // renewals stop, the Lease stays held
    let started = std::time::Instant::now();
    let _second = tokio::time::timeout(
        Duration::from_secs(10),
        acquire(fake_client(&server), config("b")),
    )
    .await
    .expect("b takes over");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(holder(&server).as_deref(), Some("b"));
}

#[tokio::test]
async fn a_leader_that_cannot_renew_gives_up() {
    let server = FakeApiServer::start().await;
    let mut leader = acquire(fake_client(&server), config("a")).await;
    server.fail_next(Some(Method::PUT), LEASE_PATH, 500, 1000);
    tokio::time::timeout(Duration::from_secs(5), leader.lost())
        .await
        .expect("leadership is lost after the renew deadline");
}
