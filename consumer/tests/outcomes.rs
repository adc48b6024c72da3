#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The outcome table row by row against the real broker, two groups on one
//! exchange, malformed headers, shutdown and a forcibly closed connection.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use support::*;
use warren_consumer::{handler_fn, json_handler, Delivery, HandlerError};
use warren_topology::headers;

fn classic(retry: &str, extra: &str) -> String {
    format!(
        "[[exchange]]\nname = 'orders'\nkind = 'topic'\n\
         [[group]]\nname = 'billing'\nexchange = 'orders'\nbindings = ['order.*']\n\
         queue_type = 'classic'\nretry = [{retry}]\nprefetch = 16\nconcurrency = 8\n\
         handler_timeout = '2s'\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_is_acked_once() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                assert_eq!(d.body(), b"{\"n\":1}");
                assert_eq!(d.routing_key(), "order.created");
                Ok(())
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"{\"n\":1}", props("ok-1"))
        .await;
    wait_for(Duration::from_secs(5), "handled", || ledger.len() == 1).await;
    // Acks are batched, but a lone delivery is acked within a moment, not
    // only when another comes or the group stops.
    let deadline = Instant::now() + Duration::from_secs(5);
    while unacked(&g.work_queue()) != 0 {
        assert!(Instant::now() < deadline, "the delivery was not acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = ledger.of("ok-1");
    assert_eq!(seen[0].attempt, 1);
    assert!(!seen[0].redelivered);
    let deadline = Instant::now() + Duration::from_secs(5);
    while run.metric("warren_handled_total", &[("outcome", "ack")]) < 1.0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.stop().await;
    assert_eq!(f.count(&g.work_queue()).await, 0, "acked, not requeued");
    assert_eq!(f.count(&g.dead_queue()).await, 0);
    assert_eq!(ledger.len(), 1);
}

/// A message published without a `message_id` (many clients set none) gets
/// one, a UUID, on its first copy; its later attempts, copies and its dead
/// letter keep it, so that `warren dlq show ID` and `replay --id` can name
/// it and a retry copy returned by the broker is matched to its original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_an_id_gets_one_on_its_first_copy_and_keeps_it() {
    let f = Fixture::new(&classic("'200ms', '200ms'", "")).await;
    let g = f.group(0);
    let ids: Arc<std::sync::Mutex<Vec<Option<String>>>> = Arc::default();
    let seen = ids.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            seen.lock().unwrap().push(d.message_id().map(str::to_owned));
            async { Err(HandlerError::retryable("not yet")) }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    let bare = BasicProperties::default().with_delivery_mode(2);
    f.publish(&f.exchange(), "order.created", b"{}", bare).await;
    let dead = f.take(&g.dead_queue(), 1, Duration::from_secs(10)).await;
    run.stop().await;
    let ids = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(ids[0], None, "the first attempt sees what was published");
    let id = ids[1].clone().expect("the retry copy has an id");
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(
        ids[2].as_deref(),
        Some(id.as_str()),
        "kept on the next copy"
    );
    let dead_id = dead[0]
        .properties
        .message_id()
        .as_ref()
        .map(|i| i.to_string());
    assert_eq!(dead_id.as_deref(), Some(id.as_str()));
    assert_eq!(f.count(&g.work_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_goes_through_every_tier_then_dead_letters() {
    let f = Fixture::new(&classic("'300ms', '600ms'", "")).await;
    let g = f.group(0);
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                Err(HandlerError::retryable(format!(
                    "upstream down\nattempt {}",
                    d.attempt()
                )))
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"body-bytes", props("r-1"))
        .await;
    let dead = f.take(&g.dead_queue(), 1, Duration::from_secs(10)).await;
    let seen = ledger.of("r-1");
    assert_eq!(
        seen.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        [1, 2, 3],
        "one attempt per tier plus the first"
    );
    assert_eq!(seen[0].kind, None);
    assert_eq!(seen[1].kind.as_deref(), Some("retryable"));
    assert_eq!(seen[0].last_error, None);
    assert_eq!(
        seen[2].last_error.as_deref(),
        Some("upstream down attempt 2"),
        "the handler sees why the previous attempt failed"
    );
    let gap1 = seen[1].at - seen[0].at;
    let gap2 = seen[2].at - seen[1].at;
    assert!(
        gap1 >= Duration::from_millis(300),
        "tier 1 TTL observed: {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(600),
        "tier 2 TTL observed: {gap2:?}"
    );
    assert!(gap2 < Duration::from_secs(5), "{gap2:?}");

    let m = &dead[0];
    assert_eq!(m.delivery.data, b"body-bytes");
    assert_eq!(m.delivery.exchange.as_str(), "warren.dlx");
    assert_eq!(m.delivery.routing_key.as_str(), g.name);
    assert_eq!(header_int(m, headers::ATTEMPTS), Some(3));
    assert_eq!(
        header_str(m, headers::ERROR).as_deref(),
        Some("upstream down attempt 3")
    );
    assert_eq!(
        header_str(m, headers::ERROR_KIND).as_deref(),
        Some("retryable")
    );
    assert_eq!(
        header_str(m, headers::GROUP).as_deref(),
        Some(g.name.as_str())
    );
    assert_eq!(
        header_str(m, headers::ORIGINAL_EXCHANGE).as_deref(),
        Some(f.exchange().as_str())
    );
    assert_eq!(
        header_str(m, headers::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("order.created")
    );
    let first = header_str(m, headers::FIRST_FAILED_AT).unwrap();
    let dead_at = header_str(m, headers::DEAD_LETTERED_AT).unwrap();
    assert!(first.ends_with('Z') && first.len() == 24, "{first}");
    assert!(first < dead_at, "{first} < {dead_at}");
    assert_eq!(header_str(m, "x-custom").as_deref(), Some("kept"));
    // Each retry copy went to its tier through the default exchange, and
    // came back when the tier's TTL ran out: the broker's `x-death` says so.
    let mut deaths = x_deaths(m);
    deaths.sort();
    assert_eq!(
        deaths,
        [1, 2].map(|n| (
            g.retry_queue(n),
            String::new(),
            "expired".to_owned(),
            g.retry_queue(n)
        )),
        "(queue, exchange, reason, routing key) of each x-death entry"
    );
    let p = &m.delivery.properties;
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "r-1");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-r-1");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.timestamp(), Some(1_700_000_000));
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(run.metric("warren_retries_total", &[("tier", "1")]), 1.0);
    assert_eq!(run.metric("warren_retries_total", &[("tier", "2")]), 1.0);
    assert_eq!(
        run.metric("warren_handled_total", &[("outcome", "dead_letter")]),
        1.0
    );
    assert_eq!(run.metric("warren_deliveries_total", &[]), 3.0);
    run.stop().await;
    assert_eq!(f.count(&g.work_queue()).await, 0);
    for n in 1..=2 {
        assert_eq!(f.count(&g.retry_queue(n)).await, 0);
    }
}

/// The `x-death` entries of a message: (queue, exchange, reason, first
/// routing key) each.
fn x_deaths(m: &lapin::message::BasicGetMessage) -> Vec<(String, String, String, String)> {
    let text = |t: &FieldTable, k: &str| match t.inner().get(k) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("x-death {k}: {other:?}"),
    };
    let h = m.delivery.properties.headers().as_ref().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = h.inner().get("x-death") else {
        panic!("no x-death: {h:?}");
    };
    deaths
        .as_slice()
        .iter()
        .map(|d| {
            let AMQPValue::FieldTable(t) = d else {
                panic!("x-death entry: {d:?}");
            };
            let Some(AMQPValue::FieldArray(keys)) = t.inner().get("routing-keys") else {
                panic!("x-death routing-keys: {t:?}");
            };
            let key = match keys.as_slice().first() {
                Some(AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => panic!("x-death routing key: {other:?}"),
            };
            (
                text(t, "queue"),
                text(t, "exchange"),
                text(t, "reason"),
                key,
            )
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct Order {
    id: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_and_undecodable_go_straight_to_dead_letters() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let run = Running::start(
        g.clone(),
        json_handler(move |o: Order, _d: Delivery| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if o.id == 13 {
                    return Err(HandlerError::permanent("order 13 is cursed"));
                }
                Ok(())
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    f.publish(
        &f.exchange(),
        "order.created",
        b"{\"id\":13}",
        props("perm"),
    )
    .await;
    f.publish(
        &f.exchange(),
        "order.created",
        b"\xff\xfenot json",
        props("bad"),
    )
    .await;
    f.publish(
        &f.exchange(),
        "order.created",
        b"{\"id\":\"x\"}",
        props("wrong"),
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"{\"id\":1}", props("good"))
        .await;
    let mut dead = f.take(&g.dead_queue(), 3, Duration::from_secs(10)).await;
    dead.sort_by_key(message_id);
    let kinds: Vec<(String, Option<String>, Option<i64>)> = dead
        .iter()
        .map(|m| {
            (
                message_id(m),
                header_str(m, headers::ERROR_KIND),
                header_int(m, headers::ATTEMPTS),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("bad".into(), Some("decode".into()), Some(1)),
            ("perm".into(), Some("permanent".into()), Some(1)),
            ("wrong".into(), Some("decode".into()), Some(1)),
        ]
    );
    assert_eq!(
        header_str(&dead[1], headers::ERROR).as_deref(),
        Some("order 13 is cursed")
    );
    assert!(header_str(&dead[0], headers::ERROR)
        .unwrap()
        .contains("JSON"));
    assert_eq!(dead[0].delivery.data, b"\xff\xfenot json");
    wait_for(Duration::from_secs(5), "good one handled", || {
        calls.load(Ordering::SeqCst) == 2
    })
    .await;
    assert_eq!(
        run.metric("warren_retries_total", &[]),
        0.0,
        "never retried"
    );
    run.stop().await;
    assert_eq!(f.count(&g.work_queue()).await, 0);
    assert_eq!(f.count(&g.retry_queue(1)).await, 0);
}

/// A dead letter must not expire in `{group}.dead` (which has no dead-letter
/// exchange of its own) and must not carry the quorum work queue's delivery
/// counter (which would make its classic dead-letter queue look like a
/// quorum queue to the operator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_keeps_neither_expiration_nor_the_delivery_count() {
    let f = Fixture::new(
        "[[exchange]]\nname = 'orders'\nkind = 'topic'\n\
         [[group]]\nname = 'billing'\nexchange = 'orders'\nbindings = ['order.*']\n\
         queue_type = 'quorum'\nretry = []\ndelivery_limit = 5\nhandler_timeout = '2s'\n",
    )
    .await;
    let g = f.group(0);
    f.publish(
        &f.exchange(),
        "order.created",
        b"{}",
        props("exp-1").with_expiration("60000".into()),
    )
    .await;
    // One return before the group sees it: the quorum queue now counts a
    // delivery and says so in `x-delivery-count`.
    let got =
        f.ch.basic_get(g.work_queue().as_str().into(), Default::default())
            .await
            .unwrap()
            .expect("the message is in the work queue");
    f.ch.basic_nack(
        got.delivery.delivery_tag,
        lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                assert!(
                    d.headers()
                        .is_some_and(|h| h.inner().contains_key(headers::DELIVERY_COUNT)),
                    "the redelivery from the quorum queue carries x-delivery-count"
                );
                Err(HandlerError::permanent("no such customer"))
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    let dead = f.take(&g.dead_queue(), 1, Duration::from_secs(10)).await;
    run.stop().await;
    assert_eq!(ledger.count("exp-1"), 1);
    let p = &dead[0].delivery.properties;
    assert_eq!(p.expiration(), &None, "a dead letter never expires");
    assert_eq!(header_int(&dead[0], headers::DELIVERY_COUNT), None);
    assert_eq!(
        header_str(&dead[0], headers::ERROR_KIND).as_deref(),
        Some("permanent")
    );
    // Everything else is kept.
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("exp-1"));
    assert_eq!(header_str(&dead[0], "x-custom").as_deref(), Some("kept"));
}

/// Headers of 50 KB (any client with the broker's default frame size can
/// publish them) are delivered, dead-lettered with the headers intact, and
/// do not hold up the message behind them.
/// A consumer that logs in as another user than the publisher: the broker
/// refuses a message whose `user_id` is not the publishing connection's
/// user, so a copy that kept it was refused, the original requeued, and the
/// message looped forever. The copy now goes without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_another_users_message_drops_its_user_id_and_reaches_the_dead_letters() {
    let f = Fixture::new(&classic("", "")).await;
    let g = f.group(0);
    let user = warren_testkit::TempUser::create();
    let run = Running::start_as(
        user.url(),
        g.clone(),
        handler_fn(|_d: Delivery| async { Err(HandlerError::permanent("refused by the test")) }),
        "consumer-test",
        |b| b.requeue_delay(Duration::from_millis(100)),
    )
    .await;
    // Published by guest with its own (valid) user_id.
    f.publish(
        &f.exchange(),
        "order.created",
        b"{}",
        props("uid-1").with_user_id("guest".into()),
    )
    .await;
    wait_for_count(&f, &g.dead_queue(), 1).await;
    run.stop().await;
    let dead = f.take(&g.dead_queue(), 1, Duration::from_secs(2)).await;
    assert_eq!(dead[0].delivery.properties.user_id(), &None);
    assert_eq!(
        dead[0]
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("uid-1")
    );
    assert_eq!(
        header_str(&dead[0], headers::ERROR_KIND).as_deref(),
        Some("permanent")
    );
    assert_eq!(f.count(&g.work_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_large_headers_is_handled_and_dead_lettered_whole() {
    let f = Fixture::new(&classic("", "")).await;
    let g = f.group(0);
    let blob = "z".repeat(50_000);
    let mut big = props("big-1");
    let mut h = big.headers().clone().unwrap_or_default();
    h.insert(
        "trace-blob".into(),
        AMQPValue::LongString(blob.clone().into()),
    );
    big = big.with_headers(h);
    f.publish(&f.exchange(), "order.created", b"{}", big).await;
    f.publish(&f.exchange(), "order.created", b"{}", props("small-1"))
        .await;
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                if d.message_id() == Some("big-1") {
                    return Err(HandlerError::permanent("too big to bill"));
                }
                Ok(())
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    let dead = f.take(&g.dead_queue(), 1, Duration::from_secs(10)).await;
    wait_for(Duration::from_secs(5), "both handled", || ledger.len() == 2).await;
    assert_eq!(run.metric("warren_reconnects_total", &[]), 0.0);
    run.stop().await;
    assert_eq!(
        header_str(&dead[0], "trace-blob").as_deref(),
        Some(blob.as_str())
    );
    assert_eq!(ledger.count("small-1"), 1);
}

/// A retry tier in the file that the broker lacks (a tier added, `warren
/// topology apply` not run): every failure's copy to it would be unroutable
/// and its message requeued and handled again, forever on a classic queue.
/// The group now checks every queue it may send to before the first
/// delivery, and stops with `QueueMissing` naming it; nothing is consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_queue_missing_on_the_broker_stops_the_group_before_any_handler_runs() {
    let f = Fixture::new(&classic("'200ms', '200ms'", "")).await;
    let g = f.group(0);
    f.ch.queue_delete(
        g.retry_queue(2).as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    f.publish(&f.exchange(), "order.created", b"{}", props("m-1"))
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let group = warren_consumer::ConsumerGroup::builder(
        g.clone(),
        handler_fn(move |_d: Delivery| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::retryable("fails")) }
        }),
    )
    .metrics(warren_consumer::Metrics::register(&prometheus::Registry::new()).unwrap())
    .build()
    .unwrap();
    let broker = Arc::new(
        warren_topology::Broker::connect(
            warren_topology::ConnectOptions::new(url(), "consumer-test").attempts(3),
        )
        .await
        .unwrap(),
    );
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        group.run(&broker, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the group stops at once");
    broker.close().await;
    match result {
        Err(e @ warren_consumer::ConsumerError::QueueMissing { .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with(&format!(
                    "consumer group \"{}\": queue \"{}\" does not exist on the broker (run `warren topology apply` first)",
                    g.name,
                    g.retry_queue(2)
                )),
                "{text}"
            );
        }
        other => panic!("expected QueueMissing, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0, "no handler ran");
    assert_eq!(f.count(&g.work_queue()).await, 1, "the message waits");
    // Checked passively: the consumer declares nothing the operator did
    // not apply.
    let ch = f.conn.create_channel().await.unwrap();
    let declared = ch
        .queue_declare(
            g.retry_queue(2).as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(
        declared.is_err_and(|e| e.to_string().contains("NOT_FOUND")),
        "the missing tier was not created by the consumer"
    );
}

/// Frames of 16 KiB: a URL that asks for them, and properties (message id
/// `id`, a `trace-blob` header of `z`s, returned too) that fill such a frame
/// to within 64 bytes, so that they fit alone but not with the failure
/// headers of a copy added.
fn filling_a_small_frame(id: &str) -> (warren_topology::AmqpUrl, BasicProperties, String) {
    let frame_max = 16_384;
    let url: warren_topology::AmqpUrl =
        format!("{}?frame_max={frame_max}", warren_testkit::url().expose())
            .parse()
            .unwrap();
    // Fill the frame to within 64 bytes: the encoded properties without
    // the blob, plus the entry's key (1 + 10), type (1) and length (4).
    let base = props(id);
    let encoded = |p: &BasicProperties| {
        let gen = lapin::protocol::basic::gen_properties(p);
        gen(Vec::<u8>::new().into()).unwrap().position as usize
    };
    let room = frame_max - 20;
    let blob = "z".repeat(room - encoded(&base) - (1 + 10 + 1 + 4) - 64);
    let mut h = base.headers().clone().unwrap_or_default();
    h.insert(
        "trace-blob".into(),
        AMQPValue::LongString(blob.clone().into()),
    );
    let big = base.with_headers(h);
    assert!(encoded(&big) <= room && encoded(&big) + 64 >= room);
    (url, big, blob)
}

/// A message whose copy can never be published (here: headers that fit in
/// the consumer's frames by themselves, but not with the failure headers
/// added) used to be requeued for ever, handled again every
/// `requeue_delay`. It is now rejected, so the broker dead-letters it whole
/// through the work queue's own dead-letter exchange into `{group}.dead`
/// (kind `broker`, the reason from `x-death`), after one handling. The
/// consumer runs with 16 KiB frames so that the test can read the dead
/// letter, `x-death` and all, with the usual 128 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_copy_cannot_be_published_is_dead_lettered_by_the_broker() {
    let f = Fixture::new(&classic("", "")).await;
    let g = f.group(0);
    let (url, big, blob) = filling_a_small_frame("huge-1");
    f.publish(&f.exchange(), "order.created", b"{}", big).await;
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start_as(
        url,
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                Err(HandlerError::permanent("too big to bill"))
            }
        }),
        "consumer-test",
        |b| b.requeue_delay(Duration::from_millis(50)),
    )
    .await;
    let dead = f.take(&g.dead_queue(), 1, Duration::from_secs(10)).await;
    assert_eq!(
        run.metric("warren_handled_total", &[("outcome", "reject")]),
        1.0
    );
    run.stop().await;
    assert_eq!(ledger.count("huge-1"), 1, "handled once, not looped");
    assert_eq!(
        header_str(&dead[0], "trace-blob").as_deref(),
        Some(blob.as_str()),
        "dead-lettered whole"
    );
    assert_eq!(header_str(&dead[0], headers::ERROR_KIND), None);
    let reason = match dead[0]
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death").cloned())
    {
        Some(AMQPValue::FieldArray(a)) => match a.as_slice().first() {
            Some(AMQPValue::FieldTable(t)) => t.inner().get("reason").cloned(),
            _ => None,
        },
        _ => None,
    };
    assert_eq!(
        reason,
        Some(AMQPValue::LongString("rejected".into())),
        "dead-lettered by the broker on a reject"
    );
    assert_eq!(f.count(&g.work_queue()).await, 0);
}

/// The same message on a work queue declared by hand without warren's
/// dead-letter exchange: a reject would make the broker drop it, so it is
/// requeued instead (and handled again), never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_queue_without_the_dead_letter_exchange_never_drops_a_message_whose_copy_cannot_be_published(
) {
    let f = Fixture::new(&classic("", "")).await;
    let g = f.group(0);
    let queue = g.work_queue();
    f.ch.queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    f.ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (url, big, blob) = filling_a_small_frame("huge-2");
    f.publish("", &queue, b"{}", big).await;
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start_as(
        url,
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                Err(HandlerError::permanent("too big to bill"))
            }
        }),
        "consumer-test",
        |b| b.requeue_delay(Duration::from_millis(50)),
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "handled again after a requeue",
        || ledger.count("huge-2") >= 2,
    )
    .await;
    assert!(ledger.of("huge-2")[1].redelivered);
    assert_eq!(
        run.metric("warren_handled_total", &[("outcome", "reject")]),
        0.0
    );
    assert!(run.metric("warren_handled_total", &[("outcome", "requeue")]) >= 1.0);
    run.stop().await;
    let back = f.take(&queue, 1, Duration::from_secs(5)).await;
    assert_eq!(
        header_str(&back[0], "trace-blob").as_deref(),
        Some(blob.as_str()),
        "still in the work queue, whole"
    );
    assert_eq!(f.count(&queue).await, 0);
    assert_eq!(f.count(&g.dead_queue()).await, 0);
}

/// A session that fails as soon as it opens (here: headers larger than the
/// frame size the URL asks for) is reopened with a growing delay, not in a
/// tight loop (before: about 300 reconnects a second), and the message
/// stays in its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_keeps_failing_is_reopened_with_backoff() {
    let f = Fixture::new(&classic("", "")).await;
    let g = f.group(0);
    let mut big = props("big-2");
    let mut h = big.headers().clone().unwrap_or_default();
    h.insert(
        "trace-blob".into(),
        AMQPValue::LongString("z".repeat(50_000).into()),
    );
    big = big.with_headers(h);
    f.publish(&f.exchange(), "order.created", b"{}", big).await;

    let raw = warren_testkit::url().expose().to_owned();
    let sep = if raw.contains('?') { '&' } else { '?' };
    let small: warren_topology::AmqpUrl = format!("{raw}{sep}frame_max=16384").parse().unwrap();
    let registry = prometheus::Registry::new();
    let broker = Arc::new(
        warren_topology::Broker::connect(
            warren_topology::ConnectOptions::new(small, "consumer-test").attempts(3),
        )
        .await
        .unwrap(),
    );
    let group = warren_consumer::ConsumerGroup::builder(
        g.clone(),
        handler_fn(|_d: Delivery| async move { Ok(()) }),
    )
    .metrics(warren_consumer::Metrics::register(&registry).unwrap())
    .build()
    .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (c, b) = (cancel.clone(), broker.clone());
    let task = tokio::spawn(async move { group.run(&b, c).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
    broker.close().await;
    let text = {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    };
    let reconnects: f64 = text
        .lines()
        .find(|l| l.starts_with("warren_reconnects_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        (1.0..=8.0).contains(&reconnects),
        "reconnects in 3 s: {reconnects}"
    );
    wait_for_count(&f, &g.work_queue(), 1).await;
}

async fn wait_for_count(f: &Fixture, queue: &str, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.count(queue).await != n {
        assert!(Instant::now() < deadline, "{queue} never held {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A handler that panics before it returns its future (in the closure's
/// synchronous part, or in `Handler::handle` itself) is a panic like any
/// other: retried with kind `panic`. It used to escape the runtime's
/// catch, leaving its delivery unsettled (neither acked nor requeued)
/// until the channel closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_before_the_handlers_future_is_retried_too() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            l.note(&d);
            if d.attempt() == 1 {
                panic!("no future for {:?}", d.message_id());
            }
            async move { Ok(()) }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"x", props("early"))
        .await;
    wait_for(Duration::from_secs(10), "retried", || {
        ledger.count("early") == 2
    })
    .await;
    let seen = ledger.of("early");
    assert_eq!(seen[1].kind.as_deref(), Some("panic"));
    assert_eq!(
        seen[1].last_error.as_deref(),
        Some("handler panicked: no future for Some(\"early\")")
    );
    wait_for(Duration::from_secs(5), "acked", || {
        unacked(&g.work_queue()) == 0
    })
    .await;
    assert_eq!(run.metric("warren_in_flight", &[]), 0.0);
    run.stop().await;
    assert_eq!(f.count(&g.work_queue()).await, 0);
    assert_eq!(f.count(&g.dead_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_timeouts_are_retried_and_the_consumer_keeps_going() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                match (d.message_id(), d.attempt()) {
                    (Some("panics"), 1) => panic!("index out of bounds"),
                    (Some("slow"), 1) => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
        }),
        "consumer-test",
        |b| b.handler_timeout(Duration::from_millis(300)),
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"p", props("panics"))
        .await;
    f.publish(&f.exchange(), "order.created", b"s", props("slow"))
        .await;
    wait_for(Duration::from_secs(10), "both retried once", || {
        ledger.count("panics") == 2 && ledger.count("slow") == 2
    })
    .await;
    assert_eq!(ledger.of("panics")[1].kind.as_deref(), Some("panic"));
    assert_eq!(ledger.of("panics")[1].attempt, 2);
    assert_eq!(ledger.of("slow")[1].kind.as_deref(), Some("timeout"));
    f.publish(&f.exchange(), "order.created", b"later", props("later"))
        .await;
    wait_for(Duration::from_secs(5), "still consuming", || {
        ledger.count("later") == 1
    })
    .await;
    assert!(*run.ready.borrow());
    run.stop().await;
    assert_eq!(f.count(&g.dead_queue()).await, 0);
    assert_eq!(f.count(&g.work_queue()).await, 0);
    assert_eq!(ledger.count("panics"), 2);
    assert_eq!(ledger.count("slow"), 2);
}

/// A slow handler at the front of the ack window holds back the `multiple`
/// ack, but not the group: once it has run 100 ms, the finished deliveries
/// behind it are acked one by one before they fill the prefetch window (16
/// here), so the broker keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_does_not_hold_up_the_deliveries_behind_it() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let ledger = Ledger::default();
    let l = ledger.clone();
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let (l, r) = (l.clone(), r.clone());
            async move {
                if d.message_id() == Some("slow") {
                    r.notified().await;
                }
                l.note(&d);
                Ok(())
            }
        }),
        "consumer-test",
        |b| b.handler_timeout(Duration::from_secs(60)),
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"s", props("slow"))
        .await;
    f.publish_numbered("order.created", b"f", "fast-", 40).await;
    // 40 finished deliveries behind one unfinished: more than twice the
    // prefetch window, so some must have been acked around the slow one.
    wait_for(
        Duration::from_secs(10),
        "the fast ones, past the slow one",
        || ledger.len() == 40,
    )
    .await;
    assert_eq!(ledger.count("slow"), 0, "still running");
    release.notify_one();
    wait_for(Duration::from_secs(5), "the slow one", || {
        ledger.count("slow") == 1
    })
    .await;
    assert_eq!(ledger.of("slow")[0].attempt, 1, "not timed out");
    run.stop().await;
    assert_eq!(f.count(&g.work_queue()).await, 0, "every delivery acked");
    assert_eq!(ledger.len(), 41, "each handled once");
    for i in 0..40 {
        assert_eq!(ledger.count(&format!("fast-{i}")), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_on_one_exchange_retry_only_where_it_failed() {
    let toml = "[[exchange]]\nname = 'orders'\nkind = 'topic'\n\
        [[group]]\nname = 'billing'\nexchange = 'orders'\nbindings = ['#']\nqueue_type = 'classic'\nretry = ['200ms']\n\
        [[group]]\nname = 'audit'\nexchange = 'orders'\nbindings = ['#']\nqueue_type = 'classic'\nretry = ['200ms']\n";
    let f = Fixture::new(toml).await;
    let (billing, audit) = (Ledger::default(), Ledger::default());
    let b = billing.clone();
    let run_b = Running::start(
        f.group(0),
        handler_fn(move |d: Delivery| {
            let b = b.clone();
            async move {
                b.note(&d);
                if d.attempt() == 1 {
                    Err(HandlerError::retryable("flaky"))
                } else {
                    Ok(())
                }
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    let a = audit.clone();
    let run_a = Running::start(
        f.group(1),
        handler_fn(move |d: Delivery| {
            let a = a.clone();
            async move {
                a.note(&d);
                Ok(())
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    f.publish(&f.exchange(), "order.paid", b"x", props("m1"))
        .await;
    wait_for(Duration::from_secs(10), "billing handled it twice", || {
        billing.count("m1") == 2
    })
    .await;
    // Give a wrong second delivery to audit the time of another tier.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(audit.count("m1"), 1, "audit sees it exactly once");
    assert_eq!(billing.count("m1"), 2);
    run_a.stop().await;
    run_b.stop().await;
    for g in [f.group(0), f.group(1)] {
        assert_eq!(f.count(&g.work_queue()).await, 0);
        assert_eq!(f.count(&g.dead_queue()).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_attempt_headers_count_as_absent_and_never_loop() {
    let f = Fixture::new(&classic("'100ms'", "")).await;
    let g = f.group(0);
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                Err(HandlerError::retryable("always"))
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    let bad: Vec<(&str, AMQPValue)> = vec![
        ("string", AMQPValue::LongString("3".into())),
        ("negative", AMQPValue::LongLongInt(-3)),
        ("huge", AMQPValue::LongLongInt(i64::MAX)),
        ("float", AMQPValue::Double(2.5)),
        ("table", AMQPValue::FieldTable(FieldTable::default())),
        ("bool", AMQPValue::Boolean(true)),
    ];
    for (id, v) in &bad {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPTS.into(), v.clone());
        h.insert(headers::ORIGINAL_EXCHANGE.into(), AMQPValue::LongLongInt(5));
        let p = BasicProperties::default()
            .with_message_id((*id).into())
            .with_headers(h);
        f.publish(&f.exchange(), "order.created", b"{}", p).await;
    }
    let dead = f
        .take(&g.dead_queue(), bad.len(), Duration::from_secs(10))
        .await;
    for m in &dead {
        let id = message_id(m);
        assert_eq!(
            header_int(m, headers::ATTEMPTS),
            Some(2),
            "{id}: rewritten valid"
        );
        assert_eq!(
            header_str(m, headers::ORIGINAL_EXCHANGE).as_deref(),
            Some(f.exchange().as_str()),
            "{id}: a malformed original exchange is replaced"
        );
        assert_eq!(
            ledger.count(&id),
            2,
            "{id}: treated as 0, one tier, then dead"
        );
        assert_eq!(ledger.of(&id)[0].attempt, 1);
    }
    assert!(*run.ready.borrow(), "consumer still running");
    run.stop().await;
    assert_eq!(f.count(&g.work_queue()).await, 0);
}

/// A handler that notes each delivery in `started`, takes `time`, notes it
/// in `finished` and succeeds.
fn timed_handler(
    started: &Ledger,
    finished: &Ledger,
    time: Duration,
) -> impl warren_consumer::Handler {
    let (s, d2) = (started.clone(), finished.clone());
    handler_fn(move |d: Delivery| {
        let (s, d2) = (s.clone(), d2.clone());
        async move {
            s.note(&d);
            tokio::time::sleep(time).await;
            d2.note(&d);
            Ok(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_handlers_finish_and_acks_them() {
    let logs = captured_logs();
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let (started, finished) = (Ledger::default(), Ledger::default());
    let run = Running::start(
        g.clone(),
        timed_handler(&started, &finished, Duration::from_millis(700)),
        "consumer-test",
        |b| b.shutdown_grace(Duration::from_secs(5)),
    )
    .await;
    f.publish_numbered("order.created", b"x", "s", 8).await;
    wait_for(Duration::from_secs(5), "all 8 running", || {
        started.len() == 8
    })
    .await;
    let mut ready = run.ready.clone();
    run.cancel.cancel();
    tokio::time::timeout(Duration::from_secs(2), ready.wait_for(|r| !*r))
        .await
        .unwrap()
        .unwrap();
    // Published while the handlers finish: the consumer is cancelled
    // (basic.cancel), so the broker keeps them (8 of the 16 prefetch slots
    // are free: without the cancel it would deliver them).
    tokio::time::sleep(Duration::from_millis(150)).await;
    f.publish_numbered("order.created", b"x", "late", 3).await;
    tokio::time::timeout(Duration::from_secs(10), run.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(finished.len(), 8, "every handler finished");
    assert_eq!(started.len(), 8, "nothing handled twice, nothing new taken");
    let late = f.take(&g.work_queue(), 3, Duration::from_secs(2)).await;
    assert_eq!(
        sorted_ids(&late),
        ["late0", "late1", "late2"],
        "the 8 were acked"
    );
    assert!(
        late.iter().all(|m| !m.delivery.redelivered),
        "the late ones were never delivered to the cancelled consumer"
    );
    assert_eq!(f.count(&g.work_queue()).await, 0);
    assert_no_ack_twice(&logs);
}

/// No delivery was acked twice in this binary so far: the broker closes the
/// channel of a second ack of a delivery tag ("PRECONDITION_FAILED -
/// unknown delivery tag"), which lapin logs, and the consumer logs the
/// next ack on that channel as failed.
fn assert_no_ack_twice(logs: &std::sync::Mutex<Vec<u8>>) {
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("unknown delivery tag") || l.contains("ack failed"))
        .collect();
    assert!(bad.is_empty(), "a delivery was acked twice: {bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_requeues_what_does_not_finish_in_the_grace_period() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let started = Ledger::default();
    let s = started.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let s = s.clone();
            async move {
                s.note(&d);
                if d.message_id() == Some("q0") {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            }
        }),
        "consumer-test",
        |b| {
            b.shutdown_grace(Duration::from_millis(300))
                .handler_timeout(Duration::from_secs(120))
        },
    )
    .await;
    f.publish_numbered("order.created", b"x", "q", 6).await;
    wait_for(Duration::from_secs(5), "all running", || started.len() == 6).await;
    let registry = run.registry.clone();
    assert_eq!(metric(&registry, "warren_in_flight", &[]), 5.0);
    let t0 = Instant::now();
    run.stop().await;
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(
        metric(&registry, "warren_in_flight", &[]),
        0.0,
        "the handlers cut off are no longer counted as running"
    );
    // q0 was acked; the five unfinished went back to the queue.
    let back = f.take(&g.work_queue(), 5, Duration::from_secs(5)).await;
    assert_eq!(sorted_ids(&back), ["q1", "q2", "q3", "q4", "q5"]);
    assert!(back.iter().all(|m| m.delivery.redelivered));
    assert_eq!(f.count(&g.work_queue()).await, 0);
    assert_eq!(f.count(&g.dead_queue()).await, 0);
}

/// Finished deliveries behind an unfinished one (fewer than the straggler
/// threshold, so not yet acked) are acked when the group shuts down: only
/// the unfinished one goes back to the queue, nothing is handled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_acks_what_finished_behind_an_unfinished_delivery() {
    let logs = captured_logs();
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let finished = Ledger::default();
    let d2 = finished.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let d2 = d2.clone();
            async move {
                if d.message_id() == Some("slow") {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                d2.note(&d);
                Ok(())
            }
        }),
        "consumer-test",
        |b| {
            b.shutdown_grace(Duration::from_millis(300))
                .handler_timeout(Duration::from_secs(120))
        },
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"s", props("slow"))
        .await;
    f.publish_numbered("order.created", b"f", "fast-", 5).await;
    wait_for(Duration::from_secs(5), "the fast ones", || {
        finished.len() == 5
    })
    .await;
    run.stop().await;
    assert_eq!(
        f.count(&g.work_queue()).await,
        1,
        "only the unfinished one goes back to the queue"
    );
    let back = f.take(&g.work_queue(), 1, Duration::from_secs(2)).await;
    assert_eq!(message_id(&back[0]), "slow");
    assert!(back[0].delivery.redelivered);
    assert_eq!(finished.len(), 5, "nothing handled twice");
    assert_no_ack_twice(&logs);
}

fn quorum_shutdown(prefetch: u16, concurrency: u16) -> String {
    format!(
        "[[exchange]]\nname = 'orders'\nkind = 'topic'\n\
         [[group]]\nname = 'billing'\nexchange = 'orders'\nbindings = ['order.*']\n\
         queue_type = 'quorum'\ndelivery_limit = 5\nretry = ['200ms']\n\
         prefetch = {prefetch}\nconcurrency = {concurrency}\nhandler_timeout = '1m'\n"
    )
}

/// A quorum queue counts every delivery returned to it toward
/// `delivery_limit`, so the deliveries waiting in the client for a handler
/// when the group shuts down are handled within the grace rather than
/// returned: none goes back, none is handled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_a_quorum_queue_handles_what_was_prefetched() {
    let f = Fixture::new(&quorum_shutdown(20, 2)).await;
    let g = f.group(0);
    let (started, finished) = (Ledger::default(), Ledger::default());
    let run = Running::start(
        g.clone(),
        timed_handler(&started, &finished, Duration::from_millis(50)),
        "consumer-test",
        |b| b.shutdown_grace(Duration::from_secs(10)),
    )
    .await;
    f.publish_numbered("order.created", b"x", "p", 12).await;
    wait_for(Duration::from_secs(5), "the first two running", || {
        started.len() >= 2
    })
    .await;
    assert!(started.len() < 12, "the rest still waits in the client");
    run.stop().await;
    assert_eq!(finished.len(), 12, "every prefetched delivery was handled");
    assert_eq!(started.len(), 12, "nothing handled twice");
    assert!(
        started.0.lock().unwrap().iter().all(|s| !s.redelivered),
        "nothing went back to the queue first"
    );
    assert_eq!(f.count(&g.work_queue()).await, 0, "and all were acked");
}

/// What a team does on every deploy: scale a quorum group down and up while
/// a backlog waits (here each instance lives until it has handled one
/// message, one handler at a time). Each drain used to hand its prefetched
/// deliveries back,
/// the queue counted each return, and after `delivery_limit` drains the same
/// messages were dead-lettered without a handler ever seeing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_a_quorum_group_down_and_up_during_a_backlog_dead_letters_nothing() {
    let f = Fixture::new(&quorum_shutdown(20, 1)).await;
    let g = f.group(0);
    let handled = Ledger::default();
    f.publish_numbered("order.created", b"x", "b", 300).await;
    // delivery_limit is 5: seven drains.
    for round in 1..=8 {
        let h = handled.clone();
        let run = Running::start(
            g.clone(),
            handler_fn(move |d: Delivery| {
                let h = h.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    h.note(&d);
                    Ok(())
                }
            }),
            "consumer-test",
            |b| b.shutdown_grace(Duration::from_secs(10)),
        )
        .await;
        let before = handled.len();
        if round < 8 {
            wait_for(Duration::from_secs(10), "one handled", || {
                handled.len() > before
            })
            .await;
        } else {
            // Until every message is handled or dead-lettered.
            let deadline = Instant::now() + Duration::from_secs(30);
            while handled.len() + (f.count(&g.dead_queue()).await as usize) < 300 {
                assert!(Instant::now() < deadline, "the backlog was not drained");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        run.stop().await;
    }
    assert_eq!(f.count(&g.dead_queue()).await, 0, "nothing dead-lettered");
    assert_eq!(f.count(&g.work_queue()).await, 0);
    let seen = handled.0.lock().unwrap();
    let ids: std::collections::HashSet<&str> = seen.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), 300, "every message handled");
    assert_eq!(seen.len(), 300, "none twice");
}

/// Prefetched deliveries are started at shutdown only while twice the mean
/// handler time fits in the grace left: one that could not finish is
/// returned unstarted, not started and then cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_a_quorum_queue_returns_what_would_not_finish_in_the_grace() {
    let f = Fixture::new(&quorum_shutdown(10, 1)).await;
    let g = f.group(0);
    let (started, finished) = (Ledger::default(), Ledger::default());
    let run = Running::start(
        g.clone(),
        timed_handler(&started, &finished, Duration::from_millis(400)),
        "consumer-test",
        |b| b.shutdown_grace(Duration::from_millis(1000)),
    )
    .await;
    f.publish_numbered("order.created", b"x", "r", 6).await;
    wait_for(Duration::from_secs(5), "the first running", || {
        started.len() == 1
    })
    .await;
    run.stop().await;
    // The first finishes after 400 ms; 600 ms are left, under twice its
    // time, so the next is not started.
    assert_eq!(started.len(), finished.len(), "no handler was cut off");
    assert_eq!(finished.len(), 1);
    // The quorum queue takes the returns in after the channel closed.
    wait_for_count(&f, &g.work_queue(), 5).await;
    assert_eq!(started.len(), 1, "the rest went back unhandled");
    assert_eq!(f.count(&g.dead_queue()).await, 0);
}

/// Deliveries of a queue not yet acked, as the broker counts them.
fn unacked(queue: &str) -> u64 {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_unacknowledged",
        ])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, n)| n.trim().parse().ok())
        .expect("the queue is listed")
}

/// The copies go out on a connection of their own; when it is lost, the
/// next copy opens a new one, and `warren_reconnects_total{component=
/// "consumer"}` counts it like a reconnect of the consuming connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_copies_connection_is_reopened_and_counted() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let component = format!("ctest-{}", unique_prefix().trim_end_matches('.'));
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                l.note(&d);
                if d.attempt() == 1 {
                    return Err(HandlerError::retryable("first attempt fails"));
                }
                Ok(())
            }
        }),
        &component,
        |b| b,
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"x", props("k1"))
        .await;
    wait_for(Duration::from_secs(10), "k1 retried and handled", || {
        ledger.count("k1") == 2
    })
    .await;
    let pids = connection_pids(&format!("warren-{component}-copies@"));
    assert_eq!(pids.len(), 1, "{pids:?}");
    let out = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &pids[0], "test: forced close"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    f.publish(&f.exchange(), "order.created", b"x", props("k2"))
        .await;
    wait_for(Duration::from_secs(20), "k2 retried and handled", || {
        ledger.count("k2") == 2
    })
    .await;
    assert_eq!(
        run.metric("warren_reconnects_total", &[("component", "consumer")]),
        1.0
    );
    run.stop().await;
    assert_eq!(f.count(&g.work_queue()).await, 0);
    assert_eq!(f.count(&g.dead_queue()).await, 0);
}

/// Three groups of one process share one `Broker` (one connection). When
/// the broker closes it, it is opened again once: each group used to drop
/// "the" connection when it noticed its session was lost, and a group that
/// noticed late closed the new connection another group had just opened,
/// so one close cost two or three reconnects of every group (and the
/// deliveries they held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_sharing_a_connection_reopen_it_once_when_it_is_closed() {
    let toml = "[[exchange]]\nname = 'orders'\nkind = 'topic'\n\
        [[group]]\nname = 'a'\nexchange = 'orders'\nbindings = ['#']\nqueue_type = 'classic'\nretry = []\n\
        [[group]]\nname = 'b'\nexchange = 'orders'\nbindings = ['#']\nqueue_type = 'classic'\nretry = []\n\
        [[group]]\nname = 'c'\nexchange = 'orders'\nbindings = ['#']\nqueue_type = 'classic'\nretry = []\n";
    let f = Fixture::new(toml).await;
    let component = format!("ctest-{}", unique_prefix().trim_end_matches('.'));
    let broker = Arc::new(
        warren_topology::Broker::connect(
            warren_topology::ConnectOptions::new(url(), component.as_str()).attempts(3),
        )
        .await
        .unwrap(),
    );
    let registry = prometheus::Registry::new();
    let metrics = warren_consumer::Metrics::register(&registry).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let ledger = Ledger::default();
    let (mut tasks, mut readies) = (Vec::new(), Vec::new());
    for i in 0..3 {
        let l = ledger.clone();
        let group = warren_consumer::ConsumerGroup::builder(
            f.group(i),
            handler_fn(move |d: Delivery| {
                let l = l.clone();
                async move {
                    l.note(&d);
                    Ok(())
                }
            }),
        )
        .metrics(metrics.clone())
        .build()
        .unwrap();
        readies.push(group.ready());
        let (b, c) = (broker.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move { group.run(&b, c).await }));
    }
    let all_ready = |readies: &mut Vec<tokio::sync::watch::Receiver<bool>>| {
        let mut readies = readies.clone();
        async move {
            for r in &mut readies {
                tokio::time::timeout(Duration::from_secs(20), r.wait_for(|r| *r))
                    .await
                    .expect("ready in time")
                    .unwrap();
            }
        }
    };
    all_ready(&mut readies).await;
    assert_eq!(broker.generation(), 1);
    for round in 1..=3u64 {
        // Sessions younger than 5 s reopen after a random backoff, which
        // spreads the groups apart; older ones reopen at once, together.
        tokio::time::sleep(Duration::from_millis(5500)).await;
        let pids = connection_pids(&format!("warren-{component}@"));
        assert_eq!(pids.len(), 1, "{pids:?}");
        let out = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", &pids[0], "test: forced close"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while metric(&registry, "warren_reconnects_total", &[]) < (3 * round) as f64 {
            assert!(
                Instant::now() < deadline,
                "round {round}: no reconnect seen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        all_ready(&mut readies).await;
        // Nothing more may happen: a group closing the new connection would
        // show within a few hundred milliseconds.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            (
                broker.generation(),
                metric(&registry, "warren_reconnects_total", &[])
            ),
            (1 + round, (3 * round) as f64),
            "round {round}: one new connection, each group consuming again once"
        );
    }
    f.publish(&f.exchange(), "order.created", b"x", props("after"))
        .await;
    wait_for(Duration::from_secs(10), "each group handles it", || {
        ledger.count("after") == 3
    })
    .await;
    cancel.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_is_reopened_and_nothing_is_lost() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let component = format!("ctest-{}", unique_prefix().trim_end_matches('.'));
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(3)).await;
                l.note(&d);
                Ok(())
            }
        }),
        &component,
        |b| b,
    )
    .await;
    let n = 400;
    let ids: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let publisher = {
        let ch = f.conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let ex = f.exchange();
        let ids = ids.clone();
        tokio::spawn(async move {
            for id in ids {
                ch.basic_publish(
                    ex.as_str().into(),
                    "order.created".into(),
                    Default::default(),
                    b"x",
                    props(&id),
                )
                .await
                .unwrap()
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    wait_for(Duration::from_secs(10), "flowing", || ledger.len() >= 50).await;
    let pids = connection_pids(&format!("warren-{component}@"));
    assert_eq!(pids.len(), 1, "{pids:?}");
    let out = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &pids[0], "test: forced close"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The reconnect can finish before rabbitmqctl returns, so watch the
    // reconnect counter rather than a transient `ready == false`.
    let deadline = Instant::now() + Duration::from_secs(20);
    while run.metric("warren_reconnects_total", &[("component", "consumer")]) < 1.0 {
        assert!(Instant::now() < deadline, "no reconnect seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ready = run.ready.clone();
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    publisher.await.unwrap();
    wait_for(Duration::from_secs(30), "every id handled", || {
        let seen = ledger.0.lock().unwrap();
        ids.iter().all(|id| seen.iter().any(|s| &s.id == id))
    })
    .await;
    assert_eq!(
        run.metric("warren_reconnects_total", &[("component", "consumer")]),
        1.0
    );
    run.stop().await;
    assert_eq!(f.count(&g.work_queue()).await, 0);
    assert_eq!(f.count(&g.dead_queue()).await, 0);
    assert!(ledger.len() >= n);
}

/// What the process logs, as text (without colours), for every test of
/// this binary from the first call on.
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
        struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Sink(sink.clone()))
            .init();
        logs
    })
    .clone()
}

/// A handler's error is logged as its copy stores it in `x-warren-error`:
/// one line, at most 1 KiB. Handlers pass on what failed (an upstream's
/// response, an exception's text): a multi-line text used to be logged
/// as it was, so that its lines passed for log lines of their own (here
/// a forged ERROR line), and a 100 KB text was logged whole at every
/// attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handlers_error_is_logged_on_one_line_of_at_most_1_kib() {
    let logs = captured_logs();
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let forged = "1999-01-01T00:00:00.000000Z ERROR forged: the database is gone";
    let run = Running::start(
        g.clone(),
        handler_fn(move |_d: Delivery| async move {
            Err(HandlerError::retryable(format!(
                "upstream said:\n{forged}\n{}",
                "x".repeat(100_000)
            )))
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"{}", props("one-line-1"))
        .await;
    let dead = f.take(&g.dead_queue(), 1, Duration::from_secs(10)).await;
    run.stop().await;
    let stored = header_str(&dead[0], headers::ERROR).unwrap();
    assert!(stored.starts_with("upstream said: 1999-01-01T00:00:00.000000Z ERROR forged"));
    assert!(
        stored.len() == 1024,
        "x-warren-error cut to at most 1 KiB: {} bytes",
        stored.len()
    );
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        !text.lines().any(|l| l.starts_with("1999-01-01")),
        "a line of the handler's error passed for a log line"
    );
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("one-line-1") && l.contains("handler failed"))
        .collect();
    assert_eq!(failed.len(), 2, "the retry and the dead letter: {failed:?}");
    for line in failed {
        assert!(line.contains(&stored), "logged as stored: {line}");
        assert!(line.len() < 2048, "{} bytes", line.len());
    }
}

