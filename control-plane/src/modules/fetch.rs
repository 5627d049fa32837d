//! [`ModuleFetcher`]: downloads a module named by `spec.module.url`, within a size limit and a
//! timeout, and checks it against the pinned SHA-256 before anything is stored.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::ModuleStore;

/// How long a download may take by default, connection included.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a module could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The HTTP client could not be built (no TLS roots, ...).
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    /// The server could not be reached, or the transfer failed or timed out.
    #[error("fetching {url}")]
    Request {
        /// The URL.
        url: String,
        /// The cause (connection refused, DNS, TLS, timeout, ...).
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("fetching {url}: the server answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
    },
    /// The body is larger than the module store accepts.
    #[error("fetching {url}: the module is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The body is not the module the manifest pins.
    #[error("fetching {url}: its sha256 is {actual}, but spec.module.sha256 pins {expected}")]
    DigestMismatch {
        /// The URL.
        url: String,
        /// Pinned.
        expected: String,
        /// Downloaded.
        actual: String,
    },
}

/// Makes ring the process's TLS crypto provider: reqwest (here and in the OCI client) is built
/// without one. Installing it again fails harmlessly.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Downloads modules over HTTP(S). Cheap to clone.
#[derive(Clone)]
pub struct ModuleFetcher {
    client: reqwest::Client,
    max_bytes: u64,
}

impl ModuleFetcher {
    /// A fetcher that gives up after `timeout` and refuses bodies over `max_bytes`.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(max_bytes: u64, timeout: Duration) -> Result<Self, FetchError> {
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!(
                "flotilla-control-plane/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(FetchError::Client)?;
        Ok(Self { client, max_bytes })
    }

    /// Downloads `url` and checks that its SHA-256 is `sha256`.
    ///
    /// # Errors
    /// See [`FetchError`]; nothing is kept on failure.
    pub async fn fetch(&self, url: &str, sha256: &str) -> Result<Vec<u8>, FetchError> {
        let request_error = |source| FetchError::Request {
            url: url.to_string(),
            source,
        };
        let too_large = || FetchError::TooLarge {
            url: url.to_string(),
            limit: self.max_bytes,
        };
        let mut response = self.client.get(url).send().await.map_err(request_error)?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: response.status(),
            });
        }
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        let mut hasher = Sha256::new();
        while let Some(chunk) = response.chunk().await.map_err(request_error)? {
            if body.len() as u64 + chunk.len() as u64 > self.max_bytes {
                return Err(too_large());
            }
            hasher.update(&chunk);
            body.extend_from_slice(&chunk);
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            return Err(FetchError::DigestMismatch {
                url: url.to_string(),
                expected: sha256.to_string(),
                actual,
            });
        }
        Ok(body)
    }
}

/// Downloads modules named by URL into a [`ModuleStore`]. The user API does it at apply; the
/// agent API does it when an agent asks for a module of a workload that was created elsewhere
/// (by `kubectl apply`, say). Cheap to clone.
#[derive(Clone)]
pub struct UrlModules {
    store: ModuleStore,
    fetcher: Option<ModuleFetcher>,
    /// One download per digest at a time: agents that ask together wait for the first.
    in_flight: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    >,
}

impl UrlModules {
    /// Downloads into `store`, within its size limit and [`DEFAULT_FETCH_TIMEOUT`].
    pub fn new(store: ModuleStore) -> Self {
        let fetcher = ModuleFetcher::new(store.max_bytes(), DEFAULT_FETCH_TIMEOUT)
            .map_err(|error| {
                tracing::error!(
                    error = %flotilla_telemetry::error_chain(&error),
                    "module URLs cannot be fetched"
                );
            })
            .ok();
        Self {
            store,
            fetcher,
            in_flight: std::sync::Arc::default(),
        }
    }

    /// Downloads `url`, checks it against `sha256`, validates it and stores it.
    ///
    /// # Errors
    /// Why not, as a message for the user (`spec.module.url: ...`).
    pub async fn fetch_into_store(&self, url: &str, sha256: &str) -> Result<(), String> {
        let fetcher = self
            .fetcher
            .as_ref()
            .ok_or("this control plane cannot fetch module URLs")?;
        let flight = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(sha256.to_string())
            .or_default()
            .clone();
        let result = {
            let _flight = flight.lock().await;
            if self.store.contains(sha256) {
                Ok(())
            } else {
                self.download(fetcher, url, sha256).await
            }
        };
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(sha256);
        result
    }

    async fn download(
        &self,
        fetcher: &ModuleFetcher,
        url: &str,
        sha256: &str,
    ) -> Result<(), String> {
        let fetched = if url.starts_with("oci://") {
            super::oci::pull(url, sha256, self.store.max_bytes(), DEFAULT_FETCH_TIMEOUT)
                .await
                .map_err(|error| flotilla_telemetry::error_chain(&error).to_string())
        } else {
            fetcher
                .fetch(url, sha256)
                .await
                .map_err(|error| flotilla_telemetry::error_chain(&error).to_string())
        };
        let bytes = fetched.map_err(|error| format!("spec.module.url: {error}"))?;
        let store = self.store.clone();
        let sha256 = sha256.to_string();
        tokio::task::spawn_blocking(move || store.put(&bytes, Some(&sha256)))
            .await
            .map_err(|e| format!("module store task failed: {e}"))?
            .map_err(|e| format!("spec.module.url: {e}"))?;
        tracing::info!(%url, "module fetched");
        Ok(())
    }
}
