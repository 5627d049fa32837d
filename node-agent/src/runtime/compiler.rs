//! [`Compiler`]: where modules compile, so that no workload's compile disturbs the agent or
//! another workload.
//!
//! - Compiles run on threads of their own at a lower scheduling priority ([`COMPILE_NICE`]),
//!   never on the async workers or the blocking pool: heartbeats, the control-plane session,
//!   the admin API, the ingress and running sandboxes, all at higher priority, come first when
//!   the CPU is short.
//! - Cranelift's parallelism is bounded: each compile runs in a rayon pool of its own of at most
//!   `threads_per_compile` threads. wasmtime's parallel compilation would otherwise use rayon's
//!   global pool, one thread per CPU, at normal priority, for every module at once.
//! - At most `slots` compiles run at once, and free slots go round-robin between workloads: to
//!   the waiting workload with the fewest compiles running, of those the one served least
//!   recently. A workload's queue of costly modules never holds back another's, which gets the
//!   next free slot.
//! - One more slot is kept for cheap compiles (by default [`CHEAP_CODE_BYTES`] of code or less,
//!   or an artifact loaded from disk): while costly modules hold every other slot, a small
//!   module still compiles at once.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The nice value of compile threads: under contention, a replica's thread (nice 5) gets about
/// nine times the CPU of a compile thread and the agent's own threads about 28 times (the
/// kernel's weights for nice 0, 5 and 15 are 1024, 335 and 36), and an idle machine still
/// compiles at full speed.
pub const COMPILE_NICE: i32 = 15;

/// Code of a module that compiles in a fraction of a second, and may take the slot kept for
/// cheap compiles: the default of `RuntimeConfig::cheap_compile_code_bytes`.
pub const CHEAP_CODE_BYTES: u64 = 1 << 20;

/// Compile slots shared by every workload of one runtime. Cheap to clone.
#[derive(Clone)]
pub(super) struct Compiler {
    queue: Arc<Mutex<Queue>>,
    threads_per_compile: usize,
}

struct Queue {
    /// Slots not held.
    free: usize,
    /// Whether the slot kept for cheap compiles is not held.
    cheap_free: bool,
    /// Slots held, per owner.
    running: HashMap<Arc<str>, usize>,
    /// Owners waiting for a slot, oldest first.
    waiting: VecDeque<Waiter>,
    /// When each owner with a slot or a waiter was last given a slot.
    served: HashMap<Arc<str>, u64>,
    /// Slots given so far.
    grants: u64,
}

struct Waiter {
    owner: Arc<str>,
    cheap: bool,
    grant: oneshot::Sender<Slot>,
}

/// A compile slot held for one owner; freed when dropped, and given to the next waiter.
pub(super) struct Slot {
    owner: Arc<str>,
    /// Whether it is the slot kept for cheap compiles.
    cheap: bool,
    /// `None` once given back.
    queue: Option<Arc<Mutex<Queue>>>,
}

