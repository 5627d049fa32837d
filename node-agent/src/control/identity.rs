//! The node's credential: a random secret the agent generates once per node name and keeps in
//! its state directory, so that after a restart it can take its node back and nobody else can.
//!
//! The control plane binds a node name to the first credential that registers it; the shared
//! join token admits new nodes, but cannot take over one already bound. The file is the
//! agent's alone (mode 0600 in a 0700 directory); lose it and the node name stays refused until
//! an operator runs `flotilla delete node NAME`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The credential kept for `node` under `state_dir`, created on first use.
///
/// # Errors
/// The directory cannot be made the agent's alone, or the file cannot be read or written, or
/// holds something that is not a credential.
pub fn load_or_create(state_dir: &Path, node: &str) -> std::io::Result<String> {
    let dir = state_dir.join("nodes");
    crate::runtime::volumes::create_private_dir(&dir)?;
    let path = dir.join(format!("{node}.credential"));
    match std::fs::read_to_string(&path) {
        Ok(stored) => return checked(&path, stored.trim()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let credential = generate();
    // Written aside and renamed, so a crash never leaves half a credential behind; created
    // exclusively, so of two agents starting at once for one node, one credential wins.
    let partial = dir.join(format!(".{node}.credential.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(credential.as_bytes())?;
    file.sync_all()?;
    drop(file);
    let linked = std::fs::hard_link(&partial, &path);
    let _ = std::fs::remove_file(&partial);
    match linked {
        Ok(()) => Ok(credential),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            checked(&path, std::fs::read_to_string(&path)?.trim())
        }
        Err(error) => Err(error),
    }
}

/// Creates `state_dir` for the user `uid:gid` alone (mode 0700), as root does for an agent
/// that will run as that user.
///
/// # Errors
/// The directory cannot be created, handed over or restricted.
pub fn prepare_state_dir(state_dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(state_dir)?;
    std::os::unix::fs::chown(state_dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
}

/// A fresh credential: 244 random bits from the OS, as 64 hex digits.
pub fn generate() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The default state directory: `$XDG_STATE_HOME/flotilla` or `~/.local/state/flotilla`.
pub fn default_state_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state"))
        })?;
    Some(base.join("flotilla"))
}

fn checked(path: &Path, stored: &str) -> std::io::Result<String> {
    if flotilla_proto::auth::is_node_credential(stored) {
        Ok(stored.to_string())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} does not hold a node credential (43 to 256 characters of base64url)",
                path.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prepared_state_dir_is_its_users_alone() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("ok");
        let state = dir.path().join("state");
        let (uid, gid) = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        prepare_state_dir(&state, uid, gid).expect("ok");
        let metadata = std::fs::metadata(&state).expect("ok");
        assert_eq!((metadata.uid(), metadata.gid()), (uid, gid));
        assert_eq!(metadata.permissions().mode() & 0o777, 0o700);
        // The agent, as that user, keeps its credential there.
        load_or_create(&state, "node-a").expect("ok");
    }

    #[test]
    fn a_credential_is_made_once_per_node_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("ok");
        let first = load_or_create(dir.path(), "node-a").expect("ok");
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create(dir.path(), "node-a").expect("ok"), first);
        assert_ne!(load_or_create(dir.path(), "node-b").expect("ok"), first);
        let file = dir.path().join("nodes/node-a.credential");
        let mode = std::fs::metadata(&file).expect("ok").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(dir.path().join("nodes"))
            .expect("ok")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(&file, "not a credential").expect("ok");
        let error = load_or_create(dir.path(), "node-a").expect_err("an error");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    }
}
