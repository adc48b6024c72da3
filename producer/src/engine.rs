//! The task that owns the publishing channel: it sends every message (so that
//! lapin's delivery tags follow our order), collects confirms, matches
//! returned messages to their owners, fails what passes its deadline, and
//! reopens the channel after a failure.
//!
//! ## Why returned messages are matched by `message_id` and route
//!
//! lapin hands a `basic.return` to whichever confirm it resolves next, and
//! resolves a multiple-ack in hash-map order. With many publishes in flight,
//! `Confirmation::Ack(Some(returned))` may therefore belong to another
//! message, and the unroutable one may see `Ack(None)`. The engine collects
//! every returned message's `message_id`, exchange and routing key, and
//! decides a message's outcome only when its return, if any, must have been
//! seen:
//!
//! - an `Ack(None)` means lapin's queue of returns was empty when it was
//!   resolved, so a return for this message went to a confirm resolved
//!   earlier; the engine drains every ready confirm before deciding, so it has
//!   seen it;
//! - a message that got someone else's return waits until a later round shows
//!   an empty queue again (an `Ack(None)`), or until nothing is in flight.
//!
//! Two messages may share a `message_id` (a business key, or the copies of
//! two redeliveries of one message). So that a return is never counted
//! against the wrong one, at most one message per (`message_id`, exchange,
//! routing key) is in flight on a channel: a second is held back until the
//! first is decided. Without that, a routable copy could take an
//! unroutable one's return, and the unroutable one would be reported as
//! confirmed: a consumer would then ack an original whose copy went nowhere.
//!
//! ## Which message made the broker close the channel
//!
//! The broker refuses some messages by closing the channel (406
//! PRECONDITION_FAILED: a `user_id` other than the connection's user, a body
//! over its `max_message_size`, an invalid `expiration`; 404 or 403 for the
//! exchange). Sending such a message again can never succeed, so it must fail
//! at once while the other unconfirmed messages of that channel go again. The
//! close says neither which message nor its delivery tag; the engine blames:
//!
//! 1. every unconfirmed message of the channel that the broker's words name:
//!    its exchange (`'name'`; the default exchange is `'amq.default'`), its `user_id`, a body over the size the text
//!    gives, its `expiration` ([`refused_for`]);
//! 2. else, for a soft (channel) error, the only unconfirmed message of the
//!    channel, if there is one: the broker handles a channel's publishes in
//!    order and confirms none after the one it refused, so the culprit is
//!    always among the unconfirmed;
//! 3. else nobody yet: the unconfirmed messages become *suspects*, and are
//!    sent again one at a time until a close with a single one in flight
//!    names the culprit (rule 2), or every suspect is answered. The broker's
//!    text can be cut at 255 bytes (a long `user_id`), so rule 1 cannot
//!    always tell.
//!
//! A lapin error other than the broker's close (a publish that found the
//! channel already closing) waits up to [`CLOSE_GRACE`] for the close itself
//! to reach the pending confirms, so that the broker's words are not lost.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::BuildHasher as _;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, ErrorKind};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Span};
use warren_topology::Broker;

use crate::config::PublisherConfig;
use crate::error::{PublishError, Stage};
use crate::message::Confirmed;
use crate::metrics::{PublisherMetrics, CONFIRMED};

/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(50);
/// Queued messages started per wake-up of the engine at most.
const RECV_BATCH: usize = 64;
/// Sends of one message after which a channel error it cannot be cleared of
/// fails it.
const MAX_ATTEMPTS: u32 = 10;
/// How long a channel that failed a publish may take to deliver the broker's
/// reason (`channel.close`) to the confirms still pending on it.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

pub(crate) type Reply = oneshot::Sender<Result<Confirmed, PublishError>>;

/// One message on its way, holding its window slot until the broker answered
/// or its channel died.
pub(crate) struct Job {
    pub exchange: String,
    pub routing_key: String,
    pub body: Arc<Vec<u8>>,
    pub properties: BasicProperties,
    pub message_id: String,
    pub started: Instant,
    pub deadline: Instant,
    pub reply: Option<Reply>,
    pub span: Span,
    pub attempts: u32,
    pub order: u64,
    pub epoch: u64,
    /// A hash of (`message_id`, exchange, routing key), set when sent: at
    /// most one message per route is in flight on a channel.
    pub route: u64,
    pub permit: OwnedSemaphorePermit,
}

