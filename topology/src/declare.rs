//! Declaring a plan on the broker (`apply`) and checking the broker against it
//! (`verify`).
//!
//! AMQP 0-9-1 cannot read an object's arguments, but it can compare them: a
//! passive declare says whether an object exists, and an active declare of an
//! existing object with the same arguments is a no-op while different ones
//! fail with PRECONDITION_FAILED, whose text names the argument. Every check
//! runs on its own channel because a failed declare closes the channel.
//!
//! `apply` checks everything first and declares nothing when any object
//! differs: it never deletes or changes an existing queue.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use std::collections::HashSet;

use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ErrorKind};
use serde::Serialize;

use crate::error::TopologyError;
use crate::plan::{Plan, PlannedExchange, PlannedQueue};

/// What the broker has for one planned object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum ObjectState {
    /// Exists with exactly the planned settings.
    Matches,
    /// Does not exist.
    Missing,
    /// Exists with other settings; the detail says which, as far as the broker says.
    Differs(String),
}

/// One object's check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `exchange` or `queue`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// What the broker has.
    #[serde(flatten)]
    pub state: ObjectState,
}

/// What the broker has for a whole plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// One check per planned exchange and queue.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every object exists with the planned settings.
    pub fn matches(&self) -> bool {
        self.checks.iter().all(|c| c.state == ObjectState::Matches)
    }

    /// The objects that exist with other settings.
    pub fn differing(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(|c| matches!(c.state, ObjectState::Differs(_)))
    }
}

fn lapin_kind(k: crate::config::ExchangeKind) -> lapin::ExchangeKind {
    use crate::config::ExchangeKind as K;
    match k {
        K::Direct => lapin::ExchangeKind::Direct,
        K::Topic => lapin::ExchangeKind::Topic,
        K::Fanout => lapin::ExchangeKind::Fanout,
        K::Headers => lapin::ExchangeKind::Headers,
    }
}

fn soft_error(e: &lapin::Error) -> Option<(AMQPSoftError, String)> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(s) => Some((s.clone(), p.get_message().to_string())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// What a check takes, for [`TopologyError::AccessRefused`].
const CHECK_NEEDS: &str = "verify and apply check an existing exchange or queue by declaring it again with the planned arguments (AMQP 0-9-1 cannot read them back), which takes the configure permission on its name, even only to verify";
/// What declaring takes.
const DECLARE_NEEDS: &str =
    "declaring an exchange or queue takes the configure permission on its name";
/// What binding takes.
const BIND_NEEDS: &str =
    "a binding takes the write permission on the queue and the read permission on the exchange";

/// A broker error about `object`: [`TopologyError::AccessRefused`] (saying
/// it `needs`) when the broker refused a permission.
fn broker_error(object: String, source: lapin::Error, needs: &'static str) -> TopologyError {
    match soft_error(&source) {
        Some((AMQPSoftError::ACCESSREFUSED, text)) => TopologyError::AccessRefused {
            object,
            text,
            needs,
        },
        _ => TopologyError::Broker { object, source },
    }
}

/// RabbitMQ's refusal of an object for lack of a permission, read from
/// its words: `ACCESS_REFUSED - access to KIND 'NAME' in vhost 'VHOST'
/// refused for user 'USER'` (the default exchange is `amq.default` there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedAccess {
    /// The broker's words, from `ACCESS_REFUSED` on (the whole text when
    /// that is missing).
    pub said: String,
    /// `exchange` or `queue`.
    pub kind: String,
    /// The object's name.
    pub name: String,
    /// The vhost.
    pub vhost: String,
    /// The user refused.
    pub user: String,
}

/// Reads [`RefusedAccess`] from an error's text; `None` when it is not
/// such a refusal.
pub fn refused_access(text: &str) -> Option<RefusedAccess> {
    let said = text
        .find("ACCESS_REFUSED - ")
        .map_or(text, |at| &text[at..]);
    let rest = said.split_once("access to ")?.1;
    let (kind, rest) = rest.split_once(" '")?;
    let (name, rest) = rest.split_once("' in vhost '")?;
    let (vhost, rest) = rest.split_once("' refused for user '")?;
    let user = rest.strip_suffix('\'').unwrap_or(rest);
    Some(RefusedAccess {
        said: said.to_owned(),
        kind: kind.to_owned(),
        name: name.to_owned(),
        vhost: vhost.to_owned(),
        user: user.to_owned(),
    })
}

