//! The cluster's ConfigMaps and Secrets, watched and published to the `ConfigSet` that agent
//! sessions send from: in Kubernetes mode users write them with kubectl, and sandboxes see a
//! change without a restart, as a Pod's volumes do.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use flotilla_proto::agent::v1::{ConfigKind, ConfigObject};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};

use crate::cluster::Cluster;
use crate::cluster::config::{ConfigKey, ConfigObjectsByKey};

/// A ConfigMap's data (text and binary) as one object.
fn from_config_map(map: ConfigMap) -> ConfigObject {
    let mut data: BTreeMap<String, Vec<u8>> = map
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    data.extend(
        map.binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0)),
    );
    ConfigObject {
        kind: ConfigKind::ConfigMap as i32,
        namespace: map.metadata.namespace.unwrap_or_default(),
        name: map.metadata.name.unwrap_or_default(),
        data: data.into_iter().collect(),
    }
}

/// A Secret's decoded data as one object; `stringData` (which only a manifest carries) wins
/// over `data`, as in Kubernetes.
fn from_secret(secret: Secret) -> ConfigObject {
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    data.extend(
        secret
            .string_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes())),
    );
    ConfigObject {
        kind: ConfigKind::Secret as i32,
        namespace: secret.metadata.namespace.unwrap_or_default(),
        name: secret.metadata.name.unwrap_or_default(),
        data: data.into_iter().collect(),
    }
}

/// A `v1` ConfigMap or Secret document, as kubectl writes it, as one object (what
/// `flotilla apply` sends); `None` for any other kind.
///
/// # Errors
/// The document does not decode as its kind.
pub fn from_manifest(
    document: serde_json::Value,
) -> Result<Option<ConfigObject>, serde_json::Error> {
    let v1 = document
        .get("apiVersion")
        .and_then(serde_json::Value::as_str)
        == Some("v1");
    match document.get("kind").and_then(serde_json::Value::as_str) {
        Some("ConfigMap") if v1 => Ok(Some(from_config_map(serde_json::from_value(document)?))),
        Some("Secret") if v1 => Ok(Some(from_secret(serde_json::from_value(document)?))),
        _ => Ok(None),
    }
}

