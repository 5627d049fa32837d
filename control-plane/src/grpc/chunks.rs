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
        Kind::Desired(desired) if desired.encoded_len() > limit => split_desired(desired, limit),
        Kind::Config(config) if config.encoded_len() > limit => split_config(config, limit),
        other => vec![other],
    }
}

fn split_desired(desired: DesiredState, limit: usize) -> Vec<Kind> {
    let DesiredState {
        workloads,
        incremental,
        removed,
        ..
    } = desired;
    let mut parts: Vec<DesiredState> = groups(workloads, limit, Message::encoded_len)
        .into_iter()
        .map(|workloads| DesiredState {
            workloads,
            incremental,
            removed: Vec::new(),
            continued: false,
        })
        .collect();
    // Names to stop are small; they ride with the last part.
    match parts.last_mut() {
        Some(last) => last.removed = removed,
        None => parts.push(DesiredState {
            workloads: Vec::new(),
            incremental,
            removed,
            continued: false,
        }),
    }
    let count = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, mut part)| {
            part.continued = !incremental && i + 1 < count;
            Kind::Desired(part)
        })
        .collect()
}

fn split_config(config: ConfigObjects, limit: usize) -> Vec<Kind> {
    let ConfigObjects {
        objects,
        incremental,
        removed,
        ..
    } = config;
    let mut parts: Vec<ConfigObjects> = groups(objects, limit, Message::encoded_len)
        .into_iter()
        .map(|objects| ConfigObjects {
            objects,
            incremental,
            removed: Vec::new(),
            continued: false,
        })
        .collect();
    match parts.last_mut() {
        Some(last) => last.removed = removed,
        None => parts.push(ConfigObjects {
            objects: Vec::new(),
            incremental,
            removed,
            continued: false,
        }),
    }
    let count = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, mut part)| {
            part.continued = !incremental && i + 1 < count;
            Kind::Config(part)
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
