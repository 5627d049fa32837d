//! `flotilla`: a kubectl-like client. For now it drives one node agent's admin API; control-plane
//! commands (`apply`, `get workloads`, `dev`) arrive with the control plane.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use flotilla_proto::agent::v1::agent_admin_client::AgentAdminClient;
use flotilla_proto::agent::v1::{
    GetCapacityRequest, ListSandboxesRequest, LogsRequest, SandboxPhase, SandboxStatus,
    StopWorkloadRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Drive Flotilla node agents")]
struct Cli {
    /// Admin API of the node agent.
    #[arg(
        long,
        env = "FLOTILLA_AGENT",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    agent: String,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Lists sandboxes, optionally of one workload.
    Get {
        /// Only this workload's sandboxes.
        workload: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Prints a sandbox's stdout and stderr.
    Logs {
        /// The workload.
        workload: String,
        /// The replica.
        #[arg(long, default_value_t = 0)]
        replica: u32,
        /// Keep streaming new output.
        #[arg(short, long)]
        follow: bool,
    },
    /// Stops and removes a workload's sandboxes.
    Delete {
        /// The workload.
        workload: String,
        /// Seconds the sandboxes get to end.
        #[arg(long, default_value_t = 5)]
        grace_period: u64,
    },
    /// Shows what the agent can hold and holds.
    Capacity,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Wide,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = connect(&cli.agent).await?;
    match cli.command {
        Commands::Get { workload, output } => {
            let sandboxes = client
                .list_sandboxes(ListSandboxesRequest {
                    workload: workload.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .sandboxes;
            print_sandboxes(&sandboxes, output);
        }
        Commands::Logs {
            workload,
            replica,
            follow,
        } => {
            let mut stream = client
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
        }
        Commands::Delete {
            workload,
            grace_period,
        } => {
            let stopped = client
                .stop_workload(StopWorkloadRequest {
                    name: workload.clone(),
                    grace_period_ms: grace_period.saturating_mul(1000),
                })
                .await?
                .into_inner()
                .stopped;
            println!("workload {workload} deleted ({stopped} sandboxes stopped)");
        }
        Commands::Capacity => {
            let c = client
                .get_capacity(GetCapacityRequest {})
                .await?
                .into_inner();
            println!("arch:           {}", c.arch);
            println!("sandboxes:      {} / {}", c.sandboxes, c.max_sandboxes);
            println!(
                "memory:         {} / {} bytes requested",
                c.memory_reserved_bytes, c.memory_bytes
            );
            println!("limited by:     {}", c.limited_by);
        }
    }
    Ok(())
}

async fn connect(agent: &str) -> anyhow::Result<AgentAdminClient<Channel>> {
    let endpoint = if agent.contains("://") {
        agent.to_string()
    } else {
        format!("http://{agent}")
    };
    AgentAdminClient::connect(endpoint.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the agent at {endpoint}: {e}"))
}

fn phase_name(phase: i32) -> &'static str {
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
    match output {
        Output::Table => println!(
            "{:<40} {:<10} {:<18} {:>8}",
            "SANDBOX", "PHASE", "REASON", "RESTARTS"
        ),
        Output::Wide => println!(
            "{:<40} {:<10} {:<18} {:>8}  LAST TERMINATION",
            "SANDBOX", "PHASE", "REASON", "RESTARTS"
        ),
    }
    for s in sorted {
        let reason = if s.reason.is_empty() { "-" } else { &s.reason };
        print!(
            "{:<40} {:<10} {:<18} {:>8}",
            s.sandbox_id,
            phase_name(s.phase),
            reason,
            s.restart_count
        );
        if let (Output::Wide, Some(t)) = (output, &s.last_termination) {
            let first_line = t.message.lines().next().unwrap_or("");
            print!("  {}: {first_line}", t.reason);
        }
        println!();
    }
}
