//! `warren consume` as a deployment runs it: an HTTP endpoint or a command as
//! the handler, messages ending where DESIGN.md's outcome table says, two
//! processes sharing a group, and a SIGTERM drain that loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
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
                let wait = [("retry-after", "120")];
                if text.contains("bad") {
                    (StatusCode::BAD_REQUEST, "unknown customer 42").into_response()
                } else if text.contains("busy") {
                    (StatusCode::SERVICE_UNAVAILABLE, "try later").into_response()
                } else if text.contains("later") {
                    (StatusCode::SERVICE_UNAVAILABLE, wait, "try later").into_response()
                } else if text.contains("slow-down") {
                    StatusCode::TOO_MANY_REQUESTS.into_response()
                } else if text.contains("wait") {
                    (StatusCode::TOO_MANY_REQUESTS, wait).into_response()
                } else {
                    (StatusCode::OK, "ok").into_response()
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
        ("later-1", "{\"later\":1}"),
        ("wait-1", "{\"wait\":1}"),
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
            count(&conn, &dead_q).await == 6
        })
        .await,
        "expected 6 dead letters, have {}",
        count(&conn, &dead_q).await
    );
    assert_eq!(count(&conn, &topo.q("g")).await, 0);
    let dead = dead_by_id(drain(&conn, &dead_q).await);
    assert_eq!(
        dead.keys().cloned().collect::<Vec<_>>(),
        ["bad-1", "busy-1", "hang-1", "later-1", "slow-1", "wait-1"]
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
    // The service's Retry-After is shown, not waited for: the message came
    // back after the group's retry tier (200ms), not after 120s.
    assert_eq!(
        header_str(&dead["later-1"], "x-warren-error").as_deref(),
        Some(
            "HTTP 503 Service Unavailable (Retry-After: 120, not waited for: the group's retry \
             tiers set the wait; lengthen them if the service needs longer): try later"
        )
    );
    assert_eq!(
        header_str(&dead["wait-1"], "x-warren-error").as_deref(),
        Some(
            "HTTP 429 Too Many Requests (Retry-After: 120, not waited for: the group's retry \
             tiers set the wait; lengthen them if the service needs longer)"
        )
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
    let ids: BTreeSet<String> = (0..30).map(|i| format!("t-{i:02}")).collect();
    let conn = publish_and_wait_in_flight(&topo, &w, &ids).await;
    let group = topo.q("g");
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

/// A group whose handlers may run for a while (20s before the timeout).
const SLOW_GROUP: &str = "name = \"{p}.g\"\nexchange = \"{p}.orders\"\nbindings = [\"order.*\"]\nqueue_type = \"classic\"\nretry = [\"200ms\"]\nhandler_timeout = \"20s\"\n";

/// A scratch directory for a test's command to write into, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }

    fn lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.0.join(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Publishes one message per id to group `g` and waits until at least two
/// handlers run at once. Returns the connection it published on.
async fn publish_and_wait_in_flight(
    topo: &Topo,
    w: &Worker,
    ids: &BTreeSet<String>,
) -> lapin::Connection {
    let conn = connect().await;
    for id in ids {
        publish(&conn, &topo.exchange(), "order.created", id, b"{}").await;
    }
    let in_flight = format!("warren_in_flight{{group=\"{}\"}}", topo.q("g"));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            w.metric(&in_flight) >= 2.0
        })
        .await,
        "handlers never ran concurrently"
    );
    conn
}

/// Whether process `pid` is gone (exited; a zombie counts as gone).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits until every pid written to `file` (one per line, at least `n`) is gone.
async fn wait_gone(scratch: &Scratch, file: &str, n: usize) -> Vec<String> {
    let ok = wait_until(Duration::from_secs(5), || async {
        let pids = scratch.lines(file);
        pids.len() >= n && pids.iter().all(|p| gone(p))
    })
    .await;
    let pids = scratch.lines(file);
    let alive: Vec<&String> = pids.iter().filter(|p| !gone(p)).collect();
    // Leave nothing behind whatever the outcome.
    for p in &alive {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", p.as_str()])
            .status();
    }
    assert!(
        ok,
        "the command's children still run: {alive:?} of {pids:?} (at least {n} expected)"
    );
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_to_the_process_group_drains_and_handlers_finish() {
    let topo = Topo::new("pgrp", &[SLOW_GROUP]);
    topo.apply();
    let dir = Scratch::new("pgrpdir");
    let cmd = format!(
        "cat > /dev/null; sleep 1; echo \"$WARREN_MESSAGE_ID\" >> {}",
        dir.path("done")
    );
    let mut w = Worker::start_at(
        &topo,
        &topo.q("g"),
        &["--exec", &cmd],
        &["--prefetch", "4", "--concurrency", "2", "--grace", "10s"],
        "127.0.0.1",
        true,
    );
    let ids: BTreeSet<String> = (0..8).map(|i| format!("i-{i}")).collect();
    let conn = publish_and_wait_in_flight(&topo, &w, &ids).await;
    let group = topo.q("g");
    // What a Ctrl-C at a terminal does: SIGINT to the whole foreground group.
    ctrl_c(&w);
    let code = w.wait_exit(Duration::from_secs(15));
    assert_eq!(
        code,
        Some(0),
        "exit code after SIGINT; log:\n{}",
        w.log_text()
    );
    let done: BTreeSet<String> = dir.lines("done").into_iter().collect();
    assert!(
        done.len() >= 2,
        "the handlers in flight finished: {done:?}; log:\n{}",
        w.log_text()
    );
    assert_eq!(
        count(&conn, &topo.q("g.retry.1")).await,
        0,
        "nothing retried"
    );
    assert_eq!(count(&conn, &topo.q("g.dead")).await, 0);
    let left = drain(&conn, &group).await;
    for (id, _, h) in &left {
        assert_eq!(header_str(h, "x-warren-error"), None, "{id} failed");
    }
    let left: BTreeSet<String> = left.into_iter().map(|(id, _, _)| id).collect();
    assert!(done.is_disjoint(&left), "{done:?} {left:?}");
    assert_eq!(done.union(&left).cloned().collect::<BTreeSet<_>>(), ids);
}

/// Whether the worker's `/readyz` answers 200 (false once it drains).
fn ready(w: &Worker) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", w.port)) else {
        return false;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200")
}

