//! Helpers for the producer's integration tests: unique names, a fixture
//! that deletes what it declared, metric readers, a pausable TCP proxy.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use warren_testkit::Cleanup;
use warren_topology::lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use warren_topology::lapin::types::FieldTable;
use warren_topology::lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use warren_topology::{AmqpUrl, ConnectOptions};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A name no other test (or run) uses: `t-prod-<what>-<pid>-<n>-<nanos>`.
pub fn unique(what: &str) -> String {
    warren_testkit::unique(&format!("t-prod-{what}-"))
}

pub fn opts(component: &str) -> ConnectOptions {
    ConnectOptions::new(URL.parse::<AmqpUrl>().unwrap(), component).attempts(3)
}

/// Exchanges and queues a test declared; deleted on drop, failure or not.
pub struct Fixture {
    // First, so it deletes while the connection below is still open.
    cleanup: Cleanup,
    pub conn: Connection,
    pub ch: Channel,
}

impl Fixture {
    pub async fn new() -> Self {
        let conn = warren_topology::connect(&opts("producer-test-admin"))
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        Fixture {
            cleanup: Cleanup::empty().at(URL.parse().unwrap()),
            conn,
            ch,
        }
    }

    pub async fn exchange(&mut self, name: &str) {
        self.ch
            .exchange_declare(
                name.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.cleanup.add_exchange(name);
    }

    pub async fn queue(&mut self, name: &str, exchange: &str, key: &str, args: FieldTable) {
        self.ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
        self.cleanup.add_queue(name);
        self.ch
            .queue_bind(
                name.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Messages ready in a queue (passive declare).
    pub async fn count(&self, queue: &str) -> u32 {
        warren_testkit::count(&self.conn, queue).await
    }

    /// Waits until the queue holds at least `n` messages (or the deadline).
    pub async fn wait_count(&self, queue: &str, n: u32) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = self.count(queue).await;
            if c >= n || Instant::now() > deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes every message out of the queue (basic_get, auto-ack).
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
        warren_testkit::drain(&self.conn, queue).await
    }
}

/// `warren_published_total{exchange,outcome}` in `registry`.
pub fn published(registry: &prometheus::Registry, exchange: &str, outcome: &str) -> u64 {
    counter(
        registry,
        "warren_published_total",
        &[("exchange", exchange), ("outcome", outcome)],
    )
}

/// A counter's value with these labels (0 when absent).
pub fn counter(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> u64 {
    for fam in registry.gather() {
        if fam.name() != name {
            continue;
        }
        for m in fam.get_metric() {
            let all = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if all {
                return m.get_counter().get_value() as u64;
            }
        }
    }
    0
}

/// The broker's pid of the connection the client named `name` (RabbitMQ
/// 3.10's `name` column is the peer address; the client-provided name is in
/// `client_properties`).
pub fn connection_pid(name: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let quoted = format!("\"connection_name\",\"{name}\"");
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(_, props)| props.contains(&quoted))
        .map(|(pid, _)| pid.trim().to_owned())
}

/// The numbers of the channels the broker has open on the connection the
/// client named `name`. lapin numbers a connection's channels 1, 2, 3, ...
/// in the order it opens them, so the highest tells how many were opened.
pub fn channel_numbers(name: &str) -> Vec<u32> {
    let Some(pid) = connection_pid(name) else {
        return vec![];
    };
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_channels", "connection", "number"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(conn, _)| conn.trim() == pid)
        .map(|(_, n)| n.trim().parse().unwrap())
        .collect()
}

/// Forcibly closes the broker connection named `name`.
pub fn close_connection(name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(pid) = connection_pid(name) {
            let ok = std::process::Command::new("rabbitmqctl")
                .args([
                    "-q",
                    "close_connection",
                    &pid,
                    "closed by a warren-producer test",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            return ok;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A TCP proxy to the broker that the test can pause: while paused, bytes are
/// held in both directions (the broker neither gets publishes nor sends
/// confirms), as with a broker that blocks publishers.
pub struct Proxy {
    pub port: u16,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (paused, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, rx.clone()));
                tokio::spawn(pipe(sr, cw, rx.clone()));
            }
        });
        Proxy { port, paused }
    }

    pub fn url(&self) -> AmqpUrl {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
            .parse()
            .unwrap()
    }

    pub fn pause(&self, on: bool) {
        self.paused.send_replace(on);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
