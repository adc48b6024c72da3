//! Shared by the consumer integration tests: unique names, a guard that
//! deletes what a test declared, bare-lapin publishing and reading, and
//! waiting on conditions with a deadline.

#![allow(dead_code, unused_imports)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;
use warren_consumer::{ConsumerGroup, Handler, Metrics};
use warren_testkit::Cleanup;
use warren_topology::{Broker, ConnectOptions, Group, Plan, Topology};

pub use warren_testkit::{connect, connection_pids, url, wait_for};

/// A prefix no other test (or run) uses: `tc<pid>-<n>-<nanos>.`.
pub fn unique_prefix() -> String {
    warren_testkit::unique_prefix("tc")
}

/// A declared topology, deleted when dropped (never `warren.dlx`).
pub struct Fixture {
    // First, so it deletes while the connection below is still open.
    _cleanup: Cleanup,
    pub topology: Topology,
    pub conn: Connection,
    pub ch: Channel,
}

impl Fixture {
    /// Parses `toml`, prefixes every name uniquely, applies it.
    pub async fn new(toml: &str) -> Fixture {
        Self::with_prefix(toml, &unique_prefix()).await
    }

    pub async fn with_prefix(toml: &str, prefix: &str) -> Fixture {
        let topology = Topology::parse(toml, "test.toml")
            .unwrap()
            .with_prefix(prefix);
        let plan = Plan::new(&topology);
        let conn = connect().await;
        warren_topology::apply(&conn, &plan).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Fixture {
            _cleanup: Cleanup::new(&plan),
            topology,
            conn,
            ch,
        }
    }

    pub fn group(&self, i: usize) -> Group {
        self.topology.groups[i].clone()
    }

    pub fn exchange(&self) -> String {
        self.topology.exchanges[0].name.clone()
    }

    /// Publishes with a confirm (mandatory).
    pub async fn publish(&self, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
        warren_testkit::publish_on(&self.ch, exchange, key, body, props).await;
    }

    /// Publishes `n` messages to the first exchange with `key`, their ids
    /// `{prefix}0` to `{prefix}{n-1}`, in that order.
    pub async fn publish_numbered(&self, key: &str, body: &[u8], prefix: &str, n: usize) {
        for i in 0..n {
            self.publish(&self.exchange(), key, body, props(&format!("{prefix}{i}")))
                .await;
        }
    }

    /// Messages ready in a queue.
    pub async fn count(&self, queue: &str) -> u32 {
        warren_testkit::count(&self.conn, queue).await
    }

    /// Takes (and acks) `n` messages from a queue, waiting up to `within`.
    pub async fn take(
        &self,
        queue: &str,
        n: usize,
        within: Duration,
    ) -> Vec<lapin::message::BasicGetMessage> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            match self
                .ch
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                Some(m) => {
                    self.ch
                        .basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
                        .await
                        .unwrap();
                    out.push(m);
                }
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "only {} of {n} messages arrived in {queue} within {within:?}",
                        out.len()
                    );
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
        out
    }
}

/// Properties with a message id and a few more to check they survive copies.
pub fn props(id: &str) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert("x-custom".into(), AMQPValue::LongString("kept".into()));
    BasicProperties::default()
        .with_message_id(id.into())
        .with_correlation_id(format!("corr-{id}").into())
        .with_content_type("application/json".into())
        .with_timestamp(1_700_000_000)
        .with_delivery_mode(2)
        .with_headers(h)
}

/// The message's `message_id` ("" when it has none).
pub fn message_id(m: &lapin::message::BasicGetMessage) -> String {
    m.delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// The `message_id`s of `ms`, sorted.
pub fn sorted_ids(ms: &[lapin::message::BasicGetMessage]) -> Vec<String> {
    let mut ids: Vec<String> = ms.iter().map(message_id).collect();
    ids.sort();
    ids
}

pub fn header_str(m: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    match m
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
    {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn header_int(m: &lapin::message::BasicGetMessage, name: &str) -> Option<i64> {
    match m
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
    {
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        _ => None,
    }
}

/// A running consumer group.
pub struct Running {
    pub cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), warren_consumer::ConsumerError>>,
    pub ready: tokio::sync::watch::Receiver<bool>,
    pub broker: Arc<Broker>,
    pub registry: prometheus::Registry,
}

impl Running {
    /// Starts `group` with `handler` (connection component `component`) and
    /// waits until it consumes.
    pub async fn start<H: Handler>(
        group: Group,
        handler: H,
        component: &str,
        tune: impl FnOnce(
            warren_consumer::ConsumerGroupBuilder<H>,
        ) -> warren_consumer::ConsumerGroupBuilder<H>,
    ) -> Running {
        Running::start_as(url(), group, handler, component, tune).await
    }

    /// [`Running::start`] logged in with `url`.
    pub async fn start_as<H: Handler>(
        url: warren_topology::AmqpUrl,
        group: Group,
        handler: H,
        component: &str,
        tune: impl FnOnce(
            warren_consumer::ConsumerGroupBuilder<H>,
        ) -> warren_consumer::ConsumerGroupBuilder<H>,
    ) -> Running {
        let registry = prometheus::Registry::new();
        let broker = Arc::new(
            Broker::connect(ConnectOptions::new(url, component).attempts(3))
                .await
                .unwrap(),
        );
        let builder =
            ConsumerGroup::builder(group, handler).metrics(Metrics::register(&registry).unwrap());
        let g = tune(builder).build().unwrap();
        let mut ready = g.ready();
        let cancel = CancellationToken::new();
        let (c, b) = (cancel.clone(), broker.clone());
        let task = tokio::spawn(async move {
            let r = g.run(&b, c).await;
            b.close().await;
            r
        });
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .expect("group ready in time")
            .unwrap();
        Running {
            cancel,
            task,
            ready,
            broker,
            registry,
        }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("group stops in time")
            .unwrap()
            .unwrap();
    }

    /// A metric's value, summed over series whose labels include `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.registry, name, labels)
    }
}

/// A metric's value in `registry`, summed over series whose labels include
/// `labels`.
pub fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let mut total = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            total += rest
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    total
}

/// A shared record of what handlers saw.
#[derive(Clone, Default)]
pub struct Ledger(pub Arc<Mutex<Vec<Seen>>>);

#[derive(Clone, Debug)]
pub struct Seen {
    pub id: String,
    pub attempt: u32,
    pub redelivered: bool,
    pub kind: Option<String>,
    pub last_error: Option<String>,
    pub at: Instant,
}

impl Ledger {
    pub fn note(&self, d: &warren_consumer::Delivery) {
        self.0.lock().unwrap().push(Seen {
            id: d.message_id().unwrap_or("").to_owned(),
            attempt: d.attempt(),
            redelivered: d.redelivered(),
            kind: d.last_error_kind(),
            last_error: d.last_error(),
            at: Instant::now(),
        });
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn of(&self, id: &str) -> Vec<Seen> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.id == id)
            .cloned()
            .collect()
    }

    pub fn count(&self, id: &str) -> usize {
        self.of(id).len()
    }
}
