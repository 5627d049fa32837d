//! The controller: keeps every workload's placements in line with its spec and the live nodes.
//!
//! A pass lists the workloads, rebuilds what each node has allocated from the placements in
//! their status, and for each workload drops replicas on nodes that are gone or not ready,
//! removes surplus replicas from the most loaded nodes, and places missing ones with the
//! [`Scheduler`]. It writes `status.placements`, `status.replicas`, `observedGeneration` and the
//! `Scheduled` condition (with the scheduler's reasons when replicas do not fit) only when they
//! change, so its own writes settle after one more pass.
//!
//! Status carries the conditions `Scheduled`, `Ready` (with the latest sandbox failure when not
//! ready), `Available` and `Progressing`, as a Deployment's do.
//!
//! Every workload gets the [`FINALIZER`]: deleting it first empties its placements, so agents
//! stop its sandboxes, and the finalizer goes (and with it the workload) once no ready node
//! reports one running.
//!
//! The controller reconciles per workload, as kube-runtime's `Controller` does: a work queue
//! holds the workloads to reconcile ([`run`](Controller::run) marks them as the store, nodes
//! and agents' reports change), each reconcile ends in an [`Action`], and a failure goes to
//! `error_policy`, which retries that workload alone with jittered backoff. Placement stays a
//! batch over the whole snapshot: a [`pass`](Controller::pass) reconciles the queued workloads
//! against every workload's allocations.
//!
//! | file | concept |
//! |------|---------|
//! | `queue.rs` | the work queue: marks, requeues, per-workload backoff |
//! | `run.rs` | the loop: what marks which workloads, when a pass runs |
//! | `rollout.rs` | revisions and the update strategies' targets |
//! | `conditions.rs` | `Ready`, `Available`, `Progressing` |
//!
//! # Guarantees
//! - A pass is idempotent: a second pass over unchanged input writes nothing.
//! - One workload's failure, even a panic, delays that workload alone.
//! - Replicas are only moved off a node when it is gone or not ready; scaling down takes from
//!   gone, then unready, then the most loaded nodes.
//! - After a restart, nodes named in placements but not yet reconnected keep their replicas for
//!   a startup grace period, so restarting the control plane restarts no sandbox.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{FutureExt, StreamExt};
use tracing::Instrument;

use self::conditions::{
    available_condition, made_progress, now, progressing_condition, ready_condition, set_condition,
};
use self::queue::WorkQueue;
pub use self::queue::{Action, Batch};
use self::rollout::Revisions;
use crate::cluster::routes::{route_of, serving_ingresses};
use crate::cluster::{Cluster, Counts, Notice};
use crate::model::{Condition, Requests, RevisionStatus, Strategy, Workload, WorkloadStatus};
use crate::scheduler::framework::{NodeInfo, WorkloadRequest};
use crate::scheduler::{PluginError, Scheduler};
use crate::store::{self, WorkloadStore};

/// The condition saying whether every replica has a node.
pub(crate) const SCHEDULED: &str = "Scheduled";

/// The condition saying whether every replica runs (or, for run-to-completion workloads, has
/// completed), and if not, the latest failure agents reported.
pub(crate) const READY: &str = "Ready";

/// The condition saying whether the wanted replicas are available, as a Deployment's.
pub(crate) const AVAILABLE: &str = "Available";

/// The condition saying whether the workload's current template is rolled out or on its way.
pub(crate) const PROGRESSING: &str = "Progressing";

/// Held by every workload until its sandboxes have stopped.
pub(crate) const FINALIZER: &str = "flotilla.dev/sandboxes";

/// `progressDeadlineSeconds` when a workload sets none, as for a Deployment.
pub(crate) const DEFAULT_PROGRESS_DEADLINE_SECONDS: u64 = 600;

/// First wait before a failed pass runs again; it doubles up to [`MAX_REQUEUE_DELAY`].
pub(crate) const MIN_REQUEUE_DELAY: Duration = Duration::from_millis(100);
/// Longest wait before a failed pass runs again.
pub(crate) const MAX_REQUEUE_DELAY: Duration = Duration::from_secs(10);

/// Status writes of one pass in flight at once: enough for a store to commit a burst together,
/// few enough not to flood a Kubernetes API server.
const MAX_CONCURRENT_WRITES: usize = 32;

