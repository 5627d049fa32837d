//! Volumes and configuration: the directories a sandbox reaches (WASI preopens) and the
//! ConfigMaps and Secrets its files and environment come from.
//!
//! - `emptyDir`: a directory of its own for each sandbox under the agent's volume directory,
//!   kept across its restarts and removed with it. With a size limit (or `medium: Memory`,
//!   sized to the sandbox's memory limit) it is a tmpfs, so writes past the limit fail with
//!   "no space" in that sandbox alone (mounting it needs `CAP_SYS_ADMIN`).
//! - `subPath`: a directory inside an `emptyDir` or `hostPath`, opened beneath it.
//! - `hostPath`: a node directory, only under a prefix the agent allows (`--allow-host-path`),
//!   read-only unless both the mount and the rule allow writes.
//! - `configMap` / `secret`: the object's keys as files (or the keys its `items` list, at
//!   their paths), updated in place: see [`ConfigFiles`].
//!
//! A guest reaches nothing outside its mounts: wasmtime-wasi resolves every path under the
//! preopened directory (`cap-std`), so `..`, absolute paths and symlinks cannot leave it.

mod config_files;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_model::volumes::PathError;
use flotilla_proto::agent::v1::{Volume, volume};
pub use flotilla_proto::config::ConfigKey;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

pub use self::config_files::{ConfigData, ConfigFiles, SecretStorage};
use super::exit::Exit;

/// Where volumes live and which node directories sandboxes may mount.
#[derive(Clone, Debug, Default)]
pub struct VolumeConfig {
    /// Scratch directories and configuration files. Default: a fresh directory under the
    /// system's temporary directory, removed when the agent exits.
    pub dir: PathBuf,
    /// Node directories `hostPath` volumes may name.
    pub host_paths: Vec<HostPathRule>,
    /// Where Secrets' files live. Default: a tmpfs the agent mounts under `dir`. A directory
    /// that is a tmpfs already (a `medium: Memory` emptyDir) is used as it is.
    pub secrets_dir: Option<PathBuf>,
}

impl VolumeConfig {
    /// Where ConfigMaps' files live: `config` under `dir`.
    pub fn config_files_dir(&self) -> PathBuf {
        self.dir.join(CONFIG)
    }

    /// Where Secrets' files live: `secrets_dir`, else `config/secrets` under `dir`.
    pub fn secret_files_dir(&self) -> PathBuf {
        self.secrets_dir
            .clone()
            .unwrap_or_else(|| self.config_files_dir().join(SECRETS))
    }
}

/// A node directory (and everything under it) that `hostPath` volumes may mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPathRule {
    /// The directory.
    pub prefix: PathBuf,
    /// Whether mounts may write to it (`--allow-host-path DIR:rw`).
    pub writable: bool,
}

/// A `--allow-host-path` value that is not `DIR` or `DIR:rw` with an absolute `DIR`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: must be an absolute path, optionally with :rw")]
pub struct InvalidHostPathRule(pub String);

impl std::str::FromStr for HostPathRule {
    type Err = InvalidHostPathRule;

    /// `DIR` (read-only) or `DIR:rw`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let (path, writable) = match value.strip_suffix(":rw") {
            Some(path) => (path, true),
            None => (value.strip_suffix(":ro").unwrap_or(value), false),
        };
        if !path.starts_with('/') {
            return Err(InvalidHostPathRule(value.to_string()));
        }
        Ok(Self {
            prefix: PathBuf::from(path),
            writable,
        })
    }
}

