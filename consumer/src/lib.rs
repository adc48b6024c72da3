//! warren-consumer: consumer groups with manual acks, retry tiers,
//! dead-lettering, reconnect and graceful shutdown.
//!
//! A [`ConsumerGroup`] consumes a group's work queue (from the topology file)
//! and runs a [`Handler`] per delivery. The handler's [`HandlerResult`] is
//! mapped in one place to ack, a copy to `{group}.retry.{n}`, or a copy to
//! `warren.dlx`; copies are confirmed before the original is acked.
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
    ConsumerGroup, ConsumerGroupBuilder, DEFAULT_CONFIRM_TIMEOUT, DEFAULT_REQUEUE_DELAY,
    DEFAULT_SHUTDOWN_GRACE,
};
pub use handler::{
    handler_fn, json_handler, BoxHandler, DynHandler, ErrorKind, Handler, HandlerError, HandlerFn,
    HandlerResult, JsonHandler,
};
pub use headers::{one_line_error, MAX_ATTEMPTS};
pub use metrics::Metrics;
