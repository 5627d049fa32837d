//! Assembles a running control plane: a workload store (embedded or Kubernetes), module store,
//! node registry, controller and both gRPC services on one listener. `main.rs` and
//! `flotilla dev` start it the same way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::auth::UserAuth;
use crate::cluster::Cluster;
use crate::controller::Controller;
use crate::grpc::{AgentService, WorkloadService};
use crate::kubernetes;
use crate::modules::{DEFAULT_MAX_MODULE_BYTES, FetchGuard, ModuleStore, UrlModules};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::store::{ConfigStore, EmbeddedStore, KubeStore, WorkloadStore};

/// Where desired state lives.
#[derive(Clone, Default)]
pub enum StoreBackend {
    /// A redb file in the data directory.
    #[default]
    Embedded,
    /// `WasmWorkload` objects in the cluster this client talks to; the control plane also
    /// publishes `WasmNode` objects and Events there.
    Kubernetes {
        /// The cluster's API.
        client: kube::Client,
        /// This replica's name in Events (the pod name).
        instance: String,
        /// The namespaces whose ConfigMaps and Secrets sandboxes may use; every namespace's
        /// (with cluster-wide read access) when empty.
        config_namespaces: Vec<String>,
    },
}

impl std::fmt::Debug for StoreBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Embedded => "Embedded",
            Self::Kubernetes { .. } => "Kubernetes",
        })
    }
}

/// Settings of a control plane.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// gRPC address (port 0 picks one).
    pub listen: SocketAddr,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Where desired state lives.
    pub store: StoreBackend,
    /// Where the embedded store file and module blobs live.
    pub data_dir: PathBuf,
    /// A node silent this long is not ready; agents heartbeat three times per timeout.
    pub node_heartbeat_timeout: Duration,
    /// After a start, how long placements on nodes that have not reconnected yet are kept.
    pub node_startup_grace: Duration,
    /// The token agents must present to join; `None` admits any agent.
    pub join_token: Option<String>,
    /// Serve over TLS (and with mutual TLS for agents, when it has a client CA).
    pub tls: Option<flotilla_proto::tls::ServerTls>,
    /// Time open streams get after shutdown begins.
    pub shutdown_grace: Duration,
    /// Addresses module downloads (`spec.module.url`, OCI pulls) may not reach.
    pub fetch_guard: FetchGuard,
    /// Who may use the user API.
    pub user_auth: Arc<UserAuth>,
    /// Serve an open user API (no `user_auth` tokens) on an address beyond loopback.
    pub insecure_allow_anonymous: bool,
}

/// A running control plane. Every task it starts is tracked in its cluster's
/// [`tasks`](Cluster::tasks) and drained by [`shutdown`](Self::shutdown).
pub struct ControlPlane {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    server: JoinHandle<anyhow::Result<()>>,
    controller: JoinHandle<()>,
    cluster: Arc<Cluster>,
    shutdown_grace: Duration,
}

