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
//! [`Controller::run`] runs a pass on every store change and node change (coalescing bursts),
//! and expires nodes that missed their heartbeats.
//!
//! # Guarantees
//! - A pass is idempotent: a second pass over unchanged input writes nothing.
//! - Replicas are only moved off a node when it is gone or not ready; scaling down takes from
//!   gone, then unready, then the most loaded nodes.
//! - After a restart, nodes named in placements but not yet reconnected keep their replicas for
//!   a startup grace period, so restarting the control plane restarts no sandbox.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use tracing::Instrument;

use self::rollout::Revisions;
use crate::cluster::routes::{route_of, serving_ingresses};
use crate::cluster::{Cluster, Counts, Notice};
use crate::model::{Condition, Requests, RevisionStatus, Strategy, Workload, WorkloadStatus};
use crate::scheduler::framework::{NodeInfo, WorkloadRequest};
use crate::scheduler::{PluginError, Scheduler};
use crate::store::{self, WorkloadStore};

/// The condition saying whether every replica has a node.
pub const SCHEDULED: &str = "Scheduled";

/// The condition saying whether every replica runs (or, for run-to-completion workloads, has
/// completed), and if not, the latest failure agents reported.
pub const READY: &str = "Ready";

/// The condition saying whether the wanted replicas are available, as a Deployment's.
pub const AVAILABLE: &str = "Available";

/// The condition saying whether the workload's current template is rolled out or on its way.
pub const PROGRESSING: &str = "Progressing";

/// Held by every workload until its sandboxes have stopped.
pub const FINALIZER: &str = "flotilla.dev/sandboxes";

/// `progressDeadlineSeconds` when a workload sets none, as for a Deployment.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: u64 = 600;

