//! The export format (JSON Lines, one dead letter per line), `export`,
//! `import`, and the archive `purge --archive` writes.
//!
//! A line:
//!
//! ```json
//! {"group":"billing","id":"…","exchange":"warren.dlx","routing_key":"billing",
//!  "body_encoding":"utf8","body":"{\"order\":7}",
//!  "properties":{"content_type":"application/json","delivery_mode":2,
//!                "headers":{"x-warren-attempts":{"i64":3}, …}}}
//! ```
//!
//! `body_encoding` is `utf8` (the body is the text) or `base64`. Header
//! values are typed JSON (see `value`), so `import` restores every property
//! and header with its AMQP type: an export → import round trip gives the
//! same message.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{debug, info};
use warren_topology::{dead_queue, headers};

use crate::error::OperatorError;
use crate::message::DeadLetter;
use crate::publish::{Confirmed, DroppedUserIds, DEFAULT_WINDOW};
use crate::reader::{Coverage, ReadOptions, Scan};
use crate::value::{table_to_typed, typed_to_table};

/// One exported dead letter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportedMessage {
    /// The group whose dead-letter queue held it.
    pub group: String,
    /// Its id (`message_id` or `h:` hash).
    pub id: String,
    /// The exchange it reached the dead-letter queue through.
    #[serde(default)]
    pub exchange: String,
    /// The routing key it reached the dead-letter queue with.
    #[serde(default)]
    pub routing_key: String,
    /// `utf8` or `base64`.
    pub body_encoding: String,
    /// The body, as `body_encoding` says.
    pub body: String,
    /// Every property; headers typed.
    pub properties: ExportedProperties,
}

/// The AMQP basic properties, each absent when the message had none.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[allow(missing_docs)] // the names are AMQP's own
pub struct ExportedProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// Typed JSON (see the `value` docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

fn s(v: &Option<ShortString>) -> Option<String> {
    v.as_ref().map(|s| s.as_str().to_owned())
}

impl ExportedProperties {
    /// From lapin's properties.
    pub fn of(p: &BasicProperties) -> Self {
        ExportedProperties {
            content_type: s(p.content_type()),
            content_encoding: s(p.content_encoding()),
            headers: p.headers().as_ref().map(table_to_typed),
            delivery_mode: *p.delivery_mode(),
            priority: *p.priority(),
            correlation_id: s(p.correlation_id()),
            reply_to: s(p.reply_to()),
            expiration: s(p.expiration()),
            message_id: s(p.message_id()),
            timestamp: *p.timestamp(),
            kind: s(p.kind()),
            user_id: s(p.user_id()),
            app_id: s(p.app_id()),
            cluster_id: s(p.cluster_id()),
        }
    }

    /// Back to lapin's properties.
    pub fn to_properties(&self) -> Result<BasicProperties, String> {
        let short = |name: &str, v: &Option<String>| -> Result<Option<ShortString>, String> {
            v.as_ref()
                .map(|v| ShortString::try_new(v.clone()).map_err(|e| format!("{name}: {e}")))
                .transpose()
        };
        let mut p = BasicProperties::default();
        if let Some(v) = short("content_type", &self.content_type)? {
            p = p.with_content_type(v);
        }
        if let Some(v) = short("content_encoding", &self.content_encoding)? {
            p = p.with_content_encoding(v);
        }
        if let Some(h) = &self.headers {
            p = p.with_headers(typed_to_table(h).map_err(|e| format!("headers: {e}"))?);
        }
        if let Some(v) = self.delivery_mode {
            p = p.with_delivery_mode(v);
        }
        if let Some(v) = self.priority {
            p = p.with_priority(v);
        }
        if let Some(v) = short("correlation_id", &self.correlation_id)? {
            p = p.with_correlation_id(v);
        }
        if let Some(v) = short("reply_to", &self.reply_to)? {
            p = p.with_reply_to(v);
        }
        if let Some(v) = short("expiration", &self.expiration)? {
            p = p.with_expiration(v);
        }
        if let Some(v) = short("message_id", &self.message_id)? {
            p = p.with_message_id(v);
        }
        if let Some(v) = self.timestamp {
            p = p.with_timestamp(v);
        }
        if let Some(v) = short("type", &self.kind)? {
            p = p.with_type(v);
        }
        if let Some(v) = short("user_id", &self.user_id)? {
            p = p.with_user_id(v);
        }
        if let Some(v) = short("app_id", &self.app_id)? {
            p = p.with_app_id(v);
        }
        if let Some(v) = short("cluster_id", &self.cluster_id)? {
            p = p.with_cluster_id(v);
        }
        Ok(p)
    }
}

