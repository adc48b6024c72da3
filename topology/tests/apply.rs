//! `apply` and `verify` against the real broker, checked through
//! `rabbitmqctl` rather than through warren's own structs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::json;
use support::*;
use warren_topology::{apply, verify, Action, ObjectState, Plan, TopologyError};

const FILE: &str = r#"
[[exchange]]
name = "orders"
kind = "topic"

[[group]]
name = "billing"
exchange = "orders"
bindings = ["order.created", "order.paid"]
retry = ["1s", "10s"]
delivery_limit = 5

[[group]]
name = "shipping"
exchange = "orders"
bindings = ["order.paid"]
queue_type = "classic"
retry = ["500ms"]
"#;

#[tokio::test]
async fn apply_creates_exactly_the_derived_objects_and_twice_changes_nothing() {
    let p = unique_prefix();
    let t = topology(&p, FILE);
    let plan = Plan::new(&t);
    let _guard = Guard::new(&plan);
    let conn = connect().await;

    let before = verify(&conn, &plan).await.unwrap();
    assert!(before
        .checks
        .iter()
        .filter(|c| c.name != "warren.dlx")
        .all(|c| c.state == ObjectState::Missing));

    let done = apply(&conn, &plan).await.unwrap();
    assert!(done
        .iter()
        .filter(|a| a.kind == "queue")
        .all(|a| a.action == Action::Created));

    let q = broker_queues(&p);
    let names: Vec<&str> = q.keys().map(String::as_str).collect();
    let expected: Vec<String> = [
        "billing",
        "billing.dead",
        "billing.retry.1",
        "billing.retry.2",
        "shipping",
        "shipping.dead",
        "shipping.retry.1",
    ]
    .iter()
    .map(|n| format!("{p}{n}"))
    .collect();
    assert_eq!(names, expected);
    assert!(q.values().all(|q| q.durable));

    let args = |n: &str| json!(q[&format!("{p}{n}")].arguments);
    assert_eq!(
        args("billing"),
        json!({"x-dead-letter-exchange": "warren.dlx", "x-dead-letter-routing-key": format!("{p}billing"), "x-delivery-limit": 5, "x-queue-type": "quorum"})
    );
    assert_eq!(q[&format!("{p}billing")].kind, "quorum");
    assert_eq!(
        args("billing.retry.2"),
        json!({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": format!("{p}billing"), "x-dead-letter-strategy": "at-least-once", "x-message-ttl": 10000, "x-overflow": "reject-publish", "x-queue-type": "quorum"})
    );
    assert_eq!(
        args("billing.dead"),
        json!({"x-queue-type": "classic", "x-queue-version": 2})
    );
    assert_eq!(q[&format!("{p}billing.dead")].kind, "classic");
    assert_eq!(
        args("shipping"),
        json!({"x-dead-letter-exchange": "warren.dlx", "x-dead-letter-routing-key": format!("{p}shipping"), "x-queue-type": "classic", "x-queue-version": 2})
    );
    assert_eq!(
        args("shipping.retry.1"),
        json!({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": format!("{p}shipping"), "x-message-ttl": 500, "x-queue-type": "classic", "x-queue-version": 2})
    );

    let bindings = broker_bindings(&p);
    let mut expected = vec![
        (
            format!("{p}orders"),
            format!("{p}billing"),
            "order.created".to_owned(),
        ),
        (
            format!("{p}orders"),
            format!("{p}billing"),
            "order.paid".to_owned(),
        ),
        (
            format!("{p}orders"),
            format!("{p}shipping"),
            "order.paid".to_owned(),
        ),
        (
            "warren.dlx".to_owned(),
            format!("{p}billing.dead"),
            format!("{p}billing"),
        ),
        (
            "warren.dlx".to_owned(),
            format!("{p}shipping.dead"),
            format!("{p}shipping"),
        ),
    ];
    expected.sort();
    assert_eq!(bindings, expected);

    // Verify matches; applying again changes nothing.
    assert!(verify(&conn, &plan).await.unwrap().matches());
    let again = apply(&conn, &plan).await.unwrap();
    assert!(
        again
            .iter()
            .filter(|a| a.kind != "binding")
            .all(|a| a.action == Action::Unchanged),
        "{again:?}"
    );
    assert_eq!(broker_queues(&p), q);
    assert_eq!(broker_bindings(&p), bindings);
}

#[tokio::test]
async fn a_changed_tier_ttl_fails_naming_the_queue_and_deletes_nothing() {
    let p = unique_prefix();
    let t = topology(&p, FILE);
    let plan = Plan::new(&t);
    let _guard = Guard::new(&plan);
    let conn = connect().await;
    apply(&conn, &plan).await.unwrap();

    // A message waits in the tier queue: it must survive the failed apply.
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        format!("{p}billing.retry.2").as_str().into(),
        BasicPublishOptions::default(),
        b"waiting",
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap();

    let changed = topology(
        &p,
        &FILE.replace("retry = [\"1s\", \"10s\"]", "retry = [\"1s\", \"20s\"]"),
    );
    let changed_plan = Plan::new(&changed);
    let err = apply(&conn, &changed_plan).await.unwrap_err();
    match &err {
        TopologyError::Mismatch {
            kind,
            name,
            detail,
            differing,
        } => {
            assert_eq!(*kind, "queue");
            assert_eq!(name, &format!("{p}billing.retry.2"));
            assert_eq!(
                detail,
                "x-message-ttl: the broker has 10000, the topology wants 20000"
            );
            assert_eq!(
                differing,
                &[warren_topology::Check {
                    kind: "queue",
                    name: format!("{p}billing.retry.2"),
                    state: ObjectState::Differs(detail.clone()),
                }]
            );
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("warren deleted nothing"), "{text}");

    let report = verify(&conn, &changed_plan).await.unwrap();
    assert!(!report.matches());
    let differing: Vec<_> = report.differing().map(|c| c.name.clone()).collect();
    assert_eq!(differing, vec![format!("{p}billing.retry.2")]);

    let q = broker_queues(&p);
    assert_eq!(q.len(), 7, "nothing deleted or added: {:?}", q.keys());
    assert!(
        wait_until(std::time::Duration::from_secs(5), || async {
            count(&conn, &format!("{p}billing.retry.2")).await == 1
        })
        .await
    );
    assert_eq!(
        json!(q[&format!("{p}billing.retry.2")].arguments["x-message-ttl"]),
        json!(10000)
    );
}

#[tokio::test]
async fn nothing_is_declared_when_one_object_differs() {
    let p = unique_prefix();
    let t = topology(&p, FILE);
    let plan = Plan::new(&t);
    let _guard = Guard::new(&plan);
    let conn = connect().await;
    // Someone declared the classic work queue by hand, without warren's arguments.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        format!("{p}shipping").as_str().into(),
        lapin::options::QueueDeclareOptions::durable(),
        Default::default(),
    )
    .await
    .unwrap();
    let err = apply(&conn, &plan).await.unwrap_err();
    assert!(
        matches!(&err, TopologyError::Mismatch { name, .. } if name == &format!("{p}shipping")),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("x-dead-letter-exchange: the broker has none, the topology wants warren.dlx"),
        "{err}"
    );
    let q = broker_queues(&p);
    assert_eq!(
        q.keys().collect::<Vec<_>>(),
        vec![&format!("{p}shipping")],
        "apply declared nothing else"
    );
}

#[tokio::test]
async fn an_exchange_of_another_kind_is_reported() {
    let p = unique_prefix();
    let t = topology(&p, FILE);
    let plan = Plan::new(&t);
    let _guard = Guard::new(&plan);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        format!("{p}orders").as_str().into(),
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    let report = verify(&conn, &plan).await.unwrap();
    let c = report
        .checks
        .iter()
        .find(|c| c.name == format!("{p}orders"))
        .unwrap();
    match &c.state {
        ObjectState::Differs(d) => assert!(d.contains("type"), "{d}"),
        other => panic!("expected a difference, got {other:?}"),
    }
}

#[tokio::test]
async fn every_differing_object_is_named_with_what_differs() {
    let p = unique_prefix();
    let t = topology(&p, FILE);
    let plan = Plan::new(&t);
    let _guard = Guard::new(&plan);
    let conn = connect().await;
    // Two queues declared by hand with other arguments.
    let ch = conn.create_channel().await.unwrap();
    for q in ["shipping", "shipping.dead"] {
        ch.queue_declare(
            format!("{p}{q}").as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            Default::default(),
        )
        .await
        .unwrap();
    }
    let err = apply(&conn, &plan).await.unwrap_err();
    let TopologyError::Mismatch { differing, .. } = &err else {
        panic!("expected a mismatch, got {err:?}");
    };
    let named: Vec<(&str, &str)> = differing
        .iter()
        .map(|c| (c.kind, c.name.as_str()))
        .collect();
    assert_eq!(
        named,
        [
            ("queue", format!("{p}shipping").as_str()),
            ("queue", format!("{p}shipping.dead").as_str())
        ]
    );
    let err = err.to_string();
    assert!(
        err.starts_with(&format!("queue \"{p}shipping\" exists on the broker with other settings: x-dead-letter-exchange: the broker has none, the topology wants warren.dlx; x-dead-letter-routing-key: the broker has none, the topology wants {p}shipping; x-queue-version: the broker has none, the topology wants 2; also queue \"{p}shipping.dead\": x-queue-version: the broker has none, the topology wants 2. warren deleted nothing")),
        "{err}"
    );
}

/// Declaring fails after some objects were created (here a binding to an
/// exchange the plan does not declare, which `verify` cannot see): the error
/// says what was declared instead of implying nothing was.
#[tokio::test]
async fn a_failure_partway_names_what_was_already_declared() {
    let p = unique_prefix();
    let t = topology(&p, FILE);
    let mut plan = Plan::new(&t);
    plan.bindings.push(warren_topology::PlannedBinding {
        exchange: format!("{p}nowhere"),
        queue: format!("{p}shipping"),
        key: "k".into(),
    });
    let _guard = Guard::new(&plan);
    let conn = connect().await;
    let err = apply(&conn, &plan).await.unwrap_err();
    let TopologyError::Incomplete { applied, .. } = &err else {
        panic!("expected an incomplete apply, got {err:?}");
    };
    // Every exchange and queue, then the five bindings of the file.
    assert_eq!(applied.len(), 2 + 7 + 5, "{applied:?}");
    assert!(applied[..9].iter().all(|a| a.action != Action::Bound));
    assert!(applied[9..].iter().all(|a| a.action == Action::Bound));
    let text = err.to_string();
    assert!(
        text.contains(&format!("exchange \"{p}nowhere\"")) && text.contains("NOT_FOUND"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "already declared: exchange \"{p}orders\", queue \"{p}billing\", "
        )),
        "{text}"
    );
    assert!(text.contains("5 bindings"), "{text}");
    assert_eq!(broker_queues(&p).len(), 7, "what the text says is there");
}

/// A login that may only read (a monitoring user) cannot verify: checking
/// an object declares it again, which takes the configure permission. The
/// error says which permission each step needs instead of only the broker's
/// ACCESS_REFUSED.
#[tokio::test]
async fn a_refused_permission_says_which_permission_is_needed() {
    use warren_testkit::{rabbitmqctl, TempUser};
    let p = unique_prefix();
    let t = topology(&p, FILE);
    let plan = Plan::new(&t);
    let _guard = Guard::new(&plan);
    let conn = connect().await;
    apply(&conn, &plan).await.unwrap();
    let user = TempUser::create();
    let login = |configure: &str, write: &str| {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            &user.name,
            configure,
            write,
            ".*",
        ]);
        let opts = warren_topology::ConnectOptions::new(user.url(), "test").attempts(1);
        async move { warren_topology::connect(&opts).await.unwrap() }
    };
    let reader = login("^$", "^$").await;
    let err = verify(&reader, &plan).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the broker refused exchange \"{p}orders\" (ACCESS_REFUSED - access to exchange '{p}orders' in vhost '/' refused for user '{}'): verify and apply check an existing exchange or queue by declaring it again with the planned arguments (AMQP 0-9-1 cannot read them back), which takes the configure permission on its name, even only to verify", user.name)
    );
    assert!(!err.is_transient());
    let err = apply(&reader, &plan).await.unwrap_err();
    assert!(
        matches!(err, TopologyError::AccessRefused { .. }),
        "{err:?}"
    );

    // May declare, may not write to the queues: every binding is refused
    // (everything else exists already, so nothing was declared).
    let binder = login(".*", "^$").await;
    let err = apply(&binder, &plan).await.unwrap_err();
    assert!(
        matches!(err, TopologyError::AccessRefused { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("the broker refused binding exchange \"{p}orders\" -> queue \"{p}billing\" (key \"order.created\") (ACCESS_REFUSED - ")),
        "{text}"
    );
    assert!(
        text.ends_with("): a binding takes the write permission on the queue and the read permission on the exchange"),
        "{text}"
    );
    reader.close(200, "done".into()).await.unwrap();
    binder.close(200, "done".into()).await.unwrap();
}