/// A consumer whose user may not read the work queue stops with an error
/// that says which permission to grant and how, as a refused publish does.
/// It said "basic.consume: protocol error: AMQP soft error:
/// ACCESS-REFUSED: ..." and no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_may_not_read_the_work_queue_is_told_which_permission_to_grant() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let user = warren_testkit::TempUser::create();
    warren_testkit::rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", "^$"]);
    let group = warren_consumer::ConsumerGroup::builder(
        g.clone(),
        handler_fn(|_d: Delivery| async { Ok(()) }),
    )
    .build()
    .unwrap();
    let broker = Arc::new(warren_topology::Broker::new(
        warren_topology::ConnectOptions::new(user.url(), "consumer-test").attempts(3),
    ));
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        group.run(&broker, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the group stops at once");
    broker.close().await;
    let e = result.expect_err("refused");
    assert!(!e.is_transient());
    let text = e.to_string();
    let (u, q) = (&user.name, g.work_queue());
    assert!(
        text.starts_with(&format!(
            "consumer group \"{}\": user \"{u}\" may not consume from queue \"{q}\" in vhost \"/\" (ACCESS_REFUSED - access to queue '{q}' in vhost '/' refused for user '{u}'): ",
            g.name
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "the read pattern (the third of rabbitmqctl set_permissions -p / {u} CONFIGURE WRITE READ) must match the queue's name"
        )),
        "{text}"
    );
    assert_eq!(f.count(&q).await, 0);
}

