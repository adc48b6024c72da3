//! `purge`: delete selected dead letters, in two steps so that the caller
//! can ask for confirmation in between.
//!
//! ## Order
//!
//! [`prepare_purge`] reads the queue, holds the selected messages (unacked,
//! so still in the queue) and writes each to the archive when one is given.
//! [`PendingPurge::commit`] fsyncs the archive first, then acks (deletes),
//! then closes the scan's channel: the broker answers the close only after
//! it has handled every ack sent before it on that channel, so only then
//! are the dead letters known to be deleted (an ack itself gets no
//! answer). [`PendingPurge::abort`], or dropping the connection, puts
//! everything back in order.
//!
//! An archive on standard output ([`ExportWriter::stdout`]) is refused by
//! both steps ([`OperatorError::CopyNotStored`]): flushing a pipe says
//! nothing about whether whoever reads it stored the lines, so nothing may
//! be deleted on its strength.

use std::time::SystemTime;

use lapin::Connection;
use serde::Serialize;
use tracing::info;

use crate::error::OperatorError;
use crate::reader::{explain_cut, Coverage, ReadOptions, Reading, Scan};
use crate::select::Selection;
use crate::transfer::ExportWriter;

/// A purge read and waiting for the go-ahead.
pub struct PendingPurge {
    group: String,
    scan: Scan,
    tags: Vec<u64>,
    ids: Vec<String>,
}

impl std::fmt::Debug for PendingPurge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingPurge")
            .field("group", &self.group)
            .field("count", &self.tags.len())
            .finish()
    }
}

/// What a purge did.
#[derive(Debug, Clone, Serialize)]
pub struct PurgeReport {
    /// The group.
    pub group: String,
    /// How much of the queue was read.
    pub coverage: Coverage,
    /// Messages deleted: acked, and the broker confirmed it.
    pub purged: usize,
    /// Their ids.
    pub ids: Vec<String>,
    /// The ids of messages acked when the connection was lost before the
    /// broker confirmed the acks: each was either deleted or is back in
    /// the queue, and which is not known. Empty unless the purge stopped
    /// (`error`); not in the JSON when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed: Vec<String>,
    /// What stopped the purge before it deleted every message it held
    /// (see [`OperatorError::PurgeIncomplete`]); `None` when it did not stop.
    pub error: Option<String>,
}

/// Reads `group`'s dead letters and holds those `selection` takes; writes
/// them to `archive` as it goes. Nothing is deleted yet. An `archive` on
/// standard output is refused before anything is read
/// ([`OperatorError::CopyNotStored`]).
pub async fn prepare_purge(
    conn: &Connection,
    group: &str,
    selection: &Selection,
    opts: &ReadOptions,
    mut archive: Option<&mut ExportWriter>,
) -> Result<PendingPurge, OperatorError> {
    selection.check()?;
    refuse_stdout(archive.as_deref())?;
    let now = SystemTime::now();
    let mut scan = Scan::open(conn, group, opts).await?;
    let mut tags = Vec::new();
    let mut ids = Vec::new();
    let limit = selection.limit.unwrap_or(usize::MAX);
    let result = async {
        while tags.len() < limit {
            let Some((tag, d)) = scan.next().await? else {
                break;
            };
            if selection.matches(&d.info, now) {
                if let Some(a) = archive.as_deref_mut() {
                    a.write(&d)?;
                }
                tags.push(tag);
                ids.push(d.info.id);
            }
        }
        Ok::<_, OperatorError>(())
    }
    .await;
    if let Err(e) = result {
        // Said for what the purge held: nothing is deleted yet.
        let e = explain_cut(conn, e, opts.rpc_timeout)
            .await
            .while_reading(Reading::Purging {
                selected: tags.len(),
                archived: archive.is_some(),
            });
        let _ = scan.finish().await;
        return Err(e);
    }
    Ok(PendingPurge {
        group: group.to_owned(),
        scan,
        tags,
        ids,
    })
}

impl PendingPurge {
    /// How many it will delete.
    pub fn count(&self) -> usize {
        self.tags.len()
    }

    /// The ids it will delete.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// How much of the queue was read.
    pub fn coverage(&self) -> Coverage {
        self.scan.coverage()
    }

    /// Deletes them: fsyncs `archive` first (if any), then acks. An
    /// `archive` on standard output deletes nothing: every message goes back
    /// ([`OperatorError::CopyNotStored`]).
    ///
    /// The acks are confirmed by the close of the scan's channel, which
    /// the broker answers after it has handled them. When the connection
    /// is lost first (an ack or the close fails), the purge stops:
    /// [`OperatorError::PurgeIncomplete`] holds the report, in which none
    /// is `purged` and those acked are `unconfirmed` (the broker may have
    /// handled some before the loss, or none: a broker that closed the
    /// connection drops what arrives after). Every dead letter not
    /// deleted goes back to the queue; an archive holds every one acked,
    /// so one that came back is there too (a duplicate, never a loss).
    pub async fn commit(
        self,
        archive: Option<&mut ExportWriter>,
    ) -> Result<PurgeReport, OperatorError> {
        if let Err(e) = refuse_stdout(archive.as_deref()) {
            let _ = self.scan.finish().await;
            return Err(e);
        }
        if let Some(a) = archive {
            if let Err(e) = a.sync() {
                let _ = self.scan.finish().await;
                return Err(e);
            }
        }
        let PendingPurge {
            group,
            scan,
            tags,
            mut ids,
        } = self;
        let mut acked = 0;
        let mut failure = None;
        for tag in &tags {
            if let Err(e) = scan.ack(*tag).await {
                failure = Some(e);
                break;
            }
            acked += 1;
        }
        let coverage = scan.coverage();
        // Sent is not handled: an ack written to a connection that the
        // broker has closed (and warren does not know it yet) is dropped.
        // The close's answer comes after the broker handled the acks.
        let purged = match scan.finish().await {
            Ok(_) => acked,
            Err(e) => {
                failure.get_or_insert(e);
                0
            }
        };
        let unconfirmed = ids[purged..acked].to_vec();
        ids.truncate(purged);
        let mut report = PurgeReport {
            group,
            coverage,
            purged,
            ids,
            unconfirmed,
            error: None,
        };
        match failure {
            None => {
                info!(group = %report.group, purged, "purged");
                Ok(report)
            }
            Some(source) => {
                info!(group = %report.group, purged, unconfirmed = report.unconfirmed.len(), selected = tags.len(), error = %source, "purge stopped partway");
                report.error = Some(source.to_string());
                Err(OperatorError::PurgeIncomplete {
                    report: Box::new(report),
                    selected: tags.len(),
                    source: Box::new(source),
                })
            }
        }
    }

    /// Deletes nothing: every message goes back in order.
    pub async fn abort(self) -> Result<(), OperatorError> {
        self.scan.finish().await.map(|_| ())
    }
}

fn refuse_stdout(archive: Option<&ExportWriter>) -> Result<(), OperatorError> {
    match archive {
        Some(a) if a.is_stdout() => Err(OperatorError::CopyNotStored {
            what: "the archive of a purge",
        }),
        _ => Ok(()),
    }
}
