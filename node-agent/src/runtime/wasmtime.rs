//! [`WasmtimeRuntime`]: the [`SandboxRuntime`] built on wasmtime.
//!
//! One `Engine` per process with the pooling allocator sized from [`RuntimeConfig`] and the
//! `vm.max_map_count` ceiling, copy-on-write memory images and epoch interruption (one ticker
//! thread holding only a weak engine reference). Compiled modules and components are cached by
//! digest with their pre-linked `InstancePre`, in memory and, when a cache directory is set, on
//! disk so that a restarted agent does not compile again.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::agent::v1::{EnvFrom, EnvVar, Volume, WorkloadSpec, module_source};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};
use wasmtime::component::{Component, Linker as ComponentLinker, ResourceTable};
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, TypedFunc, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::{Command, CommandPre};
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::capacity::{self, Capacity};
use super::http::{
    DEFAULT_MAX_CONCURRENCY, DEFAULT_REQUEST_TIMEOUT, HttpPool, HttpReplica, HttpRoutes,
    HttpSettings, RouteKey,
};
use super::limits::{CpuLimitExceeded, Limiter, MemoryLimitExceeded, SandboxLimits};
use super::logs::{LogBuffer, LogSink};
use super::volumes::{self, ConfigFiles, ConfigKey, Mounts};
use super::{
    Exit, Prepared, RuntimeConfig, SandboxError, SandboxInstance, SandboxName, SandboxRuntime,
};
use crate::metrics::HttpMetrics;

/// Per-store state: the guest's WASI context, its limits, and the volumes its run mounts
/// (removed when the store is dropped, unless an HTTP replica still shares them).
pub struct SandboxState<W> {
    wasi: W,
    limiter: Limiter,
    _mounts: Option<Arc<Mounts>>,
}

/// WASI state of a preview 2 component: WASI, and `wasi:http` for handlers and for outgoing
/// requests.
pub struct P2Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
}

impl WasiView for SandboxState<P2Wasi> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

impl WasiHttpView for SandboxState<P2Wasi> {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.wasi.http,
            table: &mut self.wasi.table,
            hooks: wasmtime_wasi_http::default_hooks(),
        }
    }
}

type P1State = SandboxState<WasiP1Ctx>;
/// Store state of a component sandbox (command or HTTP handler).
pub type P2State = SandboxState<P2Wasi>;

/// A compiled, pre-linked module or component, shared by every workload with the same digest.
enum Artifact {
    Module(InstancePre<P1State>),
    Command(CommandPre<P2State>),
    Proxy(ProxyPre<P2State>),
}

/// A workload ready to be instantiated: its artifact plus the per-workload configuration.
pub struct PreparedWorkload {
    name: Arc<str>,
    digest: String,
    artifact: Arc<Artifact>,
    /// Set for an HTTP workload.
    http: Option<HttpSettings>,
    /// argv, with the workload name as argv[0].
    args: Box<[String]>,
    env: Box<[(String, String)]>,
    /// Set when the environment takes values from ConfigMaps or Secrets, read at each start.
    config_env: Option<Box<ConfigEnv>>,
    /// Directories each sandbox mounts.
    volumes: Box<[Volume]>,
    /// The namespace of the ConfigMaps and Secrets it refers to.
    namespace: String,
    limits: SandboxLimits,
}

/// An environment with values from ConfigMaps and Secrets, in the order Kubernetes applies it:
/// `envFrom` first, then `env` (later names win).
struct ConfigEnv {
    from: Vec<EnvFrom>,
    vars: Vec<EnvVar>,
}

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

impl PreparedWorkload {
    /// The workload's name on this agent.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The route and per-request limits, for an HTTP workload.
    pub fn http(&self) -> Option<&HttpSettings> {
        self.http.as_ref()
    }

