//! [`GuestRuntime`]: the tokio runtimes guests run on, apart from the agent's own work.
//!
//! Guests are untrusted CPU: a tenant may run a thousand replicas that spin without end. On
//! the runtime that also runs the control-plane session, the admin API and the ingress's
//! accept loop, they would take every worker's turn, delay the node's heartbeats by seconds
//! and make the control plane mark the node NotReady. So guests run on worker threads of
//! their own, in two runtimes:
//!
//! - **sandboxes**: workloads' replicas, at nice [`REPLICA_NICE`]. Replicas are where CPU-bound
//!   guests live; when they keep every CPU busy, a thread that wakes with new work (the
//!   agent's own, an HTTP request, a load generator beside the agent) would wait for the
//!   kernel to preempt one at equal priority. Measured beside 1,000 spinning replicas, a
//!   healthy HTTP request's p99 was 5.2 ms with replicas at nice 0, 2.7 ms at nice 5 and at
//!   nice 10. Their threads are also `SCHED_BATCH`, so that one woken with credit (a slot
//!   handed on, a task to run) does not take the CPU from a request thread until the next
//!   tick. Between replicas, shares are the agent's run queue's business, not the kernel's.
//!   Under Kubernetes the agent is one pod: nice values weigh only against the agent's own
//!   threads inside its cgroup, so replicas give way to requests and to the agent, not to
//!   other pods.
//! - **requests**: the ingress (its listener, its connections) and the sandbox each request
//!   runs, at the process's priority: at a lower one they would lose the CPU to every other
//!   process, a load generator beside the agent included (measured: HTTP p99 6.5 ms → 16.5 ms
//!   with guest threads at nice 5 beside `wrk`). Their threads take the kernel's shortest
//!   slice ([`LATENCY_SLICE`](crate::runtime::LATENCY_SLICE)), so that a request preempts a
//!   spinning replica as soon as it arrives. Beside 1,000 spinning replicas, the requests'
//!   threads waited 18 µs at p99 from wake-up to CPU (`perf sched timehist`). The `isolation`
//!   benchmark's healthy-request p99 there was 2.0 ms (one run) with this slice while the
//!   ingress's listener and connections still lived on the agent's own runtime (their
//!   readiness came from its I/O driver), and 0.23–1.62 ms over nine runs once they moved
//!   here.
//!
//! New sandboxes, started from the agent's runtime, land in the sandboxes runtime's global
//! queue, which its workers look at every [`GLOBAL_QUEUE_INTERVAL`] turns; guests that spin
//! wait in the agent's CPU run queue, not in tokio's.

use tokio::runtime::{Handle, Runtime};

/// Turns a worker takes from its own queue before it looks at the global queue (tokio's
/// default is 31): at one epoch tick a turn, a new sandbox waits at most this many ticks.
pub const GLOBAL_QUEUE_INTERVAL: u32 = 8;

/// The nice value of the threads that run replicas: below the agent's own threads and HTTP
/// requests, above compiles ([`COMPILE_NICE`](crate::runtime::COMPILE_NICE)).
pub const REPLICA_NICE: i32 = 5;

/// The runtimes of the agent's guests; shut down in the background when dropped.
pub struct GuestRuntime {
    sandboxes: Option<Runtime>,
    requests: Option<Runtime>,
}

impl GuestRuntime {
    /// The two runtimes, of `workers` worker threads each (at least one).
    ///
    /// # Errors
    /// The threads could not be started.
    pub fn new(workers: usize) -> std::io::Result<Self> {
        let build = |name: &str, nice: i32, latency: bool| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers.max(1))
                .thread_name(name)
                .global_queue_interval(GLOBAL_QUEUE_INTERVAL)
                .on_thread_start(move || {
                    if nice != 0 {
                        crate::runtime::nice_current_thread(nice);
                    }
                    if latency {
                        crate::runtime::latency_slice_current_thread();
                    } else {
                        crate::runtime::batch_current_thread();
                    }
                })
                .enable_all()
                .build()
        };
        Ok(Self {
            sandboxes: Some(build("flotilla-guest", REPLICA_NICE, false)?),
            requests: Some(build("flotilla-request", 0, true)?),
        })
    }

    /// Where to spawn sandboxes.
    pub fn handle(&self) -> Option<Handle> {
        self.sandboxes.as_ref().map(|r| r.handle().clone())
    }

    /// Where to serve the HTTP ingress, whose requests run guests of their own.
    pub fn requests(&self) -> Option<Handle> {
        self.requests.as_ref().map(|r| r.handle().clone())
    }
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async context must not; its tasks have been
        // stopped by then, so nothing is left to wait for.
        for runtime in [self.sandboxes.take(), self.requests.take()]
            .into_iter()
            .flatten()
        {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of the thread a task spawned on `handle` runs on.
    async fn nice_on(handle: Handle) -> i32 {
        handle
            .spawn(async {
                #[allow(unsafe_code)]
                // SAFETY: gettid and getpriority take plain integers and touch no memory.
                unsafe {
                    libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
                }
            })
            .await
            .expect("the task ran")
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn replicas_run_below_requests_and_requests_at_the_process_priority() {
        let guests = GuestRuntime::new(1).expect("runtimes");
        let process = nice_on(tokio::runtime::Handle::current()).await;
        let replicas = nice_on(guests.handle().expect("sandboxes")).await;
        let requests = nice_on(guests.requests().expect("requests")).await;
        assert_eq!(replicas, (process + REPLICA_NICE).min(19));
        assert_eq!(requests, process);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn requests_run_on_the_latency_slice_and_replicas_on_the_default_one() {
        let slice = |handle: Handle| async move {
            handle
                .spawn(async { crate::runtime::current_thread_slice().expect("sched_getattr") })
                .await
                .expect("the task ran")
        };
        let guests = GuestRuntime::new(1).expect("runtimes");
        let replicas = slice(guests.handle().expect("sandboxes")).await;
        let requests = slice(guests.requests().expect("requests")).await;
        // Kernels before 6.12 have no slice per thread.
        if let Some(replicas) = replicas {
            assert_eq!(requests, Some(crate::runtime::LATENCY_SLICE));
            assert!(replicas > crate::runtime::LATENCY_SLICE, "{replicas:?}");
        }
    }
}
