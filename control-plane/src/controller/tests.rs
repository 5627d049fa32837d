//! The controller against the embedded store and a registry of simulated nodes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::model::{Workload, WorkloadKey, WorkloadSpec};
use crate::scheduler::SchedulerConfig;
use crate::scheduler::framework::NodeResources;
use crate::store::{EmbeddedStore, WatchEvent};

const DIGEST: &str = "2222222222222222222222222222222222222222222222222222222222222222";

struct Harness {
    store: EmbeddedStore,
    cluster: Arc<Cluster>,
    controller: Controller<EmbeddedStore>,
    _dir: tempfile::TempDir,
}

pub(super) fn node(name: &str, arch: &str, sandboxes: u64) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        ready: true,
        labels: [("kubernetes.io/arch".to_string(), arch.to_string())].into(),
        taints: vec![],
        allocatable: NodeResources {
            memory: 1 << 30,
            cpu_millis: 8000,
            sandboxes,
        },
        allocated: NodeResources::default(),
        ingress_url: String::new(),
    }
}

fn harness(nodes: &[NodeInfo]) -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("store");
    let cluster = Arc::new(Cluster::default());
    for n in nodes {
        cluster.nodes.upsert(n.clone());
    }
    let scheduler = Scheduler::new(&SchedulerConfig::default()).expect("scheduler");
    Harness {
        controller: Controller::new(store.clone(), scheduler, cluster.clone()),
        store,
        cluster,
        _dir: dir,
    }
}

fn workload(name: &str, replicas: i64) -> Workload {
    let mut spec = WorkloadSpec {
        replicas,
        ..WorkloadSpec::default()
    };
    spec.module.sha256 = DIGEST.into();
    // With the default 64 KiB log ring, 1 MiB per replica.
    spec.resources.requests.memory = Some("960Ki".into());
    Workload::new("", name, spec)
}

async fn status(h: &Harness, name: &str) -> WorkloadStatus {
    h.store
        .get(&WorkloadKey::new("", name))
        .await
        .expect("get")
        .expect("exists")
        .status
        .expect("status written")
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

fn scheduled(status: &WorkloadStatus) -> &Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == SCHEDULED)
        .expect("Scheduled condition")
}

#[tokio::test]
async fn places_spreads_settles_moves_off_lost_nodes_and_scales_down() {
    let h = harness(&[
        node("n0", "amd64", 1000),
        node("n1", "amd64", 1000),
        node("n2", "amd64", 1000),
    ]);
    h.store.apply(workload("web", 300)).await.expect("apply");

    assert_eq!(h.controller.reconcile_all().await.expect("pass"), 1);
    let s = status(&h, "web").await;
    assert_eq!(
        s.placements,
        counts(&[("n0", 100), ("n1", 100), ("n2", 100)])
    );
    assert_eq!((s.replicas, s.observed_generation), (300, 1));
    assert_eq!(scheduled(&s).status, "True");

    // Idempotent: nothing changed, nothing written.
    assert_eq!(h.controller.reconcile_all().await.expect("pass"), 0);

    // A lost node's replicas move to the others; the rest stay where they are.
    h.cluster.nodes.mark_lost("n1");
    h.controller.reconcile_all().await.expect("pass");
    let s = status(&h, "web").await;
    assert_eq!(s.placements, counts(&[("n0", 150), ("n2", 150)]));

    // The node comes back: nothing moves back (no needless restarts).
    assert!(h.cluster.nodes.heartbeat("n1"));
    assert_eq!(h.controller.reconcile_all().await.expect("pass"), 0);

    // Scaling down takes from the most loaded nodes; scaling up fills the emptiest.
    h.store
        .apply(workload("web", 30))
        .await
        .expect("scale down");
    h.controller.reconcile_all().await.expect("pass");
    let s = status(&h, "web").await;
    assert_eq!(s.replicas, 30);
    assert_eq!(s.observed_generation, 2);
    h.store.apply(workload("web", 60)).await.expect("scale up");
    h.controller.reconcile_all().await.expect("pass");
    let s = status(&h, "web").await;
    assert_eq!(s.replicas, 60);
    // The revived node takes the new replicas until the spread is even again.
    assert_eq!(s.placements.len(), 3, "{:?}", s.placements);
    let (min, max) = (
        s.placements.values().min().copied().unwrap_or(0),
        s.placements.values().max().copied().unwrap_or(0),
    );
    assert!(max - min <= 1, "{:?}", s.placements);
}

