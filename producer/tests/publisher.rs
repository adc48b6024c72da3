//! The Publisher against the real broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{published, unique, Fixture};
use warren_producer::{Message, PublishError, Publisher, PublisherConfig, Stage};
use warren_topology::lapin::types::{AMQPValue, FieldTable, ShortString};
use warren_topology::lapin::BasicProperties;
use warren_topology::ConnectOptions;

async fn publisher(config: PublisherConfig) -> (Publisher, prometheus::Registry, String) {
    let registry = prometheus::Registry::new();
    let component = unique("producer");
    let p = Publisher::connect(config, common::opts(&component), &registry)
        .await
        .unwrap();
    let name = common::opts(&component).connection_name();
    (p, registry, name)
}

fn reject_publish(max: i64) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_published_are_n_in_the_queue_byte_exact() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, registry, _) = publisher(PublisherConfig::default().window(64)).await;

    const N: usize = 500;
    let messages: Vec<Message> = (0..N)
        .map(|i| {
            let body: Vec<u8> = (0..(i % 300)).map(|b| (b * 7 + i) as u8).collect();
            let m = Message::bytes(&ex, "k", body);
            if i % 2 == 0 {
                m.properties(
                    BasicProperties::default()
                        .with_message_id(format!("mine-{i}").as_str().into())
                        .with_correlation_id("corr".into())
                        .with_content_type("text/plain".into())
                        .with_timestamp(1_700_000_000 + i as u64),
                )
                .header("x-n", AMQPValue::LongLongInt(i as i64))
                .header("x-s", AMQPValue::LongString(format!("v{i}").into()))
            } else {
                m
            }
        })
        .collect();
    let expected: Vec<Vec<u8>> = messages.iter().map(|m| m.body().to_vec()).collect();
    let results = p.publish_batch(messages).await;
    let ids: Vec<String> = results.into_iter().map(|r| r.unwrap().message_id).collect();
    #[derive(serde::Serialize)]
    struct Order<'a> {
        id: u32,
        item: &'a str,
    }
    let json = p
        .publish_json(&ex, "k", &Order { id: 7, item: "tea" })
        .await
        .unwrap();

    assert_eq!(fx.wait_count(&q, N as u32 + 1).await, N as u32 + 1);
    let got = fx.drain(&q).await;
    assert_eq!(got.len(), N + 1, "exactly N+1 in the queue");
    for (i, (body, props)) in got.iter().take(N).enumerate() {
        assert_eq!(body, &expected[i], "body {i}");
        assert_eq!(
            props.message_id().as_ref().map(ShortString::as_str),
            Some(ids[i].as_str())
        );
        assert_eq!(*props.delivery_mode(), Some(2));
        if i % 2 == 0 {
            assert_eq!(ids[i], format!("mine-{i}"));
            assert_eq!(*props.timestamp(), Some(1_700_000_000 + i as u64));
            assert_eq!(
                props.content_type().as_ref().unwrap().as_str(),
                "text/plain"
            );
            assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "corr");
            let h = props.headers().as_ref().unwrap().inner();
            assert_eq!(h.get("x-n"), Some(&AMQPValue::LongLongInt(i as i64)));
            assert_eq!(
                h.get("x-s"),
                Some(&AMQPValue::LongString(format!("v{i}").into()))
            );
        } else {
            assert!(uuid::Uuid::parse_str(&ids[i]).is_ok(), "{}", ids[i]);
            assert_eq!(
                props.content_type().as_ref().unwrap().as_str(),
                "application/octet-stream"
            );
            assert!(props.timestamp().is_some());
            assert!(props.headers().is_none());
        }
    }
    let (body, props) = &got[N];
    assert_eq!(body.as_slice(), br#"{"id":7,"item":"tea"}"#);
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(
        props.message_id().as_ref().unwrap().as_str(),
        json.message_id
    );
    assert_eq!(published(&registry, &ex, "confirmed"), N as u64 + 1);
    assert_eq!(published(&registry, &ex, "failed"), 0);
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_is_an_error_even_mixed_in_a_full_window() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "in", FieldTable::default()).await;
    let (p, registry, _) = publisher(PublisherConfig::default().window(256)).await;

    let err = p.publish_json(&ex, "nowhere", &1).await.unwrap_err();
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("\"nowhere\""), "{err}");
    assert!(err.to_string().contains("NO_ROUTE"), "{err}");

    // lapin hands a return to whichever confirm it resolves next; the
    // publisher must still blame exactly the unroutable ones.
    const N: usize = 2000;
    let unroutable = |i: usize| i % 7 == 3;
    let msgs = (0..N).map(|i| {
        let key = if unroutable(i) { "nowhere" } else { "in" };
        Message::bytes(&ex, key, format!("{i}"))
    });
    let results = p.publish_batch(msgs).await;
    let mut ok = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(_) => {
                assert!(
                    !unroutable(i),
                    "message {i} was unroutable but reported confirmed"
                );
                ok += 1;
            }
            Err(PublishError::Unroutable { routing_key, .. }) => {
                assert!(
                    unroutable(i),
                    "message {i} was routable but reported unroutable"
                );
                assert_eq!(routing_key, "nowhere");
            }
            Err(e) => panic!("message {i}: {e}"),
        }
    }
    let returned = (0..N).filter(|i| unroutable(*i)).count() as u64;
    assert_eq!(fx.wait_count(&q, ok).await, ok);
    assert_eq!(published(&registry, &ex, "returned"), returned + 1);
    assert_eq!(published(&registry, &ex, "confirmed"), u64::from(ok));
    p.close().await;
}