/// Why a workload's volumes are refused on this agent.
#[derive(Debug, thiserror::Error)]
pub enum VolumeRefused {
    /// A `hostPath` that cannot be resolved (it does not exist, for one).
    #[error("hostPath {path}")]
    HostPathUnresolved {
        /// The path the spec names.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A `hostPath` under none of the agent's `--allow-host-path` rules.
    #[error("hostPath {path} is not allowed on this node (the agent allows {allowed})")]
    HostPathNotAllowed {
        /// The path the spec names.
        path: String,
        /// The directories the agent allows, or how to allow one.
        allowed: String,
    },
    /// A writable mount of a `hostPath` the agent allows read-only.
    #[error("hostPath {path} may only be mounted read-only on this node")]
    HostPathReadOnly {
        /// The path the spec names.
        path: String,
    },
    /// An `items` path or a `subPath` that would leave its volume.
    #[error("volume {volume}: {field} {reason}")]
    EscapingPath {
        /// The volume.
        volume: String,
        /// `items path` or `subPath`.
        field: &'static str,
        /// What is wrong with the path.
        reason: PathError,
    },
    /// A `subPath` on a ConfigMap or Secret volume.
    #[error("volume {0}: subPath is not supported for configMap and secret volumes")]
    SubPathOfConfig(String),
}

/// Checks a workload's volumes against the agent's rules when it is prepared.
///
/// # Errors
/// The `hostPath` the agent does not allow (or a writable mount of a read-only one), or an
/// `items` path or `subPath` that would leave its volume.
pub fn check(volumes: &[Volume], config: &VolumeConfig) -> Result<(), VolumeRefused> {
    let escaping = |volume: &Volume, field, reason| VolumeRefused::EscapingPath {
        volume: volume.name.clone(),
        field,
        reason,
    };
    for v in volumes {
        match &v.source {
            Some(volume::Source::HostPath(path)) => {
                host_path(path, !v.read_only, config)?;
            }
            Some(volume::Source::Config(reference)) => {
                for item in &reference.items {
                    flotilla_model::volumes::validate_relative_path(&item.path)
                        .map_err(|e| escaping(v, "items path", e))?;
                }
                if !v.sub_path.is_empty() {
                    return Err(VolumeRefused::SubPathOfConfig(v.name.clone()));
                }
            }
            _ => {}
        }
        if !v.sub_path.is_empty() {
            flotilla_model::volumes::validate_relative_path(&v.sub_path)
                .map_err(|e| escaping(v, "subPath", e))?;
        }
    }
    Ok(())
}

/// The node directory a `hostPath` names, opened beneath the directory of the rule that
/// allows it: a symlink swapped in after the check cannot lead outside that directory.
fn open_host_path(
    path: &str,
    writable: bool,
    config: &VolumeConfig,
) -> Result<cap_std::fs::Dir, VolumeRefused> {
    let (resolved, prefix) = host_path(path, writable, config)?;
    let unresolved = |source| VolumeRefused::HostPathUnresolved {
        path: path.to_string(),
        source,
    };
    let allowed = cap_std::fs::Dir::open_ambient_dir(&prefix, cap_std::ambient_authority())
        .map_err(unresolved)?;
    match resolved.strip_prefix(&prefix) {
        Ok(relative) if relative.as_os_str().is_empty() => Ok(allowed),
        Ok(relative) => allowed.open_dir(relative).map_err(unresolved),
        Err(_) => Err(unresolved(io::Error::other("outside its rule's directory"))),
    }
}

/// The node directory a `hostPath` names, resolved, and the resolved directory of the rule
/// that allows it.
fn host_path(
    path: &str,
    writable: bool,
    config: &VolumeConfig,
) -> Result<(PathBuf, PathBuf), VolumeRefused> {
    let resolved =
        std::fs::canonicalize(path).map_err(|source| VolumeRefused::HostPathUnresolved {
            path: path.to_string(),
            source,
        })?;
    let rule = config.host_paths.iter().find_map(|rule| {
        std::fs::canonicalize(&rule.prefix)
            .ok()
            .filter(|prefix| resolved.starts_with(prefix))
            .map(|prefix| (rule, prefix))
    });
    match rule {
        None => Err(VolumeRefused::HostPathNotAllowed {
            path: path.to_string(),
            allowed: if config.host_paths.is_empty() {
                "none; see --allow-host-path".to_string()
            } else {
                config
                    .host_paths
                    .iter()
                    .map(|r| r.prefix.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }),
        Some((rule, _)) if writable && !rule.writable => Err(VolumeRefused::HostPathReadOnly {
            path: path.to_string(),
        }),
        Some((_, prefix)) => Ok((resolved, prefix)),
    }
}

/// The mounts of one sandbox: their directories, and the scratch directories to remove when
/// it is dropped (the sandbox ended or was removed).
pub struct Mounts {
    preopens: Vec<Preopen>,
    scratch: Vec<Scratch>,
}

/// One directory the guest sees at `guest`.
struct Preopen {
    host: HostDir,
    guest: String,
    perms: FsPerms,
}

/// A directory of the host, by path or held open.
enum HostDir {
    /// A directory only the agent writes to the path of (an emptyDir, ConfigMap files).
    Path(PathBuf),
    /// A `hostPath` or a `subPath`, opened once beneath what allows it (so a symlink a guest
    /// swaps in later cannot redirect it) and preopened through `/proc/self/fd` at every
    /// start, as the kubelet mounts subPaths.
    Held(cap_std::fs::Dir),
}

/// A volume's directory, before its `subPath` is opened beneath it.
enum Root {
    Path(PathBuf),
    Held(cap_std::fs::Dir),
}

/// A sandbox's `emptyDir`, removed (and unmounted) when dropped.
struct Scratch {
    volume: String,
    path: PathBuf,
    tmpfs: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.tmpfs {
            unmount(&self.path);
        }
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove an emptyDir");
        }
    }
}

/// Numbers the sandboxes' scratch directories.
static RUNS: AtomicU64 = AtomicU64::new(0);

impl Mounts {
    /// Sets up `volumes` for a sandbox of `namespace` whose memory limit is `memory_limit`
    /// bytes (the size of its `medium: Memory` emptyDirs without a `sizeLimit`).
    ///
    /// # Errors
    /// [`Exit::Config`] for a ConfigMap or Secret the agent does not have (unless optional),
    /// [`Exit::Volume`] when a directory cannot be created, mounted or opened.
    pub fn create(
        volumes: &[Volume],
        namespace: &str,
        memory_limit: u64,
        config: &VolumeConfig,
        files: &ConfigFiles,
    ) -> Result<Self, Exit> {
        let mut mounts = Self {
            preopens: Vec::with_capacity(volumes.len()),
            scratch: Vec::new(),
        };
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        for v in volumes {
            let perms = if v.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            // The volume's directory, and whether a missing subPath is made in it, as the
            // kubelet does.
            let (root, make_sub_path) = match &v.source {
                Some(volume::Source::EmptyDir(empty)) => {
                    let tmpfs_bytes = match empty.size_limit_bytes {
                        0 if empty.memory => memory_limit,
                        bytes => bytes,
                    };
                    (
                        Root::Path(mounts.empty_dir(run, &v.name, tmpfs_bytes, config)?),
                        true,
                    )
                }
                Some(volume::Source::HostPath(path)) => (
                    Root::Held(
                        open_host_path(path, !v.read_only, config)
                            .map_err(|e| Exit::Volume(flotilla_telemetry::error_chain(&e)))?,
                    ),
                    !v.read_only,
                ),
                Some(volume::Source::Config(reference)) => {
                    let key = ConfigKey {
                        kind: reference.kind(),
                        namespace: namespace.to_string(),
                        name: reference.name.clone(),
                    };
                    let dir = if files.get(&key).is_some() {
                        if reference.items.is_empty() {
                            files.dir(&key)
                        } else {
                            files.project(&key, &reference.items, reference.optional)?
                        }
                    } else if reference.optional {
                        let empty = config.dir.join("empty");
                        std::fs::create_dir_all(&empty).map_err(|e| {
                            Exit::Volume(format!("creating an empty directory: {e}"))
                        })?;
                        empty
                    } else {
                        return Err(Exit::Config(format!(
                            "{} not found (volume {})",
                            key, v.name
                        )));
                    };
                    // check() refuses a subPath here.
                    (Root::Path(dir), false)
                }
                None => continue,
            };
            let host =
                match root {
                    Root::Path(path) if v.sub_path.is_empty() => HostDir::Path(path),
                    Root::Held(dir) if v.sub_path.is_empty() => HostDir::Held(dir),
                    root => HostDir::Held(open_beneath(root, &v.sub_path, make_sub_path).map_err(
                        |e| Exit::Volume(format!("volume {} subPath {}: {e}", v.name, v.sub_path)),
                    )?),
                };
            mounts.preopens.push(Preopen {
                host,
                guest: v.mount_path.clone(),
                perms,
            });
        }
        Ok(mounts)
    }

