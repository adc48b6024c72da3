//! warren-operator: the dead-letter queues are the operator's inbox.
//!
//! Read them without consuming (`stats`, `list`, `show`), put dead letters
//! back to work (`replay`), delete them (`purge`), move them between
//! brokers or keep them (`export`, `import`), and watch them (`watch`).
//! They take a `lapin::Connection` (from [`warren_topology::connect`];
//! `watch` takes the connect options and reconnects itself), and `replay`
//! and `watch` a [`Metrics`] too; none reads the environment, installs a
//! signal handler or serves HTTP: the `warren dlq` command does that.
//!
//! ```no_run
//! # async fn inbox() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use warren_operator::{stats, ReadOptions};
//! use warren_topology::{close, connect, AmqpUrl, ConnectOptions};
//!
//! let url: AmqpUrl = "amqp://guest:guest@127.0.0.1:5672/%2f".parse()?;
//! let conn = connect(&ConnectOptions::new(url, "operator")).await?;
//! let billing = stats(&conn, "billing", &ReadOptions::default()).await?; // reads billing.dead, consumes nothing
//! println!("{} dead letters, by kind {:?}", billing.count, billing.by_kind);
//! close(&conn, "done").await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - `reader`: reading a queue without consuming it: [`ReadOptions`],
//!   [`Coverage`], [`count`], [`Reading`] (what a read cut short was
//!   for). The order-keeping requeue lives here.
//! - `message`: [`DeadLetter`] and [`Info`]: what a dead letter's headers
//!   (or the broker's `x-death`) say.
//! - `fingerprint`: failure groups: [`fingerprint`], [`normalize`].
//! - `select`: [`Selection`]: which dead letters a replay or purge takes.
//! - `inspect`: [`stats`], [`list`], [`show`].
//! - `replay`: [`replay`] with [`ReplayOptions`], [`Target`].
//! - `purge`: [`prepare_purge`] → [`PendingPurge::commit`] or `abort`.
//! - `transfer`: the export format ([`ExportedMessage`]), [`export`],
//!   [`read_export`], [`read_export_from`] (an [`ExportFile`]: messages
//!   and their lines), [`import`] ([`ImportReport`]: the lines imported
//!   and not), [`ExportWriter`] (to a file or standard output).
//! - `watch`: [`watch`], its [`WatchEvent`]s: [`NewDeadLetter`], [`Alert`].
//! - `audit`: [`AuditRecord`].
//! - `publish`: the confirm-mode publisher replay and import share.
//! - `value`: AMQP values as typed JSON and as plain JSON.
//! - `metrics`: [`Metrics`].
//! - `error`: [`OperatorError`]; a run that stops partway after moving
//!   messages says what it moved (a [`ReplayReport`] with its `error`,
//!   [`OperatorError::ImportIncomplete`], [`OperatorError::PurgeIncomplete`],
//!   [`OperatorError::ExportIncomplete`]), and a read the broker cut short
//!   ([`OperatorError::ReadCut`]) what the command had done with it.

mod audit;
mod error;
mod fingerprint;
mod inspect;
mod message;
mod metrics;
mod publish;
mod purge;
mod reader;
mod replay;
mod select;
mod transfer;
mod value;
mod watch;

pub use audit::AuditRecord;
pub use error::OperatorError;
pub use fingerprint::{fingerprint, normalize};
pub use inspect::{list, show, stats, stats_of, FailureGroup, GroupStats, Listing, Summary};
pub use message::{DeadLetter, Info};
pub use metrics::Metrics;
pub use publish::DEFAULT_WINDOW;
pub use purge::{prepare_purge, PendingPurge, PurgeReport};
pub use reader::{
    count, Coverage, ReadOptions, Reading, DEFAULT_IDLE_TIMEOUT, DEFAULT_RPC_TIMEOUT,
    DEFAULT_SCAN_LIMIT, MAX_SCAN_LIMIT,
};
/// The regular expressions `Selection::error` takes.
pub use regex::Regex;
pub use replay::{replay, replay_properties, Progress, ReplayOptions, ReplayReport, Target};
pub use select::Selection;
pub use transfer::{
    export, import, read_export, read_export_from, ExportFile, ExportReport, ExportWriter,
    ExportedMessage, ExportedProperties, ImportFailure, ImportReport, Lines, MAX_IMPORT_FAILURES,
};
pub use value::{table_to_plain, table_to_typed, typed_to_table, value_to_plain};
pub use watch::{
    watch, Alert, NewDeadLetter, WatchEvent, WatchOptions, DEFAULT_INTERVAL, DEFAULT_READ_LIMIT,
};
