//! `warren demo`: not built yet (see the README's "Limits today").

use std::process::ExitCode;

use crate::cli::Global;

/// Arguments of `warren demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

/// Runs `warren demo`.
pub async fn run(_g: &Global, _args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren demo` is not built yet")
}
