//! The operator against the real broker: reading never changes a queue,
//! replay moves exactly what was selected, export → purge → import restores
//! a queue byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use lapin::types::{AMQPValue, DecimalValue, FieldTable};
use support::*;
use tokio_util::sync::CancellationToken;
use warren_operator as op;
use warren_topology::{dead_queue, headers, DEAD_LETTER_EXCHANGE};

fn no_progress(_: op::Progress) {}

fn quick() -> op::ReadOptions {
    op::ReadOptions::default().idle_timeout(std::time::Duration::from_secs(3))
}

#[tokio::test]
async fn fifty_reads_change_nothing_count_order_bodies_properties_headers() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let mut expected = Vec::new();
    for i in 0..30 {
        let kind = ["permanent", "retryable", "timeout"][i % 3];
        let error = format!("order {i} failed with code {}", i * 7);
        let body = format!("{{\"order\":{i}}}");
        expected.push(
            dead_letter(
                &env.conn,
                &env.billing,
                &format!("m{i}"),
                kind,
                &error,
                body.as_bytes(),
                &env.orders,
            )
            .await,
        );
    }
    broker_dead_letter(&env.conn, &env.billing, "rejected-1", b"raw").await;
    wait_count(&env.conn, &dq, 31).await;

    for run in 0..50 {
        if run % 2 == 0 {
            let l = op::list(&env.conn, &env.billing, &quick()).await.unwrap();
            assert_eq!(
                l.coverage,
                op::Coverage {
                    scanned: 31,
                    total: 31,
                    scan_limit_reached: false,
                    consumers: 0,
                    stalled: false,
                }
            );
            let ids: Vec<&str> = l.messages.iter().map(|m| m.info.id.as_str()).collect();
            let mut want: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
            want.push("rejected-1".into());
            assert_eq!(ids, want, "run {run}: order changed");
            let last = l.messages.last().unwrap();
            assert_eq!(last.info.kind, "broker");
            assert!(
                last.info.error.starts_with("rejected in queue"),
                "{}",
                last.info.error
            );
        } else {
            let s = op::stats(&env.conn, &env.billing, &quick()).await.unwrap();
            assert_eq!(s.count, 31);
            assert_eq!(s.by_kind.get("permanent"), Some(&10));
            assert_eq!(s.by_kind.get("broker"), Some(&1));
            // "order N failed with code M" is one failure group per kind.
            assert_eq!(s.failure_groups.len(), 4);
            assert_eq!(s.failure_groups[0].count, 10);
        }
        wait_count(&env.conn, &dq, 31).await;
    }

    let after = drain(&env.conn, &dq).await;
    assert_eq!(after.len(), 31);
    for (i, (want, got)) in expected.iter().zip(&after).enumerate() {
        assert_eq!(want.0, got.0, "body {i}");
        assert_eq!(want.1, got.1, "properties {i}");
    }
    let (body, p) = &after[30];
    assert_eq!(body, b"raw");
    assert!(header(p, headers::X_DEATH).is_some());
}

#[tokio::test]
async fn replay_by_id_moves_exactly_that_message_resetting_attempts() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let mut expected = Vec::new();
    for i in 0..5 {
        expected.push(
            dead_letter(
                &env.conn,
                &env.billing,
                &format!("m{i}"),
                "permanent",
                "boom",
                format!("b{i}").as_bytes(),
                &env.orders,
            )
            .await,
        );
    }
    let sel = op::Selection {
        ids: vec!["m2".into()],
        ..Default::default()
    };
    let metrics = op::Metrics::unregistered();
    let r = op::replay(
        &env.conn,
        &env.billing,
        &sel,
        &op::ReplayOptions {
            read: quick(),
            ..Default::default()
        },
        &metrics,
        &no_progress,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((r.selected, r.replayed, r.failed), (1, 1, 0));
    assert_eq!(r.ids, vec!["m2".to_owned()]);
    assert_eq!(
        metrics
            .replayed
            .with_label_values(&[env.billing.as_str()])
            .get(),
        1
    );

    wait_count(&env.conn, &dq, 4).await;
    let work = drain(&env.conn, &env.billing).await;
    assert_eq!(work.len(), 1);
    let (body, p) = &work[0];
    assert_eq!(body, b"b2");
    assert_eq!(
        header(p, headers::ATTEMPTS),
        Some(&AMQPValue::LongLongInt(0))
    );
    assert_eq!(
        header(p, headers::REPLAYS),
        Some(&AMQPValue::LongLongInt(1))
    );
    // Everything else kept.
    assert_eq!(
        without(p, &[headers::ATTEMPTS, headers::REPLAYS]),
        without(&expected[2].1, &[headers::ATTEMPTS])
    );

    let rest = drain(&env.conn, &dq).await;
    let want: Vec<_> = expected
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(rest, want);
}

#[tokio::test]
async fn filtered_replay_moves_exactly_the_matching_set_and_dry_run_moves_nothing() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let mut expected = Vec::new();
    for i in 0..12 {
        let (kind, error) = if i % 3 == 0 {
            ("timeout", format!("handler ran past {i}s"))
        } else {
            ("permanent", format!("customer {i} not found"))
        };
        expected.push(
            dead_letter(
                &env.conn,
                &env.billing,
                &format!("m{i}"),
                kind,
                &error,
                format!("b{i}").as_bytes(),
                &env.orders,
            )
            .await,
        );
    }
    let sel = op::Selection {
        error: Some(op::Regex::new("not found$").unwrap()),
        kind: Some("permanent".into()),
        ..Default::default()
    };
    let metrics = op::Metrics::unregistered();

    let dry = op::ReplayOptions {
        dry_run: true,
        read: quick(),
        ..Default::default()
    };
    let r = op::replay(
        &env.conn,
        &env.billing,
        &sel,
        &dry,
        &metrics,
        &no_progress,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.selected, 8);
    assert_eq!(r.replayed, 0);
    wait_count(&env.conn, &dq, 12).await;
    assert_eq!(count(&env.conn, &env.billing).await, 0);
    assert_eq!(peek_all(&env.conn, &dq).await, expected);

    // A purge that is prepared and then aborted deletes nothing either.
    let pending = op::prepare_purge(&env.conn, &env.billing, &sel, &quick(), None)
        .await
        .unwrap();
    assert_eq!(pending.count(), 8);
    pending.abort().await.unwrap();
    wait_count(&env.conn, &dq, 12).await;

    let r = op::replay(
        &env.conn,
        &env.billing,
        &sel,
        &op::ReplayOptions {
            read: quick(),
            ..Default::default()
        },
        &metrics,
        &no_progress,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((r.selected, r.replayed), (8, 8));
    wait_count(&env.conn, &dq, 4).await;
    let moved: Vec<Vec<u8>> = drain(&env.conn, &env.billing)
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    let want: Vec<Vec<u8>> = (0..12)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("b{i}").into_bytes())
        .collect();
    assert_eq!(moved, want);
    let rest = drain(&env.conn, &dq).await;
    let want: Vec<_> = expected
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(rest, want);
}

#[tokio::test]
async fn to_original_goes_through_the_original_exchange() {
    let env = setup().await;
    dead_letter(
        &env.conn,
        &env.billing,
        "m0",
        "permanent",
        "boom",
        b"x",
        &env.orders,
    )
    .await;
    let sel = op::Selection {
        all: true,
        ..Default::default()
    };
    let opts = op::ReplayOptions {
        target: op::Target::Original,
        read: quick(),
        ..Default::default()
    };
    let r = op::replay(
        &env.conn,
        &env.billing,
        &sel,
        &opts,
        &op::Metrics::unregistered(),
        &no_progress,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.replayed, 1);
    // Both groups bound to "order.created" on the original exchange get it.
    wait_count(&env.conn, &env.billing, 1).await;
    wait_count(&env.conn, &env.shipping, 1).await;
    assert_eq!(count(&env.conn, &dead_queue(&env.billing)).await, 0);
}

