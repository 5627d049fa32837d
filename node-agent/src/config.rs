//! Command-line and environment configuration of the node agent; validated before anything binds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::runtime::RuntimeConfig;
use crate::runtime::volumes::HostPathRule;
use crate::supervisor::SupervisorConfig;
use crate::supervisor::backoff::BackoffConfig;
use flotilla_model::parse_bytes;
use flotilla_model::wasm::FeatureSet;

/// `flotilla-node-agent`: hosts WASI sandboxes with wasmtime.
#[derive(Debug, Clone, Parser)]
#[command(version, about, args_override_self = true)]
pub struct Args {
    /// Address of the admin gRPC API. Beyond loopback it needs --admin-token-file: the admin
    /// API runs, stops and reads the logs of workloads on this node.
    #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// A file holding the token admin API clients must present (`authorization: Bearer`);
    /// the CLI sends it from --agent-token-file.
    #[arg(long, env = "FLOTILLA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "FLOTILLA_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: SocketAddr,
    /// Address of the HTTP ingress that serves HTTP workloads.
    #[arg(long, env = "FLOTILLA_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Serve no HTTP ingress (HTTP workloads then fail on this node).
    #[arg(long, env = "FLOTILLA_NO_HTTP_INGRESS")]
    pub no_http_ingress: bool,
    /// The ingress URL the control plane shows, e.g. `http://10.0.0.7:8080` (default: the
    /// listen address, or the node name when listening on all addresses).
    #[arg(long, env = "FLOTILLA_HTTP_ADVERTISE_URL")]
    pub http_advertise_url: Option<String>,
    /// Directory of static WasmWorkload manifests (*.yaml) to run at startup.
    #[arg(long, env = "FLOTILLA_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Most sandboxes this agent holds; lowered to what vm.max_map_count allows.
    #[arg(long, env = "FLOTILLA_MAX_SANDBOXES", default_value_t = 100_000)]
    pub max_sandboxes: u32,
    /// Memory the agent admits, summed over sandbox requests (default: the host's memory).
    #[arg(long, env = "FLOTILLA_MEMORY")]
    pub memory: Option<String>,
    /// Largest linear memory one sandbox may have (the pool's slot size).
    #[arg(long, env = "FLOTILLA_MAX_MEMORY_PER_SANDBOX", default_value = "256Mi")]
    pub max_memory_per_sandbox: String,
    /// Memory limit of sandboxes whose workload sets none.
    #[arg(long, env = "FLOTILLA_DEFAULT_MEMORY_LIMIT", default_value = "64Mi")]
    pub default_memory_limit: String,
    /// Virtual address space reserved per linear memory (default: the slot size).
    #[arg(long, env = "FLOTILLA_MEMORY_RESERVATION")]
    pub memory_reservation: Option<String>,
    /// Guard region after each linear memory.
    #[arg(long, env = "FLOTILLA_MEMORY_GUARD", default_value = "0")]
    pub memory_guard: String,
    /// Bytes of a freed sandbox memory reset in place instead of released to the kernel.
    #[arg(long, env = "FLOTILLA_MEMORY_KEEP_RESIDENT", default_value = "1Mi")]
    pub memory_keep_resident: String,
    /// Worker threads that run sandboxes; as many sandboxes hold a CPU slot at once, the
    /// others wait their turn by weighted share (default: the number of CPUs).
    #[arg(long, env = "FLOTILLA_GUEST_THREADS")]
    pub guest_threads: Option<usize>,
    /// Epoch tick: the CPU time slice after which a guest yields.
    #[arg(long, env = "FLOTILLA_EPOCH_TICK", default_value = "2ms")]
    pub epoch_tick: humantime::Duration,
    /// Largest module accepted.
    #[arg(long, env = "FLOTILLA_MAX_MODULE_SIZE", default_value = "32Mi")]
    pub max_module_size: String,
    /// Longest a module may take to compile before it is rejected as too costly.
    #[arg(long, env = "FLOTILLA_COMPILE_TIMEOUT", default_value = "60s")]
    pub compile_timeout: humantime::Duration,
    /// Modules compiled at once, on low-priority threads, round-robin between workloads
    /// (default: the number of CPUs, at least 2 and at most 4).
    #[arg(long, env = "FLOTILLA_COMPILE_CONCURRENCY")]
    pub compile_concurrency: Option<usize>,
    /// Threads of each compile (default: the number of CPUs).
    #[arg(long, env = "FLOTILLA_COMPILE_THREADS")]
    pub compile_threads: Option<usize>,
    /// WebAssembly proposals beyond the default set that workloads may enable here
    /// (`spec.wasm.features`): comma-separated, or `none`. The default leaves out the
    /// experimental `component-model-async` (WASI 0.3), whose support in wasmtime 48 is
    /// incomplete, and `threads`, whose shared memories get no security fixes in wasmtime's
    /// patch releases.
    #[arg(
        long,
        env = "FLOTILLA_WASM_FEATURES",
        default_value = "gc,exceptions,wide-arithmetic,custom-page-sizes"
    )]
    pub wasm_features: String,
    /// The most threads one sandbox of a module with threads runs at once, its main thread
    /// included; `thread-spawn` fails past it.
    #[arg(long, env = "FLOTILLA_MAX_THREADS_PER_SANDBOX", default_value_t = 16)]
    pub max_threads_per_sandbox: u32,
    /// Most functions a module may define (over every core module of a component); a module
    /// with more is refused before compiling, as ModuleTooCostly.
    #[arg(long, env = "FLOTILLA_MAX_MODULE_FUNCTIONS", default_value_t = crate::runtime::CostLimits::default().max_functions)]
    pub max_module_functions: u64,
    /// Most bytes of function bodies a module may have; more is refused before compiling, as
    /// ModuleTooCostly.
    #[arg(long, env = "FLOTILLA_MAX_MODULE_CODE_SIZE", default_value = "32Mi")]
    pub max_module_code_size: String,
    /// Where compiled modules are cached across restarts (default: $XDG_CACHE_HOME/flotilla or
    /// ~/.cache/flotilla).
    #[arg(long, env = "FLOTILLA_CACHE_DIR", overrides_with = "no_cache")]
    pub cache_dir: Option<PathBuf>,
    /// Where the agent keeps what must outlive it: its node credential, which the control
    /// plane binds the node name to (default: $XDG_STATE_HOME/flotilla or
    /// ~/.local/state/flotilla).
    #[arg(long, env = "FLOTILLA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Only create --state-dir for the user `UID:GID` (mode 0700) and exit: for an init
    /// container that runs as root before the agent runs as that user on a node directory.
    #[arg(long, value_name = "UID:GID", requires = "state_dir", value_parser = parse_owner)]
    pub prepare_state_dir_for: Option<(u32, u32)>,
    /// Where emptyDir volumes and ConfigMap and Secret files live (default: a fresh directory
    /// under the system's temporary directory, removed when the agent stops).
    #[arg(long, env = "FLOTILLA_VOLUMES_DIR")]
    pub volumes_dir: Option<PathBuf>,
    /// Where Secrets' files live (default: a tmpfs the agent mounts under --volumes-dir,
    /// which needs CAP_SYS_ADMIN). A directory that is a tmpfs already, such as a
    /// `medium: Memory` emptyDir, is used as it is; otherwise the agent mounts one there.
    #[arg(long, env = "FLOTILLA_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// A node directory `hostPath` volumes may mount, with everything under it: `DIR`
    /// (read-only) or `DIR:rw`. Repeat or separate with commas; none by default.
    #[arg(
        long = "allow-host-path",
        env = "FLOTILLA_ALLOW_HOST_PATHS",
        value_delimiter = ','
    )]
    pub allow_host_paths: Vec<HostPathRule>,
    /// Address ranges no sandbox may connect to, whatever its `spec.network.egress` lists.
    /// Repeat or separate with commas. Given, it replaces the default: loopback, link-local
    /// (cloud metadata), multicast and broadcast. Add the node's own addresses and whatever
    /// tenants must never reach (the Kubernetes API's service address, say).
    /// A bare address stands for itself alone (`/32` or `/128`).
    #[arg(
        long = "egress-deny",
        env = "FLOTILLA_EGRESS_DENY",
        value_delimiter = ',',
        value_parser = flotilla_model::network::parse_denied_range
    )]
    pub egress_deny: Vec<ipnet::IpNet>,
    /// Disable the on-disk compiled module cache.
    #[arg(long, env = "FLOTILLA_NO_CACHE", overrides_with = "cache_dir")]
    pub no_cache: bool,
    /// Only compile these modules ahead of time into --cache-dir, with the engine settings the
    /// other flags give, then exit: an agent for --precompile-for with the same settings loads
    /// them instead of compiling. Repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub precompile: Vec<PathBuf>,
    /// The target triple --precompile compiles for, e.g. `aarch64-unknown-linux-gnu` (default:
    /// this agent's).
    #[arg(long, requires = "precompile")]
    pub precompile_for: Option<String>,
    /// First crash-loop restart delay; doubles up to --backoff-max.
    #[arg(long, env = "FLOTILLA_BACKOFF_INITIAL", default_value = "10s")]
    pub backoff_initial: humantime::Duration,
    /// Longest crash-loop restart delay.
    #[arg(long, env = "FLOTILLA_BACKOFF_MAX", default_value = "5m")]
    pub backoff_max: humantime::Duration,
    /// A run this long resets the crash-loop delay.
    #[arg(long, env = "FLOTILLA_BACKOFF_RESET", default_value = "10m")]
    pub backoff_reset: humantime::Duration,
    /// The control plane to join, e.g. `http://127.0.0.1:7080`; without it the agent runs only
    /// its static manifests and admin API.
    #[arg(long, env = "FLOTILLA_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// This node's name (default: the host name).
    #[arg(long, env = "FLOTILLA_NODE_NAME")]
    pub node_name: Option<String>,
    /// Node labels, `key=value,...`.
    #[arg(long, env = "FLOTILLA_NODE_LABELS", value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// The control plane's join token (better: --join-token-file).
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// A file holding the join token, e.g. a mounted Kubernetes Secret.
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// The CA that signs the control plane's certificate, for an `https://` control plane
    /// (default: the webpki roots).
    #[arg(long, env = "FLOTILLA_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// This agent's client certificate (PEM), for a control plane that requires mutual TLS.
    #[arg(long, env = "FLOTILLA_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The key of --tls-cert-file (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Time sandboxes get to end on shutdown before they are aborted.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE", default_value = "10s")]
    pub shutdown_grace: humantime::Duration,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Admin gRPC address.
    pub listen: SocketAddr,
    /// The token admin API clients must present, if any.
    pub admin_token: Option<String>,
    /// Metrics address.
    pub metrics_listen: SocketAddr,
    /// The HTTP ingress, unless disabled.
    pub ingress: Option<crate::ingress::IngressConfig>,
    /// Static manifests directory.
    pub manifests: Option<PathBuf>,
    /// Admitted memory.
    pub memory: Option<u64>,
    /// Runtime settings.
    pub runtime: RuntimeConfig,
    /// Supervisor settings.
    pub supervisor: SupervisorConfig,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// The control plane to join, if any.
    pub control: Option<crate::control::ControlConfig>,
}

