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
    // Repeats count from 1, like lines, and in the same order.
    let repeats: Vec<u64> = failures
        .iter()
        .map(|f| f["repeat"].as_u64().unwrap())
        .collect();
    assert_eq!(repeats, [1, 2, 3], "{s}");

    // The table names the same line and repeat numbers as the JSON.
    let out = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "nobody.listens"])
        .args(["--body", "{\"x\":1}", "--count", "3"])
        .output_within(CLI_LIMIT);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let table: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("line "))
        .map(|l| {
            l.split_once(": returned: ")
                .unwrap_or_else(|| panic!("{text}"))
                .0
        })
        .collect();
    let from_json: Vec<String> = failures
        .iter()
        .map(|f| format!("{} (repeat {})", f["line"], f["repeat"]))
        .collect();
    assert_eq!(table, from_json, "table:\n{text}\njson: {s}");

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

/// A file is checked whole, then read again as it is sent instead of being
/// held in memory: a 64 MiB file is published by a process that stays far
/// below 64 MiB. (It used to keep every line, so its memory grew with the
/// file: 409 MB for a 98 MB file with 400,000 returned messages.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_larger_than_the_memory_it_is_given_is_not_held_in_memory() {
    let topo = Topo::new("pubbig", &[GROUP]);
    topo.apply();
    let file = std::env::temp_dir().join(format!("{}.jsonl", topo.p));
    const LINES: usize = 64;
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let pad = "x".repeat(1 << 20);
        for i in 0..LINES {
            writeln!(f, "{{\"n\":{i},\"pad\":\"{pad}\"}}").unwrap();
        }
    }
    // A window of 2 keeps what is in flight small; a rate keeps the process
    // alive long enough to be measured after the check of the whole file.
    let mut child = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.created"])
        .args(["--file", file.to_str().unwrap(), "--window", "2"])
        .args(["--rate", "50", "--quiet", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() && started.elapsed() < CLI_LIMIT {
        // VmHWM: the peak resident set so far.
        if let Some(kib) = std::fs::read_to_string(&status).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        }) {
            peak_kib = peak_kib.max(kib);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = wait_within(child, CLI_LIMIT);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{out:?}");
    let s = json(&out.stdout);
    assert_eq!(s["confirmed"], LINES);
    let conn = connect().await;
    assert_eq!(count(&conn, &topo.q("g")).await as usize, LINES);
    assert!(
        peak_kib > 0 && peak_kib < 48 * 1024,
        "peak RSS {peak_kib} KiB while publishing a {LINES} MiB file"
    );
}

/// The file is read again for each pass of `--count`: when it changed
/// meanwhile, the line that no longer checks stops the sending there, and
/// the summary says what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_changes_while_it_is_published_stops_the_sending() {
    let topo = Topo::new("pubchg", &[GROUP]);
    topo.apply();
    let file = std::env::temp_dir().join(format!("{}.jsonl", topo.p));
    let lines = |bad: Option<usize>| -> String {
        (1..=10)
            .map(|i| {
                if Some(i) == bad {
                    "{not json\n".to_owned()
                } else {
                    format!("{{\"n\":{i}}}\n")
                }
            })
            .collect()
    };
    std::fs::write(&file, lines(None)).unwrap();
    let child = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.created"])
        .args(["--file", file.to_str().unwrap(), "--count", "2"])
        .args(["--rate", "20", "--quiet", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let conn = connect().await;
    let q = topo.q("g");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(&conn, &q).await >= 2
        })
        .await,
        "publishing started"
    );
    // Replaced while the first pass is sent: its third line is no JSON.
    let new = file.with_extension("new");
    std::fs::write(&new, lines(Some(3))).unwrap();
    std::fs::rename(&new, &file).unwrap();
    let out = wait_within(child, CLI_LIMIT);
    let _ = std::fs::remove_file(&file);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("changed while it was being published") && err.contains(":3:"),
        "{err}"
    );
    let s = json(&out.stdout);
    assert_eq!(s["confirmed"], 12, "{s}");
    assert_eq!(s["not_sent"], 8, "{s}");
    assert!(
        s["input_changed"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{s}"
    );
    assert_eq!(count(&conn, &q).await, 12);
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
        published + 1,
        "repeats count from 1: the first not sent comes right after the last sent: {s}"
    );
    // Exactly what was reported confirmed is in the queue.
    assert_eq!(u64::from(count(&conn, &q).await), published);

    // The table names the same repeat as the JSON: the one after the last sent.
    let child = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.created"])
        .args(["--body", "{\"n\":1}", "--count", "100000", "--rate", "400"])
        .arg("--quiet")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            u64::from(count(&conn, &q).await) >= published + 50
        })
        .await,
        "publishing started again"
    );
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = wait_within(child, CLI_LIMIT);
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let number_after = |prefix: &str| -> u64 {
        let (_, rest) = text.split_once(prefix).unwrap_or_else(|| panic!("{text}"));
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap_or_else(|_| panic!("{text}"))
    };
    let published = number_after("published ");
    assert_eq!(
        number_after(" not sent, from line 1 of repeat "),
        published + 1,
        "{text}"
    );
}

