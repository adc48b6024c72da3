//! `warren demo` runs to completion and its summary reconciles with the
//! queues on the broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::*;

/// Runs `warren demo args`; asserts it succeeded and returns its stdout.
fn demo(args: &[&str]) -> String {
    let o = warren().arg("demo").args(args).output_within(CLI_LIMIT);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "demo {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// Where a kept demo with `prefix` writes its topology file.
fn kept_file(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("warren-{}.toml", prefix.trim_end_matches('.')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_summary_reconciles_with_the_queues() {
    let prefix = format!("{}.", unique("demo"));
    let file = std::env::temp_dir().join(format!("{prefix}toml"));
    let stdout = demo(&[
        "--keep",
        "--output",
        "json",
        "--orders",
        "600",
        "--prefix",
        &prefix,
        "--write-topology",
        file.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // The kept topology file is what the next commands use: clean it up with its queues.
    let topo = Topo::adopt(&file);

    assert_eq!(v["published"], 600);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["reconciled"], true);
    let conn = connect().await;
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    let mut total_dead = 0;
    for g in groups {
        let name = g["group"].as_str().unwrap();
        assert!(name.starts_with(&prefix));
        let expected = g["expected"].as_u64().unwrap();
        let acked = g["acked"].as_u64().unwrap();
        let dead = g["dead_lettered"].as_u64().unwrap();
        assert_eq!(
            acked + dead,
            expected,
            "{name}: every delivery acked or dead-lettered"
        );
        assert_eq!(
            u64::from(count(&conn, &format!("{name}.dead")).await),
            dead,
            "{name}: the dead queue holds what the summary says"
        );
        assert_eq!(
            count(&conn, name).await,
            0,
            "{name}: nothing left in the work queue"
        );
        let retried: u64 = g["retried_by_tier"]
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_u64().unwrap())
            .sum();
        assert!(retried > 0, "{name}: the demo shows retries");
        total_dead += dead;
    }
    assert!(total_dead > 0, "the demo shows dead letters");
    assert_eq!(groups[0]["expected"], 600, "billing binds created and paid");
    assert_eq!(groups[1]["expected"], 300, "shipping binds paid only");
    drop(topo);
}

#[test]
fn without_keep_the_demo_cleans_up() {
    let prefix = format!("{}.", unique("democlean"));
    let stdout = demo(&["--orders", "100", "--prefix", &prefix]);
    assert!(
        stdout.contains("reconciled: every order was acked or is in its group's dead-letter queue"),
        "{stdout}"
    );
    assert!(stdout.contains("warren demo --keep"), "{stdout}");
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name"])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listed.stdout);
    assert!(!names.contains(&prefix), "queues left behind: {names}");
    let file = kept_file(&prefix);
    assert!(!file.exists(), "{} left behind", file.display());
}

#[test]
fn a_kept_demo_writes_its_topology_file_under_its_own_prefix() {
    let prefix = format!("{}.", unique("demokept"));
    let file = kept_file(&prefix);
    let stdout = demo(&[
        "--keep", "--output", "json", "--orders", "50", "--prefix", &prefix,
    ]);
    // Deletes the kept queues with the file.
    let topo = Topo::adopt(&file);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["topology_file"], file.to_str().unwrap());
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains(&format!("{prefix}orders")), "{written}");
    drop(topo);
}

#[test]
fn a_refused_login_is_not_called_a_missing_broker() {
    let o = warren()
        .args([
            "demo",
            "--amqp-url",
            "amqp://guest:Sekr1tPw@127.0.0.1:5672/%2f",
        ])
        .output_within(CLI_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("refused user \"guest\""), "{err}");
    assert!(!err.contains("no broker answers"), "{err}");
    assert!(!err.contains("Sekr1tPw"), "{err}");
}

#[test]
fn no_broker_is_a_clear_error_with_the_fix() {
    let o = warren()
        .args(["demo", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2f"])
        .output_within(CLI_LIMIT);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("scripts/broker"), "{err}");
}

#[test]
fn a_topology_file_the_user_named_is_kept_even_without_keep() {
    let prefix = format!("{}.", unique("demofile"));
    let file = std::env::temp_dir().join(format!("{prefix}mine.toml"));
    demo(&[
        "--orders",
        "20",
        "--prefix",
        &prefix,
        "--write-topology",
        file.to_str().unwrap(),
    ]);
    let written = std::fs::read_to_string(&file);
    let _ = std::fs::remove_file(&file);
    assert!(
        written.is_ok_and(|t| t.contains(&format!("{prefix}orders"))),
        "the file asked for with --write-topology was deleted"
    );
}

#[test]
fn a_kept_demo_says_how_to_delete_it_and_that_removes_its_file_too() {
    let prefix = format!("{}.", unique("demoundo"));
    let file = kept_file(&prefix);
    let stdout = demo(&[
        "--keep", "--output", "json", "--orders", "10", "--prefix", &prefix,
    ]);
    let topo = Topo::adopt(&file);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // Not on the PATH here: the commands name the binary as it was run.
    let undo = format!(
        "{} demo --prefix {prefix} --orders 0",
        env!("CARGO_BIN_EXE_warren")
    );
    let next: Vec<&str> = v["next"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(next.iter().any(|n| n.starts_with(&undo)), "{stdout}");
    assert!(
        next[0].starts_with(&format!("{} dlq stats -f ", env!("CARGO_BIN_EXE_warren"))),
        "{stdout}"
    );
    let stdout = demo(&["--prefix", &prefix, "--orders", "0"]);
    assert!(stdout.contains("cleaned up"), "{stdout}");
    assert!(
        !file.exists(),
        "{} still describes queues that are gone",
        file.display()
    );
    drop(topo);
}

#[test]
fn an_empty_or_invalid_prefix_is_refused_before_connecting() {
    for (prefix, says) in [
        ("", "--prefix \"\": "),
        (
            "amq.",
            "--prefix \"amq.\": exchange.name: \"amq.orders\" starts with \"amq.\"",
        ),
    ] {
        let o = warren()
            .args(["demo", "--prefix", prefix])
            // Nothing answers here: a refusal must come before connecting.
            .args(["--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2f"])
            .output_within(CLI_LIMIT);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{prefix:?}: {err}");
        assert!(err.contains(says), "{prefix:?}: {err}");
    }
}

/// Queues with consumers are someone's live queues, not a demo left by
/// `--keep`: the demo purges and deletes its queues, so it must not run there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_refuses_queues_that_have_consumers() {
    let prefix = format!("{}.", unique("demoinuse"));
    let file = kept_file(&prefix);
    demo(&["--keep", "--orders", "0", "--prefix", &prefix]);
    let topo = Topo::adopt(&file);
    let conn = connect().await;
    let dead = format!("{prefix}billing.dead");
    publish(&conn, "", &dead, "precious", b"{}").await;
    let ch = conn.create_channel().await.unwrap();
    // Held until the end: dropping a lapin consumer cancels it.
    let _consumer = ch
        .basic_consume(
            dead.as_str().into(),
            "walk-consumer".into(),
            lapin::options::BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    // Unacked while the consumer holds it; still in the queue.
    let o = warren()
        .args(["demo", "--orders", "0", "--prefix", &prefix])
        .output_within(CLI_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("queue \"{dead}\" has 1 consumer")),
        "{err}"
    );
    ch.close(200, "done".into()).await.unwrap();
    assert!(
        wait_until(std::time::Duration::from_secs(5), || async {
            count(&conn, &dead).await == 1
        })
        .await,
        "the dead letter is still there"
    );
    drop(topo);
}

/// Deletes a kept demo when dropped, so that a failing assertion does not
/// leave its queues and exchange on the broker.
struct DeleteDemo(String);

impl Drop for DeleteDemo {
    fn drop(&mut self) {
        let _ = warren()
            .args(["demo", "--prefix", &self.0, "--orders", "0"])
            .output_within(CLI_LIMIT);
    }
}

#[test]
fn a_demo_that_does_not_settle_says_what_it_leaves_and_how_to_delete_it() {
    let prefix = format!("{}.", unique("demoslow"));
    let _delete = DeleteDemo(prefix.clone());
    let o = warren()
        .args([
            "demo",
            "--orders",
            "200",
            "--timeout",
            "1ms",
            "--prefix",
            &prefix,
        ])
        .output_within(CLI_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let undo = format!(
        "{} demo --prefix {prefix} --orders 0",
        env!("CARGO_BIN_EXE_warren")
    );
    assert!(
        err.contains("did not settle within 1ms")
            && err.contains(&format!(
                "stay on the broker as they are (`{undo}` deletes them)"
            )),
        "{err}"
    );
    // The first run's consumers may still be registered on the broker for
    // a moment after it exited (its connection close is asynchronous), and
    // the demo refuses queues in use: wait until they are gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed = warren_testkit::rabbitmqctl(&["list_queues", "-q", "name", "consumers"]);
        let in_use = listed.lines().any(|l| {
            let mut cols = l.split_whitespace();
            cols.next().is_some_and(|n| n.starts_with(&prefix))
                && cols.next().is_some_and(|c| c != "0")
        });
        if !in_use || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // With --output json: the same facts, as JSON on stdout.
    let o = warren()
        .args(["demo", "--output", "json", "--orders", "200"])
        .args(["--timeout", "1ms", "--prefix", &prefix])
        .output_within(CLI_LIMIT);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the pipeline did not settle within 1ms: "),
        "{v}"
    );
    assert_eq!(
        (
            &v["reconciled"],
            &v["kept"],
            &v["published"],
            &v["expected"]
        ),
        (
            &serde_json::json!(false),
            &serde_json::json!(true),
            &serde_json::json!(200),
            &serde_json::json!(300)
        ),
        "{v}"
    );
    assert!(v["settled"].as_u64().unwrap() < 300, "{v}");
    assert_eq!(v["next"], serde_json::json!([undo]));
    demo(&["--prefix", &prefix, "--orders", "0"]);
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name"])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listed.stdout);
    assert!(!names.contains(&prefix), "queues left behind: {names}");
}

/// The demo runs its own topology with a built-in handler, and purges and
/// deletes its queues: it cannot run on the user's file, and says so rather
/// than ignoring an explicit `-f` (before connecting: nothing answers here).
#[test]
fn an_explicit_topology_file_is_refused_with_what_to_run_instead() {
    let w = env!("CARGO_BIN_EXE_warren");
    let says = format!("error: warren demo does not read -f mine.toml: it runs its own topology (examples/demo.toml under --prefix, default \"demo.\") with a built-in handler, and purges and deletes its queues. To run warren on your topology: `{w} topology apply -f mine.toml`, then `{w} consume -f mine.toml --group G --http URL` (or `--exec CMD`)\n");
    for flag in ["-f", "--topology"] {
        let o = warren()
            .args(["demo", flag, "mine.toml"])
            .args(["--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2f"])
            .output_within(CLI_LIMIT);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag}: {err}");
        assert_eq!(err, says, "{flag}");
        assert!(o.stdout.is_empty(), "{flag}");
    }
    let o = warren()
        .args(["demo", "--output", "json", "-f", "mine.toml"])
        .output_within(CLI_LIMIT);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "usage", "{v}");
    assert_eq!(
        format!("error: {}\n", v["error"]["message"].as_str().unwrap()),
        says
    );
}

