//! `warren demo`: the whole pipeline on a local broker.
//!
//! Applies `examples/demo.toml` under a `demo.` prefix with short tiers (1s,
//! 3s), runs both groups in this process with a handler that fails about 10%
//! of orders once (retryable) and about 2% always (permanent), publishes the
//! orders with confirms, shows live counts, and ends with a summary that it
//! checks against the queues, plus the next commands to try.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use prometheus::Registry;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_consumer::{ConsumerGroup, Delivery, Handler, HandlerError, HandlerResult, Metrics};
use warren_producer::{Message, Publisher, PublisherConfig};
use warren_topology::lapin::options::{
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use warren_topology::{Broker, ConnectOptions, Plan, Topology};

use crate::cli::{error_json, Global, Origin, UsageError};

/// The demo topology, built into the binary so `warren demo` runs anywhere.
const DEMO_TOML: &str = include_str!("../../examples/demo.toml");
/// The demo's retry tiers: short, so that it ends in seconds.
const DEMO_TIERS: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(3)];

/// Arguments of `warren demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Orders to publish.
    #[arg(long, default_value_t = 2000)]
    pub orders: u32,
    /// Leave the demo's exchanges, queues and dead letters on the broker to
    /// explore with `warren dlq` (otherwise they are deleted at the end;
    /// `warren demo --orders 0` deletes those of an earlier `--keep`).
    #[arg(long)]
    pub keep: bool,
    /// Prefix of the demo's exchanges and queues. Not empty: the demo purges
    /// and deletes its queues, and must never touch real ones.
    #[arg(long, default_value = "demo.")]
    pub prefix: String,
    /// Where to write the demo's topology file (for the next commands); the
    /// file stays, with or without `--keep`. By default a kept demo writes
    /// `warren-{prefix}.toml` in the temporary directory.
    #[arg(long)]
    pub write_topology: Option<PathBuf>,
    /// Give up when the pipeline has not settled after this long.
    #[arg(long, default_value = "60s", value_parser = warren_topology::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    order_id: u32,
    customer: String,
    amount_cents: u64,
}

/// Fails ~2% of orders always (permanent) and ~10% once (retryable), chosen
/// by a hash of the message id and group, so each group fails different ones.
struct DemoHandler;

fn bucket(id: &str, group: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (id, group).hash(&mut h);
    h.finish() % 100
}

impl Handler for DemoHandler {
    async fn handle(&self, d: Delivery) -> HandlerResult {
        let order: Order = d.json()?;
        match bucket(d.message_id().unwrap_or_default(), d.group()) {
            0..=1 => Err(HandlerError::permanent(format!(
                "order {}: customer {} has a closed account",
                order.order_id, order.customer
            ))),
            2..=11 if d.attempt() == 1 => Err(HandlerError::retryable(format!(
                "order {}: payment provider timed out after 2000ms",
                order.order_id
            ))),
            _ => Ok(()),
        }
    }
}

/// The sum of a metric's samples whose labels include all of `labels`.
fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut total = 0.0;
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if matches {
                total += match family.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                    _ => m.get_gauge().get_value(),
                };
            }
        }
    }
    total as u64
}

#[derive(Debug, Serialize)]
struct GroupSummary {
    group: String,
    expected: u64,
    acked: u64,
    retried_by_tier: BTreeMap<usize, u64>,
    dead_lettered: u64,
    work_queue: u32,
    dead_queue: u32,
    reconciled: bool,
}

/// The pipeline did not settle within `--timeout`: the demo's objects stay.
#[derive(Debug, thiserror::Error)]
#[error("the pipeline did not settle within {}: {settled} of {expected} deliveries settled; the demo's exchange and queues stay on the broker as they are (`{undo}` deletes them)", humantime::format_duration(*.timeout))]
struct NotSettled {
    timeout: Duration,
    published: u64,
    settled: u64,
    expected: u64,
    /// The command that deletes what stays.
    undo: String,
}

