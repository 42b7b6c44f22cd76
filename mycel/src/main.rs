//! `mycel`: the operator's command line. It asks a running control plane (its
//! `--http-listen`), the nodes' metrics endpoints or Prometheus, and this host itself, whether
//! the mesh is healthy and why not.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mycel::{check, output::Output, policies, stat, status};

#[derive(Parser)]
#[command(
    name = "mycel",
    version,
    about = "Is the mesh healthy, and why not: checks, status, policies, explain and traffic",
    long_about = "Is the mesh healthy, and why not.\n\n\
        mycel reads mesh-cp's HTTP status endpoint (--cp: its --http-listen, on loopback by \
        default, so run mycel on the control plane's host or through a tunnel to it), the \
        nodes' metrics endpoints (--node: each mesh-node's --metrics-listen) or Prometheus \
        (--prometheus), and for `check --pre` this host itself. It changes nothing."
)]
struct Cli {
    /// mesh-cp's HTTP status address, host:port (its --http-listen); for replicas that serve
    /// one mesh from etcd, each of theirs, comma-separated (`status` and `check` then see every
    /// node on the replica it streams from; `policies` and `explain` ask the first).
    #[arg(
        long,
        global = true,
        env = "MYCEL_CP",
        default_value = "127.0.0.1:15014"
    )]
    cp: String,
    /// Tables and lines for people, or JSON for scripts.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the mesh (mesh-cp ready, config in force, every node connected and current,
    /// certificates far from expiry), or with --pre this host before mesh-node runs on it.
    /// Each finding says what to do; the exit status is 1 if any check fails.
    Check(check::Args),
    /// The nodes: streams, the config version each holds and when it acknowledged it, the
    /// workloads placed on each and when their certificates expire.
    Status,
    /// The AccessPolicies in force and the workloads each selects.
    Policies,
    /// Why a connection is allowed or denied, and what a Service port routes to: the same
    /// evaluation the nodes run, on the config in force.
    Explain(mesh_cp::explain::Question),
    /// Traffic per workload pair: connections/s, bytes/s, failures, and request latency on
    /// ports that declare HTTP; from the nodes' /metrics (two scrapes --interval apart) or
    /// from Prometheus.
    Stat(stat::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mycel: error: {}", mesh_daemon::exit::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let out = cli.output;
    match cli.command {
        Command::Check(args) => {
            let findings = check::run(&cli.cp, &args);
            out.print(findings.as_slice(), check::render)?;
            Ok(if findings.iter().any(check::Finding::failed) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Status => {
            let s = status::fetch(&cli.cp)?;
            out.print(&s, status::render)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policies => {
            let p = policies::fetch(first(&cli.cp))?;
            out.print(&p, policies::render)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain(q) => {
            let (from, _) = q.parse()?;
            let e = mesh_cp::explain::fetch(first(&cli.cp), &from, &q.to, q.port)?;
            out.print(&e, mesh_cp::explain::render)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stat(args) => {
            let pairs = stat::run(&cli.cp, &args)?;
            out.print(pairs.as_slice(), stat::render)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The first of `--cp`'s addresses.
fn first(cp: &str) -> &str {
    status::addresses(cp).next().unwrap_or(cp)
}