/// SIGTERM (what `kill`, systemd and Kubernetes send) stops like Ctrl-C:
/// nothing more is sent, the confirms of what was sent are awaited and the
/// summary says what was not sent. It exits 143 (128 + SIGTERM), what a
/// shell reports for a command SIGTERM ended: 130 would tell a supervisor
/// or a script that someone pressed Ctrl-C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_like_ctrl_c_and_exits_143() {
    let topo = Topo::new("pubterm", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let q = topo.q("g");
    let started = |at_least: u64| {
        let (conn, q) = (&conn, &q);
        async move {
            assert!(
                wait_until(Duration::from_secs(20), || async {
                    u64::from(count(conn, q).await) >= at_least
                })
                .await,
                "publishing started"
            );
        }
    };
    let spawn = |output: &[&str]| {
        warren()
            .args(["publish", "-e", &topo.exchange(), "-k", "order.created"])
            .args(["--body", "{\"n\":1}", "--count", "100000", "--rate", "400"])
            .args(output)
            .arg("--quiet")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let term = |child: &std::process::Child| {
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };

    let child = spawn(&["--output", "json"]);
    started(100).await;
    term(&child);
    let out = wait_within(child, CLI_LIMIT);
    assert_eq!(out.status.code(), Some(143), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stopping"), "{err}");
    assert!(
        err.contains("SIGTERM"),
        "says which signal stopped it: {err}"
    );
    let s = json(&out.stdout);
    let published = s["published"].as_u64().unwrap();
    assert!((100..100_000).contains(&published), "{s}");
    assert_eq!(s["confirmed"].as_u64().unwrap(), published, "{s}");
    assert_eq!(s["not_sent"].as_u64().unwrap(), 100_000 - published, "{s}");
    assert_eq!(s["interrupted_at"]["line"], 1, "{s}");
    assert_eq!(
        s["interrupted_at"]["repeat"].as_u64().unwrap(),
        published + 1,
        "{s}"
    );
    // Exactly what was reported confirmed is in the queue.
    assert_eq!(u64::from(count(&conn, &q).await), published);

    // The table says the same, with the same exit code.
    let child = spawn(&[]);
    started(published + 50).await;
    term(&child);
    let out = wait_within(child, CLI_LIMIT);
    assert_eq!(out.status.code(), Some(143), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" not sent, from line 1 of repeat "), "{text}");
    let in_queue = u64::from(count(&conn, &q).await);
    let (_, rest) = text.split_once("confirmed ").unwrap();
    let confirmed: u64 = rest
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap();
    assert_eq!(in_queue, published + confirmed, "{text}");
}

/// A script that runs `warren publish` reads its exit code: `--help` says
/// what each one means (it used to name none).
#[test]
fn publish_help_says_what_each_exit_code_means() {
    let out = warren()
        .args(["publish", "--help"])
        .output_within(CLI_LIMIT);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for text in [
        "Exit codes: 0 every message confirmed",
        "1 ",
        "2 ",
        "130 (Ctrl-C)",
        "143 (SIGTERM)",
        "a second signal quits at once",
    ] {
        assert!(help.contains(text), "{text:?} not in:\n{help}");
    }
}

const SECRET_URL: &str = "amqp://guest:s3cretPW@127.0.0.1:5672/%2f";

/// `warren` with `args`, its exit code and stderr.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = warren().args(args).output_within(CLI_LIMIT);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `warren publish` with `input` on stdin.
fn publish_stdin(args: &[&str], input: &[u8]) -> (Option<i32>, String) {
    let mut child = warren()
        .arg("publish")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = wait_within(child, CLI_LIMIT);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_names_the_url_variable_but_never_shows_its_password() {
    // Every command's -h and --help, found by walking "Commands:".
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        for flag in ["-h", "--help"] {
            let out = warren()
                .env("WARREN_AMQP_URL", SECRET_URL)
                .args(&path)
                .arg(flag)
                .output_within(CLI_LIMIT);
            assert!(out.status.success(), "{path:?} {flag}: {out:?}");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(!text.contains("s3cretPW"), "{path:?} {flag}:\n{text}");
            assert!(
                text.contains("[env: WARREN_AMQP_URL]"),
                "{path:?} {flag} still names the variable:\n{text}"
            );
            if flag == "--help" {
                let commands = text
                    .lines()
                    .skip_while(|l| *l != "Commands:")
                    .skip(1)
                    .take_while(|l| !l.is_empty());
                for line in commands {
                    let name = line.split_whitespace().next().unwrap();
                    if name != "help" {
                        let mut sub = path.clone();
                        sub.push(name.to_owned());
                        todo.push(sub);
                    }
                }
            }
        }
        seen += 1;
    }
    assert!(seen >= 20, "walked only {seen} commands");
}

#[test]
fn a_url_that_does_not_parse_is_never_printed_with_its_password() {
    for url in [
        "amqp//guest:s3cretPW@127.0.0.1:5672/%2f",
        "http://guest:s3cretPW@127.0.0.1:5672/%2f",
    ] {
        let (code, err) = run(&["--amqp-url", url, "publish", "-e", "x", "--body", "{}"]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("guest:***@127.0.0.1"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_broker_would_refuse_exits_2_before_anything_is_sent() {
    let topo = Topo::new("pubrefuse", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let exchange = topo.exchange();
    let long = "k".repeat(300);
    let header = format!("{long}=v");
    let message_id = format!("message-id={long}");
    let content_type = format!("content-type={long}");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-k", "order.x", "--header", &header],
            "--header name is 300 bytes",
        ),
        (
            vec!["-k", "order.x", "--property", &message_id],
            "--property message-id is 300 bytes",
        ),
        (
            vec!["-k", "order.x", "--property", &content_type],
            "--property content-type is 300 bytes",
        ),
        (vec!["-k", &long], "--routing-key is 300 bytes"),
        (
            vec!["-k", "order.x", "--property", "delivery-mode=0"],
            "--property delivery-mode: \"0\" is not 1 (transient) or 2 (persistent)",
        ),
        (
            vec!["-k", "order.x", "--property", "expiration=abc"],
            "--property expiration: \"abc\" is not a whole number of milliseconds",
        ),
        (
            vec!["-k", "order.x", "--property", "expiration=-5"],
            "--property expiration: \"-5\" is not a whole number of milliseconds",
        ),
        (
            vec!["-k", "order.x", "--property", "expiration=1.5"],
            "--property expiration: \"1.5\" is not a whole number of milliseconds",
        ),
        (
            vec!["-k", "order.x", "--property", "user-id=bob"],
            "the connection logs in as \"guest\", and RabbitMQ refuses a user-id other than the connection's user",
        ),
        (
            vec!["-k", "order.x", "--timeout", "0s"],
            "--timeout must be more than 0s",
        ),
        (vec!["-k", "order.x", "--window", "0"], "--window must be at least 1"),
        (
            vec!["-k", "order.x", "--property", "expiration=315360000001"],
            "--property expiration: 315360000001 is over RabbitMQ's limit of 315360000000 milliseconds (ten years)",
        ),
        (
            vec!["-k", "order.x", "--property", "timestamp=yesterday"],
            "--property timestamp: \"yesterday\" is neither seconds since 1970 (such as 1700000000) nor an RFC 3339 time (such as 2024-01-02T03:04:05Z)",
        ),
    ];
    for (args, want) in &cases {
        let mut all = vec!["publish", "-e", &exchange, "--body", "{\"n\":1}"];
        all.extend(args);
        let (code, err) = run(&all);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        if want.contains("bytes") {
            assert!(err.contains("AMQP allows at most 255 bytes"), "{err}");
        }
    }
    // An exchange name is a short string too (checked before connecting).
    let (code, err) = run(&["publish", "-e", &long, "--body", "{}"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--exchange is 300 bytes") && err.contains("at most 255 bytes"),
        "{err}"
    );
    assert_eq!(count(&conn, &topo.q("g")).await, 0, "nothing was sent");

    // What is right passes: 255 bytes, whole milliseconds, the own user.
    let max = format!("message-id={}", "m".repeat(255));
    let out = warren()
        .args(["publish", "-e", &exchange, "-k", "order.x", "--body", "{}"])
        .args(["--property", &max, "--property", "expiration=60000"])
        .args([
            "--property",
            "user-id=guest",
            "--property",
            "delivery-mode=1",
        ])
        .args(["--header", &format!("{}=v", "h".repeat(255))])
        .args(["--property", "timestamp=2024-01-02T03:04:05Z"])
        .args(["--property", "expiration=315360000000"])
        .output_within(CLI_LIMIT);
    assert!(out.status.success(), "{out:?}");
    let got = warren_testkit::drain(&conn, &topo.q("g")).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].1.timestamp(),
        &Some(1_704_164_645),
        "RFC 3339 as seconds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_lone_surrogates_refuse_the_whole_input() {
    let topo = Topo::new("pubutf8", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let exchange = topo.exchange();
    let args = ["-e", &exchange, "-k", "order.x", "--file", "-"];
    for input in [
        &b"{\"ok\":1}\n{\"n\":\"\xff\xfe\"}\n"[..],
        b"{\"ok\":1}\n{\"n\":\"\\ud800\"}\n",
        b"{\"ok\":1}\n[\"\\udc00\"]\n",
    ] {
        let (code, err) = publish_stdin(&args, input);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("stdin:2:")
                && err.contains(": not valid JSON: ")
                && err.contains("nothing was published"),
            "{err}"
        );
    }
    let (code, err) = run(&["publish", "-e", &exchange, "--body", "\"\\ud800\""]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--body is not valid JSON"), "{err}");
    assert_eq!(count(&conn, &topo.q("g")).await, 0, "nothing was sent");

    // A surrogate pair is a character: it goes.
    let (code, err) = publish_stdin(&args, b"{\"smile\":\"\\ud83d\\ude00\"}\n");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(count(&conn, &topo.q("g")).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_says_how_to_raise_it_and_the_flag_does() {
    let topo = Topo::new("pubsize", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let exchange = topo.exchange();
    // A JSON string of 16 MiB + 1 byte, quotes included.
    let body = format!("\"{}\"", "x".repeat(16 * 1024 * 1024 - 1));
    let file = std::env::temp_dir().join(format!("{}.jsonl", topo.p));
    std::fs::write(&file, format!("{{}}\n{body}\n")).unwrap();
    let path = file.to_str().unwrap();
    let (code, err) = run(&["publish", "-e", &exchange, "-k", "order.x", "--file", path]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{}.jsonl:2: the message is 16777217 bytes, over the limit of 16777216 bytes (16 MiB); \
             raise it with --max-message-size, up to the broker's max_message_size \
             (128 MiB by default in RabbitMQ 3.10); nothing was published",
            topo.p
        )),
        "{err}"
    );
    assert!(!err.contains("PublisherConfig"), "{err}");
    assert_eq!(count(&conn, &topo.q("g")).await, 0, "nothing was sent");

    let out = warren()
        .args(["publish", "-e", &exchange, "-k", "order.x", "--file", path])
        .args(["--max-message-size", "17MiB", "--output", "json"])
        .output_within(CLI_LIMIT);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out.stdout)["confirmed"], 2);
    let got = drain(&conn, &topo.q("g")).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].1.len(), body.len());
    assert!(got[1].1 == body.as_bytes(), "byte-exact");

    let (code, err) = run(&[
        "publish",
        "-e",
        &exchange,
        "--body",
        "{}",
        "--max-message-size",
        "1GiB",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--max-message-size"), "{err}");
}

/// `--rate N` is a ceiling: after a stall (here the process stopped, as
/// Ctrl-Z does; a full window or a reconnect stalls it the same way) the
/// messages it could not send on time are not sent in a burst to catch up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_is_a_ceiling_even_after_a_stall() {
    let topo = Topo::new("pubrate", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let q = topo.q("g");
    let child = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.created"])
        .args(["--body", "{\"n\":1}", "--count", "100", "--rate", "5", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(&conn, &q).await >= 2
        })
        .await,
        "publishing started"
    );
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    let at_stop = count(&conn, &q).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    signal("-CONT");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = count(&conn, &q).await;
    signal("-INT");
    let out = wait_within(child, CLI_LIMIT);
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    // 5 a second: at most 6 in the second after the stall (20 missed ones
    // went out at once before).
    assert!(
        after - at_stop <= 7,
        "{} sent within a second of the stall's end at --rate 5",
        after - at_stop
    );
}

/// A `headers` exchange matches on values and their types: a binding
/// declared with a JSON number (as `rabbitmqadmin` and the management UI do)
/// holds an integer, which the string "5" never matches. `K:=JSON` sends a
/// typed value; `K=V` stays a string, as `amqp-publish -H` sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_headers_match_a_headers_exchange_binding() {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let p = unique("pubhdr");
    let (ex, q) = (format!("{p}.hx"), format!("{p}.hq"));
    let _cleanup = warren_testkit::Cleanup::empty()
        .at(URL.parse().unwrap())
        .queue(&q)
        .exchange(&ex);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        ex.as_str().into(),
        lapin::ExchangeKind::Headers,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-match".into(), AMQPValue::LongString("all".into()));
    args.insert("n".into(), AMQPValue::LongLongInt(5));
    args.insert("ok".into(), AMQPValue::Boolean(true));
    ch.queue_bind(
        q.as_str().into(),
        ex.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        args,
    )
    .await
    .unwrap();

    // Strings: no match, returned.
    let out = warren()
        .args(["publish", "-e", &ex, "--body", "{}"])
        .args(["--header", "n=5", "--header", "ok=true"])
        .output_within(CLI_LIMIT);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("returned 1"));

    // Typed: routed, and every value lands with its type.
    let out = warren()
        .args(["publish", "-e", &ex, "--body", "{}"])
        .args(["--header", "n:=5", "--header", "ok:=true"])
        .args(["--header", "ratio:=1.5", "--header", "none:=null"])
        .args(["--header", "s:=\"5\"", "--header", "tags:=[\"a\",2]"])
        .args(["--header", "obj:={\"k\":-1}", "--header", "eq=a=b"])
        .output_within(CLI_LIMIT);
    assert!(out.status.success(), "{out:?}");
    let got = drain(&conn, &q).await;
    assert_eq!(got.len(), 1);
    let h = got[0].2.inner();
    assert_eq!(h.get("n"), Some(&AMQPValue::LongLongInt(5)));
    assert_eq!(h.get("ok"), Some(&AMQPValue::Boolean(true)));
    assert_eq!(h.get("ratio"), Some(&AMQPValue::Double(1.5)));
    assert_eq!(h.get("none"), Some(&AMQPValue::Void));
    assert_eq!(h.get("s"), Some(&AMQPValue::LongString("5".into())));
    assert_eq!(
        h.get("tags"),
        Some(&AMQPValue::FieldArray(
            vec![AMQPValue::LongString("a".into()), AMQPValue::LongLongInt(2)].into()
        ))
    );
    let mut obj = FieldTable::default();
    obj.insert("k".into(), AMQPValue::LongLongInt(-1));
    assert_eq!(h.get("obj"), Some(&AMQPValue::FieldTable(obj)));
    assert_eq!(h.get("eq"), Some(&AMQPValue::LongString("a=b".into())));

    // Refused before connecting: not JSON, a header given twice.
    for (args, want) in [
        (
            vec!["--header", "n:=five"],
            "--header n:=five: not JSON (expected ident at column 2); write a number, true, false, null, \"a string\", [a list] or {\"an\": \"object\"}",
        ),
        (
            vec!["--header", "n=1", "--header", "n:=2"],
            "--header n: given twice; a header has one value (a list is n:=[...])",
        ),
        (
            vec!["--header", "big:=9223372036854775808"],
            "--header big:=9223372036854775808: over the largest integer a header holds (9223372036854775807)",
        ),
    ] {
        let mut all = vec!["publish", "-e", &ex, "--body", "{}"];
        all.extend(args);
        let (code, err) = run(&all);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(want), "{err}");
    }
    assert_eq!(count(&conn, &q).await, 0);
}

