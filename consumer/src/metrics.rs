//! Prometheus metrics of consumer groups (DESIGN.md, "Metrics").

use prometheus::core::Collector;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The consumer metrics (DESIGN.md's names), registered once per
/// [`Registry`] and shared by every group of the process.
///
/// | metric | labels | what |
/// |---|---|---|
/// | `warren_deliveries_total` | `group` | deliveries received |
/// | `warren_handled_total` | `group`, `outcome` | deliveries settled: `ack` (the handler succeeded), `retry` and `dead_letter` (the copy confirmed, then the delivery acked), `requeue` (the copy was not taken within `copy_hold`, the session ended while the delivery was held, or the copy can never be published and the work queue was not found to dead-letter: the delivery goes back to the queue; or the handler finished after its channel was lost: no copy is published and no ack sent for it, as the broker redelivers it), `reject` (a copy that can never be published: the broker dead-letters the delivery itself). Counted when the outcome is decided: an ack lost with its channel after that is counted, and the redelivery is counted again |
/// | `warren_handler_seconds` | `group` | handler run time (histogram), timeouts and panics included |
/// | `warren_in_flight` | `group` | handlers running now |
/// | `warren_retries_total` | `group`, `tier` | copies sent to retry tier `tier` (1-based) |
/// | `warren_reconnects_total` | `component="consumer"` | a group consuming again after its channel or connection was lost (two groups on one lost connection count two), and each group's copies connection reopened |
///
/// A series appears once it has a value (a group that never retried has no
/// `warren_retries_total` series).
///
/// Two groups in one process: register once, clone into each builder
/// ([`crate::ConsumerGroupBuilder::metrics`]). Registering again in the
/// same registry fails with prometheus's `AlreadyReg` ("Duplicate metrics
/// collector registration attempted"), and so does
/// [`crate::ConsumerGroupBuilder::registry`] for a second group. They
/// share a registry with `warren-producer`'s `PublisherMetrics` (its
/// `warren_reconnects_total` has `component="producer"`).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub(crate) deliveries: IntCounterVec,
    pub(crate) handled: IntCounterVec,
    pub(crate) handler_seconds: HistogramVec,
    pub(crate) in_flight: IntGaugeVec,
    pub(crate) retries: IntCounterVec,
    pub(crate) reconnects: IntCounter,
}

impl Metrics {
    /// Creates the metrics and registers them. Fails when one of them is
    /// already registered in `registry` (register once, then clone), and
    /// then leaves none of them registered.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        let each: [&dyn Fn() -> Box<dyn Collector>; 6] = [
            &|| Box::new(m.deliveries.clone()),
            &|| Box::new(m.handled.clone()),
            &|| Box::new(m.handler_seconds.clone()),
            &|| Box::new(m.in_flight.clone()),
            &|| Box::new(m.retries.clone()),
            &|| Box::new(m.reconnects.clone()),
        ];
        for (i, collector) in each.iter().enumerate() {
            if let Err(e) = registry.register(collector()) {
                for done in &each[..i] {
                    let _ = registry.unregister(done());
                }
                return Err(e);
            }
        }
        Ok(m)
    }

    /// Metrics that nothing collects (the default of a group built without a
    /// registry).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        Ok(Metrics {
            deliveries: IntCounterVec::new(
                Opts::new("warren_deliveries_total", "Deliveries received."),
                &["group"],
            )?,
            handled: IntCounterVec::new(
                Opts::new(
                    "warren_handled_total",
                    "Deliveries settled, by outcome (ack, retry, dead_letter, requeue, reject).",
                ),
                &["group", "outcome"],
            )?,
            handler_seconds: HistogramVec::new(
                HistogramOpts::new("warren_handler_seconds", "Handler run time.").buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ]),
                &["group"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new("warren_in_flight", "Handlers running now."),
                &["group"],
            )?,
            retries: IntCounterVec::new(
                Opts::new("warren_retries_total", "Copies sent to a retry tier."),
                &["group", "tier"],
            )?,
            reconnects: IntCounter::with_opts(
                Opts::new(
                    warren_topology::metrics::RECONNECTS,
                    warren_topology::metrics::RECONNECTS_HELP,
                )
                .const_label("component", "consumer"),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_registration_leaves_nothing_behind() {
        let registry = Registry::new();
        // The same gauge, registered by hand before.
        let squatter = IntGaugeVec::new(
            Opts::new("warren_in_flight", "Handlers running now."),
            &["group"],
        )
        .unwrap();
        registry.register(Box::new(squatter.clone())).unwrap();
        assert!(Metrics::register(&registry).is_err());
        registry.unregister(Box::new(squatter)).unwrap();
        Metrics::register(&registry).expect("no metric of the failed registration stayed");
    }
}
