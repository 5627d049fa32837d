//! The agent's local admin gRPC service (`flotilla.agent.v1.AgentAdmin`) over the supervisor.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::agent::v1::agent_admin_server::{AgentAdmin, AgentAdminServer};
use flotilla_proto::agent::v1::{
    Capacity, GetCapacityRequest, ListSandboxesRequest, ListSandboxesResponse, LogChunk,
    LogsRequest, RunWorkloadRequest, RunWorkloadResponse, SandboxStatus, StopWorkloadRequest,
    StopWorkloadResponse, Termination, WatchRequest, WorkloadSpec, volume,
};
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::runtime::logs::{LogBuffer, LogFilter, unix_nanos};
use crate::supervisor::{ApplyError, SandboxOutput, Supervisor};

/// Lets `request` through when the agent has no admin token or the request carries it.
///
/// # Errors
/// `UNAUTHENTICATED` otherwise.
pub(crate) fn authenticate(
    request: Request<()>,
    expected: Option<&str>,
) -> Result<Request<()>, Status> {
    let Some(expected) = expected else {
        return Ok(request);
    };
    match flotilla_proto::auth::check_bearer(&request, expected) {
        Ok(()) => Ok(request),
        Err(flotilla_proto::auth::BearerError::Missing) => Err(Status::unauthenticated(
            "this agent's admin API requires a token; pass --agent-token-file to flotilla",
        )),
        Err(flotilla_proto::auth::BearerError::Invalid) => {
            Err(Status::unauthenticated("invalid admin token"))
        }
    }
}

/// Why `spec` cannot run through the admin API, if it cannot. Workloads run here are the
/// node's own, as a kubelet's static pods are: they may not refer to ConfigMaps or Secrets
/// (whose namespace they would name at will), join another workload's route (`owner`), or
/// take the name of a workload the control plane placed here.
fn local_workload_problem(spec: &WorkloadSpec) -> Option<String> {
    if is_placed_name(&spec.name) {
        return Some(format!(
            "name {:?}: names with '.' are the control plane's; use a name without dots",
            spec.name
        ));
    }
    if !spec.owner.is_empty() {
        return Some("owner: set only by the control plane".into());
    }
    if !spec.namespace.is_empty() {
        return Some("namespace: set only by the control plane".into());
    }
    let refers = !spec.env_from.is_empty()
        || spec.env.iter().any(|e| e.value_from.is_some())
        || spec
            .volumes
            .iter()
            .any(|v| matches!(v.source, Some(volume::Source::Config(_))));
    refers.then(|| {
        "env and volumes from ConfigMaps or Secrets: only for workloads of the control plane, \
         which holds them"
            .into()
    })
}

/// Whether `name` is one the control plane gives the workloads it places
/// (`<namespace>.<name>-<hash>`).
fn is_placed_name(name: &str) -> bool {
    name.contains('.')
}

/// Messages buffered per stream before the sender waits for the client.
const STREAM_BUFFER: usize = 256;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Implements [`AgentAdmin`] on a [`Supervisor`].
#[derive(Clone)]
pub(crate) struct AdminService {
    supervisor: Supervisor,
}

impl AdminService {
    /// Creates the service.
    pub(crate) fn new(supervisor: Supervisor) -> Self {
        Self { supervisor }
    }

    /// Wraps the service for a tonic server.
    pub(crate) fn into_server(self) -> AgentAdminServer<Self> {
        AgentAdminServer::new(self)
    }
}

impl From<ApplyError> for Status {
    fn from(err: ApplyError) -> Self {
        let message = flotilla_telemetry::error_chain(&err);
        match err {
            ApplyError::InvalidSpec(_) | ApplyError::Prepare { .. } => {
                Status::invalid_argument(message)
            }
            ApplyError::AdmissionRefused(_) => Status::resource_exhausted(message),
            ApplyError::ShuttingDown => Status::unavailable(message),
        }
    }
}