#[tokio::test]
async fn unschedulable_replicas_get_a_condition_with_the_reasons() {
    let h = harness(&[
        node("x0", "amd64", 1000),
        node("x1", "amd64", 1000),
        node("a0", "arm64", 5),
    ]);
    let mut arm = workload("arm-only", 8);
    arm.spec
        .node_selector
        .insert("kubernetes.io/arch".into(), "arm64".into());
    h.store.apply(arm).await.expect("apply");
    h.controller.reconcile_all().await.expect("pass");
    let s = status(&h, "arm-only").await;
    assert_eq!(s.placements, counts(&[("a0", 5)]));
    let condition = scheduled(&s);
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "Unschedulable")
    );
    assert_eq!(
        condition.message,
        "3 of 8 replicas cannot be placed: 0/3 nodes are available: \
         2 node(s) didn't match the node selector, 1 too many sandboxes"
    );
    let first_transition = condition.last_transition_time.clone();
    assert!(!first_transition.is_empty());
    // Still unschedulable on the next pass: the transition time stays (how it moves when the
    // status flips is `conditions::tests`'s, with a time that cannot fall in the same second).
    assert_eq!(h.controller.reconcile_all().await.expect("pass"), 0);
    let s = status(&h, "arm-only").await;
    assert_eq!(scheduled(&s).last_transition_time, first_transition);

    // An arm64 node joins: the rest are placed and the condition flips.
    h.cluster.nodes.upsert(node("a1", "arm64", 100));
    h.controller.reconcile_all().await.expect("pass");
    let s = status(&h, "arm-only").await;
    assert_eq!(s.placements, counts(&[("a0", 5), ("a1", 3)]));
    assert_eq!(scheduled(&s).status, "True");
}

#[tokio::test]
async fn allocations_of_other_workloads_are_respected() {
    let h = harness(&[node("n0", "amd64", 10), node("n1", "amd64", 10)]);
    h.store.apply(workload("first", 15)).await.expect("apply");
    h.controller.reconcile_all().await.expect("pass");
    h.store.apply(workload("second", 10)).await.expect("apply");
    h.controller.reconcile_all().await.expect("pass");
    let second = status(&h, "second").await;
    assert_eq!(second.replicas, 5);
    assert_eq!(scheduled(&second).status, "False");
    let first = status(&h, "first").await;
    assert_eq!(
        first.replicas, 15,
        "the first workload keeps its placements"
    );
}

