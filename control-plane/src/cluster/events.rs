//! [`EventLog`]: recent sandbox failures per workload, as agents report them in heartbeats, and
//! the stream of [`Notice`]s (failures, scheduling) that Kubernetes mode turns into Events.
//!
//! Entries are aggregated per (node, generation, reason), as Kubernetes aggregates repeated
//! events into one with a count, and each workload keeps at most [`MAX_EVENTS_PER_WORKLOAD`].
//! The log lives in memory: after a restart, agents report new failures as they happen.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use flotilla_proto::control::v1::SandboxEvent;
use tokio::sync::{broadcast, watch};

/// Notices buffered for a slow reader before it misses some.
const NOTICE_BUFFER: usize = 1024;

/// Something a user should see about a workload, as a Kubernetes Event shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The workload's key, `namespace/name`.
    pub key: String,
    /// A warning (something failed) rather than a normal notice.
    pub warning: bool,
    /// A short CamelCase reason: Scheduled, Unschedulable, Trap, ...
    pub reason: String,
    /// What happened.
    pub message: String,
}

/// Entries kept per workload; the oldest go first.
pub(crate) const MAX_EVENTS_PER_WORKLOAD: usize = 32;

/// Terminations of a workload's sandboxes on one node with one reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The node.
    pub node: String,
    /// The workload generation the sandboxes ran.
    pub generation: u64,
    /// Why they ended: Trap, OutOfMemory, Error, ...
    pub reason: String,
    /// The latest termination's message.
    pub message: String,
    /// How many terminations.
    pub count: u64,
    /// Unix milliseconds of the first one.
    pub first_at_ms: i64,
    /// Unix milliseconds of the latest one.
    pub last_at_ms: i64,
}

/// Recent failures by workload key (`namespace/name`).
pub struct EventLog {
    events: Mutex<BTreeMap<String, Vec<Event>>>,
    changed: watch::Sender<u64>,
    notices: broadcast::Sender<Notice>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            events: Mutex::default(),
            changed: watch::channel(0).0,
            notices: broadcast::channel(NOTICE_BUFFER).0,
        }
    }
}

impl EventLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<Event>>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds what `node` reported in one heartbeat.
    pub fn record(&self, node: &str, reported: Vec<SandboxEvent>) {
        if reported.is_empty() {
            return;
        }
        {
            let mut events = self.lock();
            for report in reported {
                let count = report.count.max(1);
                self.notify(Notice {
                    key: report.key.clone(),
                    warning: true,
                    reason: report.reason.clone(),
                    message: format!(
                        "{count} sandbox{} on node {node} ended: {}",
                        if count == 1 { "" } else { "es" },
                        report.message.lines().next().unwrap_or_default()
                    ),
                });
                let list = events.entry(report.key).or_default();
                let count = u64::from(report.count.max(1));
                match list.iter_mut().find(|e| {
                    e.node == node && e.generation == report.generation && e.reason == report.reason
                }) {
                    Some(existing) => {
                        existing.count += count;
                        existing.message = report.message;
                        existing.last_at_ms = existing.last_at_ms.max(report.last_at_ms);
                    }
                    None => {
                        if list.len() == MAX_EVENTS_PER_WORKLOAD
                            && let Some(oldest) = list
                                .iter()
                                .enumerate()
                                .min_by_key(|(_, e)| e.last_at_ms)
                                .map(|(i, _)| i)
                        {
                            list.swap_remove(oldest);
                        }
                        list.push(Event {
                            node: node.to_string(),
                            generation: report.generation,
                            reason: report.reason,
                            message: report.message,
                            count,
                            first_at_ms: report.last_at_ms,
                            last_at_ms: report.last_at_ms,
                        });
                    }
                }
            }
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Publishes a notice to every reader of [`notices`](Self::notices).
    pub fn notify(&self, notice: Notice) {
        // No reader is fine: embedded mode keeps only the failure log.
        let _ = self.notices.send(notice);
    }

    /// Notices from now on.
    pub fn notices(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// A workload's events, newest first.
    pub fn of(&self, key: &str) -> Vec<Event> {
        let mut list = self.lock().get(key).cloned().unwrap_or_default();
        list.sort_by_key(|e| std::cmp::Reverse(e.last_at_ms));
        list
    }

    /// The newest event of `key`'s generation `generation`.
    pub fn latest(&self, key: &str, generation: u64) -> Option<Event> {
        self.lock()
            .get(key)?
            .iter()
            .filter(|e| e.generation == generation)
            .max_by_key(|e| e.last_at_ms)
            .cloned()
    }

    /// Forgets the events of workloads not in `keys` (deleted ones).
    pub fn retain(&self, keys: &BTreeSet<String>) {
        self.lock().retain(|key, _| keys.contains(key));
    }

    /// Wakes when events arrive.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(key: &str, reason: &str, count: u32, at: i64) -> SandboxEvent {
        SandboxEvent {
            key: key.into(),
            generation: 1,
            reason: reason.into(),
            message: format!("{reason} at {at}"),
            count,
            last_at_ms: at,
        }
    }

    #[test]
    fn aggregates_per_node_and_reason_and_keeps_the_newest() {
        let log = EventLog::default();
        log.record("n1", vec![report("default/a", "Trap", 2, 10)]);
        log.record("n1", vec![report("default/a", "Trap", 3, 20)]);
        log.record("n2", vec![report("default/a", "Trap", 1, 15)]);
        log.record("n1", vec![report("default/a", "OutOfMemory", 1, 30)]);

        let events = log.of("default/a");
        let summary: Vec<(&str, &str, u64)> = events
            .iter()
            .map(|e| (e.node.as_str(), e.reason.as_str(), e.count))
            .collect();
        assert_eq!(
            summary,
            [
                ("n1", "OutOfMemory", 1),
                ("n1", "Trap", 5),
                ("n2", "Trap", 1)
            ]
        );
        assert_eq!(events[1].message, "Trap at 20");
        assert_eq!((events[1].first_at_ms, events[1].last_at_ms), (10, 20));
        assert_eq!(
            log.latest("default/a", 1).map(|e| e.reason),
            Some("OutOfMemory".into())
        );
        assert_eq!(log.latest("default/a", 2), None);

        for i in 0..100 {
            log.record(
                "n3",
                vec![report("default/a", &format!("R{i}"), 1, 100 + i)],
            );
        }
        let events = log.of("default/a");
        assert_eq!(events.len(), MAX_EVENTS_PER_WORKLOAD);
        assert_eq!(events[0].reason, "R99");

        log.retain(&BTreeSet::new());
        assert!(log.of("default/a").is_empty());
    }
}
