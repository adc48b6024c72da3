//! `warren dlq`: the operator's tool for dead letters. The work is done by
//! `warren-operator`; this file parses flags, connects, asks for
//! confirmation, draws the progress bar, handles Ctrl-C and prints.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_operator as op;
use warren_topology::lapin::types::AMQPValue;
use warren_topology::lapin::Connection;
use warren_topology::{connect, ConnectOptions};

use crate::cli::{Global, UsageError};

/// The dead-letter commands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCmd {
    /// Per group: how many dead letters, how old, and why (failure groups).
    Stats(ReadArgs),
    /// List dead letters (non-destructive: they stay, in order).
    List(ReadArgs),
    /// Everything about one dead letter: properties, headers, body.
    Show(ShowArgs),
    /// Publish selected dead letters again (confirm, then remove).
    ///
    /// Ctrl-C stops after the current message and exits 130 with the summary
    /// of what was replayed; a second Ctrl-C quits at once (at worst a
    /// duplicate, never a loss). Exit 1 when some selected message was not
    /// replayed, or an error (a lost connection) stopped a group partway:
    /// its summary and audit record still say what it replayed before.
    Replay(ReplayArgs),
    /// Delete selected dead letters (asks first unless --yes).
    ///
    /// Exit 1 when an error stopped it partway: its summary and audit
    /// record say what it deleted before.
    Purge(PurgeArgs),
    /// Write dead letters to a JSON Lines file (non-destructive unless --remove).
    ///
    /// With --remove, a group's dead letters are removed (one ack) only
    /// once the file is fsynced, and counted removed once the broker has
    /// confirmed the ack. Exit 1 when an error (a lost connection, a queue
    /// deleted while it was read, a full disk) stopped it partway: its
    /// summary says what each group wrote to the file and removed before
    /// (and acked without the broker confirming it: removed or not, they
    /// are in the file); the rest are still in their queues.
    Export(ExportArgs),
    /// Put an export back into the dead-letter queues.
    ///
    /// It stops at the first message the broker does not confirm and exits
    /// 1, naming the lines imported and not, and the --skip that imports
    /// the rest without duplicating anything.
    Import(ImportArgs),
    /// Keep measuring the dead-letter queues: gauges, logs, webhook alerts.
    Watch(WatchArgs),
}

/// Which groups and how much to read.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    /// A group (repeatable); default: every group of the topology file.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// Read at most this many messages per queue (bounds memory; 1 to 65535).
    #[arg(long, default_value_t = op::DEFAULT_SCAN_LIMIT, value_parser = scan_limit)]
    pub scan_limit: usize,
}

/// Which dead letters a replay or purge takes.
#[derive(Debug, Clone, clap::Args)]
pub struct SelectArgs {
    /// A message id (repeatable).
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
    /// A failure group's fingerprint (from `stats`).
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// A regular expression the error must match.
    #[arg(long, value_name = "REGEX")]
    pub error: Option<String>,
    /// An error kind (`unknown`: no kind header and no broker dead-lettering).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(KINDS))]
    pub kind: Option<String>,
    /// The original routing key.
    #[arg(long)]
    pub routing_key: Option<String>,
    /// Dead-lettered at least this long ago (e.g. 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Option<Duration>,
    /// Dead-lettered at most this long ago.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub newer_than: Option<Duration>,
    /// Take at most this many per group (at least 1).
    #[arg(long, value_parser = at_least_one)]
    pub limit: Option<usize>,
    /// Every dead letter (required when no other criterion is given).
    #[arg(long)]
    pub all: bool,
}

/// The regex crate's error on one line: its syntax errors span four
/// (`regex parse error:`, the pattern, a caret under the place, `error:
/// what`), which read as two errors on stderr. "what (at character N)".
fn regex_error_line(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(what) = lines.last().and_then(|l| l.strip_prefix("error: ")) else {
        return text.replace('\n', " ");
    };
    // The caret line, under the pattern indented by four spaces.
    match lines
        .iter()
        .find(|l| l.trim_start().starts_with('^'))
        .and_then(|l| l.find('^'))
    {
        Some(at) => format!("{what} (at character {})", at.saturating_sub(4) + 1),
        None => what.to_owned(),
    }
}

impl SelectArgs {
    fn selection(&self) -> anyhow::Result<op::Selection> {
        let error = match &self.error {
            Some(re) => Some(op::Regex::new(re).map_err(|e| {
                UsageError(format!(
                    "--error {re:?} is not a regular expression: {}",
                    regex_error_line(&e.to_string())
                ))
            })?),
            None => None,
        };
        let s = op::Selection {
            ids: self.ids.clone(),
            fingerprint: self.fingerprint.clone(),
            error,
            kind: self.kind.clone(),
            routing_key: self.routing_key.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
            limit: self.limit,
            all: self.all,
        };
        s.check().map_err(|e| UsageError(e.to_string()))?;
        Ok(s)
    }
}

/// `show ID`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShowArgs {
    /// The message id (as `list` shows it).
    pub id: String,
    #[command(flatten)]
    read: ReadArgs,
}

/// `replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    read: ReadArgs,
    #[command(flatten)]
    select: SelectArgs,
    /// Publish to the original exchange and routing key (every bound group sees it).
    #[arg(long)]
    pub to_original: bool,
    /// At most this many messages per second (from 0.000000001, one every 31
    /// years, up; default: as fast as confirms allow).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Show what would be replayed; move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Append an audit record (JSON Lines) to this file. `-` is refused
    /// (`./-` names a file called `-`); every record is also logged at INFO
    /// under target `warren::audit`.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
}

/// `purge`.
#[derive(Debug, Clone, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    read: ReadArgs,
    #[command(flatten)]
    select: SelectArgs,
    /// Do not ask.
    #[arg(long)]
    pub yes: bool,
    /// Write what is deleted (export format) to this new file first; it is
    /// fsynced before anything is deleted. `-` is refused: standard output
    /// cannot be known to be stored (`./-` names a file called `-`).
    #[arg(long)]
    pub archive: Option<PathBuf>,
    /// Append an audit record (JSON Lines) to this file. `-` is refused
    /// (`./-` names a file called `-`); every record is also logged at INFO
    /// under target `warren::audit`.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
}

/// `export FILE` (`-`: standard output).
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The file to write (must not exist); `-` writes the JSON Lines to
    /// standard output and the summary to standard error.
    pub file: PathBuf,
    #[command(flatten)]
    read: ReadArgs,
    /// Remove the exported messages from the queue (after the file is on disk).
    #[arg(long)]
    pub remove: bool,
}

/// `import FILE` (`-`: standard input).
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// An export file; `-` reads standard input.
    pub file: PathBuf,
    /// Put every message into this group's dead-letter queue instead of its own.
    #[arg(long)]
    pub to_group: Option<String>,
    /// Skip the first N lines of the file: they were imported by an
    /// earlier run that stopped partway (it says which N).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub skip: usize,
}

/// `watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// A group (repeatable); default: every group of the topology file.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// Time between measurements (more than 0).
    #[arg(long, default_value = "5s", value_parser = positive_duration)]
    pub interval: Duration,
    /// Where /metrics and /healthz are served.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub metrics_addr: SocketAddr,
    /// POST a JSON alert here (an http:// or https:// URL) when a group
    /// gains dead letters.
    #[arg(long, value_parser = webhook_url)]
    pub webhook: Option<String>,
}

/// The error kinds `--kind` takes: the consumer's five, `broker` (the
/// broker dead-lettered it) and `unknown` (no kind header).
const KINDS: [&str; 7] = [
    "retryable",
    "permanent",
    "timeout",
    "panic",
    "decode",
    "broker",
    "unknown",
];

/// `--scan-limit`: 1 to [`op::MAX_SCAN_LIMIT`] (the prefetch window is 16
/// bits), refused rather than clamped.
fn scan_limit(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    if n > op::MAX_SCAN_LIMIT {
        return Err(format!(
            "at most {} (the broker's prefetch window is 16 bits); run again for the rest",
            op::MAX_SCAN_LIMIT
        ));
    }
    Ok(n)
}

