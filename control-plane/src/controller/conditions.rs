//! The conditions a workload's status carries, built as a Deployment's are: `Ready`,
//! `Available` and `Progressing` (with its deadline), and how one replaces another.

use std::time::{Duration, SystemTime};

use super::{AVAILABLE, DEFAULT_PROGRESS_DEADLINE_SECONDS, PROGRESSING, READY};
use crate::model::{Condition, Workload, WorkloadStatus};

/// Whether the update moved since `before`, as a Deployment counts progress: a new revision,
/// more of it placed or available, or fewer sandboxes of older revisions.
pub(super) fn made_progress(before: Option<&WorkloadStatus>, now: &WorkloadStatus) -> bool {
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

/// `Available`: at least `min_available` of the wanted replicas run (or completed): all of
/// them, less the rolling update's `maxUnavailable`, as for a Deployment.
pub(super) fn available_condition(desired: u64, min_available: u64, available: u64) -> Condition {
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
pub(super) fn progressing_condition(
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
pub(super) fn ready_condition(
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

/// Replaces the condition of the same type, keeping its transition time when its status did not
/// change, as Kubernetes does.
pub(super) fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) {
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

/// Now, as status times are written (RFC 3339, seconds).
pub(super) fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG_AGO: &str = "2020-01-01T00:00:00Z";

    fn ready(status: &str) -> Condition {
        Condition {
            type_: READY.into(),
            status: status.into(),
            reason: "Reason".into(),
            message: "message".into(),
            last_transition_time: String::new(),
        }
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_does() {
        let mut conditions = vec![Condition {
            last_transition_time: LONG_AGO.into(),
            ..ready("False")
        }];
        let mut same = ready("False");
        same.message = "another message".into();
        set_condition(&mut conditions, same);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, LONG_AGO);
        assert_eq!(conditions[0].message, "another message");

        set_condition(&mut conditions, ready("True"));
        assert_eq!(conditions.len(), 1);
        let moved = &conditions[0].last_transition_time;
        assert_ne!(moved, LONG_AGO);
        assert!(
            humantime::parse_rfc3339(moved).is_ok(),
            "an RFC 3339 time: {moved}"
        );
    }

    #[test]
    fn a_new_condition_gets_a_transition_time() {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, ready("True"));
        assert!(humantime::parse_rfc3339(&conditions[0].last_transition_time).is_ok());
    }
}
