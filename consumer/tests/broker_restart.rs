//! The broker itself restarts (`rabbitmqctl stop_app`, a pause, `start_app`)
//! while a warren Publisher publishes and a consumer group consumes and
//! retries: both reconnect on their own, and every message the publisher saw
//! confirmed is handled or dead-lettered. Nothing is lost.
//!
//! This test stops the broker for everyone, so it is the only test of this
//! binary (cargo runs test binaries one after another) and it waits until
//! the broker answers again before it ends, even when it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use support::*;
use warren_consumer::{handler_fn, Delivery, HandlerError};
use warren_producer::{Message, Publisher, PublisherConfig};
use warren_testkit::Stopped;
use warren_topology::ConnectOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() {
    let f = Fixture::new(
        "[[exchange]]\nname = \"orders\"\nkind = \"topic\"\n\n\
         [[group]]\nname = \"billing\"\nexchange = \"orders\"\nbindings = [\"order.#\"]\n\
         queue_type = \"quorum\"\nretry = [\"300ms\"]\nprefetch = 50\nconcurrency = 20\n",
    )
    .await;
    let g = f.group(0);
    let component = format!("rtest-{}", unique_prefix().trim_end_matches('.'));

    // Every tenth message fails once: retry copies are in flight too.
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                let id = d.message_id().unwrap_or("");
                let n: u32 = id.trim_start_matches('r').parse().unwrap_or(0);
                if n.is_multiple_of(10) && d.attempt() == 1 {
                    return Err(HandlerError::retryable("fails once"));
                }
                Ok(())
            }
        }),
        &component,
        |b| b,
    )
    .await;

    let registry = prometheus::Registry::new();
    let publisher = Publisher::connect(
        PublisherConfig::default()
            .window(64)
            .publish_timeout(Duration::from_secs(90)),
        ConnectOptions::new(url(), format!("{component}-pub")),
        &registry,
    )
    .await
    .unwrap();

    // Publish 1,500 messages at about 150/s, each awaited in its own task
    // so that publishes are in flight when the broker goes away.
    let n = 1_500;
    let confirmed = Arc::new(Mutex::new(HashSet::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let exchange = f.exchange();
    let publishing = {
        let (p, ok, bad) = (publisher.clone(), confirmed.clone(), failed.clone());
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..n {
                let id = format!("r{i}");
                let msg = Message::bytes(exchange.as_str(), "order.created", b"{}".to_vec())
                    .properties(BasicProperties::default().with_message_id(id.as_str().into()));
                let (p, ok, bad) = (p.clone(), ok.clone(), bad.clone());
                tasks.spawn(async move {
                    match p.publish(msg).await {
                        Ok(_) => {
                            ok.lock().unwrap().insert(id);
                        }
                        Err(e) => bad.lock().unwrap().push(format!("{id}: {e}")),
                    }
                });
                tokio::time::sleep(Duration::from_millis(6)).await;
            }
            while tasks.join_next().await.is_some() {}
        })
    };

    wait_for(Duration::from_secs(20), "messages flowing", || {
        ledger.len() >= 200
    })
    .await;
    let mut restart = Stopped::stop_app();
    let before = ledger.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    restart.start_app();
    eprintln!("broker restarted; {before} deliveries handled before the stop");

    // Both sides come back on their own.
    let deadline = Instant::now() + Duration::from_secs(60);
    while run.metric("warren_reconnects_total", &[("component", "consumer")]) < 1.0 {
        assert!(Instant::now() < deadline, "the consumer did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ready = run.ready.clone();
    tokio::time::timeout(Duration::from_secs(60), ready.wait_for(|r| *r))
        .await
        .expect("the consumer is ready again")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), publishing)
        .await
        .expect("every publish answered")
        .unwrap();
    publisher.close().await;

    let failed = failed.lock().unwrap().clone();
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "with a 90 s publish timeout every publish outlives a 3 s restart: {failed:?}"
    );
    assert_eq!(confirmed.len(), n);
    let text = {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    };
    assert!(
        text.lines().any(
            |l| l.starts_with("warren_reconnects_total{component=\"producer\"}")
                && !l.ends_with(" 0")
        ),
        "the producer counted its reconnect:\n{text}"
    );

    // Every confirmed id is handled successfully (a message failed once is
    // handled again at attempt 2); nothing is in the dead-letter queue.
    wait_for(
        Duration::from_secs(60),
        "every confirmed message handled",
        || {
            confirmed.iter().all(|id| {
                let n: u32 = id.trim_start_matches('r').parse().unwrap();
                let seen = ledger.of(id);
                if n.is_multiple_of(10) {
                    seen.iter().any(|s| s.attempt >= 2)
                } else {
                    !seen.is_empty()
                }
            })
        },
    )
    .await;
    run.stop().await;
    // The fixture's own connection died with the broker: count on a new one.
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    for q in [g.work_queue(), g.retry_queue(1), g.dead_queue()] {
        let n = ch
            .queue_declare(
                q.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count();
        assert_eq!(n, 0, "{q} is empty");
    }
    let _ = conn.close(200, "bye".into()).await;
    eprintln!(
        "{} deliveries for {n} messages ({} failed once by design)",
        ledger.len(),
        n / 10
    );
}