/// An invalid setting; the binary exits with status 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: --{flag}: {message}")]
pub struct ConfigError {
    /// The flag.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let tls = client_tls(&args)?;
        let bytes = |flag: &'static str, value: &str| {
            parse_bytes(value).map_err(|error| ConfigError {
                flag,
                message: error.to_string(),
            })
        };
        let mut runtime = RuntimeConfig {
            max_sandboxes: args.max_sandboxes,
            max_memory_per_sandbox: bytes("max-memory-per-sandbox", &args.max_memory_per_sandbox)?,
            memory_reservation: args
                .memory_reservation
                .as_deref()
                .map(|v| bytes("memory-reservation", v))
                .transpose()?,
            memory_guard: bytes("memory-guard", &args.memory_guard)?,
            memory_keep_resident: bytes("memory-keep-resident", &args.memory_keep_resident)?,
            epoch_tick: *args.epoch_tick,
            max_module_bytes: bytes("max-module-size", &args.max_module_size)?,
            compile_timeout: *args.compile_timeout,
            compile_cost_limits: crate::runtime::CostLimits {
                max_functions: args.max_module_functions,
                max_code_bytes: bytes("max-module-code-size", &args.max_module_code_size)?,
            },
            cache_dir: if args.no_cache {
                None
            } else {
                args.cache_dir.or_else(default_cache_dir)
            },
            ..RuntimeConfig::default()
        };
        if let Some(concurrency) = args.compile_concurrency {
            runtime.compile_concurrency = concurrency.max(1);
        }
        if let Some(threads) = args.compile_threads {
            runtime.compile_threads = threads.max(1);
        }
        runtime.wasm_features = parse_wasm_features(&args.wasm_features)?;
        runtime.max_threads_per_sandbox = args.max_threads_per_sandbox.max(1);
        if let Some(threads) = args.guest_threads {
            runtime.guest_threads = threads.max(1);
        }
        if let Some(dir) = args.volumes_dir {
            runtime.volumes.dir = dir;
        }
        runtime.volumes.host_paths = args.allow_host_paths;
        if !args.egress_deny.is_empty() {
            runtime.egress_denied = crate::runtime::DeniedRanges::new(args.egress_deny);
        }
        runtime.volumes.secrets_dir = args.secrets_dir;
        if let Some(node) = &args.node_name {
            runtime.node_name.clone_from(node);
        }
        runtime.default_limits.memory_bytes =
            bytes("default-memory-limit", &args.default_memory_limit)?;
        if args.max_sandboxes == 0 {
            return Err(ConfigError {
                flag: "max-sandboxes",
                message: "must be at least 1".into(),
            });
        }
        if runtime.default_limits.memory_bytes > runtime.max_memory_per_sandbox {
            return Err(ConfigError {
                flag: "default-memory-limit",
                message: "must not exceed --max-memory-per-sandbox".into(),
            });
        }
        if runtime.epoch_tick < std::time::Duration::from_millis(1) {
            return Err(ConfigError {
                flag: "epoch-tick",
                message: "must be at least 1ms (CPU limits count whole milliseconds)".into(),
            });
        }
        // A hostPath over the agent's own state would hand tenants its compiled artifacts
        // (which it runs), other sandboxes' scratch files and the Secrets it holds.
        let state_dir = args
            .state_dir
            .clone()
            .or_else(crate::control::identity::default_state_dir);
        let own: Vec<(&str, PathBuf)> = [
            ("cache", runtime.cache_dir.clone()),
            ("state", state_dir.clone()),
            ("volumes", Some(runtime.volumes.dir.clone())),
            ("secrets", runtime.volumes.secrets_dir.clone()),
        ]
        .into_iter()
        .filter_map(|(what, dir)| dir.map(|d| (what, resolved(&d))))
        .collect();
        for rule in &runtime.volumes.host_paths {
            let prefix = resolved(&rule.prefix);
            if let Some((what, dir)) = own
                .iter()
                .find(|(_, dir)| dir.starts_with(&prefix) || prefix.starts_with(dir))
            {
                return Err(ConfigError {
                    flag: "allow-host-path",
                    message: format!(
                        "{} overlaps the agent's {what} directory {}",
                        rule.prefix.display(),
                        dir.display()
                    ),
                });
            }
        }
        if let Some(url) = &args.http_advertise_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError {
                flag: "http-advertise-url",
                message: format!("{url:?}: must be an http:// or https:// URL"),
            });
        }
        let admin_token = flotilla_proto::auth::load_token(None, args.admin_token_file.as_deref())
            .map_err(|error| ConfigError {
                flag: "admin-token-file",
                message: flotilla_telemetry::error_chain(&error),
            })?;
        if !args.listen.ip().is_loopback() && admin_token.is_none() {
            return Err(ConfigError {
                flag: "listen",
                message: format!(
                    "{}: the admin API runs and stops workloads on this node; beyond loopback \
                     it needs --admin-token-file",
                    args.listen
                ),
            });
        }
        Ok(Config {
            listen: args.listen,
            admin_token,
            metrics_listen: args.metrics_listen,
            ingress: (!args.no_http_ingress).then_some(crate::ingress::IngressConfig {
                listen: args.http_listen,
                advertise_url: args.http_advertise_url,
            }),
            manifests: args.manifests,
            memory: args
                .memory
                .as_deref()
                .map(|v| bytes("memory", v))
                .transpose()?,
            runtime,
            supervisor: SupervisorConfig {
                backoff: BackoffConfig {
                    initial: *args.backoff_initial,
                    max: *args.backoff_max,
                    reset_after: *args.backoff_reset,
                },
                ..SupervisorConfig::default()
            },
            shutdown_grace: *args.shutdown_grace,
            control: control_config(
                tls,
                args.control_plane,
                args.node_name,
                state_dir,
                &args.node_labels,
                flotilla_proto::auth::load_token(args.join_token, args.join_token_file.as_deref())
                    .map_err(|error| ConfigError {
                        flag: "join-token",
                        message: flotilla_telemetry::error_chain(&error),
                    })?,
            )?,
        })
    }
}

