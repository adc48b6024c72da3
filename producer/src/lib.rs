//! warren-producer: publishing with publisher confirms, `mandatory=true`, a
//! bounded window of unconfirmed messages, and reconnects.
//!
//! ```no_run
//! # async fn demo() -> Result<(), warren_producer::PublishError> {
//! use warren_producer::{Message, Publisher, PublisherConfig};
//! use warren_topology::{AmqpUrl, ConnectOptions};
//!
//! let registry = prometheus::Registry::new();
//! let opts = ConnectOptions::new(AmqpUrl::default(), "producer");
//! let publisher = Publisher::connect(PublisherConfig::default(), opts, &registry).await?;
//! publisher
//!     .publish_json("orders", "order.created", &serde_json::json!({"id": 42}))
//!     .await?; // on the broker now
//! let results = publisher
//!     .publish_batch((0..100).map(|i| Message::bytes("orders", "order.paid", format!("{i}"))))
//!     .await; // one result per message
//! # let _ = results;
//! publisher.close().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - `config`: [`PublisherConfig`], the window, timeouts, size limit and
//!   reconnect backoff, with their defaults.
//! - `message`: [`Message`] (raw bytes or JSON, properties, headers) and
//!   [`Confirmed`]; the default properties of the message contract.
//! - `publisher`: [`Publisher`], the handle: `publish`, `publish_json`,
//!   `publish_batch`, `submit` + [`PendingConfirm`], `close`.
//! - `engine`: the task that owns the channel: sends, collects confirms,
//!   matches returned messages, republishes after a channel loss, enforces
//!   deadlines.
//! - `metrics`: [`PublisherMetrics`].
//! - `error`: [`PublishError`] and [`Stage`].

mod config;
mod engine;
mod error;
mod message;
mod metrics;
mod publisher;

pub use config::PublisherConfig;
pub use error::{PublishError, Stage};
pub use message::{Confirmed, Message, BYTES_CONTENT_TYPE, JSON_CONTENT_TYPE, PERSISTENT};
pub use metrics::PublisherMetrics;
pub use publisher::{PendingConfirm, Publisher};
