//! `warren consume` as a deployment runs it: an HTTP endpoint or a command as
//! the handler, messages ending where DESIGN.md's outcome table says, two
//! processes sharing a group, and a SIGTERM drain that loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use harness::*;

type Seen = Arc<Mutex<Vec<BTreeMap<String, String>>>>;

async fn test_server(seen: Seen) -> String {
    let app = Router::new().route(
        "/h",
        post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let mut h: BTreeMap<String, String> = headers
                    .iter()
                    .filter(|(k, _)| {
                        k.as_str().starts_with("x-warren")
                            || k.as_str() == "content-type"
                            || k.as_str() == "traceparent"
                    })
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
                    .collect();
                h.insert("body".into(), String::from_utf8_lossy(&body).into_owned());
                seen.lock().unwrap().push(h);
                let text = String::from_utf8_lossy(&body).into_owned();
                if text.contains("hang") {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                if text.contains("bad") {
                    (StatusCode::BAD_REQUEST, "unknown customer 42".to_owned())
                } else if text.contains("busy") {
                    (StatusCode::SERVICE_UNAVAILABLE, "try later".to_owned())
                } else if text.contains("slow-down") {
                    (StatusCode::TOO_MANY_REQUESTS, String::new())
                } else {
                    (StatusCode::OK, "ok".to_owned())
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/h")
}

const GROUP: &str = "name = \"{p}.g\"\nexchange = \"{p}.orders\"\nbindings = [\"order.*\"]\nqueue_type = \"classic\"\nretry = [\"200ms\"]\nhandler_timeout = \"1s\"\n";

fn dead_by_id(
    dead: Vec<(String, Vec<u8>, lapin::types::FieldTable)>,
) -> BTreeMap<String, lapin::types::FieldTable> {
    dead.into_iter().map(|(id, _, h)| (id, h)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handler_outcomes_follow_the_table() {
    let topo = Topo::new("http", &[GROUP]);
    topo.apply();
    let seen: Seen = Arc::default();
    let url = test_server(seen.clone()).await;
    let _w = Worker::start(&topo, &topo.q("g"), &["--http", &url], &[]);
    let conn = connect().await;
    for (id, body) in [
        ("ok-1", "{\"ok\":1}"),
        ("bad-1", "{\"bad\":1}"),
        ("busy-1", "{\"busy\":1}"),
        ("hang-1", "{\"hang\":1}"),
        ("slow-1", "{\"slow-down\":1}"),
    ] {
        publish(
            &conn,
            &topo.exchange(),
            "order.created",
            id,
            body.as_bytes(),
        )
        .await;
    }
    let dead_q = topo.q("g.dead");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(&conn, &dead_q).await == 4
        })
        .await,
        "expected 4 dead letters, have {}",
        count(&conn, &dead_q).await
    );
    assert_eq!(count(&conn, &topo.q("g")).await, 0);
    let dead = dead_by_id(drain(&conn, &dead_q).await);
    assert_eq!(
        dead.keys().cloned().collect::<Vec<_>>(),
        ["bad-1", "busy-1", "hang-1", "slow-1"]
    );

    let bad = &dead["bad-1"];
    assert_eq!(
        header_str(bad, "x-warren-error-kind").as_deref(),
        Some("permanent")
    );
    assert_eq!(
        header_str(bad, "x-warren-error").as_deref(),
        Some("HTTP 400 Bad Request: unknown customer 42")
    );
    let busy = &dead["busy-1"];
    assert_eq!(
        header_str(busy, "x-warren-error-kind").as_deref(),
        Some("retryable")
    );
    assert_eq!(
        header_str(busy, "x-warren-error").as_deref(),
        Some("HTTP 503 Service Unavailable: try later")
    );
    assert_eq!(
        header_str(&dead["slow-1"], "x-warren-error").as_deref(),
        Some("HTTP 429 Too Many Requests")
    );
    let hang = &dead["hang-1"];
    assert_eq!(
        header_str(hang, "x-warren-error-kind").as_deref(),
        Some("timeout")
    );

    let seen = seen.lock().unwrap().clone();
    let ok: Vec<_> = seen
        .iter()
        .filter(|h| h["body"].contains("\"ok\""))
        .collect();
    assert_eq!(ok.len(), 1, "the 200 is handled once");
    assert_eq!(ok[0]["x-warren-message-id"], "ok-1");
    assert_eq!(ok[0]["x-warren-attempt"], "1");
    assert_eq!(ok[0]["x-warren-routing-key"], "order.created");
    assert_eq!(ok[0]["x-warren-redelivered"], "false");
    assert_eq!(ok[0]["content-type"], "application/json");
    assert_eq!(
        seen.iter().filter(|h| h["body"].contains("bad")).count(),
        1,
        "a 400 is not retried"
    );
    let busy_attempts: Vec<&str> = seen
        .iter()
        .filter(|h| h["body"].contains("busy"))
        .map(|h| h["x-warren-attempt"].as_str())
        .collect();
    assert_eq!(
        busy_attempts,
        ["1", "2"],
        "a 503 goes through the one tier, then to the dead-letter queue"
    );
}

fn script(dir: &std::path::Path) -> String {
    let d = dir.display();
    let path = dir.join("handler.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\ncat > \"{d}/$WARREN_MESSAGE_ID.body\"\nprintf '%s %s %s %s\\n' \"$WARREN_MESSAGE_ID\" \"$WARREN_ATTEMPT\" \"$WARREN_ROUTING_KEY\" \"$WARREN_GROUP\" >> \"{d}/env\"\ncase \"$WARREN_MESSAGE_ID\" in\n  ok*) exit 0;;\n  data*) echo 'field amount is negative' >&2; exit 65;;\n  fail*) echo 'database is down' >&2; exit 3;;\n  sig*) kill -9 $$;;\n  hang*) exec sleep 30;;\nesac\n"
        ),
    )
    .unwrap();
    format!("exec sh {}", path.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_handler_exit_codes_stdin_and_timeout() {
    let topo = Topo::new("exec", &[GROUP]);
    topo.apply();
    let dir = std::env::temp_dir().join(unique("execdir"));
    std::fs::create_dir_all(&dir).unwrap();
    let cmd = script(&dir);
    let _w = Worker::start(&topo, &topo.q("g"), &["--exec", &cmd], &[]);
    let conn = connect().await;
    let binary: Vec<u8> = (0u8..=255).chain([0, 0, b'\n', 0xff]).collect();
    publish(&conn, &topo.exchange(), "order.paid", "ok-bytes", &binary).await;
    for id in ["data-1", "fail-1", "sig-1", "hang-1"] {
        publish(&conn, &topo.exchange(), "order.paid", id, b"{}").await;
    }
    let dead_q = topo.q("g.dead");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(&conn, &dead_q).await == 4
        })
        .await,
        "expected 4 dead letters, have {}",
        count(&conn, &dead_q).await
    );
    let dead = dead_by_id(drain(&conn, &dead_q).await);
    assert_eq!(
        std::fs::read(dir.join("ok-bytes.body")).unwrap(),
        binary,
        "stdin carries the body byte for byte"
    );
    assert!(!dead.contains_key("ok-bytes"));

    assert_eq!(
        header_str(&dead["data-1"], "x-warren-error-kind").as_deref(),
        Some("permanent")
    );
    assert_eq!(
        header_str(&dead["data-1"], "x-warren-error").as_deref(),
        Some("command exited with 65 (EX_DATAERR): field amount is negative")
    );
    assert_eq!(
        header_str(&dead["fail-1"], "x-warren-error-kind").as_deref(),
        Some("retryable")
    );
    assert_eq!(
        header_str(&dead["fail-1"], "x-warren-error").as_deref(),
        Some("command exited with 3: database is down")
    );
    assert_eq!(
        header_str(&dead["sig-1"], "x-warren-error").as_deref(),
        Some("command killed by signal 9")
    );
    assert_eq!(
        header_str(&dead["hang-1"], "x-warren-error-kind").as_deref(),
        Some("timeout")
    );

    let env = std::fs::read_to_string(dir.join("env")).unwrap();
    let group = topo.q("g");
    let fail_lines: Vec<&str> = env.lines().filter(|l| l.starts_with("fail-1 ")).collect();
    assert_eq!(
        fail_lines,
        [
            format!("fail-1 1 order.paid {group}"),
            format!("fail-1 2 order.paid {group}")
        ]
    );
    assert_eq!(
        env.lines().filter(|l| l.starts_with("data-1 ")).count(),
        1,
        "exit 65 is not retried"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_group_and_handle_every_message_once() {
    let topo = Topo::new("share", &[GROUP]);
    topo.apply();
    let dir = std::env::temp_dir().join(unique("sharedir"));
    std::fs::create_dir_all(&dir).unwrap();
    let cmd = |n: u32| {
        format!(
            "cat > /dev/null; echo \"$WARREN_MESSAGE_ID\" >> {}/w{n}",
            dir.display()
        )
    };
    let (c1, c2) = (cmd(1), cmd(2));
    let _w1 = Worker::start(
        &topo,
        &topo.q("g"),
        &["--exec", &c1],
        &["--prefetch", "4", "--concurrency", "2"],
    );
    let _w2 = Worker::start(
        &topo,
        &topo.q("g"),
        &["--exec", &c2],
        &["--prefetch", "4", "--concurrency", "2"],
    );
    let conn = connect().await;
    let ids: BTreeSet<String> = (0..120).map(|i| format!("m-{i:03}")).collect();
    for id in &ids {
        publish(&conn, &topo.exchange(), "order.created", id, b"{}").await;
    }
    let read = |n: u32| -> Vec<String> {
        std::fs::read_to_string(dir.join(format!("w{n}")))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || async {
            read(1).len() + read(2).len() >= ids.len()
        })
        .await,
        "handled {} of {}",
        read(1).len() + read(2).len(),
        ids.len()
    );
    let work_q = topo.q("g");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            count(&conn, &work_q).await == 0
        })
        .await
    );
    let (a, b) = (read(1), read(2));
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both workers handle some: {} and {}",
        a.len(),
        b.len()
    );
    let mut all: Vec<String> = a.iter().chain(&b).cloned().collect();
    all.sort();
    assert_eq!(all.len(), ids.len(), "every message handled exactly once");
    assert_eq!(all.into_iter().collect::<BTreeSet<_>>(), ids);
    assert_eq!(count(&conn, &topo.q("g.dead")).await, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_exits_0_losing_nothing() {
    let topo = Topo::new("term", &[GROUP]);
    topo.apply();
    let dir = std::env::temp_dir().join(unique("termdir"));
    std::fs::create_dir_all(&dir).unwrap();
    let cmd = format!(
        "cat > /dev/null; sleep 0.5; echo \"$WARREN_MESSAGE_ID\" >> {}/done",
        dir.display()
    );
    let mut w = Worker::start(
        &topo,
        &topo.q("g"),
        &["--exec", &cmd],
        &["--prefetch", "8", "--concurrency", "4", "--grace", "10s"],
    );
    let conn = connect().await;
    let ids: BTreeSet<String> = (0..30).map(|i| format!("t-{i:02}")).collect();
    for id in &ids {
        publish(&conn, &topo.exchange(), "order.created", id, b"{}").await;
    }
    let group = topo.q("g");
    let in_flight = format!("warren_in_flight{{group=\"{group}\"}}");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            w.metric(&in_flight) >= 2.0
        })
        .await,
        "handlers never ran concurrently"
    );
    w.sigterm();
    let code = w.wait_exit(Duration::from_secs(15));
    assert_eq!(
        code,
        Some(0),
        "exit code after SIGTERM; log:\n{}",
        w.log_text()
    );
    let done: Vec<String> = std::fs::read_to_string(dir.join("done"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let done_set: BTreeSet<String> = done.iter().cloned().collect();
    assert_eq!(done.len(), done_set.len(), "nothing handled twice");
    assert!(
        !done.is_empty() && done.len() < ids.len(),
        "stopped in the middle: {} done",
        done.len()
    );
    let left = drain(&conn, &group).await;
    let left_set: BTreeSet<String> = left.iter().map(|(id, _, _)| id.clone()).collect();
    assert!(
        done_set.is_disjoint(&left_set),
        "a finished message was requeued as well"
    );
    assert_eq!(
        done_set.union(&left_set).cloned().collect::<BTreeSet<_>>(),
        ids,
        "none lost"
    );
    assert_eq!(count(&conn, &topo.q("g.dead")).await, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_group_is_a_usage_error_listing_the_groups() {
    let topo = Topo::new("usage", &[GROUP]);
    let o = warren()
        .args([
            "consume",
            "-f",
            topo.file(),
            "--group",
            "nope",
            "--exec",
            "true",
        ])
        .output_within(CLI_LIMIT);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "no group \"nope\" in {}; groups: {}",
            topo.file(),
            topo.q("g")
        )),
        "{err}"
    );
    let o = warren()
        .args(["consume", "-f", topo.file(), "--group", "nope"])
        .output_within(CLI_LIMIT);
    assert_eq!(o.status.code(), Some(2), "a handler is required");
}
