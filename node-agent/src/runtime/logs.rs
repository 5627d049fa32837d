//! Per-sandbox log ring buffers.
//!
//! A sandbox's stdout and stderr go, interleaved, into one bounded ring. The ring is allocated on
//! the first byte written (or the first follower), so a sandbox that prints nothing costs only the
//! empty [`LogBuffer`]. When the ring is full the oldest bytes are dropped; readers learn how many
//! they missed.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::Notify;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{OutputStream, StreamError};

/// Bounded, lazily allocated ring of a sandbox's output.
#[derive(Debug)]
pub struct LogBuffer {
    limit: usize,
    closed: AtomicBool,
    ring: Mutex<Option<Box<Ring>>>,
}

#[derive(Debug)]
struct Ring {
    bytes: VecDeque<u8>,
    /// Total bytes ever written; the offset just past the newest byte.
    written: u64,
    /// Wakes followers when output arrives or the sandbox ends.
    notify: Arc<Notify>,
}

/// What a reader gets from [`LogBuffer::read_from`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogRead {
    /// Bytes from the requested offset (or the oldest retained byte) to the newest.
    pub data: Vec<u8>,
    /// Bytes that were dropped between the requested offset and `data`.
    pub skipped: u64,
    /// Offset to pass to the next read.
    pub next_offset: u64,
    /// Whether the writer has closed the buffer (the sandbox ended for good).
    pub closed: bool,
}

// === impl LogBuffer ===

impl LogBuffer {
    /// Creates an empty buffer that retains at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            closed: AtomicBool::new(false),
            ring: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<Ring>>> {
        // A panic while holding this lock cannot leave the ring inconsistent: every update is a
        // plain push/pop sequence. Recover the guard rather than propagate the poison.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ring<'a>(&self, slot: &'a mut Option<Box<Ring>>) -> &'a mut Ring {
        slot.get_or_insert_with(|| {
            Box::new(Ring {
                bytes: VecDeque::new(),
                written: 0,
                notify: Arc::new(Notify::new()),
            })
        })
    }

    /// Appends output, dropping the oldest bytes beyond the limit.
    pub fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut slot = self.lock();
        let ring = self.ring(&mut slot);
        let keep = data.len().min(self.limit);
        let tail = &data[data.len() - keep..];
        let overflow = (ring.bytes.len() + tail.len()).saturating_sub(self.limit);
        ring.bytes.drain(..overflow);
        ring.bytes.extend(tail);
        ring.written += data.len() as u64;
        ring.notify.notify_waiters();
    }

    /// Marks the end of output and wakes followers.
    pub fn close(&self) {
        let slot = self.lock();
        self.closed.store(true, Ordering::Release);
        if let Some(ring) = slot.as_ref() {
            ring.notify.notify_waiters();
        }
    }

    /// Re-opens a closed buffer when the sandbox restarts; output continues after the old one.
    pub fn reopen(&self) {
        self.closed.store(false, Ordering::Release);
    }

    /// Reads everything retained at or after `offset`.
    pub fn read_from(&self, offset: u64) -> LogRead {
        let slot = self.lock();
        let closed = self.closed.load(Ordering::Acquire);
        let Some(ring) = slot.as_ref() else {
            return LogRead {
                closed,
                ..LogRead::default()
            };
        };
        let oldest = ring.written - ring.bytes.len() as u64;
        let start = offset.max(oldest);
        let skip_in_ring = (start - oldest) as usize;
        let data: Vec<u8> = ring.bytes.iter().skip(skip_in_ring).copied().collect();
        LogRead {
            data,
            skipped: start - offset.min(start),
            next_offset: ring.written,
            closed,
        }
    }

    /// Returns a handle that resolves when new output arrives or the buffer closes.
    ///
    /// Register with [`Notify::notified`] *before* reading to avoid missing a wake-up.
    pub fn notifier(&self) -> Arc<Notify> {
        let mut slot = self.lock();
        self.ring(&mut slot).notify.clone()
    }

    /// Bytes currently allocated for the ring (0 for a sandbox that printed nothing).
    pub fn allocated_bytes(&self) -> usize {
        self.lock().as_ref().map_or(0, |r| r.bytes.capacity())
    }
}

/// The stdout/stderr stream handed to WASI; writes land in a [`LogBuffer`].
#[derive(Clone, Debug)]
pub(crate) struct LogSink(pub Arc<LogBuffer>);

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for LogSink {
    async fn ready(&mut self) {}
}

impl OutputStream for LogSink {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.0.write(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // The ring never blocks a writer: old output is dropped instead.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LogSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_buffer_allocates_nothing() {
        let buf = LogBuffer::new(64);
        assert_eq!(buf.allocated_bytes(), 0);
        assert_eq!(buf.read_from(0), LogRead::default());
    }

    #[test]
    fn keeps_newest_bytes_and_reports_skipped() {
        let buf = LogBuffer::new(8);
        buf.write(b"hello ");
        buf.write(b"world!");
        let read = buf.read_from(0);
        assert_eq!(read.data, b"o world!");
        assert_eq!(read.skipped, 4);
        assert_eq!(read.next_offset, 12);
        let again = buf.read_from(read.next_offset);
        assert!(again.data.is_empty());
        assert_eq!(again.skipped, 0);
    }

    #[test]
    fn write_larger_than_limit_keeps_its_tail() {
        let buf = LogBuffer::new(4);
        buf.write(b"abcdefgh");
        let read = buf.read_from(0);
        assert_eq!(read.data, b"efgh");
        assert_eq!(read.skipped, 4);
    }

    #[test]
    fn close_is_seen_by_readers() {
        let buf = LogBuffer::new(4);
        buf.close();
        assert!(buf.read_from(0).closed);
        buf.reopen();
        buf.write(b"x");
        assert!(!buf.read_from(0).closed);
    }
}
