//! `watch`: keep the dead-letter gauges current, log each new dead letter,
//! and raise an [`Alert`] when a group gains dead letters (at most one per
//! group per interval). Both are [`WatchEvent`]s for the caller too: a
//! [`WatchEvent::DeadLetter`] as each new dead letter is logged, a
//! [`WatchEvent::Alert`] at the measurement that counts them.
//!
//! # The tap: every new dead letter
//!
//! On each connection, `watch` declares a tap: a server-named
//! (`amq.gen-...`), exclusive, auto-delete classic queue bound to
//! `warren.dlx` with each watched group's name, the key `{group}.dead` is
//! bound with. Whatever dead-letters a message to a group (the consumer's
//! publish after the last retry tier or for a permanent error, the broker's
//! own dead-lettering of a quorum work queue at `x-delivery-limit`) is
//! routed to the tap as well: every message arriving there is a new dead
//! letter. It is logged at WARN as it arrives (group, kind, error,
//! message_id) and counted toward its group's alert at the next
//! measurement. A replay or purge in between changes nothing about that.
//! What `import` puts back (published straight to `{group}.dead`) is not a
//! new dead letter and is not routed to the tap: it is not logged or
//! alerted (the gauges count it).
//!
//! The tap never takes anything from `{group}.dead`: it is a queue of its
//! own that receives copies by routing; `watch` never consumes from a
//! dead-letter queue, and acking a copy on the tap removes only that copy.
//!
//! ## Bounds
//!
//! The tap holds at most [`TAP_MAX_LENGTH`] copies and
//! [`TAP_MAX_LENGTH_BYTES`] bytes of bodies; beyond that the broker drops
//! the oldest (`x-overflow=drop-head`; never `reject-publish`, which would
//! refuse the consumers' dead-letter publishes). It is read with manual
//! acks and a prefetch of [`TAP_PREFETCH`] rather than no-ack: lapin keeps
//! a no-ack consumer's deliveries in an unbounded buffer, so only a
//! prefetch window keeps a backlog on the broker, where those bounds hold.
//! A watch that falls behind (a slow log, a long measurement) therefore
//! holds at most [`TAP_PREFETCH`] copies in memory; when half the tap's
//! length is waiting at a measurement, a warning says copies may soon be
//! dropped (a dropped copy is neither logged nor counted; the gauges stay
//! right). Events go to the caller's bounded channel and are dropped with
//! a warning when its receiver lags (the log line of a dead letter is
//! written either way).
//!
//! # Measuring: the gauges
//!
//! Each interval, per group, a passive declare counts `{group}.dead`
//! (`warren_dead_letters`) and its head is peeked for the oldest's age
//! (`warren_dead_letter_oldest_seconds`), as every other read does: without
//! taking anything.
//!
//! # Without the tap: growth
//!
//! New dead letters are found by the queue's growth since the previous
//! measurement instead:
//!
//! - when the tap cannot be declared, bound or consumed (a user without
//!   configure permission on `amq.gen-*` queues, `warren.dlx` missing):
//!   one warning says why, and the whole connection counts by growth (the
//!   next connection tries the tap again; the refusal closes only a
//!   channel of its own);
//! - at the first measurement after a (re)connection, or after the tap was
//!   lost: what arrived while there was no tap is known only by growth.
//!
//! Growth reads the queue (non-destructively, up to
//! [`WatchOptions::read_limit`]) and the messages at its tail are the new
//! ones (dead-letter queues are FIFO). It misses new dead letters when a
//! replay or purge removes as many within the same interval, and a queue
//! longer than the read limit is only counted. Dead letters the tap saw
//! before it was lost, and copies of those growth found that the new tap
//! delivers afterwards, are not counted or logged twice.
//!
//! The connection is supervised here: on any broker error the connection
//! (and with it the tap) is dropped and the next interval reconnects (with
//! backoff).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warren_topology::{connect, ConnectOptions, DEAD_LETTER_EXCHANGE};

