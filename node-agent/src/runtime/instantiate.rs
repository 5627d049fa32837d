//! Instantiation of each kind of artifact: a command module and its `_start`, a command
//! component, or a replica of an HTTP handler (a route, with a fresh sandbox per request); and
//! the runs of the first two.

use std::sync::Arc;

use wasmtime::{Store, TypedFunc};
use wasmtime_wasi::p2::bindings::Command;

use super::artifacts::Artifact;
use super::cpu::CpuUsage;
use super::exit::{Exit, classify};
use super::http::{HttpPool, HttpReplica, HttpRoutes, RequestSandbox};
use super::logs::LogBuffer;
use super::prepared::PreparedWorkload;
use super::sandbox::{SandboxInstance, SandboxName};
use super::stdin::StdinPipe;
use super::store::{P1State, P2State, P2Wasi, Stores};
use super::threads::{RunningGroup, ThreadGroup, ThreadSettings};
use super::volumes::{Mounts, VolumeConfig};
use crate::metrics::HttpMetrics;

/// A sandbox after instantiation.
pub enum WasmtimeInstance {
    /// A preview 1 command module and its `_start`.
    Module(Store<P1State>, TypedFunc<(), ()>),
    /// A preview 2 command component.
    Component(Store<P2State>, Command),
    /// A preview 1 command module with threads, each on an OS thread of its own, its main
    /// thread started.
    Threaded(Arc<ThreadGroup>, RunningGroup),
    /// A WASI 0.3 command component, whose `run` is an async export.
    ComponentP3(Store<P2State>, wasmtime_wasi::p3::bindings::Command),
    /// A replica of an HTTP workload: a route, with a fresh sandbox per request.
    Http(HttpReplica),
}

impl SandboxInstance for WasmtimeInstance {
    async fn run(self) -> Exit {
        match self {
            WasmtimeInstance::Module(mut store, start) => {
                match Box::pin(start.call_async(&mut store, ())).await {
                    Ok(()) => Exit::Exited(0),
                    Err(e) => classify(e, &store.data().limiter),
                }
            }
            WasmtimeInstance::Component(mut store, command) => {
                match Box::pin(command.wasi_cli_run().call_run(&mut store)).await {
                    Ok(Ok(())) => Exit::Exited(0),
                    Ok(Err(())) => Exit::Exited(1),
                    Err(e) => classify(e, &store.data().limiter),
                }
            }
            WasmtimeInstance::ComponentP3(mut store, command) => {
                let run = store.run_concurrent(async move |accessor| {
                    command.wasi_cli_run().call_run(accessor).await
                });
                match Box::pin(run).await {
                    Ok(Ok(Ok(()))) => Exit::Exited(0),
                    Ok(Ok(Err(()))) => Exit::Exited(1),
                    Ok(Err(e)) | Err(e) => classify(e, &store.data().limiter),
                }
            }
            WasmtimeInstance::Threaded(group, running) => group.run(running).await,
            WasmtimeInstance::Http(replica) => replica.run().await,
        }
    }
}

/// What instantiation needs besides the workload: stores, where volumes live, and where HTTP
/// replicas register.
pub(super) struct Instantiator {
    /// Makes the sandboxes' stores.
    pub stores: Stores,
    /// Where volumes live and which node directories they may mount.
    pub volumes: VolumeConfig,
    /// Where HTTP replicas are routed to.
    pub routes: HttpRoutes,
    /// Metrics of the HTTP workloads.
    pub http_metrics: HttpMetrics,
    /// What bounds the threads of a module with threads.
    pub threads: ThreadSettings,
}

// === impl Instantiator ===

