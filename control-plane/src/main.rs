//! `flotilla-control-plane`: parse configuration, open the store, serve the user API until
//! SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use std::sync::Arc;

use flotilla_control_plane::controller::Controller;
use flotilla_control_plane::grpc::{AgentService, WorkloadService};
use flotilla_control_plane::modules::{DEFAULT_MAX_MODULE_BYTES, ModuleStore};
use flotilla_control_plane::nodes::NodeRegistry;
use flotilla_control_plane::scheduler::{Scheduler, SchedulerConfig};
use flotilla_control_plane::store::EmbeddedStore;
use tokio_stream::wrappers::TcpListenerStream;

/// BSD's EX_USAGE: the configuration is invalid.
const EX_USAGE: u8 = 64;

/// Flotilla's control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the gRPC API.
    #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
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
    let StoreKind::Embedded = args.store;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let store = EmbeddedStore::open(&data_dir.join("store.redb")).context("opening the store")?;
    let modules = ModuleStore::open(&data_dir.join("modules"), DEFAULT_MAX_MODULE_BYTES)
        .context("opening the module store")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the API on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %data_dir.display(), "serving");
    let (stopping, mut stop_seen) = tokio::sync::watch::channel(false);
    let nodes = Arc::new(NodeRegistry::default());
    let controller = Controller::new(
        store.clone(),
        Scheduler::new(&SchedulerConfig::default())?,
        nodes.clone(),
    );
    // Agents heartbeat three times per timeout, so one lost heartbeat does not lose a node.
    let agents = AgentService::new(
        store.clone(),
        modules.clone(),
        nodes,
        *args.node_heartbeat_timeout / 3,
    );
    let mut controller_stop = stop_seen.clone();
    let controller = tokio::spawn(controller.run(*args.node_heartbeat_timeout, async move {
        let _ = controller_stop.wait_for(|stopping| *stopping).await;
    }));
    let serve = tonic::transport::Server::builder()
        .add_service(WorkloadService::new(store, modules).into_server())
        .add_service(agents.into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown_signal().await;
            // Nobody listening any more is fine.
            let _ = stopping.send(true);
        });
    // Graceful shutdown waits for every connection to close; watch streams never would, so
    // the grace period bounds it.
    let grace = *args.shutdown_grace;
    tokio::select! {
        result = serve => result.context("serving the API")?,
        () = async {
            let _ = stop_seen.wait_for(|stopping| *stopping).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "connections still open after the grace period; closing them"),
    }
    // The controller saw the same signal; a panic in it is reported, not hidden.
    if let Err(error) = controller.await {
        tracing::error!(%error, "the controller task failed");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

fn default_data_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|base| base.join("flotilla"))
}
