//! Audit records: who replayed or purged what, and when.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use crate::error::OperatorError;
use crate::select::Selection;

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
        }
    }

    /// Appends the record as one JSON line to `path` and fsyncs.
    pub fn append_to(&self, path: &Path) -> Result<(), OperatorError> {
        let err = |source| OperatorError::Io {
            file: path.display().to_string(),
            source,
        };
        let mut line = serde_json::to_string(self).map_err(|e| err(std::io::Error::other(e)))?;
        line.push('\n');
        let mut f = std::fs::File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        f.write_all(line.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)
    }
}
