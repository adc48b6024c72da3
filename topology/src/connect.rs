//! Connecting to the broker: a URL that never shows its password, connection
//! names that say who is connected, retries with backoff and jitter, and
//! [`Broker`], the one supervised connection a process shares.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures_util::StreamExt;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::TopologyError;

/// The default AMQP URL: the local broker, user `guest`, vhost `/`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An AMQP URL. `Debug` and `Display` print `amqp://user:***@host:port/vhost`;
/// only [`AmqpUrl::expose`] gives the real thing, to hand to the client.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    raw: String,
    redacted: String,
}

impl AmqpUrl {
    /// The URL with its password, for the AMQP client only. Never log it.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// The host the URL names (for the management API and messages).
    pub fn host(&self) -> String {
        url::Url::parse(&self.raw)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    /// The user the connection logs in as, which is what RabbitMQ compares
    /// a message's `user_id` with: the URL's user, percent-decoded (`guest`
    /// when none); `None` with `auth_mechanism=external`, where the client
    /// certificate names the user.
    pub fn login(&self) -> Option<String> {
        use std::str::FromStr;
        let uri = lapin::uri::AMQPUri::from_str(&self.raw).ok()?;
        let external = uri
            .query
            .auth_mechanism
            .is_some_and(|m| m.name().eq_ignore_ascii_case("EXTERNAL"));
        (!external).then_some(uri.authority.userinfo.username)
    }

    /// The user name the URL names (`guest` when none).
    pub fn username(&self) -> String {
        url::Url::parse(&self.raw)
            .ok()
            .map(|u| u.username().to_owned())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "guest".into())
    }
}

/// Masks the password of a URL-like string, for messages about a URL that did
/// not even parse.
pub fn redact(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        // A URL without a password, or text that only parses as some other
        // URL (`guest:pw@host` has the scheme "guest").
        _ => {
            // user:pass@ without a parseable URL around it (`amqp//u:p@h`,
            // `u:p@h`): mask what follows the user up to the last '@'.
            let Some(at) = raw.rfind('@') else {
                return raw.to_owned();
            };
            // After `//` if there is one (a password may hold '/'); masking
            // too much is fine, too little is not.
            let start = raw[..at].find("//").map_or(0, |i| i + 2);
            match raw[start..at].find(':') {
                Some(colon) => format!("{}:***{}", &raw[..start + colon], &raw[at..]),
                None => raw.to_owned(),
            }
        }
    }
}

impl FromStr for AmqpUrl {
    type Err = TopologyError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let redacted = redact(raw);
        let bad = |reason: String| TopologyError::Url {
            url: redacted.clone(),
            reason,
        };
        let parsed = url::Url::parse(raw).map_err(|e| {
            bad(format!(
                "{e}; expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f)"
            ))
        })?;
        match parsed.scheme() {
            "amqp" | "amqps" => {}
            other => return Err(bad(format!("scheme {other:?} is not amqp or amqps"))),
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host".into()));
        }
        // lapin's own parser must accept it too; its error text can hold the
        // whole URL, so only its verdict is used.
        if lapin::uri::AMQPUri::from_str(raw).is_err() {
            return Err(bad(
                "not a valid AMQP URI; expected amqp://user:password@host:port/vhost".into(),
            ));
        }
        Ok(AmqpUrl {
            raw: raw.to_owned(),
            redacted,
        })
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({})", self.redacted)
    }
}

impl Default for AmqpUrl {
    fn default() -> Self {
        DEFAULT_AMQP_URL
            .parse()
            .unwrap_or_else(|_| unreachable!("the default URL parses"))
    }
}

/// How to connect: the URL, who is connecting, and how hard to retry.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The broker.
    pub url: AmqpUrl,
    /// Who connects (`producer`, `consumer`, `operator`, `cli`): the connection
    /// is named `warren-<component>@<host>` in the management UI.
    pub component: String,
    /// Attempts before giving up; 1 = no retry. Default [`ConnectOptions::DEFAULT_ATTEMPTS`].
    pub attempts: usize,
    /// First backoff delay. Default [`ConnectOptions::DEFAULT_MIN_DELAY`].
    pub min_delay: Duration,
    /// Longest backoff delay. Default [`ConnectOptions::DEFAULT_MAX_DELAY`].
    pub max_delay: Duration,
    /// Time for one connection attempt (TCP + handshake). Default [`ConnectOptions::DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
}

