//! Bearer tokens: the agent protocol's join token (agents send it as
//! `authorization: Bearer <token>` on every call to `flotilla.control.v1.Agents`, and the
//! control plane refuses calls without it when it has one configured), and the agent admin
//! API's token, when it listens beyond loopback.

use std::path::{Path, PathBuf};

/// The metadata key carrying the token.
pub const AUTHORIZATION: &str = "authorization";

/// Fewest characters of a node credential (`RegisterRequest.node_credential`): 32 random bytes
/// in unpadded base64url are 43.
pub const MIN_NODE_CREDENTIAL_CHARS: usize = 43;
/// Most characters of a node credential.
pub const MAX_NODE_CREDENTIAL_CHARS: usize = 256;

/// Whether `credential` has a node credential's form: 43 to 256 characters of base64url.
pub fn is_node_credential(credential: &str) -> bool {
    (MIN_NODE_CREDENTIAL_CHARS..=MAX_NODE_CREDENTIAL_CHARS).contains(&credential.len())
        && credential
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Why the join token could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("reading the join token from {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The token is empty (or only blanks).
    #[error("the join token is empty")]
    Empty,
    /// The token cannot be sent as a header value.
    #[error("the join token must be printable ASCII without spaces")]
    NotPrintable,
}

/// The token from an inline value or, failing that, a file (trimmed; e.g. a mounted Secret).
/// `Ok(None)` when neither is given.
///
/// # Errors
/// The file cannot be read, or the token is empty or not a valid header value.
pub fn load_token(
    value: Option<String>,
    file: Option<&Path>,
) -> Result<Option<String>, TokenError> {
    let token = match (value, file) {
        (Some(value), _) => value,
        (None, Some(file)) => std::fs::read_to_string(file).map_err(|source| TokenError::Read {
            path: file.to_path_buf(),
            source,
        })?,
        (None, None) => return Ok(None),
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotPrintable);
    }
    Ok(Some(token))
}

/// The metadata key naming the agent's session (`RegisterResponse.session_id`) on the calls it
/// makes for that session: a module is fetched only for workloads placed on the session's node.
pub const SESSION: &str = "flotilla-session";

/// Adds `session_id` to a request's metadata.
pub fn insert_session<T>(request: &mut tonic::Request<T>, session_id: &str) {
    if let Ok(value) = session_id.parse() {
        request.metadata_mut().insert(SESSION, value);
    }
}

/// The session a request names, if any.
pub fn session_of<T>(request: &tonic::Request<T>) -> Option<&str> {
    request
        .metadata()
        .get(SESSION)
        .and_then(|v| v.to_str().ok())
}

/// Adds the token to a request's metadata.
pub fn insert_bearer<T>(request: &mut tonic::Request<T>, token: &str) {
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert(AUTHORIZATION, value);
    }
}

/// Why a request's bearer token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// No `authorization: Bearer ...` header.
    Missing,
    /// Another token.
    Invalid,
}

/// Checks that `request` carries `authorization: Bearer <expected>`, comparing in time that
/// depends only on the lengths.
///
/// # Errors
/// [`BearerError`] when it does not.
pub fn check_bearer<T>(request: &tonic::Request<T>, expected: &str) -> Result<(), BearerError> {
    let presented = request
        .metadata()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(BearerError::Missing)?;
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(BearerError::Invalid)
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_must_match_exactly() {
        let mut request = tonic::Request::new(());
        assert_eq!(check_bearer(&request, "s3cret"), Err(BearerError::Missing));
        insert_bearer(&mut request, "s3cre");
        assert_eq!(check_bearer(&request, "s3cret"), Err(BearerError::Invalid));
        insert_bearer(&mut request, "s3cret");
        assert_eq!(check_bearer(&request, "s3cret"), Ok(()));
    }
}
