//! `WasmNode` objects: one per registered agent, so that `kubectl get wasmnodes` shows the
//! fleet. Spec (arch, os, taints) and labels are applied with server-side apply, status
//! (allocatable, sandboxes, the `Ready` condition, last heartbeat) on the status subresource.
//!
//! Nodes learn the labels of the Kubernetes Node of the same name (zone, region, instance type,
//! ...) from a metadata-only watch, so workloads can select them as they would for pods; the
//! agent's own labels win. Agents outside the cluster have no Node and keep their own labels.
//!
//! A node's object is rewritten when what it shows changes, and otherwise at most every
//! [`HEARTBEAT_REFRESH`], so that a thousand heartbeating agents do not cost the API server a
//! write each. Objects of nodes that left the registry are deleted, and after a restart those
//! of nodes that did not come back within the startup grace.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{FIELD_MANAGER, MANAGED_BY};
use crate::cluster::{Cluster, ListedNode};
use crate::model::API_VERSION;
use crate::model::node::WasmNode;

/// How stale a published heartbeat time may get while nothing else changes.
pub(crate) const HEARTBEAT_REFRESH: Duration = Duration::from_secs(30);

/// How often the registry is compared with what was published, besides on every change.
const RESYNC: Duration = Duration::from_secs(5);

/// What was last written for one node.
struct Published {
    /// The object as applied, without its heartbeat time.
    shown: Value,
    at: Instant,
}

/// Keeps `WasmNode` objects in line with `cluster`'s nodes until `shutdown` completes.
pub(crate) async fn publish(
    client: kube::Client,
    cluster: Arc<Cluster>,
    startup_grace: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let (kubernetes_nodes, node_changes, _watch) = watch_kubernetes_nodes(client.clone());
    let api: Api<WasmNode> = Api::all(client);
    let grace_until = Instant::now() + startup_grace;
    let mut published: BTreeMap<String, Option<Published>> = BTreeMap::new();
    // Objects left by an earlier run: deleted unless their node comes back in time.
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    match api.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => {
            for node in list.items {
                if let Some(name) = node.metadata.name {
                    published.insert(name, None);
                }
            }
        }
        Err(error) => {
            tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "listing WasmNodes failed");
        }
    }
    let mut changes = cluster.nodes.subscribe();
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            changed = changes.changed() => if changed.is_err() { return },
            () = node_changes.notified() => {}
            _ = resync.tick() => {}
        }
        for name in cluster.nodes.names() {
            let labels = kubernetes_nodes
                .get(&ObjectRef::new(&name))
                .and_then(|node| node.metadata.labels.clone())
                .unwrap_or_default();
            cluster.nodes.set_cluster_labels(&name, labels);
        }
        let statuses = cluster.nodes.statuses();
        for status in &statuses {
            let (object, shown) = desired(status);
            let fresh = published
                .get(&status.info.name)
                .and_then(Option::as_ref)
                .is_some_and(|p| p.shown == shown && p.at.elapsed() < HEARTBEAT_REFRESH);
            if fresh {
                continue;
            }
            match apply(&api, &status.info.name, &object).await {
                Ok(()) => {
                    published.insert(
                        status.info.name.clone(),
                        Some(Published {
                            shown,
                            at: Instant::now(),
                        }),
                    );
                }
                Err(error) => {
                    tracing::warn!(node = %status.info.name, error = %flotilla_telemetry::error_chain(&error), "publishing a WasmNode failed");
                }
            }
        }
        let in_grace = Instant::now() < grace_until;
        let gone: Vec<String> = published
            .iter()
            .filter(|(name, seen)| {
                !statuses.iter().any(|s| s.info.name == **name) && (seen.is_some() || !in_grace)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    published.remove(&name);
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    published.remove(&name);
                }
                Err(error) => {
                    tracing::warn!(node = %name, error = %flotilla_telemetry::error_chain(&error), "deleting a WasmNode failed");
                }
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A metadata-only reflector of the cluster's Nodes, a notification on each change, and the
/// task that feeds them (stopped when dropped).
fn watch_kubernetes_nodes(
    client: kube::Client,
) -> (
    reflector::Store<PartialObjectMeta<Node>>,
    Arc<Notify>,
    AbortOnDrop,
) {
    let (reader, writer) = reflector::store();
    let notify = Arc::new(Notify::new());
    let changed = notify.clone();
    let stream = reflector::reflector(
        writer,
        watcher::watcher(
            Api::<PartialObjectMeta<Node>>::all(client),
            watcher::Config::default(),
        ),
    )
    .default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(error) => {
                    tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "watching Nodes failed; node labels may be stale");
                }
            }
        }
    });
    (reader, notify, AbortOnDrop(task))
}

/// The object to apply, and what of it counts as a change (all but the heartbeat time).
fn desired(status: &ListedNode) -> (Value, Value) {
    let info = &status.info;
    let mut labels: BTreeMap<&str, &str> = info
        .labels
        .iter()
        .filter(|(k, v)| is_label_key(k) && is_label_value(v))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    labels.insert(MANAGED_BY.0, MANAGED_BY.1);
    let heartbeat = SystemTime::now()
        .checked_sub(status.since_heartbeat)
        .unwrap_or_else(SystemTime::now);
    let (ready, reason, message) = if info.ready {
        (
            "True",
            "AgentHeartbeating",
            "the agent is connected and heartbeating".to_string(),
        )
    } else {
        (
            "False",
            "AgentLost",
            format!(
                "no heartbeat for {}s; its replicas move to other nodes",
                status.since_heartbeat.as_secs()
            ),
        )
    };
    let mut object = json!({
        "apiVersion": API_VERSION,
        "kind": "WasmNode",
        "metadata": {"name": info.name, "labels": labels},
        "spec": {
            "arch": info.labels.get("kubernetes.io/arch").cloned().unwrap_or_default(),
            "os": info.labels.get("kubernetes.io/os").cloned().unwrap_or_default(),
            "taints": info.taints,
            "ingressUrl": info.ingress_url,
        },
        "status": {
            "allocatable": info.allocatable,
            "sandboxes": status.running,
            "conditions": [{
                "type": "Ready",
                "status": ready,
                "reason": reason,
                "message": message,
            }],
        },
    });
    let shown = object.clone();
    object["status"]["lastHeartbeatTime"] =
        json!(humantime::format_rfc3339_seconds(heartbeat).to_string());
    (object, shown)
}

async fn apply(api: &Api<WasmNode>, name: &str, object: &Value) -> Result<(), kube::Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut main = object.clone();
    if let Some(map) = main.as_object_mut() {
        map.remove("status");
    }
    api.patch(name, &params, &Patch::Apply(&main)).await?;
    let status = json!({
        "apiVersion": API_VERSION,
        "kind": "WasmNode",
        "status": object["status"],
    });
    api.patch_status(name, &params, &Patch::Apply(&status))
        .await?;
    Ok(())
}

/// A valid label key: an optional DNS prefix and `/`, then a name of at most 63 characters.
fn is_label_key(key: &str) -> bool {
    let name = key.rsplit_once('/').map_or(key, |(_, name)| name);
    !name.is_empty() && is_label_value(name)
}

/// A valid label value: at most 63 alphanumerics, `-`, `_` or `.`, alphanumeric at both ends.
fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_none_or(|c| c.is_ascii_alphanumeric())
}
