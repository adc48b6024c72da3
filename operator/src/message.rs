//! [`DeadLetter`]: one message of a dead-letter queue, with what the
//! operator needs to know about it read from its headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde::Serialize;
use warren_topology::headers;

use crate::fingerprint::{content_hash, fingerprint};
use crate::value::{as_int, as_text};

/// A dead letter as read from its queue (nothing about it was changed by
/// reading it).
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// 0-based position in the queue when it was read.
    pub position: usize,
    /// The group whose dead-letter queue holds it.
    pub group: String,
    /// The exchange it reached the dead-letter queue through.
    pub exchange: String,
    /// The routing key it reached the dead-letter queue with.
    pub routing_key: String,
    /// All its properties, headers included.
    pub properties: BasicProperties,
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// What its headers say.
    pub info: Info,
}

/// What a dead letter's headers say, with the broker's `x-death` filled in
/// for messages the broker dead-lettered.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Info {
    /// `message_id`, or `h:<hash of body and headers>` when it has none.
    pub id: String,
    /// `x-warren-attempts` (absent or malformed = 0).
    pub attempts: i64,
    /// `x-warren-replays` (absent or malformed = 0).
    pub replays: i64,
    /// `retryable`, `permanent`, `timeout`, `panic`, `decode`, `broker` or
    /// `unknown`.
    pub kind: String,
    /// The error text (for `broker`: the reason from `x-death`).
    pub error: String,
    /// Fingerprint of kind and normalised error: the failure group.
    pub fingerprint: String,
    /// When it was dead-lettered (seconds since the epoch), if known.
    /// Serialized as RFC 3339 UTC (`2026-11-21T15:04:05Z`), as the
    /// `x-warren-dead-lettered-at` header has it, or `null`.
    #[serde(serialize_with = "rfc3339_or_null")]
    pub dead_lettered_at: Option<u64>,
    /// Where it was first published: exchange.
    pub original_exchange: Option<String>,
    /// Where it was first published: routing key.
    pub original_routing_key: Option<String>,
    /// Body size in bytes.
    pub size: usize,
}

/// The newest entry of the broker's `x-death` header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Death {
    reason: String,
    queue: String,
    exchange: Option<String>,
    routing_key: Option<String>,
    time: Option<u64>,
    count: Option<i64>,
}

fn latest_death(h: &FieldTable) -> Option<Death> {
    let AMQPValue::FieldArray(arr) = h.inner().get(headers::X_DEATH)? else {
        return None;
    };
    let AMQPValue::FieldTable(t) = arr.as_slice().first()? else {
        return None;
    };
    let get = |k: &str| t.inner().get(k);
    let text = |k: &str| get(k).and_then(as_text).map(str::to_owned);
    Some(Death {
        reason: text("reason").unwrap_or_else(|| "unknown".into()),
        queue: text("queue").unwrap_or_default(),
        exchange: text("exchange"),
        routing_key: match get("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => {
                keys.as_slice().first().and_then(as_text).map(str::to_owned)
            }
            _ => None,
        },
        time: match get("time") {
            Some(AMQPValue::Timestamp(t)) => Some(*t),
            _ => None,
        },
        count: get("count").and_then(as_int),
    })
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z). A time
/// beyond it (a timestamp property of `u64::MAX`, ...) is treated as absent.
pub(crate) const MAX_RFC3339_SECS: u64 = 253_402_300_799;

/// `secs` since the epoch as RFC 3339 UTC to the second; `None` beyond
/// [`MAX_RFC3339_SECS`].
pub(crate) fn rfc3339(secs: u64) -> Option<String> {
    (secs <= MAX_RFC3339_SECS).then(|| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
    })
}

fn rfc3339_or_null<S: serde::Serializer>(at: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match at.and_then(rfc3339) {
        Some(t) => s.serialize_str(&t),
        None => s.serialize_none(),
    }
}

fn rfc3339_secs(s: &str) -> Option<u64> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

impl Info {
    /// Reads what the headers say. Malformed headers count as absent.
    pub fn from_parts(properties: &BasicProperties, body: &[u8]) -> Info {
        let empty = FieldTable::default();
        let h = properties.headers().as_ref().unwrap_or(&empty);
        let get = |k: &str| h.inner().get(k);
        let text = |k: &str| get(k).and_then(as_text).map(str::to_owned);
        let count = |k: &str| get(k).and_then(as_int).filter(|n| *n >= 0).unwrap_or(0);
        let death = latest_death(h);
        // The broker dead-lettered it when its newest death is not a retry
        // tier's TTL running out (those are warren's own retries).
        let broker_death = death.as_ref().filter(|d| d.reason != "expired");
        let (kind, error, at) = match (broker_death, text(headers::ERROR_KIND)) {
            (Some(d), _) => ("broker".to_owned(), broker_error(d), d.time),
            (None, Some(kind)) => (
                kind,
                text(headers::ERROR).unwrap_or_default(),
                text(headers::DEAD_LETTERED_AT)
                    .as_deref()
                    .and_then(rfc3339_secs),
            ),
            (None, None) => match &death {
                Some(d) => ("broker".to_owned(), broker_error(d), d.time),
                None => (
                    "unknown".to_owned(),
                    text(headers::ERROR).unwrap_or_default(),
                    text(headers::DEAD_LETTERED_AT)
                        .as_deref()
                        .and_then(rfc3339_secs),
                ),
            },
        };
        // A time no calendar date can be written for is malformed: absent.
        let valid = |t: &u64| *t <= MAX_RFC3339_SECS;
        let at = at.filter(valid).or(properties.timestamp().filter(valid));
        let id = match properties.message_id() {
            Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
            _ => {
                let mut bytes = body.to_vec();
                bytes.extend_from_slice(format!("{h:?}").as_bytes());
                format!("h:{}", content_hash(&bytes))
            }
        };
        Info {
            id,
            attempts: count(headers::ATTEMPTS),
            replays: count(headers::REPLAYS),
            fingerprint: fingerprint(&kind, &error),
            kind,
            error,
            dead_lettered_at: at,
            original_exchange: text(headers::ORIGINAL_EXCHANGE)
                .or_else(|| death.as_ref().and_then(|d| d.exchange.clone())),
            original_routing_key: text(headers::ORIGINAL_ROUTING_KEY)
                .or_else(|| death.as_ref().and_then(|d| d.routing_key.clone())),
            size: body.len(),
        }
    }

