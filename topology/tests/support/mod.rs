//! Shared by the topology integration tests: unique names, a guard that
//! deletes what a test declared, and a view of the broker through
//! `rabbitmqctl` (never through our own structs).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use warren_topology::{AmqpUrl, ConnectOptions, Plan, Topology};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A prefix no other test (or run) uses: `t<pid>-<n>-<nanos>.`.
pub fn unique_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "t{}-{}-{nanos}.",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn url() -> AmqpUrl {
    std::env::var("WARREN_AMQP_URL")
        .unwrap_or_else(|_| warren_topology::DEFAULT_AMQP_URL.to_owned())
        .parse()
        .unwrap()
}

pub async fn connect() -> lapin::Connection {
    warren_topology::connect(&ConnectOptions::new(url(), "test").attempts(3))
        .await
        .unwrap()
}

/// Deletes every queue and exchange of a plan (never `warren.dlx`, which is
/// shared) when dropped, also when the test panicked.
pub struct Guard {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Guard {
    pub fn new(plan: &Plan) -> Guard {
        Guard {
            queues: plan.queues.iter().map(|q| q.name.clone()).collect(),
            exchanges: plan
                .exchanges
                .iter()
                .map(|e| e.name.clone())
                .filter(|n| n != warren_topology::DEAD_LETTER_EXCHANGE)
                .collect(),
        }
    }

    pub fn queue(mut self, name: &str) -> Guard {
        self.queues.push(name.to_owned());
        self
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // Drop cannot await: clean up on a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let conn = connect().await;
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

/// A queue as the broker lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerQueue {
    pub name: String,
    pub durable: bool,
    pub kind: String,
    pub messages: u64,
    /// argument -> value (as JSON)
    pub arguments: BTreeMap<String, serde_json::Value>,
}

/// Every queue whose name starts with `prefix`, through `rabbitmqctl`.
pub fn broker_queues(prefix: &str) -> BTreeMap<String, BrokerQueue> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--formatter",
            "json",
            "name",
            "durable",
            "type",
            "messages",
            "arguments",
        ])
        .output()
        .expect("rabbitmqctl runs (tests run as root on the broker's machine)");
    assert!(
        out.status.success(),
        "rabbitmqctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.into_iter()
        .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .map(|r| {
            let arguments = r["arguments"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| Some((a[0].as_str()?.to_owned(), a[2].clone())))
                .collect();
            let name = r["name"].as_str().unwrap_or_default().to_owned();
            (
                name.clone(),
                BrokerQueue {
                    name,
                    durable: r["durable"].as_bool().unwrap_or(false),
                    kind: r["type"].as_str().unwrap_or_default().to_owned(),
                    messages: r["messages"].as_u64().unwrap_or(0),
                    arguments,
                },
            )
        })
        .collect()
}

/// Bindings (source, destination, key) whose destination starts with `prefix`.
pub fn broker_bindings(prefix: &str) -> Vec<(String, String, String)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_bindings",
            "-q",
            "--formatter",
            "json",
            "source_name",
            "destination_name",
            "routing_key",
        ])
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut v: Vec<_> = rows
        .into_iter()
        .filter(|r| {
            r["destination_name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .filter(|r| r["source_name"].as_str().is_some_and(|s| !s.is_empty()))
        .map(|r| {
            (
                r["source_name"].as_str().unwrap_or_default().to_owned(),
                r["destination_name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                r["routing_key"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The message count of a queue, through a passive declare.
pub async fn count(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let _ = ch.close(200, "".into()).await;
    q.message_count()
}

/// Waits until `cond` holds or the deadline passes; returns whether it held.
pub async fn wait_until<F, Fut>(deadline: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond().await
}

pub fn topology(prefix: &str, text: &str) -> Topology {
    Topology::parse(text, "test.toml")
        .unwrap()
        .with_prefix(prefix)
}
