//! Modules with threads (`spec.wasm.features: [threads]`): a WASI preview 1 command that
//! imports a shared memory and spawns threads with `wasi-threads`' `thread-spawn`, as
//! `wasm32-wasip1-threads` toolchains build them. Wasmtime 47 removed its own `wasi-threads`;
//! this is the agent's, bounded as every other sandbox is.
//!
//! A [`ThreadGroup`] is one run of such a sandbox:
//! - **One OS thread per guest thread.** `memory.atomic.wait` blocks the thread it runs on and
//!   no epoch deadline interrupts it, so a guest thread never runs on the agent's shared guest
//!   workers: each has an OS thread of its own, created from the sandbox's replica worker and so
//!   at its nice value. Each thread has its own store and instance over the one shared memory,
//!   on the threads engine (on-demand allocation: the pool cannot hold shared memories). Only
//!   the main thread's instance is made on the sandbox's worker, asynchronously as any
//!   sandbox's (a start function yields at its deadlines); its `_start` runs on its OS thread.
//! - **Bounded.** At most `--max-threads-per-sandbox` threads run at once (`thread-spawn` fails
//!   past it, as `pthread_create` does with `EAGAIN`). The shared memory's maximum is cut to the
//!   memory limit, so growing past it fails as any growth past the limit does. The threads
//!   together are charged their CPU time (measured per OS thread at each deadline) against the
//!   sandbox's `cpuTime` budget and its usage, and kept to its `limits.cpu` rate (one core
//!   without a limit, as any sandbox): a thread ahead of the rate pauses at its next deadline.
//! - **Shares.** Each thread runs in slices and takes turns in the agent's run queue as any
//!   sandbox does (see `cpu`), blocking its OS thread while it waits for a CPU slot, and weighs
//!   the sandbox's `requests.cpu` divided by its running threads: a sandbox gets the same share
//!   of the guest CPU slots however many threads it runs. The threads engine's epoch moves with
//!   the host engine's, so its deadlines fall on the same ticks.
//! - **Ending.** The run ends when `_start` returns (exit code 0), when any thread calls
//!   `proc_exit` (its code) or traps (that trap, or the limit it hit), or when the agent stops
//!   the sandbox. Then every other thread is stopped: each traps at its next epoch check, and a
//!   thread parked in `memory.atomic.wait` is woken by a notify at every aligned address of the
//!   memory until none is left. A thread blocked in a WASI call (a sleep, a read) stops when
//!   the call returns; the run is reported at most [`STOP_GRACE`] after it ended.
//! - **WASI per thread.** Each thread gets a WASI context of its own, built as the main
//!   thread's is (arguments, environment, preopened volumes, output to the sandbox's logs), as
//!   wasmtime-wasi's preview 1 context cannot be shared between threads: a descriptor that one
//!   thread opens is not visible to another. Only the main thread reads stdin.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::{
    Caller, Engine, Extern, ExternType, Instance, Linker, MemoryType, MemoryTypeBuilder, Module,
    SharedMemory, Store, TypedFunc, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;

use super::cpu::{
    AtDeadline, CORE_MILLICORES, CpuShare, CpuUsage, ThreadProgress, thread_cpu_time,
};
use super::engine::Epoch;
use super::error::SandboxError;
use super::exit::{Exit, classify};
use super::limits::{CpuLimitExceeded, Limiter, SandboxLimits};

/// The name of every guest thread's OS thread.
pub const GUEST_THREAD_NAME: &str = "guest-thread";

/// How long a run's end waits for threads blocked in WASI calls before it is reported.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(1);

/// The longest a thread ahead of its sandbox's CPU rate sleeps at one tick.
const MAX_RATE_PAUSE: Duration = Duration::from_millis(100);

/// A compiled module with threads, checked to import one shared memory and define none.
pub struct ThreadedModule {
    module: Module,
    /// The type of the memory it imports, as declared.
    memory: MemoryType,
    linker: Arc<Linker<GuestThread>>,
}

/// The store state of one guest thread.
pub(super) struct GuestThread {
    wasi: WasiP1Ctx,
    limiter: Limiter,
    /// The thread's turns in the agent's run queue.
    cpu: CpuShare,
    group: Arc<ThreadGroup>,
    /// The OS thread's CPU time when it was last charged.
    charged: Duration,
    /// Whether the store runs on the sandbox's worker (the main thread's instantiation, async)
    /// rather than on an OS thread of its own.
    on_worker: bool,
}

