//! [`PublishError`]: why a publish was not confirmed.

use std::time::Duration;

use warren_topology::TopologyError;

/// Where a publish was when its time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// Waiting for a free slot in the window (back-pressure: the broker is
    /// slow, blocked, or away).
    Window,
    /// Waiting for a channel (the connection is down and reconnecting).
    Reconnect,
    /// Held back, never sent: the broker blocks publishing (a memory or disk
    /// alarm, `connection.blocked`).
    Blocked,
    /// Sent, waiting for the broker's confirm. The message may still reach
    /// the queue: at-least-once, so publish it again if in doubt.
    Confirm,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Window => {
                "waiting for a free slot in the publish window (the broker is slow, blocked or away)"
            }
            Stage::Reconnect => "waiting to reconnect to the broker",
            Stage::Blocked => {
                "held back, not sent: the broker blocks publishing (a memory or disk alarm; see `rabbitmqctl status`)"
            }
            Stage::Confirm => {
                "waiting for the broker's confirm (the message may or may not have reached a queue)"
            }
        })
    }
}

/// Why a publish was not confirmed. No variant ever means "sent".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker accepted the message but no queue is bound for it
    /// (`mandatory` returned it). Nothing was stored.
    #[error(
        "unroutable: {} (broker said {reply_code} {reply_text}); {}",
        unroutable_why(exchange, routing_key),
        unroutable_hint(exchange)
    )]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The broker's reply code (312 NO_ROUTE).
        reply_code: u16,
        /// The broker's reply text.
        reply_text: String,
    },
    /// The broker nacked the message (basic.nack): a queue it was routed to
    /// refused it (at its `x-max-length` with `x-overflow=reject-publish`)
    /// or failed to store it. RabbitMQ nacks a message when any of its
    /// queues refuses it, so the other queues it was routed to may hold a
    /// copy: publishing it again can duplicate it there.
    #[error("the broker nacked the message to exchange {exchange:?} with routing key {routing_key:?}: a queue it was routed to refused it (a full queue with x-overflow=reject-publish) or failed to store it; queues that took it keep their copy, so publishing it again may duplicate it there")]
    Nacked {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// The exchange does not exist (the broker closed the channel with 404).
    #[error(
        "exchange {exchange:?} does not exist on the broker ({reason}); {}",
        missing_hint(exchange)
    )]
    ExchangeNotFound {
        /// The exchange.
        exchange: String,
        /// The broker's words.
        reason: String,
    },
    /// The broker closed the channel because of this message for another
    /// reason (for example no permission to publish to the exchange: the
    /// error then names the user, the exchange and the permission to grant).
    #[error(
        "the broker refused the publish to exchange {exchange:?}: {reason}{}",
        access_hint(reason)
    )]
    Refused {
        /// The exchange.
        exchange: String,
        /// The broker's words.
        reason: String,
    },
    /// The broker refused this very message and closed the channel (406
    /// PRECONDITION_FAILED: a `user_id` property other than the connection's
    /// user, which RabbitMQ allows only to users with the `impersonator`
    /// tag; a body over the broker's `max_message_size`; an `expiration`
    /// that is not a whole number of milliseconds). Nothing was stored, and
    /// sending it again would be refused the same way, so it is not retried;
    /// the other messages that were in flight on that channel are published
    /// again.
    #[error("the broker refused message {message_id:?} to exchange {exchange:?} with routing key {routing_key:?} and closed the channel ({reply_code} {reason}); it was not stored, and sending it again would be refused the same way{}", refusal_hint(reason))]
    MessageRefused {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
        /// The message's `message_id`.
        message_id: String,
        /// The broker's reply code (406 PRECONDITION_FAILED, for example).
        reply_code: u16,
        /// The broker's words.
        reason: String,
    },
    /// The message cannot be published as it is (an exchange name or
    /// routing key over AMQP's 255 bytes, properties and headers larger than
    /// one frame); nothing was sent.
    #[error("cannot publish: {0}; nothing was sent")]
    Invalid(String),
    /// The body is larger than the configured limit; nothing was sent.
    #[error("message of {size} bytes is over the limit of {limit} bytes (PublisherConfig::max_message_size); nothing was sent")]
    TooLarge {
        /// The body's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The publish did not complete within its timeout.
    #[error("publish to exchange {exchange:?} timed out after {waited:?} {stage}{}", last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    Timeout {
        /// The exchange.
        exchange: String,
        /// How long the publish waited in all.
        waited: Duration,
        /// What it was waiting for.
        stage: Stage,
        /// The last connection or channel error seen, if any.
        last_error: Option<String>,
    },
    /// Could not connect to the broker (the URL is shown with its password masked).
    #[error(transparent)]
    Connect(#[from] TopologyError),
    /// A channel could not be opened or put in confirm mode.
    #[error("cannot open a publishing channel: {0}")]
    Channel(String),
    /// The value could not be serialized as JSON.
    #[error("cannot serialize the message as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// The publisher was closed.
    #[error("the publisher is closed")]
    Closed,
    /// The metrics could not be registered.
    #[error("cannot register the producer metrics: {0}{hint}", hint = metrics_hint(.0))]
    Metrics(#[from] prometheus::Error),
}

/// What to do when the producer metrics are in the registry already: a
/// second `Publisher::connect` or `with_broker` on one registry.
fn metrics_hint(e: &prometheus::Error) -> &'static str {
    match e {
        prometheus::Error::AlreadyReg => {
            " (a registry takes them once: call PublisherMetrics::register once, or take publisher.metrics() from the first publisher, and build the others with Publisher::with_metrics, or Publisher::owning for one with a connection of its own)"
        }
        _ => "",
    }
}

