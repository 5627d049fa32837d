//! CPU between the sandboxes of one agent: shares weighted by `resources.requests.cpu`, rate
//! caps by `resources.limits.cpu`, and the CPU each sandbox used.
//!
//! Guests run as tokio tasks on the agent's guest worker threads and yield at epoch
//! deadlines; the epoch ticks every `--epoch-tick` (2 ms: how long new work may wait for a
//! worker that runs a spinning guest, and so the latency that spinners add to every request
//! and start beside them; measured at 10 ms, a healthy HTTP p99 beside 1,000 spinners was
//! 12.6 ms, at 2 ms 5.6 ms, at 1 ms 5.5 ms). What a sandbox gets is decided at
//! each of its deadlines ([`CpuShare::at_deadline`]):
//!
//! - **Slices and shares.** A sandbox that resumes after waiting its turn runs a slice until
//!   the next epoch boundary. At the end of each it queues in the agent's [`RunQueue`] for the
//!   next, and the slot it held goes to the lowest virtual runtime (CPU used divided by the
//!   request), itself included: sandboxes that contend for the guest threads get CPU in
//!   proportion to their requests (two on one slot would otherwise take turns, 1:1 whatever
//!   their requests, as measured before this), and a thousand spinners never stand in tokio's
//!   queues ahead of new work.
//! - **Rate caps.** With `resources.limits.cpu` below one core, a sandbox pauses after each
//!   slice for as long as keeps its rate at the limit (a slice of 10 ms at a limit of 250m
//!   pauses 30 ms), as CFS bandwidth control does with a quota per period, and then queues.
//!   A limit of a core or more caps nothing: one sandbox is one task and never uses more.
//! - **Starts and wake-ups run first.** A new sandbox, and one whose deadline passed while it
//!   was not running wasm (blocked in WASI: a sleep, a socket), joins at the queue's virtual
//!   time and runs a fresh slice of [`FRESH_SLICE_TICKS`] at once, without a slot, as CFS
//!   places a waking task ahead: starts, HTTP requests and I/O-bound guests do not queue
//!   behind guests that spin, unless they are already a slice ahead of their share.
//! - **Accounting.** A slice is charged when it ends, in the epoch boundaries it ran across.
//!   A deadline reached before the slice's end (it waited for a slot or a worker while the
//!   epoch moved on) extends the slice instead of ending it, so time spent waiting, or
//!   blocked in WASI, is not charged.
//! - **Fresh slices the thread did not run.** Epoch ticks are wall-clock time. A fresh slice
//!   ends at its second boundary only if its OS thread used at least half a tick of CPU since
//!   its first (`CLOCK_THREAD_CPUTIME_ID`); else the kernel ran other threads meanwhile (or
//!   the machine stalled) and the slice goes on, that tick uncharged, up to
//!   [`MAX_SLICE_EXTENSIONS`] times. Before this, an HTTP request or a start preempted across
//!   its fresh slice's end queued behind a thousand spinners: 1.8 s for one request. A turn
//!   after waiting in the queue is not measured: it ends at its boundary, so that new work
//!   waits for at most a tick per turn of a worker that runs spinners.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::engine::Epoch;
use super::run_queue::{Lease, MIN_WEIGHT_MILLICORES, RunQueue, virtual_ticks};

/// Millicores of one core: a sandbox (one task) never uses more.
pub const CORE_MILLICORES: u64 = 1000;
/// The lowest rate cap; a lower limit is raised to it.
pub const MIN_RATE_MILLICORES: u64 = 10;

/// The CPU a sandbox has used over all its runs, counted in the epoch ticks of its slices (in
/// microseconds, so that ticks under a millisecond add up). Shared between the sandbox's
/// stores and whoever reports it.
#[derive(Debug, Default)]
pub struct CpuUsage(AtomicU64);

impl CpuUsage {
    /// Milliseconds used so far.
    pub fn millis(&self) -> u64 {
        self.0.load(Ordering::Relaxed) / 1000
    }

