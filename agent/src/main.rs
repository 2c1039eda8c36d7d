//! `nodemesh`: the node agent and its command-line tools.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod agent;
mod config;
mod datapath;
mod k8s;
mod pods;
mod proxy;
mod state;
mod telemetry;

#[derive(Parser)]
#[command(
    name = "nodemesh",
    version,
    about = "Sidecarless service mesh node agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load the eBPF programs, enrol this node's meshed pods, run the proxy.
    Agent(config::AgentArgs),
    /// Inspect or remove the datapath that an agent left pinned in bpffs.
    Datapath {
        #[command(subcommand)]
        command: DatapathCommand,
    },
}

#[derive(Subcommand)]
enum DatapathCommand {
    /// Detach every nodemesh program and delete the pinned maps under a bpffs directory.
    Remove {
        /// The agent's bpffs directory (its --bpffs).
        #[arg(long)]
        bpffs: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    telemetry::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => config::AgentConfig::try_from(args)
            .map_err(anyhow::Error::from)
            .and_then(agent::run),
        Command::Datapath {
            command: DatapathCommand::Remove { bpffs },
        } => datapath::remove_pinned(&bpffs).map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