/// Builds the WASI context of a thread; `true` for the main thread, which alone reads stdin.
pub(super) type WasiFactory = Box<dyn Fn(bool) -> Result<WasiP1Ctx, Exit> + Send + Sync>;

/// One run of a sandbox with threads. See the module's doc.
pub struct ThreadGroup {
    module: Arc<ThreadedModule>,
    memory: SharedMemory,
    wasi: WasiFactory,
    limits: SandboxLimits,
    usage: Arc<CpuUsage>,
    /// The `cpuTime` budget, in microseconds.
    budget_micros: Option<u64>,
    /// The rate cap in millicores.
    rate: u64,
    /// `resources.requests.cpu` in millicores, shared out between the running threads.
    weight: u64,
    tick: Duration,
    epoch: Epoch,
    /// The sandboxes' runtime, on which threads wait for their turns.
    handle: tokio::runtime::Handle,
    /// The furthest virtual runtime any of the threads reached.
    virtual_runtime: AtomicU64,
    max_threads: u32,
    /// Native stack of each thread: the wasm stack and room for the host's calls.
    stack_size: usize,
    started: Instant,
    /// CPU used by all threads of this run, in microseconds.
    used_micros: AtomicU64,
    next_id: AtomicU32,
    stopping: AtomicBool,
    state: Mutex<GroupState>,
    changed: Condvar,
    /// Set once the run's exit is decided and then once every thread has ended.
    progress: tokio::sync::watch::Sender<Progress>,
}

#[derive(Default)]
struct GroupState {
    running: u32,
    exit: Option<Exit>,
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Progress {
    Running,
    Decided,
    Ended,
}

/// The error with which the threads of a run that has ended trap.
#[derive(Debug, thiserror::Error)]
#[error("another thread of the sandbox ended its run")]
struct Stopping;

/// Which entry point a thread runs.
enum Entry {
    /// `_start` of the main thread's instance, made on the sandbox's worker.
    Main(Store<GuestThread>, TypedFunc<(), ()>),
    Spawned {
        id: i32,
        start_arg: i32,
    },
}

/// A run whose main thread is instantiated and running: stops every thread when dropped.
pub struct RunningGroup {
    _stop: StopOnDrop,
}

// === impl ThreadedModule ===

impl ThreadedModule {
    /// Checks `module` (compiled on the threads engine from `bytes`) and links it with
    /// `linker`.
    ///
    /// # Errors
    /// The module defines a memory of its own, or imports none or an unshared one, or lacks
    /// `_start`, or imports `thread-spawn` without exporting `wasi_thread_start`.
    pub(super) fn new(
        module: Module,
        bytes: &[u8],
        linker: Arc<Linker<GuestThread>>,
    ) -> Result<Self, SandboxError> {
        let refuse = |why: &str| Err(SandboxError::Threads(why.to_string()));
        if defines_memory(bytes) {
            return refuse(
                "defines a memory of its own: each thread would get another; it must import \
                 one shared memory (as wasm-ld's --import-memory --shared-memory does)",
            );
        }
        let mut memories = module.imports().filter_map(|import| match import.ty() {
            ExternType::Memory(ty) => Some(ty),
            _ => None,
        });
        let memory = match (memories.next(), memories.next()) {
            (Some(ty), None) if ty.is_shared() => ty,
            (None, _) => return refuse("imports no memory; it must import one shared memory"),
            (Some(_), None) => return refuse("imports a memory that is not shared"),
            (Some(_), Some(_)) => return refuse("imports more than one memory"),
        };
        drop(memories);
        // WASI's function names are checked when a thread instantiates the module.
        for import in module.imports() {
            let known = match import.ty() {
                ExternType::Memory(_) => true,
                _ => {
                    import.module() == "wasi_snapshot_preview1"
                        || (import.module(), import.name()) == ("wasi", "thread-spawn")
                }
            };
            if !known {
                return Err(SandboxError::Link(
                    format!(
                        "unknown import {}::{}: a module with threads may import WASI preview 1 \
                         and wasi::thread-spawn",
                        import.module(),
                        import.name()
                    )
                    .into(),
                ));
            }
        }
        if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
            return refuse(
                "does not export its memory as `memory`, where WASI reads and writes (as \
                 wasm-ld's --export-memory does)",
            );
        }
        SandboxError::check_start(&module)?;
        let spawns = module
            .imports()
            .any(|i| i.module() == "wasi" && i.name() == "thread-spawn");
        if spawns {
            match module.get_export("wasi_thread_start") {
                Some(ExternType::Func(ty)) if ty.params().len() == 2 && ty.results().len() == 0 => {
                }
                _ => {
                    return refuse(
                        "imports wasi::thread-spawn but exports no \
                         `wasi_thread_start: func(i32, i32)`",
                    );
                }
            }
        }
        Ok(Self {
            module,
            memory,
            linker,
        })
    }

