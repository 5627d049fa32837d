//! Commands against one node agent's admin API.

use flotilla_proto::agent::v1::agent_admin_client::AgentAdminClient;
use flotilla_proto::agent::v1::{
    GetCapacityRequest, ListSandboxesRequest, LogOptions, LogsRequest, SandboxPhase, SandboxStatus,
    StopWorkloadRequest,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::output::{LogView, copy_logs};
use crate::{BearerToken, Output, endpoint};

/// A client of the admin API that sends `--agent-token-file`'s token, when given.
type AdminClient = AgentAdminClient<InterceptedService<Channel, BearerToken>>;

async fn connect(agent: &str) -> anyhow::Result<AdminClient> {
    let file = crate::AGENT_TOKEN_FILE.get().and_then(Option::as_deref);
    let token = flotilla_proto::auth::load_token(None, file).map_err(|e| {
        anyhow::anyhow!(
            "--agent-token-file: {}",
            flotilla_telemetry::error_chain(&e)
        )
    })?;
    crate::channel(agent)
        .await
        .map(|channel| AgentAdminClient::with_interceptor(channel, BearerToken(token)))
        .map_err(|e| anyhow::anyhow!("cannot reach the agent at {}: {e}", endpoint(agent)))
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
    print_sandboxes(&sandboxes, output)
}

/// `flotilla describe sandbox SANDBOX`: one sandbox's identity, status, CPU used and last
/// termination, as `kubectl describe pod` shows a pod's.
pub async fn describe(agent: &str, sandbox_id: &str) -> anyhow::Result<()> {
    let sandboxes = connect(agent)
        .await?
        .list_sandboxes(ListSandboxesRequest::default())
        .await?
        .into_inner()
        .sandboxes;
    let Some(s) = sandboxes.iter().find(|s| s.sandbox_id == sandbox_id) else {
        anyhow::bail!(
            "no sandbox {sandbox_id} on the agent at {} (`flotilla get sandboxes` lists them)",
            endpoint(agent)
        );
    };
    println!("Name:           {}", s.sandbox_id);
    println!("Workload:       {}", s.workload);
    println!("Replica:        {}", s.replica);
    println!("Generation:     {}", s.generation);
    println!("Phase:          {}", phase_name(s.phase));
    if !s.reason.is_empty() {
        println!("Reason:         {}", s.reason);
    }
    if !s.message.is_empty() {
        println!("Message:        {}", s.message);
    }
    if s.started_at_ms != 0 {
        println!("Started:        {}", unix_ms_time(s.started_at_ms));
    }
    println!("Restarts:       {}", s.restart_count);
    println!("CPU used:       {}", cpu_time(s.cpu_used_ms));
    if let Some(t) = &s.last_termination {
        println!("Last termination:");
        println!("  Reason:       {}", t.reason);
        if let Some(code) = t.exit_code {
            println!("  Exit code:    {code}");
        }
        println!("  Finished:     {}", unix_ms_time(t.finished_at_ms));
        for (i, line) in t.message.lines().enumerate() {
            let label = if i == 0 { "  Message:" } else { "" };
            println!("{label:<16}{line}");
        }
    }
    Ok(())
}

/// Unix milliseconds as RFC 3339 in UTC, as `kubectl` prints times.
fn unix_ms_time(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
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

/// `flotilla logs --from-agent WORKLOAD`.
pub async fn logs(
    agent: &str,
    workload: String,
    replica: u32,
    follow: bool,
    options: LogOptions,
    view: LogView,
) -> anyhow::Result<()> {
    let stream = connect(agent)
        .await?
        .logs(LogsRequest {
            workload,
            replica,
            follow,
            options: Some(options),
        })
        .await?
        .into_inner();
    copy_logs(stream, view).await.map(drop)
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

/// CPU time as `kubectl top` would read it: `340ms`, `12.5s`, `3m20s`.
fn cpu_time(millis: u64) -> String {
    match millis {
        0..1_000 => format!("{millis}ms"),
        1_000..60_000 => format!("{:.1}s", millis as f64 / 1000.0),
        _ => format!("{}m{}s", millis / 60_000, millis % 60_000 / 1000),
    }
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

/// A sandbox as `-o json|yaml` prints it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SandboxView<'a> {
    sandbox_id: &'a str,
    workload: &'a str,
    replica: u32,
    generation: u64,
    phase: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
    restart_count: u32,
    /// CPU used over all its runs, in milliseconds.
    cpu_used_ms: u64,
    /// Unix milliseconds; absent when not running.
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_termination: Option<TerminationView<'a>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct TerminationView<'a> {
    reason: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    finished_at_ms: i64,
}

fn view(s: &SandboxStatus) -> SandboxView<'_> {
    SandboxView {
        sandbox_id: &s.sandbox_id,
        workload: &s.workload,
        replica: s.replica,
        generation: s.generation,
        phase: phase_name(s.phase),
        reason: &s.reason,
        message: &s.message,
        restart_count: s.restart_count,
        cpu_used_ms: s.cpu_used_ms,
        started_at_ms: (s.started_at_ms != 0).then_some(s.started_at_ms),
        last_termination: s.last_termination.as_ref().map(|t| TerminationView {
            reason: &t.reason,
            message: &t.message,
            exit_code: t.exit_code,
            finished_at_ms: t.finished_at_ms,
        }),
    }
}

fn print_sandboxes(sandboxes: &[SandboxStatus], output: Output) -> anyhow::Result<()> {
    let mut sorted: Vec<&SandboxStatus> = sandboxes.iter().collect();
    sorted.sort_by(|a, b| (&a.workload, a.replica).cmp(&(&b.workload, b.replica)));
    match output {
        Output::Json => {
            let items: Vec<SandboxView<'_>> = sorted.iter().map(|s| view(s)).collect();
            println!("{}", serde_json::to_string_pretty(&items)?);
            return Ok(());
        }
        Output::Yaml => {
            let items: Vec<SandboxView<'_>> = sorted.iter().map(|s| view(s)).collect();
            print!("{}", serde_yaml::to_string(&items)?);
            return Ok(());
        }
        Output::Table | Output::Wide => {}
    }
    let wide = output == Output::Wide;
    print!(
        "{:<40} {:<10} {:<18} {:>8}",
        "SANDBOX", "PHASE", "REASON", "RESTARTS"
    );
    println!(
        "{}",
        if wide {
            format!(" {:>10}  LAST TERMINATION", "CPU")
        } else {
            String::new()
        }
    );
    for s in sorted {
        let reason = if s.reason.is_empty() { "-" } else { &s.reason };
        print!(
            "{:<40} {:<10} {:<18} {:>8}",
            s.sandbox_id,
            phase_name(s.phase),
            reason,
            s.restart_count
        );
        if wide {
            print!(" {:>10}", cpu_time(s.cpu_used_ms));
        }
        if let (true, Some(t)) = (wide, &s.last_termination) {
            let first_line = t.message.lines().next().unwrap_or("");
            print!("  {}: {first_line}", t.reason);
        }
        println!();
    }
    Ok(())
}
