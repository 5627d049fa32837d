//! [`GuestRuntime`]: the tokio runtime sandboxes run on, apart from the agent's own work.
//!
//! Guests are untrusted CPU: a tenant may run a thousand replicas that spin without end. On
//! the runtime that also runs the control-plane session, the admin API and the ingress's
//! accept loop, they would take every worker's turn (each guest yields only every epoch tick),
//! delay the node's heartbeats by seconds and make the control plane mark the node NotReady.
//! So sandboxes (and the ingress connections whose requests run guests) run here, on worker
//! threads of their own: the agent's own tasks never wait in a queue behind a guest, and its
//! threads, mostly asleep, get the CPU as soon as they wake (the kernel serves waking threads
//! first). The guest threads keep the process's priority: lowered, they would lose the CPU to
//! every other process on the node, a load generator beside the agent included (measured: HTTP
//! p99 6.5 ms → 16.5 ms at nice 5 beside `wrk`). New sandboxes, started from the agent's
//! runtime, land in this runtime's global queue, which its workers look at every
//! [`GLOBAL_QUEUE_INTERVAL`] turns, so a start does not wait for every spinning guest's turn.

use tokio::runtime::{Handle, Runtime};

/// Turns a worker takes from its own queue before it looks at the global queue (tokio's
/// default is 31): at one epoch tick a turn, a new sandbox waits at most this many ticks.
pub const GLOBAL_QUEUE_INTERVAL: u32 = 8;

/// The runtime of the agent's sandboxes; shut down in the background when dropped.
pub struct GuestRuntime {
    runtime: Option<Runtime>,
}

impl GuestRuntime {
    /// A runtime of `workers` worker threads (at least one).
    ///
    /// # Errors
    /// The threads could not be started.
    pub fn new(workers: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("flotilla-guest")
            .global_queue_interval(GLOBAL_QUEUE_INTERVAL)
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    /// Where to spawn sandboxes.
    pub fn handle(&self) -> Option<Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async context must not; its tasks have been
        // stopped by then, so nothing is left to wait for.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
