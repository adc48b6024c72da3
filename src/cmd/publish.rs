//! `warren publish`: publish JSON messages with confirms, from `--body`, a
//! JSON Lines file, or stdin; a progress bar and a summary at the end.

use std::fmt;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use warren_producer::{Message, PublishError, Publisher, PublisherConfig};
use warren_topology::lapin::types::{AMQPValue, FieldTable, ShortString};
use warren_topology::lapin::BasicProperties;
use warren_topology::ConnectOptions;

use crate::cli::{Global, UsageError};

/// The end of `warren publish --help`: what a script reads in the exit code.
const PUBLISH_AFTER_HELP: &str = "\
Exit codes: 0 every message confirmed; 1 a message not confirmed (returned: \
unroutable; nacked; failed: the summary names its line) or a failure (such as \
the broker not answering); 2 bad usage or input, nothing sent (invalid JSON, a \
flag the broker would refuse); 130 (Ctrl-C) or 143 (SIGTERM): nothing more was \
sent, the confirms of what was sent were awaited and the summary says what was \
not sent (a second signal quits at once).";

/// Arguments of `warren publish`.
///
/// Every body must be valid JSON (UTF-8, no lone surrogates) and at most
/// `--max-message-size`; the bytes are published as given. Nothing is
/// published when any line is invalid, and flags the broker would refuse
/// (names and properties over 255 bytes, a bad expiration or delivery mode)
/// are refused before connecting (exit 2). Exit 1 when any message was not
/// confirmed (the summary names the lines). Ctrl-C stops sending, waits for
/// the confirms of what was sent, prints the summary (with the first line not
/// sent) and exits 130; SIGTERM does the same and exits 143. A second
/// signal quits at once.
#[derive(Debug, clap::Args)]
#[command(after_long_help = PUBLISH_AFTER_HELP)]
pub struct PublishArgs {
    /// The exchange to publish to ("" is the default exchange; at most 255 bytes).
    #[arg(long, short = 'e')]
    pub exchange: String,
    /// The routing key (at most 255 bytes).
    #[arg(long, short = 'k', default_value = "")]
    pub routing_key: String,
    /// The body, one JSON value.
    #[arg(long, conflicts_with = "file")]
    pub body: Option<String>,
    /// A JSON Lines file, one message per line ("-" = stdin; blank lines are
    /// skipped). Without --body or --file, stdin is read.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A header (repeatable; the name at most 255 bytes): K=V sends the
    /// string V; K:=JSON sends a typed value, as a headers exchange binding
    /// or a consumer may need: 5 is an integer (64-bit), 1.5 a double, true
    /// a boolean, null void, "5" a string, [..] an array, {..} a table.
    #[arg(long = "header", value_name = "K=V|K:=JSON")]
    pub headers: Vec<String>,
    /// An AMQP property, K=V (repeatable): content-type, content-encoding,
    /// correlation-id, reply-to, expiration (milliseconds), message-id, type,
    /// user-id, app-id, priority (0-255), delivery-mode (1 transient, 2
    /// persistent), timestamp (seconds since 1970, or RFC 3339 such as
    /// 2024-01-02T03:04:05Z). String values are at most 255
    /// bytes. RabbitMQ refuses a user-id other than the connection's user
    /// unless that user has the impersonator tag.
    #[arg(long = "property", value_name = "K=V")]
    pub properties: Vec<String>,
    /// Publish every message this many times (for load).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// At most this many messages per second (from 0.000000001, one every 31
    /// years, up; default: as fast as confirms allow); after a stall, the schedule starts again rather than catching
    /// up in a burst.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Unconfirmed messages in flight at most.
    #[arg(long, default_value_t = PublisherConfig::DEFAULT_WINDOW)]
    pub window: usize,
    /// Time allowed per message, from its turn to its confirm (more than 0).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Largest body, in bytes (or with KiB, MiB: "64MiB"); a larger one
    /// refuses the input. Up to the broker's own max_message_size (128 MiB
    /// by default in RabbitMQ 3.8 to 3.13, 16 MiB from 4.0), at most 512 MiB.
    #[arg(long, value_name = "BYTES", default_value_t = PublisherConfig::DEFAULT_MAX_MESSAGE_SIZE, value_parser = parse_size)]
    pub max_message_size: usize,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// One body to publish and where it came from.
#[derive(Clone)]
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
    /// Confirmed after being sent more than once (the connection or channel
    /// was lost before their confirm): the queue may hold two copies of
    /// each (at-least-once).
    resent: u64,
    /// Failed before they were handed to the publisher (in `failed`).
    #[serde(skip)]
    refused: u64,
    elapsed_seconds: f64,
    msgs_per_sec: f64,
    /// Where Ctrl-C stopped the input: this line (of this repeat) and the
    /// ones after it were not sent.
    interrupted_at: Option<Position>,
    /// Why sending stopped before the end when the input file changed
    /// while it was being published (it is read again for each pass).
    input_changed: Option<String>,
    /// Every message not confirmed, by line, then repeat.
    failures: Vec<Failure>,
}

