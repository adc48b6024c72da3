//! The deployment artifacts against the code: every metric the Grafana
//! dashboard queries is one the code registers, and all of warren's metrics
//! can live in one registry (as in `warren demo`); the logging that
//! docker-compose.yml sets up stays quiet on a healthy start; the demo HTTP
//! handler of the compose stack stops on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{warren, OutputWithin, Topo, CLI_LIMIT};

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

/// The value docker-compose.yml gives `name` in the environment of the
/// warren services (`NAME: value` in its `x-warren` block).
fn compose_env(name: &str) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .unwrap();
    let key = format!("{name}:");
    let values: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix(key.as_str()))
        .map(|v| v.trim().trim_matches('"'))
        .collect();
    assert_eq!(
        values.len(),
        1,
        "docker-compose.yml sets {name} once, for every warren service"
    );
    values[0].to_owned()
}

#[test]
fn the_compose_logging_shows_no_error_when_topology_apply_creates_everything() {
    // The compose stack's first start: `topology apply` on a broker that has
    // none of the objects, with the services' RUST_LOG. Finding them missing
    // is how apply works, not an error: no ERROR line may say otherwise.
    let rust_log = compose_env("RUST_LOG");
    let topo = Topo::new(
        "compose-log",
        &[r#"name = "{p}.billing"
exchange = "{p}.orders"
bindings = ["order.created"]
queue_type = "quorum"
retry = ["1s"]
"#],
    );
    let o = warren()
        .env("RUST_LOG", &rust_log)
        .args(["topology", "apply", "-f", topo.file(), "--log-format=json"])
        .output_within(CLI_LIMIT);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "apply failed: {stderr}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("created    queue"),
        "apply created the queues: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(r#""level":"ERROR""#))
        .collect();
    assert!(
        errors.is_empty(),
        "with RUST_LOG={rust_log} (docker-compose.yml) a first apply logs errors:\n{}",
        errors.join("\n")
    );
    // The INFO the compose file asks for is still there.
    assert!(
        stderr.contains("connected to the broker"),
        "RUST_LOG={rust_log} keeps warren's INFO: {stderr}"
    );
}

/// The demo handler's executable, built (or found up to date) by cargo.
fn demo_handler() -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--message-format=json",
            "--example",
            "demo_handler",
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ])
        .stderr(Stdio::inherit())
        .output_within(CLI_LIMIT * 5);
    assert!(
        o.status.success(),
        "cargo build --example demo_handler failed"
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["target"]["name"] == "demo_handler")
        .find_map(|m| m["executable"].as_str().map(Into::into))
        .expect("cargo names the demo_handler executable")
}

/// A POST of `body` to `/orders` at `addr`: the status line.
fn post_order(addr: &str, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /orders HTTP/1.0\r\nContent-Type: application/json\r\nX-Warren-Message-Id: m-1\r\nX-Warren-Attempt: 2\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn the_demo_handler_stops_on_sigterm() {
    // In its container the handler is process 1, which the kernel gives no
    // default action for SIGTERM: it must stop by itself, or `docker compose
    // stop` waits 10 s and kills it. Here (not process 1) a handler without
    // its own would die of the signal instead of exiting 0.
    let addr = format!("127.0.0.1:{}", harness::free_port());
    let mut child = Command::new(demo_handler())
        .args(["--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    assert!(
        first.contains(&addr),
        "demo_handler says where it listens: {first}"
    );
    assert!(
        post_order(&addr, "not json").contains(" 400 "),
        "a body that is not JSON gets 400"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let end = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("demo_handler still runs 10 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    assert_eq!(
        exit.code(),
        Some(0),
        "demo_handler stops by itself on SIGTERM, exit 0 ({exit}); stderr: {rest}"
    );
}
