//! `warren bench`: benchmarks that print one JSON line per run, each next to
//! a bare-lapin baseline measured in the same run.

use std::process::ExitCode;

use crate::cli::Global;

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {}

/// Runs a benchmark.
pub async fn run(_g: &Global, cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {}
}