    /// Adds `micros` microseconds, measured rather than counted in ticks (threads).
    pub(crate) fn charge_micros(&self, micros: u64) {
        self.0.fetch_add(micros, Ordering::Relaxed);
    }

    /// Adds `ticks` of `tick` each.
    pub(crate) fn charge(&self, ticks: u64, tick: Duration) {
        let micros = u64::try_from(tick.as_micros()).unwrap_or(u64::MAX);
        self.0
            .fetch_add(ticks.saturating_mul(micros), Ordering::Relaxed);
    }
}

/// What happens at a deadline.
pub(crate) enum AtDeadline {
    /// Run on for this many ticks: the slice has not run its course since the sandbox resumed.
    Continue(u64),
    /// Charge `charge` ticks (the slice that ran, if one did), then yield: pause for `pause`,
    /// if any, wait for a CPU slot, and run another slice.
    Yield {
        charge: u64,
        pause: Option<Duration>,
    },
}

/// Ticks of a fresh slice, given at a start or a wake-up: it begins part way through a tick,
/// so it ends at the second epoch boundary after, having run between one and two ticks. A
/// request or a start that needs less than a tick of CPU thus never waits in the run queue,
/// whenever in a tick it began.
pub const FRESH_SLICE_TICKS: u64 = 2;

/// Ticks by which a slice whose thread ran less than half of each is extended, at most: the
/// kernel may give the agent's threads a small part of a CPU for long, and a slice must end
/// within a bound however little its thread runs.
pub(crate) const MAX_SLICE_EXTENSIONS: u64 = 4;

/// The CPU time the calling OS thread has used.
#[allow(unsafe_code)]
pub(crate) fn thread_cpu_time() -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid timespec for the call to write; the clock exists on Linux.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) } == 0;
    if !ok {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(time.tv_sec).unwrap_or(0),
        u32::try_from(time.tv_nsec).unwrap_or(0),
    )
}

/// Where a slice's OS thread stood: which thread, and the CPU time it had used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ThreadProgress {
    thread: std::thread::ThreadId,
    cpu: Duration,
}

impl ThreadProgress {
    /// The calling thread's.
    pub(crate) fn now() -> Self {
        Self::of_current_thread(thread_cpu_time())
    }

    /// The calling thread's, which has used `cpu` (read by the caller for its own use).
    pub(crate) fn of_current_thread(cpu: Duration) -> Self {
        Self {
            thread: std::thread::current().id(),
            cpu,
        }
    }
}

/// One run's CPU schedule: its weight and rate cap, its virtual runtime, the slice under way,
/// and the CPU slot it holds.
#[derive(Debug)]
pub(crate) struct CpuShare {
    /// `resources.requests.cpu` in millicores, at least [`MIN_WEIGHT_MILLICORES`].
    weight: u64,
    rate: Option<u64>,
    tick: Duration,
    /// The CPU used so far, divided by the weight (see [`RunQueue`]).
    virtual_runtime: u64,
    slice: Arc<Slice>,
    /// The slot held since the last yield, if the sandbox waited for one.
    lease: Arc<Mutex<Option<Lease>>>,
    queue: Arc<RunQueue>,
}

/// The slice under way: the epoch it ends at, its length in ticks, and, for a fresh slice,
/// how far its thread has been seen to run.
#[derive(Debug)]
struct Slice {
    end: AtomicU64,
    ticks: AtomicU64,
    measure: Mutex<Measure>,
}

/// How a fresh slice's thread has been seen to run.
#[derive(Debug, Default)]
struct Measure {
    /// Whether the slice is a fresh one (a start or a wake-up): only those are measured.
    fresh: bool,
    /// Where its thread stood at its first boundary, once it reached one.
    since: Option<ThreadProgress>,
    /// Ticks it has been extended by.
    extended: u64,
}

impl Slice {
    fn new(now: u64, ticks: u64) -> Self {
        let slice = Self {
            end: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            measure: Mutex::default(),
        };
        slice.set(now, ticks, true);
        slice
    }