/// SIGINT to the worker's process group (a worker started in a group of its
/// own): what a Ctrl-C at its terminal does.
fn ctrl_c(w: &Worker) {
    let pgid = w.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Ctrl-C, then waits until the worker drains (`/readyz` no longer 200),
/// still running: the first signal was taken and a second one is not folded
/// into it. Returns once a second signal would count as one (a signal within
/// 250 ms of the first is taken as the first delivered again).
async fn first_ctrl_c(w: &mut Worker) {
    ctrl_c(w);
    after_the_first_signal(w).await;
}

/// Waits until the worker drains after a first signal, still running, and
/// until a second signal would count as a second one.
async fn after_the_first_signal(w: &mut Worker) {
    let sent = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || async { !ready(w) }).await,
        "the first signal did not start a drain; log:\n{}",
        w.log_text()
    );
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "the drain waits for the handler in flight; log:\n{}",
        w.log_text()
    );
    tokio::time::sleep(Duration::from_millis(400).saturating_sub(sent.elapsed())).await;
}

/// The message with id `id` is back, alone, in the work queue, untouched,
/// and nothing went to the retry or dead-letter queues.
async fn requeued_untouched(topo: &Topo, id: &str) {
    let conn = connect().await;
    let work_q = topo.q("g");
    // The broker requeues a dropped connection's deliveries at once; give
    // it a moment to notice the connection is gone.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            count(&conn, &work_q).await == 1
        })
        .await,
        "not requeued: {} in the work queue",
        count(&conn, &work_q).await
    );
    assert_eq!(count(&conn, &topo.q("g.dead")).await, 0, "dead-lettered");
    assert_eq!(count(&conn, &topo.q("g.retry.1")).await, 0, "retried");
    let left = drain(&conn, &work_q).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, id);
    assert_eq!(header_str(&left[0].2, "x-warren-error"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_quits_at_once_killing_the_commands_and_losing_nothing() {
    let topo = Topo::new("twice", &[SLOW_GROUP]);
    topo.apply();
    let dir = Scratch::new("twicedir");
    // The shell, a background child and a foreground one write their pids,
    // then outlast the grace and the handler timeout (20s).
    let pids = dir.path("pids");
    let cmd = format!(
        "cat > /dev/null; echo $$ >> {pids}; sleep 58 & echo $! >> {pids}; \
         sh -c 'echo $$ >> {pids}; exec sleep 59'"
    );
    let mut w = Worker::start_at(
        &topo,
        &topo.q("g"),
        &["--exec", &cmd],
        &["--grace", "60s"],
        "127.0.0.1",
        true,
    );
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "twice-1", b"{}").await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            dir.lines("pids").len() == 3
        })
        .await,
        "the command never started; log:\n{}",
        w.log_text()
    );
    first_ctrl_c(&mut w).await;
    ctrl_c(&w);
    let code = w.wait_exit(Duration::from_secs(3));
    let log = w.log_text();
    assert_eq!(
        code,
        Some(130),
        "exit code after a second Ctrl-C; log:\n{log}"
    );
    assert!(
        log.contains("a second SIGINT/SIGTERM (Ctrl-C) quits at once"),
        "{log}"
    );
    assert!(log.contains("second SIGINT/SIGTERM: quitting now"), "{log}");
    assert!(log.contains("handlers_running=1"), "{log}");
    assert!(log.contains("commands_killed=1"), "{log}");
    // Not orphaned: the shell and both of its children are gone.
    wait_gone(&dir, "pids", 3).await;
    requeued_untouched(&topo, "twice-1").await;
}

/// What `kill` twice (or a supervisor that signals again) does: the second
/// SIGTERM quits at once like a second Ctrl-C, but exits 143 (128 +
/// SIGTERM), as a shell reports a process SIGTERM ended, not Ctrl-C's 130.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_quits_at_once_with_143() {
    let topo = Topo::new("twiceterm", &[SLOW_GROUP]);
    topo.apply();
    let dir = Scratch::new("twicetermdir");
    let pids = dir.path("pids");
    let cmd = format!("cat > /dev/null; echo $$ >> {pids}; exec sleep 59");
    let mut w = Worker::start_at(
        &topo,
        &topo.q("g"),
        &["--exec", &cmd],
        &["--grace", "60s"],
        "127.0.0.1",
        true,
    );
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "term-1", b"{}").await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            dir.lines("pids").len() == 1
        })
        .await,
        "the command never started; log:\n{}",
        w.log_text()
    );
    w.sigterm();
    after_the_first_signal(&mut w).await;
    w.sigterm();
    let code = w.wait_exit(Duration::from_secs(3));
    let log = w.log_text();
    assert_eq!(
        code,
        Some(143),
        "exit code after a second SIGTERM; log:\n{log}"
    );
    assert!(
        log.contains("second SIGINT/SIGTERM: quitting now (exit 143)"),
        "{log}"
    );
    assert!(log.contains("signal=\"SIGTERM\""), "{log}");
    assert!(log.contains("commands_killed=1"), "{log}");
    wait_gone(&dir, "pids", 1).await;
    requeued_untouched(&topo, "term-1").await;
}

