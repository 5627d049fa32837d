//! A sandbox's attachable standard input (`spec.stdin`), as a Pod's `stdin` with `stdinOnce`.
//!
//! The guest reads from a bounded in-memory pipe; one client at a time may hold its write end
//! ([`StdinPipe::attach`]). Writes wait while the pipe is full, so a client that sends faster
//! than the guest reads is slowed down through the control plane's stream rather than buffered
//! without bound. When the client closes its input, or the sandbox ends for good, the write end
//! is closed and the guest reads EOF, in its later runs too. Every run of the sandbox reads the
//! same pipe: bytes a run did not read are there for the next.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWriteExt, SimplexStream, WriteHalf};
use tokio_util::sync::CancellationToken;
use wasmtime_wasi::cli::{AsyncStdinStream, IsTerminal, StdinStream};
use wasmtime_wasi_io::streams::InputStream;

/// Bytes the pipe holds before a writer waits for the guest.
pub const STDIN_BUFFER_BYTES: usize = 64 * 1024;

/// The pipe behind a sandbox's stdin.
pub struct StdinPipe {
    reader: Arc<AsyncStdinStream>,
    writer: Mutex<Option<WriteHalf<SimplexStream>>>,
    /// Cancelled when the sandbox ends for good: an attached writer stops.
    ended: CancellationToken,
}

/// The write end of a sandbox's stdin, held by one attached client.
pub struct StdinWriter {
    writer: WriteHalf<SimplexStream>,
    ended: CancellationToken,
}

/// Why [`StdinPipe::attach`] refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttachError {
    /// Another client holds the write end, or one held it and closed it.
    #[error("its stdin is attached already or was closed (a sandbox's stdin is attached once)")]
    Taken,
    /// The sandbox has ended for good.
    #[error("the sandbox has ended")]
    Ended,
}

// === impl StdinPipe ===

impl StdinPipe {
    /// An empty pipe. Must be called within a tokio runtime (the reader pumps the pipe in a task
    /// of it).
    pub fn new() -> Self {
        let (reader, writer) = tokio::io::simplex(STDIN_BUFFER_BYTES);
        Self {
            reader: Arc::new(AsyncStdinStream::new(reader)),
            writer: Mutex::new(Some(writer)),
            ended: CancellationToken::new(),
        }
    }

    /// Takes the write end for one client.
    ///
    /// # Errors
    /// [`AttachError`] when it is taken or the sandbox has ended.
    pub fn attach(&self) -> Result<StdinWriter, AttachError> {
        if self.ended.is_cancelled() {
            return Err(AttachError::Ended);
        }
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(AttachError::Taken)?;
        Ok(StdinWriter {
            writer,
            ended: self.ended.clone(),
        })
    }

    /// Marks the end of the sandbox: an attached writer stops, no one can attach.
    pub fn end(&self) {
        self.ended.cancel();
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// The stream handed to WASI as stdin.
    pub(crate) fn stream(self: &Arc<Self>) -> SandboxStdin {
        SandboxStdin(self.reader.clone())
    }
}

impl Default for StdinPipe {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for StdinPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdinPipe")
            .field("ended", &self.ended.is_cancelled())
            .finish_non_exhaustive()
    }
}

// === impl StdinWriter ===

impl StdinWriter {
    /// Writes `data` to the guest's stdin, waiting while the pipe is full. Returns false when
    /// the sandbox has ended (nothing more can be written).
    pub async fn write(&mut self, data: &[u8]) -> bool {
        tokio::select! {
            biased;
            () = self.ended.cancelled() => false,
            written = self.writer.write_all(data) => written.is_ok(),
        }
    }

    /// A future that resolves when the sandbox has ended for good.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// Closes the guest's stdin: it reads EOF once it has read what was written.
    pub async fn close(mut self) {
        // An ended sandbox's pipe may be full and never read again: don't wait for it.
        tokio::select! {
            biased;
            () = self.ended.cancelled() => {}
            _ = self.writer.shutdown() => {}
        }
    }
}

/// A sandbox's stdin as WASI reads it: every run shares the pipe.
#[derive(Clone)]
pub(crate) struct SandboxStdin(Arc<AsyncStdinStream>);

impl IsTerminal for SandboxStdin {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdinStream for SandboxStdin {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncRead + Send + Sync> {
        self.0.async_stream()
    }

    fn p2_stream(&self) -> Box<dyn InputStream> {
        self.0.p2_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_writer_at_a_time_and_none_after_the_end() {
        let pipe = StdinPipe::new();
        let writer = pipe.attach().expect("first attach");
        assert_eq!(pipe.attach().err(), Some(AttachError::Taken));
        writer.close().await;
        assert_eq!(
            pipe.attach().err(),
            Some(AttachError::Taken),
            "attached once"
        );
        let ended = StdinPipe::new();
        ended.end();
        assert_eq!(ended.attach().err(), Some(AttachError::Ended));
    }

    #[tokio::test]
    async fn a_full_pipe_holds_the_writer_until_the_sandbox_ends() {
        let pipe = StdinPipe::new();
        let mut writer = pipe.attach().expect("attach");
        // Nobody reads: the pipe (and the reader's one pending chunk) fill up, then the write
        // waits rather than buffer more.
        let big = vec![b'x'; 4 * STDIN_BUFFER_BYTES];
        let write = writer.write(&big);
        tokio::pin!(write);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), &mut write)
                .await
                .is_err(),
            "a full pipe makes the writer wait"
        );
        pipe.end();
        assert!(!write.await, "the end of the sandbox stops the writer");
    }
}
