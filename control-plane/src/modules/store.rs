//! [`ModuleStore`]: verified wasm blobs on disk, one file per SHA-256.

use std::path::{Path, PathBuf};

use flotilla_model::module::{self, ModuleCheckError};

/// Largest module accepted by default: 64 MiB.
pub(crate) const DEFAULT_MAX_MODULE_BYTES: u64 = 64 << 20;

/// Why a module was not stored or found.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The blob is over the size limit, not binary wasm, or not the module the caller pinned.
    #[error("module refused")]
    Refused(#[source] ModuleCheckError),
    /// The blob is binary wasm but not a valid module or component.
    #[error("not a valid WebAssembly module or component: {0}")]
    Invalid(String),
    /// Nothing is stored under this digest.
    #[error("no module with sha256 {0} was pushed")]
    NotFound(String),
    /// Reading or writing the blob failed.
    #[error("module store I/O on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Blobs in a directory, one file per digest.
#[derive(Clone, Debug)]
pub struct ModuleStore {
    dir: PathBuf,
    max_bytes: u64,
}

impl ModuleStore {
    /// Opens (creating) the store in `dir`.
    ///
    /// # Errors
    /// [`ModuleError::Io`] if the directory cannot be created.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, ModuleError> {
        std::fs::create_dir_all(dir).map_err(|source| ModuleError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
        })
    }

    /// The largest blob the store accepts.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.wasm"))
    }

    /// Stores a blob and returns its digest. Storing the same blob twice is a no-op.
    ///
    /// # Errors
    /// Oversize, non-wasm or mis-digested blobs, and I/O failures.
    pub fn put(&self, bytes: &[u8], expected: Option<&str>) -> Result<String, ModuleError> {
        let digest =
            module::verify(bytes, self.max_bytes, expected).map_err(ModuleError::Refused)?;
        // Malformed modules are refused here, where the user pushes them, not on every agent.
        wasmparser::Validator::new()
            .validate_all(bytes)
            .map_err(|e| ModuleError::Invalid(e.to_string()))?;
        let path = self.path(&digest);
        if !path.exists() {
            let io = |source| ModuleError::Io {
                path: path.clone(),
                source,
            };
            // Unique per write: two requests may store the same blob at once.
            static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = path.with_extension(format!("tmp{}-{write}", std::process::id()));
            std::fs::write(&tmp, bytes).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
        }
        Ok(digest)
    }

    /// Whether a blob is stored under `sha256`.
    pub fn contains(&self, sha256: &str) -> bool {
        is_hex_digest(sha256) && self.path(sha256).exists()
    }

    /// The blob stored under `sha256`.
    ///
    /// # Errors
    /// [`ModuleError::NotFound`] or an I/O failure.
    pub fn get(&self, sha256: &str) -> Result<Vec<u8>, ModuleError> {
        if !is_hex_digest(sha256) {
            return Err(ModuleError::NotFound(sha256.to_string()));
        }
        let path = self.path(sha256);
        std::fs::read(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ModuleError::NotFound(sha256.to_string()),
            _ => ModuleError::Io { path, source },
        })
    }
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn blobs_are_stored_by_digest_and_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ModuleStore::open(dir.path(), 1024).expect("open");
        let digest = store.put(WASM, None).expect("stored");
        assert_eq!(store.put(WASM, Some(&digest)).expect("idempotent"), digest);
        assert!(store.contains(&digest));
        assert_eq!(store.get(&digest).expect("read"), WASM);
        assert!(matches!(
            store.put(b"hello world", None),
            Err(ModuleError::Refused(ModuleCheckError::NotBinaryWasm(_)))
        ));
        assert!(matches!(
            store.put(b"\0asm\x01\0\0\0\x01\xff", None),
            Err(ModuleError::Invalid(_))
        ));
        assert!(matches!(
            store.put(WASM, Some(&"0".repeat(64))),
            Err(ModuleError::Refused(
                ModuleCheckError::DigestMismatch { .. }
            ))
        ));
        assert!(matches!(
            store.put(&vec![0; 2048], None),
            Err(ModuleError::Refused(ModuleCheckError::TooLarge { .. }))
        ));
        assert!(matches!(
            store.get(&"f".repeat(64)),
            Err(ModuleError::NotFound(_))
        ));
        assert!(matches!(
            store.get("../etc/passwd"),
            Err(ModuleError::NotFound(_))
        ));
    }
}