/// Runs `warren demo`. With `--output json` a failure prints a JSON
/// document too: `error` (see [`crate::cli::error_json`]), `reconciled`
/// false and, when the pipeline did not settle, the counts, `kept` and the
/// command that deletes what stays in `next`.
pub async fn run(g: &Global, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let result = run_demo(g, args).await;
    if let (Err(e), true) = (&result, g.json()) {
        let mut v = json!({ "error": error_json(e), "reconciled": false });
        if let Some(n) = e.downcast_ref::<NotSettled>() {
            v["published"] = json!(n.published);
            v["settled"] = json!(n.settled);
            v["expected"] = json!(n.expected);
            v["kept"] = json!(true);
            v["next"] = json!([n.undo]);
        }
        outln!("{}", serde_json::to_string_pretty(&v)?);
    }
    result
}

/// An explicit `-f` is refused (the demo cannot run on the user's file: it
/// has its own handler, and it purges and deletes its queues);
/// `WARREN_TOPOLOGY`, set for every command in a shell profile or a
/// container, is only noted.
fn refuse_topology_file(g: &Global, prefix: &str) -> anyhow::Result<()> {
    let f = g.topology.display();
    match g.topology_from {
        Origin::CommandLine => {
            let w = program();
            Err(UsageError(format!(
                "warren demo does not read -f {f}: it runs its own topology (examples/demo.toml under --prefix, default \"demo.\") with a built-in handler, and purges and deletes its queues. To run warren on your topology: `{w} topology apply -f {f}`, then `{w} consume -f {f} --group G --http URL` (or `--exec CMD`)"
            ))
            .into())
        }
        Origin::Env => {
            eprintln!("note: WARREN_TOPOLOGY ({f}) is not used: warren demo runs its own topology (examples/demo.toml under --prefix {prefix:?})");
            Ok(())
        }
        Origin::Default => Ok(()),
    }
}

