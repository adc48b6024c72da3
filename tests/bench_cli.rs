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

/// Splits the output of `--runs n` into the run lines and the summary line;
/// asserts each run line is of `bench` and has every key of `keys` above 0.
fn runs_and_summary<'a>(
    lines: &'a [Value],
    bench: &str,
    n: usize,
    keys: &[&str],
) -> (&'a [Value], &'a Value) {
    assert_eq!(lines.len(), n + 1, "{n} runs and the summary: {lines:?}");
    let (runs, summary) = lines.split_at(n);
    for run in runs {
        assert_eq!(run["bench"], bench);
        for key in keys {
            assert!(num(run, key) > 0.0, "{key} in {run}");
        }
    }
    let summary = &summary[0];
    assert_eq!(summary["summary"], true);
    assert_eq!(summary["runs"], n);
    (runs, summary)
}

/// The median of `key` over the run lines.
fn median(runs: &[Value], key: &str) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(|l| num(l, key)).collect();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
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
    let (runs, summary) = runs_and_summary(
        &lines,
        "retry",
        2,
        &[
            "happy_e2e_msgs_per_s",
            "retry_e2e_msgs_per_s",
            "bare_happy_e2e_msgs_per_s",
            "bare_retry_e2e_msgs_per_s",
            "ratio",
        ],
    );
    for run in runs {
        assert_eq!(run["tier_ms"], 20);
    }
    let (min, mid, max) = (
        num(summary, "min_ratio"),
        num(summary, "median_ratio"),
        num(summary, "max_ratio"),
    );
    assert!(min <= mid && mid <= max, "{summary}");
    let ratios: Vec<f64> = runs.iter().map(|l| num(l, "ratio")).collect();
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
    let (runs, summary) = runs_and_summary(
        &lines,
        "e2e",
        2,
        &[
            "warren_p99_ms",
            "warren_p99_steady_ms",
            "bare_p99_ms",
            "bare_p99_steady_ms",
            "warren_msgs_per_s",
            "ratio",
        ],
    );
    for run in runs {
        assert_eq!(run["queue_type"], "quorum");
        assert_eq!(run["rate"], 2000);
    }
    for key in ["warren_p99_ms", "warren_p99_steady_ms"] {
        let want = median(runs, key);
        let got = num(summary, &format!("median_{key}"));
        assert!((got - want).abs() < 0.011, "median of {key}: {summary}");
    }
    assert!(num(summary, "max_warren_rss_mb") > 0.0, "{summary}");
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