use crate::error::{check_group_name, timed, OperatorError};
use crate::inspect::{list, Summary};
use crate::message::Info;
use crate::metrics::Metrics;
use crate::reader::{count, ReadOptions};

/// Default time between two measurements.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Default most messages read to find the new ones by growth.
pub const DEFAULT_READ_LIMIT: usize = 10_000;
/// Most copies the tap queue holds (`x-max-length`): 10,000. When it is
/// full the oldest is dropped.
pub const TAP_MAX_LENGTH: u32 = 10_000;
/// Most bytes of bodies the tap queue holds (`x-max-length-bytes`): 64 MiB.
/// When it is full the oldest is dropped.
pub const TAP_MAX_LENGTH_BYTES: u64 = 64 * 1024 * 1024;
/// Copies delivered to the watch and not yet logged and acked (the tap's
/// prefetch): 256.
pub const TAP_PREFETCH: u16 = 256;
/// Most dead letters an [`Alert`] names in `examples`: 10.
pub const MAX_EXAMPLES: usize = 10;

/// How to watch.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Time between measurements, and the shortest time between two alerts
    /// of a group. Default [`DEFAULT_INTERVAL`].
    pub interval: Duration,
    /// Without the tap, a queue longer than this is not read to log new
    /// dead letters one by one (only counted). Default
    /// [`DEFAULT_READ_LIMIT`].
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
    /// How many arrived since the group's previous measurement that worked.
    pub new: u64,
    /// How many of `new` were only counted, not read one by one (found by
    /// growth in a queue longer than the read limit): no
    /// [`WatchEvent::DeadLetter`] came for them. The others each had one,
    /// before this alert.
    pub unread: u64,
    /// Age of the oldest, seconds.
    pub oldest_seconds: Option<u64>,
    /// RFC 3339 UTC.
    pub at: String,
    /// The newest of the new dead letters (up to 10), oldest
    /// first; empty when they were only counted (by growth, in a queue
    /// longer than the read limit). The `position` of one the tap saw is
    /// counted back from the queue's tail at the measurement: where it is
    /// unless something behind it left since.
    pub examples: Vec<Summary>,
}

/// A new dead letter, as `watch` saw it: what `list` shows of it, with
/// its group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NewDeadLetter {
    /// The group.
    pub group: String,
    /// Its dead-letter queue.
    pub queue: String,
    /// Its position in the queue when growth found it; `None` for a copy
    /// the tap delivered (the tap does not know where it is in the queue).
    pub position: Option<usize>,
    /// Age in seconds, if known.
    pub age_seconds: Option<u64>,
    /// What its headers say.
    #[serde(flatten)]
    pub info: Info,
}

/// What `watch` reports, in the order it happens.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum WatchEvent {
    /// A new dead letter, when it is logged: as the tap delivers its copy,
    /// or at the measurement whose growth found it.
    DeadLetter(NewDeadLetter),
    /// A measurement found new dead letters in a group: every
    /// [`WatchEvent::DeadLetter`] it counts came before it.
    Alert(Alert),
}

