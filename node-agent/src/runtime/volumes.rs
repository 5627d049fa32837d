//! Volumes and configuration: the directories a sandbox reaches (WASI preopens) and the
//! ConfigMaps and Secrets its files and environment come from.
//!
//! - `emptyDir`: a directory of its own for each sandbox under the agent's volume directory,
//!   kept across its restarts and removed with it; with a size limit it is a tmpfs of that size, so writes past the
//!   limit fail with "no space" in that sandbox alone (the agent needs `CAP_SYS_ADMIN` to mount
//!   it, as the chart grants).
//! - `hostPath`: a node directory, only under a prefix the agent allows (`--allow-host-path`),
//!   read-only unless both the mount and the rule allow writes.
//! - `configMap` / `secret`: the object's keys as files, written as the kubelet does: a
//!   directory per version, a `..data` symlink swapped atomically to the new one, and one
//!   `key -> ..data/key` symlink per key, so running sandboxes see updates without a restart.
//!
//! A guest reaches nothing outside its mounts: wasmtime-wasi resolves every path under the
//! preopened directory (`cap-std`), so `..`, absolute paths and symlinks cannot leave it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use flotilla_proto::agent::v1::{ConfigKind, ConfigObject, KeyRef, Volume, volume};
pub use flotilla_proto::config::ConfigKey;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::Exit;

/// Where volumes live and which node directories sandboxes may mount.
#[derive(Clone, Debug, Default)]
pub struct VolumeConfig {
    /// Scratch directories and configuration files. Default: a fresh directory under the
    /// system's temporary directory, removed when the agent exits.
    pub dir: PathBuf,
    /// Node directories `hostPath` volumes may name.
    pub host_paths: Vec<HostPathRule>,
}

/// A node directory (and everything under it) that `hostPath` volumes may mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPathRule {
    /// The directory.
    pub prefix: PathBuf,
    /// Whether mounts may write to it (`--allow-host-path DIR:rw`).
    pub writable: bool,
}

impl std::str::FromStr for HostPathRule {
    type Err = String;

    /// `DIR` (read-only) or `DIR:rw`.
    fn from_str(value: &str) -> Result<Self, String> {
        let (path, writable) = match value.strip_suffix(":rw") {
            Some(path) => (path, true),
            None => (value.strip_suffix(":ro").unwrap_or(value), false),
        };
        if !path.starts_with('/') {
            return Err(format!(
                "{value:?}: must be an absolute path, optionally with :rw"
            ));
        }
        Ok(Self {
            prefix: PathBuf::from(path),
            writable,
        })
    }
}

/// An object's data: key → value.
pub type ConfigData = BTreeMap<String, Vec<u8>>;

/// The ConfigMaps and Secrets the control plane handed this agent, in memory (for environment
/// variables) and as files (for volumes). Cheap to share.
#[derive(Default)]
pub struct ConfigFiles {
    root: PathBuf,
    objects: RwLock<HashMap<ConfigKey, Arc<ConfigData>>>,
    versions: AtomicU64,
}

