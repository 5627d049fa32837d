//! Thread priorities: which of the agent's threads win the CPU when it is short.
//!
//! Three knobs of Linux's fair scheduler, all per thread and needing no privilege:
//! - the **nice value** sets a thread's share of the CPU against the others: compiles and
//!   replicas run below the agent's own threads;
//! - the **slice** (Linux 6.12 and later, EEVDF) sets how soon a thread runs when it wakes: one
//!   with a shorter slice than the running thread's preempts it at once, where one with the
//!   default slice (0.75 ms × (1 + log₂ CPUs)) may wait for the running one's to end. Threads
//!   that serve HTTP requests take [`LATENCY_SLICE`], so a request that arrives while guests
//!   spin on every CPU runs within microseconds. Older kernels ignore it;
//! - the **policy** `SCHED_BATCH` marks a thread CPU-bound: same share, but it never preempts
//!   another thread when it wakes. Replicas' worker threads wake often (a slot handed on by
//!   the run queue, a task to run) and, woken with credit, took the CPU from a request thread
//!   until the next scheduler tick.

use std::time::Duration;

/// The slice of threads whose work is latency-bound: the shortest the kernel accepts.
pub const LATENCY_SLICE: Duration = Duration::from_micros(100);

/// Sets the calling thread's nice value. On Linux a nice value belongs to the thread, not the
/// process; elsewhere this does nothing. Raising it needs no privilege; failures are logged.
pub fn nice_current_thread(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        #[allow(unsafe_code)]
        // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
        let result =
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        if result != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), nice, "cannot set a thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Gives the calling thread [`LATENCY_SLICE`], keeping its policy and nice value. Threads of
/// a real-time or idle policy are left as they are; so is every thread where the kernel
/// refuses (a seccomp filter) or has no such call. Failures are logged.
pub fn latency_slice_current_thread() {
    #[cfg(target_os = "linux")]
    if let Err(error) = set_fair_attr(|attr| {
        attr.sched_runtime = u64::try_from(LATENCY_SLICE.as_nanos()).unwrap_or(u64::MAX);
    }) {
        tracing::debug!(%error, "cannot shorten a thread's slice");
    }
}

/// The calling thread's slice as the kernel reports it: `None` before Linux 6.12, which has
/// no slice per thread.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn current_thread_slice() -> std::io::Result<Option<Duration>> {
    let attr = thread_attr()?;
    Ok((attr.sched_runtime != 0).then(|| Duration::from_nanos(attr.sched_runtime)))
}

/// Marks the calling thread CPU-bound (`SCHED_BATCH`), keeping its nice value: its
/// share of the CPU is unchanged, but it never preempts another thread when it wakes; only the
/// scheduler tick takes the CPU from others for it. Threads of a real-time or idle policy are
/// left as they are; failures are logged.
pub fn batch_current_thread() {
    #[cfg(target_os = "linux")]
    if let Err(error) = set_fair_attr(|attr| {
        attr.sched_policy = libc::SCHED_BATCH as u32;
        // The default slice (the kernel reports it as if it were set).
        attr.sched_runtime = 0;
    }) {
        tracing::debug!(%error, "cannot mark a thread CPU-bound");
    }
}

/// Changes the calling thread's scheduling attributes with `change`, if its policy is a fair
/// one (`SCHED_OTHER`, `SCHED_BATCH`); its nice value is kept.
#[cfg(target_os = "linux")]
fn set_fair_attr(change: impl FnOnce(&mut libc::sched_attr)) -> std::io::Result<()> {
    let mut attr = thread_attr()?;
    let fair = [libc::SCHED_OTHER, libc::SCHED_BATCH].map(|policy| policy as u32);
    if !fair.contains(&attr.sched_policy) {
        return Ok(());
    }
    attr.sched_flags = 0;
    change(&mut attr);
    #[allow(unsafe_code)]
    // SAFETY: the kernel reads `attr.size` bytes of an initialised sched_attr; pid 0 is the
    // calling thread.
    let result = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0u32) };
    syscall_result(result)
}

/// The calling thread's scheduling attributes.
#[cfg(target_os = "linux")]
fn thread_attr() -> std::io::Result<libc::sched_attr> {
    let size = std::mem::size_of::<libc::sched_attr>();
    // SAFETY: sched_attr is plain integers, for which zero is a valid value.
    #[allow(unsafe_code)]
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    #[allow(unsafe_code)]
    // SAFETY: the kernel writes at most `size` bytes into `attr`, which has that many; pid 0
    // is the calling thread.
    let result = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &raw mut attr,
            size as libc::c_uint,
            0u32,
        )
    };
    syscall_result(result).map(|()| attr)
}

/// A raw system call's result: 0 on success, else the error in `errno`.
#[cfg(target_os = "linux")]
fn syscall_result(result: libc::c_long) -> std::io::Result<()> {
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_latency_thread_keeps_its_nice_value_and_gets_the_short_slice_where_the_kernel_has_slices()
    {
        std::thread::spawn(|| {
            nice_current_thread(3);
            let before = thread_attr().expect("sched_getattr");
            latency_slice_current_thread();
            let after = thread_attr().expect("sched_getattr");
            assert_eq!(after.sched_nice, 3);
            assert_eq!(after.sched_policy, before.sched_policy);
            // Kernels before 6.12 keep no slice per thread and report none.
            if before.sched_runtime != 0 || after.sched_runtime != 0 {
                assert_eq!(current_thread_slice().expect("slice"), Some(LATENCY_SLICE));
            }
        })
        .join()
        .expect("the thread ran");
    }

    #[test]
    fn a_cpu_bound_thread_keeps_its_nice_value_and_is_batch_scheduled() {
        std::thread::spawn(|| {
            nice_current_thread(4);
            batch_current_thread();
            let after = thread_attr().expect("sched_getattr");
            assert_eq!(after.sched_nice, 4);
            assert_eq!(after.sched_policy, libc::SCHED_BATCH as u32);
        })
        .join()
        .expect("the thread ran");
    }
}
