//! Every kind of bad topology file gets an error naming the file, the line,
//! the field and what is allowed — the exact text a user sees.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use warren_topology::Topology;

const EXCHANGE: &str = "[[exchange]]\nname = \"orders\"\nkind = \"topic\"\n\n";

fn err(text: &str) -> String {
    match Topology::parse(text, "warren.toml") {
        Ok(t) => panic!("expected an error, got {t:?}"),
        Err(e) => e.to_string(),
    }
}

fn group(extra: &str) -> String {
    format!("{EXCHANGE}[[group]]\nname = \"billing\"\nexchange = \"orders\"\nbindings = [\"order.*\"]\n{extra}")
}

#[test]
fn unknown_key() {
    assert_eq!(
        err(&group("colour = \"red\"\n")),
        "warren.toml:9:1: group.colour: unknown field `colour`, expected one of `name`, `exchange`, `bindings`, `queue_type`, `retry`, `prefetch`, `concurrency`, `handler_timeout`, `delivery_limit`"
    );
}

#[test]
fn unknown_table() {
    let e = err("[[exchanges]]\nname = \"orders\"\n");
    assert!(e.starts_with("warren.toml:1:"), "{e}");
    assert!(
        e.contains("unknown field `exchanges`, expected `exchange` or `group`"),
        "{e}"
    );
}

#[test]
fn duplicate_exchange() {
    assert_eq!(
        err(&format!("{EXCHANGE}{EXCHANGE}")),
        "warren.toml:6:8: exchange.name: exchange \"orders\" is declared twice; names must be unique"
    );
}

#[test]
fn duplicate_group() {
    let g = "[[group]]\nname = \"billing\"\nexchange = \"orders\"\n";
    assert_eq!(
        err(&format!("{EXCHANGE}{g}{g}")),
        "warren.toml:9:8: group.name: group \"billing\" is declared twice; group names must be unique"
    );
}

#[test]
fn a_group_named_like_another_groups_retry_queue() {
    // `billing.retry.1` is billing's first tier: declaring it as a work queue
    // too would fail halfway through `apply` (after creating other queues).
    let billing = "[[group]]\nname = \"billing\"\nexchange = \"orders\"\n";
    let tier = "[[group]]\nname = \"billing.retry.1\"\nexchange = \"orders\"\n";
    let expected = "group.name: group \"billing.retry.1\" and group \"billing\" would both declare queue \"billing.retry.1\" (a group's queues are {group}, {group}.retry.{n} and {group}.dead); rename one of them";
    assert_eq!(
        err(&format!("{EXCHANGE}{billing}{tier}")),
        format!("warren.toml:9:8: {expected}")
    );
    assert_eq!(
        err(&format!("{EXCHANGE}{tier}{billing}")),
        format!(
            "warren.toml:9:8: {}",
            expected.replacen(
                "group \"billing.retry.1\" and group \"billing\"",
                "group \"billing\" and group \"billing.retry.1\"",
                1
            )
        )
    );
}

#[test]
fn group_bound_to_undeclared_exchange() {
    assert_eq!(
        err(&format!("{EXCHANGE}[[group]]\nname = \"billing\"\nexchange = \"payments\"\n")),
        "warren.toml:7:12: group.exchange: group \"billing\" is bound to exchange \"payments\", which the file does not declare; declared: orders"
    );
}

#[test]
fn empty_name() {
    assert_eq!(
        err("[[exchange]]\nname = \"\"\nkind = \"topic\"\n"),
        "warren.toml:2:8: exchange.name: must not be empty"
    );
}

#[test]
fn name_over_255_bytes() {
    let long = "x".repeat(256);
    assert_eq!(
        err(&format!(
            "[[exchange]]\nname = \"{long}\"\nkind = \"topic\"\n"
        )),
        "warren.toml:2:8: exchange.name: 256 bytes is over the broker's limit of 255"
    );
}

#[test]
fn group_name_whose_derived_queue_is_too_long() {
    let long = "g".repeat(250);
    let e = err(&format!(
        "{EXCHANGE}[[group]]\nname = \"{long}\"\nexchange = \"orders\"\n"
    ));
    assert!(
        e.starts_with("warren.toml:6:8: group.name: too long: the derived queue"),
        "{e}"
    );
    assert!(e.contains("use a name of at most 246 bytes"), "{e}");
}

#[test]
fn reserved_amq_prefix() {
    assert_eq!(
        err("[[exchange]]\nname = \"amq.orders\"\nkind = \"topic\"\n"),
        "warren.toml:2:8: exchange.name: \"amq.orders\" starts with \"amq.\", which the broker reserves for its own objects"
    );
}