impl ExportedMessage {
    /// A dead letter as an export line.
    pub fn of(d: &DeadLetter) -> Self {
        let (body_encoding, body) = match std::str::from_utf8(&d.body) {
            Ok(text) => ("utf8", text.to_owned()),
            Err(_) => ("base64", B64.encode(&d.body)),
        };
        ExportedMessage {
            group: d.group.clone(),
            id: d.info.id.clone(),
            exchange: d.exchange.clone(),
            routing_key: d.routing_key.clone(),
            body_encoding: body_encoding.to_owned(),
            body,
            properties: ExportedProperties::of(&d.properties),
        }
    }

    /// The body's bytes.
    pub fn body_bytes(&self) -> Result<Vec<u8>, String> {
        match self.body_encoding.as_str() {
            "utf8" => Ok(self.body.as_bytes().to_vec()),
            "base64" => B64
                .decode(&self.body)
                .map_err(|e| format!("body: bad base64: {e}")),
            other => Err(format!(
                "body_encoding {other:?} is neither utf8 nor base64"
            )),
        }
    }
}

/// An export or archive file being written: buffered, fsynced on
/// [`ExportWriter::sync`]. Or standard output ([`ExportWriter::stdout`]).
#[derive(Debug)]
pub struct ExportWriter {
    path: PathBuf,
    out: BufWriter<Sink>,
    written: usize,
}

/// Where an [`ExportWriter`] writes.
#[derive(Debug)]
enum Sink {
    File(File),
    Stdout(std::io::Stdout),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::File(f) => f.write(buf),
            Sink::Stdout(o) => o.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.flush(),
            Sink::Stdout(o) => o.flush(),
        }
    }
}

/// The path of [`ExportWriter::stdout`].
const STDIO_NAME: &str = "-";

impl ExportWriter {
    /// Creates `path`; refuses to overwrite an existing file
    /// ([`OperatorError::FileExists`]). The new
    /// directory entry is made durable (the directory is fsynced) before
    /// this returns, so before anything can be deleted on the strength of
    /// the file: fsyncing a new file alone does not keep its name across a
    /// power loss.
    pub fn create_new(path: &Path) -> Result<Self, OperatorError> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists if path.is_dir() => io(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::IsADirectory,
                        "is a directory: give the path of a new file",
                    ),
                ),
                std::io::ErrorKind::AlreadyExists => OperatorError::FileExists {
                    file: path.display().to_string(),
                },
                std::io::ErrorKind::NotFound => match path.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => io(
                        path,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!(
                                "directory {} does not exist (create it first)",
                                dir.display()
                            ),
                        ),
                    ),
                    _ => io(path, source),
                },
                _ => io(path, source),
            })?;
        if let Err(source) = sync_dir_of(path) {
            // Nothing was written: leave no empty file behind to refuse a retry.
            let _ = std::fs::remove_file(path);
            return Err(io(path, source));
        }
        Ok(Self::from_file(path, file))
    }

    /// Writes to an already open file (a temp file). Its directory entry is
    /// the caller's to make durable (see [`ExportWriter::create_new`]).
    /// Nothing here can tell what `file` is: hand it a duplicate of
    /// standard output and
    /// [`ExportWriter::is_stdout`] says false, so a purge or an export with
    /// `remove` would delete on the strength of lines that may not be stored
    /// anywhere. Use [`ExportWriter::stdout`] for standard output.
    pub fn from_file(path: &Path, file: File) -> Self {
        ExportWriter {
            path: path.to_owned(),
            out: BufWriter::new(Sink::File(file)),
            written: 0,
        }
    }

    /// Writes to standard output (`warren dlq export -`); its path is `-`.
    /// [`ExportWriter::sync`] can only flush there: nothing tells whether
    /// whoever reads the lines stored them, so do not remove what was
    /// exported this way ([`export`] refuses `remove` with it, and
    /// [`crate::prepare_purge`] refuses it as an archive).
    pub fn stdout() -> Self {
        ExportWriter {
            path: PathBuf::from(STDIO_NAME),
            out: BufWriter::new(Sink::Stdout(std::io::stdout())),
            written: 0,
        }
    }

    /// Whether it writes to standard output.
    pub fn is_stdout(&self) -> bool {
        matches!(self.out.get_ref(), Sink::Stdout(_))
    }

    /// Appends one message.
    pub fn write(&mut self, d: &DeadLetter) -> Result<(), OperatorError> {
        let line = serde_json::to_string(&ExportedMessage::of(d))
            .map_err(|e| io(&self.path, std::io::Error::other(e)))?;
        self.out
            .write_all(line.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|source| io(&self.path, source))?;
        self.written += 1;
        Ok(())
    }

    /// Messages written.
    pub fn written(&self) -> usize {
        self.written
    }

    /// Flushes and fsyncs: after this the lines are on disk. Standard
    /// output is only flushed.
    pub fn sync(&mut self) -> Result<(), OperatorError> {
        self.out.flush().map_err(|source| io(&self.path, source))?;
        match self.out.get_ref() {
            Sink::File(f) => f.sync_all().map_err(|source| io(&self.path, source)),
            Sink::Stdout(_) => Ok(()),
        }
    }

    /// The file (`-` for standard output).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Fsyncs the directory that holds `path` (the current directory for a