#[tokio::test]
async fn export_purge_archive_import_restores_the_queue_byte_for_byte() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    // A non-UTF-8 body.
    dead_letter(
        &env.conn,
        &env.billing,
        "bin",
        "decode",
        "invalid utf-8",
        &[0xff, 0x00, 0xfe, 0x80],
        &env.orders,
    )
    .await;
    // Nested tables, arrays and every integer width.
    let mut h = warren_headers(
        &env.billing,
        "permanent",
        "nested",
        "order.paid",
        &env.orders,
    );
    let mut inner = FieldTable::default();
    inner.insert(
        "deeper".into(),
        AMQPValue::FieldTable({
            let mut t = FieldTable::default();
            t.insert("n".into(), AMQPValue::ShortInt(-3));
            t
        }),
    );
    inner.insert(
        "list".into(),
        AMQPValue::FieldArray(
            vec![
                AMQPValue::LongInt(1),
                AMQPValue::LongString("two".into()),
                AMQPValue::Boolean(false),
            ]
            .into(),
        ),
    );
    h.insert("nested".into(), AMQPValue::FieldTable(inner));
    h.insert("i8".into(), AMQPValue::ShortShortInt(-8));
    h.insert("u8".into(), AMQPValue::ShortShortUInt(8));
    h.insert("u16".into(), AMQPValue::ShortUInt(65000));
    h.insert("u32".into(), AMQPValue::LongUInt(4_000_000_000));
    h.insert("f64".into(), AMQPValue::Double(2.5));
    h.insert("f32".into(), AMQPValue::Float(0.25));
    h.insert(
        "dec".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 1999,
        }),
    );
    h.insert("ts".into(), AMQPValue::Timestamp(1_700_000_123));
    h.insert(
        "bytes".into(),
        AMQPValue::ByteArray(vec![0u8, 1, 255].into()),
    );
    h.insert("void".into(), AMQPValue::Void);
    let p = props("nested", h)
        .with_priority(4)
        .with_correlation_id("corr".into())
        .with_reply_to("replies".into())
        .with_type("order".into())
        .with_app_id("billing-svc".into())
        .with_content_encoding("identity".into());
    publish(
        &env.conn,
        DEAD_LETTER_EXCHANGE,
        &env.billing,
        b"{\"a\":[1,2]}",
        p,
    )
    .await;
    // A non-Rust client (librabbitmq's amqp-publish).
    let out = std::process::Command::new("amqp-publish")
        .args([
            "-u",
            url().expose(),
            "-e",
            DEAD_LETTER_EXCHANGE,
            "-r",
            &env.billing,
            "-p",
            "-C",
            "text/plain",
            "-H",
            "x-warren-error-kind: permanent",
            "-H",
            "x-warren-error: from C",
            "-b",
            "hello from C",
        ])
        .output()
        .expect("amqp-publish (Debian package amqp-tools) is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And one the broker dead-lettered.
    broker_dead_letter(&env.conn, &env.billing, "rej", b"rejected body").await;
    wait_count(&env.conn, &dq, 4).await;
    let start = peek_all(&env.conn, &dq).await;
    assert_eq!(start.len(), 4);
    wait_count(&env.conn, &dq, 4).await;

    let dir = std::env::temp_dir().join(format!("warren-op-{}", env.prefix.trim_end_matches('.')));
    std::fs::create_dir_all(&dir).unwrap();
    let export_file = dir.join("export.jsonl");
    let archive_file = dir.join("archive.jsonl");
    let _ = std::fs::remove_file(&export_file);
    let _ = std::fs::remove_file(&archive_file);

    let mut w = op::ExportWriter::create_new(&export_file).unwrap();
    let r = op::export(&env.conn, &env.billing, &mut w, false, &quick())
        .await
        .unwrap();
    assert_eq!(r.exported, 4);
    wait_count(&env.conn, &dq, 4).await;
    let text = std::fs::read_to_string(&export_file).unwrap();
    assert!(text
        .lines()
        .next()
        .unwrap()
        .contains("\"body_encoding\":\"base64\""));

    let mut archive = op::ExportWriter::create_new(&archive_file).unwrap();
    let pending = op::prepare_purge(
        &env.conn,
        &env.billing,
        &op::Selection {
            all: true,
            ..Default::default()
        },
        &quick(),
        Some(&mut archive),
    )
    .await
    .unwrap();
    assert_eq!(pending.count(), 4);
    let purged = pending.commit(Some(&mut archive)).await.unwrap();
    assert_eq!(purged.purged, 4);
    wait_count(&env.conn, &dq, 0).await;
    assert_eq!(
        std::fs::read_to_string(&archive_file).unwrap(),
        text,
        "archive = export"
    );

    let messages = op::read_export(&archive_file).unwrap();
    assert_eq!(messages.lines(), [1, 2, 3, 4]);
    let r = op::import(&env.conn, &messages, None, Some("guest"), &quick())
        .await
        .unwrap();
    assert_eq!(r.total, 4);
    wait_count(&env.conn, &dq, 4).await;
    let end = drain(&env.conn, &dq).await;
    assert_eq!(end, start);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn cancel_mid_replay_settles_every_copy_in_flight_and_acks_exactly_those() {
    const N: usize = 300;
    const STOP_AT: usize = 100;
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let ch = env.conn.create_channel().await.unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in 0..N {
        let p = props(
            &format!("m{i}"),
            warren_headers(
                &env.billing,
                "permanent",
                "boom",
                "order.created",
                &env.orders,
            ),
        );
        confirms.push(
            ch.basic_publish(
                DEAD_LETTER_EXCHANGE.into(),
                env.billing.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                format!("b{i}").as_bytes(),
                p,
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    wait_count(&env.conn, &dq, N as u32).await;

    // The window (256) is larger than STOP_AT and nothing is settled before
    // it fills, so when the stop comes all STOP_AT copies await their
    // confirm: a clean stop settles every one and acks its dead letter.
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let progress = move |p: op::Progress| {
        if p.selected >= STOP_AT {
            stop.cancel();
        }
    };
    let r = op::replay(
        &env.conn,
        &env.billing,
        &op::Selection {
            all: true,
            ..Default::default()
        },
        &op::ReplayOptions {
            read: quick(),
            ..Default::default()
        },
        &op::Metrics::unregistered(),
        &progress,
        &cancel,
    )
    .await
    .unwrap();
    assert!(r.stopped_early);
    assert_eq!((r.selected, r.replayed, r.failed), (STOP_AT, STOP_AT, 0));
    let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(r.ids, want[..STOP_AT]);

    wait_count(&env.conn, &dq, (N - STOP_AT) as u32).await;
    let id = |m: &(Vec<u8>, lapin::BasicProperties)| m.1.message_id().as_ref().unwrap().to_string();
    let work: Vec<String> = drain(&env.conn, &env.billing)
        .await
        .iter()
        .map(id)
        .collect();
    assert_eq!(work, want[..STOP_AT], "copies: once each, in order");
    let rest: Vec<String> = drain(&env.conn, &dq).await.iter().map(id).collect();
    assert_eq!(rest, want[STOP_AT..], "the rest stays, in order");
}

/// Dead letters written while the consumer still copied the quorum work
/// queue's `x-delivery-count` (and a message's `expiration`) are read like
/// any other, and a replay drops both.
#[tokio::test]
async fn dead_letters_carrying_a_delivery_count_are_read_and_replayed_without_it() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let mut h = warren_headers(
        &env.billing,
        "permanent",
        "boom",
        "order.created",
        &env.orders,
    );
    h.insert(headers::DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
    let p = props("dc-1", h).with_expiration("600000".into());
    publish(&env.conn, DEAD_LETTER_EXCHANGE, &env.billing, b"{}", p).await;
    wait_count(&env.conn, &dq, 1).await;

    let l = op::list(&env.conn, &env.billing, &quick()).await.unwrap();
    assert_eq!(l.messages.len(), 1);
    assert_eq!(l.messages[0].info.id, "dc-1");
    wait_count(&env.conn, &dq, 1).await;

    let sel = op::Selection {
        ids: vec!["dc-1".into()],
        ..Default::default()
    };
    let r = op::replay(
        &env.conn,
        &env.billing,
        &sel,
        &op::ReplayOptions {
            read: quick(),
            ..Default::default()
        },
        &op::Metrics::unregistered(),
        &no_progress,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((r.selected, r.replayed, r.failed), (1, 1, 0));
    let work = drain(&env.conn, &env.billing).await;
    assert_eq!(work.len(), 1);
    let (_, rp) = &work[0];
    assert_eq!(rp.expiration(), &None);
    assert_eq!(header(rp, headers::DELIVERY_COUNT), None);
    assert_eq!(count(&env.conn, &dq).await, 0);
}

/// A queue in a dead-letter queue's place that is not the classic queue
/// warren declares (here a quorum queue, which counts every read against a
/// delivery limit) is refused before anything is read.
#[tokio::test]
async fn a_quorum_queue_in_a_dead_queues_place_is_refused_and_left_untouched() {
    let group = format!("{}rogue", unique_prefix());
    let dq = dead_queue(&group);
    let _guard = Guard::empty().queue(&dq);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(2));
    ch.queue_declare(
        dq.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    publish(&conn, "", &dq, b"{}", props("q-1", FieldTable::default())).await;
    wait_count(&conn, &dq, 1).await;

    for _ in 0..3 {
        match op::list(&conn, &group, &quick()).await {
            Err(e @ op::OperatorError::NotADeadQueue { .. }) => {
                let text = e.to_string();
                assert!(text.contains("x-queue-type"), "{text}");
                assert!(text.contains("warren topology verify"), "{text}");
            }
            other => panic!("expected NotADeadQueue, got {other:?}"),
        }
    }
    // Never delivered: still there, its delivery limit untouched.
    wait_count(&conn, &dq, 1).await;
    let got = ch
        .basic_get(dq.as_str().into(), Default::default())
        .await
        .unwrap()
        .expect("still in the queue");
    assert!(!got.delivery.redelivered, "never delivered before");
}

/// An import whose file names a group without a dead-letter queue sends
/// nothing at all (before: the lines before it were imported and the error
/// said nothing about them, so running it again duplicated them).
#[tokio::test]
async fn an_import_naming_a_missing_group_sends_nothing() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    for i in 0..3 {
        dead_letter(
            &env.conn,
            &env.billing,
            &format!("i{i}"),
            "permanent",
            "boom",
            b"{}",
            &env.orders,
        )
        .await;
    }
    wait_count(&env.conn, &dq, 3).await;
    let dir = std::env::temp_dir().join(format!(
        "warren-op-imp-{}",
        env.prefix.trim_end_matches('.')
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("export.jsonl");
    let _ = std::fs::remove_file(&file);
    let mut w = op::ExportWriter::create_new(&file).unwrap();
    op::export(&env.conn, &env.billing, &mut w, true, &quick())
        .await
        .unwrap();
    drop(w);
    wait_count(&env.conn, &dq, 0).await;
    let mut messages = op::read_export(&file).unwrap();
    assert_eq!(messages.len(), 3);
    messages.messages_mut()[2].group = format!("{}nosuch", env.prefix);
    match op::import(&env.conn, &messages, None, Some("guest"), &quick()).await {
        Err(op::OperatorError::NoSuchQueue { queue }) => {
            assert_eq!(queue, dead_queue(&messages.messages()[2].group));
        }
        other => panic!("expected NoSuchQueue, got {other:?}"),
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(count(&env.conn, &dq).await, 0, "nothing was imported");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A dead letter its service published with its own `user_id` (here
/// `guest`), as it reached the dead-letter queue.
async fn dead_letter_of_guest(env: &Env, id: &str) -> lapin::BasicProperties {
    let p = props(
        id,
        warren_headers(
            &env.billing,
            "permanent",
            "boom",
            "order.created",
            &env.orders,
        ),
    )
    .with_user_id("guest".into());
    publish(
        &env.conn,
        DEAD_LETTER_EXCHANGE,
        &env.billing,
        b"{}",
        p.clone(),
    )
    .await;
    p
}

/// The copy a replay should publish of `dead` (attempts 0, replays 1),
/// with `user_id` set to `user_id`.
fn replayed(dead: &lapin::BasicProperties, user_id: &str) -> lapin::BasicProperties {
    let mut h = dead.headers().clone().unwrap_or_default();
    h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(0));
    h.insert(headers::REPLAYS.into(), AMQPValue::LongLongInt(1));
    dead.clone().with_headers(h).with_user_id(user_id.into())
}

/// An operator logged in as another user than the service that published
/// the dead letter: the broker refuses a `user_id` that is not the login
/// (closing the channel), so the copy goes without it, to either target,
/// and the dead letter leaves its queue.
#[tokio::test]
async fn a_replay_by_another_login_drops_the_user_id_and_removes_the_dead_letter() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let user = warren_testkit::TempUser::create();
    let operator = connect_as(user.url()).await;
    for (id, target, queues) in [
        ("uid-work", op::Target::WorkQueue, vec![&env.billing]),
        (
            "uid-original",
            op::Target::Original,
            vec![&env.billing, &env.shipping],
        ),
    ] {
        let dead = dead_letter_of_guest(&env, id).await;
        wait_count(&env.conn, &dq, 1).await;
        let r = op::replay(
            &operator,
            &env.billing,
            &op::Selection {
                ids: vec![id.into()],
                ..Default::default()
            },
            &op::ReplayOptions {
                target,
                read: quick(),
                login: user.url().login(),
                ..Default::default()
            },
            &op::Metrics::unregistered(),
            &no_progress,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            (r.selected, r.replayed, r.failed, r.user_id_dropped),
            (1, 1, 0, 1),
            "{target:?}: {:?}",
            r.errors
        );
        wait_count(&env.conn, &dq, 0).await;
        for q in queues {
            wait_count(&env.conn, q, 1).await;
            let got = drain(&env.conn, q).await;
            let (body, p) = &got[0];
            assert_eq!(body, b"{}");
            assert_eq!(p.user_id(), &None, "{target:?} into {q}");
            // All else as a replay by guest would have it.
            assert_eq!(
                p.clone().with_user_id("guest".into()),
                replayed(&dead, "guest"),
                "{target:?} into {q}"
            );
        }
    }
}

/// The login that published the dead letter replays it: its `user_id` is
/// the login's own, so the copy keeps it.
#[tokio::test]
async fn a_replay_by_the_same_login_keeps_the_user_id() {
    let env = setup().await;
    let dead = dead_letter_of_guest(&env, "uid-same").await;
    wait_count(&env.conn, &dead_queue(&env.billing), 1).await;
    let r = op::replay(
        &env.conn,
        &env.billing,
        &op::Selection {
            all: true,
            ..Default::default()
        },
        &op::ReplayOptions {
            read: quick(),
            login: Some("guest".into()),
            ..Default::default()
        },
        &op::Metrics::unregistered(),
        &no_progress,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (r.replayed, r.failed, r.user_id_dropped),
        (1, 0, 0),
        "{:?}",
        r.errors
    );
    wait_count(&env.conn, &env.billing, 1).await;
    let got = drain(&env.conn, &env.billing).await;
    assert_eq!(got[0].1, replayed(&dead, "guest"));
    assert_eq!(count(&env.conn, &dead_queue(&env.billing)).await, 0);
}

/// An export of a dead letter that carries its service's `user_id`,
/// imported by another login: it goes back without the `user_id`, every
/// other property and header as exported.
#[tokio::test]
async fn an_import_by_another_login_drops_the_user_id() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let dead = dead_letter_of_guest(&env, "uid-import").await;
    wait_count(&env.conn, &dq, 1).await;
    let dir = std::env::temp_dir().join(format!(
        "warren-op-uid-{}",
        env.prefix.trim_end_matches('.')
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("export.jsonl");
    let _ = std::fs::remove_file(&file);
    let mut w = op::ExportWriter::create_new(&file).unwrap();
    op::export(&env.conn, &env.billing, &mut w, true, &quick())
        .await
        .unwrap();
    drop(w);
    wait_count(&env.conn, &dq, 0).await;
    let messages = op::read_export(&file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        messages.messages()[0].properties.user_id.as_deref(),
        Some("guest")
    );

    let user = warren_testkit::TempUser::create();
    let operator = connect_as(user.url()).await;
    let login = user.url().login();
    let r = op::import(&operator, &messages, None, login.as_deref(), &quick())
        .await
        .unwrap();
    assert_eq!((r.total, r.user_id_dropped), (1, 1));
    wait_count(&env.conn, &dq, 1).await;
    let got = drain(&env.conn, &dq).await;
    assert_eq!(got[0].1.user_id(), &None);
    assert_eq!(got[0].1.clone().with_user_id("guest".into()), dead);
}

/// A purge archive on standard output is refused by the library itself
/// (not only by the CLI): at prepare, before anything is read or written,
/// and at commit, where it deletes nothing; so is an export that removes.
/// The queue stays as it was.
#[tokio::test]
async fn a_purge_archive_or_a_removing_export_on_standard_output_is_refused_and_deletes_nothing() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let mut expected = Vec::new();
    for i in 0..3 {
        expected.push(
            dead_letter(
                &env.conn,
                &env.billing,
                &format!("s{i}"),
                "permanent",
                "boom",
                b"{}",
                &env.orders,
            )
            .await,
        );
    }
    wait_count(&env.conn, &dq, 3).await;
    let all = op::Selection {
        all: true,
        ..Default::default()
    };
    let refused = |e: op::OperatorError| match e {
        op::OperatorError::CopyNotStored { .. } => assert_eq!(
            e.to_string(),
            "the archive of a purge cannot go to standard output: dead letters are deleted \
             only once their copy is on disk, and nothing tells whether what is written to \
             standard output was stored; write it to a file"
        ),
        other => panic!("expected CopyNotStored, got {other:?}"),
    };

    let mut stdout = op::ExportWriter::stdout();
    match op::prepare_purge(&env.conn, &env.billing, &all, &quick(), Some(&mut stdout)).await {
        Err(e) => refused(e),
        Ok(p) => {
            let n = p.count();
            let _ = p.abort().await;
            panic!("prepared a purge of {n} with its archive on standard output");
        }
    }
    assert_eq!(stdout.written(), 0, "nothing was written");

    let pending = op::prepare_purge(&env.conn, &env.billing, &all, &quick(), None)
        .await
        .unwrap();
    assert_eq!(pending.count(), 3);
    match pending.commit(Some(&mut stdout)).await {
        Err(e) => refused(e),
        Ok(r) => panic!("purged {} with its archive on standard output", r.purged),
    }
    // An export that would remove what it wrote there is refused the same way.
    match op::export(&env.conn, &env.billing, &mut stdout, true, &quick()).await {
        Err(op::OperatorError::CopyNotStored { what }) => {
            assert_eq!(what, "an export that removes what it exported")
        }
        other => panic!("expected CopyNotStored, got {other:?}"),
    }
    wait_count(&env.conn, &dq, 3).await;
    assert_eq!(peek_all(&env.conn, &dq).await, expected);
}

/// `n` dead letters `{tag}{i:02}` in billing's dead-letter queue, and
/// their ids.
async fn numbered_dead_letters(env: &Env, tag: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}{i:02}")).collect();
    for id in &ids {
        dead_letter(
            &env.conn,
            &env.billing,
            id,
            "permanent",
            "boom",
            b"{}",
            &env.orders,
        )
        .await;
    }
    wait_count(&env.conn, &dead_queue(&env.billing), n as u32).await;
    ids
}

/// A replay whose connection is closed after it moved `K` dead letters
/// (one copy in flight at a time, and the broker asked to confirm each
/// ack: the broker has confirmed their acks before the close): the
/// result is its report, not a bare error, and it names exactly the `K`
/// moved, with what stopped it. Nothing is lost: the copies are in the
/// work queue, the rest are still dead letters, in order. (Before:
/// `Err(closing the scan channel ...)`, the `K` moved reported nowhere.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_connection_is_closed_midway_reports_exactly_what_it_moved() {
    const N: usize = 12;
    const K: usize = 5;
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let ids = numbered_dead_letters(&env, "r", N).await;
    // A user of its own: its connection is the only one closed.
    let user = warren_testkit::TempUser::create();
    let operator = connect_as(user.url()).await;
    let closed = std::sync::atomic::AtomicBool::new(false);
    let progress = |p: op::Progress| {
        if p.replayed == K && !closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            wait_held(&dq, (N - K) as u64);
            close_connections_of(&user.name);
        }
    };
    let metrics = op::Metrics::unregistered();
    let r = op::replay(
        &operator,
        &env.billing,
        &op::Selection {
            all: true,
            ..Default::default()
        },
        &op::ReplayOptions {
            read: quick(),
            window: 1,
            sync_every: 1,
            ..Default::default()
        },
        &metrics,
        &progress,
        &CancellationToken::new(),
    )
    .await
    .expect("a run that stopped partway is a report");
    assert_eq!(r.replayed, K, "{r:?}");
    assert_eq!(r.ids, ids[..K]);
    assert!(r.not_removed.is_empty(), "{r:?}");
    assert!(r.unconfirmed.is_empty(), "{r:?}");
    assert_eq!(r.selected, r.replayed + r.failed, "{r:?}");
    assert!(r.stopped_early);
    let error = r.error.as_deref().expect("what stopped it");
    assert!(
        error.starts_with("the connection to the broker was lost ("),
        "{error}"
    );
    assert_eq!(
        metrics
            .replayed
            .with_label_values(&[env.billing.as_str()])
            .get(),
        K as u64
    );
    wait_count(&env.conn, &dq, (N - K) as u32).await;
    assert_eq!(take_ids(&env.conn, &env.billing).await, ids[..K]);
    assert_eq!(take_ids(&env.conn, &dq).await, ids[K..]);
}

/// A long replay whose connection is lost late: the dead letters whose
/// acks the broker confirmed at the sync points before the loss (asked
/// every `SYNC` acks) stay replayed, and only those acked since are
/// unconfirmed. What the report says holds on the broker: every dead
/// letter it names as replayed is gone from the dead-letter queue and
/// has its copy in the work queue, every one it names as unconfirmed or
/// not removed has its copy there, and nothing is lost. (A replay that
/// took only the close of its scan's channel as the broker's word would
/// report none replayed here, after 2 000 dead letters were moved.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_connection_is_lost_late_keeps_what_the_broker_confirmed_before() {
    const N: usize = 3_000;
    const SYNC: usize = 500;
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let ids = many_dead_letters(&env, "z", N).await;
    let user = warren_testkit::TempUser::create();
    let operator = connect_as(user.url()).await;
    let closed = std::sync::atomic::AtomicBool::new(false);
    // Blocks the replay (the callback runs in it) while the broker closes
    // the connection.
    let progress = |p: op::Progress| {
        if p.replayed >= 2 * SYNC && !closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            close_connections_of(&user.name);
        }
    };
    let r = op::replay(
        &operator,
        &env.billing,
        &op::Selection {
            all: true,
            ..Default::default()
        },
        &op::ReplayOptions {
            read: quick(),
            sync_every: SYNC,
            ..Default::default()
        },
        &op::Metrics::unregistered(),
        &progress,
        &CancellationToken::new(),
    )
    .await
    .expect("a run that stopped partway is a report");
    let summary = format!(
        "replayed {}, unconfirmed {}, not removed {}, failed {}, selected {}: {:?}",
        r.replayed,
        r.unconfirmed.len(),
        r.not_removed.len(),
        r.failed,
        r.selected,
        r.error
    );
    assert!(
        closed.load(std::sync::atomic::Ordering::SeqCst),
        "{summary}"
    );
    assert!(r.replayed >= 2 * SYNC, "{summary}");
    assert!(r.replayed < N, "{summary}");
    assert!(r.error.is_some() && r.stopped_early, "{summary}");
    assert_eq!(
        r.selected,
        r.replayed + r.unconfirmed.len() + r.not_removed.len() + r.failed,
        "{summary}"
    );
    // Acked in order: the replayed first, then the unconfirmed.
    assert_eq!(r.ids, ids[..r.replayed], "{summary}");
    assert_eq!(
        r.unconfirmed,
        ids[r.replayed..r.replayed + r.unconfirmed.len()],
        "{summary}"
    );
    // The closed connection's unacked dead letters are back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while u64::from(count(&env.conn, &dq).await) != tokio::task::block_in_place(|| held(&dq)) {
        assert!(
            std::time::Instant::now() < deadline,
            "still unacked: {summary}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let work: std::collections::HashSet<String> = take_ids(&env.conn, &env.billing)
        .await
        .into_iter()
        .collect();
    let dead: std::collections::HashSet<String> =
        take_ids(&env.conn, &dq).await.into_iter().collect();
    for id in &r.ids {
        assert!(work.contains(id), "{id}: replayed, no copy: {summary}");
        assert!(
            !dead.contains(id),
            "{id}: replayed, still a dead letter: {summary}"
        );
    }
    for id in r.unconfirmed.iter().chain(&r.not_removed) {
        assert!(work.contains(id), "{id}: copied, no copy: {summary}");
    }
    for id in &ids {
        assert!(
            work.contains(id) || dead.contains(id),
            "{id} lost: {summary}"
        );
    }
}

/// The connection is closed once `K` copies are confirmed and before any
/// of their dead letters is acked (a whole window in flight): the report
/// names them as copied and not removed or unconfirmed (a second replay
/// duplicates them), none as replayed. The copies are in the work queue and every
/// dead letter is back in its queue, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_confirmed_when_the_connection_is_lost_are_reported_as_not_removed() {
    const N: usize = 10;
    const K: usize = 4;
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let ids = numbered_dead_letters(&env, "w", N).await;
    let user = warren_testkit::TempUser::create();
    let operator = connect_as(user.url()).await;
    let closed = std::sync::atomic::AtomicBool::new(false);
    let progress = |p: op::Progress| {
        if p.selected == K && !closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            assert_eq!(p.replayed, 0, "nothing is settled before the window fills");
            wait_confirms_sent(&user.name);
            close_connections_of(&user.name);
        }
    };
    let r = op::replay(
        &operator,
        &env.billing,
        &op::Selection {
            all: true,
            ..Default::default()
        },
        &op::ReplayOptions {
            read: quick(),
            window: N,
            ..Default::default()
        },
        &op::Metrics::unregistered(),
        &progress,
        &CancellationToken::new(),
    )
    .await
    .expect("a run that stopped partway is a report");
    assert_eq!(r.replayed, 0, "{r:?}");
    assert!(r.ids.is_empty());
    // Not removed (the ack failed), or unconfirmed when warren acked before
    // it read the broker's close (the broker dropped those acks): copied
    // either way, and never counted as replayed.
    let mut copied: Vec<String> = r
        .not_removed
        .iter()
        .chain(&r.unconfirmed)
        .cloned()
        .collect();
    copied.sort();
    let mut want = ids[..K].to_vec();
    want.sort();
    assert_eq!(copied, want, "{r:?}");
    assert_eq!(r.selected, K + r.failed, "{r:?}");
    assert!(r.stopped_early);
    assert!(r.error.is_some());
    wait_count(&env.conn, &dq, N as u32).await;
    assert_eq!(take_ids(&env.conn, &env.billing).await, ids[..K]);
    assert_eq!(take_ids(&env.conn, &dq).await, ids);
}

/// A dead-letter queue in a group's place that the broker keeps to 3
/// messages and refuses (nacks) publishes beyond: the queue an import of
/// more fills, deterministically, partway.
async fn capped_dead_queue(env: &Env, max: i64) -> (String, Guard) {
    let group = format!("{}capped", env.prefix);
    let dq = dead_queue(&group);
    let guard = Guard::empty().queue(&dq);
    let ch = env.conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        dq.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let _ = ch.close(200, "ok".into()).await;
    (group, guard)
}

/// An export of billing's dead letters (removed from the queue), written
/// with a blank line after the `blank_after`th message, read back.
async fn exported_with_a_blank_line(env: &Env, blank_after: usize) -> op::ExportFile {
    let dir = std::env::temp_dir().join(format!(
        "warren-op-resume-{}",
        env.prefix.trim_end_matches('.')
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("export.jsonl");
    let _ = std::fs::remove_file(&file);
    let mut w = op::ExportWriter::create_new(&file).unwrap();
    op::export(&env.conn, &env.billing, &mut w, true, &quick())
        .await
        .unwrap();
    drop(w);
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(blank_after, "");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let export = op::read_export(&file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    export
}

/// An import the broker nacks after 3 messages (a length-limited queue
/// that rejects publishes) stops, and says which lines were imported (in
/// the queue) and which were not, with each refused message's line and id;
/// skipping the lines it names imports the rest, and in the end every
/// message was imported exactly once. (Before: `Err(Publish nacked)`, the
/// 3 imported reported nowhere, and running it again duplicated them.)
#[tokio::test]
async fn an_import_nacked_partway_names_the_lines_imported_and_resumes_without_duplicates() {
    let env = setup().await;
    let ids = numbered_dead_letters(&env, "c", 8).await;
    let (group, _guard) = capped_dead_queue(&env, 3).await;
    let dq = dead_queue(&group);
    // Lines 1-4, a blank line 5, lines 6-9.
    let export = exported_with_a_blank_line(&env, 4).await;
    assert_eq!(export.lines(), [1, 2, 3, 4, 6, 7, 8, 9]);

    let nacked = |line: usize, id: &str| op::ImportFailure {
        line,
        id: id.to_owned(),
        queue: dq.clone(),
        error: format!("publish to exchange \"\" with routing key {dq:?} was nacked by the broker"),
    };
    let lines = |ranges: &[(usize, usize)]| -> Vec<op::Lines> {
        ranges
            .iter()
            .map(|&(first, last)| op::Lines { first, last })
            .collect()
    };
    let incomplete = |r: Result<op::ImportReport, op::OperatorError>| match r {
        Err(op::OperatorError::ImportIncomplete { report, source }) => {
            assert!(
                matches!(*source, op::OperatorError::Publish { ref outcome, .. } if outcome == "nacked"),
                "{source:?}"
            );
            *report
        }
        other => panic!("expected ImportIncomplete, got {other:?}"),
    };

    let r = incomplete(op::import(&env.conn, &export, Some(&group), Some("guest"), &quick()).await);
    assert_eq!((r.messages, r.total, r.failed, r.not_sent), (8, 3, 5, 0));
    assert_eq!(r.imported.get(&dq), Some(&3));
    assert_eq!(r.imported_lines, lines(&[(1, 3)]));
    assert_eq!(r.not_imported_lines, lines(&[(4, 9)]));
    assert_eq!(
        r.failures,
        [
            nacked(4, &ids[3]),
            nacked(6, &ids[4]),
            nacked(7, &ids[5]),
            nacked(8, &ids[6]),
            nacked(9, &ids[7]),
        ]
    );
    assert_eq!(r.resume_skip, Some(3));
    assert!(r.imported_after_resume().is_empty());
    wait_count(&env.conn, &dq, 3).await;
    let mut got = take_ids(&env.conn, &dq).await;
    assert_eq!(got, ids[..3]);

    // Resume: lines 4 to 9 left; the queue takes 3 more.
    let rest = export.clone().skip_lines(3);
    let r = incomplete(op::import(&env.conn, &rest, Some(&group), Some("guest"), &quick()).await);
    assert_eq!((r.messages, r.total, r.failed), (5, 3, 2));
    assert_eq!(r.imported_lines, lines(&[(4, 7)]));
    assert_eq!(r.not_imported_lines, lines(&[(8, 9)]));
    assert_eq!(r.resume_skip, Some(7));
    wait_count(&env.conn, &dq, 3).await;
    got.extend(take_ids(&env.conn, &dq).await);

    let r = op::import(
        &env.conn,
        &export.clone().skip_lines(7),
        Some(&group),
        Some("guest"),
        &quick(),
    )
    .await
    .expect("the last two fit");
    assert_eq!((r.messages, r.total, r.failed, r.not_sent), (2, 2, 0, 0));
    assert_eq!(r.imported_lines, lines(&[(8, 9)]));
    assert!(r.is_complete() && r.resume_skip.is_none() && r.failures.is_empty());
    wait_count(&env.conn, &dq, 2).await;
    got.extend(take_ids(&env.conn, &dq).await);
    assert_eq!(got, ids, "every message imported once, in order");
}

/// A purge whose connection is lost between prepare and commit: commit's
/// result holds the report (nothing purged) and the error, and every dead
/// letter is back in its queue, in order. (Before: a bare `Err` from the
/// ack.)
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_whose_connection_is_lost_reports_what_it_deleted_and_loses_nothing() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let ids = numbered_dead_letters(&env, "p", 4).await;
    let user = warren_testkit::TempUser::create();
    let operator = connect_as(user.url()).await;
    let pending = op::prepare_purge(
        &operator,
        &env.billing,
        &op::Selection {
            all: true,
            ..Default::default()
        },
        &quick(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(pending.count(), 4);
    close_connections_of(&user.name);
    wait_disconnected(&operator).await;
    match pending.commit(None).await {
        Err(op::OperatorError::PurgeIncomplete {
            report,
            selected,
            source,
        }) => {
            assert_eq!((report.purged, selected), (0, 4));
            assert!(report.ids.is_empty());
            assert_eq!(report.error, Some(source.to_string()));
            let text = op::OperatorError::PurgeIncomplete {
                report: report.clone(),
                selected,
                source,
            }
            .to_string();
            assert!(
                text.ends_with(&format!(
                    "; 0 of 4 dead letters purged before it; the 4 not acked are back in {dq:?}"
                )),
                "{text}"
            );
        }
        other => panic!("expected PurgeIncomplete, got {other:?}"),
    }
    wait_count(&env.conn, &dq, 4).await;
    assert_eq!(take_ids(&env.conn, &dq).await, ids);
}

/// `n` dead letters `{tag}{i:05}` in billing's dead-letter queue,
/// published in one go (the confirms awaited at the end), and their ids.
async fn many_dead_letters(env: &Env, tag: &str, n: usize) -> Vec<String> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}{i:05}")).collect();
    let ch = env.conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::with_capacity(n);
    for id in &ids {
        let h = warren_headers(
            &env.billing,
            "permanent",
            "boom",
            "order.created",
            &env.orders,
        );
        confirms.push(
            ch.basic_publish(
                DEAD_LETTER_EXCHANGE.into(),
                env.billing.as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                props(id, h),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack(), "nacked");
    }
    let _ = ch.close(200, "ok".into()).await;
    wait_count(&env.conn, &dead_queue(&env.billing), n as u32).await;
    ids
}

/// Deletes `queue` on a channel of `conn`'s, from a synchronous callback
/// (a replay's progress) on a multi-thread runtime.
fn delete_queue_now(conn: &lapin::Connection, queue: &str) {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            let ch = conn.create_channel().await.unwrap();
            ch.queue_delete(queue.into(), Default::default())
                .await
                .unwrap();
            let _ = ch.close(200, "ok".into()).await;
        })
    });
}

