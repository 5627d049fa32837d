//! The ConfigMaps and Secrets an agent holds: in memory for environment variables, and as
//! files for volumes, written as the kubelet's atomic writer does.
//!
//! Each object's files live in a directory of their own: a directory per version (`..N`), a
//! `..data` symlink swapped atomically to the newest, and one `key -> ..data/key` symlink per
//! key, so running sandboxes see updates without a restart and never a half-written version.
//! A volume listing `items` mounts a projection of the object (`..items/<hash>` in its
//! directory), written the same way with each key at its own path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use flotilla_proto::agent::v1::{ConfigKind, ConfigObject, KeyRef, KeyToPath};
use flotilla_proto::config::ConfigKey;

use super::{VolumeConfig, mount_tmpfs};
use crate::runtime::exit::Exit;

/// An object's data: key → value.
pub type ConfigData = BTreeMap<String, Vec<u8>>;

/// The ConfigMaps and Secrets the control plane handed this agent, in memory (for environment
/// variables) and as files (for volumes). Cheap to share.
///
/// Files live under `root/configmaps/<namespace>/<name>` and `<secrets>/<namespace>/<name>`.
/// As the kubelet does, Secrets are kept off the disk: when the first Secret arrives, the
/// Secrets' directory is used as it is if it is a tmpfs already (a Pod's `medium: Memory`
/// emptyDir), or the agent mounts one there (unmounted when this is dropped), or, lacking
/// `CAP_SYS_ADMIN`, it falls back to the disk with a warning.
pub struct ConfigFiles {
    root: PathBuf,
    objects: RwLock<HashMap<ConfigKey, Arc<ConfigData>>>,
    /// The `items` projections volumes have mounted, per object; rewritten with it. Held
    /// while any projection is written, so a projection never misses an update.
    projections: Mutex<HashMap<ConfigKey, Vec<Projection>>>,
    versions: AtomicU64,
    /// The Secrets' directory.
    secrets_dir: PathBuf,
    /// How it was set up, once the first Secret arrived (set up under this lock, so two
    /// first Secrets never stack two tmpfs).
    secrets: Mutex<Option<SecretsDir>>,
}

/// The Secrets' directory, once set up.
#[derive(Clone, Copy)]
struct SecretsDir {
    storage: SecretStorage,
    /// Whether the agent mounted the tmpfs (and unmounts it).
    mounted: bool,
}

/// Some keys of an object, each at its own path.
struct Projection {
    dir: PathBuf,
    items: Vec<KeyToPath>,
}

/// Where Secrets' files are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretStorage {
    /// A tmpfs of the agent's: never written to disk.
    Memory,
    /// The agent's disk, mode 0400: it could not mount a tmpfs.
    Disk,
}

/// `statfs` type of a tmpfs.
const TMPFS_MAGIC: rustix::fs::FsWord = 0x0102_1994;

/// The directory of an object's `items` projections, inside its own.
const ITEMS: &str = "..items";

impl ConfigFiles {
    /// Keeps files where `config` says: ConfigMaps' under its configuration directory,
    /// Secrets' under its Secrets' directory.
    pub fn new(config: &VolumeConfig) -> Self {
        Self {
            secrets_dir: config.secret_files_dir(),
            root: config.config_files_dir(),
            objects: RwLock::default(),
            projections: Mutex::default(),
            versions: AtomicU64::new(0),
            secrets: Mutex::new(None),
        }
    }

    /// Where Secrets' files are kept; `None` before the first Secret arrived.
    pub fn secret_storage(&self) -> Option<SecretStorage> {
        self.lock_secrets().map(|s| s.storage)
    }