    /// The sandbox's directory for the emptyDir `volume`: made (a tmpfs of `size_limit`
    /// bytes, when not 0) on its first mount, shared by its other mounts.
    fn empty_dir(
        &mut self,
        run: u64,
        volume: &str,
        size_limit: u64,
        config: &VolumeConfig,
    ) -> Result<PathBuf, Exit> {
        if let Some(scratch) = self.scratch.iter().find(|s| s.volume == volume) {
            return Ok(scratch.path.clone());
        }
        let path = config.dir.join("scratch").join(format!("{run}-{volume}"));
        std::fs::create_dir_all(&path)
            .map_err(|e| Exit::Volume(format!("creating emptyDir {volume}: {e}")))?;
        self.scratch.push(Scratch {
            volume: volume.to_string(),
            path: path.clone(),
            tmpfs: false,
        });
        if size_limit > 0 {
            mount_tmpfs(&path, Some(size_limit), 0o700).map_err(|e| {
                Exit::Volume(format!(
                    "emptyDir {volume} with a sizeLimit or medium: Memory is a tmpfs, which \
                     the agent cannot mount ({e}); it needs CAP_SYS_ADMIN"
                ))
            })?;
            if let Some(last) = self.scratch.last_mut() {
                last.tmpfs = true;
            }
        }
        Ok(path)
    }

