//! A wrong password: a clear error, and the password nowhere in the error or
//! the logs. Its own test binary, so that it can install a global subscriber
//! that captures every log line (lapin's included, at trace level).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use warren_producer::{PublishError, Publisher, PublisherConfig};
use warren_topology::{AmqpUrl, ConnectOptions};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_clear_and_never_shown() {
    let logs = Capture::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let secret = "n0t-the-Passw0rd-4711";
    let url: AmqpUrl = format!("amqp://guest:{secret}@127.0.0.1:5672/%2f")
        .parse()
        .unwrap();
    let registry = prometheus::Registry::new();
    let started = std::time::Instant::now();
    let err = Publisher::connect(
        PublisherConfig::default(),
        ConnectOptions::new(url, "producer-auth-test"),
        &registry,
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    let debug = format!("{err:?}");
    assert!(matches!(err, PublishError::Connect(_)), "{debug}");
    assert!(
        !err.is_transient(),
        "a wrong password is not retried: {text}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "not retried for long"
    );
    assert!(text.contains("refused user \"guest\""), "{text}");
    assert!(text.contains("amqp://guest:***@127.0.0.1:5672"), "{text}");
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(!logs.is_empty(), "logs were captured");
    for (what, s) in [("error", &text), ("debug", &debug), ("logs", &logs)] {
        assert!(
            !s.contains(secret),
            "the password appears in the {what}: {s}"
        );
    }
}
