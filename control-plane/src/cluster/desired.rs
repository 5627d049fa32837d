//! The per-node desired-state index: what every node should run, kept from one watch of the
//! workload store and handed to agent sessions as messages.
//!
//! [`DesiredIndex::run`] follows the store. Each event costs the nodes of the one workload it
//! names: the index turns the workload's placements into per-node revisions, compares them
//! with what it holds for each of those nodes and publishes one [`DesiredState`] delta per node
//! that changed. An agent session only [subscribes](DesiredIndex::subscribe): it gets the
//! node's complete set, then the deltas in order, and converts them into messages. As
//! linkerd2's policy index feeds its gRPC servers, nothing here knows of gRPC, so tests drive
//! the index with watch events alone.
//!
//! # Guarantees
//! - A subscription first yields the node's complete set (`incremental` false), once the
//!   index has its first snapshot of the store, then every change to the node in order.
//! - A subscriber too slow to keep up is not waited for: it gets a fresh complete set instead
//!   of the deltas it missed, as a store watch that falls behind does.
//! - A spec change that the controller has not placed yet changes nothing here; its status
//!   write brings it, so agents see one new template, not two.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_proto::agent::v1::{ModuleSource, WorkloadSpec};
use flotilla_proto::control::v1::{DesiredState, DesiredWorkload};
use flotilla_proto::from_model::agent_workload_spec;
use tokio::sync::broadcast;

use crate::model::{Workload, WorkloadKey, WorkloadSpec as ModelSpec};
use crate::store::{WatchEvent, WorkloadStore};

/// Deltas a subscriber may fall behind by before it is sent a complete set instead.
const SUBSCRIBER_BACKLOG: usize = 256;

/// Hex digits of the template hash in a revision's agent workload name.
const REVISION_NAME_HASH_LEN: usize = 10;

/// What every node should run. Cheap to clone; clones share one index.
#[derive(Clone, Default)]
pub struct DesiredIndex {
    inner: Arc<Mutex<Index>>,
}

#[derive(Default)]
struct Index {
    /// Whether the first snapshot of the store has been taken.
    started: bool,
    /// Per node, what it should run and who listens.
    nodes: HashMap<String, NodeEntry>,
    /// Per workload key, the nodes it has revisions on.
    placed: HashMap<String, Vec<String>>,
}

#[derive(Default)]
struct NodeEntry {
    /// Per workload key, its revisions on this node.
    workloads: BTreeMap<String, Revisions>,
    /// The node's sessions, if any has subscribed.
    updates: Option<broadcast::Sender<Arc<DesiredState>>>,
}

/// One workload's revisions on a node (almost always one, two during an update), each named by
/// its `spec.name`. A vector: a map per workload and node would cost a node allocation each.
type Revisions = Vec<DesiredWorkload>;

/// Changes to several nodes made by one event, sent as one message per node.
#[derive(Default)]
struct Changes(BTreeMap<String, (Vec<DesiredWorkload>, Vec<String>)>);

/// One session's view of a node: its complete set, then what changes.
pub struct Subscription {
    node: String,
    index: DesiredIndex,
    first: Option<Arc<DesiredState>>,
    updates: broadcast::Receiver<Arc<DesiredState>>,
}

impl Subscription {
    /// The complete set the subscription yields first, if the index had started.
    pub fn complete(&self) -> Option<&DesiredState> {
        self.first.as_deref()
    }
}

// === impl DesiredIndex ===