/// A UTF-8 byte order mark (Windows editors and PowerShell write one) is not
/// JSON, but RFC 8259 lets a parser ignore it: each line is published
/// without it. An invalid line is named as file:line:column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_order_mark_is_skipped_and_errors_name_line_and_column() {
    let topo = Topo::new("pubbom", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let exchange = topo.exchange();
    let args = ["-e", &exchange, "-k", "order.x", "--file", "-"];
    let (code, err) = publish_stdin(&args, b"\xef\xbb\xbf{\"a\":1}\r\n\xef\xbb\xbf{\"a\":2}\r\n");
    assert_eq!(code, Some(0), "{err}");
    let got = drain(&conn, &topo.q("g")).await;
    let bodies: Vec<&[u8]> = got.iter().map(|m| m.1.as_slice()).collect();
    assert_eq!(bodies, [&b"{\"a\":1}"[..], b"{\"a\":2}"]);

    let (code, err) = publish_stdin(&args, b"{\"a\":1}\n\n{bad}\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("stdin:3:2: not valid JSON: key must be a string; nothing was published"),
        "{err}"
    );
    assert_eq!(count(&conn, &topo.q("g")).await, 0);
}

/// `warren publish` sends JSON: `--body hello` (text, as `amqp-publish`
/// or `rabbitmqadmin` take it) used to be refused with serde's "expected
/// value at line 1 column 1", which does not say what to write. A body that
/// is not even the start of a JSON value says how to send it as a JSON
/// string; one that is (a broken object) keeps the parser's words alone.
#[test]
fn text_that_is_not_json_is_refused_with_how_to_send_it_as_a_string() {
    let (code, err) = run(&["publish", "-e", "x", "--body", "hello"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        "error: --body is not valid JSON: expected value at line 1 column 1; warren publish \
         sends JSON bodies: send text as a JSON string, in quotes: --body '\"hello\"'\n"
    );
    let (code, err) = run(&["publish", "-e", "x", "--body", "it's 5"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.ends_with("send text as a JSON string, in quotes: --body '\"some text\"'\n"),
        "{err}"
    );
    let (code, err) = publish_stdin(&["-e", "x", "--file", "-"], b"{\"a\":1}\norder 5 paid\n");
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        "error: stdin:2:1: not valid JSON: expected value; nothing was published (every line is \
         one JSON value: send text as a JSON string, in quotes: \"order 5 paid\")\n"
    );
    // A broken object keeps the parser's words alone.
    let (code, err) = run(&["publish", "-e", "x", "--body", "{bad"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        "error: --body is not valid JSON: key must be a string at line 1 column 2\n"
    );
}

/// The broker's pid of the AMQP connection the process `pid` has open to
/// port 5672, found by its local port (every `warren publish` names its
/// connection `warren-publish@host`, so the name cannot tell ours from others').
fn connection_of(pid: u32) -> Option<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    let port = tcp.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, inode) = (f.get(1)?, f.get(2)?, f.get(9)?);
        let remote_port = u16::from_str_radix(remote.rsplit(':').next()?, 16).ok()?;
        (remote_port == 5672 && inodes.iter().any(|i| i == inode))
            .then(|| u16::from_str_radix(local.rsplit(':').next()?, 16).ok())
            .flatten()
    })?;
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "peer_port"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (conn, peer) = l.split_once('\t')?;
        (peer.trim() == port.to_string()).then(|| conn.trim().to_owned())
    })
}

