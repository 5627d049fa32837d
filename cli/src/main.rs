//! `flotilla`: a kubectl-like client for the control plane (`apply`, `get workloads|nodes`,
//! `describe`, `scale`, `logs`, `delete workload`) and for one node agent (`get sandboxes`,
//! `delete sandboxes`, `capacity`, `logs --from-agent`).

mod agent;
mod config;
mod control;
mod describe;
mod dev;
mod kubeconfig;
mod output;
mod rollout;
mod run;

// The all-in-one mode hosts sandboxes; see the node agent's main.rs for why not glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use flotilla_proto::agent::v1::ConfigKind;

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Drive Flotilla")]
struct Cli {
    /// The control plane's API.
    #[arg(
        long,
        env = "FLOTILLA_SERVER",
        default_value = "http://127.0.0.1:7080",
        global = true
    )]
    server: String,
    /// A node agent's admin API (for sandbox-level commands).
    #[arg(
        long,
        env = "FLOTILLA_AGENT",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    agent: String,
    /// The CA that signs an `https://` control plane's certificate (default: the webpki roots).
    #[arg(long, env = "FLOTILLA_TLS_CA_FILE", global = true)]
    tls_ca_file: Option<std::path::PathBuf>,
    /// Your client certificate (PEM) for an `https://` control plane that knows users by
    /// certificate (its --user-client-ca-file); with --client-key.
    #[arg(
        long,
        env = "FLOTILLA_CLIENT_CERTIFICATE",
        global = true,
        requires = "client_key"
    )]
    client_certificate: Option<std::path::PathBuf>,
    /// The key of --client-certificate (PEM).
    #[arg(
        long,
        env = "FLOTILLA_CLIENT_KEY",
        global = true,
        requires = "client_certificate"
    )]
    client_key: Option<std::path::PathBuf>,
    /// A file holding your token for the control plane's user API (from its --token-auth-file).
    #[arg(long, env = "FLOTILLA_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    /// Your token for the control plane's user API (better: --token-file).
    #[arg(long, env = "FLOTILLA_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Send the kubeconfig's current user's token (its `token`, `tokenFile` or exec plugin)
    /// to a control plane that checks Kubernetes credentials (--kubernetes-auth). Only to one
    /// you trust with that credential.
    #[arg(
        long,
        env = "FLOTILLA_TOKEN_FROM_KUBECONFIG",
        global = true,
        conflicts_with_all = ["token", "token_file"]
    )]
    token_from_kubeconfig: bool,
    /// A file holding the agent's admin token, for an agent started with --admin-token-file.
    #[arg(long, env = "FLOTILLA_AGENT_TOKEN_FILE", global = true)]
    agent_token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

/// `flotilla create ...`.
#[derive(Subcommand)]
enum CreateWhat {
    /// A ConfigMap: `flotilla create configmap NAME --from-literal K=V --from-file PATH`.
    #[command(alias = "cm")]
    Configmap {
        /// Its name.
        name: String,
        #[command(flatten)]
        sources: config::Sources,
    },
    /// A Secret: `flotilla create secret generic NAME --from-literal K=V --from-file PATH`.
    Secret {
        #[command(subcommand)]
        kind: SecretKind,
    },
}

/// The kinds of Secret `create secret` makes.
#[derive(Subcommand)]
enum SecretKind {
    /// Opaque data from literals and files.
    Generic {
        /// Its name.
        name: String,
        #[command(flatten)]
        sources: config::Sources,
    },
}

/// `flotilla rollout ...`.
#[derive(Subcommand)]
enum RolloutAction {
    /// Prints an update's progress until every replica runs the current revision; fails when
    /// it misses its progress deadline.
    Status {
        /// The workload's name.
        name: String,
        /// How long to wait.
        #[arg(long, default_value = "10m")]
        timeout: humantime::Duration,
    },
    /// Lists the revisions kept, newest first.
    History {
        /// The workload's name.
        name: String,
    },
    /// Applies an old revision's template again: the previous one, or `--to-revision`.
    Undo {
        /// The workload's name.
        name: String,
        /// The revision to go back to.
        #[arg(long)]
        to_revision: Option<u64>,
    },
}

