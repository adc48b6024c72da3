//! Confirmed publishing for replay and import: one confirm-mode channel, a
//! bounded window of publishes awaiting their confirm, a timeout on every
//! await, `mandatory` so that an unroutable message is an error.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection};

use crate::error::{timed, OperatorError};

/// Default most publishes awaiting their confirm.
pub const DEFAULT_WINDOW: usize = 256;

type Pending<T> = Pin<Box<dyn Future<Output = (T, Result<(), OperatorError>)> + Send>>;

/// A confirm-mode channel with a bounded window; `T` travels with each
/// publish and comes back with its outcome (a delivery tag to ack).
pub(crate) struct Confirmed<T> {
    channel: Channel,
    window: usize,
    timeout: Duration,
    pending: FuturesOrdered<Pending<T>>,
}

impl<T: Send + 'static> Confirmed<T> {
    pub(crate) async fn open(
        conn: &Connection,
        window: usize,
        timeout: Duration,
    ) -> Result<Self, OperatorError> {
        let channel = timed(
            timeout,
            "opening a channel",
            "publisher",
            conn.create_channel(),
        )
        .await?;
        timed(
            timeout,
            "enabling publisher confirms",
            "publisher",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(Confirmed {
            channel,
            window: window.max(1),
            timeout,
            pending: FuturesOrdered::new(),
        })
    }

    /// Whether the window is full (take a [`Confirmed::next`] first).
    pub(crate) fn full(&self) -> bool {
        self.pending.len() >= self.window
    }

    /// Publishes awaiting a confirm.
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Sends one message; its outcome comes back from [`Confirmed::next`].
    /// An error here means the channel is unusable.
    pub(crate) async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        token: T,
    ) -> Result<(), OperatorError> {
        let target = format!("{exchange:?}/{routing_key:?}");
        let confirm = timed(
            self.timeout,
            "publishing",
            &target,
            self.channel.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            ),
        )
        .await?;
        let timeout = self.timeout;
        let (exchange, routing_key) = (exchange.to_owned(), routing_key.to_owned());
        self.pending.push_back(Box::pin(async move {
            let outcome = match tokio::time::timeout(timeout, confirm).await {
                Err(_) => Err(OperatorError::Timeout {
                    what: "waiting for a publisher confirm",
                    object: target,
                    after: timeout,
                }),
                Ok(Err(source)) => Err(OperatorError::Amqp {
                    what: "waiting for a publisher confirm",
                    object: target,
                    source,
                }),
                Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                Ok(Ok(Confirmation::Ack(Some(_)))) => Err(OperatorError::Publish {
                    exchange,
                    routing_key,
                    outcome: "returned (no queue is bound for it)".into(),
                }),
                Ok(Ok(Confirmation::Nack(_))) => Err(OperatorError::Publish {
                    exchange,
                    routing_key,
                    outcome: "nacked".into(),
                }),
                Ok(Ok(Confirmation::NotRequested)) => Err(OperatorError::Publish {
                    exchange,
                    routing_key,
                    outcome: "not confirmed (confirms are off)".into(),
                }),
            };
            (token, outcome)
        }));
        Ok(())
    }

    /// The oldest publish's outcome, `None` when nothing is in flight.
    pub(crate) async fn next(&mut self) -> Option<(T, Result<(), OperatorError>)> {
        self.pending.next().await
    }

    /// Closes the channel (after every confirm was taken).
    pub(crate) async fn close(self) {
        let _ = tokio::time::timeout(self.timeout, self.channel.close(200, "done".into())).await;
    }
}
