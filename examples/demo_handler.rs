//! A small HTTP service that `warren consume --http` forwards messages to, for
//! the docker-compose demo. `POST /orders` with a JSON body:
//!
//! - about 10% of messages fail once with 503 (retryable; the retry succeeds),
//! - about 2% always fail with 400 (permanent: they end in the dead-letter queue),
//! - a body that is not JSON gets 400,
//! - everything else gets 200.
//!
//! Which messages fail is decided by a hash of `X-Warren-Message-Id`, so the
//! outcome of a message does not depend on which replica handles it.
//!
//! On SIGTERM or SIGINT it stops accepting connections, finishes the
//! requests in flight and exits 0. It must: in a container it is process 1,
//! and the kernel gives process 1 no default action for SIGTERM, so without a
//! handler `docker compose stop` (or Kubernetes) waits out its whole grace
//! period and then kills it.
//!
//! ```sh
//! cargo run --example demo_handler -- --listen 127.0.0.1:8080
//! ```

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;

/// Demo HTTP handler for `warren consume --http`.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
}

fn bucket(id: &str) -> u64 {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    h.finish() % 100
}

async fn orders(headers: HeaderMap, body: axum::body::Bytes) -> (StatusCode, String) {
    if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
        return (StatusCode::BAD_REQUEST, "body is not JSON".into());
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = header("x-warren-message-id");
    let attempt: u32 = header("x-warren-attempt").parse().unwrap_or(1);
    match bucket(&id) {
        0..=1 => (
            StatusCode::BAD_REQUEST,
            format!("order {id} refers to an unknown customer"),
        ),
        2..=11 if attempt <= 1 => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("payment provider timed out for order {id}"),
        ),
        _ => (StatusCode::OK, "ok".into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let app = Router::new()
        .route("/orders", post(orders))
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("demo_handler listening on {}", listener.local_addr()?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            eprintln!("demo_handler: stopping (requests in flight finish first)");
        })
        .await?;
    Ok(())
}
