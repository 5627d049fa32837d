//! Module bytes as every component checks them: a size within a limit, the binary header of a
//! core module or a component, and the SHA-256 that `spec.module.sha256` pins.
//!
//! One verification for every way a module arrives: pushed to the control plane, fetched from a
//! URL, pulled from an OCI registry, read by an agent from a file or a spec. [`verify`] checks
//! bytes already in memory; [`Download`] checks them as they stream in, so an oversize body is
//! refused before it is held.

use sha2::{Digest, Sha256};

/// Why module bytes were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModuleCheckError {
    /// The module is larger than the limit of whoever checks it.
    #[error("module is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Its size, or the bytes received so far when it is still streaming.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The module is not the one the spec pins.
    #[error("its sha256 is {actual}, but spec.module.sha256 pins {expected}")]
    DigestMismatch {
        /// The pinned digest, lower-case hex.
        expected: String,
        /// The digest of the bytes, lower-case hex.
        actual: String,
    },
    /// The bytes do not start with the header of a binary module or component.
    #[error("not a binary WebAssembly module or component ({0}); WAT text is not accepted")]
    NotBinaryWasm(&'static str),
}

/// Checks `bytes` whole: size within `limit`, the digest `pinned` (any case, surrounding blanks
/// ignored; empty or `None` pins nothing), then the binary header. Returns the bytes' SHA-256 in
/// lower-case hex.
///
/// # Errors
/// The first check that fails, in that order: the size is checked before anything is hashed,
/// and other bytes than the pinned ones are reported as such, whatever they hold.
pub fn verify(bytes: &[u8], limit: u64, pinned: Option<&str>) -> Result<String, ModuleCheckError> {
    check_size(bytes.len() as u64, limit)?;
    let digest = check_digest(pinned, sha256_hex(bytes))?;
    check_header(bytes)?;
    Ok(digest)
}

/// Refuses a size over `limit`.
///
/// # Errors
/// [`ModuleCheckError::TooLarge`].
pub fn check_size(size: u64, limit: u64) -> Result<(), ModuleCheckError> {
    if size > limit {
        return Err(ModuleCheckError::TooLarge { size, limit });
    }
    Ok(())
}

/// Checks the binary header: `\0asm`, then a core module (version 1) or a component (layer 1).
///
/// # Errors
/// [`ModuleCheckError::NotBinaryWasm`] saying which part of the header is wrong.
pub fn check_header(bytes: &[u8]) -> Result<(), ModuleCheckError> {
    if bytes.len() < 8 {
        return Err(ModuleCheckError::NotBinaryWasm(
            "shorter than a wasm header",
        ));
    }
    if &bytes[..4] != b"\0asm" {
        return Err(ModuleCheckError::NotBinaryWasm(
            "missing the \\0asm magic number",
        ));
    }
    if !is_component(bytes) && bytes[4..8] != [1, 0, 0, 0] {
        return Err(ModuleCheckError::NotBinaryWasm("unknown binary version"));
    }
    Ok(())
}

/// Whether the header is a component's (layer 1) rather than a core module's.
pub fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[6..8] == [1, 0]
}

/// The SHA-256 of `bytes` in lower-case hex, the form specs and the module store use.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Compares the digest of the bytes with the one `pinned`, if any; returns `actual`.
///
/// # Errors
/// [`ModuleCheckError::DigestMismatch`].
pub fn check_digest(pinned: Option<&str>, actual: String) -> Result<String, ModuleCheckError> {
    let expected = pinned.unwrap_or_default().trim().to_ascii_lowercase();
    if !expected.is_empty() && expected != actual {
        return Err(ModuleCheckError::DigestMismatch { expected, actual });
    }
    Ok(actual)
}

/// Module bytes checked as they arrive: the size on every chunk, the header and the digest at
/// the end.
#[derive(Debug)]
pub struct Download {
    bytes: Vec<u8>,
    hasher: Sha256,
    limit: u64,
}

// === impl Download ===