/// `WARREN_TOPOLOGY` is set for every command in a shell profile or a
/// container (the compose file does): the demo runs, and says it is not used.
#[test]
fn warren_topology_in_the_environment_is_noted_and_not_used() {
    let prefix = format!("{}.", unique("demoenv"));
    let o = warren()
        .env("WARREN_TOPOLOGY", "/etc/warren/warren.toml")
        .args(["demo", "--orders", "0", "--prefix", &prefix])
        .output_within(CLI_LIMIT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        err,
        format!("note: WARREN_TOPOLOGY (/etc/warren/warren.toml) is not used: warren demo runs its own topology (examples/demo.toml under --prefix \"{prefix}\")\n")
    );
}

/// With `--output json`, a demo that fails prints a JSON document too.
#[test]
fn a_failed_demo_prints_json() {
    let o = warren()
        .args(["demo", "--output", "json"])
        .args(["--amqp-url", "amqp://guest:Sekr1tPw@127.0.0.1:1/%2f"])
        .output_within(CLI_LIMIT);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("Sekr1tPw"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(v["error"]["kind"], "connect", "{v}");
    assert_eq!(v["reconciled"], false, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("scripts/broker"),
        "{v}"
    );
}

/// `-f` is a global flag, so `demo --help` lists it: the help says the demo
/// does not take it, and what the broker defaults to.
#[test]
fn demo_help_says_it_runs_its_own_topology() {
    let o = warren().args(["demo", "--help"]).output_within(CLI_LIMIT);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("The topology file (`warren demo` runs its own and refuses -f)"),
        "{help}"
    );
    assert!(
        help.contains("The broker (default: the local one, as user guest, vhost /); its password is never printed"),
        "{help}"
    );
}