/// `timeout 1h warren consume ...` sends its SIGTERM to warren and then to
/// its own process group, which holds warren: the same signal twice, a
/// moment apart. That is one request to drain, not a second signal that
/// quits at once (it used to quit without draining about one time in three,
/// when the two were not delivered as one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_delivered_twice_at_once_drains_like_one() {
    let topo = Topo::new("dupterm", &[SLOW_GROUP]);
    topo.apply();
    let dir = Scratch::new("duptermdir");
    let cmd = format!(
        "cat > /dev/null; echo \"$WARREN_MESSAGE_ID\" >> {}; sleep 2; echo \"$WARREN_MESSAGE_ID\" >> {}",
        dir.path("started"),
        dir.path("done")
    );
    let mut w = Worker::start_at(
        &topo,
        &topo.q("g"),
        &["--exec", &cmd],
        &["--grace", "20s"],
        "127.0.0.1",
        true,
    );
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "dup-1", b"{}").await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            dir.lines("started").len() == 1
        })
        .await,
        "the command never started; log:\n{}",
        w.log_text()
    );
    // As timeout(1) does: the process, then its group (the worker runs in
    // a group of its own, so that is the worker again), 20 ms apart so that
    // the two are not taken in as one (the code before took the second
    // for a second signal and quit with 143).
    let pid = w.child.id().to_string();
    for target in [pid.clone(), format!("-{pid}")] {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", "--", &target])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM -- {target}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let code = w.wait_exit(Duration::from_secs(15));
    let log = w.log_text();
    assert_eq!(code, Some(0), "drained and exited 0; log:\n{log}");
    assert!(
        log.contains("a signal this soon after the first is taken as the same one"),
        "{log}"
    );
    assert!(!log.contains("quitting now"), "{log}");
    assert_eq!(
        dir.lines("done"),
        ["dup-1"],
        "the handler finished; log:\n{log}"
    );
    for q in ["g", "g.retry.1", "g.dead"] {
        assert_eq!(
            count(&conn, &topo.q(q)).await,
            0,
            "{q} holds it: acked once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_quits_at_once_with_an_http_handler_too() {
    let topo = Topo::new("twicehttp", &[SLOW_GROUP]);
    topo.apply();
    let seen: Seen = Arc::default();
    let url = test_server(seen.clone()).await;
    let mut w = Worker::start_at(
        &topo,
        &topo.q("g"),
        &["--http", &url],
        &["--grace", "60s"],
        "127.0.0.1",
        true,
    );
    let conn = connect().await;
    // The test server answers a "hang" body after 30s.
    publish(
        &conn,
        &topo.exchange(),
        "order.created",
        "hang-1",
        b"{\"hang\":1}",
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !seen.lock().unwrap().is_empty()
        })
        .await,
        "the request never came; log:\n{}",
        w.log_text()
    );
    first_ctrl_c(&mut w).await;
    ctrl_c(&w);
    let code = w.wait_exit(Duration::from_secs(3));
    let log = w.log_text();
    assert_eq!(
        code,
        Some(130),
        "exit code after a second Ctrl-C; log:\n{log}"
    );
    assert!(log.contains("handlers_running=1"), "{log}");
    assert!(!log.contains("commands_killed"), "{log}");
    requeued_untouched(&topo, "hang-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_timeout_kills_the_commands_children_too() {
    let topo = Topo::new("tmokill", &[GROUP]);
    topo.apply();
    let dir = Scratch::new("tmokilldir");
    // The child outlives the shell unless its whole process group is killed.
    let cmd = format!(
        "cat > /dev/null; sh -c 'echo $$ >> {}; exec sleep 47'; echo done",
        dir.path("pids")
    );
    let w = Worker::start(&topo, &topo.q("g"), &["--exec", &cmd], &[]);
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "slow-1", b"{}").await;
    let dead_q = topo.q("g.dead");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            count(&conn, &dead_q).await == 1
        })
        .await,
        "log:\n{}",
        w.log_text()
    );
    let dead = dead_by_id(drain(&conn, &dead_q).await);
    assert_eq!(
        header_str(&dead["slow-1"], "x-warren-error-kind").as_deref(),
        Some("timeout")
    );
    let pids = wait_gone(&dir, "pids", 2).await;
    assert_eq!(pids.len(), 2, "one child per attempt: {pids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_the_grace_kills_the_commands_children_and_redelivery_is_visible() {
    let topo = Topo::new("gracekill", &[SLOW_GROUP]);
    topo.apply();
    let dir = Scratch::new("gracekilldir");
    let record = format!(
        "cat > /dev/null; echo \"$WARREN_MESSAGE_ID ${{WARREN_REDELIVERED-unset}}\" >> {}",
        dir.path("env")
    );
    let hang = format!(
        "{record}; sh -c 'echo $$ >> {}; exec sleep 47'",
        dir.path("pids")
    );
    let mut w = Worker::start(&topo, &topo.q("g"), &["--exec", &hang], &["--grace", "1s"]);
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "r-1", b"{}").await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !dir.lines("pids").is_empty()
        })
        .await,
        "the command never started; log:\n{}",
        w.log_text()
    );
    w.sigterm();
    let code = w.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "log:\n{}", w.log_text());
    wait_gone(&dir, "pids", 1).await;
    assert_eq!(count(&conn, &topo.q("g.retry.1")).await, 0);

    // Requeued unfinished: the next worker sees a redelivery.
    let _w2 = Worker::start(&topo, &topo.q("g"), &["--exec", &record], &[]);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            dir.lines("env").len() == 2
        })
        .await,
        "{:?}",
        dir.lines("env")
    );
    assert_eq!(dir.lines("env"), ["r-1 false", "r-1 true"]);
    let work_q = topo.q("g");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            count(&conn, &work_q).await == 0
        })
        .await
    );
    assert_eq!(count(&conn, &topo.q("g.dead")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_exits_is_settled_though_a_child_holds_stderr() {
    let topo = Topo::new("bgchild", &[GROUP]);
    topo.apply();
    let dir = Scratch::new("bgchilddir");
    let cmd = format!(
        "cat > /dev/null; (sh -c 'echo $$ >> {}; exec sleep 33' &); exit 0",
        dir.path("pids")
    );
    let w = Worker::start(&topo, &topo.q("g"), &["--exec", &cmd], &[]);
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "bg-1", b"{}").await;
    let acked = format!(
        "warren_handled_total{{group=\"{}\",outcome=\"ack\"}}",
        topo.q("g")
    );
    assert!(
        wait_until(Duration::from_secs(5), || async { w.metric(&acked) == 1.0 }).await,
        "not acked; log:\n{}",
        w.log_text()
    );
    // Well under handler_timeout (1s): settled at the exit, not at EOF.
    assert!(
        w.metric("warren_handler_seconds_sum") < 0.9,
        "{}",
        w.metrics()
    );
    wait_gone(&dir, "pids", 1).await;
    assert_eq!(count(&conn, &topo.q("g.dead")).await, 0);
    assert_eq!(count(&conn, &topo.q("g.retry.1")).await, 0);
    assert_eq!(count(&conn, &topo.q("g")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_keeps_the_end_of_stderr_and_control_characters_are_escaped() {
    let topo = Topo::new("tail", &[GROUP]);
    topo.apply();
    let dir = Scratch::new("taildir");
    let path = dir.0.join("handler.sh");
    std::fs::write(
        &path,
        "cat > /dev/null\ncase \"$WARREN_MESSAGE_ID\" in\n  long*) head -c 3000 /dev/zero | tr '\\000' e >&2; printf '\\nFINAL ERROR: disk full\\n' >&2;;\n  ctl*) printf 'a \\033[31mred\\033[0m \\000nul\\ttab\\033]0;title\\007\\n' >&2;;\nesac\nexit 65\n",
    )
    .unwrap();
    let cmd = format!("exec sh {}", path.display());
    let w = Worker::start(&topo, &topo.q("g"), &["--exec", &cmd], &[]);
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "long-1", b"{}").await;
    publish(&conn, &topo.exchange(), "order.created", "ctl-1", b"{}").await;
    let dead_q = topo.q("g.dead");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            count(&conn, &dead_q).await == 2
        })
        .await,
        "log:\n{}",
        w.log_text()
    );
    let dead = dead_by_id(drain(&conn, &dead_q).await);
    let long = header_str(&dead["long-1"], "x-warren-error").unwrap();
    assert!(long.len() <= 1024, "{} bytes", long.len());
    assert!(
        long.starts_with("command exited with 65 (EX_DATAERR): …eeee"),
        "{long}"
    );
    assert!(long.ends_with("eee FINAL ERROR: disk full"), "{long}");
    let ctl = "command exited with 65 (EX_DATAERR): a \\u{1b}[31mred\\u{1b}[0m \\u{0}nul tab\\u{1b}]0;title\\u{7}";
    assert_eq!(
        header_str(&dead["ctl-1"], "x-warren-error").as_deref(),
        Some(ctl)
    );
    let log = w.log_text();
    assert!(log.contains(ctl), "{log}");
    for c in ['\u{1b}', '\0', '\u{7}', '\t'] {
        assert!(!log.contains(c), "{c:?} in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_of_the_http_url_is_masked_in_headers_and_logs() {
    let topo = Topo::new("httppw", &[GROUP]);
    topo.apply();
    // Nothing listens there: a refused connection, retried, then dead-lettered.
    let port = free_port();
    let url = format!("http://user:secretpw@127.0.0.1:{port}/h");
    let w = Worker::start(&topo, &topo.q("g"), &["--http", &url], &[]);
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "pw-1", b"{}").await;
    let dead_q = topo.q("g.dead");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            count(&conn, &dead_q).await == 1
        })
        .await,
        "log:\n{}",
        w.log_text()
    );
    let dead = dead_by_id(drain(&conn, &dead_q).await);
    let error = header_str(&dead["pw-1"], "x-warren-error").unwrap();
    assert!(
        error.starts_with(&format!("POST http://user:***@127.0.0.1:{port}/h failed: ")),
        "{error}"
    );
    assert!(!error.contains("secretpw"), "{error}");
    let log = w.log_text();
    assert!(log.contains("user:***@"), "{log}");
    assert!(!log.contains("secretpw"), "{log}");
}

