//! Output shared by the commands: kubectl-style JSON/YAML, and log streams.

use std::io::Write;

use flotilla_proto::agent::v1::LogChunk;
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

/// Copies a sandbox's log stream to standard output, noting bytes the ring buffer dropped.
pub async fn print_logs(
    stream: impl Stream<Item = Result<LogChunk, tonic::Status>>,
) -> anyhow::Result<()> {
    futures::pin_mut!(stream);
    let mut stdout = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        if chunk.skipped > 0 {
            writeln!(
                stdout,
                "[{} bytes dropped from the log ring]",
                chunk.skipped
            )?;
        }
        stdout.write_all(&chunk.data)?;
        stdout.flush()?;
    }
    Ok(())
}
