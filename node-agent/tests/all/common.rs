//! Helpers shared by the node agent's integration tests.
#![allow(dead_code, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_node_agent::metrics::Metrics;
use flotilla_node_agent::runtime::{RuntimeConfig, WasmtimeRuntime, capacity};
use flotilla_node_agent::supervisor::{Supervisor, SupervisorConfig};
use flotilla_proto::agent::v1::{
    EnvVar, ModuleSource, Resources, RestartPolicy, SandboxPhase, SandboxStatus, WorkloadSpec,
    module_source,
};

/// Binary wasm for a fixture under `tests/fixtures/<name>.wat`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.wat"));
    wat::parse_file(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// A preview 2 command component made from a preview 1 fixture with the WASI adapter.
pub fn component_fixture(name: &str) -> Vec<u8> {
    wit_component::ComponentEncoder::default()
        .module(&fixture(name))
        .expect("module accepted by wit-component")
        .adapter(
            "wasi_snapshot_preview1",
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
        )
        .expect("adapter accepted")
        .validate(true)
        .encode()
        .expect("component encodes")
}

/// A workload running `module` once (restart policy Never).
pub fn spec(name: &str, module: Vec<u8>) -> WorkloadSpec {
    WorkloadSpec {
        name: name.to_string(),
        generation: 1,
        module: Some(ModuleSource {
            source: Some(module_source::Source::Inline(module)),
            sha256: String::new(),
        }),
        args: vec![],
        env: vec![],
        replicas: 1,
        resources: Some(Resources::default()),
        restart_policy: RestartPolicy::Never as i32,
        http: None,
        min_ready_seconds: 0,
        owner: String::new(),
        namespace: "default".into(),
        env_from: vec![],
        volumes: vec![],
        egress: vec![],
        stdin: false,
        wasm_features: vec![],
    }
}

pub fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: value.into(),
        ..EnvVar::default()
    }
}

/// A runtime sized for tests: small enough for the default vm.max_map_count, with a volume
/// directory of its own (the tests share one process).
pub fn runtime_config() -> RuntimeConfig {
    static RUNTIMES: AtomicU64 = AtomicU64::new(0);
    let mut config = RuntimeConfig {
        max_sandboxes: 4_000,
        max_memory_per_sandbox: 64 << 20,
        ..RuntimeConfig::default()
    };
    config.volumes.dir = std::env::temp_dir().join(format!(
        "flotilla-test-volumes-{}-{}",
        std::process::id(),
        RUNTIMES.fetch_add(1, Ordering::Relaxed)
    ));
    config.default_limits.memory_bytes = 32 << 20;
    config
}

pub fn runtime(config: RuntimeConfig) -> WasmtimeRuntime {
    let capacity = capacity::derive(&config, capacity::read_max_map_count(), Some(1 << 40));
    WasmtimeRuntime::with_capacity(config, capacity).expect("runtime starts")
}

pub fn supervisor(config: RuntimeConfig) -> Supervisor {
    Supervisor::new(runtime(config), SupervisorConfig::default(), Metrics::new())
}

/// Waits (bounded) until `pred` holds for the statuses of `workload`.
pub async fn wait_for(
    supervisor: &Supervisor,
    workload: &str,
    what: &str,
    pred: impl Fn(&[SandboxStatus]) -> bool,
) -> Vec<SandboxStatus> {
    let mut events = supervisor.watch();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let statuses = supervisor.list(Some(workload));
        if pred(&statuses) {
            return statuses;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(_) => {}
            Err(_) => panic!("timed out waiting for {what}; statuses: {statuses:#?}"),
        }
    }
}

pub fn all_in(phase: SandboxPhase) -> impl Fn(&[SandboxStatus]) -> bool {
    move |s: &[SandboxStatus]| !s.is_empty() && s.iter().all(|s| s.phase == phase as i32)
}

/// The one status in `statuses`.
pub fn only(statuses: &[SandboxStatus]) -> &SandboxStatus {
    assert_eq!(statuses.len(), 1, "{statuses:#?}");
    &statuses[0]
}

/// The reason, message and exit code of a sandbox's last run.
pub fn termination(status: &SandboxStatus) -> (&str, &str, Option<i32>) {
    let t = status.last_termination.as_ref().expect("terminated");
    (t.reason.as_str(), t.message.as_str(), t.exit_code)
}

pub fn all_ended() -> impl Fn(&[SandboxStatus]) -> bool {
    |s: &[SandboxStatus]| {
        !s.is_empty()
            && s.iter().all(|s| {
                s.phase == SandboxPhase::Succeeded as i32 || s.phase == SandboxPhase::Failed as i32
            })
    }
}

pub fn logs(supervisor: &Supervisor, workload: &str, replica: u32) -> String {
    let buffer = supervisor
        .output(workload, replica)
        .expect("sandbox exists")
        .logs;
    String::from_utf8_lossy(&buffer.read_from(0).data()).into_owned()
}

pub type Shared<T> = Arc<T>;

/// A module of `functions` functions, each distinct by `seed`, that takes a while to compile.
pub fn costly_module(functions: usize, seed: usize) -> Vec<u8> {
    let mut wat = String::from("(module (memory (export \"memory\") 1)");
    for i in 0..functions {
        wat.push_str(&format!(
            "(func (param i32) (result i32) local.get 0 i32.const {} i32.mul i32.const {seed} \
             i32.add)",
            i + 1
        ));
    }
    wat.push_str("(func (export \"_start\")))");
    wat::parse_str(&wat).expect("valid module")
}

/// Runs `spec` once: its termination's reason, message and exit code.
pub async fn run_to_end(sup: &Supervisor, spec: WorkloadSpec) -> (String, String, Option<i32>) {
    let name = spec.name.clone();
    sup.apply(spec).await.expect("applied");
    let statuses = wait_for(sup, &name, "the run to end", all_ended()).await;
    let (reason, message, code) = termination(only(&statuses));
    (reason.to_string(), message.to_string(), code)
}