/// `prefetch` bounds the deliveries the broker hands out unacked and
/// `concurrency` the handlers running: with 6 and 3 and a backlog of slow
/// messages, handlers run three at a time (concurrently, never more) while
/// the broker counts at most six deliveries unacked (the other three wait
/// in the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_the_deliveries_and_concurrency_the_handlers_running() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let ledger = Ledger::default();
    let (r, p, l) = (running.clone(), peak.clone(), ledger.clone());
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let (r, p, l) = (r.clone(), p.clone(), l.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(400)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                l.note(&d);
                Ok(())
            }
        }),
        "consumer-test",
        |b| b.prefetch(6).concurrency(3),
    )
    .await;
    let n = 24;
    f.publish_numbered("order.created", b"x", "pc", n).await;
    let (mut most_unacked, mut most_in_flight, mut samples) = (0u64, 0.0f64, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    // Sampled while at least a full window is still waiting.
    while ledger.len() + 9 < n {
        assert!(Instant::now() < deadline, "the backlog was not handled");
        most_unacked = most_unacked.max(unacked(&g.work_queue()));
        most_in_flight = most_in_flight.max(run.metric("warren_in_flight", &[]));
        samples += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(Duration::from_secs(10), "every message handled", || {
        ledger.len() == n
    })
    .await;
    run.stop().await;
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "handlers ran three at a time, never more"
    );
    assert!(most_in_flight <= 3.0, "warren_in_flight {most_in_flight}");
    assert!(samples >= 2, "{samples} samples");
    assert_eq!(
        most_unacked, 6,
        "the broker handed out a full prefetch window and no more"
    );
    assert_eq!(f.count(&g.work_queue()).await, 0);
    for i in 0..n {
        assert_eq!(ledger.count(&format!("pc{i}")), 1);
    }
}

