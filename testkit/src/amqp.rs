//! Generic broker helpers for integration tests: unique names, the broker
//! URL, a connection, a guard that deletes what a test declared, and
//! reading, publishing and polling with plain lapin.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use warren_topology::{AmqpUrl, ConnectOptions, Plan, DEAD_LETTER_EXCHANGE};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or run) uses: `<tag><pid>-<n>-<nanos>`.
pub fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{tag}{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A name prefix no other test (or run) uses: `<tag><pid>-<n>-<nanos>.`.
pub fn unique_prefix(tag: &str) -> String {
    format!("{}.", unique(tag))
}

/// The broker: `WARREN_AMQP_URL`, else [`warren_topology::DEFAULT_AMQP_URL`].
pub fn url() -> AmqpUrl {
    std::env::var("WARREN_AMQP_URL")
        .unwrap_or_else(|_| warren_topology::DEFAULT_AMQP_URL.to_owned())
        .parse()
        .expect("WARREN_AMQP_URL parses")
}

/// A connection to [`url`] (component `test`, 3 attempts); panics when the
/// broker cannot be reached.
pub async fn connect() -> Connection {
    warren_topology::connect(&ConnectOptions::new(url(), "test").attempts(3))
        .await
        .expect("the test broker accepts a connection")
}

/// Queues and exchanges a test declared, deleted when the guard is dropped
/// (also when the test panicked), queues first. Never `warren.dlx`, which is
/// shared. Deleting is best effort: a broker that cannot be reached is left
/// as it is.
pub struct Cleanup {
    url: Option<AmqpUrl>,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    /// Every queue and exchange of `plan` (except `warren.dlx`).
    pub fn new(plan: &Plan) -> Cleanup {
        let mut c = Cleanup::empty();
        for q in &plan.queues {
            c.add_queue(&q.name);
        }
        for e in &plan.exchanges {
            c.add_exchange(&e.name);
        }
        c
    }

    /// Nothing yet: add with [`Cleanup::queue`] or [`Cleanup::add_queue`].
    pub fn empty() -> Cleanup {
        Cleanup {
            url: None,
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    /// Deletes on the broker at `url` instead of [`url`].
    pub fn at(mut self, url: AmqpUrl) -> Cleanup {
        self.url = Some(url);
        self
    }

    /// Also deletes queue `name`.
    pub fn queue(mut self, name: &str) -> Cleanup {
        self.add_queue(name);
        self
    }

    /// Also deletes exchange `name` (unless it is `warren.dlx`).
    pub fn exchange(mut self, name: &str) -> Cleanup {
        self.add_exchange(name);
        self
    }

    /// Also deletes queue `name`.
    pub fn add_queue(&mut self, name: &str) {
        self.queues.push(name.to_owned());
    }

    /// Also deletes exchange `name` (unless it is `warren.dlx`).
    pub fn add_exchange(&mut self, name: &str) {
        if name != DEAD_LETTER_EXCHANGE {
            self.exchanges.push(name.to_owned());
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let url = self.url.take().unwrap_or_else(url);
        // Drop cannot await: clean up on a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(conn) =
                    warren_topology::connect(&ConnectOptions::new(url, "test-cleanup").attempts(2))
                        .await
                else {
                    return;
                };
                for q in queues {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for e in exchanges {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

/// Messages ready in a queue (a passive declare on a channel of its own).
pub async fn count(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("a channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    let _ = ch.close(200, "ok".into()).await;
    q.message_count()
}

/// Publishes to `exchange`/`key` (mandatory) on a channel of its own and
/// waits for the confirm; panics unless it was confirmed and routed.
pub async fn publish(
    conn: &Connection,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let ch = conn.create_channel().await.expect("a channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    publish_on(&ch, exchange, key, body, props).await;
    let _ = ch.close(200, "ok".into()).await;
}

/// Publishes to `exchange`/`key` (mandatory) on `ch`, a channel in confirm
/// mode, and waits for the confirm; panics unless it was confirmed and
/// routed.
pub async fn publish_on(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let c = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await
        .expect("published")
        .await
        .expect("a confirm");
    assert!(
        c.is_ack() && c.take_message().is_none(),
        "publish to {exchange}/{key} not routed"
    );
}

/// Every message of a queue, taken for good (auto-ack), head first:
/// (body, properties).
pub async fn drain(conn: &Connection, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
    let ch = conn.create_channel().await.expect("a channel");
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        out.push((m.delivery.data, m.delivery.properties));
    }
    let _ = ch.close(200, "ok".into()).await;
    out
}

/// Polls `cond` every 50 ms until it holds or `within` passes; returns
/// whether it held (checked once more at the deadline).
pub async fn wait_until<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond().await
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after
/// `within`.
pub async fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