#[test]
fn dead_letter_exchange_is_warrens() {
    let e = err("[[exchange]]\nname = \"warren.dlx\"\nkind = \"topic\"\n");
    assert!(e.contains("warren's dead-letter exchange"), "{e}");
}

#[test]
fn bad_exchange_kind() {
    assert_eq!(
        err("[[exchange]]\nname = \"orders\"\nkind = \"round-robin\"\n"),
        "warren.toml:3:8: exchange.kind: unknown variant `round-robin`, expected one of `direct`, `topic`, `fanout`, `headers`"
    );
}

#[test]
fn bad_queue_type() {
    let e = err(&group("queue_type = \"stream\"\n"));
    assert_eq!(e, "warren.toml:9:14: group.queue_type: unknown variant `stream`, expected `quorum` or `classic`");
}

#[test]
fn zero_duration() {
    assert_eq!(
        err(&group("retry = [\"1s\", \"0s\"]\n")),
        "warren.toml:9:16: group.retry: \"0s\" is zero; a duration must be positive"
    );
}

#[test]
fn a_tier_under_a_millisecond() {
    // x-message-ttl counts whole milliseconds: "500us" would be a TTL of 0,
    // a retry with no delay at all.
    assert_eq!(
        err(&group("retry = [\"1s\", \"500us\"]\n")),
        "warren.toml:9:16: group.retry: \"500us\" is not a whole number of milliseconds, which is what a queue's TTL counts; use whole milliseconds (at least \"1ms\")"
    );
    assert!(err(&group("retry = [\"1500us\"]\n")).contains("whole number of milliseconds"));
}

#[test]
fn unparsable_duration() {
    let e = err(&group("handler_timeout = \"soon\"\n"));
    assert!(
        e.starts_with("warren.toml:9:19: group.handler_timeout: \"soon\" is not a duration"),
        "{e}"
    );
    assert!(e.contains("like \"500ms\", \"10s\", \"1m\", \"2h\""), "{e}");
}

#[test]
fn duration_of_the_wrong_type() {
    let e = err(&group("handler_timeout = 30\n"));
    assert!(e.starts_with("warren.toml:9:19: group.handler_timeout: invalid type: integer `30`, expected a string"), "{e}");
}

#[test]
fn delivery_limit_on_classic() {
    assert_eq!(
        err(&group("queue_type = \"classic\"\ndelivery_limit = 5\n")),
        "warren.toml:10:18: group.delivery_limit: only quorum queues have a delivery limit; remove it or set queue_type = \"quorum\""
    );
}

#[test]
fn too_many_tiers() {
    let tiers = vec!["\"1s\""; 21].join(", ");
    assert_eq!(
        err(&group(&format!("retry = [{tiers}]\n"))),
        "warren.toml:9:9: group.retry: 21 tiers; at most 20 are allowed (each tier is a queue: use longer delays instead)"
    );
}

#[test]
fn a_handler_timeout_that_is_not_whole_milliseconds() {
    // The consumer's timer counts whole milliseconds, like a queue's TTL:
    // "1ns" was accepted and cancelled every handler at once.
    assert_eq!(
        err(&group("handler_timeout = \"1ns\"\n")),
        "warren.toml:9:19: group.handler_timeout: \"1ns\" is not a whole number of milliseconds, which is what the handler's timer counts; use whole milliseconds (at least \"100ms\")"
    );
    assert!(err(&group("handler_timeout = \"1500us\"\n")).contains("whole number of milliseconds"));
}

#[test]
fn a_handler_timeout_under_the_minimum() {
    assert_eq!(
        err(&group("handler_timeout = \"99ms\"\n")),
        "warren.toml:9:19: group.handler_timeout: \"99ms\" is under the minimum of \"100ms\": handler_timeout guards against a hung handler, and its clock includes starting one (a process for --exec, a connection for --http), so a shorter one cancels healthy handlers and sends their messages through the retry tiers; use at least \"100ms\""
    );
    let t = Topology::parse(&group("handler_timeout = \"100ms\"\n"), "warren.toml").unwrap();
    assert_eq!(
        t.groups[0].handler_timeout,
        std::time::Duration::from_millis(100)
    );
}

/// At or over the broker's consumer_timeout is legal (the broker's may be
/// raised, and AMQP cannot read it), so it is a lint, not an error.
#[test]
fn a_handler_timeout_at_the_broker_consumer_timeout_is_accepted() {
    let t = Topology::parse(&group("handler_timeout = \"30m\"\n"), "warren.toml").unwrap();
    assert_eq!(
        t.groups[0].handler_timeout,
        std::time::Duration::from_secs(1800)
    );
}

