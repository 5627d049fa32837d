//! [`KubeStore`]: workloads as `WasmWorkload` objects in a Kubernetes cluster.
//!
//! One kube-runtime watcher (with the default backoff) keeps a cache of every `WasmWorkload` and
//! feeds the store's watchers; reads are answered from that cache, so the control plane costs
//! the API server one watch, not a list per reconcile pass. Writes go to the API server and
//! their results are written through to the cache, so a caller reads its own writes. Status is
//! written with server-side apply under [`FIELD_MANAGER`]. An object that does not decode is
//! skipped with a warning, so one bad object cannot stop the others.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::{Error, Watch, WatchEvent, WorkloadStore};
use crate::model::{
    API_VERSION, WORKLOAD_KIND, WasmWorkload, Workload, WorkloadKey, WorkloadStatus,
};

/// The field manager of everything the control plane writes.
pub const FIELD_MANAGER: &str = "flotilla-control-plane";

/// How long a read waits for the first sync with the API server before failing.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts of a write that races other writers (each re-reads the object).
const WRITE_ATTEMPTS: usize = 5;
/// Events buffered for slow watchers before they are resynchronised.
const EVENT_BUFFER: usize = 4096;

/// Workloads kept in the Kubernetes API. Cheap to clone; the watcher stops with the last clone.
#[derive(Clone)]
pub struct KubeStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    resource: ApiResource,
    shared: Arc<Shared>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// What the watcher task and the store share.
struct Shared {
    cache: Mutex<Cache>,
    events: broadcast::Sender<WatchEvent>,
    synced: watch::Sender<bool>,
}

#[derive(Default)]
struct Cache {
    objects: BTreeMap<WorkloadKey, Workload>,
    /// Deletions this store made, by the version that deleted them, until the watcher sees them:
    /// an older event must not bring the object back.
    tombstones: BTreeMap<WorkloadKey, String>,
    /// Objects listed since the watcher (re)started, until the list is complete.
    relist: Option<BTreeMap<WorkloadKey, Workload>>,
    last_error: Option<String>,
}

impl KubeStore {
    /// Starts watching every `WasmWorkload` in the cluster `client` talks to.
    pub fn start(client: Client) -> Self {
        let resource = ApiResource::erase::<WasmWorkload>(&());
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            cache: Mutex::new(Cache::default()),
            events,
            synced: watch::channel(false).0,
        });
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let watcher = tokio::spawn(run_watcher(api, shared.clone()));
        Self {
            inner: Arc::new(Inner {
                client,
                resource,
                shared,
                watcher,
            }),
        }
    }

    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.inner.client.clone(), namespace, &self.inner.resource)
    }

    /// Waits until the cache holds a complete list.
    async fn synced(&self) -> Result<(), Error> {
        let mut synced = self.inner.shared.synced.subscribe();
        match tokio::time::timeout(SYNC_TIMEOUT, synced.wait_for(|s| *s)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Unavailable(format!(
                "no complete list of WasmWorkloads from the Kubernetes API after {SYNC_TIMEOUT:?}{}",
                self.inner
                    .shared
                    .cache()
                    .last_error
                    .as_ref()
                    .map_or_else(String::new, |e| format!(": {e}"))
            ))),
        }
    }
}

impl Shared {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes a result through to the cache unless the cache already holds something newer.
    fn remember(&self, workload: &Workload) {
        let mut cache = self.cache();
        let key = workload.key();
        if cache.objects.get(&key).is_some_and(|cached| {
            newer(
                &cached.metadata.resource_version,
                &workload.metadata.resource_version,
            )
        }) {
            return;
        }
        cache.tombstones.remove(&key);
        cache.objects.insert(key, workload.clone());
    }

    fn forget(&self, key: &WorkloadKey, version: &str) {
        let mut cache = self.cache();
        cache.objects.remove(key);
        cache.tombstones.insert(key.clone(), version.to_string());
    }

    /// Applies one watcher event to the cache and passes it on, under the cache lock, so that a
    /// watch's snapshot and its events have no gap between them.
    fn observe(&self, event: Event<DynamicObject>) {
        let mut cache = self.cache();
        match event {
            Event::Init => cache.relist = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                if let Some(workload) = decode_logged(object)
                    && let Some(relist) = cache.relist.as_mut()
                {
                    relist.insert(workload.key(), workload);
                }
            }
            Event::InitDone => {
                cache.objects = cache.relist.take().unwrap_or_default();
                cache.tombstones.clear();
                cache.last_error = None;
                let _ = self.events.send(WatchEvent::Restarted(
                    cache.objects.values().cloned().collect(),
                ));
                self.synced.send_replace(true);
            }
            Event::Apply(object) => {
                let Some(workload) = decode_logged(object) else {
                    return;
                };
                let key = workload.key();
                let version = &workload.metadata.resource_version;
                let deleted = cache
                    .tombstones
                    .get(&key)
                    .is_some_and(|v| newer(v, version));
                let stale = cache
                    .objects
                    .get(&key)
                    .is_some_and(|cached| newer(&cached.metadata.resource_version, version));
                if !deleted && !stale {
                    cache.objects.insert(key, workload.clone());
                }
                let _ = self.events.send(WatchEvent::Applied(workload));
            }
            Event::Delete(object) => {
                let Some(workload) = decode_logged(object) else {
                    return;
                };
                let key = workload.key();
                cache.tombstones.remove(&key);
                let version = &workload.metadata.resource_version;
                if !cache
                    .objects
                    .get(&key)
                    .is_some_and(|cached| newer(&cached.metadata.resource_version, version))
                {
                    cache.objects.remove(&key);
                }
                let _ = self.events.send(WatchEvent::Deleted(workload));
            }
        }
    }
}

