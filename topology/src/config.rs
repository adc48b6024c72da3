//! The topology file (`warren.toml`): parsing and validation.
//!
//! Parsing goes through a raw, span-carrying model so that every error can name
//! the file, the line and the field. Validation is all-or-nothing: a file with
//! one bad field yields no [`Topology`] at all, so nothing is ever declared from
//! it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{ConfigError, TopologyError};
use crate::names;

/// Default `prefetch` (basic.qos) of a group.
pub const DEFAULT_PREFETCH: u16 = 32;
/// Default number of handlers in flight per process.
pub const DEFAULT_CONCURRENCY: u16 = 16;
/// Default handler timeout.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default retry tiers when a group does not say `retry = [...]`.
pub const DEFAULT_RETRY: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(10),
    Duration::from_secs(60),
];
/// The most retry tiers a group may have. Each tier is a queue; past this the
/// topology is almost certainly a mistake (use longer tiers instead).
pub const MAX_TIERS: usize = 20;
/// RabbitMQ's default `consumer_timeout` (30 minutes in 3.10 and 4.x): a
/// delivery not acked by then closes its channel. A handler timeout at or
/// over it gets a [`Lint`] (not an error: the broker's may have been raised,
/// and AMQP cannot read it).
pub const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The shortest `handler_timeout` (100 ms). The timeout guards against a
/// hung handler; it is not a latency target. Its clock includes starting the
/// handler (a process for `--exec`, a connection for `--http`), and every
/// timeout throws the work away and sends the message through a retry tier,
/// so a shorter one would cancel healthy handlers.
pub const MIN_HANDLER_TIMEOUT: Duration = Duration::from_millis(100);
/// The longest name the broker accepts (an AMQP short string).
pub const MAX_NAME_BYTES: usize = 255;

/// An exchange's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Routes on an exact routing key.
    Direct,
    /// Routes on routing-key patterns (`order.*`, `#`).
    Topic,
    /// Routes to every bound queue.
    Fanout,
    /// Routes on message headers.
    Headers,
}

impl ExchangeKind {
    /// The name the broker uses for this type.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A work queue's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, durable, with a delivery limit (the default).
    #[default]
    Quorum,
    /// A single-node classic queue (version 2).
    Classic,
}

impl QueueType {
    /// The value of `x-queue-type`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An exchange of the topology file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exchange {
    /// Its name.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
}

/// A consumer group of the topology file, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// The group's name; also its work queue's name.
    pub name: String,
    /// The exchange its work queue is bound to.
    pub exchange: String,
    /// Binding keys of the work queue on `exchange`.
    pub bindings: Vec<String>,
    /// The work queue's type (the retry queues follow it).
    pub queue_type: QueueType,
    /// Retry tiers: tier n (1-based) is `retry[n-1]`.
    #[serde(serialize_with = "ser_durations")]
    pub retry: Vec<Duration>,
    /// basic.qos prefetch of each consuming channel.
    pub prefetch: u16,
    /// Handlers in flight per process.
    pub concurrency: u16,
    /// How long a handler may run before it is cancelled (kind `timeout`).
    #[serde(serialize_with = "ser_duration")]
    pub handler_timeout: Duration,
    /// Quorum only: redeliveries before the broker dead-letters a message.
    pub delivery_limit: Option<u32>,
}

impl Group {
    /// The work queue's name.
    pub fn work_queue(&self) -> String {
        names::work_queue(&self.name)
    }

    /// The name of retry tier `tier` (1-based).
    pub fn retry_queue(&self, tier: usize) -> String {
        names::retry_queue(&self.name, tier)
    }

    /// The dead-letter queue's name.
    pub fn dead_queue(&self) -> String {
        names::dead_queue(&self.name)
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_durations<S: serde::Serializer>(ds: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(ds.len()))?;
    for d in ds {
        seq.serialize_element(&humantime::format_duration(*d).to_string())?;
    }
    seq.end()
}

/// A validated topology: everything warren declares on the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// Exchanges, in file order.
    pub exchanges: Vec<Exchange>,
    /// Consumer groups, in file order.
    pub groups: Vec<Group>,
}

