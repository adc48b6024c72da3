//! warren-topology: the broker side of warren.
//!
//! The topology file model and its validation, the names every object derives
//! (DESIGN.md's table), the header names of the message contract, connecting
//! to the broker (with backoff, and a URL that never shows its password), and
//! declaring or verifying a topology.
//!
//! ```no_run
//! # async fn deploy() -> Result<(), warren_topology::TopologyError> {
//! use warren_topology::{apply, close, connect, AmqpUrl, ConnectOptions, Plan, Topology};
//!
//! let topology = Topology::from_file("warren.toml")?; // errors name file, line and field
//! for lint in topology.lints() {
//!     tracing::warn!(%lint, "topology");
//! }
//! let url: AmqpUrl = "amqp://guest:guest@127.0.0.1:5672/%2f".parse()?;
//! let conn = connect(&ConnectOptions::new(url, "deploy")).await?; // retries with backoff
//! let applied = apply(&conn, &Plan::new(&topology)).await?; // declares nothing if an object differs
//! close(&conn, "applied").await;
//! # let _ = applied;
//! # Ok(()) }
//! ```
//!
//! `apply` and `verify` check each object with a passive declare, and the
//! broker closes the channel of each one that is missing: the AMQP client
//! (`lapin`) logs every such close at ERROR, on a first `apply` that
//! succeeds too. warren returns or logs what matters itself; filter the
//! client out as the `warren` binary does
//! (`EnvFilter::new("info,lapin=off,amq_protocol=off")`).
//!
//! # Layout
//!
//! - `config`: [`Topology`], [`Group`], [`Exchange`]: parsing `warren.toml`
//!   with errors that name file, line and field; lints.
//! - `names`: derived queue names, `warren.dlx`, and [`headers`].
//! - `plan`: [`Plan`]: every exchange, queue (with arguments) and binding.
//! - `connect`: [`AmqpUrl`], [`ConnectOptions`], [`connect`], and [`Broker`],
//!   the one supervised connection a process shares.
//! - `declare`: [`apply`] and [`verify`].
//! - `properties`: [`copy_properties`], the properties of a copy published
//!   in a message's place.
//! - `error`: [`TopologyError`] and [`ConfigError`].

mod config;
mod connect;
mod declare;
mod error;
mod names;
mod plan;
mod properties;

pub use config::{
    parse_duration, Exchange, ExchangeKind, Group, Lint, QueueType, Topology,
    BROKER_CONSUMER_TIMEOUT, DEFAULT_CONCURRENCY, DEFAULT_HANDLER_TIMEOUT, DEFAULT_PREFETCH,
    DEFAULT_RETRY, MAX_NAME_BYTES, MAX_TIERS, MIN_HANDLER_TIMEOUT,
};
pub use connect::{
    close, connect, redact, AmqpUrl, Broker, ConnectOptions, DEFAULT_AMQP_URL, DEFAULT_FRAME_MAX,
};
pub use declare::{
    apply, explain_precondition, refused_access, verify, Action, Applied, Check, ObjectState,
    RefusedAccess, Report,
};
pub use error::{ConfigError, TopologyError};
pub use names::{dead_queue, headers, metrics, retry_queue, work_queue, DEAD_LETTER_EXCHANGE};
pub use plan::{
    planned_dead_queue, Arg, Plan, PlannedBinding, PlannedExchange, PlannedQueue, Role,
};
pub use properties::{copy_properties, copy_properties_for};

/// Re-exported so that users of the topology crate name the same client types.
pub use lapin;