    /// The memory type a sandbox limited to `memory_bytes` gets: the declared one, its maximum
    /// cut to the limit (a valid import, as a smaller maximum is a subtype).
    ///
    /// # Errors
    /// [`Exit::OutOfMemory`] when even the declared minimum is above the limit.
    fn memory_type(&self, memory_bytes: u64) -> Result<MemoryType, Exit> {
        let declared = &self.memory;
        let page = declared.page_size();
        let limit_pages = memory_bytes / page;
        if declared.minimum() > limit_pages {
            return Err(Exit::OutOfMemory(format!(
                "the module's shared memory starts at {} bytes, above the memory limit of \
                 {memory_bytes} bytes",
                declared.minimum().saturating_mul(page)
            )));
        }
        let maximum = declared.maximum().unwrap_or(limit_pages).min(limit_pages);
        MemoryTypeBuilder::new()
            .shared(true)
            .memory64(declared.is_64())
            .page_size_log2(declared.page_size_log2())
            .min(declared.minimum())
            .max(Some(maximum))
            .build()
            .map_err(|e| Exit::Trap(format!("cannot create the shared memory: {e}")))
    }
}

/// Whether the module `bytes` has a memory section (defines memories of its own).
fn defines_memory(bytes: &[u8]) -> bool {
    wasmparser::Parser::new(0).parse_all(bytes).any(
        |payload| matches!(payload, Ok(wasmparser::Payload::MemorySection(s)) if s.count() > 0),
    )
}

/// The linker of modules with threads: WASI preview 1 (run synchronously, each thread on its
/// own OS thread) and `wasi::thread-spawn`.
///
/// # Errors
/// WASI could not be added.
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<GuestThread>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |t: &mut GuestThread| &mut t.wasi)?;
    linker.func_wrap(
        "wasi",
        "thread-spawn",
        |caller: Caller<'_, GuestThread>, start_arg: i32| -> i32 {
            ThreadGroup::spawn(&caller.data().group, start_arg)
        },
    )?;
    Ok(linker)
}

// === impl ThreadGroup ===