/// Each delivery is handled in a `delivery` span carrying its group,
/// `message_id`, attempt and `redelivered`: what the handler logs, and what
/// the runtime logs of its outcome, name the message and the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_delivery_is_handled_in_a_span_with_its_group_message_id_and_attempt() {
    let logs = captured_logs();
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let ledger = Ledger::default();
    let l = ledger.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let l = l.clone();
            async move {
                tracing::info!("span probe: handling");
                l.note(&d);
                if d.attempt() == 1 {
                    return Err(HandlerError::retryable("span probe fails once"));
                }
                Ok(())
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    f.publish(&f.exchange(), "order.created", b"{}", props("span-1"))
        .await;
    wait_for(Duration::from_secs(10), "handled twice", || {
        ledger.count("span-1") == 2
    })
    .await;
    run.stop().await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let span = |attempt: u32| {
        format!(
            "delivery{{group={} message_id=\"span-1\" attempt={attempt} redelivered=false}}",
            g.name
        )
    };
    let probes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("span probe: handling"))
        .collect();
    assert_eq!(probes.len(), 2, "{probes:?}");
    assert!(probes[0].contains(&span(1)), "{}", probes[0]);
    assert!(probes[1].contains(&span(2)), "{}", probes[1]);
    let retried: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("span probe fails once") && l.contains("retrying later"))
        .collect();
    assert_eq!(retried.len(), 1, "{retried:?}");
    assert!(retried[0].contains(&span(1)), "{}", retried[0]);
}