/// TLS towards the control plane, when any TLS flag is given.
fn client_tls(args: &Args) -> Result<Option<tonic::transport::ClientTlsConfig>, ConfigError> {
    let identity = args
        .tls_cert_file
        .as_deref()
        .zip(args.tls_key_file.as_deref());
    if args.tls_ca_file.is_none() && identity.is_none() {
        return Ok(None);
    }
    if !args
        .control_plane
        .as_deref()
        .is_some_and(|url| url.starts_with("https://"))
    {
        return Err(ConfigError {
            flag: "tls-ca-file",
            message: "TLS flags need an https:// --control-plane".into(),
        });
    }
    flotilla_proto::tls::client_config(args.tls_ca_file.as_deref(), identity)
        .map(Some)
        .map_err(|error| ConfigError {
            flag: "tls-ca-file",
            message: flotilla_telemetry::error_chain(&error),
        })
}

fn control_config(
    tls: Option<tonic::transport::ClientTlsConfig>,
    url: Option<String>,
    node_name: Option<String>,
    state_dir: Option<PathBuf>,
    labels: &[String],
    join_token: Option<String>,
) -> Result<Option<crate::control::ControlConfig>, ConfigError> {
    let Some(url) = url else {
        return Ok(None);
    };
    // An https URL without TLS flags trusts the webpki roots.
    let tls = match tls {
        None if url.starts_with("https://") => Some(
            flotilla_proto::tls::client_config(None, None).map_err(|error| ConfigError {
                flag: "control-plane",
                message: flotilla_telemetry::error_chain(&error),
            })?,
        ),
        tls => tls,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError {
            flag: "control-plane",
            message: format!("{url:?}: must be an http:// or https:// URL"),
        });
    }
    let node_name = node_name.unwrap_or_else(crate::runtime::host_name);
    flotilla_model::validate_name(&node_name).map_err(|error| ConfigError {
        flag: "node-name",
        message: error.to_string(),
    })?;
    let Some(state_dir) = state_dir else {
        return Err(ConfigError {
            flag: "state-dir",
            message: "no default (neither XDG_STATE_HOME nor HOME is set); set it".into(),
        });
    };
    let node_credential = crate::control::identity::load_or_create(&state_dir, &node_name)
        .map_err(|error| ConfigError {
            flag: "state-dir",
            message: format!(
                "{}: the node credential: {}",
                state_dir.display(),
                flotilla_telemetry::error_chain(&error)
            ),
        })?;
    let mut parsed = std::collections::BTreeMap::new();
    for label in labels.iter().filter(|l| !l.is_empty()) {
        let Some((key, value)) = label.split_once('=') else {
            return Err(ConfigError {
                flag: "node-labels",
                message: format!("{label:?}: must be key=value"),
            });
        };
        parsed.insert(key.to_string(), value.to_string());
    }
    // Random per process: a second agent claiming a live node's name is refused, while a
    // restarted agent takes its node back as soon as the old session is gone.
    let agent_id = uuid::Uuid::new_v4().to_string();
    Ok(Some(crate::control::ControlConfig {
        url,
        node_name,
        agent_id,
        labels: parsed,
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(10),
        join_token,
        node_credential,
        tls,
        ingress_url: String::new(),
    }))
}

