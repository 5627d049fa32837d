//! [`ModuleFetcher`]: downloads a module named by `spec.module.url`, within a size limit and a
//! timeout, and checks it against the pinned SHA-256 before anything is stored.

use std::time::Duration;

use flotilla_model::module::{Download, ModuleCheckError};

use super::guard::{DeniedAddress, FetchGuard};

/// How long a download may take by default, connection included.
pub(super) const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a module could not be fetched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
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
    /// The URL does not parse.
    #[error("{url}: not a URL ({message})")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The URL names an address the control plane may not reach.
    #[error("fetching {url}")]
    Denied {
        /// The URL.
        url: String,
        /// The denied range.
        #[source]
        source: DeniedAddress,
    },
    /// The server answered with an error status.
    #[error("fetching {url}: the server answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
    },
    /// The body is over the size limit, not binary wasm, or not the module the manifest pins.
    #[error("fetching {url}")]
    Refused {
        /// The URL.
        url: String,
        /// What is wrong with it.
        #[source]
        source: ModuleCheckError,
    },
}

/// Makes ring the process's TLS crypto provider: reqwest (here and in the OCI client) is built
/// without one. Installing it again fails harmlessly.
pub(super) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Downloads modules over HTTP(S). Cheap to clone.
#[derive(Clone)]
pub(super) struct ModuleFetcher {
    client: reqwest::Client,
    max_bytes: u64,
    guard: FetchGuard,
}

impl ModuleFetcher {
    /// A fetcher that gives up after `timeout`, refuses bodies over `max_bytes` and connects
    /// nowhere `guard` denies.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub(super) fn new(
        max_bytes: u64,
        timeout: Duration,
        guard: FetchGuard,
    ) -> Result<Self, FetchError> {
        install_crypto_provider();
        let client = guard
            .client_builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!(
                "flotilla-control-plane/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(FetchError::Client)?;
        Ok(Self {
            client,
            max_bytes,
            guard,
        })
    }

    /// The client, for OCI pulls on the same guard, timeout and TLS.
    pub(super) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The guard, for the URLs of requests made on [`client`](Self::client).
    pub(super) fn guard(&self) -> &FetchGuard {
        &self.guard
    }

    /// Downloads `url` and checks that it is a binary module whose SHA-256 is `sha256`.
    ///
    /// # Errors
    /// See [`FetchError`]; nothing is kept on failure.
    pub(super) async fn fetch(&self, url: &str, sha256: &str) -> Result<Vec<u8>, FetchError> {
        let request_error = |source| FetchError::Request {
            url: url.to_string(),
            source,
        };
        let refused = |source| FetchError::Refused {
            url: url.to_string(),
            source,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| FetchError::Url {
            url: url.to_string(),
            message: e.to_string(),
        })?;
        self.guard
            .check_url(&parsed)
            .map_err(|source| FetchError::Denied {
                url: url.to_string(),
                source,
            })?;
        let mut response = self
            .client
            .get(parsed)
            .send()
            .await
            .map_err(request_error)?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: response.status(),
            });
        }
        let mut download =
            Download::new(self.max_bytes, response.content_length()).map_err(refused)?;
        while let Some(chunk) = response.chunk().await.map_err(request_error)? {
            download.push(&chunk).map_err(refused)?;
        }
        let (body, _digest) = download.finish(Some(sha256)).map_err(refused)?;
        Ok(body)
    }
}
