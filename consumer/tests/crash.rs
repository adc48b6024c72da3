#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A worker process killed mid-handling: the broker redelivers. The test
//! re-runs its own binary with `WARREN_TEST_WORKER` set so that
//! `worker_entry` acts as the worker.

mod support;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use warren_consumer::{handler_fn, Delivery};

const WORKER: &str = "WARREN_TEST_WORKER";

/// The worker side: consumes the group named in the environment, appends
/// `<message_id>` to the ledger file before handling, and on a `kill` body
/// aborts the process mid-handling; other bodies sleep long (held in flight).
#[test]
fn worker_entry() {
    let Ok(spec) = std::env::var(WORKER) else {
        return;
    };
    let (toml, prefix, ledger) = {
        let mut parts = spec.splitn(3, '\u{1}');
        (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
        )
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let topology = warren_topology::Topology::parse(&toml, "t")
            .unwrap()
            .with_prefix(&prefix);
        let group = topology.groups[0].clone();
        let run = Running::start(
            group,
            handler_fn(move |d: Delivery| {
                let ledger = ledger.clone();
                async move {
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&ledger)
                        .unwrap();
                    writeln!(f, "{}", d.message_id().unwrap_or("")).unwrap();
                    drop(f);
                    if d.body() == b"kill" {
                        std::process::abort();
                    }
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    Ok(())
                }
            }),
            "consumer-test-worker",
            |b| b,
        )
        .await;
        let _ = run.task.await;
    });
}

fn spawn_worker(toml: &str, prefix: &str, ledger: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "worker_entry", "--nocapture", "--test-threads=1"])
        .env(WORKER, format!("{toml}\u{1}{prefix}\u{1}{ledger}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn ledger_lines(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn ledger_path(prefix: &str) -> String {
    std::env::temp_dir()
        .join(format!("{}ledger", prefix))
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_nothing() {
    let toml = "[[exchange]]\nname = 'orders'\nkind = 'topic'\n\
        [[group]]\nname = 'billing'\nexchange = 'orders'\nbindings = ['#']\nqueue_type = 'quorum'\ndelivery_limit = 5\nretry = ['200ms']\nprefetch = 8\nconcurrency = 8\nhandler_timeout = '5m'\n";
    let prefix = unique_prefix();
    let f = Fixture::with_prefix(toml, &prefix).await;
    let g = f.group(0);
    let ledger = ledger_path(&prefix);
    let mut child = spawn_worker(toml, &prefix, &ledger);
    for i in 0..5 {
        f.publish(&f.exchange(), "k", b"work", props(&format!("k{i}")))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while ledger_lines(&ledger).len() < 5 {
        assert!(Instant::now() < deadline, "worker did not start all 5");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let _ = std::fs::remove_file(&ledger);

    let seen = Ledger::default();
    let s = seen.clone();
    let run = Running::start(
        g.clone(),
        handler_fn(move |d: Delivery| {
            let s = s.clone();
            async move {
                s.note(&d);
                Ok(())
            }
        }),
        "consumer-test",
        |b| b,
    )
    .await;
    wait_for(Duration::from_secs(10), "all 5 redelivered", || {
        seen.len() == 5
    })
    .await;
    for i in 0..5 {
        let v = seen.of(&format!("k{i}"));
        assert_eq!(v.len(), 1);
        assert!(v[0].redelivered, "k{i} marked redelivered");
    }
    run.stop().await;
    assert_eq!(f.count(&g.work_queue()).await, 0);
    assert_eq!(f.count(&g.dead_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_ends_in_the_dead_letter_queue_after_the_delivery_limit() {
    let toml = "[[exchange]]\nname = 'orders'\nkind = 'topic'\n\
        [[group]]\nname = 'billing'\nexchange = 'orders'\nbindings = ['#']\nqueue_type = 'quorum'\ndelivery_limit = 2\nretry = ['200ms']\nprefetch = 4\nconcurrency = 4\n";
    let prefix = unique_prefix();
    let f = Fixture::with_prefix(toml, &prefix).await;
    let g = f.group(0);
    let ledger = ledger_path(&prefix);
    f.publish(&f.exchange(), "k", b"kill", props("poison"))
        .await;
    let mut crashes = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while f.count(&g.dead_queue()).await == 0 {
        assert!(
            Instant::now() < deadline,
            "not dead-lettered after {crashes} crashes"
        );
        let mut child = spawn_worker(toml, &prefix, &ledger);
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            if child.try_wait().unwrap().is_some() {
                crashes += 1;
                break;
            }
            if Instant::now() > until || f.count(&g.dead_queue()).await > 0 {
                child.kill().unwrap();
                child.wait().unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let handled = ledger_lines(&ledger);
    let _ = std::fs::remove_file(&ledger);
    assert_eq!(
        handled.len(),
        3,
        "delivered once plus delivery_limit redeliveries: {handled:?}"
    );
    assert_eq!(crashes, 3);
    let dead = f.take(&g.dead_queue(), 1, Duration::from_secs(5)).await;
    let m = &dead[0];
    assert_eq!(m.delivery.data, b"kill");
    let h = m.delivery.properties.headers().as_ref().unwrap();
    let Some(lapin::types::AMQPValue::FieldArray(deaths)) = h.inner().get("x-death") else {
        panic!("no x-death: {h:?}");
    };
    let lapin::types::AMQPValue::FieldTable(first) = &deaths.as_slice()[0] else {
        panic!("x-death entry is not a table");
    };
    let reason = match first.inner().get("reason") {
        Some(lapin::types::AMQPValue::LongString(s)) => {
            String::from_utf8_lossy(s.as_bytes()).into_owned()
        }
        other => panic!("x-death reason: {other:?}"),
    };
    assert_eq!(reason, "delivery_limit");
    assert!(
        header_str(m, warren_topology::headers::ERROR_KIND).is_none(),
        "the broker dead-lettered it, not warren"
    );
    // What `warren dlq list|show|stats` reports of it: kind `broker`, its
    // reason and queue taken from x-death.
    let info = warren_operator::Info::from_parts(&m.delivery.properties, &m.delivery.data);
    assert_eq!(info.kind, "broker");
    assert_eq!(
        info.error,
        format!("delivery_limit in queue {:?}", g.work_queue())
    );
    assert_eq!(info.id, "poison");
    assert_eq!(f.count(&g.work_queue()).await, 0);
}
