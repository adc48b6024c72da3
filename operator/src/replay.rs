//! `replay`: publish selected dead letters again, with confirms, then ack
//! them.
//!
//! ## Order
//!
//! For each selected dead letter: publish a copy (attempts reset, replays
//! incremented, body and every other property kept), wait for the broker's
//! confirm, then ack the dead letter. A crash between the two leaves the
//! dead letter in its queue and the copy in the work queue: a duplicate,
//! never a loss. Up to [`ReplayOptions::window`] copies await their confirm
//! at once; with a [`ReplayOptions::rate`], the copies confirmed while the
//! run waits for its next slot are acked then, not a window later. Dead
//! letters that are not selected, or whose publish failed, go back to the
//! queue unchanged and in order when the scan ends.
//!
//! ## Acks are confirmed later
//!
//! An ack gets no answer, and a broker that has closed the connection
//! drops whatever arrives after its `connection.close` (warren may not
//! have read it yet, so the ack is written without error). A dead letter
//! counts as replayed only once a request sent after its ack on the
//! scan's channel is answered, since the broker answers it after handling
//! the acks before it: a `basic.qos` that changes nothing, every
//! [`ReplayOptions::sync_every`] acks or [`ReplayOptions::SYNC_INTERVAL`]
//! at most while acks wait for one (one round trip each), and the close
//! of the channel at the end. Acked dead letters still waiting for it when the
//! connection is lost are [`ReplayReport::unconfirmed`].
//!
//! ## A run that breaks
//!
//! An error partway (a lost connection, a read, publish or ack that fails)
//! stops sending; the copies in flight are settled, and the result is
//! still the report: what was replayed before, the copies confirmed whose
//! dead letter could not be acked any more ([`ReplayReport::not_removed`])
//! or whose ack the broker did not confirm ([`ReplayReport::unconfirmed`]),
//! and the error ([`ReplayReport::error`]).
//!
//! ## `user_id`
//!
//! The broker refuses (closing the channel) a publish whose `user_id` is not
//! the user the connection logged in as. Services and operators log in as
//! users of their own, so a copy keeps the dead letter's `user_id` only when
//! it is [`ReplayOptions::login`] (as the consumer's own copies do, see
//! [`warren_topology::copy_properties_for`]); otherwise it goes without one,
//! and the replay says so once, at INFO, with how many and which users.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use lapin::options::ExchangeDeclareOptions;
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use warren_topology::{headers, work_queue, MAX_NAME_BYTES};

use crate::error::{is_soft_error, timed, OperatorError};
use crate::message::DeadLetter;
use crate::metrics::Metrics;
use crate::publish::{Confirmed, DroppedUserIds, DEFAULT_WINDOW};
use crate::reader::{Coverage, ReadOptions, Scan};
use crate::select::Selection;
use crate::value::as_int;

/// Where replayed messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The group's own work queue, through the default exchange: only the
    /// group that failed reprocesses (the default).
    #[default]
    WorkQueue,
    /// The original exchange and routing key: every group bound there sees
    /// the message again.
    Original,
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Where to. Default [`Target::WorkQueue`].
    pub target: Target,
    /// Messages per second at most; `None` = as fast as confirms allow (the default).
    pub rate: Option<f64>,
    /// Only say what would be replayed. Default false.
    pub dry_run: bool,
    /// Publishes awaiting a confirm at once. Default [`DEFAULT_WINDOW`].
    pub window: usize,
    /// Acks sent before the broker is asked to confirm them (one round
    /// trip on the scan's channel; it is asked after
    /// [`ReplayOptions::SYNC_INTERVAL`] too, and at the end). When the
    /// connection is lost, the dead letters acked since the last
    /// confirmation are [`ReplayReport::unconfirmed`]. Default
    /// [`ReplayOptions::DEFAULT_SYNC_EVERY`]; 0 counts as 1.
    pub sync_every: usize,
    /// How the queue is read.
    pub read: ReadOptions,
    /// The user the connection logs in as ([`warren_topology::AmqpUrl::login`]):
    /// a dead letter's `user_id` is kept only when it is this user, since the
    /// broker refuses any other. Default `None` (a user named by a client
    /// certificate, or unknown): every `user_id` is dropped.
    pub login: Option<String>,
}

