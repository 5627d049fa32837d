//! [`UrlModules`]: modules named by `spec.module.url` (HTTP(S) or `oci://`), downloaded once
//! per digest into the [`ModuleStore`].

use super::fetch::{DEFAULT_FETCH_TIMEOUT, FetchError, ModuleFetcher};
use super::guard::FetchGuard;
use super::oci::{self, OciError};
use super::store::{ModuleError, ModuleStore};

/// Why a module named by `spec.module.url` could not be stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UrlModuleError {
    /// The control plane has no HTTP client (it could not be built at startup).
    #[error("spec.module.url: this control plane cannot fetch module URLs")]
    NoFetcher,
    /// The HTTP(S) download failed or was refused.
    #[error("spec.module.url")]
    Fetch(#[source] FetchError),
    /// The OCI pull failed or was refused.
    #[error("spec.module.url")]
    Pull(#[source] OciError),
    /// The module store refused or could not write the module.
    #[error("spec.module.url")]
    Store(#[source] ModuleError),
    /// The task writing the module failed.
    #[error("storing the module")]
    Task(#[source] tokio::task::JoinError),
}

/// Downloads modules named by URL into a [`ModuleStore`]. The user API does it at apply; the
/// agent API does it when an agent asks for a module of a workload that was created elsewhere
/// (by `kubectl apply`, say). Cheap to clone.
#[derive(Clone)]
pub(crate) struct UrlModules {
    store: ModuleStore,
    fetcher: Option<ModuleFetcher>,
    /// One download per digest at a time: agents that ask together wait for the first.
    in_flight: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    >,
}

impl UrlModules {
    /// Downloads into `store`, within its size limit and [`DEFAULT_FETCH_TIMEOUT`], from
    /// nowhere `guard` denies.
    pub(crate) fn new(store: ModuleStore, guard: FetchGuard) -> Self {
        let fetcher = ModuleFetcher::new(store.max_bytes(), DEFAULT_FETCH_TIMEOUT, guard)
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
    /// See [`UrlModuleError`]; its chain is the message for the user (`spec.module.url: ...`).
    pub(crate) async fn fetch_into_store(
        &self,
        url: &str,
        sha256: &str,
    ) -> Result<(), UrlModuleError> {
        let fetcher = self.fetcher.as_ref().ok_or(UrlModuleError::NoFetcher)?;
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
    ) -> Result<(), UrlModuleError> {
        let bytes = if url.starts_with("oci://") {
            oci::pull(
                fetcher.client(),
                fetcher.guard(),
                url,
                sha256,
                self.store.max_bytes(),
                DEFAULT_FETCH_TIMEOUT,
            )
            .await
            .map_err(UrlModuleError::Pull)?
        } else {
            fetcher
                .fetch(url, sha256)
                .await
                .map_err(UrlModuleError::Fetch)?
        };
        let store = self.store.clone();
        let sha256 = sha256.to_string();
        tokio::task::spawn_blocking(move || store.put(&bytes, Some(&sha256)))
            .await
            .map_err(UrlModuleError::Task)?
            .map_err(UrlModuleError::Store)?;
        tracing::info!(%url, "module fetched");
        Ok(())
    }
}
