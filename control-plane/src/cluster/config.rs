//! The ConfigMaps and Secrets the cluster holds, and which of them each node is sent.
//!
//! A [`ConfigSet`] is the current set, published by the store that keeps them (the embedded
//! config store, or a watch of the Kubernetes API). Every agent session keeps a
//! [`NodeConfigState`]: as the kubelet does, an agent gets only the objects that the workloads
//! placed on its node refer to, and again whenever one of them changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use flotilla_proto::agent::v1::{ConfigKind, ConfigObject, WorkloadSpec, volume};
pub(crate) use flotilla_proto::config::ConfigKey;
use flotilla_proto::control::v1::{ConfigObjectKey, ConfigObjects, DesiredState};
use tokio::sync::watch;

/// Every ConfigMap and Secret, by key.
pub(crate) type ConfigObjectsByKey = BTreeMap<ConfigKey, Arc<ConfigObject>>;

/// The current ConfigMaps and Secrets. Cheap to share.
pub struct ConfigSet {
    objects: watch::Sender<Arc<ConfigObjectsByKey>>,
}

impl Default for ConfigSet {
    fn default() -> Self {
        Self {
            objects: watch::channel(Arc::new(BTreeMap::new())).0,
        }
    }
}

impl ConfigSet {
    /// Replaces the set; subscribers hear of it only when it changed.
    pub fn publish(&self, objects: ConfigObjectsByKey) {
        self.objects.send_if_modified(|current| {
            if **current == objects {
                return false;
            }
            *current = Arc::new(objects);
            true
        });
    }

    /// The set now.
    pub fn current(&self) -> Arc<ConfigObjectsByKey> {
        self.objects.borrow().clone()
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigObjectsByKey>> {
        self.objects.subscribe()
    }
}

/// The objects one workload spec refers to (volumes, `env[].valueFrom`, `envFrom`).
pub(crate) fn references(spec: &WorkloadSpec) -> impl Iterator<Item = ConfigKey> + '_ {
    let key = move |kind: ConfigKind, name: &str| ConfigKey {
        kind,
        namespace: spec.namespace.clone(),
        name: name.to_string(),
    };
    let volumes = spec.volumes.iter().filter_map(move |v| match &v.source {
        Some(volume::Source::Config(r)) => Some(key(r.kind(), &r.name)),
        _ => None,
    });
    let env = spec
        .env
        .iter()
        .filter_map(|e| e.value_from.as_ref())
        .map(move |r| key(r.kind(), &r.name));
    let env_from = spec.env_from.iter().map(move |f| key(f.kind(), &f.name));
    volumes.chain(env).chain(env_from)
}

/// The objects each workload sent to one node refers to, kept as its desired set changes.
#[derive(Default)]
pub(crate) struct NodeConfigRefs {
    by_workload: BTreeMap<String, Vec<ConfigKey>>,
}

impl NodeConfigRefs {
    /// Follows one desired-state message: a complete set replaces all, a delta adds the
    /// changed revisions and drops the removed ones.
    pub(crate) fn apply(&mut self, desired: &DesiredState) {
        if !desired.incremental {
            self.by_workload.clear();
        }
        for name in &desired.removed {
            self.by_workload.remove(name);
        }
        for spec in desired.workloads.iter().filter_map(|w| w.spec.as_ref()) {
            self.by_workload
                .insert(spec.name.clone(), references(spec).collect());
        }
    }

    /// Every object the node's workloads refer to.
    pub(crate) fn all(&self) -> BTreeSet<ConfigKey> {
        self.by_workload.values().flatten().cloned().collect()
    }
}

/// What one node has been sent, turned into the next message as its workloads or the objects
/// change.
#[derive(Default)]
pub(crate) struct NodeConfigState {
    sent: BTreeMap<ConfigKey, Arc<ConfigObject>>,
    started: bool,
}

