//! [`ConsumerGroup`]: the runtime. One consuming channel (basic.qos
//! `prefetch`, per consumer) on the process's supervised [`Broker`]
//! connection, and a [`Publisher`] for retry and dead-letter copies on a
//! connection of its own (a broker that blocks publishers must not block
//! acks); handlers run concurrently, at most `concurrency` at a time.
//!
//! Copies go through `warren-producer`'s Publisher rather than a confirm loop
//! of their own: with many copies in flight, lapin can hand one copy's
//! `basic.return` to another copy's confirm, so an unroutable copy (a retry
//! queue or dead-letter binding deleted by hand) would look confirmed and its
//! original would be acked. The Publisher matches returns to their publish.
//!
//! # Order
//!
//! - `prefetch` bounds deliveries the broker sends before acks;
//!   `concurrency` bounds handlers running. With `concurrency < prefetch`
//!   the difference waits in the client, already delivered (and counted by
//!   `consumer_timeout`). Nothing else is queued.
//! - A failed delivery's copy is published and confirmed *before* the
//!   original is acked. A copy that is not confirmed within
//!   `confirm_timeout` (nacked, unroutable, channel gone) leaves the original
//!   held, unacked, while the copy is published again, for up to
//!   `copy_hold`; then (or when the session ends) the original is nacked
//!   with requeue: a crash can duplicate, never lose. A copy that
//!   can never be published, whatever the broker's state (its properties do
//!   not fit in a frame once the failure headers are added; the broker
//!   refused this very message), leaves the original rejected instead (a
//!   nack without requeue): the work queue's own dead-letter exchange
//!   (`warren.dlx`, key `{group}`) takes it unchanged into `{group}.dead`,
//!   with the broker's `x-death`, rather than the handler running again
//!   and again. Only when the work queue is known to have that dead-letter
//!   exchange: each session declares it again with the topology's exact
//!   arguments, on a channel of its own. A queue declared by hand (or
//!   differing in any argument), or a user without the configure
//!   permission on it, leaves such a delivery requeued instead: a queue
//!   without a dead-letter exchange drops what is rejected.
//! - `handler_timeout` cancels the handler (kind `timeout`), which then goes
//!   through the retry tiers like any retryable error.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use prometheus::Registry;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};
use warren_producer::{Message, Publisher, PublisherConfig, PublisherMetrics};
use warren_topology::{Broker, Group, Plan, QueueType, Role, Topology, DEAD_LETTER_EXCHANGE};

use crate::acks::{AckOp, AckWindow, Settle, Stragglers};
use crate::delivery::Delivery;
use crate::error::ConsumerError;
use crate::handler::{ErrorKind, Handler, HandlerError, HandlerResult};
use crate::headers::{failure_headers, one_line_error, CopyTarget, Failure};
use crate::metrics::Metrics;

/// Default grace period for in-flight handlers at shutdown: 30 s.
///
/// Kubernetes also gives a pod 30 s (`terminationGracePeriodSeconds`)
/// before it kills it: set a shorter grace there
/// ([`ConsumerGroupBuilder::shutdown_grace`]; `warren consume` uses 25 s).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default time to wait for the broker to confirm a retry or dead-letter
/// copy: 10 s.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Default pause before requeueing a delivery whose copy was not confirmed
/// (so a missing retry queue does not turn into a hot redelivery loop), and
/// the first pause before its copy is published again: 1 s.
pub const DEFAULT_REQUEUE_DELAY: Duration = Duration::from_secs(1);
/// Default time a delivery whose copy the broker did not take is held while
/// the copy is published again, before the delivery is requeued: 5 minutes.
///
/// Well under RabbitMQ's `consumer_timeout` (30 minutes by default), past
/// which the broker closes a channel that holds a delivery unacked.
pub const DEFAULT_COPY_HOLD: Duration = Duration::from_secs(5 * 60);
/// The longest pause between two publishes of a held delivery's copy.
const COPY_RETRY_MAX_WAIT: Duration = Duration::from_secs(30);
/// The longest duration a builder setting takes: 100 years, "for ever",
/// as for the publisher ([`PublisherConfig::MAX_DURATION`]). Longer ones
/// (`Duration::MAX`) are taken as this: added to a clock's `Instant` (a
/// deadline, the end of a hold) they would overflow it and panic.
const FOR_EVER: Duration = PublisherConfig::MAX_DURATION;

/// What happens to a delivery, decided from the handler's result. The one
/// place where results map to ack / retry / dead-letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Success: ack.
    Ack,
    /// Publish a copy to retry tier `tier` (1-based), confirm, ack.
    Retry {
        /// The tier.
        tier: usize,
    },
    /// Publish a copy to `warren.dlx` (key `{group}`), confirm, ack.
    DeadLetter,
}

/// Maps a handler result to a disposition. `failed_before` is the incoming
/// `x-warren-attempts` (malformed = 0); `tiers` the group's retry tiers.
pub(crate) fn disposition(result: &HandlerResult, failed_before: u32, tiers: usize) -> Disposition {
    match result {
        Ok(()) => Disposition::Ack,
        Err(e) if e.kind().is_retryable() && (failed_before as usize) < tiers => {
            Disposition::Retry {
                tier: failed_before as usize + 1,
            }
        }
        Err(_) => Disposition::DeadLetter,
    }
}

/// Settings of a [`ConsumerGroup`]; see [`ConsumerGroup::builder`].
#[derive(Debug, Clone)]
struct Settings {
    group: Group,
    grace: Duration,
    confirm_timeout: Duration,
    requeue_delay: Duration,
    copy_hold: Duration,
}

/// Builds a [`ConsumerGroup`]. Defaults come from the topology's [`Group`]
/// (`prefetch`, `concurrency`, `handler_timeout`, whose own defaults are
/// [`warren_topology::DEFAULT_PREFETCH`], [`warren_topology::DEFAULT_CONCURRENCY`]
/// and [`warren_topology::DEFAULT_HANDLER_TIMEOUT`]) and the `DEFAULT_*`
/// constants of this crate. Without [`Self::metrics`] or [`Self::registry`]
/// the group's metrics are collected by nothing.
#[derive(Debug)]
pub struct ConsumerGroupBuilder<H> {
    settings: Settings,
    handler: H,
    metrics: Option<Metrics>,
}

impl<H: Handler> ConsumerGroupBuilder<H> {
    /// Handlers in flight at once in this process (at least 1). Default:
    /// the group's `concurrency` (when the file does not say: 16, or
    /// `prefetch` when lower). More
    /// than `prefetch` has no effect: the broker sends at most `prefetch`
    /// unacked deliveries.
    pub fn concurrency(mut self, n: u16) -> Self {
        self.settings.group.concurrency = n.max(1);
        self
    }

