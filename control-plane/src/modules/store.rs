//! [`ModuleStore`]: verified wasm blobs on disk, one file per SHA-256.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flotilla_model::module::{self, ModuleCheckError};
use flotilla_model::wasm::{self, FeatureSet};

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
    /// The WebAssembly features each stored module uses, found when it was stored or first
    /// asked for since the control plane started.
    features: Arc<Mutex<HashMap<String, FeatureSet>>>,
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
            features: Arc::default(),
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
        // Malformed modules are refused here, where the user pushes them, not on every agent;
        // what the module uses is checked against each workload that runs it.
        let requires = wasm::required_features(bytes).map_err(|e| ModuleError::Invalid(e.0))?;
        self.remember(&digest, requires);
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

    /// The WebAssembly features (beyond the default set) the module stored under `sha256`
    /// uses. Reads and validates the blob the first time it is asked for after a restart.
    ///
    /// # Errors
    /// [`ModuleError::NotFound`], an I/O failure, or a blob that is not valid WebAssembly.
    pub fn required_features(&self, sha256: &str) -> Result<FeatureSet, ModuleError> {
        if let Some(known) = self.lock_features().get(sha256) {
            return Ok(*known);
        }
        let bytes = self.get(sha256)?;
        let requires = wasm::required_features(&bytes).map_err(|e| ModuleError::Invalid(e.0))?;
        self.remember(sha256, requires);
        Ok(requires)
    }

    fn remember(&self, sha256: &str, requires: FeatureSet) {
        self.lock_features().insert(sha256.to_string(), requires);
    }

    fn lock_features(&self) -> std::sync::MutexGuard<'_, HashMap<String, FeatureSet>> {
        self.features.lock().unwrap_or_else(|e| e.into_inner())
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
        assert_eq!(
            store.required_features(&digest).expect("known"),
            FeatureSet::NONE
        );
        // What a module uses is found again for a blob stored before a restart.
        let mut gc = WASM.to_vec();
        gc.extend_from_slice(&[0x01, 0x05, 0x01, 0x5f, 0x01, 0x7f, 0x01]);
        let gc_digest = store.put(&gc, None).expect("stored");
        let reopened = ModuleStore::open(dir.path(), 1024).expect("reopen");
        assert_eq!(
            reopened.required_features(&gc_digest).expect("read"),
            FeatureSet::NONE.with(flotilla_model::wasm::WasmFeature::Gc)
        );
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
