//! Reading a dead-letter queue without consuming it.
//!
//! AMQP 0-9-1 has no peek. A scan consumes with manual acks and holds every
//! delivery it reads unacked (the prefetch window is as large as the scan,
//! so the broker never stalls); at the end it closes its channel, and the
//! broker puts every unacked message back **at its original position**
//! (classic queues keep requeued messages in publication order; the
//! `scan_keeps_order_*` tests check it on the real broker). Messages an
//! operation took (replayed, purged) are acked before that, and only after
//! what they were taken for is safe (a confirmed publish, an fsynced
//! archive).
//!
//! ## Limits
//!
//! - A scan reads at most the number of messages the queue held when it
//!   started (so it ends even while dead letters keep arriving), and at most
//!   [`ReadOptions::scan_limit`]; [`Coverage`] says "scanned N of M".
//! - Dead-letter queues are classic: a read never counts toward a delivery
//!   limit. Before reading, a scan declares the queue with the arguments
//!   warren plans for it (a no-op when they match); a queue with others (a
//!   quorum queue, a TTL) is refused with [`OperatorError::NotADeadQueue`]
//!   rather than read.
//! - Every broker call has a timeout; a queue that yields fewer messages
//!   than it counted (another reader took some, or they expired) ends the
//!   scan after [`ReadOptions::idle_timeout`], and [`Coverage::stalled`]
//!   says so.
//! - A read that the broker ends before the scan read what it counted (it
//!   cancels the consumer when the queue is deleted; a closed channel or
//!   connection ends it too) is an error, [`OperatorError::ReadCut`], never
//!   the end of a complete scan: a command must not report a replay,
//!   export or purge of the whole queue when it saw only part of it.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use serde::Serialize;
use tracing::debug;
use warren_topology::{dead_queue, explain_precondition, planned_dead_queue};

use crate::error::{timed, OperatorError};
use crate::message::{DeadLetter, Info};

/// Default most messages one scan reads.
pub const DEFAULT_SCAN_LIMIT: usize = 50_000;
/// The largest scan limit: the prefetch window of a scan (basic.qos is 16 bits).
pub const MAX_SCAN_LIMIT: usize = u16::MAX as usize;
/// Default wait for the next delivery before a scan ends early.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout of every broker call (declare, consume, publish confirm, close).
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// How dead-letter queues are read.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Most messages a scan reads. Default [`DEFAULT_SCAN_LIMIT`], at most
    /// [`MAX_SCAN_LIMIT`].
    pub scan_limit: usize,
    /// Wait for the next delivery before ending a scan early. Default
    /// [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// Timeout of every broker call. Default [`DEFAULT_RPC_TIMEOUT`].
    pub rpc_timeout: Duration,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            scan_limit: DEFAULT_SCAN_LIMIT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
        }
    }
}

impl ReadOptions {
    /// Sets the scan limit (clamped to 1..=[`MAX_SCAN_LIMIT`]).
    pub fn scan_limit(mut self, n: usize) -> Self {
        self.scan_limit = n.clamp(1, MAX_SCAN_LIMIT);
        self
    }

    /// Sets the idle timeout.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Sets the broker-call timeout.
    pub fn rpc_timeout(mut self, d: Duration) -> Self {
        self.rpc_timeout = d;
        self
    }
}

/// How much of a queue a scan saw.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Coverage {
    /// Messages read.
    pub scanned: usize,
    /// Messages the queue held when the scan started.
    pub total: u64,
    /// Whether the scan stopped because it read [`ReadOptions::scan_limit`]
    /// messages with more left in the queue (not because a selection's
    /// `limit` was reached): reading more needs a higher scan limit.
    pub scan_limit_reached: bool,
    /// Consumers on the queue when the scan started (the broker's count,
    /// the scan's own not included): another reader, such as a replay in
    /// progress. What they hold unacked is in neither `total` nor what
    /// was read; it goes back to the queue unless they remove it. Not in
    /// the JSON of a coverage (the reports of `list` and `stats` carry it
    /// as their own `consumers`).
    #[serde(skip)]
    pub consumers: u32,
    /// Whether the queue stopped giving messages before the scan read what
    /// it counted: no delivery came for [`ReadOptions::idle_timeout`].
    /// Another reader took the others (it started after the count), or they
    /// expired (a message published into the queue with an `expiration`).
    /// What was read is reported; the rest was not seen. In the JSON only
    /// when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stalled: bool,
}

impl Coverage {
    /// Whether the scan saw fewer messages than the queue held.
    pub fn partial(&self) -> bool {
        (self.scanned as u64) < self.total
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "scanned {} of {}", self.scanned, self.total)
    }
}

