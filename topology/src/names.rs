//! Derived names and header names: the contract operators and tests rely on
//! (DESIGN.md, "Derived names" and "Message contract").

/// The dead-letter exchange shared by every group.
pub const DEAD_LETTER_EXCHANGE: &str = "warren.dlx";

/// A group's work queue: `{group}`.
pub fn work_queue(group: &str) -> String {
    group.to_owned()
}

/// A group's retry queue for tier `tier` (1-based): `{group}.retry.{n}`.
pub fn retry_queue(group: &str, tier: usize) -> String {
    format!("{group}.retry.{tier}")
}

/// A group's dead-letter queue: `{group}.dead`.
pub fn dead_queue(group: &str) -> String {
    format!("{group}.dead")
}

/// Metrics that several components register side by side in one registry
/// (each with a const `component` label): they must agree on name and help.
pub mod metrics {
    /// `warren_reconnects_total{component}`.
    pub const RECONNECTS: &str = "warren_reconnects_total";
    /// Its help text.
    pub const RECONNECTS_HELP: &str =
        "Reconnections to the broker after a lost connection, by component.";
}

/// Message header names.
pub mod headers {
    /// Failed attempts so far (integer, absent = 0).
    pub const ATTEMPTS: &str = "x-warren-attempts";
    /// The last error, one line, at most 1 KiB.
    pub const ERROR: &str = "x-warren-error";
    /// `retryable`, `permanent`, `timeout`, `panic`, `decode` or `broker`.
    pub const ERROR_KIND: &str = "x-warren-error-kind";
    /// The group that failed it.
    pub const GROUP: &str = "x-warren-group";
    /// Where it was first published: exchange.
    pub const ORIGINAL_EXCHANGE: &str = "x-warren-original-exchange";
    /// Where it was first published: routing key.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-warren-original-routing-key";
    /// RFC 3339 UTC time of the first failure.
    pub const FIRST_FAILED_AT: &str = "x-warren-first-failed-at";
    /// RFC 3339 UTC time it was dead-lettered.
    pub const DEAD_LETTERED_AT: &str = "x-warren-dead-lettered-at";
    /// Times an operator replayed it.
    pub const REPLAYS: &str = "x-warren-replays";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// Deliveries a quorum queue counted (set by the broker on redelivery);
    /// never carried over to a copy.
    pub const DELIVERY_COUNT: &str = "x-delivery-count";
    /// The broker's own dead-lettering history; kept untouched.
    pub const X_DEATH: &str = "x-death";
    /// The most an `x-warren-error` value holds.
    pub const MAX_ERROR_BYTES: usize = 1024;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_match_the_design() {
        assert_eq!(work_queue("billing"), "billing");
        assert_eq!(retry_queue("billing", 1), "billing.retry.1");
        assert_eq!(dead_queue("billing"), "billing.dead");
        assert_eq!(DEAD_LETTER_EXCHANGE, "warren.dlx");
    }
}