/// How often a workload whose host another namespace holds is looked at again.
const HOST_CONFLICT_RETRY: Duration = Duration::from_secs(5);

/// Longest wait for a progress deadline before a pass looks at it again.
const MAX_DEADLINE_WAIT: Duration = Duration::from_secs(3600);

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the store failed.
    #[error("reconciling workloads")]
    Store(#[from] store::Error),
    /// A scheduler plugin failed.
    #[error("scheduling workload {workload}")]
    Schedule {
        /// The workload.
        workload: String,
        /// The cause.
        #[source]
        source: PluginError,
    },
    /// Reconciling one workload panicked; the pass went on with the others.
    #[error("reconciling workload {workload} panicked: {message}")]
    Panicked {
        /// The workload.
        workload: String,
        /// The panic's message.
        message: String,
    },
}

impl Error {
    /// The variant, as the `reason` label of the error metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Store(_) => "Store",
            Self::Schedule { .. } => "Schedule",
            Self::Panicked { .. } => "Panicked",
        }
    }
}

/// Reconciles workloads against nodes.
pub struct Controller<S> {
    store: S,
    scheduler: Scheduler,
    cluster: Arc<Cluster>,
    /// Until then, placements on nodes the registry does not know yet are kept.
    grace_until: Option<Instant>,
    /// Which workloads the next pass reconciles, and when.
    queue: std::sync::Mutex<WorkQueue>,
}

/// One pass's node snapshot, agents' reports and totals, shared by its workloads in turn.
struct Pass {
    /// Every node, with what the placements in the store allocate on it.
    nodes: Vec<NodeInfo>,
    /// Position of each node in `nodes` by name.
    index: BTreeMap<String, usize>,
    /// Sandboxes agents report, per workload key and generation.
    running: BTreeMap<String, BTreeMap<u64, Counts>>,
    /// Whether placements on nodes that have not reconnected yet are kept.
    in_grace: bool,
    /// Statuses written.
    written: usize,
    /// Replicas wanted, placed and ready over every workload.
    desired: u64,
    placed: u64,
    ready: u64,
    /// The ingress routes of every HTTP workload.
    routes: Vec<flotilla_proto::control::v1::ClusterRoute>,
    /// Which namespace each claimed host belongs to.
    hosts: hosts::HostOwners,
}

impl Pass {
    /// Counts a workload this pass does not reconcile, as its stored status has it.
    fn count_unchanged(&mut self, workload: &Workload) {
        self.desired += desired_replicas(workload);
        if let Some(status) = &workload.status {
            self.placed += status.replicas;
            self.ready += status.ready_replicas;
            self.routes
                .extend(route_of(workload, status, &self.nodes, &self.index));
        }
    }
}

/// A workload reconciled in memory, waiting for [`Controller::write_back`].
struct Reconciled {
    workload: Workload,
    /// It lacks the [`FINALIZER`].
    add_finalizer: bool,
    /// Its new status, if it changed.
    status: Option<WorkloadStatus>,
    /// Deleted, placed nowhere and stopped: its finalizer goes.
    release: bool,
    /// When to reconcile it again.
    action: Action,
}

/// What a pass did.
pub struct PassReport {
    /// Statuses written.
    pub written: usize,
    /// Workloads reconciled.
    pub reconciled: usize,
    /// The first workload's failure, if any; each failing workload is requeued alone.
    pub first_error: Option<Error>,
}

/// A workload's outcome with a panic (caught by `catch_unwind`) turned into its error.
fn caught<T>(key: &str, outcome: std::thread::Result<Result<T, Error>>) -> Result<T, Error> {
    outcome.unwrap_or_else(|panic| {
        Err(Error::Panicked {
            workload: key.to_string(),
            message: panic_message(panic.as_ref()),
        })
    })
}

