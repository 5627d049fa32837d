//! The controller's loop: what marks workloads for reconciling, and when a pass runs.
//!
//! A store event marks the workload it names; a watch (re)start, a node change (a node joins,
//! leaves, turns unready or reports different counts), a new sandbox failure and the end of the
//! startup grace mark every workload. Marks arriving in a burst (the controller's own status
//! writes among them) are coalesced into one pass. Workloads whose [`Action`](super::Action)
//! or failure scheduled them again are taken when they fall due.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::FutureExt;

use super::queue::Batch;
use super::{Controller, Error, panic_message};
use crate::store::{WatchEvent, WorkloadStore};

impl<S: WorkloadStore> Controller<S> {
    /// Runs passes until `shutdown` completes, as workloads and nodes change, expiring nodes
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
            retry_delay = Duration::from_millis(100);
            loop {
                let (ready, due) = {
                    let queue = self.queue();
                    (queue.has_ready(), queue.next_due())
                };
                let requeue = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    () = &mut shutdown => return,
                    event = watch.next() => match event {
                        Some(Ok(event)) => {
                            self.follow(event);
                            // Coalesce a burst into one pass.
                            while let Ok(Some(Ok(event))) =
                                tokio::time::timeout(Duration::ZERO, watch.next()).await
                            {
                                self.follow(event);
                            }
                        }
                        None => continue 'watch,
                        Some(Err(error)) => {
                            tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "watch failed; restarting it");
                            continue 'watch;
                        }
                    },
                    changed = node_changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        self.queue().mark_all();
                    }
                    changed = new_events.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        self.queue().mark_all();
                    }
                    () = &mut grace_end, if grace_pending => {
                        grace_pending = false;
                        self.log_unreturned_nodes().await;
                        self.queue().mark_all();
                    }
                    _ = expiry.tick() => {
                        let expired = self.cluster.nodes.expire(heartbeat_timeout);
                        if !expired.is_empty() {
                            tracing::warn!(nodes = ?expired, "nodes missed their heartbeats; rescheduling their replicas");
                            node_changes.mark_unchanged();
                            self.queue().mark_all();
                        }
                    }
                    () = std::future::ready(()), if ready => {}
                    () = requeue => {}
                }
                let batch = self.queue().take(tokio::time::Instant::now());
                if matches!(&batch, Batch::Keys(keys) if keys.is_empty()) {
                    continue;
                }
                self.run_pass(&batch).await;
            }
        }
    }

    /// Marks what a store event changed.
    fn follow(&self, event: WatchEvent) {
        let mut queue = self.queue();
        match event {
            WatchEvent::Restarted(_) => queue.mark_all(),
            WatchEvent::Applied(workload) | WatchEvent::Deleted(workload) => {
                queue.mark(workload.key().to_string());
            }
        }
    }

    /// One pass over `batch`, timed and counted; a pass that fails before any workload (or
    /// panics outside one) takes every workload again after a backoff.
    async fn run_pass(&self, batch: &Batch) {
        let started = Instant::now();
        let pass = match AssertUnwindSafe(self.pass(batch)).catch_unwind().await {
            Ok(pass) => pass,
            Err(panic) => Err(Error::Panicked {
                workload: "(every workload)".into(),
                message: panic_message(panic.as_ref()),
            }),
        };
        match pass {
            Ok(report) => {
                self.queue().pass_succeeded();
                let took = started.elapsed();
                self.cluster
                    .metrics
                    .pass(took, report.reconciled, report.written);
                if report.written > 0 {
                    tracing::debug!(
                        written = report.written,
                        reconciled = report.reconciled,
                        "workloads reconciled"
                    );
                }
            }
            Err(error) => {
                let retry_in = self.queue().pass_failed();
                self.cluster.metrics.pass(started.elapsed(), 0, 0);
                self.cluster.metrics.reconcile_error(error.reason());
                tracing::warn!(error = %flotilla_telemetry::error_chain(&error), ?retry_in, "reconcile pass failed");
            }
        }
    }
}