/// The broker closes the connection mid-run (as `rabbitmqctl
/// close_connection` or a broker node going away does): the publisher
/// reconnects and sends the unconfirmed messages again, and the queue may
/// then hold copies of some. The summary says how many were sent again, so
/// that its counts reconcile with the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_survived_and_the_resent_are_counted() {
    let topo = Topo::new("publost", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let q = topo.q("g");
    const N: u64 = 60_000;
    let child = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.created"])
        .args(["--body", "{\"n\":1}", "--count", &N.to_string()])
        .args(["--output", "json", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            count(&conn, &q).await >= 3_000
        })
        .await,
        "publishing started"
    );
    let ours = connection_of(pid).expect("the publisher's connection");
    let closed = Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &ours, "closed by a warren test"])
        .status()
        .unwrap();
    assert!(closed.success());
    let out = wait_within(child, CLI_LIMIT);
    assert!(out.status.success(), "{out:?}");
    let s = json(&out.stdout);
    assert_eq!(s["confirmed"].as_u64(), Some(N), "{s}");
    let resent = s["resent"]
        .as_u64()
        .unwrap_or_else(|| panic!("no resent count: {s}"));
    assert!(resent > 0, "a full window was in flight: {s}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reconnect"), "{stderr}");
    // Every confirmed message is there; at most the resent ones twice.
    let stored = u64::from(count(&conn, &q).await);
    assert!(
        (N..=N + resent).contains(&stored),
        "{stored} in the queue, {N} confirmed, {resent} resent"
    );

    // The table says it too.
    let out = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.created"])
        .args(["--body", "{\"n\":1}"])
        .output_within(CLI_LIMIT);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("resent"));
}

