//! `warren consume --group G (--http URL | --exec CMD)`: a deployable worker.
//!
//! Runs the group's consumer (prefetch, concurrency, retries, dead-lettering,
//! reconnects) with an HTTP endpoint or a command as its handler, serves
//! `/metrics`, `/healthz` and `/readyz`, and drains on SIGTERM/SIGINT within
//! `--grace`, then exits 0. A second SIGTERM/SIGINT during the drain quits at
//! once (exit 143 for SIGTERM, 130 for SIGINT) after killing the `--exec`
//! commands still running: their deliveries, unacked, go back to the queue
//! when the connection drops. An
//! `--exec` program that cannot start (missing, not executable, no `sh`) is
//! refused (exit 2) before anything is consumed.
//!
//! At every verbosity it says when it starts consuming and when it stops
//! (how many it handled): a line on stderr, or an INFO event with
//! `--log-format json`. With `--output json` the stop's counts are also
//! the last line of stdout, as JSON (see [`run`]). The topology's lints about the group are logged at
//! WARN at start. Passwords are masked in what handlers return (see
//! [`Mask`]): `--exec` commands inherit `WARREN_AMQP_URL`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus::Registry;
use tracing::{info, warn};
use warren_consumer::{ConsumerGroup, Handler};
use warren_topology::{Broker, ConnectOptions, Group, DEFAULT_CONCURRENCY};

use crate::cli::{Global, LogFormat, UsageError};
use crate::handlers::{ExecHandler, HttpHandler, Mask, RunningGroups};
use crate::serve::{self, Health};

/// Default address of `/metrics`, `/healthz`, `/readyz`.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// The end of `warren consume --help`: what a handler gets, and the exit
/// codes a supervisor sees.
const CONSUME_AFTER_HELP: &str = "\
An --exec command gets the body on stdin and, besides warren's environment, \
WARREN_MESSAGE_ID, WARREN_ATTEMPT (1 on the first try), WARREN_ROUTING_KEY (the \
original one), WARREN_GROUP and WARREN_REDELIVERED (true/false); its stdout goes \
to warren's stdout, the end of its stderr into the error of a failed message. \
An --http service gets a POST of the body with the message's Content-Type and \
X-Warren-Message-Id, X-Warren-Attempt, X-Warren-Routing-Key, X-Warren-Redelivered \
and traceparent.

Before the first delivery the group's queues are checked: a missing one exits 1 \
(run `warren topology apply`).

With --output json, the last line of standard output is one JSON object: the \
counts of the stop line (group, handled, acked, retried, dead_lettered, \
rejected, requeued, unfinished: handlers still running when the grace ended, \
stopped, their messages back in the queue) and \"error\" (null after \
SIGTERM/SIGINT, also when it came before consuming started); a run that \
fails before consuming prints {\"error\": {...}}.

Exit codes: 0 stopped by SIGTERM/SIGINT after the drain; 1 a failure (a missing \
queue, a metrics port in use); 2 bad usage (an unknown group, a command that \
cannot run, a bad --http URL); a second signal during the drain quits at once \
with 130 (SIGINT) or 143 (SIGTERM), and the broker requeues what was not acked \
(one within 250 ms of the first is the first delivered twice, as timeout(1) \
does, and is ignored).";

/// Arguments of `warren consume`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("handler").required(true).args(["http", "exec"])))]
#[command(after_long_help = CONSUME_AFTER_HELP)]
pub struct ConsumeArgs {
    /// The consumer group (a `[[group]]` of the topology file).
    #[arg(long)]
    pub group: String,
    /// POST each message to this URL: 2xx acks; 4xx (but 408, 429) dead-letters;
    /// 5xx, 408, 429, timeouts and refused connections retry; redirects are
    /// not followed (3xx retries, the error names the Location).
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
    /// Run this command (through `sh -c`) per message, body on stdin: exit 0
    /// acks; exit 65 dead-letters; any other exit or a signal retries. A first
    /// word that cannot run (no such program, not executable) is refused at
    /// start.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Handlers in flight in this process (overrides the topology file).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: Option<u16>,
    /// basic.qos prefetch (overrides the topology file).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,
    /// Where to serve /metrics, /healthz and /readyz: HOST:PORT, the host an
    /// address or a name (every address it resolves to is served).
    #[arg(long, default_value = DEFAULT_METRICS_ADDR, value_parser = parse_host_port)]
    pub metrics_addr: String,
    /// On SIGTERM/SIGINT, how long in-flight handlers may take to finish
    /// before they are requeued (under Kubernetes' 30s default).
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    pub grace: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    warren_topology::parse_duration(s)
}

