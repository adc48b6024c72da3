//! warren-consumer: consumer groups with manual acks, retry tiers,
//! dead-lettering, reconnect and graceful shutdown.
//!
//! A [`ConsumerGroup`] consumes a group's work queue (from the topology file)
//! and runs a [`Handler`] per delivery. The handler's [`HandlerResult`] is
//! mapped in one place to ack, a copy to `{group}.retry.{n}`, or a copy to
//! `warren.dlx`; copies are confirmed before the original is acked.
//!
//! # Outcomes
//!
//! | the handler | the message | `x-warren-error-kind` |
//! |---|---|---|
//! | returns `Ok(())` | acked | |
//! | returns [`HandlerError::retryable`], panics, or runs past `handler_timeout` | a copy to `{group}.retry.{n}` for failed attempt n while the group has tiers left, then to `warren.dlx` (key `{group}`, so `{group}.dead`) | `retryable`, `panic`, `timeout` |
//! | returns [`HandlerError::permanent`] or [`HandlerError::decode`] ([`Delivery::json`] and [`json_handler`] on a body that does not decode) | a copy to `warren.dlx` at once | `permanent`, `decode` |
//!
//! A copy is published and confirmed, then the delivery acked. It keeps
//! the body, the properties and the headers (`x-death` included), except
//! `expiration`, a quorum queue's `x-delivery-count` and a `user_id` of
//! another user than the consumer's, and sets `x-warren-attempts` (failed
//! attempts, this one included), `x-warren-error`, `x-warren-error-kind`,
//! `x-warren-group`, `x-warren-original-exchange` and
//! `x-warren-original-routing-key` (on the first failure, then kept),
//! `x-warren-first-failed-at` (likewise) and, on a dead letter,
//! `x-warren-dead-lettered-at`. A copy that is not confirmed leaves the
//! delivery held while the copy is published again, then requeued
//! ([`ConsumerGroupBuilder::copy_hold`]); see [`ConsumerGroup`] for the
//! order of things. An
//! `x-warren-attempts` that is not an integer from 0 to [`MAX_ATTEMPTS`]
//! counts as absent (logged at WARN).
//!
//! # One group
//!
//! The example of the README's "Libraries" section, whole (keep the two
//! alike): it runs in an `async fn` whose error type takes every error
//! here (`Box<dyn std::error::Error + Send + Sync>` or `anyhow::Error`:
//! each is `std::error::Error + Send + Sync + 'static`).
//!
//! ```no_run
//! # async fn readme() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::sync::Arc;
//! use tokio_util::sync::CancellationToken;
//! use warren_consumer::{ConsumerGroup, Delivery, HandlerError};
//! use warren_topology::{AmqpUrl, Broker, ConnectOptions, Topology};
//!
//! let url: AmqpUrl = "amqp://guest:guest@127.0.0.1:5672/%2f".parse()?; // prints with the password masked
//! let cancel_token = CancellationToken::new();         // your signal handler cancels it
//! let topology = Topology::from_file("warren.toml")?;
//! let group = topology.group("billing").cloned().expect("a billing group");
//! let handler = warren_consumer::handler_fn(|d: Delivery| async move {
//!     let order: serde_json::Value = d.json()?;          // decode failure: dead-lettered, kind `decode`
//!     if order["amount_cents"].as_i64().is_some_and(|a| a < 0) {
//!         return Err(HandlerError::permanent("negative amount"));   // straight to billing.dead
//!     }
//!     Ok(())                                              // ack
//! });
//! let registry = prometheus::Registry::new();
//! let consumer = ConsumerGroup::builder(group, handler).registry(&registry)?.build()?;
//! let broker = Arc::new(Broker::new(ConnectOptions::new(url, "consumer")));
//! consumer.run(&broker, cancel_token).await?;             // reconnects; drains on cancel
//! broker.close().await;
//! # Ok(()) }
//! ```
//!
//! # Dependencies and logs
//!
//! The types in these signatures come from other crates, at these
//! versions: `prometheus = "0.14"` (`Registry`), `tokio-util = "0.7"`
//! (`CancellationToken`), `tokio = "1"` (with `macros` and
//! `rt-multi-thread` for `#[tokio::main]`); the AMQP client's own types
//! (`AMQPValue`, `FieldTable`) through [`warren_topology::lapin`]. Another
//! major version of one of them is another crate, whose types are not
//! these: the compiler then reports a mismatch between two `Registry` (or
//! `CancellationToken`) types.
//!
//! The AMQP client (`lapin`) logs through `tracing` too, at ERROR for every
//! channel the broker closes, routine ones included (each object that
//! `warren_topology::apply` checks and finds missing; a publish to a
//! missing exchange, which [`warren_producer::Publisher`] answers with an
//! error), and at WARN with the whole message for each one returned as
//! unroutable. warren logs and returns what matters itself: filter them
//! out as the `warren` binary does, with
//! `EnvFilter::new("info,lapin=off,amq_protocol=off")`.
//!
//! # A service with two groups
//!
//! One [`warren_topology::Broker`] (one connection) for both groups, one
//! [`Metrics`] registered once and cloned into each, one
//! `CancellationToken` that the service's own signal handler cancels:
//!
//! ```no_run
//! # async fn service(topology: warren_topology::Topology, url: warren_topology::AmqpUrl) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tokio_util::sync::CancellationToken;
//! use warren_consumer::{handler_fn, json_handler, ConsumerGroup, Delivery, HandlerError, Metrics};
//! use warren_topology::{Broker, ConnectOptions};
//!
//! #[derive(serde::Deserialize)]
//! struct Order {
//!     amount_cents: i64,
//! }
//!
//! let registry = prometheus::Registry::new(); // the service serves it on /metrics
//! let metrics = Metrics::register(&registry)?;
//! let billing = ConsumerGroup::builder(
//!     topology.group("billing").cloned().ok_or("no billing group")?,
//!     json_handler(|order: Order, d: Delivery| async move {
//!         if order.amount_cents < 0 {
//!             return Err(HandlerError::permanent("negative amount")); // billing.dead
//!         }
//!         tracing::info!(attempt = d.attempt(), last_error = ?d.last_error(), "billed");
//!         Ok(())
//!     }),
//! )
//! .metrics(metrics.clone())
//! .shutdown_grace(Duration::from_secs(25))
//! .build()?;
//! let audit = ConsumerGroup::builder(
//!     topology.group("audit").cloned().ok_or("no audit group")?,
//!     handler_fn(|d: Delivery| async move {
//!         if d.body().is_empty() {
//!             return Err(HandlerError::retryable("empty body"));
//!         }
//!         Ok(())
//!     }),
//! )
//! .metrics(metrics)
//! .build()?;
//!
//! let broker = Arc::new(Broker::new(ConnectOptions::new(url, "billing-service")));
//! let cancel = CancellationToken::new();
//! let on_signal = cancel.clone();
//! tokio::spawn(async move {
//!     // SIGTERM under systemd or Kubernetes: tokio::signal::unix.
//!     let _ = tokio::signal::ctrl_c().await;
//!     on_signal.cancel();
//! });
//! // Whichever group stops first (an error) stops the other one too.
//! let (billed, audited) = tokio::join!(
//!     async {
//!         let result = billing.run(&broker, cancel.clone()).await;
//!         cancel.cancel();
//!         result
//!     },
//!     async {
//!         let result = audit.run(&broker, cancel.clone()).await;
//!         cancel.cancel();
//!         result
//!     },
//! );
//! broker.close().await;
//! billed?; // Ok: stopped by the token; Err: what no retry cures
//! audited?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - `handler`: [`Handler`], [`HandlerResult`], [`HandlerError`],
//!   [`ErrorKind`], [`handler_fn`], [`json_handler`], [`BoxHandler`].
//! - `delivery`: [`Delivery`], what a handler sees.
//! - `group`: [`ConsumerGroup`] and its builder: the consuming loop, the
//!   outcome decision, copies, reconnect, shutdown.
//! - `acks`: the ack window (multiple acks of contiguous deliveries).
//! - `headers`: reading `x-warren-attempts` (malformed = absent) and writing
//!   the failure headers of copies.
//! - `metrics`: [`Metrics`].
//! - `error`: [`ConsumerError`].

