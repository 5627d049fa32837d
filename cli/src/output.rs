//! Output shared by the commands: kubectl-style JSON/YAML, and log streams.

use std::io::Write;

use std::time::{Duration, UNIX_EPOCH};

use flotilla_proto::agent::v1::{LogChunk, LogOptions, LogStream, Termination};
use futures::{Stream, StreamExt};
use serde::Serialize;

use crate::Output;

/// Prints `items` as JSON or YAML, as kubectl does: one object asked for by name as itself,
/// anything else as a `List`.
pub fn print_structured<T: Serialize>(
    items: &[T],
    named: bool,
    output: Output,
) -> anyhow::Result<()> {
    let value = match (named, items) {
        (true, [one]) => serde_json::to_value(one)?,
        _ => serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}),
    };
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", serde_yaml::to_string(&value)?);
    }
    Ok(())
}

/// `logs` options that pick output and print it, as kubectl's.
#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// Only this stream of the guest's (default: both, in the order written).
    #[arg(long, value_enum)]
    stream: Option<StreamArg>,
    /// Only the last this many lines; -1 for all.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    tail: i64,
    /// Only output newer than this, e.g. `30s` or `5m`.
    #[arg(long)]
    since: Option<humantime::Duration>,
    /// Start each line with the time it was written (RFC 3339, nanoseconds).
    #[arg(long)]
    timestamps: bool,
}

/// A guest stream to show.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum StreamArg {
    Stdout,
    Stderr,
}

impl LogArgs {
    /// The request's options and the view.
    pub fn split(&self) -> anyhow::Result<(LogOptions, LogView)> {
        let since_ms = self.since.map_or(0, |d| {
            u64::try_from(Duration::from(d).as_millis())
                .unwrap_or(u64::MAX)
                .max(1)
        });
        let tail_lines = match self.tail {
            -1 => None,
            n => Some(u64::try_from(n).map_err(|_| {
                anyhow::anyhow!("--tail {n}: must be -1 (every line) or a count of lines")
            })?),
        };
        let stream = match self.stream {
            None => LogStream::Unspecified,
            Some(StreamArg::Stdout) => LogStream::Stdout,
            Some(StreamArg::Stderr) => LogStream::Stderr,
        };
        let options = LogOptions {
            stream: stream as i32,
            since_ms,
            tail_lines,
            wait_for_reader: false,
        };
        let view = LogView {
            timestamps: self.timestamps,
            split: false,
        };
        Ok((options, view))
    }
}

/// How a log stream is printed.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogView {
    /// Start each line with the time it was written (RFC 3339 with nanoseconds), as
    /// `kubectl logs --timestamps`.
    pub timestamps: bool,
    /// The guest's stderr to ours and its stdout to our stdout, as `docker run` does; otherwise
    /// both to our stdout in the order written, as `kubectl logs` does.
    pub split: bool,
}

/// One of our output streams, and whether the next byte starts a line.
struct Sink<W> {
    out: W,
    line_start: bool,
}

impl<W: Write> Sink<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            line_start: true,
        }
    }

    /// Writes `data` byte for byte, with `stamp` before each line that starts in it.
    fn write(&mut self, data: &[u8], stamp: Option<&str>) -> std::io::Result<()> {
        match stamp {
            None => self.out.write_all(data)?,
            Some(stamp) => {
                for line in data.split_inclusive(|b| *b == b'\n') {
                    if self.line_start {
                        self.out.write_all(stamp.as_bytes())?;
                        self.out.write_all(b" ")?;
                    }
                    self.out.write_all(line)?;
                    self.line_start = line.ends_with(b"\n");
                }
            }
        }
        if let Some(last) = data.last() {
            self.line_start = *last == b'\n';
        }
        self.out.flush()
    }
}

/// Copies a sandbox's log stream to our output as `view` says, noting on stderr the bytes the
/// ring buffer dropped. Returns how the sandbox ended when the stream says so (it reached the
/// end of a sandbox that has ended for good).
pub async fn copy_logs(
    stream: impl Stream<Item = Result<LogChunk, tonic::Status>>,
    view: LogView,
) -> anyhow::Result<Option<Termination>> {
    futures::pin_mut!(stream);
    let mut stdout = Sink::new(std::io::stdout());
    let mut stderr = Sink::new(std::io::stderr());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        if chunk.skipped > 0 {
            eprintln!("[{} bytes dropped from the log ring]", chunk.skipped);
        }
        if let Some(ended) = chunk.ended {
            return Ok(Some(ended));
        }
        let stamp = view.timestamps.then(|| timestamp(chunk.time_unix_nanos));
        if view.split && chunk.stream() == LogStream::Stderr {
            stderr.write(&chunk.data, stamp.as_deref())?;
        } else {
            stdout.write(&chunk.data, stamp.as_deref())?;
        }
    }
    Ok(None)
}

/// A Unix time in nanoseconds as RFC 3339 in UTC with nanoseconds, as kubectl prints them.
fn timestamp(unix_nanos: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_nanos(u64::try_from(unix_nanos).unwrap_or(0));
    humantime::format_rfc3339_nanos(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_start_lines_and_bytes_pass_unchanged() {
        let mut sink = Sink::new(Vec::new());
        sink.write(b"one\ntw", Some("T1")).expect("write");
        sink.write(b"o\n\xff\xfe\n", Some("T2")).expect("write");
        sink.write(b"", Some("T3")).expect("write");
        sink.write(b"end", Some("T4")).expect("write");
        assert_eq!(sink.out, b"T1 one\nT1 two\nT2 \xff\xfe\nT4 end");
        let mut plain = Sink::new(Vec::new());
        plain.write(b"a\xffb", None).expect("write");
        assert_eq!(plain.out, b"a\xffb");
        assert_eq!(
            timestamp(1_500_000_000_123_456_789),
            "2017-07-14T02:40:00.123456789Z"
        );
    }
}
