//! Which workloads the next pass reconciles, and when: the controller's work queue.
//!
//! As kube-runtime's scheduler does, the queue holds each workload at most once: a workload
//! marked again before the pass takes it is reconciled once. A workload's [`Action`] or failure
//! schedules it again after a delay; failures back off per workload with jitter, so one
//! failing workload is retried alone and never holds back or multiplies the work of the
//! others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::time::Duration;

use tokio::time::Instant;

use super::{MAX_REQUEUE_DELAY, MIN_REQUEUE_DELAY};

/// What the controller does with a workload after reconciling it, as kube-runtime's `Action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing until the workload, a node or an agent's report changes.
    AwaitChange,
    /// Reconcile it again after this long even if nothing changes (a progress deadline).
    RequeueAfter(Duration),
}

/// The workloads a pass reconciles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Batch {
    /// Every workload (after a node change, a watch restart, or at start).
    All,
    /// These workloads, by key.
    Keys(BTreeSet<String>),
}

impl Batch {
    /// Whether the workload with `key` is in the batch.
    pub fn contains(&self, key: &str) -> bool {
        match self {
            Self::All => true,
            Self::Keys(keys) => keys.contains(key),
        }
    }
}

/// Workloads waiting to be reconciled, now or later.
#[derive(Debug)]
pub(super) struct WorkQueue {
    /// Whether the next pass takes every workload.
    all: bool,
    /// Workloads the next pass takes.
    ready: BTreeSet<String>,
    /// Workloads to reconcile at a later time.
    scheduled: BTreeMap<String, Instant>,
    /// When every workload is to be reconciled again (after a failed pass).
    all_at: Option<Instant>,
    /// Consecutive failures per workload, for its backoff.
    failures: HashMap<String, u32>,
    /// Consecutive failed passes, for the backoff of the whole pass.
    pass_failures: u32,
    /// Seeds the jitter.
    jitter: std::hash::RandomState,
}

impl Default for WorkQueue {
    /// A queue that reconciles every workload first.
    fn default() -> Self {
        Self {
            all: true,
            ready: BTreeSet::new(),
            scheduled: BTreeMap::new(),
            all_at: None,
            failures: HashMap::new(),
            pass_failures: 0,
            jitter: std::hash::RandomState::new(),
        }
    }
}

impl WorkQueue {
    /// Reconcile `key` in the next pass.
    pub(super) fn mark(&mut self, key: String) {
        if !self.all {
            self.ready.insert(key);
        }
    }

    /// Reconcile every workload in the next pass.
    pub(super) fn mark_all(&mut self) {
        self.all = true;
        self.ready.clear();
    }

    /// Whether a pass has work now.
    pub(super) fn has_ready(&self) -> bool {
        self.all || !self.ready.is_empty()
    }

