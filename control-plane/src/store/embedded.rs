//! [`EmbeddedStore`]: workloads in a redb database file, for standalone mode.
//!
//! Every write is one redb transaction committed with immediate durability, so a crash or restart
//! loses nothing that was acknowledged. Writes and the start of a watch are serialised by one
//! lock held across commit and publish, so watchers see changes in commit order, without gaps.
//! redb calls block, so they run on tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{Error, Watch, WatchEvent, WorkloadStore};
use crate::model::{Workload, WorkloadKey, WorkloadStatus};

/// `namespace/name` → JSON-encoded [`Workload`].
const WORKLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("workloads");
/// Store-wide counters, such as the last resource version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RESOURCE_VERSION: &str = "resource_version";
/// Events buffered for slow watchers before they are resynchronised.
pub(crate) const EVENT_BUFFER: usize = 4096;

/// A durable, embedded workload store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    events: broadcast::Sender<WatchEvent>,
    /// Held across commit and publish, and while a watch takes its snapshot.
    order: Mutex<()>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`.
    ///
    /// # Errors
    /// [`Error::Open`] if the file cannot be opened or is not a store.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let db = Database::create(path).map_err(|e| Error::Open(e.into()))?;
        // Create the tables so that readers never see them missing.
        let txn = db.begin_write().map_err(|e| Error::Open(e.into()))?;
        txn.open_table(WORKLOADS)
            .map_err(|e| Error::Open(e.into()))?;
        txn.open_table(META).map_err(|e| Error::Open(e.into()))?;
        txn.commit().map_err(|e| Error::Open(e.into()))?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                events,
                order: Mutex::new(()),
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }
}

impl Inner {
    fn lock_order(&self) -> std::sync::MutexGuard<'_, ()> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn list(&self) -> Result<Vec<Workload>, Error> {
        let txn = self.db.begin_read().map_err(|e| Error::Read(e.into()))?;
        let table = txn
            .open_table(WORKLOADS)
            .map_err(|e| Error::Read(e.into()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| Error::Read(e.into()))? {
            let (key, value) = entry.map_err(|e| Error::Read(e.into()))?;
            out.push(decode(key.value(), value.value())?);
        }
        Ok(out)
    }

    fn get(&self, key: &WorkloadKey) -> Result<Option<Workload>, Error> {
        let txn = self.db.begin_read().map_err(|e| Error::Read(e.into()))?;
        let table = txn
            .open_table(WORKLOADS)
            .map_err(|e| Error::Read(e.into()))?;
        let id = key.to_string();
        let value = table.get(id.as_str()).map_err(|e| Error::Read(e.into()))?;
        value.map(|v| decode(&id, v.value())).transpose()
    }

    /// Runs `change` on the current object inside one write transaction, stores what it
    /// returns with a new resource version, commits, and publishes the event.
    fn write(
        &self,
        key: &WorkloadKey,
        change: impl FnOnce(Option<Workload>) -> Result<Option<Workload>, Error>,
    ) -> Result<Option<Workload>, Error> {
        let _order = self.lock_order();
        let txn = self.db.begin_write().map_err(|e| Error::Write(e.into()))?;
        let id = key.to_string();
        let (event, result) = {
            let mut table = txn
                .open_table(WORKLOADS)
                .map_err(|e| Error::Write(e.into()))?;
            let current = table
                .get(id.as_str())
                .map_err(|e| Error::Write(e.into()))?
                .map(|v| decode(&id, v.value()))
                .transpose()?;
            match change(current.clone())? {
                Some(mut next) => {
                    let mut meta = txn.open_table(META).map_err(|e| Error::Write(e.into()))?;
                    let version = meta
                        .get(RESOURCE_VERSION)
                        .map_err(|e| Error::Write(e.into()))?
                        .map_or(0, |v| v.value())
                        + 1;
                    meta.insert(RESOURCE_VERSION, version)
                        .map_err(|e| Error::Write(e.into()))?;
                    next.metadata.resource_version = version.to_string();
                    let bytes = serde_json::to_vec(&next).map_err(|source| Error::Decode {
                        key: id.clone(),
                        source,
                    })?;
                    table
                        .insert(id.as_str(), bytes.as_slice())
                        .map_err(|e| Error::Write(e.into()))?;
                    (Some(WatchEvent::Applied(next.clone())), Some(next))
                }
                None => {
                    table
                        .remove(id.as_str())
                        .map_err(|e| Error::Write(e.into()))?;
                    (current.clone().map(WatchEvent::Deleted), current)
                }
            }
        };
        txn.commit().map_err(|e| Error::Write(e.into()))?;
        if let Some(event) = event {
            // No watcher is not an error.
            let _ = self.events.send(event);
        }
        Ok(result)
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Workload, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Decode {
        key: key.to_string(),
        source,
    })
}

fn check_version(key: &WorkloadKey, expected: &str, current: &Workload) -> Result<(), Error> {
    if !expected.is_empty() && expected != current.metadata.resource_version {
        return Err(Error::Conflict {
            key: key.clone(),
            expected: expected.to_string(),
            actual: current.metadata.resource_version.clone(),
        });
    }
    Ok(())
}

impl WorkloadStore for EmbeddedStore {
    async fn get(&self, key: &WorkloadKey) -> Result<Option<Workload>, Error> {
        let key = key.clone();
        self.blocking(move |inner| inner.get(&key)).await
    }

    async fn list(&self) -> Result<Vec<Workload>, Error> {
        self.blocking(|inner| inner.list()).await
    }

    async fn apply(&self, workload: Workload) -> Result<Workload, Error> {
        workload.validate()?;
        let key = workload.key();
        self.blocking(move |inner| {
            inner
                .write(&key, |current| {
                    let mut next = workload;
                    next.metadata.namespace = key.namespace.clone();
                    match current {
                        Some(current) => {
                            check_version(&key, &next.metadata.resource_version, &current)?;
                            let generation =
                                current.metadata.generation + u64::from(current.spec != next.spec);
                            // Identity, finalizers and deletion state are the store's.
                            let mut merged = current;
                            merged.spec = next.spec;
                            merged.metadata.labels = next.metadata.labels;
                            merged.metadata.generation = generation;
                            Ok(Some(merged))
                        }
                        None => {
                            next.metadata.uid = uuid::Uuid::new_v4().to_string();
                            next.metadata.generation = 1;
                            next.metadata.creation_timestamp =
                                humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
                            next.status = None;
                            Ok(Some(next))
                        }
                    }
                })?
                .ok_or_else(|| Error::Task("apply produced no object".into()))
        })
        .await
    }

    async fn delete(&self, key: &WorkloadKey) -> Result<Option<Workload>, Error> {
        let key = key.clone();
        self.blocking(move |inner| {
            inner.write(&key, |current| match current {
                Some(mut held) if !held.metadata.finalizers.is_empty() => {
                    if held.metadata.deletion_timestamp.is_empty() {
                        held.metadata.deletion_timestamp =
                            humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
                    }
                    Ok(Some(held))
                }
                _ => Ok(None),
            })
        })
        .await
    }

    async fn set_finalizers(
        &self,
        key: &WorkloadKey,
        finalizers: Vec<String>,
        resource_version: &str,
    ) -> Result<Option<Workload>, Error> {
        let key = key.clone();
        let expected = resource_version.to_string();
        self.blocking(move |inner| {
            let mut gone = false;
            let result = inner.write(&key, |current| {
                let mut current = current.ok_or_else(|| Error::NotFound(key.clone()))?;
                check_version(&key, &expected, &current)?;
                current.metadata.finalizers = finalizers;
                if current.metadata.finalizers.is_empty()
                    && !current.metadata.deletion_timestamp.is_empty()
                {
                    gone = true;
                    return Ok(None);
                }
                Ok(Some(current))
            })?;
            // Once the workload is gone, `write` returns its last state.
            Ok(if gone { None } else { result })
        })
        .await
    }

    async fn patch_status(
        &self,
        key: &WorkloadKey,
        status: WorkloadStatus,
    ) -> Result<Workload, Error> {
        let key = key.clone();
        self.blocking(move |inner| {
            inner
                .write(&key, |current| {
                    let mut current = current.ok_or_else(|| Error::NotFound(key.clone()))?;
                    current.status = Some(status);
                    Ok(Some(current))
                })?
                .ok_or_else(|| Error::NotFound(key.clone()))
        })
        .await
    }

    async fn watch(&self) -> Result<Watch, Error> {
        let resync_store = self.inner.clone();
        self.blocking(move |inner| {
            let _order = inner.lock_order();
            let events = inner.events.subscribe();
            let initial = inner.list()?;
            Ok(Watch::new(
                initial,
                events,
                Box::new(move || resync_store.list()),
            ))
        })
        .await
    }
}
