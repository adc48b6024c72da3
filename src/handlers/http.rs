//! `warren consume --http URL`: POST each message to an HTTP endpoint.
//!
//! | response | outcome |
//! |---|---|
//! | 2xx | success (ack) |
//! | 4xx other than 408 and 429 | permanent (dead-lettered): status and the first 1 KiB of the body |
//! | 5xx, 408, 429, a timeout, a refused connection | retryable |
//! | 3xx | retryable; the error names the `Location` |
//!
//! A service that cannot be connected to fails with an error that asks
//! whether it runs; the consumer logs the first retry of its group, then
//! one a minute, at WARN, so a service that is down shows at the default
//! level.
//!
//! A `Retry-After` of a 429 or a 503 is shown in the error, not waited
//! for: the group's retry tiers (TTL queues) set when a message comes back,
//! and a worker that held a delivery for the service's wait would hold a
//! handler slot and a prefetched message with it. An operator who sees the
//! service ask for longer than the tiers wait lengthens the tiers.
//!
//! Redirects are not followed: a client that follows a 301, 302 or 303
//! turns the POST into a GET without the body, and a 200 to that GET would
//! ack a message the service never received. A worker's URL is configured
//! once: the error says to give `--http` the final URL.
//!
//! A password in the URL (`http://user:pw@host/hook`) is sent as basic
//! auth and shown everywhere as `user:***@`: logs, errors, `x-warren-error`.
//! A response body is masked too ([`Mask`]): a service may echo a URL, or
//! the broker's password.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use warren_consumer::{Delivery, ErrorKind, Handler, HandlerError, HandlerResult};
use warren_topology::headers;

use super::{push_clean, with_head, Mask, CUT, READ_BYTES};

/// Forwards deliveries to an HTTP endpoint over a keep-alive pool.
#[derive(Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL as shown: its password masked.
    shown: String,
    mask: Mask,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

impl HttpHandler {
    /// A handler posting to `url`, each request bounded by `timeout` (the
    /// group's `handler_timeout`).
    pub fn new(url: &str, timeout: Duration, pool: usize) -> anyhow::Result<Self> {
        let shown = warren_topology::redact(url);
        // `localhost:8080` parses as the scheme "localhost", `127.0.0.1:8080`
        // not at all: neither error would say what to write.
        if !url.contains("://") {
            return Err(crate::cli::UsageError(format!(
                "--http {shown:?} has no http:// in front: give the whole URL the service takes \
                 the POSTs on, such as http://{shown}"
            ))
            .into());
        }
        let url = reqwest::Url::parse(url)
            .map_err(|e| crate::cli::UsageError(format!("--http {shown:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http") {
            return Err(crate::cli::UsageError(format!(
                "--http {shown}: only http:// is supported (put TLS in front of the worker's local service)"
            ))
            .into());
        }
        let shown = warren_topology::redact(url.as_str());
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(pool)
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .build()?;
        Ok(HttpHandler {
            client,
            url,
            shown,
            mask: Mask::default(),
        })
    }

    /// Masks the passwords `mask` knows in response bodies (every
    /// `user:password@` without it).
    pub fn mask(mut self, mask: Mask) -> Self {
        self.mask = mask;
        self
    }

    /// The URL as it may be shown: its password masked.
    pub fn shown_url(&self) -> &str {
        &self.shown
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

/// The most of a redirect's `Location` an error shows (bytes, escapes
/// included), leaving room for the response body.
const LOCATION_BYTES: usize = 512;

/// The most of a `Retry-After` an error shows (seconds, or an HTTP date).
const RETRY_AFTER_BYTES: usize = 64;

/// Pushes `value` (a response header) onto `out`, masked and cleaned, at
/// most `max` bytes of it.
fn push_header(out: &mut String, value: &[u8], max: usize, mask: &Mask) {
    let value = mask.apply(String::from_utf8_lossy(value).trim());
    let end = out.len() + max;
    for c in value.chars() {
        if out.len() >= end {
            out.push_str(CUT);
            break;
        }
        push_clean(out, c);
    }
}

/// The outcome of an HTTP status, with the start of the response body,
/// masked with `mask`, and, for a redirect, where it pointed (`location`);
/// for a 429 or a 503, the wait the service asked for (`retry_after`).
pub fn outcome_of_status(
    status: u16,
    location: Option<&[u8]>,
    retry_after: Option<&[u8]>,
    body: &[u8],
    mask: &Mask,
) -> HandlerResult {
    let text = || {
        let reason = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut prefix = format!("HTTP {status} {reason}").trim_end().to_owned();
        if (300..=399).contains(&status) {
            if let Some(location) = location {
                prefix.push_str(" to ");
                // A password in it is masked, as the --http URL's is.
                let location = warren_topology::redact(String::from_utf8_lossy(location).trim());
                push_header(&mut prefix, location.as_bytes(), LOCATION_BYTES, mask);
            }
            prefix.push_str(" (redirects are not followed: give --http the final URL)");
        }
        if let (429 | 503, Some(wait)) = (status, retry_after) {
            prefix.push_str(" (Retry-After: ");
            push_header(&mut prefix, wait, RETRY_AFTER_BYTES, mask);
            prefix.push_str(
                ", not waited for: the group's retry tiers set the wait; lengthen them if the \
                 service needs longer)",
            );
        }
        with_head(&prefix, body, mask)
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
                    format!("POST {} timed out", self.shown),
                ))
            }
            Err(e) if e.is_connect() => {
                let error = format!(
                    "POST {} failed: {}; is the service running and listening there?",
                    self.shown,
                    error_chain(&e.without_url())
                );
                return Err(HandlerError::retryable(error));
            }
            Err(e) => {
                return Err(HandlerError::retryable(format!(
                    "POST {} failed: {}",
                    self.shown,
                    error_chain(&e.without_url())
                )))
            }
        };
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(());
        }
        let header = |name| response.headers().get(name).map(|v| v.as_bytes().to_vec());
        let (location, retry_after) = (header(LOCATION), header(RETRY_AFTER));
        // Only the start of an error body is kept; do not read a huge one whole.
        let mut body = Vec::new();
        let mut response = response;
        while body.len() < READ_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        outcome_of_status(
            status,
            location.as_deref(),
            retry_after.as_deref(),
            &body,
            &self.mask,
        )
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
    use crate::handlers::ERROR_TEXT_BYTES;