/// Watches `groups` until `cancel` fires. `ready` is told whether the last
/// measurement worked; events go to `events` (dropped with a warning when
/// the receiver lags, never blocking the watch). A group whose dead-letter
/// queue name would be over AMQP's limit is
/// [`OperatorError::NameTooLong`] before anything is sent.
pub async fn watch(
    connect_opts: &ConnectOptions,
    groups: &[String],
    opts: &WatchOptions,
    metrics: &Metrics,
    events: mpsc::Sender<WatchEvent>,
    ready: &(dyn Fn(bool) + Sync),
    cancel: &CancellationToken,
) -> Result<(), OperatorError> {
    for group in groups {
        check_group_name(group)?;
    }
    let rpc = opts.rpc_timeout;
    let mut conn: Option<Connection> = None;
    let mut tap: Option<Tap> = None;
    // The tap was refused on this connection: not tried again until the
    // next one (each try would close a channel with the same error).
    let mut tap_refused = false;
    let mut tap_warned = false;
    // The tap has been consuming since before the previous measurement:
    // this interval's new dead letters are exactly what it delivered.
    let mut tapped = false;
    let mut state: HashMap<&str, GroupState> = groups
        .iter()
        .map(|g| (g.as_str(), GroupState::default()))
        .collect();
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let copy = tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticker.tick() => None,
            d = next_copy(&mut tap) => Some(d),
        };
        if let Some(copy) = copy {
            let queue = tap.as_ref().map_or("", |t| t.queue.as_str());
            let stopped = match copy {
                Some(Ok(d)) => on_copy(d, &mut state, queue, opts, &events)
                    .await
                    .err()
                    .map(|e| e.to_string()),
                Some(Err(e)) => Some(format!("reading the tap {queue:?}: {e}")),
                None => Some(format!(
                    "the broker cancelled the consumer of the tap {queue:?}"
                )),
            };
            if let Some(e) = stopped {
                warn!(error = %e, "watch: the tap stopped; the next measurement finds new dead letters by growth");
                if let Some(t) = tap.take() {
                    t.close(rpc).await;
                }
                tapped = false;
            }
            continue;
        }

        if conn.as_ref().is_none_or(|c| !c.status().connected()) {
            drop(tap.take());
            tapped = false;
            tap_refused = false;
            conn = None;
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
        if let Some(t) = &tap {
            if let Err(e) = t.check_backlog(rpc).await {
                warn!(error = %e, "watch: the tap stopped; this measurement finds new dead letters by growth");
                if let Some(t) = tap.take() {
                    t.close(rpc).await;
                }
                tapped = false;
            }
        }
        if tap.is_none() && !tap_refused {
            match Tap::open(c, groups, rpc).await {
                Ok(t) => {
                    if tap_warned {
                        info!(queue = %t.queue, "watch: tapped warren.dlx; every new dead letter is seen again");
                    } else {
                        debug!(queue = %t.queue, "watch: tapped warren.dlx");
                    }
                    tap = Some(t);
                }
                Err(e) => {
                    tap_refused = true;
                    let why = tap_hint(&e);
                    if tap_warned {
                        debug!(error = %e, "watch: still no tap on warren.dlx ({why})");
                    } else {
                        tap_warned = true;
                        warn!(error = %e, "watch: cannot tap warren.dlx ({why}); new dead letters are found by the growth of each dead-letter queue, which misses those a replay or purge removes within the same interval");
                    }
                }
            }
        }
        let by_tap = tapped && tap.is_some();
        let mut ok = true;
        for group in groups {
            let Some(st) = state.get_mut(group.as_str()) else {
                continue;
            };
            let grown_from = if by_tap { None } else { st.last };
            match measure(c, group, grown_from, opts).await {
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
                    let found = st.settle(&m, by_tap, tap.is_some(), SystemTime::now());
                    for s in &found.unlogged {
                        log_new(group, Some(s.position), s.age_seconds, &s.info, &events);
                    }
                    if found.unread > 0 {
                        warn!(group = %group, new = found.unread, count = m.count,
                            "new dead letters (queue too long to read one by one)");
                    }
                    if found.new > 0 {
                        let alert = Alert {
                            group: group.clone(),
                            queue: warren_topology::dead_queue(group),
                            count: m.count,
                            new: found.new,
                            unread: found.unread,
                            oldest_seconds: m.oldest,
                            at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                            examples: found.examples,
                        };
                        send(&events, WatchEvent::Alert(alert));
                    }
                }
                Err(e) => {
                    ok = false;
                    warn!(group = %group, error = %e, "watch: measuring failed");
                    if e.is_transient() || !c.status().connected() {
                        drop(tap.take());
                        conn = None;
                        break;
                    }
                }
            }
        }
        tapped = tap.is_some();
        ready(ok);
    }
    let tap = tap.take();
    if let Some(t) = tap {
        t.close(rpc).await;
    }
    if let Some(c) = conn {
        let _ = tokio::time::timeout(rpc, c.close(200, "watch stopped".into())).await;
    }
    Ok(())
}

