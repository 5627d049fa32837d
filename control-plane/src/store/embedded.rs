//! [`EmbeddedStore`]: workloads in a redb database file, for standalone mode.
//!
//! Every write is committed with immediate durability before it is acknowledged, so a crash or
//! restart loses nothing that was. Concurrent writes share a group commit: one writer commits
//! every write queued by then in one transaction and one fsync, then hands over to the next
//! queued writer. So a burst of writes (a tenant's, or a controller pass's status writes) costs
//! one fsync, not one each, and a write queued behind it waits for at most one commit in
//! progress. A change that fails fails alone; a storage failure fails its whole group.
//!
//! Every workload is also kept decoded in memory, as kube-apiserver's watch cache keeps what
//! etcd holds: reads (the controller lists every workload on every pass) cost a copy, not a
//! decode of each stored object. The store is the file's only writer, so this copy is exact: it
//! is read once at open and then changed by each commit, after the commit and before its
//! events are published.
//!
//! Commits and the start of a watch are serialised by one lock held across commit and publish,
//! so watchers see changes in commit order, without gaps. redb calls block, so they run on
//! tokio's blocking pool.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
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
    /// Every stored workload by `namespace/name` (the table's key, so in the table's order),
    /// as of the last commit.
    objects: RwLock<BTreeMap<String, Workload>>,
    events: broadcast::Sender<WatchEvent>,
    /// Held across commit and publish, and while a watch takes its snapshot.
    order: Mutex<()>,
    /// Writes waiting for the next group commit.
    writes: Mutex<WriteQueue>,
    /// Group commits so far: one transaction and one fsync each.
    group_commits: AtomicU64,
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
        let objects = read_all(&db)?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                objects: RwLock::new(objects),
                events,
                order: Mutex::new(()),
                writes: Mutex::default(),
                group_commits: AtomicU64::new(0),
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

    fn objects(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Workload>> {
        self.objects.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Every workload, in key order, as of the last commit.
    fn list(&self) -> Vec<Workload> {
        self.objects().values().cloned().collect()
    }

    fn write_queue(&self) -> std::sync::MutexGuard<'_, WriteQueue> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `change` on the current object and stores what it returns (`None` deletes it)
    /// with a new resource version; returns the stored object, or the deleted one's last
    /// state, once it is committed and its event published.
    ///
    /// The write joins the next group commit: if no writer is committing, this one commits
    /// every write queued by then; otherwise it waits for the committing writer, which hands
    /// over to the first writer still queued when it is done.
    fn write(
        &self,
        key: &WorkloadKey,
        change: impl FnOnce(Option<Workload>) -> Result<Option<Workload>, Error> + Send + 'static,
    ) -> Result<Option<Workload>, Error> {
        let (reply, replies) = mpsc::channel();
        let lead = {
            let mut queue = self.write_queue();
            queue.pending.push(PendingWrite {
                key: key.clone(),
                change: Box::new(change),
                reply,
            });
            !std::mem::replace(&mut queue.leading, true)
        };
        if lead {
            self.commit_group();
        }
        loop {
            match replies.recv() {
                Ok(Reply::Done(outcome)) => return *outcome,
                Ok(Reply::Lead) => self.commit_group(),
                Err(_) => return Err(Error::Task("the group commit of this write failed".into())),
            }
        }
    }

    /// Commits every queued write in one transaction, publishes their events in order and
    /// answers each; then hands over to the next queued writer, even if this one panics.
    fn commit_group(&self) {
        let _handover = Handover(self);
        let group = std::mem::take(&mut self.write_queue().pending);
        let _order = self.lock_order();
        let (changes, replies): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|write| ((write.key, write.change), write.reply))
            .unzip();
        match self.commit(changes) {
            Ok(outcomes) => {
                for (outcome, reply) in outcomes.into_iter().zip(replies) {
                    let outcome = outcome.map(|written| {
                        if let Some(event) = written.event {
                            // No watcher is not an error.
                            let _ = self.events.send(event);
                        }
                        written.object
                    });
                    // A writer that stopped waiting is not an error either.
                    let _ = reply.send(Reply::Done(Box::new(outcome)));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Reply::Done(Box::new(Err(Error::Write(error.clone())))));
                }
            }
        }
    }

    /// One write transaction for `changes`, in order, each seeing the ones before it. A
    /// change that fails leaves its workload as it was and fails alone; a storage failure
    /// fails them all, and nothing is written.
    fn commit(
        &self,
        changes: Vec<(WorkloadKey, Change)>,
    ) -> Result<Vec<Result<Written, Error>>, Arc<redb::Error>> {
        let txn = self.db.begin_write().map_err(storage)?;
        let mut outcomes = Vec::with_capacity(changes.len());
        // Each workload's last state in this group, by table key (`None`: deleted).
        let mut changed: HashMap<String, Option<Workload>> = HashMap::new();
        {
            let mut table = txn.open_table(WORKLOADS).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let last = meta
                .get(RESOURCE_VERSION)
                .map_err(storage)?
                .map_or(0, |v| v.value());
            let mut version = last;
            // Each change starts from the in-memory copy (exact as of the last commit) or from
            // an earlier change of this group: no stored object is decoded.
            let committed = self.objects();
            for (key, change) in changes {
                let id = key.to_string();
                let current = match changed.get(&id) {
                    Some(current) => current.clone(),
                    None => committed.get(&id).cloned(),
                };
                let next = change(current.clone()).map(|next| (next, current));
                let outcome = match next {
                    Err(error) => Err(error),
                    Ok((Some(mut next), _)) => {
                        next.metadata.resource_version = (version + 1).to_string();
                        match serde_json::to_vec(&next) {
                            Err(source) => Err(Error::Decode { key: id, source }),
                            Ok(bytes) => {
                                table
                                    .insert(id.as_str(), bytes.as_slice())
                                    .map_err(storage)?;
                                version += 1;
                                changed.insert(id, Some(next.clone()));
                                Ok(Written {
                                    event: Some(WatchEvent::Applied(next.clone())),
                                    object: Some(next),
                                })
                            }
                        }
                    }
                    Ok((None, current)) => {
                        table.remove(id.as_str()).map_err(storage)?;
                        changed.insert(id, None);
                        Ok(Written {
                            event: current.clone().map(WatchEvent::Deleted),
                            object: current,
                        })
                    }
                };
                outcomes.push(outcome);
            }
            if version != last {
                meta.insert(RESOURCE_VERSION, version).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        self.group_commits.fetch_add(1, Ordering::Relaxed);
        // The in-memory copy follows the commit, before its events are published.
        let mut objects = self.objects.write().unwrap_or_else(|e| e.into_inner());
        for (id, object) in changed {
            match object {
                Some(object) => objects.insert(id, object),
                None => objects.remove(&id),
            };
        }
        Ok(outcomes)
    }
}

/// A storage failure, shared by every write of its group.
fn storage(error: impl Into<redb::Error>) -> Arc<redb::Error> {
    Arc::new(error.into())
}

/// A change to one workload: from its current state (`None`: there is none) to the state to
/// store (`None`: delete it).
type Change = Box<dyn FnOnce(Option<Workload>) -> Result<Option<Workload>, Error> + Send>;

/// A write queued for the next group commit.
struct PendingWrite {
    key: WorkloadKey,
    change: Change,
    reply: mpsc::Sender<Reply>,
}

/// What a queued writer hears.
enum Reply {
    /// Its write is committed (or failed): the stored object, or the deleted one's last state.
    Done(Box<Result<Option<Workload>, Error>>),
    /// The committing writer is done and this one commits the next group.
    Lead,
}

/// Writes waiting for a group commit.
#[derive(Default)]
struct WriteQueue {
    pending: Vec<PendingWrite>,
    /// Whether a writer is committing; it hands over before it stops.
    leading: bool,
}

/// One committed write: what its caller gets and what watchers see.
struct Written {
    object: Option<Workload>,
    event: Option<WatchEvent>,
}

/// Hands the commit over to the first writer still queued (or leaves none committing) when
/// a group is done, also when committing it panicked.
struct Handover<'a>(&'a Inner);

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.write_queue();
        while let Some(next) = queue.pending.first() {
            if next.reply.send(Reply::Lead).is_ok() {
                return;
            }
            // Its writer is gone; nobody waits for that write.
            queue.pending.remove(0);
        }
        queue.leading = false;
    }
}

