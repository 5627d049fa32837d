//! One conformance suite for every [`WorkloadStore`] backend.

use std::time::Duration;

use flotilla_tests::apiserver::FakeApiServer;

use super::*;
use crate::model::{Condition, WorkloadSpec};

const DIGEST: &str = "1111111111111111111111111111111111111111111111111111111111111111";

fn workload(name: &str, replicas: i64) -> Workload {
    let mut spec = WorkloadSpec {
        replicas,
        ..WorkloadSpec::default()
    };
    spec.module.sha256 = DIGEST.into();
    Workload::new("", name, spec)
}

async fn next_event(watch: &mut Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a watch event within 5 s")
        .expect("watch open")
        .expect("event ok")
}

/// The names of every workload, in list order.
async fn names<S: WorkloadStore>(store: &S) -> Vec<String> {
    store
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|w| w.metadata.name)
        .collect()
}

/// The suite: every backend must pass it.
async fn conformance<S: WorkloadStore>(store: &S) {
    // Empty store: the watch starts with an empty snapshot.
    let mut watch = store.watch().await.expect("watch");
    assert_eq!(next_event(&mut watch).await, WatchEvent::Restarted(vec![]));

    // Create: generation 1, a uid, a resource version, namespace defaulted.
    let created = store.apply(workload("web", 2)).await.expect("create");
    assert_eq!(created.metadata.generation, 1);
    assert_eq!(created.metadata.namespace, "default");
    assert!(!created.metadata.uid.is_empty());
    assert!(!created.metadata.resource_version.is_empty());
    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Applied(created.clone())
    );
    let key = created.key();
    assert_eq!(store.get(&key).await.expect("get"), Some(created.clone()));

    // A metadata change bumps the resource version, not the generation.
    let mut labelled = workload("web", 2);
    labelled
        .metadata
        .labels
        .insert("tier".into(), "front".into());
    let same = store.apply(labelled).await.expect("relabel");
    assert_eq!(same.metadata.generation, 1);
    assert_eq!(same.metadata.uid, created.metadata.uid);
    assert_ne!(
        same.metadata.resource_version,
        created.metadata.resource_version
    );
    next_event(&mut watch).await;

    // A spec change bumps the generation.
    let scaled = store.apply(workload("web", 5)).await.expect("scale");
    assert_eq!(scaled.metadata.generation, 2);
    next_event(&mut watch).await;

    // A stale write conflicts and changes nothing.
    let mut stale = workload("web", 9);
    stale.metadata.resource_version = created.metadata.resource_version.clone();
    let err = store.apply(stale).await.expect_err("stale write");
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert_eq!(
        store.get(&key).await.expect("get").map(|w| w.spec.replicas),
        Some(5)
    );

    // An invalid object is refused with its field errors and changes nothing.
    let err = store.apply(workload("web", -1)).await.expect_err("invalid");
    assert!(err.to_string().contains("invalid"), "{err}");
    let Error::Invalid(fields) = err else {
        panic!("not a validation error")
    };
    assert_eq!(fields.0[0].field, "spec.replicas");

    // Status is its own subresource: the spec and generation stay.
    let status = WorkloadStatus {
        observed_generation: 2,
        replicas: 5,
        conditions: vec![Condition {
            type_: "Scheduled".into(),
            status: "True".into(),
            ..Condition::default()
        }],
        ..WorkloadStatus::default()
    };
    let patched = store
        .patch_status(&key, status.clone())
        .await
        .expect("status");
    assert_eq!(patched.status.as_ref(), Some(&status));
    assert_eq!(patched.metadata.generation, 2);
    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Applied(patched.clone())
    );
    // Applying a spec keeps the status.
    let reapplied = store.apply(workload("web", 6)).await.expect("reapply");
    assert_eq!(reapplied.status.as_ref(), Some(&status));
    next_event(&mut watch).await;

    let unknown = WorkloadKey::new("default", "nope");
    let err = store
        .patch_status(&unknown, status)
        .await
        .expect_err("unknown");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");

    // A second workload; list is sorted by key.
    store.apply(workload("api", 1)).await.expect("create api");
    next_event(&mut watch).await;
    let names = names(store).await;
    assert_eq!(names, ["api", "web"]);

    // A new watcher starts from a snapshot with both.
    let mut late = store.watch().await.expect("watch");
    let WatchEvent::Restarted(snapshot) = next_event(&mut late).await else {
        panic!("a watch starts with Restarted");
    };
    assert_eq!(snapshot.len(), 2);

    // Delete returns the last state and emits Deleted; deleting again is a no-op.
    let deleted = store.delete(&key).await.expect("delete").expect("existed");
    assert_eq!(deleted.metadata.name, "web");
    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Deleted(deleted.clone())
    );
    assert_eq!(next_event(&mut late).await, WatchEvent::Deleted(deleted));
    assert_eq!(store.delete(&key).await.expect("delete again"), None);
    assert_eq!(store.get(&key).await.expect("get"), None);

    // A finalizer holds a deleted workload, marked, until it is removed.
    let api = WorkloadKey::new("default", "api");
    let held = store
        .set_finalizers(&api, vec!["flotilla.dev/test".into()], "")
        .await
        .expect("add finalizer")
        .expect("still there");
    assert_eq!(held.metadata.finalizers, ["flotilla.dev/test"]);
    next_event(&mut watch).await;
    let marked = store.delete(&api).await.expect("delete").expect("existed");
    assert!(!marked.metadata.deletion_timestamp.is_empty());
    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Applied(marked.clone())
    );
    assert_eq!(store.get(&api).await.expect("get"), Some(marked.clone()));
    let err = store
        .set_finalizers(&api, vec![], &held.metadata.resource_version)
        .await
        .expect_err("stale version");
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    let gone = store
        .set_finalizers(&api, vec![], &marked.metadata.resource_version)
        .await
        .expect("remove finalizer");
    assert_eq!(gone, None);
    let WatchEvent::Deleted(last) = next_event(&mut watch).await else {
        panic!("removing the last finalizer deletes");
    };
    assert_eq!(last.metadata.name, "api");
    assert_eq!(store.get(&api).await.expect("get"), None);
    assert!(store.list().await.expect("list").is_empty());
}