/// WARN: a new dead letter is a failure someone has to look at, and
/// `watch` logs at WARN by default. Then the event.
fn log_new(
    group: &str,
    position: Option<usize>,
    age_seconds: Option<u64>,
    info: &Info,
    events: &mpsc::Sender<WatchEvent>,
) {
    warn!(group = %group, kind = %info.kind, error = %info.error,
        message_id = %info.id, "new dead letter");
    send(
        events,
        WatchEvent::DeadLetter(NewDeadLetter {
            group: group.to_owned(),
            queue: warren_topology::dead_queue(group),
            position,
            age_seconds,
            info: info.clone(),
        }),
    );
}

/// Sends `event` without waiting: dropped with a warning when the receiver
/// lags (the watch never blocks on it), quietly when it is gone.
fn send(events: &mpsc::Sender<WatchEvent>, event: WatchEvent) {
    if let Err(mpsc::error::TrySendError::Full(e)) = events.try_send(event) {
        let (what, group) = match &e {
            WatchEvent::DeadLetter(d) => ("new dead letter", &d.group),
            WatchEvent::Alert(a) => ("alert", &a.group),
        };
        warn!(group = %group, "watch: {what} event dropped: its receiver lags");
    }
}

/// The tap's next delivery; never, while there is no tap.
async fn next_copy(tap: &mut Option<Tap>) -> Option<Result<Delivery, lapin::Error>> {
    match tap {
        Some(t) => t.consumer.next().await,
        None => std::future::pending().await,
    }
}

/// A copy on the tap: log it, count it toward its group's next alert, ack
/// it (only the copy; its dead letter stays in `{group}.dead`).
async fn on_copy(
    d: Delivery,
    state: &mut HashMap<&str, GroupState>,
    queue: &str,
    opts: &WatchOptions,
    events: &mpsc::Sender<WatchEvent>,
) -> Result<(), OperatorError> {
    let group = d.routing_key.as_str();
    if let Some(st) = state.get_mut(group) {
        let info = Info::from_parts(&d.properties, &d.data);
        if st.on_copy(&info, opts.read_limit) {
            let age = info.age(SystemTime::now()).map(|a| a.as_secs());
            log_new(group, None, age, &info, events);
        }
    }
    timed(
        opts.rpc_timeout,
        "acking a copy on the tap",
        queue,
        d.acker.ack(BasicAckOptions::default()),
    )
    .await?;
    Ok(())
}

/// The tap queue and its consumer, on a channel of their own.
struct Tap {
    queue: String,
    channel: Channel,
    consumer: Consumer,
}