async fn run_demo(g: &Global, args: DemoArgs) -> anyhow::Result<ExitCode> {
    refuse_topology_file(g, &args.prefix)?;
    let url = g.url()?;
    let topology = demo_topology(&args.prefix)?;
    let plan = Plan::new(&topology);
    let started = Instant::now();

    let broker = Arc::new(Broker::new(
        ConnectOptions::new(url.clone(), "demo").attempts(2),
    ));
    let (channel, _) = broker.channel().await.map_err(|e| {
        // A broker that answered and refused the user or vhost needs no
        // advice on starting one.
        if e.is_transient() {
            // The advice leads; the error stays in the chain (for JSON).
            let advice = format!(
                "{e}\nno broker answers at {url}: start one with `scripts/broker` (or `rabbitmq-server -detached`, or `docker compose up -d rabbitmq`), or point --amqp-url at yours"
            );
            anyhow::Error::new(e).context(advice)
        } else {
            anyhow::Error::new(e)
        }
    })?;
    refuse_queues_in_use(&broker, &plan).await?;
    let conn_for_apply =
        warren_topology::connect(&ConnectOptions::new(url.clone(), "demo").attempts(2)).await?;
    let applied = warren_topology::apply(&conn_for_apply, &plan).await;
    warren_topology::close(&conn_for_apply, "applied").await;
    applied.context("applying the demo topology")?;
    // A previous `--keep` run may have left messages: start from empty queues.
    for q in &plan.queues {
        channel
            .queue_purge(q.name.as_str().into(), QueuePurgeOptions::default())
            .await
            .with_context(|| format!("purging {}", q.name))?;
    }
    // The file the next commands use: written when the demo is kept (or a
    // path is given), named after the prefix so that demos with other
    // prefixes do not overwrite or delete it.
    let default_file = std::env::temp_dir().join(topology_file_name(&args.prefix));
    let topology_file = match (&args.write_topology, args.keep) {
        (Some(path), _) => Some(path.clone()),
        (None, true) => Some(default_file.clone()),
        (None, false) => None,
    };
    if let Some(path) = &topology_file {
        std::fs::write(path, topology.to_toml())
            .with_context(|| format!("writing {}", path.display()))?;
    }

    // Both groups consume in this process, sharing the connection and metrics.
    let registry = Registry::new();
    let metrics = Metrics::register(&registry)?;
    let cancel = CancellationToken::new();
    let mut consumers = Vec::new();
    let mut ready = Vec::new();
    for group in topology.groups.clone() {
        let c = ConsumerGroup::builder(group, DemoHandler)
            .metrics(metrics.clone())
            .shutdown_grace(Duration::from_secs(5))
            .build()?;
        ready.push(c.ready());
        let b = broker.clone();
        let token = cancel.clone();
        consumers.push(tokio::spawn(async move { c.run(&b, token).await }));
    }
    for mut r in ready {
        tokio::time::timeout(Duration::from_secs(20), r.wait_for(|v| *v))
            .await
            .context("the demo consumers did not start within 20s")??;
    }

    // Publishing on a connection of its own: during a resource alarm the
    // broker stops reading from publishing connections, and the consumers'
    // acks must keep flowing.
    let publisher = Publisher::connect(
        PublisherConfig::default(),
        ConnectOptions::new(url.clone(), "demo-producer").attempts(2),
        &registry,
    )
    .await?;
    let exchange = topology
        .exchanges
        .first()
        .map(|e| e.name.clone())
        .context("the demo topology has an exchange")?;
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for group in &topology.groups {
        expected.insert(group.name.clone(), 0);
    }
    let total_expected = |e: &BTreeMap<String, u64>| e.values().sum::<u64>();

    let bar = if std::io::stderr().is_terminal() && !g.json() {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} settled  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(100));
        b
    } else {
        ProgressBar::hidden()
    };

    // Publish in batches: many confirms in flight, none lost unseen.
    let mut published = 0u64;
    let mut failed = 0u64;
    let batch = 250u32;
    let mut i = 0u32;
    while i < args.orders {
        let end = (i + batch).min(args.orders);
        let msgs: Vec<Message> = (i..end)
            .map(|n| {
                let key = if n % 2 == 0 {
                    "order.created"
                } else {
                    "order.paid"
                };
                let order = Order {
                    order_id: n + 1,
                    customer: format!("c-{:04}", (n * 7919) % 5000),
                    amount_cents: 500 + u64::from(n % 97) * 125,
                };
                Message::json(exchange.as_str(), key, &order)
            })
            .collect::<Result<_, _>>()?;
        let keys: Vec<String> = msgs.iter().map(|m| m.routing_key().to_owned()).collect();
        for (r, key) in publisher.publish_batch(msgs).await.into_iter().zip(keys) {
            match r {
                Ok(_) => {
                    published += 1;
                    for group in &topology.groups {
                        if group.bindings.iter().any(|b| b == &key) {
                            *expected.entry(group.name.clone()).or_default() += 1;
                        }
                    }
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(error = %e, "publishing an order failed");
                }
            }
        }
        i = end;
        bar.set_length(total_expected(&expected));
        bar.set_message(live(&registry, &topology, published));
    }

    // Wait until every delivered order is acked or dead-lettered.
    let settled = |registry: &Registry| -> u64 {
        topology
            .groups
            .iter()
            .map(|gr| {
                metric(
                    registry,
                    "warren_handled_total",
                    &[("group", &gr.name), ("outcome", "ack")],
                ) + metric(
                    registry,
                    "warren_handled_total",
                    &[("group", &gr.name), ("outcome", "dead_letter")],
                )
            })
            .sum()
    };
    let deadline = Instant::now() + args.timeout;
    loop {
        let s = settled(&registry);
        bar.set_position(s);
        bar.set_message(live(&registry, &topology, published));
        if s >= total_expected(&expected) {
            break;
        }
        if Instant::now() > deadline {
            bar.abandon();
            return Err(NotSettled {
                timeout: args.timeout,
                published,
                settled: s,
                expected: total_expected(&expected),
                undo: undo_command(&args.prefix),
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();

    cancel.cancel();
    for c in consumers {
        c.await.context("a demo consumer panicked")??;
    }
    publisher.close().await;

    let mut groups = Vec::new();
    for gr in &topology.groups {
        let count = |queue: String| {
            let channel = channel.clone();
            async move {
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        Default::default(),
                    )
                    .await
                    .map(|q| q.message_count())
                    .unwrap_or(u32::MAX)
            }
        };
        let acked = metric(
            &registry,
            "warren_handled_total",
            &[("group", &gr.name), ("outcome", "ack")],
        );
        let dead = metric(
            &registry,
            "warren_handled_total",
            &[("group", &gr.name), ("outcome", "dead_letter")],
        );
        let retried_by_tier = (1..=gr.retry.len())
            .map(|t| {
                (
                    t,
                    metric(
                        &registry,
                        "warren_retries_total",
                        &[("group", &gr.name), ("tier", &t.to_string())],
                    ),
                )
            })
            .collect();
        let work_queue = count(gr.work_queue()).await;
        let dead_queue = count(gr.dead_queue()).await;
        let exp = expected.get(&gr.name).copied().unwrap_or(0);
        groups.push(GroupSummary {
            group: gr.name.clone(),
            expected: exp,
            acked,
            retried_by_tier,
            dead_lettered: dead,
            work_queue,
            dead_queue,
            reconciled: acked + dead == exp && u64::from(dead_queue) == dead && work_queue == 0,
        });
    }
    let reconciled = groups.iter().all(|s| s.reconciled) && failed == 0;
    let elapsed = started.elapsed();

    if !args.keep {
        for q in &plan.queues {
            let _ = channel
                .queue_delete(q.name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        // The file an earlier `--keep` left describes queues that are gone
        // now. A file named with --write-topology is the user's: it stays.
        if args.write_topology.as_ref() != Some(&default_file) {
            let _ = std::fs::remove_file(&default_file);
        }
    }
    drop(channel);
    broker.close().await;

    let f = topology_file
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let first = topology
        .groups
        .first()
        .map(|g| g.name.clone())
        .unwrap_or_default();
    let w = program();
    let next: Vec<String> = if args.keep {
        vec![
            format!("{w} dlq stats -f {f}"),
            format!("{w} dlq list -f {f} --group {first}"),
            format!("{w} dlq replay -f {f} --group {first} --all --dry-run"),
            format!("{w} topology verify -f {f}"),
            format!(
                "{}   (deletes the demo's exchange, queues and dead letters)",
                undo_command(&args.prefix)
            ),
        ]
    } else {
        vec![format!("{w} demo --keep   (keeps the demo's queues and dead letters to explore with `warren dlq`)")]
    };
    if g.json() {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "published": published,
                "failed": failed,
                "elapsed_seconds": elapsed.as_secs_f64(),
                "groups": groups,
                "reconciled": reconciled,
                "kept": args.keep,
                "topology_file": if args.keep { Some(f.clone()) } else { None },
                "next": next,
                "error": null,
            }))?
        );
    } else {
        outln!(
            "published {published} orders to {exchange} with confirms ({failed} failed) in {:.1}s",
            elapsed.as_secs_f64()
        );
        outln!();
        outln!(
            "{:<20} {:>9} {:>7} {:>15} {:>9} {:>11}",
            "GROUP",
            "RECEIVED",
            "ACKED",
            "RETRIED (TIERS)",
            "DEAD",
            "DEAD QUEUE"
        );
        for s in &groups {
            let tiers: Vec<String> = s.retried_by_tier.values().map(u64::to_string).collect();
            outln!(
                "{:<20} {:>9} {:>7} {:>15} {:>9} {:>11}",
                s.group,
                s.expected,
                s.acked,
                tiers.join(" / "),
                s.dead_lettered,
                s.dead_queue
            );
        }
        outln!();
        if reconciled {
            outln!("reconciled: every order was acked or is in its group's dead-letter queue; nothing lost");
        } else {
            outln!("NOT reconciled: see the counts above");
        }
        if args.keep {
            outln!("kept the demo topology ({f}) and its dead letters");
        } else {
            outln!("cleaned up the demo's exchange and queues");
        }
        outln!("\nnext:");
        for n in &next {
            outln!("  {n}");
        }
    }
    Ok(if reconciled {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn live(registry: &Registry, topology: &Topology, published: u64) -> String {
    let mut parts = vec![format!("published {published}")];
    for gr in &topology.groups {
        let short = gr.name.rsplit('.').next().unwrap_or(&gr.name);
        let tiers: Vec<String> = (1..=gr.retry.len())
            .map(|t| {
                metric(
                    registry,
                    "warren_retries_total",
                    &[("group", &gr.name), ("tier", &t.to_string())],
                )
                .to_string()
            })
            .collect();
        parts.push(format!(
            "{short}: {} ok, retried {}, dead {}",
            metric(
                registry,
                "warren_handled_total",
                &[("group", &gr.name), ("outcome", "ack")]
            ),
            tiers.join("/"),
            metric(
                registry,
                "warren_handled_total",
                &[("group", &gr.name), ("outcome", "dead_letter")]
            ),
        ));
    }
    parts.join(" | ")
}

/// The demo topology under `prefix`, with the demo's short tiers; a prefix
/// that is empty, or that makes names the broker refuses, is a usage error.
fn demo_topology(prefix: &str) -> anyhow::Result<Topology> {
    if prefix.is_empty() {
        return Err(UsageError(
            "--prefix \"\": the demo's exchange and queues would be named like examples/demo.toml's (orders, billing, shipping), which a real deployment may use, and the demo purges and deletes its queues; give it a prefix of its own (default \"demo.\")".into(),
        )
        .into());
    }
    let mut topology = Topology::parse(DEMO_TOML, "examples/demo.toml")?.with_prefix(prefix);
    for group in &mut topology.groups {
        group.retry = DEMO_TIERS.to_vec();
    }
    // The same checks as a topology file: names the broker accepts.
    Topology::parse(&topology.to_toml(), "--prefix")
        .map_err(|e| UsageError(format!("--prefix {prefix:?}: {}: {}", e.field, e.message)))?;
    Ok(topology)
}

/// Refuses to run on queues that have consumers: a demo left by `--keep`
/// has none, and the demo purges (and, without `--keep`, deletes) its
/// queues, so queues in use are someone else's with the same names.
async fn refuse_queues_in_use(broker: &Broker, plan: &Plan) -> anyhow::Result<()> {
    for q in &plan.queues {
        // A passive declare of a missing queue closes its channel.
        let (channel, _) = broker.channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if let Ok(found) = channel
            .queue_declare(q.name.as_str().into(), passive, Default::default())
            .await
        {
            let consumers = found.consumer_count();
            if consumers > 0 {
                anyhow::bail!(
                    "queue {:?} has {consumers} consumer{} and {} ready message{}: it is in use, not a demo left by --keep, and the demo would purge and delete it; nothing was changed. Stop its consumers, or give the demo another --prefix",
                    q.name,
                    if consumers == 1 { "" } else { "s" },
                    found.message_count(),
                    if found.message_count() == 1 { "" } else { "s" },
                );
            }
            let _ = channel.close(200, "checked".into()).await;
        }
    }
    Ok(())
}

/// How to run warren in the commands the demo suggests: `warren` when it is
/// on the PATH, else the path this process was started as
/// (`target/release/warren` after `cargo run --release -- demo`).
fn program() -> String {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("warren").is_file()));
    match std::env::args().next() {
        Some(argv0) if !on_path && argv0.contains('/') && !argv0.contains(char::is_whitespace) => {
            argv0
        }
        _ => "warren".into(),
    }
}

/// The command that deletes a kept demo: an empty demo run without `--keep`.
fn undo_command(prefix: &str) -> String {
    let w = program();
    if prefix == "demo." {
        return format!("{w} demo --orders 0");
    }
    let plain = prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if plain {
        format!("{w} demo --prefix {prefix} --orders 0")
    } else {
        format!(
            "{w} demo --prefix '{}' --orders 0",
            prefix.replace('\'', "'\\''")
        )
    }
}

/// `warren-{prefix}.toml` (`warren-demo.toml` for the default prefix), with
/// anything but letters, digits, `.`, `-` and `_` replaced by `_`.
fn topology_file_name(prefix: &str) -> String {
    let stem: String = prefix
        .trim_end_matches('.')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.is_empty() {
        "warren-demo.toml".into()
    } else {
        format!("warren-{stem}.toml")
    }
}

#[cfg(test)]
mod tests {
    use super::topology_file_name;

    #[test]
    fn the_kept_topology_file_is_named_after_the_prefix() {
        assert_eq!(topology_file_name("demo."), "warren-demo.toml");
        assert_eq!(
            topology_file_name("team-a.demo."),
            "warren-team-a.demo.toml"
        );
        assert_eq!(topology_file_name("a/b c."), "warren-a_b_c.toml");
        assert_eq!(topology_file_name(""), "warren-demo.toml");
    }
}