/// Turns RabbitMQ's "inequivalent arg 'x-message-ttl' for queue 'q' in vhost
/// '/': received the value '2000' of type 'signedint' but current is the
/// value '1000' of type 'signedint'" into "x-message-ttl: the broker has 1000,
/// the topology wants 2000".
pub fn explain_precondition(text: &str) -> String {
    let text = text.trim_start_matches("PRECONDITION_FAILED - ");
    let Some(rest) = text.strip_prefix("inequivalent arg '") else {
        return text.to_owned();
    };
    match parse_inequivalent(text) {
        Some(i) => format!(
            "{}: the broker has {}, the topology wants {}",
            i.arg, i.current, i.received
        ),
        None => match rest.split_once('\'') {
            Some((arg, _)) => format!("argument {arg}: {text}"),
            None => text.to_owned(),
        },
    }
}

async fn check_exchange(
    conn: &Connection,
    e: &PlannedExchange,
) -> Result<ObjectState, TopologyError> {
    let broker = |source| broker_error(format!("exchange {:?}", e.name), source, CHECK_NEEDS);
    let ch = conn.create_channel().await.map_err(broker)?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    };
    if let Err(err) = ch
        .exchange_declare(
            e.name.as_str().into(),
            lapin_kind(e.kind),
            passive,
            FieldTable::default(),
        )
        .await
    {
        return match soft_error(&err) {
            Some((AMQPSoftError::NOTFOUND, _)) => Ok(ObjectState::Missing),
            _ => Err(broker(err)),
        };
    }
    let active = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let state = match ch
        .exchange_declare(
            e.name.as_str().into(),
            lapin_kind(e.kind),
            active,
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => ObjectState::Matches,
        Err(err) => match soft_error(&err) {
            Some((AMQPSoftError::PRECONDITIONFAILED, text)) => {
                ObjectState::Differs(explain_precondition(&text))
            }
            _ => return Err(broker(err)),
        },
    };
    let _ = ch.close(200, "checked".into()).await;
    Ok(state)
}

async fn check_queue(conn: &Connection, q: &PlannedQueue) -> Result<ObjectState, TopologyError> {
    let broker = |source| broker_error(format!("queue {:?}", q.name), source, CHECK_NEEDS);
    let ch = conn.create_channel().await.map_err(broker)?;
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    };
    if let Err(err) = ch
        .queue_declare(q.name.as_str().into(), passive, FieldTable::default())
        .await
    {
        return match soft_error(&err) {
            Some((AMQPSoftError::NOTFOUND, _)) => Ok(ObjectState::Missing),
            _ => Err(broker(err)),
        };
    }
    let text = match ch
        .queue_declare(
            q.name.as_str().into(),
            QueueDeclareOptions::durable(),
            q.field_table(),
        )
        .await
    {
        Ok(_) => {
            let _ = ch.close(200, "checked".into()).await;
            return Ok(ObjectState::Matches);
        }
        Err(err) => match soft_error(&err) {
            Some((AMQPSoftError::PRECONDITIONFAILED, text)) => text,
            _ => return Err(broker(err)),
        },
    };
    Ok(ObjectState::Differs(
        every_difference(conn, q, text).await.join("; "),
    ))
}

/// The most declares [`every_difference`] makes for one queue.
const MAX_PROBES: usize = 16;