    /// The object's data, if the agent has it.
    pub fn get(&self, key: &ConfigKey) -> Option<Arc<ConfigData>> {
        self.objects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// The directory holding the object's files, every key named after itself.
    pub fn dir(&self, key: &ConfigKey) -> PathBuf {
        let kind = match key.kind {
            ConfigKind::Secret => self.secrets_dir.clone(),
            _ => self.root.join(format!("{}s", key.kind.noun())),
        };
        kind.join(&key.namespace).join(&key.name)
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
            .map(|o| (ConfigKey::of(&o), o.data.into_iter().collect()))
            .collect();
        let mut gone = removed;
        if complete {
            let listed: std::collections::HashSet<&ConfigKey> =
                incoming.iter().map(|(k, _)| k).collect();
            let objects = self.objects.read().unwrap_or_else(|e| e.into_inner());
            gone.extend(objects.keys().filter(|k| !listed.contains(k)).cloned());
        }
        for key in gone {
            let mut projections = self.lock_projections();
            self.objects
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            projections.remove(&key);
            match std::fs::remove_dir_all(self.dir(&key)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        for (key, data) in incoming {
            if self.get(&key).is_some_and(|old| *old == data) {
                continue;
            }
            let files: Vec<(&str, &[u8])> = data
                .iter()
                .filter(|(k, _)| flotilla_model::config::is_config_key(k))
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            self.write(&key, &self.dir(&key), &files)?;
            // The new data and its projections under one lock: a projection made meanwhile
            // reads the new data, or is registered already and rewritten here.
            let projections = self.lock_projections();
            let data = Arc::new(data);
            self.objects
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone(), data.clone());
            for projection in projections.get(&key).into_iter().flatten() {
                self.write(&key, &projection.dir, &projected(&data, &projection.items))?;
            }
        }
        Ok(())
    }

    /// The directory holding `items` of the object: each listed key at its path, the others
    /// absent. Written on first use and rewritten with the object.
    ///
    /// # Errors
    /// [`Exit::Config`] when the object is missing, or a listed key is (unless `optional`);
    /// [`Exit::Volume`] for an unsafe path or when the files cannot be written.
    pub fn project(
        &self,
        key: &ConfigKey,
        items: &[KeyToPath],
        optional: bool,
    ) -> Result<PathBuf, Exit> {
        for item in items {
            flotilla_model::volumes::validate_relative_path(&item.path)
                .map_err(|e| Exit::Volume(format!("items of {key}: {e}")))?;
        }
        let mut hasher = std::hash::DefaultHasher::new();
        for item in items {
            (&item.key, &item.path).hash(&mut hasher);
        }
        let dir = self
            .dir(key)
            .join(ITEMS)
            .join(format!("{:016x}", hasher.finish()));
        let mut projections = self.lock_projections();
        // Read under the lock: an update either came before (and is read here) or rewrites
        // this projection after it is registered.
        let data = self
            .get(key)
            .ok_or_else(|| Exit::Config(format!("{key} not found")))?;
        if !optional && let Some(item) = items.iter().find(|i| !data.contains_key(&i.key)) {
            return Err(Exit::Config(format!("{key} has no key {}", item.key)));
        }
        let known = projections.entry(key.clone()).or_default();
        if !known.iter().any(|p| p.dir == dir) {
            self.write(key, &dir, &projected(&data, items))
                .map_err(|e| Exit::Volume(format!("writing items of {key}: {e}")))?;
            known.push(Projection {
                dir: dir.clone(),
                items: items.to_vec(),
            });
        }
        Ok(dir)
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

    fn lock_secrets(&self) -> MutexGuard<'_, Option<SecretsDir>> {
        self.secrets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_projections(&self) -> MutexGuard<'_, HashMap<ConfigKey, Vec<Projection>>> {
        self.projections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `files` (relative path → content) of `key` as a new version of `dir` and
    /// switches `..data` to it atomically; top-level names are `name -> ..data/name` links.
    fn write(&self, key: &ConfigKey, dir: &Path, files: &[(&str, &[u8])]) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, symlink};
        let mode = if key.kind == ConfigKind::Secret {
            self.prepare_secrets()?;
            0o400
        } else {
            0o444
        };
        let mut dirs = std::fs::DirBuilder::new();
        dirs.recursive(true).mode(0o700);
        dirs.create(dir)?;
        let version = format!("..{}", self.versions.fetch_add(1, Ordering::Relaxed));
        let staged = dir.join(&version);
        dirs.create(&staged)?;
        for (path, content) in files {
            let file = staged.join(path);
            if let Some(parent) = file.parent() {
                dirs.create(parent)?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&file)?
                .write_all(content)?;
        }
        let previous = std::fs::read_link(dir.join("..data")).ok();
        let link = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&link);
        symlink(&version, &link)?;
        std::fs::rename(&link, dir.join("..data"))?;
        // One link per top-level name through ..data; names that left lose theirs.
        let names: BTreeSet<&str> = files
            .iter()
            .filter_map(|(path, _)| path.split('/').next())
            .collect();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with("..") && !names.contains(name.as_ref()) {
                std::fs::remove_file(dir.join(name.as_ref()))?;
            }
        }
        for name in names {
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

    /// Makes the Secrets' directory: a tmpfs already, or one the agent mounts, or the disk.
    fn prepare_secrets(&self) -> io::Result<SecretStorage> {
        use std::os::unix::fs::DirBuilderExt;
        let mut setup = self.lock_secrets();
        if let Some(secrets) = *setup {
            return Ok(secrets.storage);
        }
        let dir = &self.secrets_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let secrets = if is_tmpfs(dir) {
            SecretsDir {
                storage: SecretStorage::Memory,
                mounted: false,
            }
        } else {
            match mount_tmpfs(dir, None, 0o700) {
                Ok(()) => SecretsDir {
                    storage: SecretStorage::Memory,
                    mounted: true,
                },
                Err(error) => {
                    tracing::warn!(
                        dir = %dir.display(),
                        %error,
                        "Secrets' files are kept on disk (mode 0400): the agent cannot mount a \
                         tmpfs for them (it needs CAP_SYS_ADMIN) and --secrets-dir is not one"
                    );
                    SecretsDir {
                        storage: SecretStorage::Disk,
                        mounted: false,
                    }
                }
            }
        };
        *setup = Some(secrets);
        Ok(secrets.storage)
    }
}

impl Drop for ConfigFiles {
    fn drop(&mut self) {
        if self.lock_secrets().is_some_and(|s| s.mounted) {
            // Quietly: the agent may have cleared its volume directory already.
            let _ = rustix::mount::unmount(&self.secrets_dir, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// Whether `dir` is on a tmpfs.
fn is_tmpfs(dir: &Path) -> bool {
    rustix::fs::statfs(dir).is_ok_and(|fs| fs.f_type == TMPFS_MAGIC)
}

/// The files of a projection: each listed key present in `data`, at its path.
fn projected<'a>(data: &'a ConfigData, items: &'a [KeyToPath]) -> Vec<(&'a str, &'a [u8])> {
    items
        .iter()
        .filter_map(|item| Some((item.path.as_str(), data.get(&item.key)?.as_slice())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::volumes::SECRETS;

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

    /// The agent's volume settings with `dir` as its volume directory.
    fn volumes_in(dir: &Path) -> VolumeConfig {
        VolumeConfig {
            dir: dir.to_path_buf(),
            ..VolumeConfig::default()
        }
    }

    fn key(kind: ConfigKind, name: &str) -> ConfigKey {
        ConfigKey {
            kind,
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn config_files_swap_atomically_and_follow_their_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = ConfigFiles::new(&volumes_in(dir.path()));
        let key = key(ConfigKind::ConfigMap, "app");
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
    fn projections_follow_their_object_and_go_with_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = ConfigFiles::new(&volumes_in(dir.path()));
        let key = key(ConfigKind::ConfigMap, "app");
        let app = |data: &[(&str, &str)]| object(ConfigKind::ConfigMap, "app", data);
        files
            .apply(vec![app(&[("a", "1"), ("b", "2")])], true, vec![])
            .expect("apply");
        let items = |pairs: &[(&str, &str)]| -> Vec<KeyToPath> {
            pairs
                .iter()
                .map(|(key, path)| KeyToPath {
                    key: key.to_string(),
                    path: path.to_string(),
                })
                .collect()
        };
        let nested = items(&[("a", "x/y/a.conf"), ("b", "b.conf")]);
        let projection = files.project(&key, &nested, false).expect("project");
        assert_eq!(
            files.project(&key, &nested, false).expect("again"),
            projection,
            "the same items share one projection"
        );
        let read = |path: &str| std::fs::read_to_string(projection.join(path)).ok();
        assert_eq!(read("x/y/a.conf").as_deref(), Some("1"));
        assert_eq!(read("b.conf").as_deref(), Some("2"));
        assert_eq!(read("a"), None, "only listed keys, only at their paths");
        assert!(
            files
                .project(&key, &items(&[("zz", "z")]), false)
                .is_err_and(|e| e.message() == "configmap default/app has no key zz")
        );
        assert!(
            files
                .project(&key, &items(&[("a", "../escape")]), false)
                .is_err_and(|e| e.reason() == "VolumeError")
        );

        // An update rewrites the projection; a key that left loses its file and directory.
        files
            .apply(vec![app(&[("b", "3")])], true, vec![])
            .expect("update");
        assert_eq!(read("b.conf").as_deref(), Some("3"));
        assert_eq!(read("x/y/a.conf"), None);
        assert!(!projection.join("x").exists());

        files.apply(vec![], true, vec![]).expect("remove");
        assert!(!projection.exists(), "removed with the object");
        assert!(files.lock_projections().is_empty());
    }

    /// The file system types mounted exactly at `path`, from the mount table, the topmost
    /// last.
    fn mounts_at(path: &Path) -> Vec<String> {
        let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let path = path.to_str().expect("utf-8");
        table
            .lines()
            .filter_map(|line| {
                let (mount, fs) = line.split_once(" - ")?;
                (mount.split(' ').nth(4)? == path)
                    .then(|| fs.split(' ').next().map(str::to_string))?
            })
            .collect()
    }

    /// The file system type mounted exactly at `path`, the topmost.
    fn mounted_at(path: &Path) -> Option<String> {
        mounts_at(path).pop()
    }

    /// Needs `CAP_SYS_ADMIN` (root) to mount the tmpfs; without it, the fallback test below
    /// covers what the agent does instead.
    #[test]
    fn secrets_are_kept_in_memory_and_config_maps_on_disk() {
        if !flotilla_tests::privileges::can_mount_tmpfs() {
            flotilla_tests::privileges::skipped(
                "keeping Secrets in memory mounts a tmpfs, which needs CAP_SYS_ADMIN (run the \
                 tests as root to run this one); the on-disk fallback ran instead",
            );
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        // The mount table names resolved paths.
        let volumes = volumes_in(&std::fs::canonicalize(dir.path()).expect("temp dir"));
        let root = volumes.config_files_dir();
        let files = ConfigFiles::new(&volumes);
        files
            .apply(
                vec![object(ConfigKind::ConfigMap, "app", &[("a", "1")])],
                true,
                vec![],
            )
            .expect("apply");
        assert_eq!(files.secret_storage(), None, "no tmpfs before a Secret");
        assert_eq!(mounted_at(&root.join(SECRETS)), None);
        files
            .apply(
                vec![
                    object(ConfigKind::ConfigMap, "app", &[("a", "1")]),
                    object(ConfigKind::Secret, "db", &[("password", "s3cret")]),
                ],
                true,
                vec![],
            )
            .expect("apply");
        // The agent runs as root here and in CI, as the emptyDir sizeLimit tests need too.
        assert_eq!(files.secret_storage(), Some(SecretStorage::Memory));
        assert_eq!(mounted_at(&root.join(SECRETS)).as_deref(), Some("tmpfs"));
        let secret = files.dir(&key(ConfigKind::Secret, "db"));
        assert!(secret.starts_with(root.join(SECRETS)));
        assert_eq!(
            std::fs::read_to_string(secret.join("password")).expect("password"),
            "s3cret"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join(SECRETS))
            .expect("secrets")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "only the agent reads the tmpfs");
        let config_map = files.dir(&key(ConfigKind::ConfigMap, "app"));
        assert!(!config_map.starts_with(root.join(SECRETS)));
        drop(files);
        assert_eq!(
            mounted_at(&root.join(SECRETS)),
            None,
            "unmounted when dropped"
        );
        assert!(
            !secret.exists(),
            "the Secret's files went with the tmpfs: {}",
            secret.display()
        );
    }

    /// An agent without `CAP_SYS_ADMIN` keeps Secrets' files on its disk, readable by itself
    /// alone (0400), and says so. As root, the test runs itself again without it.
    #[test]
    fn without_cap_sys_admin_secrets_are_kept_on_disk_at_0400() {
        use std::os::unix::fs::PermissionsExt;
        if flotilla_tests::privileges::can_mount_tmpfs() {
            flotilla_tests::privileges::rerun_without_sys_admin(
                "runtime::volumes::config_files::tests::without_cap_sys_admin_secrets_are_kept_on_disk_at_0400",
            );
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let dir = std::fs::canonicalize(dir.path()).expect("temp dir");
        if is_tmpfs(&dir) {
            flotilla_tests::privileges::skipped(
                "the temporary directory is a tmpfs already, so no disk fallback",
            );
            return;
        }
        let volumes = volumes_in(&dir);
        let root = volumes.config_files_dir();
        let files = ConfigFiles::new(&volumes);
        files
            .apply(
                vec![object(ConfigKind::Secret, "db", &[("password", "s3cret")])],
                true,
                vec![],
            )
            .expect("apply");
        assert_eq!(files.secret_storage(), Some(SecretStorage::Disk));
        assert_eq!(mounted_at(&root.join(SECRETS)), None, "no tmpfs");
        let secret = files.dir(&key(ConfigKind::Secret, "db"));
        let password = secret.join("password");
        assert_eq!(
            std::fs::read_to_string(&password).expect("password"),
            "s3cret"
        );
        let mode = std::fs::metadata(&password)
            .expect("password")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400, "only the agent reads a Secret's file");
    }

    /// Needs `CAP_SYS_ADMIN` (root) to mount the tmpfs it is given.
    #[test]
    fn a_secrets_dir_that_is_a_tmpfs_already_is_used_as_it_is() {
        if !flotilla_tests::privileges::can_mount_tmpfs() {
            flotilla_tests::privileges::skipped(
                "mounting the tmpfs this test hands the agent needs CAP_SYS_ADMIN",
            );
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        // As the chart's `medium: Memory` emptyDir.
        let secrets = std::fs::canonicalize(dir.path())
            .expect("temp dir")
            .join("secrets");
        std::fs::create_dir_all(&secrets).expect("mkdir");
        mount_tmpfs(&secrets, Some(1 << 20), 0o700).expect("tmpfs");
        let files = ConfigFiles::new(&VolumeConfig {
            secrets_dir: Some(secrets.clone()),
            ..volumes_in(dir.path())
        });
        files
            .apply(
                vec![object(ConfigKind::Secret, "db", &[("password", "s3cret")])],
                true,
                vec![],
            )
            .expect("apply");
        assert_eq!(files.secret_storage(), Some(SecretStorage::Memory));
        assert_eq!(
            mounts_at(&secrets).len(),
            1,
            "no second tmpfs stacked on it"
        );
        let secret = files.dir(&key(ConfigKind::Secret, "db"));
        assert_eq!(secret, secrets.join("default/db"));
        assert_eq!(
            std::fs::read_to_string(secret.join("password")).expect("password"),
            "s3cret"
        );
        drop(files);
        assert_eq!(mounts_at(&secrets).len(), 1, "not the agent's to unmount");
        rustix::mount::unmount(&secrets, rustix::mount::UnmountFlags::DETACH).expect("unmount");
    }
}
