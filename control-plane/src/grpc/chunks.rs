//! Splits what goes down an agent session into messages of a bounded size. A node's complete
//! desired set, or its ConfigMaps and Secrets, grows with what tenants place on it; sent whole,
//! it could pass the agent's message limit and cut the session of every tenant on the node.
//! Complete sets are split into parts marked `continued` (the agent applies the set when the
//! last part arrives); deltas into smaller deltas.

use flotilla_proto::control::v1::control_message::Kind;
use flotilla_proto::control::v1::{ConfigObjects, DesiredState};
use prost::Message;

/// The size a message is split at: far below the agent's 65 MiB limit, and above any one
/// object (1 MiB), so every part holds at least one.
pub(crate) const PART_BYTES: usize = 4 << 20;

/// `kind` as one or more messages of at most about `limit` bytes each.
pub(crate) fn split(kind: Kind, limit: usize) -> Vec<Kind> {
    match kind {
        Kind::Desired(desired) if desired.encoded_len() > limit => split_set(desired, limit)
            .into_iter()
            .map(Kind::Desired)
            .collect(),
        Kind::Config(config) if config.encoded_len() > limit => split_set(config, limit)
            .into_iter()
            .map(Kind::Config)
            .collect(),
        other => vec![other],
    }
}

/// A set sent down a session, complete or a delta: items, and the names of those to drop.
trait Set: Sized {
    type Item: Message;
    type Removed: Default;

    fn into_parts(self) -> (Vec<Self::Item>, bool, Self::Removed);
    fn from_parts(
        items: Vec<Self::Item>,
        incremental: bool,
        removed: Self::Removed,
        continued: bool,
    ) -> Self;
}

impl Set for DesiredState {
    type Item = flotilla_proto::control::v1::DesiredWorkload;
    type Removed = Vec<String>;

    fn into_parts(self) -> (Vec<Self::Item>, bool, Self::Removed) {
        (self.workloads, self.incremental, self.removed)
    }

    fn from_parts(
        workloads: Vec<Self::Item>,
        incremental: bool,
        removed: Self::Removed,
        continued: bool,
    ) -> Self {
        Self {
            workloads,
            incremental,
            removed,
            continued,
        }
    }
}

impl Set for ConfigObjects {
    type Item = flotilla_proto::agent::v1::ConfigObject;
    type Removed = Vec<flotilla_proto::control::v1::ConfigObjectKey>;

    fn into_parts(self) -> (Vec<Self::Item>, bool, Self::Removed) {
        (self.objects, self.incremental, self.removed)
    }

    fn from_parts(
        objects: Vec<Self::Item>,
        incremental: bool,
        removed: Self::Removed,
        continued: bool,
    ) -> Self {
        Self {
            objects,
            incremental,
            removed,
            continued,
        }
    }
}

/// `set` in parts of about `limit` bytes: a complete set's parts but the last marked
/// `continued`, a delta's as deltas. The names to drop, which are small, ride with the last.
fn split_set<S: Set>(set: S, limit: usize) -> Vec<S> {
    let (items, incremental, removed) = set.into_parts();
    let mut groups = groups(items, limit, Message::encoded_len);
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    let count = groups.len();
    let mut removed = Some(removed);
    groups
        .into_iter()
        .enumerate()
        .map(|(i, items)| {
            let last = i + 1 == count;
            let removed = if last { removed.take() } else { None };
            S::from_parts(
                items,
                incremental,
                removed.unwrap_or_default(),
                !incremental && !last,
            )
        })
        .collect()
}

/// `items` in order, in groups of at most `limit` bytes (a larger item alone).
fn groups<T>(items: Vec<T>, limit: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut groups = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for item in items {
        let item_bytes = size(&item) + 8;
        if !current.is_empty() && bytes + item_bytes > limit {
            groups.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += item_bytes;
        current.push(item);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

#[cfg(test)]
mod tests {
    use flotilla_proto::agent::v1::{ConfigObject, WorkloadSpec};
    use flotilla_proto::control::v1::DesiredWorkload;

    use super::*;

    fn workload(name: &str, arg_bytes: usize) -> DesiredWorkload {
        DesiredWorkload {
            spec: Some(WorkloadSpec {
                name: name.into(),
                args: vec!["x".repeat(arg_bytes)],
                ..WorkloadSpec::default()
            }),
            ..DesiredWorkload::default()
        }
    }

    #[test]
    fn a_large_complete_set_goes_in_parts_that_say_it_continues() {
        let complete = DesiredState {
            workloads: (0..10).map(|i| workload(&format!("w{i}"), 1000)).collect(),
            incremental: false,
            removed: vec!["gone".into()],
            continued: false,
        };
        let parts = split(Kind::Desired(complete.clone()), 3000);
        assert!(parts.len() > 1, "{}", parts.len());
        let mut names = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let Kind::Desired(part) = part else {
                panic!("desired")
            };
            assert!(part.encoded_len() <= 3000 + 1100, "{}", part.encoded_len());
            assert!(!part.incremental);
            assert_eq!(part.continued, i + 1 < parts.len());
            assert_eq!(part.removed.is_empty(), i + 1 < parts.len());
            names.extend(
                part.workloads
                    .iter()
                    .map(|w| w.spec.clone().unwrap_or_default().name),
            );
        }
        let expected: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        assert_eq!(names, expected, "every workload once, in order");
        // Small enough: one message, as it was.
        assert_eq!(split(Kind::Desired(complete), PART_BYTES).len(), 1);
    }

    #[test]
    fn deltas_are_split_into_deltas() {
        let delta = ConfigObjects {
            objects: (0..4)
                .map(|i| ConfigObject {
                    name: format!("c{i}"),
                    data: [("k".to_string(), vec![0u8; 2000])].into(),
                    ..ConfigObject::default()
                })
                .collect(),
            incremental: true,
            removed: Vec::new(),
            continued: false,
        };
        let parts = split(Kind::Config(delta), 3000);
        assert_eq!(parts.len(), 4);
        assert!(
            parts
                .iter()
                .all(|p| matches!(p, Kind::Config(c) if c.incremental && !c.continued))
        );
    }
}
