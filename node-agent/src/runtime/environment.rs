//! What a guest finds in its WASI context: arguments, environment variables (literal, from
//! ConfigMaps and Secrets, or from the downward API), output to its log ring and its volumes'
//! directories.
//!
//! Worked out in stages, as a Spin factor is: [`EnvironmentSources`] once per process (the node's
//! name and the ConfigMaps and Secrets it holds), [`Environment::configure`] once per workload,
//! [`Environment::wasi`] at every start, so that a changed ConfigMap reaches the next run.

use std::net::SocketAddr;
use std::sync::Arc;

use flotilla_proto::agent::v1::{EnvFrom, EnvVar, WorkloadSpec};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::sockets::SocketAddrUse;

use super::egress::{DeniedRanges, EgressPolicy, EgressRules};
use super::exit::Exit;
use super::logs::{LogBuffer, LogSink};
use super::stdin::StdinPipe;
use super::volumes::{ConfigFiles, ConfigKey, Mounts};
use flotilla_proto::agent::v1::LogStream;

/// What every sandbox's environment is resolved from: the node it runs on and the ConfigMaps
/// and Secrets the control plane handed this agent. Cheap to clone.
#[derive(Clone)]
pub struct EnvironmentSources {
    node_name: Arc<str>,
    config_files: Arc<ConfigFiles>,
    egress_denied: DeniedRanges,
}

// === impl EnvironmentSources ===

impl EnvironmentSources {
    /// Sources for sandboxes of the node `node_name`, which may never connect to
    /// `egress_denied`.
    pub fn new(node_name: &str, config_files: ConfigFiles, egress_denied: DeniedRanges) -> Self {
        Self {
            node_name: node_name.into(),
            config_files: Arc::new(config_files),
            egress_denied,
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
    /// Where sandboxes may connect to.
    egress: EgressRules,
}

// === impl Environment ===

impl Environment {
    /// The environment `spec` declares.
    ///
    /// # Errors
    /// A message for egress rules the control plane would have refused.
    pub fn configure(spec: &WorkloadSpec) -> Result<Self, String> {
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
        Ok(Self {
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
            egress: EgressRules::parse(&spec.egress)?,
        })
    }

    /// Where this workload's sandboxes may connect to on this agent; `None` for nowhere.
    pub fn egress(&self, sources: &EnvironmentSources) -> Option<EgressPolicy> {
        (!self.egress.is_empty()).then(|| self.egress.under(&sources.egress_denied))
    }

    /// The namespace of the workload, whose ConfigMaps and Secrets it may read.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The WASI context of `sandbox`: arguments, environment (read from `sources` now, when it
    /// comes from ConfigMaps, Secrets or the downward API), output to `logs`, input from
    /// `stdin` (empty without one), and the directories of `mounts`.
    ///
    /// # Errors
    /// [`Exit::Config`] for a ConfigMap, Secret or key that is missing (and not optional);
    /// [`Exit::Volume`] when a directory cannot be preopened.
    pub fn wasi(
        &self,
        sources: &EnvironmentSources,
        sandbox: &dyn std::fmt::Display,
        logs: &Arc<LogBuffer>,
        stdin: Option<&Arc<StdinPipe>>,
        mounts: Option<&Mounts>,
    ) -> Result<WasiCtxBuilder, Exit> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.args(&self.args)
            .stdout(LogSink(logs.clone(), LogStream::Stdout))
            .stderr(LogSink(logs.clone(), LogStream::Stderr));
        if let Some(stdin) = stdin {
            wasi.stdin(stdin.stream());
        }
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
        // Sockets stay closed (wasmtime's default check refuses every address) unless the
        // workload lists destinations; then each connect and datagram is checked.
        if let Some(policy) = self.egress(sources) {
            let logs = logs.clone();
            wasi.allow_ip_name_lookup(true)
                .socket_addr_check(move |addr, used| {
                    let allowed = socket_allowed(&policy, addr, used, &logs);
                    Box::pin(std::future::ready(allowed))
                });
        }
        Ok(wasi)
    }
}

/// Whether a guest's socket may use `addr` for `used`: connecting and sending to addresses the
/// policy allows (and receiving from them), and binding the wildcard address on an ephemeral
/// port, which connecting and sending do. Listening, which would serve on the node, is refused.
/// A refused connect or send is a line in the sandbox's `logs`.
fn socket_allowed(
    policy: &EgressPolicy,
    addr: SocketAddr,
    used: SocketAddrUse,
    logs: &LogBuffer,
) -> bool {
    match used {
        SocketAddrUse::TcpConnect | SocketAddrUse::UdpSend => match policy.check_addr(addr) {
            Ok(()) => true,
            Err(refusal) => {
                logs.write(
                    LogStream::Stderr,
                    format!("flotilla: egress refused: {refusal}\n").as_bytes(),
                );
                false
            }
        },
        // Datagrams from elsewhere are dropped without a word: they are not the guest's doing.
        SocketAddrUse::UdpReceive => policy.check_addr(addr).is_ok(),
        SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => {
            addr.ip().is_unspecified() && addr.port() == 0
        }
        SocketAddrUse::TcpListen | SocketAddrUse::TcpAccept => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_connect_only_where_the_policy_allows_and_never_listen() {
        let rules = EgressRules::parse(&[flotilla_proto::agent::v1::EgressRule {
            cidr: "10.0.0.0/8".into(),
            ports: vec![5432],
            ..Default::default()
        }])
        .expect("valid");
        let policy = rules.under(&DeniedRanges::defaults());
        let logs = LogBuffer::new(4096);
        let socket_allowed =
            |policy: &EgressPolicy, addr, used| super::socket_allowed(policy, addr, used, &logs);
        let addr = |s: &str| s.parse::<SocketAddr>().expect("address");
        let db = addr("10.1.2.3:5432");
        assert!(socket_allowed(&policy, db, SocketAddrUse::TcpConnect));
        assert!(socket_allowed(&policy, db, SocketAddrUse::UdpSend));
        assert!(socket_allowed(&policy, db, SocketAddrUse::UdpReceive));
        for refused in ["10.1.2.3:22", "169.254.169.254:80", "127.0.0.1:5432"] {
            assert!(
                !socket_allowed(&policy, addr(refused), SocketAddrUse::TcpConnect),
                "{refused}"
            );
            assert!(
                !socket_allowed(&policy, addr(refused), SocketAddrUse::UdpSend),
                "{refused}"
            );
        }
        // The implicit bind of a connect, yes; a port of its own or a listener, no.
        assert!(socket_allowed(
            &policy,
            addr("0.0.0.0:0"),
            SocketAddrUse::TcpBind
        ));
        assert!(!socket_allowed(
            &policy,
            addr("0.0.0.0:8080"),
            SocketAddrUse::TcpBind
        ));
        assert!(!socket_allowed(
            &policy,
            addr("0.0.0.0:0"),
            SocketAddrUse::TcpListen
        ));
        assert!(!socket_allowed(&policy, db, SocketAddrUse::TcpAccept));
        // Each refused connect or send is a line in the sandbox's log.
        let read = logs.read_from(0);
        let data = read.data();
        let text = String::from_utf8_lossy(&data);
        assert_eq!(
            text.matches("flotilla: egress refused:").count(),
            6,
            "{text}"
        );
        assert!(
            text.contains("169.254.169.254:80 is in the agent's denied range"),
            "{text}"
        );
    }
}