/// Why a compile could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum CompilerError {
    /// No thread could be started for it (the process is out of threads or memory).
    #[error("starting a compile thread")]
    Thread(#[source] std::io::Error),
    /// The compiler panicked: a bug of the compiler, not of the module.
    #[error("the compiler panicked: {0}")]
    Panicked(String),
    /// The task waiting for the compile thread ended first (the agent is shutting down).
    #[error("waiting for the compile thread")]
    Waiting(#[source] tokio::task::JoinError),
}

/// The message a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

// === impl Compiler ===

impl Compiler {
    /// `slots` compiles at once (at least one) and one more cheap one, each with up to
    /// `threads_per_compile` threads.
    pub(super) fn new(slots: usize, threads_per_compile: usize) -> Self {
        Self {
            queue: Arc::new(Mutex::new(Queue {
                free: slots.max(1),
                cheap_free: true,
                running: HashMap::new(),
                waiting: VecDeque::new(),
                served: HashMap::new(),
                grants: 0,
            })),
            threads_per_compile: threads_per_compile.max(1),
        }
    }

    /// Waits for a slot for `owner` (a workload) to compile a `cheap` module or not: at once
    /// when one is free, else in its round-robin turn.
    pub(super) async fn slot(&self, owner: &str, cheap: bool) -> Slot {
        let (grant, granted) = oneshot::channel();
        {
            let mut queue = lock(&self.queue);
            queue.waiting.push_back(Waiter {
                owner: owner.into(),
                cheap,
                grant,
            });
            queue.grant(&self.queue);
        }
        match granted.await {
            Ok(slot) => slot,
            // The sender is only dropped after a send or with the queue, which lives in self.
            Err(_) => unreachable!("the compile queue outlives its waiters"),
        }
    }

    /// Runs `job` on a compile thread of its own, holding `slot` until it ends; the future
    /// resolves to its result. A caller that stops waiting does not stop the compile.
    ///
    /// A task of tokio's blocking pool waits for the thread, so that tokio knows work is under
    /// way (a paused test clock does not jump past it).
    ///
    /// # Errors
    /// [`CompilerError::Thread`] when no thread can be started.
    pub(super) fn run<T, F>(
        &self,
        slot: Slot,
        job: F,
    ) -> Result<impl Future<Output = Result<T, CompilerError>> + use<T, F>, CompilerError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let threads = self.threads_per_compile;
        let thread = std::thread::Builder::new()
            .name("flotilla-compile".into())
            .spawn(move || {
                lower_priority();
                let result = match rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("flotilla-compile-{i}"))
                    .start_handler(|_| lower_priority())
                    .build()
                {
                    // wasmtime's parallel compilation runs in the pool it is called from.
                    Ok(pool) => pool.install(job),
                    Err(error) => {
                        tracing::warn!(%error, "no compile thread pool; compiling on one thread");
                        job()
                    }
                };
                drop(slot);
                result
            })
            .map_err(CompilerError::Thread)?;
        let joined = tokio::task::spawn_blocking(move || thread.join());
        Ok(async move {
            match joined.await {
                Ok(Ok(result)) => Ok(result),
                Ok(Err(panic)) => Err(CompilerError::Panicked(panic_message(panic.as_ref()))),
                Err(join) => Err(CompilerError::Waiting(join)),
            }
        })
    }

    /// Compiles running now, and compiles waiting for a slot.
    pub(super) fn load(&self) -> (usize, usize) {
        let queue = lock(&self.queue);
        (queue.running.values().sum(), queue.waiting.len())
    }
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl Queue ===

impl Queue {
    /// Gives free slots to waiters: of those a free slot can take (any waiter for a general
    /// slot, a cheap one for the cheap slot), the one whose owner holds the fewest, then was
    /// served least recently, then waited longest. A cheap waiter takes the cheap slot first.
    fn grant(&mut self, this: &Arc<Mutex<Queue>>) {
        loop {
            let pick = (0..self.waiting.len())
                .filter(|&i| self.free > 0 || (self.cheap_free && self.waiting[i].cheap))
                .min_by_key(|&i| {
                    let owner = &self.waiting[i].owner;
                    let running = self.running.get(owner).copied().unwrap_or(0);
                    let served = self.served.get(owner).copied().unwrap_or(0);
                    (running, served, i)
                });
            let Some(waiter) = pick.and_then(|i| self.waiting.remove(i)) else {
                return;
            };
            let cheap = waiter.cheap && self.cheap_free;
            if cheap {
                self.cheap_free = false;
            } else {
                self.free -= 1;
            }
            self.grants += 1;
            self.served.insert(waiter.owner.clone(), self.grants);
            *self.running.entry(waiter.owner.clone()).or_default() += 1;
            let slot = Slot {
                owner: waiter.owner,
                cheap,
                queue: Some(this.clone()),
            };
            // A waiter that gave up: the slot goes back without locking again.
            if let Err(mut slot) = waiter.grant.send(slot) {
                slot.queue = None;
                self.release(&slot.owner, slot.cheap);
            }
        }
    }

