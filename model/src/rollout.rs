//! How a workload moves from one template to the next: the update strategy in its spec and the
//! revisions in its status, as a Deployment's strategy and ReplicaSets.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{WorkloadSpec, WorkloadStatus};

/// Old revisions a workload keeps for rollback when it sets no `revisionHistoryLimit`.
pub const DEFAULT_REVISION_HISTORY_LIMIT: u64 = 10;

/// How sandboxes of an old template are replaced by the new one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct Strategy {
    /// `RollingUpdate` (default) or `Recreate`.
    #[serde(default, rename = "type")]
    pub type_: StrategyType,
    /// Limits of a rolling update; only with `type: RollingUpdate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_update: Option<RollingUpdate>,
}

/// The kind of update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum StrategyType {
    /// Replace sandboxes a few at a time, within `maxSurge` and `maxUnavailable`.
    #[default]
    RollingUpdate,
    /// Stop every old sandbox, then start the new ones.
    Recreate,
}

/// The limits of a rolling update, as a Deployment's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct RollingUpdate {
    /// Sandboxes that may run above `replicas` during the update: a count or a percentage of
    /// `replicas`, rounded up. Default 25%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<IntOrPercent>,
    /// Sandboxes that may be unavailable during the update: a count or a percentage of
    /// `replicas`, rounded down. Default 25%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrPercent>,
}

/// A count (`3`) or a percentage (`"25%"`), as Kubernetes' `IntOrString`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrPercent {
    /// An absolute count.
    Int(i64),
    /// A percentage such as `25%` (or a count written as a string).
    String(String),
}

#[cfg(feature = "kube")]
impl schemars::JsonSchema for IntOrPercent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrPercent".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }

    fn inline_schema() -> bool {
        true
    }
}

impl fmt::Display for IntOrPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::String(s) => f.write_str(s),
        }
    }
}

/// A `maxSurge` or `maxUnavailable` that is neither a count nor a percentage, or negative.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntOrPercentError {
    /// Neither a count nor a percentage.
    #[error("{0}: must be a count or a percentage such as 25%")]
    Invalid(String),
    /// A negative count or percentage.
    #[error("{0}: must be >= 0")]
    Negative(String),
}

/// Why `flotilla rollout undo` has no revision to go back to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RollbackError {
    /// The revision asked for is the current one.
    #[error("revision {0} is the current one")]
    IsCurrent(u64),
    /// The revision asked for is not kept.
    #[error("revision {0} is not in the history")]
    NotInHistory(u64),
    /// There is no older revision.
    #[error("no previous revision to go back to")]
    NoPrevious,
}

impl IntOrPercent {
    /// The value against `total`: a percentage of it rounded up or down, or the count.
    ///
    /// # Errors
    /// A negative count, or a string that is neither a count nor a percentage.
    pub fn resolve(&self, total: u64, round_up: bool) -> Result<u64, IntOrPercentError> {
        let invalid = || IntOrPercentError::Invalid(self.to_string());
        let (value, percent) = match self {
            Self::Int(n) => (*n, false),
            Self::String(s) => match s.strip_suffix('%') {
                Some(p) => (p.parse::<i64>().map_err(|_| invalid())?, true),
                None => (s.parse::<i64>().map_err(|_| invalid())?, false),
            },
        };
        let value =
            u64::try_from(value).map_err(|_| IntOrPercentError::Negative(self.to_string()))?;
        if !percent {
            return Ok(value);
        }
        let scaled = u128::from(value) * u128::from(total);
        let resolved = if round_up {
            scaled.div_ceil(100)
        } else {
            scaled / 100
        };
        Ok(u64::try_from(resolved).unwrap_or(u64::MAX))
    }
}

/// A rolling update's limits resolved against a replica count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RolloutLimits {
    /// Sandboxes that may be placed above the desired count.
    pub max_surge: u64,
    /// Sandboxes of the desired count that may be unavailable.
    pub max_unavailable: u64,
}

impl Strategy {
    /// `maxSurge` and `maxUnavailable` for `replicas` (25% each by default). When both come
    /// out 0, one sandbox may be unavailable, as for a Deployment, so that the update moves.
    pub fn limits(&self, replicas: u64) -> RolloutLimits {
        let default = IntOrPercent::String("25%".into());
        let rolling = self.rolling_update.as_ref();
        let surge = rolling
            .and_then(|r| r.max_surge.as_ref())
            .unwrap_or(&default);
        let unavailable = rolling
            .and_then(|r| r.max_unavailable.as_ref())
            .unwrap_or(&default);
        let max_surge = surge.resolve(replicas, true).unwrap_or(0);
        let mut max_unavailable = unavailable.resolve(replicas, false).unwrap_or(0);
        if max_surge == 0 && max_unavailable == 0 {
            max_unavailable = 1;
        }
        RolloutLimits {
            max_surge,
            max_unavailable,
        }
    }