/// One watch event with its object converted.
fn convert<K>(event: watcher::Event<K>, to: fn(K) -> ConfigObject) -> watcher::Event<ConfigObject> {
    match event {
        watcher::Event::Apply(k) => watcher::Event::Apply(to(k)),
        watcher::Event::Delete(k) => watcher::Event::Delete(to(k)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(k) => watcher::Event::InitApply(to(k)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Watches the ConfigMaps and Secrets of `namespaces` (of every namespace when empty, which
/// needs cluster-wide read access) and publishes the set to `cluster` after the initial lists
/// and after each change, until `stopped` completes.
pub async fn publish(
    client: kube::Client,
    cluster: Arc<Cluster>,
    namespaces: Vec<String>,
    stopped: impl Future<Output = ()>,
) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut streams = Vec::new();
    for (index, scope) in scopes.iter().enumerate() {
        let (config_maps, secrets) = match scope {
            Some(namespace) => (
                Api::<ConfigMap>::namespaced(client.clone(), namespace),
                Api::<Secret>::namespaced(client.clone(), namespace),
            ),
            None => (
                Api::<ConfigMap>::all(client.clone()),
                Api::<Secret>::all(client.clone()),
            ),
        };
        streams.push(
            watcher::watcher(config_maps, watcher::Config::default())
                .default_backoff()
                .map(move |event| {
                    event.map(|e| ((ConfigKind::ConfigMap, index), convert(e, from_config_map)))
                })
                .boxed(),
        );
        streams.push(
            watcher::watcher(secrets, watcher::Config::default())
                .default_backoff()
                .map(move |event| {
                    event.map(|e| ((ConfigKind::Secret, index), convert(e, from_secret)))
                })
                .boxed(),
        );
    }
    let watches = streams.len();
    let mut events = futures::stream::select_all(streams);
    // Per watch (a kind in a scope): the objects, and those of a relist in progress, which
    // replace them when it ends.
    let mut known: BTreeMap<(ConfigKind, usize), ConfigObjectsByKey> = BTreeMap::new();
    let mut relisting: BTreeMap<(ConfigKind, usize), ConfigObjectsByKey> = BTreeMap::new();
    let mut synced = std::collections::BTreeSet::new();
    tokio::pin!(stopped);
    loop {
        let event = tokio::select! {
            () = &mut stopped => return,
            event = events.next() => match event {
                Some(Ok(event)) => event,
                Some(Err(error)) => {
                    tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "watching ConfigMaps and Secrets");
                    continue;
                }
                None => return,
            },
        };
        let (kind, event) = event;
        let changed = match event {
            watcher::Event::Apply(object) => {
                let key = ConfigKey::of(&object);
                known.entry(kind).or_default().insert(key, Arc::new(object));
                true
            }
            watcher::Event::Delete(object) => {
                let key = ConfigKey::of(&object);
                known.entry(kind).or_default().remove(&key);
                true
            }
            watcher::Event::Init => {
                relisting.insert(kind, ConfigObjectsByKey::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let key = ConfigKey::of(&object);
                relisting
                    .entry(kind)
                    .or_default()
                    .insert(key, Arc::new(object));
                false
            }
            watcher::Event::InitDone => {
                known.insert(kind, relisting.remove(&kind).unwrap_or_default());
                synced.insert(kind);
                true
            }
        };
        // Nothing is published until every watch has listed: agents would drop what is
        // missing.
        if changed && synced.len() == watches {
            cluster.config.publish(
                known
                    .values()
                    .flat_map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())))
                    .collect(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use flotilla_tests::apiserver::FakeApiServer;
    use serde_json::json;

    use super::*;
    use crate::store::tests::fake_client;

    /// Waits until the published set satisfies `done`.
    async fn wait(cluster: &Cluster, what: &str, done: impl Fn(&ConfigObjectsByKey) -> bool) {
        let mut changes = cluster.config.subscribe();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !done(&changes.borrow_and_update()) {
                changes.changed().await.expect("open");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} not published"));
    }

    #[tokio::test]
    async fn config_maps_and_secrets_of_the_cluster_are_published_with_their_changes() {
        let api = FakeApiServer::start().await;
        let maps = "/api/v1/namespaces/default/configmaps";
        let secrets = "/api/v1/namespaces/default/secrets";
        api.apply_object(
            maps,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app"},
                   "data": {"greeting": "v1"}, "binaryData": {"raw": "AAE="}}),
        )
        .await
        .expect("configmap");
        api.apply_object(
            secrets,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
                   "data": {"password": "czNjcmV0"}}),
        )
        .await
        .expect("secret");
        let cluster = Arc::new(Cluster::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(publish(
            fake_client(&api),
            cluster.clone(),
            Vec::new(),
            async {
                let _ = stopped.await;
            },
        ));

        wait(&cluster, "both objects", |set| set.len() == 2).await;
        let set = cluster.config.current();
        let app = set.values().find(|o| o.name == "app").expect("app");
        assert_eq!(app.data["greeting"], b"v1");
        assert_eq!(app.data["raw"], [0u8, 1]);
        let creds = set.values().find(|o| o.name == "creds").expect("creds");
        assert_eq!(creds.kind(), ConfigKind::Secret);
        assert_eq!(creds.data["password"], b"s3cret", "decoded");

        // kubectl apply of a new value, and kubectl delete.
        api.patch_object(&format!("{maps}/app"), json!({"data": {"greeting": "v2"}}))
            .await
            .expect("patch");
        wait(&cluster, "the update", |set| {
            set.values()
                .any(|o| o.name == "app" && o.data.get("greeting").is_some_and(|v| v == b"v2"))
        })
        .await;
        api.delete_object(&format!("{secrets}/creds"))
            .await
            .expect("delete");
        wait(&cluster, "the deletion", |set| set.len() == 1).await;
        let _ = stop.send(());
        task.await.expect("stops");
    }

    #[tokio::test]
    async fn with_namespaces_given_only_theirs_are_read() {
        let api = FakeApiServer::start().await;
        for namespace in ["team-a", "team-b", "kube-system"] {
            api.apply_object(
                &format!("/api/v1/namespaces/{namespace}/secrets"),
                json!({"apiVersion": "v1", "kind": "Secret",
                       "metadata": {"name": "creds", "namespace": namespace},
                       "data": {"password": "czNjcmV0"}}),
            )
            .await
            .expect("secret");
        }
        let before = api.requests().len();
        let cluster = Arc::new(Cluster::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(publish(
            fake_client(&api),
            cluster.clone(),
            vec!["team-a".into(), "team-b".into()],
            async {
                let _ = stopped.await;
            },
        ));
        wait(&cluster, "both namespaces' secrets", |set| set.len() == 2).await;
        let namespaces: Vec<String> = cluster
            .config
            .current()
            .values()
            .map(|o| o.namespace.clone())
            .collect();
        assert_eq!(namespaces, ["team-a", "team-b"]);
        // Nothing was asked of the API beyond those namespaces.
        let paths: Vec<String> = api.requests()[before..]
            .iter()
            .map(|r| r.path.clone())
            .collect();
        assert!(
            paths
                .iter()
                .filter(|p| p.contains("secrets") || p.contains("configmaps"))
                .all(|p| p.contains("/namespaces/team-a/") || p.contains("/namespaces/team-b/")),
            "{paths:#?}"
        );
        let _ = stop.send(());
        task.await.expect("stops");
    }
}