/// Every workload stored in `db`, decoded.
fn read_all(db: &Database) -> Result<BTreeMap<String, Workload>, Error> {
    let txn = db.begin_read().map_err(|e| Error::Read(e.into()))?;
    let table = txn
        .open_table(WORKLOADS)
        .map_err(|e| Error::Read(e.into()))?;
    let mut objects = BTreeMap::new();
    for entry in table.iter().map_err(|e| Error::Read(e.into()))? {
        let (key, value) = entry.map_err(|e| Error::Read(e.into()))?;
        let key = key.value().to_string();
        let object = decode(&key, value.value())?;
        objects.insert(key, object);
    }
    Ok(objects)
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
        Ok(self.inner.objects().get(&key.to_string()).cloned())
    }

    async fn list(&self) -> Result<Vec<Workload>, Error> {
        Ok(self.inner.list())
    }

    async fn apply(&self, workload: Workload) -> Result<Workload, Error> {
        workload.validate()?;
        let key = workload.key();
        self.blocking(move |inner| {
            inner
                .write(&key.clone(), move |current| {
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
            inner.write(&key, move |current| match current {
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
            let gone = Arc::new(AtomicBool::new(false));
            let released = gone.clone();
            let result = inner.write(&key.clone(), move |current| {
                let mut current = current.ok_or_else(|| Error::NotFound(key.clone()))?;
                check_version(&key, &expected, &current)?;
                current.metadata.finalizers = finalizers;
                if current.metadata.finalizers.is_empty()
                    && !current.metadata.deletion_timestamp.is_empty()
                {
                    released.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
                Ok(Some(current))
            })?;
            // Once the workload is gone, `write` returns its last state.
            Ok(if gone.load(Ordering::Relaxed) {
                None
            } else {
                result
            })
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
            let missing = key.clone();
            inner
                .write(&key, move |current| {
                    let mut current = current.ok_or(Error::NotFound(missing))?;
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
            let initial = inner.list();
            Ok(Watch::new(
                initial,
                events,
                Box::new(move || Ok(resync_store.list())),
            ))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::model::Workload;

    /// Every stored workload, after checking that the in-memory copy is what the file holds.
    fn stored(inner: &Inner) -> Vec<Workload> {
        let in_file: Vec<Workload> = read_all(&inner.db).expect("read").into_values().collect();
        assert_eq!(inner.list(), in_file, "the in-memory copy is the file's");
        in_file
    }

    #[test]
    fn a_stored_workload_that_does_not_decode_is_named_when_the_store_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("flotilla.redb");
        drop(EmbeddedStore::open(&path).expect("open"));
        {
            let db = Database::create(&path).expect("db");
            let txn = db.begin_write().expect("txn");
            txn.open_table(WORKLOADS)
                .expect("table")
                .insert("default/broken", b"{not json".as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        match EmbeddedStore::open(&path) {
            Err(Error::Decode { key, .. }) => assert_eq!(key, "default/broken"),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("opened a store whose workload does not decode"),
        }
    }

    fn open() -> (tempfile::TempDir, Arc<Inner>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("flotilla.redb")).expect("open");
        (dir, store.inner)
    }

    fn key(name: &str) -> WorkloadKey {
        WorkloadKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    /// A change that creates `name` (or keeps it as it is).
    fn create(
        name: &str,
    ) -> impl FnOnce(Option<Workload>) -> Result<Option<Workload>, Error> + Send + use<> {
        let mut spec = crate::model::WorkloadSpec::default();
        spec.module.sha256 = "11".repeat(32);
        let workload = Workload::new("default", name, spec);
        move |current| Ok(Some(current.unwrap_or(workload)))
    }

    /// Waits until `count` writes are queued behind the committing one.
    fn wait_for_queued(inner: &Inner, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while inner.write_queue().pending.len() < count {
            assert!(Instant::now() < deadline, "{count} writes never queued");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn concurrent_writes_share_commits_and_publish_in_order() {
        let (_dir, inner) = open();
        let mut events = inner.events.subscribe();
        let before = inner.group_commits.load(Ordering::Relaxed);
        let writers = 64;
        let start = Arc::new(Barrier::new(writers));
        let handles: Vec<_> = (0..writers)
            .map(|i| {
                let (inner, start) = (inner.clone(), start.clone());
                thread::spawn(move || {
                    start.wait();
                    let name = format!("w-{i:02}");
                    inner.write(&key(&name), create(&name))
                })
            })
            .collect();
        let mut versions: Vec<u64> = handles
            .into_iter()
            .map(|h| {
                let stored = h.join().expect("writer").expect("write").expect("object");
                stored.metadata.resource_version.parse().expect("version")
            })
            .collect();
        versions.sort_unstable();
        assert_eq!(versions, (1..=writers as u64).collect::<Vec<_>>());
        let commits = inner.group_commits.load(Ordering::Relaxed) - before;
        assert!(
            commits < writers as u64,
            "{writers} concurrent writes took {commits} commits"
        );
        let published: Vec<u64> = (0..writers)
            .map(|_| match events.try_recv().expect("event") {
                WatchEvent::Applied(w) => w.metadata.resource_version.parse().expect("version"),
                other => panic!("unexpected event {other:?}"),
            })
            .collect();
        assert!(
            published.is_sorted(),
            "events out of commit order: {published:?}"
        );
        assert_eq!(stored(&inner).len(), writers);
    }

    #[test]
    fn a_failing_change_fails_alone_in_its_group() {
        let (_dir, inner) = open();
        let before = inner.group_commits.load(Ordering::Relaxed);
        let gate = Arc::new(Barrier::new(2));
        let (entered, inside) = mpsc::channel();
        let leader = {
            let (inner, gate) = (inner.clone(), gate.clone());
            thread::spawn(move || {
                inner.write(&key("first"), move |current| {
                    let _ = entered.send(());
                    gate.wait();
                    create("first")(current)
                })
            })
        };
        // The leader is inside its change: the next three writes queue as one group.
        inside.recv().expect("leader entered its change");
        let queued: Vec<_> = ["a", "refused", "b"]
            .into_iter()
            .map(|name| {
                let inner = inner.clone();
                thread::spawn(move || {
                    if name == "refused" {
                        inner.write(&key(name), |_| Err(Error::NotFound(key("refused"))))
                    } else {
                        inner.write(&key(name), create(name))
                    }
                })
            })
            .collect();
        wait_for_queued(&inner, 3);
        gate.wait();
        assert!(leader.join().expect("leader").is_ok());
        let outcomes: Vec<_> = queued
            .into_iter()
            .map(|h| h.join().expect("writer"))
            .collect();
        assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
        assert!(
            matches!(outcomes[1], Err(Error::NotFound(_))),
            "{:?}",
            outcomes[1]
        );
        let names: Vec<String> = stored(&inner)
            .into_iter()
            .map(|w| w.metadata.name)
            .collect();
        assert_eq!(names, ["a", "b", "first"]);
        // The leader's group, then the three queued behind it.
        assert_eq!(inner.group_commits.load(Ordering::Relaxed) - before, 2);
    }

    #[test]
    fn a_panicking_change_hands_the_commit_over() {
        let (_dir, inner) = open();
        let (entered, inside) = mpsc::channel();
        let leader = {
            let (inner, waiter) = (inner.clone(), inner.clone());
            thread::spawn(move || {
                inner.write(&key("doomed"), move |_| {
                    let _ = entered.send(());
                    wait_for_queued(&waiter, 2);
                    panic!("a bug in a change")
                })
            })
        };
        inside.recv().expect("leader entered its change");
        let queued: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|name| {
                let inner = inner.clone();
                thread::spawn(move || inner.write(&key(name), create(name)))
            })
            .collect();
        assert!(leader.join().is_err(), "the change did not panic");
        for writer in queued {
            assert!(writer.join().expect("writer").is_ok());
        }
        // And the queue is free again.
        assert!(inner.write(&key("c"), create("c")).is_ok());
        assert_eq!(stored(&inner).len(), 3);
    }
}