    fn outcome(status: u16, location: Option<&[u8]>, body: &[u8]) -> HandlerResult {
        outcome_of_status(status, location, None, body, &Mask::default())
    }

    #[test]
    fn statuses_map_to_the_documented_outcomes() {
        assert!(outcome(200, None, b"").is_ok());
        assert!(outcome(204, None, b"").is_ok());
        let e = outcome(400, None, b"bad order\n").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert_eq!(e.message(), "HTTP 400 Bad Request: bad order");
        assert_eq!(
            outcome(404, None, b"").unwrap_err().kind(),
            ErrorKind::Permanent
        );
        assert_eq!(
            outcome(408, None, b"").unwrap_err().kind(),
            ErrorKind::Retryable
        );
        assert_eq!(
            outcome(429, None, b"").unwrap_err().kind(),
            ErrorKind::Retryable
        );
        assert_eq!(
            outcome(503, None, b"").unwrap_err().kind(),
            ErrorKind::Retryable
        );
        let long = vec![b'x'; 5000];
        let e = outcome(301, Some(b"https://x/h\x1b[2J\n"), b"").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Retryable);
        assert_eq!(
            e.message(),
            "HTTP 301 Moved Permanently to https://x/h\\u{1b}[2J \
             (redirects are not followed: give --http the final URL)"
        );
        let e = outcome(302, Some(b"http://u:secretpw@h/x"), b"").unwrap_err();
        assert!(
            e.message().contains(" to http://u:***@h/x "),
            "{}",
            e.message()
        );
        assert!(!e.message().contains("secretpw"), "{}", e.message());
        let far = format!("/{}", "\x07".repeat(5000));
        let e = outcome(308, Some(far.as_bytes()), &long).unwrap_err();
        assert!(e.message().len() <= ERROR_TEXT_BYTES, "{}", e.message());
        assert!(
            e.message().contains("\\u{7}… (redirects"),
            "{}",
            e.message()
        );
        assert!(outcome(500, None, &long).unwrap_err().message().len() <= ERROR_TEXT_BYTES);
        assert_eq!(
            outcome(400, None, b"\x1b]0;owned\x07 no")
                .unwrap_err()
                .message(),
            "HTTP 400 Bad Request: \\u{1b}]0;owned\\u{7} no"
        );
    }

    #[test]
    fn the_password_of_the_url_is_never_shown() {
        let h = HttpHandler::new(
            "http://user:secretpw@127.0.0.1:9/hook",
            Duration::from_secs(1),
            1,
        )
        .unwrap();
        assert_eq!(h.shown_url(), "http://user:***@127.0.0.1:9/hook");
        assert!(!format!("{h:?}").contains("secretpw"));
        let e = HttpHandler::new("ftp://user:secretpw@host/x", Duration::from_secs(1), 1)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secretpw"), "{e}");
        assert!(e.contains("ftp://user:***@host/x"), "{e}");
    }

    #[test]
    fn a_retry_after_is_shown_not_waited_for() {
        let mask = Mask::default();
        for status in [429, 503] {
            let e = outcome_of_status(status, None, Some(b"120"), b"later", &mask).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Retryable);
            assert!(
                e.message().contains(
                    " (Retry-After: 120, not waited for: the group's retry tiers set the wait; \
                     lengthen them if the service needs longer): later"
                ),
                "{}",
                e.message()
            );
        }
        // An HTTP date, cut and cleaned; other statuses do not show it.
        let date = format!("Wed, 21 Oct 2015 07:28:00 GMT\u{202e}{}", "9".repeat(100));
        let e = outcome_of_status(503, None, Some(date.as_bytes()), b"", &mask).unwrap_err();
        assert!(
            e.message().starts_with(
                "HTTP 503 Service Unavailable (Retry-After: Wed, 21 Oct 2015 07:28:00 GMT\\u{202e}99"
            ),
            "{}",
            e.message()
        );
        assert!(
            e.message().contains("99…, not waited for"),
            "{}",
            e.message()
        );
        let e = outcome_of_status(500, None, Some(b"120"), b"", &mask).unwrap_err();
        assert_eq!(e.message(), "HTTP 500 Internal Server Error");
    }
}
