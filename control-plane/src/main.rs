//! `flotilla-control-plane`: parse configuration, open the store, serve the user API until
//! SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use flotilla_control_plane::auth::{KubernetesAuth, UserAuth};
use flotilla_control_plane::kubernetes::leader::{self, LeaseConfig};
use flotilla_control_plane::{ControlPlane, FetchGuard, ServerConfig, StoreBackend};

// The agent's allocator too: the benchmarks (fleet, e2e, rollout, isolation) run the control
// plane's library entry point in their own binary, which uses it, so their RSS and CPU figures
// are those of this binary. It also keeps freed memory from piling up in glibc's per-thread
// arenas when a burst of agent sessions allocates on every worker thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// BSD's EX_USAGE: the configuration is invalid.
const EX_USAGE: u8 = 64;

/// Flotilla's control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the gRPC API.
    #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "FLOTILLA_METRICS_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    metrics_listen: SocketAddr,
    /// Where the embedded store and pushed modules live (default: $XDG_DATA_HOME/flotilla or
    /// ~/.local/share/flotilla).
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Time open requests and streams get to finish after SIGTERM before the process exits.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE", default_value = "5s")]
    shutdown_grace: humantime::Duration,
    /// A node that has not heartbeated for this long is not ready; its replicas move elsewhere.
    #[arg(long, env = "FLOTILLA_NODE_HEARTBEAT_TIMEOUT", default_value = "5s")]
    node_heartbeat_timeout: humantime::Duration,
    /// After a restart, how long replicas stay on nodes whose agents have not reconnected yet
    /// before they count as lost and move.
    #[arg(long, env = "FLOTILLA_NODE_STARTUP_GRACE", default_value = "15s")]
    node_startup_grace: humantime::Duration,
    /// The token node agents must present to join (better: --join-token-file). Without one,
    /// any agent that reaches the address can register a node.
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file holding the join token, e.g. a mounted Kubernetes Secret.
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// Serve the gRPC API over TLS with this certificate chain (PEM; with --tls-key-file).
    #[arg(long, env = "FLOTILLA_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The key of --tls-cert-file (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Require agents to present a client certificate signed by this CA (mutual TLS). It is
    /// not a users' CA: a node's certificate is no user.
    #[arg(long, env = "FLOTILLA_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    tls_client_ca_file: Option<PathBuf>,
    /// Users of the user API and their tokens, one per line: `token,user,uid[,"group1,group2"]`
    /// (kube-apiserver's static token file). Without it the user API is open to every caller,
    /// which is refused beyond loopback unless --insecure-allow-anonymous.
    #[arg(long, env = "FLOTILLA_TOKEN_AUTH_FILE")]
    token_auth_file: Option<PathBuf>,
    /// Users of the user API by client certificate: one signed by this CA (PEM; not the
    /// agents' CA) names the user by its Common Name and its groups by its Organizations, as
    /// kube-apiserver's --client-ca-file. With or without --token-auth-file.
    #[arg(long, env = "FLOTILLA_USER_CLIENT_CA_FILE", requires = "tls_cert_file")]
    user_client_ca_file: Option<PathBuf>,
    /// Who may do what (verbs, resources, namespaces) through the user API; without it every
    /// authenticated user may do everything. See the README's "Users and permissions".
    #[arg(long, env = "FLOTILLA_AUTHORIZATION_POLICY_FILE")]
    authorization_policy_file: Option<PathBuf>,
    /// With --store kubernetes: users present their own Kubernetes tokens (checked with a
    /// TokenReview) and every call is checked with a SubjectAccessReview, so the cluster's
    /// RBAC decides who may do what (the control plane needs `create` on `tokenreviews` and
    /// `subjectaccessreviews`).
    #[arg(
        long,
        env = "FLOTILLA_KUBERNETES_AUTH",
        conflicts_with_all = [
            "token_auth_file",
            "user_client_ca_file",
            "authorization_policy_file",
            "insecure_allow_anonymous"
        ]
    )]
    kubernetes_auth: bool,
    /// Serve the user API open (no authentication) on an address beyond loopback.
    #[arg(long, env = "FLOTILLA_INSECURE_ALLOW_ANONYMOUS")]
    insecure_allow_anonymous: bool,
    /// Address ranges module downloads (`spec.module.url`, OCI pulls) may not reach, checked
    /// on every connection and redirect. Repeat or separate with commas; a bare address stands
    /// for itself. Given, it replaces the default: loopback, link-local (cloud metadata),
    /// multicast and broadcast.
    #[arg(
        long = "fetch-deny",
        env = "FLOTILLA_FETCH_DENY",
        value_delimiter = ',',
        value_parser = flotilla_model::network::parse_denied_range
    )]
    fetch_deny: Vec<ipnet::IpNet>,
    /// With --store kubernetes: the namespaces whose ConfigMaps and Secrets sandboxes may use,
    /// so that the control plane needs read access to those alone (namespaced Roles); every
    /// namespace's (cluster-wide read access) when not given.
    #[arg(long, env = "FLOTILLA_CONFIG_NAMESPACES", value_delimiter = ',')]
    config_namespaces: Vec<String>,
    /// Where desired state is kept.
    #[arg(long, env = "FLOTILLA_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    store: StoreKind,
    /// Serve only while holding a Lease, so that several replicas can run with one active
    /// (needs --store kubernetes).
    #[arg(long, env = "FLOTILLA_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader-election Lease (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "FLOTILLA_LEADER_ELECTION_ID",
        default_value = "flotilla-control-plane"
    )]
    leader_election_id: String,
    /// This replica's identity in the Lease and in Events (in a pod: the pod name); default: a
    /// random one.
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// A durable redb file in the data directory.
    Embedded,
    /// `WasmWorkload` objects in the Kubernetes cluster of the in-cluster config or KUBECONFIG.
    Kubernetes,
}