/// A service that is down (or an `--http` with the wrong port): every
/// message fails and is retried, which the consumer logs at INFO. At the
/// default level the worker used to say nothing until the messages had used
/// up their retry tiers. It now warns, once a minute at most (the
/// consumer's WARN for the first retry of a group), and the error each
/// message carries, in that warning too, asks whether the service runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_service_that_cannot_be_reached_is_warned_of_at_the_default_level() {
    let topo = Topo::new(
        "httpdown",
        &["name = \"{p}.g\"\nexchange = \"{p}.orders\"\nbindings = [\"order.*\"]\nqueue_type = \"classic\"\nretry = [\"1m\"]\n"],
    );
    topo.apply();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/orders");
    let mut w = quiet_worker(&topo, URL, &["--http", &url]).await;
    let conn = connect().await;
    for id in ["down-1", "down-2", "down-3"] {
        publish(&conn, &topo.exchange(), "order.created", id, b"{}").await;
    }
    let retry_q = topo.q("g.retry.1");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            count(&conn, &retry_q).await == 3
        })
        .await,
        "log:\n{}",
        w.log_text()
    );
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(15)), Some(0));
    let log = w.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains(&url))
        .collect();
    assert_eq!(warnings.len(), 1, "once, not per message:\n{log}");
    assert!(
        warnings[0].contains("is the service running and listening there?"),
        "{log}"
    );
    assert!(warnings[0].contains(&url), "{log}");
    for (id, _, h) in drain(&conn, &retry_q).await {
        let error = header_str(&h, "x-warren-error").unwrap();
        assert!(
            error.starts_with(&format!("POST {url} failed: "))
                && error.ends_with("; is the service running and listening there?"),
            "{id}: {error}"
        );
    }
}

/// A handler that fails every message: each retry is logged at INFO, so at
/// the default level the worker said nothing until the messages had used
/// up their tiers (minutes to hours). The first retry, then one a minute,
/// is now logged at WARN, with the handler's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_fails_is_warned_of_once_a_minute_at_the_default_level() {
    let topo = Topo::new(
        "retrywarn",
        &["name = \"{p}.g\"\nexchange = \"{p}.orders\"\nbindings = [\"order.*\"]\nqueue_type = \"classic\"\nretry = [\"1m\"]\n"],
    );
    topo.apply();
    let mut w = quiet_worker(
        &topo,
        URL,
        &[
            "--exec",
            "cat > /dev/null; echo 'the database is down' >&2; exit 1",
        ],
    )
    .await;
    let conn = connect().await;
    for id in ["fail-1", "fail-2", "fail-3"] {
        publish(&conn, &topo.exchange(), "order.created", id, b"{}").await;
    }
    let retry_q = topo.q("g.retry.1");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            count(&conn, &retry_q).await == 3
        })
        .await,
        "log:\n{}",
        w.log_text()
    );
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(15)), Some(0));
    let log = w.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("handler failed; retrying later"))
        .collect();
    assert_eq!(warnings.len(), 1, "once, not per message:\n{log}");
    assert!(warnings[0].contains("the database is down"), "{log}");
    drain(&conn, &retry_q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_addr_takes_a_host_name_and_a_default_concurrency_follows_prefetch() {
    let topo = Topo::new("mhost", &[GROUP]);
    topo.apply();
    let dir = Scratch::new("mhostdir");
    let cmd = format!(
        "cat > /dev/null; echo \"$WARREN_MESSAGE_ID\" >> {}",
        dir.path("done")
    );
    // The group's concurrency is the default (16): --prefetch 2 lowers it.
    let _w = Worker::start_at(
        &topo,
        &topo.q("g"),
        &["--exec", &cmd],
        &["--prefetch", "2"],
        "localhost",
        false,
    );
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "m-1", b"{}").await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            dir.lines("done") == ["m-1"]
        })
        .await
    );
}

