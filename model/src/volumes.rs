//! Volumes: directories a sandbox reaches as WASI preopens, declared in `spec.volumes` and
//! mounted at guest paths by `spec.volumeMounts`, as a Pod's volumes and a container's mounts.

use serde::{Deserialize, Serialize};

use crate::{parse_bytes, validate_name};

/// A directory a workload's sandboxes can mount: exactly one source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct Volume {
    /// Its name, which mounts refer to.
    pub name: String,
    /// A scratch directory of its own for each sandbox, kept across its restarts and removed
    /// with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolume>,
    /// The keys of a ConfigMap of the workload's namespace, one file each (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapVolume>,
    /// The keys of a Secret of the workload's namespace, one file each (read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretVolume>,
    /// A directory of the node, if the agent allows it (`--allow-host-path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolume>,
}

/// A per-sandbox scratch directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct EmptyDirVolume {
    /// Bytes it may hold, e.g. `1Mi`: writes beyond fail with "no space". Backed by a tmpfs
    /// of that size, counted against nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<String>,
    /// `Memory` for a tmpfs even without a `sizeLimit` (then as large as the sandbox's memory
    /// limit); `""` (the default) for the agent's disk unless `sizeLimit` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<StorageMedium>,
}

/// What backs an `emptyDir`, as in Kubernetes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum StorageMedium {
    /// The agent's disk.
    #[default]
    #[serde(rename = "")]
    Default,
    /// A tmpfs.
    Memory,
}

/// Files from a ConfigMap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct ConfigMapVolume {
    /// The ConfigMap.
    pub name: String,
    /// Only these keys, each at its own path. Default: every key, as a file named after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// Run even when it does not exist (an empty directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// Files from a Secret.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct SecretVolume {
    /// The Secret.
    pub secret_name: String,
    /// Only these keys, each at its own path. Default: every key, as a file named after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// Run even when it does not exist (an empty directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// A key of a ConfigMap or Secret and the file it becomes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct KeyToPath {
    /// The key.
    pub key: String,
    /// Its file, relative to the mount, e.g. `conf/app.toml`; parent directories are made.
    pub path: String,
}

/// A directory of the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct HostPathVolume {
    /// Its absolute path on the node.
    pub path: String,
}

/// Where a volume appears in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct VolumeMount {
    /// The volume.
    pub name: String,
    /// The absolute guest path, e.g. `/data`.
    pub mount_path: String,
    /// Mount it read-only. Default: read-write for `emptyDir`, read-only for everything
    /// else; `configMap` and `secret` volumes are always read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// A directory inside the volume to mount instead of its root, e.g. `logs`: made when
    /// missing in an `emptyDir` (and a writable `hostPath`). Not for `configMap` or `secret`
    /// volumes, whose keys `items` places instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

impl Volume {
    /// Whether sandboxes may write to it, given a mount's `readOnly`.
    pub fn writable(&self, mount: &VolumeMount) -> bool {
        match mount.read_only {
            Some(read_only) => !read_only && self.config_map.is_none() && self.secret.is_none(),
            None => self.empty_dir.is_some(),
        }
    }
}