/// `HOST:PORT` (`[::1]:9464` for an IPv6 address); the host is resolved when
/// the server starts.
fn parse_host_port(s: &str) -> Result<String, String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_owned());
    }
    let expected = "expected HOST:PORT, e.g. 127.0.0.1:9464, localhost:9464 or [::1]:9464";
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            port.parse::<u16>()
                .map_err(|_| format!("{port:?} is not a port number (0-65535); {expected}"))?;
            Ok(s.to_owned())
        }
        _ => Err(expected.to_owned()),
    }
}

/// Every address `--metrics-addr` names.
async fn metrics_addrs(spec: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(spec)
        .await
        .map_err(|e| UsageError(format!("--metrics-addr {spec:?}: cannot resolve it: {e}")))?
        .collect();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(UsageError(format!("--metrics-addr {spec:?} resolves to no address")).into());
    }
    Ok(addrs)
}

/// Runs `warren consume`. With `--output json`, standard output ends with
/// one JSON line: the stop's counts ([`Handled`]) with `"error": null`,
/// or the error that ended the run (`{"error": ...}` alone when it failed
/// before consuming; see [`crate::cli::error_json`]). One line, since
/// `--exec` commands write to the same standard output before it; a
/// second signal, which quits at once, prints none.
pub async fn run(g: &Global, args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let result = run_worker(g, args).await;
    if g.json() {
        if let Err(e) = &result {
            if !crate::out::wrote_anything() {
                outln!(
                    "{}",
                    serde_json::json!({ "error": crate::cli::error_json(e) })
                );
            }
        }
    }
    result
}