    /// When the earliest scheduled workload (or pass) falls due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.scheduled.values().chain(&self.all_at).min().copied()
    }

    /// The workloads due by `now`, leaving the queue empty of them.
    pub(super) fn take(&mut self, now: Instant) -> Batch {
        if self.all_at.is_some_and(|at| at <= now) {
            self.all_at = None;
            self.all = true;
        }
        if self.all {
            self.all = false;
            self.ready.clear();
            // Scheduled requeues stay: a later deadline is still wanted after this pass.
            return Batch::All;
        }
        let due: Vec<String> = self
            .scheduled
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            self.scheduled.remove(&key);
            self.ready.insert(key);
        }
        Batch::Keys(std::mem::take(&mut self.ready))
    }

    /// Follows a workload's outcome: a requeue after its delay, or nothing.
    pub(super) fn done(&mut self, key: &str, action: Action) {
        self.failures.remove(key);
        match action {
            Action::AwaitChange => {
                self.scheduled.remove(key);
            }
            Action::RequeueAfter(delay) => self.schedule(key, delay),
        }
    }

    /// Schedules a workload that failed again after its backoff; returns the delay.
    pub(super) fn failed(&mut self, key: &str) -> Duration {
        let failures = self.failures.entry(key.to_string()).or_default();
        *failures = failures.saturating_add(1);
        let failures = *failures;
        let delay = self.backoff(key, failures);
        self.schedule(key, delay);
        delay
    }

    /// Schedules every workload again after the pass's backoff (the pass failed before it
    /// reached any workload); returns the delay.
    pub(super) fn pass_failed(&mut self) -> Duration {
        self.pass_failures = self.pass_failures.saturating_add(1);
        let delay = self.backoff("", self.pass_failures);
        self.all_at = Some(Instant::now() + delay);
        delay
    }

    /// A pass went through: the pass backoff starts over.
    pub(super) fn pass_succeeded(&mut self) {
        self.pass_failures = 0;
    }

    /// Forgets workloads that no longer exist.
    pub(super) fn retain(&mut self, exists: impl Fn(&str) -> bool) {
        self.scheduled.retain(|key, _| exists(key));
        self.failures.retain(|key, _| exists(key));
    }

    /// Reconcile `key` after `delay`, replacing what was scheduled for it: the latest outcome
    /// decides.
    fn schedule(&mut self, key: &str, delay: Duration) {
        self.scheduled
            .insert(key.to_string(), Instant::now() + delay);
    }

    /// The delay after `failures` consecutive failures: doubling from [`MIN_REQUEUE_DELAY`]
    /// up to [`MAX_REQUEUE_DELAY`], then a random point in its upper half, so that workloads
    /// failing together do not retry together.
    fn backoff(&self, key: &str, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(16);
        let full = MIN_REQUEUE_DELAY
            .saturating_mul(1 << exponent)
            .min(MAX_REQUEUE_DELAY);
        let random = self.jitter.hash_one((key, failures, Instant::now()));
        let fraction = (random % 1024) as u32;
        full / 2 + (full / 2) * fraction / 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(batch: Batch) -> Vec<String> {
        match batch {
            Batch::All => panic!("every workload, not some"),
            Batch::Keys(keys) => keys.into_iter().collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn marks_coalesce_and_requeues_fall_due_in_time() {
        let mut queue = WorkQueue::default();
        assert_eq!(queue.take(Instant::now()), Batch::All, "everything first");
        assert!(!queue.has_ready());

        queue.mark("a".into());
        queue.mark("a".into());
        queue.mark("b".into());
        assert_eq!(keys(queue.take(Instant::now())), ["a", "b"]);
        assert!(keys(queue.take(Instant::now())).is_empty());

        queue.done("a", Action::RequeueAfter(Duration::from_secs(5)));
        queue.done("b", Action::AwaitChange);
        let due = queue.next_due().expect("a is scheduled");
        assert!(keys(queue.take(Instant::now())).is_empty());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(Instant::now() >= due);
        assert_eq!(keys(queue.take(Instant::now())), ["a"]);
        assert_eq!(queue.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_per_workload_with_jitter_up_to_the_ceiling() {
        let mut queue = WorkQueue::default();
        let _ = queue.take(Instant::now());
        let mut last = Duration::ZERO;
        for attempt in 1..=12u32 {
            let delay = queue.failed("bad");
            let full = MIN_REQUEUE_DELAY
                .saturating_mul(1 << (attempt - 1))
                .min(MAX_REQUEUE_DELAY);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {attempt}: {delay:?} outside {:?}..={full:?}",
                full / 2
            );
            last = delay;
        }
        assert!(last >= MAX_REQUEUE_DELAY / 2);

        // Another workload starts from the bottom; success resets the first.
        assert!(queue.failed("other") <= MIN_REQUEUE_DELAY);
        queue.done("bad", Action::AwaitChange);
        assert!(queue.failed("bad") <= MIN_REQUEUE_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_pass_takes_every_workload_again_after_its_backoff() {
        let mut queue = WorkQueue::default();
        let _ = queue.take(Instant::now());
        let delay = queue.pass_failed();
        assert!(!queue.has_ready());
        assert!(keys(queue.take(Instant::now())).is_empty());
        tokio::time::advance(delay).await;
        assert_eq!(queue.take(Instant::now()), Batch::All);
    }
}
