//! Revisions and updates: which template each placed sandbox runs, and how many of each
//! revision to keep placed in a pass, as the Deployment controller does with ReplicaSets.
//!
//! A template change makes a new revision (or brings back an old one with the same template,
//! as a rollback does). A rolling update then places sandboxes of the new revision while the
//! total stays within `replicas + maxSurge`, and removes old ones while the available sandboxes
//! (agents' reports, never more than placed) stay at least `replicas - maxUnavailable`;
//! unavailable old sandboxes go first. A new revision that never becomes available therefore
//! stops the update where it is and leaves the old sandboxes serving. `Recreate` removes every
//! old sandbox and places new ones once agents report no old sandbox running.

use std::collections::BTreeMap;

use crate::cluster::Counts;
use crate::model::{
    RevisionStatus, Strategy, StrategyType, Workload, WorkloadSpec,
    rollout::DEFAULT_REVISION_HISTORY_LIMIT,
};

/// A workload's revisions in a pass: the current one (the spec's template) and the old ones,
/// newest first.
#[derive(Debug)]
pub(super) struct Revisions {
    /// The spec's template; its placements are the workload's `status.placements`.
    pub current: RevisionStatus,
    /// Older templates still placed or kept for rollback, newest first.
    pub old: Vec<RevisionStatus>,
    /// Whether the current template changed in this pass.
    pub changed: bool,
}

impl Revisions {
    /// The revisions recorded in `workload`'s status, with the spec's template (`hash`) as the
    /// current one: unchanged, an old revision brought back (with the next number), or a new
    /// revision placed nowhere yet.
    pub(super) fn load(workload: &Workload, hash: &str) -> Self {
        let status = workload.status.clone().unwrap_or_default();
        let mut current = status
            .revisions
            .iter()
            .find(|r| r.revision == status.revision && status.revision > 0)
            .cloned()
            .unwrap_or_else(|| RevisionStatus {
                // A status from before revisions were recorded.
                revision: 1,
                template_hash: status.template_hash.clone(),
                generation: status.template_generation,
                template: None,
                ..RevisionStatus::default()
            });
        current.placements = status.placements.clone();
        let mut old: Vec<RevisionStatus> = status
            .revisions
            .into_iter()
            .filter(|r| r.revision != current.revision)
            .collect();
        if status.template_generation != 0 && current.template_hash == hash {
            current.template = Some(Box::new(template_of(&workload.spec)));
            return Self {
                current,
                old,
                changed: false,
            };
        }
        let next = old
            .iter()
            .map(|r| r.revision)
            .chain([current.revision])
            .max()
            .unwrap_or(0)
            + 1;
        let previous = current;
        let mut current = match old.iter().position(|r| r.template_hash == hash) {
            // Back to an old template: its sandboxes (and their generation) are the current ones.
            Some(i) => old.remove(i),
            None => RevisionStatus {
                template_hash: hash.to_string(),
                generation: workload.metadata.generation,
                ..RevisionStatus::default()
            },
        };
        current.revision = if status.template_generation == 0 {
            1
        } else {
            next
        };
        current.template = Some(Box::new(template_of(&workload.spec)));
        // Without its template (a status from before revisions), the previous revision cannot
        // be described to agents; its sandboxes are replaced at once.
        if status.template_generation != 0 && previous.template.is_some() {
            old.insert(0, previous);
        }
        old.sort_by_key(|r| std::cmp::Reverse(r.revision));
        Self {
            current,
            old,
            changed: true,
        }
    }

    /// Sandboxes of old revisions placed.
    pub(super) fn old_placed(&self) -> u64 {
        self.old.iter().map(placed).sum()
    }

    /// Drops old revisions beyond `revisionHistoryLimit` that have no sandboxes placed or
    /// reported, oldest first.
    pub(super) fn trim_history(&mut self, spec: &WorkloadSpec, reported: &BTreeMap<u64, Counts>) {
        let limit = spec
            .revision_history_limit
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(DEFAULT_REVISION_HISTORY_LIMIT);
        let mut kept = 0;
        self.old.retain(|r| {
            let live = placed(r) > 0
                || reported
                    .get(&r.generation)
                    .is_some_and(|c| c.running + c.succeeded > 0);
            if live {
                return true;
            }
            kept += 1;
            kept <= limit
        });
    }
}

/// A spec as a revision's template: the replica count is not part of it.
fn template_of(spec: &WorkloadSpec) -> WorkloadSpec {
    let mut template = spec.clone();
    template.replicas = 0;
    template
}

/// Sandboxes of `revision` placed.
pub(super) fn placed(revision: &RevisionStatus) -> u64 {
    revision.placements.values().sum()
}

/// Sandboxes of `revision` that count as available: reported available (or completed), never
/// more than placed.
pub(super) fn available(revision: &RevisionStatus, reported: &BTreeMap<u64, Counts>) -> u64 {
    let counts = reported
        .get(&revision.generation)
        .copied()
        .unwrap_or_default();
    (counts.available.min(counts.running) + counts.succeeded).min(placed(revision))
}