/// `--wasm-features`: names separated by commas, or `none`.
fn parse_wasm_features(value: &str) -> Result<FeatureSet, ConfigError> {
    FeatureSet::parse_list(value).map_err(|error| ConfigError {
        flag: "wasm-features",
        message: error.to_string(),
    })
}

fn parse_owner(value: &str) -> Result<(u32, u32), String> {
    let parsed = value
        .split_once(':')
        .and_then(|(uid, gid)| Some((uid.parse().ok()?, gid.parse().ok()?)));
    parsed.ok_or_else(|| format!("{value:?}: must be UID:GID, two numbers"))
}

/// `path` with symlinks resolved as far as it exists, for comparing directories.
fn resolved(path: &std::path::Path) -> PathBuf {
    let mut existing = path;
    let mut rest = Vec::new();
    while let Some(parent) = existing.parent() {
        if let Ok(canonical) = std::fs::canonicalize(existing) {
            return rest.iter().rev().fold(canonical, |p, name| p.join(name));
        }
        if let Some(name) = existing.file_name() {
            rest.push(name.to_owned());
        }
        existing = parent;
    }
    path.to_path_buf()
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("flotilla").join("modules"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["flotilla-node-agent", "--no-cache"];
        argv.extend_from_slice(extra);
        Config::try_from(Args::try_parse_from(argv).expect("flags parse"))
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).expect("valid");
        assert_eq!(config.runtime.max_memory_per_sandbox, 256 << 20);
        assert_eq!(config.runtime.epoch_tick, Duration::from_millis(2));
        assert_eq!(config.supervisor.backoff, BackoffConfig::default());
        assert!(config.runtime.cache_dir.is_none());
    }

    #[test]
    fn wasm_features_default_to_all_but_the_experimental_and_name_their_flag() {
        let default = parse(&[]).expect("valid").runtime.wasm_features;
        assert_eq!(default, FeatureSet::NODE_DEFAULT);
        let all = parse(&[
            "--wasm-features",
            "gc, exceptions,wide-arithmetic,custom-page-sizes,component-model-async,threads",
        ])
        .expect("valid");
        assert_eq!(all.runtime.wasm_features, FeatureSet::ALL);
        for none in ["none", ""] {
            let config = parse(&["--wasm-features", none]).expect("valid");
            assert_eq!(config.runtime.wasm_features, FeatureSet::NONE, "{none:?}");
        }
        let err = parse(&["--wasm-features", "gc,threadz"]).expect_err("unknown");
        assert_eq!(err.flag, "wasm-features");
        assert!(err.message.contains("\"threadz\""), "{}", err.message);
    }

    #[test]
    fn egress_deny_takes_ranges_and_bare_addresses_and_replaces_the_default() {
        let config = parse(&["--egress-deny", "169.254.0.0/16,10.0.0.7,fd00::1"]).expect("valid");
        let denied = format!("{:?}", config.runtime.egress_denied);
        assert!(denied.contains("169.254.0.0/16"), "{denied}");
        assert!(denied.contains("10.0.0.7/32"), "{denied}");
        assert!(denied.contains("fd00::1/128"), "{denied}");
        assert!(!denied.contains("127.0.0.0/8"), "{denied}");
        let default = format!("{:?}", parse(&[]).expect("valid").runtime.egress_denied);
        assert!(default.contains("127.0.0.0/8"), "{default}");
        let bad = Args::try_parse_from(["flotilla-node-agent", "--egress-deny", "metadata"]);
        assert!(bad.is_err());
    }

    #[test]
    fn host_path_rules_may_not_cover_the_agents_own_directories() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().to_str().expect("utf-8");
        let cache = format!("{state}/cache/modules");
        let volumes = format!("{state}/volumes");
        let with_rule = |rule: &str| {
            Config::try_from(
                Args::try_parse_from([
                    "flotilla-node-agent",
                    "--cache-dir",
                    &cache,
                    "--volumes-dir",
                    &volumes,
                    "--allow-host-path",
                    rule,
                ])
                .expect("flags parse"),
            )
        };
        for rule in [state.to_string(), format!("{state}/cache"), cache.clone()] {
            let err = with_rule(&rule).expect_err(&rule);
            assert_eq!(err.flag, "allow-host-path");
            assert!(err.message.contains("overlaps"), "{}", err.message);
        }
        assert!(with_rule(&format!("{state}/srv")).is_ok());
    }

    #[test]
    fn invalid_values_name_their_flag() {
        for (flags, flag) in [
            (
                &["--max-memory-per-sandbox", "lots"][..],
                "max-memory-per-sandbox",
            ),
            (
                &["--default-memory-limit", "1Gi"][..],
                "default-memory-limit",
            ),
            (&["--max-sandboxes", "0"][..], "max-sandboxes"),
            (&["--epoch-tick", "0s"][..], "epoch-tick"),
            (&["--epoch-tick", "500us"][..], "epoch-tick"),
            (&["--control-plane", "ftp://x"][..], "control-plane"),
            (
                &["--http-advertise-url", "10.0.0.7"][..],
                "http-advertise-url",
            ),
            (
                &["--control-plane", "http://x", "--node-name", "Bad_Name"][..],
                "node-name",
            ),
            (
                &["--control-plane", "http://x", "--node-labels", "zone"][..],
                "node-labels",
            ),
        ] {
            let err = parse(flags).expect_err(flag);
            assert_eq!(err.flag, flag);
        }
    }
}
