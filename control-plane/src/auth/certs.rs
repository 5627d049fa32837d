//! Users known by client certificates, as kube-apiserver's `--client-ca-file`: a certificate
//! that chains to the users' CA names the user by its subject's Common Name and its groups by
//! its Organizations.
//!
//! The users' CA is its own file, not the agents' (`--tls-client-ca-file`): every node holds
//! an agent certificate, and a node must not be able to act as a user. The TLS handshake
//! accepts certificates of either CA; which one signed a certificate is checked here, with
//! rustls' WebPKI verifier over the users' CA alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{AUTHENTICATED, User};

/// Verifies users' client certificates against the users' CA.
pub struct ClientCerts {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for ClientCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCerts").finish_non_exhaustive()
    }
}

/// Why the users' CA file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientCaError {
    /// It could not be read.
    #[error("reading the users' CA {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It holds no usable CA certificate.
    #[error("the users' CA {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ClientCerts {
    /// Trusts the CA certificates (PEM) in `path`.
    ///
    /// # Errors
    /// [`ClientCaError`] when the file cannot be read or holds no CA certificate.
    pub fn load(path: &Path) -> Result<Self, ClientCaError> {
        let pem = std::fs::read(path).map_err(|source| ClientCaError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(&pem).map_err(|message| ClientCaError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Trusts the CA certificates in `pem`.
    ///
    /// # Errors
    /// What is wrong with them.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("not PEM certificates: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("not a CA certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no certificate".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { verifier })
    }

    /// The user a peer's certificate chain (end entity first) names, if it chains to the
    /// users' CA; `None` when it does not (an agent's, say).
    pub fn user(&self, chain: &[CertificateDer<'static>]) -> Option<User> {
        let (end_entity, intermediates) = chain.split_first()?;
        self.verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .ok()?;
        let (_, cert) = X509Certificate::from_der(end_entity.as_ref()).ok()?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .filter(|cn| !cn.is_empty())?
            .to_string();
        let mut groups: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .filter(|o| !o.is_empty())
            .map(str::to_string)
            .collect();
        groups.push(AUTHENTICATED.to_string());
        Some(User {
            name,
            groups,
            ..User::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    use super::*;

    fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("CA").pem();
        (Issuer::new(params, key), pem)
    }

    fn leaf(cn: &str, orgs: &[&str], issuer: &Issuer<'_, KeyPair>) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        for org in orgs {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *org);
        }
        params.signed_by(&key, issuer).expect("sign").der().clone()
    }

    #[test]
    fn the_users_ca_names_users_and_groups_and_no_other_ca_does() {
        let (users, users_pem) = ca("users");
        let (agents, _) = ca("agents");
        let certs = ClientCerts::from_pem(users_pem.as_bytes()).expect("CA");
        let alice = certs
            .user(&[leaf("alice", &["team-a"], &users)])
            .expect("alice");
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.groups, ["team-a", AUTHENTICATED]);
        // An agent's certificate, from the other CA, is nobody here.
        assert_eq!(certs.user(&[leaf("node-1", &[], &agents)]), None);
        assert_eq!(certs.user(&[]), None);
        // A certificate without a Common Name names no one.
        assert_eq!(certs.user(&[leaf("", &["team-a"], &users)]), None);
        assert!(ClientCerts::from_pem(b"not pem").is_err());
    }
}
