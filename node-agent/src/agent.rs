//! Assembles a running agent: runtime, supervisor (its sandboxes on a [`GuestRuntime`] of their
//! own), admin gRPC server, metrics endpoint and static manifests. `main.rs` and `flotilla dev` both start agents through [`Agent::start`].

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminService;
use crate::config::Config;
use crate::guests::GuestRuntime;
use crate::metrics::{Live, Metrics};
use crate::runtime::{WasmtimeRuntime, capacity};
use crate::supervisor::{ShutdownReport, Supervisor};

/// A running node agent.
pub struct Agent {
    supervisor: Supervisor,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shutdown: CancellationToken,
    ingress_shutdown: CancellationToken,
    ingress: Option<JoinHandle<()>>,
    ingress_addr: Option<SocketAddr>,
    servers: Vec<JoinHandle<()>>,
    grace: Duration,
    /// Emptied when the agent stops.
    volumes: crate::runtime::volumes::VolumeConfig,
    /// Where sandboxes run; shut down last.
    guests: GuestRuntime,
}

impl Agent {
    /// Creates the runtime, binds both listeners, starts serving and applies the static
    /// manifests in the background.
    ///
    /// # Errors
    /// Fails if the engine cannot be created or a listener cannot be bound.
    pub async fn start(config: Config) -> anyhow::Result<Agent> {
        let capacity = capacity::derive(
            &config.runtime,
            capacity::read_max_map_count(),
            config.memory,
        );
        if capacity.max_sandboxes < config.runtime.max_sandboxes {
            tracing::warn!(
                max_sandboxes = capacity.max_sandboxes,
                "{}",
                capacity.limited_by
            );
        }
        tracing::info!(
            max_sandboxes = capacity.max_sandboxes,
            memory = capacity.memory_bytes,
            arch = capacity.arch,
            "capacity"
        );
        crate::runtime::volumes::clear(&config.runtime.volumes);
        crate::runtime::volumes::create_dir(&config.runtime.volumes).with_context(|| {
            format!(
                "creating the volume directory {}",
                config.runtime.volumes.dir.display()
            )
        })?;
        let runtime = WasmtimeRuntime::with_capacity(config.runtime.clone(), capacity)
            .context("creating the sandbox runtime")?;
        let metrics = Metrics::with_http(runtime.http_metrics().clone());
        let guests = GuestRuntime::new(config.runtime.guest_threads)
            .context("starting the sandboxes' runtime")?;
        let mut supervisor_config = config.supervisor.clone();
        supervisor_config.guests = guests.handle();
        let supervisor = Supervisor::new(runtime, supervisor_config, metrics.clone());
        let live = supervisor.downgrade();
        metrics.read_live(move || {
            let Some(supervisor) = live.upgrade() else {
                return Live::default();
            };
            let runtime = supervisor.runtime();
            let cache = runtime.cache_stats();
            Live {
                cpu_by_workload: supervisor.cpu_by_workload(),
                cpu_waiting: runtime.epoch().run_queue().waiting(),
                compiles_running: cache.compiles_running,
                compiles_waiting: cache.compiles_waiting,
            }
        });
        let shutdown = CancellationToken::new();
        let ingress_shutdown = CancellationToken::new();

        let admin = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the admin API on {}", config.listen))?;
        let admin_addr = admin.local_addr()?;
        let metrics_listener = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| format!("binding metrics on {}", config.metrics_listen))?;
        let metrics_addr = metrics_listener.local_addr()?;
        let ingress = match &config.ingress {
            Some(ingress) => {
                let listener = TcpListener::bind(ingress.listen)
                    .await
                    .with_context(|| format!("binding the HTTP ingress on {}", ingress.listen))?;
                Some((listener.local_addr()?, listener))
            }
            None => None,
        };
        let ingress_addr = ingress.as_ref().map(|(addr, _)| *addr);
        tracing::info!(%admin_addr, %metrics_addr, "serving");

