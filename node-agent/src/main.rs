//! `flotilla-node-agent`: parse configuration, start the agent, run until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use flotilla_node_agent::agent::Agent;
use flotilla_node_agent::config::{Args, Config};

// glibc grows a worker thread's arena one page per `mprotect`, under the process-wide mmap lock;
// with tens of thousands of sandbox stores allocated from tokio workers that halves start rates.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// BSD's EX_USAGE: the configuration is invalid.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    if let (Some((uid, gid)), Some(dir)) = (args.prepare_state_dir_for, &args.state_dir) {
        return match flotilla_node_agent::control::identity::prepare_state_dir(dir, uid, gid) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!(
                    "flotilla-node-agent: --state-dir {}: {error}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    flotilla_telemetry::init("flotilla_node_agent");
    let precompile = (!args.precompile.is_empty()).then(|| {
        let target = args
            .precompile_for
            .clone()
            .unwrap_or_else(flotilla_node_agent::runtime::host_target);
        (target, args.precompile.clone())
    });
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("flotilla-node-agent: {error}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Some((target, modules)) = precompile {
        return match flotilla_node_agent::precompile::precompile(&config.runtime, &target, &modules)
        {
            Ok(written) => {
                for path in written {
                    println!("{}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("flotilla-node-agent: --precompile: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flotilla-node-agent: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flotilla-node-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Installed first: a signal during startup must still stop every sandbox cleanly.
    let shutdown = flotilla_telemetry::shutdown_signal()?;
    let agent = Agent::start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    let report = agent.shutdown().await;
    tracing::info!(
        sandboxes = report.sandboxes,
        stopped = report.stopped,
        aborted = report.aborted,
        "all sandboxes accounted for"
    );
    Ok(())
}
