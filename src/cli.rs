//! Global flags, output format, exit codes and logging setup.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Parser, Subcommand, ValueEnum};
use serde_json::json;
use warren_topology::{AmqpUrl, ObjectState, Topology, TopologyError};

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

/// Options every command takes. `Debug` masks the password of the URL.
#[derive(Clone, clap::Args)]
pub struct Global {
    /// The topology file (`warren demo` runs its own and refuses -f).
    #[arg(
        short = 'f',
        long = "topology",
        env = "WARREN_TOPOLOGY",
        default_value = "warren.toml",
        global = true
    )]
    pub topology: PathBuf,
    /// The broker (default: the local one, as user guest, vhost /); its
    /// password is never printed.
    // Help names the variable but never shows its value: it holds the password.
    #[arg(
        long,
        env = "WARREN_AMQP_URL",
        default_value = warren_topology::DEFAULT_AMQP_URL,
        global = true,
        hide_default_value = true,
        hide_env_values = true
    )]
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
    /// Where `topology` came from (set by [`Cli::parse_args`]).
    #[arg(skip)]
    pub topology_from: Origin,
}

/// Where a flag's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// Its default: nobody asked for it.
    #[default]
    Default,
    /// Its environment variable: set for every command (a shell profile, a
    /// container), so not a request of this command in particular.
    Env,
    /// The command line.
    CommandLine,
}

impl Cli {
    /// Parses the command line (exiting on `--help`, `--version` and usage
    /// errors, as clap does) and notes where `-f` came from. A usage error
    /// with `--output json` also prints a JSON document on stdout.
    pub fn parse_args() -> Cli {
        use clap::{CommandFactory, FromArgMatches};
        let parsed = Cli::command()
            .try_get_matches()
            .and_then(|m| Ok((Cli::from_arg_matches(&m)?, m)));
        match parsed {
            Ok((mut cli, matches)) => {
                cli.global.topology_from = match source(&matches, "topology") {
                    Some(ValueSource::CommandLine) => Origin::CommandLine,
                    Some(ValueSource::EnvVariable) => Origin::Env,
                    _ => Origin::Default,
                };
                cli
            }
            Err(e) => {
                if e.use_stderr() && json_asked(std::env::args_os().skip(1)) {
                    let rendered = e.render().to_string();
                    let first = rendered.lines().next().unwrap_or_default();
                    let message = first.strip_prefix("error: ").unwrap_or(first);
                    let v =
                        json!({ "error": { "kind": "usage", "message": mask_passwords(message) } });
                    outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                }
                e.exit()
            }
        }
    }
}

/// Where the value of `id` came from, looking in the subcommand that was
/// run first (a global flag may be given after it).
fn source(m: &ArgMatches, id: &str) -> Option<ValueSource> {
    let below = m.subcommand().and_then(|(_, sub)| source(sub, id));
    match below {
        Some(ValueSource::DefaultValue) | None => m.value_source(id).or(below),
        given => given,
    }
}

/// Whether the arguments ask for `--output json`.
fn json_asked(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    let args: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    args.iter().enumerate().any(|(i, a)| {
        a == "--output=json" || (a == "--output" && args.get(i + 1).is_some_and(|v| v == "json"))
    })
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

/// The lowest `--rate` of `publish` and `dlq replay`: a message every 31
/// years. The wait between two messages at a lower rate does not fit a
/// duration, or overflows the clock when added: such a run would send its
/// first message and then wait until it is stopped.
pub const MIN_RATE: f64 = 1e-9;

/// Checks `--rate` (`publish`, `dlq replay`, before connecting): a number of
/// messages per second from [`MIN_RATE`] up, refused otherwise (exit 2).
pub fn check_rate(rate: Option<f64>) -> Result<(), UsageError> {
    match rate {
        Some(r) if !(r > 0.0 && r.is_finite()) => Err(UsageError(format!(
            "--rate must be a positive number, not {r}"
        ))),
        Some(r) if r < MIN_RATE => Err(UsageError(format!(
            "--rate must be a number of messages per second from 0.000000001 (one every 31 years) up, not {r:e}"
        ))),
        _ => Ok(()),
    }
}

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Global")
            .field("topology", &self.topology)
            .field("amqp_url", &mask_passwords(&self.amqp_url))
            .field("output", &self.output)
            .field("verbose", &self.verbose)
            .field("log_format", &self.log_format)
            .field("topology_from", &self.topology_from)
            .finish()
    }
}

impl Global {
    /// The broker URL, validated. The error never holds the password, even
    /// for a URL too broken to say where its password is.
    pub fn url(&self) -> anyhow::Result<AmqpUrl> {
        self.amqp_url.parse::<AmqpUrl>().map_err(|e| {
            let mut text = without_password(&e.to_string(), &self.amqp_url);
            if !text.contains("expected amqp://") {
                text.push_str(&format!("; expected {EXAMPLE_URL} (vhost \"/\" is %2f)"));
            }
            UsageError(format!("{text} (set --amqp-url or WARREN_AMQP_URL)")).into()
        })
    }