/// bare file name), so that a file just created there keeps its name after
/// a power loss: a file's own fsync makes its content durable, not its
/// directory entry. A file system that cannot fsync a directory (EINVAL,
/// as some network file systems answer) is taken as having nothing to
/// sync, as PostgreSQL does.
pub(crate) fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match File::open(dir)?.sync_all() {
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            debug!(dir = %dir.display(), error = %e, "the file system cannot fsync a directory");
            Ok(())
        }
        r => r,
    }
}

fn io(path: &Path, source: std::io::Error) -> OperatorError {
    let file = if path == Path::new(STDIO_NAME) {
        "standard output".to_owned()
    } else {
        path.display().to_string()
    };
    OperatorError::Io { file, source }
}

/// What `export` did for one group.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The group.
    pub group: String,
    /// How much of the queue was read.
    pub coverage: Coverage,
    /// Messages written to the export (fsynced, unless the error is the
    /// file's).
    pub exported: usize,
    /// Messages removed from the queue (`--remove`): all those exported,
    /// or none. Counted once the broker confirmed the ack that removes
    /// them (the close of the scan's channel, answered after it).
    pub removed: usize,
    /// Messages acked to be removed (`--remove`) when the connection was
    /// lost before the broker confirmed the ack (a broker that closed the
    /// connection drops what arrives after): each was removed or is still
    /// in the queue, which is not known. The export holds them all, so
    /// none is lost (exporting again writes those still there again).
    /// Not in the JSON when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub unconfirmed: usize,
    /// The lines of the export that hold them (1-based; the lines of the
    /// groups exported before come first); `None` when none was written.
    pub lines: Option<Lines>,
    /// What stopped the export before the end (see
    /// [`OperatorError::ExportIncomplete`]); `None` when nothing did.
    pub error: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Writes a group's dead letters to `out`; with `remove`, removes them
/// (one ack for all) once the file is fsynced. Otherwise nothing changes
/// in the queue. `remove` with [`ExportWriter::stdout`] is refused before
/// anything is read ([`OperatorError::CopyNotStored`]): what went to a pipe
/// cannot be known to be stored.
///
/// ## A failure partway
///
/// `Err` before the queue is read (it cannot be read) means nothing was
/// written. After that, an error (a read the broker ends, a lost
/// connection, a file that cannot be written) is
/// [`OperatorError::ExportIncomplete`]: its report says how many were
/// written (what was written is fsynced first, also then) and removed. A
/// read that fails removes nothing: those exported are in the file and
/// still in the queue. The ack that removes gets no answer: they count as
/// removed only once the close of the scan's channel is answered (the
/// broker answers it after it handled the ack). When the connection is
/// lost first, they are [`ExportReport::unconfirmed`]: removed or back in
/// the queue, and in the file either way (at worst a duplicate of the
/// file's lines, never a loss).
pub async fn export(
    conn: &Connection,
    group: &str,
    out: &mut ExportWriter,
    remove: bool,
    opts: &ReadOptions,
) -> Result<ExportReport, OperatorError> {
    if remove && out.is_stdout() {
        return Err(OperatorError::CopyNotStored {
            what: "an export that removes what it exported",
        });
    }
    let mut scan = Scan::open(conn, group, opts).await?;
    let before = out.written();
    let mut last_tag = None;
    let mut failure = None;
    loop {
        match scan.next().await {
            Ok(Some((tag, d))) => {
                if let Err(e) = out.write(&d) {
                    failure = Some(e);
                    break;
                }
                last_tag = Some(tag);
            }
            Ok(None) => break,
            Err(e) => {
                failure = Some(crate::reader::explain_cut(conn, e, opts.rpc_timeout).await);
                break;
            }
        }
    }
    let exported = out.written() - before;
    // What was written is on disk before anything is removed, and before
    // the report says it is in the file, also after a failure.
    if let Err(e) = out.sync() {
        failure.get_or_insert(e);
    }
    let mut acked = 0;
    if let (true, None, Some(tag)) = (remove, &failure, last_tag) {
        // Every message read up to `tag` was written: one ack removes them.
        match scan.ack_up_to(tag).await {
            Ok(()) => acked = exported,
            Err(e) => failure = Some(e),
        }
    }
    let coverage = scan.coverage();
    // Sent is not handled: an ack written to a connection that the broker
    // has closed (and warren does not know it yet) is dropped. The close's
    // answer comes after the broker handled the ack.
    let (removed, unconfirmed) = match scan.finish().await {
        Ok(_) => (acked, 0),
        Err(e) => {
            failure.get_or_insert(e);
            (0, acked)
        }
    };
    let mut report = ExportReport {
        group: group.to_owned(),
        coverage,
        exported,
        removed,
        unconfirmed,
        lines: (exported > 0).then(|| Lines {
            first: before + 1,
            last: before + exported,
        }),
        error: None,
    };
    match failure {
        None => {
            info!(group, exported, removed, file = %out.path().display(), "exported");
            Ok(report)
        }
        Some(source) => {
            info!(group, exported, removed, unconfirmed, file = %out.path().display(), error = %source,
                "export stopped partway; what it exported and removed before is reported");
            report.error = Some(source.to_string());
            Err(OperatorError::ExportIncomplete {
                report: Box::new(report),
                source: Box::new(source),
            })
        }
    }
}

