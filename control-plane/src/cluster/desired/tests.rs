//! The index driven by watch events alone, without gRPC or a store.

use std::collections::BTreeMap;

use futures::FutureExt;

use super::*;
use crate::model::{RevisionStatus, WorkloadSpec, WorkloadStatus};

const HASH_V1: &str = "1111111111aaaa";
const HASH_V2: &str = "2222222222bbbb";

/// A workload the controller has placed: `placements` of its current revision, at `generation`.
fn placed(name: &str, generation: u64, placements: &[(&str, u64)]) -> Workload {
    let mut spec = WorkloadSpec::default();
    spec.module.sha256 = "ab".repeat(32);
    let mut workload = Workload::new("", name, spec);
    workload.metadata.generation = generation;
    workload.status = Some(WorkloadStatus {
        observed_generation: generation,
        template_generation: generation,
        template_hash: HASH_V1.into(),
        revision: 1,
        placements: placements
            .iter()
            .map(|(node, count)| (node.to_string(), *count))
            .collect(),
        ..WorkloadStatus::default()
    });
    workload
}

/// The message waiting for the subscriber, if any.
fn pending(subscription: &mut Subscription) -> Option<Arc<DesiredState>> {
    subscription.next().now_or_never().flatten()
}

fn message(subscription: &mut Subscription) -> Arc<DesiredState> {
    pending(subscription).expect("a message is waiting")
}

/// (agent workload name, replicas) of each revision in a message.
fn shares(desired: &DesiredState) -> Vec<(String, u32)> {
    let mut shares: Vec<(String, u32)> = desired
        .workloads
        .iter()
        .filter_map(|w| w.spec.as_ref())
        .map(|s| (s.name.clone(), s.replicas))
        .collect();
    shares.sort();
    shares
}

fn share(name: &str, hash: &str, replicas: u32) -> (String, u32) {
    (format!("default.{name}-{}", &hash[..10]), replicas)
}

#[test]
fn a_session_gets_the_complete_set_once_the_index_has_its_first_snapshot() {
    let index = DesiredIndex::default();
    let mut early = index.subscribe("node-a");
    assert!(pending(&mut early).is_none(), "nothing before the snapshot");

    let web = placed("web", 1, &[("node-a", 2), ("node-b", 1)]);
    index.apply(&WatchEvent::Restarted(vec![web]));
    let first = message(&mut early);
    assert!(!first.incremental);
    assert_eq!(shares(&first), [share("web", HASH_V1, 2)]);
    assert!(pending(&mut early).is_none());

    // A session opened later gets the node's set at once.
    let mut late = index.subscribe("node-b");
    let first = message(&mut late);
    assert!(!first.incremental);
    assert_eq!(shares(&first), [share("web", HASH_V1, 1)]);
}

#[test]
fn each_node_hears_only_of_its_own_share_of_a_change() {
    let index = DesiredIndex::default();
    index.apply(&WatchEvent::Restarted(vec![]));
    let mut a = index.subscribe("node-a");
    let mut b = index.subscribe("node-b");
    let mut c = index.subscribe("node-c");
    for session in [&mut a, &mut b, &mut c] {
        assert!(message(session).workloads.is_empty());
    }

    index.apply(&WatchEvent::Applied(placed(
        "web",
        1,
        &[("node-a", 2), ("node-b", 1)],
    )));
    let to_a = message(&mut a);
    assert!(to_a.incremental);
    assert_eq!(shares(&to_a), [share("web", HASH_V1, 2)]);
    assert_eq!(shares(&message(&mut b)), [share("web", HASH_V1, 1)]);
    assert!(pending(&mut c).is_none(), "node-c has no share");

    // Moving node-b's replica to node-c: node-a hears nothing, node-b loses it, node-c gets it.
    index.apply(&WatchEvent::Applied(placed(
        "web",
        1,
        &[("node-a", 2), ("node-c", 1)],
    )));
    assert!(pending(&mut a).is_none(), "node-a's share did not change");
    let to_b = message(&mut b);
    assert!(to_b.workloads.is_empty());
    assert_eq!(to_b.removed, [share("web", HASH_V1, 0).0]);
    assert_eq!(shares(&message(&mut c)), [share("web", HASH_V1, 1)]);

    // Applying the same placements again sends nothing.
    index.apply(&WatchEvent::Applied(placed(
        "web",
        1,
        &[("node-a", 2), ("node-c", 1)],
    )));
    for session in [&mut a, &mut b, &mut c] {
        assert!(pending(session).is_none());
    }
}