/// Messages that share a `message_id` (a business key) are still told
/// apart: returns used to be matched by `message_id` alone, so a routable
/// message could take an unroutable one's return and the unroutable one was
/// reported confirmed. Half go where no queue is bound, half where one is;
/// every message of the same id and route is also sent while another of
/// them is in flight, which the publisher now holds back until the first
/// is decided (so this also shows that holding back never stalls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_message_id_is_never_confirmed_for_an_unroutable_message() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "in", FieldTable::default()).await;
    let (p, registry, _) = publisher(PublisherConfig::default().window(256)).await;

    const N: usize = 1200;
    let unroutable = |i: usize| i % 2 == 1;
    let msgs = (0..N).map(|i| {
        let key = if unroutable(i) { "nowhere" } else { "in" };
        // Three ids in all, each on both routes many times over.
        let id = format!("order-{}", i % 3);
        Message::bytes(&ex, key, format!("{i}"))
            .properties(BasicProperties::default().with_message_id(id.as_str().into()))
    });
    let results = tokio::time::timeout(Duration::from_secs(60), p.publish_batch(msgs))
        .await
        .expect("the batch finishes: held messages are sent once their route is free");
    let mut ok = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(_) => {
                assert!(
                    !unroutable(i),
                    "message {i} was unroutable but reported confirmed"
                );
                ok += 1;
            }
            Err(PublishError::Unroutable { routing_key, .. }) => {
                assert!(
                    unroutable(i),
                    "message {i} was routable but reported unroutable"
                );
                assert_eq!(routing_key, "nowhere");
            }
            Err(e) => panic!("message {i}: {e}"),
        }
    }
    assert_eq!(ok, (N / 2) as u32);
    assert_eq!(fx.wait_count(&q, ok).await, ok);
    assert_eq!(published(&registry, &ex, "returned"), (N / 2) as u64);
    assert_eq!(published(&registry, &ex, "confirmed"), u64::from(ok));
    p.close().await;
}