#[test]
fn zero_prefetch_and_concurrency_over_prefetch() {
    assert!(err(&group("prefetch = 0\n"))
        .starts_with("warren.toml:9:12: group.prefetch: must be at least 1"));
    assert_eq!(
        err(&group("prefetch = 4\nconcurrency = 8\n")),
        "warren.toml:10:15: group.concurrency: 8 handlers can never be busy with a prefetch of 4; set concurrency at most prefetch"
    );
}

#[test]
fn negative_prefetch() {
    let e = err(&group("prefetch = -1\n"));
    assert!(e.starts_with("warren.toml:9:12: group.prefetch:"), "{e}");
}

#[test]
fn not_toml_at_all() {
    let e = err("this is not toml\n");
    assert!(e.starts_with("warren.toml:1:"), "{e}");
}

#[test]
fn missing_file_is_named_without_the_command_lines_flags() {
    let e = Topology::from_file("/nonexistent/warren.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot read topology file /nonexistent/warren.toml:"),
        "{e}"
    );
    // A library user has no -f: the binary adds that hint (topology_cli).
    assert!(!e.contains("-f or WARREN_TOPOLOGY"), "{e}");
}

#[test]
fn a_file_that_is_not_utf8_names_the_line_and_column() {
    let path = std::env::temp_dir().join(format!("warren-latin1-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        b"[[exchange]]\nname = \"caf\xe9\"\nkind = \"topic\"\n",
    )
    .unwrap();
    let e = Topology::from_file(&path).unwrap_err().to_string();
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        e,
        format!(
            "{}:2:12: byte 0xE9 is not UTF-8; a topology file is UTF-8 text (re-save it as UTF-8)",
            path.display()
        )
    );
}

#[test]
fn the_demo_topology_is_valid() {
    let t = Topology::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/demo.toml"
    ))
    .unwrap();
    assert_eq!(t.groups.len(), 2);
    assert!(t.lints().is_empty(), "{:?}", t.lints());
}

/// Numbers out of range or of another type say the range allowed, in the
/// file's words ("expected u16" is Rust's); a single `[exchange]` table
/// and a key for a list given one string say how to write them; an error
/// about a table header names that header (`[group]` after an
/// `[[exchange]]` was named "exchange", `[group.extra]` "group.").
#[test]
fn type_errors_say_what_is_allowed() {
    let cases = [
        (
            group("prefetch = 70000\n"),
            "warren.toml:9:12: group.prefetch: invalid value: integer `70000`, expected a whole number from 1 to 65535",
        ),
        (
            group("prefetch = -1\n"),
            "warren.toml:9:12: group.prefetch: invalid value: integer `-1`, expected a whole number from 1 to 65535",
        ),
        (
            group("prefetch = \"32\"\n"),
            "warren.toml:9:12: group.prefetch: invalid type: string \"32\", expected a whole number from 1 to 65535",
        ),
        (
            group("concurrency = 1.5\n"),
            "warren.toml:9:15: group.concurrency: invalid type: floating point `1.5`, expected a whole number from 1 to 65535",
        ),
        (
            group("delivery_limit = 5000000000\n"),
            "warren.toml:9:18: group.delivery_limit: invalid value: integer `5000000000`, expected a whole number from 1 to 4294967295",
        ),
        (
            "[exchange]\nname = \"orders\"\nkind = \"topic\"\n".to_owned(),
            "warren.toml:1:1: [exchange]: invalid type: map, expected a sequence: write [[exchange]], with double brackets, before each exchange",
        ),
        (
            format!("{EXCHANGE}[group]\nname = \"billing\"\nexchange = \"orders\"\n"),
            "warren.toml:5:1: [group]: invalid type: map, expected a sequence: write [[group]], with double brackets, before each group",
        ),
        (
            format!("{EXCHANGE}[[group]]\nname = \"billing\"\nexchange = \"orders\"\nbindings = \"order.created\"\n"),
            "warren.toml:8:12: group.bindings: invalid type: string \"order.created\", expected a list, such as [\"order.created\", \"order.paid\"]",
        ),
        (
            group("[group.extra]\nx = 1\n"),
            "warren.toml:9:8: [group.extra]: unknown field `extra`, expected one of `name`, `exchange`, `bindings`, `queue_type`, `retry`, `prefetch`, `concurrency`, `handler_timeout`, `delivery_limit`",
        ),
        (
            group("retry = \"1s\"\n"),
            "warren.toml:9:9: group.retry: invalid type: string \"1s\", expected a list, such as [\"1s\", \"10s\", \"1m\"]",
        ),
    ];
    for (file, want) in cases {
        assert_eq!(err(&file), want, "{file}");
    }
}
