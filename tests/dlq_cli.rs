//! `warren dlq` as an operator runs it: a replay killed with SIGKILL loses
//! nothing, Ctrl-C stops a replay cleanly, the audit log records every
//! run, and `watch` keeps its gauges and webhook honest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use warren_topology::{headers, lapin, ConnectOptions, Plan, Topology, DEAD_LETTER_EXCHANGE};

fn url() -> String {
    std::env::var("WARREN_AMQP_URL").unwrap_or_else(|_| warren_topology::DEFAULT_AMQP_URL.into())
}

async fn connect() -> Connection {
    warren_topology::connect(&ConnectOptions::new(url().parse().unwrap(), "test"))
        .await
        .unwrap()
}

/// A one-group topology under a unique prefix; deleted on drop.
struct Env {
    group: String,
    orders: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Env {
    async fn new(conn: &Connection, tag: &str) -> Env {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let prefix = format!("dlqcli-{tag}-{}-{nanos}.", std::process::id());
        let t = Topology::parse(
            "[[exchange]]\nname = \"orders\"\nkind = \"topic\"\n\n[[group]]\nname = \"g\"\nexchange = \"orders\"\nbindings = [\"o.#\"]\nqueue_type = \"classic\"\nretry = [\"1s\"]\n",
            "t.toml",
        )
        .unwrap()
        .with_prefix(&prefix);
        let plan = Plan::new(&t);
        warren_topology::apply(conn, &plan).await.unwrap();
        Env {
            group: format!("{prefix}g"),
            orders: format!("{prefix}orders"),
            queues: plan.queues.iter().map(|q| q.name.clone()).collect(),
            exchanges: plan
                .exchanges
                .iter()
                .map(|e| e.name.clone())
                .filter(|n| n != DEAD_LETTER_EXCHANGE)
                .collect(),
        }
    }
    fn dead(&self) -> String {
        format!("{}.dead", self.group)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let (queues, exchanges) = (self.queues.clone(), self.exchanges.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let conn = connect().await;
                let ch = conn.create_channel().await.unwrap();
                for q in queues {
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for e in exchanges {
                    let _ = ch
                        .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
            });
        })
        .join();
    }
}

/// Publishes `n` dead letters with ids `{tag}-{i}` to `warren.dlx`, confirmed.
async fn dead_letters(conn: &Connection, group: &str, tag: &str, n: usize) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut pending = Vec::new();
    for i in 0..n {
        let mut h = FieldTable::default();
        h.insert("x-warren-attempts".into(), AMQPValue::LongLongInt(3));
        h.insert(
            "x-warren-error-kind".into(),
            AMQPValue::LongString("permanent".into()),
        );
        h.insert(
            "x-warren-error".into(),
            AMQPValue::LongString(format!("order {i} broke").into()),
        );
        let p = BasicProperties::default()
            .with_message_id(format!("{tag}-{i}").into())
            .with_delivery_mode(2)
            .with_headers(h);
        pending.push(
            ch.basic_publish(
                DEAD_LETTER_EXCHANGE.into(),
                group.into(),
                BasicPublishOptions::default(),
                format!("{{\"i\":{i}}}").as_bytes(),
                p,
            )
            .await
            .unwrap(),
        );
        if pending.len() >= 500 {
            for c in pending.drain(..) {
                assert!(c.await.unwrap().is_ack());
            }
        }
    }
    for c in pending {
        assert!(c.await.unwrap().is_ack());
    }
    let _ = ch.close(200, "ok".into()).await;
}

async fn count(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = ch.close(200, "ok".into()).await;
    q.message_count()
}

async fn ids(conn: &Connection, queue: &str) -> Vec<String> {
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        );
    }
    out
}

