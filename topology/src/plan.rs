//! The plan: every exchange, queue (with its arguments) and binding a topology
//! derives, exactly as DESIGN.md's "Derived names" table says.

use std::collections::BTreeMap;
use std::fmt;

use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::config::{ExchangeKind, Group, QueueType, Topology};
use crate::names;

/// A queue argument value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Arg {
    /// A string argument.
    Str(String),
    /// An integer argument.
    Int(i64),
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arg::Str(s) => write!(f, "{s:?}"),
            Arg::Int(i) => write!(f, "{i}"),
        }
    }
}

/// What a queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "role", content = "tier")]
pub enum Role {
    /// `{group}`: where the group consumes.
    Work,
    /// `{group}.retry.{n}`: waits out tier n's TTL, then goes back to work.
    Retry(usize),
    /// `{group}.dead`: the operator's inbox.
    Dead,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Work => f.write_str("work"),
            Role::Retry(n) => write!(f, "retry {n}"),
            Role::Dead => f.write_str("dead"),
        }
    }
}

/// An exchange to declare (always durable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedExchange {
    /// Name.
    pub name: String,
    /// Type.
    pub kind: ExchangeKind,
}

/// A queue to declare (always durable), with its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedQueue {
    /// Name.
    pub name: String,
    /// The group it belongs to.
    pub group: String,
    /// What it is for.
    #[serde(flatten)]
    pub role: Role,
    /// `x-...` arguments.
    pub arguments: BTreeMap<String, Arg>,
}

impl PlannedQueue {
    /// The arguments as an AMQP table.
    pub fn field_table(&self) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in &self.arguments {
            let v = match v {
                Arg::Str(s) => AMQPValue::LongString(s.as_str().into()),
                Arg::Int(i) => AMQPValue::LongLongInt(*i),
            };
            t.insert(k.as_str().into(), v);
        }
        t
    }
}

/// A binding to declare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedBinding {
    /// Source exchange.
    pub exchange: String,
    /// Destination queue.
    pub queue: String,
    /// Binding key.
    pub key: String,
}

/// Everything a topology declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Exchanges, `warren.dlx` included.
    pub exchanges: Vec<PlannedExchange>,
    /// Queues: per group the work queue, its retry tiers and its dead queue.
    pub queues: Vec<PlannedQueue>,
    /// Bindings.
    pub bindings: Vec<PlannedBinding>,
}

fn s(v: &str) -> Arg {
    Arg::Str(v.to_owned())
}

/// The work queue of a group, as declared.
pub fn work_queue(g: &Group) -> PlannedQueue {
    let mut a = BTreeMap::new();
    a.insert("x-queue-type".into(), s(g.queue_type.as_str()));
    a.insert(
        "x-dead-letter-exchange".into(),
        s(names::DEAD_LETTER_EXCHANGE),
    );
    a.insert("x-dead-letter-routing-key".into(), s(&g.name));
    match g.queue_type {
        QueueType::Quorum => {
            if let Some(limit) = g.delivery_limit {
                a.insert("x-delivery-limit".into(), Arg::Int(i64::from(limit)));
            }
        }
        QueueType::Classic => {
            a.insert("x-queue-version".into(), Arg::Int(2));
        }
    }
    PlannedQueue {
        name: g.work_queue(),
        group: g.name.clone(),
        role: Role::Work,
        arguments: a,
    }
}

