//! `warren`: the command line. It parses flags, reads env and files, sets up
//! tracing, wires signals, serves `/metrics` `/healthz` `/readyz`, and calls the
//! libraries (`warren-topology`, `warren-producer`, `warren-consumer`,
//! `warren-operator`), which do the work.

#[macro_use]
mod out;

mod cli;
mod cmd;
mod handlers;
mod serve;
mod signal;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse_args();
    let quiet = matches!(cli.command, cli::Command::Demo(_));
    let json_logs = matches!(cli.global.log_format, cli::LogFormat::Json);
    cli::init_tracing(&cli.global, quiet);
    // One worker thread unless TOKIO_WORKER_THREADS says otherwise: warren's
    // own work is I/O (handlers run in services and processes of their own),
    // and on a small machine one thread saves the cross-thread wake-ups that
    // cost a third of the client's CPU per retried message (BENCHMARKS.md).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cmd::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let code = cli::exit_code_of(&e);
            let text = cli::render_error(&e);
            // With JSON logs, stderr stays JSON lines to its last line.
            if json_logs && tracing::enabled!(target: "warren", tracing::Level::ERROR) {
                tracing::error!(target: "warren", exit_code = code, "{text}");
            } else {
                eprintln!("error: {text}");
            }
            ExitCode::from(code)
        }
    }
}
