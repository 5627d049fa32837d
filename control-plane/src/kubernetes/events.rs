//! Kubernetes Events: every [`Notice`] (replicas scheduled or unschedulable, sandboxes that
//! trapped or ran out of memory) becomes an `events.k8s.io/v1` Event on its `WasmWorkload`, so
//! `kubectl describe wasmworkload` and `kubectl get events` show it. kube-runtime's
//! [`Recorder`] folds repeats into one Event with a growing series count.

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::broadcast::error::RecvError;

use crate::cluster::{Cluster, Notice};
use crate::model::{API_VERSION, WORKLOAD_KIND, WorkloadKey};
use crate::store::{KubeStore, WorkloadStore};

/// The longest note the Events API accepts.
const MAX_NOTE_BYTES: usize = 1024;

/// Publishes every notice of `cluster` as an Event until `shutdown` completes. `instance`
/// names this replica (the pod name) in the Events.
pub(crate) async fn publish(
    client: kube::Client,
    store: KubeStore,
    cluster: Arc<Cluster>,
    instance: String,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: super::FIELD_MANAGER.into(),
            instance: Some(instance),
        },
    );
    let mut notices = cluster.events.notices();
    loop {
        let notice = tokio::select! {
            () = &mut shutdown => return,
            notice = notices.recv() => match notice {
                Ok(notice) => notice,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "too many notices at once; some Events were not published");
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
        };
        let Some(reference) = reference(&store, &notice).await else {
            continue;
        };
        let event = Event {
            type_: if notice.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: notice.reason,
            note: Some(truncate(notice.message, MAX_NOTE_BYTES)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "publishing an Event failed");
        }
    }
}

/// The workload a notice is about, if it still exists.
async fn reference(store: &KubeStore, notice: &Notice) -> Option<ObjectReference> {
    let (namespace, name) = notice.key.split_once('/')?;
    let workload = store
        .get(&WorkloadKey::new(namespace, name))
        .await
        .ok()
        .flatten()?;
    Some(ObjectReference {
        api_version: Some(API_VERSION.into()),
        kind: Some(WORKLOAD_KIND.into()),
        namespace: Some(workload.metadata.namespace),
        name: Some(workload.metadata.name),
        uid: Some(workload.metadata.uid),
        resource_version: Some(workload.metadata.resource_version),
        ..ObjectReference::default()
    })
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
