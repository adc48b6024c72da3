//! `watch` against the real broker: every new dead letter is logged and
//! alerted, also when a replay or purge removes as many within the same
//! interval; the tap queue it reads them from is exclusive, bounded, takes
//! nothing from the dead-letter queue and is gone when the watch stops; a
//! user who may not declare it still gets alerts (by queue growth), and so
//! does the interval after a reconnection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use warren_operator as op;
use warren_testkit::{connect, count, rabbitmqctl, Cleanup, TempUser};
use warren_topology::{
    dead_queue, headers, AmqpUrl, ConnectOptions, Plan, Topology, DEAD_LETTER_EXCHANGE,
};

const FILE: &str = r#"
[[exchange]]
name = "orders"
kind = "topic"

[[group]]
name = "billing"
exchange = "orders"
bindings = ["order.created"]
queue_type = "classic"
retry = ["1s"]
"#;

/// A group of its own on the broker (deleted when dropped).
struct Group {
    name: String,
    prefix: String,
    conn: lapin::Connection,
    _cleanup: Cleanup,
}

async fn group() -> Group {
    let prefix = warren_testkit::unique_prefix("watch");
    let topology = Topology::parse(FILE, "test.toml")
        .unwrap()
        .with_prefix(&prefix);
    let plan = Plan::new(&topology);
    let cleanup = Cleanup::new(&plan);
    let conn = connect().await;
    warren_topology::apply(&conn, &plan).await.unwrap();
    Group {
        name: format!("{prefix}billing"),
        prefix,
        conn,
        _cleanup: cleanup,
    }
}

impl Group {
    fn dead(&self) -> String {
        dead_queue(&self.name)
    }

    /// A dead letter as the consumer sends it after the last retry: to
    /// `warren.dlx` with key `{group}`.
    async fn dead_letter(&self, id: &str) {
        let ch = self.conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        self.dead_letter_on(&ch, id).await;
        let _ = ch.close(200, "ok".into()).await;
    }

    async fn dead_letter_on(&self, ch: &lapin::Channel, id: &str) {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(4));
        h.insert(
            headers::ERROR.into(),
            AMQPValue::LongString(format!("order {id} failed").into()),
        );
        h.insert(
            headers::ERROR_KIND.into(),
            AMQPValue::LongString("permanent".into()),
        );
        h.insert(
            headers::GROUP.into(),
            AMQPValue::LongString(self.name.as_str().into()),
        );
        h.insert(
            headers::DEAD_LETTERED_AT.into(),
            AMQPValue::LongString(
                humantime::format_rfc3339_seconds(SystemTime::now())
                    .to_string()
                    .into(),
            ),
        );
        let p = BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2)
            .with_headers(h);
        warren_testkit::publish_on(ch, DEAD_LETTER_EXCHANGE, &self.name, b"{}", p).await;
    }

    /// What a replay or purge does to the head of the dead-letter queue:
    /// take it for good. Returns its id.
    async fn take_head(&self) -> String {
        let ch = self.conn.create_channel().await.unwrap();
        let got = ch
            .basic_get(self.dead().as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("a dead letter to take");
        let id = got
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        got.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
        let _ = ch.close(200, "ok".into()).await;
        id
    }

    /// The queues bound to `warren.dlx` with this group's key other than
    /// its dead-letter queue: the watch's tap.
    fn taps(&self) -> Vec<String> {
        rabbitmqctl(&[
            "list_bindings",
            "-p",
            "/",
            "source_name",
            "destination_name",
            "routing_key",
            "-q",
            "--no-table-headers",
        ])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 3
                && f[0] == DEAD_LETTER_EXCHANGE
                && f[2] == self.name
                && f[1] != self.dead())
            .then(|| f[1].to_owned())
        })
        .collect()
    }
}

/// A running `watch` of one group.
struct Watching {
    events: mpsc::Receiver<op::WatchEvent>,
    /// The new dead letters reported so far, in order.
    dead_letters: Vec<op::NewDeadLetter>,
    /// Measurements that worked (`ready(true)`).
    measured: Arc<AtomicU64>,
    metrics: op::Metrics,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), op::OperatorError>>,
}

