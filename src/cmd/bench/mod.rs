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

/// CPU time (user + system) this process has used so far, in seconds, from
/// `/proc/self/stat` (clock ticks of 10 ms); 0 where that file is missing.
pub(crate) fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at ")".
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Median, min and max.
pub(crate) fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    (median, v[0], v[v.len() - 1])
}