    /// Sandboxes of `replicas` that must stay available: all of them for `Recreate`, less
    /// `maxUnavailable` for a rolling update, as for a Deployment.
    pub fn min_available(&self, replicas: u64) -> u64 {
        match self.type_ {
            StrategyType::Recreate => replicas,
            StrategyType::RollingUpdate => {
                replicas.saturating_sub(self.limits(replicas).max_unavailable)
            }
        }
    }

    pub(crate) fn validate(&self, fail: &mut impl FnMut(&str, String)) {
        let Some(rolling) = &self.rolling_update else {
            return;
        };
        if self.type_ == StrategyType::Recreate {
            fail(
                "spec.strategy.rollingUpdate",
                "may only be set with type RollingUpdate".into(),
            );
            return;
        }
        let mut zero = 0;
        for (field, value) in [
            ("maxSurge", &rolling.max_surge),
            ("maxUnavailable", &rolling.max_unavailable),
        ] {
            let Some(value) = value else { continue };
            match value.resolve(100, true) {
                Ok(0) => zero += 1,
                Ok(_) => {}
                Err(message) => fail(
                    &format!("spec.strategy.rollingUpdate.{field}"),
                    message.to_string(),
                ),
            }
            if let IntOrPercent::String(s) = value
                && let Some(percent) = s.strip_suffix('%')
                && percent.parse::<u64>().is_ok_and(|p| p > 100)
                && field == "maxUnavailable"
            {
                fail(
                    &format!("spec.strategy.rollingUpdate.{field}"),
                    format!("{s}: must not be above 100%"),
                );
            }
        }
        if zero == 2 {
            fail(
                "spec.strategy.rollingUpdate",
                "maxSurge and maxUnavailable may not both be 0".into(),
            );
        }
    }
}

/// One revision of a workload's template and the sandboxes that run it.
///
/// Every revision carries its template, so that old sandboxes keep running while an update
/// replaces them and `flotilla rollout undo` can bring an old template back. The current
/// revision's placements are `status.placements`; an old one carries its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct RevisionStatus {
    /// Its number: 1 for the first template, one more for each change (a rollback to an old
    /// template gives it the next number, as a Deployment does).
    pub revision: u64,
    /// A digest of its template: agents name its sandboxes after it.
    pub template_hash: String,
    /// The generation that introduced it; agents report its sandboxes under it.
    pub generation: u64,
    /// Sandboxes placed.
    #[serde(default)]
    pub replicas: u64,
    /// Sandboxes running.
    #[serde(default)]
    pub ready_replicas: u64,
    /// Sandboxes running for at least `minReadySeconds`.
    #[serde(default)]
    pub available_replicas: u64,
    /// An old revision's sandboxes placed per node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub placements: BTreeMap<String, u64>,
    /// Its template (the spec it was made from, `replicas` aside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(schema_with = "crate::rollout::any_object"))]
    pub template: Option<Box<WorkloadSpec>>,
}

/// The schema of a nested spec copy: an object the API server keeps as is (the spec's own
/// schema is checked where the spec is written).
#[cfg(feature = "kube")]
pub(crate) fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

impl WorkloadStatus {
    /// Sandboxes placed per node, of every revision.
    pub fn all_placements(&self) -> BTreeMap<String, u64> {
        let mut all = self.placements.clone();
        let old = self
            .revisions
            .iter()
            .filter(|r| r.revision != self.revision);
        for revision in old {
            for (node, count) in &revision.placements {
                *all.entry(node.clone()).or_default() += count;
            }
        }
        all
    }
}

impl WorkloadSpec {
    /// This spec with `template`'s sandbox template (what `flotilla rollout undo` applies):
    /// the replica count, placement rules and update settings stay this spec's.
    pub fn with_template(&self, template: &WorkloadSpec) -> WorkloadSpec {
        WorkloadSpec {
            replicas: self.replicas,
            node_selector: self.node_selector.clone(),
            tolerations: self.tolerations.clone(),
            strategy: self.strategy.clone(),
            revision_history_limit: self.revision_history_limit,
            progress_deadline_seconds: self.progress_deadline_seconds,
            ..template.clone()
        }
    }
}

impl WorkloadStatus {
    /// The revision `flotilla rollout undo` goes back to: `to` when given, else the newest
    /// revision older than the current one.
    ///
    /// # Errors
    /// No such revision, or no older one.
    pub fn rollback_target(&self, to: Option<u64>) -> Result<&RevisionStatus, RollbackError> {
        let old = self
            .revisions
            .iter()
            .filter(|r| r.revision != self.revision && r.template.is_some());
        match to {
            Some(number) if number == self.revision => Err(RollbackError::IsCurrent(number)),
            Some(number) => old
                .clone()
                .find(|r| r.revision == number)
                .ok_or(RollbackError::NotInHistory(number)),
            None => old
                .max_by_key(|r| r.revision)
                .ok_or(RollbackError::NoPrevious),
        }
    }
}
