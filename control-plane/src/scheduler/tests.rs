//! The scheduler over simulated nodes: spreading a batch, capacity and its reasons, node
//! selectors, readiness, existing replicas, removals.

use std::collections::BTreeMap;

use super::framework::{NodeInfo, NodeResources, WorkloadRequest};
use super::*;
use crate::model::Requests;

fn node(name: &str, sandboxes: u64) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        ready: true,
        labels: [("kubernetes.io/arch".to_string(), "amd64".to_string())].into(),
        taints: vec![],
        allocatable: NodeResources {
            memory: 1 << 30,
            cpu_millis: 4000,
            sandboxes,
        },
        allocated: NodeResources::default(),
        ingress_url: String::new(),
    }
}

fn workload(memory: u64) -> WorkloadRequest {
    WorkloadRequest {
        key: "default/w".into(),
        requests: Requests {
            memory,
            cpu_millis: 0,
            sandboxes: 1,
        },
        ..WorkloadRequest::default()
    }
}

fn scheduler() -> Scheduler {
    Scheduler::new(&SchedulerConfig::default()).expect("default config")
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect()
}

#[test]
fn spreads_a_batch_evenly_over_identical_nodes() {
    let nodes = [node("a", 100), node("b", 100), node("c", 100)];
    let placement = scheduler()
        .schedule(&workload(1 << 20), &nodes, &BTreeMap::new(), 12)
        .expect("schedules");
    assert_eq!(placement.assigned, counts(&[("a", 4), ("b", 4), ("c", 4)]));
    assert_eq!(placement.unschedulable, 0);
    assert_eq!(placement.message, None);
}

#[test]
fn stops_at_capacity_and_says_why() {
    let nodes = [node("a", 10), node("b", 10), node("c", 10)];
    let placement = scheduler()
        .schedule(&workload(0), &nodes, &BTreeMap::new(), 35)
        .expect("schedules");
    assert_eq!(placement.assigned.values().sum::<u64>(), 30);
    assert_eq!(placement.unschedulable, 5);
    assert_eq!(
        placement.message.as_deref(),
        Some("0/3 nodes are available: 3 too many sandboxes")
    );
}

#[test]
fn an_http_replica_takes_a_sandbox_per_concurrent_request() {
    let nodes = ["a", "b"].map(|name| NodeInfo {
        ingress_url: format!("http://{name}:8080"),
        ..node(name, 100)
    });
    let mut w = workload(0);
    w.http = true;
    w.requests.sandboxes = 80;
    let placement = scheduler()
        .schedule(&w, &nodes, &BTreeMap::new(), 3)
        .expect("schedules");
    // One replica of 80 per node of 100: the third fits nowhere.
    assert_eq!(placement.assigned, counts(&[("a", 1), ("b", 1)]));
    assert_eq!(placement.unschedulable, 1);
    assert_eq!(
        placement.message.as_deref(),
        Some("0/2 nodes are available: 2 too many sandboxes")
    );
}

#[test]
fn aggregates_reasons_across_nodes() {
    let mut nodes = Vec::new();
    for i in 0..8 {
        let mut n = node(&format!("full-{i}"), 100);
        n.allocated.memory = n.allocatable.memory;
        nodes.push(n);
    }
    for i in 0..4 {
        let mut n = node(&format!("arm-{i}"), 100);
        n.labels.insert("kubernetes.io/arch".into(), "arm64".into());
        nodes.push(n);
    }
    let mut w = workload(1 << 20);
    w.node_selector
        .insert("kubernetes.io/arch".into(), "amd64".into());
    let placement = scheduler()
        .schedule(&w, &nodes, &BTreeMap::new(), 1)
        .expect("schedules");
    assert_eq!(placement.unschedulable, 1);
    assert_eq!(
        placement.message.as_deref(),
        Some(
            "0/12 nodes are available: 8 insufficient memory, 4 node(s) didn't match the node selector"
        )
    );
}

#[test]
fn arch_selector_places_only_on_matching_nodes() {
    let mut arm = node("arm", 100);
    arm.labels
        .insert("kubernetes.io/arch".into(), "arm64".into());
    let nodes = [node("x86-a", 100), arm, node("x86-b", 100)];
    let mut w = workload(0);
    w.node_selector
        .insert("kubernetes.io/arch".into(), "arm64".into());
    let placement = scheduler()
        .schedule(&w, &nodes, &BTreeMap::new(), 7)
        .expect("schedules");
    assert_eq!(placement.assigned, counts(&[("arm", 7)]));
}

#[test]
fn prefers_emptier_nodes_and_skips_unready_ones() {
    let mut busy = node("busy", 100);
    busy.allocated = NodeResources {
        memory: 1 << 29,
        cpu_millis: 2000,
        sandboxes: 50,
    };
    let mut down = node("down", 100);
    down.ready = false;
    let nodes = [busy, node("idle", 100), down];
    let placement = scheduler()
        .schedule(&workload(1 << 20), &nodes, &BTreeMap::new(), 1)
        .expect("schedules");
    assert_eq!(placement.assigned, counts(&[("idle", 1)]));
}

#[test]
fn existing_replicas_count_towards_the_spread() {
    let nodes = [node("a", 100), node("b", 100)];
    let placement = scheduler()
        .schedule(&workload(0), &nodes, &counts(&[("a", 4)]), 4)
        .expect("schedules");
    assert_eq!(placement.assigned, counts(&[("b", 4)]));
}

#[test]
fn scale_down_takes_from_gone_unready_then_most_loaded_nodes() {
    let mut loaded = node("loaded", 100);
    loaded.allocated.sandboxes = 90;
    let light = node("light", 100);
    let mut down = node("down", 100);
    down.ready = false;
    let nodes = [loaded, light, down];
    let existing = counts(&[("loaded", 5), ("light", 5), ("down", 2), ("gone", 1)]);
    let removals = scheduler().select_removals(&workload(0), &nodes, &existing, 5);
    assert_eq!(removals, counts(&[("down", 2), ("gone", 1), ("loaded", 2)]));
}

#[test]
fn large_batches_are_one_cycle() {
    let nodes: Vec<NodeInfo> = (0..100).map(|i| node(&format!("n{i:03}"), 1000)).collect();
    let placement = scheduler()
        .schedule(&workload(1 << 20), &nodes, &BTreeMap::new(), 10_000)
        .expect("schedules");
    assert_eq!(placement.assigned.len(), 100);
    assert!(
        placement.assigned.values().all(|&c| c == 100),
        "{:?}",
        placement.assigned
    );
}

#[test]
fn no_nodes_says_so() {
    let placement = scheduler()
        .schedule(&workload(0), &[], &BTreeMap::new(), 3)
        .expect("schedules");
    assert_eq!(placement.unschedulable, 3);
    assert_eq!(
        placement.message.as_deref(),
        Some("0/0 nodes are available: no node agent is registered")
    );
}
