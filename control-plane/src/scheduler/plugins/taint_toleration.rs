//! `TaintToleration`: `NoSchedule`/`NoExecute` taints keep out workloads that do not tolerate
//! them; untolerated `PreferNoSchedule` taints lower a node's score.

use crate::model::TaintEffect;
use crate::scheduler::cycle_state::CycleState;
use crate::scheduler::framework::{FilterPlugin, NodeView, Plugin, ScorePlugin, WorkloadRequest};
use crate::scheduler::status::Status;

/// The plugin's name.
pub const NAME: &str = "TaintToleration";

/// Filters on hard taints and scores on soft ones.
#[derive(Debug, Default)]
pub struct TaintToleration;

impl Plugin for TaintToleration {
    fn name(&self) -> &'static str {
        NAME
    }
}

fn tolerated(workload: &WorkloadRequest, taint: &crate::model::Taint) -> bool {
    workload.tolerations.iter().any(|t| t.tolerates(taint))
}

impl FilterPlugin for TaintToleration {
    fn filter(&self, _: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>) -> Status {
        let blocking = node.info.taints.iter().find(|t| {
            matches!(t.effect, TaintEffect::NoSchedule | TaintEffect::NoExecute)
                && !tolerated(workload, t)
        });
        match blocking {
            None => Status::Success,
            Some(taint) => Status::UnschedulableAndUnresolvable(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key, taint.value
            )),
        }
    }
}

impl ScorePlugin for TaintToleration {
    fn score(&self, _: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>) -> i64 {
        let soft = node
            .info
            .taints
            .iter()
            .filter(|t| t.effect == TaintEffect::PreferNoSchedule && !tolerated(workload, t))
            .count() as i64;
        (100 - 25 * soft).max(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Taint, Toleration};
    use crate::scheduler::plugins::testing::*;

    fn taint(key: &str, effect: TaintEffect) -> Taint {
        Taint {
            key: key.into(),
            value: "x".into(),
            effect,
        }
    }

    #[test]
    fn hard_taints_filter_and_soft_taints_score() {
        let tolerate_gpu = Toleration {
            key: "gpu".into(),
            value: "x".into(),
            ..Toleration::default()
        };
        let cases = [
            (vec![], vec![], true, 100),
            (
                vec![taint("gpu", TaintEffect::NoSchedule)],
                vec![],
                false,
                100,
            ),
            (
                vec![taint("gpu", TaintEffect::NoSchedule)],
                vec![tolerate_gpu.clone()],
                true,
                100,
            ),
            (
                vec![taint("gpu", TaintEffect::NoExecute)],
                vec![],
                false,
                100,
            ),
            (
                vec![taint("slow", TaintEffect::PreferNoSchedule)],
                vec![],
                true,
                75,
            ),
            (
                vec![taint("gpu", TaintEffect::PreferNoSchedule)],
                vec![tolerate_gpu],
                true,
                100,
            ),
        ];
        for (taints, tolerations, fits, score) in cases {
            let mut info = node("n");
            info.taints = taints.clone();
            let mut w = workload(0, 0);
            w.tolerations = tolerations;
            let state = CycleState::default();
            let v = view(&info);
            assert_eq!(
                TaintToleration.filter(&state, &w, &v).is_success(),
                fits,
                "{taints:?}"
            );
            assert_eq!(TaintToleration.score(&state, &w, &v), score, "{taints:?}");
        }
    }
}