/// What a read cut by the deletion of `queue` says, after `read` of `n`.
fn deleted_while_read(queue: &str, read: usize, n: usize) -> String {
    format!(
        "reading {queue:?} stopped after {read} of {n} messages: the queue was deleted (the dead \
         letters it still held went with it); nothing was removed from it beyond what this \
         command reports; `warren topology apply` declares it again"
    )
}

/// The dead-letter queue is deleted (from another connection) as soon as
/// a replay has read its first dead letter: the broker cancels the read
/// with most of the 10 000 not delivered yet (it sends a consumer a few
/// hundred at a time). The replay stops with an error that names the
/// queue and says it was deleted, after how many of how many, and its
/// report counts exactly the copies that are in the work queue. (Before:
/// lapin's end of the stream was taken for the end of the queue, and the
/// replay reported success, no error, for the few hundred it had read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_queue_is_deleted_midway_stops_with_an_error_and_counts_what_it_moved() {
    const N: usize = 10_000;
    // On a busy machine the broker can deliver all N before the deletion
    // lands (about 2 runs in 8 at a load of 6): nothing to show then, so
    // up to three tries.
    let mut tries = 0;
    let (env, ids, dq, r, read) = loop {
        tries += 1;
        let env = setup().await;
        let dq = dead_queue(&env.billing);
        let ids = many_dead_letters(&env, "d", N).await;
        let other = connect().await;
        let deleted = std::sync::atomic::AtomicBool::new(false);
        let progress = |p: op::Progress| {
            if p.scanned == 1 && !deleted.swap(true, std::sync::atomic::Ordering::SeqCst) {
                delete_queue_now(&other, &dq);
            }
        };
        let r = op::replay(
            &env.conn,
            &env.billing,
            &op::Selection {
                all: true,
                ..Default::default()
            },
            &op::ReplayOptions {
                read: quick(),
                ..Default::default()
            },
            &op::Metrics::unregistered(),
            &progress,
            &CancellationToken::new(),
        )
        .await
        .expect("a run that stopped partway is a report");
        let read = r.coverage.as_ref().expect("the queue was read").scanned;
        if read < N {
            break (env, ids, dq, r, read);
        }
        assert!(
            tries < 3,
            "the broker delivered all {N} before the deletion, three times: nothing to show"
        );
    };
    assert_eq!(
        r.error.as_deref(),
        Some(deleted_while_read(&dq, read, N).as_str())
    );
    assert!(r.stopped_early);
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    assert_eq!(r.selected, read);
    assert_eq!(
        r.replayed + r.not_removed.len(),
        read,
        "replayed {}, not removed {}",
        r.replayed,
        r.not_removed.len()
    );
    // Every copy the report counts is in the work queue, and no other.
    wait_count(&env.conn, &env.billing, read as u32).await;
    let copies = take_ids(&env.conn, &env.billing).await;
    assert_eq!(copies, ids[..read]);
    let mut counted = r.ids.clone();
    counted.extend(r.not_removed.iter().cloned());
    counted.sort();
    assert_eq!(counted, ids[..read]);
}

