//! The broker blocks publishers (a memory alarm, forced with
//! `rabbitmqctl set_vm_memory_high_watermark 0`): callers get back-pressure
//! and then a clear `Timeout` that says the broker blocks publishing; the
//! window bounds what waits; nothing is reported confirmed and nothing
//! reaches the queue. When the alarm clears, publishing works again.
//!
//! The alarm blocks every publisher on the broker, so this is the only test
//! of this binary (cargo runs test binaries one after another), and the
//! watermark is put back even when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use warren_producer::{Message, PublishError, Publisher, PublisherConfig, Stage};
use warren_testkit::Alarm;
use warren_topology::lapin::types::FieldTable;
use warren_topology::Broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_broker_gives_back_pressure_then_a_clear_error_and_nothing_is_sent() {
    let mut f = Fixture::new().await;
    let exchange = unique("blk-ex");
    let queue = unique("blk-q");
    f.exchange(&exchange).await;
    f.queue(&queue, &exchange, "k", FieldTable::default()).await;

    let window = 4;
    let broker = Arc::new(
        Broker::connect(opts("producer-blocked-test"))
            .await
            .unwrap(),
    );
    let registry = prometheus::Registry::new();
    let publisher = Publisher::with_broker(
        PublisherConfig::default()
            .window(window)
            .publish_timeout(Duration::from_millis(1500)),
        broker.clone(),
        &registry,
    )
    .await
    .unwrap();
    publisher
        .publish(Message::bytes(&exchange, "k", b"before".to_vec()))
        .await
        .unwrap();
    assert_eq!(f.count(&queue).await, 1);

    let mut alarm = Alarm::raise();
    // RabbitMQ 3.x tells a connection it is blocked when it next publishes:
    // this one message is sent before the publisher can know, so it either
    // got in before the block (confirmed) or waits for its confirm (a
    // timeout that says it may or may not have reached the queue).
    let trigger = publisher
        .publish(Message::bytes(&exchange, "k", b"trigger".to_vec()))
        .await;
    match &trigger {
        Ok(_)
        | Err(PublishError::Timeout {
            stage: Stage::Confirm,
            ..
        }) => {}
        Err(other) => panic!("unexpected: {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while broker.blocked().is_none() {
        assert!(
            Instant::now() < deadline,
            "no connection.blocked within 15 s of the alarm"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reason = broker.blocked().unwrap();
    assert!(reason.contains("memory"), "{reason}");

    // Twice the window at once: none is confirmed, the window never holds
    // more than its size, and every caller hears why.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..window * 2 {
        let (p, ex) = (publisher.clone(), exchange.clone());
        tasks.spawn(async move {
            p.publish(Message::bytes(
                &ex,
                "k",
                format!("blocked {i}").into_bytes(),
            ))
            .await
        });
    }
    let mut peak = 0;
    while !tasks.is_empty() {
        peak = peak.max(publisher.in_flight());
        tokio::select! {
            Some(done) = tasks.join_next() => {
                let err = done.unwrap().expect_err("nothing is confirmed while blocked");
                let text = err.to_string();
                match &err {
                    PublishError::Timeout { stage: Stage::Blocked, last_error, .. } => {
                        assert!(last_error.as_deref().is_some_and(|e| e.contains("memory")), "{err:?}");
                        assert!(text.contains("blocks publishing"), "{text}");
                    }
                    PublishError::Timeout { stage: Stage::Window, last_error, .. } => {
                        assert!(last_error.as_deref().is_some_and(|e| e.contains("connection.blocked")), "{err:?}");
                    }
                    other => panic!("expected a blocked or window timeout, got {other:?}"),
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    assert!(peak <= window, "the window held {peak} > {window}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(10),
        "callers waited their timeout, not forever: {waited:?}"
    );
    assert_eq!(
        published(&registry, &exchange, "confirmed"),
        1 + u64::from(trigger.is_ok()),
        "nothing held back counts as confirmed"
    );

    // The alarm clears: publishing works again on the same publisher.
    alarm.clear();
    let deadline = Instant::now() + Duration::from_secs(15);
    while broker.blocked().is_some() {
        assert!(Instant::now() < deadline, "no connection.unblocked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publisher
        .publish(Message::bytes(&exchange, "k", b"after".to_vec()))
        .await
        .unwrap();
    // Held messages were never sent; the trigger, if it was read before
    // the block, lands in the queue once the broker unblocks.
    let bodies: Vec<Vec<u8>> = f.drain(&queue).await.into_iter().map(|(b, _)| b).collect();
    let trigger_landed = bodies.iter().any(|b| b == b"trigger");
    if trigger.is_ok() {
        assert!(trigger_landed, "a confirmed message is in the queue");
    }
    let mut want = vec![b"before".to_vec()];
    if trigger_landed {
        want.push(b"trigger".to_vec());
    }
    want.push(b"after".to_vec());
    assert_eq!(bodies, want, "nothing held back reached the queue");
    publisher.close().await;
    broker.close().await;
}
