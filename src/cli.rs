//! Global flags, output format, exit codes and logging setup.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use warren_topology::{AmqpUrl, Topology, TopologyError};

use crate::cmd;

/// warren: a reliable message pipeline on RabbitMQ.
///
/// Publish to exchanges, consume in groups with manual acks, retry through TTL
/// queues, dead-letter what keeps failing, and inspect, replay or purge dead
/// letters.
#[derive(Debug, Parser)]
#[command(name = "warren", version, about, long_about)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// The topology file.
    #[arg(
        short = 'f',
        long = "topology",
        env = "WARREN_TOPOLOGY",
        default_value = "warren.toml",
        global = true
    )]
    pub topology: PathBuf,
    /// The broker (the password is never printed).
    #[arg(long, env = "WARREN_AMQP_URL", default_value = warren_topology::DEFAULT_AMQP_URL, global = true, hide_default_value = true)]
    pub amqp_url: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG wins when set.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
}

/// How logs are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show, apply or verify the topology file on the broker.
    #[command(subcommand)]
    Topology(cmd::topology::TopologyCmd),
    /// Publish messages with confirms (body from --body, --file or stdin).
    Publish(cmd::publish::PublishArgs),
    /// Run a consumer group whose handler is an HTTP endpoint or a command.
    Consume(cmd::consume::ConsumeArgs),
    /// Inspect, replay, purge, export and import dead letters.
    #[command(subcommand)]
    Dlq(cmd::dlq::DlqCmd),
    /// Run the whole pipeline on a local broker and show what happens.
    Demo(cmd::demo::DemoArgs),
    /// Benchmarks against a bare-lapin baseline (JSON lines out).
    #[command(subcommand)]
    Bench(cmd::bench::BenchCmd),
}

/// A bad flag or a bad topology file: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl Global {
    /// The broker URL, validated.
    pub fn url(&self) -> anyhow::Result<AmqpUrl> {
        self.amqp_url
            .parse::<AmqpUrl>()
            .map_err(|e| UsageError(format!("{e} (set --amqp-url or WARREN_AMQP_URL)")).into())
    }

    /// The topology file, validated; a bad file is a usage error (exit 2).
    pub fn topology(&self) -> anyhow::Result<Topology> {
        Topology::from_file(&self.topology).map_err(|e| match e {
            TopologyError::Invalid(_) | TopologyError::Read { .. } => {
                UsageError(e.to_string()).into()
            }
            other => other.into(),
        })
    }

    /// Whether JSON output was asked for.
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }
}

/// Exit code of an error: 2 for usage errors, 1 for everything else.
pub fn exit_code_of(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        2
    } else {
        1
    }
}

/// An error and its causes on one line, the password masked anywhere it
/// could appear.
pub fn render_error(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for (i, cause) in e.chain().enumerate() {
        let s = cause.to_string();
        if i > 0 {
            if text.contains(&s) {
                continue;
            }
            text.push_str(": ");
        }
        text.push_str(&s);
    }
    text
}

/// Logs go to stderr; `RUST_LOG` wins over `-v`. `quiet` commands (the demo,
/// whose failures are the point) log only errors unless `-v` is given.
pub fn init_tracing(g: &Global, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match g.verbose {
        0 if quiet => "error",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(if g.verbose >= 2 {
            default.to_owned()
        } else {
            format!("{default},lapin=off,amq_protocol=off")
        })
    });
    // Colours only on a terminal: logs that go to a file, a pipe or a
    // journal get no escape codes (and none with NO_COLOR set).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match g.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
