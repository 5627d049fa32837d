//! Plugin names to instances: configuration chooses which plugins run and their weights.

use std::sync::Arc;

use super::framework::{FilterPlugin, PreFilterPlugin, PreScorePlugin, ScorePlugin};
use super::plugins::{
    balanced_allocation, http_ingress, least_allocated, node_ready, node_selector, resource_fit,
    taint_toleration, wasm_features, workload_spread,
};

/// Which plugins run, and how much each score counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Filter plugins, in order.
    pub filters: Vec<String>,
    /// Score plugins with their weights.
    pub scores: Vec<(String, i64)>,
}

impl Default for SchedulerConfig {
    /// Every filter; scores `LeastAllocated` 1, `BalancedAllocation` 1, `WorkloadSpread` 2,
    /// `TaintToleration` 1.
    fn default() -> Self {
        Self {
            filters: [
                node_ready::NAME,
                node_selector::NAME,
                taint_toleration::NAME,
                resource_fit::NAME,
                http_ingress::NAME,
                wasm_features::NAME,
            ]
            .map(String::from)
            .to_vec(),
            scores: vec![
                (least_allocated::NAME.into(), 1),
                (balanced_allocation::NAME.into(), 1),
                (workload_spread::NAME.into(), 2),
                (taint_toleration::NAME.into(), 1),
            ],
        }
    }
}

/// The plugins of one scheduler, grouped by extension point.
#[derive(Clone, Default)]
pub struct Profile {
    /// Pre-filter plugins.
    pub pre_filters: Vec<Arc<dyn PreFilterPlugin>>,
    /// Filter plugins.
    pub filters: Vec<Arc<dyn FilterPlugin>>,
    /// Pre-score plugins.
    pub pre_scores: Vec<Arc<dyn PreScorePlugin>>,
    /// Score plugins and weights.
    pub scores: Vec<(Arc<dyn ScorePlugin>, i64)>,
}

/// A configuration names a plugin that does not exist at that extension point.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown {point} plugin {name:?}")]
pub struct UnknownPlugin {
    /// `filter` or `score`.
    pub point: &'static str,
    /// The name.
    pub name: String,
}

impl Profile {
    /// Builds the plugins a configuration names.
    ///
    /// # Errors
    /// [`UnknownPlugin`] for a name that is not a plugin of that extension point.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, UnknownPlugin> {
        let mut profile = Profile::default();
        for name in &config.filters {
            let plugin: Arc<dyn FilterPlugin> = match name.as_str() {
                node_ready::NAME => Arc::new(node_ready::NodeReady),
                node_selector::NAME => Arc::new(node_selector::NodeSelector),
                taint_toleration::NAME => Arc::new(taint_toleration::TaintToleration),
                resource_fit::NAME => Arc::new(resource_fit::ResourceFit),
                http_ingress::NAME => Arc::new(http_ingress::HttpIngress),
                wasm_features::NAME => Arc::new(wasm_features::WasmFeatures),
                _ => {
                    return Err(UnknownPlugin {
                        point: "filter",
                        name: name.clone(),
                    });
                }
            };
            profile.filters.push(plugin);
        }
        for (name, weight) in &config.scores {
            let plugin: Arc<dyn ScorePlugin> = match name.as_str() {
                least_allocated::NAME => Arc::new(least_allocated::LeastAllocated),
                balanced_allocation::NAME => Arc::new(balanced_allocation::BalancedAllocation),
                taint_toleration::NAME => Arc::new(taint_toleration::TaintToleration),
                workload_spread::NAME => {
                    let spread = Arc::new(workload_spread::WorkloadSpread);
                    profile.pre_scores.push(spread.clone());
                    spread
                }
                _ => {
                    return Err(UnknownPlugin {
                        point: "score",
                        name: name.clone(),
                    });
                }
            };
            profile.scores.push((plugin, *weight));
        }
        Ok(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_builds() {
        let profile = Profile::from_config(&SchedulerConfig::default()).expect("valid");
        assert_eq!(profile.filters.len(), 6);
        assert_eq!(profile.scores.len(), 4);
        assert_eq!(profile.pre_scores.len(), 1);
    }

    #[test]
    fn unknown_names_are_refused() {
        let config = SchedulerConfig {
            filters: vec!["NodeReady".into(), "Nope".into()],
            scores: vec![],
        };
        let err = Profile::from_config(&config).err().expect("unknown");
        assert_eq!(err.to_string(), "unknown filter plugin \"Nope\"");
        let config = SchedulerConfig {
            filters: vec![],
            scores: vec![("ResourceFit".into(), 1)],
        };
        assert!(Profile::from_config(&config).is_err());
    }
}