impl Download {
    /// A download that refuses more than `limit` bytes. `expected_size` (a `Content-Length`, a
    /// layer descriptor's size) is checked at once and reserves the buffer when it fits.
    ///
    /// # Errors
    /// [`ModuleCheckError::TooLarge`] when `expected_size` is over `limit`.
    pub fn new(limit: u64, expected_size: Option<u64>) -> Result<Self, ModuleCheckError> {
        if let Some(size) = expected_size {
            check_size(size, limit)?;
        }
        let reserve = expected_size.and_then(|s| usize::try_from(s).ok());
        Ok(Self {
            bytes: Vec::with_capacity(reserve.unwrap_or(0)),
            hasher: Sha256::new(),
            limit,
        })
    }

    /// Takes the next chunk.
    ///
    /// # Errors
    /// [`ModuleCheckError::TooLarge`] as soon as the bytes received pass the limit; the chunk
    /// is not kept.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ModuleCheckError> {
        check_size(self.bytes.len() as u64 + chunk.len() as u64, self.limit)?;
        self.hasher.update(chunk);
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }

    /// Checks the whole module against `pinned`, then its header, as [`verify`] does, and
    /// returns it with its digest.
    ///
    /// # Errors
    /// [`ModuleCheckError::DigestMismatch`] or [`ModuleCheckError::NotBinaryWasm`].
    pub fn finish(self, pinned: Option<&str>) -> Result<(Vec<u8>, String), ModuleCheckError> {
        let digest = check_digest(pinned, hex::encode(self.hasher.finalize()))?;
        check_header(&self.bytes)?;
        Ok((self.bytes, digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE: &[u8] = b"\0asm\x01\0\0\0";
    const COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    #[test]
    fn headers_of_modules_and_components_pass_and_others_say_why_not() {
        assert_eq!(check_header(MODULE), Ok(()));
        assert_eq!(check_header(COMPONENT), Ok(()));
        assert!(is_component(COMPONENT) && !is_component(MODULE));
        for (bytes, why) in [
            (&b"\0asm"[..], "shorter than a wasm header"),
            (b"(module)", "missing the \\0asm magic number"),
            (b"\0asm\x02\0\0\0", "unknown binary version"),
        ] {
            assert_eq!(
                check_header(bytes),
                Err(ModuleCheckError::NotBinaryWasm(why))
            );
        }
    }

    #[test]
    fn verify_checks_size_then_the_pinned_digest_then_the_header() {
        let digest = sha256_hex(MODULE);
        assert_eq!(verify(MODULE, 8, None), Ok(digest.clone()));
        assert_eq!(
            verify(MODULE, 8, Some(&format!(" {} ", digest.to_uppercase()))),
            Ok(digest.clone())
        );
        assert_eq!(verify(MODULE, 8, Some("")), Ok(digest.clone()));
        assert_eq!(
            verify(MODULE, 7, Some("00")),
            Err(ModuleCheckError::TooLarge { size: 8, limit: 7 })
        );
        assert!(matches!(
            verify(b"not wasm", 8, Some("00")),
            Err(ModuleCheckError::DigestMismatch { .. })
        ));
        assert!(matches!(
            verify(b"not wasm", 8, None),
            Err(ModuleCheckError::NotBinaryWasm(_))
        ));
        let err = verify(MODULE, 8, Some(&"0".repeat(64))).expect_err("another digest");
        assert_eq!(
            err,
            ModuleCheckError::DigestMismatch {
                expected: "0".repeat(64),
                actual: digest,
            }
        );
        assert!(err.to_string().contains("but spec.module.sha256 pins 000"));
    }

    #[test]
    fn downloads_are_bounded_while_they_stream() {
        assert_eq!(
            Download::new(8, Some(9)).map(|_| ()),
            Err(ModuleCheckError::TooLarge { size: 9, limit: 8 })
        );
        let mut download = Download::new(8, None).expect("no size announced");
        download.push(&MODULE[..5]).expect("first chunk");
        assert_eq!(
            download.push(&MODULE[..5]),
            Err(ModuleCheckError::TooLarge { size: 10, limit: 8 })
        );
        download.push(&MODULE[5..]).expect("the rest fits");
        let (bytes, digest) = download
            .finish(Some(&sha256_hex(MODULE)))
            .expect("the pinned module");
        assert_eq!((&bytes[..], digest), (MODULE, sha256_hex(MODULE)));
        let mut short = Download::new(8, None).expect("download");
        short.push(b"\0as").expect("chunk");
        assert!(matches!(
            short.finish(None),
            Err(ModuleCheckError::NotBinaryWasm(_))
        ));
    }
}
