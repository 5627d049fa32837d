//! [`WorkloadService`]: the user API (`flotilla.control.v1.Workloads`) over a store.

use std::pin::Pin;

use flotilla_proto::control::v1::workloads_server::{Workloads, WorkloadsServer};
use flotilla_proto::control::v1::{
    ApplyRequest, DeleteRequest, GetRequest, ListRequest, ListResponse, PushModuleRequest,
    PushModuleResponse, WatchEvent as WatchEventMessage, WatchRequest, WorkloadObject, watch_event,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::{module_status, parse_manifest, store_status, to_object};
use crate::model::WorkloadKey;
use crate::modules::ModuleStore;
use crate::store::{WatchEvent, WorkloadStore};

/// Implements the user API on a [`WorkloadStore`] and a [`ModuleStore`].
pub struct WorkloadService<S> {
    store: S,
    modules: ModuleStore,
}

impl<S: WorkloadStore + Clone> WorkloadService<S> {
    /// Creates the service.
    pub fn new(store: S, modules: ModuleStore) -> Self {
        Self { store, modules }
    }

    /// Wraps the service for a tonic server.
    pub fn into_server(self) -> WorkloadsServer<Self> {
        WorkloadsServer::new(self).max_decoding_message_size(super::MAX_MODULE_MESSAGE_BYTES)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<S: WorkloadStore + Clone> Workloads for WorkloadService<S> {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<WorkloadObject>, Status> {
        let workload = parse_manifest(&request.into_inner().manifest)
            .map_err(|e| Status::invalid_argument(format!("invalid workload: {e}")))?;
        workload
            .validate()
            .map_err(|e| Status::invalid_argument(format!("invalid workload: {e}")))?;
        let module = &workload.spec.module;
        if module.url.is_none() && !self.modules.contains(&module.sha256) {
            return Err(Status::failed_precondition(format!(
                "spec.module.sha256: no module {} was pushed to the control plane; \
                 `flotilla apply` pushes local files named by spec.module.path, or set \
                 spec.module.url",
                module.sha256
            )));
        }
        let stored = self.store.apply(workload).await.map_err(store_status)?;
        Ok(Response::new(to_object(&stored)?))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<WorkloadObject>, Status> {
        let request = request.into_inner();
        let key = WorkloadKey::new(&request.namespace, &request.name);
        match self.store.get(&key).await.map_err(store_status)? {
            Some(workload) => Ok(Response::new(to_object(&workload)?)),
            None => Err(Status::not_found(format!("workload {key} not found"))),
        }
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let namespace = request.into_inner().namespace;
        let items = self
            .store
            .list()
            .await
            .map_err(store_status)?
            .iter()
            .filter(|w| namespace.is_empty() || w.key().namespace == namespace)
            .map(to_object)
            .collect::<Result<_, _>>()?;
        Ok(Response::new(ListResponse { items }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<WorkloadObject>, Status> {
        let request = request.into_inner();
        let key = WorkloadKey::new(&request.namespace, &request.name);
        match self.store.delete(&key).await.map_err(store_status)? {
            Some(workload) => Ok(Response::new(to_object(&workload)?)),
            None => Err(Status::not_found(format!("workload {key} not found"))),
        }
    }

    type WatchStream = BoxStream<WatchEventMessage>;

    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut watch = self.store.watch().await.map_err(store_status)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(event) = watch.next().await {
                let message = event.map_err(store_status).and_then(|event| {
                    let (kind, workloads) = match event {
                        WatchEvent::Restarted(all) => (watch_event::Type::Restarted, all),
                        WatchEvent::Applied(w) => (watch_event::Type::Applied, vec![w]),
                        WatchEvent::Deleted(w) => (watch_event::Type::Deleted, vec![w]),
                    };
                    Ok(WatchEventMessage {
                        r#type: kind as i32,
                        objects: workloads.iter().map(to_object).collect::<Result<_, _>>()?,
                    })
                });
                if tx.send(message).await.is_err() {
                    // The client has gone.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn push_module(
        &self,
        request: Request<PushModuleRequest>,
    ) -> Result<Response<PushModuleResponse>, Status> {
        let request = request.into_inner();
        let modules = self.modules.clone();
        let size = request.module.len() as u64;
        let sha256 = tokio::task::spawn_blocking(move || {
            modules.put(&request.module, Some(&request.sha256))
        })
        .await
        .map_err(|e| Status::internal(format!("module store task failed: {e}")))?
        .map_err(module_status)?;
        Ok(Response::new(PushModuleResponse { sha256, size }))
    }
}
