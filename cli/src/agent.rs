//! Commands against one node agent's admin API.

use std::io::Write;

use flotilla_proto::agent::v1::agent_admin_client::AgentAdminClient;
use flotilla_proto::agent::v1::{
    GetCapacityRequest, ListSandboxesRequest, LogsRequest, SandboxPhase, SandboxStatus,
    StopWorkloadRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::{Output, endpoint};

async fn connect(agent: &str) -> anyhow::Result<AgentAdminClient<Channel>> {
    let endpoint = endpoint(agent);
    AgentAdminClient::connect(endpoint.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the agent at {endpoint}: {e}"))
}

/// `flotilla get sandboxes [WORKLOAD]`.
pub async fn get(agent: &str, workload: Option<String>, output: Output) -> anyhow::Result<()> {
    let sandboxes = connect(agent)
        .await?
        .list_sandboxes(ListSandboxesRequest {
            workload: workload.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .sandboxes;
    print_sandboxes(&sandboxes, output);
    Ok(())
}

/// `flotilla delete sandboxes WORKLOAD`.
pub async fn delete(agent: &str, workload: &str, grace_period: u64) -> anyhow::Result<()> {
    let stopped = connect(agent)
        .await?
        .stop_workload(StopWorkloadRequest {
            name: workload.to_string(),
            grace_period_ms: grace_period.saturating_mul(1000),
        })
        .await?
        .into_inner()
        .stopped;
    println!("workload {workload} stopped on the agent ({stopped} sandboxes)");
    Ok(())
}

/// `flotilla logs WORKLOAD`.
pub async fn logs(agent: &str, workload: String, replica: u32, follow: bool) -> anyhow::Result<()> {
    let mut stream = connect(agent)
        .await?
        .logs(LogsRequest {
            workload,
            replica,
            follow,
        })
        .await?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
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

/// `flotilla capacity`.
pub async fn capacity(agent: &str) -> anyhow::Result<()> {
    let c = connect(agent)
        .await?
        .get_capacity(GetCapacityRequest {})
        .await?
        .into_inner();
    println!("arch:        {}", c.arch);
    println!("sandboxes:   {} / {}", c.sandboxes, c.max_sandboxes);
    println!(
        "memory:      {} / {} bytes requested",
        c.memory_reserved_bytes, c.memory_bytes
    );
    println!("limited by:  {}", c.limited_by);
    Ok(())
}

/// The name of a sandbox phase.
pub fn phase_name(phase: i32) -> &'static str {
    match SandboxPhase::try_from(phase) {
        Ok(SandboxPhase::Pending) => "Pending",
        Ok(SandboxPhase::Running) => "Running",
        Ok(SandboxPhase::Succeeded) => "Succeeded",
        Ok(SandboxPhase::Failed) => "Failed",
        _ => "Unknown",
    }
}

fn print_sandboxes(sandboxes: &[SandboxStatus], output: Output) {
    let mut sorted: Vec<&SandboxStatus> = sandboxes.iter().collect();
    sorted.sort_by(|a, b| (&a.workload, a.replica).cmp(&(&b.workload, b.replica)));
    let wide = output == Output::Wide;
    print!(
        "{:<40} {:<10} {:<18} {:>8}",
        "SANDBOX", "PHASE", "REASON", "RESTARTS"
    );
    println!("{}", if wide { "  LAST TERMINATION" } else { "" });
    for s in sorted {
        let reason = if s.reason.is_empty() { "-" } else { &s.reason };
        print!(
            "{:<40} {:<10} {:<18} {:>8}",
            s.sandbox_id,
            phase_name(s.phase),
            reason,
            s.restart_count
        );
        if let (true, Some(t)) = (wide, &s.last_termination) {
            let first_line = t.message.lines().next().unwrap_or("");
            print!("  {}: {first_line}", t.reason);
        }
        println!();
    }
}
