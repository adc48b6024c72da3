//! During a memory alarm the broker stops reading from every connection
//! that publishes. A consumer group publishes retry copies; if it did so on
//! the connection it consumes and acks on, one failure during an alarm would
//! stop every ack of that process, and consumers are what drains the broker
//! out of its alarm. So copies go on a connection of their own: here a
//! failure during the alarm is held back (and requeued), and the successes
//! behind it keep being acked.
//!
//! The alarm blocks every publisher on the broker, so this is the only test
//! of this binary (cargo runs test binaries one after another), and the
//! watermark is put back even when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use warren_consumer::{handler_fn, Delivery, HandlerError};
use warren_testkit::Alarm;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_during_a_memory_alarm_does_not_stop_the_acks_of_successes() {
    let f = Fixture::new(
        "[[exchange]]\nname = \"orders\"\nkind = \"topic\"\n\n\
         [[group]]\nname = \"billing\"\nexchange = \"orders\"\nbindings = [\"order.#\"]\n\
         queue_type = \"classic\"\nretry = [\"200ms\"]\nprefetch = 5\nconcurrency = 5\n",
    )
    .await;
    let g = f.group(0);
    // The failing message first, then enough successes to need many
    // prefetch windows (so they can only all be handled if acks flow).
    f.publish(&f.exchange(), "order.created", b"{}", props("fail"))
        .await;
    let n = 60;
    for i in 0..n {
        f.publish(
            &f.exchange(),
            "order.created",
            b"{}",
            props(&format!("ok{i}")),
        )
        .await;
    }

    let mut alarm = Alarm::raise();
    let ledger = Ledger::default();
    let l = ledger.clone();
    let component = format!("btest-{}", unique_prefix().trim_end_matches('.'));
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                if d.message_id() == Some("fail") && d.attempt() == 1 {
                    return Err(HandlerError::retryable("fails once"));
                }
                Ok(())
            }
        }),
        &component,
        |b| {
            b.confirm_timeout(Duration::from_secs(2))
                .requeue_delay(Duration::from_millis(200))
        },
    )
    .await;

    // During the alarm every success is handled and acked: the work queue
    // holds at most the failing message (its copy cannot be published).
    wait_for(
        Duration::from_secs(30),
        "every success handled during the alarm",
        || (0..n).all(|i| ledger.count(&format!("ok{i}")) >= 1),
    )
    .await;
    // Their acks reached the broker: the work queue holds at most the
    // failing message (without acks, prefetch 5 would have stopped the
    // deliveries long before).
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.count(&g.work_queue()).await > 1 {
        assert!(
            Instant::now() < deadline,
            "successes were not acked during the alarm"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ledger.of("fail").iter().all(|s| s.attempt == 1),
        "no copy of the failure was published during the alarm"
    );
    assert_eq!(f.count(&g.retry_queue(1)).await, 0);

    // The alarm clears: the failure goes through its retry tier and is
    // handled at attempt 2; nothing is lost or dead-lettered. (A copy sent
    // before the publisher saw the block may also arrive: at-least-once.)
    alarm.clear();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let retried = ledger.of("fail").iter().any(|s| s.attempt == 2);
        if retried && f.count(&g.work_queue()).await == 0 && f.count(&g.retry_queue(1)).await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failure was not retried after the alarm"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run.stop().await;
    assert_eq!(f.count(&g.dead_queue()).await, 0);
}