fn start(url: AmqpUrl, group: &str, interval: Duration) -> Watching {
    let (tx, events) = mpsc::channel(1024);
    let measured = Arc::new(AtomicU64::new(0));
    let metrics = op::Metrics::unregistered();
    let cancel = CancellationToken::new();
    let task = {
        let (measured, metrics, cancel) = (measured.clone(), metrics.clone(), cancel.clone());
        let groups = vec![group.to_owned()];
        tokio::spawn(async move {
            let opts = op::WatchOptions {
                interval,
                ..Default::default()
            };
            let ready = move |ok: bool| {
                if ok {
                    measured.fetch_add(1, Ordering::SeqCst);
                }
            };
            let connect = ConnectOptions::new(url, "test-watch").attempts(3);
            op::watch(&connect, &groups, &opts, &metrics, tx, &ready, &cancel).await
        })
    };
    Watching {
        events,
        dead_letters: Vec::new(),
        measured,
        metrics,
        cancel,
        task,
    }
}

impl Watching {
    fn measured(&self) -> u64 {
        self.measured.load(Ordering::SeqCst)
    }

    /// Waits until a measurement after the `n`th one worked, and returns
    /// right after it (the next one is an interval away).
    async fn measured_after(&self, n: u64) {
        warren_testkit::wait_for(Duration::from_secs(20), "a measurement", || {
            self.measured() > n
        })
        .await;
    }

    /// The next alert before `deadline`; the new dead letters reported
    /// before it are kept in `dead_letters`.
    async fn next_alert(&mut self, deadline: Instant) -> Option<op::Alert> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(op::WatchEvent::Alert(a))) => return Some(a),
                Ok(Some(op::WatchEvent::DeadLetter(d))) => self.dead_letters.push(d),
                Ok(Some(other)) => panic!("unexpected event {other:?}"),
                _ => return None,
            }
        }
    }

    /// Alerts until `new` sums to at least `n` (or `within` passes).
    async fn alerts_until(&mut self, n: u64, within: Duration) -> Vec<op::Alert> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while got.iter().map(|a: &op::Alert| a.new).sum::<u64>() < n {
            match self.next_alert(deadline).await {
                Some(a) => got.push(a),
                None => break,
            }
        }
        got
    }

    /// Alerts that arrive within `within`.
    async fn more_alerts(&mut self, within: Duration) -> Vec<op::Alert> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while let Some(a) = self.next_alert(deadline).await {
            got.push(a);
        }
        got
    }

    fn gauge(&self, group: &str) -> i64 {
        self.metrics.dead_letters.with_label_values(&[group]).get()
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("watch stops when cancelled")
            .unwrap()
            .unwrap();
    }
}