fn consume_usage_error(topo: &Topo, args: &[&str]) -> String {
    let group = topo.q("g");
    let mut all = vec!["consume", "-f", topo.file(), "--group", &group];
    all.extend_from_slice(args);
    let o = warren().args(&all).output_within(CLI_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    err
}

/// `--http localhost:8080` (no scheme, as one writes an address) used to
/// be refused with "only http:// is supported", and `--http
/// 127.0.0.1:8080` with "relative URL without a base": neither says what to
/// write.
#[test]
fn an_http_url_without_its_scheme_is_refused_with_the_url_to_give() {
    let topo = Topo::new("usagehttp", &[GROUP]);
    for (given, want) in [
        ("localhost:8080", "http://localhost:8080"),
        ("127.0.0.1:8080/orders", "http://127.0.0.1:8080/orders"),
        ("svc:8080", "http://svc:8080"),
    ] {
        let err = consume_usage_error(&topo, &["--http", given]);
        assert_eq!(
            err,
            format!(
                "error: --http {given:?} has no http:// in front: give the whole URL the \
                 service takes the POSTs on, such as {want}\n"
            )
        );
    }
    let err = consume_usage_error(&topo, &["--http", "https://svc/orders"]);
    assert_eq!(
        err,
        "error: --http https://svc/orders: only http:// is supported (put TLS in front of the \
         worker's local service)\n"
    );
}

/// `warren consume --help` is where someone writing a handler looks: it
/// names what an `--exec` command and an `--http` service receive, and the
/// exit codes a supervisor sees. It used to say neither.
#[test]
fn consume_help_says_what_a_handler_gets_and_the_exit_codes() {
    let out = warren()
        .args(["consume", "--help"])
        .output_within(CLI_LIMIT);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for text in [
        "WARREN_MESSAGE_ID",
        "WARREN_ATTEMPT",
        "WARREN_ROUTING_KEY",
        "WARREN_GROUP",
        "WARREN_REDELIVERED",
        "X-Warren-Message-Id",
        "X-Warren-Attempt",
        "X-Warren-Routing-Key",
        "X-Warren-Redelivered",
        "traceparent",
        "Exit codes: 0 ",
        "130 (SIGINT)",
        "143 (SIGTERM)",
    ] {
        assert!(help.contains(text), "{text:?} not in:\n{help}");
    }
}

#[test]
fn bad_handler_and_limit_flags_are_usage_errors_that_say_what_to_do() {
    let topo = Topo::new(
        "usage2",
        &["name = \"{p}.g\"\nexchange = \"{p}.orders\"\nprefetch = 32\nconcurrency = 8\n"],
    );
    for blank in ["", "   "] {
        let err = consume_usage_error(&topo, &["--exec", blank]);
        assert_eq!(
            err,
            "error: --exec needs a command: an empty one would succeed for, ack and discard every message\n"
        );
    }
    let err = consume_usage_error(&topo, &["--exec", "true", "--prefetch", "2"]);
    assert_eq!(
        err,
        format!(
            "error: concurrency 8 (group \"{}\" in {}) is above prefetch 2 (--prefetch): the extra handlers could never be busy; give --concurrency 2 or less, or a --prefetch of at least 8\n",
            topo.q("g"),
            topo.file()
        )
    );
    // The range clap names is the one allowed (70000 used to say 0..=65535,
    // and 0 was refused afterwards).
    for flag in ["--prefetch", "--concurrency"] {
        for value in ["0", "70000"] {
            let err = consume_usage_error(&topo, &["--exec", "true", flag, value]);
            assert!(
                err.contains(&format!("{value} is not in 1..=65535")),
                "{err}"
            );
        }
    }
    let err = consume_usage_error(&topo, &["--exec", "true", "--metrics-addr", "9464"]);
    assert!(
        err.contains("expected HOST:PORT, e.g. 127.0.0.1:9464, localhost:9464 or [::1]:9464"),
        "{err}"
    );
}

#[test]
fn a_consumer_error_names_the_group_once() {
    // Not applied: the work queue does not exist.
    let topo = Topo::new("noqueue", &[GROUP]);
    let group = topo.q("g");
    let o = warren()
        .args([
            "consume",
            "-f",
            topo.file(),
            "--group",
            &group,
            "--exec",
            "true",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .output_within(CLI_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!(
            "error: consumer group \"{group}\": queue \"{group}\" does not exist on the broker (run `warren topology apply` first)"
        )),
        "{err}"
    );
    assert_eq!(err.matches("consumer group").count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_redirects_are_not_followed_and_the_error_names_the_location() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let topo = Topo::new("redirect", &[GROUP]);
    topo.apply();
    // POST /h answers a redirect to /moved; /moved takes anything with 200.
    // reqwest's default policy turned a 302 into a GET without the body that
    // /moved acked: the message was acked and its body never delivered.
    let moved = Arc::new(AtomicUsize::new(0));
    let m = moved.clone();
    let app = Router::new()
        .route(
            "/h",
            post(|body: axum::body::Bytes| async move {
                let status = if body.starts_with(b"302") {
                    StatusCode::FOUND
                } else {
                    StatusCode::TEMPORARY_REDIRECT
                };
                (status, [("location", "/moved")], "see /moved")
            }),
        )
        .route(
            "/moved",
            axum::routing::any(move || {
                m.fetch_add(1, Ordering::SeqCst);
                async { "ok" }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/h", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let w = Worker::start(&topo, &topo.q("g"), &["--http", &url], &[]);
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "r-302", b"302").await;
    publish(&conn, &topo.exchange(), "order.created", "r-307", b"307").await;
    let dead_q = topo.q("g.dead");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            count(&conn, &dead_q).await == 2
        })
        .await,
        "a redirect is not a success: {} dead letters, /moved called {} times; log:\n{}",
        count(&conn, &dead_q).await,
        moved.load(Ordering::SeqCst),
        w.log_text()
    );
    assert_eq!(moved.load(Ordering::SeqCst), 0, "a redirect was followed");
    let dead = dead_by_id(drain(&conn, &dead_q).await);
    assert_eq!(
        header_str(&dead["r-302"], "x-warren-error").as_deref(),
        Some("HTTP 302 Found to /moved (redirects are not followed: give --http the final URL): see /moved")
    );
    assert_eq!(
        header_str(&dead["r-307"], "x-warren-error").as_deref(),
        Some("HTTP 307 Temporary Redirect to /moved (redirects are not followed: give --http the final URL): see /moved")
    );
    assert_eq!(
        header_str(&dead["r-307"], "x-warren-error-kind").as_deref(),
        Some("retryable")
    );
}

/// `warren consume` for group `g` of `topo` with `--exec cmd`, expected to
/// refuse to start: returns its exit code and stderr.
fn refused_exec(topo: &Topo, cmd: &str) -> (Option<i32>, String) {
    let group = topo.q("g");
    let o = warren()
        .args([
            "consume",
            "-f",
            topo.file(),
            "--group",
            &group,
            "--exec",
            cmd,
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .output_within(Duration::from_secs(20));
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_program_that_cannot_run_is_refused_before_consuming() {
    use std::os::unix::fs::PermissionsExt;
    let topo = Topo::new("noexec", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "keep-1", b"{}").await;
    let dir = Scratch::new("noexecdir");
    let script = dir.path("handler.sh");
    std::fs::write(&script, "#!/bin/sh\ncat > /dev/null\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let missing = dir.path("missing.sh");
    let cwd = std::env::current_dir().unwrap();
    // Each of these used to consume: every message failed (126 or 127),
    // went through the retry tiers and was dead-lettered.
    for (cmd, said) in [
        (
            format!("{script} --verbose"),
            format!(
                "error: --exec \"{script} --verbose\": {script} is not executable: \
                 run `chmod +x {script}`, or give --exec \"sh {script}\"\n"
            ),
        ),
        (
            missing.clone(),
            format!(
                "error: --exec \"{missing}\": {missing} does not exist \
                 (a relative path starts from {}): give the handler's path\n",
                cwd.display()
            ),
        ),
        (
            dir.0.display().to_string(),
            format!(
                "error: --exec \"{0}\": {0} is a directory, not a program\n",
                dir.0.display()
            ),
        ),
        (
            "no-such-handler-xyz < /dev/null".to_owned(),
            "error: --exec \"no-such-handler-xyz < /dev/null\": no command \"no-such-handler-xyz\" \
             on PATH, nor a shell builtin: install it or give its path\n"
                .to_owned(),
        ),
    ] {
        let (code, err) = refused_exec(&topo, &cmd);
        assert_eq!((code, err.as_str()), (Some(2), said.as_str()), "{cmd}");
    }
    assert_eq!(
        count(&conn, &topo.q("g")).await,
        1,
        "the message is waiting"
    );
    assert_eq!(count(&conn, &topo.q("g.retry.1")).await, 0);
    assert_eq!(count(&conn, &topo.q("g.dead")).await, 0);

    // What the check cannot judge runs: a builtin first, quotes, a variable.
    let done = dir.path("done");
    let w = Worker::start(
        &topo,
        &topo.q("g"),
        &[
            "--exec",
            &format!("read -r x; \"echo\" \"$WARREN_MESSAGE_ID\" >> {done}"),
        ],
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            dir.lines("done") == ["keep-1"]
        })
        .await,
        "log:\n{}",
        w.log_text()
    );
}

#[test]
fn a_metrics_port_in_use_is_said_once() {
    let topo = Topo::new("portused", &[GROUP]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let group = topo.q("g");
    let o = warren()
        .args([
            "consume",
            "-f",
            topo.file(),
            "--group",
            &group,
            "--exec",
            "true",
            "--metrics-addr",
            &addr,
        ])
        .output_within(CLI_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!(
            "error: cannot listen on {addr} for /metrics: Address already in use (os error 98) \
             (pick another with --metrics-addr)\n"
        )
    );
}

/// `warren consume` for group `g` of `topo` at the default verbosity (unless
/// `args` says `-v`), logging in with `url`, which `--exec` commands inherit
/// as `WARREN_AMQP_URL`; `/metrics` on a free port of 127.0.0.1. Returns once
/// `/readyz` answers 200.
async fn quiet_worker(topo: &Topo, url: &str, args: &[&str]) -> Worker {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("{}-{port}.log", topo.p));
    let (group, addr) = (topo.q("g"), format!("127.0.0.1:{port}"));
    let mut all = vec![
        "consume",
        "-f",
        topo.file(),
        "--group",
        &group,
        "--metrics-addr",
        &addr,
    ];
    all.extend_from_slice(args);
    let child = warren()
        .env("WARREN_AMQP_URL", url)
        .args(&all)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut w = Worker { child, port, log };
    let up = wait_until(Duration::from_secs(20), || async { ready(&w) }).await;
    assert!(up, "worker not ready in 20s; log:\n{}", w.log_text());
    assert!(w.child.try_wait().unwrap().is_none(), "{}", w.log_text());
    w
}

/// The password of an AMQP URL (`amqp://user:password@host...`).
fn password_of(url: &str) -> &str {
    let rest = url.split_once("://").unwrap().1;
    let userinfo = rest.rsplit_once('@').unwrap().0;
    userinfo.split_once(':').unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_password_a_command_prints_is_masked_in_dead_letters_and_logs() {
    let topo = Topo::new("execpw", &[GROUP]);
    topo.apply();
    let user = warren_testkit::TempUser::create();
    let url = user.url().expose().to_owned();
    let password = password_of(&url).to_owned();
    assert!(password.len() >= 8, "{password}");
    let masked_url = url.replace(&format!(":{password}@"), ":***@");
    // What `set -x`, `env` or a crash dump shows: the URL a handler inherits
    // (warren's own), and its password alone.
    let cmd = "cat > /dev/null; echo \"connecting to $WARREN_AMQP_URL\" >&2; \
               pw=${WARREN_AMQP_URL#*://*:}; echo \"password=${pw%%@*}\" >&2; \
               env | grep '^WARREN_AMQP_URL=' >&2; exit 1";
    let w = quiet_worker(&topo, &url, &["-v", "--exec", cmd]).await;
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "pw-1", b"{}").await;
    let dead_q = topo.q("g.dead");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            count(&conn, &dead_q).await == 1
        })
        .await,
        "log:\n{}",
        w.log_text()
    );
    let dead = dead_by_id(drain(&conn, &dead_q).await);
    assert_eq!(
        header_str(&dead["pw-1"], "x-warren-error").as_deref(),
        Some(
            format!(
                "command exited with 1: connecting to {masked_url} password=*** \
                 WARREN_AMQP_URL={masked_url}"
            )
            .as_str()
        )
    );
    let log = w.log_text();
    assert!(!log.contains(&password), "the password in the log:\n{log}");
    assert!(log.contains("handler failed; retrying later"), "{log}");
    assert!(
        log.contains(&format!("connecting to {masked_url}")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_password_an_http_service_echoes_is_masked_in_dead_letters_and_logs() {
    let topo = Topo::new("httpecho", &[GROUP]);
    topo.apply();
    let user = warren_testkit::TempUser::create();
    let url = user.url().expose().to_owned();
    let password = password_of(&url).to_owned();
    let masked_url = url.replace(&format!(":{password}@"), ":***@");
    // A service that tells what it was configured with.
    let said = format!("cannot log in with {url} (password {password})");
    let app = Router::new().route(
        "/h",
        post(move || {
            let said = said.clone();
            async move { (StatusCode::BAD_REQUEST, said) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/h", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let w = quiet_worker(&topo, &url, &["-v", "--http", &endpoint]).await;
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "pw-2", b"{}").await;
    let dead_q = topo.q("g.dead");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            count(&conn, &dead_q).await == 1
        })
        .await,
        "log:\n{}",
        w.log_text()
    );
    let dead = dead_by_id(drain(&conn, &dead_q).await);
    assert_eq!(
        header_str(&dead["pw-2"], "x-warren-error").as_deref(),
        Some(
            format!("HTTP 400 Bad Request: cannot log in with {masked_url} (password ***)")
                .as_str()
        )
    );
    let log = w.log_text();
    assert!(!log.contains(&password), "the password in the log:\n{log}");
    assert!(log.contains("handler failed; dead-lettered"), "{log}");
}

/// The lines of a log that are not WARN events.
fn not_warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| !l.contains(" WARN ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_says_when_it_starts_and_stops_at_the_default_level() {
    let topo = Topo::new("hello", &[GROUP]);
    topo.apply();
    let cmd = "cat > /dev/null; [ \"$WARREN_MESSAGE_ID\" = ok-1 ] || exit 65";
    let mut w = quiet_worker(
        &topo,
        URL,
        &["--exec", cmd, "--prefetch", "4", "--concurrency", "2"],
    )
    .await;
    let group = topo.q("g");
    let start = format!(
        "consuming group \"{group}\": queue \"{group}\", prefetch 4, concurrency 2, \
         handler sh -c \"cat > /dev/null; [ \\\"$WARREN_MESSAGE_ID\\\" = ok-1 ] || exit 65\"; \
         metrics on http://127.0.0.1:{}/metrics",
        w.port
    );
    assert_eq!(not_warnings(&w.log_text()), [start.as_str()]);

    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "ok-1", b"{}").await;
    publish(&conn, &topo.exchange(), "order.created", "bad-1", b"{}").await;
    let handled = format!("warren_handled_total{{group=\"{group}\"");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            w.metrics()
                .lines()
                .filter(|l| l.starts_with(&handled))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
                == 2.0
        })
        .await,
        "{}",
        w.metrics()
    );
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(15)), Some(0));
    let stop = format!(
        "stopped consuming group \"{group}\": 2 handled (1 acked, 0 retried, 1 dead-lettered)"
    );
    assert_eq!(not_warnings(&w.log_text()), [start.as_str(), stop.as_str()]);
}

