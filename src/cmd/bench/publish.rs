//! `warren bench publish`: warren's Publisher against a bare lapin loop with
//! the same window, queue type, message size and persistence, in the same
//! run; one JSON line per run.
//!
//! The bare loop runs twice per run: once with the properties warren's
//! Publisher adds to every message (`message_id`, `timestamp`,
//! `content_type`), which is the `ratio` — the client's own cost — and once
//! with persistent mode only (`ratio_to_plain`), which adds what the broker
//! pays for storing those properties.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};
use warren_producer::{Message, Publisher, PublisherConfig};
use warren_topology::ConnectOptions;

use crate::cli::Global;

/// Queue type of the benchmark queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueKind {
    /// A quorum queue.
    Quorum,
    /// A classic queue (version 2).
    Classic,
}

/// Arguments of `warren bench publish`.
#[derive(Debug, clap::Args)]
pub struct PublishBenchArgs {
    /// Messages per measured run (each side).
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Body size in bytes (persistent messages).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Unconfirmed publishes in flight (both sides).
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// Type of the queue the messages go to.
    #[arg(long, value_enum, default_value_t = QueueKind::Quorum)]
    pub queue_type: QueueKind,
    /// Measured runs (one JSON line each, then a summary line with the
    /// median ratio when there are several).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
}

/// Runs it.
pub async fn run(g: &Global, a: PublishBenchArgs) -> anyhow::Result<ExitCode> {
    let url = g.url()?;
    let window = a.window.max(1);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let queue = format!("warren.bench.publish.{}.{nanos}", std::process::id());
    let kind = match a.queue_type {
        QueueKind::Quorum => "quorum",
        QueueKind::Classic => "classic",
    };

    let conn = warren_topology::connect(&ConnectOptions::new(url.clone(), "bench-lapin")).await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    if a.queue_type == QueueKind::Classic {
        args.insert("x-queue-version".into(), AMQPValue::LongInt(2));
    }
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .with_context(|| format!("declaring the benchmark queue {queue}"))?;

    let registry = prometheus::Registry::new();
    let publisher = Publisher::connect(
        PublisherConfig::default().window(window),
        ConnectOptions::new(url, "bench"),
        &registry,
    )
    .await?;
    let body = vec![b'x'; a.size];

    let result = async {
        // A short warm-up of each side, not measured.
        let warm = (a.messages / 20).clamp(1, 2_000);
        warren_side(&publisher, &queue, &body, warm).await?;
        lapin_side(&ch, &queue, &body, warm, window, Props::Warren).await?;
        lapin_side(&ch, &queue, &body, warm, window, Props::Plain).await?;
        purge(&ch, &queue).await?;
        let mut ratios = Vec::new();
        let mut plain_ratios = Vec::new();
        for run in 0..a.runs.max(1) {
            // Rotate which side goes first, so none always meets a queue
            // another just filled.
            let (mut w, mut l, mut p) = (None, None, None);
            for side in 0..3 {
                match (run + side) % 3 {
                    0 => w = Some(warren_side(&publisher, &queue, &body, a.messages).await?),
                    1 => {
                        l = Some(
                            lapin_side(&ch, &queue, &body, a.messages, window, Props::Warren)
                                .await?,
                        )
                    }
                    _ => {
                        p = Some(
                            lapin_side(&ch, &queue, &body, a.messages, window, Props::Plain)
                                .await?,
                        )
                    }
                }
                purge(&ch, &queue).await?;
            }
            let (Some(w), Some(l), Some(p)) = (w, l, p) else {
                unreachable!("each side ran once")
            };
            let r3 = |r: f64| (r * 1000.0).round() / 1000.0;
            outln!(
                "{}",
                serde_json::json!({
                    "bench": "publish",
                    "run": run + 1,
                    "queue_type": kind,
                    "messages": a.messages,
                    "size": a.size,
                    "window": window,
                    "persistent": true,
                    "warren_msgs_per_sec": w.rate.round(),
                    "lapin_msgs_per_sec": l.rate.round(),
                    "ratio": r3(w.rate / l.rate),
                    "lapin_plain_msgs_per_sec": p.rate.round(),
                    "ratio_to_plain": r3(w.rate / p.rate),
                    "warren_cpu_us_per_msg": w.cpu_us_per_msg,
                    "lapin_cpu_us_per_msg": l.cpu_us_per_msg,
                    "lapin_plain_cpu_us_per_msg": p.cpu_us_per_msg,
                })
            );
            ratios.push(w.rate / l.rate);
            plain_ratios.push(w.rate / p.rate);
        }
        if ratios.len() > 1 {
            // Runs on a shared 2-core machine vary by ±10%: the median is the
            // figure to compare with the target.
            let round = |r: f64| (r * 1000.0).round() / 1000.0;
            let (median, min, max) = super::spread(&mut ratios);
            let (plain_median, _, _) = super::spread(&mut plain_ratios);
            outln!(
                "{}",
                serde_json::json!({
                    "bench": "publish",
                    "summary": true,
                    "runs": ratios.len(),
                    "queue_type": kind,
                    "window": window,
                    "median_ratio": round(median),
                    "min_ratio": round(min),
                    "max_ratio": round(max),
                    "median_ratio_to_plain": round(plain_median),
                })
            );
        }
        anyhow::Ok(())
    }
    .await;

    publisher.close().await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    warren_topology::close(&conn, "bye").await;
    result?;
    Ok(ExitCode::SUCCESS)
}