/// Two groups of one process share one `Metrics`: every series carries its
/// group, and each counts only its own deliveries, outcomes, retries,
/// handler times and handlers running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_counted_per_group_with_the_design_labels() {
    let toml = "[[exchange]]\nname = 'orders'\nkind = 'topic'\n\
        [[group]]\nname = 'billing'\nexchange = 'orders'\nbindings = ['#']\nqueue_type = 'classic'\nretry = ['200ms']\n\
        [[group]]\nname = 'audit'\nexchange = 'orders'\nbindings = ['#']\nqueue_type = 'classic'\nretry = ['200ms']\n";
    let f = Fixture::new(toml).await;
    let (billing, audit) = (f.group(0), f.group(1));
    let registry = prometheus::Registry::new();
    let metrics = warren_consumer::Metrics::register(&registry).unwrap();
    let broker = Arc::new(
        warren_topology::Broker::connect(
            warren_topology::ConnectOptions::new(url(), "consumer-test").attempts(3),
        )
        .await
        .unwrap(),
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let (billed, audited) = (Ledger::default(), Ledger::default());
    let b = billed.clone();
    // billing: m1 fails once then succeeds, m2 fails for good.
    let billing_group = warren_consumer::ConsumerGroup::builder(
        billing.clone(),
        handler_fn(move |d: Delivery| {
            let b = b.clone();
            async move {
                b.note(&d);
                match (d.message_id(), d.attempt()) {
                    (Some("m1"), 1) => Err(HandlerError::retryable("once")),
                    (Some("m2"), _) => Err(HandlerError::permanent("never")),
                    _ => Ok(()),
                }
            }
        }),
    )
    .metrics(metrics.clone())
    .build()
    .unwrap();
    // audit: each takes 150 ms; m2 waits for the gate.
    let (gate, opened) = tokio::sync::watch::channel(false);
    let a = audited.clone();
    let audit_group = warren_consumer::ConsumerGroup::builder(
        audit.clone(),
        handler_fn(move |d: Delivery| {
            let (a, mut opened) = (a.clone(), opened.clone());
            async move {
                if d.message_id() == Some("m2") {
                    let _ = opened.wait_for(|o| *o).await;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
                a.note(&d);
                Ok(())
            }
        }),
    )
    .metrics(metrics)
    .build()
    .unwrap();
    let mut readies = [billing_group.ready(), audit_group.ready()];
    let (br, c) = (broker.clone(), cancel.clone());
    let task_b = tokio::spawn(async move { billing_group.run(&br, c).await });
    let (br, c) = (broker.clone(), cancel.clone());
    let task_a = tokio::spawn(async move { audit_group.run(&br, c).await });
    for r in &mut readies {
        tokio::time::timeout(Duration::from_secs(10), r.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();
    }
    for id in ["m1", "m2"] {
        f.publish(&f.exchange(), "order.created", b"{}", props(id))
            .await;
    }
    let m = |name: &str, labels: &[(&str, &str)]| metric(&registry, name, labels);
    let (bn, an) = (billing.name.as_str(), audit.name.as_str());
    wait_for(
        Duration::from_secs(10),
        "billing done, audit m1 done",
        || {
            m("warren_handled_total", &[("group", bn)]) == 3.0
                && m("warren_handled_total", &[("group", an)]) == 1.0
        },
    )
    .await;
    assert_eq!(m("warren_in_flight", &[("group", an)]), 1.0, "m2 waits");
    assert_eq!(m("warren_in_flight", &[("group", bn)]), 0.0);
    gate.send_replace(true);
    wait_for(Duration::from_secs(10), "audit m2 done", || {
        audited.len() == 2
    })
    .await;
    cancel.cancel();
    task_b.await.unwrap().unwrap();
    task_a.await.unwrap().unwrap();
    broker.close().await;
    assert_eq!(billed.len(), 3);
    for (name, labels, want) in [
        ("warren_deliveries_total", vec![("group", bn)], 3.0),
        ("warren_deliveries_total", vec![("group", an)], 2.0),
        (
            "warren_handled_total",
            vec![("group", bn), ("outcome", "ack")],
            1.0,
        ),
        (
            "warren_handled_total",
            vec![("group", bn), ("outcome", "retry")],
            1.0,
        ),
        (
            "warren_handled_total",
            vec![("group", bn), ("outcome", "dead_letter")],
            1.0,
        ),
        (
            "warren_handled_total",
            vec![("group", an), ("outcome", "ack")],
            2.0,
        ),
        ("warren_handled_total", vec![("group", an)], 2.0),
        (
            "warren_retries_total",
            vec![("group", bn), ("tier", "1")],
            1.0,
        ),
        ("warren_retries_total", vec![("group", an)], 0.0),
        ("warren_handler_seconds_count", vec![("group", bn)], 3.0),
        ("warren_handler_seconds_count", vec![("group", an)], 2.0),
        ("warren_in_flight", vec![("group", bn)], 0.0),
        ("warren_in_flight", vec![("group", an)], 0.0),
        (
            "warren_reconnects_total",
            vec![("component", "consumer")],
            0.0,
        ),
    ] {
        assert_eq!(m(name, &labels), want, "{name} {labels:?}");
    }
    let audit_secs = m("warren_handler_seconds_sum", &[("group", an)]);
    assert!(
        (0.3..5.0).contains(&audit_secs),
        "two handlers of at least 150 ms: {audit_secs} s"
    );
    assert!(
        m("warren_handler_seconds_sum", &[("group", bn)]) < 0.3,
        "billing's handlers return at once"
    );
    // The series that exist, and nothing else named warren_*.
    let names: std::collections::BTreeSet<String> = registry
        .gather()
        .iter()
        .map(|mf| mf.name().to_owned())
        .collect();
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "warren_deliveries_total",
            "warren_handled_total",
            "warren_handler_seconds",
            "warren_in_flight",
            "warren_reconnects_total",
            "warren_retries_total",
        ]
    );
    assert_eq!(f.count(&billing.dead_queue()).await, 1);
    assert_eq!(f.count(&audit.work_queue()).await, 0);
}