#[tonic::async_trait]
impl AgentAdmin for AdminService {
    async fn run_workload(
        &self,
        request: Request<RunWorkloadRequest>,
    ) -> Result<Response<RunWorkloadResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        local_workload_problem(&spec).map_or(Ok(()), |p| Err(Status::invalid_argument(p)))?;
        let applied = self.supervisor.apply(spec).await?;
        Ok(Response::new(RunWorkloadResponse {
            sha256: applied.digest,
            replicas: applied.replicas,
        }))
    }

    async fn stop_workload(
        &self,
        request: Request<StopWorkloadRequest>,
    ) -> Result<Response<StopWorkloadResponse>, Status> {
        let request = request.into_inner();
        if is_placed_name(&request.name) {
            return Err(Status::permission_denied(format!(
                "{}: placed by the control plane; delete it there",
                request.name
            )));
        }
        let grace =
            (request.grace_period_ms > 0).then(|| Duration::from_millis(request.grace_period_ms));
        let stopped = self
            .supervisor
            .stop(&request.name, grace)
            .await
            .ok_or_else(|| Status::not_found(format!("workload {:?} not found", request.name)))?;
        Ok(Response::new(StopWorkloadResponse {
            stopped: u32::try_from(stopped).unwrap_or(u32::MAX),
        }))
    }

    async fn list_sandboxes(
        &self,
        request: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        let workload = request.into_inner().workload;
        let filter = (!workload.is_empty()).then_some(workload.as_str());
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: self.supervisor.list(filter),
        }))
    }

    type WatchStream = BoxStream<SandboxStatus>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let workload = request.into_inner().workload;
        let mut events = self.supervisor.watch();
        let supervisor = self.supervisor.clone();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            loop {
                let status = match events.recv().await {
                    Ok(status) => status,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow to see every change: resend the current state instead.
                        let filter = (!workload.is_empty()).then_some(workload.as_str());
                        for status in supervisor.list(filter) {
                            if tx.send(Ok(status)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if (workload.is_empty() || status.workload == workload)
                    && tx.send(Ok(status)).await.is_err()
                {
                    // The client has gone.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type LogsStream = BoxStream<LogChunk>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        let output = self
            .supervisor
            .output(&request.workload, request.replica)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "sandbox {} of workload {:?} not found",
                    request.replica, request.workload
                ))
            })?;
        let filter = LogFilter::from_options(request.options.as_ref(), unix_nanos());
        let chunks = ReceiverStream::new(stream_logs(output, request.follow, filter)).map(Ok);
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn get_capacity(
        &self,
        _request: Request<GetCapacityRequest>,
    ) -> Result<Response<Capacity>, Status> {
        Ok(Response::new(self.supervisor.capacity()))
    }
}

/// A sandbox's output from the start of its ring buffer (as `filter` keeps it), then (when
/// `follow`) as it arrives, until the sandbox ends for good or the receiver is dropped. Once the
/// ring is closed and read to its end, a last chunk says how the sandbox ended.
pub(crate) fn stream_logs(
    output: SandboxOutput,
    follow: bool,
    filter: LogFilter,
) -> mpsc::Receiver<LogChunk> {
    let SandboxOutput { logs, .. } = &output;
    stream_ring(logs.clone(), move || output.ended(), follow, filter)
}

