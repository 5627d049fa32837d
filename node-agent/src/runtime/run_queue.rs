//! [`RunQueue`]: the agent-wide queue of sandboxes that want more CPU than their first slice,
//! served in order of weighted virtual runtime, a few at a time.
//!
//! Guests run as tokio tasks. A guest that spins yields at the end of every slice; if it went
//! straight back into its worker's run queue, a thousand spinners would sit in those queues
//! ahead of every new sandbox, every wake-up and every ingress connection, and each would wait
//! a thousand slices for its turn. So a sandbox that has used a whole slice waits here instead,
//! outside tokio, for one of the queue's **slots**: as many as there are guest worker threads.
//! Only slot holders run beyond their first slice, so tokio's queues hold at most one spinner
//! per worker besides the work that just arrived, and that work waits a slice or two at most,
//! however many guests spin.
//!
//! Slots go to the waiter with the lowest **virtual runtime**: the CPU it has used, divided by
//! its weight (`resources.requests.cpu`, as CFS divides by a cgroup's `cpu.shares`). Under
//! contention each sandbox therefore gets CPU in proportion to its request; without
//! contention a slot is free and nobody waits. A sandbox that joins (starts, or wakes from a
//! long sleep) is placed at the queue's virtual time, so it neither starves the others with
//! credit saved while it slept nor waits behind their history.
//!
//! A slot is a [`Lease`], given back when the holder's slice ends or when the lease is
//! dropped (the sandbox ended or was stopped). A holder that blocks in WASI (a sleep, a
//! socket) runs no wasm and reaches no deadline: its lease expires [`LEASE_TICKS`] epoch ticks
//! after the holder began to run, so it cannot keep a slot idle.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

/// Epoch ticks after which a running lease expires: the slice of one tick, and one more for
/// the tick the slice began in.
pub const LEASE_TICKS: u64 = 2;

/// Virtual runtime one tick adds at a weight of one millicore; a tick at weight `w` adds
/// `VIRTUAL_TICK / w`.
const VIRTUAL_TICK: u64 = 1 << 30;

/// The weight of a sandbox that requests no CPU: 2 millicores, as Kubernetes gives BestEffort
/// pods `cpu.shares` of 2.
pub const MIN_WEIGHT_MILLICORES: u64 = 2;

/// The queue of sandboxes waiting for a CPU slot. Shared by every store of the agent.
#[derive(Debug)]
pub struct RunQueue {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Slots not leased.
    free: usize,
    /// Leases given out: (lease, the epoch its holder began to run at, once it has).
    leased: Vec<(u64, Option<u64>)>,
    /// Who waits for a slot, lowest virtual runtime first.
    waiting: BinaryHeap<Reverse<Waiter>>,
    /// The virtual runtime of the last waiter served: the queue's virtual time.
    virtual_time: u64,
    next_lease: u64,
    next_waiter: u64,
}

#[derive(Debug)]
struct Waiter {
    virtual_runtime: u64,
    /// Arrival order, among waiters of equal virtual runtime.
    seq: u64,
    grant: oneshot::Sender<Lease>,
}

/// A CPU slot, held while its sandbox runs beyond its first slice; given back when dropped.
#[derive(Debug)]
pub struct Lease {
    id: u64,
    /// `None` once the slot has been handed on without going through the queue.
    queue: Option<Arc<RunQueue>>,
}

// === impl RunQueue ===

