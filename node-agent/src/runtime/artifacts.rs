//! [`Artifacts`]: compiled, pre-linked modules and components, cached by digest in memory and,
//! when a cache directory is set, on disk, so that a restarted agent does not compile again.
//!
//! Compilation runs on the [`Compiler`]'s low-priority threads, a bounded number at once and
//! round-robin between workloads, within a timeout, after a look at what the module would cost
//! ([`cost`]). Each digest is compiled once however many workloads ask for it together.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flotilla_model::wasm::{self, FeatureSet, WasmFeature};
use tokio::sync::OnceCell;
use wasmtime::component::Component;
use wasmtime::{Engine, InstancePre, Linker, Module};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use super::compiler::Compiler;
use super::cost::{self, CostLimits};
use super::error::SandboxError;
use super::http::HandlerPre;
use super::linker::Linkers;
use super::store::{P1State, P2State};
use super::threads::{GuestThread, ThreadedModule};

/// A compiled, pre-linked module or component, shared by every workload with the same digest.
pub enum Artifact {
    /// A preview 1 command module with a `_start`.
    Module(InstancePre<P1State>),
    /// A preview 1 command module with threads, on the threads engine.
    Threaded(Arc<ThreadedModule>),
    /// A component exporting `wasi:cli/run` of WASI 0.2.
    Command(CommandPre<P2State>),
    /// A component exporting `wasi:cli/run` of WASI 0.3, an async function.
    CommandP3(wasmtime_wasi::p3::bindings::CommandPre<P2State>),
    /// An HTTP handler: a component exporting `wasi:http/incoming-handler` of WASI 0.2 or
    /// `wasi:http/handler` of WASI 0.3.
    Proxy(HandlerPre),
}

/// An artifact and the WebAssembly features its module uses, which a workload must enable to
/// run it.
struct Compiled {
    artifact: Arc<Artifact>,
    requires: FeatureSet,
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
    /// Compiles running now.
    pub compiles_running: usize,
    /// Compiles waiting for a compile slot.
    pub compiles_waiting: usize,
}

/// The compile cache of one engine. Cheap to clone.
#[derive(Clone)]
pub(super) struct Artifacts {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linkers: Linkers,
    threads: Option<ThreadsEngine>,
    cache: Option<DiskCache>,
    compiler: Compiler,
    compile_timeout: Duration,
    cost_limits: CostLimits,
    cheap_code_bytes: u64,
    cells: Mutex<HashMap<String, Arc<OnceCell<Compiled>>>>,
    compiled: AtomicU64,
    loaded: AtomicU64,
}

/// The engine of modules with threads, and their linker.
pub(super) struct ThreadsEngine {
    /// The engine, with shared memories.
    pub engine: Engine,
    /// WASI preview 1 and `thread-spawn`.
    pub linker: Arc<Linker<GuestThread>>,
}

/// Where compiled artifacts are kept across restarts.
pub(super) struct DiskCache {
    /// The directory, the agent's alone.
    pub dir: PathBuf,
    /// What follows the digest in the name of an artifact precompiled elsewhere for this
    /// agent's target and settings (by `--precompile`).
    pub precompiled_suffix: Option<String>,
}

// === impl Artifacts ===

