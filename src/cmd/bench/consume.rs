//! `warren bench consume|e2e|retry`: the consumer group against a bare lapin
//! loop (same prefetch, same publish window, one `basic_ack` per delivery),
//! one JSON line per run.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use tokio_util::sync::CancellationToken;
use warren_consumer::{handler_fn, ConsumerGroup, Delivery, HandlerError};
use warren_topology::{headers, Broker, ConnectOptions, Group, Plan, Topology};

use crate::cli::Global;

/// Queue type of the benchmark group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchQueueType {
    /// Quorum queues (the default of warren).
    Quorum,
    /// Classic queues (version 2).
    Classic,
}

impl BenchQueueType {
    fn as_str(self) -> &'static str {
        match self {
            BenchQueueType::Quorum => "quorum",
            BenchQueueType::Classic => "classic",
        }
    }
}

/// Options shared by the consumer benchmarks.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Messages per measured run.
    #[arg(long, default_value_t = 50_000)]
    pub count: usize,
    /// basic.qos prefetch (warren and the bare loop alike).
    #[arg(long, default_value_t = 500)]
    pub prefetch: u16,
    /// Handlers in flight in warren (default: the prefetch).
    #[arg(long)]
    pub concurrency: Option<u16>,
    /// Unconfirmed publishes in flight.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Body size in bytes (persistent messages).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Queue type.
    #[arg(long, value_enum, default_value_t = BenchQueueType::Quorum)]
    pub queue_type: BenchQueueType,
    /// Measured runs (one JSON line each, then a summary line with the
    /// medians when there are several): a single run on a shared machine
    /// can be off by ±20%.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
}

/// Arguments of `warren bench consume`.
#[derive(Debug, clap::Args)]
pub struct ConsumeBenchArgs {
    #[command(flatten)]
    common: Common,
}

/// Arguments of `warren bench e2e`.
#[derive(Debug, clap::Args)]
pub struct E2eBenchArgs {
    #[command(flatten)]
    common: Common,
    /// Publish at this fixed rate (msgs/s) to measure latency; 0 = as fast
    /// as confirms allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

/// Arguments of `warren bench retry`.
#[derive(Debug, clap::Args)]
pub struct RetryBenchArgs {
    #[command(flatten)]
    common: Common,
    /// The retry tier's TTL.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    tier: Duration,
}

/// A benchmark topology with a unique prefix, deleted at the end.
struct Bench {
    conn: Connection,
    options: ConnectOptions,
    group: Group,
    plan: Plan,
}

impl Bench {
    async fn new(g: &Global, c: &Common, tier: Duration) -> anyhow::Result<Bench> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let prefix = format!("bench-{}-{nanos}.", std::process::id());
        let toml = format!(
            "[[exchange]]\nname='ex'\nkind='direct'\n[[group]]\nname='g'\nexchange='ex'\nbindings=['k']\n\
             queue_type='{}'\nretry=['{}ms']\nprefetch={}\nconcurrency={}\nhandler_timeout='30s'\n{}",
            c.queue_type.as_str(),
            tier.as_millis().max(1),
            c.prefetch.max(1),
            c.concurrency.unwrap_or(c.prefetch).max(1),
            if c.queue_type == BenchQueueType::Quorum { "delivery_limit=20\n" } else { "" },
        );
        let topology = Topology::parse(&toml, "bench")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_prefix(&prefix);
        let plan = Plan::new(&topology);
        let options = ConnectOptions::new(g.url()?, "bench");
        let conn = warren_topology::connect(&options).await?;
        let group = topology
            .groups
            .first()
            .cloned()
            .context("bench topology has a group")?;
        let bench = Bench {
            conn,
            options,
            group,
            plan,
        };
        if let Err(e) = warren_topology::apply(&bench.conn, &bench.plan).await {
            // Delete whatever was declared before the failure.
            bench.cleanup().await;
            return Err(e.into());
        }
        Ok(bench)
    }