/// First wait before a failed pass runs again; it doubles up to [`MAX_REQUEUE_DELAY`].
pub const MIN_REQUEUE_DELAY: Duration = Duration::from_millis(100);
/// Longest wait before a failed pass runs again.
pub const MAX_REQUEUE_DELAY: Duration = Duration::from_secs(10);

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
    /// The earliest progress deadline still running after the last pass: a pass then runs
    /// even if nothing else changes.
    next_deadline: std::sync::Mutex<Option<SystemTime>>,
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
    /// The earliest progress deadline still running.
    next_deadline: Option<SystemTime>,
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
            next_deadline: std::sync::Mutex::new(None),
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
    /// A store failure or a failing plugin; workloads before it are reconciled.
    pub async fn reconcile_all(&self) -> Result<usize, Error> {
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

        let keys = workloads.iter().map(|w| w.key().to_string()).collect();
        self.cluster.events.retain(&keys);
        let workload_count = workloads.len();
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
            next_deadline: None,
        };
        // One workload's failure, even a panic, skips that workload alone: the others are
        // reconciled, and the pass is retried with backoff.
        let mut first_error = None;
        for workload in workloads {
            let key = workload.key().to_string();
            let span = tracing::debug_span!("reconcile", workload = %key);
            let outcome = AssertUnwindSafe(self.reconcile_workload(workload, &mut pass))
                .catch_unwind()
                .instrument(span)
                .await;
            let error = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error,
                Err(panic) => Error::Panicked {
                    workload: key.clone(),
                    message: panic_message(panic.as_ref()),
                },
            };
            tracing::warn!(workload = %key, error = %flotilla_telemetry::error_chain(&error), "cannot reconcile workload; the others go on");
            self.cluster.metrics.reconcile_error(error.reason());
            if let Error::Panicked { .. } = error {
                self.cluster.events.notify(Notice {
                    key,
                    warning: true,
                    reason: "ReconcileFailed".into(),
                    message: error.to_string(),
                });
            }
            first_error.get_or_insert(error);
        }
        self.cluster
            .metrics
            .workloads(workload_count, pass.desired, pass.placed, pass.ready);
        pass.routes.sort_by(|a, b| a.workload.cmp(&b.workload));
        self.cluster.routes.publish(pass.routes);
        *self.next_deadline.lock().unwrap_or_else(|e| e.into_inner()) = pass.next_deadline;
        match first_error {
            None => Ok(pass.written),
            Some(error) => Err(error),
        }
    }

    /// Reconciles one workload of `pass`: its finalizer, placements, counts and conditions,
    /// written back when they changed, and its release once it is deleted and stopped.
    async fn reconcile_workload(&self, workload: Workload, pass: &mut Pass) -> Result<(), Error> {
        let terminating = !workload.metadata.deletion_timestamp.is_empty();
        if !terminating && !workload.metadata.finalizers.iter().any(|f| f == FINALIZER) {
            self.add_finalizer(&workload).await?;
        }
        let key = workload.key().to_string();
        let in_grace = pass.in_grace;
        let no_reports = BTreeMap::new();
        let reported = pass.running.get(&key).unwrap_or(&no_reports);
        let mut status =
            self.reconcile(&workload, &mut pass.nodes, &pass.index, in_grace, reported)?;
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
        if let Some(deadline) = deadline {
            pass.next_deadline = Some(
                pass.next_deadline
                    .map_or(deadline, |d: SystemTime| d.min(deadline)),
            );
        }
        pass.desired += wanted;
        pass.placed += status.replicas;
        pass.ready += ready;
        let mut version = workload.metadata.resource_version.clone();
        let placed_nowhere = status.replicas == 0;
        pass.routes
            .extend(route_of(&workload, &status, &pass.nodes, &pass.index));
        if workload.status.as_ref() != Some(&status) {
            let written_back = self.store.patch_status(&workload.key(), status).await?;
            version = written_back.metadata.resource_version;
            pass.written += 1;
        }
        let still_running = pass
            .running
            .get(&key)
            .is_some_and(|generations| generations.values().any(|c| c.running > 0));
        if terminating && placed_nowhere && !still_running {
            self.release(&workload, &version).await?;
        }
        Ok(())
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
                .map(|c| (c.status.clone(), c.message.clone()))
        };
        let Some((now, message)) = find(Some(status)) else {
            return;
        };
        if find(workload.status.as_ref()) == Some((now.clone(), message.clone())) {
            return;
        }
        let warning = now != "True";
        self.cluster.events.notify(Notice {
            key: workload.key().to_string(),
            warning,
            reason: if warning {
                "Unschedulable"
            } else {
                "Scheduled"
            }
            .into(),
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

        let desired = desired_replicas(workload);
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
        let condition = match unschedulable {
            None => Condition {
                type_: SCHEDULED.into(),
                status: "True".into(),
                reason: "AllReplicasScheduled".into(),
                message: format!("{} of {desired} replicas placed", status.updated_replicas),
                last_transition_time: String::new(),
            },
            Some((count, message)) => Condition {
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

    /// Runs passes on every store or node change until `shutdown` completes, expiring nodes
    /// that have not heartbeated for `heartbeat_timeout`.
    pub async fn run(self, heartbeat_timeout: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut node_changes = self.cluster.nodes.subscribe();
        let mut new_events = self.cluster.events.subscribe();
        let mut expiry =
            tokio::time::interval((heartbeat_timeout / 2).max(Duration::from_millis(10)));
        let mut retry_delay = Duration::from_millis(100);
        // One pass when the startup grace ends drops the nodes that never came back.
        let grace_end = tokio::time::sleep_until(
            self.grace_until
                .map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std),
        );
        tokio::pin!(grace_end);
        let mut grace_pending = self.grace_until.is_some();
        // A failed pass is retried with backoff even if nothing else changes.
        let requeue = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(requeue);
        let mut requeue_pending = false;
        let mut requeue_delay = MIN_REQUEUE_DELAY;
        // A pass when the earliest progress deadline passes, even if nothing else changed.
        let progress = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(progress);
        let mut progress_pending = false;
        'watch: loop {
            let mut watch = match self.store.watch().await {
                Ok(watch) => watch,
                Err(error) => {
                    tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "cannot watch workloads; retrying");
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(retry_delay) => {}
                    }
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            loop {
                tokio::select! {
                    () = &mut shutdown => return,
                    event = watch.next() => match event {
                        None => continue 'watch,
                        Some(Err(error)) => {
                            tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "watch failed; restarting it");
                            continue 'watch;
                        }
                        // Coalesce a burst (our own status writes among them) into one pass.
                        Some(Ok(_)) => while let Ok(Some(_)) =
                            tokio::time::timeout(Duration::ZERO, watch.next()).await {},
                    },
                    changed = node_changes.changed() => if changed.is_err() { return },
                    changed = new_events.changed() => if changed.is_err() { return },
                    () = &mut requeue, if requeue_pending => {}
                    () = &mut progress, if progress_pending => progress_pending = false,
                    () = &mut grace_end, if grace_pending => {
                        grace_pending = false;
                        self.log_unreturned_nodes().await;
                    }
                    _ = expiry.tick() => {
                        let expired = self.cluster.nodes.expire(heartbeat_timeout);
                        if expired.is_empty() {
                            continue;
                        }
                        tracing::warn!(nodes = ?expired, "nodes missed their heartbeats; rescheduling their replicas");
                        node_changes.mark_unchanged();
                    }
                }
                let pass_started = Instant::now();
                // A panic outside any one workload's step (in the snapshot, say) fails this
                // pass, never the controller.
                let pass = match AssertUnwindSafe(self.reconcile_all()).catch_unwind().await {
                    Ok(pass) => pass,
                    Err(panic) => Err(Error::Panicked {
                        workload: "(every workload)".into(),
                        message: panic_message(panic.as_ref()),
                    }),
                };
                self.cluster.metrics.pass(
                    pass_started.elapsed(),
                    pass.as_ref().map_or(0, |written| *written),
                );
                match pass {
                    Ok(written) => {
                        let deadline =
                            *self.next_deadline.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(deadline) = deadline {
                            // A far deadline is looked at again within the hour, so no
                            // timer is ever set past what the clock can hold.
                            let wait = deadline
                                .duration_since(SystemTime::now())
                                .unwrap_or_default()
                                .min(MAX_DEADLINE_WAIT);
                            progress.as_mut().reset(
                                tokio::time::Instant::now() + wait + Duration::from_millis(10),
                            );
                        }
                        progress_pending = deadline.is_some();
                        retry_delay = Duration::from_millis(100);
                        requeue_delay = MIN_REQUEUE_DELAY;
                        requeue_pending = false;
                        if written > 0 {
                            tracing::debug!(written, "workloads reconciled");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %flotilla_telemetry::error_chain(&error), retry_in = ?requeue_delay, "reconcile pass failed");
                        requeue
                            .as_mut()
                            .reset(tokio::time::Instant::now() + requeue_delay);
                        requeue_pending = true;
                        requeue_delay = (requeue_delay * 2).min(MAX_REQUEUE_DELAY);
                    }
                }
            }
        }
    }
}