/// An exchange name or routing key over AMQP's 255 bytes is an error for
/// that message (before: a panic in the publisher's task, and every later
/// publish failed with "the publisher is closed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_over_255_bytes_fail_only_their_message() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, _registry, _) = publisher(PublisherConfig::default()).await;
    let long = "k".repeat(300);
    for m in [
        Message::bytes(&ex, &long, "x"),
        Message::bytes(&long, "k", "x"),
    ] {
        match p.publish(m).await {
            Err(e @ PublishError::Invalid(_)) => {
                assert!(e.to_string().contains("at most 255"), "{e}");
                assert!(!e.is_transient());
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
    p.publish(Message::bytes(&ex, "k", "after")).await.unwrap();
    assert_eq!(fx.count(&q).await, 1);
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_when_the_queue_rejects() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", reject_publish(5)).await;
    let (p, registry, _) = publisher(PublisherConfig::default()).await;
    let results = p
        .publish_batch((0..12).map(|i| Message::bytes(&ex, "k", format!("{i}"))))
        .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let nacked = results
        .iter()
        .filter(|r| matches!(r, Err(PublishError::Nacked { .. })))
        .count();
    assert_eq!((ok, nacked), (5, 7), "{results:?}");
    assert!(results[..5].iter().all(Result::is_ok));
    let e = results[11].as_ref().unwrap_err();
    assert!(e.is_transient());
    assert!(e.to_string().contains("nacked"), "{e}");
    assert_eq!(fx.count(&q).await, 5);
    assert_eq!(published(&registry, &ex, "confirmed"), 5);
    assert_eq!(published(&registry, &ex, "nacked"), 7);
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_exchange_fails_only_its_messages() {
    let mut fx = Fixture::new().await;
    let (ex, q, missing) = (unique("ex"), unique("q"), unique("missing"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, registry, _) = publisher(PublisherConfig::default()).await;

    let err = p.publish_json(&missing, "k", &1).await.unwrap_err();
    assert!(
        matches!(&err, PublishError::ExchangeNotFound { exchange, .. } if *exchange == missing),
        "{err}"
    );
    assert!(err.to_string().contains("does not exist"), "{err}");

    // "amq.default" is how the management UI shows the default exchange,
    // but in AMQP 0-9-1 it has no name: say so, rather than "declare it".
    let err = p.publish_json("amq.default", "k", &1).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, PublishError::ExchangeNotFound { .. }),
        "{err:?}"
    );
    assert!(
        text.contains("the default exchange has no name: publish to exchange \"\"")
            && !text.contains("warren topology apply"),
        "{text}"
    );

    // In a full window: the broker closes the channel at the bad one; the
    // others are republished on a fresh channel, never reported sent
    // without a confirm.
    let results = p
        .publish_batch((0..600).map(|i| {
            let exchange = if i == 300 { &missing } else { &ex };
            Message::bytes(exchange, "k", format!("{i}"))
        }))
        .await;
    let mut confirmed = HashSet::new();
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (300, Err(PublishError::ExchangeNotFound { .. })) => {}
            (300, other) => panic!("the missing exchange's message: {other:?}"),
            (_, Ok(c)) => {
                confirmed.insert(c.message_id.clone());
            }
            (i, Err(e)) => panic!("message {i}: {e}"),
        }
    }
    assert_eq!(confirmed.len(), 599);
    fx.wait_count(&q, 599).await;
    let in_queue: HashSet<String> = fx
        .drain(&q)
        .await
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    assert!(
        confirmed.is_subset(&in_queue),
        "a confirmed message is missing"
    );
    assert_eq!(published(&registry, &missing, "confirmed"), 0);
    assert_eq!(published(&registry, &missing, "failed"), 2);
    // Still usable afterwards.
    p.publish_json(&ex, "k", &2).await.unwrap();
    p.close().await;
}

/// The message with a wrong `user_id` (RabbitMQ closes the channel with 406
/// PRECONDITION_FAILED) among `n` good ones published in one batch, and what
/// became of every one of them.
struct Refusal {
    results: Vec<Result<warren_producer::Confirmed, PublishError>>,
    elapsed: Duration,
    bad_id: String,
    /// The publisher's channel number at the end: 1 + channels reopened.
    channel: u32,
}