    /// basic.qos prefetch of the consuming channel (at least 1). Default:
    /// the group's `prefetch` (32 unless the file says otherwise).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.settings.group.prefetch = n.max(1);
        self
    }

    /// How long a handler may run before it is cancelled (kind `timeout`,
    /// retried). Default: the group's `handler_timeout` (30 s unless the
    /// file says otherwise). Not checked here: the topology file refuses
    /// less than [`warren_topology::MIN_HANDLER_TIMEOUT`] (100 ms), and
    /// with zero every handler that awaits anything times out. It can only
    /// cancel at an `.await`: see [`Handler`] on blocking. More than 100
    /// years (`Duration::MAX`) is taken as 100 years, as in every duration
    /// setter here.
    pub fn handler_timeout(mut self, d: Duration) -> Self {
        self.settings.group.handler_timeout = d.min(FOR_EVER);
        self
    }

    /// How long shutdown waits for in-flight handlers before requeueing what
    /// did not finish. Default: 30 s ([`DEFAULT_SHUTDOWN_GRACE`]).
    /// `Duration::MAX` waits for them for ever (100 years).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.settings.grace = d.min(FOR_EVER);
        self
    }

    /// How long to wait for the confirm of a retry or dead-letter copy
    /// before requeueing the delivery. Default: 10 s
    /// ([`DEFAULT_CONFIRM_TIMEOUT`]). At most 100 years (`Duration::MAX`).
    pub fn confirm_timeout(mut self, d: Duration) -> Self {
        self.settings.confirm_timeout = d.min(FOR_EVER);
        self
    }

    /// Pause before requeueing a delivery whose copy was not confirmed (its
    /// handler slot stays taken meanwhile). Default: 1 s
    /// ([`DEFAULT_REQUEUE_DELAY`]). At most 100 years (`Duration::MAX`).
    pub fn requeue_delay(mut self, d: Duration) -> Self {
        self.settings.requeue_delay = d.min(FOR_EVER);
        self
    }

    /// How long a delivery whose retry or dead-letter copy the broker did
    /// not take (unroutable, nacked, not confirmed within
    /// [`Self::confirm_timeout`]) is held, unacked, while the copy is
    /// published again, before the delivery is requeued. Default: 5 minutes
    /// ([`DEFAULT_COPY_HOLD`]); keep it under the broker's
    /// `consumer_timeout`. The copy is published again after
    /// [`Self::requeue_delay`], then after twice as long each time, at most
    /// 30 s apart. Meanwhile the handler does not run again and, on a quorum
    /// queue, nothing counts toward `delivery_limit` (every requeue does:
    /// past the limit the broker dead-letters the message itself, without
    /// the handler's error). A held delivery gives its `concurrency` slot
    /// back, so the deliveries behind it are still handled (at most
    /// `prefetch` are held at once: each stays unacked). The hold ends with
    /// the session (a lost connection, shutdown); the delivery then goes
    /// back to the queue.
    /// Zero requeues after [`Self::requeue_delay`], without publishing the
    /// copy again; `Duration::MAX` holds it until the copy is taken or the
    /// session ends (100 years at most).
    pub fn copy_hold(mut self, d: Duration) -> Self {
        self.settings.copy_hold = d.min(FOR_EVER);
        self
    }

    /// Metrics to update: register once per registry with
    /// [`Metrics::register`] and clone into each group of the process.
    pub fn metrics(mut self, m: Metrics) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Registers fresh metrics into `registry`: for a process with one
    /// group. A second group registering in the same registry fails with
    /// prometheus's `AlreadyReg` ("Duplicate metrics collector registration
    /// attempted"): with several groups use [`Self::metrics`].
    pub fn registry(mut self, registry: &Registry) -> Result<Self, prometheus::Error> {
        self.metrics = Some(Metrics::register(registry)?);
        Ok(self)
    }

    /// The group. Fails only when the metrics cannot be created (without
    /// [`Self::metrics`] or [`Self::registry`]: never in practice).
    pub fn build(self) -> Result<ConsumerGroup<H>, prometheus::Error> {
        let metrics = match self.metrics {
            Some(m) => m,
            None => Metrics::unregistered()?,
        };
        let (ready, _) = watch::channel(false);
        let name: Arc<str> = self.settings.group.name.as_str().into();
        Ok(ConsumerGroup {
            ctx: Arc::new(Ctx {
                name,
                settings: self.settings,
                metrics,
                queue_dead_letters: AtomicBool::new(false),
                retry_warned: WarnEvery::default(),
                blocked_warned: WarnEvery::default(),
            }),
            handler: Arc::new(self.handler),
            ready,
        })
    }
}

struct Ctx {
    name: Arc<str>,
    settings: Settings,
    metrics: Metrics,
    /// Whether the work queue was found to dead-letter to `warren.dlx`
    /// with key `{group}` when the session opened: only then does a reject
    /// put a message into `{group}.dead` (without a dead-letter exchange
    /// the broker drops it).
    queue_dead_letters: AtomicBool,
    /// Retries logged at WARN: the first, then one every
    /// [`RETRY_WARN_EVERY`]; the others at INFO. A handler that fails every
    /// message is then visible at the default level long before its
    /// messages reach the dead letters, without a line per message.
    retry_warned: WarnEvery,
    /// Handlers that blocked their thread, logged at WARN once every
    /// [`RETRY_WARN_EVERY`], the others at DEBUG.
    blocked_warned: WarnEvery,
}

/// A log line that is raised to WARN at most once per period.
#[derive(Debug, Default)]
struct WarnEvery(std::sync::Mutex<(Option<Instant>, u64)>);

impl WarnEvery {
    /// Whether the event at `now` is the one logged at WARN and, if so, how
    /// many were logged at INFO only since the last WARN.
    fn due(&self, now: Instant, every: Duration) -> Option<u64> {
        let Ok(mut w) = self.0.lock() else {
            return None;
        };
        match w.0 {
            Some(at) if now.duration_since(at) < every => {
                w.1 += 1;
                None
            }
            _ => {
                let quiet = std::mem::take(&mut w.1);
                w.0 = Some(now);
                Some(quiet)
            }
        }
    }
}

/// At most one retry per group is logged at WARN in this time; the others
/// at INFO.
const RETRY_WARN_EVERY: Duration = Duration::from_secs(60);

/// A handler's future that takes this long in one poll blocked its thread.
const BLOCKED_POLL: Duration = Duration::from_secs(1);

/// `fut`, keeping in `longest` the longest time one poll of it took: a
/// handler that blocks its thread does so inside a poll, where neither a
/// timeout nor a cancellation can reach it.
async fn timing_polls<F: std::future::Future>(fut: F, longest: &mut Duration) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        let start = Instant::now();
        let polled = fut.as_mut().poll(cx);
        *longest = (*longest).max(start.elapsed());
        polled
    })
    .await
}

/// A consumer group runtime: a group of the topology plus a handler. For
/// several groups in one process (one [`Broker`], one [`Metrics`]), see the
/// crate's docs.
///
/// ```no_run
/// # async fn demo(group: warren_topology::Group, broker: std::sync::Arc<warren_topology::Broker>) -> Result<(), Box<dyn std::error::Error>> {
/// use warren_consumer::{handler_fn, ConsumerGroup, Delivery};
/// let registry = prometheus::Registry::new();
/// let group = ConsumerGroup::builder(group, handler_fn(|d: Delivery| async move {
///     tracing::info!(bytes = d.body().len(), "got one");
///     Ok(())
/// }))
/// .registry(&registry)?
/// .build()?;
/// let cancel = tokio_util::sync::CancellationToken::new();
/// group.run(&broker, cancel).await?;
/// broker.close().await;
/// # Ok(()) }
/// ```
pub struct ConsumerGroup<H> {
    ctx: Arc<Ctx>,
    handler: Arc<H>,
    ready: watch::Sender<bool>,
}

impl<H> std::fmt::Debug for ConsumerGroup<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerGroup")
            .field("group", &self.ctx.settings.group.name)
            .field("prefetch", &self.ctx.settings.group.prefetch)
            .field("concurrency", &self.ctx.settings.group.concurrency)
            .finish()
    }
}

/// One consuming session: both channels of one connection generation.
struct Session {
    consume: Channel,
    consumer: Consumer,
    /// How the session ended, as its deliveries' tasks see it. In an
    /// `Arc`: every delivery takes a clone, and a token's own clone locks.
    ends: Arc<SessionEnd>,
}