/// A message whose dead-letter copy can never be published (its headers
/// fit the consumer's 4 KiB frames alone, not with the failure headers
/// added) is rejected, and the broker dead-letters it. The stop line counts
/// it: it used to say "1 handled (0 acked, 0 retried, 1 dead-lettered)"
/// while two messages had been handled and both were in `{group}.dead`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_line_counts_messages_the_broker_dead_lettered_on_a_reject() {
    use lapin::types::{AMQPValue, FieldTable};
    let topo = Topo::new("rejectline", &[GROUP]);
    topo.apply();
    // A 1 KiB error: more than the frame has room for next to the blob.
    let cmd = "cat > /dev/null; head -c 1500 /dev/zero | tr '\\0' x >&2; exit 65";
    let mut w = quiet_worker(&topo, &format!("{URL}?frame_max=4096"), &["--exec", cmd]).await;
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "small-1", b"{}").await;
    let mut headers = FieldTable::default();
    headers.insert(
        "blob".into(),
        AMQPValue::LongString("y".repeat(3500).into()),
    );
    let props = lapin::BasicProperties::default()
        .with_message_id("big-1".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    warren_testkit::publish(&conn, &topo.exchange(), "order.created", b"{}", props).await;
    let dead = topo.q("g.dead");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            count(&conn, &dead).await == 2
        })
        .await,
        "{} dead letters; log:\n{}",
        count(&conn, &dead).await,
        w.log_text()
    );
    let group = topo.q("g");
    let rejected = format!("warren_handled_total{{group=\"{group}\",outcome=\"reject\"}}");
    assert_eq!(w.metric(&rejected), 1.0, "{}", w.metrics());
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(15)), Some(0));
    let stop = format!(
        "stopped consuming group \"{group}\": 2 handled (0 acked, 0 retried, 1 dead-lettered, \
         1 rejected: the broker dead-lettered them unchanged, as their copy could not be \
         published)"
    );
    let log = w.log_text();
    assert!(log.lines().any(|l| l == stop), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_json_logs_the_start_and_stop_are_json_events() {
    let topo = Topo::new("hellojson", &[GROUP]);
    topo.apply();
    let port = free_port();
    let endpoint = format!("http://svc:hookpw-4711@127.0.0.1:{port}/h");
    let mut w = quiet_worker(&topo, URL, &["--log-format", "json", "--http", &endpoint]).await;
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(15)), Some(0));
    let log = w.log_text();
    assert!(!log.contains("hookpw"), "{log}");
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let info: Vec<&serde_json::Value> = events.iter().filter(|e| e["level"] == "INFO").collect();
    assert_eq!(info.len(), 2, "{log}");
    let group = topo.q("g");
    assert_eq!(
        info[0]["fields"],
        serde_json::json!({
            "message": "consuming", "group": group, "queue": group, "prefetch": 32,
            "concurrency": 16, "handler": format!("POST http://svc:***@127.0.0.1:{port}/h"),
            "metrics": format!("http://127.0.0.1:{}/metrics", w.port),
        })
    );
    assert_eq!(
        info[1]["fields"],
        serde_json::json!({
            "message": "stopped consuming", "group": group, "handled": 0, "acked": 0,
            "retried": 0, "dead_lettered": 0, "rejected": 0, "requeued": 0, "unfinished": 0,
        })
    );
}