impl ConnectOptions {
    /// Default number of attempts.
    pub const DEFAULT_ATTEMPTS: usize = 8;
    /// Default first backoff delay.
    pub const DEFAULT_MIN_DELAY: Duration = Duration::from_millis(200);
    /// Default longest backoff delay.
    pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(5);
    /// Default time for one attempt.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Options with the defaults for `component` at `url`.
    pub fn new(url: AmqpUrl, component: impl Into<String>) -> Self {
        ConnectOptions {
            url,
            component: component.into(),
            attempts: Self::DEFAULT_ATTEMPTS,
            min_delay: Self::DEFAULT_MIN_DELAY,
            max_delay: Self::DEFAULT_MAX_DELAY,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Sets the number of attempts (at least 1).
    pub fn attempts(mut self, attempts: usize) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Sets the backoff delays.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_delay = min;
        self.max_delay = max.max(min);
        self
    }

    /// The connection name shown by the broker: `warren-<component>@<host>`.
    pub fn connection_name(&self) -> String {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        format!("warren-{}@{host}", self.component)
    }

    fn backoff_builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.attempts.saturating_sub(1))
            .with_jitter()
    }
}

/// Why one connection attempt failed, with the password kept out.
#[derive(Debug, Clone)]
struct AttemptError {
    reason: String,
    retry: bool,
}

/// The largest frame warren asks for unless the URL sets `frame_max`: the
/// broker's own default, 128 KiB.
///
/// A message's properties and headers travel in one frame that cannot be
/// split, and the broker delivers a message whatever the consumer's frame
/// size: a connection with smaller frames fails on every message whose
/// headers another client could publish, and the message blocks its queue.
/// lapin keeps a send and a receive buffer of 32 frames per connection (up
/// to 8 MiB at 128 KiB once used); `?frame_max=16384` in the URL trades that
/// memory for refusing headers over about 16 KiB. Bodies larger than a frame
/// are split into several frames either way.
pub const DEFAULT_FRAME_MAX: u32 = 128 * 1024;

async fn connect_once(opts: &ConnectOptions) -> Result<Connection, AttemptError> {
    let props = ConnectionProperties::default()
        .with_connection_name(opts.connection_name().into())
        .with_client_property("product".into(), "warren".into())
        .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
    let mut uri = match lapin::uri::AMQPUri::from_str(opts.url.expose()) {
        Ok(uri) => uri,
        Err(_) => {
            return Err(AttemptError {
                reason: format!("{} is not a valid AMQP URI", opts.url),
                retry: false,
            })
        }
    };
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
    }
    match tokio::time::timeout(opts.connect_timeout, Connection::connect_uri(uri, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(classify(&e, &opts.url)),
        Err(_) => Err(AttemptError {
            reason: timed_out(opts).await,
            retry: true,
        }),
    }
}

/// Why a connection attempt timed out: a port that accepts connections but
/// does not speak AMQP (a management UI, a wrong service) or nothing that
/// answers at all.
async fn timed_out(opts: &ConnectOptions) -> String {
    let within = humantime::format_duration(opts.connect_timeout);
    let Some((host, port)) = url::Url::parse(opts.url.expose()).ok().and_then(|u| {
        let port = u
            .port()
            .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
        Some((u.host_str()?.trim_matches(['[', ']']).to_owned(), port))
    }) else {
        return format!("no answer within {within}");
    };
    let probe = tokio::net::TcpStream::connect((host.as_str(), port));
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(_)) => format!(
            "{host}:{port} accepted the connection but did not answer the AMQP handshake within {within}: is it the broker's AMQP port? (RabbitMQ listens on 5672, 5671 for amqps; 15672 is its management UI)"
        ),
        _ => format!(
            "no answer from {host}:{port} within {within} (a firewall that drops the packets, or a host that is down?)"
        ),
    }
}

fn classify(e: &lapin::Error, url: &AmqpUrl) -> AttemptError {
    // lapin's messages do not carry the URL, but mask anything that looks like
    // the password anyway.
    let text = mask_secret(&e.to_string(), url);
    let upper = text.to_uppercase();
    if upper.contains("ACCESS_REFUSED")
        || upper.contains("ACCESS-REFUSED")
        || upper.contains("AUTHENTICATION")
    {
        return AttemptError {
            reason: format!(
                "the broker refused user {:?} (wrong user or password, or no access to the vhost): {text}",
                url.username()
            ),
            retry: false,
        };
    }
    if upper.contains("NOT_ALLOWED") || upper.contains("VHOST") {
        return AttemptError {
            reason: format!("the broker refused the vhost: {text}"),
            retry: false,
        };
    }
    let hint = if upper.contains("REFUSED") {
        " (is the broker running? scripts/broker starts one)"
    } else {
        ""
    };
    AttemptError {
        reason: format!("{text}{hint}"),
        retry: true,
    }
}

fn mask_secret(text: &str, url: &AmqpUrl) -> String {
    match url::Url::parse(url.expose())
        .ok()
        .and_then(|u| u.password().map(str::to_owned))
    {
        Some(p) if p.len() >= 3 => text.replace(&p, "***"),
        _ => text.to_owned(),
    }
}

