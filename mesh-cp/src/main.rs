//! mesh-cp: Mycel's control plane. Only the command line exists so far; every subcommand says
//! plainly that it is not implemented yet rather than pretending to work.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mesh-cp",
    version,
    about = "Mycel control plane (not implemented yet: nodes run from a local workloads file)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve nodes over gRPC from a directory of YAML documents (not implemented yet).
    Serve,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve => {
            eprintln!("mesh-cp: error: `serve` is not implemented yet; run mesh-node with --workloads FILE");
            std::process::exit(2);
        }
    }
}
