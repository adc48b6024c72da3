//! [`Delivery`]: what a handler sees of a message.

use std::fmt;
use std::sync::Arc;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde::de::DeserializeOwned;

use crate::handler::HandlerError;
use crate::headers;

/// One delivered message: an owned handle, cheap to clone (the body is
/// shared, not copied), that a handler may move into spawned work.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

struct Inner {
    body: Vec<u8>,
    properties: BasicProperties,
    /// Where it was first published (the original-* headers once it failed).
    exchange: String,
    routing_key: String,
    /// Where this delivery came from (the default exchange and the group's
    /// name for a retry).
    delivered_exchange: String,
    delivered_routing_key: String,
    redelivered: bool,
    failed_attempts: u32,
    group: Arc<str>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("group", &&*self.inner.group)
            .field("message_id", &self.message_id())
            .field("exchange", &self.inner.exchange)
            .field("routing_key", &self.inner.routing_key)
            .field("redelivered", &self.inner.redelivered)
            .field("attempt", &self.attempt())
            .field("body_bytes", &self.inner.body.len())
            .finish()
    }
}

/// Where a message was first published: the original-* headers a failure
/// copy carries (when they are strings), else where this delivery came from.
fn first_published(
    properties: &BasicProperties,
    exchange: &str,
    routing_key: &str,
) -> (String, String) {
    let header = |name: &str| -> Option<String> {
        match properties.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    };
    (
        header(warren_topology::headers::ORIGINAL_EXCHANGE).unwrap_or_else(|| exchange.to_owned()),
        header(warren_topology::headers::ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| routing_key.to_owned()),
    )
}

impl Delivery {
    /// A delivery built by hand, to test a handler without a broker. The
    /// attempt number is read from the headers like the runtime does.
    pub fn new(
        group: &str,
        body: Vec<u8>,
        properties: BasicProperties,
        exchange: &str,
        routing_key: &str,
        redelivered: bool,
    ) -> Self {
        let id = properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        let failed_attempts = headers::attempts(properties.headers().as_ref(), group, &id);
        let (first_exchange, first_key) = first_published(&properties, exchange, routing_key);
        Delivery {
            inner: Arc::new(Inner {
                body,
                properties,
                exchange: first_exchange,
                routing_key: first_key,
                delivered_exchange: exchange.to_owned(),
                delivered_routing_key: routing_key.to_owned(),
                redelivered,
                failed_attempts,
                group: group.into(),
            }),
        }
    }

    pub(crate) fn from_lapin(group: Arc<str>, d: lapin::message::Delivery) -> Self {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        let failed_attempts = headers::attempts(d.properties.headers().as_ref(), &group, &id);
        let (exchange, routing_key) =
            first_published(&d.properties, d.exchange.as_str(), d.routing_key.as_str());
        Delivery {
            inner: Arc::new(Inner {
                body: d.data,
                properties: d.properties,
                exchange,
                routing_key,
                delivered_exchange: d.exchange.to_string(),
                delivered_routing_key: d.routing_key.to_string(),
                redelivered: d.redelivered,
                failed_attempts,
                group,
            }),
        }
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.inner.body
    }

