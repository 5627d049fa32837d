//! Desired state behind one trait: [`WorkloadStore`].
//!
//! [`EmbeddedStore`] keeps workloads in a redb database file for standalone use; [`KubeStore`]
//! keeps them as `WasmWorkload` objects in a Kubernetes cluster. `tests.rs` holds one
//! conformance suite, generic over the trait, that both pass.
//!
//! # Guarantees
//! - `apply` validates, bumps `metadata.generation` only when `spec` changes, and bumps
//!   `metadata.resourceVersion` on every write.
//! - A write whose `metadata.resourceVersion` is set and stale fails with [`Error::Conflict`].
//! - Deleting a workload with finalizers only sets `metadata.deletionTimestamp`; it goes once
//!   [`WorkloadStore::set_finalizers`] empties them. Kubernetes does the same.
//! - [`WorkloadStore::watch`] first yields [`WatchEvent::Restarted`] with every workload, then
//!   each later change in commit order, with no gap between the two. A watcher that falls too far
//!   behind gets a fresh `Restarted` instead of the changes it missed.

pub(crate) mod config;
pub(crate) mod embedded;
pub(crate) mod kube;

use std::future::Future;

use tokio::sync::broadcast;

pub(crate) use self::config::{ConfigError, ConfigStore};
pub use self::embedded::EmbeddedStore;
pub use self::kube::KubeStore;
use crate::model::{ValidationError, Workload, WorkloadKey, WorkloadStatus};

/// A change seen by a watcher.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchEvent {
    /// Every workload, as of the start of the watch (or of a resynchronisation).
    Restarted(Vec<Workload>),
    /// A workload was created or changed.
    Applied(Workload),
    /// A workload was deleted; its last state.
    Deleted(Workload),
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened.
    #[error("opening the store")]
    Open(#[source] redb::Error),
    /// A read failed.
    #[error("reading the store")]
    Read(#[source] redb::Error),
    /// A write failed; nothing was changed. Shared by every write of the failed group commit.
    #[error("writing the store")]
    Write(#[source] std::sync::Arc<redb::Error>),
    /// A stored object could not be decoded.
    #[error("decoding stored workload {key}")]
    Decode {
        /// The object's key.
        key: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The object is invalid.
    #[error("invalid workload")]
    Invalid(#[from] ValidationError),
    /// The object changed since the caller read it.
    #[error("conflict on {key}: resourceVersion {expected} is stale (now {actual})")]
    Conflict {
        /// The object's key.
        key: WorkloadKey,
        /// The version the caller had.
        expected: String,
        /// The version in the store.
        actual: String,
    },
    /// No such workload.
    #[error("workload {0} not found")]
    NotFound(WorkloadKey),
    /// The store's worker thread failed.
    #[error("store task failed: {0}")]
    Task(String),
    /// A Kubernetes API request failed; shown as the API server's one-line message.
    #[error("Kubernetes API: {}", kube::error_line(.0))]
    Kube(::kube::Error),
    /// The store cannot answer yet, e.g. before its first sync with the Kubernetes API.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl Error {
    /// A failed write, from any of redb's write errors.
    pub(crate) fn write(error: impl Into<redb::Error>) -> Self {
        Self::Write(std::sync::Arc::new(error.into()))
    }
}

/// Reads and writes workloads.
pub trait WorkloadStore: Send + Sync + 'static {
    /// One workload.
    ///
    /// # Errors
    /// A storage failure.
    fn get(
        &self,
        key: &WorkloadKey,
    ) -> impl Future<Output = Result<Option<Workload>, Error>> + Send;

    /// Every workload, sorted by key.
    ///
    /// # Errors
    /// A storage failure.
    fn list(&self) -> impl Future<Output = Result<Vec<Workload>, Error>> + Send;

    /// Creates a workload or updates its spec, metadata labels and nothing else.
    ///
    /// # Errors
    /// [`Error::Invalid`] with every bad field, [`Error::Conflict`] for a stale write.
    fn apply(&self, workload: Workload) -> impl Future<Output = Result<Workload, Error>> + Send;

    /// Deletes a workload; returns its last state, or `None` if it did not exist. A workload
    /// with finalizers is only marked (`deletionTimestamp`) and returned as marked.
    ///
    /// # Errors
    /// A storage failure.
    fn delete(
        &self,
        key: &WorkloadKey,
    ) -> impl Future<Output = Result<Option<Workload>, Error>> + Send;

    /// Replaces a workload's status (the status subresource); the spec is untouched.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown workload.
    fn patch_status(
        &self,
        key: &WorkloadKey,
        status: WorkloadStatus,
    ) -> impl Future<Output = Result<Workload, Error>> + Send;

    /// Replaces a workload's finalizers; a workload marked for deletion goes when they are
    /// empty. `resource_version`, if not empty, must be current.
    ///
    /// # Errors
    /// [`Error::NotFound`], or [`Error::Conflict`] for a stale version.
    fn set_finalizers(
        &self,
        key: &WorkloadKey,
        finalizers: Vec<String>,
        resource_version: &str,
    ) -> impl Future<Output = Result<Option<Workload>, Error>> + Send;

    /// Watches every change, starting with [`WatchEvent::Restarted`].
    ///
    /// # Errors
    /// A storage failure while taking the initial snapshot.
    fn watch(&self) -> impl Future<Output = Result<Watch, Error>> + Send;
}

/// A stream of [`WatchEvent`]s from a store.
pub struct Watch {
    initial: Option<Vec<Workload>>,
    events: broadcast::Receiver<WatchEvent>,
    resync: Box<dyn Fn() -> Result<Vec<Workload>, Error> + Send + Sync>,
}

impl Watch {
    /// A watch that yields `initial`, then `events`, and calls `resync` after falling behind.
    pub fn new(
        initial: Vec<Workload>,
        events: broadcast::Receiver<WatchEvent>,
        resync: Box<dyn Fn() -> Result<Vec<Workload>, Error> + Send + Sync>,
    ) -> Self {
        Self {
            initial: Some(initial),
            events,
            resync,
        }
    }

    /// The next event; `None` once the store is gone.
    ///
    /// # Errors
    /// A storage failure while resynchronising.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, Error>> {
        if let Some(initial) = self.initial.take() {
            return Some(Ok(WatchEvent::Restarted(initial)));
        }
        match self.events.recv().await {
            Ok(event) => Some(Ok(event)),
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Start over from the current state; the receiver now points at the newest
                // events, which the snapshot may already include (applying them is idempotent).
                Some((self.resync)().map(WatchEvent::Restarted))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
