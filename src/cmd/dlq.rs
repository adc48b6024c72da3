//! `warren dlq`: not built yet (see the README's "Limits today").

use std::process::ExitCode;

use crate::cli::Global;

/// The dead-letter commands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCmd {
    /// Per group: how many dead letters, how old, and why.
    Stats,
}

/// Runs `warren dlq ...`.
pub async fn run(_g: &Global, _cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren dlq` is not built yet")
}
