//! The properties of a copy warren publishes in a message's place (a retry
//! or dead-letter copy, a replay).
//!
//! Two things are never carried over, as the broker does when it dead-letters
//! a message itself (and a third only by [`copy_properties_for`]: a
//! `user_id` that is not the publishing connection's user):
//!
//! - `expiration` (per-message TTL): a dead letter that kept it would vanish
//!   from `{group}.dead`, which has no dead-letter exchange of its own, and a
//!   retry copy would start its clock again in every queue it passes.
//! - `x-delivery-count`: set by quorum queues on redelivery. Copied, it would
//!   claim deliveries the new queue never made (and a classic dead-letter
//!   queue would carry a quorum counter).

use lapin::types::FieldTable;
use lapin::BasicProperties;

use crate::names::headers;

/// `p` with `headers` and without `expiration`; `x-delivery-count` is
/// removed from `headers`. Every other property is kept as it is.
pub fn copy_properties(p: &BasicProperties, headers: FieldTable) -> BasicProperties {
    copy(p, headers, |_| true)
}

/// [`copy_properties`] for a copy published by a connection logged in as
/// `login` (`None`: a user named by a client certificate, unknown here):
/// `user_id` is kept only when it is `login`. The broker closes the channel
/// on a message whose `user_id` is another user (unless the login has the
/// `impersonator` tag, which warren cannot see), so a consumer running as
/// another user than the publisher would have every copy of such a message
/// refused and the message requeued forever. RabbitMQ's federation drops a
/// foreign `user_id` the same way.
pub fn copy_properties_for(
    p: &BasicProperties,
    headers: FieldTable,
    login: Option<&str>,
) -> BasicProperties {
    copy(p, headers, |user| Some(user) == login)
}

fn copy(
    p: &BasicProperties,
    headers: FieldTable,
    keep_user_id: impl Fn(&str) -> bool,
) -> BasicProperties {
    // Rebuilt only when the counter is there (the copy's headers are
    // usually fresh from the caller).
    let headers = if headers.contains_key(headers::DELIVERY_COUNT) {
        let mut map = headers.inner().clone();
        map.remove(headers::DELIVERY_COUNT);
        FieldTable::from(map)
    } else {
        headers
    };
    let mut out = BasicProperties::default().with_headers(headers);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id().as_ref().filter(|v| keep_user_id(v.as_str())) {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, ShortString};

    fn every_property() -> BasicProperties {
        let s = |v: &str| ShortString::from(v.to_owned());
        let mut h = FieldTable::default();
        h.insert("user".into(), AMQPValue::LongString("kept".into()));
        h.insert(headers::DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        BasicProperties::default()
            .with_content_type(s("application/json"))
            .with_content_encoding(s("gzip"))
            .with_headers(h)
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id(s("corr"))
            .with_reply_to(s("replies"))
            .with_expiration(s("8000"))
            .with_message_id(s("m-1"))
            .with_timestamp(1_700_000_000)
            .with_type(s("order.created"))
            .with_user_id(s("guest"))
            .with_app_id(s("shop"))
            .with_cluster_id(s("c1"))
    }

    #[test]
    fn a_copy_keeps_every_property_but_expiration_and_the_delivery_count() {
        let p = every_property();
        let copy = copy_properties(&p, p.headers().clone().unwrap_or_default());
        assert_eq!(copy.expiration(), &None);
        let h = copy.headers().clone().unwrap_or_default();
        assert!(!h.inner().contains_key(headers::DELIVERY_COUNT));
        assert_eq!(
            h.inner().get("user"),
            Some(&AMQPValue::LongString("kept".into()))
        );
        // Everything else, field by field: the same as the original with
        // expiration and the counter taken out.
        let mut expected_headers = p.headers().clone().unwrap_or_default().inner().clone();
        expected_headers.remove(headers::DELIVERY_COUNT);
        let expected = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_headers(FieldTable::from(expected_headers))
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id("corr".into())
            .with_reply_to("replies".into())
            .with_message_id("m-1".into())
            .with_timestamp(1_700_000_000)
            .with_type("order.created".into())
            .with_user_id("guest".into())
            .with_app_id("shop".into())
            .with_cluster_id("c1".into());
        assert_eq!(copy, expected);
    }

    #[test]
    fn a_copy_for_another_login_drops_the_user_id_only() {
        let p = every_property();
        let h = p.headers().clone().unwrap_or_default();
        let same = copy_properties_for(&p, h.clone(), Some("guest"));
        assert_eq!(same, copy_properties(&p, h.clone()));
        for login in [Some("svc-b"), Some("Guest"), None] {
            let other = copy_properties_for(&p, h.clone(), login);
            assert_eq!(other.user_id(), &None, "{login:?}");
            assert_eq!(
                other.with_user_id("guest".into()),
                copy_properties(&p, h.clone()),
                "all else kept for {login:?}"
            );
        }
    }

    #[test]
    fn absent_properties_stay_absent() {
        let copy = copy_properties(&BasicProperties::default(), FieldTable::default());
        assert_eq!(
            copy,
            BasicProperties::default().with_headers(FieldTable::default())
        );
    }
}
