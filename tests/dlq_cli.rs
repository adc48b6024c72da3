//! `warren dlq` as an operator runs it: a replay killed with SIGKILL loses
//! nothing, Ctrl-C stops a replay cleanly, purge asks before it deletes,
//! the audit log records every run, selections take exactly what they say,
//! `show`/`list` print what is there, and `watch` keeps its gauges and
//! webhook honest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::{connect, count, drain, wait_within, warren, OutputWithin, CLI_LIMIT, URL};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use warren_testkit::Cleanup;
use warren_topology::{headers, lapin, Plan, Topology, DEAD_LETTER_EXCHANGE};

/// A one-group topology under a unique prefix; deleted on drop.
struct Env {
    group: String,
    orders: String,
    /// The prefixed topology as a `warren.toml` text.
    toml: String,
    _cleanup: Cleanup,
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
            toml: t.to_toml(),
            _cleanup: Cleanup::new(&plan).at(URL.parse().unwrap()),
        }
    }
    fn dead(&self) -> String {
        format!("{}.dead", self.group)
    }
    /// Writes the topology to a file in the temp dir (removed on drop).
    fn topology_file(&self) -> TempFile {
        let path = std::env::temp_dir().join(format!("{}toml", self.group));
        std::fs::write(&path, &self.toml).unwrap();
        TempFile(path)
    }
}

/// A file removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a
/// test that fails before it stops the child (an assert that panics) leaves
/// no `warren` running behind it. Derefs to the [`Child`].
struct Running(Option<Child>);

impl Running {
    /// Spawns `cmd`.
    fn spawn(cmd: &mut Command) -> Running {
        Running(Some(cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {:?}: {e}", cmd.get_program())
        })))
    }

    /// [`wait_within`] on the child: its output once it exits, or a kill
    /// and a panic at the deadline.
    fn wait_within(mut self, within: Duration) -> std::process::Output {
        wait_within(self.0.take().expect("a running child"), within)
    }
}

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("a running child")
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("a running child")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Publishes `n` dead letters with ids `{tag}-{i}` to `warren.dlx`, confirmed.
async fn dead_letters(conn: &Connection, group: &str, tag: &str, n: usize) {
    padded_dead_letters(conn, group, tag, n, 0).await;
}

