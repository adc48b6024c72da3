//! Every metric the Grafana dashboard queries is one the code registers, and
//! all of warren's metrics can live in one registry (as in `warren demo`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use prometheus::{IntCounter, Registry};

fn dashboard_metric_names() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/warren.json"
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut names = BTreeSet::new();
    for panel in v["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("warren_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
                names.insert(base.to_owned());
                rest = &tail[end..];
            }
        }
    }
    names
}

#[test]
fn every_dashboard_metric_is_registered_by_the_code() {
    let registry = Registry::new();
    warren_producer::PublisherMetrics::register(&registry).unwrap();
    warren_consumer::Metrics::register(&registry).unwrap();
    warren_operator::Metrics::new(&registry).unwrap();

    let names = dashboard_metric_names();
    assert!(
        names.len() >= 10,
        "the dashboard queries warren's metrics: {names:?}"
    );
    for name in &names {
        // Registering a probe under a name the code already registered (with
        // its own help and labels) is refused; an unknown name is accepted.
        let probe = IntCounter::new(name.as_str(), "probe").unwrap();
        let refused = registry.register(Box::new(probe)).is_err();
        assert!(
            refused,
            "the dashboard queries {name}, which no warren component registers"
        );
    }
}

#[test]
fn the_dashboard_covers_what_the_issue_asks_for() {
    let names = dashboard_metric_names();
    for needed in [
        "warren_published_total",
        "warren_handled_total",
        "warren_handler_seconds",
        "warren_retries_total",
        "warren_dead_letters",
        "warren_reconnects_total",
    ] {
        assert!(
            names.contains(needed),
            "{needed} missing from the dashboard"
        );
    }
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/warren.json"
    ))
    .unwrap();
    assert!(
        text.contains("rabbitmq_queue_messages_ready"),
        "queue depths come from the broker's own exporter"
    );
}