#[test]
fn a_spec_not_yet_placed_changes_nothing_and_a_deletion_removes_every_share() {
    let index = DesiredIndex::default();
    index.apply(&WatchEvent::Restarted(vec![placed(
        "web",
        1,
        &[("node-a", 1)],
    )]));
    let mut a = index.subscribe("node-a");
    assert_eq!(shares(&message(&mut a)), [share("web", HASH_V1, 1)]);

    // generation 2 with a status of generation 1: the controller has not caught up.
    let mut unplaced = placed("web", 1, &[("node-a", 3)]);
    unplaced.metadata.generation = 2;
    index.apply(&WatchEvent::Applied(unplaced));
    assert!(pending(&mut a).is_none());

    index.apply(&WatchEvent::Deleted(placed("web", 1, &[("node-a", 1)])));
    let removed = message(&mut a);
    assert!(removed.incremental && removed.workloads.is_empty());
    assert_eq!(removed.removed, [share("web", HASH_V1, 0).0]);
}

#[test]
fn a_rolling_update_sends_both_revisions_with_their_own_shares() {
    let index = DesiredIndex::default();
    index.apply(&WatchEvent::Restarted(vec![placed(
        "web",
        1,
        &[("node-a", 2)],
    )]));
    let mut a = index.subscribe("node-a");
    message(&mut a);

    let mut updating = placed("web", 2, &[("node-a", 1)]);
    let status = updating.status.as_mut().expect("status");
    status.template_hash = HASH_V2.into();
    status.revision = 2;
    status.revisions = vec![RevisionStatus {
        revision: 1,
        template_hash: HASH_V1.into(),
        generation: 1,
        placements: BTreeMap::from([("node-a".to_string(), 1)]),
        template: Some(Box::new(updating.spec.clone())),
        ..RevisionStatus::default()
    }];
    index.apply(&WatchEvent::Applied(updating));
    let delta = message(&mut a);
    assert_eq!(
        shares(&delta),
        [share("web", HASH_V1, 1), share("web", HASH_V2, 1)]
    );
    assert!(delta.removed.is_empty());
}

#[test]
fn a_restart_of_the_watch_sends_only_what_changed_meanwhile() {
    let index = DesiredIndex::default();
    index.apply(&WatchEvent::Restarted(vec![
        placed("web", 1, &[("node-a", 1)]),
        placed("api", 1, &[("node-a", 1)]),
    ]));
    let mut a = index.subscribe("node-a");
    assert_eq!(message(&mut a).workloads.len(), 2);

    // api went and web scaled while the watch was down.
    index.apply(&WatchEvent::Restarted(vec![placed(
        "web",
        1,
        &[("node-a", 4)],
    )]));
    let delta = message(&mut a);
    assert!(delta.incremental);
    assert_eq!(shares(&delta), [share("web", HASH_V1, 4)]);
    assert_eq!(delta.removed, [share("api", HASH_V1, 0).0]);
    assert!(pending(&mut a).is_none(), "one message per node and event");
}

#[test]
fn a_session_that_falls_behind_gets_a_complete_set_instead() {
    let index = DesiredIndex::default();
    index.apply(&WatchEvent::Restarted(vec![]));
    let mut a = index.subscribe("node-a");
    message(&mut a);
    let changes = SUBSCRIBER_BACKLOG + 10;
    for replicas in 1..=changes as u64 {
        index.apply(&WatchEvent::Applied(placed(
            "web",
            1,
            &[("node-a", replicas)],
        )));
    }
    let caught_up = message(&mut a);
    assert!(!caught_up.incremental);
    assert_eq!(shares(&caught_up), [share("web", HASH_V1, changes as u32)]);
    // Then deltas again.
    index.apply(&WatchEvent::Applied(placed("web", 1, &[("node-a", 1)])));
    let next = message(&mut a);
    assert!(next.incremental);
    assert_eq!(shares(&next), [share("web", HASH_V1, 1)]);
}

#[test]
fn nodes_with_nothing_to_run_and_no_session_are_forgotten() {
    let index = DesiredIndex::default();
    index.apply(&WatchEvent::Restarted(vec![placed(
        "web",
        1,
        &[("node-a", 1)],
    )]));
    assert_eq!(index.node_count(), 1);
    index.apply(&WatchEvent::Applied(placed("web", 1, &[("node-b", 1)])));
    assert_eq!(
        index.node_count(),
        1,
        "node-a had no session and nothing left"
    );

    let session = index.subscribe("node-c");
    assert_eq!(index.node_count(), 2);
    drop(session);
    index.apply(&WatchEvent::Applied(placed("web", 1, &[("node-c", 1)])));
    index.apply(&WatchEvent::Applied(placed("web", 1, &[("node-b", 1)])));
    assert_eq!(
        index.node_count(),
        1,
        "node-c's session ended and its share left"
    );
}