/// [`OperatorError::ExportIncomplete`]'s text: the failure, then what was
/// written and removed before it, and where the rest is.
pub(crate) fn export_incomplete(report: &ExportReport, source: &OperatorError) -> String {
    let queue = dead_queue(&report.group);
    let lines = match report.lines {
        Some(l) if l.first == l.last => format!(" (line {l})"),
        Some(l) => format!(" (lines {l})"),
        None => String::new(),
    };
    let mut text = format!(
        "the export of {queue:?} stopped: {source}; before it, {} dead letters were written to the export{lines} and {} removed from the queue",
        report.exported, report.removed
    );
    if matches!(source, OperatorError::Io { .. }) && report.exported > 0 {
        text.push_str(" (the file may not hold them all: it could not be written)");
    }
    let kept = report.exported - report.removed - report.unconfirmed;
    let gone = matches!(
        source,
        OperatorError::ReadCut {
            queue_deleted: Some(true),
            ..
        }
    );
    if kept > 0 && gone {
        text.push_str(&format!(
            "; {queue:?} is gone: the export holds the only copy of those {kept}"
        ));
    } else if kept > 0 {
        text.push_str(&format!(
            "; the {kept} exported and not removed are still in {queue:?}: exporting it again writes them again"
        ));
    }
    if report.unconfirmed > 0 {
        text.push_str(&format!(
            "; the broker did not confirm the ack of those {}: each of them was removed or is still in {queue:?}, and the export holds them all (exporting again writes those still there again)",
            report.unconfirmed
        ));
    }
    text
}

/// An export read back ([`read_export`], [`read_export_from`]): its
/// messages in file order and the line each one is on, so that an import
/// can say which lines it imported and which it did not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportFile {
    name: String,
    messages: Vec<ExportedMessage>,
    lines: Vec<usize>,
    line_count: usize,
}

impl ExportFile {
    /// Messages that come from no file (`name` says what they are in
    /// errors): the nth message is on line n.
    pub fn from_messages(name: &str, messages: Vec<ExportedMessage>) -> Self {
        let n = messages.len();
        ExportFile {
            name: name.to_owned(),
            messages,
            lines: (1..=n).collect(),
            line_count: n,
        }
    }

    /// The file's name (`standard input` for `warren dlq import -`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The messages, in file order.
    pub fn messages(&self) -> &[ExportedMessage] {
        &self.messages
    }

    /// The messages, to change before importing (another group, ...).
    pub fn messages_mut(&mut self) -> &mut [ExportedMessage] {
        &mut self.messages
    }

    /// The line each message is on (1-based; a blank line holds none).
    pub fn lines(&self) -> &[usize] {
        &self.lines
    }

    /// Lines read, blank ones included.
    pub fn line_count(&self) -> usize {
        self.line_count
    }