/// What differs between queue `q` on the broker and its plan, given the
/// broker's refusal `text` of the planned declare. The broker names only
/// the first argument it finds different (in its own order: a classic queue
/// wanted as quorum is refused for `x-queue-version` before `x-queue-type`),
/// so the queue is declared again with the broker's value of each argument
/// named so far, until the broker accepts (a no-op: an existing queue
/// declared with its own arguments is left as it is) or names one it cannot
/// be given back. Each declare is preceded by a passive one on the same
/// channel, so that a queue deleted meanwhile is not created.
async fn every_difference(conn: &Connection, q: &PlannedQueue, text: String) -> Vec<String> {
    let mut differences = vec![explain_precondition(&text)];
    let mut args = q.field_table().inner().clone();
    let mut options = QueueDeclareOptions::durable();
    let mut seen = HashSet::new();
    let mut text = text;
    while differences.len() < MAX_PROBES {
        let Some((arg, current)) = inequivalent(&text) else {
            break;
        };
        if !seen.insert(arg.clone()) {
            break;
        }
        match (arg.as_str(), current) {
            ("durable", Current::Value(v, None)) => options.durable = v == "true",
            ("auto_delete", Current::Value(v, None)) => options.auto_delete = v == "true",
            (a, Current::None) if a.starts_with("x-") => {
                args.remove(a);
            }
            (a, Current::Value(v, kind)) if a.starts_with("x-") => {
                // Without a type in the text, the value is of the type sent.
                let kind = kind.unwrap_or_else(|| {
                    match args.get(a) {
                        Some(AMQPValue::LongLongInt(_)) => "long",
                        _ => "longstr",
                    }
                    .to_owned()
                });
                let Some(value) = amqp_value(&v, &kind) else {
                    break;
                };
                args.insert(a.into(), value);
            }
            _ => break,
        }
        let Ok(ch) = conn.create_channel().await else {
            break;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..options
        };
        if ch
            .queue_declare(q.name.as_str().into(), passive, FieldTable::default())
            .await
            .is_err()
        {
            break;
        }
        match ch
            .queue_declare(
                q.name.as_str().into(),
                options,
                FieldTable::from(args.clone()),
            )
            .await
        {
            Ok(_) => {
                let _ = ch.close(200, "checked".into()).await;
                break;
            }
            Err(err) => match soft_error(&err) {
                Some((AMQPSoftError::PRECONDITIONFAILED, next)) => {
                    differences.push(explain_precondition(&next));
                    text = next;
                }
                _ => break,
            },
        }
    }
    differences
}

/// A value as RabbitMQ's refusal says it: what the declare sent
/// (`received ...`) or what the broker has (`current is ...`).
#[derive(Debug, PartialEq, Eq)]
enum Current {
    /// `none`.
    None,
    /// `the value 'V' of type 'T'`, `'V' of type 'T'`, or `'V'` (a flag
    /// such as `durable`, without a type).
    Value(String, Option<String>),
}

impl std::fmt::Display for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Current::None => f.write_str("none"),
            Current::Value(v, _) => f.write_str(v),
        }
    }
}

/// RabbitMQ's "inequivalent arg 'A' for queue 'Q' in vhost 'V': received
/// R but current is C", read once for [`explain_precondition`] and for
/// [`every_difference`].
struct Inequivalent {
    arg: String,
    received: Current,
    current: Current,
}

/// Reads [`Inequivalent`] from the broker's words. The last `received`
/// and `but current is` are taken, so a queue or vhost named with those
/// words is read right.
fn parse_inequivalent(text: &str) -> Option<Inequivalent> {
    let rest = text.split_once("inequivalent arg '")?.1;
    let (arg, rest) = rest.split_once('\'')?;
    let (before, current) = rest.rsplit_once("but current is ")?;
    let received = before.rsplit_once("received ")?.1;
    Some(Inequivalent {
        arg: arg.to_owned(),
        received: value_said(received)?,
        current: value_said(current)?,
    })
}

/// One value of the refusal's text (see [`Current`]).
fn value_said(s: &str) -> Option<Current> {
    let s = s.trim();
    if s == "none" {
        return Some(Current::None);
    }
    let s = s.strip_prefix("the value ").unwrap_or(s);
    let s = s.strip_prefix('\'')?.strip_suffix('\'')?;
    Some(match s.rsplit_once("' of type '") {
        Some((value, kind)) => Current::Value(value.to_owned(), Some(kind.to_owned())),
        None => Current::Value(s.to_owned(), None),
    })
}

/// The argument and the broker's value of RabbitMQ's "inequivalent arg
/// 'A' for queue 'Q' in vhost 'V': received ... but current is ...".
fn inequivalent(text: &str) -> Option<(String, Current)> {
    parse_inequivalent(text).map(|i| (i.arg, i.current))
}

/// The value `v` of RabbitMQ's type `kind`, as a declare that the broker
/// finds equivalent sends it (integers of any width are one class there).
fn amqp_value(v: &str, kind: &str) -> Option<AMQPValue> {
    Some(match kind {
        "longstr" | "shortstr" => AMQPValue::LongString(v.into()),
        "byte" | "short" | "signedint" | "long" | "unsignedbyte" | "unsignedshort"
        | "unsignedint" => AMQPValue::LongLongInt(v.parse().ok()?),
        "bool" => AMQPValue::Boolean(v.parse().ok()?),
        _ => return None,
    })
}