mod acks;
mod delivery;
mod error;
mod group;
mod handler;
mod headers;
mod metrics;

pub use delivery::Delivery;
pub use error::ConsumerError;
pub use group::{
    ConsumerGroup, ConsumerGroupBuilder, DEFAULT_CONFIRM_TIMEOUT, DEFAULT_COPY_HOLD,
    DEFAULT_REQUEUE_DELAY, DEFAULT_SHUTDOWN_GRACE,
};
pub use handler::{
    handler_fn, json_handler, BoxHandler, DynHandler, ErrorKind, Handler, HandlerError, HandlerFn,
    HandlerResult, JsonHandler,
};
pub use headers::{one_line_error, MAX_ATTEMPTS};
pub use metrics::Metrics;

#[cfg(test)]
mod tests {
    /// The code of a Markdown or rustdoc block: the lines between the
    /// fence that opens with `open` and the next fence, without rustdoc's
    /// `//! ` and the lines it hides (`# `).
    fn block(text: &str, open: &str) -> Vec<String> {
        text.lines()
            .map(|l| match l.strip_prefix("//!") {
                Some(doc) => doc.strip_prefix(' ').unwrap_or(doc),
                None => l,
            })
            .skip_while(|l| *l != open)
            .skip(1)
            .take_while(|l| !l.starts_with("```"))
            .filter(|l| !l.starts_with("# "))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_readme_library_example_is_the_compiled_one() {
        let readme = block(include_str!("../../README.md"), "```rust");
        let doctest = block(include_str!("lib.rs"), "```no_run");
        assert!(doctest.len() > 10, "the doctest was found: {doctest:?}");
        assert_eq!(
            readme, doctest,
            "the README's Libraries example differs from the doctest \"One group\" of \
             consumer/src/lib.rs, which the compiler checks: keep the two alike"
        );
    }
}
