//! [`PublisherMetrics`]: the producer's Prometheus metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

pub(crate) const CONFIRMED: &str = "confirmed";
pub(crate) const NACKED: &str = "nacked";
pub(crate) const RETURNED: &str = "returned";
pub(crate) const FAILED: &str = "failed";

/// The producer's metrics, registered once per registry and shared by every
/// [`crate::Publisher`] built with [`crate::Publisher::with_metrics`]:
///
/// - `warren_published_total{exchange,outcome}`: outcome is `confirmed`,
///   `nacked`, `returned` or `failed` (timeouts, channel errors, too large).
/// - `warren_publish_confirm_seconds`: from the call to the broker's answer.
/// - `warren_reconnects_total{component="producer"}` (a const label, so that
///   the consumer can register its own beside it).
#[derive(Clone)]
pub struct PublisherMetrics {
    published: IntCounterVec,
    confirm_seconds: Histogram,
    reconnects: IntCounter,
    cache: Arc<Mutex<HashMap<String, Outcomes>>>,
}

impl std::fmt::Debug for PublisherMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherMetrics").finish_non_exhaustive()
    }
}

struct Outcomes([IntCounter; 4]);

impl PublisherMetrics {
    /// Registers the metrics into `registry`. Registering twice into one
    /// registry fails: share the value instead.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.confirm_seconds.clone()))?;
        registry.register(Box::new(m.reconnects.clone()))?;
        Ok(m)
    }

    /// Metrics registered nowhere: for a publisher whose publishes are
    /// counted elsewhere (a consumer's retry and dead-letter copies are
    /// counted by `warren_handled_total` and `warren_retries_total`).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        let published = IntCounterVec::new(
            Opts::new(
                "warren_published_total",
                "Messages published, by exchange and outcome (confirmed, nacked, returned, failed).",
            ),
            &["exchange", "outcome"],
        )?;
        let confirm_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "warren_publish_confirm_seconds",
                "Time from a publish call to the broker's confirm.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        )?;
        let reconnects = IntCounter::with_opts(
            Opts::new(
                warren_topology::metrics::RECONNECTS,
                warren_topology::metrics::RECONNECTS_HELP,
            )
            .const_label("component", "producer"),
        )?;
        Ok(PublisherMetrics {
            published,
            confirm_seconds,
            reconnects,
            cache: Arc::default(),
        })
    }

    /// These metrics with reconnects counted by `reconnects` instead: a
    /// consumer counts its copies publisher's reconnects as its own
    /// (`warren_reconnects_total{component="consumer"}`).
    pub fn counting_reconnects_in(mut self, reconnects: IntCounter) -> Self {
        self.reconnects = reconnects;
        self
    }

    pub(crate) fn count(&self, exchange: &str, outcome: &str) {
        let i = match outcome {
            CONFIRMED => 0,
            NACKED => 1,
            RETURNED => 2,
            _ => 3,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = cache.get(exchange) {
            o.0[i].inc();
            return;
        }
        let c = |outcome| self.published.with_label_values(&[exchange, outcome]);
        let o = Outcomes([c(CONFIRMED), c(NACKED), c(RETURNED), c(FAILED)]);
        o.0[i].inc();
        // Bounded: a process publishes to a handful of exchanges; past 1024
        // distinct names stop caching rather than grow.
        if cache.len() < 1024 {
            cache.insert(exchange.to_owned(), o);
        }
    }

    pub(crate) fn observe_confirm(&self, seconds: f64) {
        self.confirm_seconds.observe(seconds);
    }

    pub(crate) fn reconnected(&self) {
        self.reconnects.inc();
    }
}