/// Who a returned message is: its `message_id`, exchange and routing key.
type ReturnKey = (String, String, String);

type Output = (u64, u64, Result<Confirmation, lapin::Error>);
type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pub(crate) struct Engine {
    broker: Arc<Broker>,
    config: PublisherConfig,
    metrics: PublisherMetrics,
    rx: mpsc::Receiver<Job>,
    cancel: CancellationToken,
    channel: Option<Channel>,
    /// Bumped for every channel opened: outputs of older channels are stale.
    epoch: u64,
    /// The broker's connection generation of the current channel.
    generation: u64,
    next_key: u64,
    next_order: u64,
    jobs: HashMap<u64, Job>,
    in_flight: FuturesUnordered<BoxFut<Output>>,
    retry: VecDeque<Job>,
    /// (message_id, exchange, routing key) → how many returns not yet
    /// matched, on the current channel, with the last reply code and text.
    returned: HashMap<ReturnKey, (usize, u16, String)>,
    /// Route hash → the key of the one message of that route in flight.
    sending: HashMap<u64, u64>,
    /// Messages whose route has another message in flight: sent once that
    /// one is decided (see the module docs).
    held: VecDeque<Job>,
    routes: std::collections::hash_map::RandomState,
    /// Keys acked with someone else's return, and the round they came in.
    undecided: Vec<(u64, u64)>,
    round: u64,
    /// Sends on the current channel whose outcome has not come back yet.
    outstanding: usize,
    /// The current channel failed a publish and is closing: the error seen
    /// first (if any) and when, while the broker's reason may still be on its
    /// way to the other pending confirms.
    closing: Option<(Option<lapin::Error>, Instant)>,
    /// Orders of the messages to send one at a time: they were unconfirmed
    /// when the broker closed the channel without saying which one it refused.
    suspects: HashSet<u64>,
    connecting: Option<BoxFut<Result<(Channel, u64), PublishError>>>,
    backoff: Box<dyn Iterator<Item = Duration> + Send>,
    connect_after: Option<Instant>,
    last_error: Option<String>,
    /// The broker's reason while it blocks publishing.
    blocked: Option<String>,
}