    /// The WASI context of `sandbox` on `node`: arguments, environment (read from `files`
    /// now, when it comes from ConfigMaps or Secrets), output to `logs`, and the directories
    /// of `mounts`.
    fn wasi(
        &self,
        (sandbox, node): (&dyn std::fmt::Display, &str),
        logs: &Arc<LogBuffer>,
        files: &ConfigFiles,
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
                    node,
                };
                wasi.envs(&config_env.resolve(&fields, files)?);
            }
        }
        if let Some(mounts) = mounts {
            mounts.preopen(&mut wasi)?;
        }
        Ok(wasi)
    }
}

impl Prepared for PreparedWorkload {
    fn digest(&self) -> &str {
        &self.digest
    }

    fn limits(&self) -> &SandboxLimits {
        &self.limits
    }
}

/// A sandbox after instantiation.
pub enum WasmtimeInstance {
    /// A preview 1 command module and its `_start`.
    Module(Store<P1State>, TypedFunc<(), ()>),
    /// A preview 2 command component.
    Component(Store<P2State>, Command),
    /// A replica of an HTTP workload: a route, with a fresh sandbox per request.
    Http(HttpReplica),
}

/// The wasmtime-backed sandbox runtime. Cheap to clone.
#[derive(Clone)]
pub struct WasmtimeRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    module_linker: Linker<P1State>,
    component_linker: ComponentLinker<P2State>,
    config: RuntimeConfig,
    capacity: Capacity,
    compile_permits: Arc<Semaphore>,
    artifacts: Mutex<HashMap<String, Arc<OnceCell<Arc<Artifact>>>>>,
    compiled: AtomicU64,
    loaded: AtomicU64,
    http_routes: HttpRoutes,
    http_metrics: HttpMetrics,
    config_files: ConfigFiles,
}

/// How modules were obtained since the runtime started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Modules and components compiled by Cranelift.
    pub compiled: u64,
    /// Modules and components loaded from the on-disk artifact cache.
    pub loaded_from_disk: u64,
    /// Digests whose artifacts are held in memory.
    pub in_memory: usize,
}