async fn run_worker(g: &Global, args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    if args.exec.as_deref().is_some_and(|c| c.trim().is_empty()) {
        return Err(UsageError(
            "--exec needs a command: an empty one would succeed for, ack and discard every message"
                .into(),
        )
        .into());
    }
    let topology = g.topology()?;
    let url = g.url()?;
    let mut group = topology.group(&args.group).cloned().ok_or_else(|| {
        let known: Vec<&str> = topology.groups.iter().map(|g| g.name.as_str()).collect();
        UsageError(format!(
            "no group {:?} in {}; groups: {}",
            args.group,
            g.topology.display(),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ))
    })?;
    let in_file = format!("group {:?} in {}", group.name, g.topology.display());
    if let Some(p) = args.prefetch {
        // A default concurrency follows a lower prefetch, as it does in the file.
        if args.concurrency.is_none()
            && group.concurrency == DEFAULT_CONCURRENCY.min(group.prefetch)
            && group.concurrency > p
        {
            info!(
                concurrency = p,
                "concurrency (the default) lowered to --prefetch"
            );
            group.concurrency = p;
        }
        group.prefetch = p;
    }
    if let Some(c) = args.concurrency {
        group.concurrency = c;
    }
    if group.concurrency > group.prefetch {
        let source = |flag: bool, flag_name: &str| {
            if flag {
                format!("--{flag_name}")
            } else {
                in_file.clone()
            }
        };
        return Err(UsageError(format!(
            "concurrency {} ({}) is above prefetch {} ({}): the extra handlers could never be busy; \
             give --concurrency {} or less, or a --prefetch of at least {}",
            group.concurrency,
            source(args.concurrency.is_some(), "concurrency"),
            group.prefetch,
            source(args.prefetch.is_some(), "prefetch"),
            group.prefetch,
            group.concurrency,
        ))
        .into());
    }
    // The password of the URL warren connects with, which the commands
    // inherit, is masked in what handlers return.
    let mask = Mask::new(&url);
    match (&args.http, &args.exec) {
        (Some(endpoint), None) => {
            let h = HttpHandler::new(
                endpoint,
                group.handler_timeout,
                usize::from(group.concurrency),
            )?
            .mask(mask);
            let shown = format!("POST {}", h.shown_url());
            warn_of_lints(&topology, &group.name);
            // In-flight requests die with the process: nothing to kill.
            serve_group(g, url, group, h, &shown, None, &args).await?;
        }
        (None, Some(cmd)) => {
            let shown = format!("sh -c {:?}", mask.apply(cmd));
            let h = ExecHandler::new(cmd.clone()).mask(mask);
            // A program that cannot start would fail every message.
            h.check().await.map_err(UsageError)?;
            warn_of_lints(&topology, &group.name);
            let running = h.running();
            serve_group(g, url, group, h, &shown, Some(running), &args).await?
        }
        _ => return Err(UsageError("give exactly one of --http URL or --exec CMD".into()).into()),
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs at WARN the lints of the topology about `group` (what `topology
/// show`, `apply` and `verify` print), before consuming.
fn warn_of_lints(topology: &warren_topology::Topology, group: &str) {
    for lint in topology.lints().iter().filter(|l| l.group == group) {
        warn!(group = %lint.group, "topology lint: {}", lint.message);
    }
}

/// Runs the group until a signal; `commands` are the process groups a
/// forced exit (a second signal) must kill first. Says when it starts
/// consuming and when it stops ([`Said`]), as JSON events with
/// `--log-format json`, and with `--output json` prints the stop's counts
/// on standard output (see [`run`]).
async fn serve_group<H: Handler>(
    g: &Global,
    url: warren_topology::AmqpUrl,
    group: Group,
    handler: H,
    handler_text: &str,
    commands: Option<RunningGroups>,
    args: &ConsumeArgs,
) -> anyhow::Result<()> {
    let json = g.log_format == LogFormat::Json;
    let registry = Registry::new();
    let cancel = {
        let (registry, name) = (registry.clone(), group.name.clone());
        crate::signal::drain_token(args.grace, move |signal| {
            let running = handlers_running(&registry, &name);
            let killed = commands.map(|c| c.kill_all());
            warn!(
                group = %name,
                handlers_running = running,
                commands_killed = killed,
                signal = signal.describe(),
                "second SIGINT/SIGTERM: quitting now (exit {}) without waiting for the handlers; \
                 the broker requeues every unacked delivery when the connection drops",
                signal.exit_code(),
            );
        })
    };
    let health = Health::default();
    let server_stop = tokio_util::sync::CancellationToken::new();
    // A name (`localhost:9464`) is served on every address it resolves to;
    // an address that cannot be bound is an error only when none can (and
    // then said once, as the error), a warning when another one serves.
    let mut failed = Vec::new();
    let mut served = Vec::new();
    for addr in metrics_addrs(&args.metrics_addr).await? {
        match serve::spawn(addr, registry.clone(), health.clone(), server_stop.clone()).await {
            Ok(addr) => {
                served.push(format!("http://{addr}/metrics"));
                info!(%addr, "serving /metrics, /healthz, /readyz");
            }
            Err(e) => failed.push((addr, e)),
        }
    }
    if served.is_empty() && !failed.is_empty() {
        let errors: Vec<String> = failed.iter().map(|(_, e)| e.to_string()).collect();
        return Err(anyhow::anyhow!(errors.join("; ")));
    }
    for (addr, e) in failed {
        warn!(%addr, error = %e, "cannot serve /metrics on this address");
    }

    let said = Said {
        json,
        group: group.name.clone(),
        prefetch: group.prefetch,
        concurrency: group.concurrency,
        handler: handler_text.to_owned(),
        metrics: served.join(", "),
    };
    let consumer = ConsumerGroup::builder(group, handler)
        .shutdown_grace(args.grace)
        .registry(&registry)
        .context("registering metrics")?
        .build()
        .context("building the consumer group")?;

    // /readyz follows the consumer: connected and consuming, false once
    // shutdown starts. The first time it is ready, the start is said.
    let mut ready = consumer.ready();
    let h = health.clone();
    let c = cancel.clone();
    let started = Arc::new(AtomicBool::new(false));
    let (s, said_start) = (started.clone(), said.clone());
    tokio::spawn(async move {
        loop {
            let now = *ready.borrow() && !c.is_cancelled();
            if now && !s.swap(true, Ordering::SeqCst) {
                said_start.started();
            }
            h.set_ready(now);
            tokio::select! {
                changed = ready.changed() => if changed.is_err() { break },
                _ = c.cancelled() => { h.set_ready(false); break }
            }
        }
    });

    let broker = Arc::new(Broker::new(ConnectOptions::new(url, "consumer")));
    // The consumer's errors name the group already.
    let result: anyhow::Result<()> = consumer
        .run(&broker, cancel.clone())
        .await
        .map_err(Into::into);
    health.set_ready(false);
    broker.close().await;
    server_stop.cancel();
    // A run that consumed, or that a signal stopped before it could (the
    // broker unreachable, say), says so and prints its counts; one that
    // failed before consuming prints only its error (see `run`).
    let consumed = started.load(Ordering::SeqCst);
    if consumed || result.is_ok() {
        let handled = Handled::of(&registry, &said.group);
        let ended_by = match &result {
            Ok(()) => Ended::Grace(args.grace),
            Err(_) => Ended::Error,
        };
        said.stopped(&handled, consumed, ended_by);
        if g.json() {
            let error = result.as_ref().err().map(crate::cli::error_json);
            outln!(
                "{}",
                serde_json::to_string(&Stopped {
                    handled: &handled,
                    error
                })?
            );
        }
    }
    result
}

/// What a run of `consume` handled, by outcome (`warren_handled_total`).
#[derive(Debug, Clone, serde::Serialize)]
struct Handled {
    group: String,
    /// Every delivery settled: acked, retried, dead-lettered or rejected
    /// (a reject is handled too: the broker dead-letters it).
    handled: u64,
    acked: u64,
    retried: u64,
    dead_lettered: u64,
    /// Rejected for the broker to dead-letter, unchanged: their copy could
    /// not be published.
    rejected: u64,
    /// Requeued, back in the queue unacked: their copy was not confirmed,
    /// or their channel was lost before they were settled (not counted as
    /// handled).
    requeued: u64,
    /// Given to a handler that never finished: still running when the
    /// shutdown grace ended (or when an error ended the run), stopped (an
    /// `--exec` command killed), its delivery back in the queue unacked.
    unfinished: u64,
}

impl Handled {
    fn of(registry: &Registry, group: &str) -> Handled {
        let count = |outcome| handled(registry, group, outcome);
        let (acked, retried, dead_lettered, rejected) = (
            count("ack"),
            count("retry"),
            count("dead_letter"),
            count("reject"),
        );
        let handled = acked + retried + dead_lettered + rejected;
        let requeued = count("requeue");
        // Every delivery given to a handler ends with one outcome, or with
        // none when its handler is stopped before it finishes.
        let given = samples(registry, "warren_deliveries_total", group)
            .iter()
            .map(|m| m.get_counter().get_value() as u64)
            .sum::<u64>();
        Handled {
            group: group.to_owned(),
            handled,
            acked,
            retried,
            dead_lettered,
            rejected,
            requeued,
            unfinished: given.saturating_sub(handled + requeued),
        }
    }
}

/// What ended a run: the shutdown (in-flight handlers had this grace), or
/// an error.
#[derive(Debug, Clone, Copy)]
enum Ended {
    Grace(Duration),
    Error,
}

/// `consume --output json`'s line: the counts, and the error that ended
/// the run (`null` after a signal).
#[derive(serde::Serialize)]
struct Stopped<'a> {
    #[serde(flatten)]
    handled: &'a Handled,
    error: Option<serde_json::Value>,
}

/// What `warren consume` says when it starts consuming and when it stops,
/// at every verbosity: a worker that prints nothing cannot be told from one
/// that hangs. A line on stderr; with `--log-format json`, an INFO event
/// (through a JSON subscriber of its own when the log filter hides INFO:
/// a bare line would break a log of JSON lines).
#[derive(Debug, Clone)]
struct Said {
    json: bool,
    group: String,
    prefetch: u16,
    concurrency: u16,
    /// `POST URL` (its password masked) or `sh -c "CMD"`.
    handler: String,
    /// Where `/metrics` is served: `http://ADDR/metrics`, comma-separated.
    metrics: String,
}

impl Said {
    /// `consuming group "G": queue "G", prefetch P, concurrency C, handler
    /// H; metrics on URL`, or the event `consuming` with these fields.
    fn started(&self) {
        let Said {
            group,
            prefetch,
            concurrency,
            handler,
            metrics,
            ..
        } = self;
        let queue = warren_topology::work_queue(group);
        if self.json {
            crate::cli::as_info_event(|| {
                info!(
                    group = %group,
                    queue = %queue,
                    prefetch,
                    concurrency,
                    handler = %handler,
                    metrics = %metrics,
                    "consuming"
                )
            });
        } else {
            eprintln!(
                "consuming group {group:?}: queue {queue:?}, prefetch {prefetch}, concurrency \
                 {concurrency}, handler {handler}; metrics on {metrics}"
            );
        }
    }

    /// `stopped consuming group "G": N handled (A acked, R retried, D
    /// dead-lettered)` (with how many were rejected, for the broker to
    /// dead-letter, how many were requeued (their copy not confirmed, or
    /// their channel lost first), and how many handlers were stopped
    /// unfinished, when any),
    /// or the event `stopped consuming` with them. A run stopped before it
    /// consumed (`consumed` false: it never got to its queue) says that
    /// instead of counts: `stopped group "G" before it started consuming`.
    fn stopped(&self, h: &Handled, consumed: bool, ended_by: Ended) {
        let group = &self.group;
        let &Handled {
            handled: total,
            acked,
            retried,
            dead_lettered,
            rejected,
            requeued,
            unfinished,
            ..
        } = h;
        if self.json {
            crate::cli::as_info_event(|| {
                if consumed {
                    info!(
                        group = %group,
                        handled = total,
                        acked,
                        retried,
                        dead_lettered,
                        rejected,
                        requeued,
                        unfinished,
                        "stopped consuming"
                    )
                } else {
                    info!(group = %group, "stopped before consuming")
                }
            });
            return;
        }
        if !consumed {
            eprintln!("stopped group {group:?} before it started consuming: nothing handled");
            return;
        }
        let rejected = if rejected > 0 {
            format!(
                ", {rejected} rejected: the broker dead-lettered them unchanged, as their \
                 copy could not be published"
            )
        } else {
            String::new()
        };
        let requeued = if requeued > 0 {
            format!(
                ", {requeued} requeued (their copy was not confirmed, or their channel was lost \
                 before they were settled)"
            )
        } else {
            String::new()
        };
        let unfinished = match (unfinished, ended_by) {
            (0, _) => String::new(),
            (n, Ended::Grace(grace)) => format!(
                ", {n} unfinished (still running at the end of the {} grace: stopped, and \
                 their deliveries went back to the queue)",
                humantime::format_duration(grace)
            ),
            (n, Ended::Error) => format!(
                ", {n} unfinished (still running when the error ended the run: stopped, and \
                 their deliveries went back to the queue)"
            ),
        };
        eprintln!(
            "stopped consuming group {group:?}: {total} handled ({acked} acked, {retried} \
             retried, {dead_lettered} dead-lettered{rejected}){requeued}{unfinished}"
        );
    }
}

/// `warren_in_flight{group}`: handlers running now.
fn handlers_running(registry: &Registry, group: &str) -> u64 {
    samples(registry, "warren_in_flight", group)
        .iter()
        .map(|m| m.get_gauge().get_value() as u64)
        .sum()
}

/// `warren_handled_total{group,outcome}`: deliveries settled so.
fn handled(registry: &Registry, group: &str, outcome: &str) -> u64 {
    samples(registry, "warren_handled_total", group)
        .iter()
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "outcome" && l.value() == outcome)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// The samples of the metric `name` for `group`.
fn samples(registry: &Registry, name: &str, group: &str) -> Vec<prometheus::proto::Metric> {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "group" && l.value() == group)
        })
        .cloned()
        .collect()
}