async fn run_watcher(api: Api<DynamicObject>, shared: Arc<Shared>) {
    let mut events = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => shared.observe(event),
            Err(error) => {
                let message = flotilla_telemetry::error_chain(&error);
                tracing::warn!(error = %message, "watching WasmWorkloads failed; retrying");
                shared.cache().last_error = Some(message);
            }
        }
    }
}

/// Whether resource version `a` is newer than `b`. Versions are opaque to clients, but every
/// Kubernetes API server issues increasing integers; anything else counts as not newer.
fn newer(a: &str, b: &str) -> bool {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}

/// The metadata fields the model keeps; the rest (managed fields, annotations, owners) stays in
/// the API server.
const KEPT_METADATA: [&str; 9] = [
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "labels",
    "creationTimestamp",
    "finalizers",
    "deletionTimestamp",
];

fn decode(object: &DynamicObject) -> Result<Workload, serde_json::Error> {
    let mut value = serde_json::to_value(object)?;
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|field, _| KEPT_METADATA.contains(&field.as_str()));
    }
    value["apiVersion"] = json!(API_VERSION);
    value["kind"] = json!(WORKLOAD_KIND);
    serde_json::from_value(value)
}

fn decode_logged(object: DynamicObject) -> Option<Workload> {
    match decode(&object) {
        Ok(workload) => Some(workload),
        Err(error) => {
            tracing::warn!(
                namespace = object.metadata.namespace.as_deref().unwrap_or_default(),
                name = object.metadata.name.as_deref().unwrap_or_default(),
                %error,
                "skipping a WasmWorkload that does not decode"
            );
            None
        }
    }
}

/// Turns a JSON failure on the workload `key` into the store's error.
fn json_error(key: &WorkloadKey) -> impl FnOnce(serde_json::Error) -> Error + '_ {
    move |source| Error::Decode {
        key: key.to_string(),
        source,
    }
}

fn decode_result(key: &WorkloadKey, object: &DynamicObject) -> Result<Workload, Error> {
    decode(object).map_err(json_error(key))
}

fn encode(key: &WorkloadKey, value: Value) -> Result<DynamicObject, Error> {
    serde_json::from_value(value).map_err(json_error(key))
}

fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

impl WorkloadStore for KubeStore {
    async fn get(&self, key: &WorkloadKey) -> Result<Option<Workload>, Error> {
        self.synced().await?;
        Ok(self.inner.shared.cache().objects.get(key).cloned())
    }

    async fn list(&self) -> Result<Vec<Workload>, Error> {
        self.synced().await?;
        Ok(self
            .inner
            .shared
            .cache()
            .objects
            .values()
            .cloned()
            .collect())
    }

    async fn apply(&self, workload: Workload) -> Result<Workload, Error> {
        workload.validate()?;
        let key = workload.key();
        let api = self.api(&key.namespace);
        let expected = workload.metadata.resource_version.clone();
        let spec = serde_json::to_value(&workload.spec).map_err(json_error(&key))?;
        for _ in 0..WRITE_ATTEMPTS {
            let current = api.get_opt(&key.name).await.map_err(Error::Kube)?;
            let written = match current {
                None => {
                    let value = json!({
                        "apiVersion": API_VERSION,
                        "kind": WORKLOAD_KIND,
                        "metadata": {
                            "name": key.name,
                            "namespace": key.namespace,
                            "labels": workload.metadata.labels,
                            "finalizers": workload.metadata.finalizers,
                        },
                        "spec": spec,
                    });
                    api.create(&post_params(), &encode(&key, value)?).await
                }
                Some(current) => {
                    let actual = current
                        .metadata
                        .resource_version
                        .clone()
                        .unwrap_or_default();
                    if !expected.is_empty() && expected != actual {
                        return Err(Error::Conflict {
                            key,
                            expected,
                            actual,
                        });
                    }
                    // Spec and labels from the caller; identity, finalizers, annotations and
                    // status stay as the cluster has them. The version guards the replace.
                    let mut value = serde_json::to_value(&current).map_err(json_error(&key))?;
                    value["spec"] = spec.clone();
                    value["metadata"]["labels"] = json!(workload.metadata.labels);
                    api.replace(&key.name, &post_params(), &encode(&key, value)?)
                        .await
                }
            };
            match written {
                Ok(object) => {
                    let workload = decode_result(&key, &object)?;
                    self.inner.shared.remember(&workload);
                    return Ok(workload);
                }
                // Another writer came between the read and the write: read again, unless the
                // caller asked for a particular version.
                Err(error) if api_code(&error) == Some(409) && expected.is_empty() => {}
                Err(error) if api_code(&error) == Some(409) => {
                    return Err(Error::Conflict {
                        key,
                        expected,
                        actual: "a newer version".into(),
                    });
                }
                Err(error) => return Err(Error::Kube(error)),
            }
        }
        Err(Error::Unavailable(format!(
            "{key} kept changing under {WRITE_ATTEMPTS} attempts to write it"
        )))
    }