/// A digest of what agents run for `spec`: all of it but the replica count, the placement
/// rules and how updates proceed, so that scaling, moving replicas or changing the strategy
/// keeps the template (and the sandboxes) as they are.
pub fn template_hash(spec: &crate::model::WorkloadSpec) -> String {
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

/// Whether the update moved since `before`, as a Deployment counts progress: a new revision,
/// more of it placed or available, or fewer sandboxes of older revisions.
fn made_progress(before: Option<&WorkloadStatus>, now: &WorkloadStatus) -> bool {
    let Some(before) = before else {
        return true;
    };
    let available = |s: &WorkloadStatus| s.revisions.first().map_or(0, |r| r.available_replicas);
    let old = |s: &WorkloadStatus| s.replicas.saturating_sub(s.updated_replicas);
    before.revision != now.revision
        || now.updated_replicas > before.updated_replicas
        || available(now) > available(before)
        || old(now) < old(before)
}

/// The requests of one of `revision`'s sandboxes; `current`'s when it has no template.
fn revision_requests(revision: &RevisionStatus, current: &WorkloadRequest) -> Requests {
    revision
        .template
        .as_ref()
        .map_or(current.requests, |t| t.requests())
}

/// `Available`: at least `min_available` of the wanted replicas run (or completed): all of
/// them, less the rolling update's `maxUnavailable`, as for a Deployment.
fn available_condition(desired: u64, min_available: u64, available: u64) -> Condition {
    let (status, reason) = if available >= min_available {
        ("True", "MinimumReplicasAvailable")
    } else {
        ("False", "MinimumReplicasUnavailable")
    };
    Condition {
        type_: AVAILABLE.into(),
        status: status.into(),
        reason: reason.into(),
        message: format!("{available} of {desired} replicas available"),
        last_transition_time: String::new(),
    }
}

/// `Progressing`, and when its deadline will pass if the update is still not done.
///
/// As for a Deployment: `True` while the current revision becomes available on every replica
/// and old ones go, `False` with `ProgressDeadlineExceeded` once the update has made no progress
/// for `progressDeadlineSeconds`. `available` counts the current
/// revision's sandboxes only.
fn progressing_condition(
    workload: &Workload,
    status: &WorkloadStatus,
    desired: u64,
    available: u64,
    now: SystemTime,
) -> (Condition, Option<SystemTime>) {
    let revision = status.revision;
    let old = status.replicas.saturating_sub(status.updated_replicas);
    let deadline_seconds = workload
        .spec
        .progress_deadline_seconds
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECONDS);
    let last_progress = if status.progress_time.is_empty() {
        &status.template_time
    } else {
        &status.progress_time
    };
    let deadline = humantime::parse_rfc3339(last_progress)
        .ok()
        .and_then(|moved| moved.checked_add(Duration::from_secs(deadline_seconds)));
    let left = if old > 0 {
        format!("; {old} replicas of older revisions left")
    } else {
        String::new()
    };
    let mut pending_deadline = None;
    let (status, reason, message) = if !workload.metadata.deletion_timestamp.is_empty() {
        (
            "False",
            "Terminating",
            "the workload is being deleted; its sandboxes are stopping".to_string(),
        )
    } else if available >= desired && old == 0 {
        (
            "True",
            "TemplateAvailable",
            format!("revision {revision} is available on every replica"),
        )
    } else if deadline.is_some_and(|d| now >= d) {
        (
            "False",
            "ProgressDeadlineExceeded",
            format!(
                "{available} of {desired} replicas of revision {revision} available, no \
                 progress for {deadline_seconds}s{left}"
            ),
        )
    } else {
        pending_deadline = deadline;
        (
            "True",
            "ReplicasUpdating",
            format!("{available} of {desired} replicas of revision {revision} available{left}"),
        )
    };
    let condition = Condition {
        type_: PROGRESSING.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: String::new(),
    };
    (condition, pending_deadline)
}

