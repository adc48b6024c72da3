//! `warren consume --http URL`: POST each message to an HTTP endpoint.
//!
//! | response | outcome |
//! |---|---|
//! | 2xx | success (ack) |
//! | 4xx other than 408 and 429 | permanent (dead-lettered): status and the first 1 KiB of the body |
//! | 5xx, 408, 429, a timeout, a refused connection | retryable |

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use warren_consumer::{Delivery, ErrorKind, Handler, HandlerError, HandlerResult};
use warren_topology::headers;

use super::{head_text, ERROR_TEXT_BYTES};

/// Forwards deliveries to an HTTP endpoint over a keep-alive pool.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl HttpHandler {
    /// A handler posting to `url`, each request bounded by `timeout` (the
    /// group's `handler_timeout`).
    pub fn new(url: &str, timeout: Duration, pool: usize) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| crate::cli::UsageError(format!("--http {url:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http") {
            return Err(crate::cli::UsageError(format!(
                "--http {url}: only http:// is supported (put TLS in front of the worker's local service)"
            ))
            .into());
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(pool)
            .tcp_nodelay(true)
            .build()?;
        Ok(HttpHandler { client, url })
    }

    fn request_headers(d: &Delivery) -> HeaderMap {
        let mut h = HeaderMap::new();
        let content_type = d
            .properties()
            .content_type()
            .as_ref()
            .map(|c| c.as_str().to_owned())
            .unwrap_or_else(|| "application/octet-stream".into());
        if let Ok(v) = HeaderValue::from_str(&content_type) {
            h.insert(CONTENT_TYPE, v);
        }
        let mut put = |name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        if let Some(id) = d.message_id() {
            put("x-warren-message-id", id);
        }
        put("x-warren-attempt", &d.attempt().to_string());
        put("x-warren-routing-key", d.routing_key());
        put(
            "x-warren-redelivered",
            if d.redelivered() { "true" } else { "false" },
        );
        if let Some(tp) = d.header_str(headers::TRACEPARENT) {
            put("traceparent", &tp);
        }
        if let Some(ts) = d.header_str(headers::TRACESTATE) {
            put("tracestate", &ts);
        }
        h
    }
}

/// The outcome of an HTTP status, with the start of the response body.
pub fn outcome_of_status(status: u16, body: &[u8]) -> HandlerResult {
    let text = || {
        let b = head_text(body, ERROR_TEXT_BYTES);
        let reason = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        if b.is_empty() {
            format!("HTTP {status} {reason}")
        } else {
            format!("HTTP {status} {reason}: {b}")
        }
    };
    match status {
        200..=299 => Ok(()),
        408 | 429 => Err(HandlerError::retryable(text())),
        400..=499 => Err(HandlerError::permanent(text())),
        _ => Err(HandlerError::retryable(text())),
    }
}

impl Handler for HttpHandler {
    async fn handle(&self, d: Delivery) -> HandlerResult {
        let response = self
            .client
            .post(self.url.clone())
            .headers(Self::request_headers(&d))
            .body(d.body().to_vec())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(HandlerError::new(
                    ErrorKind::Timeout,
                    format!("POST {} timed out", self.url),
                ))
            }
            Err(e) => {
                return Err(HandlerError::retryable(format!(
                    "POST {} failed: {}",
                    self.url,
                    error_chain(&e)
                )))
            }
        };
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(());
        }
        // Only the start of an error body is kept; do not read a huge one whole.
        let mut body = Vec::new();
        let mut response = response;
        while body.len() < ERROR_TEXT_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        outcome_of_status(status, &body)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_documented_outcomes() {
        assert!(outcome_of_status(200, b"").is_ok());
        assert!(outcome_of_status(204, b"").is_ok());
        let e = outcome_of_status(400, b"bad order\n").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert_eq!(e.message(), "HTTP 400 Bad Request: bad order");
        assert_eq!(
            outcome_of_status(404, b"").unwrap_err().kind(),
            ErrorKind::Permanent
        );
        assert_eq!(
            outcome_of_status(408, b"").unwrap_err().kind(),
            ErrorKind::Retryable
        );
        assert_eq!(
            outcome_of_status(429, b"").unwrap_err().kind(),
            ErrorKind::Retryable
        );
        assert_eq!(
            outcome_of_status(503, b"").unwrap_err().kind(),
            ErrorKind::Retryable
        );
        assert_eq!(
            outcome_of_status(301, b"").unwrap_err().kind(),
            ErrorKind::Retryable
        );
        let long = vec![b'x'; 5000];
        assert!(
            outcome_of_status(500, &long).unwrap_err().message().len() <= ERROR_TEXT_BYTES + 40
        );
    }
}
