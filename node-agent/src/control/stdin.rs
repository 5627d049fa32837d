//! Attaching a user's input to a sandbox's stdin: the control plane asks on the session
//! (`StreamStdin`), the agent opens `OpenStdin` and writes what arrives into the sandbox's pipe,
//! waiting while the guest has not read the last of it (so the control plane, and the user, wait
//! too). The end of the stream closes the guest's stdin; the end of the sandbox ends the call.

use flotilla_proto::control::v1::{OpenStdinRequest, StreamStdin};
use tokio_stream::StreamExt;

use super::Client;
use crate::supervisor::Supervisor;

/// Answers a stdin request for the sandbox `request.replica` of agent workload `name` (`None`
/// when the node has no such sandbox).
pub(super) fn open(
    mut client: Client,
    supervisor: &Supervisor,
    name: Option<&str>,
    request: StreamStdin,
) {
    let writer = match name {
        Some(name) => supervisor.attach_stdin(name, request.replica),
        None => Err(format!(
            "sandbox {} of workload {} not found on this node",
            request.replica, request.key
        )),
    };
    tokio::spawn(async move {
        let open = OpenStdinRequest {
            request_id: request.request_id.clone(),
            error: writer.as_ref().err().cloned().unwrap_or_default(),
        };
        let mut stream = match client.open_stdin(open).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::debug!(%status, request = %request.request_id, "stdin not opened");
                return;
            }
        };
        let Ok(mut writer) = writer else {
            return;
        };
        loop {
            tokio::select! {
                chunk = stream.next() => match chunk {
                    Some(Ok(chunk)) => {
                        if !writer.write(&chunk.data).await {
                            // The sandbox ended; ending the call tells the user.
                            return;
                        }
                    }
                    // The user closed their input (or went away): the guest reads EOF.
                    Some(Err(_)) | None => break,
                },
                () = writer.ended() => return,
            }
        }
        writer.close().await;
    });
}
