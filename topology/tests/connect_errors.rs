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