async fn publish_with_a_wrong_user_id(
    fx: &mut Fixture,
    n: usize,
    bad: usize,
    user_id: &str,
) -> (Refusal, prometheus::Registry, String) {
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, registry, conn_name) = publisher(PublisherConfig::default().window(256)).await;
    let bad_id = format!("bad-{}", unique("id"));
    let msgs = (0..n).map(|i| {
        let m = Message::bytes(&ex, "k", format!("{i}"));
        if i == bad {
            m.properties(
                BasicProperties::default()
                    .with_message_id(bad_id.as_str().into())
                    .with_user_id(user_id.into()),
            )
        } else {
            m
        }
    });
    let started = tokio::time::Instant::now();
    let results = p.publish_batch(msgs).await;
    let elapsed = started.elapsed();
    let name = conn_name.clone();
    let channels = tokio::task::spawn_blocking(move || common::channel_numbers(&name))
        .await
        .unwrap();
    assert_eq!(
        channels.len(),
        1,
        "one publishing channel open: {channels:?}"
    );

    // Every good one confirmed and in the queue; the bad one nowhere.
    let mut confirmed = HashSet::new();
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(c) => {
                assert_ne!(i, bad, "the refused message was reported sent");
                assert!(
                    c.attempts <= 2,
                    "message {i} went {} times; one republish at most",
                    c.attempts
                );
                confirmed.insert(c.message_id.clone());
            }
            Err(e) if i == bad => assert!(!e.is_transient(), "{e}"),
            Err(e) => panic!("good message {i} failed: {e}"),
        }
    }
    assert_eq!(confirmed.len(), n - 1);
    fx.wait_count(&q, n as u32 - 1).await;
    let in_queue: HashSet<String> = fx
        .drain(&q)
        .await
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    let missing: Vec<_> = confirmed.difference(&in_queue).collect();
    assert!(
        missing.is_empty(),
        "confirmed, not in the queue: {missing:?}"
    );
    assert!(
        !in_queue.contains(&bad_id),
        "the refused message was stored"
    );
    assert_eq!(published(&registry, &ex, "confirmed"), n as u64 - 1);
    assert_eq!(published(&registry, &ex, "failed"), 1);

    // Still usable afterwards, on the same connection.
    p.publish(Message::bytes(&ex, "k", "after")).await.unwrap();
    p.close().await;
    let refusal = Refusal {
        results,
        elapsed,
        bad_id,
        channel: channels[0],
    };
    (refusal, registry, ex)
}

/// RabbitMQ refuses a `user_id` other than the connection's user by closing
/// the channel. Before, the publisher sent the message again and again (ten
/// channels) and failed the good messages behind it too; now it fails that
/// one at once, from the broker's words, and republishes the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_user_id_fails_at_once_and_the_others_are_confirmed() {
    let mut fx = Fixture::new().await;
    let mallory = format!("mallory-{}", std::process::id());
    let (r, _registry, ex) = publish_with_a_wrong_user_id(&mut fx, 600, 300, &mallory).await;
    match &r.results[300] {
        Err(
            e @ PublishError::MessageRefused {
                exchange,
                routing_key,
                message_id,
                reply_code,
                reason,
            },
        ) => {
            assert_eq!(
                (exchange, routing_key.as_str(), message_id, *reply_code),
                (&ex, "k", &r.bad_id, 406)
            );
            assert_eq!(
                reason,
                &format!("PRECONDITION_FAILED - user_id property set to '{mallory}' but authenticated user was 'guest'")
            );
            assert!(
                e.to_string().contains(
                    "leave user_id unset or set it to the user the connection logs in as"
                ),
                "{e}"
            );
        }
        other => panic!("expected MessageRefused, got {other:?}"),
    }
    // One send of the bad message: the channel was reopened once.
    assert_eq!(r.channel, 2, "channels opened: one close, one reopen");
    assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
}