#[test]
fn consume_warns_of_the_lints_of_its_group_at_start() {
    let topo = Topo::new(
        "lints",
        &[
            "name = \"{p}.g\"\nexchange = \"{p}.orders\"\nbindings = [\"order.*\"]\nhandler_timeout = \"30m\"\n",
            "name = \"{p}.other\"\nexchange = \"{p}.orders\"\nqueue_type = \"classic\"\n",
        ],
    );
    // Not applied: the lints come before the consumer fails to find its queue.
    let group = topo.q("g");
    let o = warren()
        .args([
            "consume",
            "-f",
            topo.file(),
            "--group",
            &group,
            "--exec",
            "true",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .output_within(CLI_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let warnings: Vec<&str> = err
        .lines()
        .filter_map(|l| l.split_once(" WARN warren::cmd::consume: ").map(|(_, w)| w))
        .collect();
    assert_eq!(
        warnings,
        [
            format!("topology lint: quorum work queue without delivery_limit: a message that crashes every consumer is redelivered forever (RabbitMQ 3.x) or dropped after 20 tries (4.x); set delivery_limit group={group}"),
            format!("topology lint: handler_timeout 30m is at or over RabbitMQ's default consumer_timeout (30m): the broker closes the channel of a delivery unacked that long, before warren's timeout fires, and redelivers the message; raise the broker's consumer_timeout (rabbitmq.conf, in milliseconds) above handler_timeout plus the time a delivery waits for a free handler, or lower handler_timeout group={group}"),
        ],
        "{err}"
    );
    assert!(!err.contains("no bindings"), "another group's lint: {err}");
}

/// `consume --output json`: when it stops, the last line of stdout is the
/// stop line's counts as JSON (after what the `--exec` commands printed),
/// and the log is on stderr as before; a run that fails before consuming
/// prints `{"error": ...}`. (Before: nothing on stdout but the commands'
/// output.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_output_json_the_counts_are_the_last_line_of_stdout() {
    let topo = Topo::new("outjson", &[GROUP]);
    topo.apply();
    let port = free_port();
    let log = std::env::temp_dir().join(format!("{}-{port}.log", topo.p));
    let out = std::env::temp_dir().join(format!("{}-{port}.out", topo.p));
    let (group, addr) = (topo.q("g"), format!("127.0.0.1:{port}"));
    let cmd = "echo \"handled $WARREN_MESSAGE_ID\"; [ \"$WARREN_MESSAGE_ID\" = ok-1 ] || exit 65";
    let child = warren()
        .args([
            "consume",
            "-f",
            topo.file(),
            "--group",
            &group,
            "--metrics-addr",
            &addr,
            "--exec",
            cmd,
            "--output",
            "json",
        ])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut w = Worker { child, port, log };
    assert!(
        wait_until(Duration::from_secs(20), || async { ready(&w) }).await,
        "worker not ready in 20s; log:\n{}",
        w.log_text()
    );
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "ok-1", b"{}").await;
    publish(&conn, &topo.exchange(), "order.created", "bad-1", b"{}").await;
    let handled = format!("warren_handled_total{{group=\"{group}\"");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            w.metrics()
                .lines()
                .filter(|l| l.starts_with(&handled))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
                == 2.0
        })
        .await,
        "{}",
        w.metrics()
    );
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(15)), Some(0));
    let stdout = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    let (last, before) = lines.split_last().expect("a line on stdout");
    let mut printed = before.to_vec();
    printed.sort_unstable();
    assert_eq!(printed, ["handled bad-1", "handled ok-1"], "{stdout}");
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "group": group, "handled": 2, "acked": 1, "retried": 0, "dead_lettered": 1,
            "rejected": 0, "requeued": 0, "unfinished": 0, "error": null,
        })
    );
    let stop = format!(
        "stopped consuming group \"{group}\": 2 handled (1 acked, 0 retried, 1 dead-lettered)"
    );
    assert!(w.log_text().lines().any(|l| l == stop), "{}", w.log_text());

    // Before consuming: the error, as JSON, exit 1.
    let other = Topo::new("outjsonmissing", &[GROUP]);
    let o = warren()
        .args([
            "consume",
            "-f",
            other.file(),
            "--group",
            &other.q("g"),
            "--metrics-addr",
            "127.0.0.1:0",
            "--exec",
            "true",
            "--output",
            "json",
        ])
        .output_within(CLI_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(err.contains(message), "{message} not in {err}");
    assert!(message.contains(&other.q("g")), "{message}");
}