impl Artifacts {
    /// A cache for `engine`, pre-linking with `linkers` (modules with threads on `threads`,
    /// when the node offers them), compiling with `compiler` modules within `cost_limits` and
    /// `timeout` (those of up to `cheap_code_bytes` of code as cheap ones), and keeping
    /// artifacts in `cache`'s directory (created here) when set.
    ///
    /// # Errors
    /// The cache directory could not be created.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        engine: Engine,
        linkers: Linkers,
        threads: Option<ThreadsEngine>,
        cache: Option<DiskCache>,
        compiler: Compiler,
        cost_limits: CostLimits,
        cheap_code_bytes: u64,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        if let Some(cache) = &cache {
            super::volumes::create_private_dir(&cache.dir)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linkers,
                threads,
                cache,
                compiler,
                compile_timeout: timeout,
                cost_limits,
                cheap_code_bytes,
                cells: Mutex::new(HashMap::new()),
                compiled: AtomicU64::new(0),
                loaded: AtomicU64::new(0),
            }),
        })
    }

    /// The artifact of the module `bytes` whose digest is `digest`: from memory, from disk, or
    /// compiled now in `owner`'s turn (the workload that asks first), for a workload that
    /// enables `features`.
    ///
    /// # Errors
    /// The module uses a WebAssembly feature not in `features`, costs more than the limits,
    /// does not compile, takes too long to, or cannot be linked.
    pub(super) async fn get(
        &self,
        owner: &str,
        digest: &str,
        bytes: Vec<u8>,
        features: FeatureSet,
    ) -> Result<Arc<Artifact>, SandboxError> {
        let cell = self
            .inner
            .lock_cells()
            .entry(digest.to_string())
            .or_default()
            .clone();
        let compiled = cell
            .get_or_try_init(|| self.compile(owner, digest.to_string(), bytes))
            .await?;
        // One module may serve workloads that enable different features: each is checked.
        features.check(compiled.requires)?;
        Ok(compiled.artifact.clone())
    }

    /// How modules were obtained so far.
    pub(super) fn stats(&self) -> CacheStats {
        let (compiles_running, compiles_waiting) = self.inner.compiler.load();
        CacheStats {
            compiles_running,
            compiles_waiting,
            compiled: self.inner.compiled.load(Ordering::Relaxed),
            loaded_from_disk: self.inner.loaded.load(Ordering::Relaxed),
            in_memory: self.inner.lock_cells().len(),
        }
    }

    /// Drops the artifacts no prepared workload holds any more.
    pub(super) fn evict_unused(&self) {
        self.inner.lock_cells().retain(|_, cell| match cell.get() {
            Some(compiled) => Arc::strong_count(&compiled.artifact) > 1,
            None => Arc::strong_count(cell) > 1,
        });
    }

    /// Compiles (or loads from disk) and pre-links a module on a compile thread, in `owner`'s
    /// turn, once its cost is within the limits.
    async fn compile(
        &self,
        owner: &str,
        digest: String,
        bytes: Vec<u8>,
    ) -> Result<Compiled, SandboxError> {
        let on_disk = self
            .inner
            .cache_path(&self.inner.engine, &digest)
            .is_some_and(|p| p.exists());
        let cheap = if on_disk {
            true
        } else {
            // The costs of a compile that would be cut are better known before it starts.
            let cost = cost::of(&bytes);
            self.inner.cost_limits.check(&cost)?;
            cost.code_bytes <= self.inner.cheap_code_bytes
        };
        let slot = self.inner.compiler.slot(owner, cheap).await;
        let inner = self.inner.clone();
        let timeout = inner.compile_timeout;
        // The slot lives as long as the compilation, even one the caller gave up on.
        let done = self
            .inner
            .compiler
            .run(slot, move || inner.compile_blocking(&digest, &bytes))
            .map_err(SandboxError::Compiler)?;
        match tokio::time::timeout(timeout, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(error)) => Err(SandboxError::Compiler(error)),
            Err(_) => Err(SandboxError::CompileTimeout(timeout)),
        }
    }
}

// === impl Inner ===

impl Inner {
    fn lock_cells(&self) -> MutexGuard<'_, HashMap<String, Arc<OnceCell<Compiled>>>> {
        self.cells.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn compile_blocking(&self, digest: &str, bytes: &[u8]) -> Result<Compiled, SandboxError> {
        let started = Instant::now();
        // The engine accepts every feature a workload may enable; which of them this module
        // uses is found here, once per digest, and checked for each workload that runs it.
        let requires =
            wasm::required_features(bytes).map_err(|e| SandboxError::Compile(e.into()))?;
        let threaded = requires.contains(WasmFeature::Threads);
        let artifact = if flotilla_model::module::is_component(bytes) {
            if threaded {
                return Err(SandboxError::ThreadsInComponent);
            }
            let component =
                self.load_or_compile(&self.engine, digest, bytes, |engine, bytes| {
                    Component::new(engine, bytes)
                })?;
            let pre = self
                .linkers
                .component
                .instantiate_pre(&component)
                .map_err(|e| SandboxError::Link(e.into()))?;
            if let Ok(command) = CommandPre::new(pre.clone()) {
                Artifact::Command(command)
            } else if let Ok(command) = wasmtime_wasi::p3::bindings::CommandPre::new(pre.clone()) {
                Artifact::CommandP3(command)
            } else {
                match ProxyPre::new(pre.clone()) {
                    Ok(proxy) => Artifact::Proxy(HandlerPre::P2(proxy)),
                    Err(not_proxy) => match ServicePre::new(pre) {
                        Ok(service) => Artifact::Proxy(HandlerPre::P3(service)),
                        Err(_) => {
                            return Err(SandboxError::NotRunnable {
                                handler: format!("{not_proxy:#}"),
                            });
                        }
                    },
                }
            }
        } else if threaded {
            // On a node without threads, the workload is refused for that before this runs:
            // this one does not enable them.
            let Some(threads) = &self.threads else {
                return Err(SandboxError::FeaturesNotEnabled(wasm::MissingFeatures {
                    missing: FeatureSet::NONE.with(WasmFeature::Threads),
                }));
            };
            let module =
                self.load_or_compile(&threads.engine, digest, bytes, |engine, bytes| {
                    Module::new(engine, bytes)
                })?;
            Artifact::Threaded(Arc::new(ThreadedModule::new(
                module,
                bytes,
                threads.linker.clone(),
            )?))
        } else {
            let module = self.load_or_compile(&self.engine, digest, bytes, |engine, bytes| {
                Module::new(engine, bytes)
            })?;
            SandboxError::check_start(&module)?;
            let pre = self
                .linkers
                .module
                .instantiate_pre(&module)
                .map_err(|e| SandboxError::Link(e.into()))?;
            Artifact::Module(pre)
        };
        tracing::info!(%digest, elapsed = ?started.elapsed(), %requires, "module prepared");
        Ok(Compiled {
            artifact: Arc::new(artifact),
            requires,
        })
    }