/// The broker cuts its reply text at 255 bytes: with a long `user_id` its
/// words no longer say which message it refused. The publisher then sends the
/// unconfirmed messages one at a time until the refused one is alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_the_broker_cannot_name_is_found_one_at_a_time() {
    let mut fx = Fixture::new().await;
    let long = format!("{}-{}", "m".repeat(240), std::process::id());
    let (r, _registry, _) = publish_with_a_wrong_user_id(&mut fx, 600, 300, &long).await;
    match &r.results[300] {
        Err(PublishError::MessageRefused {
            message_id,
            reply_code: 406,
            reason,
            ..
        }) => {
            assert_eq!(message_id, &r.bad_id);
            assert!(
                reason.starts_with("PRECONDITION_FAILED - user_id property set to 'mmm"),
                "{reason}"
            );
            assert!(
                reason.ends_with("..."),
                "the broker cut its words: {reason}"
            );
        }
        other => panic!("expected MessageRefused, got {other:?}"),
    }
    // Sent twice at most: with the others, then alone.
    assert!(r.channel <= 3, "channel number {}", r.channel);
    assert!(r.elapsed < Duration::from_secs(20), "{:?}", r.elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_refused_message_fails_on_its_first_send() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, _registry, conn_name) = publisher(PublisherConfig::default()).await;
    // An expiration that is not a whole number of milliseconds.
    let bad = Message::bytes(&ex, "k", "x")
        .properties(BasicProperties::default().with_expiration("-5".into()));
    match p.publish(bad).await {
        Err(
            e @ PublishError::MessageRefused {
                reply_code: 406, ..
            },
        ) => {
            assert!(e.to_string().contains("invalid expiration '-5'"), "{e}");
            assert!(
                e.to_string().contains("whole number of milliseconds"),
                "{e}"
            );
        }
        other => panic!("expected MessageRefused, got {other:?}"),
    }
    let c = p.publish(Message::bytes(&ex, "k", "good")).await.unwrap();
    assert_eq!(c.attempts, 1);
    let channels = tokio::task::spawn_blocking(move || common::channel_numbers(&conn_name))
        .await
        .unwrap();
    assert_eq!(channels, vec![2], "one close, one reopen");
    assert_eq!(fx.wait_count(&q, 1).await, 1);
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fails_before_sending() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, registry, _) = publisher(PublisherConfig::default().max_message_size(1024)).await;
    let err = p
        .publish(Message::bytes(&ex, "k", vec![b'x'; 1025]))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "message of 1025 bytes is over the limit of 1024 bytes (PublisherConfig::max_message_size); nothing was sent"
    );
    p.publish(Message::bytes(&ex, "k", vec![b'x'; 1024]))
        .await
        .unwrap();
    assert_eq!(fx.wait_count(&q, 1).await, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fx.count(&q).await, 1, "the oversized one was not sent");
    assert_eq!(published(&registry, &ex, "confirmed"), 1);
    assert_eq!(published(&registry, &ex, "failed"), 1);
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closed_mid_stream_recovers_without_false_confirms() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, registry, conn_name) = publisher(
        PublisherConfig::default()
            .window(128)
            .publish_timeout(Duration::from_secs(20)),
    )
    .await;

    // Two tasks publishing back to back keep the window busy, so that the
    // close lands with messages in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let spawn = |task: u64| {
        let (p, ex, stop) = (p.clone(), ex.clone(), stop.clone());
        tokio::spawn(async move {
            let mut results = vec![];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let base = i;
                let batch =
                    (0..200).map(|j| Message::bytes(&ex, "k", format!("{task}-{}", base + j)));
                i += 200;
                results.extend(p.publish_batch(batch).await);
            }
            results
        })
    };
    let producers = [spawn(1), spawn(2)];
    // Let it run, close the connection under it, let it run on; twice, so
    // that a close which happens to land while nothing is in flight (a
    // starved machine) does not leave the republishing path untested.
    for round in 0..2u64 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let name = conn_name.clone();
        let closed = tokio::task::spawn_blocking(move || common::close_connection(&name))
            .await
            .unwrap();
        assert!(closed, "could not find or close the publisher's connection");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while p.broker().generation() < round + 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            p.broker().generation(),
            round + 2,
            "the publisher reconnected"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut results = vec![];
    for t in producers {
        results.extend(t.await.unwrap());
    }

    let confirmed: HashSet<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|c| c.message_id.clone()))
        .collect();
    for r in &results {
        if let Err(e) = r {
            assert!(e.is_transient(), "only transient failures expected: {e}");
        }
    }
    let republished = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|c| c.attempts > 1))
        .count();
    fx.wait_count(&q, confirmed.len() as u32).await;
    let in_queue: HashSet<String> = fx
        .drain(&q)
        .await
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    let missing: Vec<_> = confirmed.difference(&in_queue).collect();
    assert!(
        missing.is_empty(),
        "confirmed but not in the queue: {missing:?}"
    );
    assert!(confirmed.len() > 100, "{} confirmed", confirmed.len());
    assert!(
        republished > 0,
        "messages in flight at the close were published again"
    );
    assert_eq!(
        published(&registry, &ex, "confirmed"),
        confirmed.len() as u64
    );
    assert_eq!(
        common::counter(
            &registry,
            "warren_reconnects_total",
            &[("component", "producer")]
        ),
        2
    );
    eprintln!(
        "{} results, {} confirmed, {} republished after the reconnects, {} in the queue",
        results.len(),
        confirmed.len(),
        republished,
        in_queue.len()
    );
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_pressure_when_the_broker_stops_confirming() {
    // A broker that blocks publishers (connection.blocked) stops reading and
    // confirming. The broker is shared with other tests, so instead of a
    // memory alarm this test pauses a TCP proxy between the publisher and the
    // broker: same effect on the client, nothing changes for anyone else.
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let proxy = common::Proxy::start().await;
    let registry = prometheus::Registry::new();
    let window = 4;
    let p = Publisher::connect(
        PublisherConfig::default()
            .window(window)
            .publish_timeout(Duration::from_millis(600)),
        ConnectOptions::new(proxy.url(), unique("producer")),
        &registry,
    )
    .await
    .unwrap();
    p.publish_json(&ex, "k", &0).await.unwrap();

    proxy.pause(true);
    let started = tokio::time::Instant::now();
    let mut tasks = vec![];
    for i in 0..20 {
        let (p, ex) = (p.clone(), ex.clone());
        tasks.push(tokio::spawn(
            async move { p.publish_json(&ex, "k", &i).await },
        ));
    }
    let mut peak = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        peak = peak.max(p.in_flight());
        assert!(p.in_flight() <= window);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let mut by_stage = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Err(PublishError::Timeout {
                stage: Stage::Window,
                ..
            }) => by_stage.0 += 1,
            Err(PublishError::Timeout {
                stage: Stage::Confirm,
                ..
            }) => by_stage.1 += 1,
            other => panic!("expected a timeout while the broker is away: {other:?}"),
        }
    }
    assert_eq!(peak, window, "the window filled");
    assert_eq!(
        by_stage,
        (20 - window, window),
        "waiting callers got back-pressure"
    );
    assert!(elapsed >= Duration::from_millis(550), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(3),
        "{elapsed:?}: every wait has a deadline"
    );
    assert_eq!(published(&registry, &ex, "confirmed"), 1);
    assert_eq!(published(&registry, &ex, "failed"), 20);

    // The broker answers again: the slots free up and publishing resumes.
    proxy.pause(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match p.publish_json(&ex, "k", &"after").await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert!(e.is_transient(), "{e}");
            }
            Err(e) => panic!("publishing did not resume: {e}"),
        }
    }
    p.close().await;
}

