//! `warren publish`: not built yet (see the README's "Limits today").

use std::process::ExitCode;

use crate::cli::Global;

/// Arguments of `warren publish`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {}

/// Runs `warren publish`.
pub async fn run(_g: &Global, _args: PublishArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren publish` is not built yet")
}