        let mut servers = Vec::new();
        let mut control = config.control.clone();
        let ingress = ingress.map(|(bound, listener)| {
            if let (Some(control), Some(ingress)) = (&mut control, &config.ingress) {
                control.ingress_url =
                    crate::ingress::advertise_url(ingress, bound, &control.node_name);
            }
            tracing::info!(ingress_addr = %bound, "serving HTTP workloads");
            // The ingress drains on its own token, before the sandboxes stop.
            let node_name = control
                .as_ref()
                .map_or("flotilla-node-agent", |c| c.node_name.as_str());
            let ingress = crate::ingress::Ingress::new(
                supervisor.runtime().http_routes().clone(),
                supervisor.runtime().http_metrics().clone(),
                node_name,
            );
            let served = crate::ingress::serve(
                listener.into_std()?,
                ingress,
                ingress_shutdown.clone(),
                config.shutdown_grace,
            );
            Ok::<_, std::io::Error>(match guests.requests() {
                Some(requests) => requests.spawn(served),
                None => tokio::spawn(served),
            })
        });
        let ingress = ingress.transpose()?;
        let service = AdminService::new(supervisor.clone()).into_server();
        let admin_token = config.admin_token.clone();
        let service = tonic::service::interceptor::InterceptedService::new(
            service,
            move |request: tonic::Request<()>| {
                crate::admin::authenticate(request, admin_token.as_deref())
            },
        );
        let token = shutdown.clone();
        servers.push(tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    flotilla_proto::serve::incoming(admin),
                    token.cancelled_owned(),
                )
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "admin API stopped");
            }
        }));
        let token = shutdown.clone();
        servers.push(tokio::spawn(flotilla_telemetry::serve_metrics(
            metrics_listener,
            move || metrics.encode(),
            token.cancelled_owned(),
        )));

        if let Some(control) = control {
            let supervisor = supervisor.clone();
            let token = shutdown.clone();
            servers.push(tokio::spawn(crate::control::run(
                control, supervisor, token,
            )));
        }
        if let Some(dir) = config.manifests.clone() {
            let supervisor = supervisor.clone();
            servers.push(tokio::spawn(apply_manifests(supervisor, dir)));
        }

        Ok(Agent {
            supervisor,
            admin_addr,
            metrics_addr,
            shutdown,
            ingress_shutdown,
            ingress,
            ingress_addr,
            servers,
            grace: config.shutdown_grace,
            volumes: config.runtime.volumes.clone(),
            guests,
        })
    }

    /// The supervisor, for embedding (e.g. `flotilla dev`).
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Where the admin API listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where the metrics endpoint listens.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Where the HTTP ingress listens, unless it is disabled.
    pub fn ingress_addr(&self) -> Option<SocketAddr> {
        self.ingress_addr
    }

    /// Stops accepting HTTP requests and lets those in flight finish (within the grace period),
    /// then stops serving and stops every sandbox within the grace period.
    pub async fn shutdown(self) -> ShutdownReport {
        self.ingress_shutdown.cancel();
        if let Some(ingress) = self.ingress {
            // The task ends once drained or after the grace period.
            let _ = ingress.await;
        }
        self.shutdown.cancel();
        let report = self.supervisor.shutdown(self.grace).await;
        for server in self.servers {
            server.abort();
            // A cancelled or finished server task has nothing more to report.
            let _ = server.await;
        }
        crate::runtime::volumes::clear(&self.volumes);
        drop(self.guests);
        report
    }
}

async fn apply_manifests(supervisor: Supervisor, dir: std::path::PathBuf) {
    let specs = match crate::manifest::load_dir(&dir) {
        Ok(specs) => specs,
        Err(error) => {
            tracing::error!(dir = %dir.display(), %error, "cannot read the manifests directory");
            return;
        }
    };
    for spec in specs {
        match spec {
            Ok(spec) => {
                let name = spec.name.clone();
                match supervisor.apply(spec).await {
                    Ok(applied) => tracing::info!(
                        workload = %name,
                        replicas = applied.replicas,
                        sha256 = %applied.digest,
                        "static workload applied"
                    ),
                    Err(error) => tracing::error!(
                        workload = %name,
                        error = %flotilla_telemetry::error_chain(&error),
                        "static workload rejected"
                    ),
                }
            }
            Err(error) => {
                tracing::error!(error = %flotilla_telemetry::error_chain(&error), "invalid manifest")
            }
        }
    }
}
