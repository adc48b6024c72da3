//! `warren topology` as a user runs it: exit codes, the text they read, and
//! a plan that matches what the broker shows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use warren_testkit::{OutputWithin, CLI_LIMIT};

fn warren(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .env_remove("WARREN_TOPOLOGY")
        .env_remove("RUST_LOG")
        .output_within(CLI_LIMIT)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn prefix() -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("cli{}-{n}", std::process::id())
}

/// A topology file with unique names, removed (with its queues) on drop.
struct TempTopology {
    path: PathBuf,
    queues: Vec<String>,
    exchange: String,
}

impl TempTopology {
    fn new(p: &str) -> TempTopology {
        let path = std::env::temp_dir().join(format!("{p}.toml"));
        std::fs::write(
            &path,
            format!(
                "[[exchange]]\nname = \"{p}.orders\"\nkind = \"topic\"\n\n[[group]]\nname = \"{p}.billing\"\nexchange = \"{p}.orders\"\nbindings = [\"order.*\"]\nretry = [\"1s\"]\ndelivery_limit = 3\n"
            ),
        )
        .unwrap();
        TempTopology {
            path,
            queues: vec![
                format!("{p}.billing"),
                format!("{p}.billing.retry.1"),
                format!("{p}.billing.dead"),
            ],
            exchange: format!("{p}.orders"),
        }
    }
}

impl Drop for TempTopology {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        for q in &self.queues {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_queue", q])
                .output();
        }
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "eval", &format!("rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"{}\">>), false, <<\"test\">>).", self.exchange)])
            .output();
    }
}