impl Engine {
    pub(crate) fn new(
        broker: Arc<Broker>,
        config: PublisherConfig,
        metrics: PublisherMetrics,
        rx: mpsc::Receiver<Job>,
        cancel: CancellationToken,
        channel: Channel,
        generation: u64,
    ) -> Self {
        let backoff = Box::new(backoff(&config));
        Engine {
            broker,
            config,
            metrics,
            rx,
            cancel,
            channel: Some(channel),
            epoch: 1,
            generation,
            next_key: 0,
            next_order: 0,
            jobs: HashMap::new(),
            in_flight: FuturesUnordered::new(),
            retry: VecDeque::new(),
            returned: HashMap::new(),
            sending: HashMap::new(),
            held: VecDeque::new(),
            routes: std::collections::hash_map::RandomState::new(),
            undecided: Vec::new(),
            round: 0,
            outstanding: 0,
            closing: None,
            suspects: HashSet::new(),
            connecting: None,
            backoff,
            connect_after: None,
            last_error: None,
            blocked: None,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut accepting = true;
        loop {
            if !self.held.is_empty() {
                self.release_held();
            }
            if !accepting && self.jobs.is_empty() && self.retry.is_empty() && self.held.is_empty() {
                break;
            }
            self.maybe_connect();
            self.note_blocked();
            if !self.suspects.is_empty()
                && self.jobs.is_empty()
                && self.retry.is_empty()
                && self.held.is_empty()
            {
                self.suspects.clear(); // every suspect was answered
            }
            while self.may_send() {
                let Some(job) = self.retry.pop_front() else {
                    break;
                };
                self.start(job);
            }
            tokio::select! {
                biased;
                _ = self.cancel.cancelled(), if accepting => {
                    accepting = false;
                    self.rx.close();
                    while let Ok(job) = self.rx.try_recv() {
                        self.finish(job, Err(PublishError::Closed));
                    }
                }
                Some(out) = self.in_flight.next(), if !self.in_flight.is_empty() => self.on_outputs(out),
                res = poll_opt(&mut self.connecting) => {
                    self.connecting = None;
                    self.on_channel(res);
                }
                job = self.rx.recv(), if accepting => match job {
                    Some(job) => {
                        self.start(job);
                        // Take what else is queued in one go (bounded by the window).
                        for _ in 0..RECV_BATCH {
                            match self.rx.try_recv() {
                                Ok(job) => self.start(job),
                                Err(_) => break,
                            }
                        }
                    }
                    None => accepting = false,
                },
                _ = tick.tick() => self.expire(),
            }
        }
        if let Some(ch) = self.channel.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), ch.close(200, "bye".into())).await;
        }
        debug!("publisher engine stopped");
    }

    /// Follows the broker's `connection.blocked` state (checked on every
    /// wake-up, at least every [`TICK`]).
    fn note_blocked(&mut self) {
        let now = self.broker.blocked();
        if now.is_some() != self.blocked.is_some() {
            match &now {
                Some(reason) => {
                    warn!(reason = %reason, "the broker blocks publishing; holding messages back until it unblocks or they time out")
                }
                None => info!("the broker unblocked publishing; sending held messages"),
            }
        }
        self.blocked = now;
    }

    /// Whether a message can go out now: a channel that has not failed, a
    /// broker that reads, and, while suspects are sent one at a time, nothing
    /// else in flight.
    fn may_send(&self) -> bool {
        self.channel.is_some()
            && self.closing.is_none()
            && self.blocked.is_none()
            && (self.suspects.is_empty() || self.outstanding == 0)
    }

    fn maybe_connect(&mut self) {
        if self.channel.is_some() || self.connecting.is_some() || self.retry.is_empty() {
            return;
        }
        if self.connect_after.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let broker = self.broker.clone();
        let timeout = self.config.channel_timeout;
        self.connecting = Some(Box::pin(open_channel(broker, timeout)));
    }

    fn on_channel(&mut self, res: Result<(Channel, u64), PublishError>) {
        match res {
            Ok((ch, generation)) => {
                if generation != self.generation {
                    self.metrics.reconnected();
                    info!(generation, "publisher reconnected to the broker");
                }
                self.generation = generation;
                self.epoch += 1;
                self.outstanding = 0;
                self.closing = None;
                self.channel = Some(ch);
                self.connect_after = None;
                self.backoff = Box::new(backoff(&self.config));
                self.returned.clear();
                self.undecided.clear();
            }
            Err(e) => {
                let delay = self
                    .backoff
                    .next()
                    .unwrap_or(self.config.reconnect_max_delay)
                    .min(PublisherConfig::MAX_DURATION);
                warn!(error = %e, retry_in = ?delay, "publisher cannot get a channel; retrying");
                self.last_error = Some(e.to_string());
                self.connect_after = Some(Instant::now() + delay);
                if !e.is_transient() {
                    // A wrong password will not fix itself: fail what waits.
                    let text = e.to_string();
                    for job in std::mem::take(&mut self.retry) {
                        self.finish(job, Err(PublishError::Channel(text.clone())));
                    }
                }
            }
        }
    }

    /// Hands a message to the channel (or parks it until there is one).
    fn start(&mut self, mut job: Job) {
        if job.reply.is_none() {
            // Answered already (timed out): drop it and free its slot.
            self.suspects.remove(&job.order);
            return;
        }
        if job.order == u64::MAX {
            job.order = self.next_order;
            self.next_order += 1;
        }
        if self.blocked.is_some() {
            // The broker would not read it: hold it back (it keeps its
            // window slot, so callers feel the back-pressure) until the
            // broker unblocks or its deadline passes.
            self.retry.push_back(job);
            return;
        }
        if self.closing.is_some() || !(self.suspects.is_empty() || self.outstanding == 0) {
            // The channel is failing, or a suspect is on its own in flight.
            self.retry.push_back(job);
            return;
        }
        let ch = match &self.channel {
            Some(ch) if ch.status().connected() => ch.clone(),
            Some(_) if self.outstanding > 0 => {
                // Closing: the broker's reason reaches the pending confirms.
                self.retry.push_back(job);
                self.closing = Some((None, Instant::now()));
                return;
            }
            _ => {
                self.retry.push_back(job);
                self.channel_failed(None);
                return;
            }
        };
        let route = self
            .routes
            .hash_one((&job.message_id, &job.exchange, &job.routing_key));
        job.route = route;
        if self
            .sending
            .get(&route)
            .is_some_and(|k| self.jobs.contains_key(k))
        {
            // Another message of this route is in flight: a return could
            // not be told apart from its.
            self.held.push_back(job);
            return;
        }
        let key = self.next_key;
        self.next_key += 1;
        self.sending.insert(route, key);
        let epoch = self.epoch;
        job.epoch = epoch;
        job.attempts += 1;
        let exchange = job.exchange.as_str().into();
        let routing_key = job.routing_key.as_str().into();
        let body = job.body.clone();
        let properties = job.properties.clone();
        // The future is first polled by this task, in push order: lapin
        // numbers confirms in the order frames are queued.
        self.in_flight.push(Box::pin(async move {
            let opts = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            let res = match ch
                .basic_publish(exchange, routing_key, opts, &body, properties)
                .await
            {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            (key, epoch, res)
        }));
        self.outstanding += 1;
        self.jobs.insert(key, job);
    }

    fn on_outputs(&mut self, first: Output) {
        // Drain every confirm that is ready now (see the module docs). A
        // single `None` can be FuturesUnordered yielding to the scheduler,
        // so stop after two in a row.
        let mut batch = vec![first];
        let mut idle = 0;
        while idle < 2 {
            match self.in_flight.next().now_or_never() {
                Some(Some(out)) => {
                    batch.push(out);
                    idle = 0;
                }
                Some(None) => break,
                None => idle += 1,
            }
        }
        self.round += 1;
        let round = self.round;

        // 1. Harvest every returned message of the current channel.
        let mut queue_was_empty = false;
        for (_, epoch, res) in &batch {
            if *epoch != self.epoch {
                continue;
            }
            self.outstanding = self.outstanding.saturating_sub(1);
            match res {
                Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) => {
                    let entry = self
                        .returned
                        .entry(return_key(r))
                        .or_insert((0, 0, String::new()));
                    entry.0 += 1;
                    entry.1 = r.reply_code;
                    entry.2 = r.reply_text.to_string();
                }
                Ok(Confirmation::Ack(None) | Confirmation::Nack(None)) => queue_was_empty = true,
                _ => {}
            }
        }

        // 2. Decide what can be decided; remember channel errors.
        let mut failure = None;
        for (key, epoch, res) in batch {
            let Some(job) = self.jobs.get(&key) else {
                continue; // abandoned with its channel, or already decided
            };
            if job.epoch != epoch {
                continue;
            }
            match res {
                Ok(Confirmation::Ack(r)) => {
                    let own = r.as_ref().is_some_and(|r| is_return_of(r, job));
                    if own || r.is_none() {
                        self.decide(key);
                    } else {
                        self.undecided.push((key, round));
                        // Settled now if its own return was already seen.
                        if self.returned.get(&job_key(job)).is_some_and(|e| e.0 > 0) {
                            self.undecided.pop();
                            self.decide(key);
                        }
                    }
                }
                Ok(Confirmation::Nack(_)) => {
                    if let Some(job) = self.take_job(key) {
                        let err = PublishError::Nacked {
                            exchange: job.exchange.clone(),
                            routing_key: job.routing_key.clone(),
                        };
                        self.finish(job, Err(err));
                    }
                }
                Ok(Confirmation::NotRequested) => {
                    if let Some(job) = self.take_job(key) {
                        let err = PublishError::Channel("confirms are not enabled".into());
                        self.finish(job, Err(err));
                    }
                }
                Err(e) => {
                    // The broker's own words win over a local "closed".
                    let better = match &failure {
                        None => true,
                        Some(f) => !is_protocol(f) && is_protocol(&e),
                    };
                    if better && epoch == self.epoch {
                        failure = Some(e);
                    }
                }
            }
        }

        // 3. Settle those that waited for an empty return queue.
        let failing = failure.is_some() || self.closing.is_some();
        if !self.undecided.is_empty() {
            let all = self.in_flight.is_empty() || failing;
            let ready: Vec<u64> = self
                .undecided
                .iter()
                .filter(|(_, r)| all || (queue_was_empty && *r < round))
                .map(|(k, _)| *k)
                .collect();
            if !failing {
                self.undecided
                    .retain(|(_, r)| !(all || (queue_was_empty && *r < round)));
                for key in ready {
                    self.decide(key);
                }
            }
        }
        if self.in_flight.is_empty() && self.undecided.is_empty() {
            self.returned.clear();
        }

        // 4. A failed channel: tear it down once the broker's reason is known
        // or nothing else can bring it.
        if let Some(e) = failure {
            match &mut self.closing {
                Some((first @ None, _)) => *first = Some(e),
                Some((Some(first), _)) if !is_protocol(first) && is_protocol(&e) => *first = e,
                Some(_) => {}
                None => self.closing = Some((Some(e), Instant::now())),
            }
        }
        let known = matches!(&self.closing, Some((Some(e), _)) if is_protocol(e));
        if self.closing.is_some() && (known || self.outstanding == 0) {
            let e = self.closing.take().and_then(|(e, _)| e);
            self.channel_failed(e);
        }
    }

    /// Confirmed, or returned if a return with its id was seen.
    fn decide(&mut self, key: u64) {
        let Some(job) = self.take_job(key) else {
            return;
        };
        let found = if self.returned.is_empty() {
            None
        } else {
            self.returned.get_mut(&job_key(&job))
        };
        let returned = match found {
            Some(entry) if entry.0 > 0 => {
                entry.0 -= 1;
                Some((entry.1, entry.2.clone()))
            }
            _ => None,
        };
        match returned {
            Some((reply_code, reply_text)) => {
                let err = PublishError::Unroutable {
                    exchange: job.exchange.clone(),
                    routing_key: job.routing_key.clone(),
                    reply_code,
                    reply_text,
                };
                self.finish(job, Err(err));
            }
            None => {
                let ok = Confirmed {
                    message_id: job.message_id.clone(),
                    attempts: job.attempts,
                    elapsed: job.started.elapsed(),
                };
                self.finish(job, Ok(ok));
            }
        }
    }

    /// The channel died: attribute the error to the messages that caused it,
    /// park the others for the next channel (at-least-once). See the module
    /// docs for how the culprit is found.
    fn channel_failed(&mut self, e: Option<lapin::Error>) {
        self.closing = None;
        let Some(_dead) = self.channel.take() else {
            return;
        };
        let (code, text) = match &e {
            Some(e) => match e.kind() {
                ErrorKind::ProtocolError(amqp) => {
                    (amqp.get_id(), one_line(amqp.get_message().as_str()))
                }
                _ => (0, one_line(&e.to_string())),
            },
            None => (0, "the channel is closed".to_owned()),
        };
        self.last_error = Some(text.clone());
        let soft = e.as_ref().is_some_and(|e| e.is_amqp_soft_error());
        let mut dead: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.epoch == self.epoch)
            .map(|(k, _)| *k)
            .collect();
        dead.sort_unstable();
        // Acked with someone else's return: stored, so not the culprit.
        let acked: HashSet<u64> = self.undecided.iter().map(|(k, _)| *k).collect();
        let unconfirmed = dead.iter().filter(|k| !acked.contains(k)).count();
        let mut blamed = 0;
        let mut parked = Vec::new();
        for key in dead {
            let Some(job) = self.take_job(key) else {
                continue;
            };
            let named = soft && text.contains(&format!("'{}'", broker_name(&job.exchange)));
            let err = if soft && refused_for(code, &text, &job) {
                Some(self.message_refused(&job, code, &text))
            } else if named && code == 404 {
                Some(PublishError::ExchangeNotFound {
                    exchange: job.exchange.clone(),
                    reason: text.clone(),
                })
            } else if named {
                Some(PublishError::Refused {
                    exchange: job.exchange.clone(),
                    reason: text.clone(),
                })
            } else if soft && unconfirmed == 1 && !acked.contains(&key) {
                // Alone in flight: nothing else can have closed the channel.
                Some(self.message_refused(&job, code, &text))
            } else {
                None
            };
            if let Some(err) = err {
                blamed += 1;
                self.finish(job, Err(err));
            } else if job.attempts >= MAX_ATTEMPTS {
                let err = PublishError::Refused {
                    exchange: job.exchange.clone(),
                    reason: text.clone(),
                };
                self.finish(job, Err(err));
            } else if job.reply.is_some() {
                parked.push(job);
            } else {
                self.suspects.remove(&job.order);
            }
        }
        if blamed > 0 {
            // Found: whatever the others were suspected of, it was this.
            self.suspects.clear();
        } else if soft && !parked.is_empty() {
            self.suspects.extend(parked.iter().map(|j| j.order));
            warn!(
                error = %text,
                code,
                suspects = parked.len(),
                "the broker closed the publishing channel without saying which message it refused; sending the unconfirmed messages one at a time to find it"
            );
        }
        if parked.is_empty() {
            // Whatever it refused, its caller gets the error.
            debug!(
                error = %text,
                code,
                refused = blamed,
                "publishing channel closed; no other message was waiting for a confirm"
            );
        } else {
            warn!(
                error = %text,
                code,
                refused = blamed,
                republishing = parked.len(),
                "publishing channel closed; the unconfirmed messages go again on a new channel"
            );
        }
        self.abandon_epoch();
        parked.extend(self.retry.drain(..));
        parked.sort_by_key(|j| j.order);
        self.retry.extend(parked);
    }

    fn message_refused(&self, job: &Job, code: u16, text: &str) -> PublishError {
        PublishError::MessageRefused {
            exchange: job.exchange.clone(),
            routing_key: job.routing_key.clone(),
            message_id: job.message_id.clone(),
            reply_code: code,
            reason: text.to_owned(),
        }
    }

    /// Removes a sent message from the books, freeing its route.
    fn take_job(&mut self, key: u64) -> Option<Job> {
        let job = self.jobs.remove(&key)?;
        if self.sending.get(&job.route) == Some(&key) {
            self.sending.remove(&job.route);
        }
        Some(job)
    }

    /// Moves held messages whose route is free back to the send queue, in
    /// their original order.
    fn release_held(&mut self) {
        let mut released = false;
        for job in std::mem::take(&mut self.held) {
            let busy = self
                .sending
                .get(&job.route)
                .is_some_and(|k| self.jobs.contains_key(k));
            if busy {
                self.held.push_back(job);
            } else {
                self.retry.push_back(job);
                released = true;
            }
        }
        if released {
            self.retry.make_contiguous().sort_by_key(|j| j.order);
        }
    }

    fn abandon_epoch(&mut self) {
        self.returned.clear();
        self.undecided.clear();
        // Keys of the dead channel may still yield; bump the epoch so that
        // they are ignored even before a new channel exists.
        self.epoch += 1;
        self.outstanding = 0;
    }

    fn expire(&mut self) {
        let now = Instant::now();
        if self
            .closing
            .as_ref()
            .is_some_and(|(_, since)| now.duration_since(*since) >= CLOSE_GRACE)
        {
            let e = self.closing.take().and_then(|(e, _)| e);
            self.channel_failed(e);
        }
        let mut expired = Vec::new();
        for job in self.jobs.values_mut() {
            if job.deadline <= now {
                if let Some(reply) = job.reply.take() {
                    expired.push((reply, job.exchange.clone(), job.started, job.span.clone()));
                }
            }
        }
        for (reply, exchange, started, span) in expired {
            span.in_scope(|| debug!("no confirm before the deadline"));
            self.metrics.count(&exchange, crate::metrics::FAILED);
            let _ = reply.send(Err(PublishError::Timeout {
                exchange,
                waited: started.elapsed(),
                stage: Stage::Confirm,
                last_error: self.last_error.clone(),
            }));
        }
        let (mut late, keep): (Vec<Job>, Vec<Job>) =
            self.retry.drain(..).partition(|j| j.deadline <= now);
        self.retry.extend(keep);
        if !self.held.is_empty() {
            let (held_late, keep): (Vec<Job>, Vec<Job>) =
                self.held.drain(..).partition(|j| j.deadline <= now);
            self.held.extend(keep);
            late.extend(held_late);
        }
        for job in late {
            let (stage, last_error) = match &self.blocked {
                Some(reason) => (
                    Stage::Blocked,
                    Some(format!("connection.blocked: {reason}")),
                ),
                None => (Stage::Reconnect, self.last_error.clone()),
            };
            let err = PublishError::Timeout {
                exchange: job.exchange.clone(),
                waited: job.started.elapsed(),
                stage,
                last_error,
            };
            self.finish(job, Err(err));
        }
    }

    /// Answers the caller (if still waiting), counts, logs, frees the slot.
    fn finish(&mut self, mut job: Job, result: Result<Confirmed, PublishError>) {
        self.suspects.remove(&job.order);
        let Some(reply) = job.reply.take() else {
            return;
        };
        let _enter = job.span.enter();
        match &result {
            Ok(_) => {
                self.metrics.count(&job.exchange, CONFIRMED);
                self.metrics
                    .observe_confirm(job.started.elapsed().as_secs_f64());
                debug!(attempts = job.attempts, "confirmed");
            }
            Err(e) => {
                self.metrics.count(&job.exchange, e.outcome());
                if matches!(
                    e,
                    PublishError::Unroutable { .. } | PublishError::Nacked { .. }
                ) {
                    self.metrics
                        .observe_confirm(job.started.elapsed().as_secs_f64());
                }
                debug!(error = %e, "not confirmed");
            }
        }
        let _ = reply.send(result);
        drop(job.permit);
    }
}