    /// Loads a precompiled artifact from the disk cache or compiles and stores it.
    fn load_or_compile<T: Serialize>(
        &self,
        engine: &Engine,
        digest: &str,
        bytes: &[u8],
        compile: impl FnOnce(&Engine, &[u8]) -> wasmtime::Result<T>,
    ) -> Result<T, SandboxError> {
        let path = self.cache_path(engine, digest);
        // What this agent compiled before, then what was precompiled for it elsewhere (for
        // the host engine only).
        let precompiled = self
            .precompiled_path(digest)
            .filter(|_| Engine::same(engine, &self.engine));
        for candidate in [&path, &precompiled].into_iter().flatten() {
            if !candidate.exists() {
                continue;
            }
            match read_sealed(candidate).and_then(|code| T::deserialize(engine, &code)) {
                Ok(artifact) => {
                    self.loaded.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%digest, path = %candidate.display(), "artifact loaded from the cache");
                    return Ok(artifact);
                }
                // Another wasmtime version or configuration wrote it, or it is not what this
                // agent wrote: compile again.
                Err(e) => {
                    tracing::warn!(path = %candidate.display(), error = %e, "ignoring cached artifact")
                }
            }
        }
        let artifact = compile(engine, bytes).map_err(|e| SandboxError::Compile(e.into()))?;
        self.compiled.fetch_add(1, Ordering::Relaxed);
        if let Some(path) = &path {
            let written = artifact
                .serialize()
                .map_err(|e| std::io::Error::other(format!("{e:#}")))
                .and_then(|code| write_sealed(path, &code));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled artifact");
            }
        }
        Ok(artifact)
    }

    fn precompiled_path(&self, digest: &str) -> Option<PathBuf> {
        let cache = self.cache.as_ref()?;
        let suffix = cache.precompiled_suffix.as_ref()?;
        Some(cache.dir.join(format!("{digest}{suffix}")))
    }

    fn cache_path(&self, engine: &Engine, digest: &str) -> Option<PathBuf> {
        let dir = &self.cache.as_ref()?.dir;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Some(dir.join(format!("{digest}-{:016x}.cwasm", hasher.finish())))
    }
}

/// A compiled artifact that can be written to and read from the disk cache.
trait Serialize: Sized {
    fn serialize(&self) -> wasmtime::Result<Vec<u8>>;
    /// The artifact from `code`, which [`read_sealed`] has checked.
    fn deserialize(engine: &Engine, code: &[u8]) -> wasmtime::Result<Self>;
}

impl Serialize for Module {
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Module::serialize(self)
    }

    #[allow(unsafe_code)]
    fn deserialize(engine: &Engine, code: &[u8]) -> wasmtime::Result<Self> {
        // SAFETY: `code` is, byte for byte, what this agent's wasmtime serialized: read_sealed
        // checked it against the SHA-256 sealed with it in a file of the agent's private cache
        // directory, named by the module digest and the engine's compatibility hash; wasmtime
        // checks its version and configuration header before using it.
        unsafe { Module::deserialize(engine, code) }
    }
}

impl Serialize for Component {
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Component::serialize(self)
    }

    #[allow(unsafe_code)]
    fn deserialize(engine: &Engine, code: &[u8]) -> wasmtime::Result<Self> {
        // SAFETY: as for `Module` above.
        unsafe { Component::deserialize(engine, code) }
    }
}

/// What a cache file starts with: this tag, then the SHA-256 of the rest (the serialized
/// artifact), so that a file this agent did not write whole is never deserialized.
const SEAL: &[u8; 16] = b"flotilla-cwasm/1";

/// Writes a serialized artifact, sealed, to a temporary file and renames it into place.
pub fn write_sealed(path: &Path, code: &[u8]) -> std::io::Result<()> {
    use sha2::Digest;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(SEAL)?;
    file.write_all(&sha2::Sha256::digest(code))?;
    file.write_all(code)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// The serialized artifact in the cache file at `path`, if its seal holds.
fn read_sealed(path: &Path) -> wasmtime::Result<Vec<u8>> {
    use sha2::Digest;
    let mut bytes = std::fs::read(path)?;
    let header = SEAL.len() + 32;
    if bytes.len() < header || &bytes[..SEAL.len()] != SEAL {
        wasmtime::bail!("not a sealed Flotilla artifact");
    }
    if sha2::Sha256::digest(&bytes[header..])[..] != bytes[SEAL.len()..header] {
        wasmtime::bail!("its content does not match its seal");
    }
    bytes.drain(..header);
    Ok(bytes)
}