/// Connects, retrying with exponential backoff and jitter on transient
/// failures. Authentication and vhost errors fail at once.
pub async fn connect(opts: &ConnectOptions) -> Result<Connection, TopologyError> {
    let result = (|| connect_once(opts))
        .retry(opts.backoff_builder())
        .when(|e: &AttemptError| e.retry)
        .notify(|e: &AttemptError, after: Duration| {
            warn!(url = %opts.url, error = %e.reason, retry_in = ?after, "connecting to the broker failed; retrying");
        })
        .await;
    match result {
        Ok(conn) => {
            info!(url = %opts.url, name = %opts.connection_name(), "connected to the broker");
            Ok(conn)
        }
        Err(e) => Err(TopologyError::Connect {
            url: opts.url.to_string(),
            reason: e.reason,
            transient: e.retry,
        }),
    }
}

/// The one supervised connection of a process. Components ask it for
/// channels; when the connection has died, the next request reconnects (with
/// backoff) instead of trusting lapin's automatic recovery.
///
/// It also follows the broker's `connection.blocked` notices (a memory or
/// disk alarm): [`Broker::blocked`] says whether, and why, the broker stops
/// reading what this connection publishes.
pub struct Broker {
    opts: ConnectOptions,
    current: Mutex<Option<Connection>>,
    generation: AtomicU64,
    /// The largest frame of the current connection (negotiated), or the one
    /// asked for before the first connection.
    frame_max: AtomicU32,
    /// The broker's reason while it blocks this connection.
    blocked: Arc<std::sync::Mutex<Option<String>>>,
    /// Follows the current connection's events.
    watcher: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.opts.url)
            .field("component", &self.opts.component)
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Ok(mut w) = self.watcher.lock() {
            if let Some(task) = w.take() {
                task.abort();
            }
        }
    }
}

impl Broker {
    /// A broker handle; nothing is connected until first use.
    pub fn new(opts: ConnectOptions) -> Self {
        let asked = lapin::uri::AMQPUri::from_str(opts.url.expose())
            .ok()
            .and_then(|u| u.query.frame_max)
            .unwrap_or(DEFAULT_FRAME_MAX);
        Broker {
            opts,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            frame_max: AtomicU32::new(asked),
            blocked: Arc::new(std::sync::Mutex::new(None)),
            watcher: std::sync::Mutex::new(None),
        }
    }

    /// `Some(reason)` while the broker blocks publishing on this connection
    /// (`connection.blocked`: a memory or disk alarm); `None` otherwise.
    /// Publishes sent while blocked are not read by the broker until it
    /// unblocks, so publishers should hold them back.
    pub fn blocked(&self) -> Option<String> {
        self.blocked.lock().ok().and_then(|b| b.clone())
    }

    /// Follows `conn`'s blocked / unblocked notices (replacing the watcher of
    /// an earlier connection).
    fn watch(&self, conn: &Connection) {
        let flag = self.blocked.clone();
        if let Ok(mut b) = flag.lock() {
            *b = None;
        }
        let mut events = conn.events_listener();
        let (url, component) = (self.opts.url.to_string(), self.opts.component.clone());
        let task = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        warn!(url = %url, component = %component, reason = %reason, "the broker blocks publishing on this connection (a resource alarm); publishes wait until it unblocks");
                        if let Ok(mut b) = flag.lock() {
                            *b = Some(reason);
                        }
                    }
                    Event::ConnectionUnblocked => {
                        info!(url = %url, component = %component, "the broker unblocked publishing");
                        if let Ok(mut b) = flag.lock() {
                            *b = None;
                        }
                    }
                    _ => {}
                }
            }
        });
        if let Ok(mut w) = self.watcher.lock() {
            if let Some(old) = w.replace(task) {
                old.abort();
            }
        }
    }

    fn unwatch(&self) {
        if let Ok(mut w) = self.watcher.lock() {
            if let Some(old) = w.take() {
                old.abort();
            }
        }
        if let Ok(mut b) = self.blocked.lock() {
            *b = None;
        }
    }

    /// Connects now (with retries), so that a wrong URL fails early.
    pub async fn connect(opts: ConnectOptions) -> Result<Self, TopologyError> {
        let broker = Broker::new(opts);
        broker.ensure().await?;
        Ok(broker)
    }

    /// The options it connects with.
    pub fn options(&self) -> &ConnectOptions {
        &self.opts
    }

    /// The largest frame, in bytes, of the current connection (the smaller
    /// of what warren asked for, [`DEFAULT_FRAME_MAX`] unless the URL sets
    /// `frame_max`, and what the broker allows); before the first connection,
    /// what warren asks for. A message's properties and headers must fit in
    /// one frame: the broker closes the whole connection on a larger one.
    pub fn frame_max(&self) -> u32 {
        self.frame_max.load(Ordering::Relaxed)
    }

    /// How many connections were made so far (1 after the first connect;
    /// every reconnect adds one).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    async fn ensure(&self) -> Result<(), TopologyError> {
        let mut current = self.current.lock().await;
        let alive = current
            .as_ref()
            .is_some_and(|c| c.status().connected() && !c.status().closing());
        if !alive {
            if current.take().is_some() {
                warn!(url = %self.opts.url, component = %self.opts.component, "connection lost; reconnecting");
            }
            let conn = connect(&self.opts).await?;
            self.frame_max
                .store(conn.configuration().frame_max(), Ordering::Relaxed);
            self.watch(&conn);
            *current = Some(conn);
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A new channel on the live connection, reconnecting first if the
    /// connection is gone. Returns the channel and the connection generation
    /// it belongs to.
    pub async fn channel(&self) -> Result<(Channel, u64), TopologyError> {
        for _ in 0..2 {
            self.ensure().await?;
            let current = self.current.lock().await;
            if let Some(conn) = current.as_ref() {
                match conn.create_channel().await {
                    Ok(ch) => return Ok((ch, self.generation())),
                    Err(e) => {
                        warn!(error = %e, "opening a channel failed; reconnecting");
                        drop(current);
                        self.invalidate().await;
                    }
                }
            }
        }
        Err(TopologyError::Connect {
            url: self.opts.url.to_string(),
            reason: "the connection keeps failing right after it opens".into(),
            transient: true,
        })
    }

    /// Drops the current connection so that the next [`Broker::channel`]
    /// reconnects.
    pub async fn invalidate(&self) {
        if let Some(conn) = self.current.lock().await.take() {
            self.unwatch();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                conn.close(320, "reconnecting".into()),
            )
            .await;
        }
    }

    /// Whether the connection is up right now.
    pub async fn is_connected(&self) -> bool {
        self.current
            .lock()
            .await
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// Closes the connection cleanly (code 200).
    pub async fn close(&self) {
        if let Some(conn) = self.current.lock().await.take() {
            self.unwatch();
            close(&conn, "bye").await;
        }
    }
}

