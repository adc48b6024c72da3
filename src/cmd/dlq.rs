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
    /// replayed.
    Replay(ReplayArgs),
    /// Delete selected dead letters (asks first unless --yes).
    Purge(PurgeArgs),
    /// Write dead letters to a JSON Lines file (non-destructive unless --remove).
    Export(ExportArgs),
    /// Put an export back into the dead-letter queues.
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
    /// Read at most this many messages per queue (bounds memory; at most 65535).
    #[arg(long, default_value_t = op::DEFAULT_SCAN_LIMIT)]
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
    /// An error kind: retryable, permanent, timeout, panic, decode, broker.
    #[arg(long)]
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
    /// Take at most this many per group.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Every dead letter (required when no other criterion is given).
    #[arg(long)]
    pub all: bool,
}

impl SelectArgs {
    fn selection(&self) -> anyhow::Result<op::Selection> {
        let error = match &self.error {
            Some(re) => {
                Some(op::Regex::new(re).map_err(|e| UsageError(format!("--error {re:?}: {e}")))?)
            }
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
    /// At most this many messages per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Show what would be replayed; move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Append an audit record (JSON Lines) to this file.
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
    /// Write what is deleted (export format) to this new file first.
    #[arg(long)]
    pub archive: Option<PathBuf>,
    /// Append an audit record (JSON Lines) to this file.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
}

/// `export FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The file to write (must not exist).
    pub file: PathBuf,
    #[command(flatten)]
    read: ReadArgs,
    /// Remove the exported messages from the queue (after the file is on disk).
    #[arg(long)]
    pub remove: bool,
}

/// `import FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// An export file.
    pub file: PathBuf,
    /// Put every message into this group's dead-letter queue instead of its own.
    #[arg(long)]
    pub to_group: Option<String>,
}

/// `watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// A group (repeatable); default: every group of the topology file.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// Time between measurements.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Where /metrics and /healthz are served.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub metrics_addr: SocketAddr,
    /// POST a JSON alert here when a group gains dead letters.
    #[arg(long)]
    pub webhook: Option<String>,
}

