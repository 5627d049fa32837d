//! Tests of what needs privileges: whether this process has them, and running a test again
//! without them, so that both the privileged path and its fallback are tested where the
//! suite runs as root, and the fallback where it does not.

/// Says on `cargo test`'s own stderr that a test skipped something, and why: libtest shows
/// what a test prints only when it fails, so a `println!` here would never be seen. Writing to
/// the stream itself is not captured.
pub fn skipped(reason: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "skipped: {reason}");
}

/// Set in a test process that [`rerun_without_sys_admin`] started.
const WITHOUT_SYS_ADMIN: &str = "FLOTILLA_TEST_WITHOUT_SYS_ADMIN";

/// Whether this process can mount a tmpfs (it has `CAP_SYS_ADMIN`, as root has).
pub fn can_mount_tmpfs() -> bool {
    let dir = tempfile::tempdir().expect("temp dir");
    let mounted = rustix::mount::mount(
        "tmpfs",
        dir.path(),
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"size=4096",
    )
    .is_ok();
    if mounted {
        let _ = rustix::mount::unmount(dir.path(), rustix::mount::UnmountFlags::DETACH);
    }
    mounted
}

/// Runs the test `name` (its path in this binary) again in a child process without
/// `CAP_SYS_ADMIN` (`setpriv` drops it from the bounding and inheritable sets, so the test
/// binary it starts has none), so that what a non-root agent does is tested as root too.
/// Fails if the child fails; says what it skipped where `setpriv` is missing.
pub fn rerun_without_sys_admin(name: &str) {
    assert!(
        std::env::var_os(WITHOUT_SYS_ADMIN).is_none(),
        "setpriv left CAP_SYS_ADMIN in place"
    );
    let exe = std::env::current_exe().expect("the test binary");
    let output = std::process::Command::new("setpriv")
        .args(["--bounding-set=-sys_admin", "--inh-caps=-sys_admin"])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(WITHOUT_SYS_ADMIN, "1")
        .output();
    let output = match output {
        Ok(output) => output,
        Err(error) => {
            skipped(&format!(
                "{name} without CAP_SYS_ADMIN needs setpriv (util-linux): {error}"
            ));
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{name} without CAP_SYS_ADMIN: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
