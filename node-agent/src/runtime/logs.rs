//! Per-sandbox log ring buffers.
//!
//! A sandbox's stdout and stderr go into one bounded ring, in the order they were written. Beside
//! the bytes the ring keeps segments: where each run of one stream starts and when it was written,
//! so readers can tell the streams apart, filter by time and print timestamps, as CRI's log format
//! allows. Each segment counts [`SEGMENT_COST`] bytes against the limit, so a guest that
//! alternates one-byte writes cannot make the ring outgrow its limit in bookkeeping.
//!
//! The ring is allocated on the first byte written (or the first follower), so a sandbox that
//! prints nothing costs only the empty [`LogBuffer`]. When the ring is full the oldest bytes are
//! dropped; readers learn how many they missed. One reader at a time may instead hold the ring
//! ([`LogBuffer::hold`], for `flotilla run`): then the guest's writes wait for room rather than
//! drop what that reader has not read, so a slow reader slows its own sandbox and nothing else.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flotilla_proto::agent::v1::{LogOptions, LogStream};
use tokio::sync::Notify;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{OutputStream, StreamError};

/// Bytes of the limit that one segment (a run of one stream's output) costs.
pub const SEGMENT_COST: usize = 32;

/// Writes to one stream this close together share a segment, and so its timestamp.
const COALESCE_NANOS: i64 = 1_000_000;

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
    /// Runs of one stream, oldest first; each covers the bytes from its `start` to the next
    /// one's. The first may start before the oldest byte retained.
    segments: VecDeque<Segment>,
    /// Total bytes ever written; the offset just past the newest byte.
    written: u64,
    /// Wakes followers when output arrives or the sandbox ends.
    notify: Arc<Notify>,
    /// The offset up to which the holding reader has read; bytes from it on are not dropped.
    hold: Option<u64>,
    /// Wakes writers waiting for room when the holding reader reads on or lets go.
    room: Arc<Notify>,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    /// Offset of its first byte.
    start: u64,
    stream: LogStream,
    /// Unix time in nanoseconds of its first write.
    at: i64,
}

/// A run of one stream's output, as a reader gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPiece {
    /// The stream it was written to.
    pub stream: LogStream,
    /// Unix time in nanoseconds at which its first byte was written.
    pub at: i64,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// What a reader gets from [`LogBuffer::read_from`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogRead {
    /// Output from the requested offset (or the oldest retained byte) to the newest, one piece
    /// per run of one stream.
    pub pieces: Vec<LogPiece>,
    /// Bytes that were dropped between the requested offset and `pieces`.
    pub skipped: u64,
    /// Offset to pass to the next read.
    pub next_offset: u64,
    /// Whether the writer has closed the buffer (the sandbox ended for good).
    pub closed: bool,
}

/// Which output a reader wants, from a request's [`LogOptions`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LogFilter {
    /// One stream, or both.
    pub stream: Option<LogStream>,
    /// Output written at or after this Unix time in nanoseconds.
    pub since: i64,
    /// Only the last this many lines of the first read.
    pub tail_lines: Option<u64>,
    /// Hold the ring: the writer waits for this reader ([`LogBuffer::hold`]).
    pub wait_for_reader: bool,
}

/// The current Unix time in nanoseconds.
pub(crate) fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

// === impl LogBuffer ===

