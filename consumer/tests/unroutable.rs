#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A copy that the broker returns (its retry queue was deleted by hand) must
//! leave its original in the work queue, even with many copies in flight on
//! one channel, where lapin can hand one copy's return to another copy's
//! confirm. Routable copies (dead letters) in the same window still land.
//! The originals are held while their copies are published again (each
//! copy returned again), and go back to the work queue when the group stops.

mod support;

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use lapin::types::{AMQPValue, FieldTable};
use support::*;
use warren_consumer::{handler_fn, Delivery, HandlerError};
use warren_topology::headers;

const N: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_copy_never_acks_its_original() {
    let f = Fixture::new(
        "[[exchange]]\nname = 'orders'\nkind = 'topic'\n\
         [[group]]\nname = 'billing'\nexchange = 'orders'\nbindings = ['order.*']\n\
         queue_type = 'classic'\nretry = ['200ms']\nprefetch = 200\nconcurrency = 200\n",
    )
    .await;
    let g = f.group(0);

    // Fresh messages want a retry copy (unroutable); messages on their last
    // attempt want a dead-letter copy (routable). Interleaved, so that both
    // kinds of confirm share the broker's multiple-acks.
    for i in 0..N {
        f.publish(
            &f.exchange(),
            "order.created",
            b"{}",
            props(&format!("fresh-{i:03}")),
        )
        .await;
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(1));
        let last = props(&format!("last-{i:03}")).with_headers(h);
        f.publish(&f.exchange(), "order.created", b"{}", last).await;
    }

    // The handlers wait until the retry tier is gone, then all fail at once.
    let (gate, opened) = tokio::sync::watch::channel(false);
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let (l, mut opened) = (l.clone(), opened.clone());
            async move {
                let _ = opened.wait_for(|open| *open).await;
                l.note(&d);
                Err(HandlerError::retryable("always fails"))
            }
        }),
        "consumer-unroutable",
        |b| b.requeue_delay(Duration::from_millis(20)),
    )
    .await;
    // Someone deletes the retry tier while the group runs (a group does not
    // start without it): retry copies are now unroutable.
    let ch = f.conn.create_channel().await.unwrap();
    ch.queue_delete(
        g.retry_queue(1).as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    gate.send_replace(true);
    // Every message is handled, and every dead letter lands.
    wait_for(Duration::from_secs(30), "every message handled", || {
        (0..N).all(|i| ledger.count(&format!("fresh-{i:03}")) >= 1)
            && (0..N).all(|i| ledger.count(&format!("last-{i:03}")) >= 1)
    })
    .await;
    let dead_q = g.dead_queue();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.count(&dead_q).await < N as u32 {
        assert!(std::time::Instant::now() < deadline, "dead letters missing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The fresh ones are held while their copies are published again (after
    // 20, 40, 80 ... ms): each publish returned again, never taken for
    // another copy's confirm.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        (0..N).all(|i| ledger.count(&format!("fresh-{i:03}")) == 1),
        "held, not handled again"
    );
    assert!(run.metric("warren_handled_total", &[("outcome", "retry")]) == 0.0);
    run.stop().await;

    assert_eq!(
        f.count(&g.work_queue()).await,
        N as u32,
        "every fresh message is still in the work queue: none acked on a returned copy"
    );
    let dead = f.take(&dead_q, N, Duration::from_secs(5)).await;
    assert_eq!(dead.len(), N);
    assert!(dead.iter().all(|m| m
        .delivery
        .properties
        .message_id()
        .as_ref()
        .is_some_and(|id| id.as_str().starts_with("last-"))));
    assert_eq!(
        f.count(&dead_q).await,
        0,
        "exactly the last-attempt messages were dead-lettered"
    );
}
