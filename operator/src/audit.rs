//! Audit records: who replayed or purged what, and when.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use crate::error::OperatorError;
use crate::select::Selection;
use crate::transfer::sync_dir_of;

/// One replay or purge, as the audit log keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC.
    pub at: String,
    /// `replay` or `purge`.
    pub action: String,
    /// The operator's user name (the caller supplies it).
    pub user: String,
    /// The host it ran on.
    pub host: String,
    /// The group.
    pub group: String,
    /// The selection as given.
    pub selection: Selection,
    /// Replay target, when a replay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A dry run (nothing moved).
    pub dry_run: bool,
    /// How many messages were replayed or purged (a dry run: 0, since
    /// nothing moved; summing `count` gives what really moved).
    pub count: usize,
    /// Their ids (a dry run: the ids it would have taken).
    pub ids: Vec<String>,
    /// Replay: ids whose copy was confirmed but whose dead letter could
    /// not be removed (see [`crate::ReplayReport::not_removed`]): copied,
    /// and still dead letters. Absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_removed: Vec<String>,
    /// The error that stopped the run partway; `count` and `ids` say what
    /// it did before. Absent when the run ended without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AuditRecord {
    /// A record stamped now.
    pub fn now(action: &str, user: &str, host: &str, group: &str, selection: &Selection) -> Self {
        AuditRecord {
            at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            action: action.to_owned(),
            user: user.to_owned(),
            host: host.to_owned(),
            group: group.to_owned(),
            selection: selection.clone(),
            target: None,
            dry_run: false,
            count: 0,
            ids: Vec::new(),
            not_removed: Vec::new(),
            error: None,
        }
    }

    /// Creates the audit log `path` if it is missing, with its directory
    /// entry made durable (the directory is fsynced), and checks that it
    /// can be appended to. Call it before anything moves: a record that
    /// cannot be written must stop a run, not follow it.
    pub fn prepare_log(path: &Path) -> Result<(), OperatorError> {
        open_log(path).map(drop)
    }

    /// Appends the record as one JSON line to `path` and fsyncs it (and the
    /// directory, when this creates the file).
    pub fn append_to(&self, path: &Path) -> Result<(), OperatorError> {
        let err = |source| io_error(path, source);
        let mut line = serde_json::to_string(self).map_err(|e| err(std::io::Error::other(e)))?;
        line.push('\n');
        let mut f = open_log(path)?;
        f.write_all(line.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)
    }
}

fn io_error(path: &Path, source: std::io::Error) -> OperatorError {
    OperatorError::Io {
        file: path.display().to_string(),
        source,
    }
}

/// Opens `path` for appending; when this creates it, fsyncs its directory
/// so that the file keeps its name after a power loss.
fn open_log(path: &Path) -> Result<std::fs::File, OperatorError> {
    let err = |source| io_error(path, source);
    let created = std::fs::File::options()
        .append(true)
        .create_new(true)
        .open(path);
    match created {
        Ok(f) => {
            sync_dir_of(path).map_err(err)?;
            Ok(f)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::File::options()
            .append(true)
            .open(path)
            .map_err(err),
        Err(e) => Err(err(e)),
    }
}