impl ThreadGroup {
    /// A run of `module` under `limits`, charging `usage`, its threads' WASI built by `wasi`:
    /// creates its shared memory.
    ///
    /// # Errors
    /// The memory does not fit the limit or cannot be created.
    pub(super) fn new(
        module: Arc<ThreadedModule>,
        limits: &SandboxLimits,
        usage: Arc<CpuUsage>,
        wasi: WasiFactory,
        settings: ThreadSettings,
    ) -> Result<Arc<Self>, Exit> {
        let ty = module.memory_type(limits.memory_bytes)?;
        let memory = SharedMemory::new(module.module.engine(), ty)
            .map_err(|e| Exit::OutOfMemory(format!("cannot create the shared memory: {e}")))?;
        let tick_micros = u64::try_from(settings.epoch_tick.as_micros()).unwrap_or(u64::MAX);
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| Exit::Trap(format!("no runtime for the sandbox's threads: {e}")))?;
        let (progress, _) = tokio::sync::watch::channel(Progress::Running);
        Ok(Arc::new(Self {
            module,
            memory,
            wasi,
            limits: *limits,
            usage,
            budget_micros: limits.cpu_ticks.map(|t| t.saturating_mul(tick_micros)),
            rate: limits.cpu_rate.unwrap_or(CORE_MILLICORES).max(1),
            weight: limits.cpu_weight.unwrap_or(0),
            tick: settings.epoch_tick,
            virtual_runtime: AtomicU64::new(settings.epoch.run_queue().virtual_time()),
            epoch: settings.epoch,
            handle,
            max_threads: settings.max_threads.max(1),
            stack_size: settings.max_wasm_stack + (1 << 20),
            started: Instant::now(),
            used_micros: AtomicU64::new(0),
            next_id: AtomicU32::new(1),
            stopping: AtomicBool::new(false),
            state: Mutex::new(GroupState::default()),
            changed: Condvar::new(),
            progress,
        }))
    }

    /// Instantiates the module for the main thread, here on the sandbox's worker as any
    /// sandbox is (a start function yields at its deadlines as theirs do), then starts the
    /// main thread's OS thread on `_start`: the sandbox is running once this returns.
    ///
    /// # Errors
    /// The environment or the instantiation failed, or no OS thread could be made.
    pub(super) async fn start_main(self: &Arc<Self>) -> Result<RunningGroup, Exit> {
        let running = RunningGroup {
            _stop: StopOnDrop(self.clone()),
        };
        let mut store = self.new_store((self.wasi)(true)?);
        store.data_mut().on_worker = true;
        let instance = match self.imports(&mut store) {
            Ok(imports) => {
                Box::pin(Instance::new_async(
                    &mut store,
                    &self.module.module,
                    &imports,
                ))
                .await
            }
            Err(e) => Err(e),
        };
        let start = instance
            .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
            .map_err(|e| classify(e, &store.data().limiter))?;
        store.data_mut().on_worker = false;
        self.start(Entry::Main(store, start))?;
        Ok(running)
    }

    /// Waits until the run started by [`start_main`](Self::start_main) ends (see the module's
    /// doc). Dropping the future stops every thread.
    pub(super) async fn run(self: Arc<Self>, running: RunningGroup) -> Exit {
        let mut progress = self.progress.subscribe();
        // The receiver's sender is `self`, alive here: waiting cannot fail.
        let _ = progress.wait_for(|p| *p >= Progress::Decided).await;
        let _ =
            tokio::time::timeout(STOP_GRACE, progress.wait_for(|p| *p == Progress::Ended)).await;
        drop(running);
        self.lock().exit.clone().unwrap_or(Exit::Stopped)
    }

    /// `thread-spawn`: a new thread running `wasi_thread_start(id, start_arg)`; its id, or -1
    /// when the sandbox already runs its most threads, is ending, or no OS thread can be made.
    fn spawn(self: &Arc<Self>, start_arg: i32) -> i32 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Thread ids are positive and below 2^29.
        let Ok(id) = i32::try_from(id & 0x1fff_ffff) else {
            return -1;
        };
        match self.start(Entry::Spawned { id, start_arg }) {
            Ok(()) => id,
            Err(_) => -1,
        }
    }

    /// Starts an OS thread for `entry`, counting it.
    fn start(self: &Arc<Self>, entry: Entry) -> Result<(), Exit> {
        {
            let mut state = self.lock();
            if self.stopping.load(Ordering::Relaxed) || state.running >= self.max_threads {
                return Err(Exit::Trap("no more threads".into()));
            }
            state.running += 1;
        }
        let group = self.clone();
        let spawned = std::thread::Builder::new()
            .name(GUEST_THREAD_NAME.into())
            .stack_size(self.stack_size)
            .spawn(move || group.run_thread(entry));
        match spawned {
            Ok(_) => Ok(()),
            Err(e) => {
                let exit = Exit::Trap(format!("cannot start a thread: {e}"));
                self.thread_ended(None);
                Err(exit)
            }
        }
    }

    /// The body of one OS thread.
    fn run_thread(self: Arc<Self>, entry: Entry) {
        let ended = match entry {
            Entry::Main(mut store, start) => {
                // Instantiated on the worker: this OS thread's CPU is counted from here.
                store.data_mut().charged = thread_cpu_time();
                let result = start.call(&mut store, ());
                outcome(result.map(|()| Some(Exit::Exited(0))), &store)
            }
            Entry::Spawned { id, start_arg } => match (self.wasi)(false) {
                Ok(wasi) => {
                    let mut store = self.new_store(wasi);
                    // A spawned thread is no start: it gets no fresh slice, but waits for its
                    // first turn where its sandbox's threads got to, so that spawning threads
                    // (and ending them, and spawning again) earns no CPU beyond the share.
                    let turn = {
                        let cpu = &mut store.data_mut().cpu;
                        cpu.join_at(self.virtual_runtime.load(Ordering::Relaxed));
                        cpu.yield_future(None, self.epoch.clone())
                    };
                    let result = self.wait_turn(turn).and_then(|()| {
                        store.set_epoch_deadline(1);
                        self.instantiate(&mut store)
                    });
                    let result = result.and_then(|instance| {
                        instance
                            .get_typed_func::<(i32, i32), ()>(&mut store, "wasi_thread_start")?
                            .call(&mut store, (id, start_arg))
                    });
                    outcome(result.map(|()| None), &store)
                }
                Err(exit) => Some(exit),
            },
        };
        self.thread_ended(ended);
    }

    /// A store for one thread on the threads engine, charging its CPU and taking its turns at
    /// every deadline.
    fn new_store(self: &Arc<Self>, wasi: WasiP1Ctx) -> Store<GuestThread> {
        let mut store = Store::new(
            self.module.module.engine(),
            GuestThread {
                wasi,
                limiter: Limiter::new(&self.limits),
                cpu: CpuShare::new(Some(self.weight), None, self.tick, &self.epoch),
                group: self.clone(),
                charged: thread_cpu_time(),
                on_worker: false,
            },
        );
        store.limiter(|t| &mut t.limiter);
        // The fresh slice's first boundary, where its thread is measured (see `cpu`).
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut cx| cx.data_mut().at_deadline());
        store
    }

    /// An instance of the module in `store`: the shared memory, WASI and `thread-spawn`.
    fn instantiate(&self, store: &mut Store<GuestThread>) -> wasmtime::Result<Instance> {
        let imports = self.imports(store)?;
        Instance::new(store, &self.module.module, &imports)
    }

    /// The module's imports in `store`: the shared memory, WASI and `thread-spawn`.
    fn imports(&self, store: &mut Store<GuestThread>) -> wasmtime::Result<Vec<Extern>> {
        let module = &self.module;
        let mut imports = Vec::new();
        for import in module.module.imports() {
            let resolved = match import.ty() {
                ExternType::Memory(_) => Some(Extern::SharedMemory(self.memory.clone())),
                _ => module.linker.get_by_import(&mut *store, &import),
            };
            match resolved {
                Some(import) => imports.push(import),
                None => wasmtime::bail!("unknown import {}::{}", import.module(), import.name()),
            }
        }
        Ok(imports)
    }

    /// Counts a thread out; `exit`, when it ends the run, decides it unless another did first.
    fn thread_ended(self: &Arc<Self>, exit: Option<Exit>) {
        let mut state = self.lock();
        state.running = state.running.saturating_sub(1);
        if let Some(exit) = exit {
            self.decide(&mut state, exit);
        }
        if state.running == 0 {
            self.progress.send_replace(Progress::Ended);
        }
        self.changed.notify_all();
    }

    /// Ends the run with `exit` if nothing ended it yet, and stops the other threads.
    fn decide(self: &Arc<Self>, state: &mut GroupState, exit: Exit) {
        if state.exit.is_some() {
            return;
        }
        state.exit = Some(exit);
        self.stopping.store(true, Ordering::Relaxed);
        self.progress.send_if_modified(|p| {
            let decided = *p == Progress::Running;
            if decided {
                *p = Progress::Decided;
            }
            decided
        });
        if state.running > 0 {
            let group = self.clone();
            let reaper = std::thread::Builder::new()
                .name("guest-reaper".into())
                .spawn(move || group.wake_until_ended());
            if let Err(e) = reaper {
                tracing::warn!(error = %e, "cannot start a thread to wake a sandbox's waiting threads");
            }
        }
    }

    /// Wakes every thread parked in `memory.atomic.wait`, over and over, until every thread
    /// has ended (each traps at its next epoch check) or the grace has passed.
    fn wake_until_ended(&self) {
        let until = Instant::now() + STOP_GRACE * 10;
        let mut state = self.lock();
        while state.running > 0 && Instant::now() < until {
            drop(state);
            let size = self.memory.data_size() as u64;
            for address in (0..size).step_by(4) {
                let _ = self.memory.atomic_notify(address, u32::MAX);
            }
            state = self.lock();
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(5))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Fails with [`Stopping`] once the run has ended.
    fn check_running(&self) -> wasmtime::Result<()> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(wasmtime::Error::new(Stopping));
        }
        Ok(())
    }

    /// Blocks this OS thread until `turn` (a pause, then a slot of the run queue) is done, or
    /// the run ends.
    fn wait_turn(
        &self,
        turn: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ) -> wasmtime::Result<()> {
        let mut progress = self.progress.subscribe();
        self.handle.block_on(async move {
            tokio::select! {
                () = turn => {}
                _ = progress.wait_for(|p| *p >= Progress::Decided) => {}
            }
        });
        self.check_running()
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Charges `micros` of CPU to the run; fails once the `cpuTime` budget is spent. Returns
    /// how long the thread should pause to keep the rate.
    fn charge(&self, micros: u64) -> wasmtime::Result<Option<Duration>> {
        self.usage.charge_micros(micros);
        let used = self.used_micros.fetch_add(micros, Ordering::Relaxed) + micros;
        if let Some(budget) = self.budget_micros
            && used > budget
        {
            return Err(wasmtime::Error::new(CpuLimitExceeded {
                limit_ms: budget / 1000,
            }));
        }
        let elapsed = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let allowed = elapsed.saturating_mul(self.rate) / CORE_MILLICORES;
        Ok((used > allowed).then(|| {
            Duration::from_micros((used - allowed).saturating_mul(CORE_MILLICORES) / self.rate)
                .min(MAX_RATE_PAUSE)
        }))
    }
}

