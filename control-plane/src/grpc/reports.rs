//! [`NodePlacements`]: what one agent's heartbeats may claim, so that a node reports only on
//! the workloads placed on it, and never more sandboxes than placed.
//!
//! A report decides workload status (ready and available replicas, a rollout's progress, the
//! `running` count a deletion waits on) and carries failure events into the workload's events.
//! Without a check, any agent could mark another tenant's workload Ready or keep its deletion
//! waiting. The session's down side records every revision it sends the node; the up side
//! passes each report through [`NodePlacements::check`]. A revision removed from the node stays
//! reportable until the agent stops reporting it, so a deletion still waits for its sandboxes.
//! The same record scopes `FetchModule`: an agent fetches only the modules of workloads placed
//! on its node, never another tenant's by digest.

use std::collections::{BTreeMap, HashMap};

use flotilla_proto::control::v1::{DesiredState, SandboxEvent};

use crate::cluster::Reported;

/// A workload revision on a node: its key (`namespace/name`) and generation.
type Revision = (String, u64);

/// The revisions placed on one node, as its session sent them.
#[derive(Debug, Default)]
pub(crate) struct NodePlacements {
    /// Agent workload name → its revision, this node's replicas of it and its module's digest.
    placed: HashMap<String, (Revision, u64, String)>,
    /// Revisions removed from the node whose sandboxes may still be running or stopping, with
    /// the replicas they had.
    draining: HashMap<Revision, u64>,
    /// [`Self::caps`] as of the last change to `placed` or `draining`: heartbeats come far
    /// more often than changes.
    caps: Option<HashMap<Revision, u64>>,
}

/// Why a report, or part of one, was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// It names a revision that is not and was not placed on the node.
    UnplacedWorkload,
    /// It counts more sandboxes than the node has replicas of the revision.
    OverPlacement,
    /// It fetches a module no workload placed on the node runs.
    UnplacedModule,
}

impl Refusal {
    /// The reason label of the refusal metric.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::UnplacedWorkload => "UnplacedWorkload",
            Self::OverPlacement => "OverPlacement",
            Self::UnplacedModule => "UnplacedModule",
        }
    }
}

impl NodePlacements {
    /// Records a desired state sent to the node: a complete one replaces what was placed.
    pub(crate) fn apply(&mut self, update: &DesiredState) {
        self.caps = None;
        if !update.incremental {
            let names: Vec<String> = self.placed.keys().cloned().collect();
            for name in names {
                self.unplace(&name);
            }
        }
        for name in &update.removed {
            self.unplace(name);
        }
        for workload in &update.workloads {
            let Some(spec) = &workload.spec else { continue };
            let revision = (workload.key.clone(), spec.generation);
            self.draining.remove(&revision);
            let module = spec
                .module
                .as_ref()
                .map(|m| m.sha256.clone())
                .unwrap_or_default();
            self.placed.insert(
                spec.name.clone(),
                (revision, u64::from(spec.replicas), module),
            );
        }
    }

    fn unplace(&mut self, name: &str) {
        if let Some((revision, replicas, _)) = self.placed.remove(name) {
            let draining = self.draining.entry(revision).or_default();
            *draining = (*draining).max(replicas);
        }
    }

    /// The most sandboxes the node may report of each revision that is its own: its replicas
    /// placed, or, draining, those it had.
    fn caps(&mut self) -> &HashMap<Revision, u64> {
        if self.caps.is_none() {
            self.caps = Some(self.compute_caps());
        }
        self.caps.get_or_insert_default()
    }

    fn compute_caps(&self) -> HashMap<Revision, u64> {
        let mut caps = self.draining.clone();
        let mut placed: HashMap<&Revision, u64> = HashMap::new();
        for (revision, replicas, _) in self.placed.values() {
            let sum = placed.entry(revision).or_default();
            *sum = sum.saturating_add(*replicas);
        }
        for (revision, replicas) in placed {
            let cap = caps.entry(revision.clone()).or_default();
            *cap = (*cap).max(replicas);
        }
        caps
    }

    /// Whether a workload placed on the node runs the module `sha256`: only then may its agent
    /// fetch it.
    pub(crate) fn uses_module(&self, sha256: &str) -> bool {
        !sha256.is_empty() && self.placed.values().any(|(_, _, module)| module == sha256)
    }

    /// Keeps what the node may report: revisions placed on it, with counts capped at its
    /// replicas. Draining revisions the report no longer names are forgotten.
    pub(crate) fn check(
        &mut self,
        reports: BTreeMap<Revision, Reported>,
        mut refused: impl FnMut(Refusal),
    ) -> BTreeMap<Revision, Reported> {
        let caps = self.caps();
        let mut kept = BTreeMap::new();
        for (revision, mut reported) in reports {
            let Some(&cap) = caps.get(&revision) else {
                refused(Refusal::UnplacedWorkload);
                continue;
            };
            if reported.running > cap || reported.succeeded > cap {
                refused(Refusal::OverPlacement);
                reported.running = reported.running.min(cap);
                reported.succeeded = reported.succeeded.min(cap);
            }
            reported.available = reported.available.min(reported.running);
            kept.insert(revision, reported);
        }
        let draining = self.draining.len();
        self.draining
            .retain(|revision, _| kept.contains_key(revision));
        if self.draining.len() != draining {
            self.caps = None;
        }
        kept
    }