    /// How many messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether it holds no message.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Without the messages on lines 1 to `n`: what is left to import
    /// after a run that imported those (`warren dlq import --skip n`; see
    /// [`ImportReport::resume_skip`]).
    pub fn skip_lines(mut self, n: usize) -> Self {
        let skipped = self.lines.partition_point(|l| *l <= n);
        self.messages.drain(..skipped);
        self.lines.drain(..skipped);
        self
    }
}

/// Lines `first` to `last` of an export, both included (1-based).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Lines {
    /// The first line.
    pub first: usize,
    /// The last line.
    pub last: usize,
}

/// `4`, or `6-9`.
impl std::fmt::Display for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Lines {
    /// `1-3, 6, 8-9` (`none` for no line).
    pub fn list(ranges: &[Lines]) -> String {
        if ranges.is_empty() {
            return "none".to_owned();
        }
        let all: Vec<String> = ranges.iter().map(Lines::to_string).collect();
        all.join(", ")
    }
}

/// The lines of the messages `take` picks out, as ranges: messages next to
/// each other in the file (blank lines between them aside) share one.
fn line_ranges(lines: &[usize], take: impl Fn(usize) -> bool) -> Vec<Lines> {
    let mut out: Vec<Lines> = Vec::new();
    let mut open = false;
    for (i, line) in lines.iter().enumerate() {
        if !take(i) {
            open = false;
            continue;
        }
        match out.last_mut() {
            Some(r) if open => r.last = *line,
            _ => out.push(Lines {
                first: *line,
                last: *line,
            }),
        }
        open = true;
    }
    out
}

/// A message an import did not get confirmed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImportFailure {
    /// Its line in the export.
    pub line: usize,
    /// Its id.
    pub id: String,
    /// The queue it was sent to.
    pub queue: String,
    /// What the broker (or the wait for it) said.
    pub error: String,
}

/// Failures an [`ImportReport`] names, at most (the rest are counted).
pub const MAX_IMPORT_FAILURES: usize = 20;

/// What `import` did: every message is either in [`ImportReport::imported_lines`]
/// (confirmed: it is in its queue) or in [`ImportReport::not_imported_lines`].
#[derive(Debug, Clone, Serialize, Default)]
pub struct ImportReport {
    /// Messages published (confirmed), per dead-letter queue.
    pub imported: std::collections::BTreeMap<String, usize>,
    /// Total confirmed.
    pub total: usize,
    /// Imported without the `user_id` they were exported with (another
    /// user than the login).
    pub user_id_dropped: usize,
    /// Messages to import: the export's, less the lines skipped.
    pub messages: usize,
    /// The lines whose message the broker confirmed.
    pub imported_lines: Vec<Lines>,
    /// The lines whose message was not imported (empty when every one
    /// was): [`ImportReport::failed`] and [`ImportReport::not_sent`].
    pub not_imported_lines: Vec<Lines>,
    /// Sent and not confirmed: nacked or returned (the broker did not take
    /// it), or no confirm came (a closed channel or connection, a timeout:
    /// the broker may have taken it, so importing it again may duplicate it).
    pub failed: usize,
    /// Not sent: an import stops sending at its first failure.
    pub not_sent: usize,
    /// The first [`MAX_IMPORT_FAILURES`] failures, in line order.
    pub failures: Vec<ImportFailure>,
    /// Skip this many lines ([`ExportFile::skip_lines`], `warren dlq import
    /// --skip`) to import what is left: every message up to this line was
    /// imported. `None` when every message was.
    pub resume_skip: Option<usize>,
}

impl ImportReport {
    /// Whether every message was imported.
    pub fn is_complete(&self) -> bool {
        self.not_imported_lines.is_empty()
    }

    /// Lines imported after [`ImportReport::resume_skip`] (confirmed after
    /// an earlier message failed): an import that skips only
    /// `resume_skip` lines sends them again.
    pub fn imported_after_resume(&self) -> Vec<Lines> {
        match self.resume_skip {
            Some(skip) => self
                .imported_lines
                .iter()
                .filter(|r| r.first > skip)
                .copied()
                .collect(),
            None => Vec::new(),
        }
    }
}

/// [`OperatorError::ImportIncomplete`]'s text: the failure, where it
/// happened, and what was and was not imported.
pub(crate) fn import_incomplete(report: &ImportReport, source: &OperatorError) -> String {
    let at = match report.failures.first() {
        Some(f) => format!(" at line {} (id {:?})", f.line, f.id),
        None => String::new(),
    };
    let mut text = format!(
        "import stopped{at}: {source}; {} of {} messages imported (lines {}), not imported: lines {}",
        report.total,
        report.messages,
        Lines::list(&report.imported_lines),
        Lines::list(&report.not_imported_lines),
    );
    if let Some(skip) = report.resume_skip {
        text.push_str(&format!(
            "; skip the first {skip} lines to import the rest (warren dlq import --skip {skip})"
        ));
        let again = report.imported_after_resume();
        if !again.is_empty() {
            text.push_str(&format!(
                ", which imports lines {} again",
                Lines::list(&again)
            ));
        }
    }
    text
}

