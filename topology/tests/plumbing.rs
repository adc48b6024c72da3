//! The derived queues work on the broker, for quorum and classic groups: a
//! message in a retry tier comes back to its own group's work queue after the
//! tier's TTL (and to no other group), and a message rejected from the work
//! queue lands in the group's dead-letter queue. And the supervised
//! [`warren_topology::Broker`] connection reconnects only when asked about
//! the connection it has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use support::*;
use warren_topology::{apply, Plan};

fn file(queue_type: &str) -> String {
    format!(
        r#"
[[exchange]]
name = "orders"
kind = "topic"

[[group]]
name = "a"
exchange = "orders"
bindings = ["order.#"]
queue_type = "{queue_type}"
retry = ["700ms", "5s"]

[[group]]
name = "b"
exchange = "orders"
bindings = ["order.#"]
queue_type = "{queue_type}"
retry = ["700ms"]
"#
    )
}

async fn tier_returns_to_own_group_then_reject_dead_letters(queue_type: &str) {
    let p = unique_prefix();
    let t = topology(&p, &file(queue_type));
    let plan = Plan::new(&t);
    let _guard = Guard::new(&plan);
    let conn = connect().await;
    apply(&conn, &plan).await.unwrap();
    let (a, b) = (format!("{p}a"), format!("{p}b"));

    let ch = conn.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert("x-warren-attempts".into(), AMQPValue::LongLongInt(1));
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id("m-1".into())
        .with_headers(headers);
    let sent = Instant::now();
    ch.basic_publish(
        "".into(),
        format!("{a}.retry.1").as_str().into(),
        BasicPublishOptions::default(),
        b"{\"order\":1}",
        props,
    )
    .await
    .unwrap();

    let arrived = wait_until(Duration::from_secs(10), || async {
        count(&conn, &a).await == 1
    })
    .await;
    let waited = sent.elapsed();
    assert!(
        arrived,
        "the message did not come back from {a}.retry.1 within 10s"
    );
    assert!(
        waited >= Duration::from_millis(600),
        "it came back after {waited:?}, before the 700ms TTL"
    );
    assert_eq!(
        count(&conn, &b).await,
        0,
        "another group must not see a retry"
    );
    assert_eq!(count(&conn, &format!("{a}.retry.1")).await, 0);

    let got = ch
        .basic_get(a.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message in the work queue");
    assert_eq!(got.delivery.data, b"{\"order\":1}");
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("m-1")
    );
    let hdrs = got
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert_eq!(
        hdrs.inner().get("x-warren-attempts"),
        Some(&AMQPValue::LongLongInt(1)),
        "headers survive the tier"
    );
    assert!(
        hdrs.contains_key("x-death"),
        "the broker records the hop: {hdrs:?}"
    );

    // Rejected without requeue: the work queue's dead-letter exchange takes it to a.dead.
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            count(&conn, &format!("{a}.dead")).await == 1
        })
        .await,
        "not in {a}.dead"
    );
    assert_eq!(count(&conn, &a).await, 0);
    assert_eq!(
        count(&conn, &format!("{b}.dead")).await,
        0,
        "another group's dead queue must not see it"
    );
    let dead = ch
        .basic_get(
            format!("{a}.dead").as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.delivery.data, b"{\"order\":1}");
    assert_eq!(
        dead.delivery.routing_key.as_str(),
        a,
        "dead-lettered with the group's name as key"
    );
}

#[tokio::test]
async fn quorum_plumbing() {
    tier_returns_to_own_group_then_reject_dead_letters("quorum").await;
}

#[tokio::test]
async fn classic_plumbing() {
    tier_returns_to_own_group_then_reject_dead_letters("classic").await;
}

/// warren asks for the broker's default frame size (128 KiB: a message's
/// headers travel in one frame, so smaller frames would refuse messages
/// other clients publish), and a `frame_max` in the URL wins.
#[tokio::test]
async fn connections_ask_for_the_brokers_default_frames_unless_the_url_sets_them() {
    let conn = connect().await;
    assert_eq!(conn.configuration().frame_max(), 131_072);
    assert_eq!(warren_topology::DEFAULT_FRAME_MAX, 131_072);
    let _ = conn.close(200, "bye".into()).await;

    let raw = url().expose().to_owned();
    let sep = if raw.contains('?') { '&' } else { '?' };
    let own: warren_topology::AmqpUrl = format!("{raw}{sep}frame_max=65536").parse().unwrap();
    let conn = warren_topology::connect(&warren_topology::ConnectOptions::new(own, "test"))
        .await
        .unwrap();
    assert_eq!(conn.configuration().frame_max(), 65536);
    let _ = conn.close(200, "bye".into()).await;
}

/// `Broker::invalidate` drops only the connection it names: a task that
/// saw generation 1 fail, after another task already reconnected, must not
/// close generation 2 under everyone's channels.
#[tokio::test]
async fn invalidating_an_old_generation_keeps_the_newer_connection() {
    let broker = warren_topology::Broker::connect(warren_topology::ConnectOptions::new(
        url(),
        "test-invalidate",
    ))
    .await
    .unwrap();
    let (_, first) = broker.channel().await.unwrap();
    assert!(broker.invalidate(first).await, "the current one is dropped");
    assert!(!broker.is_connected().await);
    let (ch, second) = broker.channel().await.unwrap();
    assert_eq!(second, first + 1, "reconnected");
    assert!(
        !broker.invalidate(first).await,
        "an old generation is ignored"
    );
    assert!(broker.is_connected().await);
    assert!(ch.status().connected(), "its channels stay open");
    assert_eq!(broker.generation(), second);
    broker.close().await;
}