/// The key a returned message is counted under.
fn return_key(r: &lapin::message::BasicReturnMessage) -> ReturnKey {
    let d = &r.delivery;
    let id = d.properties.message_id().as_ref().map(|s| s.to_string());
    (
        id.unwrap_or_default(),
        d.exchange.to_string(),
        d.routing_key.to_string(),
    )
}

/// The key a message's return would be counted under.
fn job_key(job: &Job) -> ReturnKey {
    (
        job.message_id.clone(),
        job.exchange.clone(),
        job.routing_key.clone(),
    )
}

/// Whether a returned message is this message (same `message_id`, exchange
/// and routing key: at most one such message is in flight).
fn is_return_of(r: &lapin::message::BasicReturnMessage, job: &Job) -> bool {
    let d = &r.delivery;
    d.properties.message_id().as_ref().map(|s| s.as_str()) == Some(job.message_id.as_str())
        && d.exchange.as_str() == job.exchange
        && d.routing_key.as_str() == job.routing_key
}

/// The exchange's name as RabbitMQ writes it in its errors: the default
/// exchange ("") is 'amq.default' there.
fn broker_name(exchange: &str) -> &str {
    if exchange.is_empty() {
        "amq.default"
    } else {
        exchange
    }
}

/// The broker's words on one line: Erlang prints a large term over several,
/// each indented, and errors end up in logs and tables.
fn one_line(text: &str) -> String {
    let mut lines = text.lines();
    let mut out = lines.next().unwrap_or_default().to_owned();
    for line in lines {
        out.push(' ');
        out.push_str(line.trim_start());
    }
    out
}