/// Reads an export file and checks every line (nothing is published when a
/// line is bad).
pub fn read_export(path: &Path) -> Result<ExportFile, OperatorError> {
    let file = File::open(path).map_err(|source| io(path, source))?;
    read_export_from(&path.display().to_string(), BufReader::new(file))
}

/// Reads export lines from `input` (standard input, for `warren dlq import
/// -`) and checks every one; `name` is the file's name in errors.
pub fn read_export_from(name: &str, input: impl BufRead) -> Result<ExportFile, OperatorError> {
    let mut out = ExportFile {
        name: name.to_owned(),
        ..Default::default()
    };
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|source| OperatorError::Io {
            file: name.to_owned(),
            source,
        })?;
        out.line_count = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| OperatorError::Import {
            file: name.to_owned(),
            line: i + 1,
            reason,
        };
        let m: ExportedMessage =
            serde_json::from_str(&line).map_err(|e| bad(format!("not an export line: {e}")))?;
        parts(&m).map_err(bad)?;
        out.messages.push(m);
        out.lines.push(i + 1);
    }
    Ok(out)
}

/// A message's body and properties as they were exported.
fn parts(m: &ExportedMessage) -> Result<(Vec<u8>, BasicProperties), String> {
    Ok((m.body_bytes()?, m.properties.to_properties()?))
}

