//! Where a workload's module comes from on the agent: a file on the node or bytes inline in the
//! spec, read within the agent's size limit and verified as every component verifies modules
//! ([`flotilla_model::module`]).

use std::path::Path;

use flotilla_model::module;
use flotilla_proto::agent::v1::{ModuleSource, module_source};
use tokio::io::AsyncReadExt;

use super::error::SandboxError;

/// The module `source` names and its digest, read and verified: no larger than `limit` bytes,
/// the digest the spec pins (if any), a binary module or component.
///
/// # Errors
/// [`SandboxError::MissingModule`], [`SandboxError::ReadModule`] or [`SandboxError::Module`].
pub(super) async fn load(
    source: Option<&ModuleSource>,
    limit: u64,
) -> Result<(String, Vec<u8>), SandboxError> {
    let source = source.ok_or(SandboxError::MissingModule)?;
    let bytes = match &source.source {
        Some(module_source::Source::Path(path)) => read_bounded(Path::new(path), limit).await?,
        Some(module_source::Source::Inline(bytes)) => bytes.clone(),
        None => return Err(SandboxError::MissingModule),
    };
    let digest =
        module::verify(&bytes, limit, Some(&source.sha256)).map_err(SandboxError::Module)?;
    Ok((digest, bytes))
}

/// Reads a regular file of at most `limit` bytes.
async fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, SandboxError> {
    let read_err = |source| SandboxError::ReadModule {
        path: path.to_path_buf(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_err)?;
    // Checked on the opened file, so nothing can swap it between the check and the read; a
    // device such as /dev/zero reports length 0 and never ends.
    let meta = file.metadata().await.map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    module::check_size(meta.len(), limit).map_err(SandboxError::Module)?;
    // Bounded while reading too: the file may grow after the check.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .await
        .map_err(read_err)?;
    module::check_size(bytes.len() as u64, limit).map_err(SandboxError::Module)?;
    Ok(bytes)
}