/// How many sandboxes of each revision a pass should aim for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Targets {
    /// Sandboxes of the current revision.
    pub current: u64,
    /// Sandboxes of each old revision, in `Revisions::old` order.
    pub old: Vec<u64>,
}

/// The targets of one pass for `desired` replicas, given what agents report.
pub(super) fn targets(
    spec: &WorkloadSpec,
    desired: u64,
    revisions: &Revisions,
    reported: &BTreeMap<u64, Counts>,
) -> Targets {
    let current_placed = placed(&revisions.current);
    let old: Vec<u64> = revisions.old.iter().map(placed).collect();
    let old_placed: u64 = old.iter().sum();
    if old_placed == 0 && !recreating(spec, revisions, reported) {
        return Targets {
            current: desired,
            old,
        };
    }
    if desired == 0 {
        return Targets {
            current: 0,
            old: vec![0; old.len()],
        };
    }
    let default_strategy = Strategy::default();
    let strategy = spec.strategy.as_ref().unwrap_or(&default_strategy);
    if strategy.type_ == StrategyType::Recreate {
        // Old sandboxes first stop everywhere; the new ones start once none is reported.
        let current = if old_placed == 0 && !recreating(spec, revisions, reported) {
            desired
        } else {
            current_placed.min(desired)
        };
        return Targets {
            current,
            old: vec![0; old.len()],
        };
    }
    let limits = strategy.limits(desired);

    // Old sandboxes first, keeping desired - maxUnavailable available; what they free, new
    // sandboxes may take in the same pass.
    let min_available = strategy.min_available(desired);
    let current_available = available(&revisions.current, reported).min(current_placed);
    let current_unavailable = current_placed - current_available;
    let mut targets = old.clone();
    let mut can_remove = (current_placed + old_placed)
        .saturating_sub(min_available)
        .saturating_sub(current_unavailable);
    // Unavailable old sandboxes first: removing them costs nothing available. Oldest first.
    for (i, revision) in revisions.old.iter().enumerate().rev() {
        let unavailable = targets[i] - available(revision, reported).min(targets[i]);
        let remove = unavailable.min(can_remove);
        targets[i] -= remove;
        can_remove -= remove;
    }
    // Then available ones, while enough stay available.
    let available_now = current_available
        + revisions
            .old
            .iter()
            .zip(&targets)
            .map(|(r, &target)| available(r, reported).min(target))
            .sum::<u64>();
    let mut over = available_now.saturating_sub(min_available);
    for i in (0..targets.len()).rev() {
        let remove = targets[i].min(over);
        targets[i] -= remove;
        over -= remove;
    }

    // New sandboxes, within desired + maxSurge in all.
    let old_left: u64 = targets.iter().sum();
    let max_total = desired.saturating_add(limits.max_surge);
    let current = if current_placed >= desired {
        desired
    } else {
        let room = max_total.saturating_sub(current_placed + old_left);
        current_placed + room.min(desired - current_placed)
    };
    Targets {
        current,
        old: targets,
    }
}

