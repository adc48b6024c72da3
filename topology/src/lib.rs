//! warren-topology: the broker side of warren.
//!
//! The topology file model and its validation, the names every object derives
//! (DESIGN.md's table), the header names of the message contract, connecting
//! to the broker (with backoff, and a URL that never shows its password), and
//! declaring or verifying a topology.
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