impl ControlPlane {
    /// Opens the stores, binds the listener and starts serving and reconciling.
    ///
    /// # Errors
    /// The data directory, the store or the listener cannot be opened.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("creating the data directory {}", config.data_dir.display())
        })?;
        // Desired state and Secrets: for the control plane's user alone.
        restrict(&config.data_dir, 0o700);
        let modules = ModuleStore::open(&config.data_dir.join("modules"), DEFAULT_MAX_MODULE_BYTES)
            .context("opening the module store")?;
        match config.store.clone() {
            StoreBackend::Embedded => {
                let store_path = config.data_dir.join("store.redb");
                let store = EmbeddedStore::open(&store_path).context("opening the store")?;
                restrict(&store_path, 0o600);
                let config_path = config.data_dir.join("config.redb");
                Self::start_with(config, store, modules, Some(config_path)).await
            }
            StoreBackend::Kubernetes {
                client,
                instance,
                config_namespaces,
            } => {
                let store = KubeStore::start(client.clone());
                let control_plane =
                    Self::start_with(config.clone(), store.clone(), modules, None).await?;
                let cluster = &control_plane.cluster;
                let stopped = || cluster.shutdown.clone().cancelled_owned();
                cluster.tasks.spawn(kubernetes::nodes::publish(
                    client.clone(),
                    cluster.clone(),
                    config.node_startup_grace,
                    stopped(),
                ));
                cluster.tasks.spawn(kubernetes::config::publish(
                    client.clone(),
                    cluster.clone(),
                    config_namespaces,
                    stopped(),
                ));
                cluster.tasks.spawn(kubernetes::events::publish(
                    client,
                    store,
                    cluster.clone(),
                    instance,
                    stopped(),
                ));
                Ok(control_plane)
            }
        }
    }

    /// Starts over `store`; ConfigMaps and Secrets live in a redb file at `config_path`, or,
    /// without one, in the Kubernetes cluster.
    async fn start_with<S: WorkloadStore + Clone>(
        config: ServerConfig,
        store: S,
        modules: ModuleStore,
        config_path: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        if config.user_auth.is_open() {
            if !config.listen.ip().is_loopback() && !config.insecure_allow_anonymous {
                anyhow::bail!(
                    "the user API would let anyone who reaches {} run workloads: give \
                     --token-auth-file or --user-client-ca-file (and \
                     --authorization-policy-file), or --insecure-allow-anonymous to serve it \
                     open anyway",
                    config.listen
                );
            }
            tracing::warn!(
                listen = %config.listen,
                "the user API is open: every caller is system:anonymous and may do everything"
            );
        }
        let cluster = Arc::new(Cluster::default());
        // Which credential may register each node name, across restarts.
        let identities_path = config.data_dir.join("nodes.redb");
        cluster
            .identities
            .persist(&identities_path)
            .context("opening the node identities")?;
        restrict(&identities_path, 0o600);
        let config_store = match &config_path {
            Some(path) => {
                let store = ConfigStore::open(path, cluster.clone())
                    .context("opening the ConfigMap and Secret store")?;
                restrict(path, 0o600);
                store
            }
            None => ConfigStore::kubernetes(cluster.clone()),
        };
        let stopped = || cluster.shutdown.clone().cancelled_owned();
        cluster
            .tasks
            .spawn(cluster.desired.clone().run(store.clone(), stopped()));

        let controller = Controller::new(
            store.clone(),
            Scheduler::new(&SchedulerConfig::default())?,
            cluster.clone(),
        )
        .with_startup_grace(config.node_startup_grace);
        let controller = cluster
            .tasks
            .spawn(controller.run(config.node_heartbeat_timeout, stopped()));

        // One downloader for both APIs: one download per digest, under one guard.
        let downloads = UrlModules::new(modules.clone(), config.fetch_guard.clone());
        // Agents heartbeat three times per timeout, so one lost heartbeat does not lose a node.
        let agents = AgentService::new(
            store.clone(),
            modules.clone(),
            cluster.clone(),
            config.node_heartbeat_timeout / 3,
        )
        .with_downloads(downloads.clone())
        .with_join_token(config.join_token.clone())
        .with_client_certs_required(
            config
                .tls
                .as_ref()
                .is_some_and(flotilla_proto::tls::ServerTls::requires_client_certs),
        );
        if config.join_token.is_none() {
            tracing::warn!(
                "no join token is set: any agent that reaches this address can register a node"
            );
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the API on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let metrics_listener = match config.metrics_listen {
            Some(listen) => Some(
                tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding metrics on {listen}"))?,
            ),
            None => None,
        };
        let metrics_addr = metrics_listener
            .as_ref()
            .map(tokio::net::TcpListener::local_addr)
            .transpose()?;
        tracing::info!(
            %addr,
            store = ?config.store,
            tls = ?config.tls,
            metrics_addr = %metrics_addr.map_or_else(|| "none".to_string(), |a| a.to_string()),
            data_dir = %config.data_dir.display(),
            "serving"
        );
        if let Some(listener) = metrics_listener {
            let scraped = cluster.clone();
            cluster.tasks.spawn(flotilla_telemetry::serve_metrics(
                listener,
                move || scraped.encode_metrics(),
                stopped(),
            ));
        }

        let server_stop = stopped();
        let grace_stop = stopped();
        let grace = config.shutdown_grace;
        let served_cluster = cluster.clone();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &config.tls {
            builder = builder
                .tls_config(tls.config())
                .context("configuring TLS")?;
        }
        let server = cluster.tasks.spawn(async move {
            let serve = builder
                .add_service(
                    WorkloadService::new(store, modules)
                        .with_downloads(downloads)
                        .with_cluster(served_cluster)
                        .with_config(config_store)
                        .with_auth(config.user_auth.clone())
                        .into_server(),
                )
                .add_service(agents.into_server())
                .serve_with_incoming_shutdown(flotilla_proto::serve::incoming(listener), server_stop);
            // Graceful shutdown waits for every connection to close; watch streams never would,
            // so the grace period bounds it.
            tokio::select! {
                result = serve => result.context("serving the API")?,
                () = async {
                    grace_stop.await;
                    tokio::time::sleep(grace).await;
                } => tracing::warn!(?grace, "connections still open after the grace period; closing them"),
            }
            Ok(())
        });
        Ok(Self {
            addr,
            metrics_addr,
            server,
            controller,
            cluster,
            shutdown_grace: grace,
        })
    }

    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops serving and reconciling, then waits for every task it started (agent sessions,
    /// watches, publishers) to end, for at most the shutdown grace period once the server has
    /// stopped.
    ///
    /// # Errors
    /// The server failed while running.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cluster.shutdown.cancel();
        self.cluster.tasks.close();
        if let Err(error) = self.controller.await {
            tracing::error!(%error, "the controller task failed");
        }
        self.server.await.context("the server task failed")??;
        if tokio::time::timeout(self.shutdown_grace, self.cluster.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.cluster.tasks.len(),
                "tasks still running after the grace period; leaving them"
            );
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Sets `path`'s mode to `mode`, warning when it cannot (a volume root owned by another user).
fn restrict(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(error) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        tracing::warn!(path = %path.display(), %error, "cannot restrict the file's mode");
    }
}
