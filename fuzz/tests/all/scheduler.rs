//! The scheduler over random fleets and workloads: it answers every input, places each replica
//! it is asked for or counts it unschedulable with a reason, and never puts one where a filter
//! forbids it: a node that is not ready, over capacity, with an untolerated taint, without a
//! selected label, without an ingress for an HTTP workload, or without an enabled feature.

use std::collections::BTreeMap;

use flotilla_control_plane::scheduler::framework::{NodeInfo, NodeResources, WorkloadRequest};
use flotilla_control_plane::scheduler::{Scheduler, SchedulerConfig};
use flotilla_model::wasm::{FeatureSet, WasmFeature};
use flotilla_model::{Requests, Taint, TaintEffect, Toleration, TolerationOperator};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

fn effect() -> impl Strategy<Value = TaintEffect> {
    prop_oneof![
        Just(TaintEffect::NoSchedule),
        Just(TaintEffect::PreferNoSchedule),
        Just(TaintEffect::NoExecute),
    ]
}

fn taint() -> impl Strategy<Value = Taint> {
    ("dedicated|gpu|edge", "a|b|", effect()).prop_map(|(key, value, effect)| Taint {
        key,
        value,
        effect,
    })
}

fn toleration() -> impl Strategy<Value = Toleration> {
    (
        "dedicated|gpu|",
        "a|b|",
        any::<bool>(),
        prop::option::of(effect()),
    )
        .prop_map(|(key, value, exists, effect)| Toleration {
            key,
            operator: if exists {
                TolerationOperator::Exists
            } else {
                TolerationOperator::Equal
            },
            value,
            effect,
        })
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("kubernetes.io/arch|zone|pool", "amd64|arm64|a|b", 0..3)
}

fn features() -> impl Strategy<Value = FeatureSet> {
    prop::collection::vec(prop::sample::select(WasmFeature::ALL.to_vec()), 0..3)
        .prop_map(|f| f.into_iter().collect())
}

fn resources(max: u64) -> impl Strategy<Value = NodeResources> {
    (0..=max, 0..=max, 0..=max).prop_map(|(memory, cpu_millis, sandboxes)| NodeResources {
        memory,
        cpu_millis,
        sandboxes,
    })
}

fn nodes() -> impl Strategy<Value = Vec<NodeInfo>> {
    prop::collection::vec(
        (
            any::<bool>(),
            labels(),
            prop_oneof![Just(vec![]), prop::collection::vec(taint(), 1..3)],
            resources(64),
            resources(24),
            any::<bool>(),
            features(),
        ),
        0..12,
    )
    .prop_map(|nodes| {
        nodes
            .into_iter()
            .enumerate()
            .map(
                |(i, (not_ready, mut labels, taints, allocatable, allocated, ingress, offered))| {
                    for feature in offered.iter() {
                        labels.insert(feature.node_label().into(), "true".into());
                    }
                    NodeInfo {
                        name: format!("node-{i}"),
                        // Mostly ready.
                        ready: !not_ready || i % 2 == 0,
                        labels,
                        taints,
                        allocatable,
                        allocated,
                        ingress_url: if ingress {
                            format!("http://10.0.0.{i}:8080")
                        } else {
                            String::new()
                        },
                    }
                },
            )
            .collect()
    })
}

fn workload() -> impl Strategy<Value = WorkloadRequest> {
    (
        (0u64..8, 0u64..8, 1u64..4),
        prop_oneof![2 => Just(BTreeMap::new()), 1 => labels()],
        prop::collection::vec(toleration(), 0..3),
        prop::bool::weighted(0.3),
        prop_oneof![2 => Just(FeatureSet::NONE), 1 => features()],
    )
        .prop_map(
            |((memory, cpu_millis, sandboxes), node_selector, tolerations, http, wasm_features)| {
                WorkloadRequest {
                    key: "default/w".into(),
                    requests: Requests {
                        memory,
                        cpu_millis,
                        sandboxes,
                    },
                    node_selector,
                    tolerations,
                    http,
                    wasm_features,
                }
            },
        )
}

/// Whether `count` replicas of `workload` on `node` break a rule.
fn violation(node: &NodeInfo, workload: &WorkloadRequest, count: u64) -> Option<String> {
    if !node.ready {
        return Some("not ready".into());
    }
    let fits = |allocated: u64, request: u64, allocatable: u64| {
        allocated.saturating_add(request.saturating_mul(count)) <= allocatable
    };
    let (a, r, c) = (&node.allocated, &workload.requests, &node.allocatable);
    if !fits(a.memory, r.memory, c.memory)
        || !fits(a.cpu_millis, r.cpu_millis, c.cpu_millis)
        || !fits(a.sandboxes, r.sandboxes, c.sandboxes)
    {
        return Some(format!("over capacity with {count}: {a:?} + {r:?} > {c:?}"));
    }
    let untolerated = node.taints.iter().find(|taint| {
        taint.effect != TaintEffect::PreferNoSchedule
            && !workload.tolerations.iter().any(|t| t.tolerates(taint))
    });
    if let Some(taint) = untolerated {
        return Some(format!("untolerated {taint:?}"));
    }
    if workload
        .node_selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        return Some("selector not matched".into());
    }
    if workload.http && node.ingress_url.is_empty() {
        return Some("no ingress".into());
    }
    if let Some(feature) = workload
        .wasm_features
        .iter()
        .find(|f| node.labels.get(f.node_label()).map(String::as_str) != Some("true"))
    {
        return Some(format!("{feature} not offered"));
    }
    None
}

proptest! {
    #[test]
    fn replicas_are_placed_only_where_every_filter_allows(
        nodes in nodes(),
        workload in workload(),
        existing in prop::collection::btree_map("node-[0-9]{1,2}", 0u64..5, 0..4),
        replicas in 0u64..200,
    ) {
        let scheduler = Scheduler::new(&SchedulerConfig::default()).expect("default config");
        let placement = scheduler
            .schedule(&workload, &nodes, &existing, replicas)
            .expect("the built-in plugins do not fail");
        let placed: u64 = placement.assigned.values().sum();
        prop_assert_eq!(placed + placement.unschedulable, replicas);
        prop_assert_eq!(placement.message.is_some(), placement.unschedulable > 0);
        for (name, &count) in &placement.assigned {
            let node = nodes.iter().find(|n| &n.name == name);
            prop_assert!(node.is_some(), "placed on unknown node {}", name);
            if let Some(problem) = node.and_then(|n| violation(n, &workload, count)) {
                return Err(TestCaseError::fail(format!("{name}: {problem}")));
            }
        }
    }
}

/// The generator makes fleets where replicas fit and fleets where they do not, so the property
/// above checks placements, not only refusals.
#[test]
fn the_generator_makes_placements_and_refusals() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let scheduler = Scheduler::new(&SchedulerConfig::default()).expect("default config");
    let (mut placed, mut refused) = (0, 0);
    for _ in 0..256 {
        let nodes = nodes().new_tree(&mut runner).expect("nodes").current();
        let workload = workload()
            .new_tree(&mut runner)
            .expect("workload")
            .current();
        let placement = scheduler
            .schedule(&workload, &nodes, &BTreeMap::new(), 10)
            .expect("schedules");
        placed += usize::from(!placement.assigned.is_empty());
        refused += usize::from(placement.unschedulable > 0);
    }
    assert!(
        placed >= 64 && refused >= 64,
        "{placed} placed, {refused} refused"
    );
}