/// [`stream_logs`] over a bare ring; `ended` says how the sandbox ended once the ring is closed.
fn stream_ring(
    buffer: Arc<LogBuffer>,
    ended: impl FnOnce() -> Option<Termination> + Send + 'static,
    follow: bool,
    filter: LogFilter,
) -> mpsc::Receiver<LogChunk> {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let notify = buffer.notifier();
        let hold = if filter.wait_for_reader {
            buffer.hold(0)
        } else {
            None
        };
        let mut offset = 0;
        let mut first = true;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let read = buffer.read_from(offset);
            offset = read.next_offset;
            let mut pieces = read.pieces;
            if std::mem::take(&mut first) {
                filter.first_read(&mut pieces);
            } else {
                filter.retain(&mut pieces);
            }
            let mut skipped = read.skipped;
            for piece in pieces {
                let chunk = LogChunk {
                    data: piece.data,
                    skipped: std::mem::take(&mut skipped),
                    stream: piece.stream as i32,
                    time_unix_nanos: piece.at,
                    ended: None,
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
            // Sent (into a bounded channel, towards the reader): the writer may drop it now.
            if let Some(hold) = &hold {
                hold.advance(read.next_offset);
            }
            if read.closed {
                let chunk = LogChunk {
                    skipped,
                    ended: ended(),
                    ..LogChunk::default()
                };
                let _ = tx.send(chunk).await;
                return;
            }
            if !follow {
                return;
            }
            tokio::select! {
                () = notified => {}
                () = tx.closed() => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use flotilla_proto::agent::v1::LogStream;
    use tonic::Code;

    use super::*;

    #[test]
    fn local_workloads_refer_to_nothing_of_the_control_planes() {
        use flotilla_proto::agent::v1::{ConfigRef, EnvFrom, EnvVar, KeyRef, Volume};
        let ok = WorkloadSpec {
            name: "debug".into(),
            ..WorkloadSpec::default()
        };
        assert_eq!(local_workload_problem(&ok), None);
        let cases = [
            WorkloadSpec {
                name: "default.web-1234".into(),
                ..ok.clone()
            },
            WorkloadSpec {
                owner: "default.web".into(),
                ..ok.clone()
            },
            WorkloadSpec {
                namespace: "team-a".into(),
                ..ok.clone()
            },
            WorkloadSpec {
                env_from: vec![EnvFrom {
                    name: "db".into(),
                    ..EnvFrom::default()
                }],
                ..ok.clone()
            },
            WorkloadSpec {
                env: vec![EnvVar {
                    name: "PASSWORD".into(),
                    value_from: Some(KeyRef::default()),
                    ..EnvVar::default()
                }],
                ..ok.clone()
            },
            WorkloadSpec {
                volumes: vec![Volume {
                    source: Some(volume::Source::Config(ConfigRef::default())),
                    ..Volume::default()
                }],
                ..ok.clone()
            },
        ];
        for spec in cases {
            assert!(local_workload_problem(&spec).is_some(), "{spec:?}");
        }
    }

    #[test]
    fn apply_errors_map_to_the_grpc_codes_clients_act_on() {
        let refused = Status::from(ApplyError::AdmissionRefused(
            "64 MiB requested, 10 MiB free".into(),
        ));
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("10 MiB free"), "{refused:?}");
        let invalid = Status::from(ApplyError::InvalidSpec("replicas: must be >= 0".into()));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert!(invalid.message().contains("replicas"), "{invalid:?}");
        assert_eq!(
            Status::from(ApplyError::ShuttingDown).code(),
            Code::Unavailable
        );
    }

    /// The next chunk, failing the test after a second without one.
    async fn next(chunks: &mut mpsc::Receiver<LogChunk>) -> Option<LogChunk> {
        tokio::time::timeout(Duration::from_secs(1), chunks.recv())
            .await
            .expect("a chunk or the end within a second")
    }

    fn stopped() -> Option<Termination> {
        Some(Termination {
            reason: "Stopped".into(),
            ..Termination::default()
        })
    }

    #[tokio::test]
    async fn followed_logs_stream_what_arrives_and_end_when_the_sandbox_ends() {
        let buffer = Arc::new(LogBuffer::new(1 << 10));
        buffer.write(LogStream::Stdout, b"before\n");
        let mut chunks = stream_ring(buffer.clone(), stopped, true, LogFilter::default());
        let chunk = next(&mut chunks).await.expect("chunk");
        assert_eq!(chunk.data, b"before\n");
        assert_eq!(chunk.stream(), LogStream::Stdout);
        assert!(chunk.time_unix_nanos > 0);
        // Nothing new: the stream waits rather than ends.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), chunks.recv())
                .await
                .is_err(),
            "a followed stream waits for output"
        );
        buffer.write(LogStream::Stderr, b"after\n");
        let chunk = next(&mut chunks).await.expect("chunk");
        assert_eq!(chunk.data, b"after\n");
        assert_eq!(chunk.stream(), LogStream::Stderr);
        buffer.close();
        let last = next(&mut chunks).await.expect("the ending");
        assert!(last.data.is_empty());
        assert_eq!(last.ended.expect("ended").reason, "Stopped");
        assert!(
            next(&mut chunks).await.is_none(),
            "the end of the sandbox ends the stream"
        );
    }

    #[tokio::test]
    async fn unfollowed_logs_end_after_what_is_there() {
        let buffer = Arc::new(LogBuffer::new(1 << 10));
        buffer.write(LogStream::Stdout, b"only\n");
        buffer.write(LogStream::Stderr, b"oops\n");
        let stderr = LogFilter {
            stream: Some(LogStream::Stderr),
            ..LogFilter::default()
        };
        let mut chunks = stream_ring(buffer.clone(), stopped, false, stderr);
        assert_eq!(next(&mut chunks).await.expect("chunk").data, b"oops\n");
        assert!(next(&mut chunks).await.is_none(), "no ending while it runs");
    }
}