impl Tap {
    /// Declares the tap, binds it for every group and starts consuming.
    async fn open(
        conn: &Connection,
        groups: &[String],
        rpc: Duration,
    ) -> Result<Tap, OperatorError> {
        // A refusal closes the channel it happened on: this one, never the
        // channels that measure.
        let channel = timed(
            rpc,
            "opening a channel",
            DEAD_LETTER_EXCHANGE,
            conn.create_channel(),
        )
        .await?;
        let declared = timed(
            rpc,
            "declaring a tap queue",
            DEAD_LETTER_EXCHANGE,
            channel.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                tap_arguments(),
            ),
        )
        .await?;
        let queue = declared.name().as_str().to_owned();
        let consumer = async {
            for group in groups {
                timed(
                    rpc,
                    "binding the tap queue to warren.dlx",
                    &queue,
                    channel.queue_bind(
                        queue.as_str().into(),
                        DEAD_LETTER_EXCHANGE.into(),
                        group.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await?;
            }
            timed(
                rpc,
                "setting the tap's prefetch",
                &queue,
                channel.basic_qos(TAP_PREFETCH, BasicQosOptions::default()),
            )
            .await?;
            timed(
                rpc,
                "consuming the tap",
                &queue,
                channel.basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions {
                        exclusive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await
        }
        .await;
        match consumer {
            Ok(consumer) => Ok(Tap {
                queue,
                channel,
                consumer,
            }),
            Err(e) => {
                // An exclusive queue lives as long as its connection: delete
                // it now rather than keep an unbound or unread one.
                if let Ok(Ok(ch)) = tokio::time::timeout(rpc, conn.create_channel()).await {
                    let _ = tokio::time::timeout(
                        rpc,
                        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
                    )
                    .await;
                    let _ = tokio::time::timeout(rpc, ch.close(200, "tap refused".into())).await;
                }
                Err(e)
            }
        }
    }

    /// Warns when the tap's backlog nears [`TAP_MAX_LENGTH`] (passive
    /// declare: reads nothing). An error means the tap is gone.
    async fn check_backlog(&self, rpc: Duration) -> Result<(), OperatorError> {
        let q = timed(
            rpc,
            "counting the tap's backlog",
            &self.queue,
            self.channel.queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        if q.message_count() >= TAP_MAX_LENGTH / 2 {
            warn!(backlog = q.message_count(), max = TAP_MAX_LENGTH,
                "watch: falling behind the tap; past its length the oldest copies are dropped, neither logged nor alerted (the gauges stay right)");
        }
        Ok(())
    }

    /// Deletes the tap queue and closes its channel, within one `rpc`
    /// (best effort: closing the connection deletes the queue too).
    async fn close(self, rpc: Duration) {
        let Tap {
            queue,
            channel,
            consumer,
        } = self;
        let _ = tokio::time::timeout(rpc, async {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = channel.close(200, "watch: tap closed".into()).await;
        })
        .await;
        // Dropped only after the channel is closed (see `Scan::finish`).
        drop(consumer);
    }
}

/// The tap queue's arguments: classic, bounded, dropping the oldest.
fn tap_arguments() -> FieldTable {
    let mut a = FieldTable::default();
    a.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    a.insert("x-queue-version".into(), AMQPValue::LongLongInt(2));
    a.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(TAP_MAX_LENGTH)),
    );
    a.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(TAP_MAX_LENGTH_BYTES).unwrap_or(i64::MAX)),
    );
    a.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    a
}

/// Why the tap could not be declared, and what to do about it.
fn tap_hint(e: &OperatorError) -> &'static str {
    let s = e.to_string().to_uppercase().replace(['-', ' '], "_");
    if s.contains("ACCESS_REFUSED") || s.contains("ACCESSREFUSED") {
        "refused by the broker: to see every new dead letter, give the user configure, write and read permission on ^amq\\.gen- queues and read permission on warren.dlx"
    } else if s.contains("NOT_FOUND") || s.contains("NOTFOUND") {
        "the exchange warren.dlx does not exist: run `warren topology apply`"
    } else {
        "the next connection tries again"
    }
}

/// One measurement of a group's dead-letter queue.
struct Measured {
    count: u64,
    oldest: Option<u64>,
    /// The messages at the tail that growth says are new, when they were
    /// read (growth measured, the queue grew, and it is not longer than the
    /// read limit).
    tail: Option<Vec<Summary>>,
}

/// Counts a group's dead letters and peeks at the oldest; with
/// `grown_from` (the previous count, when new dead letters are found by
/// growth) also reads the queue's new tail.
async fn measure(
    conn: &Connection,
    group: &str,
    grown_from: Option<u64>,
    opts: &WatchOptions,
) -> Result<Measured, OperatorError> {
    let n = count(conn, group, opts.rpc_timeout).await?;
    if n == 0 {
        return Ok(Measured {
            count: 0,
            oldest: None,
            tail: None,
        });
    }
    let grew = grown_from.is_some_and(|p| n > p);
    let read_all = grew && n <= opts.read_limit as u64;
    let read = ReadOptions::default()
        .rpc_timeout(opts.rpc_timeout)
        .idle_timeout(Duration::from_secs(2))
        .scan_limit(if read_all { opts.read_limit } else { 1 });
    let listing = list(conn, group, &read).await?;
    let oldest = listing.messages.first().and_then(|m| m.age_seconds);
    let tail = read_all.then(|| {
        let fresh = usize::try_from(n - grown_from.unwrap_or(0)).unwrap_or(usize::MAX);
        let skip = listing.messages.len().saturating_sub(fresh);
        listing.messages.into_iter().skip(skip).collect()
    });
    Ok(Measured {
        count: n,
        oldest,
        tail,
    })
}