/// `export --remove` of a queue deleted while it is read (as soon as the
/// first lines reach the file): the result is
/// [`op::OperatorError::ExportIncomplete`], whose report says how many
/// were written (the file holds exactly those, in order) and that none
/// was removed, and whose error names the queue and says it was deleted.
/// (Before: `Ok`, "exported N, removed N" for the few hundred read, as if
/// that were the whole queue.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_whose_queue_is_deleted_midway_says_what_it_wrote_and_removed() {
    const N: usize = 10_000;
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let ids = many_dead_letters(&env, "x", N).await;
    let dir = std::env::temp_dir().join(format!(
        "warren-op-cut-{}",
        env.prefix.trim_end_matches('.')
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("export.jsonl");
    let mut w = op::ExportWriter::create_new(&file).unwrap();
    let deleter = tokio::spawn({
        let (file, dq) = (file.clone(), dq.clone());
        async move {
            let other = connect().await;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            while std::fs::metadata(&file).map_or(0, |m| m.len()) == 0 {
                assert!(tokio::time::Instant::now() < deadline, "nothing written");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let ch = other.create_channel().await.unwrap();
            ch.queue_delete(dq.as_str().into(), Default::default())
                .await
                .unwrap();
        }
    });
    let r = op::export(&env.conn, &env.billing, &mut w, true, &quick()).await;
    deleter.await.unwrap();
    drop(w);
    let written = op::read_export(&file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let (report, source) = match r {
        Err(op::OperatorError::ExportIncomplete { report, source }) => (report, source),
        other => panic!("expected ExportIncomplete, got {other:?}"),
    };
    let read = report.coverage.scanned;
    assert!(
        read < N,
        "the broker delivered all {N} before the deletion: nothing to show"
    );
    assert_eq!((report.exported, report.removed), (read, 0));
    assert_eq!(
        report.lines,
        Some(op::Lines {
            first: 1,
            last: read
        })
    );
    assert_eq!(source.to_string(), deleted_while_read(&dq, read, N));
    assert_eq!(report.error, Some(source.to_string()));
    let text = op::OperatorError::ExportIncomplete {
        report: report.clone(),
        source,
    }
    .to_string();
    assert_eq!(
        text,
        format!(
            "the export of {dq:?} stopped: {}; before it, {read} dead letters were written to \
             the export (lines 1-{read}) and 0 removed from the queue; {dq:?} is gone: the \
             export holds the only copy of those {read}",
            deleted_while_read(&dq, read, N)
        )
    );
    let got: Vec<&str> = written.messages().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(got, ids[..read]);
}

/// Replays dead letters `a`, `b`, `c` to their original exchange, `b`'s
/// being `original_of_b`, one copy in flight at a time.
async fn replay_abc_to_original(env: &Env, original_of_b: &str) -> op::ReplayReport {
    for (id, ex) in [
        ("a", env.orders.as_str()),
        ("b", original_of_b),
        ("c", &env.orders),
    ] {
        dead_letter(&env.conn, &env.billing, id, "permanent", "boom", b"{}", ex).await;
    }
    wait_count(&env.conn, &dead_queue(&env.billing), 3).await;
    op::replay(
        &env.conn,
        &env.billing,
        &op::Selection {
            all: true,
            ..Default::default()
        },
        &op::ReplayOptions {
            target: op::Target::Original,
            read: quick(),
            window: 1,
            ..Default::default()
        },
        &op::Metrics::unregistered(),
        &no_progress,
        &CancellationToken::new(),
    )
    .await
    .expect("a report")
}

/// A dead letter whose original exchange the broker refuses to check:
/// a passive declare of "\n" (the broker strips CR and LF from names) is
/// answered ACCESS_REFUSED ("operation not permitted on the default
/// exchange"), which says nothing about whether an exchange exists. The
/// replay stops there with an error that names the exchange and gives the
/// broker's reply; what it replayed before is reported, the rest stay
/// dead letters, in order. (Before: every error of the check read as "does
/// not exist": `b` failed with that wrong reason and the replay went on as
/// if nothing were wrong.)
#[tokio::test]
async fn a_replay_whose_exchange_check_is_refused_stops_with_the_brokers_reply() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let r = replay_abc_to_original(&env, "\n").await;
    let refused = "checking that exchange \"\\n\" exists failed: protocol error: AMQP soft \
                   error: ACCESS-REFUSED: ACCESS_REFUSED - operation not permitted on the \
                   default exchange; the replay stops (what it replayed before is reported; \
                   the rest stay in the dead-letter queue): fix what the broker says, then \
                   replay again";
    assert_eq!(r.error.as_deref(), Some(refused), "{r:?}");
    assert!(r.stopped_early);
    assert_eq!((r.selected, r.replayed, r.failed), (2, 1, 1), "{r:?}");
    assert_eq!(r.ids, ["a"]);
    assert_eq!(r.errors, [format!("b: {refused}")]);
    wait_count(&env.conn, &dq, 2).await;
    assert_eq!(take_ids(&env.conn, &dq).await, ["b", "c"]);
    assert_eq!(take_ids(&env.conn, &env.billing).await, ["a"]);
}

/// An original exchange that does not exist (the broker's NOT_FOUND)
/// fails only the dead letters bound there, with that reason; the replay
/// goes on with the others.
#[tokio::test]
async fn a_replay_to_a_missing_original_exchange_fails_those_dead_letters_only() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let missing = format!("{}no-such-exchange", env.prefix);
    let r = replay_abc_to_original(&env, &missing).await;
    assert_eq!(r.error, None, "{r:?}");
    assert!(!r.stopped_early);
    assert_eq!((r.selected, r.replayed, r.failed), (3, 2, 1), "{r:?}");
    assert_eq!(r.ids, ["a", "c"]);
    assert_eq!(
        r.errors,
        [format!("b: exchange {missing:?} does not exist: declare it (`warren topology apply` does, if the topology file has it) and replay again, or replay to the group's work queue instead (without --to-original)")]
    );
    wait_count(&env.conn, &dq, 1).await;
    assert_eq!(take_ids(&env.conn, &dq).await, ["b"]);
    assert_eq!(take_ids(&env.conn, &env.billing).await, ["a", "c"]);
}

/// A dead letter whose original exchange name is longer than the 255
/// bytes AMQP carries fails with that reason, and the replay goes on.
/// (Before: lapin panicked building the name, and the operator tool with
/// it.)
#[tokio::test]
async fn a_replay_to_an_original_exchange_too_long_for_amqp_fails_that_dead_letter_only() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let r = replay_abc_to_original(&env, &"x".repeat(300)).await;
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!((r.selected, r.replayed, r.failed), (3, 2, 1), "{r:?}");
    assert_eq!(
        r.errors,
        [
            "b: its original exchange is 300 bytes long, and AMQP allows at most 255; replay it \
          to the work queue instead"
        ]
    );
    wait_count(&env.conn, &dq, 1).await;
    assert_eq!(take_ids(&env.conn, &dq).await, ["b"]);
    assert_eq!(take_ids(&env.conn, &env.billing).await, ["a", "c"]);
}

