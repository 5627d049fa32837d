//! The cluster's HTTP routes: for every HTTP workload, its host and path prefix and the
//! ingresses of the nodes its replicas are placed on. The controller publishes the table after
//! each pass; every agent session sends it down when it changes, so that any agent's ingress
//! (behind a Service over all of them) can pass a request on to a node that serves it.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_proto::control::v1::ClusterRoute;
use tokio::sync::watch;

use crate::model::{Workload, WorkloadStatus};
use crate::scheduler::framework::NodeInfo;

/// The latest route table. Cheap to share.
pub struct RouteTable {
    routes: watch::Sender<Arc<Vec<ClusterRoute>>>,
}

impl Default for RouteTable {
    fn default() -> Self {
        Self {
            routes: watch::channel(Arc::new(Vec::new())).0,
        }
    }
}

impl RouteTable {
    /// Replaces the table; subscribers hear of it only when it changed.
    pub fn publish(&self, routes: Vec<ClusterRoute>) {
        self.routes.send_if_modified(|current| {
            if **current == routes {
                return false;
            }
            *current = Arc::new(routes);
            true
        });
    }

    /// The table now, and a receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<ClusterRoute>>> {
        self.routes.subscribe()
    }
}

/// Base URLs of the ingresses serving `placements`: those of the ready nodes with replicas
/// there, in node order. `index` maps node names to positions in `nodes`.
pub(crate) fn serving_ingresses<'a>(
    placements: &BTreeMap<String, u64>,
    nodes: &'a [NodeInfo],
    index: &BTreeMap<String, usize>,
) -> Vec<&'a str> {
    placements
        .iter()
        .filter(|&(_, &count)| count > 0)
        .filter_map(|(node, _)| index.get(node).map(|&i| &nodes[i]))
        .filter(|n| n.ready && !n.ingress_url.is_empty())
        .map(|n| n.ingress_url.as_str())
        .collect()
}

/// The route of `workload` given its new `status`: `None` unless it serves HTTP, is not being
/// deleted and has a replica on a node with an ingress.
pub(crate) fn route_of(
    workload: &Workload,
    status: &WorkloadStatus,
    nodes: &[NodeInfo],
    index: &BTreeMap<String, usize>,
) -> Option<ClusterRoute> {
    let http = workload.spec.http.as_ref()?;
    if !workload.metadata.deletion_timestamp.is_empty() {
        return None;
    }
    // Every revision's replicas serve the route while an update replaces one with the next.
    let endpoints: Vec<String> = serving_ingresses(&status.all_placements(), nodes, index)
        .into_iter()
        .map(str::to_string)
        .collect();
    let key = workload.key();
    (!endpoints.is_empty()).then(|| ClusterRoute {
        workload: format!("{}.{}", key.namespace, key.name),
        host: http.host.clone().unwrap_or_default(),
        path_prefix: http.path_prefix().to_string(),
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HttpSpec, WorkloadStatus};

    fn node(name: &str, url: &str, ready: bool) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ready,
            ingress_url: url.into(),
            ..NodeInfo::default()
        }
    }

    fn workload(name: &str, http: Option<HttpSpec>) -> Workload {
        let mut w: Workload = serde_yaml::from_str(&format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: {name}\n\
             spec:\n  module:\n    sha256: {}\n",
            "a".repeat(64)
        ))
        .expect("workload");
        w.spec.http = http;
        w
    }

    fn placed(pairs: &[(&str, u64)]) -> WorkloadStatus {
        WorkloadStatus {
            placements: pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
            ..WorkloadStatus::default()
        }
    }

    #[test]
    fn routes_list_the_ready_ingresses_of_placed_nodes() {
        let nodes = [
            node("a", "http://10.0.0.1:8080", true),
            node("b", "http://10.0.0.2:8080", true),
            node("c", "http://10.0.0.3:8080", false),
            node("d", "", true),
        ];
        let index: BTreeMap<String, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let http = HttpSpec {
            host: Some("api.example.com".into()),
            path_prefix: Some("/api".into()),
            ..HttpSpec::default()
        };
        let web = workload("web", Some(http));
        let status = placed(&[("a", 2), ("b", 0), ("c", 1), ("d", 1), ("gone", 1)]);
        assert_eq!(
            serving_ingresses(&status.placements, &nodes, &index),
            ["http://10.0.0.1:8080"]
        );
        let route = route_of(&web, &status, &nodes, &index).expect("a route");
        assert_eq!(
            route,
            ClusterRoute {
                workload: "default.web".into(),
                host: "api.example.com".into(),
                path_prefix: "/api".into(),
                endpoints: vec!["http://10.0.0.1:8080".into()],
            }
        );
        let batch = workload("batch", None);
        assert_eq!(route_of(&batch, &placed(&[("a", 1)]), &nodes, &index), None);
        let nowhere = workload("nowhere", Some(HttpSpec::default()));
        assert_eq!(route_of(&nowhere, &placed(&[]), &nodes, &index), None);
        let mut leaving = web.clone();
        leaving.metadata.deletion_timestamp = "2026-11-26T00:00:00Z".into();
        assert_eq!(route_of(&leaving, &status, &nodes, &index), None);
        let routes = vec![route];

        let table = RouteTable::default();
        let mut changes = table.subscribe();
        table.publish(routes.clone());
        assert!(changes.has_changed().expect("open"));
        changes.mark_unchanged();
        table.publish(routes);
        assert!(
            !changes.has_changed().expect("open"),
            "same table, no wakeup"
        );
    }
}