impl ReplayOptions {
    /// Default most acks sent before the broker is asked to confirm them
    /// ([`ReplayOptions::sync_every`]).
    pub const DEFAULT_SYNC_EVERY: usize = 1_000;
    /// Longest time a replay's acks wait before the broker is asked to
    /// confirm them (see [`ReplayOptions::sync_every`]).
    pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            target: Target::WorkQueue,
            rate: None,
            dry_run: false,
            window: DEFAULT_WINDOW,
            sync_every: ReplayOptions::DEFAULT_SYNC_EVERY,
            read: ReadOptions::default(),
            login: None,
        }
    }
}

/// Progress, reported after every message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Messages read so far.
    pub scanned: usize,
    /// Messages the scan will read at most.
    pub to_scan: usize,
    /// Selected so far.
    pub selected: usize,
    /// Replayed so far: the copy confirmed, and the broker confirmed the
    /// ack of the dead letter (see the module's "Acks are confirmed
    /// later"), so it lags the acks sent by up to
    /// [`ReplayOptions::SYNC_INTERVAL`].
    pub replayed: usize,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReplayReport {
    /// The group.
    pub group: String,
    /// How much of the queue was read.
    pub coverage: Option<Coverage>,
    /// Where to.
    pub target: Target,
    /// Only a dry run.
    pub dry_run: bool,
    /// Dead letters the selection took.
    pub selected: usize,
    /// Replayed: the copy confirmed, and the dead letter removed from the
    /// dead-letter queue (the broker confirmed its ack).
    pub replayed: usize,
    /// Selected but not replayed (left in the dead-letter queue).
    pub failed: usize,
    /// Replayed without the `user_id` their dead letter carried (another
    /// user than [`ReplayOptions::login`]).
    pub user_id_dropped: usize,
    /// Ids replayed (dry run: ids that would be).
    pub ids: Vec<String>,
    /// Why some failed (the first few), each `id: error`.
    pub errors: Vec<String>,
    /// Selected, copied (the copy was confirmed) but not removed from the
    /// dead-letter queue: the run broke before their ack went out (a lost
    /// connection). The copy is in the target and the dead letter is back
    /// in its queue, so a second replay duplicates them.
    pub not_removed: Vec<String>,
    /// Selected, copied (the copy was confirmed) and acked, but the
    /// connection was lost before the broker confirmed that it handled
    /// the ack (see the module's "Acks are confirmed later"): the copy is
    /// in the target, and each dead letter was removed or is still in its
    /// queue, which is not known (a broker that closed the connection
    /// drops the acks that arrive after). A second replay duplicates those
    /// still there. Empty unless [`ReplayReport::error`] is set; not in
    /// the JSON when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed: Vec<String>,
    /// Stopped before the end (Ctrl-C, a broken channel or connection).
    pub stopped_early: bool,
    /// The error that stopped the run before the end (a lost connection,
    /// a read, publish or ack that failed); `None` when none did. What was
    /// done before it is counted above: every selected dead letter is
    /// replayed, failed, not removed or unconfirmed.
    pub error: Option<String>,
}

const MAX_ERRORS: usize = 20;

impl ReplayReport {
    fn fail(&mut self, e: String) {
        self.failed += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }

    /// The run stops on `e` (the first such error is kept).
    fn stop(&mut self, e: String) {
        self.stopped_early = true;
        self.error.get_or_insert(e);
    }
}

/// The copy that is published by a connection logged in as `login`:
/// attempts reset to 0, replays + 1, all else kept but `expiration`,
/// `x-delivery-count` (dead letters written before warren stopped copying
/// them may still carry them) and a `user_id` that is not `login` (see
/// [`warren_topology::copy_properties_for`]).
pub fn replay_properties(p: &BasicProperties, login: Option<&str>) -> BasicProperties {
    let mut h = p.headers().clone().unwrap_or_default();
    let replays = h
        .inner()
        .get(headers::REPLAYS)
        .and_then(as_int)
        .filter(|n| *n >= 0)
        .unwrap_or(0);
    h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(0));
    h.insert(
        headers::REPLAYS.into(),
        AMQPValue::LongLongInt(replays.saturating_add(1)),
    );
    warren_topology::copy_properties_for(p, h, login)
}