/// Checks every planned exchange and queue against the broker. Changes
/// nothing: missing objects are reported, not created.
pub async fn verify(conn: &Connection, plan: &Plan) -> Result<Report, TopologyError> {
    let mut report = Report::default();
    for e in &plan.exchanges {
        report.checks.push(Check {
            kind: "exchange",
            name: e.name.clone(),
            state: check_exchange(conn, e).await?,
        });
    }
    for q in &plan.queues {
        report.checks.push(Check {
            kind: "queue",
            name: q.name.clone(),
            state: check_queue(conn, q).await?,
        });
    }
    Ok(report)
}

/// What `apply` did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// It did not exist and was declared.
    Created,
    /// It existed with the same settings; nothing changed.
    Unchanged,
    /// A binding was declared (idempotent: the broker keeps one).
    Bound,
}

/// One line of what `apply` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// `exchange`, `queue` or `binding`.
    pub kind: &'static str,
    /// The object.
    pub name: String,
    /// What happened.
    pub action: Action,
}

/// Declares a plan. Checks everything first: if any existing object differs,
/// returns [`TopologyError::Mismatch`] naming each of them and what differs,
/// and declares nothing at all. Applying twice changes nothing.
///
/// A failure while declaring (after the checks) that comes after some
/// objects were created is [`TopologyError::Incomplete`], which names them.
pub async fn apply(conn: &Connection, plan: &Plan) -> Result<Vec<Applied>, TopologyError> {
    let report = verify(conn, plan).await?;
    let differing: Vec<Check> = report.differing().cloned().collect();
    let mut details = differing.iter().filter_map(|c| match &c.state {
        ObjectState::Differs(detail) => Some((c, detail)),
        _ => None,
    });
    if let Some((first, detail)) = details.next() {
        let mut detail = detail.clone();
        for (c, d) in details {
            detail.push_str(&format!("; also {} {:?}: {d}", c.kind, c.name));
        }
        return Err(TopologyError::Mismatch {
            kind: first.kind,
            name: first.name.clone(),
            detail,
            differing,
        });
    }
    let existed = |kind: &str, name: &str| {
        report
            .checks
            .iter()
            .any(|c| c.kind == kind && c.name == name && c.state == ObjectState::Matches)
    };
    let mut done = Vec::new();
    // A failure after something was declared says what was.
    let failed = |done: &[Applied], e: TopologyError| {
        let mut declared: Vec<String> = done
            .iter()
            .filter(|a| a.action == Action::Created)
            .map(|a| format!("{} {:?}", a.kind, a.name))
            .collect();
        let bindings = done.iter().filter(|a| a.action == Action::Bound).count();
        if bindings > 0 {
            declared.push(format!(
                "{bindings} binding{}",
                if bindings == 1 { "" } else { "s" }
            ));
        }
        if declared.is_empty() {
            e
        } else {
            TopologyError::Incomplete {
                declared,
                applied: done.to_vec(),
                source: Box::new(e),
            }
        }
    };
    // A declare refused with PRECONDITION_FAILED here means the object
    // appeared (with other settings) after the checks.
    let refused =
        |kind: &'static str, name: &str, object: String, source: lapin::Error| match soft_error(
            &source,
        ) {
            Some((AMQPSoftError::PRECONDITIONFAILED, text)) => {
                let detail = explain_precondition(&text);
                TopologyError::Mismatch {
                    kind,
                    name: name.to_owned(),
                    detail: detail.clone(),
                    differing: vec![Check {
                        kind,
                        name: name.to_owned(),
                        state: ObjectState::Differs(detail),
                    }],
                }
            }
            _ => broker_error(object, source, DECLARE_NEEDS),
        };
    let ch = match conn.create_channel().await {
        Ok(ch) => ch,
        Err(source) => {
            return Err(TopologyError::Broker {
                object: "a channel".into(),
                source,
            })
        }
    };
    for e in &plan.exchanges {
        let opts = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        if let Err(source) = ch
            .exchange_declare(
                e.name.as_str().into(),
                lapin_kind(e.kind),
                opts,
                FieldTable::default(),
            )
            .await
        {
            let err = refused(
                "exchange",
                &e.name,
                format!("exchange {:?}", e.name),
                source,
            );
            return Err(failed(&done, err));
        }
        done.push(Applied {
            kind: "exchange",
            name: e.name.clone(),
            action: if existed("exchange", &e.name) {
                Action::Unchanged
            } else {
                Action::Created
            },
        });
    }
    for q in &plan.queues {
        if let Err(source) = ch
            .queue_declare(
                q.name.as_str().into(),
                QueueDeclareOptions::durable(),
                q.field_table(),
            )
            .await
        {
            let err = refused("queue", &q.name, format!("queue {:?}", q.name), source);
            return Err(failed(&done, err));
        }
        done.push(Applied {
            kind: "queue",
            name: q.name.clone(),
            action: if existed("queue", &q.name) {
                Action::Unchanged
            } else {
                Action::Created
            },
        });
    }
    for b in &plan.bindings {
        if let Err(source) = ch
            .queue_bind(
                b.queue.as_str().into(),
                b.exchange.as_str().into(),
                b.key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            let object = format!(
                "binding exchange {:?} -> queue {:?} (key {:?})",
                b.exchange, b.queue, b.key
            );
            let err = broker_error(object, source, BIND_NEEDS);
            return Err(failed(&done, err));
        }
        done.push(Applied {
            kind: "binding",
            name: format!("{} -> {} key {:?}", b.exchange, b.queue, b.key),
            action: Action::Bound,
        });
    }
    let _ = ch.close(200, "applied".into()).await;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_access_is_read_from_the_brokers_words() {
        let t = "protocol error: ACCESS_REFUSED - access to queue 'g' in vhost '/' refused for user 'bob'";
        assert_eq!(
            refused_access(t),
            Some(RefusedAccess {
                said: "ACCESS_REFUSED - access to queue 'g' in vhost '/' refused for user 'bob'"
                    .into(),
                kind: "queue".into(),
                name: "g".into(),
                vhost: "/".into(),
                user: "bob".into(),
            })
        );
        let t = "access to exchange 'amq.default' in vhost 'v' refused for user 'u'";
        let r = refused_access(t).unwrap();
        assert_eq!(
            (r.kind.as_str(), r.name.as_str(), r.said.as_str()),
            ("exchange", "amq.default", t)
        );
        assert_eq!(refused_access("NOT_FOUND - no queue 'g'"), None);
    }

    #[test]
    fn precondition_text_is_explained() {
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'g.retry.1' in vhost '/': received the value '2000' of type 'signedint' but current is the value '1000' of type 'signedint'";
        assert_eq!(
            explain_precondition(t),
            "x-message-ttl: the broker has 1000, the topology wants 2000"
        );
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'g' in vhost '/': received the value 'warren.dlx' of type 'longstr' but current is none";
        assert_eq!(
            explain_precondition(t),
            "x-dead-letter-exchange: the broker has none, the topology wants warren.dlx"
        );
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': received '20000' of type 'long' but current is '10000' of type 'long'";
        assert_eq!(
            explain_precondition(t),
            "x-message-ttl: the broker has 10000, the topology wants 20000"
        );
        assert_eq!(explain_precondition("something else"), "something else");
    }

    #[test]
    fn the_brokers_value_is_read_from_its_refusal() {
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-queue-version' for queue 'g' in vhost '/': received none but current is the value '2' of type 'signedint'";
        assert_eq!(
            inequivalent(t),
            Some((
                "x-queue-version".into(),
                Current::Value("2".into(), Some("signedint".into()))
            ))
        );
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'but current is' in vhost '/': received the value 'quorum' of type 'longstr' but current is the value 'classic' of type 'longstr'";
        assert_eq!(
            inequivalent(t),
            Some((
                "x-queue-type".into(),
                Current::Value("classic".into(), Some("longstr".into()))
            ))
        );
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-overflow' for queue 'g' in vhost '/': received the value 'reject-publish' of type 'longstr' but current is none";
        assert_eq!(inequivalent(t), Some(("x-overflow".into(), Current::None)));
        let t = "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'g' in vhost '/': received 'true' but current is 'false'";
        assert_eq!(
            inequivalent(t),
            Some(("durable".into(), Current::Value("false".into(), None)))
        );
        assert_eq!(inequivalent("something else"), None);
        assert_eq!(
            amqp_value("2", "signedint"),
            Some(AMQPValue::LongLongInt(2))
        );
        assert_eq!(amqp_value("x", "table"), None);
    }
}