/// Properties that do not fit in one frame: the broker would close the whole
/// connection (a frame error), failing or resending every message in flight
/// on it. The publisher refuses such a message before sending it, and the
/// others go through on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_over_a_frame_fail_before_sending() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, registry, _) = publisher(PublisherConfig::default()).await;
    let big = "h".repeat(200_000);
    let (bad, good) = tokio::join!(
        p.publish(
            Message::bytes(&ex, "k", b"big".to_vec())
                .header("note", AMQPValue::LongString(big.as_str().into()))
        ),
        p.publish(Message::bytes(&ex, "k", b"small".to_vec())),
    );
    good.unwrap();
    let err = bad.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("cannot publish: the message's properties and headers are 200"),
        "{text}"
    );
    assert!(text.ends_with("nothing was sent"), "{text}");
    assert_eq!(fx.wait_count(&q, 1).await, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fx.count(&q).await, 1, "the oversized one was not sent");
    assert_eq!(published(&registry, &ex, "failed"), 1);
    assert_eq!(
        common::counter(&registry, "warren_reconnects_total", &[]),
        0,
        "the connection was not lost"
    );
    p.close().await;
}

/// The limit is AMQP's, to the byte: properties that fill the frame to its
/// last byte are sent and stored, one byte more is refused before sending
/// (RabbitMQ itself would tolerate a few bytes more; the specification does
/// not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_fill_a_frame_exactly_are_sent() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, registry, _) = publisher(PublisherConfig::default()).await;
    // Encoded: property flags 2, message_id 1+36 (a UUID), timestamp 8,
    // content_type 1+24, delivery_mode 1, the table's length 4, and the
    // entry: key 1+4, type 1, length 4, then the value. A 128 KiB frame
    // carries 131,072 - 20 bytes of properties.
    let fits = 131_072 - 20 - (2 + 37 + 8 + 25 + 1 + 4 + 5 + 1 + 4);
    let header = |n: usize| AMQPValue::LongString("h".repeat(n).as_str().into());
    p.publish(Message::bytes(&ex, "k", b"fits".to_vec()).header("note", header(fits)))
        .await
        .unwrap();
    let err = p
        .publish(Message::bytes(&ex, "k", b"over".to_vec()).header("note", header(fits + 1)))
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot publish: the message's properties and headers are {} bytes encoded, over the 131052 bytes",
            131_053
        )),
        "{err}"
    );
    let stored = fx.drain(&q).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, b"fits");
    assert_eq!(published(&registry, &ex, "confirmed"), 1);
    assert_eq!(
        common::counter(&registry, "warren_reconnects_total", &[]),
        0
    );
    p.close().await;
}

