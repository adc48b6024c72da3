//! `warren bench`: every benchmark runs to the end with small counts, prints
//! the JSON lines BENCHMARKS.md is made from, and deletes what it declared.
//! How fast things are is measured by running the benchmarks, not here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::process::Stdio;

use harness::*;
use serde_json::Value;

/// Runs `warren bench <args>`; asserts it succeeded and left no queue or
/// exchange of its own behind; returns its JSON lines.
fn bench(args: &[&str]) -> Vec<Value> {
    let child = warren()
        .arg("bench")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("warren runs");
    let pid = child.id().to_string();
    let out = wait_within(child, CLI_LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench {args:?} failed: {stderr}");
    let leftovers: Vec<String> = ["list_queues", "list_exchanges"]
        .iter()
        .flat_map(|what| {
            let names = std::process::Command::new("rabbitmqctl")
                .args([what, "-q", "--no-table-headers", "name"])
                .output()
                .expect("rabbitmqctl runs");
            String::from_utf8_lossy(&names.stdout)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|name| {
            name.contains("bench") && name.split(|c: char| !c.is_ascii_digit()).any(|t| t == pid)
        })
        .collect();
    assert!(leftovers.is_empty(), "bench {args:?} left {leftovers:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

#[test]
fn retry_prints_a_line_per_run_and_the_medians() {
    let lines = bench(&[
        "retry",
        "--count",
        "300",
        "--runs",
        "2",
        "--tier",
        "20ms",
        "--queue-type",
        "classic",
    ]);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for run in &lines[..2] {
        assert_eq!(run["bench"], "retry");
        assert_eq!(run["tier_ms"], 20);
        for key in [
            "happy_e2e_msgs_per_s",
            "retry_e2e_msgs_per_s",
            "bare_happy_e2e_msgs_per_s",
            "bare_retry_e2e_msgs_per_s",
            "ratio",
        ] {
            assert!(num(run, key) > 0.0, "{key} in {run}");
        }
    }
    let summary = &lines[2];
    assert_eq!(summary["summary"], true);
    assert_eq!(summary["runs"], 2);
    let (min, median, max) = (
        num(summary, "min_ratio"),
        num(summary, "median_ratio"),
        num(summary, "max_ratio"),
    );
    assert!(min <= median && median <= max, "{summary}");
    let ratios: Vec<f64> = lines[..2].iter().map(|l| num(l, "ratio")).collect();
    let lo = ratios.iter().copied().fold(f64::MAX, f64::min);
    assert!((min - lo).abs() < 0.011, "min {min} of {ratios:?}");
}

#[test]
fn e2e_at_a_fixed_rate_reports_latency_per_run_and_the_medians() {
    let lines = bench(&[
        "e2e",
        "--count",
        "500",
        "--rate",
        "2000",
        "--runs",
        "2",
        "--queue-type",
        "quorum",
    ]);
    assert_eq!(lines.len(), 3, "two runs and the summary: {lines:?}");
    for run in &lines[..2] {
        assert_eq!(run["bench"], "e2e");
        assert_eq!(run["queue_type"], "quorum");
        assert_eq!(run["rate"], 2000);
        for key in [
            "warren_p99_ms",
            "warren_p99_steady_ms",
            "bare_p99_ms",
            "bare_p99_steady_ms",
            "warren_msgs_per_s",
            "ratio",
        ] {
            assert!(num(run, key) > 0.0, "{key} in {run}");
        }
    }
    let summary = &lines[2];
    assert_eq!(summary["summary"], true);
    assert_eq!(summary["runs"], 2);
    let p99s: Vec<f64> = lines[..2].iter().map(|l| num(l, "warren_p99_ms")).collect();
    let median = num(summary, "median_warren_p99_ms");
    assert!(
        (median - (p99s[0] + p99s[1]) / 2.0).abs() < 0.011,
        "median of {p99s:?}: {summary}"
    );
    assert!(num(summary, "max_warren_rss_mb") > 0.0, "{summary}");
    let steady: Vec<f64> = lines[..2]
        .iter()
        .map(|l| num(l, "warren_p99_steady_ms"))
        .collect();
    assert!(
        (num(summary, "median_warren_p99_steady_ms") - (steady[0] + steady[1]) / 2.0).abs() < 0.011,
        "median of {steady:?}: {summary}"
    );
}

#[test]
fn consume_and_publish_and_replay_run_to_the_end() {
    let consume = bench(&["consume", "--count", "500", "--queue-type", "classic"]);
    assert_eq!(consume.len(), 1, "one run, no summary: {consume:?}");
    assert_eq!(consume[0]["bench"], "consume");
    assert!(num(&consume[0], "ratio") > 0.0, "{consume:?}");

    let publish = bench(&[
        "publish",
        "--messages",
        "300",
        "--runs",
        "2",
        "--queue-type",
        "classic",
    ]);
    assert_eq!(publish.len(), 3, "two runs and the summary: {publish:?}");
    assert_eq!(publish[2]["summary"], true);

    let replay = bench(&["replay", "--messages", "300"]);
    assert_eq!(replay.len(), 1, "{replay:?}");
    assert_eq!(replay[0]["bench"], "replay");
}
