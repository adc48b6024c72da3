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
    exchange: String,
    routing_key: String,
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
        let failed_attempts = headers::attempts(properties.headers().as_ref(), &id);
        Delivery {
            inner: Arc::new(Inner {
                body,
                properties,
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
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
        let failed_attempts = headers::attempts(d.properties.headers().as_ref(), &id);
        Delivery {
            inner: Arc::new(Inner {
                body: d.data,
                properties: d.properties,
                exchange: d.exchange.to_string(),
                routing_key: d.routing_key.to_string(),
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

    /// The exchange it was delivered through (empty for the default exchange,
    /// which retries come back through).
    pub fn exchange(&self) -> &str {
        &self.inner.exchange
    }

    /// The routing key it was delivered with.
    pub fn routing_key(&self) -> &str {
        &self.inner.routing_key
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