#[tokio::test]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("flotilla.redb")).expect("open");
    conformance(&store).await;
}

#[tokio::test]
async fn kube_store_conforms() {
    let server = FakeApiServer::start()
        .await
        .with_status_subresource("wasmworkloads");
    let store = KubeStore::start(fake_client(&server));
    conformance(&store).await;
    // Status went by server-side apply, under the control plane's field manager.
    let status_writes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/status"))
        .collect();
    assert!(!status_writes.is_empty());
    for request in status_writes {
        assert_eq!(request.content_type, "application/apply-patch+yaml");
        assert_eq!(
            request.query.get("fieldManager").map(String::as_str),
            Some(super::kube::FIELD_MANAGER)
        );
        assert_eq!(request.query.get("force").map(String::as_str), Some("true"));
    }
}

/// A client of the fake API server.
pub(crate) fn fake_client(server: &FakeApiServer) -> ::kube::Client {
    let url = server.url().parse().expect("a valid URL");
    ::kube::Client::try_from(::kube::Config::new(url)).expect("a client")
}

#[tokio::test]
async fn kube_store_skips_an_object_that_does_not_decode() {
    let server = FakeApiServer::start()
        .await
        .with_status_subresource("wasmworkloads");
    let client = fake_client(&server);
    // What an older or foreign writer might leave behind: replicas of the wrong type.
    let api: ::kube::Api<::kube::api::DynamicObject> = ::kube::Api::namespaced_with(
        client.clone(),
        "default",
        &::kube::api::ApiResource::erase::<crate::model::WasmWorkload>(&()),
    );
    let bad = serde_json::from_value(serde_json::json!({
        "apiVersion": "flotilla.dev/v1alpha1",
        "kind": "WasmWorkload",
        "metadata": {"name": "bad"},
        "spec": {"replicas": "many", "module": {"sha256": DIGEST}},
    }))
    .expect("object");
    api.create(&Default::default(), &bad).await.expect("create");
    let store = KubeStore::start(client);
    store.apply(workload("good", 1)).await.expect("apply");
    let names = names(&store).await;
    assert_eq!(names, ["good"]);
}

#[tokio::test]
async fn kube_store_reports_an_unreachable_api_server() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let client =
        ::kube::Client::try_from(::kube::Config::new(url.parse().expect("url"))).expect("client");
    let store = KubeStore::start(client);
    let err = store
        .apply(workload("web", 1))
        .await
        .expect_err("no API server");
    assert!(matches!(err, Error::Kube(_)), "{err:?}");
}

#[tokio::test]
async fn embedded_store_survives_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("flotilla.redb");
    let (before, version) = {
        let store = EmbeddedStore::open(&path).expect("open");
        for i in 0..50 {
            store
                .apply(workload(&format!("w{i:02}"), i))
                .await
                .expect("create");
        }
        let last = store.apply(workload("w07", 70)).await.expect("update");
        store
            .patch_status(
                &last.key(),
                WorkloadStatus {
                    replicas: 70,
                    ..Default::default()
                },
            )
            .await
            .expect("status");
        (
            store.list().await.expect("list"),
            last.metadata.resource_version,
        )
    };
    let store = EmbeddedStore::open(&path).expect("reopen");
    let after = store.list().await.expect("list");
    assert_eq!(before, after);
    assert_eq!(after.len(), 50);
    // Resource versions keep growing across restarts.
    let next = store.apply(workload("w08", 1)).await.expect("update");
    let (next, version): (u64, u64) = (
        next.metadata.resource_version.parse().expect("number"),
        version.parse().expect("number"),
    );
    assert!(next > version + 1, "{next} after {version}");
}

#[tokio::test]
async fn a_lagging_watcher_resynchronises() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("flotilla.redb")).expect("open");
    let mut watch = store.watch().await.expect("watch");
    next_event(&mut watch).await;
    // More writes than the event buffer holds, without reading.
    for i in 0..(super::embedded::EVENT_BUFFER + 10) {
        store
            .apply(workload("busy", (i % 7) as i64))
            .await
            .expect("apply");
    }
    let WatchEvent::Restarted(snapshot) = next_event(&mut watch).await else {
        panic!("a lagging watcher gets a fresh snapshot");
    };
    assert_eq!(snapshot.len(), 1);
}

#[tokio::test]
async fn a_file_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("garbage.redb");
    std::fs::write(&path, b"this is not a database").expect("write");
    let err = match EmbeddedStore::open(&path) {
        Err(err) => err,
        Ok(_) => panic!("garbage opened as a store"),
    };
    assert!(matches!(err, Error::Open(_)), "{err:?}");
}