/// Closes a connection cleanly (code 200), waiting at most 5 s: after the
/// broker has closed a connection itself (a connection exception), lapin's
/// close can wait for ever.
pub async fn close(conn: &Connection, reason: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, reason.into())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unparsable_urls_never_show_their_password() {
        for (raw, shown) in [
            (
                "amqp//guest:s3cretPW@127.0.0.1:5672/%2f",
                "amqp//guest:***@127.0.0.1:5672/%2f",
            ),
            ("guest:s3cretPW@127.0.0.1:5672", "guest:***@127.0.0.1:5672"),
            ("amqp//guest:pa/ss@h", "amqp//guest:***@h"),
            ("amqp://guest:s3cret PW@[bad", "amqp://guest:***@[bad"),
        ] {
            assert_eq!(redact(raw), shown);
            let err = raw.parse::<AmqpUrl>().expect_err(raw).to_string();
            assert!(!err.contains("s3cret") && !err.contains("pa/ss"), "{err}");
        }
    }

    #[test]
    fn url_never_shows_the_password() {
        let u: AmqpUrl = "amqp://alice:s3cret@rabbit:5672/%2f".parse().unwrap();
        assert_eq!(u.to_string(), "amqp://alice:***@rabbit:5672/%2f");
        assert!(!format!("{u:?}").contains("s3cret"));
        assert_eq!(u.expose(), "amqp://alice:s3cret@rabbit:5672/%2f");
        assert_eq!(u.username(), "alice");
    }

    #[test]
    fn the_login_is_the_decoded_user_unless_a_certificate_names_it() {
        let login = |raw: &str| raw.parse::<AmqpUrl>().unwrap().login();
        assert_eq!(
            login("amqp://alice:pw@rabbit/%2f").as_deref(),
            Some("alice")
        );
        assert_eq!(
            login("amqp://svc%40a:pw@rabbit/%2f").as_deref(),
            Some("svc@a")
        );
        assert_eq!(login("amqp://rabbit/%2f").as_deref(), Some("guest"));
        assert_eq!(login("amqps://rabbit/%2f?auth_mechanism=external"), None);
    }

    #[test]
    fn bad_urls_are_clear_and_masked() {
        let e = "http://bob:hunter2@host/"
            .parse::<AmqpUrl>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not amqp"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = "amqp://bob:hunter2@"
            .parse::<AmqpUrl>()
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        let e = "not a url".parse::<AmqpUrl>().unwrap_err().to_string();
        assert!(e.contains("expected amqp://"), "{e}");
    }

    #[test]
    fn connection_name_names_component_and_host() {
        let o = ConnectOptions::new(AmqpUrl::default(), "producer");
        assert!(o.connection_name().starts_with("warren-producer@"));
    }
}