/// Something legal but likely to bite: reported by `verify` and `apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lint {
    /// The group concerned.
    pub group: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Lint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "group {:?}: {}", self.group, self.message)
    }
}

impl Topology {
    /// Reads and validates a topology file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Topology, TopologyError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| TopologyError::Read {
            file: file.clone(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            // Where the first byte that is not UTF-8 is.
            let bytes = e.as_bytes();
            let valid = e.utf8_error().valid_up_to();
            let before = String::from_utf8_lossy(&bytes[..valid]);
            let (line, column) = line_col(&before, valid);
            TopologyError::Invalid(ConfigError {
                file: file.clone(),
                line,
                column,
                field: String::new(),
                message: format!(
                    "byte 0x{:02X} is not UTF-8; a topology file is UTF-8 text (re-save it as UTF-8)",
                    bytes[valid]
                ),
            })
        })?;
        Topology::parse(&text, &file).map_err(TopologyError::Invalid)
    }

    /// Parses and validates a topology from text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Topology, ConfigError> {
        let at = |span: std::ops::Range<usize>, field: &str, message: String| {
            let (line, column) = line_col(text, span.start);
            ConfigError {
                file: file.to_owned(),
                line,
                column,
                field: field.to_owned(),
                message,
            }
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let field = field_of(text, e.span());
            let message = allowed(&field, first_line(e.message()));
            at(span, &field, message)
        })?;

        let mut exchanges = Vec::new();
        let mut seen = HashSet::new();
        for ex in raw.exchanges {
            let ex = ex.into_inner();
            check_name(&ex.name, "exchange.name")
                .map_err(|m| at(ex.name.span(), "exchange.name", m))?;
            if ex.name.get_ref() == names::DEAD_LETTER_EXCHANGE {
                return Err(at(
                    ex.name.span(),
                    "exchange.name",
                    format!("{:?} is warren's dead-letter exchange and is declared by warren itself; pick another name", names::DEAD_LETTER_EXCHANGE),
                ));
            }
            if !seen.insert(ex.name.get_ref().clone()) {
                return Err(at(
                    ex.name.span(),
                    "exchange.name",
                    format!(
                        "exchange {:?} is declared twice; names must be unique",
                        ex.name.get_ref()
                    ),
                ));
            }
            exchanges.push(Exchange {
                name: ex.name.into_inner(),
                kind: ex.kind.into_inner(),
            });
        }

        let mut groups = Vec::new();
        // Queue name -> the group that derives it.
        let mut queue_owner: HashMap<String, String> = HashMap::new();
        for g in raw.groups {
            let g = g.into_inner();
            let name_span = g.name.span();
            check_name(&g.name, "group.name")
                .map_err(|m| at(name_span.clone(), "group.name", m))?;
            let name = g.name.into_inner();
            // Derived names must fit too: "{group}.retry.{n}" is the longest.
            let longest = names::retry_queue(&name, MAX_TIERS);
            if longest.len() > MAX_NAME_BYTES {
                return Err(at(
                    name_span,
                    "group.name",
                    format!(
                        "too long: the derived queue {longest:?} would be {} bytes, over the broker's limit of {MAX_NAME_BYTES}; use a name of at most {} bytes",
                        longest.len(),
                        MAX_NAME_BYTES - (longest.len() - name.len())
                    ),
                ));
            }
            if !exchanges.iter().any(|e| &e.name == g.exchange.get_ref()) {
                let known: Vec<&str> = exchanges.iter().map(|e| e.name.as_str()).collect();
                return Err(at(
                    g.exchange.span(),
                    "group.exchange",
                    format!(
                        "group {name:?} is bound to exchange {:?}, which the file does not declare; declared: {}",
                        g.exchange.get_ref(),
                        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                    ),
                ));
            }

            let bindings = match g.bindings {
                Some(b) => b
                    .into_iter()
                    .map(|k| {
                        if k.get_ref().len() > MAX_NAME_BYTES {
                            Err(at(k.span(), "group.bindings", format!("binding key is {} bytes, over the broker's limit of {MAX_NAME_BYTES}", k.get_ref().len())))
                        } else {
                            Ok(k.into_inner())
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                None => Vec::new(),
            };

            let queue_type = g.queue_type.map(Spanned::into_inner).unwrap_or_default();

            let retry = match g.retry {
                None => DEFAULT_RETRY.to_vec(),
                Some(tiers) => {
                    let span = tiers.span();
                    let tiers = tiers.into_inner();
                    if tiers.len() > MAX_TIERS {
                        return Err(at(
                            span,
                            "group.retry",
                            format!("{} tiers; at most {MAX_TIERS} are allowed (each tier is a queue: use longer delays instead)", tiers.len()),
                        ));
                    }
                    let mut out = Vec::with_capacity(tiers.len());
                    for t in tiers {
                        let d = parse_duration(t.get_ref())
                            .map_err(|m| at(t.span(), "group.retry", m))?;
                        if d.subsec_nanos() % 1_000_000 != 0 {
                            return Err(at(
                                t.span(),
                                "group.retry",
                                format!(
                                    "{:?} is not a whole number of milliseconds, which is what a queue's TTL counts; use whole milliseconds (at least \"1ms\")",
                                    t.get_ref()
                                ),
                            ));
                        }
                        if d.as_millis() > i32::MAX as u128 {
                            return Err(at(
                                t.span(),
                                "group.retry",
                                format!(
                                    "{:?} is longer than the broker's longest TTL (about 24 days)",
                                    t.get_ref()
                                ),
                            ));
                        }
                        out.push(d);
                    }
                    out
                }
            };

            // Every queue the group derives must be its own: a group named
            // like another's tier (`billing.retry.1`) or dead queue would
            // declare one queue twice with different arguments.
            let own = std::iter::once(names::work_queue(&name))
                .chain((1..=retry.len()).map(|n| names::retry_queue(&name, n)))
                .chain(std::iter::once(names::dead_queue(&name)));
            for q in own {
                if let Some(other) = queue_owner.get(&q) {
                    let message = if other == &name {
                        format!("group {name:?} is declared twice; group names must be unique")
                    } else {
                        format!("group {name:?} and group {other:?} would both declare queue {q:?} (a group's queues are {{group}}, {{group}}.retry.{{n}} and {{group}}.dead); rename one of them")
                    };
                    return Err(at(name_span, "group.name", message));
                }
                queue_owner.insert(q, name.clone());
            }

            let prefetch = match g.prefetch {
                Some(p) if *p.get_ref() == 0 => {
                    return Err(at(p.span(), "group.prefetch", "must be at least 1 (0 would mean unlimited: every message of the queue in one process)".into()));
                }
                Some(p) => *p.get_ref(),
                None => DEFAULT_PREFETCH,
            };
            let concurrency = match g.concurrency {
                Some(c) if *c.get_ref() == 0 => {
                    return Err(at(
                        c.span(),
                        "group.concurrency",
                        "must be at least 1".into(),
                    ));
                }
                Some(c) if *c.get_ref() > prefetch => {
                    return Err(at(
                        c.span(),
                        "group.concurrency",
                        format!("{} handlers can never be busy with a prefetch of {prefetch}; set concurrency at most prefetch", c.get_ref()),
                    ));
                }
                Some(c) => *c.get_ref(),
                None => DEFAULT_CONCURRENCY.min(prefetch),
            };
            let handler_timeout = match g.handler_timeout {
                None => DEFAULT_HANDLER_TIMEOUT,
                Some(t) => {
                    let field = "group.handler_timeout";
                    let d = parse_duration(t.get_ref()).map_err(|m| at(t.span(), field, m))?;
                    let min = humantime::format_duration(MIN_HANDLER_TIMEOUT);
                    if d.subsec_nanos() % 1_000_000 != 0 {
                        return Err(at(
                            t.span(),
                            field,
                            format!(
                                "{:?} is not a whole number of milliseconds, which is what the handler's timer counts; use whole milliseconds (at least \"{min}\")",
                                t.get_ref()
                            ),
                        ));
                    }
                    if d < MIN_HANDLER_TIMEOUT {
                        return Err(at(
                            t.span(),
                            field,
                            format!(
                                "{:?} is under the minimum of \"{min}\": handler_timeout guards against a hung handler, and its clock includes starting one (a process for --exec, a connection for --http), so a shorter one cancels healthy handlers and sends their messages through the retry tiers; use at least \"{min}\"",
                                t.get_ref()
                            ),
                        ));
                    }
                    d
                }
            };
            let delivery_limit = match g.delivery_limit {
                None => None,
                Some(l) => {
                    if queue_type == QueueType::Classic {
                        return Err(at(
                            l.span(),
                            "group.delivery_limit",
                            "only quorum queues have a delivery limit; remove it or set queue_type = \"quorum\"".into(),
                        ));
                    }
                    if *l.get_ref() == 0 {
                        return Err(at(
                            l.span(),
                            "group.delivery_limit",
                            "must be at least 1".into(),
                        ));
                    }
                    Some(*l.get_ref())
                }
            };

            groups.push(Group {
                name,
                exchange: g.exchange.into_inner(),
                bindings,
                queue_type,
                retry,
                prefetch,
                concurrency,
                handler_timeout,
                delivery_limit,
            });
        }

        Ok(Topology { exchanges, groups })
    }

    /// The group called `name`; `None` when the file has none of that
    /// name (say which it has: `self.groups.iter().map(|g| &g.name)`).
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The same topology with every exchange and group name prefixed
    /// (`"demo."` turns `orders` into `demo.orders`). Used by `warren demo`
    /// and by tests to keep their objects apart from everybody else's.
    pub fn with_prefix(mut self, prefix: &str) -> Topology {
        for e in &mut self.exchanges {
            e.name = format!("{prefix}{}", e.name);
        }
        for g in &mut self.groups {
            g.name = format!("{prefix}{}", g.name);
            g.exchange = format!("{prefix}{}", g.exchange);
        }
        self
    }

    /// The topology as a `warren.toml` text that parses back to the same
    /// topology (used by `warren demo` to leave its prefixed file behind).
    pub fn to_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let d = |d: &Duration| q(&humantime::format_duration(*d).to_string());
        let mut out = String::new();
        for e in &self.exchanges {
            out.push_str(&format!(
                "[[exchange]]\nname = {}\nkind = {}\n\n",
                q(&e.name),
                q(e.kind.as_str())
            ));
        }
        for g in &self.groups {
            out.push_str(&format!(
                "[[group]]\nname = {}\nexchange = {}\n",
                q(&g.name),
                q(&g.exchange)
            ));
            let bindings: Vec<String> = g.bindings.iter().map(|b| q(b)).collect();
            out.push_str(&format!("bindings = [{}]\n", bindings.join(", ")));
            out.push_str(&format!("queue_type = {}\n", q(g.queue_type.as_str())));
            let retry: Vec<String> = g.retry.iter().map(d).collect();
            out.push_str(&format!("retry = [{}]\n", retry.join(", ")));
            out.push_str(&format!(
                "prefetch = {}\nconcurrency = {}\nhandler_timeout = {}\n",
                g.prefetch,
                g.concurrency,
                d(&g.handler_timeout)
            ));
            if let Some(l) = g.delivery_limit {
                out.push_str(&format!("delivery_limit = {l}\n"));
            }
            out.push('\n');
        }
        out
    }

    /// Legal but risky settings, worth a warning.
    pub fn lints(&self) -> Vec<Lint> {
        let mut out = Vec::new();
        for g in &self.groups {
            if g.queue_type == QueueType::Quorum && g.delivery_limit.is_none() {
                out.push(Lint {
                    group: g.name.clone(),
                    message: "quorum work queue without delivery_limit: a message that crashes every consumer is redelivered forever (RabbitMQ 3.x) or dropped after 20 tries (4.x); set delivery_limit".into(),
                });
            }
            if g.retry.windows(2).any(|w| w[0] > w[1]) {
                out.push(Lint {
                    group: g.name.clone(),
                    message: format!(
                        "retry tiers are not in ascending order ({}); later attempts usually wait longer",
                        g.retry.iter().map(|d| humantime::format_duration(*d).to_string()).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
            let kind = self
                .exchanges
                .iter()
                .find(|e| e.name == g.exchange)
                .map(|e| e.kind);
            if kind == Some(ExchangeKind::Headers) {
                out.push(Lint {
                    group: g.name.clone(),
                    message: format!(
                        "exchange {:?} is a headers exchange, which routes on binding arguments that warren does not declare: each binding matches every message, whatever its key",
                        g.exchange
                    ),
                });
            }
            let wild: Vec<String> = g
                .bindings
                .iter()
                .filter(|k| k.contains(['*', '#']))
                .map(|k| format!("{k:?}"))
                .collect();
            if kind == Some(ExchangeKind::Direct) && !wild.is_empty() {
                out.push(Lint {
                    group: g.name.clone(),
                    message: format!(
                        "binding keys {} on direct exchange {:?} match only messages whose routing key is exactly that text: * and # are wildcards on topic exchanges only; make {:?} a topic exchange, or bind exact keys",
                        wild.join(", "),
                        g.exchange,
                        g.exchange
                    ),
                });
            }
            if kind == Some(ExchangeKind::Fanout)
                && g.bindings.iter().any(|k| !k.is_empty() && k != "#")
            {
                out.push(Lint {
                    group: g.name.clone(),
                    message: format!(
                        "exchange {:?} is a fanout exchange, which ignores binding keys: the work queue receives every message, whatever its key",
                        g.exchange
                    ),
                });
            }
            if g.handler_timeout >= BROKER_CONSUMER_TIMEOUT {
                out.push(Lint {
                    group: g.name.clone(),
                    message: format!(
                        "handler_timeout {} is at or over RabbitMQ's default consumer_timeout ({}): the broker closes the channel of a delivery unacked that long, before warren's timeout fires, and redelivers the message; raise the broker's consumer_timeout (rabbitmq.conf, in milliseconds) above handler_timeout plus the time a delivery waits for a free handler, or lower handler_timeout",
                        humantime::format_duration(g.handler_timeout),
                        humantime::format_duration(BROKER_CONSUMER_TIMEOUT)
                    ),
                });
            }
            if g.bindings.is_empty() {
                out.push(Lint {
                    group: g.name.clone(),
                    message: format!(
                        "no bindings: the work queue receives nothing from exchange {:?}",
                        g.exchange
                    ),
                });
            }
        }
        out
    }
}

/// Parses a duration such as `500ms`, `10s`, `1m`, `2h`; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write a number and a unit, like \"500ms\", \"10s\", \"1m\", \"2h\"")
    })?;
    if d.is_zero() {
        return Err(format!("{s:?} is zero; a duration must be positive"));
    }
    Ok(d)
}

fn check_name(name: &Spanned<String>, _field: &str) -> Result<(), String> {
    let n = name.get_ref();
    if n.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if n.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{} bytes is over the broker's limit of {MAX_NAME_BYTES}",
            n.len()
        ));
    }
    if n.starts_with("amq.") {
        return Err(format!(
            "{n:?} starts with \"amq.\", which the broker reserves for its own objects"
        ));
    }
    if n.chars().any(char::is_control) {
        return Err(format!("{n:?} contains a control character"));
    }
    Ok(())
}

