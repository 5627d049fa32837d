//! Thread priorities: compiles run on threads that give way to everything else when the CPU
//! is short.

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