fn destination(d: &DeadLetter, target: Target) -> Result<(String, String), String> {
    match target {
        Target::WorkQueue => Ok((String::new(), work_queue(&d.group))),
        Target::Original => match (&d.info.original_exchange, &d.info.original_routing_key) {
            (Some(e), Some(k)) => {
                // AMQP names and keys are short strings; lapin panics on longer ones.
                for (what, v) in [("exchange", e), ("routing key", k)] {
                    if v.len() > MAX_NAME_BYTES {
                        return Err(format!(
                            "{}: its original {what} is {} bytes long, and AMQP allows at most {MAX_NAME_BYTES}; replay it to the work queue instead",
                            d.info.id,
                            v.len()
                        ));
                    }
                }
                Ok((e.clone(), k.clone()))
            }
            _ => Err(format!(
                "{}: no original exchange/routing key in its headers; replay it to the work queue instead",
                d.info.id
            )),
        },
    }
}

/// Replays the selected dead letters of `group`. Stops after the current
/// message when `cancel` fires; `progress` is called after every message.
///
/// `Err` means nothing was moved (a bad selection, a queue that cannot be
/// read). Once the queue is read, the result is a report, also when an
/// error stops the run partway (a lost connection, a read, publish or ack
/// that fails): the copies in flight are settled first, and
/// [`ReplayReport::error`] says what stopped it, next to what was
/// replayed before.
pub async fn replay(
    conn: &Connection,
    group: &str,
    selection: &Selection,
    opts: &ReplayOptions,
    metrics: &Metrics,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &CancellationToken,
) -> Result<ReplayReport, OperatorError> {
    selection.check()?;
    let mut report = ReplayReport {
        group: group.to_owned(),
        target: opts.target,
        dry_run: opts.dry_run,
        ..Default::default()
    };
    let mut scan = Scan::open(conn, group, &opts.read).await?;
    let to_scan = usize::try_from(scan.coverage().total)
        .unwrap_or(usize::MAX)
        .min(opts.read.scan_limit);
    let replayed = metrics.replayed.with_label_values(&[group]);
    let mut acks = Acks::new(opts.sync_every);
    let mut p = run(
        conn,
        &mut scan,
        selection,
        opts,
        &replayed,
        progress,
        cancel,
        to_scan,
        &mut report,
        &mut acks,
    )
    .await;
    report.coverage = Some(scan.coverage());
    // Closing the channel puts back what was not acked; failing to close it
    // (a lost connection) puts it back too, but the run did not end well.
    // Its answer confirms the acks sent before it.
    match scan.finish().await {
        Ok(_) => acks.confirmed(&mut report, &replayed, &mut p),
        Err(e) => {
            report.stop(e.to_string());
            report
                .unconfirmed
                .extend(acks.pending.drain(..).map(|c| c.id));
        }
    }
    progress(p);
    if let Some(error) = report.error.as_mut() {
        if !conn.status().connected() {
            *error = format!("the connection to the broker was lost ({error})");
        }
    }
    match &report.error {
        None => info!(
            group,
            selected = report.selected,
            replayed = report.replayed,
            failed = report.failed,
            dry_run = report.dry_run,
            "replay done"
        ),
        Some(error) => info!(
            group,
            selected = report.selected,
            replayed = report.replayed,
            failed = report.failed,
            not_removed = report.not_removed.len(),
            unconfirmed = report.unconfirmed.len(),
            error = %error,
            "replay stopped by an error; what it replayed before is reported"
        ),
    }
    Ok(report)
}

/// Which dead letters can be acked: those below the first that stays in
/// the queue (with one `multiple` ack), and none once an ack failed; and
/// those acked that the broker has not confirmed yet.
struct Acks {
    /// The first delivery tag that stays in the queue: every tag before it
    /// is replayed, so confirmed copies below it are acked with one
    /// `multiple` ack (settled in publish order, which is tag order).
    kept: Option<u64>,
    /// An ack (or the request that confirms acks) failed: the channel is
    /// gone, and with it every unacked delivery (the broker puts them
    /// back).
    broken: bool,
    /// Copies whose dead letter was acked since the broker last confirmed
    /// the acks, in ack order.
    pending: Vec<ReplayCopy>,
    /// When the broker last confirmed the acks (or the run started).
    last_sync: Instant,
    /// [`ReplayOptions::sync_every`], at least 1.
    sync_every: usize,
}