impl LogBuffer {
    /// Creates an empty buffer that retains at most `limit` bytes (segments included; at least
    /// two segments' worth).
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(2 * SEGMENT_COST),
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
                segments: VecDeque::new(),
                written: 0,
                notify: Arc::new(Notify::new()),
                hold: None,
                room: Arc::new(Notify::new()),
            })
        })
    }

    /// Appends output of `stream`, dropping the oldest bytes beyond the limit.
    pub fn write(&self, stream: LogStream, data: &[u8]) {
        self.write_at(stream, data, unix_nanos());
    }

    /// [`Self::write`] at Unix time `now` in nanoseconds.
    fn write_at(&self, stream: LogStream, data: &[u8], now: i64) {
        if data.is_empty() {
            return;
        }
        let mut slot = self.lock();
        let ring = self.ring(&mut slot);
        let keep = data.len().min(self.limit - SEGMENT_COST);
        let tail = &data[data.len() - keep..];
        // Room first (for a new segment too), so the ring never grows past its limit; what a
        // holding reader has not read stays (its writer asked for room first).
        ring.trim(self.limit - keep - SEGMENT_COST);
        let start = ring.written + (data.len() - keep) as u64;
        let joins = start == ring.written
            && ring.segments.back().is_some_and(|last| {
                last.stream == stream && now.saturating_sub(last.at) < COALESCE_NANOS
            });
        if !joins {
            ring.segments.push_back(Segment {
                start,
                stream,
                at: now,
            });
        }
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

    /// Whether the writer has closed the buffer.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
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
        let oldest = ring.oldest();
        let start = offset.max(oldest);
        let mut pieces = Vec::new();
        // The segment holding `start`, then every later one.
        let first = ring
            .segments
            .partition_point(|s| s.start <= start)
            .saturating_sub(1);
        for (i, segment) in ring.segments.iter().enumerate().skip(first) {
            let end = ring.segments.get(i + 1).map_or(ring.written, |s| s.start);
            let from = segment.start.max(start);
            if from >= end {
                continue;
            }
            let range = (from - oldest) as usize..(end - oldest) as usize;
            pieces.push(LogPiece {
                stream: segment.stream,
                at: segment.at,
                data: ring.bytes.range(range).copied().collect(),
            });
        }
        LogRead {
            pieces,
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

    /// Bytes a writer may append now without dropping what the holding reader has not read:
    /// unbounded without a holder.
    pub fn room(&self) -> usize {
        let slot = self.lock();
        let Some(ring) = slot.as_ref() else {
            return usize::MAX;
        };
        let Some(hold) = ring.hold else {
            return usize::MAX;
        };
        let unread_from = hold.max(ring.oldest());
        let unread = usize::try_from(ring.written - unread_from).unwrap_or(usize::MAX);
        // The segments holding unread bytes, and one more for the next write.
        let segments = ring
            .segments
            .iter()
            .rev()
            .take_while(|s| s.start > unread_from)
            .count()
            + 2;
        self.limit
            .saturating_sub(unread.saturating_add(segments * SEGMENT_COST))
    }

    /// Waits until [`Self::room`] is not zero.
    pub async fn wait_for_room(&self) {
        let room = {
            let mut slot = self.lock();
            self.ring(&mut slot).room.clone()
        };
        loop {
            let notified = room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.room() > 0 {
                return;
            }
            notified.await;
        }
    }

    /// Makes the reader at `offset` the ring's holder, unless another reader holds it.
    pub fn hold(self: &Arc<Self>, offset: u64) -> Option<LogHold> {
        let mut slot = self.lock();
        let ring = self.ring(&mut slot);
        if ring.hold.is_some() {
            return None;
        }
        ring.hold = Some(offset);
        Some(LogHold(self.clone()))
    }

    /// Moves or ends the hold, and wakes writers waiting for room.
    fn set_hold(&self, hold: Option<u64>) {
        let mut slot = self.lock();
        let ring = self.ring(&mut slot);
        ring.hold = hold;
        ring.room.notify_waiters();
    }

    /// Bytes currently allocated for the ring (0 for a sandbox that printed nothing).
    pub fn allocated_bytes(&self) -> usize {
        self.lock().as_ref().map_or(0, |r| {
            r.bytes.capacity() + r.segments.capacity() * std::mem::size_of::<Segment>()
        })
    }
}

// === impl Ring ===

impl Ring {
    /// Offset of the oldest byte retained.
    fn oldest(&self) -> u64 {
        self.written - self.bytes.len() as u64
    }

    /// Drops the oldest bytes, and the segments they leave empty, until bytes and segments fit
    /// in `limit`, but none that the holding reader has not read.
    fn trim(&mut self, limit: usize) {
        loop {
            let cost = self.bytes.len() + self.segments.len() * SEGMENT_COST;
            let Some(mut excess) = cost.checked_sub(limit).filter(|&e| e > 0) else {
                return;
            };
            let oldest = self.oldest();
            if let Some(hold) = self.hold {
                let droppable = usize::try_from(hold.saturating_sub(oldest)).unwrap_or(usize::MAX);
                if droppable == 0 {
                    return;
                }
                excess = excess.min(droppable);
            }
            let first_end = self.segments.get(1).map_or(self.written, |s| s.start);
            let in_first = usize::try_from(first_end.saturating_sub(oldest)).unwrap_or(usize::MAX);
            if in_first <= excess {
                self.bytes.drain(..in_first.min(self.bytes.len()));
                self.segments.pop_front();
            } else {
                self.bytes.drain(..excess);
            }
        }
    }
}

/// A reader's hold on a [`LogBuffer`] (see [`LogBuffer::hold`]); dropping it lets go.
#[derive(Debug)]
pub struct LogHold(Arc<LogBuffer>);

impl LogHold {
    /// The reader has read everything before `offset`.
    pub fn advance(&self, offset: u64) {
        self.0.set_hold(Some(offset));
    }
}

impl Drop for LogHold {
    fn drop(&mut self) {
        self.0.set_hold(None);
    }
}

// === impl LogRead ===

impl LogRead {
    /// Every piece's bytes, one after another.
    pub fn data(&self) -> Vec<u8> {
        self.pieces
            .iter()
            .flat_map(|p| p.data.iter().copied())
            .collect()
    }
}

// === impl LogFilter ===

impl LogFilter {
    /// The filter a request's options ask for, `now` being the agent's Unix time in nanoseconds.
    pub(crate) fn from_options(options: Option<&LogOptions>, now: i64) -> Self {
        let Some(options) = options else {
            return Self::default();
        };
        let stream = match options.stream() {
            LogStream::Unspecified => None,
            stream => Some(stream),
        };
        let since = if options.since_ms == 0 {
            0
        } else {
            let back = Duration::from_millis(options.since_ms).as_nanos();
            now.saturating_sub(i64::try_from(back).unwrap_or(i64::MAX))
        };
        Self {
            stream,
            since,
            tail_lines: options.tail_lines,
            wait_for_reader: options.wait_for_reader,
        }
    }

    /// Keeps the pieces of the wanted stream written since `since`.
    pub(crate) fn retain(&self, pieces: &mut Vec<LogPiece>) {
        pieces.retain(|p| self.stream.is_none_or(|s| s == p.stream) && p.at >= self.since);
    }

    /// Keeps the pieces of a first read that the filter wants: [`Self::retain`], then the last
    /// `tail_lines` lines (a last line without its newline counts as one).
    pub(crate) fn first_read(&self, pieces: &mut Vec<LogPiece>) {
        self.retain(pieces);
        let Some(lines) = self.tail_lines else {
            return;
        };
        if lines == 0 {
            pieces.clear();
            return;
        }
        // Walk back from the end: the `lines`-th newline before the last byte ends the line
        // before the ones kept (a newline that is the last byte ends the last line).
        let mut skip = pieces.last().and_then(|p| p.data.last()) == Some(&b'\n');
        let mut found = 0u64;
        let mut cut = None;
        'pieces: for (i, piece) in pieces.iter().enumerate().rev() {
            for (j, byte) in piece.data.iter().enumerate().rev() {
                if std::mem::take(&mut skip) {
                    continue;
                }
                if *byte == b'\n' {
                    found += 1;
                    if found == lines {
                        cut = Some((i, j + 1));
                        break 'pieces;
                    }
                }
            }
        }
        if let Some((i, j)) = cut {
            pieces.drain(..i);
            pieces[0].data.drain(..j);
            if pieces[0].data.is_empty() {
                pieces.remove(0);
            }
        }
    }
}

