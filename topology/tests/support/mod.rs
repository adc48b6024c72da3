//! Shared by the topology integration tests: unique names, a guard that
//! deletes what a test declared, and a view of the broker through
//! `rabbitmqctl` (never through our own structs).

#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::process::Command;

use warren_topology::Topology;

pub use warren_testkit::{connect, count, url, wait_until, Cleanup as Guard};

/// A prefix no other test (or run) uses: `t<pid>-<n>-<nanos>.`.
pub fn unique_prefix() -> String {
    warren_testkit::unique_prefix("t")
}

/// A queue as the broker lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerQueue {
    pub name: String,
    pub durable: bool,
    pub kind: String,
    pub messages: u64,
    /// argument -> value (as JSON)
    pub arguments: BTreeMap<String, serde_json::Value>,
}

/// Every queue whose name starts with `prefix`, through `rabbitmqctl`.
pub fn broker_queues(prefix: &str) -> BTreeMap<String, BrokerQueue> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--formatter",
            "json",
            "name",
            "durable",
            "type",
            "messages",
            "arguments",
        ])
        .output()
        .expect("rabbitmqctl runs (tests run as root on the broker's machine)");
    assert!(
        out.status.success(),
        "rabbitmqctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.into_iter()
        .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .map(|r| {
            let arguments = r["arguments"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| Some((a[0].as_str()?.to_owned(), a[2].clone())))
                .collect();
            let name = r["name"].as_str().unwrap_or_default().to_owned();
            (
                name.clone(),
                BrokerQueue {
                    name,
                    durable: r["durable"].as_bool().unwrap_or(false),
                    kind: r["type"].as_str().unwrap_or_default().to_owned(),
                    messages: r["messages"].as_u64().unwrap_or(0),
                    arguments,
                },
            )
        })
        .collect()
}

/// Bindings (source, destination, key) whose destination starts with `prefix`.
pub fn broker_bindings(prefix: &str) -> Vec<(String, String, String)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_bindings",
            "-q",
            "--formatter",
            "json",
            "source_name",
            "destination_name",
            "routing_key",
        ])
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut v: Vec<_> = rows
        .into_iter()
        .filter(|r| {
            r["destination_name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .filter(|r| r["source_name"].as_str().is_some_and(|s| !s.is_empty()))
        .map(|r| {
            (
                r["source_name"].as_str().unwrap_or_default().to_owned(),
                r["destination_name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                r["routing_key"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

pub fn topology(prefix: &str, text: &str) -> Topology {
    Topology::parse(text, "test.toml")
        .unwrap()
        .with_prefix(prefix)
}