/// Puts exported messages back, each into its group's dead-letter queue
/// (or `to_group`'s), in file order, with confirms. Every message and
/// every target queue is checked first: a bad message, a group whose
/// queue name would be over AMQP's limit of
/// [`warren_topology::MAX_NAME_BYTES`] bytes (an
/// [`OperatorError::Import`] naming its line; for `to_group`,
/// [`OperatorError::NameTooLong`]) or a missing queue fails the import
/// before anything is sent. `expiration` and
/// `x-delivery-count` are not restored (a dead letter must not expire in a
/// queue without a dead-letter exchange; see
/// [`warren_topology::copy_properties`]), nor a `user_id` that is not
/// `login`, the user `conn` logs in as ([`warren_topology::AmqpUrl::login`];
/// `None`: every `user_id` is dropped), since the broker refuses any other
/// (see [`warren_topology::copy_properties_for`]). Everything else is
/// restored byte for byte.
///
/// ## A failure partway
///
/// The first message the broker does not confirm (nacked, returned, no
/// confirm before the channel closed or the timeout) stops the import:
/// nothing more is sent, the messages in flight are settled, and the
/// result is [`OperatorError::ImportIncomplete`], whose report says which
/// lines were imported (they are in their queues) and which were not.
/// [`ImportReport::resume_skip`] lines can then be skipped
/// ([`ExportFile::skip_lines`]) to import the rest without duplicating
/// what is there. `Ok` means every message was imported.
pub async fn import(
    conn: &Connection,
    export: &ExportFile,
    to_group: Option<&str>,
    login: Option<&str>,
    opts: &ReadOptions,
) -> Result<ImportReport, OperatorError> {
    for (m, line) in export.messages.iter().zip(&export.lines) {
        let bad = |reason: String| OperatorError::Import {
            file: export.name.clone(),
            line: *line,
            reason,
        };
        parts(m).map_err(bad)?;
        // A queue name over AMQP's limit cannot be sent (lapin panics).
        if to_group.is_none() && crate::error::check_group_name(&m.group).is_err() {
            return Err(bad(format!(
                "{}; fix its \"group\", or import with --to-group",
                crate::error::name_too_long(&m.group)
            )));
        }
    }
    let groups: std::collections::BTreeSet<&str> = export
        .messages
        .iter()
        .map(|m| to_group.unwrap_or(&m.group))
        .collect();
    for g in groups {
        crate::reader::count(conn, g, opts.rpc_timeout).await?;
    }
    let mut confirms: Confirmed<Sent> =
        Confirmed::open(conn, DEFAULT_WINDOW, opts.rpc_timeout).await?;
    let mut run = ImportRun {
        export,
        report: ImportReport {
            messages: export.len(),
            ..Default::default()
        },
        confirmed: vec![false; export.len()],
        first_error: None,
    };
    let mut dropped_users = DroppedUserIds::default();
    let mut sent = 0;
    for (i, m) in export.messages.iter().enumerate() {
        if run.first_error.is_some() {
            break;
        }
        sent = i + 1;
        let queue = dead_queue(to_group.unwrap_or(&m.group));
        let (body, props) = match parts(m) {
            Ok(p) => p,
            // Checked above; never reached.
            Err(reason) => {
                let e = OperatorError::Import {
                    file: export.name.clone(),
                    line: export.lines[i],
                    reason,
                };
                run.fail(i, &queue, e);
                break;
            }
        };
        let counted = props
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key(headers::DELIVERY_COUNT));
        let foreign = props
            .user_id()
            .as_ref()
            .is_some_and(|u| Some(u.as_str()) != login);
        // Rebuilt only when something must go: a message without headers
        // keeps having none.
        let copy = if props.expiration().is_some() || counted || foreign {
            let headers = props.headers().clone().unwrap_or_default();
            warren_topology::copy_properties_for(&props, headers, login)
        } else {
            props.clone()
        };
        let dropped_user = dropped_users.note(&props, &copy);
        if dropped_user {
            debug!(queue = %queue, message_id = %m.id, user_id = ?props.user_id(), "imported without its user_id: the connection logs in as another user");
        }
        // Straight to the queue through the default exchange: no binding
        // can send it anywhere else.
        let token = Sent {
            index: i,
            queue: queue.clone(),
            dropped_user,
        };
        if let Err(e) = confirms.publish("", &queue, &body, copy, token).await {
            run.fail(i, &queue, e);
            break;
        }
        while confirms.full() {
            run.take(&mut confirms).await;
        }
    }
    while confirms.in_flight() > 0 {
        run.take(&mut confirms).await;
    }
    confirms.close().await;
    let ImportRun {
        mut report,
        confirmed,
        first_error,
        ..
    } = run;
    report.not_sent = export.len() - sent;
    report.imported_lines = line_ranges(&export.lines, |i| confirmed[i]);
    report.not_imported_lines = line_ranges(&export.lines, |i| !confirmed[i]);
    report.resume_skip = confirmed
        .iter()
        .position(|c| !c)
        .map(|i| export.lines[i] - 1);
    if report.user_id_dropped > 0 {
        info!(
            messages = report.user_id_dropped,
            user_ids = %dropped_users,
            login = login.unwrap_or("unknown"),
            "imported without their user_id: the broker takes only the login's own user_id; every other property and header is kept"
        );
    }
    match first_error {
        Some(source) => {
            info!(
                file = %export.name,
                imported = report.total,
                failed = report.failed,
                not_sent = report.not_sent,
                resume_skip = ?report.resume_skip,
                error = %source,
                "import stopped partway"
            );
            Err(OperatorError::ImportIncomplete {
                report: Box::new(report),
                source: Box::new(source),
            })
        }
        None => Ok(report),
    }
}

/// An import's publish in flight: the message's place in the export, its
/// queue, and whether it went without its `user_id`.
struct Sent {
    index: usize,
    queue: String,
    dropped_user: bool,
}

/// An import under way: what it did so far.
struct ImportRun<'a> {
    export: &'a ExportFile,
    report: ImportReport,
    /// Whether each message was confirmed.
    confirmed: Vec<bool>,
    /// The first failure: it stops the import.
    first_error: Option<OperatorError>,
}

