//! [`Message`]: what to publish, and [`Confirmed`]: what a confirm says.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use serde::Serialize;

use crate::error::PublishError;

/// `content_type` of messages built with [`Message::json`].
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// `content_type` of messages built with [`Message::bytes`] when the caller
/// set none.
pub const BYTES_CONTENT_TYPE: &str = "application/octet-stream";
/// `delivery_mode` of persistent messages.
pub const PERSISTENT: u8 = 2;

/// One message to publish: where, the body, AMQP properties and headers, and
/// optionally its own timeout.
///
/// Unless set here, the publisher sets `message_id` (a UUID v4),
/// `timestamp` (now, in seconds), `content_type` (`application/json` for
/// [`Message::json`], `application/octet-stream` for [`Message::bytes`]) and
/// `delivery_mode=2` (persistent).
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
    pub(crate) timeout: Option<Duration>,
    json: bool,
    as_is: bool,
}

impl Message {
    /// Raw bytes to `exchange` with `routing_key`.
    pub fn bytes(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            properties: BasicProperties::default(),
            timeout: None,
            json: false,
            as_is: false,
        }
    }

    /// Any `Serialize` value as a JSON body.
    pub fn json<T: Serialize + ?Sized>(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        value: &T,
    ) -> Result<Self, PublishError> {
        let body = serde_json::to_vec(value)?;
        let mut m = Message::bytes(exchange, routing_key, body);
        m.json = true;
        Ok(m)
    }

    /// Sets the AMQP properties. Headers set before (with
    /// [`Message::header`] or [`Message::headers`]) are kept unless
    /// `properties` holds headers of its own, which replace them. Properties
    /// left unset get the publisher's defaults.
    pub fn properties(mut self, properties: BasicProperties) -> Self {
        let headers = self.properties.headers().clone();
        self.properties = properties;
        if let (None, Some(h)) = (self.properties.headers(), headers) {
            self.properties = std::mem::take(&mut self.properties).with_headers(h);
        }
        self
    }

    /// Adds (or replaces) one header. A string is an
    /// `AMQPValue::LongString` (`AMQPValue::LongString("acme".into())`);
    /// never an `AMQPValue::ShortString`, which RabbitMQ cannot read in a
    /// header table (such a message fails with [`PublishError::Invalid`],
    /// unsent). Integers are `AMQPValue::LongLongInt` for RabbitMQ's `long`,
    /// the type its tools and a `headers` exchange binding declared with a
    /// JSON number use.
    pub fn header(mut self, key: &str, value: impl Into<AMQPValue>) -> Self {
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(ShortString::from(key), value.into());
        self.properties = self.properties.with_headers(headers);
        self
    }

    /// Replaces every header.
    pub fn headers(mut self, headers: FieldTable) -> Self {
        self.properties = self.properties.with_headers(headers);
        self
    }

    /// Publishes the properties exactly as given: no `timestamp`,
    /// `content_type` or `delivery_mode` defaults. Only a missing
    /// `message_id` is still filled, because returned messages are matched
    /// to their publish by it. For forwarding a message that already exists
    /// (a consumer's retry or dead-letter copy).
    pub fn as_is(mut self) -> Self {
        self.as_is = true;
        self
    }

    /// This message's own timeout instead of `PublisherConfig::publish_timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The exchange.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The properties as given (before the publisher's defaults).
    pub fn props(&self) -> &BasicProperties {
        &self.properties
    }

    /// What would make the broker close the whole connection on this
    /// message, found in one walk over its headers (no allocation unless
    /// something is found): an `AMQPValue::ShortString` in the headers,
    /// which lapin writes with a type tag RabbitMQ cannot read (541
    /// INTERNAL_ERROR), or properties that do not fit in a content-header
    /// frame of `frame_max` bytes. The exact encoding is only done when the
    /// walk's upper bound says they might not fit.
    pub(crate) fn header_problem(&self, frame_max: u32) -> Option<HeaderProblem> {
        let headers = self.properties.headers().as_ref();
        let scan = headers.map_or(Scan::default(), table_scan);
        if scan.short_string {
            let path = headers.and_then(|t| short_string_in_table(t, ""));
            return Some(HeaderProblem::ShortString(path.unwrap_or_default()));
        }
        let room = header_room(frame_max);
        if SHORT_PROPERTIES + scan.bound <= room {
            return None;
        }
        let size = encoded_len(&self.properties);
        (size > room).then_some(HeaderProblem::TooLarge(size))
    }

    /// Whether the properties and headers fit in one content-header frame
    /// of `frame_max` bytes (AMQP's limit; see [`Publisher::publish`], which
    /// refuses a message that does not fit its connection's frame). Cheap
    /// unless the headers come near the limit: an upper bound is walked
    /// first, the exact encoding done only when it says they might not fit.
    ///
    /// [`Publisher::publish`]: crate::Publisher::publish
    pub fn fits_in_frame(&self, frame_max: u32) -> bool {
        !matches!(
            self.header_problem(frame_max),
            Some(HeaderProblem::TooLarge(_))
        )
    }

    /// [`Message::fits_in_frame`] for the message as
    /// [`Publisher::publish`] sends it: with the id, timestamp, content type
    /// and delivery mode it adds where none is given (their encoded sizes do
    /// not depend on their values). For checking properties shared by many
    /// messages before anything is sent; the body does not count.
    ///
    /// [`Publisher::publish`]: crate::Publisher::publish
    pub fn fits_in_frame_as_sent(&self, frame_max: u32) -> bool {
        let mut sent = Message {
            exchange: String::new(),
            routing_key: String::new(),
            body: Vec::new(),
            properties: self.properties.clone(),
            timeout: None,
            json: self.json,
            as_is: self.as_is,
        };
        sent.finish_properties();
        sent.fits_in_frame(frame_max)
    }

    /// Fills the defaults the message contract asks for and returns the
    /// message id.
    pub(crate) fn finish_properties(&mut self) -> String {
        let mut p = std::mem::take(&mut self.properties);
        let id = match p.message_id() {
            Some(id) => id.to_string(),
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                p = p.with_message_id(ShortString::from(id.as_str()));
                id
            }
        };
        if self.as_is {
            self.properties = p;
            return id;
        }
        if p.timestamp().is_none() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            p = p.with_timestamp(now);
        }
        if p.content_type().is_none() {
            let ct = if self.json {
                JSON_CONTENT_TYPE
            } else {
                BYTES_CONTENT_TYPE
            };
            p = p.with_content_type(ShortString::from(ct));
        }
        if p.delivery_mode().is_none() {
            p = p.with_delivery_mode(PERSISTENT);
        }
        self.properties = p;
        id
    }
}

