//! The agent's view of a `WasmWorkload` spec: one conversion from the model to the wire,
//! shared by the control plane (desired state for agents) and the agent's static manifests.

use flotilla_model::{
    EnvFromSource, EnvVar as ModelEnvVar, KeyToPath as ModelKeyToPath, RestartPolicy, VolumeMount,
    WorkloadSpec as ModelSpec,
};

use crate::agent::v1::{
    ConfigKind, ConfigRef, EgressRule, EmptyDir, EnvFrom, EnvVar, HttpRoute, KeyRef, KeyToPath,
    ModuleSource, Resources, RestartPolicy as RestartPolicyMessage, Volume, WorkloadSpec, volume,
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
    WorkloadSpec {
        name,
        generation,
        module: Some(module),
        args: spec.args.clone(),
        env: spec.env.iter().map(env_var).collect(),
        env_from: spec.env_from.iter().filter_map(env_from).collect(),
        volumes: spec
            .volume_mounts
            .iter()
            .filter_map(|mount| volume(spec, mount))
            .collect(),
        namespace: String::new(),
        replicas,
        resources: Some(Resources::from(&spec.sandbox_limits())),
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
        egress: spec
            .network
            .iter()
            .flat_map(|network| &network.egress)
            .map(|rule| EgressRule {
                host: rule.host.clone().unwrap_or_default(),
                cidr: rule.cidr.clone().unwrap_or_default(),
                ports: rule.ports.iter().map(|&p| u32::from(p)).collect(),
            })
            .collect(),
        stdin: spec.stdin,
        wasm_features: spec
            .wasm_features()
            .iter()
            .map(|feature| feature.name().to_string())
            .collect(),
    }
}

/// The agent's form of an environment variable: a value, a ConfigMap or Secret key, or a
/// field of the sandbox.
pub fn env_var(var: &ModelEnvVar) -> EnvVar {
    let source = var.value_from.as_ref();
    let value_from = source.and_then(|s| {
        let (kind, selector) = match (&s.config_map_key_ref, &s.secret_key_ref) {
            (Some(selector), _) => (ConfigKind::ConfigMap, selector),
            (None, Some(selector)) => (ConfigKind::Secret, selector),
            (None, None) => return None,
        };
        Some(KeyRef {
            kind: kind as i32,
            name: selector.name.clone(),
            key: selector.key.clone(),
            optional: selector.optional.unwrap_or(false),
        })
    });
    EnvVar {
        name: var.name.clone(),
        value: var.value.clone(),
        value_from,
        field_path: source
            .and_then(|s| s.field_ref.as_ref())
            .map(|f| f.field_path.clone())
            .unwrap_or_default(),
    }
}

/// The agent's form of an `envFrom` source; `None` for one naming no object (validation
/// rejects those).
pub fn env_from(source: &EnvFromSource) -> Option<EnvFrom> {
    let (kind, object) = match (&source.config_map_ref, &source.secret_ref) {
        (Some(object), _) => (ConfigKind::ConfigMap, object),
        (None, Some(object)) => (ConfigKind::Secret, object),
        (None, None) => return None,
    };
    Some(EnvFrom {
        kind: kind as i32,
        name: object.name.clone(),
        prefix: source.prefix.clone().unwrap_or_default(),
        optional: object.optional.unwrap_or(false),
    })
}

/// A mount and its volume as one agent volume; `None` for a mount of no declared volume
/// (validation rejects those).
fn volume(spec: &ModelSpec, mount: &VolumeMount) -> Option<Volume> {
    let declared = spec.volumes.iter().find(|v| v.name == mount.name)?;
    let config =
        |kind: ConfigKind, name: &str, optional: Option<bool>, items: &[ModelKeyToPath]| {
            volume::Source::Config(ConfigRef {
                kind: kind as i32,
                name: name.to_string(),
                optional: optional.unwrap_or(false),
                items: items
                    .iter()
                    .map(|item| KeyToPath {
                        key: item.key.clone(),
                        path: item.path.clone(),
                    })
                    .collect(),
            })
        };
    let source = if let Some(empty) = &declared.empty_dir {
        volume::Source::EmptyDir(EmptyDir {
            size_limit_bytes: empty
                .size_limit
                .as_deref()
                .and_then(|l| flotilla_model::parse_bytes(l).ok())
                .unwrap_or(0),
            memory: empty.medium == Some(flotilla_model::StorageMedium::Memory),
        })
    } else if let Some(config_map) = &declared.config_map {
        config(
            ConfigKind::ConfigMap,
            &config_map.name,
            config_map.optional,
            &config_map.items,
        )
    } else if let Some(secret) = &declared.secret {
        config(
            ConfigKind::Secret,
            &secret.secret_name,
            secret.optional,
            &secret.items,
        )
    } else {
        volume::Source::HostPath(declared.host_path.as_ref()?.path.clone())
    };
    Some(Volume {
        name: mount.name.clone(),
        mount_path: mount.mount_path.clone(),
        read_only: !declared.writable(mount),
        source: Some(source),
        sub_path: mount.sub_path.clone().unwrap_or_default(),
    })
}