    async fn cleanup(self) {
        // A hard error during setup closes the connection: use a new one.
        let ch = match self.conn.create_channel().await {
            Ok(ch) => Ok(ch),
            Err(_) => match warren_topology::connect(&self.options).await {
                Ok(conn) => conn.create_channel().await,
                Err(e) => {
                    eprintln!("warning: cannot delete the benchmark's queues: {e}");
                    return;
                }
            },
        };
        if let Ok(ch) = ch {
            for q in &self.plan.queues {
                let _ = ch
                    .queue_delete(q.name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for e in self
                .plan
                .exchanges
                .iter()
                .filter(|e| e.name != warren_topology::DEAD_LETTER_EXCHANGE)
            {
                let _ = ch
                    .exchange_delete(e.name.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        warren_topology::close(&self.conn, "bye").await;
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Publishes `count` persistent messages with a bounded window of
/// unconfirmed publishes; the first 8 bytes of the body are the publish time
/// (µs since the epoch). `rate` 0 = unpaced.
async fn publish(conn: &Connection, exchange: &str, c: &Common, rate: u64) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut window = VecDeque::with_capacity(c.window);
    let started = Instant::now();
    let mut body = vec![b'x'; c.size.max(8)];
    for i in 0..c.count {
        if rate > 0 {
            let at = started + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(at.into()).await;
        }
        body[..8].copy_from_slice(&now_micros().to_le_bytes());
        let confirm = ch
            .basic_publish(
                exchange.into(),
                "k".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        window.push_back(confirm);
        if window.len() >= c.window.max(1) {
            if let Some(front) = window.pop_front() {
                anyhow::ensure!(front.await?.is_ack(), "publish nacked");
            }
        }
    }
    for confirm in window {
        anyhow::ensure!(confirm.await?.is_ack(), "publish nacked");
    }
    let _ = ch.close(200, "bye".into()).await;
    Ok(())
}

/// Latencies in µs, bounded by the message count.
#[derive(Clone)]
struct Recorder {
    handled: Arc<AtomicUsize>,
    lat: Arc<Mutex<Vec<u32>>>,
}

impl Recorder {
    fn new(count: usize) -> Self {
        Recorder {
            handled: Arc::new(AtomicUsize::new(0)),
            lat: Arc::new(Mutex::new(Vec::with_capacity(count))),
        }
    }

    fn note(&self, body: &[u8]) {
        if let Some(ts) = body.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            let l = now_micros().saturating_sub(u64::from_le_bytes(ts));
            if let Ok(mut v) = self.lat.lock() {
                v.push(u32::try_from(l).unwrap_or(u32::MAX));
            }
        }
        self.handled.fetch_add(1, Ordering::Relaxed);
    }

    async fn wait(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while self.handled.load(Ordering::Relaxed) < n {
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {n} handled in {within:?}",
                self.handled.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// p50 and p99 of the whole run, and the p99 without its first tenth.
    fn percentiles(&self) -> Latency {
        let v = self.lat.lock().map(|v| v.clone()).unwrap_or_default();
        // In handling order: the first tenth is the warm-up.
        let (_, steady_p99) = quantiles(v[v.len() / 10..].to_vec());
        let (p50, p99) = quantiles(v);
        Latency {
            p50,
            p99,
            steady_p99,
        }
    }
}

/// Publish-to-handler latency of one run, in ms.
///
/// The first few hundred milliseconds of a run at a fixed rate are slower
/// on both clients (measured at 5,000 msgs/s on quorum: latencies up to
/// 45 ms in the first 250 ms, then p99 5-6 ms), and at 5,000 msgs/s 1% of a
/// 5-second run is 50 ms of traffic: the whole-run p99 can be the warm-up.
/// `steady_p99` leaves out the first tenth of the deliveries.
#[derive(Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    steady_p99: f64,
}

/// p50 and p99 of latencies in µs, in ms.
fn quantiles(mut v: Vec<u32>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_unstable();
    let at = |p: f64| f64::from(v[((v.len() - 1) as f64 * p) as usize]) / 1000.0;
    (at(0.50), at(0.99))
}

/// Runs warren's group with `handler` until `n` deliveries were handled.
struct WarrenRun {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    broker: Arc<Broker>,
}

async fn start_warren<F, Fut>(g: &Global, group: Group, f: F) -> anyhow::Result<WarrenRun>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = warren_consumer::HandlerResult> + Send + 'static,
{
    let broker = Arc::new(Broker::connect(ConnectOptions::new(g.url()?, "consumer")).await?);
    let cg = ConsumerGroup::builder(group, handler_fn(f)).build()?;
    let mut ready = cg.ready();
    let cancel = CancellationToken::new();
    let (c, b) = (cancel.clone(), broker.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = cg.run(&b, c).await {
            tracing::error!(error = %e, "bench consumer failed");
        }
    });
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .context("consumer not ready")??;
    Ok(WarrenRun {
        cancel,
        task,
        broker,
    })
}

impl WarrenRun {
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        self.broker.close().await;
    }
}

/// The bare loop most people write: one basic_ack per delivery.
async fn bare_loop(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    n: usize,
    rec: Recorder,
) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen = 0;
    while seen < n {
        let Some(d) = consumer.next().await else {
            anyhow::bail!("bare consumer ended")
        };
        let d = d?;
        rec.note(&d.data);
        ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await?;
        seen += 1;
    }
    let _ = ch.close(200, "bye".into()).await;
    Ok(())
}

/// The bare-lapin retry loop: a delivery without the attempt header is
/// failed once — a copy goes to the retry queue through the default exchange
/// (persistent, mandatory) with the failure headers warren's copies carry
/// (same names and types), and the delivery is acked once the copy is
/// confirmed, one task per delivery; a delivery with the header succeeds and
/// is acked. One `basic_ack` per delivery.
async fn bare_retry_loop(
    conn: &Connection,
    queue: &str,
    retry_queue: &str,
    prefetch: u16,
    n: usize,
    rec: Recorder,
    failed: Recorder,
) -> anyhow::Result<()> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let copies = conn.create_channel().await?;
    copies
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut seen = 0;
    while seen < n {
        let Some(d) = consumer.next().await else {
            anyhow::bail!("bare consumer ended")
        };
        let d = d?;
        let retried = d
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.contains_key(headers::ATTEMPTS));
        if retried {
            rec.note(&[]);
            ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await?;
            seen += 1;
            continue;
        }
        failed.note(&[]);
        let (ch, copies, rq) = (ch.clone(), copies.clone(), retry_queue.to_owned());
        let group = queue.to_owned();
        tasks.spawn(async move {
            let mut h = d.properties.headers().clone().unwrap_or_default();
            let text = |v: &str| AMQPValue::LongString(v.into());
            let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
            h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(1));
            h.insert(headers::ERROR.into(), text("fails once"));
            h.insert(headers::ERROR_KIND.into(), text("retryable"));
            h.insert(headers::GROUP.into(), text(&group));
            h.insert(headers::ORIGINAL_EXCHANGE.into(), text(d.exchange.as_str()));
            h.insert(
                headers::ORIGINAL_ROUTING_KEY.into(),
                text(d.routing_key.as_str()),
            );
            h.insert(headers::FIRST_FAILED_AT.into(), text(&now));
            let props = d.properties.clone().with_headers(h);
            let confirm = copies
                .basic_publish(
                    "".into(),
                    rq.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &d.data,
                    props,
                )
                .await?
                .await?;
            anyhow::ensure!(
                confirm.is_ack() && confirm.take_message().is_none(),
                "copy not confirmed"
            );
            ch.basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await?;
            anyhow::Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let _ = ch.close(200, "bye".into()).await;
    let _ = copies.close(200, "bye".into()).await;
    Ok(())
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn rate(n: usize, d: Duration) -> f64 {
    (n as f64 / d.as_secs_f64()).round()
}

fn patience(c: &Common) -> Duration {
    Duration::from_secs(60 + (c.count / 1000) as u64)
}

/// Runs `warren bench consume`: a pre-filled queue drained by warren, then by
/// the bare loop, `--runs` times.
pub async fn run_consume(g: &Global, a: ConsumeBenchArgs) -> anyhow::Result<ExitCode> {
    let c = a.common;
    let bench = Bench::new(g, &c, Duration::from_millis(100)).await?;
    let result = async {
        let mut runs = Runs::default();
        for _ in 0..c.runs.max(1) {
            let (ratio, rss) = consume_run(g, &c, &bench).await?;
            runs.push(ratio, rss, None);
        }
        runs.summary("consume", &c);
        anyhow::Ok(())
    }
    .await;
    bench.cleanup().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// One measured run of `bench consume`; prints its JSON line and returns
/// (ratio, warren's RSS in MB).
async fn consume_run(g: &Global, c: &Common, bench: &Bench) -> anyhow::Result<(f64, f64)> {
    let queue = bench.group.work_queue();
    let exchange = bench.group.exchange.clone();
    publish(&bench.conn, &exchange, c, 0).await?;
    let rec = Recorder::new(c.count);
    let r = rec.clone();
    let t0 = Instant::now();
    let run = start_warren(g, bench.group.clone(), move |d: Delivery| {
        r.note(&[]);
        let _ = d;
        async { Ok(()) }
    })
    .await?;
    rec.wait(c.count, patience(c)).await?;
    let warren = t0.elapsed();
    let rss = rss_mb();
    run.stop().await;

    publish(&bench.conn, &exchange, c, 0).await?;
    let bare_rec = Recorder::new(c.count);
    let t0 = Instant::now();
    bare_loop(&bench.conn, &queue, c.prefetch, c.count, bare_rec).await?;
    let bare = t0.elapsed();
    let (w, b) = (rate(c.count, warren), rate(c.count, bare));
    let ratio = round2(w / b);
    outln!(
        "{}",
        serde_json::json!({
            "bench": "consume", "queue_type": c.queue_type.as_str(), "count": c.count,
            "prefetch": c.prefetch, "concurrency": c.concurrency.unwrap_or(c.prefetch),
            "size": c.size, "warren_msgs_per_s": w, "bare_msgs_per_s": b,
            "ratio": ratio, "warren_rss_mb": (rss * 10.0).round() / 10.0,
        })
    );
    Ok((ratio, rss))
}

/// Runs `warren bench e2e`: publisher and consumer at once, warren then the
/// bare loop, latency publish-to-handler; `--runs` times.
pub async fn run_e2e(g: &Global, a: E2eBenchArgs) -> anyhow::Result<ExitCode> {
    let c = a.common;
    let bench = Bench::new(g, &c, Duration::from_millis(100)).await?;
    let result = async {
        let pub_conn =
            warren_topology::connect(&ConnectOptions::new(g.url()?, "bench-publisher")).await?;
        let mut runs = Runs::default();
        let out = async {
            for _ in 0..c.runs.max(1) {
                let (ratio, rss, latency) = e2e_run(g, &c, &bench, &pub_conn, a.rate).await?;
                runs.push(ratio, rss, Some(latency));
            }
            anyhow::Ok(())
        }
        .await;
        warren_topology::close(&pub_conn, "bye").await;
        out?;
        runs.summary("e2e", &c);
        anyhow::Ok(())
    }
    .await;
    bench.cleanup().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// One measured run of `bench e2e`; prints its JSON line and returns (ratio,
/// warren's RSS in MB, (warren's latency, the bare loop's)).
async fn e2e_run(
    g: &Global,
    c: &Common,
    bench: &Bench,
    pub_conn: &Connection,
    pace: u64,
) -> anyhow::Result<(f64, f64, (Latency, Latency))> {
    let queue = bench.group.work_queue();
    let exchange = bench.group.exchange.clone();
    // warren
    let rec = Recorder::new(c.count);
    let r = rec.clone();
    let run = start_warren(g, bench.group.clone(), move |d: Delivery| {
        r.note(d.body());
        async { Ok(()) }
    })
    .await?;
    let t0 = Instant::now();
    publish(pub_conn, &exchange, c, pace).await?;
    rec.wait(c.count, patience(c)).await?;
    let warren = t0.elapsed();
    let rss = rss_mb();
    run.stop().await;
    let wl = rec.percentiles();

    // bare
    let bare_rec = Recorder::new(c.count);
    let consumer = {
        let conn = warren_topology::connect(&ConnectOptions::new(g.url()?, "bench-bare")).await?;
        let (q, p, n, r) = (queue.clone(), c.prefetch, c.count, bare_rec.clone());
        tokio::spawn(async move {
            let out = bare_loop(&conn, &q, p, n, r).await;
            warren_topology::close(&conn, "bye").await;
            out
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    publish(pub_conn, &exchange, c, pace).await?;
    bare_rec.wait(c.count, patience(c)).await?;
    let bare = t0.elapsed();
    consumer.await??;
    let bl = bare_rec.percentiles();
    let (w, b) = (rate(c.count, warren), rate(c.count, bare));
    let ratio = round2(w / b);
    outln!(
        "{}",
        serde_json::json!({
            "bench": "e2e", "queue_type": c.queue_type.as_str(), "count": c.count,
            "rate": pace, "prefetch": c.prefetch, "concurrency": c.concurrency.unwrap_or(c.prefetch),
            "window": c.window, "size": c.size,
            "warren_msgs_per_s": w, "warren_p50_ms": wl.p50, "warren_p99_ms": wl.p99,
            "warren_p99_steady_ms": wl.steady_p99,
            "bare_msgs_per_s": b, "bare_p50_ms": bl.p50, "bare_p99_ms": bl.p99,
            "bare_p99_steady_ms": bl.steady_p99,
            "ratio": ratio, "warren_rss_mb": (rss * 10.0).round() / 10.0,
        })
    );
    Ok((ratio, rss, (wl, bl)))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The figures of several runs of `bench consume` or `bench e2e`, for the
/// summary line.
#[derive(Default)]
struct Runs {
    ratios: Vec<f64>,
    rss: Vec<f64>,
    latency: Vec<(Latency, Latency)>,
}

impl Runs {
    fn push(&mut self, ratio: f64, rss: f64, latency: Option<(Latency, Latency)>) {
        self.ratios.push(ratio);
        self.rss.push(rss);
        self.latency.extend(latency);
    }

    /// Prints the summary line when there was more than one run: the median,
    /// lowest and highest ratio, the highest RSS, and for e2e the median
    /// p99s.
    fn summary(mut self, bench: &str, c: &Common) {
        if self.ratios.len() < 2 {
            return;
        }
        let (median, min, max) = super::spread(&mut self.ratios);
        let mut line = serde_json::json!({
            "bench": bench, "summary": true, "runs": self.ratios.len(),
            "queue_type": c.queue_type.as_str(),
            "median_ratio": round2(median), "min_ratio": round2(min), "max_ratio": round2(max),
            "max_warren_rss_mb": (super::spread(&mut self.rss).2 * 10.0).round() / 10.0,
        });
        if !self.latency.is_empty() {
            let median = |f: &dyn Fn(&(Latency, Latency)) -> f64| {
                let mut v: Vec<f64> = self.latency.iter().map(f).collect();
                round2(super::spread(&mut v).0)
            };
            line["median_warren_p99_ms"] = median(&|l| l.0.p99).into();
            line["median_bare_p99_ms"] = median(&|l| l.1.p99).into();
            line["median_warren_p99_steady_ms"] = median(&|l| l.0.steady_p99).into();
            line["median_bare_p99_steady_ms"] = median(&|l| l.1.steady_p99).into();
        }
        outln!("{line}");
    }
}

/// Runs `warren bench retry`: the happy path end to end (publish while the
/// group consumes, every handler succeeds), then the same with every message
/// failing once (one short tier) before it succeeds. Both are timed from the
/// first publish to the last success, so the ratio is the cost of one retry.
/// Then both again with bare lapin loops on the same queues, for scale.
pub async fn run_retry(g: &Global, a: RetryBenchArgs) -> anyhow::Result<ExitCode> {
    let c = a.common;
    let bench = Bench::new(g, &c, a.tier).await?;
    let result = async {
        let pub_conn =
            warren_topology::connect(&ConnectOptions::new(g.url()?, "bench-publisher")).await?;
        let mut ratios = Vec::new();
        let mut bare_ratios = Vec::new();
        let mut vs_bare = Vec::new();
        for _ in 0..c.runs.max(1) {
            let r = retry_run(g, &c, &bench, &pub_conn, a.tier).await?;
            ratios.push(r.0);
            bare_ratios.push(r.1);
            vs_bare.push(r.2);
        }
        if ratios.len() > 1 {
            let (median, min, max) = super::spread(&mut ratios);
            outln!(
                "{}",
                serde_json::json!({
                    "bench": "retry", "summary": true, "runs": ratios.len(),
                    "queue_type": c.queue_type.as_str(),
                    "median_ratio": round2(median), "min_ratio": round2(min), "max_ratio": round2(max),
                    "median_bare_ratio": round2(super::spread(&mut bare_ratios).0),
                    "median_retry_vs_bare_retry": round2(super::spread(&mut vs_bare).0),
                })
            );
        }
        warren_topology::close(&pub_conn, "bye").await;
        anyhow::Ok(())
    }
    .await;
    bench.cleanup().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// One measured run of `bench retry`: warren's happy and retry runs, then the
/// bare loops'; prints its JSON line and returns (ratio, bare ratio, warren
/// retry / bare retry).
async fn retry_run(
    g: &Global,
    c: &Common,
    bench: &Bench,
    pub_conn: &Connection,
    tier: Duration,
) -> anyhow::Result<(f64, f64, f64)> {
    let exchange = bench.group.exchange.clone();
    let host = g.url()?.host();
    // The happy path.
    let rec = Recorder::new(c.count);
    let r = rec.clone();
    let run = start_warren(g, bench.group.clone(), move |_d: Delivery| {
        r.note(&[]);
        async { Ok(()) }
    })
    .await?;
    let t0 = Instant::now();
    let cpu = super::CpuMeter::start(&host);
    publish(pub_conn, &exchange, c, 0).await?;
    rec.wait(c.count, patience(c)).await?;
    let happy = t0.elapsed();
    let happy_cpu = cpu.per_msg(c.count);
    run.stop().await;

    // Every message fails once, then succeeds.
    let rec = Recorder::new(c.count);
    let failed = Recorder::new(0);
    let (r, f) = (rec.clone(), failed.clone());
    let run = start_warren(g, bench.group.clone(), move |d: Delivery| {
        let first = d.attempt() == 1;
        if first {
            f.note(&[]);
        } else {
            r.note(&[]);
        }
        async move {
            if first {
                return Err(HandlerError::retryable("fails once"));
            }
            Ok(())
        }
    })
    .await?;
    let t0 = Instant::now();
    let cpu = super::CpuMeter::start(&host);
    publish(pub_conn, &exchange, c, 0).await?;
    failed.wait(c.count, patience(c)).await?;
    let first_pass = t0.elapsed();
    rec.wait(c.count, patience(c)).await?;
    let retry = t0.elapsed();
    let retry_cpu = cpu.per_msg(c.count);
    run.stop().await;

    // The same two runs with bare lapin loops, for scale.
    let queue = bench.group.work_queue();
    let bare_run = |retry: bool| {
        let (url, queue, rq) = (g.url(), queue.clone(), bench.group.retry_queue(1));
        let (p, n) = (c.prefetch, c.count);
        let rec = Recorder::new(n);
        let failed = Recorder::new(0);
        let (r, f) = (rec.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let conn = warren_topology::connect(&ConnectOptions::new(url?, "bench-bare")).await?;
            let out = if retry {
                bare_retry_loop(&conn, &queue, &rq, p, n, r, f).await
            } else {
                bare_loop(&conn, &queue, p, n, r).await
            };
            warren_topology::close(&conn, "bye").await;
            out
        });
        (task, rec)
    };
    let mut bare = Vec::new();
    let mut bare_cpu = Vec::new();
    for retry in [false, true] {
        let (task, rec) = bare_run(retry);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        let cpu = super::CpuMeter::start(&host);
        publish(pub_conn, &exchange, c, 0).await?;
        rec.wait(c.count, patience(c)).await?;
        bare.push(rate(c.count, t0.elapsed()));
        bare_cpu.push(cpu.per_msg(c.count));
        task.await??;
    }
    let (h, r) = (rate(c.count, happy), rate(c.count, retry));
    outln!(
        "{}",
        serde_json::json!({
            "bench": "retry", "queue_type": c.queue_type.as_str(), "count": c.count,
            "prefetch": c.prefetch, "window": c.window, "tier_ms": tier.as_millis() as u64, "size": c.size,
            "happy_e2e_msgs_per_s": h, "retry_e2e_msgs_per_s": r,
            "first_attempts_msgs_per_s": rate(c.count, first_pass),
            "ratio": round2(r / h),
            "bare_happy_e2e_msgs_per_s": bare[0], "bare_retry_e2e_msgs_per_s": bare[1],
            "bare_ratio": round2(bare[1] / bare[0]),
            "retry_vs_bare_retry": round2(r / bare[1]),
            // CPU per message, this process (publisher and consumer) and the
            // broker (when it runs here): null where not measured.
            "happy_cpu_us_per_msg": happy_cpu.0, "retry_cpu_us_per_msg": retry_cpu.0,
            "bare_happy_cpu_us_per_msg": bare_cpu[0].0, "bare_retry_cpu_us_per_msg": bare_cpu[1].0,
            "broker_happy_cpu_us_per_msg": happy_cpu.1, "broker_retry_cpu_us_per_msg": retry_cpu.1,
            "broker_bare_happy_cpu_us_per_msg": bare_cpu[0].1, "broker_bare_retry_cpu_us_per_msg": bare_cpu[1].1,
        })
    );
    Ok((r / h, bare[1] / bare[0], r / bare[1]))
}
