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

    /// Replaces the AMQP properties (headers included). Properties left
    /// unset get the publisher's defaults.
    pub fn properties(mut self, properties: BasicProperties) -> Self {
        self.properties = properties;
        self
    }

    /// Adds (or replaces) one header.
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

    /// Fills the defaults the message contract asks for and returns the
    /// final properties and the message id.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