    /// The topology file, validated; a bad file is a usage error (exit 2)
    /// that still holds the [`TopologyError`] (for [`error_json`]).
    pub fn topology(&self) -> anyhow::Result<Topology> {
        Topology::from_file(&self.topology).map_err(|e| match e {
            TopologyError::Invalid(_) => {
                let text = e.to_string();
                anyhow::Error::new(e).context(UsageError(text))
            }
            // The library's error knows no flags: the way to another file
            // is the command line's.
            TopologyError::Read { .. } => {
                let text = format!("{e} (pass another with -f or WARREN_TOPOLOGY)");
                anyhow::Error::new(e).context(UsageError(text))
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

/// An error and its causes on one line, the password of anything that looks
/// like `scheme://user:password@host` masked (see [`mask_passwords`]).
pub fn render_error(e: &anyhow::Error) -> String {
    mask_passwords(&chain(e))
}

/// An error as JSON, for `--output json`: `kind` (`file`, `usage`,
/// `connect`, `mismatch`, `access_refused`, `broker` or `error`), `message`
/// (what [`render_error`] prints) and the facts of its kind: `file`,
/// `line`, `column`, `field` of a bad topology file; `url` and `transient`
/// of a failed connection; `differs` (`kind`, `name`, `detail` of each
/// object) of a mismatch; the `object` a refusal or broker error was about.
pub fn error_json(e: &anyhow::Error) -> serde_json::Value {
    let message = render_error(e);
    let topology = e
        .downcast_ref::<TopologyError>()
        .or_else(|| e.chain().find_map(|c| c.downcast_ref::<TopologyError>()));
    // A partial apply: the failure itself (what was applied is the caller's).
    let topology = match topology {
        Some(TopologyError::Incomplete { source, .. }) => Some(&**source),
        t => t,
    };
    let masked = |s: &str| mask_passwords(s);
    match topology {
        Some(TopologyError::Invalid(c)) => json!({
            "kind": "file", "message": message, "file": c.file, "line": c.line,
            "column": c.column, "field": c.field,
        }),
        Some(TopologyError::Read { file, .. }) => {
            json!({ "kind": "file", "message": message, "file": file })
        }
        Some(TopologyError::Connect { url, transient, .. }) => json!({
            "kind": "connect", "message": message, "url": masked(url), "transient": transient,
        }),
        Some(TopologyError::Mismatch { differing, .. }) => {
            let differs: Vec<serde_json::Value> = differing
                .iter()
                .map(|c| {
                    let detail = match &c.state {
                        ObjectState::Differs(d) => d.as_str(),
                        _ => "",
                    };
                    json!({ "kind": c.kind, "name": c.name, "detail": masked(detail) })
                })
                .collect();
            json!({ "kind": "mismatch", "message": message, "differs": differs })
        }
        Some(TopologyError::AccessRefused { object, .. }) => {
            json!({ "kind": "access_refused", "message": message, "object": masked(object) })
        }
        Some(TopologyError::Broker { object, .. }) => {
            json!({ "kind": "broker", "message": message, "object": masked(object) })
        }
        _ if e.downcast_ref::<UsageError>().is_some() => {
            json!({ "kind": "usage", "message": message })
        }
        _ => json!({ "kind": "error", "message": message }),
    }
}

fn chain(e: &anyhow::Error) -> String {
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

/// `text` with every occurrence of the password of `raw` (a URL that may not
/// parse) replaced by `***`, also percent-decoded, then [`mask_passwords`].
fn without_password(text: &str, raw: &str) -> String {
    let mut out = text.to_owned();
    if let Some(password) = password_of(raw) {
        out = out.replace(password, "***");
        let decoded = percent_decode(password);
        if !decoded.is_empty() {
            out = out.replace(&decoded, "***");
        }
    }
    mask_passwords(&out)
}

/// Where the password of a URL-like string is: between the first `:` of the
/// user info (after the first `//`, or the whole string without one) and the
/// last `@`. `None` without one.
fn password_of(raw: &str) -> Option<&str> {
    if is_example(raw) {
        return None;
    }
    let at = raw.rfind('@')?;
    let start = raw[..at].find("//").map_or(0, |i| i + 2);
    let userinfo = &raw[start..at];
    let (_, password) = userinfo.split_once(':')?;
    Some(password).filter(|p| !p.is_empty() && *p != "***")
}

/// The URL that hints show as an example. Its port is not a number: it
/// names no broker, and its password is nobody's.
pub const EXAMPLE_URL: &str = "amqp://user:password@host:port/vhost";

/// Whether a URL-like word is [`EXAMPLE_URL`] (any scheme, any path):
/// masking its password would make the example unusable.
fn is_example(word: &str) -> bool {
    let rest = word.find("//").map_or(word, |i| &word[i + 2..]);
    rest.strip_prefix("user:password@host:port")
        .is_some_and(|r| r.is_empty() || r.starts_with('/'))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Masks the password of every `user:password@` in `text`, whether or not
/// the URL around it parses: in each word (split at white space and quotes)
/// with an `@`, what follows the first `:` of the user info (after the
/// word's first `//`) up to the word's last `@` becomes `***`.
pub fn mask_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match password_of(word) {
            Some(p) => {
                let at = word.rfind('@').unwrap_or(word.len());
                let from = at - p.len();
                out.push_str(&word[..from]);
                out.push_str("***");
                out.push_str(&word[at..]);
            }
            None => out.push_str(word),
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>' | '(' | ')' | '[' | ']') {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
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
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let layer = match g.log_format {
        LogFormat::Json => layer.json().boxed(),
        LogFormat::Text => layer.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer.with_filter(tracing_subscriber::filter::filter_fn(|m| !tells_secrets(m))))
        .init();
}

/// Runs `event` (an INFO event of warren's) where it is written: to the
/// process's subscriber when that shows INFO, else to a JSON subscriber
/// writing to stderr, as `--log-format json` does. For what a command says
/// at every verbosity (on stderr as text otherwise), so that with
/// `--log-format json` every line of stderr is JSON.
pub fn as_info_event(event: impl Fn()) {
    if tracing::enabled!(tracing::Level::INFO) {
        event();
    } else {
        let json = tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .finish();
        tracing::subscriber::with_default(json, event);
    }
}

/// Whether an event may print the password: the AMQP client's TRACE events
/// show the URL (`amq_protocol_tcp`: "Connecting", with the URI) and whole
/// frames, the login's `connection.start-ok` among them. They are dropped at
/// every verbosity and whatever `RUST_LOG` asks for; DEBUG and above print
/// neither.
fn tells_secrets(m: &tracing::Metadata<'_>) -> bool {
    *m.level() == tracing::Level::TRACE
        && (m.target().starts_with("lapin") || m.target().starts_with("amq_protocol"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_passwords_masks_urls_that_do_not_parse() {
        assert_eq!(
            mask_passwords(
                "error: invalid AMQP URL amqp//guest:s3cretPW@127.0.0.1:5672/%2f: relative URL"
            ),
            "error: invalid AMQP URL amqp//guest:***@127.0.0.1:5672/%2f: relative URL"
        );
        assert_eq!(
            mask_passwords("url \"amqp://u:p@ss/w//rd@host/%2f\" is bad"),
            "url \"amqp://u:***@host/%2f\" is bad"
        );
        assert_eq!(mask_passwords("amqp:guest:pw@host"), "amqp:***@host");
        // Only the example itself is left alone.
        assert_eq!(
            mask_passwords(
                "amqp://user:password@host:5672/vhost amqp://guest:password@host:port/x"
            ),
            "amqp://user:***@host:5672/vhost amqp://guest:***@host:port/x"
        );
        // Nothing to mask: no password, or already masked, or the example
        // of an error's hint (a port that is not a number connects nowhere).
        for s in [
            "expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f)",
            "amqp://guest@host/%2f",
            "amqp://guest:***@host/%2f",
            "write to ops@example.com: it failed",
            "plain text, no at sign: a:b",
        ] {
            assert_eq!(mask_passwords(s), s);
        }
    }

    #[test]
    fn url_errors_never_hold_the_password() {
        for raw in [
            "amqp//guest:s3cretPW@127.0.0.1:5672/%2f",
            "amqp:/guest:s3cretPW@127.0.0.1:5672/%2f",
            "http://guest:s3cretPW@127.0.0.1:5672/%2f",
            "amqp://guest:s3cretPW@:5672/%2f",
            "amqp://guest:s3cret%50W@/%2f",
            "guest:s3cretPW@127.0.0.1",
        ] {
            let g = Global {
                topology: "warren.toml".into(),
                amqp_url: raw.to_owned(),
                output: Output::Table,
                verbose: 0,
                log_format: LogFormat::Text,
                topology_from: Origin::Default,
            };
            let e = g.url().expect_err(raw);
            let text = render_error(&e);
            assert!(!text.contains("s3cret"), "{raw}: {text}");
            assert!(text.contains("***"), "{raw}: {text}");
            assert!(!format!("{g:?}").contains("s3cret"), "{g:?}");
        }
    }

    #[test]
    fn a_rate_is_checked_the_same_for_every_command() {
        assert!(check_rate(None).is_ok());
        for ok in [MIN_RATE, 0.5, 1.0, 1e9] {
            assert!(check_rate(Some(ok)).is_ok(), "{ok}");
        }
        for (bad, text) in [
            (0.0, "--rate must be a positive number, not 0"),
            (-1.0, "--rate must be a positive number, not -1"),
            (f64::NAN, "--rate must be a positive number, not NaN"),
            (f64::INFINITY, "--rate must be a positive number, not inf"),
            (
                1e-300,
                "--rate must be a number of messages per second from 0.000000001 (one every 31 years) up, not 1e-300",
            ),
            (
                9.9e-10,
                "--rate must be a number of messages per second from 0.000000001 (one every 31 years) up, not 9.9e-10",
            ),
        ] {
            assert_eq!(check_rate(Some(bad)).unwrap_err().0, text, "{bad}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%41%zz%4"), "aA%zz%4");
    }
}