/// With `--output json`, standard output is one JSON document on every path,
/// as for `topology` and `dlq`: a failure before the summary (a usage error,
/// a broker that refuses the connection) is `{"error": {...}}`.
#[test]
fn json_output_is_a_document_even_when_publishing_cannot_start() {
    let cases = [
        (
            vec!["publish", "-e", "x", "--body", "{}", "--count", "0"],
            2,
            "usage",
            "--count must be at least 1",
        ),
        (
            vec![
                "--amqp-url",
                "amqp://guest:guest@127.0.0.1:5672/warren-no-such-vhost",
                "publish",
                "-e",
                "x",
                "--body",
                "{}",
            ],
            1,
            "connect",
            "vhost \"warren-no-such-vhost\" does not exist",
        ),
    ];
    for (args, code, kind, message) in cases {
        let out = warren()
            .args(&args)
            .args(["--output", "json"])
            .output_within(CLI_LIMIT);
        assert_eq!(out.status.code(), Some(code), "{out:?}");
        let doc = json(&out.stdout);
        assert_eq!(doc["error"]["kind"], kind, "{doc}");
        let text = doc["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{doc}");
    }
}

/// A `--rate` so low that the wait between two messages does not fit a
/// duration is a usage error before connecting, not a panic after it.
#[test]
fn a_rate_too_low_to_schedule_is_a_usage_error_not_a_panic() {
    for (rate, shown) in [
        ("1e-300", "1e-300"),
        ("1e-19", "1e-19"),
        ("0.0000000001", "1e-10"),
    ] {
        let (code, err) = run(&["publish", "-e", "x", "--body", "{}", "--rate", rate]);
        assert_eq!(code, Some(2), "--rate {rate}: {err}");
        assert!(!err.contains("panicked"), "--rate {rate}: {err}");
        assert!(
            err.contains(&format!(
                "--rate must be a number of messages per second from 0.000000001 (one every 31 years) up, not {shown}"
            )),
            "--rate {rate}: {err}"
        );
    }
}