/// A message of the input: `line` of the input (from 1, blank lines
/// counted) in its `repeat`th pass of `--count` (from 1). The JSON summary
/// and the table print the same numbers.
#[derive(Debug, Serialize)]
struct Position {
    line: usize,
    repeat: u64,
}

/// A message not confirmed; `line` and `repeat` count from 1, as in
/// [`Position`].
#[derive(Debug, Serialize)]
struct Failure {
    line: usize,
    repeat: u64,
    outcome: &'static str,
    error: String,
}

/// Runs `warren publish`. With `--output json`, a failure before the
/// summary (a usage error, a refused connection) prints `{"error": ...}`
/// (see [`crate::cli::error_json`]), so that stdout is one JSON document on
/// every path; the exit code is the same either way.
pub async fn run(g: &Global, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let result = publish(g, args).await;
    if g.json() {
        if let Err(e) = &result {
            if !crate::out::wrote_anything() {
                let doc = serde_json::json!({ "error": crate::cli::error_json(e) });
                outln!("{}", serde_json::to_string(&doc)?);
            }
        }
    }
    result
}

async fn publish(g: &Global, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let url = g.url()?;
    if args.count == 0 {
        return Err(UsageError("--count must be at least 1".into()).into());
    }
    // The wait between two messages must be a duration the clock can add.
    crate::cli::check_rate(args.rate)?;
    if args.timeout.is_zero() {
        return Err(UsageError("--timeout must be more than 0s".into()).into());
    }
    if args.window == 0 {
        return Err(UsageError("--window must be at least 1".into()).into());
    }
    short_string("--exchange", "", &args.exchange)?;
    short_string("--routing-key", "", &args.routing_key)?;
    let properties = properties(&args.properties, &args.headers, url.login().as_deref())?;
    for w in warren_header_warnings(&properties) {
        eprintln!("warning: {w}");
    }
    // The frame the connection asks for (the URL's frame_max, or warren's
    // default): the broker may allow less, checked once connected.
    let asked =
        warren_topology::Broker::new(ConnectOptions::new(url.clone(), "publish")).frame_max();
    check_frame(&properties, asked, FrameOf::Asked)?;
    let input = read_input(&args)?;
    if input.messages() == 0 {
        return Err(UsageError("nothing to publish: the input has no message".into()).into());
    }

    let config = PublisherConfig::default()
        .window(args.window)
        .publish_timeout(args.timeout)
        .max_message_size(args.max_message_size);
    let registry = prometheus::Registry::new();
    // A connection error is warren-topology's, with its kind and facts.
    let publisher = Publisher::connect(config, ConnectOptions::new(url, "publish"), &registry)
        .await
        .map_err(|e| match e {
            PublishError::Connect(e) => anyhow::Error::new(e),
            e => anyhow::Error::new(e),
        })?;

    let allowed = publisher.broker().frame_max();
    if allowed < asked {
        if let Err(e) = check_frame(&properties, allowed, FrameOf::Allowed) {
            publisher.close().await;
            return Err(e.into());
        }
    }

    let total = input.messages() as u64 * args.count;
    let bar = progress(total, args.quiet);
    let mut summary = Summary::default();
    let started = Instant::now();
    let mut pacer = args.rate.map(Pacer::new);
    let interrupt = crate::signal::interrupt(
        "stopping: nothing more is sent; waiting for the confirms of what was sent",
    );
    let cancel = interrupt.token();
    let mut pending = FuturesUnordered::new();
    'all: for repeat in 1..=args.count {
        let mut sent = 0;
        for line in input.pass() {
            let line = match line {
                Ok(line) if sent < input.messages() => line,
                Ok(line) => {
                    summary.input_changed = Some(format!(
                        "line {} is a message it did not have when it was checked",
                        line.number
                    ));
                    break 'all;
                }
                Err(why) => {
                    summary.input_changed = Some(why);
                    break 'all;
                }
            };
            sent += 1;
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
            let msg = Message::bytes(&args.exchange, &args.routing_key, line.body)
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
        if sent < input.messages() && !cancel.is_cancelled() {
            summary.input_changed = Some(format!(
                "it has {sent} messages now, {} when it was checked",
                input.messages()
            ));
            break;
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
    if let Some(why) = &summary.input_changed {
        eprintln!(
            "error: {} changed while it was being published: {why}; nothing more was sent (see \
             the summary for what was)",
            input.name()
        );
        return Ok(ExitCode::from(1));
    }
    // Stopped by a signal: 128 + its number, 130 for Ctrl-C, 143 for SIGTERM.
    Ok(match interrupt.signal() {
        Some(signal) if summary.interrupted_at.is_some() => ExitCode::from(signal.exit_code()),
        _ if summary.confirmed == total => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// Paces sends to at most a rate. A send that comes late (the process was
/// stopped, the window was full, the connection was being restored) moves
/// the schedule instead of being made up for: the ones missed are never sent
/// in a burst. Lateness within [`Pacer::SLACK`] is made up for, so that
/// rates above the timer's millisecond resolution are reached.
struct Pacer {
    period: Duration,
    next: tokio::time::Instant,
}

impl Pacer {
    const SLACK: Duration = Duration::from_millis(10);

    /// `rate`: at least [`crate::cli::MIN_RATE`], as `--rate` is checked.
    fn new(rate: f64) -> Pacer {
        Pacer {
            period: Duration::from_secs_f64(1.0 / rate),
            next: tokio::time::Instant::now(),
        }
    }

    /// Waits for the next send's turn.
    async fn tick(&mut self) {
        let now = tokio::time::Instant::now();
        if now > self.next + Self::SLACK {
            self.next = now;
        }
        if self.next > now {
            tokio::time::sleep_until(self.next).await;
        }
        self.next += self.period;
    }
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
        Ok(c) => {
            s.confirmed += 1;
            if c.attempts > 1 {
                s.resent += 1;
            }
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
        error: error_text(&e),
    });
}

/// What a failure says, in the command line's words: a body the broker
/// refused as over its `max_message_size` names `--max-message-size`
/// where the library's text names `PublisherConfig`; the rest of the
/// library's text is kept.
fn error_text(e: &PublishError) -> String {
    let text = e.to_string();
    match e {
        PublishError::MessageRefused { reason, .. } if reason.contains("message size") => {
            match text.split_once(" max_message_size: set PublisherConfig::") {
                Some((head, _)) => format!(
                    "{head} max_message_size: keep --max-message-size within it (128 MiB by \
                     default in RabbitMQ 3.x), and such a body is refused before anything is sent"
                ),
                None => text,
            }
        }
        _ => text,
    }
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
    if s.resent > 0 {
        outln!(
            "resent {} after a lost connection: the queue may hold up to {} more than were confirmed (at-least-once)",
            s.resent,
            s.resent
        );
    }
    if let Some(at) = &s.interrupted_at {
        if repeated {
            outln!(
                "interrupted: {} not sent, from line {} of repeat {} on",
                s.not_sent,
                at.line,
                at.repeat
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
                f.repeat,
                f.outcome,
                f.error
            );
        } else {
            outln!("line {}: {}: {}", f.line, f.outcome, f.error);
        }
    }
    if s.failures.len() > SHOWN {
        let mut lines: Vec<usize> = s.failures.iter().map(|f| f.line).collect();
        lines.sort_unstable();
        lines.dedup();
        outln!(
            "... {} more not confirmed; lines not confirmed: {}",
            s.failures.len() - SHOWN,
            ranges(&lines)
        );
    }
    Ok(())
}

/// Sorted line numbers as ranges: `1-3,5,7-9`.
fn ranges(lines: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut rest = lines.iter().copied().peekable();
    while let Some(first) = rest.next() {
        let mut last = first;
        while rest.peek() == Some(&(last + 1)) {
            last += 1;
            rest.next();
        }
        out.push(if last == first {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    out.join(",")
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

/// The messages to publish, every one checked to be JSON within the size
/// limit before anything is sent.
enum Input {
    /// `--body`, or what stdin (or a pipe named as `--file`) gave: kept.
    Kept { name: String, lines: Vec<Line> },
    /// A regular file: read again for each pass of `--count` rather than
    /// kept, so that a file larger than memory can be published. Each line
    /// is checked again as it is read: if the file changed meanwhile,
    /// sending stops there.
    File {
        path: PathBuf,
        name: String,
        limit: usize,
        messages: usize,
    },
}

impl Input {
    fn messages(&self) -> usize {
        match self {
            Input::Kept { lines, .. } => lines.len(),
            Input::File { messages, .. } => *messages,
        }
    }

    /// `--body`, `stdin` or the file's path, as errors name it.
    fn name(&self) -> &str {
        match self {
            Input::Kept { name, .. } | Input::File { name, .. } => name,
        }
    }

    /// One pass over the messages, in order.
    /// One pass over the messages, in order; an error says what no longer
    /// reads as it did when it was checked.
    fn pass(&self) -> Box<dyn Iterator<Item = Result<Line, String>> + '_> {
        match self {
            Input::Kept { lines, .. } => Box::new(lines.iter().cloned().map(Ok)),
            Input::File {
                path, name, limit, ..
            } => match std::fs::File::open(path) {
                Ok(f) => Box::new(
                    checked_lines(std::io::BufReader::new(f), name.clone(), *limit)
                        .map(|l| l.map_err(|e| e.what)),
                ),
                Err(e) => Box::new(std::iter::once(Err(format!("cannot read it again: {e}")))),
            },
        }
    }
}

/// The bodies to publish, each checked to be JSON; an invalid one refuses
/// the whole input before anything is published. A regular file is read
/// through here and again for each pass ([`Input::File`]); stdin is kept.
fn read_input(args: &PublishArgs) -> anyhow::Result<Input> {
    let limit = args.max_message_size;
    if let Some(body) = &args.body {
        check_size(body.len(), limit).map_err(|e| UsageError(format!("--body: {e}")))?;
        check_json(body.as_bytes()).map_err(|e| {
            let hint = plain_text(body.as_bytes()).map_or(String::new(), |quoted| {
                let quoted = quoted
                    .filter(|q| !q.contains('\''))
                    .unwrap_or_else(|| "\"some text\"".into());
                format!(
                    "; warren publish sends JSON bodies: send text as a JSON string, in quotes: \
                     --body '{quoted}'"
                )
            });
            UsageError(format!("--body is not valid JSON: {e}{hint}"))
        })?;
        return Ok(Input::Kept {
            name: "--body".into(),
            lines: vec![Line {
                number: 1,
                body: body.as_bytes().to_vec(),
            }],
        });
    }
    let (name, reader, file): (String, Box<dyn BufRead>, Option<&PathBuf>) = match &args.file {
        Some(p) if p.as_os_str() != "-" => {
            let f = std::fs::File::open(p)
                .map_err(|e| UsageError(format!("cannot read {}: {e}", p.display())))?;
            let regular = f.metadata().is_ok_and(|m| m.is_file());
            (
                p.display().to_string(),
                Box::new(std::io::BufReader::new(f)),
                regular.then_some(p),
            )
        }
        _ => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                // Reading a terminal waits for the user: say what for.
                eprintln!("reading messages from the terminal, one JSON document per line; end with Ctrl-D (or give --body or --file)");
            }
            ("stdin".to_owned(), Box::new(stdin.lock()), None)
        }
    };
    let mut lines =
        checked_lines(reader, name.clone(), limit).map(|l| l.map_err(BadLine::before_sending));
    Ok(match file {
        Some(path) => {
            let mut messages = 0;
            for line in lines.by_ref() {
                line?;
                messages += 1;
            }
            Input::File {
                path: path.clone(),
                name,
                limit,
                messages,
            }
        }
        None => Input::Kept {
            lines: lines.collect::<Result<_, _>>()?,
            name,
        },
    })
}

/// A line of the input that cannot be published: `what` names the input,
/// the line and what is wrong; `hint` says how to write it.
struct BadLine {
    what: String,
    /// Refused as a whole (`false`: the input could not be read).
    refused: bool,
    hint: String,
}

impl BadLine {
    /// As the check before sending says it: nothing was published.
    fn before_sending(self) -> UsageError {
        if self.refused {
            UsageError(format!("{}; nothing was published{}", self.what, self.hint))
        } else {
            UsageError(self.what)
        }
    }
}

/// The messages of JSON Lines input, each checked (within `limit`, JSON),
/// blank lines skipped; errors name `name` and the line.
fn checked_lines(
    reader: impl BufRead,
    name: String,
    limit: usize,
) -> impl Iterator<Item = Result<Line, BadLine>> {
    reader
        .split(b'\n')
        .enumerate()
        .filter_map(move |(i, line)| checked_line(&name, i + 1, line, limit).transpose())
}

/// Line `number` of the input checked: `None` when it is blank.
fn checked_line(
    name: &str,
    number: usize,
    line: std::io::Result<Vec<u8>>,
    limit: usize,
) -> Result<Option<Line>, BadLine> {
    let mut body = line.map_err(|e| BadLine {
        what: format!("cannot read {name} at line {number}: {e}"),
        refused: false,
        hint: String::new(),
    })?;
    if body.last() == Some(&b'\r') {
        body.pop();
    }
    // RFC 8259 lets a parser ignore a byte order mark before a JSON
    // text; Windows tools write one.
    if body.starts_with(UTF8_BOM) {
        body.drain(..UTF8_BOM.len());
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    check_size(body.len(), limit).map_err(|e| BadLine {
        what: format!("{name}:{number}: {e}"),
        refused: true,
        hint: String::new(),
    })?;
    check_json(&body).map_err(|e| {
        // The line is one JSON text: its line is the file's, its column ours.
        let text = e.to_string();
        let at = format!(" at line {} column {}", e.line(), e.column());
        let what = text.strip_suffix(&at).unwrap_or(&text);
        let hint = plain_text(&body).map_or(String::new(), |quoted| {
            let quoted = quoted.unwrap_or_else(|| "\"some text\"".into());
            format!(
                " (every line is one JSON value: send text as a JSON string, in quotes: \
                 {quoted})"
            )
        });
        BadLine {
            what: format!("{name}:{number}:{}: not valid JSON: {what}", e.column()),
            refused: true,
            hint,
        }
    })?;
    Ok(Some(Line { number, body }))
}

/// When `body` (not valid JSON) is not even the start of a JSON value,
/// such as `hello` or `order 5 paid`, it is text someone meant to send:
/// `Some` of that text as a JSON string when it is short enough to show
/// (60 bytes, UTF-8), else `Some(None)`. `None` for what starts as JSON
/// does (`{bad`, `[1,`, `"open`, `5 apples`, `true x`): the parser's
/// words say what is wrong there.
fn plain_text(body: &[u8]) -> Option<Option<String>> {
    const SHOWN: usize = 60;
    let text = body.trim_ascii();
    let json_start = |b: &u8| b"{[\"-0123456789".contains(b);
    let literal = [&b"true"[..], b"false", b"null"]
        .iter()
        .any(|l| text.starts_with(l));
    if text.first().is_none_or(json_start) || literal {
        return None;
    }
    Some(
        std::str::from_utf8(text)
            .ok()
            .filter(|t| t.len() <= SHOWN)
            .and_then(|t| serde_json::to_string(t).ok()),
    )
}

/// The UTF-8 byte order mark, U+FEFF.
const UTF8_BOM: &[u8] = b"\xef\xbb\xbf";

/// Whether `body` is JSON as `serde_json::Value` parsing sees it: UTF-8,
/// every string decoded (a lone surrogate such as `"\ud800"` is an error,
/// which `IgnoredAny` lets through), numbers in range; nothing is built.
fn check_json(body: &[u8]) -> Result<(), serde_json::Error> {
    serde_json::from_slice::<Json>(body).map(|_| ())
}

/// A JSON value walked, not kept (see [`check_json`]).
struct Json;

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Json, E> {
        Ok(Json)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Json, E> {
        Ok(Json)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Json, E> {
        Ok(Json)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Json, E> {
        Ok(Json)
    }
    fn visit_str<E>(self, _: &str) -> Result<Json, E> {
        Ok(Json)
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        while seq.next_element::<Json>()?.is_some() {}
        Ok(Json)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        while map.next_entry::<Json, Json>()?.is_some() {}
        Ok(Json)
    }
}

/// AMQP short strings (names, routing keys, header names, most properties)
/// are at most this many bytes.
const SHORT_STRING_MAX: usize = 255;

/// The largest `--max-message-size`: RabbitMQ's own ceiling for its
/// `max_message_size` setting.
const MAX_MESSAGE_SIZE_CEILING: usize = 512 * 1024 * 1024;

/// `value` as a short string, or an error naming the flag and the limit.
fn short_string(flag: &str, what: &str, value: &str) -> Result<ShortString, UsageError> {
    ShortString::try_new(value).map_err(|_| {
        let shown: String = value.chars().take(32).collect();
        UsageError(format!(
            "{flag}{what} is {} bytes ({shown:?}...); AMQP allows at most {SHORT_STRING_MAX} bytes",
            value.len()
        ))
    })
}

fn check_size(size: usize, limit: usize) -> Result<(), String> {
    if size <= limit {
        return Ok(());
    }
    Err(format!(
        "the message is {size} bytes, over the limit of {limit} bytes ({}); \
         raise it with --max-message-size, up to the broker's max_message_size \
         (128 MiB by default in RabbitMQ 3.10)",
        bytes(limit)
    ))
}

/// `n` bytes for people: "16 MiB", "512 KiB" or "1000 bytes".
fn bytes(n: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

/// A size: bytes, or a whole number of KiB or MiB ("64MiB", "512 KiB"),
/// from 1 byte to 512 MiB.
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (digits, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, ""), |i| (&t[..i], t[i..].trim()));
    let scale: usize = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1024,
        "mib" => 1024 * 1024,
        _ => {
            return Err(format!(
                "{s:?}: expected bytes, KiB or MiB (for example 16777216 or 16MiB)"
            ))
        }
    };
    let n = digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{s:?}: expected a whole number of bytes, KiB or MiB"))?;
    if n == 0 || n > MAX_MESSAGE_SIZE_CEILING {
        return Err(format!(
            "{s:?}: must be from 1 byte to 512 MiB (RabbitMQ's largest max_message_size)"
        ));
    }
    Ok(n)
}

fn split_kv<'a>(flag: &str, kv: &'a str) -> Result<(&'a str, &'a str), UsageError> {
    kv.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| UsageError(format!("{flag} {kv:?}: expected K=V")))
}

/// Properties from `--property` and `--header`; content-type defaults to
/// application/json (the bodies are JSON). `login` is the connection's user:
/// RabbitMQ closes the channel on a message whose user-id is another user
/// (unless the login has the impersonator tag), so such a user-id is refused
/// here rather than failing every message.
fn properties(
    props: &[String],
    headers: &[String],
    login: Option<&str>,
) -> Result<BasicProperties, UsageError> {
    let mut p = BasicProperties::default();
    let mut content_type = false;
    for kv in props {
        let (k, v) = split_kv("--property", kv)?;
        let s = || short_string("--property ", k, v);
        let num = |max: u64| {
            v.parse::<u64>().ok().filter(|n| *n <= max).ok_or_else(|| {
                UsageError(format!("--property {k}: {v:?} is not a number up to {max}"))
            })
        };
        p = match k.replace('_', "-").to_ascii_lowercase().as_str() {
            "content-type" => {
                content_type = true;
                p.with_content_type(s()?)
            }
            "content-encoding" => p.with_content_encoding(s()?),
            "correlation-id" => p.with_correlation_id(s()?),
            "reply-to" => p.with_reply_to(s()?),
            "expiration" => {
                // The broker wants whole milliseconds written as a string.
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(UsageError(format!(
                        "--property {k}: {v:?} is not a whole number of milliseconds (for example expiration=60000)"
                    )));
                }
                if v.parse::<u64>().map_or(true, |ms| ms > MAX_EXPIRATION_MS) {
                    return Err(UsageError(format!(
                        "--property {k}: {v} is over RabbitMQ's limit of {MAX_EXPIRATION_MS} milliseconds (ten years)"
                    )));
                }
                p.with_expiration(s()?)
            }
            "message-id" => p.with_message_id(s()?),
            "type" => p.with_type(s()?),
            "user-id" => {
                if let Some(login) = login.filter(|l| *l != v) {
                    return Err(UsageError(format!(
                        "--property {k}={v}: the connection logs in as {login:?}, and RabbitMQ refuses a user-id \
                         other than the connection's user (unless that user has the impersonator tag); \
                         connect as {v:?} or leave user-id out"
                    )));
                }
                p.with_user_id(s()?)
            }
            "app-id" => p.with_app_id(s()?),
            "priority" => p.with_priority(num(255)? as u8),
            "delivery-mode" => match v {
                "1" => p.with_delivery_mode(1),
                "2" => p.with_delivery_mode(2),
                _ => {
                    return Err(UsageError(format!(
                        "--property {k}: {v:?} is not 1 (transient) or 2 (persistent)"
                    )))
                }
            },
            "timestamp" => p.with_timestamp(timestamp(k, v)?),
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
            let (k, value) = match k.strip_suffix(':') {
                Some(name) if !name.is_empty() => (name, typed_header(name, v)?),
                _ => (k, AMQPValue::LongString(v.into())),
            };
            let name = short_string("--header", " name", k)?;
            if table.inner().contains_key(&name) {
                return Err(UsageError(format!(
                    "--header {k}: given twice; a header has one value (a list is {k}:=[...])"
                )));
            }
            table.insert(name, value);
        }
        p = p.with_headers(table);
    }
    Ok(p)
}

/// Where the frame size [`check_frame`] checks against comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameOf {
    /// What the connection asks for, before connecting.
    Asked,
    /// What the broker allowed, once connected (less than was asked).
    Allowed,
}

/// Refuses properties and headers that do not fit in one content-header
/// frame of `frame_max` bytes (exit 2, nothing published): they are the
/// same for every message, and the publisher would fail each one with
/// nothing sent (the broker would close the whole connection on it).
fn check_frame(p: &BasicProperties, frame_max: u32, of: FrameOf) -> Result<(), UsageError> {
    // Measured as the publisher sends them, with the properties it adds.
    if Message::bytes("", "", Vec::new())
        .properties(p.clone())
        .fits_in_frame_as_sent(frame_max)
    {
        return Ok(());
    }
    let what = match of {
        FrameOf::Asked if frame_max < warren_topology::DEFAULT_FRAME_MAX => format!(
            "the frame size the URL asks for (?frame_max={frame_max}); raise it, up to the broker's frame_max (128 KiB by default), or"
        ),
        FrameOf::Asked => format!("frame_max {frame_max}, the frame size the connection asks for;"),
        FrameOf::Allowed => format!(
            "frame_max {frame_max}, the largest frame the broker allows (its frame_max setting);"
        ),
    };
    Err(UsageError(format!(
        "--header: the message's properties and headers do not fit in one frame of {frame_max} bytes, \
         and they cannot be split across frames (the broker would close the connection on such a \
         message); nothing was published. The limit is {what} send fewer or smaller headers (the \
         body can be larger than a frame)"
    )))
}

/// What `--header` values of warren's own headers (`x-warren-*`) do to the
/// message: a consumer group reads them as its bookkeeping, so setting one
/// by hand is allowed (the header contract takes them on the way in) but
/// rarely meant.
fn warren_header_warnings(p: &BasicProperties) -> Vec<String> {
    use warren_topology::headers;
    let Some(table) = p.headers() else {
        return Vec::new();
    };
    let mut names: Vec<&str> = table
        .inner()
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("x-warren-"))
        .collect();
    names.sort_unstable();
    names
        .into_iter()
        .map(|k| {
            let what = match k {
                headers::ATTEMPTS => "a consumer group counts the message's failed attempts with it, so the message gets fewer retries (none once it reaches the group's last tier)",
                headers::REPLAYS => "it counts how often an operator replayed the message",
                _ => "a consumer group and `warren dlq` read it as the message's failure details",
            };
            format!("--header {k}: x-warren-* headers are warren's own: {what}")
        })
        .collect()
}

/// The largest `expiration` RabbitMQ accepts: ten years in milliseconds (a
/// larger one closes the channel with `value_too_large`).
const MAX_EXPIRATION_MS: u64 = 315_360_000_000;

/// `--property timestamp`: seconds since 1970, or an RFC 3339 time.
fn timestamp(k: &str, v: &str) -> Result<u64, UsageError> {
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(secs);
    }
    humantime::parse_rfc3339_weak(v)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .ok_or_else(|| {
            UsageError(format!(
                "--property {k}: {v:?} is neither seconds since 1970 (such as 1700000000) nor an RFC 3339 time (such as 2024-01-02T03:04:05Z)"
            ))
        })
}

