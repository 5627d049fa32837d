//! `WasmFeatures`: a workload that enables WebAssembly proposals (`spec.wasm.features`) goes
//! only to nodes whose agent offers every one of them, as the node's `wasm.flotilla.dev/*`
//! labels (set from its registration) say.

use crate::scheduler::cycle_state::CycleState;
use crate::scheduler::framework::{FilterPlugin, NodeView, Plugin, WorkloadRequest};
use crate::scheduler::status::Status;

/// The plugin's name.
pub const NAME: &str = "WasmFeatures";

/// Filters out nodes that do not offer a feature the workload enables.
#[derive(Debug, Default)]
pub struct WasmFeatures;

impl Plugin for WasmFeatures {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl FilterPlugin for WasmFeatures {
    fn filter(&self, _: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>) -> Status {
        let missing = workload.wasm_features.iter().find(|feature| {
            node.info
                .labels
                .get(feature.node_label())
                .is_none_or(|v| v != "true")
        });
        match missing {
            None => Status::Success,
            // One reason per feature, so the summary counts nodes per missing feature.
            Some(feature) => Status::UnschedulableAndUnresolvable(format!(
                "node(s) did not offer wasm feature {feature}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::wasm::{FeatureSet, WasmFeature};
    use crate::scheduler::plugins::testing::*;

    #[test]
    fn nodes_must_offer_every_feature_the_workload_enables() {
        let offers = |features: &[WasmFeature]| {
            let mut info = node("n");
            for f in features {
                info.labels.insert(f.node_label().into(), "true".into());
            }
            info
        };
        let wants = |features: &[WasmFeature]| {
            let mut request = workload(0, 0);
            request.wasm_features = features.iter().copied().collect::<FeatureSet>();
            request
        };
        let (gc, cm_async) = (WasmFeature::Gc, WasmFeature::ComponentModelAsync);
        let state = CycleState::default();
        let fits = |node: &[WasmFeature], workload: &[WasmFeature]| {
            WasmFeatures.filter(&state, &wants(workload), &view(&offers(node)))
        };
        assert!(fits(&[], &[]).is_success());
        assert!(fits(&[gc], &[]).is_success());
        assert!(fits(&[gc, cm_async], &[gc, cm_async]).is_success());
        assert_eq!(
            fits(&[gc], &[gc, cm_async]),
            Status::UnschedulableAndUnresolvable(
                "node(s) did not offer wasm feature component-model-async".into()
            )
        );
        assert!(!fits(&[], &[gc]).is_success());

        let mut not_true = offers(&[]);
        not_true
            .labels
            .insert(gc.node_label().into(), "false".into());
        let status = WasmFeatures.filter(&state, &wants(&[gc]), &view(&not_true));
        assert!(!status.is_success());
    }
}
