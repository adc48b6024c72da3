//! `warren`: the command line. It parses flags, reads env and files, sets up
//! tracing, wires signals, serves `/metrics` `/healthz` `/readyz`, and calls the
//! libraries (`warren-topology`, `warren-producer`, `warren-consumer`,
//! `warren-operator`), which do the work.

mod cli;
mod cmd;
mod handlers;
mod serve;
mod signal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let quiet = matches!(cli.command, cli::Command::Demo(_));
    cli::init_tracing(&cli.global, quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
            eprintln!("error: {}", cli::render_error(&e));
            ExitCode::from(code)
        }
    }
}