impl RunQueue {
    /// A queue of `slots` slots (at least one).
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                free: slots.max(1),
                leased: Vec::new(),
                waiting: BinaryHeap::new(),
                virtual_time: 0,
                next_lease: 0,
                next_waiter: 0,
            }),
        })
    }

    /// The virtual runtime of the last sandbox served: where a joining sandbox is placed.
    pub fn virtual_time(&self) -> u64 {
        self.lock().virtual_time
    }

    /// Sandboxes waiting for a slot.
    pub fn waiting(&self) -> usize {
        let state = self.lock();
        state
            .waiting
            .iter()
            .filter(|Reverse(waiter)| !waiter.grant.is_closed())
            .count()
    }

    /// Waits for a slot for a sandbox at `virtual_runtime`: at once if one is free and nobody
    /// waits, else when every waiter of lower virtual runtime has been served.
    pub async fn acquire(self: &Arc<Self>, virtual_runtime: u64) -> Lease {
        let granted = {
            let mut state = self.lock();
            if state.free > 0 && state.waiting.is_empty() {
                state.free -= 1;
                state.virtual_time = state.virtual_time.max(virtual_runtime);
                Ok(self.lease(&mut state))
            } else {
                Err(Self::enqueue(&mut state, virtual_runtime))
            }
        };
        match granted {
            Ok(lease) => lease,
            Err(granted) => Self::granted(granted).await,
        }
    }

    /// Queues the holder of `held` for its next slice at `virtual_runtime`, and hands its slot
    /// to the waiter of lowest virtual runtime, itself included: a sandbox that yields competes
    /// for the slot it gives back.
    pub async fn requeue(self: &Arc<Self>, mut held: Lease, virtual_runtime: u64) -> Lease {
        let granted = {
            let mut state = self.lock();
            let granted = Self::enqueue(&mut state, virtual_runtime);
            held.queue = None;
            // Unless it expired meanwhile, and went back then.
            if let Some(index) = state.leased.iter().position(|(id, _)| *id == held.id) {
                state.leased.swap_remove(index);
                state.free += 1;
            }
            self.serve(&mut state);
            granted
        };
        Self::granted(granted).await
    }

    /// Adds a waiter at `virtual_runtime`; its lease comes on the returned channel.
    fn enqueue(state: &mut State, virtual_runtime: u64) -> oneshot::Receiver<Lease> {
        let (grant, granted) = oneshot::channel();
        let seq = state.next_waiter;
        state.next_waiter += 1;
        state.waiting.push(Reverse(Waiter {
            virtual_runtime,
            seq,
            grant,
        }));
        granted
    }

    /// The lease a waiter is granted.
    async fn granted(granted: oneshot::Receiver<Lease>) -> Lease {
        // The sender lives in the queue, which lives as long as the waiter's caller: it is
        // dropped unsent only by `serve` failing to send, which does not happen to a waiter
        // still awaiting. Should it anyway, run without a slot rather than never.
        granted.await.unwrap_or(Lease {
            id: u64::MAX,
            queue: None,
        })
    }

    /// Notes that the holder of `lease` began to run at epoch `now`: its lease expires
    /// [`LEASE_TICKS`] later.
    pub fn running(&self, lease: &Lease, now: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.leased.iter_mut().find(|(id, _)| *id == lease.id) {
            entry.1 = Some(now);
        }
    }

    /// Expires the leases whose holders began to run [`LEASE_TICKS`] or more before epoch
    /// `now` and hands their slots on. Called at every epoch tick.
    pub fn expire(self: &Arc<Self>, now: u64) {
        let mut state = self.lock();
        let before = state.leased.len();
        state
            .leased
            .retain(|(_, since)| !since.is_some_and(|since| since + LEASE_TICKS <= now));
        let expired = before - state.leased.len();
        state.free += expired;
        self.serve(&mut state);
    }

    /// Gives back the slot of lease `id`, unless it expired, and hands it on.
    fn release(self: &Arc<Self>, id: u64) {
        let mut state = self.lock();
        if let Some(index) = state.leased.iter().position(|(lease, _)| *lease == id) {
            state.leased.swap_remove(index);
            state.free += 1;
            self.serve(&mut state);
        }
    }

    /// Hands free slots to the waiters of lowest virtual runtime.
    fn serve(self: &Arc<Self>, state: &mut State) {
        while state.free > 0 {
            let Some(Reverse(waiter)) = state.waiting.pop() else {
                return;
            };
            let lease = self.lease(state);
            match waiter.grant.send(lease) {
                Ok(()) => {
                    state.free -= 1;
                    state.virtual_time = state.virtual_time.max(waiter.virtual_runtime);
                }
                // The waiter is gone (its sandbox stopped): the lease goes unused.
                Err(mut lease) => {
                    lease.queue = None;
                    state.leased.retain(|(id, _)| *id != lease.id);
                }
            }
        }
    }

    fn lease(self: &Arc<Self>, state: &mut State) -> Lease {
        let id = state.next_lease;
        state.next_lease += 1;
        state.leased.push((id, None));
        Lease {
            id,
            queue: Some(self.clone()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements: a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Lease ===

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.release(self.id);
        }
    }
}

// === impl Waiter ===

