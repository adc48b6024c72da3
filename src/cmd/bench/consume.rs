//! `warren bench consume|e2e|retry`: not built yet.

use std::process::ExitCode;

use crate::cli::Global;

/// Arguments of `warren bench consume`.
#[derive(Debug, clap::Args)]
pub struct ConsumeBenchArgs {}

/// Arguments of `warren bench e2e`.
#[derive(Debug, clap::Args)]
pub struct E2eBenchArgs {}

/// Arguments of `warren bench retry`.
#[derive(Debug, clap::Args)]
pub struct RetryBenchArgs {}

/// Runs `warren bench consume`.
pub async fn run_consume(_g: &Global, _a: ConsumeBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren bench consume` is not built yet")
}

/// Runs `warren bench e2e`.
pub async fn run_e2e(_g: &Global, _a: E2eBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren bench e2e` is not built yet")
}

/// Runs `warren bench retry`.
pub async fn run_retry(_g: &Global, _a: RetryBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren bench retry` is not built yet")
}