/// What a thread's `result` means for its run: the exit it decides, if any.
fn outcome(result: wasmtime::Result<Option<Exit>>, store: &Store<GuestThread>) -> Option<Exit> {
    match result {
        Ok(exit) => exit,
        Err(e) if e.downcast_ref::<Stopping>().is_some() => None,
        Err(e) => Some(classify(e, &store.data().limiter)),
    }
}

/// What the runtime's configuration sets for threads.
#[derive(Clone)]
pub(super) struct ThreadSettings {
    /// The most threads of one sandbox running at once, its main thread included.
    pub max_threads: u32,
    /// The wasm stack of each thread.
    pub max_wasm_stack: usize,
    /// The epoch tick, in which `cpuTime` budgets are counted.
    pub epoch_tick: Duration,
    /// The host engine's epoch, whose run queue guest threads take turns in.
    pub epoch: Epoch,
}

/// Stops a run's threads when its future is dropped (the agent stopped the sandbox).
struct StopOnDrop(Arc<ThreadGroup>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        self.0.decide(&mut state, Exit::Stopped);
    }
}

// === impl GuestThread ===

impl GuestThread {
    /// At each deadline: stop if the run has ended; charge the CPU this OS thread used since
    /// the last one and pause to keep the sandbox's rate; then, as any sandbox at the end of
    /// its slice, wait in the agent's run queue for a CPU slot, weighing the sandbox's request
    /// shared out between its running threads.
    fn at_deadline(&mut self) -> wasmtime::Result<UpdateDeadline> {
        let group = self.group.clone();
        group.check_running()?;
        let now = thread_cpu_time();
        let used = now.saturating_sub(self.charged);
        self.charged = now;
        let micros = u64::try_from(used.as_micros()).unwrap_or(u64::MAX);
        // A pause for the rate is taken in the run queue's turn, so that the slice after it
        // is queued for and charged as any other (a thread that slept through its deadline
        // would be taken for one that woke from WASI, and run a fresh slice uncharged).
        let rate_pause = group.charge(micros)?;
        let running = u64::from(group.lock().running.max(1));
        self.cpu.set_weight(group.weight / running);
        group
            .virtual_runtime
            .fetch_max(self.cpu.virtual_runtime(), Ordering::Relaxed);
        // The CPU clock read above measures the fresh slice too.
        let progress = || ThreadProgress::of_current_thread(now);
        let pause = match self.cpu.at_deadline(group.epoch.now(), progress) {
            AtDeadline::Continue(ticks) if rate_pause.is_none() => {
                return Ok(UpdateDeadline::Continue(ticks));
            }
            AtDeadline::Continue(_) => rate_pause,
            AtDeadline::Yield { pause, .. } => pause.max(rate_pause),
        };
        let turn = self.cpu.yield_future(pause, group.epoch.clone());
        if self.on_worker {
            return Ok(UpdateDeadline::YieldCustom(1, turn));
        }
        group.wait_turn(turn)?;
        Ok(UpdateDeadline::Continue(1))
    }
}