fn short_string_in_table(t: &FieldTable, path: &str) -> Option<String> {
    t.inner().iter().find_map(|(k, v)| {
        let here = if path.is_empty() {
            k.as_str().to_owned()
        } else {
            format!("{path}.{}", k.as_str())
        };
        short_string_in_value(v, here)
    })
}

fn short_string_in_value(v: &AMQPValue, path: String) -> Option<String> {
    match v {
        AMQPValue::ShortString(_) => Some(path),
        AMQPValue::FieldTable(t) => short_string_in_table(t, &path),
        AMQPValue::FieldArray(a) => a
            .as_slice()
            .iter()
            .enumerate()
            .find_map(|(i, v)| short_string_in_value(v, format!("{path}[{i}]"))),
        _ => None,
    }
}

/// A confirmed publish: the broker has the message (on disk, for durable
/// queues and persistent messages).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Confirmed {
    /// The message's `message_id` (the caller's or the generated UUID).
    pub message_id: String,
    /// How many times it was sent (more than 1 after a reconnect: the broker
    /// may hold more than one copy, at-least-once).
    pub attempts: u32,
    /// From the call to the confirm.
    pub elapsed: Duration,
}

/// The most bytes of encoded properties a content-header frame of
/// `frame_max` bytes can carry: the frame spends 8 bytes on its type,
/// channel, size and end marker, and the payload 12 on class, weight and
/// body size. This is AMQP's limit; RabbitMQ tolerates a few bytes more
/// (measured: one more byte was accepted), other brokers and proxies need
/// not, so warren keeps to the specification.
pub(crate) fn header_room(frame_max: u32) -> usize {
    usize::try_from(frame_max)
        .unwrap_or(usize::MAX)
        .saturating_sub(8 + 12)
}

