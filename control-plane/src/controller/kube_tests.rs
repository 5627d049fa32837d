//! The controller as an operator: [`KubeStore`] against the fake API server, with simulated
//! nodes. Each scenario drives the API as kubectl would and reads what the API server holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_tests::apiserver::{FakeApiServer, Method};
use serde_json::{Value, json};

use super::tests::node;
use super::*;
use crate::cluster::Reported;
use crate::scheduler::SchedulerConfig;
use crate::store::KubeStore;
use crate::store::tests::fake_client;

const WORKLOADS: &str = "/apis/flotilla.dev/v1alpha1/namespaces/default/wasmworkloads";
const DIGEST: &str = "3333333333333333333333333333333333333333333333333333333333333333";

struct Operator {
    api: FakeApiServer,
    cluster: Arc<Cluster>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    async fn start() -> Self {
        let api = FakeApiServer::start()
            .await
            .with_status_subresource("wasmworkloads");
        let cluster = Arc::new(Cluster::default());
        cluster.nodes.upsert(node("n0", "amd64", 1000));
        cluster.nodes.upsert(node("n1", "amd64", 1000));
        let controller = Controller::new(
            KubeStore::start(fake_client(&api)),
            Scheduler::new(&SchedulerConfig::default()).expect("scheduler"),
            cluster.clone(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller.run(Duration::from_secs(3600), async {
            let _ = stopped.await;
        }));
        Self {
            api,
            cluster,
            stop: Some(stop),
            task,
        }
    }

    async fn create(&self, name: &str, replicas: i64) {
        self.create_with_finalizers(name, replicas, &[]).await;
    }

    async fn create_with_finalizers(&self, name: &str, replicas: i64, finalizers: &[&str]) {
        self.api
            .apply_object(
                WORKLOADS,
                json!({
                    "apiVersion": "flotilla.dev/v1alpha1",
                    "kind": "WasmWorkload",
                    "metadata": {"name": name, "finalizers": finalizers},
                    "spec": {"replicas": replicas, "module": {"sha256": DIGEST}},
                }),
            )
            .await
            .expect("create");
    }

    /// Polls the API server's copy of a workload until `done` holds.
    async fn wait(&self, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let path = format!("{WORKLOADS}/{name}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let object = self.api.object(&path).unwrap_or(Value::Null);
            if done(&object) {
                return object;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} not reached; last: {object}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What both nodes report running of `key`, as agents' heartbeats would.
    fn report(&self, key: &str, per_node: u64) {
        for node in ["n0", "n1"] {
            let mut running = BTreeMap::new();
            if per_node > 0 {
                running.insert(
                    (key.to_string(), 1),
                    Reported {
                        generation: 1,
                        running: per_node,
                        available: per_node,
                        succeeded: 0,
                    },
                );
            }
            self.cluster.nodes.report(node, running);
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the controller stops")
            .expect("no panic");
    }
}

fn condition<'a>(object: &'a Value, type_: &str) -> &'a Value {
    object["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

fn placed(object: &Value) -> u64 {
    object["status"]["replicas"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn create_and_scale_write_status_by_server_side_apply() {
    let op = Operator::start().await;
    op.create("web", 4).await;
    let object = op
        .wait("web", "4 placed", |o| {
            placed(o) == 4 && !o["metadata"]["finalizers"].is_null()
        })
        .await;
    assert_eq!(object["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(object["status"]["placements"], json!({"n0": 2, "n1": 2}));
    assert_eq!(object["status"]["observedGeneration"], 1);
    assert_eq!(condition(&object, SCHEDULED)["status"], "True");
    assert_eq!(condition(&object, AVAILABLE)["status"], "False");
    assert_eq!(
        condition(&object, PROGRESSING)["reason"],
        "ReplicasUpdating"
    );

    // Agents report the replicas running: Available, Ready, rolled out.
    op.report("default/web", 2);
    let object = op
        .wait("web", "available", |o| {
            condition(o, AVAILABLE)["status"] == "True"
        })
        .await;
    assert_eq!(object["status"]["readyReplicas"], 4);
    assert_eq!(condition(&object, READY)["reason"], "AllReplicasReady");
    assert_eq!(
        condition(&object, PROGRESSING)["reason"],
        "TemplateAvailable"
    );

    // kubectl scale.
    op.api
        .patch_object(
            &format!("{WORKLOADS}/web"),
            json!({"spec": {"replicas": 10}}),
        )
        .await
        .expect("scale");
    let object = op
        .wait("web", "10 placed", |o| {
            placed(o) == 10 && o["status"]["observedGeneration"] == 2
        })
        .await;
    assert_eq!(object["status"]["templateGeneration"], 1);

    // Idempotent: once settled, nothing more is written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes = op.api.requests().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        op.api.requests().len(),
        writes,
        "the operator keeps writing"
    );

    for request in op
        .api
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/status"))
    {
        assert_eq!(request.method, Method::PATCH);
        assert_eq!(request.content_type, "application/apply-patch+yaml");
    }
    op.stop().await;
}

#[tokio::test]
async fn delete_waits_for_the_sandboxes_to_stop() {
    let op = Operator::start().await;
    op.create("web", 2).await;
    op.wait("web", "placed with the finalizer", |o| {
        placed(o) == 2 && !o["metadata"]["finalizers"].is_null()
    })
    .await;
    op.report("default/web", 1);

    let path = format!("{WORKLOADS}/web");
    let marked = op.api.delete_object(&path).await.expect("delete");
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    // Placements go, so agents stop the sandboxes; the object stays while they still run.
    let object = op
        .wait("web", "placements emptied", |o| placed(o) == 0)
        .await;
    assert_eq!(condition(&object, PROGRESSING)["reason"], "Terminating");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        op.api.object(&path).is_some(),
        "deleted while sandboxes run"
    );

    op.report("default/web", 0);
    op.wait("web", "the workload gone", Value::is_null).await;
    op.stop().await;
}

#[tokio::test]
async fn api_errors_and_conflicts_are_retried_with_backoff() {
    let op = Operator::start().await;
    // The first status writes fail: a server error, then conflicts.
    op.api.fail_next(Some(Method::PATCH), "/status", 500, 2);
    op.api.fail_next(Some(Method::PATCH), "/status", 409, 2);
    // With the finalizer already there, nothing but the retries can trigger another pass.
    op.create_with_finalizers("web", 3, &[FINALIZER]).await;
    op.wait("web", "placed despite the errors", |o| placed(o) == 3)
        .await;
    let attempts = op
        .api
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/status"))
        .count();
    assert!(attempts >= 5, "{attempts} status writes");
    op.stop().await;
}

impl Operator {
    /// Node n0 reports `(generation, running and available)` of `key`; n1 reports nothing.
    fn report_generations(&self, key: &str, generations: &[(u64, u64)]) {
        let running = generations
            .iter()
            .filter(|&&(_, n)| n > 0)
            .map(|&(generation, n)| {
                let reported = Reported {
                    generation,
                    running: n,
                    available: n,
                    succeeded: 0,
                };
                ((key.to_string(), generation), reported)
            })
            .collect();
        self.cluster.nodes.report("n0", running);
        self.cluster.nodes.report("n1", BTreeMap::new());
    }
}

fn count(object: &Value, field: &str) -> u64 {
    object["status"][field].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn kubectl_apply_of_a_new_template_rolls_out_and_reapplying_the_old_one_rolls_back() {
    let op = Operator::start().await;
    let path = format!("{WORKLOADS}/web");
    op.api
        .apply_object(
            WORKLOADS,
            json!({
                "apiVersion": "flotilla.dev/v1alpha1",
                "kind": "WasmWorkload",
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 4,
                    "module": {"sha256": DIGEST},
                    "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                },
            }),
        )
        .await
        .expect("create");
    op.wait("web", "4 placed", |o| placed(o) == 4).await;
    op.report_generations("default/web", &[(1, 4)]);
    op.wait("web", "available", |o| count(o, "availableReplicas") == 4)
        .await;

    // kubectl apply with new arguments: one replica at a time, never more than 4 placed.
    op.api
        .patch_object(&path, json!({"spec": {"args": ["v2"]}}))
        .await
        .expect("patch");
    let mut steps = 0;
    loop {
        let object = op
            .wait("web", "revision 2 on its way", |o| {
                count(o, "revision") == 2 && o["status"]["observedGeneration"] == 2
            })
            .await;
        let (updated, all) = (count(&object, "updatedReplicas"), placed(&object));
        assert!(all <= 4, "maxSurge 0: {}", object["status"]);
        if updated == 4 && all == 4 {
            break;
        }
        op.report_generations("default/web", &[(1, all - updated), (2, updated)]);
        op.wait("web", "the next step", |o| {
            count(o, "updatedReplicas") > updated || placed(o) < all
        })
        .await;
        steps += 1;
        assert!(
            steps <= 10,
            "the update should finish: {}",
            object["status"]
        );
    }
    op.report_generations("default/web", &[(2, 4)]);
    let object = op
        .wait("web", "rolled out", |o| {
            condition(o, PROGRESSING)["reason"] == "TemplateAvailable"
        })
        .await;
    let revisions = object["status"]["revisions"].as_array().expect("revisions");
    assert_eq!(revisions.len(), 2);
    assert_eq!(revisions[1]["revision"], 1);
    assert!(
        revisions[1]["template"]["args"].is_null(),
        "revision 1 had none"
    );
    assert_eq!(revisions[0]["template"]["args"], json!(["v2"]));

    // Re-applying the old spec is a rollback: revision 1's template returns as revision 3.
    op.api
        .patch_object(&path, json!({"spec": {"args": null}}))
        .await
        .expect("patch");
    let object = op
        .wait("web", "revision 3", |o| count(o, "revision") == 3)
        .await;
    assert_eq!(object["status"]["revisions"][0]["generation"], 1);
    assert_eq!(object["status"]["templateGeneration"], 1);
    let numbers: Vec<u64> = object["status"]["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .filter_map(|r| r["revision"].as_u64())
        .collect();
    assert_eq!(numbers, [3, 2]);
    op.stop().await;
}