/// Whether a `Recreate` update still waits for old sandboxes that agents report running.
fn recreating(
    spec: &WorkloadSpec,
    revisions: &Revisions,
    reported: &BTreeMap<u64, Counts>,
) -> bool {
    spec.strategy
        .as_ref()
        .is_some_and(|s| s.type_ == StrategyType::Recreate)
        && reported
            .iter()
            .any(|(&generation, c)| generation != revisions.current.generation && c.running > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{IntOrPercent, RollingUpdate, Strategy};

    fn revision(number: u64, generation: u64, placed: u64) -> RevisionStatus {
        RevisionStatus {
            revision: number,
            template_hash: format!("h{number}"),
            generation,
            placements: if placed > 0 {
                [("n1".to_string(), placed)].into()
            } else {
                BTreeMap::new()
            },
            template: Some(Box::default()),
            ..RevisionStatus::default()
        }
    }

    fn counts(pairs: &[(u64, u64)]) -> BTreeMap<u64, Counts> {
        pairs
            .iter()
            .map(|&(generation, available)| {
                (
                    generation,
                    Counts {
                        running: available,
                        available,
                        succeeded: 0,
                    },
                )
            })
            .collect()
    }

    fn rolling(surge: &str, unavailable: &str) -> WorkloadSpec {
        WorkloadSpec {
            strategy: Some(Strategy {
                type_: StrategyType::RollingUpdate,
                rolling_update: Some(RollingUpdate {
                    max_surge: Some(IntOrPercent::String(surge.into())),
                    max_unavailable: Some(IntOrPercent::String(unavailable.into())),
                }),
            }),
            ..WorkloadSpec::default()
        }
    }

    /// Plays a rolling update to its end, agents making every placed sandbox available
    /// before the next pass; returns the available count before each pass.
    fn play(spec: &WorkloadSpec, desired: u64, fail_new: bool) -> (Revisions, Vec<u64>) {
        let mut revisions = Revisions {
            current: revision(2, 2, 0),
            old: vec![revision(1, 1, desired)],
            changed: true,
        };
        let mut seen = Vec::new();
        for _ in 0..100 {
            let new_available = if fail_new {
                0
            } else {
                placed(&revisions.current)
            };
            let reported = counts(&[(2, new_available), (1, placed(&revisions.old[0]))]);
            let available_now = new_available + placed(&revisions.old[0]);
            seen.push(available_now);
            let t = targets(spec, desired, &revisions, &reported);
            revisions.current.placements = [("n1".to_string(), t.current)].into();
            revisions.old[0].placements = [("n1".to_string(), t.old[0])].into();
            if t.old[0] == 0 && t.current == desired && !fail_new {
                break;
            }
        }
        (revisions, seen)
    }

    #[test]
    fn a_rolling_update_keeps_the_minimum_available_and_finishes() {
        let spec = rolling("0", "10%");
        let (revisions, seen) = play(&spec, 100, false);
        assert_eq!(placed(&revisions.current), 100);
        assert_eq!(revisions.old_placed(), 0);
        assert!(seen.iter().all(|&a| a >= 90), "{seen:?}");
        assert!(seen.len() <= 11, "10 steps of 10: {seen:?}");

        // The defaults (25% each): surge and unavailability together.
        let (revisions, seen) = play(&WorkloadSpec::default(), 100, false);
        assert_eq!(placed(&revisions.current), 100);
        assert!(seen.iter().all(|&a| a >= 75), "{seen:?}");
    }

    #[test]
    fn a_failing_new_revision_stops_the_update_with_the_old_sandboxes_serving() {
        let (revisions, seen) = play(&rolling("10%", "10%"), 100, true);
        assert_eq!(
            placed(&revisions.old[0]),
            90,
            "only maxUnavailable were taken"
        );
        assert_eq!(placed(&revisions.current), 20, "the surge, never more");
        assert!(seen.iter().all(|&a| a >= 90));
    }

    #[test]
    fn surge_alone_never_takes_an_available_sandbox_first() {
        let spec = rolling("25%", "0");
        let revisions = Revisions {
            current: revision(2, 2, 0),
            old: vec![revision(1, 1, 8)],
            changed: true,
        };
        let t = targets(&spec, 8, &revisions, &counts(&[(1, 8)]));
        assert_eq!(
            t,
            Targets {
                current: 2,
                old: vec![8]
            }
        );
    }

    #[test]
    fn unavailable_old_sandboxes_go_first() {
        let spec = rolling("0", "1");
        let revisions = Revisions {
            current: revision(3, 3, 0),
            // Revision 2 never became available; revision 1 is serving.
            old: vec![revision(2, 2, 2), revision(1, 1, 4)],
            changed: true,
        };
        let t = targets(&spec, 4, &revisions, &counts(&[(1, 4)]));
        assert_eq!(
            t.old,
            vec![0, 3],
            "revision 2's go, then one of revision 1's"
        );
    }

    #[test]
    fn recreate_stops_the_old_sandboxes_before_placing_new_ones() {
        let spec = WorkloadSpec {
            strategy: Some(Strategy {
                type_: StrategyType::Recreate,
                rolling_update: None,
            }),
            ..WorkloadSpec::default()
        };
        let mut revisions = Revisions {
            current: revision(2, 2, 0),
            old: vec![revision(1, 1, 4)],
            changed: true,
        };
        let t = targets(&spec, 4, &revisions, &counts(&[(1, 4)]));
        assert_eq!(
            t,
            Targets {
                current: 0,
                old: vec![0]
            }
        );
        revisions.old[0].placements.clear();
        // Agents still report old sandboxes running: wait.
        let t = targets(&spec, 4, &revisions, &counts(&[(1, 4)]));
        assert_eq!(t.current, 0);
        let t = targets(&spec, 4, &revisions, &counts(&[(1, 0)]));
        assert_eq!(t.current, 4);
    }

    #[test]
    fn history_keeps_the_limit_and_every_revision_with_sandboxes() {
        let spec = WorkloadSpec {
            revision_history_limit: Some(1),
            ..WorkloadSpec::default()
        };
        let mut revisions = Revisions {
            current: revision(5, 5, 3),
            old: vec![
                revision(4, 4, 0),
                revision(3, 3, 0),
                revision(2, 2, 1),
                revision(1, 1, 0),
            ],
            changed: false,
        };
        // Revision 3 still has a sandbox running on some agent.
        revisions.trim_history(&spec, &counts(&[(3, 1)]));
        let kept: Vec<u64> = revisions.old.iter().map(|r| r.revision).collect();
        assert_eq!(kept, vec![4, 3, 2]);
    }
}