/// Whether the error is the broker's own (a `channel.close` or
/// `connection.close` with its reply code and text).
fn is_protocol(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(_))
}

/// Whether the broker's reason for closing the channel (`code`, `text`)
/// names a property of this message that it refuses whenever it is sent.
/// RabbitMQ's words (3.x and 4.x):
///
/// - `PRECONDITION_FAILED - user_id property set to 'X' but authenticated user was 'Y'`
/// - `PRECONDITION_FAILED - message size N is larger than [configured ]max size M`
/// - `PRECONDITION_FAILED - invalid expiration 'X': REASON`
///
/// The broker cuts its text at 255 bytes; a text that does not parse names
/// nobody (the engine then finds the message by sending one at a time).
fn refused_for(code: u16, text: &str, job: &Job) -> bool {
    if code != 406 {
        return false;
    }
    let props = &job.properties;
    if let Some(rest) = text.split_once("user_id property set to '").map(|(_, r)| r) {
        let Some((claimed, _)) = rest.rsplit_once("' but authenticated user was '") else {
            return false;
        };
        return props
            .user_id()
            .as_ref()
            .is_some_and(|u| u.as_str() == claimed);
    }
    if let Some((_, rest)) = text.split_once("message size ") {
        let max = rest
            .split_once("max size ")
            .and_then(|(_, m)| m.trim().parse::<usize>().ok());
        return max.is_some_and(|max| job.body.len() > max);
    }
    if let Some((_, rest)) = text.split_once("invalid expiration '") {
        return props
            .expiration()
            .as_ref()
            .is_some_and(|x| rest.starts_with(&format!("{}': ", x.as_str())));
    }
    false
}