/// An export line whose group makes a dead-letter queue name over AMQP's
/// 255 bytes is refused with its line before anything is sent, as a group
/// without a queue is; a `to_group` that long, a `count` and a `watch` of
/// it are [`op::OperatorError::NameTooLong`]. Nothing is lost: the same
/// file with the group fixed imports every message. (Before: lapin
/// panicked building the queue name, in amq-protocol-types.)
#[tokio::test]
async fn a_group_too_long_for_a_queue_name_is_an_error_not_a_panic() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    for i in 0..3 {
        dead_letter(
            &env.conn,
            &env.billing,
            &format!("l{i}"),
            "permanent",
            "boom",
            b"{}",
            &env.orders,
        )
        .await;
    }
    wait_count(&env.conn, &dq, 3).await;
    let dir = std::env::temp_dir().join(format!(
        "warren-op-long-{}",
        env.prefix.trim_end_matches('.')
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("export.jsonl");
    let mut w = op::ExportWriter::create_new(&file).unwrap();
    op::export(&env.conn, &env.billing, &mut w, true, &quick())
        .await
        .unwrap();
    drop(w);
    wait_count(&env.conn, &dq, 0).await;
    let mut messages = op::read_export(&file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let long = "g".repeat(251);
    messages.messages_mut()[1].group = long.clone();
    let too_long = format!(
        "group \"{}\"… is 251 bytes long: its dead-letter queue name would be 256 bytes, over \
         AMQP's limit of 255, so no such queue can exist",
        "g".repeat(40)
    );
    match op::import(&env.conn, &messages, None, Some("guest"), &quick()).await {
        Err(e @ op::OperatorError::Import { line: 2, .. }) => assert_eq!(
            e.to_string(),
            format!(
                "{}:2: {too_long}; fix its \"group\", or import with --to-group",
                file.display()
            )
        ),
        other => panic!("expected an Import error on line 2, got {other:?}"),
    }
    match op::import(&env.conn, &messages, Some(&long), Some("guest"), &quick()).await {
        Err(e @ op::OperatorError::NameTooLong { .. }) => {
            assert_eq!(e.to_string(), format!("{too_long}; check the group name"));
        }
        other => panic!("expected NameTooLong, got {other:?}"),
    }
    assert!(matches!(
        op::count(&env.conn, &long, op::DEFAULT_RPC_TIMEOUT).await,
        Err(op::OperatorError::NameTooLong { .. })
    ));
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let watched = op::watch(
        &warren_topology::ConnectOptions::new(url(), "test-watch"),
        std::slice::from_ref(&long),
        &op::WatchOptions::default(),
        &op::Metrics::unregistered(),
        tx,
        &|_| {},
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(watched, Err(op::OperatorError::NameTooLong { .. })),
        "{watched:?}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(count(&env.conn, &dq).await, 0, "nothing was imported");
    // The connection is still good, and nothing is lost.
    messages.messages_mut()[1].group = env.billing.clone();
    let r = op::import(&env.conn, &messages, None, Some("guest"), &quick())
        .await
        .unwrap();
    assert_eq!(r.total, 3);
    wait_count(&env.conn, &dq, 3).await;
    assert_eq!(take_ids(&env.conn, &dq).await, ["l0", "l1", "l2"]);
}

/// Deletes `queue` (on a connection of its own) as soon as a consumer
/// reads from it: a scan has started.
fn delete_once_read(queue: &str) -> tokio::task::JoinHandle<()> {
    use lapin::options::QueueDeclareOptions;
    let queue = queue.to_owned();
    tokio::spawn(async move {
        let other = connect().await;
        let ch = other.create_channel().await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let q = ch
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            if q.consumer_count() > 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nobody read {queue}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        ch.queue_delete(queue.as_str().into(), Default::default())
            .await
            .unwrap();
        let _ = other.close(200, "ok".into()).await;
    })
}

/// Declares the test's queues again (after one was deleted).
async fn redeclare(env: &Env) {
    let plan = warren_topology::Plan::new(&env.topology);
    warren_topology::apply(&env.conn, &plan).await.unwrap();
}

/// `list` (and so `stats`) and `show` of a queue deleted while it is read:
/// the error says the queue was deleted (checked, not "deleted or
/// cancelled") and that no partial listing is given. (Before: "the queue
/// was deleted, or its consumer was cancelled; nothing was removed from it
/// beyond what this command reports".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_whose_queue_is_deleted_midway_says_so_and_gives_no_partial_listing() {
    const N: usize = 5_000;
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let mut attempts = 0;
    let (e, read) = loop {
        attempts += 1;
        many_dead_letters(&env, "l", N).await;
        let deleter = delete_once_read(&dq);
        let r = op::list(&env.conn, &env.billing, &quick()).await;
        deleter.await.unwrap();
        match r {
            Err(e @ op::OperatorError::ReadCut { read, .. }) => break (e, read),
            // The broker delivered all before the deletion (a busy
            // machine): nothing to show; again, with the queue declared again.
            Ok(_) if attempts < 3 => redeclare(&env).await,
            other => panic!("expected ReadCut, got {other:?}"),
        }
    };
    assert_eq!(
        e.to_string(),
        format!(
            "reading {dq:?} stopped after {read} of {N} messages: the queue was deleted (the dead \
             letters it still held went with it); nothing was removed from it, and no partial \
             listing is given; `warren topology apply` declares it again"
        )
    );
}

/// A purge whose queue is deleted while it reads (before anything is
/// deleted): the error says the purge deleted nothing and that its
/// archive holds the only copy of the dead letters it had selected, which
/// the archive does, in order. (Before: "the queue was deleted, or its
/// consumer was cancelled; nothing was removed from it beyond what this
/// command reports", with nothing said about the archive.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_whose_queue_is_deleted_midway_says_it_deleted_nothing_and_what_the_archive_holds()
{
    const N: usize = 5_000;
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    let dir = std::env::temp_dir().join(format!(
        "warren-op-pcut-{}",
        env.prefix.trim_end_matches('.')
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut attempts = 0;
    let (e, read, ids, archived) = loop {
        attempts += 1;
        let ids = many_dead_letters(&env, "p", N).await;
        let file = dir.join(format!("archive-{attempts}.jsonl"));
        let mut archive = op::ExportWriter::create_new(&file).unwrap();
        let deleter = delete_once_read(&dq);
        let r = op::prepare_purge(
            &env.conn,
            &env.billing,
            &op::Selection {
                all: true,
                ..Default::default()
            },
            &quick(),
            Some(&mut archive),
        )
        .await;
        deleter.await.unwrap();
        drop(archive);
        match r {
            Err(e @ op::OperatorError::ReadCut { read, .. }) => {
                break (e, read, ids, op::read_export(&file).unwrap())
            }
            // All read before the deletion: again (see the listing's test).
            Ok(p) if attempts < 3 => {
                drop(p);
                redeclare(&env).await;
            }
            other => panic!("expected ReadCut, got {other:?}"),
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    let archive_says = match read {
        0 => String::new(),
        1 => "; the archive holds the only copy of the 1 dead letter it had selected".into(),
        n => format!("; the archive holds the only copy of the {n} dead letters it had selected"),
    };
    assert_eq!(
        e.to_string(),
        format!(
            "reading {dq:?} stopped after {read} of {N} messages: the queue was deleted (the dead \
             letters it still held went with it); the purge deleted nothing{archive_says}; \
             `warren topology apply` declares it again"
        )
    );
    let in_archive: Vec<&str> = archived.messages().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(in_archive, ids[..read]);
}

/// A queue that gives fewer messages than it counted (here two expired
/// behind three live ones: a classic queue drops an expired message only
/// when it reaches the head, so the count still has them) ends the scan
/// after the idle timeout, and the coverage says so: `stalled`, what was
/// read, and of how many.
#[tokio::test]
async fn a_queue_that_gives_fewer_messages_than_it_counted_is_a_stalled_scan() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    for i in 0..3 {
        let body = format!("{{\"order\":{i}}}");
        dead_letter(
            &env.conn,
            &env.billing,
            &format!("m{i}"),
            "permanent",
            "no",
            body.as_bytes(),
            &env.orders,
        )
        .await;
    }
    for i in 0..2 {
        let p = props(&format!("x{i}"), FieldTable::default()).with_expiration("50".into());
        publish(&env.conn, DEAD_LETTER_EXCHANGE, &env.billing, b"{}", p).await;
    }
    wait_count(&env.conn, &dq, 5).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let opts = op::ReadOptions::default().idle_timeout(std::time::Duration::from_secs(1));
    let l = op::list(&env.conn, &env.billing, &opts).await.unwrap();
    let ids: Vec<&str> = l.messages.iter().map(|m| m.info.id.as_str()).collect();
    assert_eq!(ids, ["m0", "m1", "m2"]);
    assert_eq!(
        l.coverage,
        op::Coverage {
            scanned: 3,
            total: 5,
            scan_limit_reached: false,
            consumers: 0,
            stalled: true
        }
    );
    let json = serde_json::to_value(l.coverage).unwrap();
    assert_eq!(json["stalled"], true, "{json}");

    // A scan that reads all it counted is not stalled, and its JSON has no
    // `stalled` (the three live ones were put back; the expired ones are gone).
    let l = op::list(&env.conn, &env.billing, &opts).await.unwrap();
    assert_eq!(
        l.coverage,
        op::Coverage {
            scanned: 3,
            total: 3,
            scan_limit_reached: false,
            consumers: 0,
            stalled: false
        }
    );
    assert_eq!(
        serde_json::to_value(l.coverage).unwrap().get("stalled"),
        None
    );
}

/// A replay rate so low that the second copy is due past what a clock holds
/// (`1e-300` a second) sends the first copy, then waits for the stop, which
/// puts the second dead letter back in its place. It used to panic building
/// that moment (`Duration::from_secs_f64`).
#[tokio::test]
async fn a_replay_rate_too_low_for_a_clock_waits_for_the_stop() {
    let env = setup().await;
    let dq = dead_queue(&env.billing);
    for i in 0..2 {
        dead_letter(
            &env.conn,
            &env.billing,
            &format!("r{i}"),
            "permanent",
            "no",
            b"{}",
            &env.orders,
        )
        .await;
    }
    wait_count(&env.conn, &dq, 2).await;
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        stop.cancel();
    });
    let opts = op::ReplayOptions {
        rate: Some(1e-300),
        read: quick(),
        ..Default::default()
    };
    let sel = op::Selection {
        all: true,
        ..Default::default()
    };
    let r = op::replay(
        &env.conn,
        &env.billing,
        &sel,
        &opts,
        &op::Metrics::unregistered(),
        &no_progress,
        &cancel,
    )
    .await
    .unwrap();
    stopper.await.unwrap();
    assert_eq!((r.selected, r.replayed), (1, 1));
    assert!(r.stopped_early);
    wait_count(&env.conn, &dq, 1).await;
    assert_eq!(take_ids(&env.conn, &dq).await, ["r1"]);
    assert_eq!(take_ids(&env.conn, &env.billing).await, ["r0"]);
}