/// Counts the messages ready in a group's dead-letter queue (passive
/// declare: reads nothing). Messages that a consumer holds unacked are
/// not ready, and not counted. A group whose queue name would be over
/// AMQP's limit is [`OperatorError::NameTooLong`], before anything is sent.
pub async fn count(conn: &Connection, group: &str, rpc: Duration) -> Result<u64, OperatorError> {
    Ok(count_and_consumers(conn, group, rpc).await?.0)
}

/// [`count`], and the consumers on the queue (the broker gives both).
async fn count_and_consumers(
    conn: &Connection,
    group: &str,
    rpc: Duration,
) -> Result<(u64, u32), OperatorError> {
    crate::error::check_group_name(group)?;
    let queue = dead_queue(group);
    let ch = timed(rpc, "opening a channel", &queue, conn.create_channel()).await?;
    let n = passive_count(&ch, &queue, rpc).await;
    if n.is_ok() {
        let _ = tokio::time::timeout(rpc, ch.close(200, "counted".into())).await;
    }
    n
}

/// Whether queue `name` exists: a passive declare on a channel of its own.
/// Only the broker's NOT_FOUND means it does not; any other failure (a
/// refusal, a closed channel or connection, a timeout) is an error.
pub(crate) async fn queue_exists(
    conn: &Connection,
    name: &str,
    rpc: Duration,
) -> Result<bool, OperatorError> {
    let ch = timed(rpc, "opening a channel", name, conn.create_channel()).await?;
    match passive_count(&ch, name, rpc).await {
        Ok(_) => {
            let _ = tokio::time::timeout(rpc, ch.close(200, "checked".into())).await;
            Ok(true)
        }
        Err(OperatorError::NoSuchQueue { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The messages ready in `queue` and its consumers (a passive declare).
async fn passive_count(
    ch: &Channel,
    queue: &str,
    rpc: Duration,
) -> Result<(u64, u32), OperatorError> {
    let declared = timed(
        rpc,
        "counting messages (passive declare)",
        queue,
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    match declared {
        Ok(q) => Ok((u64::from(q.message_count()), q.consumer_count())),
        Err(OperatorError::Amqp { source, .. }) if is_not_found(&source) => {
            Err(OperatorError::NoSuchQueue {
                queue: queue.to_owned(),
            })
        }
        Err(e) => Err(e),
    }
}

/// A scan in progress: deliveries read and held unacked on its own channel.
pub(crate) struct Scan {
    group: String,
    queue: String,
    channel: Channel,
    consumer: Option<Consumer>,
    /// The prefetch window set when the read started (0: no read).
    window: u16,
    total: u64,
    consumers: u32,
    target: usize,
    seen: usize,
    stalled: bool,
    opts: ReadOptions,
}

impl Scan {
    /// Opens a scan of `group`'s dead-letter queue.
    pub(crate) async fn open(
        conn: &Connection,
        group: &str,
        opts: &ReadOptions,
    ) -> Result<Scan, OperatorError> {
        let queue = dead_queue(group);
        let rpc = opts.rpc_timeout;
        let (total, consumers) = count_and_consumers(conn, group, rpc).await?;
        let target = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .min(opts.scan_limit.clamp(1, MAX_SCAN_LIMIT));
        let channel = timed(rpc, "opening a channel", &queue, conn.create_channel()).await?;
        check_dead_queue(&channel, group, rpc).await?;
        let mut consumer = None;
        let window = u16::try_from(target).unwrap_or(u16::MAX);
        if target > 0 {
            timed(
                rpc,
                "setting the prefetch window",
                &queue,
                channel.basic_qos(window, BasicQosOptions::default()),
            )
            .await?;
            consumer = Some(
                timed(
                    rpc,
                    "starting to read",
                    &queue,
                    channel.basic_consume(
                        queue.as_str().into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await?,
            );
        }
        debug!(queue = %queue, total, target, "scan opened");
        Ok(Scan {
            group: group.to_owned(),
            queue,
            channel,
            consumer,
            window,
            total,
            consumers,
            target,
            seen: 0,
            stalled: false,
            opts: opts.clone(),
        })
    }

    /// The next dead letter and its delivery tag; `None` at the end of the scan.
    pub(crate) async fn next(&mut self) -> Result<Option<(u64, DeadLetter)>, OperatorError> {
        if self.seen >= self.target {
            return Ok(None);
        }
        let Some(consumer) = self.consumer.as_mut() else {
            return Ok(None);
        };
        let delivery = match tokio::time::timeout(self.opts.idle_timeout, consumer.next()).await {
            Err(_) => {
                // Callers report it from the coverage (`stalled`).
                debug!(queue = %self.queue, expected = self.target, read = self.seen,
                    "the queue gave fewer messages than it counted; ending the scan");
                self.target = self.seen;
                self.stalled = true;
                return Ok(None);
            }
            // lapin ends the stream when the broker cancels the consumer
            // (basic.cancel: the queue was deleted) or the channel closes.
            Ok(None) => {
                let expected = self.target;
                self.target = self.seen;
                let channel_closed = !self.channel.status().connected();
                // The error says it all, to whoever reports it.
                debug!(queue = %self.queue, expected, read = self.seen, channel_closed,
                    "the broker ended the read before the scan read what it counted");
                return Err(OperatorError::ReadCut {
                    queue: self.queue.clone(),
                    read: self.seen,
                    expected,
                    channel_closed,
                    queue_deleted: None,
                    reading: Reading::Moving,
                });
            }
            Ok(Some(Err(e))) => {
                return Err(OperatorError::Amqp {
                    what: "reading",
                    object: self.queue.clone(),
                    source: e,
                })
            }
            Ok(Some(Ok(d))) => d,
        };
        let position = self.seen;
        self.seen += 1;
        let info = Info::from_parts(&delivery.properties, &delivery.data);
        Ok(Some((
            delivery.delivery_tag,
            DeadLetter {
                position,
                group: self.group.clone(),
                exchange: delivery.exchange.as_str().to_owned(),
                routing_key: delivery.routing_key.as_str().to_owned(),
                properties: delivery.properties,
                body: delivery.data,
                info,
            },
        )))
    }

    /// Removes a message for good (after what it was taken for is safe).
    pub(crate) async fn ack(&self, tag: u64) -> Result<(), OperatorError> {
        timed(
            self.opts.rpc_timeout,
            "acking",
            &self.queue,
            self.channel.basic_ack(tag, BasicAckOptions::default()),
        )
        .await
    }

    /// Removes every message up to and including `tag` that is not acked
    /// yet (one `multiple` ack): only when none of them is to stay.
    pub(crate) async fn ack_up_to(&self, tag: u64) -> Result<(), OperatorError> {
        timed(
            self.opts.rpc_timeout,
            "acking",
            &self.queue,
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true }),
        )
        .await
    }

    /// Confirms the acks sent before it: an ack gets no answer, so a
    /// request that does is sent after them on the scan's channel (a
    /// `basic.qos` with the window the read already has, which changes
    /// nothing), and the broker answers it only after it has handled
    /// what came before it on that channel. `Ok` means every earlier ack
    /// was handled; an error (a lost connection: a broker that closed it
    /// drops what arrives after) leaves them unconfirmed, and the channel
    /// unusable. Costs one round trip.
    pub(crate) async fn sync(&self) -> Result<(), OperatorError> {
        if self.consumer.is_none() {
            // Nothing was read, so nothing was acked.
            return Ok(());
        }
        timed(
            self.opts.rpc_timeout,
            "confirming the acks (basic.qos)",
            &self.queue,
            self.channel
                .basic_qos(self.window, BasicQosOptions::default()),
        )
        .await
    }

    /// How much of the queue was read so far.
    pub(crate) fn coverage(&self) -> Coverage {
        Coverage {
            scanned: self.seen,
            total: self.total,
            scan_limit_reached: (self.seen as u64) < self.total
                && self.seen >= self.opts.scan_limit.clamp(1, MAX_SCAN_LIMIT),
            consumers: self.consumers,
            stalled: self.stalled,
        }
    }

    /// The queue's name.
    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// Ends the scan: closing the channel puts every message read and not
    /// acked back in the queue, in its original order.
    ///
    /// The consumer is dropped only after the channel is closed: dropping it
    /// first makes lapin send a basic.cancel from another task, which can
    /// reach the broker after the channel's close-ok, and the broker then
    /// closes the whole connection ("expected 'channel.open'"), seen once in
    /// `dlq list`.
    pub(crate) async fn finish(self) -> Result<Coverage, OperatorError> {
        let coverage = self.coverage();
        let _consumer = self.consumer;
        timed(
            self.opts.rpc_timeout,
            "closing the scan channel",
            &self.queue,
            self.channel.close(200, "scan done".into()),
        )
        .await?;
        Ok(coverage)
    }
}

/// What a read that was cut short ([`OperatorError::ReadCut`]) was for:
/// what its command had done with the messages it read, which the error
/// says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reading {
    /// A replay or an export: it removed only what it reports.
    Moving,
    /// `stats`, `list`, `show`: nothing removed, and no partial result.
    Inspecting,
    /// A purge's read, before anything is deleted: it had selected
    /// `selected` dead letters, and written them to its archive when
    /// `archived`.
    Purging {
        /// Dead letters selected before the read ended.
        selected: usize,
        /// Whether they were written to an archive.
        archived: bool,
    },
}

impl OperatorError {
    /// A [`OperatorError::ReadCut`] said for `reading`; any other error as
    /// it is.
    pub(crate) fn while_reading(mut self, reading: Reading) -> Self {
        if let OperatorError::ReadCut { reading: r, .. } = &mut self {
            *r = reading;
        }
        self
    }
}

/// [`OperatorError::ReadCut`]'s text: what ended the read, what the
/// command did with what it read ([`Reading`]), and what to do.
pub(crate) fn cut_text(
    queue: &str,
    read: usize,
    expected: usize,
    channel_closed: bool,
    queue_deleted: Option<bool>,
    reading: Reading,
) -> String {
    let (what, todo) = if channel_closed {
        (
            "its channel or the connection to the broker was closed",
            "the messages the read held are back in the queue: run the command again",
        )
    } else {
        match queue_deleted {
            Some(true) => (
                "the queue was deleted (the dead letters it still held went with it)",
                "`warren topology apply` declares it again",
            ),
            Some(false) => (
                "the broker cancelled the read (the queue is still there)",
                "run the command again",
            ),
            None => (
                "the broker cancelled the read (the queue was deleted, or its consumer was cancelled)",
                "check the queue with `warren dlq stats` and run the command again",
            ),
        }
    };
    let gone = !channel_closed && queue_deleted == Some(true);
    let done = match reading {
        Reading::Moving => "nothing was removed from it beyond what this command reports".into(),
        Reading::Inspecting => {
            "nothing was removed from it, and no partial listing is given".into()
        }
        Reading::Purging { selected, archived } => {
            let them = format!(
                "the {selected} dead letter{} it had selected",
                if selected == 1 { "" } else { "s" }
            );
            match (archived && selected > 0, gone) {
                (false, _) => "the purge deleted nothing".to_owned(),
                (true, true) => {
                    format!("the purge deleted nothing; the archive holds the only copy of {them}")
                }
                (true, false) => format!(
                    "the purge deleted nothing; the archive holds copies of {them}, none deleted"
                ),
            }
        }
    };
    format!("reading {queue:?} stopped after {read} of {expected} messages: {what}; {done}; {todo}")
}

/// `e` with what a cancelled read means made sure of: for an
/// [`OperatorError::ReadCut`] whose channel stayed open, whether the queue
/// is still there (a passive declare on a channel of its own). Any other
/// error is returned as it is.
pub(crate) async fn explain_cut(
    conn: &Connection,
    e: OperatorError,
    rpc: Duration,
) -> OperatorError {
    match e {
        OperatorError::ReadCut {
            queue,
            read,
            expected,
            channel_closed: false,
            queue_deleted: None,
            reading,
        } => {
            let queue_deleted = match conn.create_channel().await {
                Ok(ch) => match passive_count(&ch, &queue, rpc).await {
                    Ok(_) => {
                        let _ = tokio::time::timeout(rpc, ch.close(200, "checked".into())).await;
                        Some(false)
                    }
                    Err(OperatorError::NoSuchQueue { .. }) => Some(true),
                    Err(_) => None,
                },
                Err(_) => None,
            };
            OperatorError::ReadCut {
                queue,
                read,
                expected,
                channel_closed: false,
                queue_deleted,
                reading,
            }
        }
        other => other,
    }
}

/// Declares `group`'s dead-letter queue with the arguments warren plans for
/// it: a no-op for the queue `apply` declared, PRECONDITION_FAILED (and a
/// closed channel) for one with other arguments.
async fn check_dead_queue(ch: &Channel, group: &str, rpc: Duration) -> Result<(), OperatorError> {
    let planned = planned_dead_queue(group);
    let declared = timed(
        rpc,
        "checking the queue's arguments",
        &planned.name,
        ch.queue_declare(
            planned.name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            planned.field_table(),
        ),
    )
    .await;
    match declared {
        Ok(_) => Ok(()),
        Err(OperatorError::Amqp { source, .. }) if is_precondition_failed(&source) => {
            let text = source.to_string();
            let detail = match text.find("inequivalent arg") {
                Some(at) => explain_precondition(&text[at..]),
                None => text,
            };
            Err(OperatorError::NotADeadQueue {
                queue: planned.name,
                detail,
            })
        }
        Err(e) => Err(e),
    }
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    let s = e.to_string().to_uppercase();
    s.contains("PRECONDITION_FAILED")
        || s.contains("PRECONDITION-FAILED")
        || s.contains("PRECONDITIONFAILED")
}

fn is_not_found(e: &lapin::Error) -> bool {
    let s = e.to_string().to_uppercase();
    s.contains("NOT_FOUND") || s.contains("NOT-FOUND") || s.contains("NOTFOUND")
}