async fn poll_opt<T>(fut: &mut Option<BoxFut<T>>) -> T {
    match fut {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn backoff(config: &PublisherConfig) -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(config.reconnect_min_delay)
        .with_max_delay(config.reconnect_max_delay)
        .with_jitter()
        .without_max_times()
        .build()
}

/// A channel in confirm mode, reconnecting through the broker if needed.
pub(crate) async fn open_channel(
    broker: Arc<Broker>,
    timeout: Duration,
) -> Result<(Channel, u64), PublishError> {
    let work = async {
        let (ch, generation) = broker.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| PublishError::Channel(format!("confirm.select failed: {e}")))?;
        Ok((ch, generation))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(res) => res,
        Err(_) => Err(PublishError::Channel(format!(
            "no channel within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(body: usize, user_id: Option<&str>, expiration: Option<&str>) -> Job {
        let mut properties = BasicProperties::default();
        if let Some(u) = user_id {
            properties = properties.with_user_id(u.into());
        }
        if let Some(x) = expiration {
            properties = properties.with_expiration(x.into());
        }
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap_or_else(|_| unreachable!("a fresh semaphore has a permit"));
        Job {
            exchange: "orders".into(),
            routing_key: "k".into(),
            body: Arc::new(vec![b'x'; body]),
            properties,
            message_id: "m".into(),
            started: Instant::now(),
            deadline: Instant::now(),
            reply: None,
            span: Span::none(),
            attempts: 1,
            order: 0,
            epoch: 0,
            route: 0,
            permit,
        }
    }

    #[test]
    fn the_brokers_words_are_put_on_one_line() {
        assert_eq!(
            one_line("PRECONDITION_FAILED - invalid expiration '9': {value_too_large,\n      9}"),
            "PRECONDITION_FAILED - invalid expiration '9': {value_too_large, 9}"
        );
        assert_eq!(one_line("  as is  "), "  as is  ");
        assert_eq!(broker_name(""), "amq.default");
        assert_eq!(broker_name("orders"), "orders");
    }

    #[tokio::test]
    async fn the_brokers_words_name_the_refused_messages() {
        let user = "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'";
        assert!(refused_for(406, user, &job(1, Some("mallory"), None)));
        assert!(!refused_for(406, user, &job(1, Some("guest"), None)));
        assert!(!refused_for(406, user, &job(1, None, None)));
        assert!(!refused_for(403, user, &job(1, Some("mallory"), None)));
        // Cut at 255 bytes by the broker: names nobody.
        let cut = "PRECONDITION_FAILED - user_id property set to 'mallorymallory...";
        assert!(!refused_for(
            406,
            cut,
            &job(1, Some("mallorymallory"), None)
        ));

        let size =
            "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000";
        assert!(refused_for(406, size, &job(2000, None, None)));
        assert!(refused_for(406, size, &job(1001, None, None)));
        assert!(!refused_for(406, size, &job(1000, None, None)));
        let size = "PRECONDITION_FAILED - message size 134217729 is larger than max size 134217728";
        assert!(refused_for(406, size, &job(134_217_729, None, None)));
        assert!(!refused_for(406, size, &job(10, None, None)));

        let exp = "PRECONDITION_FAILED - invalid expiration '-5': {value_negative,-5}";
        assert!(refused_for(406, exp, &job(1, None, Some("-5"))));
        assert!(!refused_for(406, exp, &job(1, None, Some("5"))));
        assert!(!refused_for(406, exp, &job(1, None, None)));

        let other = "PRECONDITION_FAILED - something else";
        assert!(!refused_for(
            406,
            other,
            &job(1, Some("mallory"), Some("-5"))
        ));
    }
}
