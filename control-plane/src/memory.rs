//! How the control plane's process uses memory.

/// Opts the whole process out of transparent huge pages (`PR_SET_THP_DISABLE`); elsewhere than
/// Linux this does nothing, and a kernel that refuses is logged.
///
/// The allocator (mimalloc) asks for huge pages for its arenas and hands freed memory back to
/// the kernel in small pieces; each fault that brings such memory back zeroes a whole 2 MiB
/// page. Beside a tenant that applies and deletes 200 workloads at once, that zeroing was a
/// quarter of the control plane's CPU (`perf record`), and a neighbour's start waited for it.
/// With replicas at nice 15, its p99 was 2.75–2.91× the quiet one with huge pages (two
/// `isolation` runs) and 1.47–1.84× with the control plane's process opted out (three runs);
/// 1.82× in the one run since, with replicas at nice 5. The node agent keeps them: its sandbox
/// starts are faster with them (`startup` p50 8.5 µs, against 12.4–16.5 µs in two runs with
/// mimalloc built not to ask for them).
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        #[allow(unsafe_code)]
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
        let result = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if result != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot opt out of transparent huge pages");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn the_process_is_out_of_transparent_huge_pages_after_opting_out() {
        super::disable_transparent_huge_pages();
        #[allow(unsafe_code)]
        // SAFETY: PR_GET_THP_DISABLE takes plain integers and touches no memory of ours.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }
}
