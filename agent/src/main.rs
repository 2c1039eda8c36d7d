//! `nodemesh`: the node agent and its command-line tools.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use nodemesh::{agent, ca, cli, config, datapath, telemetry};

/// The feature `jemalloc` (on by default) says why.
#[cfg(all(feature = "jemalloc", not(feature = "count-allocations")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The bench's build: the same allocator, counted (telemetry/allocations.rs).
#[cfg(all(feature = "jemalloc", feature = "count-allocations"))]
#[global_allocator]
static ALLOCATOR: nodemesh::telemetry::allocations::Counting<tikv_jemallocator::Jemalloc> =
    nodemesh::telemetry::allocations::Counting(tikv_jemallocator::Jemalloc);

#[cfg(all(not(feature = "jemalloc"), feature = "count-allocations"))]
#[global_allocator]
static ALLOCATOR: nodemesh::telemetry::allocations::Counting<std::alloc::System> =
    nodemesh::telemetry::allocations::Counting(std::alloc::System);

#[derive(Parser)]
#[command(
    name = "nodemesh",
    version = concat!(env!("CARGO_PKG_VERSION"), " (revision ", env!("NODEMESH_REVISION"), ")"),
    about = "Sidecarless service mesh node agent"
)]
struct Cli {
    /// Logs on stderr as `json` lines or `text`; default json unless stderr is a terminal.
    /// Access logs go to stdout as JSON lines either way.
    #[arg(long, global = true, value_enum, env = "NODEMESH_LOG_FORMAT")]
    log_format: Option<telemetry::logging::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the agent's flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load the eBPF programs, enrol this node's meshed pods, run the proxy.
    Agent(config::AgentArgs),
    /// The nodemesh certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Inspect or remove the datapath that an agent left pinned in bpffs.
    Datapath {
        #[command(subcommand)]
        command: DatapathCommand,
    },
    /// This node's enrolled pods, identities and their expiry, and the agent's health; from a
    /// laptop (a kubeconfig, no agent), every node's agent from its MeshNode, problems first.
    Status {
        #[command(flatten)]
        target: cli::Target,
        /// One node in detail, from its MeshNode (through the API server).
        #[arg(long)]
        node: Option<String>,
    },
    /// Live requests/s, success rate and p50/p99 per source → destination (q quits), on this
    /// node, or across the cluster through the API server or Prometheus.
    Top {
        #[command(flatten)]
        target: cli::Target,
        /// Read every agent's metrics from Prometheus's /federate at this http://host:port
        /// instead of through the API server's pod proxy.
        #[arg(long)]
        prometheus: Option<String>,
        /// The agents' metrics port (their --metrics-addr), reached through the pod proxy.
        #[arg(long, default_value_t = 15090)]
        metrics_port: u16,
        /// Seconds between refreshes (default 1; 15 with --prometheus).
        #[arg(long)]
        interval_seconds: Option<u64>,
    },
    /// Pre-flight through the API server: node kernels, the CRDs, the issuer Secret, the
    /// trust bundle, the CA, meshed namespaces. Says what to fix; fails if anything must be.
    Check {
        /// The kubeconfig to use (else KUBECONFIG, ~/.kube/config or in-cluster).
        #[arg(long)]
        kubeconfig: Option<std::path::PathBuf>,
        /// The namespace nodemesh is (to be) installed in.
        #[arg(long, default_value = cli::cluster::DEFAULT_NAMESPACE)]
        namespace: String,
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

// Parsed once at start-up, like `Command`.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum CaCommand {
    /// Create a root and an intermediate issuer (for evaluation and tests; in production the
    /// root key stays offline and only the issuer is put in a Secret).
    Init {
        /// Directory to write root-cert.pem, root-key.pem, issuer-cert.pem, issuer-key.pem
        /// and trust-bundle.pem to.
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Lifetime of the root and the issuer, in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Serve certificate signing requests from node agents over HTTPS.
    Serve(ca::server::CaServeArgs),
}

fn main() -> ExitCode {
    // Installed as `kubectl-nodemesh`, this binary is a kubectl plugin: `kubectl nodemesh
    // status` runs it so, and its commands then go through the API server.
    let plugin = std::env::args_os()
        .next()
        .and_then(|arg0| {
            std::path::Path::new(&arg0)
                .file_name()
                .map(|name| name.to_string_lossy().starts_with("kubectl-nodemesh"))
        })
        .unwrap_or(false);
    let cli = Cli::parse();
    telemetry::logging::init(telemetry::logging::LogFormat::or_default_for_stderr(
        cli.log_format,
    ));
    // Access log lines still waiting for their batch go out when main ends, or unwinds.
    let _flush = telemetry::access_output::FlushAtExit;
    let result = match cli.command {
        Command::Agent(args) => config::AgentConfig::try_from(args)
            .map_err(anyhow::Error::from)
            .and_then(agent::run),
        Command::Ca {
            command:
                CaCommand::Init {
                    dir,
                    trust_domain,
                    days,
                },
        } => ca::issuer::init_ca(
            &dir,
            &trust_domain,
            std::time::Duration::from_secs(days * 24 * 3600),
        )
        .map(|files| {
            println!(
                "wrote {}, {}, {}, {}, {}",
                files.root_cert.display(),
                files.root_key.display(),
                files.issuer_cert.display(),
                files.issuer_key.display(),
                files.trust_bundle.display()
            )
        })
        .map_err(anyhow::Error::from),
        Command::Ca {
            command: CaCommand::Serve(args),
        } => run_ca(&args),
        Command::Datapath {
            command: DatapathCommand::Remove { bpffs },
        } => datapath::remove_pinned(&bpffs).map_err(anyhow::Error::from),
        Command::Status { target, node } => cli::status(&target, node.as_deref(), plugin),
        Command::Top {
            target,
            prometheus,
            metrics_port,
            interval_seconds,
        } => cli::top(
            &target,
            prometheus.as_deref(),
            metrics_port,
            interval_seconds.map(std::time::Duration::from_secs),
            plugin,
        ),
        Command::Check {
            kubeconfig,
            namespace,
        } => cli::check(kubeconfig.as_deref(), &namespace),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_ca(args: &ca::server::CaServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        ca::server::start(args).await?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("CA stopping");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use k8s_openapi::api::core::v1::Container;

    use super::Cli;

    /// Every container of the chart's rendering (deploy/manifests/nodemesh.yaml).
    fn manifest_containers() -> Vec<Container> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/manifests/nodemesh.yaml"
        );
        let text = std::fs::read_to_string(path).expect("the rendered manifests");
        serde_yaml::Deserializer::from_str(&text)
            .map(|document| serde::Deserialize::deserialize(document).expect("YAML"))
            .filter_map(|value: serde_json::Value| {
                let spec = value.pointer("/spec/template/spec/containers")?.clone();
                Some(serde_json::from_value::<Vec<Container>>(spec).expect("containers"))
            })
            .flatten()
            .collect()
    }

    /// The DaemonSet's and the Deployment's args are this binary's command line, and every
    /// environment variable they set is one a flag reads (the node name comes that way) or
    /// one the args name as `$(VAR)`, which the kubelet expands before the binary starts.
    #[test]
    fn the_manifests_args_parse_with_this_cli() {
        let containers = manifest_containers();
        assert_eq!(containers.len(), 2, "the agent and the CA");
        let command = Cli::command();
        for container in containers {
            let mut args = container.args.clone().unwrap_or_default();
            let subcommand = command
                .find_subcommand(&args[0])
                .unwrap_or_else(|| panic!("{}: no subcommand {}", container.name, args[0]));
            let mut env_flags = Vec::new();
            for variable in container.env.iter().flatten() {
                // What the kubelet would put in the variable: an address where the args
                // make it one, a node name otherwise.
                let value = if variable.name.ends_with("_IP") {
                    "192.0.2.10"
                } else {
                    "node1"
                };
                let reference = format!("$({})", variable.name);
                if args.iter().any(|arg| arg.contains(&reference)) {
                    for arg in &mut args {
                        *arg = arg.replace(&reference, value);
                    }
                    continue;
                }
                let flag = subcommand
                    .get_arguments()
                    .find(|a| a.get_env().is_some_and(|e| e == variable.name.as_str()))
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: neither a flag nor the args read ${}",
                            container.name, variable.name
                        )
                    });
                env_flags.push(format!("--{}={value}", flag.get_long().unwrap_or_default()));
            }
            assert!(
                args.iter().all(|arg| !arg.contains("$(")),
                "{}: args name a variable the container does not set: {args:?}",
                container.name
            );
            let line = std::iter::once("nodemesh".to_owned())
                .chain(args)
                .chain(env_flags);
            if let Err(error) = Cli::try_parse_from(line) {
                panic!("{}'s args: {error}", container.name);
            }
        }
    }
}