    /// How long ago it was dead-lettered, if known.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        let at = UNIX_EPOCH + Duration::from_secs(self.dead_lettered_at?);
        Some(now.duration_since(at).unwrap_or_default())
    }
}

fn broker_error(d: &Death) -> String {
    let mut s = format!("{} in queue {:?}", d.reason, d.queue);
    if let Some(n) = d.count.filter(|n| *n > 1) {
        s.push_str(&format!(" ({n} times)"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn death(reason: &str, queue: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("reason".into(), AMQPValue::LongString(reason.into()));
        t.insert("queue".into(), AMQPValue::LongString(queue.into()));
        t.insert("exchange".into(), AMQPValue::LongString("orders".into()));
        t.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                LongString::from("order.created"),
            )])),
        );
        t.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("count".into(), AMQPValue::LongLongInt(1));
        AMQPValue::FieldTable(t)
    }

    #[test]
    fn warren_headers_win_after_a_ttl_retry() {
        let mut h = FieldTable::default();
        h.insert(
            headers::ERROR_KIND.into(),
            AMQPValue::LongString("permanent".into()),
        );
        h.insert(
            headers::ERROR.into(),
            AMQPValue::LongString("no such order 7".into()),
        );
        h.insert(headers::ATTEMPTS.into(), AMQPValue::ShortShortUInt(3));
        h.insert(
            headers::X_DEATH.into(),
            AMQPValue::FieldArray(vec![death("expired", "billing.retry.1")].into()),
        );
        let p = BasicProperties::default()
            .with_headers(h)
            .with_message_id("m1".into());
        let i = Info::from_parts(&p, b"{}");
        assert_eq!(i.kind, "permanent");
        assert_eq!(i.error, "no such order 7");
        assert_eq!(i.attempts, 3);
        assert_eq!(i.id, "m1");
    }

    #[test]
    fn broker_dead_letters_show_as_broker_with_the_reason() {
        let mut h = FieldTable::default();
        h.insert(
            headers::X_DEATH.into(),
            AMQPValue::FieldArray(vec![death("rejected", "billing")].into()),
        );
        let p = BasicProperties::default().with_headers(h);
        let i = Info::from_parts(&p, b"x");
        assert_eq!(i.kind, "broker");
        assert_eq!(i.error, "rejected in queue \"billing\"");
        assert_eq!(i.dead_lettered_at, Some(1_700_000_000));
        assert_eq!(i.original_routing_key.as_deref(), Some("order.created"));
        assert!(i.id.starts_with("h:"));
    }

    #[test]
    fn malformed_headers_count_as_absent() {
        let mut h = FieldTable::default();
        h.insert(
            headers::ATTEMPTS.into(),
            AMQPValue::LongString("many".into()),
        );
        h.insert(headers::REPLAYS.into(), AMQPValue::LongInt(-4));
        h.insert(headers::X_DEATH.into(), AMQPValue::Boolean(true));
        let p = BasicProperties::default().with_headers(h);
        let i = Info::from_parts(&p, b"");
        assert_eq!((i.attempts, i.replays), (0, 0));
        assert_eq!(i.kind, "unknown");
    }

    #[test]
    fn the_time_is_rfc3339_in_json_and_a_time_past_year_9999_is_absent() {
        let p = BasicProperties::default().with_timestamp(1_700_000_000);
        let v = serde_json::to_value(Info::from_parts(&p, b"")).unwrap();
        assert_eq!(v["dead_lettered_at"], "2023-11-14T22:13:20Z");
        let v = serde_json::to_value(Info::from_parts(&BasicProperties::default(), b"")).unwrap();
        assert!(v["dead_lettered_at"].is_null());
        // Before: `list` panicked adding u64::MAX seconds to the epoch.
        for t in [u64::MAX, MAX_RFC3339_SECS + 1] {
            let i = Info::from_parts(&BasicProperties::default().with_timestamp(t), b"");
            assert_eq!(i.dead_lettered_at, None);
            assert_eq!(i.age(SystemTime::now()), None);
        }
        let last = BasicProperties::default().with_timestamp(MAX_RFC3339_SECS);
        let v = serde_json::to_value(Info::from_parts(&last, b"")).unwrap();
        assert_eq!(v["dead_lettered_at"], "9999-12-31T23:59:59Z");
    }
}