/// Changing a group's `queue_type` (classic to quorum, the usual
/// migration) cannot be applied: verify and apply name the queue type, and
/// every other argument that differs, not only the first one the broker
/// compares (which was `x-queue-version`, an argument the user never
/// wrote). The queues are left as they were.
#[tokio::test]
async fn a_changed_queue_type_is_named_with_every_argument_that_differs() {
    let p = unique_prefix();
    let t = topology(&p, FILE);
    let plan = Plan::new(&t);
    let _guard = Guard::new(&plan);
    let conn = connect().await;
    apply(&conn, &plan).await.unwrap();
    let before = broker_queues(&p);

    // shipping: classic to quorum, and its tier from 500ms to 700ms (the
    // broker's text for a TTL gives no type); billing: quorum to classic.
    let changed = FILE
        .replace(
            "queue_type = \"classic\"\nretry = [\"500ms\"]",
            "retry = [\"700ms\"]\ndelivery_limit = 3",
        )
        .replace(
            "retry = [\"1s\", \"10s\"]\ndelivery_limit = 5",
            "retry = [\"1s\", \"10s\"]\nqueue_type = \"classic\"",
        );
    let changed_plan = Plan::new(&topology(&p, &changed));
    let report = verify(&conn, &changed_plan).await.unwrap();
    let detail = |name: &str| -> String {
        let c = report
            .checks
            .iter()
            .find(|c| c.name == format!("{p}{name}"))
            .unwrap();
        match &c.state {
            ObjectState::Differs(d) => d.clone(),
            other => panic!("{name}: expected a difference, got {other:?}"),
        }
    };
    // The broker's own equivalence check decides what it compares: a
    // classic queue's x-delivery-limit, say, is not.
    assert_eq!(
        detail("shipping"),
        "x-queue-version: the broker has 2, the topology wants none; \
         x-queue-type: the broker has classic, the topology wants quorum"
    );
    assert_eq!(
        detail("shipping.retry.1"),
        "x-message-ttl: the broker has 500, the topology wants 700; \
         x-overflow: the broker has none, the topology wants reject-publish; \
         x-queue-version: the broker has 2, the topology wants none; \
         x-queue-type: the broker has classic, the topology wants quorum"
    );
    assert_eq!(
        detail("billing"),
        "x-queue-type: the broker has quorum, the topology wants classic; \
         x-delivery-limit: the broker has 5, the topology wants none"
    );
    assert_eq!(
        detail("billing.retry.1"),
        "x-dead-letter-strategy: the broker has at-least-once, the topology wants none; \
         x-overflow: the broker has reject-publish, the topology wants none; \
         x-queue-type: the broker has quorum, the topology wants classic"
    );
    let err = apply(&conn, &changed_plan).await.unwrap_err();
    assert!(matches!(&err, TopologyError::Mismatch { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("x-queue-type: the broker has classic, the topology wants quorum"),
        "{err}"
    );
    assert_eq!(
        broker_queues(&p),
        before,
        "nothing changed, created or deleted"
    );
}