#[derive(Subcommand)]
enum Commands {
    /// Runs a module once as a one-replica workload, with the guest's stdout and stderr on
    /// ours and its exit code as ours, as `docker run` does: `flotilla run NAME --module PATH
    /// [--rm] [-- ARGS...]`.
    Run(run::RunArgs),
    /// Creates or updates workloads from manifests; local module paths are pushed first.
    Apply {
        /// A manifest file, a directory of them, or `-` for standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Wait until every applied workload is ready, showing progress.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "5m", requires = "wait")]
        timeout: humantime::Duration,
    },
    /// Creates a ConfigMap or Secret from literals and files, as kubectl does.
    Create {
        #[command(subcommand)]
        what: CreateWhat,
    },
    /// Lists workloads, nodes, ConfigMaps or Secrets (control plane), or sandboxes (agent).
    Get {
        /// `workloads`, `nodes`, `configmaps`, `secrets` or `sandboxes`.
        resource: Resource,
        /// One object's name.
        name: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// The namespace of the workload, ConfigMap or Secret.
        #[arg(short, long, default_value = flotilla_model::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Shows a workload in detail (spec, placements, conditions and recent failures), or a
    /// sandbox on one node agent (status, CPU used, last termination).
    Describe {
        /// `workload` or `sandbox`.
        resource: Resource,
        /// The workload's name, or the sandbox's id as `get sandboxes` lists it.
        name: String,
        /// The workload's namespace.
        #[arg(short, long, default_value = flotilla_model::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Follows a workload's update, lists its revisions, or goes back to an old one.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Sets a workload's replica count; scaling restarts no running sandbox.
    Scale {
        /// The workload's name.
        name: String,
        /// The new replica count.
        #[arg(long)]
        replicas: u32,
    },
    /// Deletes a workload, ConfigMap, Secret or node (control plane) or stops a workload's
    /// sandboxes on the agent. Deleting a node moves its replicas elsewhere and releases its
    /// name for another agent's credential.
    Delete {
        /// `workload`, `configmap`, `secret`, `node` or `sandboxes`.
        resource: Resource,
        /// The object's name.
        name: String,
        /// The namespace of the workload, ConfigMap or Secret.
        #[arg(short, long, default_value = flotilla_model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Seconds sandboxes get to end (agent).
        #[arg(long, default_value_t = 5)]
        grace_period: u64,
    },
    /// Prints a sandbox's stdout and stderr, fetched through the control plane.
    Logs {
        /// The workload (with --from-agent: the agent's workload name, e.g. `default.hello`).
        workload: String,
        /// The node (default: the first node the workload runs on).
        #[arg(long)]
        node: Option<String>,
        /// The sandbox's replica index on that node.
        #[arg(long, default_value_t = 0)]
        replica: u32,
        /// Keep streaming new output.
        #[arg(short, long)]
        follow: bool,
        /// Read from the agent at --agent directly instead.
        #[arg(long)]
        from_agent: bool,
        /// The workload's namespace.
        #[arg(short, long, default_value = flotilla_model::DEFAULT_NAMESPACE)]
        namespace: String,
        #[command(flatten)]
        options: output::LogArgs,
    },
    /// Shows what the agent can hold and holds.
    Capacity,
    /// Prints a shell completion script, e.g. `flotilla completion bash > /etc/bash_completion.d/flotilla`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Runs a control plane, its embedded store and one node agent in this process, applies
    /// the examples and shows them running.
    Dev(dev::DevArgs),
}

/// What a command acts on.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Resource {
    /// WasmWorkload objects in the control plane.
    #[value(alias = "workload", alias = "wasmworkloads", alias = "ww")]
    Workloads,
    /// Nodes registered with the control plane.
    #[value(alias = "node", alias = "no")]
    Nodes,
    /// Sandboxes on one node agent.
    #[value(alias = "sandbox")]
    Sandboxes,
    /// ConfigMaps in the control plane.
    #[value(alias = "configmap", alias = "cm")]
    Configmaps,
    /// Secrets in the control plane (names and keys only).
    #[value(alias = "secret")]
    Secrets,
}

/// Output formats, as kubectl's `-o`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Wide,
    Yaml,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = TLS_CA_FILE.set(cli.tls_ca_file.clone());
    let _ = AGENT_TOKEN_FILE.set(cli.agent_token_file.clone());
    let _ = USER_TOKEN.set((cli.token.clone(), cli.token_file.clone()));
    let _ = TOKEN_FROM_KUBECONFIG.set(cli.token_from_kubeconfig);
    let _ = CLIENT_IDENTITY.set(cli.client_certificate.clone().zip(cli.client_key.clone()));
    flotilla_telemetry::init("flotilla");
    let Cli {
        server,
        agent,
        command,
        ..
    } = cli;
    if let Commands::Run(args) = command {
        let code = run::run(&server, args).await;
        // Not through the runtime's shutdown: a read of our stdin may be blocked in a thread
        // that nothing can cancel.
        std::process::exit(i32::from(code));
    }
    match dispatch(command, &server, &agent).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Commands, server: &str, agent: &str) -> anyhow::Result<()> {
    match command {
        Commands::Run(_) => unreachable!("flotilla run returns its own exit code"),
        Commands::Apply {
            files,
            wait,
            timeout,
        } => {
            let applied = control::apply(server, &files).await?;
            if wait {
                control::wait_ready(server, &applied, *timeout).await?;
            }
            Ok(())
        }
        Commands::Create { what } => match what {
            CreateWhat::Configmap { name, sources } => {
                config::create(server, ConfigKind::ConfigMap, &name, &sources).await
            }
            CreateWhat::Secret {
                kind: SecretKind::Generic { name, sources },
            } => config::create(server, ConfigKind::Secret, &name, &sources).await,
        },
        Commands::Get {
            resource,
            name,
            output,
            namespace,
        } => match resource {
            Resource::Workloads => control::get(server, name.as_deref(), &namespace, output).await,
            Resource::Nodes => control::get_nodes(server, name.as_deref(), output).await,
            Resource::Sandboxes => agent::get(agent, name, output).await,
            Resource::Configmaps | Resource::Secrets => {
                let kind = config_kind(resource);
                config::get(server, kind, name.as_deref(), &namespace, output).await
            }
        },
        Commands::Describe {
            resource,
            name,
            namespace,
        } => match resource {
            Resource::Workloads => control::describe(server, &name, &namespace).await,
            Resource::Sandboxes => agent::describe(agent, &name).await,
            other => anyhow::bail!(
                "describe supports workloads and sandboxes, not {}",
                resource_name(other)
            ),
        },
        Commands::Rollout { action } => match action {
            RolloutAction::Status { name, timeout } => {
                rollout::status(server, &name, *timeout).await
            }
            RolloutAction::History { name } => rollout::history(server, &name).await,
            RolloutAction::Undo { name, to_revision } => {
                rollout::undo(server, &name, to_revision).await
            }
        },
        Commands::Scale { name, replicas } => control::scale(server, &name, replicas).await,
        Commands::Delete {
            resource,
            name,
            namespace,
            grace_period,
        } => match resource {
            Resource::Workloads => control::delete(server, &name, &namespace).await,
            Resource::Configmaps | Resource::Secrets => {
                config::delete(server, config_kind(resource), &name, &namespace).await
            }
            Resource::Sandboxes => agent::delete(agent, &name, grace_period).await,
            Resource::Nodes => control::delete_node(server, &name).await,
        },
        Commands::Logs {
            workload,
            node,
            replica,
            follow,
            from_agent,
            namespace,
            options,
        } => {
            let (request, view) = options.split()?;
            if from_agent {
                agent::logs(agent, workload, replica, follow, request, view).await
            } else {
                let sandbox = control::SandboxRef {
                    namespace,
                    name: workload,
                    node: node.unwrap_or_default(),
                    replica,
                };
                control::logs(server, sandbox, follow, request, view).await
            }
        }
        Commands::Capacity => agent::capacity(agent).await,
        Commands::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "flotilla",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Commands::Dev(args) => dev::run(args).await,
    }
}

