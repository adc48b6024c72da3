//! Connection failures a user meets with a wrong URL: what the error says.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use warren_topology::{connect, AmqpUrl, ConnectOptions};

/// A port that accepts connections but never speaks AMQP (RabbitMQ's
/// management UI on 15672 is the usual one): the error says so instead of
/// only "no answer".
#[tokio::test]
async fn a_port_that_accepts_but_does_not_speak_amqp_is_named_as_such() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let url: AmqpUrl = format!("amqp://guest:Sekr1tPw@127.0.0.1:{port}/%2f")
        .parse()
        .unwrap();
    let mut opts = ConnectOptions::new(url, "test").attempts(1);
    opts.connect_timeout = Duration::from_millis(500);
    let err = connect(&opts).await.unwrap_err().to_string();
    assert_eq!(
        err,
        format!("cannot connect to amqp://guest:***@127.0.0.1:{port}/%2f: 127.0.0.1:{port} accepted the connection but did not answer the AMQP handshake within 500ms: is it the broker's AMQP port? (RabbitMQ listens on 5672 for amqp://, 5671 for amqps://; 15672 is its management UI)")
    );
}

/// A listener that accepts connections and never answers.
async fn silent() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

/// `?connection_timeout=MS` in the URL is the time one attempt takes at
/// most (lapin's own connect ignores it): it wins over the default.
#[tokio::test]
async fn the_urls_connection_timeout_bounds_an_attempt() {
    let port = silent().await;
    let url: AmqpUrl = format!("amqp://guest:Sekr1tPw@127.0.0.1:{port}/%2f?connection_timeout=300")
        .parse()
        .unwrap();
    let opts = ConnectOptions::new(url, "test").attempts(1);
    assert_eq!(
        opts.connect_timeout,
        ConnectOptions::DEFAULT_CONNECT_TIMEOUT
    );
    let started = std::time::Instant::now();
    let err = connect(&opts).await.unwrap_err().to_string();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}: {err}",
        started.elapsed()
    );
    assert!(
        err.contains(&format!("127.0.0.1:{port} accepted the connection but did not answer the AMQP handshake within 300ms")),
        "{err}"
    );
}

/// The largest `connection_timeout` the URL can hold connects like any
/// other (no overflow on the way to a deadline).
#[tokio::test]
async fn a_huge_connection_timeout_still_connects() {
    let base = warren_testkit::url().expose().to_owned();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url: AmqpUrl = format!("{base}{sep}connection_timeout={}", u64::MAX)
        .parse()
        .unwrap();
    let conn = connect(&ConnectOptions::new(url, "test").attempts(1))
        .await
        .unwrap();
    warren_topology::close(&conn, "done").await;
}