#[test]
fn a_bad_file_exits_2_naming_file_line_and_field_and_touches_nothing() {
    let path = std::env::temp_dir().join(format!("{}-bad.toml", prefix()));
    std::fs::write(&path, "[[exchange]]\nname = \"orders\"\nkind = \"topic\"\n\n[[group]]\nname = \"billing\"\nexchange = \"orders\"\nretry = [\"1s\", \"soon\"]\n").unwrap();
    let p = path.to_str().unwrap();
    for cmd in ["show", "apply", "verify"] {
        let o = warren(&["topology", cmd, "-f", p]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {out}{err}");
        assert!(
            err.starts_with(&format!(
                "error: {p}:8:16: group.retry: \"soon\" is not a duration"
            )),
            "{cmd}: {err}"
        );
        assert!(out.is_empty(), "{cmd} printed {out}");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_missing_file_exits_2_and_says_how_to_point_at_one() {
    let o = warren(&["topology", "show", "-f", "/nonexistent/warren.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("-f or WARREN_TOPOLOGY"));
}

#[test]
fn show_prints_the_plan_and_json_for_scripts() {
    let o = warren(&[
        "topology",
        "show",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.toml"),
    ]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(out.contains("billing.retry.3"), "{out}");
    assert!(out.contains("x-delivery-limit=5"), "{out}");
    let o = warren(&[
        "topology",
        "show",
        "--output",
        "json",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.toml"),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let queues = v["plan"]["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 10);
    assert_eq!(v["plan"]["bindings"].as_array().unwrap().len(), 5);
}

#[test]
fn apply_then_verify_matches_what_rabbitmqctl_shows() {
    let p = prefix();
    let t = TempTopology::new(&p);
    let f = t.path.to_str().unwrap();

    let o = warren(&["topology", "verify", "-f", f]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!("MISSING   queue     {p}.billing.retry.1")),
        "{out}"
    );

    let o = warren(&["topology", "apply", "-f", f]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains(&format!("created    queue     {p}.billing.dead")),
        "{out}"
    );
    assert!(out.contains(": 4 created, 1 already there"), "{out}");

    let o = warren(&["topology", "verify", "-f", f, "--output", "json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["matches"], true);

    // The plan's arguments are the broker's arguments.
    let listed = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--formatter",
            "json",
            "name",
            "arguments",
        ])
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    let plan = warren(&["topology", "show", "-f", f, "--output", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    for q in plan["plan"]["queues"].as_array().unwrap() {
        let name = q["name"].as_str().unwrap();
        let row = rows
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} not on the broker"));
        let broker: serde_json::Map<String, serde_json::Value> = row["arguments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a[0].as_str().unwrap().to_owned(), a[2].clone()))
            .collect();
        assert_eq!(serde_json::Value::Object(broker), q["arguments"], "{name}");
    }

    let o = warren(&["topology", "apply", "-f", f]);
    assert!(
        text(&o).0.contains("0 created"),
        "applying twice changes nothing"
    );
}

#[test]
fn a_wrong_password_is_a_clear_error_without_the_password() {
    let p = prefix();
    let t = TempTopology::new(&p);
    let o = warren(&[
        "topology",
        "apply",
        "-f",
        t.path.to_str().unwrap(),
        "-vv",
        "--amqp-url",
        "amqp://guest:Sup3rS3cretPw@127.0.0.1:5672/%2f",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        !out.contains("Sup3rS3cretPw") && !err.contains("Sup3rS3cretPw"),
        "the password leaked: {out}{err}"
    );
    assert!(err.contains("amqp://guest:***@127.0.0.1:5672/%2f"), "{err}");
    assert!(err.contains("refused user \"guest\""), "{err}");
    // Logs into a pipe (-vv: there are some) carry no colour codes.
    assert!(err.contains(" DEBUG "), "{err}");
    assert!(!err.contains('\x1b'), "escape codes in piped logs: {err:?}");
}

/// The AMQP client's TRACE events print the URL and the login frame (the
/// password as a list of bytes): at `-vvv` and with `RUST_LOG=trace` the
/// log is as verbose as asked, but never holds the password.
#[test]
fn trace_logs_never_hold_the_password() {
    let p = prefix();
    let t = TempTopology::new(&p);
    let pw = "Tr4ceS3cretPw";
    let url = format!("amqp://guest:{pw}@127.0.0.1:5672/%2f");
    let args = [
        "topology",
        "verify",
        "-f",
        t.path.to_str().unwrap(),
        "--amqp-url",
        &url,
    ];
    let vvv = {
        let mut a = args.to_vec();
        a.push("-vvv");
        warren(&a)
    };
    let rust_log = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .env_remove("WARREN_TOPOLOGY")
        .env("RUST_LOG", "trace")
        .output_within(CLI_LIMIT);
    let bytes: Vec<String> = pw.bytes().map(|b| b.to_string()).collect();
    for (how, o) in [("-vvv", vvv), ("RUST_LOG=trace", rust_log)] {
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{how}: {out}{err}");
        // Verbose as asked: the client's DEBUG events are shown.
        assert!(err.contains("DEBUG lapin"), "{how}: {err}");
        let log = format!("{out}{err}").replace(' ', "");
        assert!(!log.contains(pw), "{how}: the password leaked: {out}{err}");
        assert!(
            !log.contains(&bytes.join(",")),
            "{how}: the password leaked as bytes: {out}{err}"
        );
    }
}

#[test]
fn a_malformed_url_is_a_usage_error_without_the_password() {
    let o = warren(&[
        "topology",
        "verify",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.toml"),
        "--amqp-url",
        "http://guest:Sup3rS3cretPw@host/",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        !out.contains("Sup3rS3cretPw") && !err.contains("Sup3rS3cretPw"),
        "{err}"
    );
    assert!(err.contains("WARREN_AMQP_URL"), "{err}");
}

#[test]
fn an_empty_file_is_said_to_declare_nothing() {
    let path = std::env::temp_dir().join(format!("{}-empty.toml", prefix()));
    std::fs::write(&path, "# nothing yet\n").unwrap();
    let o = warren(&["topology", "show", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("declares no [[exchange]] and no [[group]]"),
        "an empty file passes silently: {err}"
    );
}