impl Waiter {
    fn key(&self) -> (u64, u64) {
        (self.virtual_runtime, self.seq)
    }
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// The virtual runtime `ticks` of CPU add at a weight of `weight` millicores.
pub(crate) fn virtual_ticks(ticks: u64, weight: u64) -> u64 {
    ticks.saturating_mul(VIRTUAL_TICK / weight.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::poll;

    #[tokio::test]
    async fn a_free_slot_is_taken_at_once_and_a_busy_one_is_waited_for() {
        let queue = RunQueue::new(1);
        let held = queue.acquire(0).await;
        let mut second = std::pin::pin!(queue.acquire(0));
        assert!(poll!(second.as_mut()).is_pending());
        assert_eq!(queue.waiting(), 1);
        drop(held);
        let _second = second.await;
        assert_eq!(queue.waiting(), 0);
    }

    #[tokio::test]
    async fn waiters_are_served_lowest_virtual_runtime_first() {
        let queue = RunQueue::new(1);
        let held = queue.acquire(0).await;
        let mut late = std::pin::pin!(queue.acquire(300));
        let mut early = std::pin::pin!(queue.acquire(100));
        assert!(poll!(late.as_mut()).is_pending());
        assert!(poll!(early.as_mut()).is_pending());
        drop(held);
        assert!(
            poll!(late.as_mut()).is_pending(),
            "it came first but used more"
        );
        let early = early.await;
        assert_eq!(queue.virtual_time(), 100);
        drop(early);
        let _late = late.await;
        assert_eq!(queue.virtual_time(), 300);
    }

    #[tokio::test]
    async fn a_holder_that_yields_competes_for_the_slot_it_gives_back() {
        let queue = RunQueue::new(1);
        let held = queue.acquire(0).await;
        let mut other = std::pin::pin!(queue.acquire(300));
        assert!(poll!(other.as_mut()).is_pending());
        // Still behind the waiter after its slice: it keeps the slot.
        let held = queue.requeue(held, 100).await;
        assert!(poll!(other.as_mut()).is_pending(), "the yielder used less");
        // Ahead of it now: the slot goes to the waiter, and the yielder waits.
        let mut yielder = std::pin::pin!(queue.requeue(held, 400));
        assert!(poll!(yielder.as_mut()).is_pending());
        let other = other.await;
        assert_eq!(queue.virtual_time(), 300);
        drop(other);
        let _yielder = yielder.await;
    }

    #[tokio::test]
    async fn a_holder_that_blocks_loses_its_slot_after_its_lease() {
        let queue = RunQueue::new(1);
        let blocked = queue.acquire(0).await;
        queue.running(&blocked, 5);
        let mut next = std::pin::pin!(queue.acquire(0));
        assert!(poll!(next.as_mut()).is_pending());
        queue.expire(5 + LEASE_TICKS - 1);
        assert!(poll!(next.as_mut()).is_pending(), "the lease still runs");
        queue.expire(5 + LEASE_TICKS);
        let next = next.await;
        // The expired holder wakes and gives back a slot it no longer holds: nothing happens.
        drop(blocked);
        let mut third = std::pin::pin!(queue.acquire(0));
        assert!(poll!(third.as_mut()).is_pending(), "one slot, still held");
        drop(next);
        let _third = third.await;
    }

    #[tokio::test]
    async fn a_lease_not_yet_running_does_not_expire() {
        let queue = RunQueue::new(1);
        let _granted = queue.acquire(0).await;
        let mut next = std::pin::pin!(queue.acquire(0));
        queue.expire(100);
        assert!(poll!(next.as_mut()).is_pending());
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_takes_no_slot() {
        let queue = RunQueue::new(1);
        let held = queue.acquire(0).await;
        {
            let mut gone = std::pin::pin!(queue.acquire(0));
            assert!(poll!(gone.as_mut()).is_pending());
        }
        let mut next = std::pin::pin!(queue.acquire(10));
        assert!(poll!(next.as_mut()).is_pending());
        drop(held);
        let _next = next.await;
    }

    #[tokio::test]
    async fn contended_slots_go_in_proportion_to_weight() {
        // Two sandboxes that always want CPU, weights 250m and 750m, one slot: each turn the
        // holder runs a slice, adds it to its virtual runtime and queues again.
        let queue = RunQueue::new(1);
        let weights = [250, 750];
        let mut virtual_runtime = [0u64; 2];
        let mut slices = [0u64; 2];
        let mut holder: Option<(usize, Lease)> = None;
        for _ in 0..400 {
            // A fresh coop budget: tokio's channels answer Pending once a task has used it.
            tokio::task::yield_now().await;
            // Whoever does not hold the slot queues at its virtual runtime; the holder ends
            // its slice, queues at its new one, and gives the slot back.
            let mut waiters = Vec::new();
            for (i, runtime) in virtual_runtime.iter().enumerate() {
                if holder.as_ref().is_none_or(|(h, _)| *h != i) {
                    waiters.push((i, Box::pin(queue.acquire(*runtime))));
                }
            }
            if let Some((h, lease)) = holder.take() {
                slices[h] += 1;
                virtual_runtime[h] += virtual_ticks(1, weights[h]);
                waiters.push((h, Box::pin(queue.acquire(virtual_runtime[h]))));
                for (_, waiter) in &mut waiters {
                    assert!(poll!(waiter.as_mut()).is_pending(), "the slot is held");
                }
                drop(lease);
            }
            let mut granted = Vec::new();
            for (i, waiter) in &mut waiters {
                if let std::task::Poll::Ready(lease) = poll!(waiter.as_mut()) {
                    granted.push((*i, lease));
                }
            }
            assert_eq!(granted.len(), 1, "one slot");
            holder = granted.pop();
        }
        let share = slices[0] as f64 / slices[1] as f64;
        assert!(
            (share - 1.0 / 3.0).abs() < 0.02,
            "slices {slices:?}: {share} instead of 1:3"
        );
    }
}
