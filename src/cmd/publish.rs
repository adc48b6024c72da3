//! `warren publish`: publish JSON messages with confirms, from `--body`, a
//! JSON Lines file, or stdin; a progress bar and a summary at the end.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use warren_producer::{Message, PublishError, Publisher, PublisherConfig};
use warren_topology::lapin::types::{AMQPValue, FieldTable, ShortString};
use warren_topology::lapin::BasicProperties;
use warren_topology::ConnectOptions;

use crate::cli::{Global, UsageError};

/// Arguments of `warren publish`.
///
/// Every body must be valid JSON; the bytes are published as given. Nothing
/// is published when any line is invalid. Exit 1 when any message was not
/// confirmed (the summary names the lines). Ctrl-C stops sending, waits for
/// the confirms of what was sent, prints the summary (with the first line not
/// sent) and exits 130; a second Ctrl-C quits at once.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The exchange to publish to ("" is the default exchange).
    #[arg(long, short = 'e')]
    pub exchange: String,
    /// The routing key.
    #[arg(long, short = 'k', default_value = "")]
    pub routing_key: String,
    /// The body, one JSON value.
    #[arg(long, conflicts_with = "file")]
    pub body: Option<String>,
    /// A JSON Lines file, one message per line ("-" = stdin; blank lines are
    /// skipped). Without --body or --file, stdin is read.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A header, K=V (repeatable; the value is a string).
    #[arg(long = "header", value_name = "K=V")]
    pub headers: Vec<String>,
    /// An AMQP property, K=V (repeatable): content-type, content-encoding,
    /// correlation-id, reply-to, expiration, message-id, type, user-id,
    /// app-id, priority, delivery-mode, timestamp (seconds).
    #[arg(long = "property", value_name = "K=V")]
    pub properties: Vec<String>,
    /// Publish every message this many times (for load).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// At most this many messages per second (default: as fast as confirms allow).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Unconfirmed messages in flight at most.
    #[arg(long, default_value_t = PublisherConfig::DEFAULT_WINDOW)]
    pub window: usize,
    /// Time allowed per message, from its turn to its confirm.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// One body to publish and where it came from.
struct Line {
    number: usize,
    body: Vec<u8>,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    published: u64,
    confirmed: u64,
    returned: u64,
    nacked: u64,
    failed: u64,
    /// Never handed to the broker (Ctrl-C came first).
    not_sent: u64,
    /// Failed before they were handed to the publisher (in `failed`).
    #[serde(skip)]
    refused: u64,
    elapsed_seconds: f64,
    msgs_per_sec: f64,
    /// Where Ctrl-C stopped the input: this line (of this repeat) and the
    /// ones after it were not sent.
    interrupted_at: Option<Position>,
    failures: Vec<Failure>,
}

#[derive(Debug, Serialize)]
struct Position {
    line: usize,
    repeat: u64,
}

#[derive(Debug, Serialize)]
struct Failure {
    line: usize,
    repeat: u64,
    outcome: &'static str,
    error: String,
}