/// The message a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl<S: WorkloadStore> Controller<S> {
    /// A controller over `store` and the nodes of `cluster`.
    pub fn new(store: S, scheduler: Scheduler, cluster: Arc<Cluster>) -> Self {
        Self {
            store,
            scheduler,
            cluster,
            grace_until: None,
            queue: std::sync::Mutex::default(),
        }
    }

    /// Keeps placements on nodes that have not (re)registered yet for `grace` from now, as
    /// agents reconnect after a control-plane restart; later they count as lost.
    #[must_use]
    pub fn with_startup_grace(mut self, grace: Duration) -> Self {
        self.grace_until = Some(Instant::now() + grace);
        self
    }

    fn in_startup_grace(&self) -> bool {
        self.grace_until.is_some_and(|until| Instant::now() < until)
    }

    /// Reconciles every workload once; returns how many statuses it wrote.
    ///
    /// # Errors
    /// A store failure, or the first workload that failed; the others are reconciled.
    pub async fn reconcile_all(&self) -> Result<usize, Error> {
        let report = self.pass(&Batch::All).await?;
        match report.first_error {
            None => Ok(report.written),
            Some(error) => Err(error),
        }
    }

    /// Reconciles the workloads of `batch` over one snapshot of every workload and node, so
    /// that placement weighs what all of them allocate. Each workload's outcome goes to the
    /// queue: its [`Action`], or through `error_policy` a retry of it
    /// alone. The totals and the route table cover every workload.
    ///
    /// # Errors
    /// The store cannot list the workloads; no workload was reconciled.
    pub async fn pass(&self, batch: &Batch) -> Result<PassReport, Error> {
        let workloads = self.store.list().await?;
        let running = self.cluster.nodes.running();
        let mut nodes = self.cluster.nodes.snapshot();
        let index: BTreeMap<String, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        for workload in &workloads {
            let request = WorkloadRequest::from_workload(workload);
            let mut allocate = |placements: &BTreeMap<String, u64>, requests: &Requests| {
                for (node, &count) in placements {
                    if let Some(&i) = index.get(node) {
                        nodes[i].allocated.allocate(requests, count as i64);
                    }
                }
            };
            allocate(placements_of(workload), &request.requests);
            if let Some(status) = &workload.status {
                for old in status
                    .revisions
                    .iter()
                    .filter(|r| r.revision != status.revision)
                {
                    allocate(&old.placements, &revision_requests(old, &request));
                }
            }
        }

        let keys: std::collections::BTreeSet<String> =
            workloads.iter().map(|w| w.key().to_string()).collect();
        self.cluster.events.retain(&keys);
        if *batch == Batch::All {
            self.queue().retain(|key| keys.contains(key));
        }
        let workload_count = workloads.len();
        let hosts = hosts::HostOwners::of(&workloads);
        let mut pass = Pass {
            nodes,
            index,
            running,
            in_grace: self.in_startup_grace(),
            written: 0,
            desired: 0,
            placed: 0,
            ready: 0,
            routes: Vec::new(),
            hosts,
        };
        let mut report = PassReport {
            written: 0,
            reconciled: 0,
            first_error: None,
        };
        let mut to_write = Vec::new();
        for workload in workloads {
            let key = workload.key().to_string();
            if !batch.contains(&key) {
                pass.count_unchanged(&workload);
                continue;
            }
            report.reconciled += 1;
            // One workload's failure, even a panic, is that workload's alone.
            let span = tracing::debug_span!("reconcile", workload = %key);
            let outcome = AssertUnwindSafe(self.reconcile_workload(workload, &mut pass))
                .catch_unwind()
                .instrument(span)
                .await;
            match caught(&key, outcome) {
                Ok(reconciled) => to_write.push((key, reconciled)),
                Err(error) => {
                    self.error_policy(&key, &error);
                    report.first_error.get_or_insert(error);
                }
            }
        }
        // The pass's writes go out together, so that a store commits them together: many
        // workloads changing at once cost one commit, not one each, before the next pass. They
        // go namespace by namespace in turn, so that a tenant changing hundreds of workloads at
        // once does not put a neighbour's one write (its placement, its readiness) last.
        let to_write = interleave_namespaces(to_write, |(_, r)| &r.workload.metadata.namespace);
        let mut writes = futures::stream::iter(to_write.into_iter().map(|(key, reconciled)| {
            let span = tracing::debug_span!("write", workload = %key);
            async move {
                let outcome = AssertUnwindSafe(self.write_back(reconciled))
                    .catch_unwind()
                    .instrument(span)
                    .await;
                (key, outcome)
            }
        }))
        .buffered(MAX_CONCURRENT_WRITES);
        while let Some((key, outcome)) = writes.next().await {
            match caught(&key, outcome) {
                Ok((action, wrote)) => {
                    pass.written += usize::from(wrote);
                    self.queue().done(&key, action);
                }
                Err(error) => {
                    self.error_policy(&key, &error);
                    report.first_error.get_or_insert(error);
                }
            }
        }
        self.cluster
            .metrics
            .workloads(workload_count, pass.desired, pass.placed, pass.ready);
        pass.routes.sort_by(|a, b| a.workload.cmp(&b.workload));
        self.cluster.routes.publish(pass.routes);
        report.written = pass.written;
        Ok(report)
    }

    /// After a workload failed: retries it alone after its jittered backoff, counts the error
    /// by reason, and, for a panic (a bug, not a passing condition), tells the workload's users.
    fn error_policy(&self, key: &str, error: &Error) {
        let retry_in = self.queue().failed(key);
        tracing::warn!(workload = %key, error = %flotilla_telemetry::error_chain(error), ?retry_in, "cannot reconcile workload; the others go on");
        self.cluster.metrics.reconcile_error(error.reason());
        if let Error::Panicked { .. } = error {
            self.cluster.events.notify(Notice {
                key: key.to_string(),
                warning: true,
                reason: "ReconcileFailed".into(),
                message: error.to_string(),
            });
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, WorkQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reconciles one workload of `pass`: its placements, counts and conditions, and what
    /// [`write_back`](Self::write_back) then writes.
    async fn reconcile_workload(
        &self,
        workload: Workload,
        pass: &mut Pass,
    ) -> Result<Reconciled, Error> {
        let terminating = !workload.metadata.deletion_timestamp.is_empty();
        let key = workload.key().to_string();
        let in_grace = pass.in_grace;
        let no_reports = BTreeMap::new();
        let reported = pass.running.get(&key).unwrap_or(&no_reports);
        let conflict = pass.hosts.conflict(&workload);
        let mut status = self.reconcile(
            &workload,
            &mut pass.nodes,
            &pass.index,
            in_grace,
            reported,
            conflict.as_deref(),
        )?;
        self.notice_scheduling(&workload, &status);
        // Sandboxes of every revision that agents report running; while agents are still
        // reconnecting, a count does not drop for want of their reports.
        let mut ready: u64 = status.revisions.iter().map(|r| r.ready_replicas).sum();
        // Running for the workload's minReadySeconds, as the agents count it.
        let mut available: u64 = status.revisions.iter().map(|r| r.available_replicas).sum();
        let mut succeeded = reported
            .get(&status.template_generation)
            .map_or(0, |c| c.succeeded);
        if in_grace {
            ready = ready.max(status.ready_replicas).min(status.replicas);
            available = available
                .max(status.available_replicas)
                .min(status.replicas);
            succeeded = succeeded
                .max(status.succeeded_replicas)
                .min(status.replicas);
        }
        status.ready_replicas = ready;
        status.available_replicas = available;
        status.succeeded_replicas = succeeded;
        let latest_failure = self.cluster.events.latest(&key, status.template_generation);
        let wanted = desired_replicas(&workload);
        set_condition(
            &mut status.conditions,
            ready_condition(wanted, ready, succeeded, latest_failure),
        );
        let default_strategy = Strategy::default();
        let strategy = workload.spec.strategy.as_ref().unwrap_or(&default_strategy);
        let min_available = strategy.min_available(wanted);
        set_condition(
            &mut status.conditions,
            available_condition(wanted, min_available, available + succeeded),
        );
        let updated_available =
            status.revisions.first().map_or(0, |r| r.available_replicas) + succeeded;
        if made_progress(workload.status.as_ref(), &status) {
            status.progress_time = now();
        }
        let (progressing, deadline) = progressing_condition(
            &workload,
            &status,
            wanted,
            updated_available,
            SystemTime::now(),
        );
        set_condition(&mut status.conditions, progressing);
        // A deadline still running is looked at again when it passes (a far one within the
        // hour, so no timer is ever set past what the clock can hold).
        let mut action = deadline.map_or(Action::AwaitChange, |deadline| {
            let wait = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(MAX_DEADLINE_WAIT);
            Action::RequeueAfter(wait + Duration::from_millis(10))
        });
        // A host held by another namespace may be let go: looked at again until it is.
        if conflict.is_some() {
            action = match action {
                Action::RequeueAfter(wait) => Action::RequeueAfter(wait.min(HOST_CONFLICT_RETRY)),
                _ => Action::RequeueAfter(HOST_CONFLICT_RETRY),
            };
        }
        pass.desired += wanted;
        pass.placed += status.replicas;
        pass.ready += ready;
        let placed_nowhere = status.replicas == 0;
        pass.routes
            .extend(route_of(&workload, &status, &pass.nodes, &pass.index));
        let still_running = pass
            .running
            .get(&key)
            .is_some_and(|generations| generations.values().any(|c| c.running > 0));
        let status = (workload.status.as_ref() != Some(&status)).then_some(status);
        Ok(Reconciled {
            add_finalizer: !terminating
                && !workload.metadata.finalizers.iter().any(|f| f == FINALIZER),
            release: terminating && placed_nowhere && !still_running,
            workload,
            status,
            action,
        })
    }

    /// Writes what reconciling a workload decided: its finalizer, then its status if it
    /// changed, then its release; returns its [`Action`] and whether a status was written.
    async fn write_back(&self, reconciled: Reconciled) -> Result<(Action, bool), Error> {
        let Reconciled {
            workload,
            add_finalizer,
            status,
            release,
            action,
        } = reconciled;
        if add_finalizer {
            self.add_finalizer(&workload).await?;
        }
        let mut version = workload.metadata.resource_version.clone();
        let wrote = status.is_some();
        if let Some(status) = status {
            match self.store.patch_status(&workload.key(), status).await {
                Ok(written_back) => version = written_back.metadata.resource_version,
                // Deleted since the pass listed it (before it had a finalizer): nothing to do.
                Err(store::Error::NotFound(_)) => return Ok((Action::AwaitChange, false)),
                Err(error) => return Err(error.into()),
            }
        }
        if release {
            self.release(&workload, &version).await?;
        }
        Ok((action, wrote))
    }

    /// At the end of the startup grace: which nodes with replicas never came back.
    async fn log_unreturned_nodes(&self) {
        let Ok(workloads) = self.store.list().await else {
            return;
        };
        let known: std::collections::BTreeSet<String> =
            self.cluster.nodes.names().into_iter().collect();
        let missing: std::collections::BTreeSet<&String> = workloads
            .iter()
            .flat_map(|w| placements_of(w).keys())
            .filter(|node| !known.contains(*node))
            .collect();
        if missing.is_empty() {
            tracing::info!("startup grace over; every node with replicas reconnected");
        } else {
            tracing::warn!(nodes = ?missing, "startup grace over; these nodes did not reconnect and their replicas move");
        }
    }

    /// Tells users when the `Scheduled` condition changes: a new replica count placed, or why
    /// replicas cannot be.
    fn notice_scheduling(&self, workload: &Workload, status: &WorkloadStatus) {
        let find = |status: Option<&WorkloadStatus>| {
            status
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == SCHEDULED))
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        let Some(now) = find(Some(status)) else {
            return;
        };
        if find(workload.status.as_ref()).as_ref() == Some(&now) {
            return;
        }
        let (condition, reason, message) = now;
        let warning = condition != "True";
        self.cluster.events.notify(Notice {
            key: workload.key().to_string(),
            warning,
            reason: if warning { reason } else { "Scheduled".into() },
            message,
        });
    }

    /// Adds [`FINALIZER`]; a conflict (the workload changed meanwhile) waits for the next pass.
    async fn add_finalizer(&self, workload: &Workload) -> Result<(), Error> {
        let mut finalizers = workload.metadata.finalizers.clone();
        finalizers.push(FINALIZER.into());
        match self
            .store
            .set_finalizers(
                &workload.key(),
                finalizers,
                &workload.metadata.resource_version,
            )
            .await
        {
            Ok(_) | Err(store::Error::Conflict { .. } | store::Error::NotFound(_)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Removes [`FINALIZER`] from a deleted workload whose sandboxes have stopped, which lets
    /// the store delete it.
    async fn release(&self, workload: &Workload, version: &str) -> Result<(), Error> {
        let finalizers: Vec<String> = workload
            .metadata
            .finalizers
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        if finalizers.len() == workload.metadata.finalizers.len() {
            return Ok(());
        }
        match self
            .store
            .set_finalizers(&workload.key(), finalizers, version)
            .await
        {
            Ok(_) => {
                tracing::info!(workload = %workload.key(), "sandboxes stopped; workload released");
                Ok(())
            }
            Err(store::Error::Conflict { .. } | store::Error::NotFound(_)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Computes a workload's next status, updating `nodes`' allocations with its changes:
    /// replicas on lost nodes dropped, and each revision scaled to the targets of the update
    /// strategy (see [`rollout`]), given what agents `reported` per generation.
    fn reconcile(
        &self,
        workload: &Workload,
        nodes: &mut [NodeInfo],
        index: &BTreeMap<String, usize>,
        in_grace: bool,
        reported: &BTreeMap<u64, Counts>,
        host_conflict: Option<&str>,
    ) -> Result<WorkloadStatus, Error> {
        let request = WorkloadRequest::from_workload(workload);
        let mut revisions = Revisions::load(workload, &template_hash(&workload.spec));

        // Replicas on nodes that are gone or not ready are lost; place them again.
        let mut drop_lost = |placements: &mut BTreeMap<String, u64>, requests: &Requests| {
            placements.retain(|node, count| match index.get(node) {
                Some(&i) if nodes[i].ready => true,
                Some(&i) => {
                    nodes[i].allocated.allocate(requests, -(*count as i64));
                    false
                }
                None => in_grace,
            });
        };
        drop_lost(&mut revisions.current.placements, &request.requests);
        for old in &mut revisions.old {
            let requests = revision_requests(old, &request);
            drop_lost(&mut old.placements, &requests);
        }

        // A workload whose host another namespace holds keeps no replica.
        let desired = if host_conflict.is_some() {
            0
        } else {
            desired_replicas(workload)
        };
        let targets = rollout::targets(&workload.spec, desired, &revisions, reported);
        // Old sandboxes first: what they free, new ones may take.
        for (old, target) in revisions.old.iter_mut().zip(targets.old) {
            let placed = rollout::placed(old);
            if target < placed {
                let old_request = WorkloadRequest {
                    requests: revision_requests(old, &request),
                    ..request.clone()
                };
                self.remove(
                    &old_request,
                    &mut old.placements,
                    placed - target,
                    nodes,
                    index,
                );
            }
        }
        let placed = rollout::placed(&revisions.current);
        let mut unschedulable = None;
        if placed > targets.current {
            let placements = &mut revisions.current.placements;
            self.remove(&request, placements, placed - targets.current, nodes, index);
        } else if placed < targets.current {
            let placement = self
                .scheduler
                .schedule(
                    &request,
                    nodes,
                    &revisions.current.placements,
                    targets.current - placed,
                )
                .map_err(|source| Error::Schedule {
                    workload: request.key.clone(),
                    source,
                })?;
            for (node, count) in placement.assigned {
                if let Some(&i) = index.get(&node) {
                    nodes[i].allocated.allocate(&request.requests, count as i64);
                }
                *revisions.current.placements.entry(node).or_default() += count;
            }
            if placement.unschedulable > 0 {
                unschedulable = Some((placement.unschedulable, placement.message));
            }
        }
        revisions.trim_history(&workload.spec, reported);

        let mut status = workload.status.clone().unwrap_or_default();
        if revisions.changed {
            status.template_time = now();
        }
        status.template_generation = revisions.current.generation;
        status.template_hash = revisions.current.template_hash.clone();
        status.revision = revisions.current.revision;
        status.placements = std::mem::take(&mut revisions.current.placements);
        status.updated_replicas = status.placements.values().sum();
        status.replicas = status.updated_replicas + revisions.old_placed();
        status.revisions = std::iter::once(revisions.current)
            .chain(revisions.old)
            .map(|mut revision| {
                let counts = reported
                    .get(&revision.generation)
                    .copied()
                    .unwrap_or_default();
                revision.replicas = if revision.revision == status.revision {
                    status.updated_replicas
                } else {
                    rollout::placed(&revision)
                };
                revision.ready_replicas = counts.running;
                revision.available_replicas = counts.available.min(counts.running);
                revision
            })
            .collect();
        status.endpoints = match &workload.spec.http {
            Some(http) => serving_ingresses(&status.all_placements(), nodes, index)
                .into_iter()
                .map(|url| format!("{url}{}", http.path_prefix()))
                .collect(),
            None => Vec::new(),
        };
        status.observed_generation = workload.metadata.generation;
        let condition = match (host_conflict, unschedulable) {
            (Some(message), _) => Condition {
                type_: SCHEDULED.into(),
                status: "False".into(),
                reason: "HostConflict".into(),
                message: message.to_string(),
                last_transition_time: String::new(),
            },
            (None, None) => Condition {
                type_: SCHEDULED.into(),
                status: "True".into(),
                reason: "AllReplicasScheduled".into(),
                message: format!("{} of {desired} replicas placed", status.updated_replicas),
                last_transition_time: String::new(),
            },
            (None, Some((count, message))) => Condition {
                type_: SCHEDULED.into(),
                status: "False".into(),
                reason: "Unschedulable".into(),
                message: format!(
                    "{count} of {desired} replicas cannot be placed: {}",
                    message.unwrap_or_default()
                ),
                last_transition_time: String::new(),
            },
        };
        set_condition(&mut status.conditions, condition);
        Ok(status)
    }

    /// Removes `count` replicas from `placements`, from the most loaded nodes first.
    fn remove(
        &self,
        request: &WorkloadRequest,
        placements: &mut BTreeMap<String, u64>,
        count: u64,
        nodes: &mut [NodeInfo],
        index: &BTreeMap<String, usize>,
    ) {
        let removals = self
            .scheduler
            .select_removals(request, nodes, placements, count);
        for (node, count) in removals {
            if let Some(left) = placements.get_mut(&node) {
                *left -= count;
            }
            if let Some(&i) = index.get(&node) {
                nodes[i]
                    .allocated
                    .allocate(&request.requests, -(count as i64));
            }
        }
        placements.retain(|_, count| *count > 0);
    }
}

/// `items` reordered to take one of each namespace in turn (namespaces in order of first
/// appearance, each one's items in their order), so that the many items of one namespace do not
/// all go before another namespace's few.
fn interleave_namespaces<T>(items: Vec<T>, namespace: impl Fn(&T) -> &str) -> Vec<T> {
    let total = items.len();
    let mut queues: Vec<VecDeque<T>> = Vec::new();
    let mut queue_of: HashMap<String, usize> = HashMap::new();
    for item in items {
        let i = *queue_of
            .entry(namespace(&item).to_string())
            .or_insert_with(|| {
                queues.push(VecDeque::new());
                queues.len() - 1
            });
        queues[i].push_back(item);
    }
    let mut out = Vec::with_capacity(total);
    while !queues.is_empty() {
        queues.retain_mut(|queue| {
            out.extend(queue.pop_front());
            !queue.is_empty()
        });
    }
    out
}

/// A digest of what agents run for `spec`: all of it but the replica count, the placement
/// rules and how updates proceed, so that scaling, moving replicas or changing the strategy
/// keeps the template (and the sandboxes) as they are.
pub(crate) fn template_hash(spec: &crate::model::WorkloadSpec) -> String {
    use sha2::Digest;
    let mut template = spec.clone();
    template.replicas = 0;
    template.node_selector.clear();
    template.tolerations.clear();
    template.strategy = None;
    template.revision_history_limit = None;
    template.progress_deadline_seconds = None;
    // Field order and map order are fixed, so the JSON is canonical.
    let json = serde_json::to_vec(&template).unwrap_or_default();
    hex::encode(&sha2::Sha256::digest(&json)[..8])
}

/// Replicas wanted now: the spec's, or none once the workload is being deleted.
fn desired_replicas(workload: &Workload) -> u64 {
    if workload.metadata.deletion_timestamp.is_empty() {
        u64::try_from(workload.spec.replicas).unwrap_or(0)
    } else {
        0
    }
}

/// The requests of one of `revision`'s sandboxes; `current`'s when it has no template.
fn revision_requests(revision: &RevisionStatus, current: &WorkloadRequest) -> Requests {
    revision
        .template
        .as_ref()
        .map_or(current.requests, |t| t.requests())
}

fn placements_of(workload: &Workload) -> &BTreeMap<String, u64> {
    static EMPTY: BTreeMap<String, u64> = BTreeMap::new();
    workload.status.as_ref().map_or(&EMPTY, |s| &s.placements)
}

mod conditions;
mod hosts;
mod queue;
mod rollout;
mod run;

#[cfg(test)]
mod kube_tests;
#[cfg(test)]
mod tests;