/// `--limit`: a count of at least 1 (0 would select nothing, and a run
/// that selects nothing looks like one that found nothing).
fn at_least_one(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// `watch --interval`: a duration longer than zero.
fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be longer than 0".into());
    }
    Ok(d)
}

/// `watch --webhook`: an absolute http(s) URL.
fn webhook_url(s: &str) -> Result<String, String> {
    let u = reqwest::Url::parse(s).map_err(|e| e.to_string())?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none_or(str::is_empty) {
        return Err("must be an http:// or https:// URL with a host".into());
    }
    Ok(s.to_owned())
}

/// Runs `warren dlq ...`.
/// Runs `warren dlq ...`. With `--output json`, a command that fails before
/// it printed its document (a connection refused, a bad file, a usage
/// error found on the broker) prints `{"error": ...}` (see
/// [`crate::cli::error_json`]) so that stdout is one JSON document on every
/// path; the exit code is the same either way.
pub async fn run(g: &Global, cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    // `watch` writes JSON Lines: its error is one more line.
    let lines = matches!(cmd, DlqCmd::Watch(_));
    let result = run_cmd(g, cmd).await;
    if g.json() {
        if let Err(e) = &result {
            if lines || !crate::out::wrote_anything() {
                let doc = serde_json::json!({ "error": crate::cli::error_json(e) });
                if lines {
                    outln!("{doc}");
                } else {
                    outln!("{}", serde_json::to_string_pretty(&doc)?);
                }
            }
        }
    }
    result
}

async fn run_cmd(g: &Global, cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DlqCmd::Stats(a) => stats(g, a).await,
        DlqCmd::List(a) => list(g, a).await,
        DlqCmd::Show(a) => show(g, a).await,
        DlqCmd::Replay(a) => replay(g, a).await,
        DlqCmd::Purge(a) => purge(g, a).await,
        DlqCmd::Export(a) => export(g, a).await,
        DlqCmd::Import(a) => import(g, a).await,
        DlqCmd::Watch(a) => watch(g, a).await,
    }
}

fn groups(g: &Global, given: &[String]) -> anyhow::Result<Vec<String>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let t = g.topology()?;
    if t.groups.is_empty() {
        return Err(UsageError(format!(
            "{} declares no groups; give --group",
            g.topology.display()
        ))
        .into());
    }
    Ok(t.groups.iter().map(|g| g.name.clone()).collect())
}

/// Checks groups given with `--group` before anything is read or moved: a
/// group that is neither in the topology file nor has a dead-letter queue on
/// the broker is a usage error listing the file's groups (as `consume
/// --group` does). A group outside the file whose queue exists is accepted:
/// reading a dead-letter queue needs only its name.
async fn check_groups(g: &Global, c: &Connection, given: &[String]) -> anyhow::Result<()> {
    if given.is_empty() {
        return Ok(());
    }
    let known = file_groups(g);
    for group in given {
        if known.as_ref().is_some_and(|k| k.contains(group)) {
            continue;
        }
        // Other errors (a timeout, ...) are left to the command itself.
        let counted = op::count(c, group, op::DEFAULT_RPC_TIMEOUT).await;
        if let Err(e @ op::OperatorError::NameTooLong { .. }) = counted {
            return Err(UsageError(format!("--group: {e}")).into());
        }
        if let Err(op::OperatorError::NoSuchQueue { queue }) = counted {
            return Err(
                UsageError(unknown_group(g, known.as_deref(), "--group", group, &queue)).into(),
            );
        }
    }
    Ok(())
}

/// The groups of the topology file; `None` when it cannot be read.
fn file_groups(g: &Global) -> Option<Vec<String>> {
    g.topology()
        .ok()
        .map(|t| t.groups.iter().map(|g| g.name.clone()).collect())
}

/// What a usage error says of a `group` (given with `flag`) that is neither
/// in the topology file (whose groups are `known`, `None` when it cannot be
/// read) nor has its dead-letter queue `queue` on the broker.
fn unknown_group(
    g: &Global,
    known: Option<&[String]>,
    flag: &str,
    group: &str,
    queue: &str,
) -> String {
    let file = g.topology.display();
    match known {
        Some(k) => format!(
            "no group {group:?} in {file} and no queue {queue:?} on the broker; groups: {}",
            if k.is_empty() {
                "none".to_owned()
            } else {
                k.join(", ")
            }
        ),
        None => format!(
            "no queue {queue:?} on the broker: check {flag} ({file} cannot be read to list the groups)"
        ),
    }
}

async fn conn(g: &Global) -> anyhow::Result<Connection> {
    Ok(connect(&ConnectOptions::new(g.url()?, "operator")).await?)
}

fn read_opts(a: &ReadArgs) -> op::ReadOptions {
    op::ReadOptions::default().scan_limit(a.scan_limit)
}