/// Runs `warren publish`.
pub async fn run(g: &Global, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let url = g.url()?;
    if args.count == 0 {
        return Err(UsageError("--count must be at least 1".into()).into());
    }
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(UsageError(format!("--rate must be a positive number, not {rate}")).into());
        }
    }
    let properties = properties(&args.properties, &args.headers)?;
    let lines = read_lines(&args)?;
    if lines.is_empty() {
        return Err(UsageError("nothing to publish: the input has no message".into()).into());
    }

    let config = PublisherConfig::default()
        .window(args.window)
        .publish_timeout(args.timeout);
    let registry = prometheus::Registry::new();
    let publisher = Publisher::connect(config, ConnectOptions::new(url, "cli"), &registry).await?;

    let total = lines.len() as u64 * args.count;
    let bar = progress(total, args.quiet);
    let mut summary = Summary::default();
    let started = Instant::now();
    let mut pacer = args.rate.map(|r| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    let cancel = crate::signal::interrupt_token(
        "stopping: nothing more is sent; waiting for the confirms of what was sent",
    );
    let mut pending = FuturesUnordered::new();
    'all: for repeat in 0..args.count {
        for line in &lines {
            if let Some(p) = pacer.as_mut() {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = p.tick() => {}
                }
            }
            if cancel.is_cancelled() {
                summary.interrupted_at = Some(Position {
                    line: line.number,
                    repeat,
                });
                break 'all;
            }
            let msg = Message::bytes(&args.exchange, &args.routing_key, line.body.clone())
                .properties(properties.clone());
            let number = line.number;
            match publisher.submit(msg).await {
                Ok(p) => {
                    summary.published += 1;
                    pending.push(async move { (number, repeat, p.wait().await) });
                }
                Err(e) => {
                    summary.refused += 1;
                    record(&mut summary, &bar, number, repeat, Err(e));
                }
            }
            while let Some(Some((n, r, res))) = pending.next().now_or_never() {
                record(&mut summary, &bar, n, r, res);
            }
        }
    }
    // Sent messages are answered (confirmed or failed) before the summary,
    // also after Ctrl-C: each within its --timeout.
    while let Some((n, r, res)) = pending.next().await {
        record(&mut summary, &bar, n, r, res);
    }
    bar.finish_and_clear();
    publisher.close().await;

    let elapsed = started.elapsed().as_secs_f64();
    summary.elapsed_seconds = (elapsed * 1000.0).round() / 1000.0;
    summary.msgs_per_sec = if elapsed > 0.0 {
        (summary.confirmed as f64 / elapsed).round()
    } else {
        0.0
    };
    summary.failures.sort_by_key(|f| (f.line, f.repeat));
    summary.not_sent = total.saturating_sub(summary.published + summary.refused);
    print_summary(g, &summary, args.count > 1)?;
    Ok(if summary.interrupted_at.is_some() {
        ExitCode::from(130)
    } else if summary.confirmed == total {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn record(
    s: &mut Summary,
    bar: &ProgressBar,
    line: usize,
    repeat: u64,
    res: Result<warren_producer::Confirmed, PublishError>,
) {
    bar.inc(1);
    let e = match res {
        Ok(_) => {
            s.confirmed += 1;
            return;
        }
        Err(e) => e,
    };
    let outcome = match e {
        PublishError::Unroutable { .. } => {
            s.returned += 1;
            "returned"
        }
        PublishError::Nacked { .. } => {
            s.nacked += 1;
            "nacked"
        }
        _ => {
            s.failed += 1;
            "failed"
        }
    };
    s.failures.push(Failure {
        line,
        repeat,
        outcome,
        error: e.to_string(),
    });
}

fn print_summary(g: &Global, s: &Summary, repeated: bool) -> anyhow::Result<()> {
    if g.json() {
        outln!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    outln!(
        "published {}  confirmed {}  returned {}  nacked {}  failed {}  in {:.3}s  ({} msgs/s)",
        s.published,
        s.confirmed,
        s.returned,
        s.nacked,
        s.failed,
        s.elapsed_seconds,
        s.msgs_per_sec
    );
    if let Some(at) = &s.interrupted_at {
        if repeated {
            outln!(
                "interrupted: {} not sent, from line {} of repeat {} on",
                s.not_sent,
                at.line,
                at.repeat + 1
            );
        } else {
            outln!(
                "interrupted: {} not sent, from line {} on",
                s.not_sent,
                at.line
            );
        }
    }
    const SHOWN: usize = 20;
    for f in s.failures.iter().take(SHOWN) {
        if repeated {
            outln!(
                "line {} (repeat {}): {}: {}",
                f.line,
                f.repeat + 1,
                f.outcome,
                f.error
            );
        } else {
            outln!("line {}: {}: {}", f.line, f.outcome, f.error);
        }
    }
    if s.failures.len() > SHOWN {
        let mut lines: Vec<usize> = s.failures.iter().map(|f| f.line).collect();
        lines.dedup();
        outln!(
            "... {} more not confirmed; lines not confirmed: {}",
            s.failures.len() - SHOWN,
            lines
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    Ok(())
}

fn progress(total: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {pos}/{len} confirmed-or-failed  {per_sec}  eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// The bodies to publish, each checked to be JSON; an invalid one refuses
/// the whole input before anything is published.
fn read_lines(args: &PublishArgs) -> anyhow::Result<Vec<Line>> {
    if let Some(body) = &args.body {
        check_json(body.as_bytes())
            .map_err(|e| UsageError(format!("--body is not valid JSON: {e}")))?;
        return Ok(vec![Line {
            number: 1,
            body: body.as_bytes().to_vec(),
        }]);
    }
    let (name, reader): (String, Box<dyn BufRead>) = match &args.file {
        Some(p) if p.as_os_str() != "-" => {
            let f = std::fs::File::open(p)
                .map_err(|e| UsageError(format!("cannot read {}: {e}", p.display())))?;
            (
                p.display().to_string(),
                Box::new(std::io::BufReader::new(f)),
            )
        }
        _ => ("stdin".to_owned(), Box::new(std::io::stdin().lock())),
    };
    let mut lines = Vec::new();
    for (i, line) in reader.split(b'\n').enumerate() {
        let number = i + 1;
        let mut body =
            line.map_err(|e| UsageError(format!("cannot read {name} at line {number}: {e}")))?;
        if body.last() == Some(&b'\r') {
            body.pop();
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        check_json(&body).map_err(|e| {
            UsageError(format!(
                "{name}:{number}: not valid JSON ({e}); nothing was published"
            ))
        })?;
        lines.push(Line { number, body });
    }
    Ok(lines)
}

fn check_json(body: &[u8]) -> Result<(), serde_json::Error> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map(|_| ())
}

fn split_kv<'a>(flag: &str, kv: &'a str) -> Result<(&'a str, &'a str), UsageError> {
    kv.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| UsageError(format!("{flag} {kv:?}: expected K=V")))
}

/// Properties from `--property` and `--header`; content-type defaults to
/// application/json (the bodies are JSON).
fn properties(props: &[String], headers: &[String]) -> Result<BasicProperties, UsageError> {
    let mut p = BasicProperties::default();
    let mut content_type = false;
    for kv in props {
        let (k, v) = split_kv("--property", kv)?;
        let s = || ShortString::from(v);
        let num = |max: u64| {
            v.parse::<u64>().ok().filter(|n| *n <= max).ok_or_else(|| {
                UsageError(format!("--property {k}: {v:?} is not a number up to {max}"))
            })
        };
        p = match k.replace('_', "-").to_ascii_lowercase().as_str() {
            "content-type" => {
                content_type = true;
                p.with_content_type(s())
            }
            "content-encoding" => p.with_content_encoding(s()),
            "correlation-id" => p.with_correlation_id(s()),
            "reply-to" => p.with_reply_to(s()),
            "expiration" => p.with_expiration(s()),
            "message-id" => p.with_message_id(s()),
            "type" => p.with_type(s()),
            "user-id" => p.with_user_id(s()),
            "app-id" => p.with_app_id(s()),
            "priority" => p.with_priority(num(255)? as u8),
            "delivery-mode" => p.with_delivery_mode(num(2)? as u8),
            "timestamp" => p.with_timestamp(num(u64::MAX)?),
            other => {
                return Err(UsageError(format!(
                    "--property {other}: unknown; use content-type, content-encoding, correlation-id, reply-to, expiration, message-id, type, user-id, app-id, priority, delivery-mode or timestamp"
                )))
            }
        };
    }
    if !content_type {
        p = p.with_content_type(warren_producer::JSON_CONTENT_TYPE.into());
    }
    if !headers.is_empty() {
        let mut table = FieldTable::default();
        for kv in headers {
            let (k, v) = split_kv("--header", kv)?;
            table.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        p = p.with_headers(table);
    }
    Ok(p)
}
