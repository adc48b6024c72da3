//! [`Publisher`]: the handle callers publish through.

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument};
use warren_topology::{Broker, ConnectOptions};

use crate::config::PublisherConfig;
use crate::engine::{open_channel, Engine, Job};
use crate::error::{PublishError, Stage};
use crate::message::{Confirmed, HeaderProblem, Message};
use crate::metrics::{PublisherMetrics, FAILED};

/// Extra time a caller waits for the engine's answer past its deadline (the
/// engine answers at the deadline itself; this only guards against a bug).
const REPLY_GRACE: Duration = Duration::from_secs(1);

/// Publishes with confirms, `mandatory=true`, a bounded window of
/// unconfirmed messages, and reconnects.
///
/// One task owns the publishing channel; callers hand it messages and wait
/// for the broker's answer. Cloning is cheap and shares the window and the
/// channel, so many tasks can publish through one `Publisher`.
///
/// - [`Publisher::publish`] returns once the broker confirmed the message,
///   or with the reason it did not ([`PublishError`]); many calls may be in
///   flight at once (up to the window).
/// - [`Publisher::publish_batch`] publishes many with the window full and
///   returns one result per message, in order.
///
/// ## Guarantees
///
/// - `Ok` only after a positive confirm for which no `basic.return` was
///   seen: an unroutable message is [`PublishError::Unroutable`], a nack is
///   [`PublishError::Nacked`].
/// - When the channel or the connection dies, messages without a confirm are
///   published again on a new channel (at-least-once: the broker may then
///   hold two copies), until their deadline; then the caller gets
///   [`PublishError::Timeout`].
/// - A message to a missing exchange fails with
///   [`PublishError::ExchangeNotFound`]; the other messages of the channel the
///   broker closed are republished.
/// - A message the broker refuses by closing the channel (a `user_id` other
///   than the connection's user, a body over the broker's
///   `max_message_size`, an invalid `expiration`) fails at once with
///   [`PublishError::MessageRefused`] instead of being sent again; the other
///   unconfirmed messages of that channel are republished. When the broker's
///   words do not say which message it was (its text is cut at 255 bytes),
///   the unconfirmed messages go again one at a time until the refused one
///   is alone when the channel closes.
/// - Checked before anything is sent, failing only that message with
///   nothing sent: a body over `max_message_size` ([`PublishError::TooLarge`]),
///   an exchange name or routing key over 255 bytes, and properties and
///   headers that do not fit in one frame of the connection's `frame_max`
///   or that hold an `AMQPValue::ShortString` ([`PublishError::Invalid`]):
///   AMQP cannot split the one, RabbitMQ cannot read the other, and the
///   broker would close the whole connection, failing or resending every
///   message in flight on it.
/// - A nack ([`PublishError::Nacked`]) means a queue the message was routed
///   to refused it; other queues it was routed to may keep a copy.
/// - Memory is bounded by the window: a caller waits for a slot up to its
///   timeout. When the broker blocks publishers (`connection.blocked`: a
///   memory or disk alarm), the publisher holds new messages back instead of
///   sending them; they keep their slots, the window fills, and callers get
///   [`PublishError::Timeout`] with [`Stage::Blocked`] (held, never sent) or
///   [`Stage::Window`] (no slot). Messages sent before the block wait for
///   their confirm as usual.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: PublisherConfig,
    metrics: PublisherMetrics,
    window: Arc<Semaphore>,
    tx: mpsc::Sender<Job>,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    broker: Arc<Broker>,
    owns_broker: bool,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("config", &self.inner.config)
            .field("broker", &self.inner.broker)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Publisher {
    /// Connects its own [`Broker`] (one connection named
    /// `warren-<component>@<host>`), registers the metrics into `registry`,
    /// and opens a channel in confirm mode. A wrong URL or password fails
    /// here, with the password masked.
    pub async fn connect(
        config: PublisherConfig,
        opts: ConnectOptions,
        registry: &Registry,
    ) -> Result<Self, PublishError> {
        let metrics = PublisherMetrics::register(registry)?;
        let broker = Arc::new(Broker::connect(opts).await?);
        Self::start(config, broker, metrics, true).await
    }

    /// Publishes over a [`Broker`] shared with other components of the
    /// process (a channel of its own on the shared connection). The broker is
    /// not closed by [`Publisher::close`].
    pub async fn with_broker(
        config: PublisherConfig,
        broker: Arc<Broker>,
        registry: &Registry,
    ) -> Result<Self, PublishError> {
        let metrics = PublisherMetrics::register(registry)?;
        Self::start(config, broker, metrics, false).await
    }

    /// Like [`Publisher::with_broker`], with metrics already registered (to
    /// run several publishers against one registry).
    pub async fn with_metrics(
        config: PublisherConfig,
        broker: Arc<Broker>,
        metrics: PublisherMetrics,
    ) -> Result<Self, PublishError> {
        Self::start(config, broker, metrics, false).await
    }

    /// Like [`Publisher::with_metrics`] over a [`Broker`] of its own, which
    /// it connects (lazily, with retries) and closes in
    /// [`Publisher::close`].
    pub async fn owning(
        config: PublisherConfig,
        broker: Broker,
        metrics: PublisherMetrics,
    ) -> Result<Self, PublishError> {
        Self::start(config, Arc::new(broker), metrics, true).await
    }

    async fn start(
        config: PublisherConfig,
        broker: Arc<Broker>,
        metrics: PublisherMetrics,
        owns_broker: bool,
    ) -> Result<Self, PublishError> {
        let config = config.clone().window(config.window);
        let (channel, generation) = open_channel(broker.clone(), config.channel_timeout).await?;
        let (tx, rx) = mpsc::channel(config.window);
        let cancel = CancellationToken::new();
        let engine = Engine::new(
            broker.clone(),
            config.clone(),
            metrics.clone(),
            rx,
            cancel.clone(),
            channel,
            generation,
        );
        let task = tokio::spawn(engine.run());
        Ok(Publisher {
            inner: Arc::new(Inner {
                window: Arc::new(Semaphore::new(config.window)),
                config,
                metrics,
                tx,
                cancel,
                task: Mutex::new(Some(task)),
                broker,
                owns_broker,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PublisherConfig {
        &self.inner.config
    }

    /// The metrics (to build more publishers with [`Publisher::with_metrics`]).
    pub fn metrics(&self) -> &PublisherMetrics {
        &self.inner.metrics
    }

    /// The broker connection it publishes over.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.inner.broker
    }

    /// Messages holding a window slot right now.
    pub fn in_flight(&self) -> usize {
        self.inner.config.window - self.inner.window.available_permits()
    }

    /// Publishes `value` as JSON and waits for the confirm.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        exchange: &str,
        routing_key: &str,
        value: &T,
    ) -> Result<Confirmed, PublishError> {
        let msg = match Message::json(exchange, routing_key, value) {
            Ok(m) => m,
            Err(e) => {
                self.inner.metrics.count(exchange, FAILED);
                return Err(e);
            }
        };
        self.publish(msg).await
    }

    /// Publishes one message and waits for the broker's confirm (or the
    /// reason there was none), within the message's timeout.
    pub async fn publish(&self, msg: Message) -> Result<Confirmed, PublishError> {
        match self.submit(msg).await {
            Ok(pending) => pending.wait().await,
            Err(e) => Err(e),
        }
    }

    /// Publishes every message with up to a window of them in flight and
    /// returns one result per message, in the input's order. Messages are
    /// handed to the broker in the input's order.
    pub async fn publish_batch<I>(&self, messages: I) -> Vec<Result<Confirmed, PublishError>>
    where
        I: IntoIterator<Item = Message>,
    {
        // Submitting in turn keeps the order (waiters woken together by a
        // multiple-ack would otherwise race for the freed slots); the answers
        // wait in their oneshots meanwhile.
        let mut pending = Vec::new();
        for msg in messages {
            pending.push(self.submit(msg).await);
        }
        let mut results = Vec::with_capacity(pending.len());
        for p in pending {
            results.push(match p {
                Ok(p) => p.wait().await,
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Hands one message to the broker without waiting for its confirm:
    /// checks its size, waits for a window slot (up to the message's
    /// timeout) and queues it. Messages submitted one after another from one
    /// task reach the broker in that order. Await
    /// [`PendingConfirm::wait`] for the outcome; [`Publisher::publish`] is
    /// `submit` then `wait`.
    pub async fn submit(&self, mut msg: Message) -> Result<PendingConfirm, PublishError> {
        let started = Instant::now();
        let timeout = msg
            .timeout
            .unwrap_or(self.inner.config.publish_timeout)
            .min(PublisherConfig::MAX_DURATION);
        let deadline = started + timeout;
        let limit = self.inner.config.max_message_size;
        if msg.body.len() > limit {
            self.inner.metrics.count(&msg.exchange, FAILED);
            return Err(PublishError::TooLarge {
                size: msg.body.len(),
                limit,
            });
        }
        for (what, v) in [
            ("exchange name", &msg.exchange),
            ("routing key", &msg.routing_key),
        ] {
            if v.len() > MAX_SHORT_STRING {
                self.inner.metrics.count(&msg.exchange, FAILED);
                return Err(PublishError::Invalid(format!(
                    "the {what} is {} bytes; AMQP allows at most {MAX_SHORT_STRING}",
                    v.len()
                )));
            }
        }
        let message_id = msg.finish_properties();
        let frame_max = self.inner.broker.frame_max();
        if let Some(problem) = msg.header_problem(frame_max) {
            self.inner.metrics.count(&msg.exchange, FAILED);
            return Err(PublishError::Invalid(match problem {
                HeaderProblem::ShortString(name) => format!(
                    "header {name:?} is an AMQP short string, which RabbitMQ cannot read in a header table (it would close the connection); use AMQPValue::LongString for strings"
                ),
                HeaderProblem::TooLarge(size) => format!(
                    "the message's properties and headers are {size} bytes encoded, over the {} bytes that fit in one frame on this connection (frame_max {frame_max}; properties cannot be split across frames, and the broker would close the connection)",
                    crate::message::header_room(frame_max)
                ),
            }));
        }
        let span = info_span!(
            "publish",
            message_id = %message_id,
            exchange = %msg.exchange,
            routing_key = %msg.routing_key
        );
        let exchange = msg.exchange.clone();
        let answer = self
            .send(msg, message_id, started, deadline, span.clone())
            .instrument(span.clone())
            .await?;
        Ok(PendingConfirm {
            answer,
            deadline,
            started,
            exchange,
            span,
        })
    }

    async fn send(
        &self,
        msg: Message,
        message_id: String,
        started: Instant,
        deadline: Instant,
        span: tracing::Span,
    ) -> Result<oneshot::Receiver<Result<Confirmed, PublishError>>, PublishError> {
        let inner = &self.inner;
        let metrics = inner.metrics.clone();
        let exchange = msg.exchange.clone();
        let fail = |e: PublishError| {
            metrics.count(&exchange, FAILED);
            Err(e)
        };
        let permit =
            match tokio::time::timeout_at(deadline, inner.window.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return fail(PublishError::Closed),
                Err(_) => {
                    return fail(PublishError::Timeout {
                        exchange: msg.exchange.clone(),
                        waited: started.elapsed(),
                        stage: Stage::Window,
                        last_error: inner
                            .broker
                            .blocked()
                            .map(|reason| format!("connection.blocked: {reason}")),
                    })
                }
            };
        if inner.cancel.is_cancelled() {
            return fail(PublishError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key,
            body: Arc::new(msg.body),
            properties: msg.properties,
            message_id,
            started,
            deadline,
            reply: Some(reply),
            span,
            attempts: 0,
            order: u64::MAX,
            epoch: 0,
            route: 0,
            permit,
        };
        // The queue holds at most `window` jobs and each holds a slot, so
        // this does not wait in practice; the timeout is a guard.
        match tokio::time::timeout_at(deadline, inner.tx.send(job)).await {
            Ok(Ok(())) => Ok(answer),
            Ok(Err(_)) => fail(PublishError::Closed),
            Err(_) => fail(PublishError::Timeout {
                exchange: msg.exchange,
                waited: started.elapsed(),
                stage: Stage::Window,
                last_error: None,
            }),
        }
    }

    /// Stops accepting messages, waits for those in flight (each up to its
    /// deadline), closes the channel, and the connection if this publisher
    /// opened it. Publishing afterwards fails with [`PublishError::Closed`].
    pub async fn close(&self) {
        self.inner.cancel.cancel();
        let task = self.inner.task.lock().await.take();
        if let Some(task) = task {
            let wait = (self.inner.config.publish_timeout)
                .min(PublisherConfig::MAX_DURATION)
                .saturating_add(REPLY_GRACE * 5);
            let _ = tokio::time::timeout(wait, task).await;
        }
        if self.inner.owns_broker {
            self.inner.broker.close().await;
        }
    }
}

/// A message handed to the broker by [`Publisher::submit`], waiting for its
/// confirm.
#[must_use = "a submitted message's outcome is only known through wait()"]
pub struct PendingConfirm {
    answer: oneshot::Receiver<Result<Confirmed, PublishError>>,
    deadline: Instant,
    started: Instant,
    exchange: String,
    span: tracing::Span,
}

impl std::fmt::Debug for PendingConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingConfirm")
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

impl PendingConfirm {
    /// Waits for the broker's answer: `Ok` once confirmed, else why not
    /// (at the latest at the message's deadline).
    pub async fn wait(self) -> Result<Confirmed, PublishError> {
        let span = self.span.clone();
        async move {
            match tokio::time::timeout_at(self.deadline + REPLY_GRACE, self.answer).await {
                Ok(Ok(result)) => result,
                // The engine stopped without answering: it was closed.
                Ok(Err(_)) => Err(PublishError::Closed),
                Err(_) => Err(PublishError::Timeout {
                    exchange: self.exchange,
                    waited: self.started.elapsed(),
                    stage: Stage::Confirm,
                    last_error: None,
                }),
            }
        }
        .instrument(span)
        .await
    }
}

/// The longest exchange name or routing key AMQP carries (a short string).
const MAX_SHORT_STRING: usize = 255;
