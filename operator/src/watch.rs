//! `watch`: measure every dead-letter queue on an interval, keep the gauges
//! current, log each new dead letter, and raise an [`Alert`] when a group
//! gains dead letters (at most one per group per interval).
//!
//! Each interval: a passive declare counts a queue; when it grew, the queue
//! is read (non-destructively, up to [`WatchOptions::read_limit`]) and the
//! messages at its tail are the new ones (dead-letter queues are FIFO);
//! otherwise only the head is peeked for the oldest age.
//!
//! New dead letters are found by the queue's growth between two
//! measurements: when a replay or purge removes as many as arrive within one
//! interval, the new ones are not logged or alerted (the gauges stay right).
//!
//! The connection is supervised here: on any broker error the connection
//! is dropped and the next interval reconnects (with backoff).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use lapin::Connection;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use warren_topology::{connect, ConnectOptions};

use crate::error::OperatorError;
use crate::inspect::{list, Summary};
use crate::metrics::Metrics;
use crate::reader::{count, ReadOptions};

/// Default time between two measurements.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Default most messages read to find the new ones.
pub const DEFAULT_READ_LIMIT: usize = 10_000;

/// How to watch.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Time between measurements. Default [`DEFAULT_INTERVAL`].
    pub interval: Duration,
    /// A queue longer than this is not read to log new dead letters one by
    /// one (only counted). Default [`DEFAULT_READ_LIMIT`].
    pub read_limit: usize,
    /// Timeout of every broker call.
    pub rpc_timeout: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            interval: DEFAULT_INTERVAL,
            read_limit: DEFAULT_READ_LIMIT,
            rpc_timeout: crate::reader::DEFAULT_RPC_TIMEOUT,
        }
    }
}

/// A group gained dead letters.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    /// The group.
    pub group: String,
    /// Its dead-letter queue.
    pub queue: String,
    /// Messages in it now.
    pub count: u64,
    /// How many arrived since the last measurement.
    pub new: u64,
    /// Age of the oldest, seconds.
    pub oldest_seconds: Option<u64>,
    /// RFC 3339 UTC.
    pub at: String,
    /// The new dead letters (up to 10), when the queue was read.
    pub examples: Vec<Summary>,
}

struct Measured {
    count: u64,
    oldest: Option<u64>,
    new: Vec<Summary>,
}

/// Watches `groups` until `cancel` fires. `ready` is told whether the last
/// measurement worked; alerts go to `alerts` (dropped with a warning when
/// the receiver lags, never blocking the watch).
pub async fn watch(
    connect_opts: &ConnectOptions,
    groups: &[String],
    opts: &WatchOptions,
    metrics: &Metrics,
    alerts: mpsc::Sender<Alert>,
    ready: &(dyn Fn(bool) + Sync),
    cancel: &CancellationToken,
) -> Result<(), OperatorError> {
    let mut conn: Option<Connection> = None;
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if conn.as_ref().is_none_or(|c| !c.status().connected()) {
            match tokio::select! {
                () = cancel.cancelled() => break,
                c = connect(connect_opts) => c,
            } {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    warn!(error = %e, "watch: cannot connect; retrying next interval");
                    ready(false);
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        let mut ok = true;
        for group in groups {
            let previous = last.get(group).copied();
            match measure(c, group, previous, opts).await {
                Ok(m) => {
                    metrics
                        .dead_letters
                        .with_label_values(&[group])
                        .set(i64::try_from(m.count).unwrap_or(i64::MAX));
                    #[allow(clippy::cast_precision_loss)]
                    metrics
                        .oldest_seconds
                        .with_label_values(&[group])
                        .set(m.oldest.unwrap_or(0) as f64);
                    for s in &m.new {
                        // WARN: a new dead letter is a failure someone has
                        // to look at, and `watch` logs at WARN by default.
                        warn!(group = %group, kind = %s.info.kind, error = %s.info.error,
                            message_id = %s.info.id, "new dead letter");
                    }
                    if let Some(prev) = previous {
                        if m.count > prev {
                            let alert = Alert {
                                group: group.clone(),
                                queue: warren_topology::dead_queue(group),
                                count: m.count,
                                new: m.count - prev,
                                oldest_seconds: m.oldest,
                                at: humantime::format_rfc3339_seconds(SystemTime::now())
                                    .to_string(),
                                examples: m.new.iter().rev().take(10).rev().cloned().collect(),
                            };
                            if m.new.is_empty() {
                                warn!(group = %group, new = alert.new, count = m.count, "new dead letters (queue too long to read one by one)");
                            }
                            if alerts.try_send(alert).is_err() {
                                warn!(group = %group, "alert dropped: the alert sender lags");
                            }
                        }
                    }
                    last.insert(group.clone(), m.count);
                }
                Err(e) => {
                    ok = false;
                    warn!(group = %group, error = %e, "watch: measuring failed");
                    if e.is_transient() || !c.status().connected() {
                        conn = None;
                        break;
                    }
                }
            }
        }
        ready(ok);
    }
    if let Some(c) = conn {
        let _ = tokio::time::timeout(opts.rpc_timeout, c.close(200, "watch stopped".into())).await;
    }
    Ok(())
}

async fn measure(
    conn: &Connection,
    group: &str,
    previous: Option<u64>,
    opts: &WatchOptions,
) -> Result<Measured, OperatorError> {
    let n = count(conn, group, opts.rpc_timeout).await?;
    let grew = previous.is_some_and(|p| n > p);
    if n == 0 {
        return Ok(Measured {
            count: 0,
            oldest: None,
            new: Vec::new(),
        });
    }
    let read_all = grew && n <= opts.read_limit as u64;
    let read = ReadOptions::default()
        .rpc_timeout(opts.rpc_timeout)
        .idle_timeout(Duration::from_secs(2))
        .scan_limit(if read_all { opts.read_limit } else { 1 });
    let listing = list(conn, group, &read).await?;
    let oldest = listing.messages.first().and_then(|m| m.age_seconds);
    let new = if read_all {
        let fresh = usize::try_from(n - previous.unwrap_or(0)).unwrap_or(usize::MAX);
        let skip = listing.messages.len().saturating_sub(fresh);
        listing.messages.into_iter().skip(skip).collect()
    } else {
        Vec::new()
    };
    Ok(Measured {
        count: n,
        oldest,
        new,
    })
}
