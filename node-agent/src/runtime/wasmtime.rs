//! [`WasmtimeRuntime`]: the [`SandboxRuntime`] built on wasmtime, assembled from the pieces of
//! this module: [`Engines`], [`Artifacts`], [`Stores`] and the [`Instantiator`].

use std::future::Future;
use std::sync::Arc;

use flotilla_proto::agent::v1::WorkloadSpec;
use wasmtime::Engine;

use super::artifacts::{Artifacts, CacheStats, DiskCache, ThreadsEngine};
use super::capacity::{self, Capacity};
use super::compiler::Compiler;
use super::config::RuntimeConfig;
use super::cpu::CpuUsage;
use super::engine::host_target;
use super::engine::{Engines, Epoch};
use super::environment::EnvironmentSources;
use super::error::SandboxError;
use super::exit::Exit;
use super::http::HttpRoutes;
use super::instantiate::{Instantiator, WasmtimeInstance};
use super::limits::SandboxLimits;
use super::linker::Linkers;
use super::logs::LogBuffer;
use super::prepared::PreparedWorkload;
use super::sandbox::{SandboxName, SandboxRuntime};
use super::source;
use super::stdin::StdinPipe;
use super::store::Stores;
use super::threads::ThreadSettings;
use super::volumes::{self, ConfigFiles, Mounts};
use crate::metrics::HttpMetrics;

/// The wasmtime-backed sandbox runtime. Cheap to clone.
#[derive(Clone)]
pub struct WasmtimeRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    engines: Engines,
    artifacts: Artifacts,
    instantiator: Instantiator,
    config: RuntimeConfig,
    capacity: Capacity,
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
    CacheDir(std::path::PathBuf, #[source] std::io::Error),
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
        let engines = Engines::new(&config, &capacity).map_err(RuntimeError::CreateEngine)?;
        let engine = engines.host().clone();
        let linkers = Linkers::new(
            &engine,
            config
                .wasm_features
                .contains(flotilla_model::wasm::WasmFeature::ComponentModelAsync),
        )
        .map_err(RuntimeError::LinkWasi)?;
        // With a cache directory, it may hold artifacts precompiled elsewhere for this target
        // and these settings, named as `--precompile` names them.
        let cache = config.cache_dir.clone().map(|dir| DiskCache {
            dir,
            precompiled_suffix: super::engine::precompiled_suffix(&config, &host_target())
                .map_err(|e| tracing::warn!(error = %e, "no precompiled artifacts for this target"))
                .ok(),
        });
        let threads = match engines.threads() {
            Some(engine) => Some(ThreadsEngine {
                engine: engine.clone(),
                linker: Arc::new(super::threads::linker(engine).map_err(RuntimeError::LinkWasi)?),
            }),
            None => None,
        };
        let artifacts = Artifacts::new(
            engine.clone(),
            linkers,
            threads,
            cache,
            Compiler::new(config.compile_concurrency, config.compile_threads),
            config.compile_cost_limits,
            config.cheap_compile_code_bytes,
            config.compile_timeout,
        )
        .map_err(|e| RuntimeError::CacheDir(config.cache_dir.clone().unwrap_or_default(), e))?;
        let sources = EnvironmentSources::new(
            &config.node_name,
            ConfigFiles::new(&config.volumes),
            config.egress_denied.clone(),
        );
        let instantiator = Instantiator {
            stores: Stores::new(engine, engines.epoch().clone(), config.epoch_tick, sources),
            volumes: config.volumes.clone(),
            routes: HttpRoutes::default(),
            http_metrics: HttpMetrics::default(),
            threads: ThreadSettings {
                max_threads: config.max_threads_per_sandbox,
                max_wasm_stack: config.max_wasm_stack,
                epoch_tick: config.epoch_tick,
                epoch: engines.epoch().clone(),
            },
        };
        Ok(Self {
            inner: Arc::new(Inner {
                engines,
                artifacts,
                instantiator,
                config,
                capacity,
            }),
        })
    }

    /// The engine, for tools that must share its configuration (benchmarks).
    pub fn engine(&self) -> &Engine {
        self.inner.engines.host()
    }

    /// The engine of modules with threads, on a node that offers them (benchmarks).
    pub fn threads_engine(&self) -> Option<&Engine> {
        self.inner.engines.threads()
    }

    /// The engine's epoch, for tests that advance it themselves
    /// ([`EpochTicker::Manual`](super::config::EpochTicker::Manual)).
    pub fn epoch(&self) -> &Epoch {
        self.inner.engines.epoch()
    }

    /// The routes of the HTTP replicas running here, for the ingress.
    pub fn http_routes(&self) -> &HttpRoutes {
        &self.inner.instantiator.routes
    }

    /// Metrics of the HTTP workloads, for the agent's registry.
    pub fn http_metrics(&self) -> &HttpMetrics {
        &self.inner.instantiator.http_metrics
    }

    /// The ConfigMaps and Secrets the control plane handed this agent.
    pub fn config_files(&self) -> &ConfigFiles {
        self.inner.instantiator.stores.sources().config_files()
    }

    /// The configuration the runtime was created with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// How modules were obtained so far.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.artifacts.stats()
    }
}

impl SandboxRuntime for WasmtimeRuntime {
    type Prepared = PreparedWorkload;
    type Instance = WasmtimeInstance;
    type Volumes = Mounts;

    async fn prepare(&self, spec: &WorkloadSpec) -> Result<Arc<PreparedWorkload>, SandboxError> {
        let config = &self.inner.config;
        let limits = SandboxLimits::resolve(
            &flotilla_model::SandboxLimits::from(&spec.resources.unwrap_or_default()),
            &config.default_limits,
            config.max_memory_per_sandbox,
            config.epoch_tick,
        )?;
        let features = flotilla_model::wasm::FeatureSet::parse(&spec.wasm_features)?;
        let missing = features.without(config.wasm_features);
        if !missing.is_empty() {
            return Err(SandboxError::FeaturesNotOffered {
                missing,
                offered: config.wasm_features,
            });
        }
        let (digest, bytes) = source::load(spec.module.as_ref(), config.max_module_bytes).await?;
        // Compiles take turns per workload (its owner, for the revisions of one workload).
        let owner = if spec.owner.is_empty() {
            &spec.name
        } else {
            &spec.owner
        };
        let artifact = (self.inner.artifacts)
            .get(owner, &digest, bytes, features)
            .await?;
        let prepared = PreparedWorkload::new(spec, digest, artifact, limits)?;
        volumes::check(&spec.volumes, &config.volumes)?;
        Ok(Arc::new(prepared))
    }

    // The instantiator's future itself, not one wrapping it: it lives in every sandbox's task,
    // so a wrapper's state would cost each sandbox its size again.
    fn instantiate(
        &self,
        prepared: &Arc<PreparedWorkload>,
        sandbox: SandboxName<'_>,
        logs: Arc<LogBuffer>,
        stdin: Option<Arc<StdinPipe>>,
        cpu: Arc<CpuUsage>,
        volumes: &mut Option<Arc<Mounts>>,
    ) -> impl Future<Output = Result<WasmtimeInstance, Exit>> + Send {
        self.inner
            .instantiator
            .instantiate(prepared, sandbox, logs, stdin, cpu, volumes)
    }

    fn capacity(&self) -> &Capacity {
        &self.inner.capacity
    }

    fn evict_unused(&self) {
        self.inner.artifacts.evict_unused();
    }
}
