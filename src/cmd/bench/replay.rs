//! `warren bench replay`: a full dead-letter replay with confirms (read,
//! publish, confirm, ack) next to a bare-lapin confirmed publish loop of the
//! same messages in the same run. One JSON line out.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warren_operator as op;
use warren_topology::lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use warren_topology::lapin::types::{AMQPValue, FieldTable};
use warren_topology::lapin::{BasicProperties, Channel, Connection};
use warren_topology::{connect, ConnectOptions};

use crate::cli::Global;

/// Arguments of `warren bench replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayBenchArgs {
    /// Dead letters to replay.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Publishes awaiting a confirm at once (both sides).
    #[arg(long, default_value_t = op::DEFAULT_WINDOW)]
    pub window: usize,
}

const TIMEOUT: Duration = Duration::from_secs(30);

async fn declare(ch: &Channel, name: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert("x-queue-version".into(), AMQPValue::LongInt(2));
    tokio::time::timeout(
        TIMEOUT,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        ),
    )
    .await??;
    Ok(())
}

/// Publishes `n` persistent messages to `queue` with a confirm window; returns the time taken.
async fn publish_loop(
    conn: &Connection,
    queue: &str,
    n: usize,
    body: &[u8],
    window: usize,
    headers: bool,
) -> anyhow::Result<Duration> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let start = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let mut p = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("bench-{i}").into());
        if headers {
            let mut h = FieldTable::default();
            h.insert("x-warren-attempts".into(), AMQPValue::LongLongInt(5));
            h.insert(
                "x-warren-error-kind".into(),
                AMQPValue::LongString("permanent".into()),
            );
            h.insert(
                "x-warren-error".into(),
                AMQPValue::LongString(format!("order {i} failed").into()),
            );
            p = p.with_headers(h);
        }
        let c = tokio::time::timeout(
            TIMEOUT,
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                p,
            ),
        )
        .await??;
        pending.push_back(c);
        if pending.len() >= window {
            if let Some(c) = pending.pop_front() {
                anyhow::ensure!(tokio::time::timeout(TIMEOUT, c).await??.is_ack(), "nacked");
            }
        }
    }
    for c in pending {
        anyhow::ensure!(tokio::time::timeout(TIMEOUT, c).await??.is_ack(), "nacked");
    }
    let took = start.elapsed();
    let _ = ch.close(200, "ok".into()).await;
    Ok(took)
}

/// Runs it.
pub async fn run(g: &Global, a: ReplayBenchArgs) -> anyhow::Result<ExitCode> {
    let conn = connect(&ConnectOptions::new(g.url()?, "bench")).await?;
    let group = format!("warren-bench-replay-{}", std::process::id());
    let dead = warren_topology::dead_queue(&group);
    let ch = conn.create_channel().await?;
    declare(&ch, &group).await?;
    declare(&ch, &dead).await?;
    let body = vec![b'x'; a.size];

    let result = async {
        // Fill the dead-letter queue (not timed), then replay it all.
        publish_loop(&conn, &dead, a.messages, &body, a.window, true).await?;
        let opts = op::ReplayOptions {
            window: a.window,
            read: op::ReadOptions::default().scan_limit(op::MAX_SCAN_LIMIT),
            ..Default::default()
        };
        let selection = op::Selection {
            all: true,
            ..Default::default()
        };
        let start = Instant::now();
        let r = op::replay(
            &conn,
            &group,
            &selection,
            &opts,
            &op::Metrics::unregistered(),
            &|_| {},
            &CancellationToken::new(),
        )
        .await?;
        let replay_took = start.elapsed();
        anyhow::ensure!(
            r.replayed == a.messages,
            "replayed {} of {}",
            r.replayed,
            a.messages
        );
        ch.queue_purge(group.as_str().into(), QueuePurgeOptions::default())
            .await?;
        // The baseline: a bare lapin confirmed publish loop of the same messages.
        let bare = publish_loop(&conn, &group, a.messages, &body, a.window, true).await?;
        Ok::<_, anyhow::Error>((replay_took, bare))
    }
    .await;
    let _ = ch
        .queue_delete(group.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(dead.as_str().into(), QueueDeleteOptions::default())
        .await;
    warren_topology::close(&conn, "bye").await;
    let (replay_took, bare) = result?;
    let rate = |d: Duration| a.messages as f64 / d.as_secs_f64().max(1e-9);
    outln!(
        "{}",
        serde_json::json!({
            "bench": "replay",
            "messages": a.messages,
            "size": a.size,
            "window": a.window,
            "replay_msgs_per_sec": rate(replay_took).round(),
            "replay_seconds": replay_took.as_secs_f64(),
            "bare_lapin_publish_msgs_per_sec": rate(bare).round(),
            "bare_seconds": bare.as_secs_f64(),
            "ratio": (rate(replay_took) / rate(bare) * 100.0).round() / 100.0,
        })
    );
    Ok(ExitCode::SUCCESS)
}
