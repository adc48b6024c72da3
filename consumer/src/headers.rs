//! The pure header logic of the message contract: reading the attempt count
//! (malformed values are treated as absent and logged), and building the
//! headers of a retry or dead-letter copy. No I/O here, so every rule is
//! unit-tested.

use std::collections::BTreeMap;
use std::time::SystemTime;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use tracing::warn;
use warren_topology::headers;

use crate::handler::ErrorKind;

/// The largest `x-warren-attempts` value taken at face value. Anything above
/// is treated as malformed (absent): no topology has that many tiers, and a
/// huge count must never overflow or pin a message in a loop.
pub const MAX_ATTEMPTS: u32 = 10_000;

/// Why an incoming `x-warren-attempts` value was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// An integer below zero.
    Negative(i64),
    /// An integer above [`MAX_ATTEMPTS`].
    TooLarge(u64),
    /// Not an integer at all (string, float, table, ...).
    WrongType(&'static str),
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Negative(v) => write!(f, "negative value {v}"),
            Malformed::TooLarge(v) => write!(f, "value {v} above {MAX_ATTEMPTS}"),
            Malformed::WrongType(t) => write!(f, "a {t}, not an integer"),
        }
    }
}

fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "boolean",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "float",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "string",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "byte array",
        AMQPValue::Void => "void",
        _ => "integer",
    }
}

/// Reads an attempt count from one header value. `Ok(n)` for a valid
/// integer in `0..=MAX_ATTEMPTS`.
pub(crate) fn parse_attempts(v: &AMQPValue) -> Result<u32, Malformed> {
    let wide: i128 = match v {
        AMQPValue::ShortShortInt(i) => i128::from(*i),
        AMQPValue::ShortShortUInt(i) => i128::from(*i),
        AMQPValue::ShortInt(i) => i128::from(*i),
        AMQPValue::ShortUInt(i) => i128::from(*i),
        AMQPValue::LongInt(i) => i128::from(*i),
        AMQPValue::LongUInt(i) => i128::from(*i),
        AMQPValue::LongLongInt(i) => i128::from(*i),
        other => return Err(Malformed::WrongType(type_name(other))),
    };
    if wide < 0 {
        return Err(Malformed::Negative(i64::try_from(wide).unwrap_or(i64::MIN)));
    }
    match u32::try_from(wide) {
        Ok(n) if n <= MAX_ATTEMPTS => Ok(n),
        _ => Err(Malformed::TooLarge(u64::try_from(wide).unwrap_or(u64::MAX))),
    }
}

/// Failed attempts so far, from a message's headers: absent = 0; malformed
/// = 0, logged with the group and message id (the next copy carries a
/// valid count).
pub(crate) fn attempts(headers: Option<&FieldTable>, group: &str, message_id: &str) -> u32 {
    let Some(v) = headers.and_then(|h| h.inner().get(headers::ATTEMPTS)) else {
        return 0;
    };
    match parse_attempts(v) {
        Ok(n) => n,
        Err(why) => {
            warn!(
                header = headers::ATTEMPTS,
                problem = %why,
                group,
                message_id,
                "malformed header treated as absent; it is rewritten on the next hop"
            );
            0
        }
    }
}

/// An error text as the contract stores it: one line (control characters
/// and line breaks become spaces), at most [`headers::MAX_ERROR_BYTES`] bytes,
/// cut on a character boundary.
pub fn one_line_error(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(headers::MAX_ERROR_BYTES));
    let mut last_space = false;
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        if out.len() + c.len_utf8() > headers::MAX_ERROR_BYTES {
            break;
        }
        out.push(c);
    }
    out.trim_end().to_owned()
}

/// RFC 3339 UTC with milliseconds.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

fn is_string(v: Option<&AMQPValue>) -> bool {
    matches!(
        v,
        Some(AMQPValue::LongString(_)) | Some(AMQPValue::ShortString(_))
    )
}

/// Where a failed copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyTarget {
    /// A retry tier.
    Retry,
    /// The dead-letter exchange.
    DeadLetter,
}

/// What the copy's headers say about the failure.
#[derive(Debug, Clone)]
pub(crate) struct Failure<'a> {
    pub kind: ErrorKind,
    pub error: &'a str,
    pub group: &'a str,
    /// Failed attempts including this one.
    pub attempts: u32,
    /// Where the delivery came from (used only when the message carries no
    /// original exchange / routing key yet).
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub now: SystemTime,
    pub target: CopyTarget,
}