/// Checks `volumes` and `mounts`, reporting each bad field through `fail`.
pub(crate) fn validate(
    volumes: &[Volume],
    mounts: &[VolumeMount],
    fail: &mut impl FnMut(&str, String),
) {
    let mut names = std::collections::BTreeSet::new();
    for (i, volume) in volumes.iter().enumerate() {
        let field = format!("spec.volumes[{i}]");
        if let Err(message) = validate_name(&volume.name) {
            fail(&format!("{field}.name"), message.to_string());
        }
        if !names.insert(volume.name.as_str()) {
            fail(
                &format!("{field}.name"),
                format!("{:?} is declared twice", volume.name),
            );
        }
        let sources = [
            volume.empty_dir.is_some(),
            volume.config_map.is_some(),
            volume.secret.is_some(),
            volume.host_path.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            fail(
                &field,
                "must have exactly one of emptyDir, configMap, secret, hostPath".into(),
            );
        }
        if let Some(limit) = volume
            .empty_dir
            .as_ref()
            .and_then(|e| e.size_limit.as_ref())
        {
            match parse_bytes(limit) {
                Ok(0) => fail(&format!("{field}.emptyDir.sizeLimit"), "must be > 0".into()),
                Ok(_) => {}
                Err(message) => fail(&format!("{field}.emptyDir.sizeLimit"), message.to_string()),
            }
        }
        if let Some(config_map) = &volume.config_map {
            if let Err(message) = validate_name(&config_map.name) {
                fail(&format!("{field}.configMap.name"), message.to_string());
            }
            validate_items(&config_map.items, &format!("{field}.configMap"), fail);
        }
        if let Some(secret) = &volume.secret {
            if let Err(message) = validate_name(&secret.secret_name) {
                fail(&format!("{field}.secret.secretName"), message.to_string());
            }
            validate_items(&secret.items, &format!("{field}.secret"), fail);
        }
        if let Some(host) = &volume.host_path
            && let Err(message) = validate_absolute(&host.path)
        {
            fail(&format!("{field}.hostPath.path"), message.to_string());
        }
    }
    let mut paths = std::collections::BTreeSet::new();
    for (i, mount) in mounts.iter().enumerate() {
        let field = format!("spec.volumeMounts[{i}]");
        let volume = volumes.iter().find(|v| v.name == mount.name);
        if volume.is_none() {
            fail(
                &format!("{field}.name"),
                format!("{:?} is not a volume of spec.volumes", mount.name),
            );
        }
        if let Some(sub_path) = &mount.sub_path {
            if let Err(message) = validate_relative_path(sub_path) {
                fail(&format!("{field}.subPath"), message.to_string());
            } else if volume.is_some_and(|v| v.config_map.is_some() || v.secret.is_some()) {
                fail(
                    &format!("{field}.subPath"),
                    "not supported for configMap and secret volumes (a mount is a directory); \
                     use the volume's items to place keys"
                        .into(),
                );
            }
        }
        if let Err(message) = validate_absolute(&mount.mount_path) {
            fail(&format!("{field}.mountPath"), message.to_string());
        } else if !paths.insert(mount.mount_path.trim_end_matches('/')) {
            fail(
                &format!("{field}.mountPath"),
                format!("{:?} is mounted twice", mount.mount_path),
            );
        }
    }
}

/// Checks a ConfigMap or Secret volume's `items`: known-shaped keys, each at a distinct
/// relative path that stays inside the volume.
fn validate_items(items: &[KeyToPath], field: &str, fail: &mut impl FnMut(&str, String)) {
    let mut paths = std::collections::BTreeSet::new();
    for (j, item) in items.iter().enumerate() {
        let field = format!("{field}.items[{j}]");
        if !crate::config::is_config_key(&item.key) {
            fail(
                &format!("{field}.key"),
                format!(
                    "{:?}: must be letters, digits, '-', '_' or '.', not starting with ..",
                    item.key
                ),
            );
        }
        if let Err(message) = validate_relative_path(&item.path) {
            fail(&format!("{field}.path"), message.to_string());
        } else if !paths.insert(item.path.as_str()) {
            fail(
                &format!("{field}.path"),
                format!("{:?} is used twice", item.path),
            );
        }
    }
    // A file cannot also be a directory of another item's path.
    for path in &paths {
        let mut parent = *path;
        while let Some((dir, _)) = parent.rsplit_once('/') {
            if paths.contains(dir) {
                fail(
                    &format!("{field}.items"),
                    format!("{dir:?} is both a file and the directory of {path:?}"),
                );
            }
            parent = dir;
        }
    }
}

/// A path that may not be used where it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// An empty path.
    #[error("must not be empty")]
    Empty,
    /// An absolute path where a relative one belongs.
    #[error("{0:?}: must be a relative path")]
    NotRelative(String),
    /// A relative path where an absolute one belongs.
    #[error("{0:?}: must be an absolute path")]
    NotAbsolute(String),
    /// A path with a NUL byte.
    #[error("{0:?}: must not contain NUL")]
    Nul(String),
    /// A relative path with segments that could leave its volume.
    #[error("{0:?}: must not contain empty, . or .. segments, or segments starting with ..")]
    RelativeSegments(String),
    /// An absolute path with `.` or `..` segments.
    #[error("{0:?}: must not contain . or .. segments")]
    AbsoluteSegments(String),
}

/// Checks a path inside a volume: relative, without empty, `.` or `..` segments, and without
/// segments starting with `..` (names the agent keeps for itself).
///
/// # Errors
/// [`PathError`] saying what is wrong with it.
pub fn validate_relative_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.starts_with('/') {
        return Err(PathError::NotRelative(path.to_string()));
    }
    if path.contains('\0') {
        return Err(PathError::Nul(path.to_string()));
    }
    if path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment.starts_with(".."))
    {
        return Err(PathError::RelativeSegments(path.to_string()));
    }
    Ok(())
}

/// An absolute path without `.` or `..` segments.
fn validate_absolute(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(path.to_string()));
    }
    if path
        .split('/')
        .any(|segment| segment == ".." || segment == ".")
    {
        return Err(PathError::AbsoluteSegments(path.to_string()));
    }
    if path.contains('\0') {
        return Err(PathError::Nul(path.to_string()));
    }
    Ok(())
}