/// A message routed to several queues is nacked when one of them refuses it
/// (a full queue with `reject-publish`), while the others keep their copy.
/// The error must not claim that nothing was stored: a caller who publishes
/// it again puts a second copy in those queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_says_the_queues_that_took_the_message_keep_it() {
    let mut fx = Fixture::new().await;
    let (ex, full, open) = (unique("ex"), unique("full"), unique("open"));
    fx.exchange(&ex).await;
    fx.queue(&full, &ex, "k", reject_publish(0)).await;
    fx.queue(&open, &ex, "k", FieldTable::default()).await;
    let (p, registry, _) = publisher(PublisherConfig::default()).await;
    let err = p
        .publish(Message::bytes(&ex, "k", "both"))
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Nacked { .. }), "{err:?}");
    let text = err.to_string();
    assert!(!text.contains("not stored"), "{text}");
    assert!(
        text.contains("queues that took it keep their copy")
            && text.contains("publishing it again may duplicate it there"),
        "{text}"
    );
    assert_eq!(fx.wait_count(&open, 1).await, 1, "the open queue took it");
    assert_eq!(fx.count(&full).await, 0);
    assert_eq!(published(&registry, &ex, "nacked"), 1);
    p.close().await;
}

/// lapin encodes an `AMQPValue::ShortString` in a header table with a type
/// tag RabbitMQ cannot read: the broker closes the whole connection
/// (541 INTERNAL_ERROR). Sent as is, every message in flight went again
/// with it, the connection was reset ten times, and the good messages
/// failed too. Such a header is refused before anything is sent, saying
/// what to use instead; the others go through on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_string_header_fails_only_its_message_before_sending() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, registry, _) = publisher(PublisherConfig::default()).await;
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::ShortString("acme".into()));
    let results = p
        .publish_batch((0..4).map(|i| {
            let m = Message::bytes(&ex, "k", format!("{i}"));
            match i {
                1 => m.header("tenant", AMQPValue::ShortString("acme".into())),
                2 => m.header("nested", AMQPValue::FieldTable(nested.clone())),
                _ => m.header("tenant", AMQPValue::LongString("acme".into())),
            }
        }))
        .await;
    assert!(results[0].is_ok() && results[3].is_ok(), "{results:?}");
    for (i, name) in [(1, "\"tenant\""), (2, "\"nested.inner\"")] {
        match &results[i] {
            Err(e @ PublishError::Invalid(_)) => {
                let text = e.to_string();
                assert!(
                    text.contains(&format!("header {name} is an AMQP short string"))
                        && text.contains("AMQPValue::LongString")
                        && text.ends_with("nothing was sent"),
                    "{text}"
                );
            }
            other => panic!("message {i}: expected Invalid, got {other:?}"),
        }
    }
    assert_eq!(fx.wait_count(&q, 2).await, 2);
    assert_eq!(published(&registry, &ex, "confirmed"), 2);
    assert_eq!(published(&registry, &ex, "failed"), 2);
    assert_eq!(
        common::counter(&registry, "warren_reconnects_total", &[]),
        0,
        "the connection was not lost"
    );
    p.close().await;
}