/// What to do about a refused message, from the broker's words.
fn refusal_hint(reason: &str) -> &'static str {
    if reason.contains("user_id property") {
        "; leave user_id unset or set it to the user the connection logs in as (RabbitMQ accepts another only from a user with the `impersonator` tag)"
    } else if reason.contains("message size") {
        "; the body is over the broker's max_message_size: set PublisherConfig::max_message_size to the broker's limit to refuse such messages before sending"
    } else if reason.contains("invalid expiration") {
        "; expiration must be a whole number of milliseconds from 0 to 315360000000 (ten years, RabbitMQ's limit), such as \"60000\""
    } else {
        ""
    }
}

/// Why nothing took a returned message. The default exchange ("") takes no
/// bindings: it delivers to the queue named by the routing key, if any.
fn unroutable_why(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        format!("there is no queue named {routing_key:?}: the default exchange \"\" delivers to the queue whose name is the routing key")
    } else {
        format!("no queue is bound to exchange {exchange:?} for routing key {routing_key:?}")
    }
}

/// What to do about a returned message.
fn unroutable_hint(exchange: &str) -> &'static str {
    if exchange.is_empty() {
        "declare the queue (warren topology apply) or fix the routing key"
    } else {
        "declare the binding (warren topology apply) or fix the routing key"
    }
}

/// What to do about an exchange the broker does not have.
fn missing_hint(exchange: &str) -> &'static str {
    if exchange == "amq.default" {
        // The management UI shows the default exchange as "amq.default"; on
        // the wire it is "", and RabbitMQ has no exchange by that name.
        "the default exchange has no name: publish to exchange \"\" (the routing key is the queue's name)"
    } else {
        "declare it (warren topology apply)"
    }
}

/// What to grant when the broker's words are RabbitMQ's refusal of a
/// publish: `ACCESS_REFUSED - access to exchange 'X' in vhost 'V' refused
/// for user 'U'` (the default exchange is named 'amq.default' there).
fn access_hint(reason: &str) -> String {
    let Some(r) = warren_topology::refused_access(reason).filter(|r| r.kind == "exchange") else {
        return String::new();
    };
    let (exchange, vhost, user) = (&r.name, &r.vhost, &r.user);
    format!(
        "; user {user:?} needs the write permission on exchange {exchange:?} in vhost {vhost:?}: \
         the write pattern (the second of rabbitmqctl set_permissions -p {vhost} {user} CONFIGURE WRITE READ) \
         must match the exchange's name; rabbitmqctl list_user_permissions {user} shows the current ones"
    )
}

impl PublishError {
    /// Whether publishing the same message again later may succeed: timeouts,
    /// nacks and connection trouble are transient; an unroutable message, a
    /// missing exchange, a message too large or a bad URL are not.
    pub fn is_transient(&self) -> bool {
        match self {
            PublishError::Nacked { .. } | PublishError::Timeout { .. } => true,
            PublishError::Channel(_) => true,
            // A refused login or vhost is not transient (warren-topology says which).
            PublishError::Connect(e) => e.is_transient(),
            _ => false,
        }
    }

