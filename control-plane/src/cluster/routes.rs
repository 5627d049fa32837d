//! The cluster's HTTP routes: for every HTTP workload, its host and path prefix and the
//! ingresses of the nodes its replicas are placed on. The controller publishes the table after
//! each pass; every agent session sends it down when it changes, so that any agent's ingress
//! (behind a Service over all of them) can pass a request on to a node that serves it.

use std::sync::Arc;

use flotilla_proto::control::v1::ClusterRoute;
use tokio::sync::watch;

use crate::model::Workload;
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

/// The routes of `workloads` (HTTP ones not being deleted) given the nodes they are placed on,
/// sorted by workload.
pub fn routes_of<'a>(
    workloads: impl IntoIterator<Item = &'a Workload>,
    nodes: &[NodeInfo],
) -> Vec<ClusterRoute> {
    let mut routes: Vec<ClusterRoute> = workloads
        .into_iter()
        .filter(|w| w.metadata.deletion_timestamp.is_empty())
        .filter_map(|workload| {
            let http = workload.spec.http.as_ref()?;
            let placements = &workload.status.as_ref()?.placements;
            let endpoints: Vec<String> = nodes
                .iter()
                .filter(|n| n.ready && !n.ingress_url.is_empty())
                .filter(|n| placements.get(&n.name).is_some_and(|&count| count > 0))
                .map(|n| n.ingress_url.clone())
                .collect();
            let key = workload.key();
            (!endpoints.is_empty()).then(|| ClusterRoute {
                workload: format!("{}.{}", key.namespace, key.name),
                host: http.host.clone().unwrap_or_default(),
                path_prefix: http.path_prefix().to_string(),
                endpoints,
            })
        })
        .collect();
    routes.sort_by(|a, b| a.workload.cmp(&b.workload));
    routes
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

    fn workload(name: &str, http: Option<HttpSpec>, placements: &[(&str, u64)]) -> Workload {
        let mut w: Workload = serde_yaml::from_str(&format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: {name}\n\
             spec:\n  module:\n    sha256: {}\n",
            "a".repeat(64)
        ))
        .expect("workload");
        w.spec.http = http;
        w.status = Some(WorkloadStatus {
            placements: placements
                .iter()
                .map(|(n, c)| (n.to_string(), *c))
                .collect(),
            ..WorkloadStatus::default()
        });
        w
    }

    #[test]
    fn routes_list_the_ready_ingresses_of_placed_nodes() {
        let nodes = [
            node("a", "http://10.0.0.1:8080", true),
            node("b", "http://10.0.0.2:8080", true),
            node("c", "http://10.0.0.3:8080", false),
            node("d", "", true),
        ];
        let http = HttpSpec {
            host: Some("api.example.com".into()),
            path_prefix: Some("/api".into()),
            ..HttpSpec::default()
        };
        let workloads = [
            workload("web", Some(http), &[("a", 2), ("c", 1), ("d", 1)]),
            workload("batch", None, &[("a", 1)]),
            workload("nowhere", Some(HttpSpec::default()), &[]),
        ];
        let routes = routes_of(&workloads, &nodes);
        assert_eq!(
            routes,
            [ClusterRoute {
                workload: "default.web".into(),
                host: "api.example.com".into(),
                path_prefix: "/api".into(),
                endpoints: vec!["http://10.0.0.1:8080".into()],
            }]
        );

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