/// `--header K:=JSON`: the value with the AMQP type RabbitMQ's own tools
/// give a JSON value (the management API, rabbitmqadmin): an integer is a
/// `long`, a fraction a `double`, then boolean, void, string, array, table.
fn typed_header(k: &str, v: &str) -> Result<AMQPValue, UsageError> {
    let json: serde_json::Value = serde_json::from_str(v).map_err(|e| {
        let text = e.to_string();
        let at = format!(" at line {} column {}", e.line(), e.column());
        let what = text.strip_suffix(&at).unwrap_or(&text);
        UsageError(format!(
            "--header {k}:={v}: not JSON ({what} at column {}); write a number, true, false, null, \"a string\", [a list] or {{\"an\": \"object\"}}",
            e.column()
        ))
    })?;
    amqp_value(&json).map_err(|e| UsageError(format!("--header {k}:={v}: {e}")))
}

fn amqp_value(json: &serde_json::Value) -> Result<AMQPValue, String> {
    use serde_json::Value;
    Ok(match json {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, _) if n.is_u64() => {
                return Err(format!(
                    "over the largest integer a header holds ({})",
                    i64::MAX
                ))
            }
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => return Err(format!("{n} is not a number a header can hold")),
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(
            items
                .iter()
                .map(amqp_value)
                .collect::<Result<Vec<_>, _>>()?
                .into(),
        ),
        Value::Object(map) => {
            let mut t = FieldTable::default();
            for (k, v) in map {
                let key = ShortString::try_new(k.as_str()).map_err(|_| {
                    format!(
                        "a key is {} bytes; AMQP allows at most {SHORT_STRING_MAX} bytes",
                        k.len()
                    )
                })?;
                t.insert(key, amqp_value(v)?);
            }
            AMQPValue::FieldTable(t)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_numbers_are_named_as_ranges() {
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[7]), "7");
        assert_eq!(ranges(&[1, 2, 3, 5, 7, 8, 9]), "1-3,5,7-9");
        assert_eq!(ranges(&[1, 3]), "1,3");
    }

    #[test]
    fn only_what_is_not_the_start_of_json_is_called_text() {
        for json_like in [
            "{bad", "[1,", "\"open", "5 apples", "-x", "true x", "null,", "  ",
        ] {
            assert_eq!(plain_text(json_like.as_bytes()), None, "{json_like:?}");
        }
        assert_eq!(plain_text(b" hello\t"), Some(Some("\"hello\"".to_owned())));
        assert_eq!(
            plain_text(b"say \"hi\""),
            Some(Some("\"say \\\"hi\\\"\"".to_owned()))
        );
        assert_eq!(plain_text(&[b'x'; 61]), Some(None), "too long to show");
        assert_eq!(plain_text(b"caf\xe9"), Some(None), "not UTF-8");
    }

    #[test]
    fn json_check_refuses_invalid_utf8_and_lone_surrogates() {
        for bad in [
            &b"{\"n\":\"\xff\xfe\"}"[..],
            b"\"\xc3\"",
            b"{\"\xff\":1}",
            br#"{"n":"\ud800"}"#,
            br#"["\udc00"]"#,
            br#"{"\ud800x":1}"#,
            br#""\ud800\u0041""#,
            b"{not json}",
            b"[1,]",
        ] {
            assert!(check_json(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        for good in [
            &br#"{"n":"\ud83d\ude00","m":"\u00fc"}"#[..],
            "{\"note\":\"ünïcode 😀\"}".as_bytes(),
            br#"[1,-2,3.5e10,true,false,null,{"a":[{}]}]"#,
            br#""just a string""#,
            b"  42  ",
        ] {
            assert!(
                check_json(good).is_ok(),
                "{}",
                String::from_utf8_lossy(good)
            );
        }
    }

    #[test]
    fn sizes_parse_in_bytes_kib_and_mib_up_to_512_mib() {
        assert_eq!(parse_size("16777216"), Ok(16 * 1024 * 1024));
        assert_eq!(parse_size("64MiB"), Ok(64 * 1024 * 1024));
        assert_eq!(parse_size("512 KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("512mib"), Ok(MAX_MESSAGE_SIZE_CEILING));
        for bad in [
            "0",
            "513MiB",
            "1GiB",
            "1.5MiB",
            "-1",
            "",
            "MiB",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(bytes(16 * 1024 * 1024), "16 MiB");
        assert_eq!(bytes(1536), "1536 bytes");
        assert_eq!(bytes(2048), "2 KiB");
    }

    fn props(p: &[&str], h: &[&str]) -> Result<BasicProperties, String> {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        properties(&own(p), &own(h), Some("guest")).map_err(|e| e.0)
    }

    #[test]
    fn warrens_own_headers_given_by_hand_are_warned_of() {
        let p = props(
            &[],
            &["x-warren-attempts:=3", "tenant=a", "x-warren-error=boom"],
        )
        .unwrap();
        let w = warren_header_warnings(&p);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("--header x-warren-attempts: x-warren-* headers are warren's own: a consumer group counts the message's failed attempts"), "{w:?}");
        assert!(w[1].starts_with("--header x-warren-error: "), "{w:?}");
        assert!(warren_header_warnings(&props(&[], &["tenant=a"]).unwrap()).is_empty());
        assert!(warren_header_warnings(&props(&[], &[]).unwrap()).is_empty());
    }

    #[test]
    fn properties_the_broker_would_refuse_are_refused_here() {
        let long = "k".repeat(256);
        let message_id = format!("message-id={long}");
        let content_type = format!("content-type={long}");
        let app_id = format!("app-id={long}");
        let header = format!("{long}=v");
        let cases: [(&[&str], &[&str], &str); 10] = [
            (&[&message_id], &[], "--property message-id is 256 bytes"),
            (
                &[&content_type],
                &[],
                "--property content-type is 256 bytes",
            ),
            (&[&app_id], &[], "--property app-id is 256 bytes"),
            (&[], &[&header], "--header name is 256 bytes"),
            (
                &["delivery-mode=0"],
                &[],
                "not 1 (transient) or 2 (persistent)",
            ),
            (
                &["expiration=abc"],
                &[],
                "not a whole number of milliseconds",
            ),
            (
                &["expiration=-5"],
                &[],
                "not a whole number of milliseconds",
            ),
            (
                &["expiration=1.5"],
                &[],
                "not a whole number of milliseconds",
            ),
            (&["expiration="], &[], "not a whole number of milliseconds"),
            (&["user-id=bob"], &[], "logs in as \"guest\""),
        ];
        for (p, h, want) in cases {
            let e = props(p, h).expect_err(want);
            assert!(e.contains(want), "{e}");
            if e.contains("bytes") {
                assert!(e.contains("at most 255 bytes"), "{e}");
            }
        }
        // The limits themselves pass; a header value is a long string.
        let max = "k".repeat(255);
        let ok = props(
            &[
                &format!("message-id={max}"),
                "expiration=0",
                "expiration=60000",
                "delivery-mode=1",
                "user-id=guest",
            ],
            &[&format!("{max}={}", "v".repeat(1000))],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.expiration().as_ref().map(|s| s.as_str()), Some("60000"));
        assert_eq!(ok.delivery_mode(), &Some(1));
        // With EXTERNAL authentication the login is unknown: user-id passes.
        assert!(properties(&["user-id=bob".into()], &[], None).is_ok());
    }

    #[test]
    fn typed_headers_get_the_types_rabbitmqs_tools_give_json() {
        let h = |v: &str| typed_header("h", v).map_err(|e| e.0);
        assert_eq!(h("5"), Ok(AMQPValue::LongLongInt(5)));
        assert_eq!(
            h("-9223372036854775808"),
            Ok(AMQPValue::LongLongInt(i64::MIN))
        );
        assert_eq!(h("2.5e0"), Ok(AMQPValue::Double(2.5)));
        assert_eq!(h("false"), Ok(AMQPValue::Boolean(false)));
        assert_eq!(h("null"), Ok(AMQPValue::Void));
        assert_eq!(h("\"x\""), Ok(AMQPValue::LongString("x".into())));
        assert!(h("18446744073709551615")
            .unwrap_err()
            .contains("over the largest integer"));
        let long_key = format!("{{\"{}\":1}}", "k".repeat(256));
        assert!(h(&long_key).unwrap_err().contains("a key is 256 bytes"));
        assert!(h("").unwrap_err().starts_with("--header h:=: not JSON"));
    }

    #[test]
    fn timestamps_are_seconds_or_rfc_3339() {
        assert_eq!(
            timestamp("timestamp", "1700000000").ok(),
            Some(1_700_000_000)
        );
        assert_eq!(
            timestamp("timestamp", "2024-01-02T03:04:05Z").ok(),
            Some(1_704_164_645)
        );
        assert!(timestamp("timestamp", "1969-12-31T23:59:59Z").is_err());
        assert!(timestamp("timestamp", "-1").is_err());
    }

    #[test]
    fn the_size_error_says_the_limit_and_what_to_do() {
        let e = check_size(16 * 1024 * 1024 + 1, 16 * 1024 * 1024).unwrap_err();
        assert_eq!(
            e,
            "the message is 16777217 bytes, over the limit of 16777216 bytes (16 MiB); \
             raise it with --max-message-size, up to the broker's max_message_size \
             (128 MiB by default in RabbitMQ 3.10)"
        );
        assert!(check_size(10, 10).is_ok());
    }
}