impl Acks {
    fn new(sync_every: usize) -> Acks {
        Acks {
            kept: None,
            broken: false,
            pending: Vec::new(),
            last_sync: Instant::now(),
            sync_every: sync_every.max(1),
        }
    }

    fn keep(&mut self, tag: u64) {
        self.kept = Some(self.kept.map_or(tag, |k| k.min(tag)));
    }

    /// The broker confirmed every ack sent so far: their dead letters are
    /// replayed.
    fn confirmed(
        &mut self,
        report: &mut ReplayReport,
        replayed: &prometheus::IntCounter,
        p: &mut Progress,
    ) {
        for copy in self.pending.drain(..) {
            report.replayed += 1;
            p.replayed += 1;
            replayed.inc();
            report.ids.push(copy.id);
        }
        self.last_sync = Instant::now();
    }

    /// Asks the broker to confirm the acks sent so far, when
    /// `sync_every` of them wait, or the broker last confirmed acks
    /// [`ReplayOptions::SYNC_INTERVAL`] ago or more. A failure stops the
    /// run and every later ack; the acks stay unconfirmed (the close of
    /// the channel may still confirm them).
    async fn sync_if_due(
        &mut self,
        scan: &Scan,
        report: &mut ReplayReport,
        replayed: &prometheus::IntCounter,
        p: &mut Progress,
    ) {
        let due = self.pending.len() >= self.sync_every
            || self.last_sync.elapsed() >= ReplayOptions::SYNC_INTERVAL;
        if self.broken || self.pending.is_empty() || !due {
            return;
        }
        match scan.sync().await {
            Ok(()) => self.confirmed(report, replayed, p),
            Err(e) => {
                info!(error = %e, unconfirmed = self.pending.len(), "confirming the acks failed: the dead letters not acked yet go back to their queue");
                self.broken = true;
                report.stop(e.to_string());
            }
        }
    }
}

