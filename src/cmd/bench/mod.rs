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
    proc_cpu_seconds("/proc/self/stat").unwrap_or(0.0)
}

/// CPU time of the process whose `stat` file this is.
fn proc_cpu_seconds(stat: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = stat.rsplit_once(')').map(|(_, r)| r)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// The broker's CPU time so far, when it runs on this machine: the
/// `beam.smp` processes' (RabbitMQ runs on the Erlang VM), and only for a
/// broker URL on the loopback interface. `None` otherwise.
fn broker_cpu_seconds(url_host: &str) -> Option<f64> {
    if !matches!(url_host, "127.0.0.1" | "localhost" | "::1" | "[::1]") {
        return None;
    }
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        let is_beam =
            std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "beam.smp");
        if is_beam {
            if let Some(s) = proc_cpu_seconds(&path.join("stat").to_string_lossy()) {
                *total.get_or_insert(0.0) += s;
            }
        }
    }
    total
}

/// CPU used by this process and by a local broker over a measured stretch.
pub(crate) struct CpuMeter {
    host: String,
    client: f64,
    broker: Option<f64>,
}

impl CpuMeter {
    pub fn start(url_host: &str) -> Self {
        CpuMeter {
            host: url_host.to_owned(),
            client: cpu_seconds(),
            broker: broker_cpu_seconds(url_host),
        }
    }

    /// Microseconds of CPU per message since the start: (this process, the
    /// broker if it runs here).
    pub fn per_msg(&self, n: usize) -> (f64, Option<f64>) {
        let us = |s: f64| (s * 1e6 / n.max(1) as f64).round();
        let client = us(cpu_seconds() - self.client);
        let broker = match (self.broker, broker_cpu_seconds(&self.host)) {
            (Some(a), Some(b)) => Some(us(b - a)),
            _ => None,
        };
        (client, broker)
    }
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
