//! `warren bench`: benchmarks that print one JSON line per run, each next to
//! a bare-lapin baseline measured in the same run.

mod consume;
mod publish;
mod replay;

use std::process::ExitCode;

use crate::cli::Global;

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// Publisher throughput against a bare lapin publish loop.
    Publish(publish::PublishBenchArgs),
    /// Consumer-group throughput against a bare lapin consume loop.
    Consume(consume::ConsumeBenchArgs),
    /// Publisher and consumer group at once: throughput and latency.
    E2e(consume::E2eBenchArgs),
    /// Every message fails once, then succeeds (the retry path).
    Retry(consume::RetryBenchArgs),
    /// A full dead-letter replay with confirms.
    Replay(replay::ReplayBenchArgs),
}

/// Runs a benchmark.
pub async fn run(g: &Global, cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Publish(a) => publish::run(g, a).await,
        BenchCmd::Consume(a) => consume::run_consume(g, a).await,
        BenchCmd::E2e(a) => consume::run_e2e(g, a).await,
        BenchCmd::Retry(a) => consume::run_retry(g, a).await,
        BenchCmd::Replay(a) => replay::run(g, a).await,
    }
}
