//! CPU between the sandboxes of one agent: rate caps by `resources.limits.cpu`, and the CPU
//! each sandbox used.
//!
//! Guests run as tokio tasks on the agent's worker threads and yield at epoch deadlines; the
//! epoch ticks every `--epoch-tick` (10 ms). What a sandbox gets is decided at each of its
//! deadlines ([`CpuShare::at_deadline`]):
//!
//! - **Slices.** Every sandbox runs slices of one tick and then yields to the back of its
//!   worker's queue, so runnable sandboxes take equal turns.
//! - **Rate caps.** With `resources.limits.cpu` below one core, a sandbox pauses after each
//!   slice for as long as keeps its rate at the limit (a slice of 10 ms at a limit of 250m
//!   pauses 30 ms), as CFS bandwidth control does with a quota per period. A limit of a core
//!   or more caps nothing: one sandbox is one task and never uses more.
//! - **Wake-ups run first.** A deadline reached after more than a tick since the sandbox last
//!   resumed means it was not running wasm all that time: it has just started, or it was
//!   blocked in WASI (a sleep, a socket). It gets a fresh slice instead of a turn at the back
//!   of the queue, as CFS places a waking task ahead, so starts and I/O-bound guests are not
//!   queued behind guests that spin. A guest that sleeps to game this gets at most one tick
//!   per two ticks asleep.
//! - **Accounting.** A slice is charged when it ends. A deadline reached before a tick has
//!   passed since the sandbox resumed (it waited for a worker while the epoch moved on) extends
//!   the slice instead of ending it, so time spent waiting for a worker, or blocked in WASI, is
//!   not charged.
//!
//! Shares weighted by `resources.requests.cpu` are not enforced yet: the requests count in
//! placement and admission only.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::engine::Epoch;

/// Millicores of one core: a sandbox (one task) never uses more.
pub const CORE_MILLICORES: u64 = 1000;
/// The lowest rate cap; a lower limit is raised to it.
pub const MIN_RATE_MILLICORES: u64 = 10;

/// The CPU a sandbox has used over all its runs, in milliseconds, counted in the epoch ticks
/// of its slices. Shared between the sandbox's stores and whoever reports it.
#[derive(Debug, Default)]
pub struct CpuUsage(AtomicU64);

impl CpuUsage {
    /// Milliseconds used so far.
    pub fn millis(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Adds `ticks` of `tick` each.
    pub(crate) fn charge(&self, ticks: u64, tick: Duration) {
        let millis = u64::try_from(tick.as_millis()).unwrap_or(u64::MAX);
        self.0
            .fetch_add(ticks.saturating_mul(millis), Ordering::Relaxed);
    }
}

/// What happens at a deadline.
pub(crate) enum AtDeadline {
    /// Run on for this many ticks: the slice has not run its course since the sandbox resumed.
    Continue(u64),
    /// The slice of one tick ran: charge it, then yield (and pause for `pause`, if any) and
    /// run another once resumed.
    Yield { pause: Option<Duration> },
}

/// One run's CPU schedule: its rate cap and when it last resumed.
#[derive(Debug)]
pub(crate) struct CpuShare {
    rate: Option<u64>,
    tick: Duration,
    /// The epoch at which the slice under way began: when the sandbox last resumed after a
    /// yield or woke.
    resumed_at: Arc<AtomicU64>,
}

impl CpuShare {
    /// A schedule for a sandbox capped at `rate` millicores (see the module's doc for the
    /// bounds), starting its first slice at `epoch`.
    pub(crate) fn new(rate: Option<u64>, tick: Duration, epoch: u64) -> Self {
        Self {
            rate: rate
                .filter(|r| *r < CORE_MILLICORES)
                .map(|r| r.max(MIN_RATE_MILLICORES)),
            tick,
            resumed_at: Arc::new(AtomicU64::new(epoch)),
        }
    }

    /// Decides, at a deadline reached at epoch `now`, whether the slice under way goes on or
    /// ends.
    pub(crate) fn at_deadline(&self, now: u64) -> AtDeadline {
        let ran = now.saturating_sub(self.resumed_at.load(Ordering::Relaxed));
        if ran == 0 {
            return AtDeadline::Continue(1);
        }
        if ran > 1 {
            // Not running wasm since the slice began: started or woke. A fresh slice.
            self.resumed_at.store(now, Ordering::Relaxed);
            return AtDeadline::Continue(1);
        }
        let pause = self.rate.map(|rate| {
            let idle = CORE_MILLICORES - rate;
            self.tick * u32::try_from(idle).unwrap_or(u32::MAX) / u32::try_from(rate).unwrap_or(1)
        });
        AtDeadline::Yield { pause }
    }

    /// What the sandbox awaits when it yields: a turn at the back of its worker's queue, after
    /// `pause` if it has one; it notes the epoch it resumes at.
    pub(crate) fn yield_future(
        &self,
        pause: Option<Duration>,
        epoch: Epoch,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let resumed_at = self.resumed_at.clone();
        Box::pin(async move {
            match pause {
                Some(pause) => tokio::time::sleep(pause).await,
                None => tokio::task::yield_now().await,
            }
            resumed_at.store(epoch.now(), Ordering::Relaxed);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(10);

    #[test]
    fn ticks_spent_waiting_for_a_worker_are_not_charged() {
        let share = CpuShare::new(None, TICK, 0);
        assert!(matches!(
            share.at_deadline(1),
            AtDeadline::Yield { pause: None }
        ));
        // It waited 5 ticks for a worker and resumed at epoch 6; its old deadline (epoch 2)
        // has passed: it runs on, uncharged, until a tick has passed.
        share.resumed_at.store(6, Ordering::Relaxed);
        assert!(matches!(share.at_deadline(6), AtDeadline::Continue(1)));
        assert!(matches!(share.at_deadline(7), AtDeadline::Yield { .. }));
    }

    #[test]
    fn a_sandbox_that_started_or_woke_gets_a_fresh_slice_uncharged() {
        // Created at epoch 0, first deadline check at epoch 5: it was instantiating, or
        // blocked in WASI.
        let share = CpuShare::new(None, TICK, 0);
        assert!(matches!(share.at_deadline(5), AtDeadline::Continue(1)));
        // Then it spins: its slice ends a tick later.
        assert!(matches!(share.at_deadline(6), AtDeadline::Yield { .. }));
    }

    #[test]
    fn a_rate_cap_pauses_each_slice_to_keep_the_rate() {
        let pause = |rate| match CpuShare::new(rate, TICK, 0).at_deadline(1) {
            AtDeadline::Yield { pause, .. } => pause,
            AtDeadline::Continue(_) => panic!("the slice ran"),
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
    }

    #[tokio::test(start_paused = true)]
    async fn a_yield_notes_the_epoch_it_resumes_at() {
        let epoch = Epoch::manual_for_tests();
        let share = CpuShare::new(Some(500), TICK, 0);
        epoch.advance();
        epoch.advance();
        share
            .yield_future(Some(Duration::from_millis(10)), epoch.clone())
            .await;
        assert_eq!(share.resumed_at.load(Ordering::Relaxed), 2);
    }
}