/// A type error of the file in its own words: serde says what Rust type it
/// wanted ("expected u16"), which is not what a file may hold.
fn allowed(field: &str, message: String) -> String {
    if let Some(head) = message.strip_suffix("expected u16") {
        // prefetch and concurrency; 0 is refused on its own, with why.
        return format!("{head}expected a whole number from 1 to 65535");
    }
    if let Some(head) = message.strip_suffix("expected u32") {
        // delivery_limit.
        return format!("{head}expected a whole number from 1 to 4294967295");
    }
    if let Some(head) = message.strip_suffix("expected a sequence") {
        return match field {
            "[exchange]" | "[group]" => {
                let table = field.trim_matches(['[', ']']);
                format!("{message}: write [[{table}]], with double brackets, before each {table}")
            }
            "group.bindings" => {
                format!("{head}expected a list, such as [\"order.created\", \"order.paid\"]")
            }
            "group.retry" => format!("{head}expected a list, such as [\"1s\", \"10s\", \"1m\"]"),
            _ => message,
        };
    }
    message
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Best guess at the dotted field a toml error points at: the table header
/// above the span and the key on the span's line.
fn field_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
        .unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or_default();
    let header = line.trim();
    if header.starts_with('[') && header.ends_with(']') && !header.contains(['"', ',', '=']) {
        // The error is about a table header itself ("[group]", "[group.x]").
        return header.to_owned();
    }
    let key = line.split('=').next().unwrap_or_default().trim();
    match (table.is_empty(), key.is_empty() || key.starts_with('[')) {
        (true, _) => key.to_owned(),
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default, rename = "exchange")]
    exchanges: Vec<Spanned<RawExchange>>,
    #[serde(default, rename = "group")]
    groups: Vec<Spanned<RawGroup>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExchange {
    name: Spanned<String>,
    kind: Spanned<ExchangeKind>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<String>,
    exchange: Spanned<String>,
    bindings: Option<Vec<Spanned<String>>>,
    queue_type: Option<Spanned<QueueType>>,
    retry: Option<Spanned<Vec<Spanned<String>>>>,
    prefetch: Option<Spanned<u16>>,
    concurrency: Option<Spanned<u16>>,
    handler_timeout: Option<Spanned<String>>,
    delivery_limit: Option<Spanned<u32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[exchange]]