impl ConfigFiles {
    /// Keeps files under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            objects: RwLock::default(),
            versions: AtomicU64::new(0),
        }
    }

    /// The object's data, if the agent has it.
    pub fn get(&self, key: &ConfigKey) -> Option<Arc<ConfigData>> {
        self.objects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// The directory holding the object's files.
    fn dir(&self, key: &ConfigKey) -> PathBuf {
        self.root
            .join(&key.namespace)
            .join(format!("{}s", key.kind.noun()))
            .join(&key.name)
    }

    /// Applies what the control plane sent: the objects to create or update, and those that
    /// left (all others too, when `complete`).
    ///
    /// # Errors
    /// Writing the files failed; objects before it are applied.
    pub fn apply(
        &self,
        objects: Vec<ConfigObject>,
        complete: bool,
        removed: Vec<ConfigKey>,
    ) -> io::Result<()> {
        let incoming: Vec<(ConfigKey, ConfigData)> = objects
            .into_iter()
            .map(|o| {
                let key = ConfigKey {
                    kind: o.kind(),
                    namespace: o.namespace,
                    name: o.name,
                };
                (key, o.data.into_iter().collect())
            })
            .collect();
        let mut gone = removed;
        if complete {
            let listed: std::collections::HashSet<&ConfigKey> =
                incoming.iter().map(|(k, _)| k).collect();
            let objects = self.objects.read().unwrap_or_else(|e| e.into_inner());
            gone.extend(objects.keys().filter(|k| !listed.contains(k)).cloned());
        }
        for key in gone {
            self.objects
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            match std::fs::remove_dir_all(self.dir(&key)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        for (key, data) in incoming {
            if self.get(&key).is_some_and(|old| *old == data) {
                continue;
            }
            self.write(&key, &data)?;
            self.objects
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, Arc::new(data));
        }
        Ok(())
    }

    /// Writes a new version of an object's files and switches `..data` to it atomically.
    fn write(&self, key: &ConfigKey, data: &ConfigData) -> io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, symlink};
        let dir = self.dir(key);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let version = format!("..{}", self.versions.fetch_add(1, Ordering::Relaxed));
        let staged = dir.join(&version);
        std::fs::DirBuilder::new().mode(0o700).create(&staged)?;
        let mode = if key.kind == ConfigKind::Secret {
            0o400
        } else {
            0o444
        };
        for (name, value) in data
            .iter()
            .filter(|(k, _)| flotilla_model::config::is_config_key(k))
        {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(staged.join(name))?
                .write_all(value)?;
        }
        let previous = std::fs::read_link(dir.join("..data")).ok();
        let link = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&link);
        symlink(&version, &link)?;
        std::fs::rename(&link, dir.join("..data"))?;
        // One symlink per key through ..data; keys that left lose theirs.
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with("..") && !data.contains_key(name.as_ref()) {
                std::fs::remove_file(dir.join(name.as_ref()))?;
            }
        }
        for name in data
            .keys()
            .filter(|k| flotilla_model::config::is_config_key(k))
        {
            let path = dir.join(name);
            if std::fs::symlink_metadata(&path).is_err() {
                symlink(Path::new("..data").join(name), &path)?;
            }
        }
        if let Some(previous) = previous {
            let _ = std::fs::remove_dir_all(dir.join(previous));
        }
        Ok(())
    }

    /// One key's value, for an environment variable: `Ok(None)` when optional and missing.
    pub fn value(&self, namespace: &str, key: &KeyRef) -> Result<Option<String>, Exit> {
        let object = ConfigKey {
            kind: key.kind(),
            namespace: namespace.to_string(),
            name: key.name.clone(),
        };
        let value = self
            .get(&object)
            .and_then(|data| data.get(&key.key).cloned());
        match value {
            Some(bytes) => String::from_utf8(bytes).map(Some).map_err(|_| {
                Exit::Config(format!("key {} of {} is not UTF-8 text", key.key, object))
            }),
            None if key.optional => Ok(None),
            None if self.get(&object).is_some() => {
                Err(Exit::Config(format!("{} has no key {}", object, key.key)))
            }
            None => Err(Exit::Config(format!("{} not found", object))),
        }
    }
}

/// Checks a workload's volumes against the agent's rules when it is prepared.
///
/// # Errors
/// A message naming the `hostPath` the agent does not allow (or a writable mount of a
/// read-only one).
pub fn check(volumes: &[Volume], config: &VolumeConfig) -> Result<(), String> {
    for v in volumes {
        if let Some(volume::Source::HostPath(path)) = &v.source {
            host_path(path, !v.read_only, config)?;
        }
    }
    Ok(())
}