/// The properties' size in AMQP's encoding, as lapin will send them.
fn encoded_len(p: &BasicProperties) -> usize {
    let gen = lapin::protocol::basic::gen_properties(p);
    match gen(Vec::<u8>::new().into()) {
        Ok(ctx) => usize::try_from(ctx.position).unwrap_or(usize::MAX),
        // Encoding into a Vec does not fail; if it did, lapin would fail the
        // same way, and the publish reports that.
        Err(_) => 0,
    }
}

/// Why [`Message::header_problem`] refuses a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    /// A header value is an `AMQPValue::ShortString`, at this path
    /// (`"name"`, `"table.inner"`, `"list[2]"`).
    ShortString(String),
    /// The properties are this many bytes encoded, over the frame's room.
    TooLarge(usize),
}

/// An upper bound of the encoded size of everything but the headers:
/// flags, ten short strings at their 255-byte maximum, the timestamp,
/// delivery mode and priority.
const SHORT_PROPERTIES: usize = 2 + 10 * 256 + 8 + 2;

/// One walk over a header table: an upper bound of its encoded size, and
/// whether a value in it (at any depth) is an `AMQPValue::ShortString`.
#[derive(Debug, Default, Clone, Copy)]
struct Scan {
    bound: usize,
    short_string: bool,
}

impl Scan {
    fn add(self, other: Scan) -> Scan {
        Scan {
            bound: self.bound + other.bound,
            short_string: self.short_string || other.short_string,
        }
    }
}

fn table_scan(t: &FieldTable) -> Scan {
    t.inner().iter().fold(
        Scan {
            bound: 4,
            short_string: false,
        },
        |acc, (k, v)| {
            acc.add(Scan {
                bound: 1 + k.as_str().len(),
                short_string: false,
            })
            .add(value_scan(v))
        },
    )
}