    fn release(&mut self, owner: &Arc<str>, cheap: bool) {
        if cheap {
            self.cheap_free = true;
        } else {
            self.free += 1;
        }
        if let Some(count) = self.running.get_mut(owner) {
            *count -= 1;
            if *count == 0 {
                self.running.remove(owner);
                // An owner with nothing running or waiting needs no turn kept.
                if !self.waiting.iter().any(|w| w.owner == *owner) {
                    self.served.remove(owner);
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            let mut locked = lock(&queue);
            locked.release(&self.owner, self.cheap);
            locked.grant(&queue);
        }
    }
}

/// Lowers the calling thread's priority to [`COMPILE_NICE`].
fn lower_priority() {
    super::priority::nice_current_thread(COMPILE_NICE);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Waits until `n` owners wait.
    async fn until_waiting(compiler: &Compiler, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while compiler.load().1 < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("waiters queued");
    }

    #[tokio::test]
    async fn slots_go_round_robin_so_one_workloads_queue_holds_back_no_other() {
        let compiler = Compiler::new(1, 1);
        let held = compiler.slot("big", false).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // "big" queues three more compiles before "small" asks for one.
        for owner in ["big", "big", "big", "small"] {
            let (queue, order) = (compiler.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = queue.slot(owner, false).await;
                order.lock().expect("order").push(owner);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            }));
            until_waiting(&compiler, tasks.len()).await;
        }
        drop(held);
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("every compile gets its turn")
                .expect("no panic");
        }
        assert_eq!(
            *order.lock().expect("order"),
            ["small", "big", "big", "big"]
        );
        assert_eq!(compiler.load(), (0, 0));
    }

    #[tokio::test]
    async fn a_cheap_compile_runs_while_costly_ones_hold_every_other_slot() {
        let compiler = Compiler::new(1, 1);
        let costly = compiler.slot("big", false).await;
        let other_costly = tokio::spawn({
            let compiler = compiler.clone();
            async move { compiler.slot("big-2", false).await }
        });
        until_waiting(&compiler, 1).await;
        let cheap = tokio::time::timeout(Duration::from_secs(5), compiler.slot("small", true))
            .await
            .expect("the cheap slot is free");
        assert_eq!(
            compiler.load(),
            (2, 1),
            "the second costly compile still waits"
        );
        // A second cheap compile waits for the cheap slot or a general one.
        let second_cheap = tokio::spawn({
            let compiler = compiler.clone();
            async move { compiler.slot("small-2", true).await }
        });
        until_waiting(&compiler, 2).await;
        drop(cheap);
        let second_cheap = tokio::time::timeout(Duration::from_secs(5), second_cheap)
            .await
            .expect("it takes the freed cheap slot")
            .expect("no panic");
        drop(costly);
        let other_costly = tokio::time::timeout(Duration::from_secs(5), other_costly)
            .await
            .expect("the costly one takes the general slot")
            .expect("no panic");
        drop((second_cheap, other_costly));
        assert_eq!(compiler.load(), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_no_slot_held() {
        let compiler = Compiler::new(1, 1);
        let held = compiler.slot("a", false).await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), compiler.slot("b", false)).await;
        assert!(gave_up.is_err());
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(5), compiler.slot("c", false))
            .await
            .expect("the slot is free again");
        drop(again);
        assert_eq!(compiler.load(), (0, 0));
    }

    #[tokio::test]
    async fn jobs_run_on_low_priority_threads_with_bounded_parallelism() {
        let compiler = Compiler::new(2, 3);
        let slot = compiler.slot("w", false).await;
        let result = compiler
            .run(slot, || {
                let nice = std::fs::read_to_string("/proc/thread-self/stat")
                    .ok()
                    .and_then(|stat| {
                        // Field 19 (1-based) is the nice value; the name in field 2 may hold spaces.
                        let after_name = stat.rsplit_once(')')?.1.to_string();
                        after_name.split_whitespace().nth(16)?.parse::<i32>().ok()
                    });
                (nice, rayon::current_num_threads())
            })
            .expect("thread")
            .await
            .expect("no panic");
        assert_eq!(result, (Some(COMPILE_NICE), 3));
        assert_eq!(compiler.load(), (0, 0));

        let slot = compiler.slot("w", false).await;
        let panicked = compiler
            .run(slot, || panic!("compiler bug"))
            .expect("thread")
            .await;
        assert!(matches!(panicked, Err(CompilerError::Panicked(m)) if m == "compiler bug"));
        assert_eq!(compiler.load(), (0, 0), "a panic frees the slot");
    }
}