/// The node directory a `hostPath` names, resolved, if a rule allows it.
fn host_path(path: &str, writable: bool, config: &VolumeConfig) -> Result<PathBuf, String> {
    let resolved = std::fs::canonicalize(path).map_err(|e| format!("hostPath {path}: {e}"))?;
    let rule = config.host_paths.iter().find(|rule| {
        std::fs::canonicalize(&rule.prefix).is_ok_and(|prefix| resolved.starts_with(prefix))
    });
    match rule {
        None => Err(format!(
            "hostPath {path} is not allowed on this node (the agent allows {})",
            if config.host_paths.is_empty() {
                "none; see --allow-host-path".to_string()
            } else {
                config
                    .host_paths
                    .iter()
                    .map(|r| r.prefix.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )),
        Some(rule) if writable && !rule.writable => Err(format!(
            "hostPath {path} may only be mounted read-only on this node"
        )),
        Some(_) => Ok(resolved),
    }
}

/// The mounts of one sandbox: their directories, and the scratch directories to remove when
/// it is dropped (the sandbox ended or was removed).
pub struct Mounts {
    preopens: Vec<(PathBuf, String, FsPerms)>,
    scratch: Vec<Scratch>,
}

/// A sandbox's `emptyDir`, removed (and unmounted) when dropped.
struct Scratch {
    path: PathBuf,
    tmpfs: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.tmpfs
            && let Err(error) =
                rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH)
        {
            tracing::warn!(path = %self.path.display(), %error, "cannot unmount an emptyDir");
        }
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove an emptyDir");
        }
    }
}

/// Numbers the sandboxes' scratch directories.
static RUNS: AtomicU64 = AtomicU64::new(0);

impl Mounts {
    /// Sets up `volumes` for a sandbox of `namespace`.
    ///
    /// # Errors
    /// [`Exit::Config`] for a ConfigMap or Secret the agent does not have (unless optional),
    /// [`Exit::Volume`] when a directory cannot be created or mounted.
    pub fn create(
        volumes: &[Volume],
        namespace: &str,
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
            let host = match &v.source {
                Some(volume::Source::EmptyDir(empty)) => {
                    let path = config.dir.join("scratch").join(format!("{run}-{}", v.name));
                    std::fs::create_dir_all(&path)
                        .map_err(|e| Exit::Volume(format!("creating emptyDir {}: {e}", v.name)))?;
                    let tmpfs = empty.size_limit_bytes > 0;
                    mounts.scratch.push(Scratch {
                        path: path.clone(),
                        tmpfs: false,
                    });
                    if tmpfs {
                        mount_tmpfs(&path, empty.size_limit_bytes).map_err(|e| {
                            Exit::Volume(format!(
                                "emptyDir {} with a sizeLimit is a tmpfs, which the agent \
                                 cannot mount ({e}); it needs CAP_SYS_ADMIN",
                                v.name
                            ))
                        })?;
                        if let Some(last) = mounts.scratch.last_mut() {
                            last.tmpfs = true;
                        }
                    }
                    path
                }
                Some(volume::Source::HostPath(path)) => {
                    host_path(path, !v.read_only, config).map_err(Exit::Volume)?
                }
                Some(volume::Source::Config(reference)) => {
                    let key = ConfigKey {
                        kind: reference.kind(),
                        namespace: namespace.to_string(),
                        name: reference.name.clone(),
                    };
                    if files.get(&key).is_some() {
                        files.dir(&key)
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
                    }
                }
                None => continue,
            };
            mounts.preopens.push((host, v.mount_path.clone(), perms));
        }
        Ok(mounts)
    }

    /// Preopens the mounts in a sandbox's WASI context.
    ///
    /// # Errors
    /// [`Exit::Volume`] when a directory cannot be opened.
    pub fn preopen(&self, wasi: &mut WasiCtxBuilder) -> Result<(), Exit> {
        for (host, guest, perms) in &self.preopens {
            wasi.preopened_dir(host, guest, *perms).map_err(|e| {
                Exit::Volume(format!("opening {} for {guest}: {e:#}", host.display()))
            })?;
        }
        Ok(())
    }
}

/// Empties the volume directory: scratch directories (unmounting the tmpfs of any an agent
/// that crashed left behind) and configuration files. Runs when the agent starts and stops.
pub fn clear(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir.join("scratch")) {
        for entry in entries.flatten() {
            let _ = rustix::mount::unmount(entry.path(), rustix::mount::UnmountFlags::DETACH);
        }
    }
    match std::fs::remove_dir_all(dir) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(dir = %dir.display(), %error, "cannot clear the volume directory");
        }
        _ => {}
    }
}

