//! Shared by the operator's integration tests: unique names, a guard that
//! deletes what a test declared, publishing dead letters the way the
//! consumer (or the broker) would, and reading queues with plain lapin.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use warren_topology::{headers, Plan, Topology, DEAD_LETTER_EXCHANGE};

pub use warren_testkit::{
    connect, count, drain, publish, url, wait_confirms_sent, Cleanup as Guard,
};

/// A prefix no other test (or run) uses: `op<pid>-<n>-<nanos>.`.
pub fn unique_prefix() -> String {
    warren_testkit::unique_prefix("op")
}

pub const FILE: &str = r#"
[[exchange]]
name = "orders"
kind = "topic"

[[group]]
name = "billing"
exchange = "orders"
bindings = ["order.created", "order.paid"]
queue_type = "classic"
retry = ["1s"]

[[group]]
name = "shipping"
exchange = "orders"
bindings = ["order.created"]
queue_type = "classic"
retry = ["1s"]
"#;

pub struct Env {
    pub prefix: String,
    pub topology: Topology,
    pub conn: lapin::Connection,
    pub billing: String,
    pub shipping: String,
    pub orders: String,
    _guard: Guard,
}

pub async fn setup() -> Env {
    let prefix = unique_prefix();
    let topology = Topology::parse(FILE, "test.toml")
        .unwrap()
        .with_prefix(&prefix);
    let plan = Plan::new(&topology);
    let guard = Guard::new(&plan);
    let conn = connect().await;
    warren_topology::apply(&conn, &plan).await.unwrap();
    Env {
        billing: format!("{prefix}billing"),
        shipping: format!("{prefix}shipping"),
        orders: format!("{prefix}orders"),
        prefix,
        topology,
        conn,
        _guard: guard,
    }
}

/// Headers the consumer sets when it dead-letters.
pub fn warren_headers(group: &str, kind: &str, error: &str, rk: &str, orig_ex: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(4));
    h.insert(headers::ERROR.into(), AMQPValue::LongString(error.into()));
    h.insert(
        headers::ERROR_KIND.into(),
        AMQPValue::LongString(kind.into()),
    );
    h.insert(headers::GROUP.into(), AMQPValue::LongString(group.into()));
    h.insert(
        headers::ORIGINAL_EXCHANGE.into(),
        AMQPValue::LongString(orig_ex.into()),
    );
    h.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        AMQPValue::LongString(rk.into()),
    );
    h.insert(
        headers::FIRST_FAILED_AT.into(),
        AMQPValue::LongString("2024-01-01T00:00:00Z".into()),
    );
    h.insert(
        headers::DEAD_LETTERED_AT.into(),
        AMQPValue::LongString(
            humantime::format_rfc3339_seconds(SystemTime::now())
                .to_string()
                .into(),
        ),
    );
    h
}

pub fn props(id: &str, h: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(1_700_000_000)
        .with_headers(h)
}

/// A dead letter as the consumer would send it.
pub async fn dead_letter(
    conn: &lapin::Connection,
    group: &str,
    id: &str,
    kind: &str,
    error: &str,
    body: &[u8],
    orig_ex: &str,
) -> (Vec<u8>, BasicProperties) {
    let p = props(
        id,
        warren_headers(group, kind, error, "order.created", orig_ex),
    );
    publish(conn, DEAD_LETTER_EXCHANGE, group, body, p.clone()).await;
    (body.to_vec(), p)
}

/// A dead letter the broker made: published to the work queue, then
/// rejected without requeue. Returns its body.
pub async fn broker_dead_letter(conn: &lapin::Connection, group: &str, id: &str, body: &[u8]) {
    publish(
        conn,
        "",
        group,
        body,
        BasicProperties::default().with_message_id(id.into()),
    )
    .await;
    let ch = conn.create_channel().await.unwrap();
    let got = ch
        .basic_get(group.into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let _ = ch.close(200, "ok".into()).await;
}

/// Every message of a queue, read without taking it (held unacked, then the
/// channel is closed so the broker puts them back).
pub async fn peek_all(conn: &lapin::Connection, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        out.push((m.delivery.data, m.delivery.properties));
    }
    ch.close(200, "ok".into()).await.unwrap();
    out
}

/// Waits until `queue` holds `n` ready messages (unacked ones come back
/// asynchronously after a channel closes).
pub async fn wait_count(conn: &lapin::Connection, queue: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = count(conn, queue).await;
        if c == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue}: {c} messages, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn header<'a>(p: &'a BasicProperties, k: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref().and_then(|h| h.inner().get(k))
}

pub fn without(p: &BasicProperties, keys: &[&str]) -> BasicProperties {
    let mut h = FieldTable::default();
    if let Some(old) = p.headers() {
        for (k, v) in old {
            if !keys.contains(&k.as_str()) {
                h.insert(k.clone(), v.clone());
            }
        }
    }
    p.clone().with_headers(h)
}

/// A connection logged in as `url`'s user (an operator who is not the
/// service that published the dead letters).
pub async fn connect_as(url: warren_topology::AmqpUrl) -> lapin::Connection {
    warren_topology::connect(&warren_topology::ConnectOptions::new(url, "test").attempts(3))
        .await
        .expect("the test broker accepts the user")
}

/// Closes every connection `user` has open (a test's own user: never
/// another client's connection).
pub fn close_connections_of(user: &str) {
    let rows = warren_testkit::rabbitmqctl(&[
        "list_connections",
        "pid",
        "user",
        "-q",
        "--no-table-headers",
    ]);
    let pids: Vec<&str> = rows
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, u)| *u == user)
        .map(|(p, _)| p)
        .collect();
    assert!(!pids.is_empty(), "{user} has no connection: {rows}");
    for pid in pids {
        warren_testkit::rabbitmqctl(&["close_connection", pid, "test: closed mid-run"]);
    }
}

/// Messages the broker holds in `queue`, ready and unacknowledged (a
/// passive declare counts only the ready ones).
pub fn held(queue: &str) -> u64 {
    let rows = warren_testkit::rabbitmqctl(&[
        "list_queues",
        "-p",
        "/",
        "name",
        "messages",
        "-q",
        "--no-table-headers",
    ]);
    rows.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{queue} is not listed: {rows}"))
}

/// Blocks until the broker holds `n` messages in `queue` (its acks are
/// processed), for at most 20 seconds.
pub fn wait_held(queue: &str, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = held(queue);
        if now == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{queue}: the broker holds {now}, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `conn` knows it was closed (the broker's close reached it).
pub async fn wait_disconnected(conn: &lapin::Connection) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while conn.status().connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection still looks open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The message ids in `queue`, head first, taken out of it.
pub async fn take_ids(conn: &lapin::Connection, queue: &str) -> Vec<String> {
    drain(conn, queue)
        .await
        .into_iter()
        .map(|(_, p)| {
            p.message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default()
        })
        .collect()
}
