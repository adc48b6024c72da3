//! [`OperatorError`]: what can go wrong while reading, replaying, purging,
//! exporting or importing dead letters.

use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use warren_topology::{dead_queue, MAX_NAME_BYTES};

use crate::reader::Reading;

/// An operator command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorError {
    /// The dead-letter queue does not exist.
    #[error(
        "queue {queue:?} does not exist (run `warren topology apply` first, or check --group)"
    )]
    NoSuchQueue {
        /// The queue.
        queue: String,
    },
    /// The dead-letter queue exists with other arguments than warren
    /// declares (a quorum queue, a TTL, ...): reading it could count
    /// deliveries against a limit or let messages expire.
    #[error("queue {queue:?} is not the classic dead-letter queue warren declares ({detail}); reading it could burn a delivery limit or expire messages: check it with `warren topology verify`")]
    NotADeadQueue {
        /// The queue.
        queue: String,
        /// What differs, as the broker says.
        detail: String,
    },
    /// A scan's read ended before it read the messages it counted: the
    /// broker cancelled its consumer (the queue was deleted, ...) or its
    /// channel or connection closed. Nothing was removed from the queue
    /// beyond what the command reports (a replay's report, an
    /// [`OperatorError::ExportIncomplete`]'s); `reading` says what the
    /// command had done with what it read (see [`Reading`]).
    #[error("{}", crate::reader::cut_text(queue, *read, *expected, *channel_closed, *queue_deleted, *reading))]
    ReadCut {
        /// The queue.
        queue: String,
        /// Messages read before the end.
        read: usize,
        /// Messages the scan was to read (the queue's count, at most the
        /// scan limit).
        expected: usize,
        /// Whether the scan's channel (or the connection) was closed;
        /// otherwise the broker cancelled the consumer.
        channel_closed: bool,
        /// Whether the queue is gone, when that was checked (`None`: not
        /// known).
        queue_deleted: Option<bool>,
        /// What the read was for.
        reading: Reading,
    },
    /// A group whose dead-letter queue name would be longer than AMQP's
    /// limit ([`warren_topology::MAX_NAME_BYTES`] bytes): no such queue can
    /// exist, and nothing is sent to the broker about it.
    #[error("{}; check the group name", name_too_long(group))]
    NameTooLong {
        /// The group.
        group: String,
    },
    /// Checking that an exchange exists (a passive declare) got another
    /// answer than "not found": a refusal, a closed channel or connection.
    /// It cannot be told whether the exchange exists, so nothing more is
    /// sent.
    #[error("checking that exchange {exchange:?} exists failed: {source}; the replay stops (what it replayed before is reported; the rest stay in the dead-letter queue): fix what the broker says, then replay again")]
    ExchangeCheck {
        /// The exchange.
        exchange: String,
        /// lapin's error: the broker's reply, or what happened to the
        /// channel or connection.
        #[source]
        source: lapin::Error,
    },
    /// An AMQP operation failed.
    #[error("{what} on {object:?}: {source}")]
    Amqp {
        /// What was being done.
        what: &'static str,
        /// The queue or exchange concerned.
        object: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker did not answer in time.
    #[error("{what} on {object:?}: no answer from the broker within {}", humantime::format_duration(*.after))]
    Timeout {
        /// What was being done.
        what: &'static str,
        /// The queue or exchange concerned.
        object: String,
        /// How long it waited.
        after: Duration,
    },
    /// The broker refused (nacked) or returned a publish.
    #[error("publish to exchange {exchange:?} with routing key {routing_key:?} was {outcome} by the broker")]
    Publish {
        /// Target exchange ("" is the default exchange).
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// `nacked` or `returned (no queue bound)`.
        outcome: String,
    },
    /// A selection that cannot be used.
    #[error("bad selection: {0}")]
    Selection(String),
    /// A line of an export file is not valid.
    #[error("{file}:{line}: {reason}")]
    Import {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Dead letters would be deleted on the strength of a copy written to
    /// standard output ([`crate::ExportWriter::stdout`]), which cannot be
    /// known to be stored: a purge's archive, an export that removes.
    #[error("{what} cannot go to standard output: dead letters are deleted only once their copy is on disk, and nothing tells whether what is written to standard output was stored; write it to a file")]
    CopyNotStored {
        /// What was to be written there.
        what: &'static str,
    },
    /// The file an export or a purge's archive is to be written to already
    /// exists: it is never overwritten (it may hold the only copy of
    /// messages deleted before).
    #[error("{file} already exists, and warren never overwrites a file: name a new one, or move this one away first")]
    FileExists {
        /// The file.
        file: String,
    },
    /// Reading or writing a file failed.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An import stopped partway: the broker confirmed some messages (they
    /// are in their queues) and not the others. The report says which
    /// lines are which, and how many to skip to import the rest.
    #[error("{}", crate::transfer::import_incomplete(report, source))]
    ImportIncomplete {
        /// What was imported and what was not.
        report: Box<crate::ImportReport>,
        /// The first failure; it stopped the import.
        source: Box<OperatorError>,
    },
    /// A purge stopped partway: the report's `purged` dead letters (its
    /// `ids`) were deleted; its `unconfirmed` ones were acked without the
    /// broker confirming it (each deleted or back in the queue: not
    /// known); the others the purge held, not acked, are back in the
    /// queue. The text says so.
    #[error("{}", purge_incomplete(report, *selected, source))]
    PurgeIncomplete {
        /// What was purged.
        report: Box<crate::PurgeReport>,
        /// How many the purge was to delete.
        selected: usize,
        /// The failure.
        source: Box<OperatorError>,
    },
    /// An export stopped partway: the report's `exported` dead letters
    /// were written to the file (fsynced unless the error is the file's),
    /// and its `removed` ones removed from the queue; the others are still
    /// in the queue.
    #[error("{}", crate::transfer::export_incomplete(report, source))]
    ExportIncomplete {
        /// What was exported and removed.
        report: Box<crate::ExportReport>,
        /// The failure.
        source: Box<OperatorError>,
    },
    /// Connecting failed.
    #[error(transparent)]
    Topology(#[from] warren_topology::TopologyError),
}

impl OperatorError {
    /// Whether trying again later may succeed (broker or network trouble),
    /// as opposed to a mistake in the command or the data.
    pub fn is_transient(&self) -> bool {
        match self {
            OperatorError::Amqp { source, .. } => source.can_be_recovered(),
            OperatorError::Timeout { .. } => true,
            // A closed channel is broker or network trouble; a cancelled
            // read is, when the queue is known to be still there.
            OperatorError::ReadCut {
                channel_closed,
                queue_deleted,
                ..
            } => *channel_closed || *queue_deleted == Some(false),
            OperatorError::ExchangeCheck { source, .. } => source.can_be_recovered(),
            OperatorError::Topology(e) => e.is_transient(),
            OperatorError::ImportIncomplete { source, .. }
            | OperatorError::PurgeIncomplete { source, .. }
            | OperatorError::ExportIncomplete { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    pub(crate) fn amqp(
        what: &'static str,
        object: impl Into<String>,
    ) -> impl FnOnce(lapin::Error) -> Self {
        let object = object.into();
        move |source| OperatorError::Amqp {
            what,
            object,
            source,
        }
    }
}

/// [`OperatorError::PurgeIncomplete`]'s text: the failure, then what is
/// known of the dead letters the purge held: deleted, acked without the
/// broker confirming it (deleted or back), not acked (back).
fn purge_incomplete(
    report: &crate::PurgeReport,
    selected: usize,
    source: &OperatorError,
) -> String {
    let queue = dead_queue(&report.group);
    let unconfirmed = report.unconfirmed.len();
    let mut text = format!(
        "{source}; {} of {selected} dead letters purged before it",
        report.purged
    );
    match unconfirmed {
        0 => {}
        1 => text.push_str(&format!(
            "; 1 acked without the broker confirming it: it was deleted or is back in {queue:?}"
        )),
        n => text.push_str(&format!(
            "; {n} acked without the broker confirming it: each of them was deleted or is back in {queue:?}"
        )),
    }
    match selected.saturating_sub(report.purged + unconfirmed) {
        0 => {}
        1 => text.push_str(&format!("; the 1 not acked is back in {queue:?}")),
        n => text.push_str(&format!("; the {n} not acked are back in {queue:?}")),
    }
    text
}

/// [`OperatorError::NameTooLong`]'s text: the name's start (the whole of
/// it would fill the screen) and its length.
pub(crate) fn name_too_long(group: &str) -> String {
    let start: String = group.chars().take(40).collect();
    let shown = if start.len() < group.len() {
        format!("{start:?}…")
    } else {
        format!("{group:?}")
    };
    format!(
        "group {shown} is {} bytes long: its dead-letter queue name would be {} bytes, over AMQP's limit of {MAX_NAME_BYTES}, so no such queue can exist",
        group.len(),
        dead_queue(group).len()
    )
}

/// Checks that `group`'s dead-letter queue name fits in an AMQP short
/// string: lapin panics on a longer one.
pub(crate) fn check_group_name(group: &str) -> Result<(), OperatorError> {
    if dead_queue(group).len() > MAX_NAME_BYTES {
        return Err(OperatorError::NameTooLong {
            group: group.to_owned(),
        });
    }
    Ok(())
}

/// Whether the broker answered with the channel error `code` (a soft
/// error, which closes the channel): `NOTFOUND` for a passive declare of
/// something missing, and so on.
pub(crate) fn is_soft_error(e: &lapin::Error, code: AMQPSoftError) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if *p.kind() == AMQPErrorKind::Soft(code))
}

/// Awaits `fut` for at most `after`, naming what and where on timeout.
pub(crate) async fn timed<T>(
    after: Duration,
    what: &'static str,
    object: &str,
    fut: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, OperatorError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(OperatorError::amqp(what, object)),
        Err(_) => Err(OperatorError::Timeout {
            what,
            object: object.to_owned(),
            after,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purge_stopped(purged: usize, unconfirmed: usize, selected: usize) -> String {
        let ids = |from: usize, to: usize| (from..to).map(|i| format!("p-{i}")).collect();
        OperatorError::PurgeIncomplete {
            report: Box::new(crate::PurgeReport {
                group: "g".into(),
                coverage: crate::Coverage {
                    scanned: selected,
                    total: selected as u64,
                    scan_limit_reached: false,
                    consumers: 0,
                    stalled: false,
                },
                purged,
                ids: ids(0, purged),
                unconfirmed: ids(purged, purged + unconfirmed),
                error: Some("lost".into()),
            }),
            selected,
            source: Box::new(OperatorError::Timeout {
                what: "closing the scan channel",
                object: "g.dead".into(),
                after: Duration::from_secs(30),
            }),
        }
        .to_string()
    }

    /// A purge that stopped says what is known of each dead letter it
    /// held: deleted (the broker confirmed the ack), acked without the
    /// broker confirming it (deleted or back: not known), or not acked
    /// (back in the queue).
    #[test]
    fn a_stopped_purge_says_what_is_known_of_each_dead_letter_it_held() {
        let stopped =
            "closing the scan channel on \"g.dead\": no answer from the broker within 30s; ";
        for (purged, unconfirmed, selected, said) in [
            (
                0,
                0,
                4,
                "0 of 4 dead letters purged before it; the 4 not acked are back in \"g.dead\"",
            ),
            (
                0,
                3,
                3,
                "0 of 3 dead letters purged before it; 3 acked without the broker confirming \
                 it: each of them was deleted or is back in \"g.dead\"",
            ),
            (
                1,
                1,
                3,
                "1 of 3 dead letters purged before it; 1 acked without the broker confirming \
                 it: it was deleted or is back in \"g.dead\"; the 1 not acked is back in \
                 \"g.dead\"",
            ),
            (
                2,
                0,
                5,
                "2 of 5 dead letters purged before it; the 3 not acked are back in \"g.dead\"",
            ),
        ] {
            assert_eq!(
                purge_stopped(purged, unconfirmed, selected),
                format!("{stopped}{said}")
            );
        }
    }
}