/// Mounts a tmpfs of `bytes` at `path`, private to the agent.
fn mount_tmpfs(path: &Path, bytes: u64) -> io::Result<()> {
    use rustix::mount::{MountFlags, mount};
    let options = std::ffi::CString::new(format!("size={bytes},mode=0777"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    mount(
        "flotilla-emptydir",
        path,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        Some(options.as_c_str()),
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: ConfigKind, name: &str, data: &[(&str, &str)]) -> ConfigObject {
        ConfigObject {
            kind: kind as i32,
            namespace: "default".into(),
            name: name.into(),
            data: data
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn config_files_swap_atomically_and_follow_their_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = ConfigFiles::new(dir.path().to_path_buf());
        let key = ConfigKey {
            kind: ConfigKind::ConfigMap,
            namespace: "default".into(),
            name: "app".into(),
        };
        files
            .apply(
                vec![object(
                    ConfigKind::ConfigMap,
                    "app",
                    &[("a", "1"), ("b", "2")],
                )],
                true,
                vec![],
            )
            .expect("apply");
        let path = files.dir(&key);
        assert_eq!(std::fs::read_to_string(path.join("a")).expect("a"), "1");
        files
            .apply(
                vec![object(ConfigKind::ConfigMap, "app", &[("a", "3")])],
                false,
                vec![],
            )
            .expect("update");
        assert_eq!(std::fs::read_to_string(path.join("a")).expect("a"), "3");
        assert!(!path.join("b").exists(), "a key that left loses its file");
        let versions = std::fs::read_dir(&path)
            .expect("dir")
            .filter(|e| {
                e.as_ref().is_ok_and(|e| {
                    e.file_name().to_string_lossy().starts_with("..") && e.path().is_dir()
                })
            })
            .count();
        // ..data (a link to a directory) and the one version it names.
        assert_eq!(versions, 2, "the old version is gone");

        let reference = KeyRef {
            kind: ConfigKind::ConfigMap as i32,
            name: "app".into(),
            key: "a".into(),
            optional: false,
        };
        assert_eq!(
            files
                .value("default", &reference)
                .expect("value")
                .as_deref(),
            Some("3")
        );
        let missing = KeyRef {
            key: "zz".into(),
            ..reference.clone()
        };
        assert!(
            files
                .value("default", &missing)
                .is_err_and(|e| e.message().contains("no key zz"))
        );
        let optional = KeyRef {
            optional: true,
            ..missing
        };
        assert_eq!(files.value("default", &optional).expect("optional"), None);

        // A complete set without it removes it, files and all.
        files.apply(vec![], true, vec![]).expect("remove");
        assert!(!path.exists());
        assert!(
            files
                .value("default", &reference)
                .is_err_and(|e| e.message().contains("not found"))
        );
    }

    #[test]
    fn host_paths_need_a_rule_and_writes_need_a_writable_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let allowed = dir.path().join("allowed");
        std::fs::create_dir_all(allowed.join("sub")).expect("mkdir");
        let config = VolumeConfig {
            dir: dir.path().join("volumes"),
            host_paths: vec![format!("{}", allowed.display()).parse().expect("rule")],
        };
        let sub = allowed.join("sub");
        assert!(host_path(sub.to_str().expect("utf-8"), false, &config).is_ok());
        assert!(
            host_path(sub.to_str().expect("utf-8"), true, &config)
                .is_err_and(|e| e.contains("read-only"))
        );
        assert!(host_path("/etc", false, &config).is_err_and(|e| e.contains("not allowed")));
        // A symlink inside the allowed directory to outside it is refused too.
        std::os::unix::fs::symlink("/etc", allowed.join("etc")).expect("symlink");
        let through = allowed.join("etc");
        assert!(host_path(through.to_str().expect("utf-8"), false, &config).is_err());
        let rule: HostPathRule = "/srv/data:rw".parse().expect("rule");
        assert!(rule.writable);
        assert!("relative".parse::<HostPathRule>().is_err());
    }
}
