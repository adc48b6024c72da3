//! `warren publish` as a user runs it: JSON Lines from a file or stdin,
//! headers and properties, `--count`, the summary (`--output json`), exit
//! codes that say what happened, and Ctrl-C that stops cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use lapin::options::BasicGetOptions;

const GROUP: &str = "name = \"{p}.g\"\nexchange = \"{p}.orders\"\nbindings = [\"order.*\"]\nqueue_type = \"classic\"\nretry = [\"1s\"]\n";

fn json(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("summary is not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jsonl_file_lands_byte_exact_with_headers_and_properties() {
    let topo = Topo::new("pubfile", &[GROUP]);
    topo.apply();
    let lines = [
        r#"{"order":1,"note":"ünïcode"}"#,
        r#"[1,2,3]"#,
        r#""just a string""#,
    ];
    let file = std::env::temp_dir().join(format!("{}.jsonl", topo.p));
    // A blank line and CRLF endings are tolerated.
    std::fs::write(
        &file,
        format!("{}\r\n\n{}\n{}\n", lines[0], lines[1], lines[2]),
    )
    .unwrap();
    let out = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.created"])
        .args(["--file", file.to_str().unwrap(), "--count", "2"])
        .args([
            "--header",
            "x-tenant=acme",
            "--property",
            "correlation-id=c-9",
        ])
        .args(["--property", "type=order.created", "--output", "json"])
        .output_within(CLI_LIMIT);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{out:?}");
    let s = json(&out.stdout);
    assert_eq!(s["published"], 6);
    assert_eq!(s["confirmed"], 6);
    assert_eq!(s["failed"], 0);
    assert_eq!(s["not_sent"], 0);

    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(
            topo.q("g").as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        got.push(m.delivery);
    }
    assert_eq!(got.len(), 6);
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.data, lines[i % 3].as_bytes(), "message {i} byte-exact");
        let p = &d.properties;
        assert_eq!(p.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("c-9"));
        assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("order.created"));
        assert!(p.timestamp().is_some());
        let id = p.message_id().as_ref().unwrap().to_string();
        assert_eq!(id.len(), 36, "a UUID message id: {id}");
        let h = p.headers().clone().unwrap();
        assert_eq!(header_str(&h, "x-tenant").as_deref(), Some("acme"));
    }
    let ids: std::collections::HashSet<String> = got
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 6, "every copy has its own message id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_works_and_bad_input_publishes_nothing() {
    let topo = Topo::new("pubstdin", &[GROUP]);
    topo.apply();
    let conn = connect().await;

    let mut child = warren()
        .args([
            "publish",
            "-e",
            &topo.exchange(),
            "-k",
            "order.paid",
            "--file",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"a\":1}\n{\"a\":2}\n")
        .unwrap();
    let out = wait_within(child, CLI_LIMIT);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("confirmed 2"), "{text}");
    assert_eq!(count(&conn, &topo.q("g")).await, 2);

    // Line 2 is not JSON: exit 2, the error names file and line, and not
    // even line 1 is published.
    let file = std::env::temp_dir().join(format!("{}-bad.jsonl", topo.p));
    std::fs::write(&file, "{\"ok\":true}\n{not json}\n").unwrap();
    let out = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.paid"])
        .args(["--file", file.to_str().unwrap()])
        .output_within(CLI_LIMIT);
    let _ = std::fs::remove_file(&file);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("-bad.jsonl:2") && err.contains("not valid JSON"),
        "{err}"
    );
    assert!(err.contains("nothing was published"), "{err}");
    assert_eq!(count(&conn, &topo.q("g")).await, 2);

    // A bad --property is a usage error too.
    let out = warren()
        .args(["publish", "-e", &topo.exchange(), "--body", "{}"])
        .args(["--property", "priority=high"])
        .output_within(CLI_LIMIT);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("priority"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_exit_1_and_name_their_lines() {
    let topo = Topo::new("pubret", &[GROUP]);
    topo.apply();
    let out = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "nobody.listens"])
        .args(["--body", "{\"x\":1}", "--count", "3", "--output", "json"])
        .output_within(CLI_LIMIT);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let s = json(&out.stdout);
    assert_eq!(s["published"], 3);
    assert_eq!(s["confirmed"], 0);
    assert_eq!(s["returned"], 3);
    let failures = s["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 3);
    for f in failures {
        assert_eq!(f["line"], 1);
        assert_eq!(f["outcome"], "returned");
        assert!(
            f["error"].as_str().unwrap().contains("nobody.listens"),
            "{f}"
        );
    }

    // A missing exchange: a clear error, exit 1, nothing confirmed.
    let out = warren()
        .args(["publish", "-e", &format!("{}.missing", topo.p), "-k", "k"])
        .args(["--body", "{}"])
        .output_within(CLI_LIMIT);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("confirmed 0") && text.contains("line 1"),
        "{text}"
    );
    assert!(text.contains(".missing"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_sending_waits_for_confirms_and_says_what_was_not_sent() {
    let topo = Topo::new("pubint", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let child = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.created"])
        .args(["--body", "{\"n\":1}", "--count", "100000", "--rate", "400"])
        .args(["--output", "json", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let q = topo.q("g");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(&conn, &q).await >= 100
        })
        .await,
        "publishing started"
    );
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let sent_at = Instant::now();
    let out = wait_within(child, CLI_LIMIT);
    assert!(
        sent_at.elapsed() < Duration::from_secs(10),
        "stopped promptly: {:?}",
        sent_at.elapsed()
    );
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stopping"), "{err}");
    let s = json(&out.stdout);
    let published = s["published"].as_u64().unwrap();
    assert!((100..100_000).contains(&published), "{s}");
    assert_eq!(s["confirmed"].as_u64().unwrap(), published, "{s}");
    assert_eq!(s["not_sent"].as_u64().unwrap(), 100_000 - published, "{s}");
    assert_eq!(s["interrupted_at"]["line"], 1, "{s}");
    assert_eq!(
        s["interrupted_at"]["repeat"].as_u64().unwrap(),
        published,
        "the first repeat not sent comes right after the last sent: {s}"
    );
    // Exactly what was reported confirmed is in the queue.
    assert_eq!(u64::from(count(&conn, &q).await), published);
}
