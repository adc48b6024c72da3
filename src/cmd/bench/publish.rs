//! `warren bench publish`: not built yet.

use std::process::ExitCode;

use crate::cli::Global;

/// Arguments of `warren bench publish`.
#[derive(Debug, clap::Args)]
pub struct PublishBenchArgs {}

/// Runs it.
pub async fn run(_g: &Global, _a: PublishBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren bench publish` is not built yet")
}
