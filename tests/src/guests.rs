//! Builds the example guests from their committed sources, exactly as the committed binaries were
//! built: Debian's clang with wasi-libc for C, then `wit-component` with wasmtime's preview 1
//! adapter for components. `cargo run -p flotilla-tests --bin build-guests` rewrites the binaries;
//! the examples test rebuilds them and fails when a committed one differs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_PROXY_ADAPTER,
};

/// The HTTP guests under `examples/guests/http/`, by source name.
pub const HTTP_GUESTS: [&str; 2] = ["hello", "echo"];

/// The repository's `examples/guests` directory.
pub fn guests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests")
}

/// Compiles C sources to a core wasm module with `clang --target=wasm32-wasi -O2`, plus `flags`.
///
/// # Errors
/// Fails when clang is missing or the sources do not compile.
pub fn clang(sources: &[PathBuf], flags: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = tempfile::tempdir()?;
    let wasm = out.path().join("out.wasm");
    let status = Command::new("clang")
        .args(["--target=wasm32-wasi", "-O2", "-Wl,--strip-all"])
        .args(flags)
        .arg("-o")
        .arg(&wasm)
        .args(sources)
        .status()
        .context(
            "running clang (apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32, as \
             .ci/setup does)",
        )?;
    if !status.success() {
        bail!("clang failed on {sources:?}");
    }
    Ok(std::fs::read(&wasm)?)
}

/// A C command of `examples/guests/` (`hello-c`, `files`, `stdio`).
///
/// # Errors
/// Fails when clang does.
pub fn build_c_command(name: &str) -> anyhow::Result<Vec<u8>> {
    clang(&[guests_dir().join(format!("{name}.c"))], &[])
}

/// The C commands of `examples/guests/`.
pub const C_COMMANDS: [&str; 3] = ["hello-c", "files", "stdio"];

/// The HTTP guest `examples/guests/http/<name>.c` as a `wasi:http/proxy` component: compiled as
/// a reactor with the committed `wit-bindgen` bindings, given the world's type information from
/// `wit/`, and wrapped with the preview 1 proxy adapter.
///
/// # Errors
/// Fails when clang fails or the module does not fit the world.
pub fn build_http_guest(name: &str) -> anyhow::Result<Vec<u8>> {
    let dir = guests_dir().join("http");
    let mut module = clang(
        &[dir.join(format!("{name}.c")), dir.join("gen/http_guest.c")],
        &["-mexec-model=reactor"],
    )?;
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(dir.join("wit"))?;
    let world = resolve.select_world(&[package], Some("http-guest"))?;
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )?;
    wit_component::ComponentEncoder::default()
        .module(&module)?
        .adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            WASI_SNAPSHOT_PREVIEW1_PROXY_ADAPTER,
        )?
        .validate(true)
        .encode()
}

/// The WASI 0.3 guests written in Rust, each a crate under `examples/guests/` built to
/// `examples/guests/<name>.wasm`: a command (`wasi:cli/run`) and an HTTP handler
/// (`wasi:http/handler`).
pub const P3_GUESTS: [&str; 2] = ["p3", "p3-http"];

/// The WASI 0.3 guest `examples/guests/<name>/` as a component: its Rust crate built with
/// cargo for `wasm32-wasip1` (`wit-bindgen` embeds the world's type information), then made a
/// component with the preview 1 reactor adapter for what Rust's `std` imports.
///
/// # Errors
/// Fails when cargo or the `wasm32-wasip1` target is missing, or the module does not fit the
/// world.
pub fn build_p3_guest(name: &str) -> anyhow::Result<Vec<u8>> {
    let crate_dir = guests_dir().join(name);
    let target_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Panic locations name the source files of the crate and its dependencies; without these
    // remaps the binary would hold the builder's CARGO_HOME and checkout, and differ for every
    // user who builds it.
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let rustflags = [
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
        format!(
            "--remap-path-prefix={}=/guest",
            crate_dir.canonicalize()?.display()
        ),
    ]
    .join("\x1f");
    let status = Command::new(cargo)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip1",
        ])
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .with_context(|| format!("running cargo for examples/guests/{name}"))?;
    if !status.success() {
        bail!(
            "building examples/guests/{name} failed (rustup target add wasm32-wasip1, as \
             .ci/setup does)"
        );
    }
    let artifact = format!("flotilla_guest_{}.wasm", name.replace('-', "_"));
    let module = std::fs::read(target_dir.join("wasm32-wasip1/release").join(artifact))?;
    wit_component::ComponentEncoder::default()
        .module(&module)?
        .adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?
        .validate(true)
        .encode()
}

/// Every committed guest binary built from source: `(path, bytes)`.
///
/// # Errors
/// Fails when a guest does not build.
pub fn build_all() -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let dir = guests_dir();
    let mut built = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("wat") {
            let wasm = wat::parse_file(&path)?;
            built.push((path.with_extension("wasm"), wasm));
        }
    }
    for name in C_COMMANDS {
        built.push((dir.join(format!("{name}.wasm")), build_c_command(name)?));
    }
    for name in HTTP_GUESTS {
        built.push((
            dir.join(format!("http/{name}.wasm")),
            build_http_guest(name)?,
        ));
    }
    for name in P3_GUESTS {
        built.push((dir.join(format!("{name}.wasm")), build_p3_guest(name)?));
    }
    built.sort();
    Ok(built)
}