#[tokio::test]
async fn the_run_loop_reacts_to_applies_and_to_missed_heartbeats() {
    let h = harness(&[node("n0", "amd64", 1000), node("n1", "amd64", 1000)]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let store = h.store.clone();
    let cluster = h.cluster.clone();
    let mut watch = store.watch().await.expect("watch");
    let controller = Controller::new(
        store.clone(),
        Scheduler::new(&SchedulerConfig::default()).expect("scheduler"),
        cluster.clone(),
    );
    // Both nodes heartbeat until the first placement; then n1 falls silent.
    let beating = Arc::new(std::sync::Mutex::new(vec!["n0", "n1"]));
    let beat = {
        let (cluster, beating) = (cluster.clone(), beating.clone());
        tokio::spawn(async move {
            loop {
                let names = beating.lock().map(|b| b.clone()).unwrap_or_default();
                for name in names {
                    cluster.nodes.heartbeat(name);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let task = tokio::spawn(controller.run(Duration::from_millis(300), async {
        let _ = stopped.await;
    }));

    store.apply(workload("web", 10)).await.expect("apply");
    let placed = wait_for(&mut watch, |s| s.replicas == 10).await;
    assert_eq!(placed.placements.len(), 2, "{:?}", placed.placements);

    // n1's replicas move to n0 once it misses its heartbeats.
    if let Ok(mut b) = beating.lock() {
        b.retain(|n| *n == "n0");
    }
    let moved = wait_for(&mut watch, |s| s.placements == counts(&[("n0", 10)])).await;
    assert_eq!(moved.replicas, 10);
    beat.abort();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the controller stops")
        .expect("no panic");
}

fn condition<'a>(status: &'a WorkloadStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[tokio::test]
async fn progressing_turns_false_when_the_template_misses_its_deadline() {
    let h = harness(&[node("n0", "amd64", 1000)]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut watch = h.store.watch().await.expect("watch");
    let controller = Controller::new(
        h.store.clone(),
        Scheduler::new(&SchedulerConfig::default()).expect("scheduler"),
        h.cluster.clone(),
    );
    let task = tokio::spawn(controller.run(Duration::from_secs(30), async {
        let _ = stopped.await;
    }));
    let mut web = workload("web", 2);
    web.spec.progress_deadline_seconds = Some(1);
    h.store.apply(web).await.expect("apply");
    let updating = wait_for(&mut watch, |s| {
        condition(s, PROGRESSING).is_some_and(|c| c.reason == "ReplicasUpdating")
    })
    .await;
    assert!(!updating.template_time.is_empty());
    assert!(!updating.progress_time.is_empty());
    // Nothing reports the replicas running and nothing else changes: the deadline alone
    // brings the pass that says so.
    let exceeded = wait_for(&mut watch, |s| {
        condition(s, PROGRESSING).is_some_and(|c| c.status == "False")
    })
    .await;
    let progressing = condition(&exceeded, PROGRESSING).expect("Progressing");
    assert_eq!(progressing.reason, "ProgressDeadlineExceeded");
    assert_eq!(
        progressing.message,
        "0 of 2 replicas of revision 1 available, no progress for 1s"
    );
    // The replicas come up: progress is made after all.
    let key = "default/web".to_string();
    h.cluster.nodes.report(
        "n0",
        [(
            (key, 1),
            crate::cluster::Reported {
                generation: 1,
                running: 2,
                available: 2,
                succeeded: 0,
            },
        )]
        .into(),
    );
    let available = wait_for(&mut watch, |s| {
        condition(s, PROGRESSING).is_some_and(|c| c.reason == "TemplateAvailable")
    })
    .await;
    assert_eq!(available.available_replicas, 2);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the controller stops")
        .expect("no panic");
}

async fn wait_for(
    watch: &mut crate::store::Watch,
    pred: impl Fn(&WorkloadStatus) -> bool,
) -> WorkloadStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("status within 10 s")
            .expect("watch open")
            .expect("event");
        let candidates = match event {
            WatchEvent::Applied(w) => vec![w],
            WatchEvent::Restarted(all) => all,
            WatchEvent::Deleted(_) => vec![],
        };
        for w in candidates {
            if let Some(status) = w.status
                && pred(&status)
            {
                return status;
            }
        }
    }
}

#[tokio::test]
async fn after_a_restart_placements_wait_for_their_nodes_during_the_grace_period() {
    // The first control plane placed the replicas on n0 and n1.
    let before = harness(&[node("n0", "amd64", 1000), node("n1", "amd64", 1000)]);
    before
        .store
        .apply(workload("web", 10))
        .await
        .expect("apply");
    before.controller.reconcile_all().await.expect("pass");
    let placed = status(&before, "web").await.placements;
    assert_eq!(placed, counts(&[("n0", 5), ("n1", 5)]));

    // Restarted: only n0 has reconnected so far. Within the grace period n1 keeps its share.
    let registry = Arc::new(Cluster::default());
    registry.nodes.upsert(node("n0", "amd64", 1000));
    let scheduler = || Scheduler::new(&SchedulerConfig::default()).expect("scheduler");
    let restarted = Controller::new(before.store.clone(), scheduler(), registry.clone())
        .with_startup_grace(Duration::from_secs(3600));
    restarted.reconcile_all().await.expect("pass");
    assert_eq!(status(&before, "web").await.placements, placed);

    // Once the grace period is over, a node that never came back is lost.
    let expired = Controller::new(before.store.clone(), scheduler(), registry)
        .with_startup_grace(Duration::ZERO);
    expired.reconcile_all().await.expect("pass");
    assert_eq!(
        status(&before, "web").await.placements,
        counts(&[("n0", 10)])
    );
}

#[test]
fn progress_is_a_new_revision_more_of_it_placed_or_available_or_fewer_old_sandboxes() {
    let status = |revision: u64, updated: u64, all: u64, available: u64| WorkloadStatus {
        revision,
        updated_replicas: updated,
        replicas: all,
        revisions: vec![crate::model::RevisionStatus {
            revision,
            available_replicas: available,
            ..Default::default()
        }],
        ..WorkloadStatus::default()
    };
    let before = status(2, 4, 10, 2);
    assert!(
        !made_progress(Some(&before), &status(2, 4, 10, 2)),
        "nothing moved"
    );
    assert!(
        made_progress(Some(&before), &status(2, 5, 11, 2)),
        "one more placed"
    );
    assert!(
        made_progress(Some(&before), &status(2, 4, 10, 3)),
        "one more available"
    );
    assert!(
        made_progress(Some(&before), &status(2, 4, 9, 2)),
        "one old one fewer"
    );
    assert!(
        made_progress(Some(&before), &status(3, 0, 10, 0)),
        "a new revision"
    );
    assert!(
        !made_progress(Some(&before), &status(2, 4, 10, 1)),
        "one less available"
    );
    assert!(made_progress(None, &before), "a first status");
}

/// The embedded store, except that writing the status of workload `poisoned` panics, and that
/// workload `vanishing` is deleted just before its status is written, as by a user's delete
/// racing the pass.
#[derive(Clone)]
struct PanickingStore {
    inner: EmbeddedStore,
    poisoned: &'static str,
    vanishing: &'static str,
}

impl WorkloadStore for PanickingStore {
    async fn get(&self, key: &WorkloadKey) -> Result<Option<Workload>, store::Error> {
        self.inner.get(key).await
    }
    async fn list(&self) -> Result<Vec<Workload>, store::Error> {
        self.inner.list().await
    }
    async fn apply(&self, workload: Workload) -> Result<Workload, store::Error> {
        self.inner.apply(workload).await
    }
    async fn delete(&self, key: &WorkloadKey) -> Result<Option<Workload>, store::Error> {
        self.inner.delete(key).await
    }
    async fn patch_status(
        &self,
        key: &WorkloadKey,
        status: WorkloadStatus,
    ) -> Result<Workload, store::Error> {
        assert_ne!(
            key.name, self.poisoned,
            "a bug in this workload's reconcile"
        );
        if key.name == self.vanishing {
            self.inner.set_finalizers(key, Vec::new(), "").await?;
            self.inner.delete(key).await?;
        }
        self.inner.patch_status(key, status).await
    }
    async fn set_finalizers(
        &self,
        key: &WorkloadKey,
        finalizers: Vec<String>,
        resource_version: &str,
    ) -> Result<Option<Workload>, store::Error> {
        self.inner
            .set_finalizers(key, finalizers, resource_version)
            .await
    }
    async fn watch(&self) -> Result<crate::store::Watch, store::Error> {
        self.inner.watch().await
    }
}

#[tokio::test]
async fn a_workload_whose_reconcile_panics_stops_no_other() {
    let h = harness(&[node("n0", "amd64", 1000)]);
    let store = PanickingStore {
        inner: h.store.clone(),
        poisoned: "evil",
        vanishing: "",
    };
    let controller = Controller::new(
        store,
        Scheduler::new(&SchedulerConfig::default()).expect("scheduler"),
        h.cluster.clone(),
    );
    let mut notices = h.cluster.events.notices();
    // "evil" sorts before "web", so a pass that stopped at it would never reach "web".
    h.store.apply(workload("evil", 1)).await.expect("apply");
    h.store.apply(workload("web", 2)).await.expect("apply");

    for _ in 0..2 {
        let error = controller
            .reconcile_all()
            .await
            .expect_err("the poisoned workload fails the pass");
        assert!(
            matches!(&error, Error::Panicked { workload, message }
                if workload == "default/evil" && message.contains("a bug in this workload")),
            "{error:?}"
        );
        let s = status(&h, "web").await;
        assert_eq!(s.placements, counts(&[("n0", 2)]));
    }
    let metrics = h.cluster.encode_metrics();
    assert!(
        metrics.contains("flotilla_control_plane_reconcile_errors_total{reason=\"Panicked\"} 2"),
        "{metrics}"
    );
    let notice = std::iter::from_fn(|| notices.try_recv().ok())
        .find(|n| n.reason == "ReconcileFailed")
        .expect("a ReconcileFailed event");
    assert_eq!(notice.key, "default/evil");
    assert!(notice.warning);
}

/// A counter's value in the control plane's metrics.
fn metric(cluster: &Cluster, series: &str) -> u64 {
    let metrics = cluster.encode_metrics();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_failing_workload_is_retried_alone_with_backoff_while_the_others_settle() {
    let h = harness(&[node("n0", "amd64", 1000)]);
    let store = PanickingStore {
        inner: h.store.clone(),
        poisoned: "evil",
        vanishing: "",
    };
    h.store.apply(workload("evil", 1)).await.expect("apply");
    h.store.apply(workload("web", 2)).await.expect("apply");
    let controller = Controller::new(
        store,
        Scheduler::new(&SchedulerConfig::default()).expect("scheduler"),
        h.cluster.clone(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(Duration::from_secs(60), async {
        let _ = stopped.await;
    }));
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let web = h.store.get(&WorkloadKey::new("", "web")).await;
            if web
                .ok()
                .flatten()
                .and_then(|w| w.status)
                .is_some_and(|s| s.replicas == 2)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("web is placed although evil fails");
    tokio::time::sleep(Duration::from_millis(300)).await;

    const RECONCILES: &str = "flotilla_control_plane_reconciles_total";
    const PANICS: &str = "flotilla_control_plane_reconcile_errors_total{reason=\"Panicked\"}";
    let (reconciles, panics) = (metric(&h.cluster, RECONCILES), metric(&h.cluster, PANICS));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retried = metric(&h.cluster, PANICS) - panics;
    assert!(retried >= 1, "evil is retried");
    // Backoff from 100 ms, doubling: a handful of retries in 1.5 s, not a busy loop.
    assert!(retried <= 8, "{retried} retries in 1.5 s");
    assert_eq!(
        metric(&h.cluster, RECONCILES) - reconciles,
        retried,
        "each retry reconciles evil alone, never web"
    );
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the controller stops")
        .expect("no panic");
}

#[test]
fn a_deadline_past_the_clock_is_no_deadline_rather_than_a_panic() {
    // Validation refuses such a value now; an object stored before it did must still pass.
    let mut web = workload("web", 1);
    web.spec.progress_deadline_seconds = Some(i64::MAX);
    let status = WorkloadStatus {
        template_time: now(),
        ..WorkloadStatus::default()
    };
    let (condition, deadline) = progressing_condition(&web, &status, 1, 0, SystemTime::now());
    assert_eq!(condition.reason, "ReplicasUpdating");
    assert_eq!(deadline, None);
}

#[tokio::test]
async fn the_store_refuses_durations_past_their_ceiling() {
    let h = harness(&[]);
    let mut web = workload("web", 1);
    web.spec.progress_deadline_seconds = Some(i64::MAX);
    let error = h.store.apply(web).await.expect_err("refused");
    let store::Error::Invalid(invalid) = error else {
        panic!("not a validation error: {error:?}");
    };
    assert!(
        invalid
            .to_string()
            .contains("spec.progressDeadlineSeconds: must be <= 2147483647"),
        "{invalid}"
    );
}

#[tokio::test]
async fn a_workload_deleted_during_a_pass_is_no_error() {
    let h = harness(&[node("n0", "amd64", 1000)]);
    let store = PanickingStore {
        inner: h.store.clone(),
        poisoned: "",
        vanishing: "brief",
    };
    let controller = Controller::new(
        store,
        Scheduler::new(&SchedulerConfig::default()).expect("scheduler"),
        h.cluster.clone(),
    );
    h.store.apply(workload("brief", 1)).await.expect("apply");
    h.store.apply(workload("web", 2)).await.expect("apply");
    let written = controller
        .reconcile_all()
        .await
        .expect("a pass without error");
    assert_eq!(
        written, 1,
        "web's status, and nothing for the deleted workload"
    );
    assert_eq!(status(&h, "web").await.placements, counts(&[("n0", 2)]));
    assert!(
        h.store
            .get(&WorkloadKey::new("", "brief"))
            .await
            .expect("get")
            .is_none()
    );
    assert_eq!(
        metric(
            &h.cluster,
            "flotilla_control_plane_reconcile_errors_total{reason=\"Store\"}"
        ),
        0
    );
}

#[test]
fn a_pass_writes_one_workload_of_each_namespace_in_turn() {
    let keys = [
        "burst/a",
        "burst/b",
        "burst/c",
        "burst/d",
        "default/x",
        "other/y",
        "other/z",
    ];
    let order = interleave_namespaces(keys.to_vec(), |key| {
        key.split_once('/').map_or("", |(namespace, _)| namespace)
    });
    assert_eq!(
        order,
        [
            "burst/a",
            "default/x",
            "other/y",
            "burst/b",
            "other/z",
            "burst/c",
            "burst/d",
        ]
    );
    assert!(interleave_namespaces(Vec::<&str>::new(), |k| k).is_empty());
}
