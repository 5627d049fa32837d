//! [`Sessions`]: the live agent sessions, and the relays that carry a sandbox's logs from its
//! agent to the user who asked for them, and a user's input to a sandbox's stdin.
//!
//! Agents dial out, so the control plane cannot call them. To read logs it sends a
//! `StreamLogs` request down the node's session; the agent answers by opening `UploadLogs`
//! with the request's id, and the relay joins that upload to the waiting user stream. When the
//! user stops reading, the upload call is ended, and the agent stops following. Stdin goes the
//! other way: a `StreamStdin` request, answered by the agent's `OpenStdin` call, whose response
//! stream carries what the user writes; only the session the request went to may claim it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::agent::v1::{LogChunk, LogOptions};
use flotilla_proto::control::v1::{
    ControlMessage, StdinChunk, StreamLogs, StreamStdin, control_message,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

/// Messages down one agent's session.
pub(crate) type SessionSender = mpsc::Sender<Result<ControlMessage, Status>>;

/// Chunks of a log stream on their way to the user.
pub(crate) type LogSender = mpsc::Sender<Result<LogChunk, Status>>;

/// How long an agent gets to open `UploadLogs` after it was asked.
pub(crate) const UPLOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Chunks buffered between the agent's upload and the user.
const LOG_BUFFER: usize = 32;

/// Stdin chunks buffered between the user and the agent: few, so that a guest that reads slowly
/// slows the user down instead of filling the control plane's memory.
pub(crate) const STDIN_BUFFER: usize = 4;

/// Stdin chunks on their way to the agent.
pub(crate) type StdinSender = mpsc::Sender<Result<StdinChunk, Status>>;

/// What a user's attach waits for: the agent's stream to write to, or why there is none.
pub(crate) type StdinReply = oneshot::Sender<Result<StdinSender, Status>>;

/// A stdin request sent down a session, waiting for that session's agent to open it.
struct PendingStdin {
    session_id: String,
    reply: StdinReply,
}

/// One agent's open session.
struct LiveSession {
    id: String,
    down: SessionSender,
    /// Cancelled to end the session from the control plane's side.
    ended: CancellationToken,
}

/// Live sessions by node, and log requests waiting for their upload.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, LiveSession>>,
    pending: Arc<Mutex<HashMap<String, LogSender>>>,
    pending_stdin: Arc<Mutex<HashMap<String, PendingStdin>>>,
    /// Where the upload timeouts run.
    tasks: TaskTracker,
}

impl Sessions {
    /// Sessions whose log requests time out in tasks of `tasks`.
    pub fn new(tasks: TaskTracker) -> Self {
        Self {
            tasks,
            ..Self::default()
        }
    }

    /// Records the session `session_id` of `node`, replacing an older one; cancelling
    /// `ended` must end it.
    pub fn open(
        &self,
        node: &str,
        session_id: &str,
        down: SessionSender,
        ended: CancellationToken,
    ) {
        let session = LiveSession {
            id: session_id.to_string(),
            down,
            ended,
        };
        lock(&self.live).insert(node.to_string(), session);
    }

    /// Forgets `node`'s session if it is still `session_id`.
    pub fn close(&self, node: &str, session_id: &str) {
        let mut live = lock(&self.live);
        if live.get(node).is_some_and(|s| s.id == session_id) {
            live.remove(node);
        }
    }

    /// Ends `node`'s session, if it has one.
    pub fn end(&self, node: &str) {
        if let Some(session) = lock(&self.live).remove(node) {
            session.ended.cancel();
        }
    }