/// Reads, copies and acks; returns the progress so far (the acks it
/// leaves in `acks.pending` are confirmed, or not, by the caller).
#[allow(clippy::too_many_arguments)]
async fn run(
    conn: &Connection,
    scan: &mut Scan,
    selection: &Selection,
    opts: &ReplayOptions,
    replayed: &prometheus::IntCounter,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &CancellationToken,
    to_scan: usize,
    report: &mut ReplayReport,
    acks: &mut Acks,
) -> Progress {
    let now = SystemTime::now();
    let rpc = opts.read.rpc_timeout;
    let mut publisher: Option<Confirmed<ReplayCopy>> = None;
    // Who the dropped `user_id`s named, for the one log line at the end.
    let mut dropped_users = DroppedUserIds::default();
    // Whether each place copies go to exists, checked once per run.
    let mut checked: HashMap<Needed, bool> = HashMap::new();
    let mut p = Progress {
        to_scan,
        ..Default::default()
    };
    let started = Instant::now();
    let limit = selection.limit.unwrap_or(usize::MAX);
    let result = async {
        loop {
            if cancel.is_cancelled() {
                report.stopped_early = true;
                break;
            }
            if report.selected >= limit {
                break;
            }
            let Some((tag, d)) = scan.next().await? else {
                break;
            };
            p.scanned += 1;
            if !selection.matches(&d.info, now) {
                acks.keep(tag);
                progress(p);
                continue;
            }
            report.selected += 1;
            p.selected += 1;
            if opts.dry_run {
                acks.keep(tag);
                report.ids.push(d.info.id.clone());
                progress(p);
                continue;
            }
            // From here until it is published, an error that stops the run
            // fails this message: it stays in the queue.
            let failed = |e: &OperatorError, report: &mut ReplayReport, acks: &mut Acks| {
                acks.keep(tag);
                report.fail(format!("{}: {e}", d.info.id));
            };
            let (exchange, routing_key) = match destination(&d, opts.target) {
                Ok(t) => t,
                Err(e) => {
                    acks.keep(tag);
                    report.fail(e);
                    progress(p);
                    continue;
                }
            };
            // A missing exchange or work queue would fail every copy (a
            // channel error, or every copy returned): say which and what to
            // do, and send nothing.
            let needed = if !exchange.is_empty() {
                Some(Needed::Exchange(exchange.clone()))
            } else if opts.target == Target::WorkQueue {
                Some(Needed::Queue(routing_key.clone()))
            } else {
                None
            };
            if let Some(needed) = needed {
                let exists = match checked.get(&needed) {
                    Some(e) => *e,
                    None => match needed.exists(conn, rpc).await {
                        Ok(e) => *checked.entry(needed.clone()).or_insert(e),
                        Err(e) => {
                            failed(&e, report, acks);
                            return Err(e);
                        }
                    },
                };
                if !exists {
                    acks.keep(tag);
                    report.fail(format!("{}: {}", d.info.id, needed.missing()));
                    progress(p);
                    continue;
                }
            }
            if let Some(rate) = opts.rate.filter(|r| *r > 0.0) {
                // A rate so low that the message is due past what a clock
                // can hold (`1e-300`) waits for the stop.
                let due = Duration::try_from_secs_f64(
                    report.selected.saturating_sub(1) as f64 / rate,
                )
                .ok()
                .and_then(|d| started.checked_add(d));
                let wait = async {
                    match due {
                        Some(due) => tokio::time::sleep_until(due.into()).await,
                        None => std::future::pending().await,
                    }
                };
                // A slow rate can wait for seconds: a stop must not wait with it,
                // nor send this message afterwards. Not published, it is not
                // taken: it goes back with the rest, in its place.
                tokio::select! {
                    () = wait => {}
                    () = cancel.cancelled() => {
                        acks.keep(tag);
                        report.selected -= 1;
                        p.selected -= 1;
                        report.stopped_early = true;
                        break;
                    }
                }
            }
            let confirms = match &mut publisher {
                Some(c) => c,
                None => match Confirmed::open(conn, opts.window, rpc).await {
                    Ok(c) => publisher.insert(c),
                    Err(e) => {
                        failed(&e, report, acks);
                        return Err(e);
                    }
                },
            };
            // Paced: what was confirmed while waiting for this slot is
            // removed now, not a window later (a run that breaks then
            // leaves fewer copies whose dead letter is still there).
            if opts.rate.is_some() {
                while confirms.front_settled() {
                    settle(confirms, scan, report, acks).await;
                }
                acks.sync_if_due(scan, report, replayed, &mut p).await;
                if acks.broken {
                    // The run stops (the report holds why); this one was not
                    // taken: it goes back with the rest.
                    acks.keep(tag);
                    report.selected -= 1;
                    p.selected -= 1;
                    break;
                }
            }
            let properties = replay_properties(&d.properties, opts.login.as_deref());
            let dropped_user = dropped_users.note(&d.properties, &properties);
            if dropped_user {
                debug!(group = %d.group, message_id = %d.info.id, user_id = ?d.properties.user_id(), "the copy goes without its user_id: the connection logs in as another user");
            }
            let copy = ReplayCopy {
                tag,
                id: d.info.id.clone(),
                dropped_user,
            };
            if let Err(e) = confirms
                .publish(&exchange, &routing_key, &d.body, properties, copy)
                .await
            {
                failed(&e, report, acks);
                return Err(e);
            }
            while confirms.full() {
                settle(confirms, scan, report, acks).await;
            }
            acks.sync_if_due(scan, report, replayed, &mut p).await;
            progress(p);
            if acks.broken {
                break;
            }
        }
        Ok::<(), OperatorError>(())
    }
    .await;
    if let Err(e) = result {
        let e = crate::reader::explain_cut(conn, e, rpc).await;
        info!(group = %scan_group(scan), error = %e, "the replay stops; settling the copies in flight");
        report.stop(e.to_string());
    }
    // The last acks are confirmed by the close of the scan's channel,
    // which comes next: no sync point here.
    if let Some(mut confirms) = publisher {
        while confirms.in_flight() > 0 {
            settle(&mut confirms, scan, report, acks).await;
        }
        progress(p);
        confirms.close().await;
    }
    if report.user_id_dropped > 0 {
        info!(
            group = %scan_group(scan),
            copies = report.user_id_dropped,
            user_ids = %dropped_users,
            login = opts.login.as_deref().unwrap_or("unknown"),
            "replayed without their user_id: the broker takes only the login's own user_id; every other property and header is kept"
        );
    }
    p
}

/// A copy in flight: the dead letter's delivery tag and id, and whether
/// the copy went without the dead letter's `user_id`.
struct ReplayCopy {
    tag: u64,
    id: String,
    dropped_user: bool,
}

