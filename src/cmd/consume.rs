//! `warren consume`: not built yet (see the README's "Limits today").

use std::process::ExitCode;

use crate::cli::Global;

/// Arguments of `warren consume`.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {}

/// Runs `warren consume`.
pub async fn run(_g: &Global, _args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren consume` is not built yet")
}