async fn purge(ch: &Channel, queue: &str) -> anyhow::Result<()> {
    ch.queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    Ok(())
}

/// warren's Publisher: `publish_batch`, every message confirmed. Msgs/s.
async fn warren_side(p: &Publisher, queue: &str, body: &[u8], n: usize) -> anyhow::Result<Side> {
    let cpu = super::cpu_seconds();
    let started = Instant::now();
    let results = p
        .publish_batch((0..n).map(|_| Message::bytes("", queue, body.to_vec())))
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        anyhow::bail!("warren publish failed: {e}");
    }
    Ok(Side::new(n, elapsed, cpu))
}

/// One side's rate and the client CPU it used per message.
struct Side {
    rate: f64,
    cpu_us_per_msg: f64,
}

impl Side {
    fn new(n: usize, elapsed: f64, cpu_before: f64) -> Side {
        let cpu = super::cpu_seconds() - cpu_before;
        Side {
            rate: n as f64 / elapsed,
            cpu_us_per_msg: (cpu * 1e6 / n.max(1) as f64).round(),
        }
    }
}

/// The properties the bare loop sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Props {
    /// What warren's Publisher sends for the same message: a UUID
    /// `message_id`, a `timestamp`, a `content_type` and persistent mode.
    /// The broker stores and routes more per message, so this is the
    /// baseline for the client's own cost.
    Warren,
    /// Persistent mode only: the smallest message a bare loop can send.
    Plain,
}

/// The baseline: one channel in confirm mode, `basic_publish` in a loop
/// keeping `window` confirms outstanding, persistent and mandatory like
/// warren's. Msgs/s.
async fn lapin_side(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    n: usize,
    window: usize,
    kind: Props,
) -> anyhow::Result<Side> {
    let ch = ch.clone();
    // A fresh channel per side would cost the same each run; confirm mode
    // is enabled once (idempotent).
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let props = BasicProperties::default().with_delivery_mode(2);
    let cpu = super::cpu_seconds();
    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(window);
    for _ in 0..n {
        if in_flight.len() >= window {
            if let Some(c) = in_flight.pop_front() {
                check(c).await?;
            }
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                match kind {
                    Props::Plain => props.clone(),
                    Props::Warren => props
                        .clone()
                        .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into())
                        .with_timestamp(now_secs())
                        .with_content_type(warren_producer::BYTES_CONTENT_TYPE.into()),
                },
            )
            .await?;
        in_flight.push_back(confirm);
    }
    while let Some(c) = in_flight.pop_front() {
        check(c).await?;
    }
    Ok(Side::new(n, started.elapsed().as_secs_f64(), cpu))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

async fn check(c: lapin::PublisherConfirm) -> anyhow::Result<()> {
    match c.await? {
        Confirmation::Ack(None) => Ok(()),
        other => anyhow::bail!("bare lapin publish not confirmed: {other:?}"),
    }
}