    async fn delete(&self, key: &WorkloadKey) -> Result<Option<Workload>, Error> {
        let api = self.api(&key.namespace);
        match api.delete(&key.name, &DeleteParams::default()).await {
            Ok(either::Either::Left(object)) => {
                let workload = decode_result(key, &object)?;
                if workload.metadata.deletion_timestamp.is_empty() {
                    self.inner
                        .shared
                        .forget(key, &workload.metadata.resource_version);
                } else {
                    self.inner.shared.remember(&workload);
                }
                Ok(Some(workload))
            }
            Ok(either::Either::Right(_)) => {
                let last = self.inner.shared.cache().objects.get(key).cloned();
                let version = last
                    .as_ref()
                    .map(|w| w.metadata.resource_version.clone())
                    .unwrap_or_default();
                self.inner.shared.forget(key, &version);
                Ok(last)
            }
            Err(error) if api_code(&error) == Some(404) => Ok(None),
            Err(error) => Err(Error::Kube(error)),
        }
    }

    async fn patch_status(
        &self,
        key: &WorkloadKey,
        status: WorkloadStatus,
    ) -> Result<Workload, Error> {
        let api = self.api(&key.namespace);
        let patch = json!({
            "apiVersion": API_VERSION,
            "kind": WORKLOAD_KIND,
            "status": status,
        });
        match api
            .patch_status(
                &key.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(object) => {
                let workload = decode_result(key, &object)?;
                self.inner.shared.remember(&workload);
                Ok(workload)
            }
            Err(error) if api_code(&error) == Some(404) => Err(Error::NotFound(key.clone())),
            Err(error) => Err(Error::Kube(error)),
        }
    }

    async fn set_finalizers(
        &self,
        key: &WorkloadKey,
        finalizers: Vec<String>,
        resource_version: &str,
    ) -> Result<Option<Workload>, Error> {
        let api = self.api(&key.namespace);
        let mut patch = json!({"metadata": {"finalizers": finalizers}});
        if !resource_version.is_empty() {
            patch["metadata"]["resourceVersion"] = json!(resource_version);
        }
        match api
            .patch(
                &key.name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(object) => {
                let workload = decode_result(key, &object)?;
                if workload.metadata.finalizers.is_empty()
                    && !workload.metadata.deletion_timestamp.is_empty()
                {
                    self.inner
                        .shared
                        .forget(key, &workload.metadata.resource_version);
                    return Ok(None);
                }
                self.inner.shared.remember(&workload);
                Ok(Some(workload))
            }
            Err(error) if api_code(&error) == Some(404) => Err(Error::NotFound(key.clone())),
            Err(error) if api_code(&error) == Some(409) => Err(Error::Conflict {
                key: key.clone(),
                expected: resource_version.to_string(),
                actual: "a newer version".into(),
            }),
            Err(error) => Err(Error::Kube(error)),
        }
    }

    async fn watch(&self) -> Result<Watch, Error> {
        self.synced().await?;
        let shared = self.inner.shared.clone();
        let cache = shared.cache();
        let events = shared.events.subscribe();
        let initial = cache.objects.values().cloned().collect();
        drop(cache);
        Ok(Watch::new(
            initial,
            events,
            Box::new(move || Ok(shared.cache().objects.values().cloned().collect())),
        ))
    }
}

/// A Kubernetes API error as one plain line: the API server's message (which names the verb,
/// resource, namespace and reason), its code and reason; never a debug dump.
pub fn error_line(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            let message = if status.message.is_empty() {
                "no message"
            } else {
                status.message.trim()
            };
            match status.reason.as_str() {
                "" => format!("{message} (HTTP {})", status.code),
                reason => format!("{message} ({reason}, HTTP {})", status.code),
            }
        }
        other => flotilla_telemetry::error_chain(other),
    }
}
