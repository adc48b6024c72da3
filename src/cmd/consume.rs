//! `warren consume --group G (--http URL | --exec CMD)`: a deployable worker.
//!
//! Runs the group's consumer (prefetch, concurrency, retries, dead-lettering,
//! reconnects) with an HTTP endpoint or a command as its handler, serves
//! `/metrics`, `/healthz` and `/readyz`, and drains on SIGTERM/SIGINT within
//! `--grace`, then exits 0.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus::Registry;
use tracing::info;
use warren_consumer::{ConsumerGroup, Handler};
use warren_topology::{Broker, ConnectOptions, Group};

use crate::cli::{Global, UsageError};
use crate::handlers::{ExecHandler, HttpHandler};
use crate::serve::{self, Health};

/// Default address of `/metrics`, `/healthz`, `/readyz`.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// Arguments of `warren consume`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("handler").required(true).args(["http", "exec"])))]
pub struct ConsumeArgs {
    /// The consumer group (a `[[group]]` of the topology file).
    #[arg(long)]
    pub group: String,
    /// POST each message to this URL: 2xx acks; 4xx (but 408, 429) dead-letters;
    /// 5xx, 408, 429, timeouts and refused connections retry.
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
    /// Run this command (through `sh -c`) per message, body on stdin: exit 0
    /// acks; exit 65 dead-letters; any other exit or a signal retries.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Handlers in flight in this process (overrides the topology file).
    #[arg(long)]
    pub concurrency: Option<u16>,
    /// basic.qos prefetch (overrides the topology file).
    #[arg(long)]
    pub prefetch: Option<u16>,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// On SIGTERM/SIGINT, how long in-flight handlers may take to finish
    /// before they are requeued (under Kubernetes' 30s default).
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    pub grace: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    warren_topology::parse_duration(s)
}

/// Runs `warren consume`.
pub async fn run(g: &Global, args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    let topology = g.topology()?;
    let url = g.url()?;
    let mut group = topology.group(&args.group).cloned().ok_or_else(|| {
        let known: Vec<&str> = topology.groups.iter().map(|g| g.name.as_str()).collect();
        UsageError(format!(
            "no group {:?} in {}; groups: {}",
            args.group,
            g.topology.display(),
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        ))
    })?;
    if let Some(p) = args.prefetch {
        if p == 0 {
            return Err(UsageError("--prefetch must be at least 1".into()).into());
        }
        group.prefetch = p;
    }
    if let Some(c) = args.concurrency {
        if c == 0 {
            return Err(UsageError("--concurrency must be at least 1".into()).into());
        }
        group.concurrency = c;
    }
    if group.concurrency > group.prefetch {
        return Err(UsageError(format!(
            "concurrency {} is above prefetch {}: the extra handlers could never be busy",
            group.concurrency, group.prefetch
        ))
        .into());
    }
    match (&args.http, &args.exec) {
        (Some(endpoint), None) => {
            let h = HttpHandler::new(
                endpoint,
                group.handler_timeout,
                usize::from(group.concurrency),
            )?;
            serve_group(url, group, h, &args).await?;
        }
        (None, Some(cmd)) => serve_group(url, group, ExecHandler::new(cmd.clone()), &args).await?,
        _ => return Err(UsageError("give exactly one of --http URL or --exec CMD".into()).into()),
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve_group<H: Handler>(
    url: warren_topology::AmqpUrl,
    group: Group,
    handler: H,
    args: &ConsumeArgs,
) -> anyhow::Result<()> {
    let registry = Registry::new();
    let cancel = crate::signal::shutdown_token();
    let health = Health::default();
    let server_stop = tokio_util::sync::CancellationToken::new();
    let addr = serve::spawn(
        args.metrics_addr,
        registry.clone(),
        health.clone(),
        server_stop.clone(),
    )
    .await?;
    info!(%addr, "serving /metrics, /healthz, /readyz");

    let name = group.name.clone();
    let consumer = ConsumerGroup::builder(group, handler)
        .shutdown_grace(args.grace)
        .registry(&registry)
        .context("registering metrics")?
        .build()
        .context("building the consumer group")?;

    // /readyz follows the consumer: connected and consuming, false once shutdown starts.
    let mut ready = consumer.ready();
    let h = health.clone();
    let c = cancel.clone();
    tokio::spawn(async move {
        loop {
            h.set_ready(*ready.borrow() && !c.is_cancelled());
            tokio::select! {
                changed = ready.changed() => if changed.is_err() { break },
                _ = c.cancelled() => { h.set_ready(false); break }
            }
        }
    });

    let broker = Arc::new(Broker::new(ConnectOptions::new(url, "consumer")));
    info!(group = %name, "consuming");
    let result = consumer.run(&broker, cancel.clone()).await;
    health.set_ready(false);
    broker.close().await;
    server_stop.cancel();
    result.with_context(|| format!("consumer group {name:?} stopped"))?;
    info!(group = %name, "drained and stopped");
    Ok(())
}