    /// Begins a slice of `ticks` at epoch `now`: a fresh one (a start or a wake-up), or the
    /// next turn of a sandbox that waited for it.
    fn set(&self, now: u64, ticks: u64, fresh: bool) {
        self.end.store(now + ticks, Ordering::Relaxed);
        self.ticks.store(ticks, Ordering::Relaxed);
        *self.lock() = Measure {
            fresh,
            ..Measure::default()
        };
    }

    /// Whether the slice has run its course at its end, epoch `now`. A turn has. A fresh slice
    /// has if its thread used at least half a tick of CPU since its first boundary, as of
    /// `progress`; if not (the kernel ran other threads meanwhile, the machine stalled, or the
    /// slice reached no boundary before on this thread), it is measured now if it was not,
    /// and goes on for another tick, up to [`MAX_SLICE_EXTENSIONS`] times.
    fn ran(&self, now: u64, tick: Duration, progress: impl FnOnce() -> ThreadProgress) -> bool {
        let mut measure = self.lock();
        if !measure.fresh || measure.extended >= MAX_SLICE_EXTENSIONS {
            return true;
        }
        let progress = progress();
        match &measure.since {
            Some(since) if since.thread == progress.thread => {
                if progress.cpu.saturating_sub(since.cpu) >= tick / 2 {
                    return true;
                }
            }
            _ => measure.since = Some(progress),
        }
        measure.extended += 1;
        self.end.store(now + 1, Ordering::Relaxed);
        false
    }