/// The end of a session, for the tasks of its deliveries.
#[derive(Default)]
struct SessionEnd {
    /// Cancelled when the session ends (lost, or shutting down): deliveries
    /// held while their copy is published again are then requeued.
    token: CancellationToken,
    /// Set, before `token` is cancelled, when the session was lost: its
    /// channel is gone and the broker redelivers every delivery it had not
    /// acked, so a copy published for one of them now would be a second
    /// copy of the same attempt (a duplicate dead letter, or a message
    /// retried twice from then on), and an ack can no longer be sent.
    lost: AtomicBool,
}

impl SessionEnd {
    /// The session was lost (see `lost`).
    fn lose(&self) {
        self.lost.store(true, Ordering::Release);
        self.token.cancel();
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// Why a session ended.
enum Ended {
    /// Cancelled: shut down.
    Shutdown(AckWindow),
    /// Channel or connection lost: reconnect.
    Lost,
}

/// What a handler task reports back to the consuming loop.
struct Completion {
    tag: u64,
    epoch: u64,
    settle: Settle,
}

impl<H: Handler> ConsumerGroup<H> {
    /// A builder for `group` handled by `handler`.
    pub fn builder(group: Group, handler: H) -> ConsumerGroupBuilder<H> {
        ConsumerGroupBuilder {
            settings: Settings {
                group,
                grace: DEFAULT_SHUTDOWN_GRACE,
                confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
                requeue_delay: DEFAULT_REQUEUE_DELAY,
                copy_hold: DEFAULT_COPY_HOLD,
            },
            handler,
            metrics: None,
        }
    }

    /// Readiness: `true` while connected and consuming, `false` before,
    /// while reconnecting, and from the moment shutdown starts.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// The group it consumes.
    pub fn group(&self) -> &Group {
        &self.ctx.settings.group
    }

    /// Consumes until `cancel` fires, reconnecting (with backoff) whenever the
    /// channel or connection is lost; a broker that does not answer at the
    /// start is waited for the same way ([`Self::ready`] says when it
    /// consumes). The connection belongs to `broker`, which the other groups
    /// of the process may share: call [`Broker::close`] after this returns.
    /// Publish through another [`Broker`] (`Publisher::connect` makes its
    /// own): during a memory or disk alarm the broker stops reading from a
    /// connection that publishes, acks included.
    ///
    /// # Shutdown
    ///
    /// On cancel: basic.cancel, in-flight handlers get the grace period
    /// ([`ConsumerGroupBuilder::shutdown_grace`]), every finished delivery
    /// is acked, the handlers still running at the end of the grace are
    /// dropped and their deliveries requeued, the channels are closed. On a
    /// quorum queue the deliveries already prefetched are handled within the
    /// grace too (each one only while twice the mean handler time fits in
    /// what is left): the queue would count each one returned toward
    /// `delivery_limit`. A handler that blocks its thread cannot be dropped
    /// and holds the return past the grace (see [`Handler`]).
    ///
    /// # Returns
    ///
    /// - `Ok(())` only once `cancel` has fired and the drain is done; at
    ///   once, without connecting, when it had fired before the call. So a
    ///   service tells a requested stop from a failure by the result.
    /// - `Err` for what retrying cannot fix, after aborting the handlers
    ///   still running (their deliveries go back to the queue): a queue of
    ///   the group missing ([`ConsumerError::QueueMissing`]), the broker
    ///   refusing the login or the vhost ([`ConsumerError::Connect`]), the
    ///   read permission on the work queue
    ///   ([`ConsumerError::AccessRefused`]) or another permission
    ///   ([`ConsumerError::Broker`]). Transient failures are
    ///   retried here, so a returned error is never
    ///   [`ConsumerError::is_transient`].
    pub async fn run(
        &self,
        broker: &Arc<Broker>,
        cancel: CancellationToken,
    ) -> Result<(), ConsumerError> {
        let mut copies: Option<Copies> = None;
        let sem = Arc::new(Semaphore::new(usize::from(
            self.ctx.settings.group.concurrency.max(1),
        )));
        let mut tasks: JoinSet<Completion> = JoinSet::new();
        let mut epoch = 0u64;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times();
        let mut delays = backoff.build();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let opened = tokio::select! {
                _ = cancel.cancelled() => break,
                s = self.open(broker, &mut copies) => s,
            };
            let mut session = match opened {
                Ok(s) => s,
                Err(e) if e.is_transient() => {
                    let wait = delays.next().unwrap_or(Duration::from_secs(10));
                    warn!(group = %self.ctx.name, error = %e, retry_in = ?wait, "cannot start consuming; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
                Err(e) => {
                    self.ready.send_replace(false);
                    drain_aborting(&mut tasks).await;
                    if let Some(c) = copies.take() {
                        c.close().await;
                    }
                    return Err(e);
                }
            };
            let opened_at = Instant::now();
            if epoch > 0 {
                self.ctx.metrics.reconnects.inc();
                info!(group = %self.ctx.name, "consuming again after a reconnect");
            }
            epoch += 1;
            self.ready.send_replace(true);
            let Some(session_copies) = copies.clone() else {
                continue;
            };
            let ended = self
                .consume(
                    &mut session,
                    &session_copies,
                    epoch,
                    &mut tasks,
                    &sem,
                    &cancel,
                )
                .await;
            self.ready.send_replace(false);
            match ended {
                Ended::Shutdown(window) => {
                    self.shutdown(session, &session_copies, epoch, tasks, &sem, window)
                        .await;
                    session_copies.close().await;
                    return Ok(());
                }
                Ended::Lost => {
                    session.ends.lose();
                    warn!(group = %self.ctx.name, "channel or connection lost; deliveries in flight will be redelivered by the broker");
                    // The connection is not dropped here: `Broker::channel`
                    // opens a new one when it is closed or closing, and it
                    // is shared with the process's other groups. Dropping
                    // it on a lost channel (whose state does not tell a
                    // channel error from a lost connection) could close
                    // the connection another group had just opened.
                    close_quietly(&session.consume, 200).await;
                    // A session that fails soon after it opened (a message
                    // the connection cannot carry, a queue deleted under
                    // it) would otherwise be reopened in a tight loop.
                    if opened_at.elapsed() >= STABLE_SESSION {
                        delays = backoff.build();
                    } else {
                        let wait = delays.next().unwrap_or(Duration::from_secs(10));
                        warn!(group = %self.ctx.name, retry_in = ?wait, "the session ended soon after it opened; waiting before the next");
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
        self.ready.send_replace(false);
        drain_aborting(&mut tasks).await;
        if let Some(c) = copies.take() {
            c.close().await;
        }
        Ok(())
    }

    async fn open(
        &self,
        broker: &Arc<Broker>,
        copies: &mut Option<Copies>,
    ) -> Result<Session, ConsumerError> {
        let group = &self.ctx.settings.group;
        let err = |what: &'static str| {
            let group = group.name.clone();
            move |source| ConsumerError::Broker {
                group,
                what,
                source,
            }
        };
        let connect = |source| ConsumerError::Connect {
            group: group.name.clone(),
            source,
        };
        let (consume, _) = broker.channel().await.map_err(connect)?;
        let queue = group.work_queue();
        // Every queue a delivery of this group can be sent to must exist
        // before the first handler runs: a missing retry or dead-letter
        // queue would make each failure's copy unroutable and its message
        // loop (requeued, handled again) until an operator applies the
        // topology. A passive declare creates nothing.
        let targets = std::iter::once(queue.clone())
            .chain((1..=group.retry.len()).map(|tier| group.retry_queue(tier)))
            .chain(std::iter::once(group.dead_queue()));
        for name in targets {
            if let Err(e) = consume
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
            {
                let text = e.to_string();
                if text.contains("NOT_FOUND")
                    || text.contains("NOT-FOUND")
                    || text.contains("no queue")
                {
                    return Err(ConsumerError::QueueMissing {
                        group: group.name.clone(),
                        queue: name,
                        detail: text,
                    });
                }
                return Err(err("checking the group's queues")(e));
            }
        }
        let dead_letters = self.work_queue_dead_letters(broker).await;
        self.ctx
            .queue_dead_letters
            .store(dead_letters, Ordering::Relaxed);
        consume
            .basic_qos(group.prefetch.max(1), BasicQosOptions { global: false })
            .await
            .map_err(err("basic.qos"))?;
        if copies.is_none() {
            *copies =
                Some(
                    self.copy_publisher(broker)
                        .await
                        .map_err(|e| ConsumerError::Copies {
                            group: group.name.clone(),
                            source: e,
                        })?,
                );
        }
        let consumer = consume
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                match warren_topology::refused_access(&e.to_string()).filter(|r| r.kind == "queue")
                {
                    Some(r) => ConsumerError::AccessRefused {
                        group: group.name.clone(),
                        queue: r.name,
                        user: r.user,
                        vhost: r.vhost,
                        detail: r.said,
                    },
                    None => err("basic.consume")(e),
                }
            })?;
        info!(group = %group.name, queue = %queue, prefetch = group.prefetch, concurrency = group.concurrency, consumer_tag = %consumer.tag(), "consuming");
        Ok(Session {
            consume,
            consumer,
            ends: Arc::default(),
        })
    }

    /// Whether the work queue dead-letters what is rejected into
    /// `{group}.dead`: declared again, on a channel of its own, with exactly
    /// the arguments the topology gives it (`x-dead-letter-exchange=
    /// warren.dlx`, `x-dead-letter-routing-key={group}`, ...), which the
    /// broker accepts only when they are the queue's own. A queue declared
    /// by hand, one that differs in any argument, or a user without the
    /// configure permission on it (the check cannot be made) give `false`:
    /// a copy that can never be published then leaves its message requeued
    /// rather than rejected, since a queue without a dead-letter exchange
    /// drops what is rejected.
    async fn work_queue_dead_letters(&self, broker: &Arc<Broker>) -> bool {
        let group = &self.ctx.settings.group;
        let topology = Topology {
            exchanges: Vec::new(),
            groups: vec![group.clone()],
        };
        let Some(planned) = Plan::new(&topology)
            .queues
            .into_iter()
            .find(|q| q.role == Role::Work)
        else {
            return false;
        };
        let ch = match broker.channel().await {
            Ok((ch, _)) => ch,
            Err(e) => {
                warn!(group = %group.name, error = %e, "cannot open a channel to check the work queue's dead-letter exchange");
                return false;
            }
        };
        let checked = with_timeout(
            Duration::from_secs(5),
            ch.queue_declare(
                planned.name.as_str().into(),
                QueueDeclareOptions::durable(),
                planned.field_table(),
            ),
        )
        .await;
        close_quietly(&ch, 200).await;
        match checked {
            Ok(_) => true,
            Err(text) if text.contains("PRECONDITION") => {
                let said = text
                    .rsplit_once("PRECONDITION_FAILED - ")
                    .map_or(text.as_str(), |(_, t)| t);
                warn!(group = %group.name, queue = %planned.name, differs = %warren_topology::explain_precondition(said), "the work queue is not declared as the topology declares it (by hand, or before the file changed): a message whose retry or dead-letter copy can never be published will be requeued, not rejected into the dead-letter queue, since the queue may have no dead-letter exchange; run `warren topology verify`");
                false
            }
            Err(text) => {
                info!(group = %group.name, queue = %planned.name, error = %text, "cannot check the work queue's dead-letter exchange (it needs the configure permission on the queue): a message whose retry or dead-letter copy can never be published will be requeued, not rejected into the dead-letter queue");
                false
            }
        }
    }

    /// The publisher of retry and dead-letter copies: a window as large as
    /// the handlers that can wait on it, `confirm_timeout` per copy, and no
    /// size limit of its own (the broker already accepted the original).
    ///
    /// It publishes on a connection of its own (`warren-<component>-copies`):
    /// during a memory or disk alarm the broker stops reading from every
    /// connection that publishes, and on the consuming connection one copy
    /// would stop the acks of every success behind it — while consumers are
    /// what drains the broker out of its alarm.
    async fn copy_publisher(
        &self,
        broker: &Arc<Broker>,
    ) -> Result<Copies, warren_producer::PublishError> {
        let settings = &self.ctx.settings;
        let config = PublisherConfig::default()
            .window(usize::from(settings.group.concurrency.max(1)))
            .publish_timeout(settings.confirm_timeout)
            .max_message_size(usize::MAX);
        let mut opts = broker.options().clone();
        opts.component = format!("{}-copies", opts.component);
        let login = opts.url.login().map(Arc::from);
        // Its reconnects are the consumer's (the publishes are counted by
        // `warren_handled_total` and `warren_retries_total`).
        let metrics = PublisherMetrics::unregistered()?
            .counting_reconnects_in(self.ctx.metrics.reconnects.clone());
        let publisher = Publisher::owning(config, Broker::new(opts), metrics).await?;
        Ok(Copies { publisher, login })
    }

    async fn consume(
        &self,
        s: &mut Session,
        copies: &Copies,
        epoch: u64,
        tasks: &mut JoinSet<Completion>,
        sem: &Arc<Semaphore>,
        cancel: &CancellationToken,
    ) -> Ended {
        let prefetch = usize::from(self.ctx.settings.group.prefetch.max(1));
        let mut window = AckWindow::new(Stragglers {
            threshold: straggler_threshold(prefetch),
            after: STRAGGLER_AFTER,
        });
        let mut ops = Vec::with_capacity(8);
        let batch = ack_batch(prefetch);
        // When the window is next flushed without a new event: a batch's
        // delay, or stragglers falling due.
        let mut flush_at: Option<tokio::time::Instant> = None;
        // The stream's end is seen only when a handler slot is free: while
        // every slot is busy, a lost channel is noticed by its status.
        let mut health = tokio::time::interval(HEALTH_CHECK);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = async {
                let permit = sem.clone().acquire_owned().await;
                (permit, s.consumer.next().await)
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ended::Shutdown(window),
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    self.record(done, epoch, &mut window);
                    while let Some(done) = tasks.try_join_next() {
                        self.record(done, epoch, &mut window);
                    }
                    let now = Instant::now();
                    let stragglers_due = window.stragglers_due().is_some_and(|due| due <= now);
                    if stragglers_due || window.settled() >= batch {
                        if let Err(e) = send_acks(&s.consume, &mut window, &mut ops, Flush::Due(now)).await {
                            warn!(group = %self.ctx.name, error = %e, "ack failed");
                            return Ended::Lost;
                        }
                        flush_at = None;
                    } else if flush_at.is_none() && window.settled() > 0 {
                        flush_at = Some(tokio::time::Instant::from_std(now + ACK_DELAY));
                    }
                    flush_at = earliest(flush_at, window.stragglers_due());
                }
                _ = sleep_opt(flush_at), if flush_at.is_some() => {
                    if let Err(e) = send_acks(&s.consume, &mut window, &mut ops, Flush::Due(Instant::now())).await {
                        warn!(group = %self.ctx.name, error = %e, "ack failed");
                        return Ended::Lost;
                    }
                    flush_at = earliest(None, window.stragglers_due());
                }
                (permit, item) = next => match (permit, item) {
                    (Ok(permit), Some(Ok(d))) => {
                        window.received(d.delivery_tag, Instant::now());
                        self.spawn(tasks, copies.clone(), d, epoch, permit, &s.ends);
                    }
                    (_, Some(Err(e))) => {
                        let text = e.to_string();
                        if text.contains("frame too large") {
                            error!(group = %self.ctx.name, error = %text, "a delivery does not fit the connection's frame size (its headers are larger than frame_max): raise it with `?frame_max=N` in the AMQP URL, up to the broker's frame_max");
                        } else {
                            warn!(group = %self.ctx.name, error = %text, "consumer failed");
                        }
                        return Ended::Lost;
                    }
                    (_, None) => {
                        warn!(group = %self.ctx.name, "the broker ended the consumer (channel closed or queue deleted)");
                        return Ended::Lost;
                    }
                    (Err(_), Some(Ok(_))) => return Ended::Lost,
                },
                _ = health.tick() => {
                    if !s.consume.status().connected() {
                        warn!(group = %self.ctx.name, "the consuming channel is closed");
                        return Ended::Lost;
                    }
                }
            }
        }
    }

    /// Records a finished task in the ack window of its channel.
    fn record(
        &self,
        done: Result<Completion, tokio::task::JoinError>,
        epoch: u64,
        window: &mut AckWindow,
    ) {
        match done {
            Ok(c) if c.epoch == epoch => {
                window.complete(c.tag, c.settle);
            }
            Ok(c) => {
                debug!(group = %self.ctx.name, tag = c.tag, "delivery from a lost channel finished; the broker redelivers it");
            }
            Err(e) => {
                error!(group = %self.ctx.name, error = %e, "handler task failed");
            }
        }
    }

    fn spawn(
        &self,
        tasks: &mut JoinSet<Completion>,
        copies: Copies,
        d: lapin::message::Delivery,
        epoch: u64,
        permit: OwnedSemaphorePermit,
        ends: &Arc<SessionEnd>,
    ) {
        let ctx = self.ctx.clone();
        let ends = ends.clone();
        let handler = self.handler.clone();
        let tag = d.delivery_tag;
        let delivery = Delivery::from_lapin(ctx.name.clone(), d);
        ctx.metrics
            .deliveries
            .with_label_values(&[&*ctx.name])
            .inc();
        let span = info_span!(
            "delivery",
            group = %ctx.name,
            message_id = delivery.message_id().unwrap_or(""),
            attempt = delivery.attempt(),
            redelivered = delivery.redelivered(),
        );
        tasks.spawn(
            async move {
                let settle = process(&ctx, &*handler, &copies, delivery, &ends, permit).await;
                Completion { tag, epoch, settle }
            }
            .instrument(span),
        );
    }

    async fn shutdown(
        &self,
        mut s: Session,
        copies: &Copies,
        epoch: u64,
        mut tasks: JoinSet<Completion>,
        sem: &Arc<Semaphore>,
        mut window: AckWindow,
    ) {
        let name = &self.ctx.name;
        info!(group = %name, in_flight = tasks.len(), grace = ?self.ctx.settings.grace, "shutting down: cancelling the consumer");
        // Deliveries held while their copy is published again go back to
        // the queue now rather than at the end of the grace.
        s.ends.token.cancel();
        let tag = s.consumer.tag();
        let cancelled = match with_timeout(
            Duration::from_secs(5),
            s.consume.basic_cancel(tag, BasicCancelOptions::default()),
        )
        .await
        {
            Ok(()) => true,
            Err(e) => {
                warn!(group = %name, error = %e, "basic.cancel failed");
                false
            }
        };
        let deadline = tokio::time::Instant::now() + self.ctx.settings.grace;
        let mut ops = Vec::new();
        // Settled deliveries whose acks were being batched go out first,
        // stragglers included: what is not acked is redelivered.
        if let Err(e) = send_acks(&s.consume, &mut window, &mut ops, Flush::All).await {
            warn!(group = %name, error = %e, "ack failed during shutdown; the broker requeues");
        }
        // Deliveries the broker sent before its cancel-ok, waiting for a
        // handler: returned to the queue when the channel closes, except on
        // a quorum queue, which counts every return toward `delivery_limit`
        // (a group scaled down five times would dead-letter a message no
        // handler ever saw). There they are handled within the grace, each
        // one only if the handlers' mean run time fits twice in what is
        // left of it.
        let mut take_buffered =
            cancelled && self.ctx.settings.group.queue_type == QueueType::Quorum;
        let (mut handled_after_cancel, mut returned_unstarted) = (0u64, false);
        while take_buffered || !tasks.is_empty() {
            let next = async {
                let permit = sem.clone().acquire_owned().await;
                (permit, s.consumer.next().await)
            };
            tokio::select! {
                biased;
                _ = tokio::time::sleep_until(deadline) => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    self.record(done, epoch, &mut window);
                    while let Some(done) = tasks.try_join_next() {
                        self.record(done, epoch, &mut window);
                    }
                    if let Err(e) = send_acks(&s.consume, &mut window, &mut ops, Flush::All).await {
                        warn!(group = %name, error = %e, "ack failed during shutdown; the broker requeues");
                        break;
                    }
                }
                (permit, item) = next, if take_buffered => match (permit, item) {
                    (Ok(permit), Some(Ok(d))) if self.fits_before(deadline) => {
                        window.received(d.delivery_tag, Instant::now());
                        self.spawn(&mut tasks, copies.clone(), d, epoch, permit, &s.ends);
                        handled_after_cancel += 1;
                    }
                    (_, Some(Ok(_))) => {
                        // Unacked, it goes back with the rest at the close.
                        returned_unstarted = true;
                        take_buffered = false;
                    }
                    _ => take_buffered = false,
                }
            }
        }
        if handled_after_cancel > 0 || returned_unstarted {
            info!(group = %name, started = handled_after_cancel, rest_returned = returned_unstarted, "deliveries received before the cancel were handled within the grace (a quorum queue counts a returned one toward delivery_limit)");
        }
        // Handlers that finished before the deadline but were not recorded
        // yet (with a grace of zero, or under load, the deadline can win the
        // race with their completions): acked now, not requeued to be
        // handled a second time.
        let mut late = 0usize;
        while let Some(done) = tasks.try_join_next() {
            self.record(done, epoch, &mut window);
            late += 1;
        }
        if late > 0 {
            if let Err(e) = send_acks(&s.consume, &mut window, &mut ops, Flush::All).await {
                warn!(group = %name, error = %e, "ack failed during shutdown; the broker requeues");
            }
        }
        let unfinished = tasks.len();
        drain_aborting(&mut tasks).await;
        let requeued = window.outstanding();
        info!(group = %name, unfinished, requeued, "in-flight handlers done or cancelled; unacked deliveries go back to the queue");
        // Closing the channel returns every unacked delivery to the queue.
        close_quietly(&s.consume, 200).await;
    }

    /// Whether a handler started now is likely to finish before `deadline`:
    /// twice the group's mean handler time so far fits in what is left.
    fn fits_before(&self, deadline: tokio::time::Instant) -> bool {
        let h = self
            .ctx
            .metrics
            .handler_seconds
            .with_label_values(&[&*self.ctx.name]);
        let n = h.get_sample_count();
        if n == 0 {
            return true;
        }
        let mean = Duration::from_secs_f64(h.get_sample_sum() / n as f64);
        deadline.saturating_duration_since(tokio::time::Instant::now()) >= mean * 2
    }
}

/// A session that lasted this long resets the reconnect backoff; one that
/// ended sooner waits before the next.
const STABLE_SESSION: Duration = Duration::from_secs(5);

/// How many finished deliveries may wait behind an unfinished one before they
/// are acked one by one: when an eighth of the prefetch window is left (and
/// the unfinished one is older than [`STRAGGLER_AFTER`]). Other unfinished
/// deliveries count with the finished ones: several slow handlers or held
/// deliveries leave room for fewer finished behind them, and the window
/// would otherwise stay full until one of them ended.
///
/// A single ack that is not at the front of the window costs more than a
/// `multiple` ack (one frame each, and the broker walks its list of unacked
/// deliveries to find it). In `bench retry`, where every first attempt waits
/// for its copy's confirm while second attempts finish at once, acking
/// stragglers at half the window made the retry path about 10% slower than
/// at seven eighths.
fn straggler_threshold(prefetch: usize) -> usize {
    // Never the whole window: one unfinished delivery plus the threshold
    // must fit, or the group would wait for the slow one.
    prefetch.saturating_sub((prefetch / 8).max(1)).max(1)
}

/// How old the unfinished delivery at the front of the window must be before
/// the finished ones behind it are acked one by one.
///
/// A failed delivery waits for its copy's confirm, which a loaded broker
/// gives in 10 to 60 ms (`bench retry`, classic, 500 prefetch: 18 ms on
/// average). Acking the deliveries behind it one by one as soon as the
/// window was seven eighths full sent half of all the acks of the retry
/// path as single acks (23,041 of 80,000 deliveries), each walking the
/// broker's unacked list; waiting up to 100 ms for the front lets one
/// `multiple` ack cover them (151 single acks) and made the retry path
/// 10-20% faster. A slow handler still frees the window after 100 ms.
const STRAGGLER_AFTER: Duration = Duration::from_millis(100);

/// How often the consume loop checks that its channel is still open (the
/// end of the consumer's stream is seen only when a handler slot is free).
const HEALTH_CHECK: Duration = Duration::from_secs(1);

/// How long a settled delivery may wait for others to share its ack frame.
const ACK_DELAY: Duration = Duration::from_millis(1);

/// Settled deliveries that are acked at once, without waiting for
/// [`ACK_DELAY`]: a quarter of the prefetch window, at most 64.
///
/// When deliveries trickle in (a group keeping up with its publishers), each
/// handler finishes alone and an ack per delivery went out; on a quorum queue
/// every ack is a command in the queue's log. Waiting up to a millisecond
/// lets contiguous ones share one `multiple` ack: `bench e2e` on quorum,
/// five alternating runs, 19,326 -> 22,123 msgs/s (median), classic 21,898
/// -> 23,746.
fn ack_batch(prefetch: usize) -> usize {
    (prefetch / 4).clamp(1, 64)
}

fn earliest(a: Option<tokio::time::Instant>, b: Option<Instant>) -> Option<tokio::time::Instant> {
    let b = b.map(tokio::time::Instant::from_std);
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Where retry and dead-letter copies go: the copies' publisher, and the
/// user its connection logs in as (`None` when the client certificate names
/// it), which a copy's `user_id` must match for the broker to take it.
#[derive(Clone)]
struct Copies {
    publisher: Publisher,
    login: Option<Arc<str>>,
}

impl Copies {
    async fn close(&self) {
        self.publisher.close().await;
    }
}

/// `warren_in_flight` for one running handler, lowered when the handler
/// ends however it ends: a handler cut off at the end of the shutdown grace
/// is dropped, not finished.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn drain_aborting(tasks: &mut JoinSet<Completion>) {
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

async fn with_timeout<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(d, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {d:?}")),
    }
}

async fn close_quietly(ch: &Channel, code: u16) {
    if ch.status().connected() {
        let _ = with_timeout(Duration::from_secs(2), ch.close(code, "bye".into())).await;
    }
}

/// What a flush settles.
#[derive(Debug, Clone, Copy)]
enum Flush {
    /// The settled front of the window, and stragglers due at this time.
    Due(Instant),
    /// Every settled delivery (shutting down).
    All,
}

async fn send_acks(
    ch: &Channel,
    window: &mut AckWindow,
    ops: &mut Vec<AckOp>,
    flush: Flush,
) -> Result<(), lapin::Error> {
    ops.clear();
    match flush {
        Flush::Due(now) => window.flush(now, ops),
        Flush::All => window.flush_all(ops),
    }
    for op in ops.iter() {
        match op.settle {
            Settle::Ack => {
                ch.basic_ack(
                    op.tag,
                    BasicAckOptions {
                        multiple: op.multiple,
                    },
                )
                .await?
            }
            Settle::Requeue | Settle::Reject => {
                ch.basic_nack(
                    op.tag,
                    BasicNackOptions {
                        multiple: op.multiple,
                        requeue: op.settle == Settle::Requeue,
                    },
                )
                .await?
            }
        }
    }
    Ok(())
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("handler panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("handler panicked: {s}")
    } else {
        "handler panicked".into()
    }
}

/// Runs the handler (with its timeout, panics caught) and decides how to
/// settle the delivery: ack (success, or its copy confirmed) or requeue (its
/// copy was not confirmed).
async fn process<H: Handler>(
    ctx: &Ctx,
    handler: &H,
    copies: &Copies,
    delivery: Delivery,
    ends: &SessionEnd,
    slot: OwnedSemaphorePermit,
) -> Settle {
    // One of the group's `concurrency` slots, held while the handler runs
    // and its copy is published; given back while the delivery is held,
    // where it runs no handler (the prefetch still bounds the deliveries
    // held).
    let mut slot = Some(slot);
    let group = &*ctx.name;
    let m = &ctx.metrics;
    let limit = ctx.settings.group.handler_timeout;
    let in_flight = InFlight::new(m.in_flight.with_label_values(&[group]));
    let started = Instant::now();
    // `handle` runs the synchronous part of the handler (a closure's body up
    // to its `async` block) before there is a future to catch a panic in.
    let handled = std::panic::catch_unwind(AssertUnwindSafe(|| {
        AssertUnwindSafe(handler.handle(delivery.clone())).catch_unwind()
    }));
    // That synchronous part blocks like a poll does.
    let mut longest_poll = started.elapsed();
    let result: HandlerResult = match handled {
        Err(p) => Err(HandlerError::new(ErrorKind::Panic, panic_text(&*p))),
        Ok(run) => match tokio::time::timeout(limit, timing_polls(run, &mut longest_poll)).await {
            Ok(Ok(r)) => r,
            Ok(Err(p)) => Err(HandlerError::new(ErrorKind::Panic, panic_text(&*p))),
            Err(_) => Err(HandlerError::new(
                ErrorKind::Timeout,
                format!(
                    "handler ran past handler_timeout ({}) and was cancelled",
                    humantime::format_duration(limit)
                ),
            )),
        },
    };
    drop(in_flight);
    m.handler_seconds
        .with_label_values(&[group])
        .observe(started.elapsed().as_secs_f64());
    if longest_poll >= BLOCKED_POLL {
        let message_id = delivery.message_id().unwrap_or("");
        match ctx.blocked_warned.due(Instant::now(), RETRY_WARN_EVERY) {
            Some(quiet) => {
                warn!(group, message_id, blocked_for = ?longest_poll, handler_timeout = ?limit, blocked_quietly = quiet, "the handler blocked its thread without an .await (std::thread::sleep, blocking I/O, long CPU work): handler_timeout and the shutdown grace cannot interrupt it, and on a single-threaded runtime every other delivery, ack and heartbeat waited; run such work in tokio::task::spawn_blocking (one a minute is logged at WARN, the others at DEBUG)")
            }
            None => {
                debug!(group, message_id, blocked_for = ?longest_poll, "the handler blocked its thread again")
            }
        }
    }

    let tiers = ctx.settings.group.retry.len();
    let decided = disposition(&result, delivery.failed_attempts(), tiers);
    let (target, mut exchange, mut key, mut tier) = match decided {
        Disposition::Ack if ends.lost() => {
            debug!(
                group,
                message_id = delivery.message_id().unwrap_or(""),
                "handled after its channel was lost: not acked; the broker redelivers it"
            );
            return requeue(ctx, &ends.token).await;
        }
        Disposition::Ack => {
            m.handled.with_label_values(&[group, "ack"]).inc();
            return Settle::Ack;
        }
        Disposition::Retry { tier } => (
            CopyTarget::Retry,
            String::new(),
            ctx.settings.group.retry_queue(tier),
            Some(tier),
        ),
        Disposition::DeadLetter => (
            CopyTarget::DeadLetter,
            DEAD_LETTER_EXCHANGE.to_owned(),
            group.to_owned(),
            None,
        ),
    };
    let Err(failure) = result else {
        return Settle::Ack;
    };
    // Logged as the copy stores it: one line, at most 1 KiB. The handler's
    // text may span lines (an upstream's response), which would pass for
    // log lines of their own, or be megabytes long.
    let logged_error = one_line_error(failure.message());
    // A message published without an id gets one on its first copy, the
    // same for every publish of that copy: one the broker took but reported
    // as failed (nacked by another queue of the route, confirmed too late)
    // and that is then published again is a duplicate that handlers and
    // operators tell by its id.
    let new_id = delivery
        .message_id()
        .is_none()
        .then(|| uuid::Uuid::new_v4().to_string());
    let failure_copy = |target: CopyTarget, error: &str, exchange: &str, key: &str| {
        let headers = failure_headers(
            delivery.headers(),
            &Failure {
                kind: failure.kind(),
                error,
                group,
                attempts: delivery.failed_attempts().saturating_add(1),
                exchange: delivery.exchange(),
                routing_key: delivery.routing_key(),
                now: SystemTime::now(),
                target,
            },
        );
        copy_message(copies, exchange, key, &delivery, new_id.as_deref(), headers)
    };
    let (mut target, mut error) = (target, None::<String>);
    let mut copy = failure_copy(target, failure.message(), &exchange, &key);
    if tier.is_some() {
        // The broker adds `x-death` when the tier's TTL sends the copy back:
        // a copy that only just fits a frame would come back too large to
        // deliver, and the connection would fail on every redelivery.
        let frame_max = copies.publisher.broker().frame_max();
        let room = frame_max.saturating_sub(x_death_reserve(&key));
        if !copy.fits_in_frame(room) {
            let why = format!(
                "{}; not retried: its properties leave no room in a frame (frame_max {frame_max}) for the x-death header the broker adds on the way back from {key}",
                failure.message()
            );
            warn!(group, message_id = delivery.message_id().unwrap_or(""), attempt = delivery.attempt(), queue = %key, frame_max, "the retry copy's properties would not fit a frame once the broker adds x-death; dead-lettering instead");
            (exchange, key, tier) = (DEAD_LETTER_EXCHANGE.to_owned(), group.to_owned(), None);
            target = CopyTarget::DeadLetter;
            copy = failure_copy(target, &why, &exchange, &key);
            error = Some(why);
        }
    }
    let copy_again = || {
        failure_copy(
            target,
            error.as_deref().unwrap_or(failure.message()),
            &exchange,
            &key,
        )
    };
    let message_id = delivery
        .message_id()
        .or(new_id.as_deref())
        .unwrap_or_default();
    if ends.lost() {
        // The broker redelivers the delivery: its next attempt makes the
        // copy, and one made now would be a second copy of this attempt.
        info!(group, message_id, attempt = delivery.attempt(), kind = %failure.kind(), handler_error = %logged_error, "the handler failed after its channel was lost: no copy is published; the broker redelivers the message and the handler runs again");
        return requeue(ctx, &ends.token).await;
    }
    let mut published = copies.publisher.publish(copy).await.map(|_| ());
    // From the first copy the broker did not take: since when the delivery
    // is held, and how many publishes of its copy failed.
    let mut held_since: Option<Instant> = None;
    let mut tries = 0u32;
    loop {
        let why = match published {
            Ok(()) => break,
            Err(why)
                if never_publishable(&why) && ctx.queue_dead_letters.load(Ordering::Relaxed) =>
            {
                // Sending it again would be refused the same way, and
                // requeueing would run the handler again and again. The
                // work queue's own dead-letter exchange (warren.dlx, key
                // {group}, as DESIGN declares every work queue) takes it
                // whole into {group}.dead.
                error!(group, message_id, attempt = delivery.attempt(), kind = %failure.kind(), handler_error = %logged_error, error = %why, exchange = %exchange, routing_key = %key, "the copy can never be published; rejecting the delivery so that the broker dead-letters it unchanged into the group's dead-letter queue");
                m.handled.with_label_values(&[group, "reject"]).inc();
                return Settle::Reject;
            }
            Err(why) if never_publishable(&why) => {
                error!(group, message_id, attempt = delivery.attempt(), kind = %failure.kind(), handler_error = %logged_error, error = %why, exchange = %exchange, routing_key = %key, "the copy can never be published, and the work queue was not found to dead-letter to warren.dlx (a reject could drop the message); requeueing the delivery: run `warren topology verify`");
                return requeue(ctx, &ends.token).await;
            }
            Err(why) => why,
        };
        // Not taken this time (unroutable, nacked, not confirmed): the
        // delivery is held and the copy published again, with backoff,
        // for up to `copy_hold`; then it is requeued.
        let now = Instant::now();
        let since = *held_since.get_or_insert(now);
        tries += 1;
        let wait = copy_retry_wait(ctx.settings.requeue_delay, tries);
        let hold = ctx.settings.copy_hold;
        if hold.is_zero() || now + wait > since + hold {
            if hold.is_zero() {
                error!(group, message_id, attempt = delivery.attempt(), error = %why, exchange = %exchange, routing_key = %key, "the copy was not confirmed; requeueing the delivery");
            } else {
                error!(group, message_id, attempt = delivery.attempt(), error = %why, exchange = %exchange, routing_key = %key, held = ?now.duration_since(since), publishes = tries, "the copy was still not taken at the end of copy_hold; requeueing the delivery (its handler runs again)");
            }
            return requeue(ctx, &ends.token).await;
        }
        if tries == 1 {
            drop(slot.take());
            error!(group, message_id, attempt = delivery.attempt(), error = %why, exchange = %exchange, routing_key = %key, again_in = ?wait, copy_hold = ?hold, "the copy was not taken; holding the delivery unacked and publishing the copy again (requeued if it is still not taken at the end of copy_hold)");
        } else {
            debug!(group, message_id, error = %why, again_in = ?wait, publishes = tries, "the held delivery's copy was not taken again");
        }
        tokio::select! {
            _ = ends.token.cancelled() => {
                info!(group, message_id, "the session ended while the delivery was held for its copy; the broker requeues it");
                return requeue(ctx, &ends.token).await;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        published = copies.publisher.publish(copy_again()).await.map(|_| ());
    }
    if let Some(since) = held_since {
        warn!(group, message_id, exchange = %exchange, routing_key = %key, held = ?since.elapsed(), publishes = tries + 1, "the held delivery's copy was taken at last");
    }
    match tier {
        Some(tier) => {
            match ctx.retry_warned.due(Instant::now(), RETRY_WARN_EVERY) {
                Some(quiet) => {
                    warn!(group, message_id, attempt = delivery.attempt(), kind = %failure.kind(), error = %logged_error, tier, queue = %key, retried_quietly = quiet, "handler failed; retrying later (one retry a minute is logged at WARN, the others at INFO; retried_quietly: since the last)")
                }
                None => {
                    info!(group, message_id, attempt = delivery.attempt(), kind = %failure.kind(), error = %logged_error, tier, queue = %key, "handler failed; retrying later")
                }
            }
            m.handled.with_label_values(&[group, "retry"]).inc();
            m.retries
                .with_label_values(&[group, &tier.to_string()])
                .inc();
        }
        None => {
            warn!(group, message_id, attempt = delivery.attempt(), kind = %failure.kind(), error = %logged_error, "handler failed; dead-lettered");
            m.handled.with_label_values(&[group, "dead_letter"]).inc();
        }
    }
    Settle::Ack
}

/// Requeues a delivery whose copy was not taken, after `requeue_delay` (so
/// that a broken route does not become a hot redelivery loop) or at once
/// when the session ends; and counts one that its lost session left
/// unsettled (at once: that session's token is cancelled), which the broker
/// redelivers.
async fn requeue(ctx: &Ctx, ends: &CancellationToken) -> Settle {
    ctx.metrics
        .handled
        .with_label_values(&[&*ctx.name, "requeue"])
        .inc();
    tokio::select! {
        _ = ends.cancelled() => {}
        _ = tokio::time::sleep(ctx.settings.requeue_delay) => {}
    }
    Settle::Requeue
}

/// The pause before the `tries`-th publish of a held delivery's copy
/// (`tries` from 1): `first` (at least 10 ms), doubled each time, at most
/// [`COPY_RETRY_MAX_WAIT`].
fn copy_retry_wait(first: Duration, tries: u32) -> Duration {
    first
        .max(Duration::from_millis(10))
        .saturating_mul(1u32 << (tries.saturating_sub(1)).min(16))
        .min(COPY_RETRY_MAX_WAIT)
}

/// Whether a copy failed because of what it is (its properties do not fit
/// in a frame, the broker refused this very message), so that no later
/// attempt can succeed; anything else (unroutable, nacked, a timeout, a
/// lost connection) may pass once the operator or the broker recovers.
fn never_publishable(e: &warren_producer::PublishError) -> bool {
    use warren_producer::PublishError as E;
    matches!(
        e,
        E::Invalid(_) | E::TooLarge { .. } | E::MessageRefused { .. }
    )
}

/// A copy of a delivery (properties kept but `expiration`,
/// `x-delivery-count` and a `user_id` of another user than the copies'
/// connection, see [`warren_topology::copy_properties_for`]), with
/// `new_id` as its `message_id` when the delivery has none. The copies'
/// publisher sends it mandatory and waits for its confirm; unroutable,
/// nacked or unconfirmed within `confirm_timeout` is an error.
fn copy_message(
    copies: &Copies,
    exchange: &str,
    key: &str,
    delivery: &Delivery,
    new_id: Option<&str>,
    headers: FieldTable,
) -> Message {
    let mut props = warren_topology::copy_properties_for(
        delivery.properties(),
        headers,
        copies.login.as_deref(),
    );
    if let (None, Some(id)) = (props.message_id(), new_id) {
        props = props.with_message_id(id.into());
    }
    Message::bytes(exchange, key, delivery.body().to_vec())
        .properties(props)
        .as_is()
}

/// Bytes of a frame kept free in a retry copy's properties for what the
/// broker adds when the tier's TTL dead-letters it back to the work queue:
/// an `x-death` entry (count, reason, queue, time, exchange, routing keys),
/// `x-first-death-*` and, from RabbitMQ 3.13, `x-last-death-*` headers, each
/// naming the tier's queue, and a quorum queue's `x-delivery-count`. About
/// 300 bytes plus four times the queue's name; twice that is kept.
fn x_death_reserve(queue: &str) -> u32 {
    let bytes = 2 * (300 + 4 * queue.len());
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_longest_poll_of_a_handler_is_measured() {
        let mut longest = Duration::ZERO;
        // Waiting at an .await is not blocking: many short polls.
        timing_polls(tokio::time::sleep(Duration::from_millis(300)), &mut longest).await;
        assert!(longest < Duration::from_millis(100), "{longest:?}");
        let mut longest = Duration::ZERO;
        let blocking = async {
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(300));
            7
        };
        assert_eq!(timing_polls(blocking, &mut longest).await, 7);
        assert!(longest >= Duration::from_millis(300), "{longest:?}");
        assert!(longest < Duration::from_secs(2), "{longest:?}");
    }

    #[test]
    fn one_retry_a_minute_is_logged_at_warn_with_the_count_of_quiet_ones() {
        let w = WarnEvery::default();
        let every = RETRY_WARN_EVERY;
        let t0 = Instant::now();
        assert_eq!(w.due(t0, every), Some(0));
        assert_eq!(w.due(t0 + Duration::from_secs(1), every), None);
        assert_eq!(w.due(t0 + Duration::from_secs(59), every), None);
        assert_eq!(w.due(t0 + every, every), Some(2));
        assert_eq!(w.due(t0 + every, every), None);
        assert_eq!(w.due(t0 + 2 * every, every), Some(1));
    }

    #[test]
    fn a_held_copy_is_published_again_after_doubling_pauses_at_most_30_s_apart() {
        let s = Duration::from_secs;
        assert_eq!(copy_retry_wait(s(1), 1), s(1));
        assert_eq!(copy_retry_wait(s(1), 2), s(2));
        assert_eq!(copy_retry_wait(s(1), 5), s(16));
        assert_eq!(copy_retry_wait(s(1), 6), s(30));
        assert_eq!(copy_retry_wait(s(1), u32::MAX), s(30));
        assert_eq!(
            copy_retry_wait(Duration::ZERO, 1),
            Duration::from_millis(10)
        );
        assert_eq!(
            copy_retry_wait(Duration::from_millis(50), 3),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn acks_are_batched_by_a_quarter_of_the_window_at_most_64() {
        assert_eq!(ack_batch(1), 1);
        assert_eq!(ack_batch(16), 4);
        assert_eq!(ack_batch(32), 8);
        assert_eq!(ack_batch(500), 64);
    }

    #[test]
    fn stragglers_are_acked_before_the_window_is_full() {
        assert_eq!(straggler_threshold(1), 1);
        assert_eq!(straggler_threshold(2), 1);
        assert_eq!(straggler_threshold(4), 3);
        assert_eq!(straggler_threshold(8), 7);
        assert_eq!(straggler_threshold(32), 28);
        assert_eq!(straggler_threshold(500), 438);
    }

    #[test]
    fn outcome_table() {
        let ok: HandlerResult = Ok(());
        let retry: HandlerResult = Err(HandlerError::retryable("x"));
        let perm: HandlerResult = Err(HandlerError::permanent("x"));
        let decode: HandlerResult = Err(HandlerError::decode("x"));
        let panic: HandlerResult = Err(HandlerError::new(ErrorKind::Panic, "x"));
        let timeout: HandlerResult = Err(HandlerError::new(ErrorKind::Timeout, "x"));
        assert_eq!(disposition(&ok, 0, 3), Disposition::Ack);
        assert_eq!(disposition(&ok, 9, 3), Disposition::Ack);
        assert_eq!(disposition(&retry, 0, 3), Disposition::Retry { tier: 1 });
        assert_eq!(disposition(&retry, 2, 3), Disposition::Retry { tier: 3 });
        assert_eq!(disposition(&retry, 3, 3), Disposition::DeadLetter);
        assert_eq!(disposition(&retry, 0, 0), Disposition::DeadLetter);
        assert_eq!(disposition(&panic, 1, 3), Disposition::Retry { tier: 2 });
        assert_eq!(disposition(&timeout, 0, 1), Disposition::Retry { tier: 1 });
        assert_eq!(disposition(&perm, 0, 3), Disposition::DeadLetter);
        assert_eq!(disposition(&decode, 0, 3), Disposition::DeadLetter);
        // A count past the tiers (a clamped or hand-edited header) never
        // loops: straight to the dead-letter exchange.
        assert_eq!(disposition(&retry, 10_000, 3), Disposition::DeadLetter);
    }
}
