//! Sandbox stores: the per-run state a guest sees ([`SandboxState`], with its WASI views) and
//! [`Stores`], which makes one store per run, or per request of an HTTP workload.
//!
//! Every store holds its sandbox's [`Limiter`] from before instantiation, yields to tokio at
//! the end of each CPU slice (pausing to keep a CPU limit, see [`CpuShare`]) and charges the
//! slice to the sandbox's CPU budget and usage, and keeps the sandbox's volumes mounted for as
//! long as it lives.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::cpu::{AtDeadline, CpuShare, CpuUsage, ThreadProgress};
use super::egress::EgressPolicy;
use super::engine::Epoch;
use super::environment::{Environment, EnvironmentSources};
use super::exit::Exit;
use super::limits::{Limiter, SandboxLimits};
use super::logs::LogBuffer;
use super::outgoing::EgressHooks;
use super::volumes::Mounts;

/// Per-store state: the guest's WASI context, its limits, and the volumes its run mounts
/// (removed when the store is dropped, unless an HTTP replica still shares them).
pub struct SandboxState<W> {
    pub(super) wasi: W,
    pub(super) limiter: Limiter,
    /// The run's CPU schedule.
    cpu: CpuShare,
    /// The sandbox's CPU used, over all its runs.
    usage: Arc<CpuUsage>,
    _mounts: Option<Arc<Mounts>>,
}

/// WASI state of a preview 2 component: WASI, and `wasi:http` for handlers and for outgoing
/// requests.
pub struct P2Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    /// Sends the guest's outgoing requests under its egress policy.
    hooks: EgressHooks,
}

/// Store state of a preview 1 command module.
pub(super) type P1State = SandboxState<WasiP1Ctx>;
/// Store state of a component sandbox (command or HTTP handler).
pub type P2State = SandboxState<P2Wasi>;

// === impl P2Wasi ===

impl P2Wasi {
    /// Builds the context of one component sandbox, whose outgoing HTTP requests go out under
    /// `egress` (none at all when `None`), refusals noted in `logs`.
    pub fn new(
        mut wasi: WasiCtxBuilder,
        egress: Option<EgressPolicy>,
        logs: &Arc<LogBuffer>,
    ) -> Self {
        Self {
            ctx: wasi.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: EgressHooks::new(egress, logs.clone()),
        }
    }
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
            hooks: &mut self.wasi.hooks,
        }
    }
}

/// Makes sandbox stores on the host engine. Cheap to clone.
#[derive(Clone)]
pub struct Stores {
    engine: Engine,
    epoch: Epoch,
    epoch_tick: Duration,
    sources: EnvironmentSources,
}

// === impl Stores ===

impl Stores {
    /// Stores on `engine`, whose `epoch` advances every `epoch_tick`, with environments
    /// resolved from `sources`.
    pub fn new(
        engine: Engine,
        epoch: Epoch,
        epoch_tick: Duration,
        sources: EnvironmentSources,
    ) -> Self {
        Self {
            engine,
            epoch,
            epoch_tick,
            sources,
        }
    }

    /// What sandbox environments are resolved from.
    pub fn sources(&self) -> &EnvironmentSources {
        &self.sources
    }

    /// A fresh store holding `wasi`, limited by `limits`, charging its CPU to `usage`, keeping
    /// `mounts` mounted.
    pub fn new_store<W: Send>(
        &self,
        wasi: W,
        limits: &SandboxLimits,
        usage: &Arc<CpuUsage>,
        mounts: Option<Arc<Mounts>>,
    ) -> Store<SandboxState<W>> {
        let mut store = Store::new(
            &self.engine,
            SandboxState {
                wasi,
                limiter: Limiter::new(limits),
                cpu: CpuShare::new(
                    limits.cpu_weight,
                    limits.cpu_rate,
                    self.epoch_tick,
                    &self.epoch,
                ),
                usage: usage.clone(),
                _mounts: mounts,
            },
        );
        store.limiter(|s| &mut s.limiter);
        // The first deadline must be set explicitly or every call would yield on entry. It is
        // the fresh slice's first boundary, where its thread is measured (see `cpu`).
        store.set_epoch_deadline(1);
        let tick = self.epoch_tick;
        let epoch = self.epoch.clone();
        store.epoch_deadline_callback(move |mut cx| {
            let state = cx.data_mut();
            match state.cpu.at_deadline(epoch.now(), ThreadProgress::now) {
                AtDeadline::Continue(ticks) => Ok(UpdateDeadline::Continue(ticks)),
                AtDeadline::Yield { charge, pause } => {
                    state.usage.charge(charge, tick);
                    state.limiter.charge(charge, tick)?;
                    let resume = state.cpu.yield_future(pause, epoch.clone());
                    Ok(UpdateDeadline::YieldCustom(1, resume))
                }
            }
        });
        store
    }

    /// A fresh component store for `sandbox` of a workload with `environment` and `limits`:
    /// one request of an HTTP workload, with its replica's `mounts`.
    ///
    /// # Errors
    /// The environment or the mounts could not be set up.
    pub fn component_store(
        &self,
        environment: &Environment,
        limits: &SandboxLimits,
        sandbox: &str,
        logs: &Arc<LogBuffer>,
        usage: &Arc<CpuUsage>,
        mounts: Option<&Arc<Mounts>>,
    ) -> Result<Store<P2State>, Exit> {
        let wasi = environment.wasi(&self.sources, &sandbox, logs, None, mounts.map(|m| &**m))?;
        let egress = environment.egress(&self.sources);
        Ok(self.new_store(
            P2Wasi::new(wasi, egress, logs),
            limits,
            usage,
            mounts.cloned(),
        ))
    }
}