impl NodeConfigState {
    /// The message that brings the node to the objects `wanted` refers to in `set`: complete
    /// the first time, then what changed and what left; `None` when nothing did.
    pub(crate) fn update(
        &mut self,
        wanted: &BTreeSet<ConfigKey>,
        set: &ConfigObjectsByKey,
    ) -> Option<ConfigObjects> {
        let next: BTreeMap<ConfigKey, Arc<ConfigObject>> = wanted
            .iter()
            .filter_map(|key| set.get(key).map(|o| (key.clone(), o.clone())))
            .collect();
        if !self.started {
            self.started = true;
            self.sent = next;
            return Some(ConfigObjects {
                objects: self.sent.values().map(|o| (**o).clone()).collect(),
                incremental: false,
                removed: vec![],
                continued: false,
            });
        }
        let removed: Vec<ConfigObjectKey> = self
            .sent
            .keys()
            .filter(|key| !next.contains_key(*key))
            .map(ConfigObjectKey::from)
            .collect();
        let objects: Vec<ConfigObject> = next
            .iter()
            .filter(|(key, o)| self.sent.get(*key) != Some(*o))
            .map(|(_, o)| (**o).clone())
            .collect();
        self.sent = next;
        (!objects.is_empty() || !removed.is_empty()).then_some(ConfigObjects {
            objects,
            incremental: true,
            removed,
            continued: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::agent::v1::{ConfigRef, EnvFrom, EnvVar, KeyRef, Volume};

    use super::*;

    fn object(kind: ConfigKind, name: &str, value: &str) -> Arc<ConfigObject> {
        Arc::new(ConfigObject {
            kind: kind as i32,
            namespace: "default".into(),
            name: name.into(),
            data: [("k".to_string(), value.as_bytes().to_vec())].into(),
        })
    }

    fn key(kind: ConfigKind, name: &str) -> ConfigKey {
        ConfigKey {
            kind,
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_node_gets_what_its_workloads_refer_to_and_then_only_changes() {
        let spec = WorkloadSpec {
            namespace: "default".into(),
            volumes: vec![Volume {
                source: Some(volume::Source::Config(ConfigRef {
                    kind: ConfigKind::ConfigMap as i32,
                    name: "app".into(),
                    ..ConfigRef::default()
                })),
                ..Volume::default()
            }],
            env: vec![EnvVar {
                value_from: Some(KeyRef {
                    kind: ConfigKind::Secret as i32,
                    name: "creds".into(),
                    ..KeyRef::default()
                }),
                ..EnvVar::default()
            }],
            env_from: vec![EnvFrom {
                kind: ConfigKind::ConfigMap as i32,
                name: "flags".into(),
                ..EnvFrom::default()
            }],
            ..WorkloadSpec::default()
        };
        let wanted: BTreeSet<ConfigKey> = references(&spec).collect();
        assert_eq!(wanted.len(), 3);

        let mut set: ConfigObjectsByKey = [
            (
                key(ConfigKind::ConfigMap, "app"),
                object(ConfigKind::ConfigMap, "app", "1"),
            ),
            (
                key(ConfigKind::Secret, "creds"),
                object(ConfigKind::Secret, "creds", "s"),
            ),
            (
                key(ConfigKind::Secret, "other"),
                object(ConfigKind::Secret, "other", "x"),
            ),
        ]
        .into();
        let mut node = NodeConfigState::default();
        let first = node.update(&wanted, &set).expect("the first message");
        assert!(!first.incremental);
        let names: Vec<&str> = first.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            names,
            ["app", "creds"],
            "never an object no workload here uses"
        );
        assert!(node.update(&wanted, &set).is_none(), "nothing changed");

        set.insert(
            key(ConfigKind::ConfigMap, "app"),
            object(ConfigKind::ConfigMap, "app", "2"),
        );
        set.insert(
            key(ConfigKind::Secret, "other"),
            object(ConfigKind::Secret, "other", "y"),
        );
        let changed = node.update(&wanted, &set).expect("a change");
        assert_eq!(changed.objects.len(), 1);
        assert_eq!(changed.objects[0].data["k"], b"2");

        // The workload leaves the node: its objects go too.
        let gone = node.update(&BTreeSet::new(), &set).expect("removals");
        assert!(gone.objects.is_empty());
        assert_eq!(gone.removed.len(), 2);
    }
}
