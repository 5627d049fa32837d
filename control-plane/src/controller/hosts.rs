//! Host ownership between namespaces: a host that HTTP workloads answer (`spec.http.host`, or
//! any host when unset) belongs to the namespace of its oldest workload, so that no tenant can
//! take another's traffic by claiming its host with a longer path prefix. A later workload of
//! another namespace is not placed: its `Scheduled` condition says `HostConflict` and names the
//! owner, and it is looked at again until the owner is gone.

use std::collections::BTreeMap;

use crate::model::Workload;

/// Each claimed host's owner in one pass.
pub(super) struct HostOwners(BTreeMap<String, Owner>);

/// The workload that holds a host: the first created, ties broken by namespace and name.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Owner {
    created: String,
    namespace: String,
    name: String,
}

impl HostOwners {
    /// The owners of the hosts `workloads` claim; workloads being deleted claim nothing.
    pub(super) fn of(workloads: &[Workload]) -> Self {
        let mut owners: BTreeMap<String, Owner> = BTreeMap::new();
        for workload in workloads {
            let Some(host) = claimed_host(workload) else {
                continue;
            };
            let candidate = Owner {
                created: workload.metadata.creation_timestamp.clone(),
                namespace: workload.metadata.namespace.clone(),
                name: workload.metadata.name.clone(),
            };
            match owners.get_mut(host) {
                Some(owner) if *owner <= candidate => {}
                Some(owner) => *owner = candidate,
                None => {
                    owners.insert(host.to_string(), candidate);
                }
            }
        }
        Self(owners)
    }

    /// Why `workload` may not serve its host: the host belongs to a workload of another
    /// namespace.
    pub(super) fn conflict(&self, workload: &Workload) -> Option<String> {
        let host = claimed_host(workload)?;
        let owner = self.0.get(host)?;
        (owner.namespace != workload.metadata.namespace).then(|| {
            let shown = if host.is_empty() { "any host" } else { host };
            format!(
                "spec.http.host: {shown} belongs to namespace {} (workload {}); a host is \
                 served by one namespace",
                owner.namespace, owner.name
            )
        })
    }
}

/// The host `workload` claims: its `spec.http.host`, `""` for any host, `None` when it serves
/// no HTTP or is being deleted.
fn claimed_host(workload: &Workload) -> Option<&str> {
    if !workload.metadata.deletion_timestamp.is_empty() {
        return None;
    }
    workload
        .spec
        .http
        .as_ref()
        .map(|http| http.host.as_deref().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(namespace: &str, name: &str, created: &str, host: Option<&str>) -> Workload {
        let mut workload: Workload = serde_yaml::from_str(&format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\n\
             metadata: {{name: {name}, namespace: {namespace}, creationTimestamp: \"{created}\"}}\n\
             spec: {{module: {{sha256: \"{}\"}}, http: {{}}}}\n",
            "0".repeat(64)
        ))
        .expect("workload");
        if let Some(http) = workload.spec.http.as_mut() {
            http.host = host.map(str::to_string);
        }
        workload
    }

    #[test]
    fn the_first_namespace_to_claim_a_host_keeps_it() {
        let first = web(
            "team-a",
            "shop",
            "2026-01-01T00:00:00Z",
            Some("shop.example.com"),
        );
        let thief = web(
            "team-b",
            "api",
            "2026-01-02T00:00:00Z",
            Some("shop.example.com"),
        );
        let neighbour = web(
            "team-a",
            "admin",
            "2026-01-03T00:00:00Z",
            Some("shop.example.com"),
        );
        let elsewhere = web(
            "team-b",
            "blog",
            "2026-01-02T00:00:00Z",
            Some("blog.example.com"),
        );
        let owners = HostOwners::of(&[
            thief.clone(),
            first.clone(),
            neighbour.clone(),
            elsewhere.clone(),
        ]);
        assert_eq!(owners.conflict(&first), None);
        assert_eq!(owners.conflict(&neighbour), None, "same namespace");
        assert_eq!(owners.conflict(&elsewhere), None);
        let message = owners.conflict(&thief).expect("conflict");
        assert!(
            message.contains("belongs to namespace team-a (workload shop)"),
            "{message}"
        );

        // Once the owner is being deleted, the host passes to the next oldest claim.
        let mut leaving = first;
        leaving.metadata.deletion_timestamp = "2026-01-04T00:00:00Z".into();
        let owners = HostOwners::of(&[thief.clone(), leaving, neighbour.clone()]);
        assert_eq!(owners.conflict(&thief), None);
        assert!(owners.conflict(&neighbour).is_some());
    }

    #[test]
    fn any_host_is_one_claim_too() {
        let first = web("team-a", "catch-all", "2026-01-01T00:00:00Z", None);
        let second = web("team-b", "catch-all", "2026-01-02T00:00:00Z", None);
        let owners = HostOwners::of(&[first.clone(), second.clone()]);
        assert!(
            owners
                .conflict(&second)
                .is_some_and(|m| m.contains("any host"))
        );
        assert_eq!(owners.conflict(&first), None);
    }
}