/// Retry tier `tier` (1-based) of a group, as declared.
pub fn retry_queue(g: &Group, tier: usize) -> Option<PlannedQueue> {
    let ttl = g.retry.get(tier.checked_sub(1)?)?;
    let mut a = BTreeMap::new();
    a.insert("x-queue-type".into(), s(g.queue_type.as_str()));
    a.insert(
        "x-message-ttl".into(),
        Arg::Int(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
    );
    a.insert("x-dead-letter-exchange".into(), s(""));
    a.insert("x-dead-letter-routing-key".into(), s(&g.name));
    match g.queue_type {
        QueueType::Quorum => {
            a.insert("x-dead-letter-strategy".into(), s("at-least-once"));
            a.insert("x-overflow".into(), s("reject-publish"));
        }
        QueueType::Classic => {
            a.insert("x-queue-version".into(), Arg::Int(2));
        }
    }
    Some(PlannedQueue {
        name: g.retry_queue(tier),
        group: g.name.clone(),
        role: Role::Retry(tier),
        arguments: a,
    })
}

/// The dead-letter queue of a group: classic, and nothing that could ever
/// drop a message (no TTL, no length limit, no dead-letter exchange).
pub fn dead_queue(g: &Group) -> PlannedQueue {
    planned_dead_queue(&g.name)
}

/// The dead-letter queue of the group named `group`, as declared (the
/// operator checks a queue against it before reading).
pub fn planned_dead_queue(group: &str) -> PlannedQueue {
    let mut a = BTreeMap::new();
    a.insert("x-queue-type".into(), s("classic"));
    a.insert("x-queue-version".into(), Arg::Int(2));
    PlannedQueue {
        name: names::dead_queue(group),
        group: group.to_owned(),
        role: Role::Dead,
        arguments: a,
    }
}

impl Plan {
    /// The plan of a topology.
    pub fn new(t: &Topology) -> Plan {
        let mut exchanges: Vec<PlannedExchange> = t
            .exchanges
            .iter()
            .map(|e| PlannedExchange {
                name: e.name.clone(),
                kind: e.kind,
            })
            .collect();
        if !t.groups.is_empty() {
            exchanges.push(PlannedExchange {
                name: names::DEAD_LETTER_EXCHANGE.into(),
                kind: ExchangeKind::Topic,
            });
        }
        let mut queues = Vec::new();
        let mut bindings = Vec::new();
        for g in &t.groups {
            queues.push(work_queue(g));
            queues.extend((1..=g.retry.len()).filter_map(|n| retry_queue(g, n)));
            queues.push(dead_queue(g));
            for key in &g.bindings {
                bindings.push(PlannedBinding {
                    exchange: g.exchange.clone(),
                    queue: g.work_queue(),
                    key: key.clone(),
                });
            }
            bindings.push(PlannedBinding {
                exchange: names::DEAD_LETTER_EXCHANGE.into(),
                queue: g.dead_queue(),
                key: g.name.clone(),
            });
        }
        Plan {
            exchanges,
            queues,
            bindings,
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "EXCHANGES")?;
        for e in &self.exchanges {
            writeln!(f, "  {:<40} {} durable", e.name, e.kind)?;
        }
        writeln!(f, "QUEUES")?;
        for q in &self.queues {
            let args: Vec<String> = q
                .arguments
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(
                f,
                "  {:<40} {:<8} durable {}",
                q.name,
                q.role.to_string(),
                args.join(" ")
            )?;
        }
        writeln!(f, "BINDINGS")?;
        for b in &self.bindings {
            writeln!(f, "  {:<40} -> {:<40} key {:?}", b.exchange, b.queue, b.key)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_matches_the_design_table() {
        let t = Topology::parse(
            "[[exchange]]\nname='orders'\nkind='topic'\n[[group]]\nname='billing'\nexchange='orders'\nbindings=['order.*']\nretry=['1s','10s']\ndelivery_limit=5\n[[group]]\nname='audit'\nexchange='orders'\nbindings=['#']\nqueue_type='classic'\nretry=['500ms']\n",
            "f",
        )
        .unwrap();
        let p = Plan::new(&t);
        let names: Vec<&str> = p.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "billing",
                "billing.retry.1",
                "billing.retry.2",
                "billing.dead",
                "audit",
                "audit.retry.1",
                "audit.dead"
            ]
        );
        let work = &p.queues[0].arguments;
        assert_eq!(work["x-queue-type"], Arg::Str("quorum".into()));
        assert_eq!(
            work["x-dead-letter-exchange"],
            Arg::Str("warren.dlx".into())
        );
        assert_eq!(
            work["x-dead-letter-routing-key"],
            Arg::Str("billing".into())
        );
        assert_eq!(work["x-delivery-limit"], Arg::Int(5));
        let r2 = &p.queues[2].arguments;
        assert_eq!(r2["x-message-ttl"], Arg::Int(10_000));
        assert_eq!(r2["x-dead-letter-exchange"], Arg::Str(String::new()));
        assert_eq!(r2["x-dead-letter-routing-key"], Arg::Str("billing".into()));
        assert_eq!(
            r2["x-dead-letter-strategy"],
            Arg::Str("at-least-once".into())
        );
        assert_eq!(r2["x-overflow"], Arg::Str("reject-publish".into()));
        let dead = &p.queues[3].arguments;
        assert_eq!(dead.len(), 2, "{dead:?}");
        assert_eq!(dead["x-queue-type"], Arg::Str("classic".into()));
        let classic_retry = &p.queues[5].arguments;
        assert_eq!(classic_retry["x-queue-version"], Arg::Int(2));
        assert!(!classic_retry.contains_key("x-overflow"));
        assert_eq!(p.exchanges.last().unwrap().name, "warren.dlx");
        assert!(p.bindings.contains(&PlannedBinding {
            exchange: "warren.dlx".into(),
            queue: "audit.dead".into(),
            key: "audit".into()
        }));
    }
}