    /// Measures a fresh slice's thread at its first boundary.
    fn measure_once(&self, progress: impl FnOnce() -> ThreadProgress) {
        let mut measure = self.lock();
        if measure.fresh && measure.since.is_none() {
            measure.since = Some(progress());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Measure> {
        self.measure.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CpuShare {
    /// A schedule for a sandbox weighing `weight` millicores (its request; the least weight
    /// without one) and capped at `rate` millicores (see the module's doc for the bounds),
    /// served by `epoch`'s run queue, starting a fresh slice now.
    pub(crate) fn new(
        weight: Option<u64>,
        rate: Option<u64>,
        tick: Duration,
        epoch: &Epoch,
    ) -> Self {
        let queue = epoch.run_queue().clone();
        Self {
            weight: weight.unwrap_or(0).max(MIN_WEIGHT_MILLICORES),
            rate: rate
                .filter(|r| *r < CORE_MILLICORES)
                .map(|r| r.max(MIN_RATE_MILLICORES)),
            tick,
            virtual_runtime: queue.virtual_time(),
            slice: Arc::new(Slice::new(epoch.now(), FRESH_SLICE_TICKS)),
            lease: Arc::new(Mutex::new(None)),
            queue,
        }
    }

    /// The CPU used so far, divided by the weight: where the schedule stands in the queue.
    pub(crate) fn virtual_runtime(&self) -> u64 {
        self.virtual_runtime
    }

    /// Moves the schedule to `virtual_runtime` if that is further on: a thread joins where its
    /// sandbox's other threads got to, not at the queue's virtual time.
    pub(crate) fn join_at(&mut self, virtual_runtime: u64) {
        self.virtual_runtime = self.virtual_runtime.max(virtual_runtime);
    }

    /// Weighs the sandbox `weight` millicores from now on (the least weight below it).
    pub(crate) fn set_weight(&mut self, weight: u64) {
        self.weight = weight.max(MIN_WEIGHT_MILLICORES);
    }

    /// Decides, at a deadline reached at epoch `now`, whether the slice under way goes on or
    /// ends; `progress` measures the calling thread (see [`ThreadProgress::now`]).
    pub(crate) fn at_deadline(
        &mut self,
        now: u64,
        progress: impl FnOnce() -> ThreadProgress,
    ) -> AtDeadline {
        let end = self.slice.end.load(Ordering::Relaxed);
        if now < end {
            // A fresh slice's first boundary, where its thread is measured, or a deadline set
            // before the sandbox waited for a slot or a worker (the slice began when it
            // resumed).
            self.slice.measure_once(progress);
            return AtDeadline::Continue(end - now);
        }
        if now > end {
            // The slot, if one is held, goes back: the sandbox slept through its slice.
            drop(self.lock_lease().take());
            // Not running wasm when its slice was to end: it was instantiating, or blocked in
            // WASI. It rejoins at the queue's virtual time, and runs a fresh slice at once
            // unless it is a slice or more ahead of it (it used more than its share while
            // awake).
            let virtual_time = self.queue.virtual_time();
            self.virtual_runtime = self.virtual_runtime.max(virtual_time);
            if self.virtual_runtime <= virtual_time + virtual_ticks(1, self.weight) {
                // Its first boundary measures its thread.
                self.slice.set(now, FRESH_SLICE_TICKS, true);
                return AtDeadline::Continue(1);
            }
            return AtDeadline::Yield {
                charge: 0,
                pause: None,
            };
        }
        if !self.slice.ran(now, self.tick, progress) {
            return AtDeadline::Continue(1);
        }
        let ticks = self.slice.ticks.load(Ordering::Relaxed);
        self.virtual_runtime = self
            .virtual_runtime
            .saturating_add(virtual_ticks(ticks, self.weight));
        let pause = self.rate.map(|rate| {
            let idle = CORE_MILLICORES - rate;
            self.tick * u32::try_from(ticks * idle).unwrap_or(u32::MAX)
                / u32::try_from(rate).unwrap_or(1)
        });
        // The slice is over. A slot held through it is handed on when the sandbox queues again
        // ([`yield_future`](Self::yield_future)), to whoever has the lowest virtual runtime,
        // itself included.
        AtDeadline::Yield {
            charge: ticks,
            pause,
        }
    }

    /// What the sandbox awaits when it yields: `pause`, if it has one (the slot it held goes
    /// back first), then a CPU slot from the run queue (the one it held competes with the
    /// waiters at its new virtual runtime, so that of two sandboxes on one slot each gets its
    /// share rather than every other slice), then a turn at the back of its worker's queue; its
    /// next slice, of one tick, begins when it resumes.
    pub(crate) fn yield_future(
        &self,
        pause: Option<Duration>,
        epoch: Epoch,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let slice = self.slice.clone();
        let lease_slot = self.lease.clone();
        let queue = self.queue.clone();
        let virtual_runtime = self.virtual_runtime;
        Box::pin(async move {
            let held = lease_slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let lease = match (pause, held) {
                (Some(pause), held) => {
                    drop(held);
                    tokio::time::sleep(pause).await;
                    queue.acquire(virtual_runtime).await
                }
                (None, Some(held)) => queue.requeue(held, virtual_runtime).await,
                (None, None) => queue.acquire(virtual_runtime).await,
            };
            // A slot granted by a neighbour's yield wakes this task first on that worker;
            // the worker's other tasks go before it.
            tokio::task::yield_now().await;
            let now = epoch.now();
            queue.running(&lease, now);
            *lease_slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(lease);
            slice.set(now, 1, false);
        })
    }

    fn lock_lease(&self) -> std::sync::MutexGuard<'_, Option<Lease>> {
        self.lease.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(10);

    fn share(weight: Option<u64>, rate: Option<u64>) -> (CpuShare, Epoch) {
        let epoch = Epoch::manual_for_tests(1);
        (CpuShare::new(weight, rate, TICK, &epoch), epoch)
    }

    /// The calling thread having used `cpu` of CPU.
    fn used(cpu: Duration) -> impl FnOnce() -> ThreadProgress {
        move || ThreadProgress::of_current_thread(cpu)
    }

    /// The calling thread at epoch `now`, having run every tick since epoch 0.
    fn busy(now: u64) -> impl FnOnce() -> ThreadProgress {
        used(TICK * u32::try_from(now).expect("a small epoch"))
    }

    /// Ends the slice under way at `now`, as a spinning sandbox does, and resumes it with a
    /// slot at once.
    fn spin_through(share: &mut CpuShare, now: u64) -> AtDeadline {
        let at = share.at_deadline(now, busy(now));
        share.slice.set(now, 1, false);
        at
    }

    #[test]
    fn a_fresh_slice_runs_two_boundaries_and_is_charged_as_such() {
        // Created at epoch 0, part way through its tick.
        let (mut share, _epoch) = share(None, None);
        assert!(matches!(
            share.at_deadline(1, busy(1)),
            AtDeadline::Continue(1)
        ));
        assert!(matches!(
            share.at_deadline(2, busy(2)),
            AtDeadline::Yield {
                charge: 2,
                pause: None
            }
        ));
    }

    #[test]
    fn ticks_spent_waiting_for_a_slot_or_a_worker_are_not_charged() {
        let (mut share, _epoch) = share(None, None);
        share.at_deadline(1, busy(1));
        assert!(matches!(
            spin_through(&mut share, 2),
            AtDeadline::Yield { charge: 2, .. }
        ));
        // It waited for a slot and a worker and resumed at epoch 6; its old deadline (epoch
        // 3) has passed: it runs on, uncharged, until its slice of one tick has run.
        share.slice.set(6, 1, false);
        assert!(matches!(
            share.at_deadline(6, busy(6)),
            AtDeadline::Continue(1)
        ));
        assert!(matches!(
            share.at_deadline(7, busy(7)),
            AtDeadline::Yield { charge: 1, .. }
        ));
    }

    #[test]
    fn a_sandbox_that_woke_gets_a_fresh_slice_uncharged() {
        let (mut share, _epoch) = share(None, None);
        // Its slice was to end at epoch 2; the first deadline it reaches is at epoch 5: it
        // was blocked in WASI (or instantiating).
        assert!(matches!(
            share.at_deadline(5, busy(5)),
            AtDeadline::Continue(1)
        ));
        // Its fresh slice's first boundary measures its thread; the second ends it.
        assert!(matches!(
            share.at_deadline(6, busy(6)),
            AtDeadline::Continue(1)
        ));
        assert!(matches!(
            share.at_deadline(7, busy(7)),
            AtDeadline::Yield { charge: 2, .. }
        ));
    }

    #[test]
    fn a_slice_whose_thread_the_kernel_did_not_run_goes_on_uncharged() {
        let (mut share, _epoch) = share(None, None);
        // Measured at the fresh slice's first boundary; over the next tick the thread ran a
        // quarter of it (another thread had the CPU): the slice goes on for a tick.
        assert!(matches!(
            share.at_deadline(1, used(Duration::ZERO)),
            AtDeadline::Continue(1)
        ));
        assert!(matches!(
            share.at_deadline(2, used(TICK / 4)),
            AtDeadline::Continue(1)
        ));
        // By the next boundary it has run half a tick since it was measured: the slice ends,
        // charged its two ticks, not three.
        assert!(matches!(
            share.at_deadline(3, used(TICK / 2)),
            AtDeadline::Yield { charge: 2, .. }
        ));
    }

    #[test]
    fn a_fresh_slice_that_reached_no_boundary_before_its_end_is_measured_there() {
        let (mut share, _epoch) = share(None, None);
        // It was instantiating, or waiting for a worker, at its first boundary.
        assert!(matches!(
            share.at_deadline(2, busy(2)),
            AtDeadline::Continue(1)
        ));
        assert!(matches!(
            share.at_deadline(3, busy(3)),
            AtDeadline::Yield { charge: 2, .. }
        ));
    }

    #[test]
    fn a_turn_after_waiting_ends_at_its_boundary_however_little_it_ran() {
        let (mut share, _epoch) = share(None, None);
        share.at_deadline(1, busy(1));
        assert!(matches!(
            spin_through(&mut share, 2),
            AtDeadline::Yield { charge: 2, .. }
        ));
        assert!(matches!(
            share.at_deadline(3, used(Duration::ZERO)),
            AtDeadline::Yield { charge: 1, .. }
        ));
    }

    #[test]
    fn a_slice_whose_thread_never_runs_still_ends_after_a_bound() {
        let (mut share, _epoch) = share(None, None);
        assert!(matches!(
            share.at_deadline(1, used(Duration::ZERO)),
            AtDeadline::Continue(1)
        ));
        let end = 2 + MAX_SLICE_EXTENSIONS;
        for now in 2..end {
            assert!(matches!(
                share.at_deadline(now, used(Duration::ZERO)),
                AtDeadline::Continue(1)
            ));
        }
        assert!(matches!(
            share.at_deadline(end, used(Duration::ZERO)),
            AtDeadline::Yield { charge: 2, .. }
        ));
    }

    #[test]
    fn a_slice_measured_on_another_thread_is_measured_again() {
        let (mut share, _epoch) = share(None, None);
        let other = std::thread::spawn(|| std::thread::current().id())
            .join()
            .expect("the thread ran");
        assert!(matches!(
            share.at_deadline(1, move || ThreadProgress {
                thread: other,
                cpu: TICK * 100,
            }),
            AtDeadline::Continue(1)
        ));
        // Its task moved to this thread, whose clock says nothing of the slice: measured
        // here, it goes on until it has run half a tick on this thread.
        assert!(matches!(
            share.at_deadline(2, used(Duration::ZERO)),
            AtDeadline::Continue(1)
        ));
        assert!(matches!(
            share.at_deadline(3, used(TICK / 2)),
            AtDeadline::Yield { charge: 2, .. }
        ));
    }

    #[test]
    fn a_sandbox_a_slice_ahead_of_the_queue_waits_its_turn_when_it_wakes() {
        let (mut share, _epoch) = share(Some(100), None);
        // Three slices run back to back while nobody else was served: the queue's virtual
        // time stayed at 0.
        share.at_deadline(1, busy(1));
        assert!(matches!(
            spin_through(&mut share, 2),
            AtDeadline::Yield { .. }
        ));
        for now in 3..=4 {
            assert!(matches!(
                spin_through(&mut share, now),
                AtDeadline::Yield { charge: 1, .. }
            ));
        }
        // It wakes from a sleep four ticks ahead of everyone: no fresh slice, and nothing
        // charged for the sleep.
        assert!(matches!(
            share.at_deadline(10, busy(10)),
            AtDeadline::Yield {
                charge: 0,
                pause: None
            }
        ));
    }

    #[test]
    fn a_rate_cap_pauses_each_slice_to_keep_the_rate() {
        let pause = |rate| {
            let (mut share, _epoch) = share(None, rate);
            spin_through(&mut share, 2);
            match share.at_deadline(3, busy(3)) {
                AtDeadline::Yield { pause, .. } => pause,
                AtDeadline::Continue(_) => panic!("the slice ran"),
            }
        };
        // 10 ms run at 250m: 30 ms paused; at 500m: 10 ms.
        assert_eq!(pause(Some(250)), Some(Duration::from_millis(30)));
        assert_eq!(pause(Some(500)), Some(Duration::from_millis(10)));
        assert_eq!(pause(Some(1000)), None, "a core or more caps nothing");
        assert_eq!(pause(None), None);
        assert_eq!(
            pause(Some(1)),
            Some(Duration::from_millis(990)),
            "raised to 10m"
        );
        // A fresh slice of two ticks pauses twice as long.
        let (mut share, _epoch) = share(None, Some(500));
        assert!(matches!(
            share.at_deadline(1, busy(1)),
            AtDeadline::Continue(1)
        ));
        assert!(matches!(
            share.at_deadline(2, busy(2)),
            AtDeadline::Yield { pause: Some(p), .. } if p == Duration::from_millis(20)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_yield_takes_a_slot_and_begins_a_slice_of_one_tick_when_it_resumes() {
        let (share, epoch) = share(None, Some(500));
        epoch.advance();
        epoch.advance();
        share
            .yield_future(Some(Duration::from_millis(10)), epoch.clone())
            .await;
        assert_eq!(share.slice.end.load(Ordering::Relaxed), 3);
        assert!(
            share.lock_lease().is_some(),
            "it holds the queue's one slot"
        );
        // A neighbour waits for that slot until the holder's slice ends.
        let neighbour = CpuShare::new(None, None, TICK, &epoch);
        let mut waiting = std::pin::pin!(neighbour.yield_future(None, epoch.clone()));
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(share);
        waiting.await;
        assert!(neighbour.lock_lease().is_some());
    }
}