/// The default exchange ("") routes to the queue named by the routing key
/// and takes no bindings: a message to a queue that does not exist says so,
/// instead of telling the user to declare a binding.
#[test]
fn unroutable_on_the_default_exchange_names_the_missing_queue() {
    let q = unique("pubnoqueue");
    let out = warren()
        .args(["publish", "-e", "", "-k", &q, "--body", "{}"])
        .output_within(CLI_LIMIT);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "line 1: returned: unroutable: there is no queue named {q:?}: the default exchange \"\" delivers to the queue whose name is the routing key (broker said 312 NO_ROUTE); declare the queue (warren topology apply) or fix the routing key"
        )),
        "{text}"
    );
    assert!(!text.contains("binding"), "{text}");
}

/// A body under `--max-message-size` but over the broker's own
/// `max_message_size` (128 MiB in RabbitMQ 3.x) is refused by the broker:
/// the failure says to keep the flag within the broker's limit, not to set
/// a field of the Rust library, and the other messages still go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_brokers_max_message_size_names_the_flag() {
    let topo = Topo::new("pubbrokersize", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let file = std::env::temp_dir().join(format!("{}.jsonl", topo.p));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        f.write_all(b"\"").unwrap();
        let chunk = vec![b'x'; 1024 * 1024];
        for _ in 0..128 {
            f.write_all(&chunk).unwrap();
        }
        f.write_all(b"\"\n{\"n\":2}\n").unwrap();
    }
    let out = warren()
        .args(["publish", "-e", &topo.exchange(), "-k", "order.x"])
        .args([
            "--file",
            file.to_str().unwrap(),
            "--max-message-size",
            "200MiB",
        ])
        .output_within(CLI_LIMIT);
    let _ = std::fs::remove_file(&file);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("confirmed 1") && text.contains("failed 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "(406 PRECONDITION_FAILED - message size 134217730 is larger than configured max size 134217728); \
             it was not stored, and sending it again would be refused the same way; \
             the body is over the broker's max_message_size: keep --max-message-size within it \
             (128 MiB by default in RabbitMQ 3.x), and such a body is refused before anything is sent"
        ),
        "{text}"
    );
    assert!(!text.contains("PublisherConfig"), "{text}");
    assert_eq!(count(&conn, &topo.q("g")).await, 1, "the small one went");
}

