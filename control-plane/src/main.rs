//! `flotilla-control-plane`: parse configuration, open the store, serve the user API until
//! SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use flotilla_control_plane::server::{ControlPlane, ServerConfig};

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
    /// Where desired state is kept. The Kubernetes store arrives with Kubernetes mode.
    #[arg(long, env = "FLOTILLA_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    store: StoreKind,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreKind {
    /// A durable redb file in the data directory.
    Embedded,
}

fn main() -> ExitCode {
    let args = Args::parse();
    flotilla_telemetry::init("flotilla_control_plane");
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
        flotilla_proto::auth::load_token(args.join_token.clone(), args.join_token_file.as_deref())
            .map_err(anyhow::Error::msg)?;
    let StoreKind::Embedded = args.store;
    // Installed first: a signal during startup must still stop the server cleanly.
    let shutdown = shutdown_signal()?;
    let control_plane = ControlPlane::start(ServerConfig {
        listen: args.listen,
        metrics_listen: Some(args.metrics_listen),
        data_dir,
        node_heartbeat_timeout: *args.node_heartbeat_timeout,
        node_startup_grace: *args.node_startup_grace,
        join_token,
        shutdown_grace: *args.shutdown_grace,
    })
    .await?;
    shutdown.await;
    control_plane.shutdown().await
}

/// Installs SIGTERM and SIGINT handlers now; the future completes on the first signal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn default_data_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|base| base.join("flotilla"))
}