/// What `watch` knows of a group between two measurements.
#[derive(Debug, Default)]
struct GroupState {
    /// The count at the last measurement that worked.
    last: Option<u64>,
    /// Copies the tap delivered since then.
    tapped: Tapped,
    /// Ids growth found while a new tap was already bound: their copies,
    /// delivered after that measurement, are not counted again.
    skip: HashSet<String>,
}

/// Copies the tap delivered for a group since its last measurement.
#[derive(Debug, Default)]
struct Tapped {
    new: u64,
    /// The newest [`MAX_EXAMPLES`], oldest first.
    examples: VecDeque<Info>,
    /// Their ids (up to the read limit), so that growth, when the tap was
    /// lost, does not count or log them again.
    ids: HashSet<String>,
}

/// What a measurement found new in a group.
#[derive(Debug, Default)]
struct Found {
    /// New dead letters for the alert (0: no alert).
    new: u64,
    /// The alert's examples.
    examples: Vec<Summary>,
    /// Found by growth and not seen on the tap: to be logged now.
    unlogged: Vec<Summary>,
    /// Counted by growth but not read (queue longer than the read limit).
    unread: u64,
}

impl GroupState {
    /// A copy on the tap; false when growth already counted it.
    fn on_copy(&mut self, info: &Info, id_limit: usize) -> bool {
        if self.skip.remove(&info.id) {
            return false;
        }
        let t = &mut self.tapped;
        t.new += 1;
        if t.ids.len() < id_limit {
            t.ids.insert(info.id.clone());
        }
        if t.examples.len() == MAX_EXAMPLES {
            t.examples.pop_front();
        }
        t.examples.push_back(info.clone());
        true
    }

