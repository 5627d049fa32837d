//! [`SandboxError`]: why a workload could not be prepared, with the reason its status shows.

use std::path::PathBuf;
use std::time::Duration;

use flotilla_model::module::ModuleCheckError;
use flotilla_model::wasm::{FeatureSet, MissingFeatures, UnknownFeature};

use super::compiler::CompilerError;
use super::cost::CostError;
use super::limits::LimitsError;
use super::volumes::VolumeRefused;

/// A cause from wasmtime, with its chain.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a workload could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The spec names no module source.
    #[error("workload has no module source")]
    MissingModule,
    /// The module file could not be read.
    #[error("reading module {path}")]
    ReadModule {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The module is over the agent's size limit, not the one the spec pins, or not binary
    /// wasm.
    #[error("module refused")]
    Module(#[source] ModuleCheckError),
    /// The module uses WebAssembly proposals that the workload does not enable.
    #[error(transparent)]
    FeaturesNotEnabled(#[from] MissingFeatures),
    /// `spec.wasm.features` names a feature this agent does not know (a newer control plane's).
    #[error(transparent)]
    UnknownFeature(#[from] UnknownFeature),
    /// `spec.wasm.features` enables proposals that this node does not offer (`--wasm-features`).
    #[error(
        "spec.wasm.features enables {missing}, which this node does not offer (its agent offers \
         {offered}, set by --wasm-features)",
        offered = if offered.is_empty() { "none".to_string() } else { offered.to_string() }
    )]
    FeaturesNotOffered {
        /// What the workload enables and the node does not offer.
        missing: FeatureSet,
        /// What the node offers.
        offered: FeatureSet,
    },
    /// Validation or compilation failed.
    #[error("invalid module")]
    Compile(#[source] BoxError),
    /// Compiling for `target` is not possible (an unknown or unsupported target).
    #[error("cannot compile for target {target}")]
    Target {
        /// The target triple.
        target: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The compile could not run to its end: no thread for it, or a panic of the compiler.
    #[error("compiling the module failed")]
    Compiler(#[source] CompilerError),
    /// Compiling the module would cost more than the agent allows (too many functions or too
    /// much code), found before compiling it.
    #[error(transparent)]
    TooCostly(#[from] CostError),
    /// Compilation took longer than the agent allows.
    #[error("compiling the module took longer than {0:?}; it is too costly for this agent")]
    CompileTimeout(Duration),
    /// The module cannot be linked against WASI (an unknown import, for example).
    #[error("cannot link module")]
    Link(#[source] BoxError),
    /// A component that is neither a command nor an HTTP handler.
    #[error(
        "cannot link module: the component exports neither wasi:cli/run (of WASI 0.2 or 0.3) \
         nor wasi:http/incoming-handler ({handler})"
    )]
    NotRunnable {
        /// Why it is no HTTP handler.
        handler: String,
    },
    /// `spec.http` is set, but the component is no `wasi:http/incoming-handler`.
    #[error(
        "spec.http is set, but the module is not a component exporting \
         wasi:http/incoming-handler"
    )]
    NotHttpHandler,
    /// The component is an HTTP handler, but `spec.http` is not set.
    #[error(
        "the component exports wasi:http/incoming-handler but not wasi:cli/run; set spec.http \
         to serve it"
    )]
    HttpWithoutRoute,
    /// A module with threads that the agent cannot run as one sandbox.
    #[error("the module uses threads, but it {0}")]
    Threads(String),
    /// A component that uses threads: they are offered to core modules (`wasi-threads`).
    #[error(
        "the component uses threads (a shared memory), which are offered to core modules only \
         (wasi-threads, as wasm32-wasip1-threads builds them)"
    )]
    ThreadsInComponent,
    /// A command module without a callable `_start`.
    #[error("module has no callable `_start: func()` export; only WASI command modules can run")]
    MissingStart,
    /// The workload asks for more than the agent allows per sandbox.
    #[error(transparent)]
    Limits(#[from] LimitsError),
    /// A `hostPath` volume the agent does not allow, or `items` that would leave a volume.
    #[error(transparent)]
    VolumeNotAllowed(#[from] VolumeRefused),
    /// Egress rules the control plane would have refused.
    #[error("invalid egress rules: {0}")]
    Egress(String),
    /// HTTP settings the control plane would have refused.
    #[error("invalid spec.http: {0}")]
    Http(String),
}

// === impl SandboxError ===

impl SandboxError {
    /// Checks that `module` is a command: it exports a callable `_start: func()`.
    ///
    /// # Errors
    /// [`SandboxError::MissingStart`] otherwise.
    pub(super) fn check_start(module: &wasmtime::Module) -> Result<(), SandboxError> {
        match module.get_export("_start") {
            Some(wasmtime::ExternType::Func(ty))
                if ty.params().len() == 0 && ty.results().len() == 0 =>
            {
                Ok(())
            }
            _ => Err(SandboxError::MissingStart),
        }
    }

    /// The machine-readable reason shown in sandbox status.
    pub fn reason(&self) -> &'static str {
        match self {
            SandboxError::ReadModule { .. } | SandboxError::MissingModule => "ModuleUnavailable",
            SandboxError::Limits(_) => "InvalidLimits",
            SandboxError::VolumeNotAllowed(_) => "VolumeNotAllowed",
            SandboxError::FeaturesNotOffered { .. } => "WasmFeatureNotOffered",
            SandboxError::Egress(_) => "InvalidEgress",
            SandboxError::Http(_) => "InvalidHttp",
            SandboxError::TooCostly(_) | SandboxError::CompileTimeout(_) => "ModuleTooCostly",
            _ => "InvalidModule",
        }
    }
}
