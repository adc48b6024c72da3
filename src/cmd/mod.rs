//! One module per subcommand.

pub mod bench;
pub mod consume;
pub mod demo;
pub mod dlq;
pub mod publish;
pub mod topology;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = cli.global;
    match cli.command {
        Command::Topology(c) => topology::run(&g, c).await,
        Command::Publish(a) => publish::run(&g, a).await,
        Command::Consume(a) => consume::run(&g, a).await,
        Command::Dlq(c) => dlq::run(&g, c).await,
        Command::Demo(a) => demo::run(&g, a).await,
        Command::Bench(c) => bench::run(&g, c).await,
    }
}
