//! Prometheus metrics of consumer groups (DESIGN.md, "Metrics").

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The consumer metrics, registered once per [`Registry`] and shared by every
/// group of the process (clone it into each group's builder).
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
    /// Creates the metrics and registers them. Fails when they are already
    /// registered in `registry` (register once, then clone).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.handled.clone()))?;
        registry.register(Box::new(m.handler_seconds.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.reconnects.clone()))?;
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
                    "Deliveries settled, by outcome (ack, retry, dead_letter, requeue).",
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