impl ImportRun<'_> {
    /// Message `index` was not imported.
    fn fail(&mut self, index: usize, queue: &str, e: OperatorError) {
        self.report.failed += 1;
        if self.report.failures.len() < MAX_IMPORT_FAILURES {
            self.report.failures.push(ImportFailure {
                line: self.export.lines[index],
                id: self.export.messages[index].id.clone(),
                queue: queue.to_owned(),
                error: e.to_string(),
            });
        }
        self.first_error.get_or_insert(e);
    }

    /// Takes the confirms that have resolved, oldest first.
    async fn take(&mut self, confirms: &mut Confirmed<Sent>) {
        for (sent, outcome) in confirms.next_batch().await {
            match outcome {
                Ok(()) => {
                    self.confirmed[sent.index] = true;
                    *self.report.imported.entry(sent.queue).or_insert(0) += 1;
                    self.report.total += 1;
                    self.report.user_id_dropped += usize::from(sent.dropped_user);
                }
                Err(e) => self.fail(sent.index, &sent.queue, e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "warren-transfer-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_directory_of_a_new_file_is_opened_and_fsynced() {
        let dir = temp_dir("sync");
        let file = dir.join("archive.jsonl");
        std::fs::write(&file, b"").unwrap();
        sync_dir_of(&file).unwrap();
        // A bare name is in the current directory.
        sync_dir_of(Path::new("archive.jsonl")).unwrap();
        // A directory that is not there is an error, not a silent success.
        let gone = dir.join("no-such-dir").join("archive.jsonl");
        let e = sync_dir_of(&gone).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn create_new_refuses_a_file_that_exists_a_directory_and_a_missing_directory_by_name() {
        let dir = temp_dir("create");
        let file = dir.join("export.jsonl");
        let w = ExportWriter::create_new(&file).unwrap();
        assert_eq!(w.path(), file);
        assert!(file.exists());
        match ExportWriter::create_new(&file) {
            Err(OperatorError::FileExists { file: f }) => assert_eq!(f, file.display().to_string()),
            other => panic!("expected FileExists, got {other:?}"),
        }
        let nowhere = dir.join("missing").join("export.jsonl");
        let e = ExportWriter::create_new(&nowhere).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: directory {} does not exist (create it first)",
                nowhere.display(),
                dir.join("missing").display()
            )
        );
        assert!(!nowhere.exists());
        // A directory is not "a file that exists".
        let e = ExportWriter::create_new(&dir).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: is a directory: give the path of a new file",
                dir.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn line(id: &str) -> String {
        format!(
            r#"{{"group":"g","id":"{id}","body_encoding":"utf8","body":"{{}}","properties":{{}}}}"#
        )
    }

    #[test]
    fn an_export_read_back_knows_the_line_of_each_message_and_skips_lines() {
        let text = format!(
            "{}\n{}\n\n{}\n   \n{}\n\n",
            line("a"),
            line("b"),
            line("c"),
            line("d")
        );
        let f = read_export_from("x.jsonl", text.as_bytes()).unwrap();
        let ids: Vec<&str> = f.messages().iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(f.lines(), [1, 2, 4, 6]);
        assert_eq!(f.line_count(), 7);
        assert_eq!(f.name(), "x.jsonl");
        let rest = f.clone().skip_lines(3);
        assert_eq!(rest.lines(), [4, 6]);
        assert_eq!(rest.messages()[0].id, "c");
        assert_eq!(f.clone().skip_lines(4).lines(), [6]);
        assert!(f.clone().skip_lines(6).is_empty());
        assert_eq!(f.clone().skip_lines(0), f);
        let given = ExportFile::from_messages("given", f.messages().to_vec());
        assert_eq!(given.lines(), [1, 2, 3, 4]);
    }

    #[test]
    fn lines_are_merged_into_ranges_of_neighbouring_messages() {
        let lines = [1, 2, 3, 5, 6, 9, 10];
        assert_eq!(Lines::list(&line_ranges(&lines, |_| true)), "1-10");
        assert_eq!(Lines::list(&line_ranges(&lines, |i| i < 3)), "1-3");
        assert_eq!(Lines::list(&line_ranges(&lines, |i| i >= 3)), "5-10");
        assert_eq!(
            Lines::list(&line_ranges(&lines, |i| i != 1 && i != 4)),
            "1, 3-5, 9-10"
        );
        assert_eq!(Lines::list(&line_ranges(&lines, |_| false)), "none");
    }

    #[test]
    fn an_incomplete_import_says_where_it_stopped_and_how_to_resume() {
        let report = ImportReport {
            total: 3,
            messages: 6,
            imported_lines: vec![Lines { first: 1, last: 3 }, Lines { first: 6, last: 6 }],
            not_imported_lines: vec![Lines { first: 4, last: 5 }],
            failed: 2,
            failures: vec![ImportFailure {
                line: 4,
                id: "m4".into(),
                queue: "g.dead".into(),
                error: "nacked".into(),
            }],
            resume_skip: Some(3),
            ..Default::default()
        };
        assert_eq!(
            report.imported_after_resume(),
            [Lines { first: 6, last: 6 }]
        );
        let source = OperatorError::Publish {
            exchange: String::new(),
            routing_key: "g.dead".into(),
            outcome: "nacked".into(),
        };
        assert_eq!(
            import_incomplete(&report, &source),
            "import stopped at line 4 (id \"m4\"): publish to exchange \"\" with routing key \
             \"g.dead\" was nacked by the broker; 3 of 6 messages imported (lines 1-3, 6), not \
             imported: lines 4-5; skip the first 3 lines to import the rest (warren dlq import \
             --skip 3), which imports lines 6 again"
        );
    }
}