/// `warren consume --output json` for group `g` of `topo`, logging in with
/// `url`, `/metrics` on a free port of 127.0.0.1; stdout goes to the
/// returned file. Does not wait for it to be ready.
fn json_worker(topo: &Topo, url: &str, args: &[&str]) -> (Worker, std::path::PathBuf) {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("{}-{port}.log", topo.p));
    let out = std::env::temp_dir().join(format!("{}-{port}.out", topo.p));
    let (group, addr) = (topo.q("g"), format!("127.0.0.1:{port}"));
    let mut all = vec![
        "consume",
        "-f",
        topo.file(),
        "--group",
        &group,
        "--metrics-addr",
        &addr,
        "--output",
        "json",
    ];
    all.extend_from_slice(args);
    let child = warren()
        .env("WARREN_AMQP_URL", url)
        .args(&all)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (Worker { child, port, log }, out)
}

/// The lines of a file, which is then removed.
fn take_lines(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let _ = std::fs::remove_file(path);
    text.lines().map(str::to_owned).collect()
}

/// A handler still running when the shutdown grace ends is stopped and its
/// delivery goes back to the queue: the stop line and the JSON counts say
/// so. They used to say "1 handled (1 acked, 0 retried, 0 dead-lettered)"
/// and nothing of the command killed mid-work (the library's line about it
/// is at INFO), so a grace too short for the handlers went unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_stopped_at_the_end_of_the_grace_is_counted_unfinished() {
    let topo = Topo::new("unfinished", &[SLOW_GROUP]);
    topo.apply();
    let dir = Scratch::new("unfinisheddir");
    let cmd = format!(
        "cat > /dev/null; echo $$ >> {}; [ \"$WARREN_MESSAGE_ID\" = hang-1 ] && exec sleep 47; \
         exit 0",
        dir.path("pids")
    );
    let (mut w, out) = json_worker(&topo, URL, &["--exec", &cmd, "--grace", "300ms"]);
    assert!(
        wait_until(Duration::from_secs(20), || async { ready(&w) }).await,
        "worker not ready in 20s; log:\n{}",
        w.log_text()
    );
    let conn = connect().await;
    publish(&conn, &topo.exchange(), "order.created", "ok-1", b"{}").await;
    publish(&conn, &topo.exchange(), "order.created", "hang-1", b"{}").await;
    let group = topo.q("g");
    let acked = format!("warren_handled_total{{group=\"{group}\",outcome=\"ack\"}}");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            w.metric(&acked) == 1.0 && dir.lines("pids").len() == 2
        })
        .await,
        "{}",
        w.log_text()
    );
    w.sigterm();
    assert_eq!(
        w.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        w.log_text()
    );
    let log = w.log_text();
    let stop = format!(
        "stopped consuming group \"{group}\": 1 handled (1 acked, 0 retried, 0 dead-lettered), \
         1 unfinished (still running at the end of the 300ms grace: stopped, and their \
         deliveries went back to the queue)"
    );
    assert!(log.lines().any(|l| l == stop), "{log}");
    let stdout = take_lines(&out);
    let v: serde_json::Value = serde_json::from_str(stdout.last().expect("a line")).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "group": group, "handled": 1, "acked": 1, "retried": 0, "dead_lettered": 0,
            "rejected": 0, "requeued": 0, "unfinished": 1, "error": null,
        })
    );
    wait_gone(&dir, "pids", 2).await;
    requeued_untouched(&topo, "hang-1").await;
}

/// A worker stopped before it could consume (here the broker cannot be
/// reached) says so, exits 0 as after any drain, and with `--output json`
/// still ends stdout with its counts. It used to print nothing at all: no
/// stop line, and an empty stdout where a supervisor reads the JSON line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_before_consuming_started_still_says_it_stopped() {
    let topo = Topo::new("stopearly", &[GROUP]);
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let (mut w, out) = json_worker(&topo, &url, &["--exec", "true"]);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            w.log_text()
                .contains("connecting to the broker failed; retrying")
        })
        .await,
        "{}",
        w.log_text()
    );
    w.sigterm();
    assert_eq!(
        w.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        w.log_text()
    );
    let group = topo.q("g");
    let log = w.log_text();
    let stop = format!("stopped group \"{group}\" before it started consuming: nothing handled");
    assert!(log.lines().any(|l| l == stop), "{log}");
    assert!(!log.contains("stopped consuming"), "{log}");
    let stdout = take_lines(&out);
    assert_eq!(stdout.len(), 1, "{stdout:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout[0]).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "group": group, "handled": 0, "acked": 0, "retried": 0, "dead_lettered": 0,
            "rejected": 0, "requeued": 0, "unfinished": 0, "error": null,
        })
    );
}