    /// Settles a measurement: what is new since the previous one. `by_tap`:
    /// the tap's copies, and nothing else (a count that grew more came
    /// another way: an import). Else the tap's copies (from before it was
    /// lost) plus what growth found and the tap did not see. `tap_up`: a
    /// tap is bound now (growth's finds are then skipped when their copies
    /// arrive).
    fn settle(&mut self, m: &Measured, by_tap: bool, tap_up: bool, now: SystemTime) -> Found {
        let tapped = std::mem::take(&mut self.tapped);
        self.skip.clear();
        let previous = self.last.replace(m.count);
        let mut found = Found {
            new: tapped.new,
            ..Found::default()
        };
        match (&m.tail, previous) {
            _ if by_tap => {}
            (Some(tail), Some(_)) => {
                found.unlogged = tail
                    .iter()
                    .filter(|s| !tapped.ids.contains(&s.info.id))
                    .cloned()
                    .collect();
                found.new += found.unlogged.len() as u64;
                if tap_up {
                    self.skip = found.unlogged.iter().map(|s| s.info.id.clone()).collect();
                }
            }
            (None, Some(p)) if m.count.saturating_sub(p) > found.new => {
                // Growth measured without reading: the count is all it knows.
                found.unread = m.count - p - found.new;
                found.new = m.count - p;
            }
            _ => {}
        }
        // The tap's copies came before what growth found after them.
        let tail_start = found
            .unlogged
            .first()
            .map_or(m.count, |s| s.position as u64);
        let k = tapped.examples.len() as u64;
        let mut examples: Vec<Summary> = tapped
            .examples
            .into_iter()
            .zip(0u64..)
            .map(|(info, i)| Summary {
                position: usize::try_from(tail_start.saturating_sub(k - i)).unwrap_or(usize::MAX),
                age_seconds: info.age(now).map(|a| a.as_secs()),
                info,
            })
            .collect();
        examples.extend(found.unlogged.iter().cloned());
        let skip = examples.len().saturating_sub(MAX_EXAMPLES);
        found.examples = examples.split_off(skip);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;
    use lapin::BasicProperties;

    fn info(id: &str) -> Info {
        Info::from_parts(
            &BasicProperties::default()
                .with_message_id(id.into())
                .with_headers(FieldTable::default()),
            b"{}",
        )
    }

    fn summary(id: &str, position: usize) -> Summary {
        Summary {
            position,
            age_seconds: None,
            info: info(id),
        }
    }

    fn ids(s: &[Summary]) -> Vec<&str> {
        s.iter().map(|s| s.info.id.as_str()).collect()
    }

    fn measured(count: u64, tail: Option<Vec<Summary>>) -> Measured {
        Measured {
            count,
            oldest: None,
            tail,
        }
    }

    #[test]
    fn by_tap_every_copy_counts_whatever_the_count_did() {
        let mut st = GroupState {
            last: Some(5),
            ..Default::default()
        };
        assert!(st.on_copy(&info("a"), 100));
        // A replay took one, `a` arrived: the count did not move.
        let f = st.settle(&measured(5, None), true, true, SystemTime::now());
        assert_eq!((f.new, f.unread), (1, 0));
        assert_eq!(ids(&f.examples), ["a"]);
        assert_eq!(f.examples[0].position, 4);
        assert!(f.unlogged.is_empty());
        // Nothing new: nothing to alert.
        let f = st.settle(&measured(5, None), true, true, SystemTime::now());
        assert_eq!(f.new, 0);
        assert!(f.examples.is_empty());
    }

    #[test]
    fn examples_are_the_newest_ten_in_order() {
        let mut st = GroupState::default();
        for i in 0..25 {
            assert!(st.on_copy(&info(&format!("m{i}")), 100));
        }
        let f = st.settle(&measured(25, None), true, true, SystemTime::now());
        assert_eq!(f.new, 25);
        let want: Vec<String> = (15..25).map(|i| format!("m{i}")).collect();
        assert_eq!(ids(&f.examples), want);
        let positions: Vec<usize> = f.examples.iter().map(|s| s.position).collect();
        assert_eq!(positions, (15..25).collect::<Vec<_>>());
    }

    #[test]
    fn after_losing_the_tap_growth_adds_only_what_the_tap_did_not_see() {
        let mut st = GroupState {
            last: Some(2),
            ..Default::default()
        };
        assert!(st.on_copy(&info("seen"), 100));
        // The tap is lost; two more arrive; growth reads the new tail.
        let tail = vec![summary("seen", 2), summary("x", 3), summary("y", 4)];
        let f = st.settle(&measured(5, Some(tail)), false, true, SystemTime::now());
        assert_eq!(f.new, 3);
        assert_eq!(ids(&f.unlogged), ["x", "y"]);
        assert_eq!(ids(&f.examples), ["seen", "x", "y"]);
        assert_eq!(f.examples[0].position, 2);
        // The new tap was bound before that count: its copies of x and y
        // are not counted again; a later one is.
        assert!(!st.on_copy(&info("x"), 100));
        assert!(!st.on_copy(&info("y"), 100));
        assert!(st.on_copy(&info("z"), 100));
        let f = st.settle(&measured(6, None), true, true, SystemTime::now());
        assert_eq!(f.new, 1);
        assert_eq!(ids(&f.examples), ["z"]);
    }

    #[test]
    fn growth_that_cannot_read_counts_what_the_tap_did_not() {
        let mut st = GroupState {
            last: Some(100),
            ..Default::default()
        };
        assert!(st.on_copy(&info("a"), 100));
        let f = st.settle(&measured(104, None), false, false, SystemTime::now());
        assert_eq!((f.new, f.unread), (4, 3));
        assert_eq!(ids(&f.examples), ["a"]);
        // The first measurement: what is there is not new.
        let mut st = GroupState::default();
        let f = st.settle(&measured(7, None), false, false, SystemTime::now());
        assert_eq!(f.new, 0);
        assert_eq!(st.last, Some(7));
    }
}
