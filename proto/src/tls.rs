//! TLS for the gRPC APIs, from PEM files as Kubernetes TLS Secrets and cert-manager hold them.
//!
//! The control plane serves with a certificate and, for mutual TLS, verifies client certificates
//! against the agents' CA and the users' CA: agents must then present one from theirs, users
//! may (the user API also takes tokens, and decides which CA signed a certificate itself).
//! Agents and the CLI trust a CA file, or the webpki roots.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The control plane's TLS: its identity, and the CAs of agents' and users' client
/// certificates, if any.
#[derive(Clone)]
pub struct ServerTls {
    identity: Identity,
    /// The agents' CA (PEM).
    client_ca: Option<Vec<u8>>,
    /// The users' CA (PEM).
    user_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

/// A PEM file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the {what} {path}")]
pub struct TlsFileError {
    /// What the file holds: `certificate`, `key`, `CA`, ...
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl ServerTls {
    /// Reads a certificate chain and its key, and optionally the CA that signs agents' client
    /// certificates (which turns on mutual TLS for agents) and the one that signs users'.
    ///
    /// # Errors
    /// A file cannot be read.
    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        user_ca: Option<&Path>,
    ) -> Result<Self, TlsFileError> {
        Ok(Self {
            identity: Identity::from_pem(read(cert, "certificate")?, read(key, "key")?),
            client_ca: client_ca.map(|ca| read(ca, "client CA")).transpose()?,
            user_ca: user_ca.map(|ca| read(ca, "users' CA")).transpose()?,
        })
    }

    /// Whether agents must present a client certificate signed by the client CA.
    pub fn requires_client_certs(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The server configuration; client certificates from either CA are verified when
    /// presented, and [`requires_client_certs`](Self::requires_client_certs) says whether
    /// agents must.
    pub fn config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone());
        let mut roots = Vec::new();
        for ca in [&self.client_ca, &self.user_ca].into_iter().flatten() {
            roots.extend_from_slice(ca);
            roots.push(b'\n');
        }
        if roots.is_empty() {
            return config;
        }
        config
            .client_ca_root(Certificate::from_pem(roots))
            .client_auth_optional(true)
    }
}

/// A client configuration trusting `ca` (or the webpki roots) and presenting `identity`
/// (certificate and key files) for mutual TLS.
///
/// # Errors
/// A file cannot be read.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsFileError> {
    let mut config = ClientTlsConfig::new();
    config = match ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca, "CA")?)),
        None => config.with_webpki_roots(),
    };
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(
            read(cert, "client certificate")?,
            read(key, "client key")?,
        ));
    }
    Ok(config)
}