impl Instantiator {
    /// A fresh sandbox of `prepared`: its volumes (made on its first run, reused by its
    /// restarts), a new store and WASI context, then instantiation, which already runs guest
    /// code. An HTTP replica is instantiated once up front, answers its readiness request if it
    /// has one, and is routed to from then on.
    ///
    /// # Errors
    /// The [`Exit`] that ended the sandbox before it could run.
    pub(super) async fn instantiate(
        &self,
        prepared: &Arc<PreparedWorkload>,
        sandbox: SandboxName<'_>,
        logs: Arc<LogBuffer>,
        stdin: Option<Arc<StdinPipe>>,
        cpu: Arc<CpuUsage>,
        volumes: &mut Option<Arc<Mounts>>,
    ) -> Result<WasmtimeInstance, Exit> {
        let mounts = match volumes {
            _ if prepared.volumes.is_empty() => None,
            Some(mounts) => Some(mounts.clone()),
            None => {
                let mounts = Arc::new(Mounts::create(
                    &prepared.volumes,
                    prepared.environment.namespace(),
                    prepared.limits.memory_bytes,
                    &self.volumes,
                    self.stores.sources().config_files(),
                )?);
                *volumes = Some(mounts.clone());
                Some(mounts)
            }
        };
        let mut wasi = prepared.environment.wasi(
            self.stores.sources(),
            &sandbox,
            &logs,
            stdin.as_ref(),
            mounts.as_deref(),
        )?;
        // The store of any component: WASI with `wasi:http`, under the workload's egress.
        let component_store = |wasi| {
            let egress = prepared.environment.egress(self.stores.sources());
            self.stores.new_store(
                P2Wasi::new(wasi, egress, &logs),
                &prepared.limits,
                &cpu,
                mounts.clone(),
            )
        };
        match &*prepared.artifact {
            Artifact::Module(pre) => {
                let mut store =
                    self.stores
                        .new_store(wasi.build_p1(), &prepared.limits, &cpu, mounts);
                // Boxed: inline, this future would enlarge every long-lived sandbox task.
                let instance = Box::pin(pre.instantiate_async(&mut store)).await;
                let start = instance
                    .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
                    .map_err(|e| classify(e, &store.data().limiter))?;
                Ok(WasmtimeInstance::Module(store, start))
            }
            Artifact::Threaded(module) => {
                // `wasi` showed that the environment and volumes resolve; every thread gets a
                // context of its own, built alike.
                drop(wasi);
                let environment = prepared.environment.clone();
                let sources = self.stores.sources().clone();
                let sandbox = sandbox.to_string();
                let wasi = move |main: bool| {
                    let stdin = stdin.as_ref().filter(|_| main);
                    environment
                        .wasi(&sources, &sandbox, &logs, stdin, mounts.as_deref())
                        .map(|mut wasi| wasi.build_p1())
                };
                let group = ThreadGroup::new(
                    module.clone(),
                    &prepared.limits,
                    cpu,
                    Box::new(wasi),
                    self.threads.clone(),
                )?;
                let running = group.start_main().await?;
                Ok(WasmtimeInstance::Threaded(group, running))
            }
            Artifact::Command(pre) => {
                let mut store = component_store(wasi);
                let command = Box::pin(pre.instantiate_async(&mut store)).await;
                let command = command.map_err(|e| classify(e, &store.data().limiter))?;
                Ok(WasmtimeInstance::Component(store, command))
            }
            Artifact::CommandP3(pre) => {
                let mut store = component_store(wasi);
                let command = Box::pin(pre.instantiate_async(&mut store)).await;
                let command = command.map_err(|e| classify(e, &store.data().limiter))?;
                Ok(WasmtimeInstance::ComponentP3(store, command))
            }
            Artifact::Proxy(pre) => {
                let Some(settings) = prepared.http() else {
                    return Err(Exit::Trap("an HTTP handler without spec.http".into()));
                };
                // One instantiation up front: a handler that cannot start (a start function
                // that traps, limits too small) fails the replica, not every request.
                let mut store = component_store(wasi);
                let instantiated = Box::pin(pre.instantiate(&mut store)).await;
                instantiated.map_err(|e| classify(e, &store.data().limiter))?;
                drop(store);
                let pool = Arc::new(HttpPool::new(
                    RequestSandbox {
                        stores: self.stores.clone(),
                        workload: prepared.name().clone(),
                        environment: prepared.environment.clone(),
                        limits: prepared.limits,
                        sandbox: sandbox.to_string().into(),
                        logs,
                        cpu,
                        mounts,
                    },
                    pre.clone(),
                    settings,
                    self.http_metrics.workload(&settings.owner),
                ));
                if let Some(path) = &settings.readiness_path {
                    // Boxed: inline, a whole request's future would enlarge every sandbox task.
                    Box::pin(pool.check_ready(&settings.route, path)).await?;
                }
                HttpReplica::register(&self.routes, settings.route.clone(), &settings.owner, pool)
                    .map(WasmtimeInstance::Http)
            }
        }
    }
}