fn ids(alerts: &[op::Alert]) -> Vec<String> {
    alerts
        .iter()
        .flat_map(|a| a.examples.iter().map(|s| s.info.id.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_dead_letter_is_alerted_when_a_replay_removes_one_in_the_same_interval() {
    let g = group().await;
    g.dead_letter("old-1").await;
    let mut w = start(warren_testkit::url(), &g.name, Duration::from_secs(1));
    w.measured_after(0).await;
    let n = w.measured();
    w.measured_after(n).await;
    // Right after a measurement: one dead letter leaves (a replay takes it)
    // and a new one arrives, both well within the interval. The queue's
    // length does not change.
    assert_eq!(g.take_head().await, "old-1");
    g.dead_letter("new-1").await;
    assert_eq!(count(&g.conn, &g.dead()).await, 1);

    let got = w.alerts_until(1, Duration::from_secs(10)).await;
    assert_eq!(
        got.len(),
        1,
        "one alert for the one new dead letter: {got:?}"
    );
    let a = &got[0];
    assert_eq!((a.group.as_str(), a.new, a.count), (g.name.as_str(), 1, 1));
    assert_eq!(a.queue, g.dead());
    assert_eq!(ids(&got), ["new-1"]);
    assert_eq!(a.examples[0].info.kind, "permanent");
    assert_eq!(a.examples[0].info.error, "order new-1 failed");
    // Nothing else is alerted, and the gauge stays measured.
    assert!(w.more_alerts(Duration::from_millis(2500)).await.is_empty());
    assert_eq!(w.gauge(&g.name), 1);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_is_alerted_once_per_interval_and_every_one_is_counted() {
    const N: usize = 600;
    let g = group().await;
    let mut w = start(warren_testkit::url(), &g.name, Duration::from_millis(500));
    w.measured_after(0).await;
    let ch = g.conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let sent: Vec<String> = (0..N).map(|i| format!("b-{i:04}")).collect();
    for id in &sent {
        g.dead_letter_on(&ch, id).await;
    }
    let _ = ch.close(200, "ok".into()).await;

    let mut got = w.alerts_until(N as u64, Duration::from_secs(30)).await;
    got.extend(w.more_alerts(Duration::from_millis(1500)).await);
    assert_eq!(got.iter().map(|a| a.new).sum::<u64>(), N as u64, "{got:?}");
    // Alert k covers the arrivals after those of alerts 0..k; its examples
    // are the last (at most 10) of them, in order.
    let mut first = 0;
    for a in &got {
        assert_eq!(a.group, g.name);
        let end = first + usize::try_from(a.new).unwrap();
        let want = &sent[end.saturating_sub(10).max(first)..end];
        let have: Vec<&str> = a.examples.iter().map(|s| s.info.id.as_str()).collect();
        assert_eq!(have, want, "alert covering {first}..{end}");
        assert_eq!(a.unread, 0);
        first = end;
    }
    // Each one was reported, once, in order, before the alert counting it.
    let reported: Vec<&str> = w.dead_letters.iter().map(|d| d.info.id.as_str()).collect();
    assert_eq!(reported, sent);
    assert!(w.dead_letters.iter().all(|d| d.group == g.name
        && d.queue == g.dead()
        && d.position.is_none()
        && d.info.kind == "permanent"));
    // Stopped first: each measurement peeks at the head (delivered, then
    // requeued), and a passive count does not include it meanwhile.
    w.stop().await;
    assert_eq!(count(&g.conn, &g.dead()).await as usize, N);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tap_is_exclusive_bounded_takes_nothing_and_is_gone_after_cancel() {
    let g = group().await;
    g.dead_letter("before").await;
    let mut w = start(warren_testkit::url(), &g.name, Duration::from_millis(500));
    w.measured_after(0).await;
    let taps = g.taps();
    assert_eq!(
        taps.len(),
        1,
        "one tap bound with the group's key: {taps:?}"
    );
    let tap = &taps[0];
    assert!(tap.starts_with("amq.gen-"), "server-named: {tap}");
    let row = rabbitmqctl(&[
        "list_queues",
        "-p",
        "/",
        "name",
        "exclusive",
        "auto_delete",
        "durable",
        "arguments",
        "-q",
        "--no-table-headers",
    ])
    .lines()
    .find(|l| l.split('\t').next() == Some(tap.as_str()))
    .map(str::to_owned)
    .expect("the tap is listed");
    let f: Vec<&str> = row.split('\t').collect();
    assert_eq!(&f[1..4], ["true", "true", "false"], "{row}");
    // Bounded, and full means the oldest goes (never a refused publish).
    for arg in [
        "{\"x-max-length\",",
        "{\"x-max-length-bytes\",",
        "{\"x-overflow\",\"drop-head\"}",
    ] {
        assert!(f[4].contains(arg), "{arg} in {row}");
    }

    // Read with acks and a prefetch window: a watch that falls behind
    // leaves the backlog on the broker, where the length bound holds.
    let consumer = rabbitmqctl(&[
        "list_consumers",
        "-p",
        "/",
        "queue_name",
        "ack_required",
        "prefetch_count",
        "-q",
        "--no-table-headers",
    ])
    .lines()
    .find(|l| l.split('\t').next() == Some(tap.as_str()))
    .map(str::to_owned)
    .expect("the tap has a consumer");
    assert_eq!(consumer, format!("{tap}\ttrue\t256"));

    for i in 0..3 {
        g.dead_letter(&format!("during-{i}")).await;
    }
    let got = w.alerts_until(3, Duration::from_secs(10)).await;
    assert_eq!(ids(&got), ["during-0", "during-1", "during-2"]);
    w.stop().await;

    // The dead-letter queue kept every one; the tap is gone.
    assert_eq!(count(&g.conn, &g.dead()).await, 4);
    let ch = g.conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            tap.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("the tap is deleted");
    assert!(err.to_string().contains("NOT_FOUND"), "{err}");
    assert!(g.taps().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_who_may_not_declare_the_tap_gets_alerts_by_growth() {
    let g = group().await;
    let user = TempUser::create();
    // Configure only this test's queues: not the server-named amq.gen-*.
    let own = format!("^{}.*", g.prefix.replace('.', "\\."));
    rabbitmqctl(&["set_permissions", "-p", "/", &user.name, &own, ".*", ".*"]);
    let mut w = start(user.url(), &g.name, Duration::from_millis(500));
    w.measured_after(0).await;
    assert!(g.taps().is_empty(), "no tap could be declared");
    g.dead_letter("grown-1").await;
    g.dead_letter("grown-2").await;

    let got = w.alerts_until(2, Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|a| a.new).sum::<u64>(), 2, "{got:?}");
    assert_eq!(ids(&got), ["grown-1", "grown-2"]);
    // Found by growth: reported with their place in the queue.
    let reported: Vec<(&str, Option<usize>)> = w
        .dead_letters
        .iter()
        .map(|d| (d.info.id.as_str(), d.position))
        .collect();
    assert_eq!(reported, [("grown-1", Some(0)), ("grown-2", Some(1))]);
    assert_eq!(w.gauge(&g.name), 2);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_interval_after_a_reconnection_counts_by_growth_and_nothing_twice() {
    let g = group().await;
    // A user of its own: its connection is the watch's, closed below.
    let user = TempUser::create();
    let mut w = start(user.url(), &g.name, Duration::from_secs(3));
    w.measured_after(0).await;
    let n = w.measured();
    w.measured_after(n).await;
    g.dead_letter("tapped-1").await;

    // Close the watch's connection, then two dead letters arrive while it
    // is away (the next measurement is seconds away).
    let pids = rabbitmqctl(&[
        "list_connections",
        "pid",
        "user",
        "-q",
        "--no-table-headers",
    ]);
    let pid = pids
        .lines()
        .find_map(|l| l.split_once('\t').filter(|(_, u)| *u == user.name))
        .map(|(p, _)| p.to_owned())
        .expect("the watch's connection");
    rabbitmqctl(&["close_connection", &pid, "test: watch reconnects"]);
    let closed = w.measured();
    g.dead_letter("away-1").await;
    g.dead_letter("away-2").await;

    let got = w.alerts_until(3, Duration::from_secs(20)).await;
    assert_eq!(got.iter().map(|a| a.new).sum::<u64>(), 3, "{got:?}");
    let mut seen = ids(&got);
    seen.sort();
    assert_eq!(seen, ["away-1", "away-2", "tapped-1"]);

    // The tap is back: a later one is alerted once, by the tap.
    w.measured_after(closed).await;
    assert_eq!(g.taps().len(), 1);
    let n = w.measured();
    w.measured_after(n).await;
    g.dead_letter("after-1").await;
    let mut got = w.alerts_until(1, Duration::from_secs(10)).await;
    got.extend(w.more_alerts(Duration::from_secs(4)).await);
    assert_eq!(got.iter().map(|a| a.new).sum::<u64>(), 1, "{got:?}");
    assert_eq!(ids(&got), ["after-1"]);
    assert_eq!(w.gauge(&g.name), 4);
    w.stop().await;
}
