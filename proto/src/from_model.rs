//! The agent's view of a `WasmWorkload` spec: one conversion from the model to the wire,
//! shared by the control plane (desired state for agents) and the agent's static manifests.

use flotilla_model::{RestartPolicy, WorkloadSpec as ModelSpec};

use crate::agent::v1::{
    EnvVar, HttpRoute, ModuleSource, Resources, RestartPolicy as RestartPolicyMessage, WorkloadSpec,
};

/// The agent's spec for `spec`: named `name` on the agent, at `generation` (a new generation
/// replaces sandboxes; the same one scales in place), `replicas` sandboxes running `module`.
pub fn agent_workload_spec(
    spec: &ModelSpec,
    name: String,
    generation: u64,
    replicas: u32,
    module: ModuleSource,
) -> WorkloadSpec {
    let limits = spec.sandbox_limits();
    WorkloadSpec {
        name,
        generation,
        module: Some(module),
        args: spec.args.clone(),
        env: spec
            .env
            .iter()
            .map(|e| EnvVar {
                name: e.name.clone(),
                value: e.value.clone(),
            })
            .collect(),
        replicas,
        resources: Some(Resources {
            memory_limit_bytes: limits.memory_limit_bytes,
            memory_request_bytes: limits.memory_request_bytes,
            cpu_limit_ms: limits.cpu_time_ms,
            deadline_ms: limits.deadline_ms,
            log_limit_bytes: limits.log_bytes,
            max_table_elements: 0,
        }),
        restart_policy: match spec.restart_policy {
            RestartPolicy::Always => RestartPolicyMessage::Always,
            RestartPolicy::OnFailure => RestartPolicyMessage::OnFailure,
            RestartPolicy::Never => RestartPolicyMessage::Never,
        } as i32,
        http: spec.http.as_ref().map(|http| HttpRoute {
            host: http.host.clone().unwrap_or_default(),
            path_prefix: http.path_prefix().to_string(),
            max_concurrency: http.max_concurrency.unwrap_or(0),
            timeout_ms: http.timeout_ms(),
            readiness_path: http.readiness_path.clone().unwrap_or_default(),
        }),
        min_ready_seconds: spec
            .min_ready_seconds
            .and_then(|s| u32::try_from(s).ok())
            .unwrap_or(0),
        owner: String::new(),
    }
}