/// The headers of a retry or dead-letter copy: every incoming header kept
/// (`x-death` untouched, trace context, user headers), the warren failure
/// headers set or updated.
pub(crate) fn failure_headers(incoming: Option<&FieldTable>, f: &Failure<'_>) -> FieldTable {
    let mut map: BTreeMap<ShortString, AMQPValue> =
        incoming.map(|h| h.inner().clone()).unwrap_or_default();
    map.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(f.attempts)),
    );
    map.insert(headers::ERROR.into(), long_string(&one_line_error(f.error)));
    map.insert(headers::ERROR_KIND.into(), long_string(f.kind.as_str()));
    map.insert(headers::GROUP.into(), long_string(f.group));
    // Set on the first failure, then kept (a malformed value is replaced).
    if !is_string(map.get(headers::ORIGINAL_EXCHANGE)) {
        map.insert(headers::ORIGINAL_EXCHANGE.into(), long_string(f.exchange));
    }
    if !is_string(map.get(headers::ORIGINAL_ROUTING_KEY)) {
        map.insert(
            headers::ORIGINAL_ROUTING_KEY.into(),
            long_string(f.routing_key),
        );
    }
    if !is_string(map.get(headers::FIRST_FAILED_AT)) {
        map.insert(
            headers::FIRST_FAILED_AT.into(),
            long_string(&rfc3339(f.now)),
        );
    }
    if f.target == CopyTarget::DeadLetter {
        map.insert(
            headers::DEAD_LETTERED_AT.into(),
            long_string(&rfc3339(f.now)),
        );
    }
    FieldTable::from(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn table(k: &str, v: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(k.into(), v);
        t
    }

    #[test]
    fn valid_integers_of_every_width_are_read() {
        assert_eq!(parse_attempts(&AMQPValue::ShortShortUInt(3)), Ok(3));
        assert_eq!(parse_attempts(&AMQPValue::ShortInt(2)), Ok(2));
        assert_eq!(parse_attempts(&AMQPValue::LongInt(0)), Ok(0));
        assert_eq!(parse_attempts(&AMQPValue::LongUInt(7)), Ok(7));
        assert_eq!(parse_attempts(&AMQPValue::LongLongInt(10_000)), Ok(10_000));
    }

    #[test]
    fn malformed_attempts_are_rejected_with_a_reason() {
        assert_eq!(
            parse_attempts(&AMQPValue::LongLongInt(-1)),
            Err(Malformed::Negative(-1))
        );
        assert_eq!(
            parse_attempts(&AMQPValue::LongLongInt(i64::MAX)),
            Err(Malformed::TooLarge(i64::MAX as u64))
        );
        assert_eq!(
            parse_attempts(&AMQPValue::LongLongInt(i64::MIN)),
            Err(Malformed::Negative(i64::MIN))
        );
        assert_eq!(
            parse_attempts(&AMQPValue::LongUInt(u32::MAX)),
            Err(Malformed::TooLarge(u64::from(u32::MAX)))
        );
        assert_eq!(
            parse_attempts(&AMQPValue::LongString(LongString::from("3"))),
            Err(Malformed::WrongType("string"))
        );
        assert_eq!(
            parse_attempts(&AMQPValue::Double(1.0)),
            Err(Malformed::WrongType("float"))
        );
        assert_eq!(
            parse_attempts(&AMQPValue::Boolean(true)),
            Err(Malformed::WrongType("boolean"))
        );
        assert_eq!(
            parse_attempts(&AMQPValue::FieldArray(FieldArray::default())),
            Err(Malformed::WrongType("array"))
        );
    }

    #[test]
    fn malformed_attempts_count_as_absent() {
        assert_eq!(attempts(None, "g", "m"), 0);
        let t = table(headers::ATTEMPTS, AMQPValue::LongString("lots".into()));
        assert_eq!(attempts(Some(&t), "g", "m"), 0);
        let t = table(headers::ATTEMPTS, AMQPValue::LongLongInt(-5));
        assert_eq!(attempts(Some(&t), "g", "m"), 0);
        let t = table(headers::ATTEMPTS, AMQPValue::LongLongInt(2));
        assert_eq!(attempts(Some(&t), "g", "m"), 2);
    }

    /// The fields of every event logged while `f` runs.
    fn logged(f: impl FnOnce()) -> Vec<BTreeMap<String, String>> {
        use std::sync::{Arc, Mutex};
        use tracing::field::{Field, Visit};
        struct Fields<'a>(&'a mut BTreeMap<String, String>);
        impl Visit for Fields<'_> {
            fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
                self.0.insert(f.name().to_owned(), format!("{v:?}"));
            }
            fn record_str(&mut self, f: &Field, v: &str) {
                self.0.insert(f.name().to_owned(), v.to_owned());
            }
        }
        struct Capture(Arc<Mutex<Vec<BTreeMap<String, String>>>>);
        impl tracing::Subscriber for Capture {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, e: &tracing::Event<'_>) {
                let mut m = BTreeMap::new();
                e.record(&mut Fields(&mut m));
                self.0.lock().unwrap_or_else(|p| p.into_inner()).push(m);
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        let events = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Capture(events.clone()), f);
        let v = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v
    }

    #[test]
    fn a_malformed_count_is_logged_with_its_group_and_message_id() {
        let t = table(headers::ATTEMPTS, AMQPValue::LongLongInt(-5));
        let events = logged(|| assert_eq!(attempts(Some(&t), "billing", "m-1"), 0));
        assert_eq!(events.len(), 1, "{events:?}");
        let e = &events[0];
        assert_eq!(e.get("group").map(String::as_str), Some("billing"), "{e:?}");
        assert_eq!(e.get("message_id").map(String::as_str), Some("m-1"));
        assert_eq!(
            e.get("problem").map(String::as_str),
            Some("negative value -5")
        );
    }

    #[test]
    fn errors_become_one_short_line() {
        assert_eq!(one_line_error("a\nb\r\n\tc"), "a b c");
        let long = "é".repeat(2000);
        let cut = one_line_error(&long);
        assert!(cut.len() <= headers::MAX_ERROR_BYTES);
        assert_eq!(cut.len(), 1024);
        let long = format!("x{}", "é".repeat(2000));
        let cut = one_line_error(&long);
        assert_eq!(cut.len(), 1023, "cut on a char boundary");
    }

    fn failure(target: CopyTarget, attempts: u32) -> Failure<'static> {
        Failure {
            kind: ErrorKind::Retryable,
            error: "boom\nsecond line",
            group: "billing",
            attempts,
            exchange: "orders",
            routing_key: "order.created",
            now: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            target,
        }
    }

    #[test]
    fn first_failure_sets_every_header_and_keeps_the_rest() {
        let mut incoming = FieldTable::default();
        incoming.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        incoming.insert("traceparent".into(), AMQPValue::LongString("00-abc".into()));
        incoming.insert(headers::ATTEMPTS.into(), AMQPValue::Double(9.5));
        let h = failure_headers(Some(&incoming), &failure(CopyTarget::Retry, 1));
        let m = h.inner();
        assert_eq!(m[headers::ATTEMPTS], AMQPValue::LongLongInt(1));
        assert_eq!(m[headers::ERROR], long_string("boom second line"));
        assert_eq!(m[headers::ERROR_KIND], long_string("retryable"));
        assert_eq!(m[headers::GROUP], long_string("billing"));
        assert_eq!(m[headers::ORIGINAL_EXCHANGE], long_string("orders"));
        assert_eq!(
            m[headers::ORIGINAL_ROUTING_KEY],
            long_string("order.created")
        );
        assert_eq!(
            m[headers::FIRST_FAILED_AT],
            long_string("2023-11-14T22:13:20.123Z")
        );
        assert!(!m.contains_key(headers::DEAD_LETTERED_AT));
        assert_eq!(m["x-death"], AMQPValue::FieldArray(FieldArray::default()));
        assert_eq!(m["traceparent"], long_string("00-abc"));
    }

    #[test]
    fn later_failures_keep_the_original_route_and_first_failure() {
        let first = failure_headers(None, &failure(CopyTarget::Retry, 1));
        let mut later = failure(CopyTarget::DeadLetter, 2);
        later.exchange = "";
        later.routing_key = "billing";
        later.now = SystemTime::UNIX_EPOCH;
        let h = failure_headers(Some(&first), &later);
        let m = h.inner();
        assert_eq!(m[headers::ATTEMPTS], AMQPValue::LongLongInt(2));
        assert_eq!(m[headers::ORIGINAL_EXCHANGE], long_string("orders"));
        assert_eq!(
            m[headers::ORIGINAL_ROUTING_KEY],
            long_string("order.created")
        );
        assert_eq!(
            m[headers::FIRST_FAILED_AT],
            long_string("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(
            m[headers::DEAD_LETTERED_AT],
            long_string("1970-01-01T00:00:00.000Z")
        );
    }
}