/// `Ready`: every wanted replica runs or completed; otherwise the latest failure, if any.
fn ready_condition(
    desired: u64,
    ready: u64,
    succeeded: u64,
    latest_failure: Option<crate::cluster::Event>,
) -> Condition {
    let (status, reason, message) = if ready + succeeded >= desired {
        let reason = if succeeded > 0 && ready == 0 {
            "Completed"
        } else {
            "AllReplicasReady"
        };
        (
            "True",
            reason.to_string(),
            format!("{ready} running, {succeeded} completed of {desired} replicas"),
        )
    } else if let Some(event) = latest_failure {
        let first_line = event.message.lines().next().unwrap_or_default();
        (
            "False",
            event.reason,
            format!(
                "{ready} of {desired} replicas running; sandboxes on node {} ended with {}",
                event.node,
                if first_line.is_empty() {
                    "no message".to_string()
                } else {
                    first_line.to_string()
                }
            ),
        )
    } else {
        (
            "False",
            "ReplicasNotReady".to_string(),
            format!("{ready} of {desired} replicas running"),
        )
    };
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason,
        message,
        last_transition_time: String::new(),
    }
}

fn placements_of(workload: &Workload) -> &BTreeMap<String, u64> {
    static EMPTY: BTreeMap<String, u64> = BTreeMap::new();
    workload.status.as_ref().map_or(&EMPTY, |s| &s.placements)
}

/// Replaces the condition of the same type, keeping its transition time when its status did not
/// change, as Kubernetes does.
fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            condition.last_transition_time = if existing.status == condition.status {
                existing.last_transition_time.clone()
            } else {
                now()
            };
            *existing = condition;
        }
        None => {
            condition.last_transition_time = now();
            conditions.push(condition);
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

mod rollout;

#[cfg(test)]
mod kube_tests;
#[cfg(test)]
mod tests;