    /// The AMQP properties (content type, timestamp, correlation id...).
    pub fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }

    /// The headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.inner.properties.headers().as_ref()
    }

    /// One header's value.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.headers().and_then(|h| h.inner().get(name))
    }

    /// One header's value when it is a string.
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.header(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }

    /// The exchange it was first published to. A retry comes back through
    /// the default exchange; this still names the original one (from
    /// `x-warren-original-exchange`), so handlers see the same message on
    /// every attempt.
    pub fn exchange(&self) -> &str {
        &self.inner.exchange
    }

    /// The routing key it was first published with (a retry's own key is the
    /// group's name; this is the original, from `x-warren-original-routing-key`).
    pub fn routing_key(&self) -> &str {
        &self.inner.routing_key
    }

    /// The exchange this delivery actually came through (`""` for a retry).
    pub fn delivered_exchange(&self) -> &str {
        &self.inner.delivered_exchange
    }

    /// The routing key this delivery actually came with (the group's name for
    /// a retry).
    pub fn delivered_routing_key(&self) -> &str {
        &self.inner.delivered_routing_key
    }

    /// The `message_id` property (use it to make handlers idempotent).
    pub fn message_id(&self) -> Option<&str> {
        self.inner
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// Whether the broker delivered it before (to this or another consumer)
    /// without an ack.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// This attempt's number, 1-based: failed attempts so far + 1.
    pub fn attempt(&self) -> u32 {
        self.inner.failed_attempts.saturating_add(1)
    }

    /// Failed attempts so far (`x-warren-attempts`; malformed = 0).
    pub fn failed_attempts(&self) -> u32 {
        self.inner.failed_attempts
    }

    /// Why the previous attempt failed (`x-warren-error`: one line, at
    /// most 1 KiB), or `None` on a first attempt. A message an operator
    /// replayed keeps it (with [`Delivery::attempt`] back at 1).
    pub fn last_error(&self) -> Option<String> {
        self.header_str(warren_topology::headers::ERROR)
    }

    /// The kind of the previous failure (`x-warren-error-kind`):
    /// `retryable`, `timeout` or `panic` on a retry; on a replayed message
    /// also `permanent`, `decode` or `broker`.
    pub fn last_error_kind(&self) -> Option<String> {
        self.header_str(warren_topology::headers::ERROR_KIND)
    }

    /// The consumer group handling it.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// Decodes the body as JSON. Fails with kind `decode`, which dead-letters
    /// the message at once: `let order: Order = d.json()?;`
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.inner.body)
            .map_err(|e| HandlerError::decode(format!("body is not the expected JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_says_why_the_previous_attempt_failed() {
        let fresh = Delivery::new(
            "billing",
            vec![],
            BasicProperties::default(),
            "o",
            "k",
            false,
        );
        assert_eq!((fresh.last_error(), fresh.last_error_kind()), (None, None));
        let mut h = FieldTable::default();
        h.insert(
            warren_topology::headers::ERROR.into(),
            AMQPValue::LongString("upstream 503".into()),
        );
        h.insert(
            warren_topology::headers::ERROR_KIND.into(),
            AMQPValue::LongString("timeout".into()),
        );
        h.insert(
            warren_topology::headers::ATTEMPTS.into(),
            AMQPValue::LongLongInt(1),
        );
        let retry = Delivery::new(
            "billing",
            vec![],
            BasicProperties::default().with_headers(h),
            "",
            "billing",
            false,
        );
        assert_eq!(retry.attempt(), 2);
        assert_eq!(retry.last_error().as_deref(), Some("upstream 503"));
        assert_eq!(retry.last_error_kind().as_deref(), Some("timeout"));
    }

    #[test]
    fn a_retry_reports_where_the_message_was_first_published() {
        let fresh = Delivery::new(
            "billing",
            b"{}".to_vec(),
            BasicProperties::default(),
            "orders",
            "order.paid",
            false,
        );
        assert_eq!(
            (fresh.exchange(), fresh.routing_key()),
            ("orders", "order.paid")
        );

        let mut h = FieldTable::default();
        h.insert(
            warren_topology::headers::ORIGINAL_EXCHANGE.into(),
            AMQPValue::LongString("orders".into()),
        );
        h.insert(
            warren_topology::headers::ORIGINAL_ROUTING_KEY.into(),
            AMQPValue::LongString("order.paid".into()),
        );
        let retry = Delivery::new(
            "billing",
            b"{}".to_vec(),
            BasicProperties::default().with_headers(h),
            "",
            "billing",
            false,
        );
        assert_eq!(
            (retry.exchange(), retry.routing_key()),
            ("orders", "order.paid")
        );
        assert_eq!(
            (retry.delivered_exchange(), retry.delivered_routing_key()),
            ("", "billing")
        );

        let mut bad = FieldTable::default();
        bad.insert(
            warren_topology::headers::ORIGINAL_ROUTING_KEY.into(),
            AMQPValue::LongLongInt(7),
        );
        let malformed = Delivery::new(
            "billing",
            vec![],
            BasicProperties::default().with_headers(bad),
            "",
            "billing",
            false,
        );
        assert_eq!(
            malformed.routing_key(),
            "billing",
            "a malformed header is ignored"
        );
    }
}