    /// Preopens the mounts in a sandbox's WASI context.
    ///
    /// # Errors
    /// [`Exit::Volume`] when a directory cannot be opened.
    pub fn preopen(&self, wasi: &mut WasiCtxBuilder) -> Result<(), Exit> {
        for Preopen { host, guest, perms } in &self.preopens {
            let path = match host {
                HostDir::Path(path) => path.clone(),
                HostDir::Held(dir) => {
                    use std::os::fd::AsRawFd;
                    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
                }
            };
            wasi.preopened_dir(&path, guest, *perms).map_err(|e| {
                Exit::Volume(format!("opening {} for {guest}: {e:#}", path.display()))
            })?;
        }
        Ok(())
    }
}

/// Opens `sub_path` beneath `root` (making it first when `make`), refusing any `..` or
/// symlink that would leave `root`.
fn open_beneath(root: Root, sub_path: &str, make: bool) -> io::Result<cap_std::fs::Dir> {
    flotilla_model::volumes::validate_relative_path(sub_path)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let root = match root {
        Root::Path(path) => cap_std::fs::Dir::open_ambient_dir(path, cap_std::ambient_authority())?,
        Root::Held(dir) => dir,
    };
    if make {
        root.create_dir_all(sub_path)?;
    }
    root.open_dir(sub_path)
}

/// Empties the volume directory: scratch directories and configuration files, unmounting
/// the tmpfs an agent that crashed left behind; and the contents of the Secrets' directory
/// when it is set apart. Runs when the agent starts and stops.
pub fn clear(config: &VolumeConfig) {
    let dir = &config.dir;
    if let Ok(entries) = std::fs::read_dir(dir.join("scratch")) {
        for entry in entries.flatten() {
            let _ = rustix::mount::unmount(entry.path(), rustix::mount::UnmountFlags::DETACH);
        }
    }
    let secrets = config.secret_files_dir();
    // A tmpfs an agent mounted, or (with CAP_SYS_ADMIN only) one it was given, which it
    // replaces with its own.
    let _ = rustix::mount::unmount(&secrets, rustix::mount::UnmountFlags::DETACH);
    if !secrets.starts_with(dir)
        && let Ok(entries) = std::fs::read_dir(&secrets)
    {
        for entry in entries.flatten() {
            if let Err(error) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), %error, "cannot clear Secrets");
            }
        }
    }
    match std::fs::remove_dir_all(dir) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(dir = %dir.display(), %error, "cannot clear the volume directory");
        }
        _ => {}
    }
}

/// Creates the (cleared) volume directory for the agent alone (mode 0700): sandboxes' scratch
/// files and ConfigMap files live under it. Runs when the agent starts, after [`clear`].
///
/// # Errors
/// It cannot be created, or it exists and belongs to another user.
pub fn create_dir(config: &VolumeConfig) -> io::Result<()> {
    create_private_dir(&config.dir)
}

/// Creates `dir` (and its parents) for the agent alone: mode 0700. A directory that exists
/// and belongs to another user is refused: they could plant files in it.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if std::fs::metadata(dir)?.uid() != rustix::process::geteuid().as_raw() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to another user; give the agent a directory of its own",
                dir.display()
            ),
        ));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The directory of configuration files, under the volume directory.
const CONFIG: &str = "config";

/// The directory of Secrets' files under the configuration directory, unless set apart.
const SECRETS: &str = "secrets";