/// The stdout or stderr stream handed to WASI; writes land in a [`LogBuffer`] as that stream.
#[derive(Clone, Debug)]
pub(crate) struct LogSink(pub Arc<LogBuffer>, pub LogStream);

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(AsyncLogSink {
            buffer: self.0.clone(),
            stream: self.1,
            waiting: None,
        })
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for LogSink {
    async fn ready(&mut self) {
        self.0.wait_for_room().await;
    }
}

impl OutputStream for LogSink {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.0.write(self.1, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Without a holding reader the ring never blocks a writer: old output is dropped
        // instead. With one, the guest waits in `ready` for room.
        Ok(self.0.room().min(64 * 1024))
    }
}

/// [`LogSink`] as an [`AsyncWrite`](tokio::io::AsyncWrite), which waits for room as `ready`
/// does.
struct AsyncLogSink {
    buffer: Arc<LogBuffer>,
    stream: LogStream,
    /// Set while a write waits for a holding reader to make room.
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl tokio::io::AsyncWrite for AsyncLogSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let room = self.buffer.room();
            if room > 0 {
                self.waiting = None;
                let n = room.min(buf.len());
                self.buffer.write(self.stream, &buf[..n]);
                return Poll::Ready(Ok(n));
            }
            let buffer = self.buffer.clone();
            let waiting = self
                .waiting
                .get_or_insert_with(|| Box::pin(async move { buffer.wait_for_room().await }));
            if waiting.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.waiting = None;
        }
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

    const OUT: LogStream = LogStream::Stdout;
    const ERR: LogStream = LogStream::Stderr;

    #[test]
    fn empty_buffer_allocates_nothing() {
        let buf = LogBuffer::new(64);
        assert_eq!(buf.allocated_bytes(), 0);
        assert_eq!(buf.read_from(0), LogRead::default());
    }

    #[test]
    fn keeps_newest_bytes_and_reports_skipped() {
        // Room for one segment of 32 bytes.
        let buf = LogBuffer::new(2 * SEGMENT_COST);
        buf.write_at(OUT, &[b'a'; 20], 1);
        buf.write_at(OUT, &[b'b'; 20], 2);
        let read = buf.read_from(0);
        // Room for the next segment is kept free: 32 bytes minus what a new one would cost.
        assert_eq!(read.data(), [b'b'; 20]);
        assert_eq!(read.skipped, 20);
        assert_eq!(read.next_offset, 40);
        let again = buf.read_from(read.next_offset);
        assert!(again.pieces.is_empty());
        assert_eq!(again.skipped, 0);
        // Later writes of the same stream within a millisecond share the segment.
        let buf = LogBuffer::new(4 * SEGMENT_COST);
        buf.write_at(OUT, b"hello ", 1);
        buf.write_at(OUT, b"world", 2);
        buf.write_at(OUT, b"!", 2 + COALESCE_NANOS);
        let pieces = buf.read_from(0).pieces;
        assert_eq!(pieces.len(), 2);
        assert_eq!(
            (pieces[0].at, pieces[0].data.as_slice()),
            (1, &b"hello world"[..])
        );
        assert_eq!(pieces[1].at, 2 + COALESCE_NANOS);
    }

    #[test]
    fn write_larger_than_limit_keeps_its_tail() {
        let buf = LogBuffer::new(2 * SEGMENT_COST);
        let data: Vec<u8> = (0..200u8).collect();
        buf.write(OUT, &data);
        let read = buf.read_from(0);
        assert_eq!(read.data(), &data[200 - SEGMENT_COST..]);
        assert_eq!(read.skipped, 200 - SEGMENT_COST as u64);
    }

    #[test]
    fn streams_stay_apart_in_the_order_written() {
        let buf = LogBuffer::new(4096);
        buf.write(OUT, b"out 1\n");
        buf.write(ERR, b"err 1\n");
        buf.write(OUT, b"out 2\n");
        buf.write(OUT, b"out 3\n");
        let pieces = buf.read_from(0).pieces;
        let seen: Vec<(LogStream, &[u8])> = pieces
            .iter()
            .map(|p| (p.stream, p.data.as_slice()))
            .collect();
        assert_eq!(
            seen,
            [
                (OUT, &b"out 1\n"[..]),
                (ERR, b"err 1\n"),
                (OUT, b"out 2\nout 3\n"),
            ]
        );
        assert!(pieces.windows(2).all(|w| w[0].at <= w[1].at));
        // A read from the middle of a segment starts there, with that segment's stream.
        let read = buf.read_from(10);
        assert_eq!(read.pieces[0].stream, ERR);
        assert_eq!(read.pieces[0].data, b"1\n");
    }

    #[test]
    fn alternating_one_byte_writes_stay_within_the_limit() {
        let limit = 4096;
        let buf = LogBuffer::new(limit);
        for i in 0..100_000u32 {
            let stream = if i % 2 == 0 { OUT } else { ERR };
            buf.write(stream, b"x");
        }
        let read = buf.read_from(0);
        let retained = read.data().len() + read.pieces.len() * SEGMENT_COST;
        assert!(retained <= limit, "{retained} bytes retained");
        assert!(
            retained > limit - 2 * SEGMENT_COST,
            "{retained} bytes retained"
        );
        assert_eq!(read.skipped + read.data().len() as u64, 100_000);
        // The ring's allocation follows what it retains, not what was written.
        assert!(
            buf.allocated_bytes() < 4 * limit,
            "{}",
            buf.allocated_bytes()
        );
    }

    #[test]
    fn filters_pick_a_stream_a_time_and_the_last_lines() {
        let buf = LogBuffer::new(4096);
        buf.write(OUT, b"a\nb\n");
        buf.write(ERR, b"E\n");
        buf.write(OUT, b"c\nd");
        let text = |filter: LogFilter| {
            let mut pieces = buf.read_from(0).pieces;
            filter.first_read(&mut pieces);
            String::from_utf8(pieces.iter().flat_map(|p| p.data.clone()).collect()).expect("utf-8")
        };
        let tail = |n| LogFilter {
            tail_lines: Some(n),
            ..LogFilter::default()
        };
        assert_eq!(text(LogFilter::default()), "a\nb\nE\nc\nd");
        assert_eq!(text(tail(0)), "");
        assert_eq!(text(tail(1)), "d");
        assert_eq!(text(tail(2)), "c\nd");
        assert_eq!(text(tail(3)), "E\nc\nd");
        assert_eq!(text(tail(10)), "a\nb\nE\nc\nd");
        let stdout = LogFilter {
            stream: Some(OUT),
            ..LogFilter::default()
        };
        assert_eq!(text(stdout), "a\nb\nc\nd");
        assert_eq!(
            text(LogFilter {
                tail_lines: Some(3),
                ..stdout
            }),
            "b\nc\nd"
        );
        assert_eq!(
            text(LogFilter {
                stream: Some(ERR),
                tail_lines: Some(1),
                ..LogFilter::default()
            }),
            "E\n"
        );
        // Nothing was written in the future.
        assert_eq!(
            text(LogFilter {
                since: unix_nanos() + 1_000_000_000,
                ..LogFilter::default()
            }),
            ""
        );
        let options = LogOptions {
            stream: LogStream::Stderr as i32,
            since_ms: 60_000,
            tail_lines: Some(5),
            wait_for_reader: false,
        };
        let filter = LogFilter::from_options(Some(&options), 100_000_000_000);
        assert_eq!(filter.stream, Some(ERR));
        assert_eq!(filter.since, 40_000_000_000);
        assert_eq!(filter.tail_lines, Some(5));
        assert_eq!(
            text(LogFilter::from_options(Some(&options), unix_nanos())),
            "E\n"
        );
    }

    #[tokio::test]
    async fn a_holding_reader_makes_writers_wait_instead_of_dropping() {
        let limit = 4 * SEGMENT_COST + 64;
        let buf = Arc::new(LogBuffer::new(limit));
        assert_eq!(buf.room(), usize::MAX, "no holder: never waits");
        let hold = buf.hold(0).expect("the first holder");
        assert!(buf.hold(0).is_none(), "one holder at a time");
        let mut sink = LogSink(buf.clone(), OUT);
        let mut written = 0u64;
        // Write as the guest does: only what check_write allows.
        while let n @ 1.. = sink.check_write().expect("check") {
            let chunk = vec![b'x'; n.min(10)];
            OutputStream::write(&mut sink, Bytes::from(chunk.clone())).expect("write");
            written += chunk.len() as u64;
        }
        let read = buf.read_from(0);
        assert_eq!(
            read.skipped, 0,
            "nothing the holder has not read was dropped"
        );
        assert_eq!(read.data().len() as u64, written);
        // A writer waits until the holder reads on.
        let waiting = tokio::spawn({
            let mut sink = sink.clone();
            async move { sink.ready().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "no room: the writer waits");
        hold.advance(read.next_offset);
        waiting
            .await
            .expect("the writer goes on once the holder has read");
        assert!(buf.room() > 0);
        // Once the holder lets go, old output is dropped again rather than waited for.
        drop(hold);
        assert_eq!(buf.room(), usize::MAX);
        buf.write(OUT, &[b'y'; 1000]);
        assert!(buf.read_from(0).skipped > 0);
    }

    #[test]
    fn close_is_seen_by_readers() {
        let buf = LogBuffer::new(4);
        buf.close();
        assert!(buf.read_from(0).closed);
        buf.reopen();
        buf.write(OUT, b"x");
        assert!(!buf.read_from(0).closed);
    }
}
