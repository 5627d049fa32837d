//! The static token file, in kube-apiserver's `--token-auth-file` format: one user per line,
//! `token,user,uid[,"group1,group2"]`; blank lines and lines starting with `#` are skipped.
//! Tokens are kept only as SHA-256 digests, so looking one up takes the same time whatever
//! the presented token shares with a real one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{AUTHENTICATED, User};

/// Fewest characters of a token: shorter ones are guessable.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Users by the SHA-256 of their token.
#[derive(Debug, Default)]
pub struct TokenFile {
    users: HashMap<[u8; 32], User>,
}

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// It could not be read.
    #[error("reading the token file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `token,user,uid[,"groups"]`.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No user at all.
    #[error("{0}: no tokens")]
    Empty(PathBuf),
}

impl TokenFile {
    /// Reads `path`.
    ///
    /// # Errors
    /// [`TokenFileError`] when it cannot be read, a line is malformed, a token is short or
    /// repeated, or there is no token.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, message)| match line {
            0 => TokenFileError::Empty(path.to_path_buf()),
            line => TokenFileError::Line {
                path: path.to_path_buf(),
                line,
                message,
            },
        })
    }

    /// Parses a token file's text; errors carry the 1-based line (0: no tokens).
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(4, ',');
            let (Some(token), Some(name), Some(uid)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err((number, "expected token,user,uid[,\"groups\"]".into()));
            };
            let (token, name) = (token.trim(), name.trim());
            if token.len() < MIN_TOKEN_CHARS || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((
                    number,
                    format!("tokens are at least {MIN_TOKEN_CHARS} printable characters"),
                ));
            }
            if name.is_empty() {
                return Err((number, "the user name is empty".into()));
            }
            let mut groups: Vec<String> = fields
                .next()
                .map(|g| g.trim().trim_matches('"'))
                .into_iter()
                .flat_map(|g| g.split(','))
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect();
            groups.push(AUTHENTICATED.to_string());
            let user = User {
                name: name.to_string(),
                uid: uid.trim().to_string(),
                groups,
                extra: Default::default(),
            };
            if users.insert(digest(token), user).is_some() {
                return Err((number, "this token is given twice".into()));
            }
        }
        if users.is_empty() {
            return Err((0, "no tokens".into()));
        }
        Ok(Self { users })
    }

    /// The user whose token is `token`.
    pub fn user(&self, token: &str) -> Option<&User> {
        self.users.get(&digest(token))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}
