//! `stats`, `list` and `show`: reading dead letters without changing them.

use std::collections::BTreeMap;
use std::time::SystemTime;

use lapin::Connection;
use serde::Serialize;

use crate::error::OperatorError;
use crate::message::{DeadLetter, Info};
use crate::reader::{explain_cut, Coverage, ReadOptions, Reading, Scan};

/// One line of `list`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Summary {
    /// Position in the queue (0 = head, the oldest).
    pub position: usize,
    /// Age in seconds, if known.
    pub age_seconds: Option<u64>,
    /// What the headers say.
    #[serde(flatten)]
    pub info: Info,
}

impl Summary {
    fn of(d: &DeadLetter, now: SystemTime) -> Summary {
        Summary {
            position: d.position,
            age_seconds: d.info.age(now).map(|a| a.as_secs()),
            info: d.info.clone(),
        }
    }
}

/// What `list` found in one group's dead-letter queue.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// The group.
    pub group: String,
    /// Its dead-letter queue.
    pub queue: String,
    /// How much was read.
    pub coverage: Coverage,
    /// Consumers on the queue when it was read (see
    /// [`Coverage::consumers`]): the dead letters they hold unacked are
    /// neither counted nor listed.
    pub consumers: u32,
    /// The dead letters, head first.
    pub messages: Vec<Summary>,
}

/// Lists a group's dead letters (head first). Non-destructive.
pub async fn list(
    conn: &Connection,
    group: &str,
    opts: &ReadOptions,
) -> Result<Listing, OperatorError> {
    let now = SystemTime::now();
    let mut scan = Scan::open(conn, group, opts).await?;
    let mut messages = Vec::new();
    let result = async {
        while let Some((_, d)) = scan.next().await? {
            messages.push(Summary::of(&d, now));
        }
        Ok::<_, OperatorError>(())
    }
    .await;
    let queue = scan.queue().to_owned();
    let finished = scan.finish().await;
    cut_short(conn, result, opts).await?;
    let coverage = finished?;
    Ok(Listing {
        group: group.to_owned(),
        queue,
        coverage,
        consumers: coverage.consumers,
        messages,
    })
}

/// A failure group: dead letters whose errors share a fingerprint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FailureGroup {
    /// The fingerprint (`replay --fingerprint` takes it).
    pub fingerprint: String,
    /// The error kind.
    pub kind: String,
    /// How many dead letters.
    pub count: u64,
    /// One of the errors, as it was.
    pub example: String,
    /// The id of the message the example comes from.
    pub example_id: String,
}

/// `stats` of one group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStats {
    /// The group.
    pub group: String,
    /// Its dead-letter queue.
    pub queue: String,
    /// Messages in the queue (from the broker's count: ready ones only).
    pub count: u64,
    /// Consumers on the queue when it was read (see
    /// [`Coverage::consumers`]): the dead letters they hold unacked are
    /// not in `count` nor in the figures.
    pub consumers: u32,
    /// How much was read for the rest of the figures.
    pub coverage: Coverage,
    /// Age of the oldest dead letter, seconds.
    pub oldest_seconds: Option<u64>,
    /// Age of the newest dead letter, seconds.
    pub newest_seconds: Option<u64>,
    /// Counts by error kind.
    pub by_kind: BTreeMap<String, u64>,
    /// Failure groups, largest first.
    pub failure_groups: Vec<FailureGroup>,
}

/// Stats of a group's dead-letter queue. Non-destructive.
pub async fn stats(
    conn: &Connection,
    group: &str,
    opts: &ReadOptions,
) -> Result<GroupStats, OperatorError> {
    let listing = list(conn, group, opts).await?;
    Ok(stats_of(listing))
}

/// Stats of a listing already read.
pub fn stats_of(listing: Listing) -> GroupStats {
    let mut by_kind = BTreeMap::new();
    let mut groups: BTreeMap<String, FailureGroup> = BTreeMap::new();
    let mut oldest: Option<u64> = None;
    let mut newest: Option<u64> = None;
    for m in &listing.messages {
        *by_kind.entry(m.info.kind.clone()).or_insert(0) += 1;
        groups
            .entry(m.info.fingerprint.clone())
            .or_insert_with(|| FailureGroup {
                fingerprint: m.info.fingerprint.clone(),
                kind: m.info.kind.clone(),
                count: 0,
                example: m.info.error.clone(),
                example_id: m.info.id.clone(),
            })
            .count += 1;
        if let Some(a) = m.age_seconds {
            oldest = Some(oldest.map_or(a, |o| o.max(a)));
            newest = Some(newest.map_or(a, |n| n.min(a)));
        }
    }
    let mut failure_groups: Vec<FailureGroup> = groups.into_values().collect();
    failure_groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(a.fingerprint.cmp(&b.fingerprint))
    });
    GroupStats {
        group: listing.group,
        queue: listing.queue,
        count: listing.coverage.total,
        consumers: listing.consumers,
        coverage: listing.coverage,
        oldest_seconds: oldest,
        newest_seconds: newest,
        by_kind,
        failure_groups,
    }
}

/// Finds the dead letters with id `id` in a group's queue (usually one;
/// a message replayed and dead-lettered again can be there twice).
/// Non-destructive.
pub async fn show(
    conn: &Connection,
    group: &str,
    id: &str,
    opts: &ReadOptions,
) -> Result<(Vec<DeadLetter>, Coverage), OperatorError> {
    let mut scan = Scan::open(conn, group, opts).await?;
    let mut found = Vec::new();
    let result = async {
        while let Some((_, d)) = scan.next().await? {
            if d.info.id == id {
                found.push(d);
            }
        }
        Ok::<_, OperatorError>(())
    }
    .await;
    let finished = scan.finish().await;
    cut_short(conn, result, opts).await?;
    Ok((found, finished?))
}

/// A read's failure, made sure of ([`explain_cut`]: whether the queue is
/// gone) and said for a listing: nothing was removed, and no partial
/// result is given. It comes before an error closing the scan (after a
/// closed channel, closing fails too).
async fn cut_short(
    conn: &Connection,
    result: Result<(), OperatorError>,
    opts: &ReadOptions,
) -> Result<(), OperatorError> {
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(explain_cut(conn, e, opts.rpc_timeout)
            .await
            .while_reading(Reading::Inspecting)),
    }
}