/// Mounts a tmpfs at `path` with root directory `mode`, of `bytes` at most (else the
/// kernel's default, half the memory, which only written pages take).
fn mount_tmpfs(path: &Path, bytes: Option<u64>, mode: u32) -> io::Result<()> {
    use rustix::mount::{MountFlags, mount};
    let size = bytes.map(|b| format!(",size={b}")).unwrap_or_default();
    let options = std::ffi::CString::new(format!("mode={mode:o}{size}"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    mount(
        "flotilla",
        path,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        Some(options.as_c_str()),
    )
    .map_err(io::Error::from)
}

/// Detaches the tmpfs at `path`, warning when that fails.
fn unmount(path: &Path) {
    if let Err(error) = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH) {
        tracing::warn!(path = %path.display(), %error, "cannot unmount a tmpfs");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clearing_empties_a_secrets_dir_set_apart_but_keeps_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = VolumeConfig {
            dir: dir.path().join("volumes"),
            host_paths: vec![],
            secrets_dir: Some(dir.path().join("secrets")),
        };
        let stale = dir.path().join("secrets/default/db");
        std::fs::create_dir_all(&stale).expect("mkdir");
        std::fs::write(stale.join("password"), "old").expect("write");
        std::fs::create_dir_all(config.dir.join("scratch/1-a")).expect("mkdir");
        clear(&config);
        assert!(!config.dir.exists());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("secrets"))
            .expect("the Secrets' directory stays (it may be a mount point)")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn host_paths_need_a_rule_and_writes_need_a_writable_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let allowed = dir.path().join("allowed");
        std::fs::create_dir_all(allowed.join("sub")).expect("mkdir");
        let config = VolumeConfig {
            dir: dir.path().join("volumes"),
            host_paths: vec![format!("{}", allowed.display()).parse().expect("rule")],
            secrets_dir: None,
        };
        let sub = allowed.join("sub");
        assert!(host_path(sub.to_str().expect("utf-8"), false, &config).is_ok());
        assert!(
            host_path(sub.to_str().expect("utf-8"), true, &config)
                .is_err_and(|e| matches!(e, VolumeRefused::HostPathReadOnly { .. }))
        );
        assert!(
            host_path("/etc", false, &config).is_err_and(|e| e.to_string().contains("not allowed"))
        );
        // A symlink inside the allowed directory to outside it is refused too.
        std::os::unix::fs::symlink("/etc", allowed.join("etc")).expect("symlink");
        let through = allowed.join("etc");
        assert!(host_path(through.to_str().expect("utf-8"), false, &config).is_err());
        let rule: HostPathRule = "/srv/data:rw".parse().expect("rule");
        assert!(rule.writable);
        assert!("relative".parse::<HostPathRule>().is_err());
    }

    #[test]
    fn a_host_path_stays_the_directory_it_was_when_mounted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let srv = dir.path().join("srv");
        let outside = dir.path().join("etc");
        std::fs::create_dir_all(srv.join("data")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(srv.join("data/mine"), "tenant data").expect("write");
        std::fs::write(outside.join("shadow"), "not yours").expect("write");
        let config = VolumeConfig {
            dir: dir.path().join("volumes"),
            host_paths: vec![format!("{}:rw", srv.display()).parse().expect("rule")],
            secrets_dir: None,
        };
        let volume = Volume {
            name: "data".into(),
            mount_path: "/data".into(),
            read_only: false,
            source: Some(volume::Source::HostPath(
                srv.join("data").to_string_lossy().into_owned(),
            )),
            ..Volume::default()
        };
        let mounts = Mounts::create(
            std::slice::from_ref(&volume),
            "default",
            1 << 20,
            &config,
            &ConfigFiles::new(&config),
        )
        .expect("mounts");
        // The tenant, through a mount of /srv, swaps data for a symlink out of /srv; every
        // later start preopens the directory that was checked, not the symlink.
        std::fs::rename(srv.join("data"), srv.join("data.old")).expect("rename");
        std::os::unix::fs::symlink("../etc", srv.join("data")).expect("symlink");
        let [Preopen { host, .. }] = &mounts.preopens[..] else {
            panic!("one preopen");
        };
        let HostDir::Held(held) = host else {
            panic!("a hostPath is held open");
        };
        assert!(held.exists("mine"));
        assert!(!held.exists("shadow"));
        // A new mount checks again: the symlink leads out of the allowed directory.
        let again = Mounts::create(
            std::slice::from_ref(&volume),
            "default",
            1 << 20,
            &config,
            &ConfigFiles::new(&config),
        );
        assert!(again.is_err());
    }
}