/// Reading messages from a terminal says what it waits for (one JSON
/// document per line, Ctrl-D to end) instead of waiting in silence; a pipe
/// gets no such line.
#[test]
fn publish_reading_a_terminal_says_what_it_waits_for() {
    const HINT: &str =
        "reading messages from the terminal, one JSON document per line; end with Ctrl-D";
    // `script` (util-linux) runs the command on a terminal of its own; its
    // own stdin, empty, ends the input.
    let cmd = format!(
        "{} publish --exchange '' --routing-key h12-nowhere",
        env!("CARGO_BIN_EXE_warren")
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("WARREN_TOPOLOGY")
        .env_remove("RUST_LOG")
        .env("WARREN_AMQP_URL", URL)
        .stdin(Stdio::null())
        .output_within(CLI_LIMIT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(HINT), "{text}");
    assert!(text.contains("nothing to publish"), "{text}");
    assert_eq!(out.status.code(), Some(2), "{text}");

    let (code, stderr) = publish_stdin(&["--exchange", "", "--routing-key", "h12-nowhere"], b"");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!stderr.contains(HINT), "{stderr}");
}

/// Headers too large for one frame are the same for every message: they
/// are refused before connecting, as other bad input is (exit 2, nothing
/// published), with the frame size and what to change; the limit is the
/// publisher's own (a header one byte shorter is published). (Before:
/// exit 1 after connecting, every message "failed".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_too_large_for_a_frame_are_refused_before_anything_is_sent() {
    let topo = Topo::new("pubframe", &[GROUP]);
    topo.apply();
    let conn = connect().await;
    let exchange = topo.exchange();
    let big = format!("a={}", "x".repeat(70_000));
    let big2 = format!("b={}", "x".repeat(70_000));
    let small = |n: usize| format!("a={}", "x".repeat(n));
    let (fit, over) = (small(4000), small(4001));
    let frame_4096 = "amqp://guest:guest@127.0.0.1:5672/%2f?frame_max=4096";
    // No broker listens there: a check after connecting would take retries
    // and exit 1.
    let nowhere = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f?frame_max=4096",
        free_port()
    );
    let default_text = "error: --header: the message's properties and headers do not fit in one frame of 131072 bytes, and they cannot be split across frames (the broker would close the connection on such a message); nothing was published. The limit is frame_max 131072, the frame size the connection asks for; send fewer or smaller headers (the body can be larger than a frame)\n";
    let small_text = "error: --header: the message's properties and headers do not fit in one frame of 4096 bytes, and they cannot be split across frames (the broker would close the connection on such a message); nothing was published. The limit is the frame size the URL asks for (?frame_max=4096); raise it, up to the broker's frame_max (128 KiB by default), or send fewer or smaller headers (the body can be larger than a frame)\n";
    for (url, headers, want) in [
        (URL, vec![&big, &big2], default_text),
        (frame_4096, vec![&over], small_text),
        (nowhere.as_str(), vec![&over], small_text),
    ] {
        let mut args = vec![
            "--amqp-url",
            url,
            "publish",
            "-e",
            &exchange,
            "-k",
            "order.x",
        ];
        args.extend(["--body", "{}", "--count", "3"]);
        for h in &headers {
            args.extend(["--header", h.as_str()]);
        }
        let started = Instant::now();
        let out = warren().args(&args).output_within(CLI_LIMIT);
        assert_eq!(out.status.code(), Some(2), "{url}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), want, "{url}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "", "{url}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{url}: no retries"
        );
        args.extend(["--output", "json"]);
        let out = warren().args(&args).output_within(CLI_LIMIT);
        assert_eq!(out.status.code(), Some(2), "{url}: {out:?}");
        let doc = json(&out.stdout);
        assert_eq!(doc["error"]["kind"], "usage", "{doc}");
        assert_eq!(
            doc["error"]["message"].as_str().unwrap(),
            want.strip_prefix("error: ").unwrap().trim_end()
        );
    }
    assert_eq!(count(&conn, &topo.q("g")).await, 0, "nothing was sent");
    // One byte less fits: published and confirmed.
    let out = warren()
        .args(["--amqp-url", frame_4096, "publish", "-e", &exchange])
        .args(["-k", "order.x", "--body", "{}", "--header", &fit])
        .output_within(CLI_LIMIT);
    assert!(out.status.success(), "{out:?}");
    let got = warren_testkit::drain(&conn, &topo.q("g")).await;
    assert_eq!(got.len(), 1);
}