/// Why the runtime could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine rejected the configuration (a pool the host cannot map, for example).
    #[error("creating the wasmtime engine")]
    CreateEngine(#[source] wasmtime::Error),
    /// WASI could not be added to a linker.
    #[error("linking WASI")]
    LinkWasi(#[source] wasmtime::Error),
    /// The artifact cache directory could not be created.
    #[error("creating cache directory {0}")]
    CacheDir(PathBuf, #[source] std::io::Error),
}

// === impl WasmtimeRuntime ===

impl WasmtimeRuntime {
    /// Creates the engine, its pool (sized to what `vm.max_map_count` allows), the WASI linkers and
    /// the epoch ticker.
    ///
    /// # Errors
    /// Fails if the engine cannot be created with this configuration.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let capacity = capacity::derive(&config, capacity::read_max_map_count(), None);
        Self::with_capacity(config, capacity)
    }

    /// Like [`new`](Self::new), with the capacity already derived.
    ///
    /// # Errors
    /// Fails if the engine cannot be created with this configuration.
    pub fn with_capacity(config: RuntimeConfig, capacity: Capacity) -> Result<Self, RuntimeError> {
        let mut engine_config = engine_config(&config);
        engine_config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(
            &config, &capacity,
        )));
        let engine = Engine::new(&engine_config).map_err(RuntimeError::CreateEngine)?;

        let mut module_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module_linker, |s: &mut P1State| &mut s.wasi)
            .map_err(RuntimeError::LinkWasi)?;
        let mut component_linker = ComponentLinker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)
            .map_err(RuntimeError::LinkWasi)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut component_linker)
            .map_err(RuntimeError::LinkWasi)?;

        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| RuntimeError::CacheDir(dir.clone(), e))?;
        }
        spawn_epoch_ticker(&engine, config.epoch_tick);
        let config_files = ConfigFiles::new(&config.volumes);

        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                module_linker,
                component_linker,
                compile_permits: Arc::new(Semaphore::new(config.compile_concurrency.max(1))),
                config,
                capacity,
                artifacts: Mutex::new(HashMap::new()),
                compiled: AtomicU64::new(0),
                loaded: AtomicU64::new(0),
                http_routes: HttpRoutes::default(),
                http_metrics: HttpMetrics::default(),
                config_files,
            }),
        })
    }

    /// The engine, for tools that must share its configuration (benchmarks).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The routes of the HTTP replicas running here, for the ingress.
    pub fn http_routes(&self) -> &HttpRoutes {
        &self.inner.http_routes
    }

    /// Metrics of the HTTP workloads, for the agent's registry.
    pub fn http_metrics(&self) -> &HttpMetrics {
        &self.inner.http_metrics
    }

    /// The ConfigMaps and Secrets the control plane handed this agent.
    pub fn config_files(&self) -> &ConfigFiles {
        &self.inner.config_files
    }

    /// A fresh store for one request of an HTTP workload, with its replica's `mounts`.
    ///
    /// # Errors
    /// The environment or the mounts could not be set up.
    pub(super) fn request_store(
        &self,
        prepared: &PreparedWorkload,
        sandbox: &str,
        logs: &Arc<LogBuffer>,
        mounts: Option<&Arc<Mounts>>,
    ) -> Result<Store<P2State>, Exit> {
        let wasi = prepared.wasi(
            (&sandbox, &self.inner.config.node_name),
            logs,
            &self.inner.config_files,
            mounts.map(|m| &**m),
        )?;
        Ok(self.new_store(P2Wasi::new(wasi), &prepared.limits, mounts.cloned()))
    }

    /// The configuration the runtime was created with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// How modules were obtained so far.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.inner.compiled.load(Ordering::Relaxed),
            loaded_from_disk: self.inner.loaded.load(Ordering::Relaxed),
            in_memory: self.inner.lock_artifacts().len(),
        }
    }

    async fn artifact(&self, digest: &str, bytes: Vec<u8>) -> Result<Arc<Artifact>, SandboxError> {
        let cell = self
            .inner
            .lock_artifacts()
            .entry(digest.to_string())
            .or_default()
            .clone();
        let artifact = cell
            .get_or_try_init(|| self.compile(digest.to_string(), bytes))
            .await?;
        Ok(artifact.clone())
    }

    /// Compiles (or loads from disk) and pre-links a module, off the async workers and under the
    /// compile concurrency limit.
    async fn compile(&self, digest: String, bytes: Vec<u8>) -> Result<Arc<Artifact>, SandboxError> {
        let permit = self
            .inner
            .compile_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SandboxError::Compile("the agent is shutting down".into()))?;
        let inner = self.inner.clone();
        let timeout = inner.config.compile_timeout;
        let task = tokio::task::spawn_blocking(move || {
            // The permit lives as long as the compilation, even one the caller gave up on.
            let _permit = permit;
            inner.compile_blocking(&digest, &bytes)
        });
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(result)) => result.map(Arc::new),
            Ok(Err(join)) => Err(SandboxError::Compile(format!("compiler panicked: {join}"))),
            Err(_) => Err(SandboxError::CompileTimeout(timeout)),
        }
    }

    fn resolve_limits(&self, spec: &WorkloadSpec) -> Result<SandboxLimits, SandboxError> {
        let defaults = &self.inner.config.default_limits;
        let res = spec.resources.unwrap_or_default();
        let memory_bytes = nonzero(res.memory_limit_bytes).unwrap_or(defaults.memory_bytes);
        let max = self.inner.config.max_memory_per_sandbox;
        if memory_bytes > max {
            return Err(SandboxError::Limits(format!(
                "resources.memory_limit_bytes: {memory_bytes} is over the agent's per-sandbox \
                 maximum of {max}"
            )));
        }
        let memory_request_bytes = match (
            nonzero(res.memory_request_bytes),
            nonzero(res.memory_limit_bytes),
        ) {
            (Some(request), _) if request > memory_bytes => {
                return Err(SandboxError::Limits(format!(
                    "resources.memory_request_bytes: {request} is over the memory limit of \
                     {memory_bytes}"
                )));
            }
            (Some(request), _) => request,
            // As with a Pod, a limit without a request requests the limit.
            (None, Some(limit)) => limit,
            (None, None) => defaults.memory_request_bytes,
        };
        // Rechecked here: the admin API and static manifests reach the agent without the
        // control plane's validation.
        if res.log_limit_bytes > flotilla_model::MAX_LOG_BYTES {
            return Err(SandboxError::Limits(format!(
                "resources.log_limit_bytes: {} is over the per-sandbox maximum of {}",
                res.log_limit_bytes,
                flotilla_model::MAX_LOG_BYTES
            )));
        }
        let max_ms = flotilla_model::MAX_DURATION_SECONDS as u64 * 1000;
        for (field, ms) in [
            ("resources.cpu_limit_ms", res.cpu_limit_ms),
            ("resources.deadline_ms", res.deadline_ms),
        ] {
            if ms > max_ms {
                return Err(SandboxError::Limits(format!(
                    "{field}: {ms} is over the maximum of {max_ms}"
                )));
            }
        }
        let tick = self.inner.config.epoch_tick.as_millis().max(1) as u64;
        Ok(SandboxLimits {
            memory_bytes,
            memory_request_bytes,
            cpu_ticks: nonzero(res.cpu_limit_ms)
                .map(|ms| ms.div_ceil(tick))
                .or(defaults.cpu_ticks),
            deadline: nonzero(res.deadline_ms)
                .map(Duration::from_millis)
                .or(defaults.deadline),
            log_bytes: nonzero(res.log_limit_bytes).map_or(defaults.log_bytes, |b| {
                usize::try_from(b).unwrap_or(usize::MAX)
            }),
            table_elements: nonzero(u64::from(res.max_table_elements))
                .map_or(defaults.table_elements, |e| e as usize),
            ..*defaults
        })
    }

    fn new_store<W: Send>(
        &self,
        wasi: W,
        limits: &SandboxLimits,
        mounts: Option<Arc<Mounts>>,
    ) -> Store<SandboxState<W>> {
        let mut store = Store::new(
            &self.inner.engine,
            SandboxState {
                wasi,
                limiter: Limiter::new(limits),
                _mounts: mounts,
            },
        );
        store.limiter(|s| &mut s.limiter);
        // Yield to tokio at every tick, charging the tick to the sandbox's CPU budget. The first
        // deadline must be set explicitly or every call would yield on entry.
        store.set_epoch_deadline(1);
        let tick = self.inner.config.epoch_tick;
        store.epoch_deadline_callback(move |mut cx| {
            cx.data_mut().limiter.charge_tick(tick)?;
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }
}

impl SandboxRuntime for WasmtimeRuntime {
    type Prepared = PreparedWorkload;
    type Instance = WasmtimeInstance;
    type Volumes = Mounts;

    async fn prepare(&self, spec: &WorkloadSpec) -> Result<Arc<PreparedWorkload>, SandboxError> {
        let mut limits = self.resolve_limits(spec)?;
        let (digest, bytes) = self.load_module(spec).await?;
        let artifact = self.artifact(&digest, bytes).await?;
        let http = match (&spec.http, &*artifact) {
            (Some(route), Artifact::Proxy(_)) => {
                // The deadline bounds each request; the replica itself serves until stopped.
                let timeout = nonzero(route.timeout_ms)
                    .map(Duration::from_millis)
                    .or(limits.deadline)
                    .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
                limits.deadline = None;
                let owner = if spec.owner.is_empty() {
                    &spec.name
                } else {
                    &spec.owner
                };
                Some(HttpSettings {
                    owner: owner.as_str().into(),
                    route: RouteKey::new(&route.host, &route.path_prefix),
                    max_concurrency: match route.max_concurrency {
                        0 => DEFAULT_MAX_CONCURRENCY,
                        n => n,
                    },
                    timeout,
                    readiness_path: (!route.readiness_path.is_empty())
                        .then(|| route.readiness_path.clone()),
                })
            }
            (Some(_), _) => return Err(SandboxError::NotHttpHandler),
            (None, Artifact::Proxy(_)) => return Err(SandboxError::HttpWithoutRoute),
            (None, _) => None,
        };
        volumes::check(&spec.volumes, &self.inner.config.volumes)
            .map_err(SandboxError::VolumeNotAllowed)?;
        let mut args = Vec::with_capacity(spec.args.len() + 1);
        // argv[0] is the workload's name, not the name of one of its revisions.
        args.push(if spec.owner.is_empty() {
            spec.name.clone()
        } else {
            spec.owner.clone()
        });
        args.extend(spec.args.iter().cloned());
        let uses_config = !spec.env_from.is_empty()
            || spec
                .env
                .iter()
                .any(|e| e.value_from.is_some() || !e.field_path.is_empty());
        Ok(Arc::new(PreparedWorkload {
            name: spec.name.as_str().into(),
            digest,
            artifact,
            http,
            args: args.into(),
            env: spec
                .env
                .iter()
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect(),
            config_env: uses_config.then(|| {
                Box::new(ConfigEnv {
                    from: spec.env_from.clone(),
                    vars: spec.env.clone(),
                })
            }),
            volumes: spec.volumes.clone().into(),
            namespace: spec.namespace.clone(),
            limits,
        }))
    }

    async fn instantiate(
        &self,
        prepared: &Arc<PreparedWorkload>,
        sandbox: SandboxName<'_>,
        logs: Arc<LogBuffer>,
        volumes: &mut Option<Arc<Mounts>>,
    ) -> Result<WasmtimeInstance, Exit> {
        let mounts = match volumes {
            _ if prepared.volumes.is_empty() => None,
            Some(mounts) => Some(mounts.clone()),
            None => {
                let mounts = Arc::new(Mounts::create(
                    &prepared.volumes,
                    &prepared.namespace,
                    prepared.limits.memory_bytes,
                    &self.inner.config.volumes,
                    &self.inner.config_files,
                )?);
                *volumes = Some(mounts.clone());
                Some(mounts)
            }
        };
        let mut wasi = prepared.wasi(
            (&sandbox, &self.inner.config.node_name),
            &logs,
            &self.inner.config_files,
            mounts.as_deref(),
        )?;
        match &*prepared.artifact {
            Artifact::Module(pre) => {
                let mut store = self.new_store(wasi.build_p1(), &prepared.limits, mounts);
                // Boxed: inline, this future would enlarge every long-lived sandbox task.
                let instance = Box::pin(pre.instantiate_async(&mut store))
                    .await
                    .map_err(classify)?;
                let start = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .map_err(classify)?;
                Ok(WasmtimeInstance::Module(store, start))
            }
            Artifact::Command(pre) => {
                let mut store = self.new_store(P2Wasi::new(wasi), &prepared.limits, mounts);
                let command = Box::pin(pre.instantiate_async(&mut store))
                    .await
                    .map_err(classify)?;
                Ok(WasmtimeInstance::Component(store, command))
            }
            Artifact::Proxy(pre) => {
                let Some(settings) = prepared.http() else {
                    return Err(Exit::Trap("an HTTP handler without spec.http".into()));
                };
                // One instantiation up front: a handler that cannot start (a start function
                // that traps, limits too small) fails the replica, not every request.
                let mut store = self.new_store(P2Wasi::new(wasi), &prepared.limits, mounts.clone());
                Box::pin(pre.instantiate_async(&mut store))
                    .await
                    .map_err(classify)?;
                drop(store);
                let pool = Arc::new(HttpPool::new(
                    self.clone(),
                    prepared.clone(),
                    sandbox.to_string().into(),
                    pre.clone(),
                    settings,
                    logs,
                    mounts,
                ));
                if let Some(path) = &settings.readiness_path {
                    // Boxed: inline, a whole request's future would enlarge every sandbox task.
                    Box::pin(pool.check_ready(&settings.route, path)).await?;
                }
                HttpReplica::register(
                    &self.inner.http_routes,
                    settings.route.clone(),
                    &settings.owner,
                    pool,
                )
                .map(WasmtimeInstance::Http)
            }
        }
    }

    fn capacity(&self) -> &Capacity {
        &self.inner.capacity
    }

    fn evict_unused(&self) {
        let mut artifacts = self.inner.lock_artifacts();
        artifacts.retain(|_, cell| match cell.get() {
            Some(artifact) => Arc::strong_count(artifact) > 1,
            None => Arc::strong_count(cell) > 1,
        });
    }
}

impl SandboxInstance for WasmtimeInstance {
    async fn run(self) -> Exit {
        match self {
            WasmtimeInstance::Module(mut store, start) => {
                match Box::pin(start.call_async(&mut store, ())).await {
                    Ok(()) => Exit::Exited(0),
                    Err(e) => classify(e),
                }
            }
            WasmtimeInstance::Component(mut store, command) => {
                match Box::pin(command.wasi_cli_run().call_run(&mut store)).await {
                    Ok(Ok(())) => Exit::Exited(0),
                    Ok(Err(())) => Exit::Exited(1),
                    Err(e) => classify(e),
                }
            }
            WasmtimeInstance::Http(replica) => replica.run().await,
        }
    }
}

// === impl Inner ===

impl Inner {
    fn lock_artifacts(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<OnceCell<Arc<Artifact>>>>> {
        self.artifacts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn compile_blocking(&self, digest: &str, bytes: &[u8]) -> Result<Artifact, SandboxError> {
        let started = Instant::now();
        let artifact = if is_component(bytes) {
            let component =
                self.load_or_compile(digest, bytes, |engine, bytes| Component::new(engine, bytes))?;
            let pre = self
                .component_linker
                .instantiate_pre(&component)
                .map_err(|e| SandboxError::Link(format!("{e:#}")))?;
            match CommandPre::new(pre.clone()) {
                Ok(command) => Artifact::Command(command),
                Err(not_command) => match ProxyPre::new(pre) {
                    Ok(proxy) => Artifact::Proxy(proxy),
                    Err(not_proxy) => {
                        return Err(SandboxError::Link(format!(
                            "the component exports neither wasi:cli/run ({not_command:#}) nor \
                             wasi:http/incoming-handler ({not_proxy:#})"
                        )));
                    }
                },
            }
        } else {
            let module =
                self.load_or_compile(digest, bytes, |engine, bytes| Module::new(engine, bytes))?;
            match module.get_export("_start") {
                Some(ExternType::Func(ty)) if ty.params().len() == 0 && ty.results().len() == 0 => {
                }
                _ => return Err(SandboxError::MissingStart),
            }
            let pre = self
                .module_linker
                .instantiate_pre(&module)
                .map_err(|e| SandboxError::Link(format!("{e:#}")))?;
            Artifact::Module(pre)
        };
        tracing::info!(%digest, elapsed = ?started.elapsed(), "module prepared");
        Ok(artifact)
    }

    /// Loads a precompiled artifact from the disk cache or compiles and stores it.
    fn load_or_compile<T: Serialize>(
        &self,
        digest: &str,
        bytes: &[u8],
        compile: impl FnOnce(&Engine, &[u8]) -> wasmtime::Result<T>,
    ) -> Result<T, SandboxError> {
        let path = self.cache_path(digest);
        if let Some(path) = &path
            && path.exists()
        {
            match T::deserialize_file(&self.engine, path) {
                Ok(artifact) => {
                    self.loaded.fetch_add(1, Ordering::Relaxed);
                    return Ok(artifact);
                }
                // Another wasmtime version or configuration wrote it: compile again.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring cached artifact")
                }
            }
        }
        let artifact =
            compile(&self.engine, bytes).map_err(|e| SandboxError::Compile(format!("{e:#}")))?;
        self.compiled.fetch_add(1, Ordering::Relaxed);
        if let Some(path) = &path
            && let Err(e) = write_atomically(path, &artifact)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled artifact");
        }
        Ok(artifact)
    }

    fn cache_path(&self, digest: &str) -> Option<PathBuf> {
        let dir = self.config.cache_dir.as_ref()?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        Some(dir.join(format!("{digest}-{:016x}.cwasm", hasher.finish())))
    }
}

/// A compiled artifact that can be written to and read from the disk cache.
trait Serialize: Sized {
    fn serialize(&self) -> wasmtime::Result<Vec<u8>>;
    fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<Self>;
}

impl Serialize for Module {
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Module::serialize(self)
    }

    #[allow(unsafe_code)]
    fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<Self> {
        // SAFETY: the file lives in the agent's own cache directory, was written by this agent
        // from an artifact that wasmtime compiled (atomically, via rename), and is named by the
        // module digest and the engine's compatibility hash; wasmtime checks its version and
        // configuration header before using it.
        unsafe { Module::deserialize_file(engine, path) }
    }
}