    /// Asks `node`'s agent for a sandbox's logs; the returned receiver gets the chunks once the
    /// agent uploads them, or an error if it does not within [`UPLOAD_TIMEOUT`].
    ///
    /// # Errors
    /// UNAVAILABLE when the node has no live session.
    pub async fn request_logs(
        &self,
        node: &str,
        key: &str,
        replica: u32,
        follow: bool,
        options: Option<LogOptions>,
    ) -> Result<mpsc::Receiver<Result<LogChunk, Status>>, Status> {
        let down = lock(&self.live)
            .get(node)
            .map(|s| s.down.clone())
            .ok_or_else(|| Status::unavailable(format!("node {node} is not connected")))?;
        let request_id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = mpsc::channel(LOG_BUFFER);
        lock(&self.pending).insert(request_id.clone(), tx);
        let request = ControlMessage {
            kind: Some(control_message::Kind::Logs(StreamLogs {
                request_id: request_id.clone(),
                key: key.to_string(),
                replica,
                follow,
                options,
            })),
        };
        if down.send(Ok(request)).await.is_err() {
            lock(&self.pending).remove(&request_id);
            return Err(Status::unavailable(format!("node {node} disconnected")));
        }
        // An agent that never answers must not leave the user waiting forever.
        let pending = self.pending.clone();
        let node = node.to_string();
        self.tasks.spawn(async move {
            tokio::time::sleep(UPLOAD_TIMEOUT).await;
            let unanswered = lock(&pending).remove(&request_id);
            if let Some(tx) = unanswered {
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "node {node} did not send the logs within {UPLOAD_TIMEOUT:?}"
                    ))))
                    .await;
            }
        });
        Ok(rx)
    }

    /// Asks `node`'s agent to attach to a sandbox's stdin; the returned receiver gets the
    /// stream to write to once the agent opens it, or an error (the agent's, or UNAVAILABLE if
    /// it does not answer within [`UPLOAD_TIMEOUT`]).
    ///
    /// # Errors
    /// UNAVAILABLE when the node has no live session.
    pub async fn request_stdin(
        &self,
        node: &str,
        key: &str,
        replica: u32,
    ) -> Result<oneshot::Receiver<Result<StdinSender, Status>>, Status> {
        let (down, session_id) = lock(&self.live)
            .get(node)
            .map(|s| (s.down.clone(), s.id.clone()))
            .ok_or_else(|| Status::unavailable(format!("node {node} is not connected")))?;
        let request_id = uuid::Uuid::new_v4().to_string();
        let (reply, rx) = oneshot::channel();
        lock(&self.pending_stdin).insert(request_id.clone(), PendingStdin { session_id, reply });
        let request = ControlMessage {
            kind: Some(control_message::Kind::Stdin(StreamStdin {
                request_id: request_id.clone(),
                key: key.to_string(),
                replica,
            })),
        };
        if down.send(Ok(request)).await.is_err() {
            lock(&self.pending_stdin).remove(&request_id);
            return Err(Status::unavailable(format!("node {node} disconnected")));
        }
        let pending = self.pending_stdin.clone();
        let node = node.to_string();
        self.tasks.spawn(async move {
            tokio::time::sleep(UPLOAD_TIMEOUT).await;
            let unanswered = lock(&pending).remove(&request_id);
            if let Some(waiting) = unanswered {
                let _ = waiting.reply.send(Err(Status::unavailable(format!(
                    "node {node} did not open the sandbox's stdin within {UPLOAD_TIMEOUT:?}"
                ))));
            }
        });
        Ok(rx)
    }

    /// Claims the user's attach waiting for `request_id`, for the agent of session `session`:
    /// `None` when there is none (it timed out, the id is unknown, or the request went to
    /// another session).
    pub fn take_pending_stdin(
        &self,
        request_id: &str,
        session: Option<&str>,
    ) -> Option<StdinReply> {
        let mut pending = lock(&self.pending_stdin);
        let to_this_session = pending
            .get(request_id)
            .is_some_and(|p| Some(p.session_id.as_str()) == session);
        if !to_this_session {
            return None;
        }
        pending.remove(request_id).map(|p| p.reply)
    }

    /// Claims the user stream waiting for `request_id`; `None` when there is none (it timed
    /// out, or the id is unknown).
    pub fn take_pending(&self, request_id: &str) -> Option<LogSender> {
        lock(&self.pending).remove(request_id)
    }

    /// How many nodes have a live session.
    pub fn live_count(&self) -> usize {
        lock(&self.live).len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