fn age(s: Option<u64>) -> String {
    match s {
        None => "-".into(),
        Some(s) => humantime::format_duration(Duration::from_secs(s))
            .to_string()
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Text from a message made safe for a terminal: control characters (C0,
/// DEL, C1) and bidirectional overrides are written as escapes (`\n`,
/// `\x1b`, `\u{202e}`), so that a message cannot break a row, move the
/// cursor, clear the screen or reorder what is shown. Backslashes are kept
/// as they are. JSON output needs none of this: serde escapes it.
fn esc(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if crate::out::unsafe_on_terminal(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// [`esc`], then [`cut`] to `n` characters.
fn cell(s: &str, n: usize) -> String {
    cut(&esc(s), n)
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!(
            "{}…",
            s.chars().take(n.saturating_sub(1)).collect::<String>()
        )
    }
}

/// Warns when the scan limit, not the selection, left part of the queue
/// unread, or the queue stopped giving messages before the scan read what
/// it counted.
fn warn_partial(c: &op::Coverage, queue: &str) {
    if c.scan_limit_reached {
        eprintln!("warning: {queue}: {c} (raise --scan-limit to read more)");
    }
    if c.stalled {
        eprintln!("warning: {queue}: {c}: the queue gave no more messages, so the others were not seen (another reader that started after the count holds them, or they expired); run the command again to read those back in the queue");
    }
}

/// What the broker's count leaves out when the queue had consumers when it
/// was read (another reader, such as a replay in progress, holding dead
/// letters unacked: they are not ready, so neither counted nor read);
/// `None` when it had none.
fn held(c: &op::Coverage, queue: &str) -> Option<String> {
    let n = c.consumers;
    let one = n == 1;
    (n > 0).then(|| {
        format!(
            "{queue} has {n} consumer{} ({}, such as a replay in progress): the dead letters {} unacked are not counted here; they go back to the queue unless {} them",
            if one { "" } else { "s" },
            if one { "another reader" } else { "other readers" },
            if one { "it holds" } else { "they hold" },
            if one { "it removes" } else { "they remove" },
        )
    })
}

/// [`warn_partial`], and [`held`] as a warning: for the commands whose
/// output is not a count (`show`, `replay`, `purge`, `export`).
fn warn_coverage(c: &op::Coverage, queue: &str) {
    warn_partial(c, queue);
    if let Some(h) = held(c, queue) {
        eprintln!("warning: {h}");
    }
}

async fn stats(g: &Global, a: ReadArgs) -> anyhow::Result<ExitCode> {
    let groups = groups(g, &a.groups)?;
    let c = conn(g).await?;
    check_groups(g, &c, &a.groups).await?;
    let mut all = Vec::new();
    for group in &groups {
        all.push(op::stats(&c, group, &read_opts(&a)).await?);
    }
    warren_topology::close(&c, "bye").await;
    if g.json() {
        outln!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    for s in &all {
        warn_partial(&s.coverage, &s.queue);
        outln!(
            "{}  {} dead letters  oldest {}  newest {}",
            s.queue,
            s.count,
            age(s.oldest_seconds),
            age(s.newest_seconds)
        );
        if let Some(h) = held(&s.coverage, &s.queue) {
            outln!("  note: {h}");
        }
        if s.count == 0 {
            continue;
        }
        let kinds: Vec<String> = s
            .by_kind
            .iter()
            .map(|(k, n)| format!("{}={n}", esc(k)))
            .collect();
        outln!("  by kind: {}", kinds.join(" "));
        outln!(
            "  {:>7}  {:<12}  {:<10}  example",
            "count",
            "fingerprint",
            "kind"
        );
        for f in &s.failure_groups {
            outln!(
                "  {:>7}  {:<12}  {:<10}  {}",
                f.count,
                esc(&f.fingerprint),
                esc(&f.kind),
                cell(&f.example, 90)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(g: &Global, a: ReadArgs) -> anyhow::Result<ExitCode> {
    let groups = groups(g, &a.groups)?;
    let c = conn(g).await?;
    check_groups(g, &c, &a.groups).await?;
    let mut all = Vec::new();
    for group in &groups {
        all.push(op::list(&c, group, &read_opts(&a)).await?);
    }
    warren_topology::close(&c, "bye").await;
    if g.json() {
        outln!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    for l in &all {
        warn_partial(&l.coverage, &l.queue);
        let n = l.coverage.total;
        outln!("{} ({n} message{})", l.queue, if n == 1 { "" } else { "s" });
        if let Some(h) = held(&l.coverage, &l.queue) {
            outln!("  note: {h}");
        }
        if l.messages.is_empty() {
            continue;
        }
        // Ids whole, however long, so that what is shown can be given to
        // `show` and `replay --id`: the column is as wide as the longest.
        let ids: Vec<String> = l.messages.iter().map(|m| esc(&m.info.id)).collect();
        let w = ids
            .iter()
            .map(|id| id.chars().count())
            .max()
            .unwrap_or(0)
            .max(38);
        outln!(
            "  {:<w$}  {:>8}  {:>3}  {:<9}  {:<24}  {:>7}  error",
            "id",
            "age",
            "att",
            "kind",
            "routing key",
            "size"
        );
        for (m, id) in l.messages.iter().zip(&ids) {
            outln!(
                "  {id:<w$}  {:>8}  {:>3}  {:<9}  {:<24}  {:>7}  {}",
                age(m.age_seconds),
                m.info.attempts,
                esc(&m.info.kind),
                cell(m.info.original_routing_key.as_deref().unwrap_or("-"), 24),
                m.info.size,
                cell(&m.info.error, 80)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn body_view(body: &[u8]) -> serde_json::Value {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        // `json` is the body parsed (keys sorted, numbers as f64 beyond
        // i64/u64); `text` is exactly what was published.
        let text = String::from_utf8_lossy(body);
        return serde_json::json!({ "json": v, "text": text });
    }
    match std::str::from_utf8(body) {
        Ok(t) => serde_json::json!({ "text": t }),
        Err(_) => {
            serde_json::json!({ "hex": body.iter().map(|b| format!("{b:02x}")).collect::<String>() })
        }
    }
}

/// `show ID`: every dead letter with that id (an id can be in several
/// groups, or twice in one queue). `--output json`: an array of them, `[]`
/// when there is none. Table: each as labelled lines (message text escaped),
/// a blank line between them. Exit 1 when there is none.
async fn show(g: &Global, a: ShowArgs) -> anyhow::Result<ExitCode> {
    let groups = groups(g, &a.read.groups)?;
    let c = conn(g).await?;
    check_groups(g, &c, &a.read.groups).await?;
    let mut found = Vec::new();
    for group in &groups {
        let (ds, cov) = op::show(&c, group, &a.id, &read_opts(&a.read)).await?;
        if ds.is_empty() {
            warn_coverage(&cov, &warren_topology::dead_queue(group));
        }
        found.extend(ds);
    }
    warren_topology::close(&c, "bye").await;
    let views: Vec<serde_json::Value> = found
        .iter()
        .map(|d| {
            let mut props =
                serde_json::to_value(op::ExportedProperties::of(&d.properties)).unwrap_or_default();
            // RFC 3339 UTC, as header timestamps are shown (the export
            // file keeps seconds).
            if let Some(t) = *d.properties.timestamp() {
                props["timestamp"] = op::value_to_plain(&AMQPValue::Timestamp(t));
            }
            if let Some(h) = d.properties.headers() {
                props["headers"] = op::table_to_plain(h);
            }
            serde_json::json!({
                "group": d.group,
                "position": d.position,
                "info": d.info,
                "exchange": d.exchange,
                "routing_key": d.routing_key,
                "properties": props,
                "body": body_view(&d.body),
            })
        })
        .collect();
    if g.json() {
        outln!("{}", serde_json::to_string_pretty(&views)?);
    } else {
        for (i, (d, v)) in found.iter().zip(&views).enumerate() {
            if i > 0 {
                outln!();
            }
            for line in show_lines(d, v) {
                outln!("{line}");
            }
        }
    }
    if found.is_empty() {
        eprintln!("no dead letter with id {:?} in {}", a.id, groups.join(", "));
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON value on one line for the table view: strings bare, the rest as
/// compact JSON; escaped either way.
fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
}

/// `show`'s table view of one dead letter (`v`: its JSON view).
fn show_lines(d: &op::DeadLetter, v: &serde_json::Value) -> Vec<String> {
    let i = &d.info;
    let opt = |s: &Option<String>| s.as_deref().map_or("-".to_owned(), esc);
    let dead_lettered = match i.dead_lettered_at {
        Some(t) => {
            let at = std::time::UNIX_EPOCH + Duration::from_secs(t);
            let ago = std::time::SystemTime::now()
                .duration_since(at)
                .ok()
                .map(|d| d.as_secs());
            format!(
                "{} ({} ago)",
                humantime::format_rfc3339_seconds(at),
                age(ago)
            )
        }
        None => "-".into(),
    };
    let mut out = vec![
        format!("id             {}", esc(&i.id)),
        format!(
            "queue          {} (position {})",
            warren_topology::dead_queue(&d.group),
            d.position
        ),
        format!("kind           {}", esc(&i.kind)),
        format!("error          {}", esc(&i.error)),
        format!("fingerprint    {}", esc(&i.fingerprint)),
        format!("attempts       {}", i.attempts),
        format!("replays        {}", i.replays),
        format!("dead-lettered  {dead_lettered}"),
        format!(
            "original       exchange {}, routing key {}",
            opt(&i.original_exchange),
            opt(&i.original_routing_key)
        ),
        format!(
            "arrived by     exchange {}, routing key {}",
            esc(&d.exchange),
            esc(&d.routing_key)
        ),
        "properties".to_owned(),
    ];
    if let Some(props) = v["properties"].as_object() {
        for (k, p) in props {
            if k != "headers" && !p.is_null() {
                out.push(format!("  {k:<18} {}", plain(p)));
            }
        }
    }
    if let Some(h) = v["properties"]["headers"].as_object() {
        out.push("headers".to_owned());
        let width = h.keys().map(|k| esc(k).chars().count()).max().unwrap_or(0);
        for (k, p) in h {
            out.push(format!("  {:<width$}  {}", esc(k), plain(p)));
        }
    }
    let body = &v["body"];
    let text = body.get("text").and_then(|t| t.as_str());
    let lossless = |j: &serde_json::Value| serde_json::to_string(j).ok().as_deref() == text;
    if let Some(j) = body.get("json").filter(|j| lossless(j)) {
        // Indented only when that changes nothing but white space.
        out.push(format!("body ({} bytes, JSON)", d.body.len()));
        let pretty = serde_json::to_string_pretty(j).unwrap_or_default();
        out.extend(pretty.lines().map(|l| format!("  {}", esc(l))));
    } else if let Some(t) = text {
        // The body as published, not as re-serialised from a parse (which
        // would sort keys and round numbers like 12345678901234567890123).
        let kind = if body.get("json").is_some() {
            "JSON"
        } else {
            "text"
        };
        out.push(format!("body ({} bytes, {kind})", d.body.len()));
        // Line breaks are the text's own; every other control is escaped.
        out.extend(t.split('\n').map(|l| format!("  {}", esc(l))));
    } else {
        out.push(format!("body ({} bytes, hex)", d.body.len()));
        out.push(format!("  {}", plain(&body["hex"])));
    }
    out
}

/// Who runs this, for the audit record: `$USER`, `$LOGNAME`, else the
/// process's uid as `/etc/passwd` names it, else `uid:N` (root in a
/// container often has no `$USER`).
fn user_name() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(var) {
            if !u.is_empty() {
                return u;
            }
        }
    }
    let Some(uid) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| uid_in_status(&s))
    else {
        return "unknown".into();
    };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| name_in_passwd(&p, uid))
        .unwrap_or_else(|| format!("uid:{uid}"))
}

/// The real uid in a `/proc/<pid>/status` text (`Uid: real effective ...`).
fn uid_in_status(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The first user name with `uid` in an `/etc/passwd` text.
fn name_in_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

fn whoami() -> (String, String) {
    let user = user_name();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into());
    (user, host)
}

/// Logs the record and appends it to `file`; says whether it was written.
/// A record the file cannot take is printed on standard error in full (it
/// describes what already moved, so it must not be lost), and the run ends
/// with exit 1 after its summary.
fn audit(rec: &op::AuditRecord, file: Option<&PathBuf>) -> bool {
    info!(target: "warren::audit", action = %rec.action, user = %rec.user, host = %rec.host,
        group = %rec.group, count = rec.count, dry_run = rec.dry_run,
        selection = %serde_json::to_string(&rec.selection).unwrap_or_default(),
        ids = %rec.ids.join(","), not_removed = %rec.not_removed.join(","),
        error = rec.error.as_deref().unwrap_or(""), "audit");
    let Some(f) = file else { return true };
    match rec.append_to(f) {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "error: --audit-log: the record of what was done could not be written ({e}); here it is: {}",
                serde_json::to_string(rec).unwrap_or_default()
            );
            false
        }
    }
}

/// Refuses `--audit-log -` (before connecting): the audit log is a file
/// that records are appended and fsynced to, standard output carries the
/// command's own output (JSON with `--output json`), and the records are
/// already logged on standard error under `warren::audit` (see [`audit`]).
fn refuse_stdio_audit_log(command: &str, file: Option<&PathBuf>) -> anyhow::Result<()> {
    if file.is_some_and(|f| is_stdio(f)) {
        return Err(UsageError(format!(
            "{command} --audit-log -: the audit log is a file each record is appended to, and standard output carries the command's own output; give --audit-log a file path (./- for a file named \"-\"), or read the records on standard error, where each is logged at INFO under target warren::audit (-v, or RUST_LOG=warren::audit=info)"
        ))
        .into());
    }
    Ok(())
}

/// Opens (creates) the audit log for appending before anything is touched:
/// a record that cannot be written must stop the run, not follow it.
/// A new audit log's directory is fsynced here, before anything moves, so
/// that the file holding the records survives a power loss.
fn check_audit_log(file: Option<&PathBuf>) -> anyhow::Result<()> {
    if let Some(f) = file {
        op::AuditRecord::prepare_log(f).map_err(|e| {
            let why = match e {
                op::OperatorError::Io { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            UsageError(format!("--audit-log {}: {why}", f.display()))
        })?;
    }
    Ok(())
}

fn progress_bar() -> ProgressBar {
    let pb = ProgressBar::new(0);
    if !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} scanned  {msg}  {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

fn ctrl_c_token() -> crate::signal::Interrupt {
    crate::signal::interrupt("stopping after the current message")
}

/// The `--id`s no group's run took, in the order given; `None` when a run
/// cannot tell (stopped early, stopped by `--limit`, or more failures than
/// it names).
fn ids_not_found<'a>(
    asked: &[String],
    taken: impl IntoIterator<Item = &'a String>,
    unsure: bool,
) -> Option<Vec<String>> {
    if unsure {
        return None;
    }
    let taken: std::collections::HashSet<&String> = taken.into_iter().collect();
    let mut out: Vec<String> = Vec::new();
    for id in asked {
        if !taken.contains(id) && !out.contains(id) {
            out.push(id.clone());
        }
    }
    Some(out)
}

/// Warns (table output) about each id not found.
fn warn_not_found(not_found: Option<&Vec<String>>) {
    for id in not_found.into_iter().flatten() {
        eprintln!("warning: --id {id:?}: no dead letter with this id matched the selection");
    }
}

/// Reports as JSON with `ids_not_found` added to each (the same list in
/// every group's entry: ids that no group took).
fn with_not_found<T: serde::Serialize>(
    reports: &[T],
    not_found: Option<&Vec<String>>,
) -> anyhow::Result<String> {
    let mut v = serde_json::to_value(reports)?;
    if let Some(items) = v.as_array_mut() {
        for r in items {
            r["ids_not_found"] = serde_json::to_value(not_found)?;
        }
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

async fn replay(g: &Global, a: ReplayArgs) -> anyhow::Result<ExitCode> {
    refuse_stdio_audit_log("replay", a.audit_log.as_ref())?;
    let selection = a.select.selection()?;
    crate::cli::check_rate(a.rate)?;
    let groups = groups(g, &a.read.groups)?;
    check_audit_log(a.audit_log.as_ref())?;
    if a.to_original && !a.dry_run {
        warn!("--to-original: every group bound to the original exchange and routing key will receive these messages again, not only the group that failed them");
        eprintln!("warning: --to-original republishes through the original exchange: every bound group sees these messages again");
    }
    let opts = op::ReplayOptions {
        target: if a.to_original {
            op::Target::Original
        } else {
            op::Target::WorkQueue
        },
        rate: a.rate,
        dry_run: a.dry_run,
        read: read_opts(&a.read),
        login: g.url()?.login(),
        ..Default::default()
    };
    let c = conn(g).await?;
    check_groups(g, &c, &a.read.groups).await?;
    let metrics = op::Metrics::unregistered();
    let interrupt = ctrl_c_token();
    let cancel = interrupt.token().clone();
    let (user, host) = whoami();
    let mut reports = Vec::new();
    let mut failed = false;
    for group in &groups {
        if cancel.is_cancelled() {
            break;
        }
        let pb = progress_bar();
        pb.set_prefix(group.clone());
        let on_progress = |p: op::Progress| {
            pb.set_length(p.to_scan as u64);
            pb.set_position(p.scanned as u64);
            pb.set_message(format!("{} selected, {} replayed", p.selected, p.replayed));
        };
        let r = op::replay(
            &c,
            group,
            &selection,
            &opts,
            &metrics,
            &on_progress,
            &cancel,
        )
        .await;
        pb.finish_and_clear();
        let r = match r {
            Ok(mut r) => {
                if let Some(e) = r.error.as_mut() {
                    e.push_str(&unconfirmed_replay_text(&r.unconfirmed, &r.group));
                }
                // Also when an error stopped it partway: what moved before
                // the error is recorded, and the error with it.
                let mut rec = op::AuditRecord::now("replay", &user, &host, group, &selection);
                rec.target = Some(if a.to_original {
                    "original".into()
                } else {
                    "work-queue".into()
                });
                rec.dry_run = a.dry_run;
                rec.count = if a.dry_run { 0 } else { r.replayed };
                rec.ids = r.ids.clone();
                rec.not_removed = r.not_removed.clone();
                rec.error = r.error.clone();
                failed |= !audit(&rec, a.audit_log.as_ref());
                r
            }
            // Nothing moved (the queue could not be read): no record; the
            // other groups still run.
            Err(e) => op::ReplayReport {
                group: group.clone(),
                target: opts.target,
                dry_run: a.dry_run,
                error: Some(e.to_string()),
                ..Default::default()
            },
        };
        failed |= r.failed > 0 || r.stopped_early || r.error.is_some();
        reports.push(r);
    }
    warren_topology::close(&c, "bye").await;
    // A failed copy names its id at the start of its error.
    let failed_ids: Vec<String> = reports
        .iter()
        .flat_map(|r| &r.errors)
        .filter_map(|e| e.split_once(": ").map(|(id, _)| id.to_owned()))
        .collect();
    let unsure = cancel.is_cancelled()
        || reports.iter().any(|r| {
            r.stopped_early
                || r.error.is_some()
                || r.failed > r.errors.len()
                || selection.limit.is_some_and(|l| r.selected >= l)
        });
    let not_found = if a.select.ids.is_empty() {
        Some(Vec::new())
    } else {
        ids_not_found(
            &a.select.ids,
            reports.iter().flat_map(|r| &r.ids).chain(&failed_ids),
            unsure,
        )
    };
    if g.json() {
        outln!("{}", with_not_found(&reports, not_found.as_ref())?);
    } else {
        warn_not_found(not_found.as_ref());
        for r in &reports {
            let Some(cov) = &r.coverage else {
                // Never read: its error below is all there is to say.
                continue;
            };
            warn_coverage(cov, &warren_topology::dead_queue(&r.group));
            if r.dry_run {
                outln!(
                    "{}: dry run: {} would be replayed ({} read); nothing moved",
                    r.group,
                    r.selected,
                    r.coverage.map_or(0, |c| c.scanned)
                );
                for id in &r.ids {
                    outln!("  {}", esc(id));
                }
            } else {
                outln!(
                    "{}: {} replayed to {}, {} failed (left in the dead-letter queue){}",
                    r.group,
                    r.replayed,
                    if a.to_original {
                        "their original exchange".into()
                    } else {
                        format!("work queue {:?}", r.group)
                    },
                    r.failed,
                    if r.stopped_early {
                        ", stopped early"
                    } else {
                        ""
                    }
                );
                for e in &r.errors {
                    outln!("  error: {}", esc(e));
                }
                if !r.not_removed.is_empty() {
                    outln!(
                        "  {} copied but not removed (still dead letters: a second replay duplicates them): {}",
                        r.not_removed.len(),
                        r.not_removed.iter().map(|id| esc(id)).collect::<Vec<_>>().join(", ")
                    );
                }
                if !r.unconfirmed.is_empty() {
                    outln!(
                        "  {} copied, removal unconfirmed (removed or still dead letters: a second replay duplicates those still there): {}",
                        r.unconfirmed.len(),
                        r.unconfirmed.iter().map(|id| esc(id)).collect::<Vec<_>>().join(", ")
                    );
                }
            }
        }
    }
    // On stderr too: the summary above says what moved before the error.
    for r in &reports {
        match (&r.error, r.coverage) {
            (Some(e), None) => eprintln!("error: {}: {e}", r.group),
            (Some(e), Some(_)) => eprintln!(
                "error: {}: the replay stopped: {e}{}",
                r.group,
                if r.replayed + r.not_removed.len() + r.unconfirmed.len() > 0 {
                    "; what it replayed before is in the summary and the audit record"
                } else {
                    ""
                }
            ),
            (None, _) => {}
        }
    }
    Ok(if let Some(signal) = interrupt.signal() {
        // Stopped by a signal (130 Ctrl-C, 143 SIGTERM): what was replayed
        // is in the summary above.
        ExitCode::from(signal.exit_code())
    } else if failed || not_found.is_some_and(|n| !n.is_empty()) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn purge(g: &Global, a: PurgeArgs) -> anyhow::Result<ExitCode> {
    // As `export - --remove`: deleting waits for the archive to be on disk,
    // which standard output never is.
    if a.archive.as_deref().is_some_and(is_stdio) {
        return Err(UsageError(
            "purge --archive -: dead letters are deleted only once their archive is on disk, and warren cannot know that what it writes to standard output is stored; give --archive a file path (./- for a file named \"-\"), or look first with warren dlq export - (which removes nothing)".into(),
        )
        .into());
    }
    refuse_stdio_audit_log("purge", a.audit_log.as_ref())?;
    let selection = a.select.selection()?;
    let groups = groups(g, &a.read.groups)?;
    if !a.yes && !std::io::stdin().is_terminal() {
        return Err(UsageError(
            "purge asks for confirmation and stdin is not a terminal; add --yes".into(),
        )
        .into());
    }
    check_audit_log(a.audit_log.as_ref())?;
    let mut archive = match &a.archive {
        Some(p) => Some(op::ExportWriter::create_new(p)?),
        None => None,
    };
    let prepared = async {
        let c = conn(g).await?;
        check_groups(g, &c, &a.read.groups).await?;
        let mut pending = Vec::new();
        for group in &groups {
            let p = op::prepare_purge(&c, group, &selection, &read_opts(&a.read), archive.as_mut())
                .await;
            match p {
                Ok(p) => pending.push(p),
                Err(e) => {
                    for p in pending {
                        let _ = p.abort().await;
                    }
                    return Err(e.into());
                }
            }
        }
        anyhow::Ok((c, pending))
    }
    .await;
    // Until something is deleted, a failure leaves no archive behind: the
    // same command, run again once the cause is fixed, must not be refused
    // for a file this run created.
    let (c, pending) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            discard_archive(archive);
            return Err(e);
        }
    };
    let total: usize = pending.iter().map(op::PendingPurge::count).sum();
    for p in &pending {
        warn_coverage(&p.coverage(), &warren_topology::dead_queue(p.group()));
    }
    let not_found = if a.select.ids.is_empty() {
        Some(Vec::new())
    } else {
        let limited = pending
            .iter()
            .any(|p| selection.limit.is_some_and(|l| p.count() >= l));
        ids_not_found(&a.select.ids, pending.iter().flat_map(|p| p.ids()), limited)
    };
    let code = if not_found.as_ref().is_some_and(|n| !n.is_empty()) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    };
    if !g.json() {
        warn_not_found(not_found.as_ref());
    }
    if total == 0 {
        let reports = abort_all(pending).await?;
        discard_archive(archive);
        if g.json() {
            outln!("{}", with_not_found(&reports, not_found.as_ref())?);
        } else {
            outln!("nothing matches; nothing deleted");
        }
        return Ok(code);
    }
    if !a.yes {
        let per: Vec<String> = pending
            .iter()
            .map(|p| {
                format!(
                    "{} from {}",
                    p.count(),
                    warren_topology::dead_queue(p.group())
                )
            })
            .collect();
        eprint!("Delete {total} dead letters ({})? [y/N] ", per.join(", "));
        let _ = std::io::stderr().flush();
        // Off the runtime's thread: Ctrl-C and the broker connection keep
        // being served while the operator thinks.
        let answer = tokio::task::spawn_blocking(|| {
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer).map(|_| answer)
        })
        .await
        .context("reading the answer")?
        .context("reading the answer")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            // Declining is an answer, not a failure: exit 0.
            let reports = abort_all(pending).await?;
            discard_archive(archive);
            if g.json() {
                outln!("{}", with_not_found(&reports, not_found.as_ref())?);
            } else {
                outln!("nothing deleted");
            }
            return Ok(code);
        }
    }
    let (user, host) = whoami();
    let mut reports = Vec::new();
    let mut failed = false;
    for p in pending {
        let (group, coverage) = (p.group().to_owned(), p.coverage());
        let r = match p.commit(archive.as_mut()).await {
            Ok(r) => Some(r),
            // Stopped partway: what was deleted before is recorded.
            Err(op::OperatorError::PurgeIncomplete { report, .. }) => Some(*report),
            // Nothing deleted (the archive could not be synced, ...): every
            // message went back; the other groups still run.
            Err(e) => {
                reports.push(op::PurgeReport {
                    group,
                    coverage,
                    purged: 0,
                    ids: Vec::new(),
                    unconfirmed: Vec::new(),
                    error: Some(e.to_string()),
                });
                None
            }
        };
        if let Some(mut r) = r {
            if let Some(e) = r.error.as_mut() {
                if !c.status().connected() {
                    *e = format!("the connection to the broker was lost ({e})");
                }
                e.push_str(&unconfirmed_text(&r.unconfirmed, &r.group));
            }
            let mut rec = op::AuditRecord::now("purge", &user, &host, &r.group, &selection);
            rec.count = r.purged;
            rec.ids = r.ids.clone();
            rec.error = r.error.clone();
            failed |= !audit(&rec, a.audit_log.as_ref());
            reports.push(r);
        }
    }
    warren_topology::close(&c, "bye").await;
    if g.json() {
        outln!("{}", with_not_found(&reports, not_found.as_ref())?);
    } else {
        for r in &reports {
            match r.unconfirmed.len() {
                0 => outln!("{}: {} purged", r.group, r.purged),
                n => outln!("{}: {} purged ({n} acked, unconfirmed)", r.group, r.purged),
            }
        }
        if let Some(w) = &archive {
            outln!(
                "archived {} messages to {}",
                w.written(),
                w.path().display()
            );
        }
    }
    for r in &reports {
        if let Some(e) = &r.error {
            failed = true;
            eprintln!(
                "error: {}: the purge stopped: {e}; the dead letters it did not delete are still in {}",
                r.group,
                warren_topology::dead_queue(&r.group)
            );
        }
    }
    Ok(if failed { ExitCode::from(1) } else { code })
}

/// What an error adds about the dead letters acked without the broker
/// confirming the acks (`ids`, in the order they were acked): `one` and
/// `many` say what is known of one or several; nothing when there are none.
fn unconfirmed_acks(ids: &[String], one: &str, many: &str) -> String {
    match ids {
        [] => String::new(),
        [id] => format!("; the broker did not confirm the ack of 1 dead letter ({id:?}): {one}"),
        [first, .., last] => format!(
            "; the broker did not confirm the acks of {} dead letters ({first:?} to {last:?}): {many}",
            ids.len()
        ),
    }
}

/// [`unconfirmed_acks`] of a purge.
fn unconfirmed_text(ids: &[String], group: &str) -> String {
    let queue = warren_topology::dead_queue(group);
    unconfirmed_acks(
        ids,
        &format!("it was deleted or is back in {queue:?}"),
        &format!("each of them was deleted or is back in {queue:?}"),
    )
}

/// [`unconfirmed_acks`] of a replay, whose copies were confirmed.
fn unconfirmed_replay_text(ids: &[String], group: &str) -> String {
    let queue = warren_topology::dead_queue(group);
    unconfirmed_acks(
        ids,
        &format!("its copy is in the target, and it was removed or is still in {queue:?} (a second replay duplicates it if it is)"),
        &format!("their copies are in the target, and each of them was removed or is still in {queue:?} (a second replay duplicates those still there)"),
    )
}

/// Removes the archive of a purge that deleted nothing (declined, nothing
/// matched, or stopped by an error before deleting): it holds copies of
/// dead letters that are all still in their queues, so importing it would
/// duplicate them, and the file this run created would make the same
/// command, run again, fail on a file that exists.
fn discard_archive(archive: Option<op::ExportWriter>) {
    if let Some(w) = archive {
        discard_file(w, "the archive of a purge that deleted nothing");
    }
}

/// Removes the file `w` writes (one this run created and has no use for),
/// saying so at WARN when it cannot.
fn discard_file(w: op::ExportWriter, what: &str) {
    let path = w.path().to_owned();
    drop(w);
    if let Err(e) = std::fs::remove_file(&path) {
        warn!(file = %path.display(), error = %e, "{what} could not be removed");
    }
}

/// Puts every held message back (in order) and says, per group, that none
/// was purged.
async fn abort_all(pending: Vec<op::PendingPurge>) -> anyhow::Result<Vec<op::PurgeReport>> {
    let mut reports = Vec::new();
    for p in pending {
        reports.push(op::PurgeReport {
            group: p.group().to_owned(),
            coverage: p.coverage(),
            purged: 0,
            ids: Vec::new(),
            unconfirmed: Vec::new(),
            error: None,
        });
        p.abort().await?;
    }
    Ok(reports)
}

/// Whether a file argument is `-`: standard output or input.
fn is_stdio(file: &std::path::Path) -> bool {
    file.as_os_str() == "-"
}

async fn export(g: &Global, a: ExportArgs) -> anyhow::Result<ExitCode> {
    let to_stdout = is_stdio(&a.file);
    if to_stdout && a.remove {
        return Err(UsageError(
            "export - --remove: messages are removed only once the export is on disk, and warren cannot know that what it writes to standard output is stored; export to a file, or export - without --remove".into(),
        )
        .into());
    }
    let groups = groups(g, &a.read.groups)?;
    let c = conn(g).await?;
    check_groups(g, &c, &a.read.groups).await?;
    let mut out = if to_stdout {
        op::ExportWriter::stdout()
    } else {
        op::ExportWriter::create_new(&a.file)?
    };
    // Per group: its report as JSON (a group that could not be read has
    // one with only its error).
    let mut reports: Vec<serde_json::Value> = Vec::new();
    let mut lines = Vec::new();
    // The first failure stops the export (the file is one for all groups):
    // what the groups before it exported and removed is reported, and what
    // the failing group wrote and removed.
    let mut stopped: Option<String> = None;
    let file = if to_stdout {
        "standard output".to_owned()
    } else {
        a.file.display().to_string()
    };
    for (done, group) in groups.iter().enumerate() {
        let r = match op::export(&c, group, &mut out, a.remove, &read_opts(&a.read)).await {
            Ok(r) => r,
            Err(op::OperatorError::ExportIncomplete { report, source }) => {
                // `warren dlq export - | head`: the reader went away. The
                // scan put every message back; end as `outln!` does.
                if let op::OperatorError::Io { source: io, .. } = &*source {
                    if to_stdout && io.kind() == std::io::ErrorKind::BrokenPipe {
                        warren_topology::close(&c, "bye").await;
                        return Ok(ExitCode::from(crate::out::BROKEN_PIPE as u8));
                    }
                }
                lines.push(export_line(&report, a.remove, true));
                reports.push(serde_json::to_value(&*report)?);
                let e = op::OperatorError::ExportIncomplete { report, source };
                stopped = Some(format!("{e}; the export is {file}"));
                break;
            }
            // Nothing read from this group; the groups before it are done.
            Err(e) if done > 0 => {
                reports.push(serde_json::json!({
                    "group": group,
                    "exported": 0,
                    "removed": 0,
                    "lines": null,
                    "coverage": null,
                    "error": e.to_string(),
                }));
                lines.push(format!("{group}: not exported (stopped by an error)"));
                stopped = Some(format!("{group}: {e}; nothing of it was exported"));
                break;
            }
            // Nothing exported: the file this run created goes, so that
            // the same command can be run again once the cause is fixed
            // (run `warren topology apply`, say).
            Err(e) => {
                if !to_stdout && out.written() == 0 {
                    discard_file(out, "the empty export file");
                }
                warren_topology::close(&c, "bye").await;
                return Err(e.into());
            }
        };
        warn_coverage(&r.coverage, &warren_topology::dead_queue(group));
        lines.push(export_line(&r, a.remove, false));
        reports.push(serde_json::to_value(&r)?);
    }
    warren_topology::close(&c, "bye").await;
    if stopped.is_some() && reports.len() < groups.len() {
        lines.push(format!(
            "not exported (the export stopped before them): {}",
            groups[reports.len()..].join(", ")
        ));
    }
    if !to_stdout {
        lines.push(format!("wrote {}", a.file.display()));
    }
    // With `-`, standard output holds the export and nothing else.
    if g.json() {
        lines = vec![serde_json::to_string_pretty(&reports)?];
    }
    for line in lines {
        if to_stdout {
            eprintln!("{line}");
        } else {
            outln!("{line}");
        }
    }
    match stopped {
        Some(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `billing: 3 exported, 3 removed` (`removed` only with `--remove`;
/// `billing: 3 exported, 0 removed (3 acked, unconfirmed)` when the
/// connection was lost before the broker confirmed the ack).
fn export_line(r: &op::ExportReport, remove: bool, stopped: bool) -> String {
    format!(
        "{}: {} exported{}{}",
        r.group,
        r.exported,
        match (remove, r.unconfirmed) {
            (false, _) => String::new(),
            (true, 0) => format!(", {} removed", r.removed),
            (true, n) => format!(", {} removed ({n} acked, unconfirmed)", r.removed),
        },
        if stopped {
            " (stopped by an error)"
        } else {
            ""
        }
    )
}

async fn import(g: &Global, a: ImportArgs) -> anyhow::Result<ExitCode> {
    let export = if is_stdio(&a.file) {
        op::read_export_from("standard input", std::io::stdin().lock())
    } else {
        op::read_export(&a.file)
    }
    .map_err(|e| UsageError(e.to_string()))?;
    if a.skip > export.line_count() {
        return Err(UsageError(format!(
            "--skip {}: {} has {} lines",
            a.skip,
            export.name(),
            export.line_count()
        ))
        .into());
    }
    let export = export.skip_lines(a.skip);
    let c = conn(g).await?;
    let result = op::import(
        &c,
        &export,
        a.to_group.as_deref(),
        g.url()?.login().as_deref(),
        &op::ReadOptions::default(),
    )
    .await;
    warren_topology::close(&c, "bye").await;
    let (r, source) = match result {
        Ok(r) => (r, None),
        Err(op::OperatorError::ImportIncomplete { report, source }) => (*report, Some(source)),
        // Checked before anything is sent, as the lines `read_export` refuses.
        Err(e @ op::OperatorError::Import { .. }) => return Err(UsageError(e.to_string()).into()),
        Err(e @ op::OperatorError::NameTooLong { .. }) => {
            return Err(UsageError(format!("--to-group: {e}")).into())
        }
        Err(op::OperatorError::NoSuchQueue { queue }) => {
            return Err(no_import_queue(g, &export, a.to_group.as_deref(), &queue))
        }
        Err(e) => return Err(e.into()),
    };
    // How to import the rest: this command again, with the lines imported skipped.
    let resume = r.resume_skip.map(|skip| {
        let mut cmd = format!(
            "warren dlq import {}",
            sh_quote(&a.file.display().to_string())
        );
        if let Some(to) = &a.to_group {
            cmd.push_str(&format!(" --to-group {}", sh_quote(to)));
        }
        format!("{cmd} --skip {skip}")
    });
    if g.json() {
        let mut v = serde_json::to_value(&r)?;
        v["error"] = serde_json::to_value(source.as_ref().map(|e| e.to_string()))?;
        v["resume"] = serde_json::to_value(&resume)?;
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (q, n) in &r.imported {
            outln!("{q}: {n} imported");
        }
        if !r.is_complete() {
            outln!(
                "imported: lines {} ({} messages)",
                op::Lines::list(&r.imported_lines),
                r.total
            );
            outln!(
                "not imported: lines {} ({} refused or not confirmed, {} not sent)",
                op::Lines::list(&r.not_imported_lines),
                r.failed,
                r.not_sent
            );
            for f in &r.failures {
                outln!("  line {} (id {}): {}", f.line, esc(&f.id), esc(&f.error));
            }
            if r.failed > r.failures.len() {
                outln!("  ... and {} more", r.failed - r.failures.len());
            }
        }
    }
    let Some(source) = source else {
        return Ok(ExitCode::SUCCESS);
    };
    match r.failures.first() {
        Some(f) => eprintln!(
            "error: the import stopped at line {} (id {}): {source}",
            f.line,
            esc(&f.id)
        ),
        None => eprintln!("error: the import stopped: {source}"),
    }
    if let Some(cmd) = &resume {
        let again = r.imported_after_resume();
        eprintln!(
            "to import the rest without duplicating what was imported: {cmd}{}{}",
            if is_stdio(&a.file) {
                " (with the same input)"
            } else {
                ""
            },
            if again.is_empty() {
                String::new()
            } else {
                format!(
                    "; lines {} were imported after the first failure and that imports them again (remove them from the file first to avoid duplicates)",
                    op::Lines::list(&again)
                )
            }
        );
    }
    Ok(ExitCode::from(1))
}

/// What to do when an import's target `queue` does not exist (checked
/// before anything is sent), named with what chose it: `--to-group`, or the
/// first line of the file whose group it is (import has no `--group`). As
/// for `--group` elsewhere, a group that is neither in the topology file
/// nor on the broker was named wrong: a usage error (exit 2); a group of
/// the topology file whose queue is missing needs `warren topology apply`
/// (exit 1).
fn no_import_queue(
    g: &Global,
    export: &op::ExportFile,
    to_group: Option<&str>,
    queue: &str,
) -> anyhow::Error {
    let known = file_groups(g);
    let in_file = |group: &str| known.as_ref().is_some_and(|k| k.iter().any(|x| x == group));
    let file = g.topology.display();
    if let Some(to) = to_group {
        if in_file(to) {
            return anyhow::anyhow!(
                "--to-group {to:?}: queue {queue:?} does not exist: {to:?} is a group of {file}: run `warren topology apply` first"
            );
        }
        let why = unknown_group(g, known.as_deref(), "--to-group", to, queue);
        return UsageError(format!("--to-group {to:?}: {why}")).into();
    }
    let first = export
        .messages()
        .iter()
        .zip(export.lines())
        .find(|(m, _)| warren_topology::dead_queue(&m.group) == queue);
    let Some((m, line)) = first else {
        return anyhow::anyhow!(
            "queue {queue:?} does not exist: run `warren topology apply` first, or import the file into another group with --to-group"
        );
    };
    let at = format!("{}:{line}: group {:?}", export.name(), m.group);
    if in_file(&m.group) {
        return anyhow::anyhow!(
            "{at}: queue {queue:?} does not exist: {:?} is a group of {file}: run `warren topology apply` first, or import the file into another group with --to-group",
            m.group
        );
    }
    let why = unknown_group(g, known.as_deref(), "the line's \"group\"", &m.group, queue);
    UsageError(format!(
        "{at}: {why}; import the file into a group that exists with --to-group"
    ))
    .into()
}

/// `s` as one shell word: as it is when it holds only characters a shell
/// leaves alone, else in single quotes.
fn sh_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Events `watch` holds for standard output and the webhook before it drops
/// them with a warning (a reader of standard output that stalls, a slow
/// webhook): the watch itself never waits for either.
const WATCH_EVENTS: usize = 1024;

/// `warren dlq watch`. With `--output json`, standard output is JSON Lines,
/// each written and flushed as it happens (see [`watch_line`]); the log
/// (stderr) is as with table output.
async fn watch(g: &Global, a: WatchArgs) -> anyhow::Result<ExitCode> {
    let groups = groups(g, &a.groups)?;
    // As the other commands do: a `--group` that is neither in the file nor
    // on the broker (a typo) is a usage error, not a watch that warns at
    // every interval. The broker is asked only about groups outside the
    // file: a watch of the file's groups still waits for a broker that is
    // not up yet.
    let in_file: Vec<String> = g
        .topology()
        .map(|t| t.groups.iter().map(|g| g.name.clone()).collect())
        .unwrap_or_default();
    if a.groups.iter().any(|x| !in_file.contains(x)) {
        let c = conn(g).await?;
        let checked = check_groups(g, &c, &a.groups).await;
        warren_topology::close(&c, "groups checked").await;
        checked?;
    }
    let registry = prometheus::Registry::new();
    let metrics = op::Metrics::new(&registry)?;
    let health = crate::serve::Health::default();
    let shutdown = CancellationToken::new();
    let addr =
        crate::serve::spawn(a.metrics_addr, registry, health.clone(), shutdown.clone()).await?;
    let watching = || info!(%addr, groups = %groups.join(","), "watching dead-letter queues; /metrics and /healthz served");
    if g.log_format == crate::cli::LogFormat::Json {
        // Every line of stderr JSON: the event, at every verbosity.
        crate::cli::as_info_event(watching);
    } else {
        watching();
        eprintln!(
            "watching {}; metrics on http://{addr}/metrics",
            groups.join(", ")
        );
    }
    {
        let s = shutdown.clone();
        tokio::spawn(async move {
            crate::signal::wait_for_signal().await;
            s.cancel();
        });
    }
    // Lines for standard output, written on a thread of their own: a
    // reader that stalls blocks that thread, never the runtime.
    let (lines, lines_rx) = std::sync::mpsc::sync_channel::<String>(WATCH_EVENTS);
    let printer = g.json().then(|| {
        std::thread::spawn(move || {
            for line in lines_rx {
                outln!("{line}");
            }
        })
    });
    if g.json() {
        let start = serde_json::json!({
            "event": "watching",
            "groups": groups,
            "metrics": format!("http://{addr}/metrics"),
        });
        let _ = lines.try_send(start.to_string());
    }
    let (alerts, alerts_rx) = tokio::sync::mpsc::channel::<op::Alert>(64);
    let poster = tokio::spawn(post_alerts(a.webhook.clone(), alerts_rx));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<op::WatchEvent>(WATCH_EVENTS);
    let (json, webhook) = (g.json(), a.webhook.is_some());
    let dispatcher = tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            if let Some(line) = json.then(|| watch_line(&event)).flatten() {
                if let Err(std::sync::mpsc::TrySendError::Full(_)) = lines.try_send(line) {
                    warn!("watch --output json: a line was dropped: standard output is not read fast enough");
                }
            }
            if let (op::WatchEvent::Alert(alert), true) = (event, webhook) {
                if let Err(e) = alerts.try_send(alert) {
                    let group = match &e {
                        tokio::sync::mpsc::error::TrySendError::Full(a)
                        | tokio::sync::mpsc::error::TrySendError::Closed(a) => a.group.clone(),
                    };
                    warn!(group = %group, "alert dropped: the webhook lags");
                }
            }
        }
    });
    let opts = op::WatchOptions {
        interval: a.interval,
        ..Default::default()
    };
    let connect_opts = ConnectOptions::new(g.url()?, "operator");
    let ready = |r: bool| health.set_ready(r);
    let result = op::watch(
        &connect_opts,
        &groups,
        &opts,
        &metrics,
        tx,
        &ready,
        &shutdown,
    )
    .await;
    shutdown.cancel();
    // The watch dropped its sender: the dispatcher ends, then the printer
    // and the poster once they wrote and sent what they hold.
    let _ = dispatcher.await;
    let wait = Duration::from_secs(5);
    if let Some(p) = printer {
        let _ = tokio::time::timeout(wait, tokio::task::spawn_blocking(move || p.join())).await;
    }
    let _ = tokio::time::timeout(wait, poster).await;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// POSTs each alert to `webhook` (when there is one).
async fn post_alerts(webhook: Option<String>, mut alerts: tokio::sync::mpsc::Receiver<op::Alert>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build();
    while let Some(alert) = alerts.recv().await {
        let (Some(url), Ok(client)) = (&webhook, &client) else {
            continue;
        };
        match client.post(url).json(&alert).send().await {
            Ok(r) if r.status().is_success() => {
                info!(group = %alert.group, "webhook alert sent")
            }
            Ok(r) => {
                warn!(group = %alert.group, status = %r.status(), "webhook refused the alert")
            }
            Err(e) => warn!(group = %alert.group, error = %e, "webhook alert failed"),
        }
    }
}

/// One line of `watch --output json`: what the table output logs, as JSON.
///
/// - `{"event": "dead_letter", "group", "queue", "position", ...}`: a new
///   dead letter, when it is logged, with the fields `list --output json`
///   gives it (`position` is `null` for one the tap delivered: its place in
///   the queue is not known);
/// - `{"event": "new_dead_letters", "group", "queue", "count", "new",
///   "unread", "oldest_seconds", "at"}`: the measurement that counts them
///   (the webhook's alert without its examples); `new` is the
///   `dead_letter` lines of the group since its previous
///   `new_dead_letters` plus `unread`, those only counted (a queue longer
///   than the read limit, found by growth).
fn watch_line(event: &op::WatchEvent) -> Option<String> {
    #[derive(serde::Serialize)]
    struct Line<'a, T: serde::Serialize> {
        event: &'static str,
        #[serde(flatten)]
        data: &'a T,
    }
    #[derive(serde::Serialize)]
    struct Counts<'a> {
        group: &'a str,
        queue: &'a str,
        count: u64,
        new: u64,
        unread: u64,
        oldest_seconds: Option<u64>,
        at: &'a str,
    }
    match event {
        op::WatchEvent::DeadLetter(d) => serde_json::to_string(&Line {
            event: "dead_letter",
            data: d,
        })
        .ok(),
        op::WatchEvent::Alert(a) => serde_json::to_string(&Line {
            event: "new_dead_letters",
            data: &Counts {
                group: &a.group,
                queue: &a.queue,
                count: a.count,
                new: a.new,
                unread: a.unread,
                oldest_seconds: a.oldest_seconds,
                at: &a.at,
            },
        })
        .ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_regex_error_is_one_line_with_its_place() {
        // Patterns a user might type (not literals: clippy checks those).
        for (pattern, line) in [
            ("ab(", "unclosed group (at character 3)"),
            (
                "a{2,1}",
                "invalid repetition count range, the start must be <= the end (at character 2)",
            ),
        ] {
            let e = warren_operator::Regex::new(pattern)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains('\n'),
                "the regex crate's error spans lines: {e:?}"
            );
            assert_eq!(super::regex_error_line(&e), line, "{e:?}");
        }
        assert_eq!(super::regex_error_line("one line"), "one line");
    }

    use super::*;

    #[test]
    fn esc_writes_control_characters_and_bidi_overrides_as_escapes() {
        assert_eq!(esc("line1\nline2\x1b[31mRED"), r"line1\nline2\x1b[31mRED");
        assert_eq!(esc("a\tb\rc\x07\x7f"), r"a\tb\rc\x07\x7f");
        assert_eq!(esc("\u{9b}2J \u{202e}txt"), r"\u{9b}2J \u{202e}txt");
        // Printable text, backslashes and non-ASCII letters stay as they are.
        assert_eq!(esc(r"C:\dir ünïcode 注文"), r"C:\dir ünïcode 注文");
        // Cut after escaping: the width is what the terminal shows.
        assert_eq!(cell("a\nbcdef", 4), r"a\n…");
    }

    #[test]
    fn the_uid_comes_from_proc_status_and_its_name_from_passwd() {
        let status =
            "Name:\twarren\nUmask:\t0022\nUid:\t1000\t1001\t1000\t1000\nGid:\t0\t0\t0\t0\n";
        assert_eq!(uid_in_status(status), Some(1000));
        assert_eq!(uid_in_status("Name:\tx\n"), None);
        let passwd = "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nops:x:1000:1000::/home/ops:/bin/sh\n";
        assert_eq!(name_in_passwd(passwd, 0).as_deref(), Some("root"));
        assert_eq!(name_in_passwd(passwd, 1000).as_deref(), Some("ops"));
        assert_eq!(name_in_passwd(passwd, 4242), None);
    }

    #[test]
    fn ids_not_found_keeps_the_order_given_once_each_unless_unsure() {
        let asked: Vec<String> = ["b", "x", "a", "x", "y"].map(String::from).to_vec();
        let taken: Vec<String> = ["a", "b"].map(String::from).to_vec();
        assert_eq!(
            ids_not_found(&asked, &taken, false),
            Some(vec!["x".to_owned(), "y".to_owned()])
        );
        assert_eq!(ids_not_found(&asked, &taken, true), None);
        assert_eq!(ids_not_found(&taken, &taken, false), Some(vec![]));
    }

    #[test]
    fn a_resume_command_quotes_what_a_shell_would_split() {
        assert_eq!(sh_quote("/tmp/export-1.jsonl"), "/tmp/export-1.jsonl");
        assert_eq!(sh_quote("my export.jsonl"), "'my export.jsonl'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote("$HOME"), "'$HOME'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn flag_values_are_checked() {
        assert_eq!(scan_limit("1"), Ok(1));
        assert_eq!(scan_limit("65535"), Ok(op::MAX_SCAN_LIMIT));
        assert_eq!(scan_limit("0"), Err("must be at least 1".into()));
        assert!(scan_limit("65536")
            .unwrap_err()
            .starts_with("at most 65535 "));
        assert!(scan_limit("-1").is_err());
        assert_eq!(at_least_one("1"), Ok(1));
        assert_eq!(at_least_one("0"), Err("must be at least 1".into()));
        assert!(at_least_one("-1").is_err());
        assert_eq!(positive_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(positive_duration("0s"), Err("must be longer than 0".into()));
        assert!(webhook_url("https://hooks.example.com/x?y=1").is_ok());
        assert!(webhook_url("http://127.0.0.1:9000/hook").is_ok());
        for bad in [
            "not a url",
            "ftp://example.com/",
            "mailto:ops@example.com",
            "/hook",
        ] {
            assert!(webhook_url(bad).is_err(), "{bad}");
        }
    }
}
