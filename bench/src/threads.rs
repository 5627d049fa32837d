//! Bare wasmtime running a module with threads: wasmtime 48 has no `wasi-threads` of its own
//! (47 removed it), so this is the least an embedder writes for it: the agent's threads
//! engine, one shared memory per run, and a `thread-spawn` that starts an OS thread with a
//! store and instance of its own. No limits, no CPU accounting, no stopping.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wasmtime::{Caller, Engine, Extern, ExternType, Instance, Linker, Module, SharedMemory, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::Measurement;

/// One thread's store state.
struct BareThread {
    wasi: WasiP1Ctx,
    run: Arc<BareRun>,
}

/// One run: its module, linker and memory.
struct BareRun {
    module: Module,
    linker: Arc<Linker<BareThread>>,
    memory: SharedMemory,
    next_id: AtomicUsize,
}

impl BareRun {
    /// An instance of the module in a fresh store on this OS thread.
    fn instantiate(self: &Arc<Self>) -> anyhow::Result<(Store<BareThread>, Instance)> {
        let engine = self.module.engine();
        let mut store = Store::new(
            engine,
            BareThread {
                wasi: WasiCtxBuilder::new().build_p1(),
                run: self.clone(),
            },
        );
        // The engine interrupts at epochs; a bare run is never interrupted.
        store.set_epoch_deadline(1 << 40);
        let mut imports = Vec::new();
        for import in self.module.imports() {
            imports.push(match import.ty() {
                ExternType::Memory(_) => Extern::SharedMemory(self.memory.clone()),
                _ => self
                    .linker
                    .get_by_import(&mut store, &import)
                    .with_context(|| format!("import {}::{}", import.module(), import.name()))?,
            });
        }
        let instance = Instance::new(&mut store, &self.module, &imports)?;
        Ok((store, instance))
    }

    fn spawn(self: &Arc<Self>, start_arg: i32) -> i32 {
        let id = i32::try_from(self.next_id.fetch_add(1, Ordering::Relaxed) + 1).unwrap_or(-1);
        let run = self.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let Ok((mut store, instance)) = run.instantiate() else {
                    return;
                };
                if let Ok(start) =
                    instance.get_typed_func::<(i32, i32), ()>(&mut store, "wasi_thread_start")
                {
                    let _ = start.call(&mut store, (id, start_arg));
                }
            });
        if spawned.is_ok() { id } else { -1 }
    }
}

/// Runs `count` runs of `wasm` at once on `engine`: when each instantiated its main thread's
/// instance (from the run's start, before its OS thread is made, as the agent's start is
/// counted from before it makes one), and how long all took to end.
pub fn bare(engine: &Engine, wasm: &[u8], count: u32) -> anyhow::Result<Measurement> {
    let module = Module::new(engine, wasm)?;
    let memory_type = module
        .imports()
        .find_map(|i| match i.ty() {
            ExternType::Memory(ty) => Some(ty),
            _ => None,
        })
        .context("the module imports no memory")?;
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |t: &mut BareThread| &mut t.wasi)?;
    linker.func_wrap(
        "wasi",
        "thread-spawn",
        |caller: Caller<'_, BareThread>, start_arg: i32| -> i32 {
            caller.data().run.clone().spawn(start_arg)
        },
    )?;
    let linker = Arc::new(linker);
    let samples = Arc::new(Mutex::new(Vec::with_capacity(count as usize)));
    let rss_before = crate::rss_bytes();
    let started = Instant::now();
    let mut mains = Vec::new();
    for _ in 0..count {
        let (module, linker, samples, memory_type) = (
            module.clone(),
            linker.clone(),
            samples.clone(),
            memory_type.clone(),
        );
        let begun = Instant::now();
        mains.push(std::thread::Builder::new().stack_size(2 << 20).spawn(
            move || -> anyhow::Result<()> {
                let run = Arc::new(BareRun {
                    memory: SharedMemory::new(module.engine(), memory_type)?,
                    module,
                    linker,
                    next_id: AtomicUsize::new(0),
                });
                let (mut store, instance) = run.instantiate()?;
                let latency = begun.elapsed();
                if let Ok(mut samples) = samples.lock() {
                    samples.push(u32::try_from(latency.as_nanos()).unwrap_or(u32::MAX));
                }
                instance
                    .get_typed_func::<(), ()>(&mut store, "_start")?
                    .call(&mut store, ())?;
                Ok(())
            },
        )?);
    }
    for main in mains {
        match main.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("a bare run failed: {e:#}"),
            Err(_) => bail!("a bare run panicked"),
        }
    }
    let elapsed: Duration = started.elapsed();
    let rss_delta = crate::rss_bytes().saturating_sub(rss_before);
    let samples = std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(crate::measurement(count, elapsed, rss_delta, samples))
}
