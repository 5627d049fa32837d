//! `flotilla-node-agent --precompile FILE... [--precompile-for TRIPLE] --cache-dir DIR`: compiles
//! modules ahead of time, for this or another architecture, into a cache directory that an
//! agent of that architecture then loads instead of compiling (as images are pre-pulled onto
//! nodes). Run it with the node's own flags: the artifacts depend on the engine settings (memory
//! reservation and guard, stack sizes), and an agent ignores artifacts made for other settings.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::Digest;

use crate::runtime::{RuntimeConfig, precompile_for_target, precompiled_suffix, write_sealed};

/// Compiles each of `modules` for `target` with `config`'s engine settings into `config`'s
/// cache directory; returns the files written.
///
/// # Errors
/// No cache directory, an unknown target, or a module that cannot be read or compiled.
pub fn precompile(
    config: &RuntimeConfig,
    target: &str,
    modules: &[PathBuf],
) -> anyhow::Result<Vec<PathBuf>> {
    let dir = config
        .cache_dir
        .as_deref()
        .context("--precompile needs a cache directory (--cache-dir, without --no-cache)")?;
    crate::runtime::volumes::create_private_dir(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let suffix = precompiled_suffix(config, target)?;
    modules
        .iter()
        .map(|module| precompile_one(config, target, dir, &suffix, module))
        .collect()
}

fn precompile_one(
    config: &RuntimeConfig,
    target: &str,
    dir: &Path,
    suffix: &str,
    module: &Path,
) -> anyhow::Result<PathBuf> {
    let wasm = std::fs::read(module).with_context(|| format!("reading {}", module.display()))?;
    let digest = hex::encode(sha2::Sha256::digest(&wasm));
    let code = precompile_for_target(config, target, &wasm)
        .with_context(|| format!("compiling {} for {target}", module.display()))?;
    let path = dir.join(format!("{digest}{suffix}"));
    write_sealed(&path, &code).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