/// The broker's words can span lines (Erlang prints a large term over
/// several); an error is one line, as logs and tables need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_words_are_one_line() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, _registry, _) = publisher(PublisherConfig::default()).await;
    let huge = Message::bytes(&ex, "k", "x")
        .properties(BasicProperties::default().with_expiration("99999999999999999999".into()));
    let err = p.publish(huge).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, PublishError::MessageRefused { .. }),
        "{err:?}"
    );
    assert!(
        text.contains(
            "invalid expiration '99999999999999999999': {value_too_large, 99999999999999999999}"
        ),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
    p.close().await;
}

/// A user without the write permission on an exchange: RabbitMQ closes the
/// channel with 403 ACCESS_REFUSED naming the exchange, the default
/// exchange as 'amq.default'. Every message fails at once with the
/// permission to grant; none is sent again one at a time to find the
/// culprit (the default exchange's messages were, a channel each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_permission_fails_at_once_and_says_what_to_grant() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let user = warren_testkit::TempUser::create();
    warren_testkit::rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", "^$", ".*"]);
    let component = unique("noperm");
    let opts = ConnectOptions::new(user.url(), &component).attempts(3);
    let conn_name = opts.connection_name();
    let registry = prometheus::Registry::new();
    let p = Publisher::connect(PublisherConfig::default(), opts, &registry)
        .await
        .unwrap();
    for exchange in ["", ex.as_str()] {
        let shown = if exchange.is_empty() {
            "amq.default"
        } else {
            exchange
        };
        let results = p
            .publish_batch((0..20).map(|i| Message::bytes(exchange, q.as_str(), format!("{i}"))))
            .await;
        for (i, r) in results.iter().enumerate() {
            match r {
                Err(e @ PublishError::Refused { .. }) => {
                    let text = e.to_string();
                    assert!(!e.is_transient(), "{text}");
                    assert!(
                        text.contains(&format!(
                            "user \"{}\" needs the write permission on exchange \"{shown}\" in vhost \"/\"",
                            user.name
                        )) && text.contains(&format!("rabbitmqctl list_user_permissions {}", user.name)),
                        "{text}"
                    );
                }
                other => panic!("{exchange:?} message {i}: expected Refused, got {other:?}"),
            }
        }
    }
    let channels = tokio::task::spawn_blocking(move || common::channel_numbers(&conn_name))
        .await
        .unwrap();
    assert!(
        channels.iter().all(|n| *n <= 4),
        "found without one channel per message: {channels:?}"
    );
    assert_eq!(fx.count(&q).await, 0);
    p.close().await;
}

/// Builder calls in any order: properties set after a header keep the
/// header (they replaced every header before, silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_after_a_header_keep_the_header() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let (p, _registry, _) = publisher(PublisherConfig::default()).await;
    let msg = Message::json(&ex, "k", &serde_json::json!({"id": 1}))
        .unwrap()
        .header("tenant", AMQPValue::LongString("acme".into()))
        .properties(BasicProperties::default().with_priority(3));
    p.publish(msg).await.unwrap();
    fx.wait_count(&q, 1).await;
    let got = fx.drain(&q).await;
    assert_eq!(got.len(), 1);
    let props = &got[0].1;
    assert_eq!(props.priority(), &Some(3));
    assert_eq!(
        props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("tenant").cloned()),
        Some(AMQPValue::LongString("acme".into())),
        "{props:?}"
    );
    p.close().await;
}

/// `Duration::MAX` ("for ever") as the publish timeout, a message's own
/// timeout or the longest reconnect delay publishes and closes like any
/// other value: it used to panic in `submit` and `close`, whose deadlines
/// overflowed the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_of_for_ever_publish_and_close_without_a_panic() {
    let mut fx = Fixture::new().await;
    let (ex, q) = (unique("ex"), unique("q"));
    fx.exchange(&ex).await;
    fx.queue(&q, &ex, "k", FieldTable::default()).await;
    let config = PublisherConfig::default()
        .publish_timeout(Duration::MAX)
        .reconnect_backoff(Duration::from_millis(1), Duration::MAX);
    let (p, _registry, _) = publisher(config).await;
    p.publish(Message::bytes(&ex, "k", b"one".to_vec()))
        .await
        .unwrap();
    p.publish(Message::bytes(&ex, "k", b"two".to_vec()).timeout(Duration::MAX))
        .await
        .unwrap();
    p.close().await;
    assert_eq!(fx.count(&q).await, 2);
}
