//! What a guest finds in its WASI context: arguments, environment variables (literal, from
//! ConfigMaps and Secrets, or from the downward API), output to its log ring and its volumes'
//! directories.
//!
//! Worked out in stages, as a Spin factor is: [`EnvironmentSources`] once per process (the node's
//! name and the ConfigMaps and Secrets it holds), [`Environment::configure`] once per workload,
//! [`Environment::wasi`] at every start, so that a changed ConfigMap reaches the next run.

use std::sync::Arc;

use flotilla_proto::agent::v1::{EnvFrom, EnvVar, WorkloadSpec};
use wasmtime_wasi::WasiCtxBuilder;

use super::exit::Exit;
use super::logs::{LogBuffer, LogSink};
use super::volumes::{ConfigFiles, ConfigKey, Mounts};

/// What every sandbox's environment is resolved from: the node it runs on and the ConfigMaps
/// and Secrets the control plane handed this agent. Cheap to clone.
#[derive(Clone)]
pub struct EnvironmentSources {
    node_name: Arc<str>,
    config_files: Arc<ConfigFiles>,
}

// === impl EnvironmentSources ===

impl EnvironmentSources {
    /// Sources for sandboxes of the node `node_name`.
    pub fn new(node_name: &str, config_files: ConfigFiles) -> Self {
        Self {
            node_name: node_name.into(),
            config_files: Arc::new(config_files),
        }
    }

    /// The ConfigMaps and Secrets the control plane handed this agent.
    pub fn config_files(&self) -> &ConfigFiles {
        &self.config_files
    }
}

/// One workload's arguments and environment, as its spec declares them.
pub struct Environment {
    /// argv, with the workload name as argv[0].
    args: Box<[String]>,
    env: Box<[(String, String)]>,
    /// Set when the environment takes values from ConfigMaps, Secrets or the downward API,
    /// resolved at each start.
    config_env: Option<Box<ConfigEnv>>,
    /// The namespace of the ConfigMaps and Secrets it refers to.
    namespace: String,
}

// === impl Environment ===

impl Environment {
    /// The environment `spec` declares.
    pub fn configure(spec: &WorkloadSpec) -> Self {
        let mut args = Vec::with_capacity(spec.args.len() + 1);
        // argv[0] is the workload's name, not the name of one of its revisions.
        args.push(if spec.owner.is_empty() {
            spec.name.clone()
        } else {
            spec.owner.clone()
        });
        args.extend(spec.args.iter().cloned());
        let resolved_at_start = !spec.env_from.is_empty()
            || spec
                .env
                .iter()
                .any(|e| e.value_from.is_some() || !e.field_path.is_empty());
        Self {
            args: args.into(),
            env: spec
                .env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect(),
            config_env: resolved_at_start.then(|| {
                Box::new(ConfigEnv {
                    from: spec.env_from.clone(),
                    vars: spec.env.clone(),
                })
            }),
            namespace: spec.namespace.clone(),
        }
    }

    /// The namespace of the workload, whose ConfigMaps and Secrets it may read.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The WASI context of `sandbox`: arguments, environment (read from `sources` now, when it
    /// comes from ConfigMaps, Secrets or the downward API), output to `logs`, and the
    /// directories of `mounts`.
    ///
    /// # Errors
    /// [`Exit::Config`] for a ConfigMap, Secret or key that is missing (and not optional);
    /// [`Exit::Volume`] when a directory cannot be preopened.
    pub fn wasi(
        &self,
        sources: &EnvironmentSources,
        sandbox: &dyn std::fmt::Display,
        logs: &Arc<LogBuffer>,
        mounts: Option<&Mounts>,
    ) -> Result<WasiCtxBuilder, Exit> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.args(&self.args)
            .stdout(LogSink(logs.clone()))
            .stderr(LogSink(logs.clone()));
        match &self.config_env {
            None => {
                wasi.envs(&self.env);
            }
            Some(config_env) => {
                let fields = SandboxFields {
                    name: sandbox,
                    namespace: &self.namespace,
                    node: &sources.node_name,
                };
                wasi.envs(&config_env.resolve(&fields, &sources.config_files)?);
            }
        }
        if let Some(mounts) = mounts {
            mounts.preopen(&mut wasi)?;
        }
        Ok(wasi)
    }
}

/// An environment with values from ConfigMaps and Secrets, in the order Kubernetes applies it:
/// `envFrom` first, then `env` (later names win).
struct ConfigEnv {
    from: Vec<EnvFrom>,
    vars: Vec<EnvVar>,
}

// === impl ConfigEnv ===

impl ConfigEnv {
    /// The variables now: `envFrom` keys (prefixed), then `env` (literal, from a key, or a
    /// field of `sandbox`).
    fn resolve(
        &self,
        sandbox: &SandboxFields<'_>,
        files: &ConfigFiles,
    ) -> Result<Vec<(String, String)>, Exit> {
        let namespace = sandbox.namespace;
        let mut env: Vec<(String, String)> = Vec::new();
        let set = |env: &mut Vec<(String, String)>, name: String, value: String| match env
            .iter_mut()
            .find(|(n, _)| *n == name)
        {
            Some(existing) => existing.1 = value,
            None => env.push((name, value)),
        };
        for source in &self.from {
            let key = ConfigKey {
                kind: source.kind(),
                namespace: namespace.to_string(),
                name: source.name.clone(),
            };
            match files.get(&key) {
                Some(data) => {
                    for (name, value) in data.iter() {
                        // Values that are not text cannot be variables; as in Kubernetes,
                        // they are skipped.
                        if let Ok(value) = std::str::from_utf8(value) {
                            set(
                                &mut env,
                                format!("{}{name}", source.prefix),
                                value.to_string(),
                            );
                        }
                    }
                }
                None if source.optional => {}
                None => {
                    return Err(Exit::Config(format!("{key} not found (envFrom)")));
                }
            }
        }
        for var in &self.vars {
            match &var.value_from {
                None if !var.field_path.is_empty() => {
                    set(&mut env, var.name.clone(), sandbox.field(&var.field_path)?);
                }
                None => set(&mut env, var.name.clone(), var.value.clone()),
                Some(reference) => {
                    if let Some(value) = files.value(namespace, reference)? {
                        set(&mut env, var.name.clone(), value);
                    }
                }
            }
        }
        Ok(env)
    }
}

/// What the downward API shows a sandbox of itself.
struct SandboxFields<'a> {
    name: &'a dyn std::fmt::Display,
    namespace: &'a str,
    node: &'a str,
}

// === impl SandboxFields ===

impl SandboxFields<'_> {
    /// The value of `path`, one of `flotilla_model::config::FIELD_PATHS`.
    fn field(&self, path: &str) -> Result<String, Exit> {
        match path {
            "metadata.name" => Ok(self.name.to_string()),
            "metadata.namespace" => Ok(self.namespace.to_string()),
            "spec.nodeName" => Ok(self.node.to_string()),
            other => Err(Exit::Config(format!(
                "fieldPath {other:?} is not supported (one of {})",
                flotilla_model::config::FIELD_PATHS.join(", ")
            ))),
        }
    }
}