async fn wait_for(within: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn warren() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_warren"));
    c.env("WARREN_AMQP_URL", url()).env_remove("RUST_LOG");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_killed_with_sigkill_then_run_again_loses_nothing() {
    const N: usize = 5_000;
    let conn = connect().await;
    let env = Env::new(&conn, "kill").await;
    dead_letters(&conn, &env.group, "k", N).await;
    assert_eq!(count(&conn, &env.dead()).await as usize, N);

    // Slow enough (2,000/s) to be killed in the middle.
    let mut child = warren()
        .args([
            "dlq", "replay", "--group", &env.group, "--all", "--rate", "2000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let g = env.group.clone();
    assert!(
        wait_for(Duration::from_secs(20), async || count(&conn, &g).await
            >= 1_000)
        .await,
        "replay did not start"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let moved_before = count(&conn, &env.group).await as usize;
    assert!(
        moved_before < N,
        "killed too late: {moved_before} already replayed"
    );
    // The killed process's unacked dead letters come back.
    let (g, d) = (env.group.clone(), env.dead());
    assert!(
        wait_for(
            Duration::from_secs(10),
            async || (count(&conn, &g).await + count(&conn, &d).await) as usize >= N
        )
        .await,
        "messages missing after the kill"
    );

    let out = warren()
        .args(["dlq", "replay", "--group", &env.group, "--all"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&conn, &env.dead()).await, 0);
    let work = ids(&conn, &env.group).await;
    let seen: HashSet<&String> = work.iter().collect();
    for i in 0..N {
        assert!(seen.contains(&format!("k-{i}")), "k-{i} lost");
    }
    assert!(work.len() >= N);
    eprintln!(
        "replayed {} messages for {N} dead letters ({} duplicates from the kill)",
        work.len(),
        work.len() - N
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_gauges_follow_the_queue_and_the_webhook_fires_once_per_interval() {
    use axum::routing::post;
    let conn = connect().await;
    let env = Env::new(&conn, "watch").await;
    // A webhook receiver.
    let alerts: Arc<Mutex<Vec<(Instant, serde_json::Value)>>> = Arc::default();
    let a = alerts.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: axum::body::Bytes| {
            let a = a.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                a.lock().unwrap().push((Instant::now(), v));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let mut child = warren()
        .args([
            "dlq",
            "watch",
            "--group",
            &env.group,
            "--interval",
            "1s",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--webhook",
            &hook,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let gauge = |name: &'static str| {
        let (url, group) = (metrics_url.clone(), env.group.clone());
        async move {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            let prefix = format!("{name}{{group=\"{group}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
        }
    };
    assert!(
        wait_for(Duration::from_secs(15), async || gauge(
            "warren_dead_letters"
        )
        .await
            == Some(0.0))
        .await,
        "watch never measured"
    );

    dead_letters(&conn, &env.group, "w", 3).await;
    assert!(
        wait_for(Duration::from_secs(10), async || gauge(
            "warren_dead_letters"
        )
        .await
            == Some(3.0))
        .await
    );
    assert!(
        wait_for(Duration::from_secs(10), async || !alerts
            .lock()
            .unwrap()
            .is_empty())
        .await,
        "no webhook alert"
    );
    // Three more, spread over several intervals: alerts never come faster than one per interval.
    for _ in 0..3 {
        dead_letters(&conn, &env.group, "x", 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        wait_for(Duration::from_secs(10), async || gauge(
            "warren_dead_letters"
        )
        .await
            == Some(6.0))
        .await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    {
        let got = alerts.lock().unwrap();
        let total_new: u64 = got.iter().map(|(_, v)| v["new"].as_u64().unwrap()).sum();
        assert_eq!(total_new, 6, "{got:?}");
        assert!(got.iter().all(|(_, v)| v["group"] == env.group.as_str()));
        for w in got.windows(2) {
            assert!(
                w[1].0 - w[0].0 >= Duration::from_millis(700),
                "two alerts within one interval: {got:?}"
            );
        }
    }
    let oldest = gauge("warren_dead_letter_oldest_seconds").await;
    assert!(oldest.is_some(), "no oldest gauge");

    // They leave: the gauges follow.
    ids(&conn, &env.dead()).await;
    assert!(
        wait_for(Duration::from_secs(10), async || gauge(
            "warren_dead_letters"
        )
        .await
            == Some(0.0))
        .await
    );
    assert_eq!(gauge("warren_dead_letter_oldest_seconds").await, Some(0.0));

    // SIGTERM stops it.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "watch did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Helpers for the tests below.

/// Headers the consumer sets when it dead-letters (no time: see `at`).
fn warren_headers(env: &Env, kind: &str, error: &str, routing_key: &str) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(4));
    h.insert(
        headers::ERROR_KIND.into(),
        AMQPValue::LongString(kind.into()),
    );
    h.insert(headers::ERROR.into(), AMQPValue::LongString(error.into()));
    h.insert(
        headers::ORIGINAL_EXCHANGE.into(),
        AMQPValue::LongString(env.orders.as_str().into()),
    );
    h.insert(
        headers::ORIGINAL_ROUTING_KEY.into(),
        AMQPValue::LongString(routing_key.into()),
    );
    h
}

fn props(id: &str, h: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2)
        .with_headers(h)
}

/// Publishes one message (mandatory) and waits for its confirm.
async fn publish(conn: &Connection, exchange: &str, key: &str, p: BasicProperties, body: &[u8]) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let c = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            p,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        c.is_ack() && c.take_message().is_none(),
        "{exchange}/{key}: not routed"
    );
    let _ = ch.close(200, "ok".into()).await;
}

/// One dead letter into `env`'s dead-letter queue, as the consumer sends it.
async fn dead_letter(conn: &Connection, env: &Env, p: BasicProperties, body: &[u8]) {
    publish(conn, DEAD_LETTER_EXCHANGE, &env.group, p, body).await;
}

/// Waits until `queue` holds exactly `n` ready messages (what a closed
/// channel held comes back asynchronously).
async fn settle(conn: &Connection, queue: &str, n: usize) {
    let mut last = 0;
    assert!(
        wait_for(Duration::from_secs(10), async || {
            last = count(conn, queue).await as usize;
            last == n
        })
        .await,
        "{queue}: {last} messages, expected {n}"
    );
}

/// The ids in `queue`, head first, read without taking them (held
/// unacked, then put back by closing the channel). `n`: how many it holds.
async fn peek_ids(conn: &Connection, queue: &str, n: usize) -> Vec<String> {
    settle(conn, queue, n).await;
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        out.push(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        );
    }
    ch.close(200, "peeked".into()).await.unwrap();
    settle(conn, queue, n).await;
    out
}

/// Takes every message of `queue` (after it holds `n`) and returns the ids.
async fn take_ids(conn: &Connection, queue: &str, n: usize) -> Vec<String> {
    settle(conn, queue, n).await;
    ids(conn, queue).await
}

fn names(tag: &str, is: impl IntoIterator<Item = usize>) -> Vec<String> {
    is.into_iter().map(|i| format!("{tag}-{i}")).collect()
}

fn run(args: &[&str]) -> std::process::Output {
    warren().args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits for a child to exit within `within`; SIGKILLs it and fails otherwise.
fn output_within(child: std::process::Child, within: Duration) -> std::process::Output {
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("warren did not exit within {within:?}");
        }
    }
}

/// The one summary line of a replay for `group`, and its replayed count.
fn summary<'a>(stdout: &'a str, group: &str) -> (&'a str, usize) {
    let prefix = format!("{group}: ");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no summary for {group}: {stdout}"));
    let n = line[prefix.len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no count in {line:?}"));
    (line, n)
}

// ---------------------------------------------------------------------------
// Ctrl-C.

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_mid_replay_stops_after_the_current_message_losing_and_duplicating_nothing() {
    const N: usize = 300;
    let conn = connect().await;
    let env = Env::new(&conn, "int").await;
    dead_letters(&conn, &env.group, "c", N).await;

    let child = warren()
        .args([
            "dlq", "replay", "--group", &env.group, "--all", "--rate", "50",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // About a second in (50/s): the replay runs, so its Ctrl-C handler is in place.
    let g = env.group.clone();
    assert!(
        wait_for(Duration::from_secs(15), async || count(&conn, &g).await
            >= 50)
        .await,
        "replay did not start"
    );
    let signalled = Instant::now();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = output_within(child, Duration::from_secs(15));
    let took = signalled.elapsed();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        took < Duration::from_secs(3),
        "{took:?} to stop after Ctrl-C"
    );
    // It ended by itself (a signal death has no code) and calls a partial run a failure.
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("stopping after the current message (Ctrl-C)"),
        "{stderr}"
    );
    let (line, replayed) = summary(&stdout, &env.group);
    assert_eq!(
        line,
        format!(
            "{g}: {replayed} replayed to work queue {g:?}, 0 failed (left in the dead-letter queue), stopped early",
            g = env.group
        )
    );
    assert!((50..N).contains(&replayed), "replayed {replayed} of {N}");

    // A clean stop: every copy in flight was confirmed and its dead letter
    // acked, nothing more. So the work queue holds exactly the head of the
    // dead-letter queue, once each, in order, and the rest stayed, in order.
    let all = names("c", 0..N);
    assert_eq!(
        take_ids(&conn, &env.dead(), N - replayed).await,
        all[replayed..]
    );
    assert_eq!(take_ids(&conn, &env.group, replayed).await, all[..replayed]);
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_while_a_slow_replay_waits_for_its_rate_stops_at_once_and_sends_nothing_more() {
    let conn = connect().await;
    let env = Env::new(&conn, "intslow").await;
    dead_letters(&conn, &env.group, "s", 5).await;

    // One message per 5 s: the first goes at once, the second is due 5 s later.
    let child = warren()
        .args([
            "dlq", "replay", "--group", &env.group, "--all", "--rate", "0.2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let g = env.group.clone();
    assert!(
        wait_for(Duration::from_secs(15), async || count(&conn, &g).await
            == 1)
        .await,
        "replay did not start"
    );
    let signalled = Instant::now();
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = output_within(child, Duration::from_secs(15));
    let took = signalled.elapsed();
    let stdout = text(&out.stdout);
    assert!(
        took < Duration::from_secs(2),
        "{took:?} to stop after Ctrl-C: it waited for the rate instead"
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let (line, replayed) = summary(&stdout, &env.group);
    assert_eq!(replayed, 1, "{line}");
    assert!(line.ends_with(", stopped early"), "{line}");
    assert_eq!(take_ids(&conn, &env.dead(), 4).await, names("s", 1..5));
    assert_eq!(take_ids(&conn, &env.group, 1).await, names("s", 0..1));
}

// ---------------------------------------------------------------------------
// Audit log.

fn audit_lines(file: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_log_gets_one_json_line_per_group_per_run_and_later_runs_append() {
    use serde_json::json;
    let conn = connect().await;
    let a = Env::new(&conn, "audita").await;
    let b = Env::new(&conn, "auditb").await;
    for (env, tag) in [(&a, "a"), (&b, "b")] {
        for i in 0..4 {
            let kind = if i % 2 == 0 { "permanent" } else { "timeout" };
            let h = warren_headers(env, kind, "boom", "o.created");
            dead_letter(&conn, env, props(&format!("{tag}-{i}"), h), b"{}").await;
        }
    }
    let dir = std::env::temp_dir().join(format!("warren-audit-{}", a.group));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&file);
    let f = file.to_str().unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let since = SystemTime::now() - Duration::from_secs(1);
    let as_user = |user: &str, args: &[&str]| {
        let out = warren().env("USER", user).args(args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    };

    // A replay across two groups: one line each.
    as_user(
        "auditor-1",
        &[
            "dlq",
            "replay",
            "--group",
            &a.group,
            "--group",
            &b.group,
            "--kind",
            "timeout",
            "--audit-log",
            f,
        ],
    );
    let lines = audit_lines(&file);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let selection = json!({
        "ids": [], "fingerprint": null, "error": null, "kind": "timeout", "routing_key": null,
        "older_than": null, "newer_than": null, "limit": null, "all": false
    });
    for (line, env, tag) in [(&lines[0], &a, "a"), (&lines[1], &b, "b")] {
        let at = humantime::parse_rfc3339(line["at"].as_str().unwrap()).unwrap();
        assert!(at >= since && at <= SystemTime::now(), "{line}");
        let mut rest = line.clone();
        rest.as_object_mut().unwrap().remove("at");
        assert_eq!(
            rest,
            json!({
                "action": "replay", "user": "auditor-1", "host": host, "group": env.group,
                "selection": selection, "target": "work-queue", "dry_run": false,
                "count": 2, "ids": names(tag, [1, 3]),
            })
        );
    }
    let first_run = std::fs::read_to_string(&file).unwrap();

    // A dry run is recorded as one: nothing counted, the ids it would take.
    as_user(
        "auditor-1",
        &[
            "dlq",
            "replay",
            "--group",
            &a.group,
            "--all",
            "--dry-run",
            "--audit-log",
            f,
        ],
    );
    let lines = audit_lines(&file);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["action"], "replay");
    assert_eq!(lines[2]["dry_run"], true);
    assert_eq!(lines[2]["count"], 0);
    assert_eq!(lines[2]["ids"], json!(names("a", [0, 2])));
    assert_eq!(lines[2]["selection"]["all"], true);
    assert_eq!(peek_ids(&conn, &a.dead(), 2).await, names("a", [0, 2]));

    // A purge by another user: one line per group, no target.
    as_user(
        "auditor-2",
        &[
            "dlq",
            "purge",
            "--group",
            &a.group,
            "--group",
            &b.group,
            "--kind",
            "permanent",
            "--yes",
            "--audit-log",
            f,
        ],
    );
    let after = std::fs::read_to_string(&file).unwrap();
    assert!(after.starts_with(&first_run), "the audit log was rewritten");
    let lines = audit_lines(&file);
    assert_eq!(lines.len(), 5, "{after}");
    for (line, env, tag) in [(&lines[3], &a, "a"), (&lines[4], &b, "b")] {
        let mut rest = line.clone();
        rest.as_object_mut().unwrap().remove("at");
        let mut selection = selection.clone();
        selection["kind"] = json!("permanent");
        assert_eq!(
            rest,
            json!({
                "action": "purge", "user": "auditor-2", "host": host, "group": env.group,
                "selection": selection, "dry_run": false, "count": 2,
                "ids": names(tag, [0, 2]),
            })
        );
    }
    settle(&conn, &a.dead(), 0).await;
    settle(&conn, &b.dead(), 0).await;
    assert_eq!(take_ids(&conn, &a.group, 2).await, names("a", [1, 3]));
    assert_eq!(take_ids(&conn, &b.group, 2).await, names("b", [1, 3]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_audit_log_that_cannot_be_written_stops_replay_and_purge_before_they_touch_anything() {
    let conn = connect().await;
    let env = Env::new(&conn, "auditbad").await;
    dead_letters(&conn, &env.group, "u", 3).await;
    let file = format!("/nonexistent-{}/audit.jsonl", env.group);
    for args in [
        vec!["dlq", "replay", "--group", &env.group, "--all"],
        vec!["dlq", "purge", "--group", &env.group, "--all", "--yes"],
    ] {
        let mut args = args.clone();
        args.extend(["--audit-log", &file]);
        let out = run(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: --audit-log {file}: ")),
            "{stderr}"
        );
        assert_eq!(peek_ids(&conn, &env.dead(), 3).await, names("u", 0..3));
        assert_eq!(count(&conn, &env.group).await, 0);
    }
}