/// Runs `warren dlq ...`.
pub async fn run(g: &Global, cmd: DlqCmd) -> anyhow::Result<ExitCode> {
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
/// unread.
fn warn_partial(c: &op::Coverage, queue: &str) {
    if c.scan_limit_reached {
        eprintln!("warning: {queue}: {c} (raise --scan-limit to read more)");
    }
}

async fn stats(g: &Global, a: ReadArgs) -> anyhow::Result<ExitCode> {
    let groups = groups(g, &a.groups)?;
    let c = conn(g).await?;
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
        if s.count == 0 {
            continue;
        }
        let kinds: Vec<String> = s.by_kind.iter().map(|(k, n)| format!("{k}={n}")).collect();
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
                f.fingerprint,
                f.kind,
                cut(&f.example, 90)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(g: &Global, a: ReadArgs) -> anyhow::Result<ExitCode> {
    let groups = groups(g, &a.groups)?;
    let c = conn(g).await?;
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
        outln!("{} ({} messages)", l.queue, l.coverage.total);
        if l.messages.is_empty() {
            continue;
        }
        outln!(
            "  {:<38}  {:>8}  {:>3}  {:<9}  {:<24}  {:>7}  error",
            "id",
            "age",
            "att",
            "kind",
            "routing key",
            "size"
        );
        for m in &l.messages {
            outln!(
                "  {:<38}  {:>8}  {:>3}  {:<9}  {:<24}  {:>7}  {}",
                cut(&m.info.id, 38),
                age(m.age_seconds),
                m.info.attempts,
                m.info.kind,
                cut(m.info.original_routing_key.as_deref().unwrap_or("-"), 24),
                m.info.size,
                cut(&m.info.error, 80)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn body_view(body: &[u8]) -> serde_json::Value {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        return serde_json::json!({ "json": v });
    }
    match std::str::from_utf8(body) {
        Ok(t) => serde_json::json!({ "text": t }),
        Err(_) => {
            serde_json::json!({ "hex": body.iter().map(|b| format!("{b:02x}")).collect::<String>() })
        }
    }
}

async fn show(g: &Global, a: ShowArgs) -> anyhow::Result<ExitCode> {
    let groups = groups(g, &a.read.groups)?;
    let c = conn(g).await?;
    let mut found = Vec::new();
    for group in &groups {
        let (ds, cov) = op::show(&c, group, &a.id, &read_opts(&a.read)).await?;
        if ds.is_empty() {
            warn_partial(&cov, &warren_topology::dead_queue(group));
        }
        found.extend(ds);
    }
    warren_topology::close(&c, "bye").await;
    if found.is_empty() {
        eprintln!("no dead letter with id {:?} in {}", a.id, groups.join(", "));
        return Ok(ExitCode::from(1));
    }
    let views: Vec<serde_json::Value> = found
        .iter()
        .map(|d| {
            let mut props =
                serde_json::to_value(op::ExportedProperties::of(&d.properties)).unwrap_or_default();
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
        for v in views {
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn whoami() -> (String, String) {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into());
    (user, host)
}

fn audit(rec: &op::AuditRecord, file: Option<&PathBuf>) -> anyhow::Result<()> {
    info!(target: "warren::audit", action = %rec.action, user = %rec.user, host = %rec.host,
        group = %rec.group, count = rec.count, dry_run = rec.dry_run,
        selection = %serde_json::to_string(&rec.selection).unwrap_or_default(),
        ids = %rec.ids.join(","), "audit");
    if let Some(f) = file {
        rec.append_to(f)?;
    }
    Ok(())
}

/// Opens (creates) the audit log for appending before anything is touched:
/// a record that cannot be written must stop the run, not follow it.
fn check_audit_log(file: Option<&PathBuf>) -> anyhow::Result<()> {
    if let Some(f) = file {
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(f)
            .map_err(|e| UsageError(format!("--audit-log {}: {e}", f.display())))?;
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

fn ctrl_c_token() -> CancellationToken {
    crate::signal::interrupt_token("stopping after the current message (Ctrl-C)")
}

async fn replay(g: &Global, a: ReplayArgs) -> anyhow::Result<ExitCode> {
    let selection = a.select.selection()?;
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
        ..Default::default()
    };
    let c = conn(g).await?;
    let metrics = op::Metrics::unregistered();
    let cancel = ctrl_c_token();
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
        let r = r?;
        let mut rec = op::AuditRecord::now("replay", &user, &host, group, &selection);
        rec.target = Some(if a.to_original {
            "original".into()
        } else {
            "work-queue".into()
        });
        rec.dry_run = a.dry_run;
        rec.count = if a.dry_run { 0 } else { r.replayed };
        rec.ids = r.ids.clone();
        audit(&rec, a.audit_log.as_ref())?;
        failed |= r.failed > 0 || r.stopped_early;
        reports.push(r);
    }
    warren_topology::close(&c, "bye").await;
    if g.json() {
        outln!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            if let Some(cov) = &r.coverage {
                warn_partial(cov, &warren_topology::dead_queue(&r.group));
            }
            if r.dry_run {
                outln!(
                    "{}: dry run: {} would be replayed ({} read); nothing moved",
                    r.group,
                    r.selected,
                    r.coverage.map_or(0, |c| c.scanned)
                );
                for id in &r.ids {
                    outln!("  {id}");
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
                    outln!("  error: {e}");
                }
            }
        }
    }
    Ok(if cancel.is_cancelled() {
        // Stopped by Ctrl-C: what was replayed is in the summary above.
        ExitCode::from(130)
    } else if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn purge(g: &Global, a: PurgeArgs) -> anyhow::Result<ExitCode> {
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
    let c = conn(g).await?;
    let mut pending = Vec::new();
    for group in &groups {
        let p =
            op::prepare_purge(&c, group, &selection, &read_opts(&a.read), archive.as_mut()).await;
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
    let total: usize = pending.iter().map(op::PendingPurge::count).sum();
    for p in &pending {
        warn_partial(&p.coverage(), &warren_topology::dead_queue(p.group()));
    }
    if total == 0 {
        for p in pending {
            p.abort().await?;
        }
        outln!("nothing matches; nothing deleted");
        return Ok(ExitCode::SUCCESS);
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
            for p in pending {
                p.abort().await?;
            }
            outln!("nothing deleted");
            return Ok(ExitCode::from(1));
        }
    }
    let (user, host) = whoami();
    let mut reports = Vec::new();
    for p in pending {
        let r = p.commit(archive.as_mut()).await?;
        let mut rec = op::AuditRecord::now("purge", &user, &host, &r.group, &selection);
        rec.count = r.purged;
        rec.ids = r.ids.clone();
        audit(&rec, a.audit_log.as_ref())?;
        reports.push(r);
    }
    warren_topology::close(&c, "bye").await;
    if g.json() {
        outln!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            outln!("{}: {} purged", r.group, r.purged);
        }
        if let Some(w) = &archive {
            outln!(
                "archived {} messages to {}",
                w.written(),
                w.path().display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn export(g: &Global, a: ExportArgs) -> anyhow::Result<ExitCode> {
    let groups = groups(g, &a.read.groups)?;
    let mut out = op::ExportWriter::create_new(&a.file)?;
    let c = conn(g).await?;
    let mut reports = Vec::new();
    for group in &groups {
        let r = op::export(&c, group, &mut out, a.remove, &read_opts(&a.read)).await?;
        warn_partial(&r.coverage, &warren_topology::dead_queue(group));
        reports.push(r);
    }
    warren_topology::close(&c, "bye").await;
    if g.json() {
        outln!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            outln!(
                "{}: {} exported{}",
                r.group,
                r.exported,
                if a.remove {
                    format!(", {} removed", r.removed)
                } else {
                    String::new()
                }
            );
        }
        outln!("wrote {}", a.file.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn import(g: &Global, a: ImportArgs) -> anyhow::Result<ExitCode> {
    let messages = op::read_export(&a.file).map_err(|e| UsageError(e.to_string()))?;
    let c = conn(g).await?;
    let r = op::import(
        &c,
        &messages,
        a.to_group.as_deref(),
        &op::ReadOptions::default(),
    )
    .await?;
    warren_topology::close(&c, "bye").await;
    if g.json() {
        outln!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for (q, n) in &r.imported {
            outln!("{q}: {n} imported");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn watch(g: &Global, a: WatchArgs) -> anyhow::Result<ExitCode> {
    let groups = groups(g, &a.groups)?;
    let registry = prometheus::Registry::new();
    let metrics = op::Metrics::new(&registry)?;
    let health = crate::serve::Health::default();
    let shutdown = CancellationToken::new();
    let addr =
        crate::serve::spawn(a.metrics_addr, registry, health.clone(), shutdown.clone()).await?;
    info!(%addr, groups = %groups.join(","), "watching dead-letter queues; /metrics and /healthz served");
    eprintln!(
        "watching {}; metrics on http://{addr}/metrics",
        groups.join(", ")
    );
    {
        let s = shutdown.clone();
        tokio::spawn(async move {
            crate::signal::wait_for_signal().await;
            s.cancel();
        });
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<op::Alert>(64);
    let webhook = a.webhook.clone();
    let poster = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build();
        while let Some(alert) = rx.recv().await {
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
    let _ = tokio::time::timeout(Duration::from_secs(5), poster).await;
    result?;
    Ok(ExitCode::SUCCESS)
}
