//! The operator's Prometheus metrics, registered into the caller's registry.

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// `warren_replayed_total{group}`, `warren_dead_letters{group}`,
/// `warren_dead_letter_oldest_seconds{group}`.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Dead letters replayed (publish confirmed, dead letter acked).
    pub replayed: IntCounterVec,
    /// Messages in each dead-letter queue (set by `watch`).
    pub dead_letters: IntGaugeVec,
    /// Age of the oldest dead letter, seconds (set by `watch`; 0 when empty).
    pub oldest_seconds: GaugeVec,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let replayed = IntCounterVec::new(
            Opts::new(
                "warren_replayed_total",
                "Dead letters replayed by an operator.",
            ),
            &["group"],
        )?;
        let dead_letters = IntGaugeVec::new(
            Opts::new(
                "warren_dead_letters",
                "Messages in the group's dead-letter queue.",
            ),
            &["group"],
        )?;
        let oldest_seconds = GaugeVec::new(
            Opts::new(
                "warren_dead_letter_oldest_seconds",
                "Age of the oldest dead letter of the group, in seconds (0 when none).",
            ),
            &["group"],
        )?;
        registry.register(Box::new(replayed.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(oldest_seconds.clone()))?;
        Ok(Metrics {
            replayed,
            dead_letters,
            oldest_seconds,
        })
    }

    /// Metrics registered nowhere (for tests and one-shot commands).
    pub fn unregistered() -> Metrics {
        Metrics::new(&Registry::new())
            .unwrap_or_else(|_| unreachable!("a fresh registry takes them"))
    }
}