name = "orders"
kind = "topic"

[[group]]
name = "billing"
exchange = "orders"
bindings = ["order.created", "order.paid"]
queue_type = "quorum"
retry = ["1s", "10s", "1m", "10m"]
prefetch = 32
concurrency = 16
handler_timeout = "30s"
delivery_limit = 5
"#;

    fn err(text: &str) -> String {
        match Topology::parse(text, "warren.toml") {
            Ok(t) => panic!("expected an error, got {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_the_design_example() {
        let t = Topology::parse(GOOD, "warren.toml").unwrap();
        let g = &t.groups[0];
        assert_eq!(g.name, "billing");
        assert_eq!(
            g.retry,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_secs(600)
            ]
        );
        assert_eq!(g.delivery_limit, Some(5));
        assert_eq!(g.handler_timeout, Duration::from_secs(30));
        assert_eq!(t.exchanges[0].kind, ExchangeKind::Topic);
        assert!(t.lints().is_empty(), "{:?}", t.lints());
    }

    #[test]
    fn defaults_are_documented_constants() {
        let t = Topology::parse("[[exchange]]\nname='e'\nkind='direct'\n[[group]]\nname='g'\nexchange='e'\nbindings=['k']\n", "f").unwrap();
        let g = &t.groups[0];
        assert_eq!(g.queue_type, QueueType::Quorum);
        assert_eq!(g.retry, DEFAULT_RETRY.to_vec());
        assert_eq!(g.prefetch, DEFAULT_PREFETCH);
        assert_eq!(g.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(g.handler_timeout, DEFAULT_HANDLER_TIMEOUT);
        assert_eq!(g.delivery_limit, None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("0s").unwrap_err().contains("zero"));
        assert!(parse_duration("soon")
            .unwrap_err()
            .contains("not a duration"));
    }

    #[test]
    fn unknown_key_names_line_and_field() {
        let e = err("[[exchange]]\nname = \"orders\"\nkind = \"topic\"\ncolour = \"red\"\n");
        assert!(e.starts_with("warren.toml:4:"), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn bad_kind_lists_what_is_allowed() {
        let e = err("[[exchange]]\nname = \"orders\"\nkind = \"round-robin\"\n");
        assert!(e.starts_with("warren.toml:3:"), "{e}");
        assert!(e.contains("exchange.kind"), "{e}");
        assert!(
            e.contains("direct")
                && e.contains("topic")
                && e.contains("fanout")
                && e.contains("headers"),
            "{e}"
        );
    }

    #[test]
    fn lints_flag_unordered_tiers_and_missing_delivery_limit() {
        let t = Topology::parse("[[exchange]]\nname='e'\nkind='direct'\n[[group]]\nname='g'\nexchange='e'\nbindings=['k']\nretry=['10s','1s']\n", "f").unwrap();
        let lints: Vec<String> = t.lints().iter().map(ToString::to_string).collect();
        assert!(lints.iter().any(|l| l.contains("ascending")), "{lints:?}");
        assert!(
            lints.iter().any(|l| l.contains("delivery_limit")),
            "{lints:?}"
        );
    }

    #[test]
    fn a_group_on_a_headers_exchange_is_told_it_gets_everything() {
        let t = Topology::parse("[[exchange]]\nname='e'\nkind='headers'\n[[group]]\nname='g'\nexchange='e'\nbindings=['k']\ndelivery_limit=3\n", "f").unwrap();
        let lints: Vec<String> = t.lints().iter().map(ToString::to_string).collect();
        assert_eq!(
            lints,
            ["group \"g\": exchange \"e\" is a headers exchange, which routes on binding arguments that warren does not declare: each binding matches every message, whatever its key"]
        );
    }

    #[test]
    fn a_handler_timeout_at_or_over_the_broker_consumer_timeout_is_linted() {
        let file = |t: &str| {
            format!("[[exchange]]\nname='e'\nkind='direct'\n[[group]]\nname='g'\nexchange='e'\nbindings=['k']\ndelivery_limit=3\nhandler_timeout='{t}'\n")
        };
        let lints = |t: &str| -> Vec<String> {
            Topology::parse(&file(t), "f")
                .unwrap()
                .lints()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            lints("30m"),
            ["group \"g\": handler_timeout 30m is at or over RabbitMQ's default consumer_timeout (30m): the broker closes the channel of a delivery unacked that long, before warren's timeout fires, and redelivers the message; raise the broker's consumer_timeout (rabbitmq.conf, in milliseconds) above handler_timeout plus the time a delivery waits for a free handler, or lower handler_timeout"]
        );
        assert_eq!(lints("2h").len(), 1);
        assert!(
            lints("29m 59s 999ms").is_empty(),
            "{:?}",
            lints("29m 59s 999ms")
        );
    }

    #[test]
    fn wildcards_on_a_direct_exchange_and_keys_on_a_fanout_are_linted() {
        let lints = |kind: &str, bindings: &str| -> Vec<String> {
            let file = format!("[[exchange]]\nname='e'\nkind='{kind}'\n[[group]]\nname='g'\nexchange='e'\nbindings=[{bindings}]\ndelivery_limit=3\n");
            Topology::parse(&file, "f")
                .unwrap()
                .lints()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            lints("direct", "'order.created', 'order.*', '#'"),
            ["group \"g\": binding keys \"order.*\", \"#\" on direct exchange \"e\" match only messages whose routing key is exactly that text: * and # are wildcards on topic exchanges only; make \"e\" a topic exchange, or bind exact keys"]
        );
        assert_eq!(
            lints("fanout", "'order.created'"),
            ["group \"g\": exchange \"e\" is a fanout exchange, which ignores binding keys: the work queue receives every message, whatever its key"]
        );
        // What each kind is for: no lint.
        assert!(lints("direct", "'order.created'").is_empty());
        assert!(lints("topic", "'order.*', '#'").is_empty());
        assert!(lints("fanout", "''").is_empty());
    }

    #[test]
    fn to_toml_round_trips() {
        let t = Topology::parse(GOOD, "f").unwrap().with_prefix("demo.");
        let again = Topology::parse(&t.to_toml(), "g").unwrap();
        assert_eq!(again, t);
    }

    #[test]
    fn prefix_renames_groups_and_exchanges() {
        let t = Topology::parse(GOOD, "f").unwrap().with_prefix("t1.");
        assert_eq!(t.groups[0].name, "t1.billing");
        assert_eq!(t.groups[0].exchange, "t1.orders");
        assert_eq!(t.exchanges[0].name, "t1.orders");
    }
}