fn scan_group(scan: &Scan) -> &str {
    scan.queue().strip_suffix(".dead").unwrap_or(scan.queue())
}

/// Takes the confirms that have resolved, oldest first, and acks their dead
/// letters: one `multiple` ack for those below the first message that stays
/// in the queue, one ack each for the others. A copy that was not
/// confirmed leaves its dead letter in the queue. A confirmed copy whose
/// ack fails (or comes after one that failed) is reported as not removed,
/// and the failure stops the run; one whose ack went out waits in
/// `acks.pending` for the broker to confirm it.
async fn settle(
    confirms: &mut Confirmed<ReplayCopy>,
    scan: &Scan,
    report: &mut ReplayReport,
    acks: &mut Acks,
) {
    let batch = confirms.next_batch().await;
    let mut below = Vec::new();
    let mut alone = Vec::new();
    for (copy, outcome) in batch {
        match outcome {
            Ok(()) => {
                if acks.kept.is_none_or(|k| copy.tag < k) {
                    below.push(copy);
                } else {
                    alone.push(copy);
                }
            }
            Err(e) => {
                acks.keep(copy.tag);
                report.fail(format!("{}: {e}", copy.id));
            }
        }
    }
    if let Some(last) = below.last().map(|c| c.tag) {
        let acked = !acks.broken && ack_or_stop(scan.ack_up_to(last).await, report, acks);
        removed(below, acked, report, acks);
    }
    for copy in alone {
        let acked = !acks.broken && ack_or_stop(scan.ack(copy.tag).await, report, acks);
        removed(vec![copy], acked, report, acks);
    }
}

/// Whether an ack went out; a failed one stops the run and every later ack.
fn ack_or_stop(r: Result<(), OperatorError>, report: &mut ReplayReport, acks: &mut Acks) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            info!(error = %e, "an ack failed: the dead letters not acked yet go back to their queue");
            acks.broken = true;
            report.stop(e.to_string());
            false
        }
    }
}

/// Counts confirmed copies: waiting for the broker to confirm their acks
/// when their dead letters were acked (an ack written is not an ack
/// handled), not removed otherwise.
fn removed(copies: Vec<ReplayCopy>, acked: bool, report: &mut ReplayReport, acks: &mut Acks) {
    for copy in copies {
        report.user_id_dropped += usize::from(copy.dropped_user);
        if acked {
            acks.pending.push(copy);
        } else {
            report.not_removed.push(copy.id);
        }
    }
}

/// Where a replay's copies go, which must exist.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Needed {
    /// The original exchange (`--to-original`).
    Exchange(String),
    /// The group's work queue, through the default exchange.
    Queue(String),
}

impl Needed {
    async fn exists(&self, conn: &Connection, rpc: Duration) -> Result<bool, OperatorError> {
        match self {
            Needed::Exchange(name) => exchange_exists(conn, name, rpc).await,
            Needed::Queue(name) => crate::reader::queue_exists(conn, name, rpc).await,
        }
    }

    /// Why a copy was not sent, and what to do.
    fn missing(&self) -> String {
        match self {
            Needed::Exchange(name) => format!(
                "exchange {name:?} does not exist: declare it (`warren topology apply` does, if the topology file has it) and replay again, or replay to the group's work queue instead (without --to-original)"
            ),
            Needed::Queue(name) => format!(
                "work queue {name:?} does not exist: `warren topology apply` declares it; then replay again"
            ),
        }
    }
}