fn main() -> ExitCode {
    let args = Args::parse();
    flotilla_telemetry::init("flotilla_control_plane");
    flotilla_control_plane::disable_transparent_huge_pages();
    let Some(data_dir) = args.data_dir.clone().or_else(default_data_dir) else {
        eprintln!("flotilla-control-plane: --data-dir: no default (HOME is unset); set it");
        return ExitCode::from(EX_USAGE);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flotilla-control-plane: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, data_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flotilla-control-plane: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, data_dir: PathBuf) -> anyhow::Result<()> {
    let join_token =
        flotilla_proto::auth::load_token(args.join_token.clone(), args.join_token_file.as_deref())?;
    let tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => Some(flotilla_proto::tls::ServerTls::load(
            cert,
            key,
            args.tls_client_ca_file.as_deref(),
            args.user_client_ca_file.as_deref(),
        )?),
        _ => None,
    };
    if let (Some(agents), Some(users)) = (&args.tls_client_ca_file, &args.user_client_ca_file) {
        let same = std::fs::read(agents).ok() == std::fs::read(users).ok();
        anyhow::ensure!(
            !same,
            "--user-client-ca-file must not be the agents' CA (--tls-client-ca-file): every node \
             holds a certificate from it, and a node must not act as a user"
        );
    }
    let mut user_auth = match (&args.token_auth_file, &args.user_client_ca_file) {
        (None, None) => {
            anyhow::ensure!(
                args.authorization_policy_file.is_none(),
                "--authorization-policy-file needs users: --token-auth-file or \
                     --user-client-ca-file"
            );
            UserAuth::open()
        }
        (tokens, user_ca) => UserAuth::load(
            tokens.as_deref(),
            user_ca.as_deref(),
            args.authorization_policy_file.as_deref(),
        )?,
    };
    // Installed first: a signal during startup must still stop the server cleanly.
    let shutdown = flotilla_telemetry::shutdown_signal()?;
    tokio::pin!(shutdown);
    let identity = args.leader_election_identity.clone().unwrap_or_else(|| {
        format!(
            "flotilla-control-plane-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    });
    let store = match args.store {
        StoreKind::Embedded => StoreBackend::Embedded,
        StoreKind::Kubernetes => StoreBackend::Kubernetes {
            client: kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?,
            instance: identity.clone(),
            config_namespaces: args.config_namespaces.clone(),
        },
    };
    if args.kubernetes_auth {
        let StoreBackend::Kubernetes { client, .. } = &store else {
            anyhow::bail!("--kubernetes-auth needs --store kubernetes");
        };
        user_auth = UserAuth::kubernetes(KubernetesAuth::new(client.clone()));
    }
    let mut leadership = None;
    if args.leader_elect {
        let StoreBackend::Kubernetes { client, .. } = &store else {
            anyhow::bail!("--leader-elect needs --store kubernetes");
        };
        let config = LeaseConfig::new(
            &args.leader_election_namespace,
            &args.leader_election_id,
            &identity,
        );
        tracing::info!(lease = %config.name, namespace = %config.namespace, %identity, "campaigning for leadership");
        tokio::select! {
            won = leader::acquire(client.clone(), config) => leadership = Some(won),
            () = &mut shutdown => return Ok(()),
        }
    }
    let control_plane = ControlPlane::start(ServerConfig {
        listen: args.listen,
        metrics_listen: Some(args.metrics_listen),
        store,
        data_dir,
        node_heartbeat_timeout: *args.node_heartbeat_timeout,
        node_startup_grace: *args.node_startup_grace,
        join_token,
        tls,
        shutdown_grace: *args.shutdown_grace,
        fetch_guard: if args.fetch_deny.is_empty() {
            FetchGuard::defaults()
        } else {
            FetchGuard::new(args.fetch_deny)
        },
        user_auth: std::sync::Arc::new(user_auth),
        insecure_allow_anonymous: args.insecure_allow_anonymous,
    })
    .await?;
    let lost = async {
        match leadership.as_mut() {
            Some(leadership) => leadership.lost().await,
            None => std::future::pending().await,
        }
    };
    let lost_leadership = tokio::select! {
        () = &mut shutdown => false,
        () = lost => true,
    };
    control_plane.shutdown().await?;
    if lost_leadership {
        // Another replica leads now; exiting lets the pod restart as a candidate.
        anyhow::bail!("lost the leader-election lease");
    }
    if let Some(leadership) = leadership {
        leadership.release().await;
    }
    Ok(())
}

fn default_data_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|base| base.join("flotilla"))
}