    /// Keeps the failure events of revisions placed on the node (or draining from it).
    pub(crate) fn check_events(
        &mut self,
        events: Vec<SandboxEvent>,
        mut refused: impl FnMut(Refusal),
    ) -> Vec<SandboxEvent> {
        let caps = self.caps();
        events
            .into_iter()
            .filter(|event| {
                let own = caps.contains_key(&(event.key.clone(), event.generation));
                if !own {
                    refused(Refusal::UnplacedWorkload);
                }
                own
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::agent::v1::{ModuleSource, WorkloadSpec};
    use flotilla_proto::control::v1::DesiredWorkload;

    use super::*;

    fn desired(
        incremental: bool,
        workloads: &[(&str, u64, u32)],
        removed: &[&str],
    ) -> DesiredState {
        DesiredState {
            workloads: workloads
                .iter()
                .map(|&(key, generation, replicas)| DesiredWorkload {
                    key: key.into(),
                    spec: Some(WorkloadSpec {
                        name: format!("{}-{generation}", key.replace('/', ".")),
                        generation,
                        replicas,
                        module: Some(ModuleSource {
                            sha256: format!("sha-of-{key}"),
                            ..ModuleSource::default()
                        }),
                        ..WorkloadSpec::default()
                    }),
                })
                .collect(),
            incremental,
            removed: removed.iter().map(|s| (*s).to_string()).collect(),
            continued: false,
        }
    }

    fn report(entries: &[(&str, u64, u64)]) -> BTreeMap<Revision, Reported> {
        entries
            .iter()
            .map(|&(key, generation, running)| {
                let reported = Reported {
                    generation,
                    running,
                    available: running,
                    succeeded: 0,
                };
                ((key.to_string(), generation), reported)
            })
            .collect()
    }

    fn check(
        placements: &mut NodePlacements,
        entries: &[(&str, u64, u64)],
    ) -> (BTreeMap<Revision, Reported>, Vec<Refusal>) {
        let mut refusals = Vec::new();
        let kept = placements.check(report(entries), |r| refusals.push(r));
        (kept, refusals)
    }

    #[test]
    fn reports_of_other_workloads_are_refused_and_counts_capped() {
        let mut placements = NodePlacements::default();
        placements.apply(&desired(false, &[("a/web", 1, 2)], &[]));
        let (kept, refusals) = check(
            &mut placements,
            &[("a/web", 1, 5), ("b/victim", 1, 3), ("a/web", 2, 1)],
        );
        assert_eq!(kept.len(), 1);
        let web = &kept[&("a/web".to_string(), 1)];
        assert_eq!((web.running, web.available), (2, 2));
        assert_eq!(
            refusals,
            [
                Refusal::OverPlacement,
                Refusal::UnplacedWorkload,
                Refusal::UnplacedWorkload
            ]
        );
        let events = vec![
            SandboxEvent {
                key: "b/victim".into(),
                generation: 1,
                ..SandboxEvent::default()
            },
            SandboxEvent {
                key: "a/web".into(),
                generation: 1,
                ..SandboxEvent::default()
            },
        ];
        let kept = placements.check_events(events, |_| {});
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].key, "a/web");
        // Its own module may be fetched; another tenant's may not, nor a removed one's.
        assert!(placements.uses_module("sha-of-a/web"));
        assert!(!placements.uses_module("sha-of-b/victim"));
        assert!(!placements.uses_module(""));
        placements.apply(&desired(true, &[], &["a.web-1"]));
        assert!(!placements.uses_module("sha-of-a/web"));
    }

    #[test]
    fn a_removed_revision_is_reportable_until_its_sandboxes_are_gone() {
        let mut placements = NodePlacements::default();
        placements.apply(&desired(false, &[("a/web", 1, 3)], &[]));
        placements.apply(&desired(true, &[], &["a.web-1"]));
        // Still stopping: the deletion must keep waiting for them.
        let (kept, refusals) = check(&mut placements, &[("a/web", 1, 3)]);
        assert_eq!(kept[&("a/web".to_string(), 1)].running, 3);
        assert!(refusals.is_empty());
        // Gone from one report: gone for good.
        let (kept, _) = check(&mut placements, &[]);
        assert!(kept.is_empty());
        let (kept, refusals) = check(&mut placements, &[("a/web", 1, 1)]);
        assert!(kept.is_empty());
        assert_eq!(refusals, [Refusal::UnplacedWorkload]);
    }

    #[test]
    fn a_complete_set_drains_what_it_no_longer_lists() {
        let mut placements = NodePlacements::default();
        placements.apply(&desired(false, &[("a/web", 1, 2), ("a/job", 4, 1)], &[]));
        placements.apply(&desired(false, &[("a/web", 2, 2)], &[]));
        let (kept, refusals) = check(&mut placements, &[("a/web", 1, 2), ("a/web", 2, 2)]);
        assert_eq!(kept.len(), 2);
        assert!(refusals.is_empty());
        // a/job was not reported: it is no longer the node's to report.
        let (kept, refusals) = check(&mut placements, &[("a/job", 4, 1)]);
        assert!(kept.is_empty());
        assert_eq!(refusals, [Refusal::UnplacedWorkload]);
    }
}