    /// The outcome label of `warren_published_total` for this error.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            PublishError::Unroutable { .. } => crate::metrics::RETURNED,
            PublishError::Nacked { .. } => crate::metrics::NACKED,
            _ => crate::metrics::FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_and_classify() {
        let e = PublishError::TooLarge {
            size: 2048,
            limit: 1024,
        };
        assert_eq!(
            e.to_string(),
            "message of 2048 bytes is over the limit of 1024 bytes (PublisherConfig::max_message_size); nothing was sent"
        );
        assert!(!e.is_transient());
        let t = PublishError::Timeout {
            exchange: "orders".into(),
            waited: Duration::from_millis(1500),
            stage: Stage::Window,
            last_error: Some("connection reset".into()),
        };
        assert!(t.is_transient());
        assert!(t.to_string().contains("free slot"), "{t}");
        assert!(
            t.to_string().ends_with("; last error: connection reset"),
            "{t}"
        );
        assert_eq!(t.outcome(), "failed");
    }

    #[test]
    fn a_refused_message_says_why_and_what_to_do() {
        let e = PublishError::MessageRefused {
            exchange: "orders".into(),
            routing_key: "k".into(),
            message_id: "m-1".into(),
            reply_code: 406,
            reason: "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'".into(),
        };
        assert_eq!(
            e.to_string(),
            "the broker refused message \"m-1\" to exchange \"orders\" with routing key \"k\" and closed the channel (406 PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'); it was not stored, and sending it again would be refused the same way; leave user_id unset or set it to the user the connection logs in as (RabbitMQ accepts another only from a user with the `impersonator` tag)"
        );
        assert!(!e.is_transient());
        assert_eq!(e.outcome(), "failed");
        let size = PublishError::MessageRefused {
            exchange: "orders".into(),
            routing_key: "k".into(),
            message_id: "m-2".into(),
            reply_code: 406,
            reason:
                "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000"
                    .into(),
        };
        assert!(size.to_string().contains("max_message_size"), "{size}");
    }

    /// A second publisher on one registry: the user is told how to share
    /// the metrics instead of prometheus's bare "Duplicate metrics
    /// collector registration attempted". It fails before connecting.
    #[tokio::test]
    async fn a_second_registration_says_how_to_share_the_metrics() {
        let registry = prometheus::Registry::new();
        let _first = crate::PublisherMetrics::register(&registry).expect("first registration");
        let opts = warren_topology::ConnectOptions::new(
            warren_topology::AmqpUrl::default(),
            "producer-test",
        );
        let Err(e) =
            crate::Publisher::connect(crate::PublisherConfig::default(), opts, &registry).await
        else {
            panic!("a second registration must fail");
        };
        let text = e.to_string();
        assert!(
            text.starts_with("cannot register the producer metrics: Duplicate metrics collector registration attempted (a registry takes them once"),
            "{text}"
        );
        assert!(text.contains("Publisher::with_metrics"), "{text}");
        // Other prometheus errors get no such advice.
        let other = PublishError::from(prometheus::Error::Msg("bad name".into()));
        assert_eq!(
            other.to_string(),
            "cannot register the producer metrics: Error: bad name"
        );
    }

    #[test]
    fn a_refused_permission_names_what_to_grant() {
        let e = PublishError::Refused {
            exchange: "".into(),
            reason: "ACCESS_REFUSED - access to exchange 'amq.default' in vhost 'shop' refused for user 'svc'".into(),
        };
        assert!(
            e.to_string().ends_with(
                "; user \"svc\" needs the write permission on exchange \"amq.default\" in vhost \"shop\": \
                 the write pattern (the second of rabbitmqctl set_permissions -p shop svc CONFIGURE WRITE READ) \
                 must match the exchange's name; rabbitmqctl list_user_permissions svc shows the current ones"
            ),
            "{e}"
        );
        // Other refusals get no such advice.
        let e = PublishError::Refused {
            exchange: "orders".into(),
            reason: "NOT_ALLOWED - something else".into(),
        };
        assert_eq!(
            e.to_string(),
            "the broker refused the publish to exchange \"orders\": NOT_ALLOWED - something else"
        );
    }
}