/// Channels the broker lists on the connection `pid`.
fn channels_of(pid: &str) -> usize {
    warren_testkit::rabbitmqctl(&["list_channels", "-q", "--no-table-headers", "connection"])
        .lines()
        .filter(|l| l.trim() == pid)
        .count()
}

/// When `run` returns after a shutdown, what the group opened is closed:
/// its consuming channel and the connection of its retry and dead-letter
/// copies. The consuming connection, which other groups of the process may
/// share, stays open until the caller's `Broker::close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_consuming_channel_and_the_copies_connection() {
    let f = Fixture::new(&classic("'200ms'", "")).await;
    let g = f.group(0);
    let component = format!("ctest-{}", unique_prefix().trim_end_matches('.'));
    let ledger = Ledger::default();
    let l = ledger.clone();
    let group = warren_consumer::ConsumerGroup::builder(
        g.clone(),
        handler_fn(move |d: Delivery| {
            l.note(&d);
            async move {
                if d.attempt() == 1 {
                    return Err(HandlerError::retryable("once"));
                }
                Ok(())
            }
        }),
    )
    .build()
    .unwrap();
    let broker = Arc::new(
        warren_topology::Broker::connect(
            warren_topology::ConnectOptions::new(url(), component.as_str()).attempts(3),
        )
        .await
        .unwrap(),
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut ready = group.ready();
    let (b, c) = (broker.clone(), cancel.clone());
    let task = tokio::spawn(async move { group.run(&b, c).await });
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    f.publish(&f.exchange(), "order.created", b"{}", props("cl-1"))
        .await;
    wait_for(Duration::from_secs(10), "retried and handled", || {
        ledger.count("cl-1") == 2
    })
    .await;
    let (consuming, copies) = (
        format!("warren-{component}@"),
        format!("warren-{component}-copies@"),
    );
    let pid = connection_pids(&consuming);
    assert_eq!(pid.len(), 1, "{pid:?}");
    assert_eq!(connection_pids(&copies).len(), 1);
    assert_eq!(channels_of(&pid[0]), 1, "the consuming channel");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
    let closed = warren_testkit::wait_until(Duration::from_secs(3), || {
        let done = connection_pids(&copies).is_empty() && channels_of(&pid[0]) == 0;
        async move { done }
    })
    .await;
    assert!(
        closed,
        "after run returned: copies connections {:?}, consuming channels {}",
        connection_pids(&copies),
        channels_of(&pid[0])
    );
    assert_eq!(
        connection_pids(&consuming),
        pid,
        "the shared connection is the caller's to close"
    );
    broker.close().await;
    let gone = warren_testkit::wait_until(Duration::from_secs(3), || {
        let done = connection_pids(&consuming).is_empty();
        async move { done }
    })
    .await;
    assert!(gone, "Broker::close closed the consuming connection");
    assert_eq!(f.count(&g.work_queue()).await, 0);
}
