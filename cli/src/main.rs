//! `flotilla`: a kubectl-like client for the control plane (`apply`, `get workloads`,
//! `delete workload`) and for one node agent (`get sandboxes`, `logs`, `capacity`).

mod agent;
mod control;
mod dev;

// The all-in-one mode hosts sandboxes; see the node agent's main.rs for why not glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Drive Flotilla")]
struct Cli {
    /// The control plane's API.
    #[arg(
        long,
        env = "FLOTILLA_SERVER",
        default_value = "http://127.0.0.1:7080",
        global = true
    )]
    server: String,
    /// A node agent's admin API (for sandbox-level commands).
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
    /// Creates or updates workloads from manifests; local module paths are pushed first.
    Apply {
        /// A manifest file, a directory of them, or `-` for standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Lists workloads (control plane) or sandboxes (agent).
    Get {
        /// `workloads` or `sandboxes`.
        resource: Resource,
        /// One workload's name.
        name: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Deletes a workload (control plane) or stops its sandboxes on the agent.
    Delete {
        /// `workload` or `sandboxes`.
        resource: Resource,
        /// The workload's name.
        name: String,
        /// Seconds sandboxes get to end (agent).
        #[arg(long, default_value_t = 5)]
        grace_period: u64,
    },
    /// Prints a sandbox's stdout and stderr (agent).
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
    /// Shows what the agent can hold and holds.
    Capacity,
    /// Runs a control plane, its embedded store and one node agent in this process, applies
    /// the examples and shows them running.
    Dev(dev::DevArgs),
}

/// What a command acts on.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Resource {
    /// WasmWorkload objects in the control plane.
    #[value(alias = "workload", alias = "wasmworkloads", alias = "ww")]
    Workloads,
    /// Sandboxes on one node agent.
    #[value(alias = "sandbox")]
    Sandboxes,
}

/// Output formats, as kubectl's `-o`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Wide,
    Yaml,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    flotilla_telemetry::init("flotilla");
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Apply { files } => control::apply(&cli.server, &files).await.map(drop),
        Commands::Get {
            resource: Resource::Workloads,
            name,
            output,
        } => control::get(&cli.server, name.as_deref(), output).await,
        Commands::Get {
            resource: Resource::Sandboxes,
            name,
            output,
        } => agent::get(&cli.agent, name, output).await,
        Commands::Delete {
            resource: Resource::Workloads,
            name,
            ..
        } => control::delete(&cli.server, &name).await,
        Commands::Delete {
            resource: Resource::Sandboxes,
            name,
            grace_period,
        } => agent::delete(&cli.agent, &name, grace_period).await,
        Commands::Logs {
            workload,
            replica,
            follow,
        } => agent::logs(&cli.agent, workload, replica, follow).await,
        Commands::Capacity => agent::capacity(&cli.agent).await,
        Commands::Dev(args) => dev::run(args).await,
    }
}

/// Adds `http://` when an address has no scheme.
fn endpoint(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}