/// [`dead_letters`] whose bodies hold `pad` more bytes (none: `{"i":N}`).
async fn padded_dead_letters(conn: &Connection, group: &str, tag: &str, n: usize, pad: usize) {
    let padding = if pad == 0 {
        String::new()
    } else {
        format!(",\"pad\":\"{}\"", "x".repeat(pad))
    };
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
                format!("{{\"i\":{i}{padding}}}").as_bytes(),
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

#[tokio::test(flavor = "multi_thread")]
async fn replay_killed_with_sigkill_then_run_again_loses_nothing() {
    const N: usize = 5_000;
    let conn = connect().await;
    let env = Env::new(&conn, "kill").await;
    dead_letters(&conn, &env.group, "k", N).await;
    assert_eq!(count(&conn, &env.dead()).await as usize, N);

    // Slow enough (2,000/s) to be killed in the middle.
    let mut child = Running::spawn(
        warren()
            .args([
                "dlq", "replay", "--group", &env.group, "--all", "--rate", "2000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
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
        .output_within(CLI_LIMIT);
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

    let mut child = Running::spawn(
        warren()
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
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    // Read stderr on a thread so the pipe never fills.
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
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
    // At the default log level, a line per new dead letter naming it.
    let log = log.join().unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("new dead letter"))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    assert!(lines.iter().any(|l| l.contains("w-0")), "{log}");
}

// ---------------------------------------------------------------------------
// Helpers for the tests below.

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

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

/// `h` with `x-warren-dead-lettered-at` set to `ago` before now.
fn at(mut h: FieldTable, ago: Duration) -> FieldTable {
    h.insert(
        headers::DEAD_LETTERED_AT.into(),
        AMQPValue::LongString(rfc3339(SystemTime::now() - ago).into()),
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
    warren_testkit::publish(conn, exchange, key, body, p).await;
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

/// Takes every message of `queue` and returns the ids, head first.
async fn ids(conn: &Connection, queue: &str) -> Vec<String> {
    drain(conn, queue)
        .await
        .into_iter()
        .map(|(id, _, _)| id)
        .collect()
}

fn names(tag: &str, is: impl IntoIterator<Item = usize>) -> Vec<String> {
    is.into_iter().map(|i| format!("{tag}-{i}")).collect()
}

fn run(args: &[&str]) -> std::process::Output {
    warren().args(args).output_within(CLI_LIMIT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `warren` and asserts it exited 0; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "warren {args:?}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs `warren args` on a pseudo-terminal (util-linux `script`), so that
/// its stdin is a terminal: waits for `prompt`, types `answer` and Enter.
/// Returns everything the terminal showed (echo included) and the exit code.
fn on_a_terminal(args: &[&str], prompt: &str, answer: &str) -> (String, Option<i32>) {
    on_a_terminal_then(args, prompt, &|| {}, answer)
}

/// [`on_a_terminal`], calling `meanwhile` once the prompt is shown and
/// before the answer is typed.
fn on_a_terminal_then(
    args: &[&str],
    prompt: &str,
    meanwhile: &dyn Fn(),
    answer: &str,
) -> (String, Option<i32>) {
    use std::io::{Read, Write};
    use std::sync::mpsc::RecvTimeoutError;
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let line = std::iter::once(env!("CARGO_BIN_EXE_warren"))
        .chain(args.iter().copied())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Running::spawn(
        Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("WARREN_AMQP_URL", URL)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    // Each phase may take long on a loaded machine (a debug build, the
    // broker's CLI in `meanwhile`): a deadline that only a hang reaches.
    let deadline = Instant::now() + CLI_LIMIT;
    let mut shown = Vec::new();
    while !text(&shown).contains(prompt) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(chunk) => shown.extend(chunk),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no prompt {prompt:?}; the terminal showed {:?}",
                    text(&shown)
                );
            }
        }
    }
    meanwhile();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{answer}\n").as_bytes()).unwrap();
    drop(stdin);
    let deadline = Instant::now() + CLI_LIMIT;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(chunk) => shown.extend(chunk),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!(
                    "no exit after the answer; the terminal showed {:?}",
                    text(&shown)
                );
            }
        }
    }
    reader.join().unwrap();
    let status = child.wait().unwrap();
    (text(&shown), status.code())
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

    let child = Running::spawn(
        warren()
            .args([
                "dlq", "replay", "--group", &env.group, "--all", "--rate", "50",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
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
    let out = child.wait_within(Duration::from_secs(15));
    let took = signalled.elapsed();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        took < Duration::from_secs(3),
        "{took:?} to stop after Ctrl-C"
    );
    // It ended by itself (a signal death has no code) with the code of an
    // interrupted run.
    assert_eq!(
        out.status.code(),
        Some(130),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("stopping after the current message (Ctrl-C again to quit at once)"),
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
    slow_replay_stopped_by("-INT", 130, "intslow").await;
}

/// SIGTERM (a deploy, `timeout`, a supervisor) stops a replay the same way
/// and exits 143 (128 + 15), not Ctrl-C's 130.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_slow_replay_like_ctrl_c_and_exits_143() {
    slow_replay_stopped_by("-TERM", 143, "termslow").await;
}

async fn slow_replay_stopped_by(signal: &str, code: i32, name: &str) {
    let conn = connect().await;
    let env = Env::new(&conn, name).await;
    dead_letters(&conn, &env.group, "s", 5).await;

    // One message per 5 s: the first goes at once, the second is due 5 s later.
    let child = Running::spawn(
        warren()
            .args([
                "dlq", "replay", "--group", &env.group, "--all", "--rate", "0.2",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let g = env.group.clone();
    assert!(
        wait_for(Duration::from_secs(15), async || count(&conn, &g).await
            == 1)
        .await,
        "replay did not start"
    );
    let signalled = Instant::now();
    assert!(Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_within(Duration::from_secs(15));
    let took = signalled.elapsed();
    let stdout = text(&out.stdout);
    assert!(
        took < Duration::from_secs(2),
        "{took:?} to stop after {signal}: it waited for the rate instead"
    );
    assert_eq!(out.status.code(), Some(code), "{stdout}");
    let (line, replayed) = summary(&stdout, &env.group);
    assert_eq!(replayed, 1, "{line}");
    assert!(line.ends_with(", stopped early"), "{line}");
    assert_eq!(take_ids(&conn, &env.dead(), 4).await, names("s", 1..5));
    assert_eq!(take_ids(&conn, &env.group, 1).await, names("s", 0..1));
}

// ---------------------------------------------------------------------------
// Purge confirmation.

#[tokio::test(flavor = "multi_thread")]
async fn purge_without_yes_and_without_a_terminal_refuses_with_exit_2_and_deletes_nothing() {
    use std::io::Write;
    let conn = connect().await;
    let env = Env::new(&conn, "noyes").await;
    dead_letters(&conn, &env.group, "p", 5).await;

    // stdin closed, and stdin a pipe that says "y": neither is a person answering.
    for piped_yes in [false, true] {
        let mut child = Running::spawn(
            warren()
                .args(["dlq", "purge", "--group", &env.group, "--all"])
                .stdin(if piped_yes {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"y\n");
        }
        let out = child.wait_within(Duration::from_secs(15));
        assert_eq!(out.status.code(), Some(2), "piped yes: {piped_yes}");
        assert_eq!(
            text(&out.stderr),
            "error: purge asks for confirmation and stdin is not a terminal; add --yes\n"
        );
        assert_eq!(text(&out.stdout), "");
        assert_eq!(
            peek_ids(&conn, &env.dead(), 5).await,
            names("p", 0..5),
            "piped yes: {piped_yes}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_on_a_terminal_asks_with_the_count_then_n_deletes_nothing_and_y_exactly_the_selection(
) {
    let conn = connect().await;
    let env = Env::new(&conn, "tty").await;
    // p-0, p-2, p-4 permanent; p-1, p-3, p-5 timeouts.
    for i in 0..6 {
        let kind = if i % 2 == 0 { "permanent" } else { "timeout" };
        let h = warren_headers(&env, kind, &format!("failed {i}"), "o.created");
        dead_letter(&conn, &env, props(&format!("p-{i}"), h), b"{}").await;
    }
    let args = ["dlq", "purge", "--group", &env.group, "--kind", "timeout"];
    let prompt = format!("Delete 3 dead letters (3 from {})? [y/N] ", env.dead());

    // Declining is not a failure.
    let (shown, code) = on_a_terminal(&args, "[y/N] ", "n");
    assert!(shown.contains(&prompt), "{shown:?}");
    assert!(shown.contains("nothing deleted"), "{shown:?}");
    assert_eq!(code, Some(0), "{shown:?}");
    assert_eq!(peek_ids(&conn, &env.dead(), 6).await, names("p", 0..6));

    let (shown, code) = on_a_terminal(&args, "[y/N] ", "y");
    assert!(shown.contains(&prompt), "{shown:?}");
    assert!(
        shown.contains(&format!("{}: 3 purged", env.group)),
        "{shown:?}"
    );
    assert_eq!(code, Some(0), "{shown:?}");
    assert_eq!(take_ids(&conn, &env.dead(), 3).await, names("p", [0, 2, 4]));
    assert_eq!(count(&conn, &env.group).await, 0);
}

/// A purge that deletes nothing (declined at the prompt, or nothing
/// matched) keeps no archive: the file would hold copies of dead letters
/// that are still in their queue (importing it would duplicate them), and
/// it made the same command, run again to answer `y`, fail on "File
/// exists".
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_that_deletes_nothing_keeps_no_archive_and_can_be_run_again() {
    let conn = connect().await;
    let env = Env::new(&conn, "noarch").await;
    dead_letters(&conn, &env.group, "a", 3).await;
    let dir = std::env::temp_dir().join(format!("warren-noarch-{}", env.group));
    std::fs::create_dir_all(&dir).unwrap();
    let archive = dir.join("purged.jsonl");
    let a = archive.to_str().unwrap();
    let args = [
        "dlq",
        "purge",
        "--group",
        &env.group,
        "--all",
        "--archive",
        a,
    ];

    let (shown, code) = on_a_terminal(&args, "[y/N] ", "n");
    assert_eq!(code, Some(0), "{shown:?}");
    assert!(shown.contains("nothing deleted"), "{shown:?}");
    assert!(!archive.exists(), "declined, yet an archive is kept");
    assert_eq!(peek_ids(&conn, &env.dead(), 3).await, names("a", 0..3));

    // Nothing matches: no (empty) archive either.
    let out = run(&[
        "dlq",
        "purge",
        "--group",
        &env.group,
        "--id",
        "nope",
        "--yes",
        "--archive",
        a,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!archive.exists(), "nothing matched, yet an archive is kept");

    // The same command, answered `y` this time: archived, then deleted.
    let (shown, code) = on_a_terminal(&args, "[y/N] ", "y");
    assert_eq!(code, Some(0), "{shown:?}");
    assert!(
        shown.contains(&format!("{}: 3 purged", env.group)),
        "{shown:?}"
    );
    assert_eq!(op_ids(&archive), names("a", 0..3));
    assert_eq!(count(&conn, &env.dead()).await, 0);
    let _ = std::fs::remove_dir_all(&dir);
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
        let out = warren()
            .env("USER", user)
            .args(args)
            .output_within(CLI_LIMIT);
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

// ---------------------------------------------------------------------------
// Selection on the broker.

#[tokio::test(flavor = "multi_thread")]
async fn replay_by_fingerprint_from_stats_moves_exactly_that_failure_group() {
    let conn = connect().await;
    let env = Env::new(&conn, "fp").await;
    let errors = [
        (
            "permanent",
            "order 17 not found for customer 9f1c2b7e-1111-4a4a-8b8b-0123456789ab (request deadbeef0042)",
        ),
        ("permanent", "order 17 already paid"),
        (
            "permanent",
            "order 99 not found for customer 00000000-2222-4b4b-9c9c-abcdefabcdef (request a1b2c3d4e5f6)",
        ),
        // The same text of another kind is another failure group.
        (
            "timeout",
            "order 17 not found for customer 9f1c2b7e-1111-4a4a-8b8b-0123456789ab (request deadbeef0042)",
        ),
        (
            "permanent",
            "order 123456 not found for customer a1b2c3d4-0000-4000-8000-00000000beef (request 0x7ffd1234)",
        ),
    ];
    for (i, (kind, error)) in errors.iter().enumerate() {
        let h = warren_headers(&env, kind, error, "o.created");
        dead_letter(&conn, &env, props(&format!("f-{i}"), h), b"{}").await;
    }

    let stats: serde_json::Value = serde_json::from_str(&ok(&[
        "dlq", "stats", "--group", &env.group, "--output", "json",
    ]))
    .unwrap();
    let s = &stats[0];
    assert_eq!(s["count"], 5);
    assert_eq!(
        s["by_kind"],
        serde_json::json!({"permanent": 4, "timeout": 1})
    );
    let groups = s["failure_groups"].as_array().unwrap();
    // Largest first (ties in fingerprint order): (count, kind, example id).
    let mut seen: Vec<(u64, &str, &str)> = groups
        .iter()
        .map(|g| {
            (
                g["count"].as_u64().unwrap(),
                g["kind"].as_str().unwrap(),
                g["example_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen[0], (3, "permanent", "f-0"), "{groups:?}");
    seen.sort_unstable();
    assert_eq!(
        seen,
        [
            (1, "permanent", "f-1"),
            (1, "timeout", "f-3"),
            (3, "permanent", "f-0")
        ],
        "{groups:?}"
    );
    assert_eq!(groups[0]["example"], errors[0].1);
    let fp = groups[0]["fingerprint"].as_str().unwrap();
    assert_eq!(fp.len(), 12, "{fp}");

    let out = ok(&["dlq", "replay", "--group", &env.group, "--fingerprint", fp]);
    assert_eq!(summary(&out, &env.group).1, 3, "{out}");
    assert_eq!(take_ids(&conn, &env.group, 3).await, names("f", [0, 2, 4]));
    assert_eq!(take_ids(&conn, &env.dead(), 2).await, names("f", [1, 3]));
}

#[tokio::test(flavor = "multi_thread")]
async fn older_than_and_newer_than_select_by_the_time_it_was_dead_lettered() {
    let conn = connect().await;
    let env = Env::new(&conn, "age").await;
    let now = SystemTime::now();
    let secs = |ago: Duration| (now - ago).duration_since(UNIX_EPOCH).unwrap().as_secs();
    let h = || warren_headers(&env, "permanent", "boom", "o.created");
    let (min, hour) = (Duration::from_secs(60), Duration::from_secs(3600));
    // t-0: x-warren-dead-lettered-at 3 h ago.
    dead_letter(&conn, &env, props("t-0", at(h(), 3 * hour)), b"{}").await;
    // t-1: 10 min ago.
    dead_letter(&conn, &env, props("t-1", at(h(), 10 * min)), b"{}").await;
    // t-2: no header; the AMQP timestamp says 5 h ago.
    dead_letter(
        &conn,
        &env,
        props("t-2", h()).with_timestamp(secs(5 * hour)),
        b"{}",
    )
    .await;
    // t-3: dead-lettered by the broker (x-death, no warren headers) 2 h ago.
    let mut death = FieldTable::default();
    death.insert("reason".into(), AMQPValue::LongString("rejected".into()));
    death.insert(
        "queue".into(),
        AMQPValue::LongString(env.group.as_str().into()),
    );
    death.insert("time".into(), AMQPValue::Timestamp(secs(2 * hour)));
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    let mut x = FieldTable::default();
    x.insert(
        headers::X_DEATH.into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    dead_letter(&conn, &env, props("t-3", x), b"{}").await;
    // t-4: no time at all: no age, so neither filter takes it.
    dead_letter(&conn, &env, props("t-4", h()), b"{}").await;
    // t-5: 30 s ago.
    dead_letter(
        &conn,
        &env,
        props("t-5", at(h(), Duration::from_secs(30))),
        b"{}",
    )
    .await;
    // t-6: the header (1 min ago) wins over the AMQP timestamp (10 h ago).
    dead_letter(
        &conn,
        &env,
        props("t-6", at(h(), min)).with_timestamp(secs(10 * hour)),
        b"{}",
    )
    .await;
    let replay = |extra: &[&str]| {
        let mut args = vec!["dlq", "replay", "--group", env.group.as_str()];
        args.extend_from_slice(extra);
        ok(&args)
    };

    replay(&["--older-than", "5m", "--newer-than", "4h"]);
    assert_eq!(take_ids(&conn, &env.group, 3).await, names("t", [0, 1, 3]));
    replay(&["--older-than", "1h"]);
    assert_eq!(take_ids(&conn, &env.group, 1).await, names("t", [2]));
    replay(&["--newer-than", "1h"]);
    assert_eq!(take_ids(&conn, &env.group, 2).await, names("t", [5, 6]));
    assert_eq!(take_ids(&conn, &env.dead(), 1).await, names("t", [4]));
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_takes_the_first_n_matches_from_the_head_of_the_queue() {
    let conn = connect().await;
    let env = Env::new(&conn, "limit").await;
    // l-0, l-2, l-4, l-6 permanent; l-1, l-3, l-5, l-7 timeouts.
    for i in 0..8 {
        let kind = if i % 2 == 0 { "permanent" } else { "timeout" };
        let h = warren_headers(&env, kind, "boom", "o.created");
        dead_letter(&conn, &env, props(&format!("l-{i}"), h), b"{}").await;
    }
    // A limit alone selects nothing explicitly: refused.
    let out = run(&["dlq", "replay", "--group", &env.group, "--limit", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("nothing selected"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(count(&conn, &env.group).await, 0);

    let out = run(&[
        "dlq", "replay", "--group", &env.group, "--kind", "timeout", "--limit", "2",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(summary(&stdout, &env.group).1, 2, "{stdout}");
    // Stopping at the limit is what was asked: no advice to scan more.
    assert!(!stderr.contains("scan-limit"), "{stderr}");
    assert_eq!(take_ids(&conn, &env.group, 2).await, names("l", [1, 3]));
    ok(&[
        "dlq", "replay", "--group", &env.group, "--all", "--limit", "3",
    ]);
    assert_eq!(take_ids(&conn, &env.group, 3).await, names("l", [0, 2, 4]));
    // purge takes the limit the same way.
    let out = ok(&[
        "dlq", "purge", "--group", &env.group, "--all", "--limit", "1", "--yes",
    ]);
    assert!(out.contains(&format!("{}: 1 purged", env.group)), "{out}");
    // The scan limit, not a selection, leaving messages unread is worth a
    // warning.
    let out = run(&["dlq", "list", "--group", &env.group, "--scan-limit", "1"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("scanned 1 of 2 (raise --scan-limit to read more)"),
        "{stderr}"
    );
    assert_eq!(take_ids(&conn, &env.dead(), 2).await, names("l", [6, 7]));
}

#[tokio::test(flavor = "multi_thread")]
async fn kind_and_routing_key_select_on_the_broker_including_broker_dead_letters() {
    let conn = connect().await;
    let env = Env::new(&conn, "kindrk").await;
    let put = async |id: &str, kind: &str, rk: &str| {
        let h = warren_headers(&env, kind, "boom", rk);
        dead_letter(&conn, &env, props(id, h), b"{}").await;
    };
    put("k-0", "permanent", "o.created").await;
    put("k-1", "timeout", "o.paid").await;
    put("k-2", "permanent", "o.paid").await;
    // k-3: the broker dead-letters it (rejected from the work queue); only
    // x-death says it came through "o.paid".
    publish(
        &conn,
        &env.orders,
        "o.paid",
        BasicProperties::default().with_message_id("k-3".into()),
        b"{}",
    )
    .await;
    {
        let ch = conn.create_channel().await.unwrap();
        let got = ch
            .basic_get(env.group.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        got.delivery
            .acker
            .reject(lapin::options::BasicRejectOptions { requeue: false })
            .await
            .unwrap();
        let _ = ch.close(200, "ok".into()).await;
    }
    settle(&conn, &env.dead(), 3 + 1).await;
    put("k-4", "timeout", "o.created").await;
    let replay = |extra: &[&str]| {
        let mut args = vec!["dlq", "replay", "--group", env.group.as_str()];
        args.extend_from_slice(extra);
        ok(&args)
    };

    // Criteria are ANDed.
    replay(&["--kind", "permanent", "--routing-key", "o.paid"]);
    assert_eq!(take_ids(&conn, &env.group, 1).await, names("k", [2]));
    replay(&["--routing-key", "o.paid"]);
    assert_eq!(take_ids(&conn, &env.group, 2).await, names("k", [1, 3]));
    replay(&["--kind", "timeout"]);
    assert_eq!(take_ids(&conn, &env.group, 1).await, names("k", [4]));
    assert_eq!(take_ids(&conn, &env.dead(), 1).await, names("k", [0]));
}

// ---------------------------------------------------------------------------
// show and list.

#[tokio::test(flavor = "multi_thread")]
async fn show_prints_json_bodies_as_json_and_binary_ones_as_hex_and_list_json_has_every_field() {
    use serde_json::json;
    let conn = connect().await;
    let env = Env::new(&conn, "show").await;
    let h = || {
        at(
            warren_headers(&env, "decode", "bad body", "o.created"),
            Duration::from_secs(90),
        )
    };
    dead_letter(&conn, &env, props("s-json", h()), br#"{"a":[1,2],"b":"x"}"#).await;
    dead_letter(&conn, &env, props("s-bin", h()), &[0xff, 0x00, 0xfe, 0x80]).await;
    dead_letter(&conn, &env, props("s-text", h()), b"plain words").await;
    let exact = br#"{"z":1,"a":1.50,"big":12345678901234567890123}"#;
    dead_letter(&conn, &env, props("s-exact", h()), exact).await;

    // --output json: an array of every dead letter with that id.
    let show = |id: &str| -> serde_json::Value {
        let args = ["dlq", "show", id, "--group", &env.group, "--output", "json"];
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let v = show("s-bin");
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["body"], json!({"hex": "ff00fe80"}));
    assert_eq!(v[0]["position"], 1);
    assert_eq!(v[0]["group"], env.group.as_str());
    assert_eq!(v[0]["info"]["id"], "s-bin");
    assert_eq!(v[0]["properties"]["message_id"], "s-bin");
    assert_eq!(v[0]["properties"]["headers"][headers::ERROR_KIND], "decode");
    let v = show("s-json");
    assert_eq!(
        v[0]["body"],
        json!({"json": {"a": [1, 2], "b": "x"}, "text": r#"{"a":[1,2],"b":"x"}"#})
    );
    // A parse sorts keys and rounds numbers: `text` is the body as published.
    let v = show("s-exact");
    assert_eq!(v[0]["body"]["text"], std::str::from_utf8(exact).unwrap());
    let out = ok(&["dlq", "show", "s-exact", "--group", &env.group]);
    assert!(
        out.ends_with(&format!(
            "body ({} bytes, JSON)\n  {}\n",
            exact.len(),
            std::str::from_utf8(exact).unwrap()
        )),
        "{out}"
    );
    let v = show("s-text");
    assert_eq!(v[0]["body"], json!({"text": "plain words"}));
    // Table output: labelled lines, not JSON.
    let out = ok(&["dlq", "show", "s-json", "--group", &env.group]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&out).is_err(),
        "{out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "id             s-json", "{out}");
    assert_eq!(
        lines[1],
        format!("queue          {} (position 0)", env.dead())
    );
    assert_eq!(lines[2], "kind           decode");
    assert_eq!(lines[3], "error          bad body");
    let header = lines.iter().position(|l| *l == "headers").unwrap();
    assert!(
        lines[header..]
            .iter()
            .any(|l| l.split_whitespace().eq(["x-warren-error-kind", "decode"])),
        "{out}"
    );
    assert!(lines.contains(&"  message_id         s-json"), "{out}");
    let body = lines.iter().position(|l| l.starts_with("body")).unwrap();
    assert_eq!(
        lines[body..],
        [
            "body (19 bytes, JSON)",
            "  {",
            "    \"a\": [",
            "      1,",
            "      2",
            "    ],",
            "    \"b\": \"x\"",
            "  }"
        ]
    );
    let out = ok(&["dlq", "show", "s-bin", "--group", &env.group]);
    assert!(out.ends_with("body (4 bytes, hex)\n  ff00fe80\n"), "{out}");
    let out = ok(&["dlq", "show", "s-text", "--group", &env.group]);
    assert!(
        out.ends_with("body (11 bytes, text)\n  plain words\n"),
        "{out}"
    );
    let out = run(&["dlq", "show", "nope", "--group", &env.group]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("no dead letter with id \"nope\" in {}\n", env.group)
    );

    let l: serde_json::Value = serde_json::from_str(&ok(&[
        "dlq", "list", "--group", &env.group, "--output", "json",
    ]))
    .unwrap();
    let l = &l.as_array().unwrap()[0];
    assert_eq!(l["group"], env.group.as_str());
    assert_eq!(l["queue"], env.dead());
    assert_eq!(
        l["coverage"],
        json!({"scanned": 4, "total": 4, "scan_limit_reached": false})
    );
    let ms = l["messages"].as_array().unwrap();
    let ids: Vec<&str> = ms.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["s-json", "s-bin", "s-text", "s-exact"]);
    let m = &ms[1];
    let mut keys: Vec<&str> = m.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "age_seconds",
            "attempts",
            "dead_lettered_at",
            "error",
            "fingerprint",
            "id",
            "kind",
            "original_exchange",
            "original_routing_key",
            "position",
            "replays",
            "size"
        ]
    );
    let age = m["age_seconds"].as_u64().unwrap();
    assert!((89..200).contains(&age), "age {age}");
    let mut rest = m.clone();
    for k in ["age_seconds", "dead_lettered_at", "fingerprint"] {
        rest.as_object_mut().unwrap().remove(k);
    }
    assert_eq!(
        rest,
        json!({
            "position": 1, "id": "s-bin", "attempts": 4, "replays": 0, "kind": "decode",
            "error": "bad body", "original_exchange": env.orders,
            "original_routing_key": "o.created", "size": 4,
        })
    );
    // Reading changed nothing.
    assert_eq!(
        peek_ids(&conn, &env.dead(), 4).await,
        ["s-json", "s-bin", "s-text", "s-exact"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn output_into_a_closed_pipe_exits_141_quietly_and_every_dead_letter_stays_in_order() {
    const N: usize = 300;
    let conn = connect().await;
    let env = Env::new(&conn, "pipe").await;
    dead_letters(&conn, &env.group, "p", N).await;
    for args in [
        ["dlq", "list", "--group", env.group.as_str()],
        ["dlq", "stats", "--group", env.group.as_str()],
    ] {
        let mut child = Running::spawn(
            warren()
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        // The reader goes away before warren writes a line, as `| head`
        // does after its lines: every write then fails with EPIPE.
        drop(child.stdout.take());
        let out = child.wait_within(Duration::from_secs(60));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert_eq!(peek_ids(&conn, &env.dead(), N).await, names("p", 0..N));
}

/// `export -` writes the JSON Lines to stdout and nothing else (the summary
/// goes to stderr; before, it created a file named `-`), refuses `--remove`,
/// ends with 141 when the reader goes away; `import -` reads stdin. Each
/// leaves the queue as it says.
#[tokio::test(flavor = "multi_thread")]
async fn export_and_import_dash_are_stdout_and_stdin() {
    const N: usize = 5;
    let conn = connect().await;
    let env = Env::new(&conn, "dash").await;
    dead_letters(&conn, &env.group, "d", N).await;
    let g = env.group.as_str();
    let file = env.topology_file();
    // Run where a file named `-` would show.
    let dir = std::env::temp_dir().join(format!("warren-dash-{g}"));
    std::fs::create_dir_all(&dir).unwrap();
    let in_dir = |args: &[&str]| {
        warren()
            .current_dir(&dir)
            .args(["-f", file.path(), "dlq"])
            .args(args)
            .output_within(CLI_LIMIT)
    };

    let mut exported = String::new();
    for output in ["table", "json"] {
        let out = in_dir(&["export", "-", "--group", g, "--output", output]);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{output}: {stderr}");
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{output}: not an export line ({e}): {l:?}"))
            })
            .collect();
        let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
        assert_eq!(ids, names("d", 0..N), "{output}: {stdout}");
        assert!(lines.iter().all(|l| l["group"] == g), "{stdout}");
        match output {
            "table" => assert_eq!(stderr, format!("{g}: {N} exported\n")),
            _ => {
                let report: serde_json::Value = serde_json::from_str(&stderr)
                    .unwrap_or_else(|e| panic!("the JSON report on stderr ({e}): {stderr:?}"));
                assert_eq!(report[0]["exported"], N, "{report}");
            }
        }
        assert!(!dir.join("-").exists(), "a file named '-' was written");
        exported = stdout;
    }
    assert_eq!(peek_ids(&conn, &env.dead(), N).await, names("d", 0..N));

    // --remove needs a file on disk: refused before anything moves.
    let out = in_dir(&["export", "-", "--group", g, "--remove"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("export to a file"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "");

    // The reader goes away: 141, quietly, and everything stays in order.
    let mut child = Running::spawn(
        warren()
            .current_dir(&dir)
            .args(["-f", file.path(), "dlq", "export", "-", "--group", g])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    drop(child.stdout.take());
    let out = child.wait_within(CLI_LIMIT);
    assert_eq!(out.status.code(), Some(141), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(peek_ids(&conn, &env.dead(), N).await, names("d", 0..N));

    // import -: the export, back from stdin, byte for byte.
    let before = drain(&conn, &env.dead()).await;
    assert_eq!(before.len(), N);
    let mut child = Running::spawn(
        warren()
            .current_dir(&dir)
            .args(["-f", file.path(), "dlq", "import", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(exported.as_bytes()).unwrap();
    }
    let out = child.wait_within(CLI_LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}: {N} imported\n", env.dead()));
    settle(&conn, &env.dead(), N).await;
    assert_eq!(drain(&conn, &env.dead()).await, before);

    // A bad line on stdin is named as such, and nothing is sent.
    let mut child = Running::spawn(
        warren()
            .current_dir(&dir)
            .args(["-f", file.path(), "dlq", "import", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{}not json\n", exported).as_bytes())
            .unwrap();
    }
    let out = child.wait_within(CLI_LIMIT);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("standard input:{}: not an export line", N + 1)),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(count(&conn, &env.dead()).await, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `purge --archive -` is refused (exit 2) before connecting: a purge
/// deletes only once its archive is on disk, and standard output is not
/// (before, it wrote a file named `-`). `./-` is the way to that file.
#[tokio::test(flavor = "multi_thread")]
async fn purge_archive_dash_is_refused_before_anything_moves_and_dot_slash_dash_is_a_file() {
    const N: usize = 3;
    let conn = connect().await;
    let env = Env::new(&conn, "pdash").await;
    dead_letters(&conn, &env.group, "a", N).await;
    let g = env.group.as_str();
    let file = env.topology_file();
    // Run where a file named `-` would show.
    let dir = std::env::temp_dir().join(format!("warren-pdash-{g}"));
    std::fs::create_dir_all(&dir).unwrap();
    let in_dir = |url: &str, args: &[&str]| {
        warren()
            .current_dir(&dir)
            .args(["-f", file.path(), "--amqp-url", url, "dlq", "purge"])
            .args(["--group", g, "--all"])
            .args(args)
            .stdin(Stdio::null())
            .output_within(CLI_LIMIT)
    };
    // No broker listens on port 1: a run that connected would fail with 1.
    let nowhere = "amqp://guest:guest@127.0.0.1:1/%2f";
    for (url, args) in [
        (URL, &["--yes", "--archive", "-"][..]),
        (URL, &["--yes", "--archive=-", "--output", "json"]),
        (nowhere, &["--yes", "--archive", "-"]),
        // Without --yes: the archive is named, not only the missing --yes.
        (URL, &["--archive", "-"]),
    ] {
        let out = in_dir(url, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert_eq!(
            text(&out.stderr),
            "error: purge --archive -: dead letters are deleted only once their archive is on disk, \
             and warren cannot know that what it writes to standard output is stored; \
             give --archive a file path (./- for a file named \"-\"), \
             or look first with warren dlq export - (which removes nothing)\n",
            "{args:?}"
        );
        if args.contains(&"json") {
            // One JSON document on stdout on every path: the usage error.
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["error"]["kind"], "usage", "{args:?}: {v}");
        } else {
            assert_eq!(text(&out.stdout), "", "{args:?}");
        }
        assert!(
            !dir.join("-").exists(),
            "{args:?}: a file named '-' was written"
        );
        assert_eq!(peek_ids(&conn, &env.dead(), N).await, names("a", 0..N));
    }

    // ./- is a file named `-`: archived, then deleted.
    let out = in_dir(URL, &["--yes", "--archive", "./-"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        format!("{g}: {N} purged\narchived {N} messages to ./-\n")
    );
    let archived = std::fs::read_to_string(dir.join("-")).unwrap();
    let ids: Vec<String> = archived
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, names("a", 0..N));
    settle(&conn, &env.dead(), 0).await;
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// --output json, escaping, input checks, ids not found, the audit user.

/// Parses stdout as one JSON document, or fails with what was printed.
fn json_of(out: &std::process::Output, what: &str) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}): {:?}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn with_output_json_stdout_is_json_only_even_when_there_is_nothing_to_do() {
    use serde_json::json;
    let conn = connect().await;
    let env = Env::new(&conn, "jsonnone").await;
    dead_letters(&conn, &env.group, "j", 2).await;
    let g = env.group.as_str();
    let dir = std::env::temp_dir().join(format!("warren-jsonnone-{g}"));
    std::fs::create_dir_all(&dir).unwrap();
    let export = dir.join("export.jsonl");
    let _ = std::fs::remove_file(&export);
    let empty = Env::new(&conn, "jsonempty").await;

    // (args, exit code): a selection that matches nothing, an empty queue.
    let cases: Vec<(Vec<&str>, i32)> = vec![
        (vec!["replay", "--group", g, "--id", "nosuchid"], 1),
        (
            vec!["replay", "--group", g, "--id", "nosuchid", "--dry-run"],
            1,
        ),
        (vec!["replay", "--group", g, "--kind", "timeout"], 0),
        (vec!["purge", "--group", g, "--id", "nosuchid", "--yes"], 1),
        (vec!["purge", "--group", g, "--kind", "timeout", "--yes"], 0),
        (vec!["show", "nosuchid", "--group", g], 1),
        (vec!["list", "--group", &empty.group], 0),
        (vec!["stats", "--group", &empty.group], 0),
        (
            vec!["export", export.to_str().unwrap(), "--group", &empty.group],
            0,
        ),
    ];
    for (args, code) in &cases {
        let mut all = vec!["dlq"];
        all.extend(args);
        all.extend(["--output", "json"]);
        let out = run(&all);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let v = json_of(&out, &format!("{args:?}"));
        assert!(v.is_array(), "{args:?}: {v}");
    }
    // What the nothing-matches purge says, as JSON.
    let out = run(&[
        "dlq", "purge", "--group", g, "--id", "nosuchid", "--yes", "--output", "json",
    ]);
    assert_eq!(
        json_of(&out, "purge"),
        json!([{
            "group": g, "purged": 0, "ids": [], "ids_not_found": ["nosuchid"],
            "coverage": {"scanned": 2, "total": 2, "scan_limit_reached": false},
            "error": null,
        }])
    );
    // The field says it; stderr stays quiet.
    assert_eq!(text(&out.stderr), "");
    let out = run(&["dlq", "show", "nosuchid", "--group", g, "--output", "json"]);
    assert_eq!(json_of(&out, "show"), json!([]));
    // Nothing moved.
    assert_eq!(peek_ids(&conn, &env.dead(), 2).await, names("j", 0..2));
    assert_eq!(count(&conn, &env.group).await, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn control_characters_from_messages_are_escaped_in_table_output() {
    let conn = connect().await;
    let env = Env::new(&conn, "ctrl").await;
    let id = "line1\nline2\x1b[31mRED";
    let error = "boom\n\x1b[2J\tcleared\u{202e}";
    let h = warren_headers(&env, "permanent", error, "o.\rcreated");
    dead_letter(&conn, &env, props(id, h), b"body\x1b]0;title\x07 end").await;
    let g = env.group.as_str();
    let id_shown = r"line1\nline2\x1b[31mRED";
    let error_shown = r"boom\n\x1b[2J\tcleared\u{202e}";

    for args in [
        vec!["dlq", "list", "--group", g],
        vec!["dlq", "stats", "--group", g],
        vec!["dlq", "show", id, "--group", g],
        vec!["dlq", "replay", "--group", g, "--all", "--dry-run"],
    ] {
        let out = ok(&args);
        let bad: Vec<char> = out
            .chars()
            .filter(|c| (c.is_control() && *c != '\n') || *c == '\u{202e}')
            .collect();
        assert!(bad.is_empty(), "{args:?}: raw {bad:?} in {out:?}");
        let shown = if args[1] == "stats" {
            error_shown
        } else {
            id_shown
        };
        assert!(out.contains(shown), "{args:?}: {shown} not in {out}");
    }
    // list: one line per message, the error escaped on it.
    let out = ok(&["dlq", "list", "--group", g]);
    let row = out
        .lines()
        .find(|l| l.contains(id_shown))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(error_shown), "{row}");
    assert!(row.contains(r"o.\rcreated"), "{row}");
    // show: the body too.
    let out = ok(&["dlq", "show", id, "--group", g]);
    assert!(out.contains(r"body\x1b]0;title\x07 end"), "{out}");
    // JSON keeps the text exact (serde escapes it).
    let out = run(&["dlq", "list", "--group", g, "--output", "json"]);
    let v = json_of(&out, "list");
    assert_eq!(v[0]["messages"][0]["id"], id);
    assert_eq!(v[0]["messages"][0]["error"], error);
    assert_eq!(peek_ids(&conn, &env.dead(), 1).await, [id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_flag_values_are_usage_errors_that_exit_2_before_anything_moves() {
    let conn = connect().await;
    let env = Env::new(&conn, "badflags").await;
    dead_letters(&conn, &env.group, "b", 3).await;
    let g = env.group.as_str();
    let watch = |extra: &[&'static str]| {
        let mut a = vec!["watch", "--group", g, "--metrics-addr", "127.0.0.1:0"];
        a.extend_from_slice(extra);
        a
    };
    // (args, what stderr must say)
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["replay", "--group", g, "--kind", "bogus"],
            "[possible values: retryable, permanent, timeout, panic, decode, broker, unknown]",
        ),
        (
            vec!["purge", "--group", g, "--kind", "bogus", "--yes"],
            "[possible values: retryable, permanent, timeout, panic, decode, broker, unknown]",
        ),
        (
            vec!["replay", "--group", g, "--all", "--rate", "0"],
            "--rate must be a positive number, not 0",
        ),
        (
            vec!["replay", "--group", g, "--all", "--rate=-3"],
            "--rate must be a positive number, not -3",
        ),
        (
            vec!["list", "--group", g, "--scan-limit", "0"],
            "invalid value '0' for '--scan-limit <SCAN_LIMIT>': must be at least 1",
        ),
        (
            vec!["replay", "--group", g, "--all", "--scan-limit", "70000"],
            "invalid value '70000' for '--scan-limit <SCAN_LIMIT>': at most 65535",
        ),
        (
            vec!["replay", "--group", g, "--all", "--limit", "0"],
            "invalid value '0' for '--limit <LIMIT>': must be at least 1",
        ),
        (
            vec!["replay", "--group", g, "--all", "--limit", "0", "--dry-run"],
            "invalid value '0' for '--limit <LIMIT>': must be at least 1",
        ),
        (
            vec!["purge", "--group", g, "--all", "--limit", "0", "--yes"],
            "invalid value '0' for '--limit <LIMIT>': must be at least 1",
        ),
        (
            watch(&["--interval", "0s"]),
            "invalid value '0s' for '--interval <INTERVAL>': must be longer than 0",
        ),
        (
            watch(&["--webhook", "not a url"]),
            "invalid value 'not a url' for '--webhook <WEBHOOK>'",
        ),
        (
            watch(&["--webhook", "ftp://example.com/hook"]),
            "an http:// or https:// URL",
        ),
    ];
    for (args, says) in &cases {
        let mut all = vec!["dlq"];
        all.extend(args);
        let out = run(&all);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The largest scan limit is accepted.
    ok(&["dlq", "list", "--group", g, "--scan-limit", "65535"]);
    // So is a limit of 1 (a dry run: nothing moves).
    ok(&[
        "dlq",
        "replay",
        "--group",
        g,
        "--all",
        "--limit",
        "1",
        "--dry-run",
    ]);
    assert_eq!(peek_ids(&conn, &env.dead(), 3).await, names("b", 0..3));
    assert_eq!(count(&conn, &env.group).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_and_purge_name_the_ids_they_did_not_find_and_exit_1() {
    use serde_json::json;
    let conn = connect().await;
    let env = Env::new(&conn, "missing").await;
    dead_letters(&conn, &env.group, "m", 4).await;
    let g = env.group.as_str();
    let warning = |id: &str| {
        format!("warning: --id {id:?}: no dead letter with this id matched the selection\n")
    };

    // Table: the present one is replayed, the missing one named on stderr.
    let out = run(&[
        "dlq",
        "replay",
        "--group",
        g,
        "--id",
        "m-0",
        "--id",
        "nonexistent-id",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(summary(&stdout, g).1, 1, "{stdout}");
    assert_eq!(stderr, warning("nonexistent-id"));
    assert_eq!(take_ids(&conn, g, 1).await, names("m", [0]));

    // JSON: a field of every group's report.
    let out = run(&[
        "dlq", "replay", "--group", g, "--id", "m-1", "--id", "nope-1", "--id", "nope-2",
        "--output", "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let v = json_of(&out, "replay");
    assert_eq!(v[0]["ids"], json!(["m-1"]));
    assert_eq!(v[0]["ids_not_found"], json!(["nope-1", "nope-2"]));
    assert_eq!(take_ids(&conn, g, 1).await, names("m", [1]));

    // Every id found: exit 0, no warning, an empty list.
    let out = run(&[
        "dlq",
        "replay",
        "--group",
        g,
        "--id",
        "m-2",
        "--dry-run",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(json_of(&out, "dry run")[0]["ids_not_found"], json!([]));
    assert_eq!(text(&out.stderr), "");

    // purge the same way.
    let out = run(&[
        "dlq", "purge", "--group", g, "--id", "m-3", "--id", "gone", "--yes",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(stdout, format!("{g}: 1 purged\n"));
    assert_eq!(stderr, warning("gone"));
    assert_eq!(take_ids(&conn, &env.dead(), 1).await, names("m", [2]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_in_neither_the_topology_file_nor_on_the_broker_is_a_usage_error_listing_the_groups(
) {
    let conn = connect().await;
    let env = Env::new(&conn, "nogroup").await;
    dead_letters(&conn, &env.group, "n", 1).await;
    let file = env.topology_file();
    let nosuch = format!("{}nosuch", env.group);
    for cmd in [
        vec!["stats"],
        vec!["list"],
        vec!["show", "n-0"],
        vec!["replay", "--all"],
        vec!["purge", "--all", "--yes"],
    ] {
        let mut args = vec!["dlq"];
        args.extend(&cmd);
        args.extend(["-f", file.path(), "--group", &env.group, "--group", &nosuch]);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stderr),
            format!(
                "error: no group {nosuch:?} in {} and no queue \"{nosuch}.dead\" on the broker; groups: {}\n",
                file.path(),
                env.group
            ),
            "{cmd:?}"
        );
        assert_eq!(text(&out.stdout), "", "{cmd:?}");
    }
    // The group of the file works; nothing was touched before.
    let out = ok(&["dlq", "stats", "-f", file.path(), "--group", &env.group]);
    assert!(
        out.starts_with(&format!("{}  1 dead letters", env.dead())),
        "{out}"
    );
    assert_eq!(peek_ids(&conn, &env.dead(), 1).await, names("n", [0]));
}

/// A replay to a work queue that does not exist (deleted to change its
/// arguments, never applied on this broker) fails each dead letter with
/// what to do, sends nothing and leaves them all in order. (Before: every
/// copy was published and returned, "publish to exchange \"\" with routing
/// key ... was returned (no queue is bound for it)", which names neither
/// the missing queue nor the fix.)
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_to_a_work_queue_that_does_not_exist_says_to_apply_the_topology() {
    const N: usize = 3;
    let conn = connect().await;
    let env = Env::new(&conn, "nowork").await;
    dead_letters(&conn, &env.group, "w", N).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(env.group.as_str().into(), Default::default())
        .await
        .unwrap();
    let g = env.group.as_str();
    let out = run(&["dlq", "replay", "--group", g, "--all", "--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let v = json_of(&out, "replay");
    let want: Vec<String> = names("w", 0..N)
        .iter()
        .map(|id| {
            format!("{id}: work queue {g:?} does not exist: `warren topology apply` declares it; then replay again")
        })
        .collect();
    assert_eq!(v[0]["errors"], serde_json::json!(want), "{v}");
    assert_eq!(v[0]["failed"], N, "{v}");
    assert_eq!(v[0]["replayed"], 0, "{v}");
    assert_eq!(peek_ids(&conn, &env.dead(), N).await, names("w", 0..N));
}

/// An export file or a purge archive that already exists is refused with
/// what to do, and left as it was; nothing moves. (Before: "F: File exists
/// (os error 17)".)
#[tokio::test(flavor = "multi_thread")]
async fn an_export_or_archive_file_that_exists_is_refused_saying_what_to_do() {
    let conn = connect().await;
    let env = Env::new(&conn, "exists").await;
    dead_letters(&conn, &env.group, "e", 2).await;
    let dir = std::env::temp_dir().join(format!("warren-exists-{}", env.group));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kept.jsonl");
    std::fs::write(&file, "an earlier export\n").unwrap();
    let f = file.to_str().unwrap();
    let g = env.group.as_str();
    let message = format!(
        "{f} already exists, and warren never overwrites a file: name a new one, or move this one away first"
    );
    for args in [
        vec!["dlq", "export", f, "--group", g],
        vec!["dlq", "export", f, "--group", g, "--remove"],
        vec![
            "dlq",
            "purge",
            "--group",
            g,
            "--all",
            "--yes",
            "--archive",
            f,
        ],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert_eq!(text(&out.stderr), format!("error: {message}\n"), "{args:?}");
        assert_eq!(text(&out.stdout), "", "{args:?}");
        let mut json = args.clone();
        json.extend(["--output", "json"]);
        let out = run(&json);
        assert_eq!(out.status.code(), Some(1), "{json:?}: {out:?}");
        let v = json_of(&out, "refusal");
        assert_eq!(v["error"]["message"], message.as_str(), "{v}");
    }
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "an earlier export\n"
    );
    assert_eq!(peek_ids(&conn, &env.dead(), 2).await, names("e", 0..2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `watch` checks its `--group`s as the other commands do: a group that is
/// neither in the file nor on the broker (a typo) is a usage error, not a
/// watch that runs forever warning at every interval that its queue does
/// not exist. A group outside the file whose queue exists is watched.
#[tokio::test(flavor = "multi_thread")]
async fn watch_refuses_a_group_in_neither_the_topology_file_nor_on_the_broker() {
    let conn = connect().await;
    let env = Env::new(&conn, "watchnogroup").await;
    let file = env.topology_file();
    let nosuch = format!("{}nosuch", env.group);
    for output in ["table", "json"] {
        let child = Running::spawn(
            warren()
                .args(["-f", file.path(), "--output", output, "dlq", "watch"])
                .args(["--metrics-addr", "127.0.0.1:0", "--group", &env.group])
                .args(["--group", &nosuch])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let out = child.wait_within(Duration::from_secs(20));
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "{output}: {stdout}\n{stderr}");
        let message = format!(
            "no group {nosuch:?} in {} and no queue \"{nosuch}.dead\" on the broker; groups: {}",
            file.path(),
            env.group
        );
        assert_eq!(stderr, format!("error: {message}\n"), "{output}");
        if output == "json" {
            let v: serde_json::Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("one JSON document ({e}): {stdout:?}"));
            assert_eq!(v["error"]["kind"], "usage", "{v}");
            assert_eq!(v["error"]["message"], message.as_str(), "{v}");
        } else {
            assert_eq!(stdout, "");
        }
    }
    // A group whose queue exists is watched, also without the file.
    let no_file = format!("{}.missing", file.path());
    let mut child = Running::spawn(
        warren()
            .args(["-f", &no_file, "--output", "json", "dlq", "watch"])
            .args(["--metrics-addr", "127.0.0.1:0", "--group", &env.group])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["event"], "watching", "{v}");
}

/// With `--log-format json`, every line `dlq watch` writes to stderr is
/// JSON, its start too (it was a text line: "watching G; metrics on ...").
#[tokio::test(flavor = "multi_thread")]
async fn watch_with_json_logs_writes_only_json_to_stderr() {
    let conn = connect().await;
    let env = Env::new(&conn, "watchjsonlog").await;
    let mut child = Running::spawn(
        warren()
            .args([
                "--log-format",
                "json",
                "dlq",
                "watch",
                "--group",
                &env.group,
            ])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stderr.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&first)
        .unwrap_or_else(|e| panic!("the first line of stderr is not JSON ({e}): {first:?}"));
    assert_eq!(
        v["fields"]["message"], "watching dead-letter queues; /metrics and /healthz served",
        "{v}"
    );
    assert_eq!(v["fields"]["groups"], env.group.as_str(), "{v}");
    assert_eq!(v["level"], "INFO", "{v}");
}

/// The name /etc/passwd gives this process's uid, else `uid:N`.
fn this_user() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == uid)
        .map(|f| f[0].to_owned())
        .unwrap_or(format!("uid:{uid}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_record_names_the_uid_when_user_and_logname_are_unset() {
    let conn = connect().await;
    let env = Env::new(&conn, "whoami").await;
    dead_letters(&conn, &env.group, "w", 1).await;
    let dir = std::env::temp_dir().join(format!("warren-whoami-{}", env.group));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("audit.jsonl");
    let out = warren()
        .env_remove("USER")
        .env_remove("LOGNAME")
        .args(["dlq", "purge", "--group", &env.group, "--all", "--yes"])
        .args(["--audit-log", file.to_str().unwrap()])
        .output_within(CLI_LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = audit_lines(&file);
    assert_eq!(lines.len(), 1);
    let user = lines[0]["user"].as_str().unwrap();
    assert_ne!(user, "unknown");
    assert_eq!(user, this_user());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Another login than the publisher's; --audit-log -.

/// The operator logs in as a user of its own (as services do): a dead
/// letter its service published with `user_id=guest` is replayed without
/// it (the broker refuses a `user_id` that is not the login), and `-v`
/// says so once, without the password.
#[tokio::test(flavor = "multi_thread")]
async fn replay_as_another_user_than_the_publisher_moves_the_message_without_its_user_id() {
    let conn = connect().await;
    let env = Env::new(&conn, "uid").await;
    let h = warren_headers(&env, "permanent", "boom", "o.created");
    let p = props("uid-1", h).with_user_id("guest".into());
    dead_letter(&conn, &env, p, b"{}").await;
    settle(&conn, &env.dead(), 1).await;
    let user = warren_testkit::TempUser::create();
    let url = user.url();
    let out = warren()
        .args(["-v", "--amqp-url", url.expose()])
        .args(["dlq", "replay", "--group", &env.group, "--all"])
        .output_within(CLI_LIMIT);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        format!(
            "{g}: 1 replayed to work queue {g:?}, 0 failed (left in the dead-letter queue)\n",
            g = env.group
        )
    );
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("without their user_id"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(said[0].contains("user_ids=guest"), "{stderr}");
    let password = url.expose().rsplit_once('@').unwrap().0;
    let password = password.rsplit_once(':').unwrap().1;
    assert!(!stderr.contains(password), "{stderr}");
    settle(&conn, &env.dead(), 0).await;
    settle(&conn, &env.group, 1).await;
    let got = warren_testkit::drain(&conn, &env.group).await;
    let (body, p) = &got[0];
    assert_eq!(body, b"{}");
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), "uid-1");
    assert_eq!(p.user_id(), &None);
}

/// `--audit-log -` would write a file named `-`; it is refused before
/// anything moves (exit 2), saying what to do instead, and what it says
/// holds: `./-` is a file named `-`, and RUST_LOG=warren::audit=info shows
/// each record on standard error.
#[tokio::test(flavor = "multi_thread")]
async fn audit_log_dash_is_refused_before_anything_moves_and_the_advice_holds() {
    const N: usize = 3;
    let conn = connect().await;
    let env = Env::new(&conn, "adash").await;
    dead_letters(&conn, &env.group, "a", N).await;
    let g = env.group.as_str();
    // Run where a file named `-` would show.
    let dir = std::env::temp_dir().join(format!("warren-adash-{g}"));
    std::fs::create_dir_all(&dir).unwrap();
    let in_dir = |args: &[&str]| {
        warren()
            .current_dir(&dir)
            .args(["dlq"])
            .args(args)
            .stdin(Stdio::null())
            .output_within(CLI_LIMIT)
    };
    for (command, args) in [
        (
            "replay",
            &["replay", "--group", g, "--all", "--audit-log", "-"][..],
        ),
        (
            "replay",
            &["replay", "--group", g, "--all", "--audit-log=-"],
        ),
        (
            "purge",
            &["purge", "--group", g, "--all", "--yes", "--audit-log", "-"],
        ),
        // Without --yes: the audit log is named, not only the missing --yes.
        (
            "purge",
            &["purge", "--group", g, "--all", "--audit-log", "-"],
        ),
    ] {
        let out = in_dir(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert_eq!(
            text(&out.stderr),
            format!(
                "error: {command} --audit-log -: the audit log is a file each record is appended to, \
                 and standard output carries the command's own output; \
                 give --audit-log a file path (./- for a file named \"-\"), \
                 or read the records on standard error, where each is logged at INFO \
                 under target warren::audit (-v, or RUST_LOG=warren::audit=info)\n"
            ),
            "{args:?}"
        );
        assert_eq!(text(&out.stdout), "", "{args:?}");
        assert!(
            !dir.join("-").exists(),
            "{args:?}: a file named '-' was written"
        );
        assert_eq!(peek_ids(&conn, &env.dead(), N).await, names("a", 0..N));
        assert_eq!(count(&conn, &env.group).await, 0);
    }

    // The advice: ./- is a file named `-`, and the record is on stderr.
    let out = warren()
        .current_dir(&dir)
        .env("RUST_LOG", "warren::audit=info")
        .args(["dlq", "replay", "--group", g, "--all", "--dry-run"])
        .args(["--audit-log", "./-"])
        .output_within(CLI_LIMIT);
    assert!(out.status.success(), "{out:?}");
    let lines = audit_lines(&dir.join("-"));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["ids"], serde_json::json!(names("a", 0..N)));
    let stderr = text(&out.stderr);
    let logged: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("warren::audit"))
        .collect();
    assert_eq!(logged.len(), 1, "{stderr}");
    assert!(logged[0].contains("action=replay"), "{stderr}");
    assert!(logged[0].contains(&format!("group={g}")), "{stderr}");
    assert_eq!(peek_ids(&conn, &env.dead(), N).await, names("a", 0..N));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Runs that stop partway say what they did.

/// A dead-letter queue for group `{env.group}-capped` that the broker keeps
/// to `max` messages and refuses (nacks) publishes beyond; deleted on drop.
async fn capped(conn: &Connection, env: &Env, max: i64) -> (String, Cleanup) {
    let group = format!("{}-capped", env.group);
    let dead = format!("{group}.dead");
    let cleanup = Cleanup::empty().queue(&dead).at(URL.parse().unwrap());
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        dead.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let _ = ch.close(200, "ok".into()).await;
    (group, cleanup)
}

/// An import the broker nacks partway (the target queue takes 2 messages
/// and refuses the rest) exits 1 and says which lines were imported and
/// which were not, with each refused message's line and id, and the
/// command that imports the rest; `--skip` does, without duplicating
/// anything. With `--output json`, the same as one document. (Before: a
/// bare `error: publish ... was nacked by the broker`, nothing about the 2
/// imported, and no way to import the rest without duplicating them.)
#[tokio::test(flavor = "multi_thread")]
async fn an_import_nacked_partway_names_the_lines_imported_and_skip_imports_the_rest_once() {
    use serde_json::json;
    const N: usize = 6;
    let conn = connect().await;
    let env = Env::new(&conn, "impart").await;
    dead_letters(&conn, &env.group, "c", N).await;
    let (group, _cleanup) = capped(&conn, &env, 2).await;
    let dead = format!("{group}.dead");
    let dir = std::env::temp_dir().join(format!("warren-impart-{}", env.group));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("export.jsonl");
    let _ = std::fs::remove_file(&file);
    let f = file.to_str().unwrap();
    ok(&["dlq", "export", f, "--group", &env.group, "--remove"]);
    settle(&conn, &env.dead(), 0).await;
    let nacked =
        format!("publish to exchange \"\" with routing key {dead:?} was nacked by the broker");

    // Table.
    let out = run(&["dlq", "import", f, "--to-group", &group]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let mut want = format!(
        "{dead}: 2 imported\nimported: lines 1-2 (2 messages)\n\
         not imported: lines 3-6 (4 refused or not confirmed, 0 not sent)\n"
    );
    for i in 2..N {
        want.push_str(&format!("  line {} (id c-{i}): {nacked}\n", i + 1));
    }
    assert_eq!(stdout, want);
    assert_eq!(
        stderr,
        format!(
            "error: the import stopped at line 3 (id c-2): {nacked}\n\
             to import the rest without duplicating what was imported: \
             warren dlq import {f} --to-group {group} --skip 2\n"
        )
    );
    let mut got = take_ids(&conn, &dead, 2).await;

    // JSON, resuming where it said.
    let out = run(&[
        "dlq",
        "import",
        f,
        "--to-group",
        &group,
        "--skip",
        "2",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let failure =
        |i: usize| json!({"line": i + 1, "id": format!("c-{i}"), "queue": dead, "error": nacked});
    assert_eq!(
        json_of(&out, "import --skip 2"),
        json!({
            "imported": {dead.as_str(): 2}, "total": 2, "user_id_dropped": 0, "messages": 4,
            "imported_lines": [{"first": 3, "last": 4}],
            "not_imported_lines": [{"first": 5, "last": 6}],
            "failed": 2, "not_sent": 0, "failures": [failure(4), failure(5)],
            "resume_skip": 4, "error": nacked,
            "resume": format!("warren dlq import {f} --to-group {group} --skip 4"),
        })
    );
    got.extend(take_ids(&conn, &dead, 2).await);

    let out = ok(&["dlq", "import", f, "--to-group", &group, "--skip", "4"]);
    assert_eq!(out, format!("{dead}: 2 imported\n"));
    got.extend(take_ids(&conn, &dead, 2).await);
    assert_eq!(got, names("c", 0..N), "each imported once, in order");

    // A --skip past the end is a usage error; nothing is sent.
    let out = run(&["dlq", "import", f, "--to-group", &group, "--skip", "7"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!("error: --skip 7: {f} has 6 lines\n")
    );
    assert_eq!(count(&conn, &dead).await, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Closes every connection of `user` (the test's own: no other client's).
fn close_connections_of(user: &str) {
    let rows = warren_testkit::rabbitmqctl(&[
        "list_connections",
        "pid",
        "user",
        "-q",
        "--no-table-headers",
    ]);
    let pids: Vec<&str> = rows
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, u)| *u == user)
        .map(|(p, _)| p)
        .collect();
    assert!(!pids.is_empty(), "{user} has no connection: {rows}");
    for pid in pids {
        warren_testkit::rabbitmqctl(&["close_connection", pid, "test: closed mid-replay"]);
    }
}

/// A TCP proxy between `warren` and the broker that reads the AMQP frames
/// going each way, so that a test can wait for what the client sent (its
/// acks, its `connection.close-ok`) instead of guessing how long it takes,
/// and can hold what the broker sends (from a frame it chooses) until it
/// releases it. What the broker has sent and the proxy holds is, for the
/// broker, delivered; for the client, not yet received.
struct Proxy {
    port: u16,
    shared: Arc<ProxyShared>,
}

#[derive(Default)]
struct ProxyShared {
    state: Mutex<ProxyState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct ProxyState {
    /// The methods (class id, method id) the client sent, in order.
    from_client: Vec<(u16, u16)>,
    /// The methods the broker sent (forwarded or not), in order.
    from_broker: Vec<(u16, u16)>,
    /// Frames from the broker are held from the first one this returns
    /// true for, until [`ProxyShared::release`].
    hold: Option<HoldWhen>,
    /// Whether the broker's frames are held now.
    holding: bool,
    /// Set when the proxy is dropped: nothing is held any more.
    closed: bool,
    /// Whether the client closed its end of the connection.
    client_closed: bool,
}

/// Says from which of the broker's frames on the proxy holds them.
type HoldWhen = Box<dyn FnMut(&ProxyFrame) -> bool + Send>;

/// One AMQP frame as it went through the proxy.
struct ProxyFrame {
    kind: u8,
    payload: Vec<u8>,
}

impl ProxyFrame {
    /// Reads one frame (header, payload, frame end) into `raw` too.
    fn read(from: &mut impl std::io::Read, raw: &mut Vec<u8>) -> std::io::Result<ProxyFrame> {
        let mut header = [0u8; 7];
        from.read_exact(&mut header)?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let mut rest = vec![0u8; size + 1];
        from.read_exact(&mut rest)?;
        if rest[size] != 0xCE {
            return Err(std::io::Error::other("no AMQP frame end"));
        }
        raw.clear();
        raw.extend_from_slice(&header);
        raw.extend_from_slice(&rest);
        rest.truncate(size);
        Ok(ProxyFrame {
            kind: header[0],
            payload: rest,
        })
    }

    /// (class id, method id) of a method frame.
    fn method(&self) -> Option<(u16, u16)> {
        let p = &self.payload;
        (self.kind == 1 && p.len() >= 4).then(|| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        })
    }

    /// The routing key of a `basic.deliver`.
    fn delivered_with_key(&self) -> Option<String> {
        if self.method() != Some(BASIC_DELIVER) {
            return None;
        }
        let p = &self.payload[4..];
        let short = |at: usize| -> Option<(String, usize)> {
            let n = *p.get(at)? as usize;
            let s = p.get(at + 1..at + 1 + n)?;
            Some((String::from_utf8_lossy(s).into_owned(), at + 1 + n))
        };
        let (_consumer_tag, at) = short(0)?;
        // delivery tag (8 bytes), redelivered (1 byte)
        let (_exchange, at) = short(at + 9)?;
        Some(short(at)?.0)
    }
}

const BASIC_DELIVER: (u16, u16) = (60, 60);
const BASIC_ACK: (u16, u16) = (60, 80);
const BASIC_PUBLISH: (u16, u16) = (60, 40);
const BASIC_CONSUME_OK: (u16, u16) = (60, 21);
const CHANNEL_CLOSE: (u16, u16) = (20, 40);
const CONNECTION_CLOSE: (u16, u16) = (10, 50);
const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);

impl Proxy {
    /// Listens on a free local port; forwards each connection to the broker.
    fn start() -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ProxyShared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if lock(&s.state).closed {
                    break;
                }
                let Ok(client) = client else { break };
                let Ok(broker) = connect_to_broker() else {
                    continue;
                };
                let (c2, b2) = (client.try_clone().unwrap(), broker.try_clone().unwrap());
                let s1 = s.clone();
                std::thread::spawn(move || proxy_client_to_broker(client, broker, &s1));
                let s2 = s.clone();
                std::thread::spawn(move || proxy_broker_to_client(b2, c2, &s2));
            }
        });
        Proxy { port, shared }
    }

    /// `url` (the broker's) with the proxy's port.
    fn url(&self, url: &str) -> String {
        assert!(url.contains("@127.0.0.1:5672"), "{url}");
        url.replace("@127.0.0.1:5672", &format!("@127.0.0.1:{}", self.port))
    }

    /// What another thread needs to wait and release.
    fn handle(&self) -> Arc<ProxyShared> {
        self.shared.clone()
    }
}

impl std::ops::Deref for Proxy {
    type Target = ProxyShared;
    fn deref(&self) -> &ProxyShared {
        &self.shared
    }
}

impl Drop for Proxy {
    // Nothing stays held; the listener stops (woken by a connection).
    fn drop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            st.closed = true;
            st.hold = None;
            st.holding = false;
        }
        self.shared.changed.notify_all();
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl ProxyShared {
    /// Holds the broker's frames from the first one `when` returns true for.
    fn hold_when(&self, when: impl FnMut(&ProxyFrame) -> bool + Send + 'static) {
        lock(&self.state).hold = Some(Box::new(when));
    }

    /// Waits until the broker's frames are held (a minute at most).
    fn wait_holding(&self) {
        let st = lock(&self.state);
        let (st, _) = self
            .changed
            .wait_timeout_while(st, Duration::from_secs(60), |st| !st.holding)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let holding = st.holding;
        drop(st);
        assert!(holding, "the proxy held nothing within a minute");
    }

    /// Forwards what was held, and what follows, up to the first frame
    /// `when` returns true for: the proxy holds from that one on.
    fn hold_instead(&self, when: impl FnMut(&ProxyFrame) -> bool + Send + 'static) {
        {
            let mut st = lock(&self.state);
            st.hold = Some(Box::new(when));
            st.holding = false;
        }
        self.changed.notify_all();
    }

    /// Forwards what was held, and the rest as it comes.
    fn release(&self) {
        {
            let mut st = lock(&self.state);
            st.hold = None;
            st.holding = false;
        }
        self.changed.notify_all();
    }

    /// Waits until `cond` holds for the methods the client sent and
    /// whether it closed its end of the connection (a minute at most).
    fn wait_client(&self, what: &str, cond: impl Fn(&[(u16, u16)], bool) -> bool) {
        let st = lock(&self.state);
        let (st, _) = self
            .changed
            .wait_timeout_while(st, Duration::from_secs(60), |st| {
                !cond(&st.from_client, st.client_closed)
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (sent, got, closed) = (
            st.from_client.clone(),
            st.from_broker.clone(),
            st.client_closed,
        );
        drop(st);
        assert!(
            cond(&sent, closed),
            "the client did not {what} within a minute: it sent {sent:?} (and closed the \
             connection: {closed}); the broker sent {got:?}"
        );
    }
}

/// `m` locked, also after a thread panicked holding it (a failed test's
/// proxy must still release what it holds and stop).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `sent` holds `first` and, after it, `then`, in that order
/// (`n` of `first` before the first `then` that follows them).
fn sent_in_order(sent: &[(u16, u16)], first: (u16, u16), n: usize, then: (u16, u16)) -> bool {
    let mut seen = 0;
    for m in sent {
        if *m == first {
            seen += 1;
        } else if *m == then && seen >= n {
            return true;
        }
    }
    false
}

/// A connection to the broker with a small receive buffer (64 KiB; set,
/// so the kernel does not grow it): what the broker can send beyond what
/// the proxy forwarded is bounded by it and the broker's own send buffer
/// (at most `net.ipv4.tcp_wmem`'s 4 MiB by default).
fn connect_to_broker() -> std::io::Result<std::net::TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(64 * 1024)?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 5672));
        socket.connect(addr).await?.into_std()
    })?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Forwards the client's bytes to the broker, noting each method, until
/// the client closes its end; then closes the broker's. When the broker is
/// gone it keeps reading (and noting) what the client sends, as a client
/// does not know yet that no one reads it.
fn proxy_client_to_broker(
    client: std::net::TcpStream,
    mut broker: std::net::TcpStream,
    shared: &ProxyShared,
) {
    use std::io::{Read, Write};
    let mut from = std::io::BufReader::new(client);
    let mut protocol_header = [0u8; 8];
    let mut raw = Vec::new();
    let mut forward =
        from.read_exact(&mut protocol_header).is_ok() && broker.write_all(&protocol_header).is_ok();
    while let Ok(frame) = ProxyFrame::read(&mut from, &mut raw) {
        if let Some(m) = frame.method() {
            lock(&shared.state).from_client.push(m);
            shared.changed.notify_all();
        }
        forward = forward && broker.write_all(&raw).is_ok();
    }
    lock(&shared.state).client_closed = true;
    shared.changed.notify_all();
    let _ = broker.shutdown(std::net::Shutdown::Write);
}

/// Forwards the broker's frames to the client, noting each method and
/// holding them as [`ProxyShared::hold_when`] says, until the broker closes
/// its end; then closes the client's (its reading side: the client may
/// still answer, as it would to a broker that closed the connection).
fn proxy_broker_to_client(
    broker: std::net::TcpStream,
    mut client: std::net::TcpStream,
    shared: &ProxyShared,
) {
    use std::io::Write;
    let mut raw = Vec::new();
    let mut from = std::io::BufReader::new(broker);
    while let Ok(frame) = ProxyFrame::read(&mut from, &mut raw) {
        {
            let mut st = lock(&shared.state);
            if let Some(m) = frame.method() {
                st.from_broker.push(m);
            }
            if !st.holding && !st.closed {
                if let Some(hold) = st.hold.as_mut() {
                    if hold(&frame) {
                        st.holding = true;
                        shared.changed.notify_all();
                    }
                }
            }
            while st.holding && !st.closed {
                st = shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        if client.write_all(&raw).is_err() {
            break;
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
}

/// A replay whose connection is lost partway (closed on the broker while
/// it runs at 5 messages a second) exits 1 with its summary and writes its
/// audit record: both name what was replayed before, and the error. What
/// they say holds on the broker: every id they name as replayed or copied
/// has its copy in the work queue, every copy there is one they name, none
/// named replayed is still a dead letter, and nothing is lost (every dead
/// letter is either copied or still there; at most the one in flight at
/// the close is both, besides those named copied and not removed or with
/// their removal unconfirmed). (Before: `error: closing the scan channel
/// ...`, no summary and no audit record, while the copies made before
/// stayed in the work queue.)
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_whose_connection_is_lost_partway_reports_and_audits_what_it_moved() {
    use serde_json::json;
    const N: usize = 40;
    let conn = connect().await;
    let env = Env::new(&conn, "replost").await;
    dead_letters(&conn, &env.group, "l", N).await;
    let user = warren_testkit::TempUser::create();
    let dir = std::env::temp_dir().join(format!("warren-replost-{}", env.group));
    std::fs::create_dir_all(&dir).unwrap();
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let child = Running::spawn(
        warren()
            .env("USER", "auditor-lost")
            .args(["--amqp-url", user.url().expose()])
            .args([
                "dlq", "replay", "--group", &env.group, "--all", "--rate", "5",
            ])
            .args(["--audit-log", audit.to_str().unwrap(), "--output", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let g = env.group.clone();
    assert!(
        wait_for(Duration::from_secs(20), async || count(&conn, &g).await
            >= 3)
        .await,
        "the replay did not start"
    );
    close_connections_of(&user.name);
    let out = child.wait_within(CLI_LIMIT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let v = json_of(&out, "replay");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    let r = &v[0];
    let error = r["error"].as_str().expect("the error that stopped it");
    assert!(
        error.starts_with("the connection to the broker was lost ("),
        "{error}"
    );
    assert!(
        stderr.contains(&format!(
            "error: {g}: the replay stopped: {error}; what it replayed before"
        )),
        "{stderr}"
    );
    assert_eq!(r["stopped_early"], true);
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let replayed = strings(&r["ids"]);
    let not_removed = strings(&r["not_removed"]);
    // Acked, and the connection lost before the broker confirmed it.
    let unconfirmed = r.get("unconfirmed").map(strings).unwrap_or_default();
    assert_eq!(r["replayed"], json!(replayed.len()));
    assert!(
        replayed.len() + not_removed.len() + unconfirmed.len() >= 3,
        "copies seen before the close: {r}"
    );
    assert!(replayed.len() < N, "{r}");
    let failed: Vec<String> = strings(&r["errors"])
        .iter()
        .map(|e| e.split_once(": ").unwrap().0.to_owned())
        .collect();

    // The audit record says the same.
    let lines = audit_lines(&audit);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let rec = &lines[0];
    assert_eq!(rec["action"], "replay");
    assert_eq!(rec["user"], "auditor-lost");
    assert_eq!(rec["group"], json!(g));
    assert_eq!(rec["count"], json!(replayed.len()));
    assert_eq!(rec["ids"], json!(replayed));
    assert_eq!(rec["error"], json!(error));
    match &rec.get("not_removed") {
        Some(n) => assert_eq!(strings(n), not_removed),
        None => assert!(not_removed.is_empty()),
    }

    // The broker agrees: the closed connection's unacked dead letters are
    // back; nothing is lost.
    let (w, d) = (env.group.clone(), env.dead());
    assert!(
        wait_for(
            Duration::from_secs(10),
            async || (count(&conn, &w).await + count(&conn, &d).await) as usize >= N
        )
        .await,
        "messages missing"
    );
    let work = ids(&conn, &env.group).await;
    let dead = ids(&conn, &env.dead()).await;
    let copied: HashSet<&String> = replayed
        .iter()
        .chain(&not_removed)
        .chain(&unconfirmed)
        .collect();
    let in_work: HashSet<&String> = work.iter().collect();
    assert_eq!(work.len(), in_work.len(), "a copy twice: {work:?}");
    assert!(
        copied.is_subset(&in_work),
        "named but not copied: {r}\n{work:?}"
    );
    for id in &work {
        assert!(
            copied.contains(id) || failed.contains(id),
            "{id} was copied and the report does not say so: {r}"
        );
    }
    let in_dead: HashSet<&String> = dead.iter().collect();
    for id in names("l", 0..N) {
        assert!(in_work.contains(&id) || in_dead.contains(&id), "{id} lost");
    }
    for id in &replayed {
        assert!(
            !in_dead.contains(id),
            "{id}: replayed, still a dead letter: {r}"
        );
    }
    let both = in_work.intersection(&in_dead).count();
    assert!(
        both <= 1 + not_removed.len() + unconfirmed.len(),
        "duplicates: {both}: {r}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// The files dead letters are deleted on the strength of survive a power loss.

/// `s` as strace's `-xx` prints a string: every byte `\xNN`.
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("\\x{b:02x}")).collect()
}

/// Runs `warren args` under strace and returns the system calls it made
/// (files opened, fsyncs, network writes with their bytes), one per line,
/// in order. Fails when strace is not installed.
fn traced(dir: &std::path::Path, args: &[&str]) -> Vec<String> {
    let trace = dir.join("trace.txt");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-xx", "-s", "4096", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=openat,fsync,fdatasync,write,writev,sendto,sendmsg",
        ])
        .arg(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .env_remove("WARREN_TOPOLOGY")
        .env_remove("RUST_LOG")
        .env("WARREN_AMQP_URL", URL)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace runs (Debian package strace)");
    let out = wait_within(out, CLI_LIMIT);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The order of what `trace` shows for a `file` created in `dir`: the
/// line that creates it, the line that fsyncs `dir` after that (through a
/// descriptor opened on it after the creation), the line that fsyncs the
/// file itself, and the first basic.ack sent to the broker. Panics naming
/// what is missing.
fn durable_before_the_first_ack(trace: &[String], dir: &str, file: &str) {
    // `pid openat(AT_FDCWD, "...", flags...) = fd`
    let fd_of = |line: &str| -> String { line.rsplit(" = ").next().unwrap().trim().to_owned() };
    let opens = |path: &str| format!("openat(AT_FDCWD, \"{}\"", hex(path));
    let created = trace
        .iter()
        .position(|l| l.contains(&opens(file)) && l.contains("O_CREAT"))
        .unwrap_or_else(|| panic!("{file} is never created:\n{}", trace.join("\n")));
    let file_fd = fd_of(&trace[created]);
    let dir_open = trace[created..]
        .iter()
        .position(|l| l.contains(&opens(dir)) && l.contains("O_RDONLY"))
        .map(|i| i + created)
        .unwrap_or_else(|| panic!("{dir} is not opened after {file} is created"));
    let dir_fd = fd_of(&trace[dir_open]);
    let fsync_of = |fd: &str, from: usize| {
        trace[from..]
            .iter()
            .position(|l| l.contains(&format!(" fsync({fd}")))
            .map(|i| i + from)
    };
    let dir_synced = fsync_of(&dir_fd, dir_open)
        .unwrap_or_else(|| panic!("{dir} (fd {dir_fd}) is never fsynced after {file} is created"));
    let file_synced = fsync_of(&file_fd, created)
        .unwrap_or_else(|| panic!("{file} (fd {file_fd}) is never fsynced"));
    // A basic.ack frame: size 13, class 60, method 80.
    let ack = hex("\x00\x00\x00\x0d\x00\x3c\x00\x50");
    let first_ack = trace
        .iter()
        .position(|l| l.contains(&ack))
        .unwrap_or_else(|| panic!("no basic.ack was sent"));
    assert!(
        dir_synced < first_ack && file_synced < first_ack,
        "{file}: created at line {created}, its directory fsynced at {dir_synced}, \
         itself at {file_synced}, and the first ack sent at {first_ack}"
    );
}

/// `purge --archive` and `export --remove` create a file and delete dead
/// letters on the strength of it; `--audit-log` creates the file that
/// records it. Each new file's directory is fsynced (not only the file)
/// before the first dead letter is acked: otherwise a power loss can take
/// the new file's name, and with it every line, while the deletions stand.
/// Seen in the system calls warren makes (strace); what a real power loss
/// does to a file system cannot be tested here.
#[tokio::test(flavor = "multi_thread")]
async fn new_archive_export_and_audit_files_have_their_directory_fsynced_before_the_first_ack() {
    let conn = connect().await;
    let env = Env::new(&conn, "dirsync").await;
    let dir = std::env::temp_dir().join(format!("warren-dirsync-{}", env.group));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let (archive, audit, export) = (
        format!("{d}/archive.jsonl"),
        format!("{d}/audit.jsonl"),
        format!("{d}/export.jsonl"),
    );
    let g = env.group.as_str();

    dead_letters(&conn, g, "s", 3).await;
    let trace = traced(
        &dir,
        &[
            "dlq",
            "purge",
            "--group",
            g,
            "--all",
            "--yes",
            "--archive",
            &archive,
            "--audit-log",
            &audit,
        ],
    );
    durable_before_the_first_ack(&trace, d, &archive);
    durable_before_the_first_ack(&trace, d, &audit);
    settle(&conn, &env.dead(), 0).await;
    assert_eq!(
        std::fs::read_to_string(&archive).unwrap().lines().count(),
        3
    );

    dead_letters(&conn, g, "e", 2).await;
    let trace = traced(&dir, &["dlq", "export", &export, "--group", g, "--remove"]);
    durable_before_the_first_ack(&trace, d, &export);
    settle(&conn, &env.dead(), 0).await;
    assert_eq!(std::fs::read_to_string(&export).unwrap().lines().count(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A purge whose connection is lost while it asks for confirmation: the
/// `y` deletes nothing (every held dead letter goes back to the queue), the
/// run exits 1 with its summary and the error, and the audit record says
/// what it did (nothing) and why. (Before: a bare `error: acking ...`, no
/// summary and no audit record.)
///
/// The `y` is typed once warren has answered the broker's
/// `connection.close` (seen through a [`Proxy`]): `rabbitmqctl
/// close_connection` returns once the broker has sent it, and a `y` typed
/// before warren reads it sends acks that the broker drops (the test
/// below).
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_whose_connection_is_lost_before_the_yes_says_so_in_its_summary_and_audit_record() {
    let conn = connect().await;
    let env = Env::new(&conn, "purgelost").await;
    dead_letters(&conn, &env.group, "q", 3).await;
    let user = warren_testkit::TempUser::create();
    let proxy = Proxy::start();
    let url = proxy.url(user.url().expose());
    let dir = std::env::temp_dir().join(format!("warren-purgelost-{}", env.group));
    std::fs::create_dir_all(&dir).unwrap();
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let g = env.group.as_str();
    let args = [
        "--amqp-url",
        &url,
        "dlq",
        "purge",
        "--group",
        g,
        "--all",
        "--audit-log",
        audit.to_str().unwrap(),
    ];
    let lost = || {
        close_connections_of(&user.name);
        // warren has taken in the broker's connection.close once it
        // answers it, or closes its end of the connection (the broker
        // closes its own right after its connection.close, and lapin then
        // closes without answering): an ack after that fails.
        proxy.wait_client("answer the broker's connection.close", |sent, closed| {
            closed || sent.contains(&CONNECTION_CLOSE_OK)
        });
    };
    let (shown, code) = on_a_terminal_then(&args, "[y/N] ", &lost, "y");
    assert_eq!(code, Some(1), "{shown:?}");
    assert!(shown.contains(&format!("{g}: 0 purged\r\n")), "{shown:?}");
    let said = shown
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error: {shown:?}"))
        .trim_end();
    let error = format!("the connection to the broker was lost (acking on \"{g}.dead\": ");
    assert!(
        said.starts_with(&format!("error: {g}: the purge stopped: {error}")),
        "{said}"
    );
    assert!(
        said.ends_with(&format!(
            "); the dead letters it did not delete are still in {g}.dead"
        )),
        "{said}"
    );
    let lines = audit_lines(&audit);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["action"], "purge");
    assert_eq!(lines[0]["count"], 0);
    assert_eq!(lines[0]["ids"], serde_json::json!([]));
    let recorded = lines[0]["error"].as_str().expect("the error in the record");
    assert!(recorded.starts_with(&error), "{recorded}");
    assert!(said.contains(recorded), "{said}\n{recorded}");
    assert_eq!(take_ids(&conn, &env.dead(), 3).await, names("q", 0..3));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A purge whose connection the broker closes after the `y`, before warren
/// learns of it: warren's 3 acks go out, and the broker, which has closed
/// the connection, drops them (every dead letter is back in the queue).
/// An ack gets no answer; the close of the scan channel does, after the
/// acks, and it never comes. So 0 are purged, in the summary and the audit
/// record, and the error names the 3 whose acks got no answer and says
/// where they may be. (Before: "3 purged" and an audit record of 3 purged
/// while the 3 were all still in the queue.)
///
/// The broker's `connection.close` is held by a [`Proxy`] until warren has
/// sent its acks and its `channel.close`.
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_whose_acks_get_no_answer_does_not_count_them_as_purged() {
    let conn = connect().await;
    let env = Env::new(&conn, "purgeunans").await;
    dead_letters(&conn, &env.group, "u", 3).await;
    let user = warren_testkit::TempUser::create();
    let proxy = Proxy::start();
    let url = proxy.url(user.url().expose());
    let dir = std::env::temp_dir().join(format!("warren-purgeunans-{}", env.group));
    std::fs::create_dir_all(&dir).unwrap();
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let g = env.group.as_str();
    let dq = env.dead();
    let args = [
        "--amqp-url",
        &url,
        "dlq",
        "purge",
        "--group",
        g,
        "--all",
        "--audit-log",
        audit.to_str().unwrap(),
    ];
    let releaser = Mutex::new(None);
    let closed = || {
        proxy.hold_when(|_| true);
        close_connections_of(&user.name);
        let p = proxy.handle();
        *releaser.lock().unwrap() = Some(std::thread::spawn(move || {
            let waited = std::panic::catch_unwind(|| {
                p.wait_client("send 3 acks, then channel.close", |sent, _| {
                    sent_in_order(sent, BASIC_ACK, 3, CHANNEL_CLOSE)
                });
            });
            p.release();
            waited
        }));
    };
    let (shown, code) = on_a_terminal_then(&args, "[y/N] ", &closed, "y");
    let waited = releaser.lock().unwrap().take().unwrap().join().unwrap();
    if let Err(e) = waited {
        std::panic::resume_unwind(e);
    }
    assert_eq!(code, Some(1), "{shown:?}");
    assert!(
        shown.contains(&format!("{g}: 0 purged (3 acked, unconfirmed)\r\n")),
        "{shown:?}"
    );
    let said = shown
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error: {shown:?}"))
        .trim_end();
    let unanswered = format!(
        "; the broker did not confirm the acks of 3 dead letters (\"u-0\" to \"u-2\"): each of \
         them was deleted or is back in {dq:?}"
    );
    assert!(
        said.starts_with(&format!(
            "error: {g}: the purge stopped: the connection to the broker was lost ("
        )),
        "{said}"
    );
    assert!(
        said.ends_with(&format!(
            "{unanswered}; the dead letters it did not delete are still in {dq}"
        )),
        "{said}"
    );
    let lines = audit_lines(&audit);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["action"], "purge");
    assert_eq!(lines[0]["count"], 0);
    assert_eq!(lines[0]["ids"], serde_json::json!([]));
    let recorded = lines[0]["error"].as_str().expect("the error in the record");
    assert!(recorded.ends_with(&unanswered), "{recorded}");
    assert!(said.contains(recorded), "{said}\n{recorded}");
    // What the broker did: it deleted none.
    assert_eq!(take_ids(&conn, &dq, 3).await, names("u", 0..3));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A replay whose connection the broker closes after it confirmed the 3
/// copies and before warren takes in the close: warren acks the 3 dead
/// letters, and the broker, which has closed the connection, drops the
/// acks (every dead letter is back in its queue, and its copy is in the
/// work queue). An ack gets no answer; only a later answered request on
/// the scan's channel (its close) would say that the broker handled it,
/// and it never comes. So none is replayed: the summary, the JSON and
/// the audit record name the 3 as copied with their removal unconfirmed.
/// (Before: "3 replayed", and an audit record of 3 replayed, while all 3
/// were still dead letters: a second replay duplicates them.)
///
/// A [`Proxy`] holds the broker's confirms until the broker has sent them
/// all and closed the connection, then lets them through and holds the
/// broker's `connection.close` until warren has sent its acks and closed
/// a channel after them.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_whose_acks_get_no_answer_does_not_count_them_as_replayed() {
    use serde_json::json;
    const N: usize = 3;
    let conn = connect().await;
    let env = Env::new(&conn, "repunans").await;
    let (g, dq) = (env.group.as_str(), env.dead());
    let dir = std::env::temp_dir().join(format!("warren-repunans-{g}"));
    std::fs::create_dir_all(&dir).unwrap();
    let unanswered = format!(
        "; the broker did not confirm the acks of 3 dead letters (\"v-0\" to \"v-2\"): their \
         copies are in the target, and each of them was removed or is still in {dq:?} (a \
         second replay duplicates those still there)"
    );
    for output in ["json", "table"] {
        dead_letters(&conn, g, "v", N).await;
        let audit = dir.join(format!("audit-{output}.jsonl"));
        let _ = std::fs::remove_file(&audit);
        let user = warren_testkit::TempUser::create();
        let proxy = Proxy::start();
        let url = proxy.url(user.url().expose());
        // The broker's first confirm (the only basic.ack it sends).
        proxy.hold_when(|f| f.method() == Some(BASIC_ACK));
        let child = Running::spawn(
            warren()
                .args(["--amqp-url", &url, "--output", output])
                .args(["dlq", "replay", "--group", g, "--all"])
                .args(["--audit-log", audit.to_str().unwrap()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        tokio::task::block_in_place(|| {
            proxy.wait_holding();
            proxy.wait_client("publish 3 copies", |sent, _| {
                sent.iter().filter(|m| **m == BASIC_PUBLISH).count() >= N
            });
        });
        // The broker routed the 3 copies and sent their confirms, then
        // closes the connection: its connection.close follows them.
        settle(&conn, g, N).await;
        tokio::task::block_in_place(|| {
            warren_testkit::wait_confirms_sent(&user.name);
            close_connections_of(&user.name);
            proxy.hold_instead(|f| f.method() == Some(CONNECTION_CLOSE));
            proxy.wait_client("ack, then close a channel", |sent, _| {
                sent_in_order(sent, BASIC_ACK, 1, CHANNEL_CLOSE)
            });
            proxy.release();
        });
        let out = child.wait_within(CLI_LIMIT);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{output}: {stdout}\n{stderr}");
        let said = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{output}: no error: {stderr}"));
        assert!(
            said.starts_with(&format!(
                "error: {g}: the replay stopped: the connection to the broker was lost ("
            )),
            "{output}: {said}"
        );
        assert!(
            said.ends_with(&format!(
                "{unanswered}; what it replayed before is in the summary and the audit record"
            )),
            "{output}: {said}"
        );
        if output == "json" {
            let v = json_of(&out, "replay");
            let r = &v[0];
            assert_eq!(r["replayed"], 0, "{r}");
            assert_eq!(r["ids"], json!([]), "{r}");
            assert_eq!(r["unconfirmed"], json!(names("v", 0..N)), "{r}");
            assert_eq!(r["not_removed"], json!([]), "{r}");
            assert_eq!(r["failed"], 0, "{r}");
            let error = r["error"].as_str().expect("the error");
            assert!(error.ends_with(&unanswered), "{error}");
        } else {
            assert_eq!(
                stdout,
                format!(
                    "{g}: 0 replayed to work queue {g:?}, 0 failed (left in the dead-letter \
                     queue), stopped early\n  3 copied, removal unconfirmed (removed or still \
                     dead letters: a second replay duplicates those still there): v-0, v-1, \
                     v-2\n"
                )
            );
        }
        let lines = audit_lines(&audit);
        assert_eq!(lines.len(), 1, "{output}: {lines:?}");
        assert_eq!(lines[0]["action"], "replay");
        assert_eq!(lines[0]["count"], 0);
        assert_eq!(lines[0]["ids"], json!([]));
        assert!(lines[0].get("not_removed").is_none(), "{}", lines[0]);
        let recorded = lines[0]["error"].as_str().expect("the error in the record");
        assert!(recorded.ends_with(&unanswered), "{recorded}");
        assert!(said.contains(recorded), "{said}\n{recorded}");
        // What the broker did: it removed none, and took every copy.
        assert_eq!(take_ids(&conn, &dq, N).await, names("v", 0..N));
        assert_eq!(take_ids(&conn, g, N).await, names("v", 0..N));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `export FILE --remove` whose connection the broker closes after it
/// delivered the 3 dead letters and before warren takes in the close:
/// warren writes and fsyncs the 3, then acks them, and the broker, which
/// has closed the connection, drops the ack (all 3 are back in the
/// queue). The ack gets no answer, and the close of the scan's channel,
/// which would say it was handled, never comes: so none is counted as
/// removed; the summary and the error say the 3 were acked without the
/// broker confirming it, and that the export holds them all. (Before: "3
/// exported, 3 removed" while all 3 were still in the queue.)
///
/// A [`Proxy`] holds the broker's `basic.consume-ok` (and the deliveries
/// behind it) until the broker has delivered all 3 and closed the
/// connection, then lets them through and holds the broker's
/// `connection.close` until warren has acked and closed the channel.
#[tokio::test(flavor = "multi_thread")]
async fn an_export_whose_removing_ack_gets_no_answer_does_not_count_them_as_removed() {
    use serde_json::json;
    const N: usize = 3;
    let conn = connect().await;
    let env = Env::new(&conn, "expunans").await;
    let (g, dq) = (env.group.as_str(), env.dead());
    let dir = std::env::temp_dir().join(format!("warren-expunans-{g}"));
    std::fs::create_dir_all(&dir).unwrap();
    for output in ["table", "json"] {
        dead_letters(&conn, g, "e", N).await;
        let file = dir.join(format!("export-{output}.jsonl"));
        let _ = std::fs::remove_file(&file);
        let f = file.to_str().unwrap();
        let user = warren_testkit::TempUser::create();
        let proxy = Proxy::start();
        let url = proxy.url(user.url().expose());
        proxy.hold_when(|frame| frame.method() == Some(BASIC_CONSUME_OK));
        let child = Running::spawn(
            warren()
                .args(["--amqp-url", &url, "--output", output])
                .args(["dlq", "export", f, "--group", g, "--remove"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        tokio::task::block_in_place(|| proxy.wait_holding());
        // Every dead letter is delivered (behind the held consume-ok);
        // then the broker closes the connection.
        settle(&conn, &dq, 0).await;
        tokio::task::block_in_place(|| {
            close_connections_of(&user.name);
            proxy.hold_instead(|f| f.method() == Some(CONNECTION_CLOSE));
            proxy.wait_client("ack, then close the channel", |sent, _| {
                sent_in_order(sent, BASIC_ACK, 1, CHANNEL_CLOSE)
            });
            proxy.release();
        });
        let out = child.wait_within(CLI_LIMIT);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{output}: {stdout}\n{stderr}");
        let unconfirmed = format!(
            "; before it, 3 dead letters were written to the export (lines 1-3) and 0 removed \
             from the queue; the broker did not confirm the ack of those 3: each of them was \
             removed or is still in {dq:?}, and the export holds them all (exporting again \
             writes those still there again); the export is {f}"
        );
        let said = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{output}: no error: {stderr}"));
        assert!(
            said.starts_with(&format!("error: the export of {dq:?} stopped: ")),
            "{output}: {said}"
        );
        assert!(said.ends_with(&unconfirmed), "{output}: {said}");
        if output == "table" {
            assert_eq!(
                stdout,
                format!(
                    "{g}: 3 exported, 0 removed (3 acked, unconfirmed) (stopped by an \
                     error)\nwrote {f}\n"
                )
            );
        } else {
            let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            let r = &v[0];
            assert_eq!(
                (&r["exported"], &r["removed"]),
                (&json!(3), &json!(0)),
                "{r}"
            );
            assert_eq!(r["unconfirmed"], 3, "{r}");
            assert!(r["error"].is_string(), "{r}");
        }
        assert_eq!(op_ids(&file), names("e", 0..N), "{output}: the file");
        // What the broker did: it removed none.
        assert_eq!(take_ids(&conn, &dq, N).await, names("e", 0..N));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--output json` is one JSON document on stdout on every path, also when
/// the command fails before it has a report (here: a refused login); the
/// exit code and stderr's error stay as they are.
#[test]
fn json_output_says_why_when_the_run_fails_before_its_report() {
    for sub in ["stats", "list"] {
        let o = run(&[
            "dlq",
            sub,
            "--group",
            "nobody",
            "--output",
            "json",
            "--amqp-url",
            "amqp://guest:not-the-password@127.0.0.1:5672/%2f",
        ]);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert_eq!(o.status.code(), Some(1), "{sub}: {err}");
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{sub}: {e}: {out:?}"));
        assert_eq!(v["error"]["kind"], "connect", "{sub}: {v}");
        assert_eq!(v["error"]["transient"], false, "{sub}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("refused user \"guest\"")),
            "{sub}: {v}"
        );
        assert!(!out.contains("not-the-password"), "{sub}: {out}");
        assert!(err.contains("error: "), "{sub}: {err}");
    }
}

/// Groups `a` and `b` under a unique prefix, applied; deleted on drop
/// with the topology file.
struct TwoGroups {
    a: String,
    b: String,
    file: TempFile,
    _cleanup: Cleanup,
}

impl TwoGroups {
    async fn new(conn: &Connection, tag: &str) -> TwoGroups {
        let prefix = format!("{}.", harness::unique(&format!("dlqcli-{tag}-")));
        let group = |g: &str| {
            format!("[[group]]\nname = \"{g}\"\nexchange = \"orders\"\nbindings = [\"{g}\"]\nqueue_type = \"classic\"\nretry = [\"1s\"]\n")
        };
        let text = format!(
            "[[exchange]]\nname = \"orders\"\nkind = \"topic\"\n\n{}\n{}",
            group("a"),
            group("b")
        );
        let t = Topology::parse(&text, "t.toml")
            .unwrap()
            .with_prefix(&prefix);
        let plan = Plan::new(&t);
        warren_topology::apply(conn, &plan).await.unwrap();
        let path = std::env::temp_dir().join(format!("{prefix}toml"));
        std::fs::write(&path, t.to_toml()).unwrap();
        TwoGroups {
            a: format!("{prefix}a"),
            b: format!("{prefix}b"),
            file: TempFile(path),
            _cleanup: Cleanup::new(&plan).at(URL.parse().unwrap()),
        }
    }

    /// Declares the groups' queues again (after one was deleted).
    async fn apply(&self, conn: &Connection) {
        let t = Topology::from_file(&self.file.0).unwrap();
        warren_topology::apply(conn, &Plan::new(&t)).await.unwrap();
    }
}

/// `warren dlq export FILE --remove` (every group of the topology: `a`
/// with 3 dead letters, then `b` with 10 000) while `b`'s dead-letter
/// queue is deleted after its first deliveries reached warren: exit 1,
/// and the summary says that `a`'s 3 were exported and removed, and how
/// many of `b`'s were written to the file (its lines, named) and that none
/// was removed; the error names the queue and says it was deleted. The
/// file holds exactly those lines. With `--output json`, the same as one
/// document. (Before: exit 0 and "b: K exported, K removed", as if the few
/// hundred read had been the whole queue; and an export that failed
/// partway printed only its error, nothing of what it had written and
/// removed.)
///
/// warren reads through a [`Proxy`] that holds the broker's frames from
/// `b`'s 101st delivery on while the test deletes the queue: the broker
/// can have sent no more of `b` than the socket buffers between them take
/// (its send buffer, at most 4 MiB with Linux's default `tcp_wmem`, and
/// the proxy's 64 KiB receive buffer), so with 20 MB of dead letters the
/// read is cut partway however loaded the machine is. (Deleting the queue
/// when `b`'s first lines reached the file raced with the read: under
/// load warren had read 4 250 of the 10 000 by then, and could read them
/// all.) The hold must end within the scan's idle timeout (5 s).
#[tokio::test(flavor = "multi_thread")]
async fn an_export_that_stops_partway_says_what_each_group_wrote_and_removed() {
    use serde_json::json;
    const N: usize = 10_000;
    // 10 000 bodies of 2 kB, 20 MB: far more than the broker's send
    // buffer and the proxy's receive buffer hold.
    const PAD: usize = 2_000;
    let conn = connect().await;
    let env = TwoGroups::new(&conn, "expcut").await;
    let (a_dead, b_dead) = (format!("{}.dead", env.a), format!("{}.dead", env.b));
    let dir = std::env::temp_dir().join(format!("warren-expcut-{}", env.a));
    std::fs::create_dir_all(&dir).unwrap();
    for output in ["table", "json"] {
        dead_letters(&conn, &env.a, "a", 3).await;
        padded_dead_letters(&conn, &env.b, "b", N, PAD).await;
        settle(&conn, &b_dead, N).await;
        let file = dir.join(format!("export-{output}.jsonl"));
        let _ = std::fs::remove_file(&file);
        let f = file.to_str().unwrap();
        let proxy = Proxy::start();
        let (b, mut delivered) = (env.b.clone(), 0);
        proxy.hold_when(move |frame| {
            if frame.delivered_with_key().as_deref() == Some(b.as_str()) {
                delivered += 1;
            }
            delivered > 100
        });
        let child = Running::spawn(
            warren()
                .env("WARREN_AMQP_URL", proxy.url(URL))
                .args(["-f", env.file.path(), "--output", output])
                .args(["dlq", "export", f, "--remove"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        tokio::task::block_in_place(|| proxy.wait_holding());
        let ch = conn.create_channel().await.unwrap();
        ch.queue_delete(b_dead.as_str().into(), Default::default())
            .await
            .unwrap();
        proxy.release();
        let out = child.wait_within(CLI_LIMIT);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{output}: {stdout}\n{stderr}");
        let written = op_ids(&file);
        let k = written.len() - 3;
        assert!(
            k < N,
            "{output}: all {N} read before the deletion: the socket buffers took them all"
        );
        let mut want: Vec<String> = (0..3).map(|i| format!("a-{i}")).collect();
        want.extend((0..k).map(|i| format!("b-{i}")));
        assert_eq!(written, want, "{output}: the file");
        let cut = format!(
            "reading {b_dead:?} stopped after {k} of {N} messages: the queue was deleted (the \
             dead letters it still held went with it); nothing was removed from it beyond what \
             this command reports; `warren topology apply` declares it again"
        );
        assert_eq!(
            stderr,
            format!(
                "error: the export of {b_dead:?} stopped: {cut}; before it, {k} dead letters \
                 were written to the export (lines 4-{}) and 0 removed from the queue; \
                 {b_dead:?} is gone: the export holds the only copy of those {k}; the export \
                 is {f}\n",
                k + 3
            ),
            "{output}"
        );
        if output == "table" {
            assert_eq!(
                stdout,
                format!(
                    "{}: 3 exported, 3 removed\n{}: {k} exported, 0 removed (stopped by an \
                     error)\nwrote {f}\n",
                    env.a, env.b
                )
            );
        } else {
            let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(
                v,
                json!([
                    {
                        "group": env.a,
                        "coverage": {"scanned": 3, "total": 3, "scan_limit_reached": false},
                        "exported": 3,
                        "removed": 3,
                        "lines": {"first": 1, "last": 3},
                        "error": null,
                    },
                    {
                        "group": env.b,
                        "coverage": {"scanned": k, "total": N, "scan_limit_reached": false},
                        "exported": k,
                        "removed": 0,
                        "lines": {"first": 4, "last": k + 3},
                        "error": cut,
                    },
                ])
            );
        }
        settle(&conn, &a_dead, 0).await;
        env.apply(&conn).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The message ids of an export file, in order.
fn op_ids(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// `dead_lettered_at` in `list` and `show --output json` is RFC 3339 UTC,
/// as the `x-warren-dead-lettered-at` header and every other time warren
/// writes in JSON are, and `null` when unknown; `show`'s `timestamp`
/// property is RFC 3339 too, as its header timestamps are. The export file
/// keeps its seconds: its format is `import`'s. (Before: `list` and `show`
/// gave Unix seconds, `1700000000`.)
#[tokio::test(flavor = "multi_thread")]
async fn json_times_are_rfc3339_utc_and_null_when_unknown() {
    let conn = connect().await;
    let env = Env::new(&conn, "times").await;
    let h = || warren_headers(&env, "permanent", "boom", "o.created");
    let mut with_header = h();
    with_header.insert(
        headers::DEAD_LETTERED_AT.into(),
        AMQPValue::LongString("2024-05-06T07:08:09Z".into()),
    );
    // The header wins over the timestamp property.
    let p = props("t-header", with_header).with_timestamp(1_700_000_000);
    dead_letter(&conn, &env, p, b"{}").await;
    let p = props("t-property", h()).with_timestamp(1_700_000_000);
    dead_letter(&conn, &env, p, b"{}").await;
    dead_letter(&conn, &env, props("t-none", h()), b"{}").await;
    let g = env.group.as_str();

    let l: serde_json::Value =
        serde_json::from_str(&ok(&["dlq", "list", "--group", g, "--output", "json"])).unwrap();
    let at: Vec<(&str, &serde_json::Value)> = l[0]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), &m["dead_lettered_at"]))
        .collect();
    let (header, property, none) = (
        serde_json::json!("2024-05-06T07:08:09Z"),
        serde_json::json!("2023-11-14T22:13:20Z"),
        serde_json::Value::Null,
    );
    assert_eq!(
        at,
        [
            ("t-header", &header),
            ("t-property", &property),
            ("t-none", &none)
        ]
    );
    let show: serde_json::Value = serde_json::from_str(&ok(&[
        "dlq", "show", "t-header", "--group", g, "--output", "json",
    ]))
    .unwrap();
    assert_eq!(show[0]["info"]["dead_lettered_at"], header);
    assert_eq!(show[0]["properties"]["timestamp"], property);
    let show: serde_json::Value = serde_json::from_str(&ok(&[
        "dlq", "show", "t-none", "--group", g, "--output", "json",
    ]))
    .unwrap();
    assert_eq!(show[0]["info"]["dead_lettered_at"], none);
    assert!(show[0]["properties"].get("timestamp").is_none(), "{show}");
    // The table shows the same time.
    let table = ok(&["dlq", "show", "t-header", "--group", g]);
    assert!(
        table.contains("\ndead-lettered  2024-05-06T07:08:09Z ("),
        "{table}"
    );
    assert!(
        table.contains("\n  timestamp          2023-11-14T22:13:20Z\n"),
        "{table}"
    );
    // The export keeps seconds.
    let export = ok(&["dlq", "export", "-", "--group", g]);
    let first: serde_json::Value = serde_json::from_str(export.lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], "t-header");
    assert_eq!(first["properties"]["timestamp"], 1_700_000_000);
}

/// `watch --output json` writes JSON Lines on stdout, each as it happens:
/// `watching` (groups, where metrics are), then for each new dead letter a
/// `dead_letter` line with what `list --output json` gives for it, then a
/// `new_dead_letters` line with the counts (`new` = the `dead_letter`
/// lines before it plus `unread`). SIGTERM ends it with exit 0. (Before:
/// nothing on stdout, only log lines on stderr.)
#[tokio::test(flavor = "multi_thread")]
async fn watch_output_json_writes_a_line_per_new_dead_letter_as_it_happens() {
    use std::io::BufRead;
    let conn = connect().await;
    let env = Env::new(&conn, "watchjson").await;
    let mut child = Running::spawn(
        warren()
            .args([
                "dlq",
                "watch",
                "--group",
                &env.group,
                "--interval",
                "500ms",
                "--metrics-addr",
                "127.0.0.1:0",
                "--output",
                "json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |within: Duration| -> serde_json::Value {
        let line = lines
            .recv_timeout(within)
            .expect("a line on stdout in time");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let start = next(Duration::from_secs(15));
    assert_eq!(start["event"], "watching", "{start}");
    assert_eq!(start["groups"], serde_json::json!([env.group]));
    let metrics = start["metrics"].as_str().unwrap().to_owned();
    // Measured once (empty): what comes next is new.
    let gauge = format!("warren_dead_letters{{group=\"{}\"}} 0", env.group);
    assert!(
        wait_for(Duration::from_secs(15), async || {
            let text = match reqwest::get(&metrics).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            text.lines().any(|l| l == gauge)
        })
        .await,
        "watch never measured"
    );

    dead_letters(&conn, &env.group, "j", 3).await;
    let mut dead = Vec::new();
    let counts = loop {
        let line = next(Duration::from_secs(15));
        match line["event"].as_str() {
            Some("dead_letter") => dead.push(line),
            Some("new_dead_letters") => break line,
            _ => panic!("unexpected line {line}"),
        }
    };
    let ids: Vec<&str> = dead.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["j-0", "j-1", "j-2"]);
    let at = counts["at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(at).is_ok(), "{at}");
    let mut rest = counts.clone();
    rest.as_object_mut().unwrap().remove("at");
    assert_eq!(
        rest,
        serde_json::json!({
            "event": "new_dead_letters", "group": env.group, "queue": env.dead(),
            "count": 3, "new": 3, "unread": 0, "oldest_seconds": null,
        })
    );
    // Each line is what `list --output json` gives for that dead letter,
    // with its group and queue (the tap does not know the position).
    let l: serde_json::Value = serde_json::from_str(&ok(&[
        "dlq", "list", "--group", &env.group, "--output", "json",
    ]))
    .unwrap();
    for (d, m) in dead.iter().zip(l[0]["messages"].as_array().unwrap()) {
        let mut want = m.as_object().unwrap().clone();
        want.insert("event".into(), "dead_letter".into());
        want.insert("group".into(), env.group.as_str().into());
        want.insert("queue".into(), env.dead().into());
        want.insert("position".into(), serde_json::Value::Null);
        assert_eq!(d, &serde_json::Value::Object(want));
    }
    assert_eq!(dead[0]["error"], "order 0 broke");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "watch did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    reader.join().unwrap();
    let left: Vec<String> = lines.try_iter().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `import` of a file whose group makes a queue name over AMQP's 255
/// bytes: refused (exit 2) naming the line, before anything is sent; a
/// `--to-group` or `--group` that long too. The file, fixed, imports
/// every message. (Before: a panic in lapin, exit 101.)
#[tokio::test(flavor = "multi_thread")]
async fn import_of_a_group_too_long_for_a_queue_name_is_refused_naming_the_line() {
    let conn = connect().await;
    let env = Env::new(&conn, "longgroup").await;
    dead_letters(&conn, &env.group, "L", 3).await;
    let g = env.group.as_str();
    let dir = std::env::temp_dir().join(format!("warren-long-{g}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("export.jsonl");
    let path = file.to_str().unwrap();
    ok(&["dlq", "export", path, "--group", g, "--remove"]);
    assert_eq!(count(&conn, &env.dead()).await, 0);
    let good = std::fs::read_to_string(&file).unwrap();
    let long = "g".repeat(251);
    let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
    let mut second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    second["group"] = long.as_str().into();
    lines[1] = second.to_string();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let too_long = format!(
        "group \"{}\"… is 251 bytes long: its dead-letter queue name would be 256 bytes, over \
         AMQP's limit of 255, so no such queue can exist",
        "g".repeat(40)
    );

    let out = run(&["dlq", "import", path]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!("error: {path}:2: {too_long}; fix its \"group\", or import with --to-group\n")
    );
    assert_eq!(text(&out.stdout), "");
    let out = run(&["dlq", "import", path, "--to-group", &long]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!("error: --to-group: {too_long}; check the group name\n")
    );
    let out = run(&["dlq", "list", "--group", &long]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!("error: --group: {too_long}; check the group name\n")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&conn, &env.dead()).await, 0, "nothing was imported");

    // Nothing lost: the file as exported imports every message.
    std::fs::write(&file, &good).unwrap();
    ok(&["dlq", "import", path]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(take_ids(&conn, &env.dead(), 3).await, names("L", 0..3));
}

/// `import` into a group without a dead-letter queue sends nothing and
/// says what to check, named by what chose the queue (`--to-group`, or the
/// file's line: import has no `--group`). As `--group` elsewhere (`dlq
/// list --group`, `consume --group`): a group that is neither in the
/// topology file nor on the broker is a usage error (exit 2) listing the
/// file's groups; a group of the file whose queue is missing needs `warren
/// topology apply` (exit 1). (Before: exit 1 for both, and "if it is a
/// group of the topology" where warren could look.)
#[tokio::test(flavor = "multi_thread")]
async fn an_import_into_a_group_without_a_dead_letter_queue_names_what_to_check() {
    let conn = connect().await;
    let env = Env::new(&conn, "noqueue").await;
    dead_letters(&conn, &env.group, "q", 2).await;
    let g = env.group.as_str();
    let file = TempFile(std::env::temp_dir().join(format!("{g}export.jsonl")));
    ok(&["dlq", "export", file.path(), "--group", g]);
    let nosuch = format!("{g}nosuch");
    // The topology file: the group, and one never applied.
    let unapplied = format!("{g}unapplied");
    let topology = TempFile(std::env::temp_dir().join(format!("{g}2.toml")));
    std::fs::write(
        &topology.0,
        format!(
            "{}\n[[group]]\nname = \"{unapplied}\"\nexchange = \"{}\"\nbindings = [\"o.#\"]\nqueue_type = \"classic\"\nretry = [\"1s\"]\n",
            env.toml, env.orders
        ),
    )
    .unwrap();
    let t = topology.path();
    // Each case, in table and JSON output: exit code, kind, message.
    let check = |args: &[&str], code: i32, kind: &str, message: &str| {
        let mut all = vec!["-f", t, "dlq", "import", file.path()];
        all.extend(args);
        let out = run(&all);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), format!("error: {message}\n"), "{args:?}");
        assert_eq!(text(&out.stdout), "", "{args:?}");
        all.extend(["--output", "json"]);
        let out = run(&all);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not one JSON document ({e}): {}",
                text(&out.stdout)
            )
        });
        assert_eq!(
            doc,
            serde_json::json!({ "error": { "kind": kind, "message": message } }),
            "{args:?}"
        );
    };

    check(
        &["--to-group", &nosuch],
        2,
        "usage",
        &format!("--to-group {nosuch:?}: no group {nosuch:?} in {t} and no queue \"{nosuch}.dead\" on the broker; groups: {g}, {unapplied}"),
    );
    check(
        &["--to-group", &unapplied],
        1,
        "error",
        &format!("--to-group {unapplied:?}: queue \"{unapplied}.dead\" does not exist: {unapplied:?} is a group of {t}: run `warren topology apply` first"),
    );

    // Line 2 of the file names a group without a queue: one that is
    // nowhere, then one of the topology file.
    let exported = std::fs::read_to_string(&file.0).unwrap();
    let with_group = |group: &str| {
        let mut lines: Vec<String> = exported.lines().map(str::to_owned).collect();
        let mut second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        second["group"] = group.into();
        lines[1] = second.to_string();
        std::fs::write(&file.0, lines.join("\n") + "\n").unwrap();
    };
    let f = file.path();
    with_group(&nosuch);
    check(
        &[],
        2,
        "usage",
        &format!("{f}:2: group {nosuch:?}: no group {nosuch:?} in {t} and no queue \"{nosuch}.dead\" on the broker; groups: {g}, {unapplied}; import the file into a group that exists with --to-group"),
    );
    with_group(&unapplied);
    check(
        &[],
        1,
        "error",
        &format!("{f}:2: group {unapplied:?}: queue \"{unapplied}.dead\" does not exist: {unapplied:?} is a group of {t}: run `warren topology apply` first, or import the file into another group with --to-group"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(peek_ids(&conn, &env.dead(), 2).await, names("q", 0..2));
}

/// A replay `--to-original` whose original exchange does not exist fails
/// each such dead letter with what to do, and leaves it in place.
/// (Before: only `exchange "X" does not exist`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_to_an_original_exchange_that_does_not_exist_says_what_to_do() {
    let conn = connect().await;
    let env = Env::new(&conn, "noexch").await;
    let gone = format!("{}nosuch", env.orders);
    let mut h = at(
        warren_headers(&env, "permanent", "boom", "o.x"),
        Duration::from_secs(5),
    );
    h.insert(
        headers::ORIGINAL_EXCHANGE.into(),
        AMQPValue::LongString(gone.as_str().into()),
    );
    dead_letter(&conn, &env, props("x-0", h), b"{}").await;
    let g = env.group.as_str();
    let out = run(&[
        "dlq",
        "replay",
        "--group",
        g,
        "--all",
        "--to-original",
        "--output",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let v = json_of(&out, "replay");
    assert_eq!(
        v[0]["errors"],
        serde_json::json!([format!(
            "x-0: exchange {gone:?} does not exist: declare it (`warren topology apply` does, if the topology file has it) and replay again, or replay to the group's work queue instead (without --to-original)"
        )]),
        "{v}"
    );
    assert_eq!(v[0]["failed"], 1, "{v}");
    assert_eq!(peek_ids(&conn, &env.dead(), 1).await, ["x-0"]);
}

/// `list` prints every id whole, however long, in a column as wide as the
/// longest, so the id it shows can be pasted into `show` and `replay --id`.
/// (Before: ids over 38 characters were cut with `…`.)
#[tokio::test(flavor = "multi_thread")]
async fn list_shows_long_ids_whole_and_show_takes_them() {
    let conn = connect().await;
    let env = Env::new(&conn, "longid").await;
    let long = format!("order-{}-end", "x".repeat(90));
    for id in [long.as_str(), "s-1"] {
        let h = at(
            warren_headers(&env, "permanent", "boom", "o.x"),
            Duration::from_secs(5),
        );
        dead_letter(&conn, &env, props(id, h), b"{}").await;
    }
    let g = env.group.as_str();
    let out = ok(&["dlq", "list", "--group", g]);
    let rows: Vec<&str> = out.lines().skip(2).collect();
    let shown: Vec<&str> = rows
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(shown, [long.as_str(), "s-1"], "{out}");
    // Still a table: the kind column starts at the same place in every row.
    let header = out.lines().nth(1).unwrap();
    let kind_at = header.find("  kind ").unwrap();
    for r in &rows {
        assert_eq!(r.find("  permanent "), Some(kind_at), "{out}");
    }
    let show = ok(&["dlq", "show", "--group", g, shown[0]]);
    assert!(
        show.starts_with(&format!("id             {long}\n")),
        "{show}"
    );
    let out = ok(&[
        "dlq",
        "replay",
        "--group",
        g,
        "--id",
        shown[0],
        "--dry-run",
        "--output",
        "json",
    ]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["ids"],
        serde_json::json!([long])
    );
    assert_eq!(
        peek_ids(&conn, &env.dead(), 2).await,
        [long.as_str(), "s-1"]
    );
}

/// While another reader (a slow replay, a consumer) holds dead letters
/// unacked, the broker counts none of them: `list` and `stats` then say
/// how many consumers the queue has and that what they hold is not
/// counted (JSON: `consumers`). Nothing moves. (Before:
/// "(0 messages)", exit 0, and nothing else.)
#[tokio::test(flavor = "multi_thread")]
async fn list_and_stats_say_when_a_consumer_may_hold_dead_letters_they_do_not_count() {
    let conn = connect().await;
    let env = Env::new(&conn, "held").await;
    dead_letters(&conn, &env.group, "h", 3).await;
    let (g, dead) = (env.group.as_str(), env.dead());
    // Nobody else reading: no note, 0 consumers.
    let out = ok(&["dlq", "list", "--group", g]);
    assert!(out.starts_with(&format!("{dead} (3 messages)\n")), "{out}");
    assert!(!out.contains("note:"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["dlq", "stats", "--group", g, "--output", "json"])).unwrap();
    assert_eq!(v[0]["consumers"], 0, "{v}");

    let ch = conn.create_channel().await.unwrap();
    // Held until the channel closes: dropping a lapin consumer cancels it.
    let _consumer = ch
        .basic_consume(
            dead.as_str().into(),
            "held-consumer".into(),
            lapin::options::BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    settle(&conn, &dead, 0).await;
    let note = format!(
        "  note: {dead} has 1 consumer (another reader, such as a replay in progress): the dead letters it holds unacked are not counted here; they go back to the queue unless it removes them\n"
    );
    let out = ok(&["dlq", "list", "--group", g]);
    assert_eq!(out, format!("{dead} (0 messages)\n{note}"));
    let out = ok(&["dlq", "stats", "--group", g]);
    assert_eq!(
        out,
        format!("{dead}  0 dead letters  oldest -  newest -\n{note}")
    );
    for cmd in ["list", "stats"] {
        let out = run(&["dlq", cmd, "--group", g, "--output", "json"]);
        let v = json_of(&out, cmd);
        assert_eq!(v[0]["consumers"], 1, "{cmd}: {v}");
        assert_eq!(v[0]["coverage"]["total"], 0, "{cmd}: {v}");
    }
    // `show` finds nothing, and says why that may be.
    let out = run(&["dlq", "show", "--group", g, "h-0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!(
            "warning: {}no dead letter with id \"h-0\" in {g}\n",
            &note["  note: ".len()..]
        )
    );
    ch.close(200, "done".into()).await.unwrap();
    assert_eq!(peek_ids(&conn, &dead, 3).await, names("h", 0..3));
}

/// `replay --rate` is checked as `publish --rate` is, with the same words:
/// a rate below one message every 31 years is a usage error before
/// anything moves. (Before: any positive rate was taken, and `1e-300`
/// replayed the first dead letter, then waited until it was stopped.)
#[tokio::test(flavor = "multi_thread")]
async fn replay_refuses_a_rate_too_low_to_schedule_as_publish_does() {
    let conn = connect().await;
    let env = Env::new(&conn, "lowrate").await;
    dead_letters(&conn, &env.group, "r", 2).await;
    let g = env.group.as_str();
    for rate in ["1e-300", "0.0000000001", "0", "-1", "NaN"] {
        let flag = format!("--rate={rate}");
        let replay = warren()
            .args(["dlq", "replay", "--group", g, "--all", &flag])
            .output_within(Duration::from_secs(30));
        let publish = run(&["publish", "-e", &env.orders, "--body", "{}", &flag]);
        assert_eq!(replay.status.code(), Some(2), "--rate {rate}: {replay:?}");
        assert_eq!(publish.status.code(), Some(2), "--rate {rate}: {publish:?}");
        assert_eq!(text(&replay.stderr), text(&publish.stderr), "--rate {rate}");
        assert!(
            text(&replay.stderr).starts_with("error: --rate must be a "),
            "{}",
            text(&replay.stderr)
        );
    }
    let out = run(&["dlq", "replay", "--group", g, "--all", "--rate", "1e-300"]);
    assert_eq!(
        text(&out.stderr),
        "error: --rate must be a number of messages per second from 0.000000001 (one every 31 years) up, not 1e-300\n"
    );
    // The lowest rate allowed is taken (here a dry run: nothing waits).
    ok(&[
        "dlq",
        "replay",
        "--group",
        g,
        "--all",
        "--rate",
        "1e-9",
        "--dry-run",
    ]);
    assert_eq!(count(&conn, &env.group).await, 0, "nothing replayed");
    assert_eq!(peek_ids(&conn, &env.dead(), 2).await, names("r", 0..2));
}

/// A purge or an export that fails before it removed or wrote anything (a
/// wrong password, a group of the topology file not applied yet) leaves no
/// file behind: the same command, run again once the cause is fixed,
/// works. (Before: the empty file it had created refused the second run,
/// "already exists, and warren never overwrites a file".)
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_or_export_that_fails_before_anything_moved_leaves_no_file() {
    let conn = connect().await;
    let env = Env::new(&conn, "nofile").await;
    dead_letters(&conn, &env.group, "n", 2).await;
    let g = env.group.as_str();
    let unapplied = format!("{g}unapplied");
    let topology = TempFile(std::env::temp_dir().join(format!("{g}2.toml")));
    std::fs::write(
        &topology.0,
        format!(
            "{}\n[[group]]\nname = \"{unapplied}\"\nexchange = \"{}\"\nbindings = [\"o.#\"]\nqueue_type = \"classic\"\nretry = [\"1s\"]\n",
            env.toml, env.orders
        ),
    )
    .unwrap();
    let t = topology.path();
    let file = TempFile(std::env::temp_dir().join(format!("{g}out.jsonl")));
    let f = file.path();
    let bad_password = "amqp://guest:wrong-s3cret@127.0.0.1:5672/%2f";
    let missing = format!(
        "error: queue \"{unapplied}.dead\" does not exist (run `warren topology apply` first, or check --group)\n"
    );
    let cases: Vec<(&str, Vec<&str>, Option<&str>)> = vec![
        (
            bad_password,
            vec!["purge", "--group", g, "--all", "--yes", "--archive", f],
            None,
        ),
        (
            URL,
            vec![
                "purge",
                "--group",
                g,
                "--group",
                &unapplied,
                "--all",
                "--yes",
                "--archive",
                f,
            ],
            Some(&missing),
        ),
        (bad_password, vec!["export", f, "--group", g], None),
        (
            URL,
            vec!["export", f, "--group", &unapplied],
            Some(&missing),
        ),
    ];
    for (url, args, want) in &cases {
        let out = warren()
            .args(["-f", t, "--amqp-url", url, "dlq"])
            .args(args)
            .output_within(CLI_LIMIT);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        if let Some(want) = want {
            assert_eq!(text(&out.stderr), *want, "{args:?}");
        }
        assert!(!text(&out.stderr).contains("s3cret"), "{out:?}");
        assert!(!file.0.exists(), "{args:?}: {f} was left behind");
    }
    assert_eq!(peek_ids(&conn, &env.dead(), 2).await, names("n", 0..2));
    // Fixed, the same export works.
    ok(&["-f", t, "dlq", "export", f, "--group", g]);
    assert_eq!(std::fs::read_to_string(&file.0).unwrap().lines().count(), 2);
}