fn resource_name(resource: Resource) -> &'static str {
    match resource {
        Resource::Workloads => "workloads",
        Resource::Nodes => "nodes",
        Resource::Sandboxes => "sandboxes",
        Resource::Configmaps => "configmaps",
        Resource::Secrets => "secrets",
    }
}

fn config_kind(resource: Resource) -> ConfigKind {
    if resource == Resource::Secrets {
        ConfigKind::Secret
    } else {
        ConfigKind::ConfigMap
    }
}

/// Adds `http://` when an address has no scheme.
/// `--client-certificate` and `--client-key`, set once at startup for every `https://`
/// connection.
static CLIENT_IDENTITY: std::sync::OnceLock<Option<(std::path::PathBuf, std::path::PathBuf)>> =
    std::sync::OnceLock::new();

/// Where `--tls-ca-file` points, set once at startup for every connection.
static TLS_CA_FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// Where `--agent-token-file` points, set once at startup for every agent connection.
static AGENT_TOKEN_FILE: std::sync::OnceLock<Option<std::path::PathBuf>> =
    std::sync::OnceLock::new();

/// `--token` and `--token-file`, set once at startup for every control-plane connection.
static USER_TOKEN: std::sync::OnceLock<(Option<String>, Option<std::path::PathBuf>)> =
    std::sync::OnceLock::new();

/// `--token-from-kubeconfig`, set once at startup.
static TOKEN_FROM_KUBECONFIG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// The user's token for the control plane, from `--token`, `--token-file` or, with
/// `--token-from-kubeconfig`, the kubeconfig.
async fn user_token() -> anyhow::Result<BearerToken> {
    if TOKEN_FROM_KUBECONFIG.get().copied().unwrap_or(false) {
        return Ok(BearerToken(Some(kubeconfig::token().await?)));
    }
    let (value, file) = USER_TOKEN.get().cloned().unwrap_or_default();
    let token = flotilla_proto::auth::load_token(value, file.as_deref())
        .map_err(|e| anyhow::anyhow!("--token-file: {}", flotilla_telemetry::error_chain(&e)))?;
    Ok(BearerToken(token))
}

/// Adds a bearer token (when there is one) to every request.
#[derive(Clone)]
struct BearerToken(Option<String>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            flotilla_proto::auth::insert_bearer(&mut request, token);
        }
        Ok(request)
    }
}

/// A channel to `address`, with TLS for `https://` (trusting `--tls-ca-file` or the webpki
/// roots).
async fn channel(address: &str) -> anyhow::Result<tonic::transport::Channel> {
    let url = endpoint(address);
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    if url.starts_with("https://") {
        let ca = TLS_CA_FILE.get().and_then(Option::as_deref);
        let identity = CLIENT_IDENTITY
            .get()
            .and_then(Option::as_ref)
            .map(|(cert, key)| (cert.as_path(), key.as_path()));
        let tls = flotilla_proto::tls::client_config(ca, identity)?;
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{}", flotilla_telemetry::error_chain(&e)))
}

fn endpoint(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}
