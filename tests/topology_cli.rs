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

fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        let (out, err) = text(o);
        panic!("stdout is not one JSON document ({e}): {out:?}; stderr: {err}")
    })
}

/// `apply --output json` prints one JSON document in every outcome, with
/// the facts the table output gives and the same exit code: here a queue
/// that exists with another TTL (nothing is declared).
#[test]
fn apply_json_names_each_object_that_differs() {
    let p = prefix();
    let t = TempTopology::new(&p);
    let f = t.path.to_str().unwrap();
    assert!(warren(&["topology", "apply", "-f", f]).status.success());
    let changed = std::env::temp_dir().join(format!("{p}-changed.toml"));
    std::fs::write(
        &changed,
        std::fs::read_to_string(&t.path)
            .unwrap()
            .replace("retry = [\"1s\"]", "retry = [\"2s\"]"),
    )
    .unwrap();
    let o = warren(&[
        "topology",
        "apply",
        "-f",
        changed.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let _ = std::fs::remove_file(&changed);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    let v = json_of(&o);
    let message = format!("topology apply stopped; nothing was declared: queue \"{p}.billing.retry.1\" exists on the broker with other settings: x-message-ttl: the broker has 1000, the topology wants 2000. warren deleted nothing; to change it, move its messages away, delete it yourself and apply again");
    assert_eq!(
        v,
        serde_json::json!({
            "applied": [],
            "error": {
                "kind": "mismatch",
                "message": message,
                "differs": [{
                    "kind": "queue",
                    "name": format!("{p}.billing.retry.1"),
                    "detail": "x-message-ttl: the broker has 1000, the topology wants 2000",
                }],
            },
            "lints": [],
        })
    );
    // The table's text is still on stderr.
    assert_eq!(text(&o).1, format!("error: {message}\n"));
}

/// A failure after some objects were declared (here a user who may
/// configure only some of the names): the JSON lists what was applied and
/// which object failed, as the table's "already declared" does.
#[test]
fn apply_json_after_a_partial_failure_lists_what_was_applied() {
    let p = prefix();
    let t = TempTopology::new(&p);
    let user = warren_testkit::TempUser::create();
    let configure = format!("^({p}\\.orders|warren\\.dlx|{p}\\.billing)$");
    warren_testkit::rabbitmqctl(&[
        "set_permissions",
        "-p",
        "/",
        &user.name,
        &configure,
        ".*",
        ".*",
    ]);
    let url = user.url();
    let o = warren(&[
        "topology",
        "apply",
        "-f",
        t.path.to_str().unwrap(),
        "--amqp-url",
        url.expose(),
        "--output",
        "json",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    let password = url
        .expose()
        .rsplit_once('@')
        .unwrap()
        .0
        .rsplit_once(':')
        .unwrap()
        .1;
    assert!(
        !out.contains(password) && !err.contains(password),
        "{out}{err}"
    );
    let v = json_of(&o);
    assert_eq!(
        v["applied"],
        serde_json::json!([
            {"kind": "exchange", "name": format!("{p}.orders"), "action": "created"},
            {"kind": "exchange", "name": "warren.dlx", "action": "unchanged"},
            {"kind": "queue", "name": format!("{p}.billing"), "action": "created"},
        ])
    );
    assert_eq!(v["error"]["kind"], "access_refused", "{v}");
    assert_eq!(
        v["error"]["object"],
        format!("queue \"{p}.billing.retry.1\"")
    );
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("ACCESS_REFUSED"), "{message}");
    assert_eq!(err, format!("error: {message}\n"));
}

/// Every subcommand prints a JSON document when it cannot even start: a bad
/// file (exit 2), a bad URL (exit 2), a broker that does not answer (exit 1).
#[test]
fn every_subcommand_prints_json_on_failure() {
    let p = prefix();
    let bad = std::env::temp_dir().join(format!("{p}-bad.toml"));
    std::fs::write(&bad, "[[exchange]]\nname = \"orders\"\nkind = \"topic\"\n\n[[group]]\nname = \"billing\"\nexchange = \"orders\"\nretry = [\"1s\", \"soon\"]\n").unwrap();
    let bad = bad.to_str().unwrap().to_owned();
    let t = TempTopology::new(&p);
    let good = t.path.to_str().unwrap();
    for cmd in ["show", "apply", "verify"] {
        let o = warren(&["topology", cmd, "-f", &bad, "--output", "json"]);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {:?}", text(&o));
        let e = &json_of(&o)["error"];
        assert_eq!(e["kind"], "file", "{cmd}: {e}");
        assert_eq!(
            (&e["file"], &e["line"], &e["column"], &e["field"]),
            (
                &serde_json::json!(bad),
                &serde_json::json!(8),
                &serde_json::json!(16),
                &serde_json::json!("group.retry")
            ),
            "{cmd}: {e}"
        );
        assert!(
            e["message"].as_str().unwrap().starts_with(&format!(
                "{bad}:8:16: group.retry: \"soon\" is not a duration"
            )),
            "{cmd}: {e}"
        );
    }
    for cmd in ["apply", "verify"] {
        let o = warren(&[
            "topology",
            cmd,
            "-f",
            good,
            "--output",
            "json",
            "--amqp-url",
            "http://guest:Sup3rS3cretPw@host/",
        ]);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {:?}", text(&o));
        let e = &json_of(&o)["error"];
        assert_eq!(e["kind"], "usage", "{cmd}: {e}");
        assert!(
            !o.stdout.is_empty() && !String::from_utf8_lossy(&o.stdout).contains("Sup3rS3cretPw")
        );

        let o = warren(&[
            "topology",
            cmd,
            "-f",
            good,
            "--output",
            "json",
            "--amqp-url",
            "amqp://guest:Sup3rS3cretPw@127.0.0.1:1/%2f",
        ]);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {:?}", text(&o));
        let (out, err) = text(&o);
        assert!(
            !out.contains("Sup3rS3cretPw") && !err.contains("Sup3rS3cretPw"),
            "{out}{err}"
        );
        let v = json_of(&o);
        assert_eq!(v["error"]["kind"], "connect", "{cmd}: {v}");
        assert_eq!(
            v["error"]["url"], "amqp://guest:***@127.0.0.1:1/%2f",
            "{cmd}: {v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("cannot connect to amqp://guest:***@127.0.0.1:1/%2f: "),
            "{cmd}: {v}"
        );
    }
    let _ = std::fs::remove_file(&bad);
}

/// `handler_timeout` at or over the broker's default consumer_timeout is
/// legal (the broker's may be raised) but gets a lint saying what to raise.
#[test]
fn a_handler_timeout_past_the_consumer_timeout_is_a_lint() {
    let p = prefix();
    let path = std::env::temp_dir().join(format!("{p}-slow.toml"));
    std::fs::write(
        &path,
        format!("[[exchange]]\nname = \"{p}.orders\"\nkind = \"topic\"\n\n[[group]]\nname = \"{p}.video\"\nexchange = \"{p}.orders\"\nbindings = [\"video.*\"]\ndelivery_limit = 3\nhandler_timeout = \"45m\"\n"),
    )
    .unwrap();
    let f = path.to_str().unwrap();
    let lint = format!("group \"{p}.video\": handler_timeout 45m is at or over RabbitMQ's default consumer_timeout (30m): the broker closes the channel of a delivery unacked that long, before warren's timeout fires, and redelivers the message; raise the broker's consumer_timeout (rabbitmq.conf, in milliseconds) above handler_timeout plus the time a delivery waits for a free handler, or lower handler_timeout");
    let o = warren(&["topology", "show", "-f", f]);
    let json = warren(&["topology", "show", "-f", f, "--output", "json"]);
    let _ = std::fs::remove_file(&path);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.ends_with(&format!("WARNINGS\n  {lint}\n")), "{out}");
    assert_eq!(
        json_of(&json)["lints"],
        serde_json::json!([{"group": format!("{p}.video"), "message": lint.split_once(": ").unwrap().1}])
    );
}

/// The hint of a URL error is an example to copy: masking the password of
/// the URL given must not turn the example into `user:***@`.
#[test]
fn a_malformed_url_error_shows_a_usable_example() {
    for (url, says) in [
        (
            "amqp//guest:Sup3rS3cretPw@localhost/%2f",
            "error: invalid AMQP URL amqp//guest:***@localhost/%2f: relative URL without a base; expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f) (set --amqp-url or WARREN_AMQP_URL)\n",
        ),
        (
            "localhost:5672",
            "error: invalid AMQP URL localhost:5672: scheme \"localhost\" is not amqp or amqps; expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f) (set --amqp-url or WARREN_AMQP_URL)\n",
        ),
    ] {
        let o = warren(&[
            "topology",
            "verify",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.toml"),
            "--amqp-url",
            url,
        ]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{url}: {err}");
        assert_eq!(err, says, "{url}");
        assert!(out.is_empty(), "{url}: {out}");
    }
}

/// verify says what it cannot check: bindings and policies, which AMQP
/// 0-9-1 cannot read back.
#[test]
fn verify_says_it_does_not_check_bindings_or_policies() {
    let p = prefix();
    let t = TempTopology::new(&p);
    let f = t.path.to_str().unwrap();
    let o = warren(&["topology", "verify", "-f", f]);
    let (out, _) = text(&o);
    assert!(
        out.contains("\nnot checked: bindings and policies, which AMQP 0-9-1 cannot read back (`rabbitmqctl list_bindings` and `rabbitmqctl list_policies` show them); `warren topology apply` declares the bindings again, and a policy that matches these queues (a max-length, message-ttl or expires) changes how they behave without changing their arguments\n"),
        "{out}"
    );
    let o = warren(&["topology", "verify", "-f", f, "--output", "json"]);
    assert_eq!(
        json_of(&o)["not_checked"],
        serde_json::json!(["bindings", "policies"])
    );
}

/// A flag that does not parse is refused before any command runs; with
/// `--output json` that refusal is a JSON document too.
#[test]
fn a_flag_that_does_not_parse_prints_json_when_json_is_asked() {
    let o = warren(&["topology", "apply", "--output", "json", "--bogus"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert_eq!(
        json_of(&o),
        serde_json::json!({"error": {"kind": "usage", "message": "unexpected argument '--bogus' found"}})
    );
    assert!(
        err.starts_with("error: unexpected argument '--bogus' found\n"),
        "{err}"
    );
    // Without --output json, stdout stays empty.
    let o = warren(&["topology", "apply", "--bogus"]);
    assert!(o.stdout.is_empty());
}

/// With `--log-format json`, stderr is JSON lines to its last line: the
/// final error is a log event too (it was a plain `error: ...` line).
#[test]
fn with_json_logs_the_final_error_is_a_json_line() {
    let o = warren(&[
        "topology",
        "verify",
        "-f",
        "/nonexistent/warren.toml",
        "--log-format",
        "json",
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert_eq!(last["fields"]["exit_code"], 2, "{last}");
    let message = last["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("/nonexistent/warren.toml"), "{last}");
}