impl DesiredIndex {
    /// Follows `store` until `shutdown` completes, restarting its watch with backoff when it
    /// fails.
    pub async fn run<S: WorkloadStore>(self, store: S, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut retry_delay = Duration::from_millis(100);
        loop {
            let mut watch = match store.watch().await {
                Ok(watch) => watch,
                Err(error) => {
                    tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "cannot watch workloads for the desired-state index; retrying");
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(retry_delay) => {}
                    }
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            loop {
                let event = tokio::select! {
                    () = &mut shutdown => return,
                    event = watch.next() => event,
                };
                match event {
                    Some(Ok(event)) => {
                        retry_delay = Duration::from_millis(100);
                        self.apply(&event);
                    }
                    Some(Err(error)) => {
                        tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "desired-state watch failed; restarting it");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    /// Applies one store event and tells the sessions of every node it changed.
    pub fn apply(&self, event: &WatchEvent) {
        let mut index = self.lock();
        let mut changes = Changes::default();
        match event {
            WatchEvent::Restarted(all) => {
                let listed: BTreeSet<String> = all.iter().map(|w| w.key().to_string()).collect();
                let gone: Vec<String> = index
                    .placed
                    .keys()
                    .filter(|key| !listed.contains(*key))
                    .cloned()
                    .collect();
                for key in gone {
                    index.remove(&key, &mut changes);
                }
                // A workload the controller has not caught up with keeps what it has.
                for workload in all.iter().filter(|w| is_current(w)) {
                    index.place(workload, &mut changes);
                }
                if !index.started {
                    index.started = true;
                    for (node, entry) in &index.nodes {
                        if let Some(updates) = &entry.updates {
                            let _ = updates.send(Arc::new(entry.complete()));
                            tracing::trace!(%node, "complete desired set published");
                        }
                    }
                    return;
                }
            }
            WatchEvent::Applied(workload) => {
                if !index.started || !is_current(workload) {
                    return;
                }
                index.place(workload, &mut changes);
            }
            WatchEvent::Deleted(workload) => {
                index.remove(&workload.key().to_string(), &mut changes)
            }
        }
        index.publish(changes);
    }

    /// The sessions' view of `node`: its complete set (once the index has started), then its
    /// deltas.
    pub fn subscribe(&self, node: &str) -> Subscription {
        let mut index = self.lock();
        let started = index.started;
        let entry = index.nodes.entry(node.to_string()).or_default();
        let updates = entry
            .updates
            .get_or_insert_with(|| broadcast::channel(SUBSCRIBER_BACKLOG).0)
            .subscribe();
        Subscription {
            node: node.to_string(),
            index: self.clone(),
            first: started.then(|| Arc::new(entry.complete())),
            updates,
        }
    }

    /// How many nodes the index holds state or sessions for.
    pub fn node_count(&self) -> usize {
        self.lock().nodes.len()
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl Index ===

impl Index {
    /// Brings every node the workload is or was on to its current placements.
    fn place(&mut self, workload: &Workload, changes: &mut Changes) {
        let key = workload.key().to_string();
        let mut wanted = revisions_by_node(workload);
        let before = self.placed.remove(&key).unwrap_or_default();
        let nodes: BTreeSet<String> = before.into_iter().chain(wanted.keys().cloned()).collect();
        for node in nodes {
            let now = wanted.remove(&node).unwrap_or_default();
            let entry = self.nodes.entry(node.clone()).or_default();
            let sent = entry.workloads.remove(&key).unwrap_or_default();
            let (changed, removed) = diff(&sent, &now);
            if !now.is_empty() {
                entry.workloads.insert(key.clone(), now);
                self.placed
                    .entry(key.clone())
                    .or_default()
                    .push(node.clone());
            }
            changes.add(node, changed, removed);
        }
    }

    /// Takes a deleted workload off every node.
    fn remove(&mut self, key: &str, changes: &mut Changes) {
        for node in self.placed.remove(key).unwrap_or_default() {
            let Some(entry) = self.nodes.get_mut(&node) else {
                continue;
            };
            let sent = entry.workloads.remove(key).unwrap_or_default();
            let removed = sent.iter().map(|w| name_of(w).to_string()).collect();
            changes.add(node, vec![], removed);
        }
    }

    /// Sends each changed node's delta, and forgets nodes with nothing to run and no session.
    fn publish(&mut self, changes: Changes) {
        for (node, (workloads, removed)) in changes.0 {
            let Some(entry) = self.nodes.get(&node) else {
                continue;
            };
            let live = entry.updates.as_ref().filter(|u| u.receiver_count() > 0);
            let changed = !workloads.is_empty() || !removed.is_empty();
            match live {
                Some(updates) if changed => {
                    let _ = updates.send(Arc::new(DesiredState {
                        workloads,
                        incremental: true,
                        removed,
                        continued: false,
                    }));
                }
                None if entry.workloads.is_empty() => {
                    self.nodes.remove(&node);
                }
                _ => {}
            }
        }
    }
}

impl NodeEntry {
    /// Everything the node should run, as one complete message.
    fn complete(&self) -> DesiredState {
        DesiredState {
            workloads: self.workloads.values().flatten().cloned().collect(),
            incremental: false,
            removed: vec![],
            continued: false,
        }
    }
}

impl Changes {
    fn add(&mut self, node: String, changed: Vec<DesiredWorkload>, removed: Vec<String>) {
        let (all_changed, all_removed) = self.0.entry(node).or_default();
        all_changed.extend(changed);
        all_removed.extend(removed);
    }
}

// === impl Subscription ===

impl Subscription {
    /// The next message for the node: the complete set first, then deltas; a complete set
    /// again after falling behind. `None` once the index is gone.
    pub async fn next(&mut self) -> Option<Arc<DesiredState>> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        match self.updates.recv().await {
            Ok(update) => Some(update),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(node = %self.node, missed, "session fell behind the desired-state index; sending the complete set");
                let fresh = self.index.subscribe(&self.node);
                self.updates = fresh.updates;
                // The index has started: it published what this subscription lagged behind.
                fresh.first
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// Whether the status describes the spec's generation.
fn is_current(workload: &Workload) -> bool {
    workload
        .status
        .as_ref()
        .is_some_and(|s| s.observed_generation == workload.metadata.generation)
}

/// The agent workload name of a revision.
fn name_of(revision: &DesiredWorkload) -> &str {
    revision.spec.as_ref().map_or("", |s| s.name.as_str())
}

/// What `now` changes against `sent`: revisions new or different, and names that left.
fn diff(sent: &[DesiredWorkload], now: &[DesiredWorkload]) -> (Vec<DesiredWorkload>, Vec<String>) {
    let removed = sent
        .iter()
        .map(name_of)
        .filter(|name| !now.iter().any(|w| name_of(w) == *name))
        .map(str::to_string)
        .collect();
    let changed = now.iter().filter(|w| !sent.contains(w)).cloned().collect();
    (changed, removed)
}

/// The workload's revisions per node with a share of it: the current one (the spec's template,
/// `status.placements`) and old ones a rolling update has yet to replace (their own templates
/// and placements). Each revision's agent spec is built once and copied per node.
fn revisions_by_node(workload: &Workload) -> BTreeMap<String, Revisions> {
    let mut out: BTreeMap<String, Revisions> = BTreeMap::new();
    let Some(status) = workload.status.as_ref() else {
        return out;
    };
    let key = workload.key();
    let mut add =
        |template: &ModelSpec, hash: &str, generation: u64, placements: &BTreeMap<String, u64>| {
            let mut placed = placements
                .iter()
                .filter(|(_, count)| **count > 0)
                .peekable();
            if placed.peek().is_none() {
                return;
            }
            let spec = agent_spec(key.clone(), template, hash, generation);
            for (node, &count) in placed {
                let mut spec = spec.clone();
                spec.replicas = u32::try_from(count).unwrap_or(u32::MAX);
                let revisions = out.entry(node.clone()).or_default();
                revisions.push(DesiredWorkload {
                    key: key.to_string(),
                    spec: Some(spec),
                });
            }
        };
    let generation = Some(status.template_generation)
        .filter(|&g| g > 0)
        .unwrap_or(workload.metadata.generation);
    add(
        &workload.spec,
        &status.template_hash,
        generation,
        &status.placements,
    );
    for old in status
        .revisions
        .iter()
        .filter(|r| r.revision != status.revision)
    {
        if let Some(template) = &old.template {
            add(
                template,
                &old.template_hash,
                old.generation,
                &old.placements,
            );
        }
    }
    // Held per node for as long as the workload runs there: no spare capacity.
    for revisions in out.values_mut() {
        revisions.shrink_to_fit();
    }
    out
}

/// The agent's spec for one revision of a workload: named `<namespace>.<name>-<hash>` (unique
/// on the agent, as a ReplicaSet's pods carry the template hash), owned by
/// `<namespace>.<name>`, the module pinned by digest; its replicas are set per node.
fn agent_spec(key: WorkloadKey, template: &ModelSpec, hash: &str, generation: u64) -> WorkloadSpec {
    let owner = format!("{}.{}", key.namespace, key.name);
    let hash = hash.get(..REVISION_NAME_HASH_LEN).unwrap_or(hash);
    let name = if hash.is_empty() {
        owner.clone()
    } else {
        format!("{owner}-{hash}")
    };
    let module = ModuleSource {
        source: None,
        sha256: template.module.sha256.clone(),
    };
    let mut spec = agent_workload_spec(template, name, generation, 0, module);
    spec.owner = owner;
    spec.namespace = key.namespace;
    spec
}

#[cfg(test)]
mod tests;
