//! Manifests parsed and validated as users write them: a full manifest, field-pointed errors
//! (all at once), HTTP defaults, requests and quantities, tolerations, rolling-update limits
//! and rollback targets.

use super::*;

const DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000abc";

fn manifest(extra_spec: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: web\n\
         spec:\n  module:\n    sha256: \"{DIGEST}\"\n{extra_spec}"
    )
}

#[test]
fn parses_a_full_manifest() {
    let text = manifest(
        "  replicas: 3\n  args: [a]\n  env: [{name: A, value: b}]\n  restartPolicy: OnFailure\n\
         \x20 nodeSelector: {kubernetes.io/arch: arm64}\n\
         \x20 tolerations: [{key: dedicated, operator: Equal, value: wasm, effect: NoSchedule}]\n\
         \x20 resources:\n    requests: {memory: 1Mi, cpu: 100m}\n    limits: {memory: 16Mi, cpuTime: 2s}\n",
    );
    let workloads = Workload::from_yaml(&text).expect("valid");
    let w = &workloads[0];
    assert_eq!(w.key(), WorkloadKey::new("default", "web"));
    assert_eq!(w.spec.replicas, 3);
    assert_eq!(w.spec.restart_policy, RestartPolicy::OnFailure);
    assert_eq!(
        w.spec.requests(),
        Requests {
            // The request and the default log ring.
            memory: (1 << 20) + DEFAULT_LOG_BYTES,
            cpu_millis: 100,
            sandboxes: 1,
        }
    );
}