/// Whether exchange `name` exists: a passive declare on a channel of its
/// own. Only the broker's NOT_FOUND (404, which closes that channel) means
/// it does not; any other answer (ACCESS_REFUSED, a closed channel or
/// connection) says nothing about the exchange and is an
/// [`OperatorError::ExchangeCheck`], which stops the replay: read as "does
/// not exist", it would fail every dead letter bound there with a wrong
/// reason.
async fn exchange_exists(
    conn: &Connection,
    name: &str,
    rpc: Duration,
) -> Result<bool, OperatorError> {
    let ch = timed(rpc, "opening a channel", name, conn.create_channel()).await?;
    let r = tokio::time::timeout(
        rpc,
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    match r {
        Ok(r) => {
            let exists = exchange_check(name, r)?;
            if exists {
                let _ = tokio::time::timeout(rpc, ch.close(200, "checked".into())).await;
            }
            Ok(exists)
        }
        Err(_) => Err(OperatorError::Timeout {
            what: "checking that the exchange exists",
            object: name.to_owned(),
            after: rpc,
        }),
    }
}

/// What a passive declare of exchange `name` answered: it exists, it does
/// not (NOT_FOUND), or the check failed.
fn exchange_check(name: &str, r: Result<(), lapin::Error>) -> Result<bool, OperatorError> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if is_soft_error(&e, AMQPSoftError::NOTFOUND) => Ok(false),
        Err(source) => Err(OperatorError::ExchangeCheck {
            exchange: name.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_resets_attempts_and_counts_replays() {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPTS.into(), AMQPValue::ShortShortUInt(5));
        h.insert(headers::REPLAYS.into(), AMQPValue::LongInt(2));
        h.insert("keep".into(), AMQPValue::LongString("me".into()));
        h.insert(headers::DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        let p = BasicProperties::default()
            .with_headers(h)
            .with_message_id("m".into())
            .with_expiration("8000".into())
            .with_priority(3);
        let r = replay_properties(&p, None);
        let rh = r.headers().clone().unwrap();
        assert_eq!(
            rh.inner().get(headers::ATTEMPTS),
            Some(&AMQPValue::LongLongInt(0))
        );
        assert_eq!(
            rh.inner().get(headers::REPLAYS),
            Some(&AMQPValue::LongLongInt(3))
        );
        assert_eq!(
            rh.inner().get("keep"),
            Some(&AMQPValue::LongString("me".into()))
        );
        assert_eq!(r.message_id(), p.message_id());
        assert_eq!(r.priority(), &Some(3));
        // A replayed dead letter must not expire or claim old deliveries.
        assert_eq!(r.expiration(), &None);
        assert!(!rh.inner().contains_key(headers::DELIVERY_COUNT));
    }

    fn broker_said(kind: lapin::protocol::AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(kind, text.into())).into()
    }

    /// Only NOT_FOUND means "no such exchange"; every other answer stops the
    /// replay with an error that names the exchange and what the broker (or
    /// the connection) said. The broker's own 403 and the 404 are checked on
    /// the real broker too (tests/dlq.rs); a connection closed at the very
    /// moment of the check cannot be arranged there, so it is checked here.
    #[test]
    fn only_not_found_means_the_exchange_is_missing() {
        use lapin::protocol::{AMQPErrorKind, AMQPHardError};
        assert!(exchange_check("orders", Ok(())).unwrap());
        let missing = broker_said(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no exchange 'orders' in vhost '/'",
        );
        assert!(!exchange_check("orders", Err(missing)).unwrap());
        let refused = broker_said(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - access to exchange 'orders' in vhost '/' refused for user 'ops'",
        );
        let forced = broker_said(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - Closed via management plugin",
        );
        let closed: lapin::Error =
            lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into();
        let reset: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        for (e, said) in [
            (
                refused,
                "ACCESS_REFUSED - access to exchange 'orders' in vhost '/' refused for user 'ops'",
            ),
            (forced, "CONNECTION_FORCED - Closed via management plugin"),
            (closed, "invalid connection state: Closed"),
            (reset, "connection reset"),
        ] {
            let err = exchange_check("orders", Err(e)).unwrap_err();
            assert!(
                matches!(&err, OperatorError::ExchangeCheck { exchange, .. } if exchange == "orders"),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.starts_with("checking that exchange \"orders\" exists failed: "),
                "{text}"
            );
            assert!(text.contains(said), "{text}");
            assert!(
                text.ends_with("fix what the broker says, then replay again"),
                "{text}"
            );
        }
    }

    #[test]
    fn replay_keeps_the_user_id_of_the_login_only() {
        let p = BasicProperties::default().with_user_id("svc".into());
        let kept = replay_properties(&p, Some("svc"));
        assert_eq!(kept.user_id().as_ref().map(|u| u.as_str()), Some("svc"));
        for login in [Some("ops"), None] {
            let copy = replay_properties(&p, login);
            assert_eq!(copy.user_id(), &None, "{login:?}");
            assert_eq!(copy.with_user_id("svc".into()), kept, "{login:?}");
        }
    }
}