fn value_scan(v: &AMQPValue) -> Scan {
    let inner = match v {
        AMQPValue::LongString(s) => Scan {
            bound: 4 + s.as_bytes().len(),
            short_string: false,
        },
        AMQPValue::ShortString(s) => Scan {
            bound: 1 + s.as_str().len(),
            short_string: true,
        },
        AMQPValue::ByteArray(b) => Scan {
            bound: 4 + b.as_slice().len(),
            short_string: false,
        },
        AMQPValue::FieldTable(t) => table_scan(t),
        AMQPValue::FieldArray(a) => a.as_slice().iter().fold(
            Scan {
                bound: 4,
                short_string: false,
            },
            |acc, v| acc.add(value_scan(v)),
        ),
        // Numbers, booleans, decimals, timestamps, void: at most 9 bytes.
        _ => Scan {
            bound: 9,
            short_string: false,
        },
    };
    // The type tag.
    inner.add(Scan {
        bound: 1,
        short_string: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_as_sent_counts_what_publish_adds() {
        // Headers that leave room for the given properties alone, but not
        // for the id, timestamp, content type and delivery mode publish adds.
        let frame_max = 4096;
        let given = |n: usize| {
            Message::bytes("e", "k", b"body".to_vec()).properties(
                BasicProperties::default().with_headers(FieldTable::from(
                    std::collections::BTreeMap::from([(
                        ShortString::from("h"),
                        AMQPValue::LongString("x".repeat(n).into()),
                    )]),
                )),
            )
        };
        let n = (3900..4096)
            .rev()
            .find(|&n| given(n).fits_in_frame(frame_max))
            .expect("some size fits");
        assert!(given(n).fits_in_frame(frame_max));
        assert!(!given(n).fits_in_frame_as_sent(frame_max));
        let sent = (3800..n)
            .rev()
            .find(|&n| given(n).fits_in_frame_as_sent(frame_max))
            .expect("a smaller one fits as sent");
        // The difference: a 36-byte id, an 8-byte timestamp, a 24-byte
        // content type and a delivery mode, with their lengths.
        assert!(n - sent > 60, "{n} - {sent}");
        let mut m = given(sent);
        m.finish_properties();
        assert!(m.fits_in_frame(frame_max));
    }

    #[test]
    fn as_is_fills_only_the_message_id() {
        let mut m = Message::bytes("e", "k", b"x".to_vec()).as_is();
        m.finish_properties();
        assert!(m.properties.message_id().is_some());
        assert!(m.properties.timestamp().is_none());
        assert!(m.properties.content_type().is_none());
        assert!(m.properties.delivery_mode().is_none());
    }

    #[test]
    fn defaults_fill_only_what_is_unset() {
        let mut m = Message::json("x", "k", &serde_json::json!({"a": 1})).unwrap();
        let id = m.finish_properties();
        let p = &m.properties;
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some(id.as_str())
        );
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some(JSON_CONTENT_TYPE)
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert!(p.timestamp().is_some());
        assert_eq!(m.body, br#"{"a":1}"#);

        let mut m = Message::bytes("x", "k", b"raw".to_vec())
            .properties(
                BasicProperties::default()
                    .with_message_id("mine".into())
                    .with_delivery_mode(1)
                    .with_timestamp(7)
                    .with_content_type("text/plain".into()),
            )
            .header("h", AMQPValue::LongString("v".into()));
        assert_eq!(m.finish_properties(), "mine");
        assert_eq!(*m.properties.delivery_mode(), Some(1));
        assert_eq!(*m.properties.timestamp(), Some(7));
        assert_eq!(
            m.properties.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert!(m.properties.headers().is_some());
    }

    #[test]
    fn properties_keep_earlier_headers_unless_they_bring_their_own() {
        let h = |m: &Message, k: &str| {
            m.props()
                .headers()
                .as_ref()
                .and_then(|t| t.inner().get(k).cloned())
        };
        let m = Message::bytes("x", "k", b"".to_vec())
            .header("a", AMQPValue::LongLongInt(1))
            .properties(BasicProperties::default().with_priority(3));
        assert_eq!(h(&m, "a"), Some(AMQPValue::LongLongInt(1)));
        assert_eq!(m.props().priority(), &Some(3));
        let mut own = FieldTable::default();
        own.insert("b".into(), AMQPValue::Boolean(true));
        let m = m.properties(BasicProperties::default().with_headers(own));
        assert_eq!(h(&m, "a"), None);
        assert_eq!(h(&m, "b"), Some(AMQPValue::Boolean(true)));
    }

    #[test]
    fn the_estimate_is_never_below_the_encoded_size() {
        let long = || ShortString::from("s".repeat(255));
        let mut nested = FieldTable::default();
        nested.insert("n".into(), AMQPValue::LongLongInt(-1));
        nested.insert("s".into(), AMQPValue::ShortString("short".into()));
        let mut h = FieldTable::default();
        h.insert(
            "text".into(),
            AMQPValue::LongString("x".repeat(5000).as_str().into()),
        );
        h.insert("table".into(), AMQPValue::FieldTable(nested.clone()));
        h.insert(
            "array".into(),
            AMQPValue::FieldArray(
                vec![AMQPValue::Boolean(true), AMQPValue::FieldTable(nested)].into(),
            ),
        );
        h.insert("bytes".into(), AMQPValue::ByteArray(vec![0u8; 300].into()));
        h.insert("double".into(), AMQPValue::Double(1.5));
        let full = BasicProperties::default()
            .with_content_type(long())
            .with_content_encoding(long())
            .with_correlation_id(long())
            .with_reply_to(long())
            .with_expiration(long())
            .with_message_id(long())
            .with_type(long())
            .with_user_id(long())
            .with_app_id(long())
            .with_cluster_id(long())
            .with_timestamp(1)
            .with_delivery_mode(2)
            .with_priority(9)
            .with_headers(h);
        for p in [BasicProperties::default(), full] {
            let bound = SHORT_PROPERTIES + p.headers().as_ref().map_or(0, |h| table_scan(h).bound);
            let (exact, bound) = (encoded_len(&p), bound);
            assert!(exact > 0 && bound >= exact, "{bound} < {exact}");
        }
    }

    #[test]
    fn header_room_leaves_the_frame_and_payload_overhead() {
        assert_eq!(header_room(131_072), 131_052);
        assert_eq!(header_room(4096), 4076);
        assert_eq!(header_room(0), 0);
    }
}
