//! `warren bench replay`: not built yet.

use std::process::ExitCode;

use crate::cli::Global;

/// Arguments of `warren bench replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayBenchArgs {}

/// Runs it.
pub async fn run(_g: &Global, _a: ReplayBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren bench replay` is not built yet")
}