#[test]
fn bad_manifests_get_field_pointed_errors() {
    let cases = [
        ("  replicas: -1\n", "spec.replicas: must be >= 0"),
        ("  replicaz: 1\n", "unknown field `replicaz`"),
        (
            "  resources: {limits: {memory: 16Mo}}\n",
            "spec.resources.limits.memory",
        ),
        (
            "  resources: {requests: {cpu: fast}}\n",
            "spec.resources.requests.cpu",
        ),
        (
            "  resources: {requests: {cpu: 500m}, limits: {cpu: 250m}}\n",
            "spec.resources.requests.cpu: must be <= spec.resources.limits.cpu",
        ),
        (
            "  resources: {requests: {memory: 2Gi}, limits: {memory: 1Gi}}\n",
            "spec.resources.requests.memory: must be <= spec.resources.limits.memory",
        ),
        ("  env: [{name: \"\"}]\n", "spec.env[0].name"),
        (
            "  restartPolicy: Sometimes\n",
            "unknown variant `Sometimes`",
        ),
        (
            "  activeDeadlineSeconds: 0\n",
            "spec.activeDeadlineSeconds: must be > 0",
        ),
        (
            "  minReadySeconds: -1\n",
            "spec.minReadySeconds: must be >= 0",
        ),
        (
            "  progressDeadlineSeconds: 0\n",
            "spec.progressDeadlineSeconds: must be > 0",
        ),
        (
            "  progressDeadlineSeconds: 9223372036854775807\n",
            "spec.progressDeadlineSeconds: must be <= 2147483647",
        ),
        (
            "  activeDeadlineSeconds: 2147483648\n",
            "spec.activeDeadlineSeconds: must be <= 2147483647",
        ),
        (
            "  minReadySeconds: 9223372036854775807\n",
            "spec.minReadySeconds: must be <= 2147483647",
        ),
        (
            "  resources: {limits: {cpuTime: 100000years}}\n",
            "spec.resources.limits.cpuTime: \"100000years\": must be at most 2147483647s",
        ),
        (
            "  http: {timeout: 100000years}\n",
            "spec.http.timeout: \"100000years\": must be at most 2147483647s",
        ),
        (
            "  resources: {limits: {logs: 1Ti}}\n",
            "spec.resources.limits.logs: \"1Ti\": must be at most 16Mi",
        ),
        ("  http: {host: Bad_Host}\n", "spec.http.host"),
        ("  http: {pathPrefix: api}\n", "spec.http.pathPrefix"),
        ("  http: {pathPrefix: /a//b}\n", "spec.http.pathPrefix"),
        (
            "  http: {maxConcurrency: 0}\n",
            "spec.http.maxConcurrency: must be >= 1",
        ),
        (
            "  http: {maxConcurrency: 10001}\n",
            "spec.http.maxConcurrency: 10001: must be at most 10000",
        ),
        ("  http: {timeout: soon}\n", "spec.http.timeout"),
        ("  http: {timeout: 0s}\n", "spec.http.timeout: must be > 0"),
        (
            "  http: {readinessPath: healthz}\n",
            "spec.http.readinessPath",
        ),
        ("  http: {prefix: /}\n", "unknown field `prefix`"),
        (
            "  stdin: true\n  http: {}\n",
            "spec.stdin: HTTP workloads read requests, not stdin",
        ),
        (
            "  strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 0%}}\n",
            "spec.strategy.rollingUpdate: maxSurge and maxUnavailable may not both be 0",
        ),
        (
            "  strategy: {rollingUpdate: {maxSurge: lots}}\n",
            "spec.strategy.rollingUpdate.maxSurge: lots: must be a count or a percentage",
        ),
        (
            "  strategy: {rollingUpdate: {maxUnavailable: -1}}\n",
            "spec.strategy.rollingUpdate.maxUnavailable: -1: must be >= 0",
        ),
        (
            "  strategy: {rollingUpdate: {maxUnavailable: 150%}}\n",
            "must not be above 100%",
        ),
        (
            "  strategy: {type: Recreate, rollingUpdate: {maxSurge: 1}}\n",
            "spec.strategy.rollingUpdate: may only be set with type RollingUpdate",
        ),
        (
            "  strategy: {type: BlueGreen}\n",
            "unknown variant `BlueGreen`",
        ),
        (
            "  revisionHistoryLimit: -1\n",
            "spec.revisionHistoryLimit: must be >= 0",
        ),
        (
            "  volumes: [{name: a}]\n",
            "spec.volumes[0]: must have exactly one of emptyDir, configMap, secret, hostPath",
        ),
        (
            "  volumes: [{name: a, emptyDir: {}}, {name: a, emptyDir: {}}]\n",
            "spec.volumes[1].name: \"a\" is declared twice",
        ),
        (
            "  volumes: [{name: a, emptyDir: {sizeLimit: lots}}]\n",
            "spec.volumes[0].emptyDir.sizeLimit",
        ),
        (
            "  volumes: [{name: a, emptyDir: {medium: HugePages-2Mi}}]\n",
            "unknown variant `HugePages-2Mi`",
        ),
        (
            "  volumes: [{name: a, hostPath: {path: data}}]\n",
            "spec.volumes[0].hostPath.path: \"data\": must be an absolute path",
        ),
        (
            "  volumeMounts: [{name: nope, mountPath: /x}]\n",
            "spec.volumeMounts[0].name: \"nope\" is not a volume of spec.volumes",
        ),
        (
            "  volumes: [{name: a, emptyDir: {}}]\n  volumeMounts: [{name: a, mountPath: /x/../y}]\n",
            "spec.volumeMounts[0].mountPath: \"/x/../y\": must not contain . or .. segments",
        ),
        (
            "  volumes: [{name: a, configMap: {name: c, items: [{key: k, path: ../k}]}}]\n",
            "spec.volumes[0].configMap.items[0].path: \"../k\": must not contain",
        ),
        (
            "  volumes: [{name: a, secret: {secretName: s, items: [{key: k, path: /etc/k}]}}]\n",
            "spec.volumes[0].secret.items[0].path: \"/etc/k\": must be a relative path",
        ),
        (
            "  volumes: [{name: a, configMap: {name: c, items: [{key: k, path: x/..data/k}]}}]\n",
            "spec.volumes[0].configMap.items[0].path",
        ),
        (
            "  volumes: [{name: a, configMap: {name: c, items: [{key: a/b, path: k}]}}]\n",
            "spec.volumes[0].configMap.items[0].key",
        ),
        (
            "  volumes: [{name: a, configMap: {name: c, items: [{key: k, path: p}, {key: j, path: p}]}}]\n",
            "spec.volumes[0].configMap.items[1].path: \"p\" is used twice",
        ),
        (
            "  volumes: [{name: a, configMap: {name: c, items: [{key: k, path: p}, {key: j, path: p/q}]}}]\n",
            "spec.volumes[0].configMap.items: \"p\" is both a file and the directory of \"p/q\"",
        ),
        (
            "  volumes: [{name: a, emptyDir: {}}]\n  volumeMounts: [{name: a, mountPath: /x, subPath: ../y}]\n",
            "spec.volumeMounts[0].subPath: \"../y\": must not contain",
        ),
        (
            "  volumes: [{name: a, configMap: {name: c}}]\n  volumeMounts: [{name: a, mountPath: /x, subPath: k}]\n",
            "spec.volumeMounts[0].subPath: not supported for configMap and secret volumes",
        ),
        (
            "  env: [{name: A, value: x, valueFrom: {secretKeyRef: {name: s, key: k}}}]\n",
            "spec.env[0].valueFrom: may not be set together with value",
        ),
        (
            "  env: [{name: A, valueFrom: {}}]\n",
            "spec.env[0].valueFrom: must have exactly one of configMapKeyRef, secretKeyRef, fieldRef",
        ),
        (
            "  env: [{name: A, valueFrom: {secretKeyRef: {name: s, key: a/b}}}]\n",
            "spec.env[0].valueFrom.secretKeyRef.key",
        ),
        (
            "  env: [{name: A, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]\n",
            "spec.env[0].valueFrom.fieldRef.fieldPath: \"status.podIP\": must be one of metadata.name, metadata.namespace, spec.nodeName",
        ),
        (
            "  envFrom: [{prefix: X_}]\n",
            "spec.envFrom[0]: must have exactly one of configMapRef, secretRef",
        ),
    ];
    for (extra, needle) in cases {
        let err = Workload::from_yaml(&manifest(extra)).expect_err(needle);
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    let bad_digest = manifest("").replace(DIGEST, "abc");
    let err = Workload::from_yaml(&bad_digest).expect_err("bad digest");
    assert!(err.to_string().contains("spec.module.sha256"), "{err}");
    let url = manifest("").replace(
        &format!("    sha256: \"{DIGEST}\"\n"),
        &format!("    sha256: \"{DIGEST}\"\n    url: ftp://x/y.wasm\n"),
    );
    let err = Workload::from_yaml(&url).expect_err("bad url");
    assert!(err.to_string().contains("spec.module.url"), "{err}");
    let name = manifest("").replace("name: web", "name: Web_1");
    let err = Workload::from_yaml(&name).expect_err("bad name");
    assert!(err.to_string().contains("metadata.name"), "{err}");
}

#[test]
fn http_workloads_parse_with_their_defaults() {
    let text = manifest(
        "  minReadySeconds: 5\n  http:\n    host: api.example.com\n    timeout: 500ms\n\
         \x20   readinessPath: /healthz\n",
    );
    let w = &Workload::from_yaml(&text).expect("valid")[0];
    let http = w.spec.http.as_ref().expect("http");
    assert_eq!(http.path_prefix(), "/");
    assert_eq!(http.timeout_ms(), 500);
    assert_eq!(http.max_concurrency, None);
    assert_eq!(w.spec.min_ready_seconds, Some(5));
}

#[test]
fn all_errors_are_reported_at_once() {
    let text = manifest("  replicas: -2\n  activeDeadlineSeconds: -1\n");
    let err = Workload::from_yaml(&text).expect_err("invalid");
    assert_eq!(err.0.len(), 2, "{err}");
}

#[test]
fn limits_alone_request_the_limit() {
    let mut spec = WorkloadSpec::default();
    spec.resources.limits.memory = Some("8Mi".into());
    spec.resources.limits.cpu = Some("0.5".into());
    assert_eq!(
        spec.requests(),
        Requests {
            memory: (8 << 20) + DEFAULT_LOG_BYTES,
            cpu_millis: 500,
            sandboxes: 1,
        }
    );
    // The log ring is memory in the agent's heap, so its limit is requested too.
    spec.resources.limits.logs = Some("1Mi".into());
    assert_eq!(spec.requests().memory, 9 << 20);
}

#[test]
fn an_http_replica_requests_a_sandbox_and_its_memory_per_concurrent_request() {
    let mut spec = WorkloadSpec::default();
    spec.resources.requests.memory = Some("2Mi".into());
    spec.resources.limits.memory = Some("8Mi".into());
    spec.resources.limits.logs = Some("1Mi".into());
    spec.http = Some(HttpSpec {
        max_concurrency: Some(50),
        ..HttpSpec::default()
    });
    // Fifty request sandboxes of 2 MiB each, one log ring for the replica.
    assert_eq!(
        spec.requests(),
        Requests {
            memory: 50 * (2 << 20) + (1 << 20),
            cpu_millis: 0,
            sandboxes: 50,
        }
    );
    spec.http = Some(HttpSpec::default());
    assert_eq!(
        spec.requests().sandboxes,
        u64::from(HttpSpec::DEFAULT_MAX_CONCURRENCY)
    );
    let mut node = node::NodeResources::default();
    node.allocate(&spec.requests(), 2);
    assert_eq!(
        node.sandboxes,
        2 * u64::from(HttpSpec::DEFAULT_MAX_CONCURRENCY)
    );
}

#[test]
fn cpu_quantities() {
    for (q, m) in [("250m", 250), ("1", 1000), ("0.5", 500), ("2.125", 2125)] {
        assert_eq!(parse_cpu_millis(q), Ok(m), "{q}");
    }
    for bad in ["", "m", "1.2345", "abc", "-1"] {
        assert!(parse_cpu_millis(bad).is_err(), "{bad}");
    }
}

#[test]
fn tolerations_match_taints() {
    let taint = Taint {
        key: "dedicated".into(),
        value: "wasm".into(),
        effect: TaintEffect::NoSchedule,
    };
    let equal = Toleration {
        key: "dedicated".into(),
        value: "wasm".into(),
        ..Toleration::default()
    };
    assert!(equal.tolerates(&taint));
    let other_value = Toleration {
        value: "gpu".into(),
        ..equal.clone()
    };
    assert!(!other_value.tolerates(&taint));
    let exists_all = Toleration {
        operator: TolerationOperator::Exists,
        ..Toleration::default()
    };
    assert!(exists_all.tolerates(&taint));
    let wrong_effect = Toleration {
        effect: Some(TaintEffect::NoExecute),
        ..equal
    };
    assert!(!wrong_effect.tolerates(&taint));
}

#[test]
fn rolling_update_limits_resolve_as_a_deployments() {
    let strategy = |surge: IntOrPercent, unavailable: IntOrPercent| Strategy {
        type_: StrategyType::RollingUpdate,
        rolling_update: Some(RollingUpdate {
            max_surge: Some(surge),
            max_unavailable: Some(unavailable),
        }),
    };
    let percent = |p: &str| IntOrPercent::String(p.into());
    // Defaults: 25% each, surge rounded up and unavailability down.
    let limits = Strategy::default().limits(10);
    assert_eq!((limits.max_surge, limits.max_unavailable), (3, 2));
    let limits = strategy(percent("10%"), IntOrPercent::Int(3)).limits(100);
    assert_eq!((limits.max_surge, limits.max_unavailable), (10, 3));
    // Both rounding to 0 on a small count: one may be unavailable, or nothing would move.
    let limits = strategy(percent("0%"), percent("10%")).limits(5);
    assert_eq!((limits.max_surge, limits.max_unavailable), (0, 1));
    let parsed: Strategy =
        serde_yaml::from_str("rollingUpdate: {maxSurge: \"2\", maxUnavailable: 50%}")
            .expect("strategy");
    let limits = parsed.limits(7);
    assert_eq!((limits.max_surge, limits.max_unavailable), (2, 3));
    assert_eq!(parsed.min_available(7), 4);
    assert_eq!(Strategy::default().min_available(10), 8);
    let recreate = Strategy {
        type_: StrategyType::Recreate,
        rolling_update: None,
    };
    assert_eq!(recreate.min_available(10), 10, "nothing may be unavailable");
}

#[test]
fn rollback_targets_the_previous_revision_or_the_one_named() {
    let revision = |n: u64| RevisionStatus {
        revision: n,
        template: Some(Box::default()),
        ..RevisionStatus::default()
    };
    let mut status = WorkloadStatus {
        revision: 5,
        revisions: vec![revision(5), revision(3), revision(4), revision(1)],
        ..WorkloadStatus::default()
    };
    assert_eq!(status.rollback_target(None).map(|r| r.revision), Ok(4));
    assert_eq!(status.rollback_target(Some(1)).map(|r| r.revision), Ok(1));
    assert!(
        status
            .rollback_target(Some(2))
            .is_err_and(|e| e.to_string().contains("not in the history"))
    );
    assert!(
        status
            .rollback_target(Some(5))
            .is_err_and(|e| e.to_string().contains("the current one"))
    );
    status.revisions.truncate(1);
    assert!(
        status
            .rollback_target(None)
            .is_err_and(|e| e.to_string().contains("no previous revision"))
    );

    // The template comes back; the count, placement and update settings stay.
    let current = WorkloadSpec {
        replicas: 7,
        args: vec!["v2".into()],
        node_selector: [("zone".to_string(), "a".to_string())].into(),
        ..WorkloadSpec::default()
    };
    let old = WorkloadSpec {
        args: vec!["v1".into()],
        ..WorkloadSpec::default()
    };
    let back = current.with_template(&old);
    assert_eq!(back.args, ["v1"]);
    assert_eq!(back.replicas, 7);
    assert_eq!(back.node_selector, current.node_selector);
}