impl Serialize for Component {
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Component::serialize(self)
    }

    #[allow(unsafe_code)]
    fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<Self> {
        // SAFETY: as for `Module` above.
        unsafe { Component::deserialize_file(engine, path) }
    }
}

/// Writes an artifact to a temporary file and renames it into place. Loaded artifacts are
/// memory-mapped from their file, so a file must never be rewritten in place.
fn write_atomically<T: Serialize>(path: &Path, artifact: &T) -> std::io::Result<()> {
    let bytes = artifact
        .serialize()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

// === module loading ===

impl WasmtimeRuntime {
    async fn load_module(&self, spec: &WorkloadSpec) -> Result<(String, Vec<u8>), SandboxError> {
        let limit = self.inner.config.max_module_bytes;
        let source = spec.module.as_ref().ok_or(SandboxError::MissingModule)?;
        let bytes = match &source.source {
            Some(module_source::Source::Path(path)) => read_bounded(Path::new(path), limit).await?,
            Some(module_source::Source::Inline(bytes)) => bytes.clone(),
            None => return Err(SandboxError::MissingModule),
        };
        check_size(bytes.len() as u64, limit)?;
        let digest = hex::encode(Sha256::digest(&bytes));
        let expected = source.sha256.trim().to_ascii_lowercase();
        if !expected.is_empty() && expected != digest {
            return Err(SandboxError::DigestMismatch {
                expected,
                actual: digest,
            });
        }
        check_binary_wasm(&bytes)?;
        Ok((digest, bytes))
    }
}

async fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, SandboxError> {
    let read_err = |source| SandboxError::ReadModule {
        path: path.to_path_buf(),
        source,
    };
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await.map_err(read_err)?;
    // Checked on the opened file, so nothing can swap it between the check and the read; a
    // device such as /dev/zero reports length 0 and never ends.
    let meta = file.metadata().await.map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    check_size(meta.len(), limit)?;
    // Bounded while reading too: the file may grow after the check.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .await
        .map_err(read_err)?;
    check_size(bytes.len() as u64, limit)?;
    Ok(bytes)
}

fn check_size(size: u64, limit: u64) -> Result<(), SandboxError> {
    if size > limit {
        return Err(SandboxError::ModuleTooLarge { size, limit });
    }
    Ok(())
}

/// Checks the binary header: `\0asm`, then a core module (version 1) or a component (layer 1).
fn check_binary_wasm(bytes: &[u8]) -> Result<(), SandboxError> {
    if bytes.len() < 8 {
        return Err(SandboxError::NotBinaryWasm("shorter than a wasm header"));
    }
    if &bytes[..4] != b"\0asm" {
        return Err(SandboxError::NotBinaryWasm(
            "missing the \\0asm magic number",
        ));
    }
    if !is_component(bytes) && bytes[4..8] != [1, 0, 0, 0] {
        return Err(SandboxError::NotBinaryWasm("unknown binary version"));
    }
    Ok(())
}

fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[6..8] == [1, 0]
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

/// Turns a wasmtime error from a guest run into the [`Exit`] a user can act on.
pub(super) fn classify(err: wasmtime::Error) -> Exit {
    if let Some(exit) = err.downcast_ref::<I32Exit>() {
        return Exit::Exited(exit.0);
    }
    if let Some(oom) = err.downcast_ref::<MemoryLimitExceeded>() {
        return Exit::OutOfMemory(oom.to_string());
    }
    if let Some(cpu) = err.downcast_ref::<CpuLimitExceeded>() {
        return Exit::CpuLimit(cpu.to_string());
    }
    let mut message = err.root_cause().to_string();
    if let Some(backtrace) = err.downcast_ref::<wasmtime::WasmBacktrace>() {
        message.push('\n');
        message.push_str(backtrace.to_string().trim_end());
    }
    Exit::Trap(message)
}

/// Frames kept in a trap's wasm backtrace.
const MAX_BACKTRACE_FRAMES: usize = 32;

impl P2Wasi {
    fn new(mut wasi: WasiCtxBuilder) -> Self {
        Self {
            ctx: wasi.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
        }
    }
}

/// The pooling allocator, sized for `capacity`.
fn pool_config(config: &RuntimeConfig, capacity: &Capacity) -> PoolingAllocationConfig {
    let sandboxes = capacity.max_sandboxes.max(1);
    let defaults = &config.default_limits;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(sandboxes)
        .total_core_instances(sandboxes.saturating_mul(2))
        .total_memories(sandboxes.saturating_mul(2))
        .total_tables(sandboxes.saturating_mul(2))
        .total_stacks(sandboxes)
        .max_memory_size(usize::try_from(config.max_memory_per_sandbox).unwrap_or(usize::MAX))
        .max_memories_per_module(defaults.memories as u32)
        .max_tables_per_module(defaults.tables as u32)
        .max_memories_per_component(defaults.memories as u32)
        .max_tables_per_component(defaults.tables as u32)
        .max_core_instances_per_component(defaults.instances as u32)
        .table_elements(defaults.table_elements)
        // Reset freed slots with memset instead of madvise: madvise's TLB shootdowns (an IPI to
        // every core running the agent) keep sandbox churn, and per-request sandboxes above all,
        // from scaling past one core. PAGEMAP_SCAN (Linux 6.7+) limits the reset to the pages
        // the guest dirtied; older kernels reset the low `memory_keep_resident` bytes.
        .linear_memory_keep_resident(usize::try_from(config.memory_keep_resident).unwrap_or(0))
        .table_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
    pool
}

/// Everything but the allocator: shared by the host engine and cross-compiling engines.
fn engine_config(config: &RuntimeConfig) -> Config {
    let mut cfg = Config::new();
    cfg.epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        .async_stack_size(config.async_stack_size)
        .memory_reservation(
            config
                .memory_reservation
                .unwrap_or(config.max_memory_per_sandbox),
        )
        .memory_guard_size(config.memory_guard)
        .memory_reservation_for_growth(0)
        .memory_init_cow(true)
        // A runaway recursion must not produce a megabyte of status message.
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(MAX_BACKTRACE_FRAMES))
        // Post-MVP features that wasmtime 48 supports and Flotilla enables; threads (shared
        // memories) and GC are compiled out and rejected with a validation error.
        .wasm_simd(true)
        .wasm_relaxed_simd(true)
        .wasm_bulk_memory(true)
        .wasm_multi_value(true)
        .wasm_multi_memory(true)
        .wasm_tail_call(true)
        .wasm_extended_const(true)
        .wasm_component_model(true);
    cfg
}

/// Compiles a module or component for another architecture (a target triple such as
/// `aarch64-unknown-linux-gnu`) with the agent's engine settings, for nodes of that architecture.
///
/// # Errors
/// Fails for an unknown target or an invalid module.
pub fn precompile_for_target(
    config: &RuntimeConfig,
    target: &str,
    wasm: &[u8],
) -> Result<Vec<u8>, SandboxError> {
    check_binary_wasm(wasm)?;
    let mut cfg = engine_config(config);
    cfg.target(target)
        .map_err(|e| SandboxError::Compile(format!("target {target}: {e:#}")))?;
    let engine = Engine::new(&cfg).map_err(|e| SandboxError::Compile(format!("{e:#}")))?;
    let compiled = if is_component(wasm) {
        engine.precompile_component(wasm)
    } else {
        engine.precompile_module(wasm)
    };
    compiled.map_err(|e| SandboxError::Compile(format!("{e:#}")))
}

/// Bumps the engine's epoch every `tick` until the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine, tick: Duration) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("flotilla-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(tick);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the epoch ticker; guests will not be preempted");
    }
}
