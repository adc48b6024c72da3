//! Connecting to the broker: a URL that never shows its password, connection
//! names that say who is connected, retries with backoff and jitter, TLS with
//! the URL's own CA and client certificate, and [`Broker`], the one
//! supervised connection a process shares.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures_util::StreamExt;
use lapin::tcp::{AsyncTcpStream, RustlsConnector, RustlsConnectorConfig};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::TopologyError;

/// The default AMQP URL: the local broker, user `guest`, vhost `/`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An AMQP URL. `Debug` and `Display` print `amqp://user:***@host:port/vhost`;
/// only [`AmqpUrl::expose`] gives the real thing, to hand to the client.
///
/// An `amqps://` URL may name TLS files with the query parameters of
/// RabbitMQ's URI spec: `cacertfile` (PEM certificates of the CAs trusted to
/// sign the broker's certificate, instead of the system's, as the Erlang,
/// Java, Go and Python clients take it), and `certfile` with `keyfile` (a PEM
/// client certificate, intermediates after it, and its unencrypted PEM
/// private key), which `auth_mechanism=external` logs in with. They are
/// paths, shown as they are; the files are read at each connection attempt.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    raw: String,
    redacted: String,
    tls: TlsFiles,
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
    /// when none); `None` with `auth_mechanism=external`, where the broker
    /// takes the user from the client certificate (the URL's `certfile`: its
    /// subject, or its common name with the broker's
    /// `ssl_cert_login_from = common_name`), which the URL does not say.
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
            // A '/', '?' or '#' in the password ends the host part early, and
            // what follows its ':' is read as the port.
            let encode = if e == url::ParseError::InvalidPort && cut_short(raw) {
                " (a '/', '?' or '#' in the password ends the host part: write them as %2F, %3F, %23, and '@' as %40)"
            } else {
                ""
            };
            bad(format!(
                "{e}{encode}; expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f)"
            ))
        })?;
        match parsed.scheme() {
            "amqp" | "amqps" => {}
            "http" | "https" => {
                return Err(bad(format!(
                    "scheme {:?} is not amqp or amqps (an http:// URL is the management UI's, port 15672; AMQP listens on 5672); expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f)",
                    parsed.scheme()
                )))
            }
            other => return Err(bad(format!("scheme {other:?} is not amqp or amqps"))),
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad(
                "no host; expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f)"
                    .into(),
            ));
        }
        if parsed.fragment().is_some() {
            return Err(bad(
                "the AMQP client drops what follows a '#' (a URL fragment): write a '#' in the vhost as %23".into(),
            ));
        }
        check_query(&parsed).map_err(bad)?;
        let tls = TlsFiles::of(&parsed).map_err(bad)?;
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
            tls,
        })
    }
}

/// Whether the host part of `raw` ends (at a '/', '?' or '#') before an
/// '@' that it has none of: a password holding one of those characters.
fn cut_short(raw: &str) -> bool {
    let Some((_, rest)) = raw.split_once("://") else {
        return false;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    !rest[..end].contains('@') && rest[end..].contains('@')
}

/// The query parameters the AMQP client reads, checked with a message that
/// names the parameter and what it takes (the client's own says only
/// "invalid digit found in string").
fn check_query(parsed: &url::Url) -> Result<(), String> {
    for (key, value) in parsed.query_pairs() {
        let (ok, takes) = match key.as_ref() {
            "frame_max" => (
                value.parse::<u32>().is_ok_and(|n| n >= 4096),
                "bytes, from 4096 (the AMQP minimum) to 4294967295; without it, 128 KiB",
            ),
            "channel_max" => (value.parse::<u16>().is_ok(), "channels, from 0 to 65535"),
            "heartbeat" => (
                value.parse::<u16>().is_ok(),
                "seconds, from 0 (none) to 65535",
            ),
            "connection_timeout" => (value.parse::<u64>().is_ok(), "milliseconds"),
            "auth_mechanism" => (
                value.parse::<lapin::uri::SASLMechanism>().is_ok(),
                "plain, amqplain, external, anonymous or rabbit-cr-demo",
            ),
            _ => (true, ""),
        };
        if !ok {
            return Err(format!("{key}={value}: {key} takes {takes}"));
        }
    }
    Ok(())
}

/// The TLS files an `amqps://` URL names with the query parameters of
/// RabbitMQ's URI spec. Paths only: the files are read at each connection
/// attempt, so a renewed certificate is used from the next reconnect on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TlsFiles {
    /// `cacertfile`: the CAs trusted to sign the broker's certificate,
    /// instead of the system's.
    ca: Option<String>,
    /// `certfile`: the client certificate, then any intermediates.
    cert: Option<String>,
    /// `keyfile`: the client certificate's private key.
    key: Option<String>,
}

impl TlsFiles {
    /// The TLS files of a URL: only on `amqps://`, each at most once and not
    /// empty, `certfile` and `keyfile` together.
    fn of(parsed: &url::Url) -> Result<TlsFiles, String> {
        let mut files = TlsFiles::default();
        for (key, value) in parsed.query_pairs() {
            let slot = match key.as_ref() {
                "cacertfile" => &mut files.ca,
                "certfile" => &mut files.cert,
                "keyfile" => &mut files.key,
                _ => continue,
            };
            if parsed.scheme() != "amqps" {
                return Err(format!(
                    "{key}={value}: {key} is a TLS setting, and amqp:// has no TLS: use amqps:// with the broker's TLS port (5671 by default)"
                ));
            }
            if value.is_empty() {
                return Err(format!("{key} is empty: it takes the path of a PEM file"));
            }
            if let Some(first) = slot {
                return Err(format!(
                    "{key} is given twice ({key}={first} and {key}={value}): give it once"
                ));
            }
            *slot = Some(value.into_owned());
        }
        match (&files.cert, &files.key) {
            (Some(cert), None) => Err(format!(
                "certfile={cert} without keyfile: a client certificate needs its private key; add &keyfile=/path/to/key.pem"
            )),
            (None, Some(key)) => Err(format!(
                "keyfile={key} without certfile: a private key needs its client certificate; add &certfile=/path/to/cert.pem"
            )),
            _ => Ok(files),
        }
    }

    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none()
    }

    /// Reads the files and builds the TLS client: it trusts the CAs of
    /// `cacertfile` (else the system's) and presents the certificate of
    /// `certfile` and `keyfile`. Errors name the parameter and the path,
    /// never what a key file holds.
    fn connector(&self) -> Result<RustlsConnector, String> {
        let roots = match &self.ca {
            Some(path) => {
                let certs = certificates("cacertfile", path)?;
                let roots = RustlsConnectorConfig::default().with_parsable_certificates(certs);
                // rustls skips the certificates it cannot take as a CA, and
                // fails only when none is left.
                roots
                    .clone()
                    .connector_with_no_client_auth()
                    .map_err(|e| {
                        format!("cacertfile={path}: none of its certificates can be a CA ({e})")
                    })?;
                roots
            }
            None => RustlsConnectorConfig::new_with_native_certs().map_err(|e| {
                format!(
                    "cannot load the system's CA certificates ({e}): name the CA that signed the broker's certificate with cacertfile=/path/to/ca.pem"
                )
            })?,
        };
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return roots
                .connector_with_no_client_auth()
                .map_err(|e| format!("cannot set up TLS ({e})"));
        };
        let chain = certificates("certfile", cert)?;
        let private = private_key(key)?;
        roots
            .connector_with_single_cert(chain, private)
            .map_err(|e| {
                let e = e.to_string();
                if e.contains("KeyMismatch") {
                    format!("keyfile={key} is not the private key of the certificate in certfile={cert} (the first one in the file)")
                } else if e.contains("failed to parse private key") {
                    format!("keyfile={key} holds a private key that cannot be read ({e}): warren takes RSA, ECDSA (P-256, P-384) and Ed25519 keys")
                } else {
                    format!("keyfile={key} cannot be used with certfile={cert} ({e})")
                }
            })
    }
}

/// The PEM certificates of a TLS file, in their order.
fn certificates(param: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_tls_file(param, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{param}={path} is not a valid PEM file ({e})"))?;
    if certs.is_empty() {
        return Err(format!(
            "{param}={path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(certs)
}

/// The private key of `keyfile`; what the file holds never goes into an
/// error.
fn private_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_tls_file("keyfile", path)?;
    let holds = |label: &[u8]| pem.windows(label.len()).any(|w| w == label);
    if holds(b"ENCRYPTED PRIVATE KEY") || holds(b"Proc-Type: 4,ENCRYPTED") {
        return Err(format!(
            "keyfile={path} is encrypted (it has a passphrase), which warren cannot use: write it unencrypted with openssl pkey -in ENCRYPTED.pem -out KEY.pem, readable only by warren's user"
        ));
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "keyfile={path} holds no PEM private key (-----BEGIN PRIVATE KEY-----, or RSA PRIVATE KEY, or EC PRIVATE KEY)"
        ),
        _ => format!("keyfile={path} is not a valid PEM file"),
    })
}

fn read_tls_file(param: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {param}={path} ({e})"))
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
    /// Time for one connection attempt (TCP + handshake); the URL's
    /// `?connection_timeout=MS` takes its place (lapin itself would ignore
    /// it). Default [`ConnectOptions::DEFAULT_CONNECT_TIMEOUT`].
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
    // amq-protocol-uri takes the host from `Url::domain`, which is empty for
    // an IPv6 address, and then connects to "localhost": `amqp://[::1]`
    // would reach whatever listens on 127.0.0.1, `amqp://[2001:db8::1]`
    // the local broker. The address itself goes in (unbracketed, as a
    // socket address wants it).
    if let Some(url::Host::Ipv6(ip)) = url::Url::parse(opts.url.expose())
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    {
        uri.authority.host = ip.to_string();
    }
    let limit = uri
        .query
        .connection_timeout
        .map_or(opts.connect_timeout, Duration::from_millis);
    // Files that cannot be read or do not fit fail before connecting, and
    // no retry changes them.
    let tls = if opts.url.tls.is_empty() {
        None
    } else {
        let connector = opts.url.tls.connector().map_err(|reason| AttemptError {
            reason,
            retry: false,
        })?;
        Some(connector)
    };
    let connecting = async {
        match tls {
            None => Connection::connect_uri(uri, props).await,
            Some(tls) => connect_tls(uri, props, tls).await,
        }
    };
    match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(classify(&e, &opts.url)),
        Err(_) => Err(timed_out(&opts.url, limit).await),
    }
}

/// Connects over TLS with the URL's own TLS client (its `cacertfile`,
/// `certfile` and `keyfile`), the way lapin connects with its default one:
/// lapin's TLS settings can only add CAs to the system's, and `cacertfile`
/// takes their place.
async fn connect_tls(
    uri: AMQPUri,
    props: ConnectionProperties,
    tls: RustlsConnector,
) -> lapin::Result<Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = uri.authority.host;
            let addrs = runtime.to_socket_addrs((host.clone(), uri.authority.port));
            let plain = AsyncTcpStream::connect(&runtime, addrs).await?;
            Ok(plain.into_rustls(&tls, &host).await?)
        },
        props,
    )
    .await
}

/// Why a connection attempt timed out: a port that accepts connections but
/// does not speak AMQP (a management UI, a wrong service) or nothing that
/// answers at all.
///
/// An HTTP server reads a request line before it answers, and the AMQP
/// protocol header has no line end: it waits as long as the client does. A
/// second connection that sends a request line tells it apart, and an HTTP
/// server there fails at once instead of being waited on again.
async fn timed_out(url: &AmqpUrl, limit: Duration) -> AttemptError {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let within = humantime::format_duration(limit);
    let at = endpoint(url);
    let Some((host, port)) = url::Url::parse(url.expose()).ok().and_then(|u| {
        let port = u
            .port()
            .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
        Some((u.host_str()?.trim_matches(['[', ']']).to_owned(), port))
    }) else {
        return AttemptError {
            reason: format!("no answer within {within}"),
            retry: true,
        };
    };
    let probe = tokio::net::TcpStream::connect((host.as_str(), port));
    let Ok(Ok(mut socket)) = tokio::time::timeout(Duration::from_secs(2), probe).await else {
        return AttemptError {
            reason: format!(
                "no answer from {at} within {within} (a firewall that drops the packets, or a host that is down?)"
            ),
            retry: true,
        };
    };
    let answer = async {
        socket.write_all(b"HEAD / HTTP/1.0\r\n\r\n").await?;
        let mut first = [0u8; 5];
        socket.read_exact(&mut first).await?;
        Ok::<_, std::io::Error>(first)
    };
    if let Ok(Ok(first)) = tokio::time::timeout(Duration::from_secs(2), answer).await {
        if first.starts_with(b"HTTP/") {
            return AttemptError {
                reason: format!(
                    "{at} is an HTTP server, not an AMQP broker (it answered a request line in HTTP, and the AMQP handshake not within {within}): is it the broker's AMQP port? ({PORTS}; 15672 is its management UI)"
                ),
                retry: false,
            };
        }
    }
    AttemptError {
        reason: format!(
            "{at} accepted the connection but did not answer the AMQP handshake within {within}: is it the broker's AMQP port? ({PORTS}; 15672 is its management UI)"
        ),
        retry: true,
    }
}

/// The ports RabbitMQ listens on, for messages about a wrong one.
const PORTS: &str = "RabbitMQ listens on 5672 for amqp://, 5671 for amqps://";

/// Why a connection attempt failed, and whether another attempt may do
/// better. Failures that no wait changes (a refused login or vhost, a port
/// that answers but not in AMQP 0-9-1, TLS against a port that does not
/// speak it, a certificate that is not trusted) fail at once.
fn classify(e: &lapin::Error, url: &AmqpUrl) -> AttemptError {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let fail = |reason: String| AttemptError {
        reason,
        retry: false,
    };
    let at = endpoint(url);
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            let said = mask_secret(amqp.get_message().as_str(), url);
            match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                    return fail(login_refused(url, &said))
                }
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                    return fail(vhost_refused(url, &said))
                }
                _ => {}
            }
        }
        lapin::ErrorKind::ParsingError(_) => {
            return fail(format!(
                "{at} answered, but not in AMQP 0-9-1 (an HTTP server, or another service?): is it the broker's AMQP port? ({PORTS}; 15672 is its management UI)"
            ))
        }
        lapin::ErrorKind::InvalidProtocolVersion(version) => {
            return fail(format!(
                "{at} speaks AMQP {version}, not AMQP 0-9-1: is it a RabbitMQ AMQP 0-9-1 port? ({PORTS})"
            ))
        }
        lapin::ErrorKind::IOError(io) => {
            if let Some(failure) = io_failure(io, url) {
                return failure;
            }
        }
        _ => {}
    }
    // Anything else, by the words of the error.
    let text = mask_secret(&e.to_string(), url);
    let upper = text.to_uppercase();
    if upper.contains("ACCESS_REFUSED")
        || upper.contains("ACCESS-REFUSED")
        || upper.contains("AUTHENTICATION")
    {
        return fail(login_refused(url, &text));
    }
    if upper.contains("NOT_ALLOWED") || upper.contains("VHOST") {
        return fail(format!("the broker refused the vhost: {text}"));
    }
    AttemptError {
        reason: text,
        retry: true,
    }
}

/// An I/O failure of a connection attempt, when there is more to say than
/// the system's words.
fn io_failure(io: &std::io::Error, url: &AmqpUrl) -> Option<AttemptError> {
    use std::io::ErrorKind;
    let detail = mask_secret(&io.to_string(), url);
    let at = endpoint(url);
    let parsed = url::Url::parse(url.expose()).ok()?;
    let tls = parsed.scheme() == "amqps";
    // rustls's words for a first answer that is no TLS record (RabbitMQ's
    // plain port answers a TLS hello with its AMQP protocol header).
    if tls && detail.contains("received corrupt message") {
        let plain = masked_with(url, |u| {
            let port = u.port().unwrap_or(5671);
            let _ = u.set_scheme("amqp");
            let _ = u.set_port(Some(port));
        });
        return Some(AttemptError {
            reason: format!(
                "{at} does not speak TLS ({detail}): use {plain} for this port, or amqps:// with the broker's TLS port (5671 by default)"
            ),
            retry: false,
        });
    }
    if tls && detail.contains("invalid peer certificate") {
        let trust = match &url.tls.ca {
            Some(ca) => format!(
                "with cacertfile, only the CAs in {ca} are trusted: one of them must have signed it"
            ),
            None => "if a private CA signed it, set SSL_CERT_FILE to that CA's PEM file (or add the CA to the system's trust store)".to_owned(),
        };
        return Some(AttemptError {
            reason: format!(
                "the TLS certificate of {at} is not accepted ({detail}): {trust}; the URL's host must be a name the certificate holds"
            ),
            retry: false,
        });
    }
    if tls && detail.contains("received fatal alert") {
        if let Some(reason) = refused_handshake(url, &at, &detail) {
            return Some(AttemptError {
                reason,
                retry: false,
            });
        }
    }
    let reason = match io.kind() {
        ErrorKind::ConnectionRefused => {
            let port = at.rsplit_once(':').map_or("", |(_, p)| p);
            let tls_note = if tls {
                "; a broker without TLS configured takes amqp:// only"
            } else {
                ""
            };
            format!(
                "nothing listens on {at} ({detail}): is the broker running, and is {port} its AMQP port? ({PORTS}{tls_note}; scripts/broker starts a local one)"
            )
        }
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof => {
            let advice = match asked_mechanism(&parsed) {
                Some(asked) if tls && asked.eq_ignore_ascii_case("external") => format!(
                    "the URL asks for auth_mechanism={asked}, which the broker refuses this way unless its auth_mechanisms setting offers EXTERNAL (rabbitmq-plugins enable rabbitmq_auth_mechanism_ssl, and EXTERNAL in auth_mechanisms in rabbitmq.conf); leave it out to log in with the URL's user and password"
                ),
                Some(asked) => format!(
                    "the URL asks for auth_mechanism={asked}, which the broker refuses this way unless its auth_mechanisms setting offers it; leave it out to log in with the URL's user and password"
                ),
                None if tls => "a broker that is starting or stopping does this; is it the broker's TLS port?".to_owned(),
                None => "a broker that is starting or stopping does this; a TLS port (5671) wants amqps://".to_owned(),
            };
            format!("{at} closed the connection during the handshake ({detail}): {advice}")
        }
        // std's words for a failed getaddrinfo, tcp-stream's for no address.
        _ if detail.contains("lookup address") || detail.contains("resolve host") => format!(
            "cannot resolve host {:?} ({detail}): check the host name in the URL",
            parsed.host_str().unwrap_or_default()
        ),
        _ => return None,
    };
    Some(AttemptError {
        reason,
        retry: true,
    })
}

/// A TLS handshake the server ended with an alert about the client's
/// certificate: none where it requires one (TLS 1.3 says so; TLS 1.2 only
/// says that the handshake failed), or one it does not accept.
fn refused_handshake(url: &AmqpUrl, at: &str, detail: &str) -> Option<String> {
    let alert = |names: &[&str]| {
        names
            .iter()
            .any(|name| detail.ends_with(&format!("alert: {name}")))
    };
    let add = "name one in the URL with certfile=/path/to/cert.pem&keyfile=/path/to/key.pem (a certificate signed by a CA that the broker trusts, and its private key)";
    match &url.tls.cert {
        None if alert(&["CertificateRequired"]) => Some(format!(
            "{at} requires a client certificate ({detail}): {add}"
        )),
        None if alert(&["HandshakeFailure"]) => Some(format!(
            "{at} refused the TLS handshake ({detail}): a broker that requires a client certificate (ssl_options.fail_if_no_peer_cert) does this: {add}; else it shares no TLS version or cipher with warren"
        )),
        Some(cert)
            if alert(&[
                "BadCertificate",
                "UnsupportedCertificate",
                "CertificateRevoked",
                "CertificateExpired",
                "CertificateUnknown",
                "UnknownCA",
                "AccessDenied",
                "DecryptError",
                "HandshakeFailure",
            ]) =>
        {
            Some(format!(
                "{at} did not accept the client certificate in certfile={cert} ({detail}): it must be signed by a CA that the broker trusts (its ssl_options.cacertfile), be valid now and allow client authentication"
            ))
        }
        _ => None,
    }
}

/// The `auth_mechanism` the URL asks for, unless it is one that RabbitMQ
/// offers out of the box (PLAIN, AMQPLAIN).
fn asked_mechanism(parsed: &url::Url) -> Option<String> {
    parsed
        .query_pairs()
        .find(|(k, _)| k == "auth_mechanism")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.eq_ignore_ascii_case("plain") && !v.eq_ignore_ascii_case("amqplain"))
}

/// A login the broker refused (ACCESS_REFUSED while logging in): a user that
/// does not exist or a wrong password; RabbitMQ says which only in its log.
///
/// With `auth_mechanism=external` the broker takes the user from the client
/// certificate, and refuses a connection without one, or a user it does not
/// have.
fn login_refused(url: &AmqpUrl, said: &str) -> String {
    let Some(user) = url.login() else {
        return match &url.tls.cert {
            Some(cert) => format!(
                "the broker refused the user of the client certificate in certfile={cert} ({said}): with auth_mechanism=external the user is the certificate's subject (its common name with the broker's ssl_cert_login_from = common_name), which must exist on the broker (rabbitmqctl add_user, then clear_password) with permissions on the vhost"
            ),
            None => format!(
                "the broker refused the login ({said}): auth_mechanism=external logs in with a client certificate, and the URL names none: use amqps:// with certfile=/path/to/cert.pem&keyfile=/path/to/key.pem"
            ),
        };
    };
    let mut reason = format!(
        "the broker refused user {user:?} ({said}): check the user name and password in the URL"
    );
    if user == "guest" && !is_loopback(&url.host()) {
        reason.push_str("; user \"guest\" may only log in from the broker's own host (its loopback_users setting): create a user of your own with rabbitmqctl add_user and set_permissions");
    }
    reason
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A vhost the broker refused to open (NOT_ALLOWED): one that does not
/// exist, a user without permissions on it, or a connection limit.
/// RabbitMQ's words tell them apart:
/// `vhost NAME not found`, `access to vhost 'NAME' refused for user 'USER'`
/// and the same followed by `: connection limit (N) is reached`, and
/// `Connection refused for user 'USER': user connection limit (N) is reached`.
fn vhost_refused(url: &AmqpUrl, said: &str) -> String {
    let vhost = lapin::uri::AMQPUri::from_str(url.expose())
        .map(|u| u.vhost)
        .unwrap_or_default();
    let user = url
        .login()
        .or_else(|| said_user(said))
        .unwrap_or_else(|| url.username());
    if said.contains("user connection limit") {
        format!("user {user:?} has no connections left ({said}): close some, or raise its max-connections (rabbitmqctl list_user_limits, set_user_limits)")
    } else if said.contains("connection limit") {
        format!("vhost {vhost:?} takes no more connections ({said}): close some, or raise its max-connections (rabbitmqctl list_vhost_limits, set_vhost_limits)")
    } else if said.contains("not found") && vhost.is_empty() {
        let slash = masked_with(url, |u| u.set_path("/%2f"));
        let bare = masked_with(url, |u| u.set_path(""));
        format!("the URL names the vhost \"\" ({said}): a path of only \"/\" is the empty vhost; for the default vhost \"/\" end the URL in /%2f ({slash}) or leave the path out ({bare})")
    } else if said.contains("not found") {
        format!("vhost {vhost:?} does not exist ({said}): create it with rabbitmqctl add_vhost {}, or name an existing one (rabbitmqctl list_vhosts) in the URL's path, where the default vhost \"/\" is written %2f", shell_word(&vhost))
    } else if said.contains("access to vhost") {
        format!("user {user:?} has no access to vhost {vhost:?} ({said}): grant it with rabbitmqctl set_permissions -p {} {} \".*\" \".*\" \".*\", or log in as a user that has it", shell_word(&vhost), shell_word(&user))
    } else {
        format!("the broker refused vhost {vhost:?} ({said})")
    }
}

/// The user RabbitMQ names in `... for user 'USER'` (with
/// `auth_mechanism=external` the URL does not say).
fn said_user(said: &str) -> Option<String> {
    let (_, rest) = said.split_once("for user '")?;
    let end = rest.rfind('\'')?;
    Some(rest[..end].to_owned())
}

/// A word a POSIX shell reads back as `s`: as it is when it holds nothing
/// the shell treats specially, else in single quotes.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./@%+=:,".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `host:port` the URL connects to, the port filled in from the scheme;
/// an IPv6 address in brackets.
fn endpoint(url: &AmqpUrl) -> String {
    match url::Url::parse(url.expose()) {
        Ok(u) => {
            let port = u
                .port()
                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 });
            format!("{}:{port}", u.host_str().unwrap_or_default())
        }
        Err(_) => url.host(),
    }
}

/// The URL, password masked, changed by `change`: the URL to use instead.
fn masked_with(url: &AmqpUrl, change: impl FnOnce(&mut url::Url)) -> String {
    match url::Url::parse(&url.redacted) {
        Ok(mut u) => {
            change(&mut u);
            u.to_string()
        }
        Err(_) => url.redacted.clone(),
    }
}

/// Masks the URL's password in `text`, as written in the URL and decoded.
/// A password that is also the user name is left: the URL shows the user
/// (`amqp://guest:***@`), and masking it would only hide who was refused.
fn mask_secret(text: &str, url: &AmqpUrl) -> String {
    let Ok(parsed) = url::Url::parse(url.expose()) else {
        return text.to_owned();
    };
    let Some(written) = parsed.password() else {
        return text.to_owned();
    };
    let decoded = lapin::uri::AMQPUri::from_str(url.expose())
        .map(|u| u.authority.userinfo)
        .ok();
    if decoded.as_ref().is_some_and(|i| i.password == i.username) {
        return text.to_owned();
    }
    let mut masked = text.to_owned();
    for secret in [Some(written.to_owned()), decoded.map(|i| i.password)]
        .into_iter()
        .flatten()
    {
        if secret.len() >= 3 {
            masked = masked.replace(&secret, "***");
        }
    }
    masked
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
                        // Take this very connection while still holding the
                        // lock: after the lock is released another task may
                        // already have replaced it, and closing that one would
                        // drop a healthy connection.
                        let mut current = current;
                        let stale = current.take();
                        self.unwatch();
                        drop(current);
                        if let Some(conn) = stale {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(2),
                                conn.close(320, "reconnecting".into()),
                            )
                            .await;
                        }
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

    /// Drops the connection of `generation` (as [`Broker::channel`] or
    /// [`Broker::generation`] gave it) so that the next [`Broker::channel`]
    /// reconnects, and says whether it did. A newer connection (another
    /// task sharing the broker already reconnected) is kept: closing it
    /// would drop the channels of everyone else on it.
    pub async fn invalidate(&self, generation: u64) -> bool {
        let mut current = self.current.lock().await;
        if self.generation() != generation {
            return false;
        }
        let Some(conn) = current.take() else {
            return false;
        };
        self.unwatch();
        drop(current);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(320, "reconnecting".into()),
        )
        .await;
        true
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
        assert_eq!(
            login("amqps://rabbit/%2f?auth_mechanism=external&certfile=/c.pem&keyfile=/k.pem"),
            None
        );
    }

    #[test]
    fn tls_files_are_for_amqps_only_and_certfile_goes_with_keyfile() {
        let reason = |raw: &str| match raw.parse::<AmqpUrl>() {
            Err(TopologyError::Url { reason, .. }) => reason,
            other => panic!("{raw}: {other:?}"),
        };
        for key in ["cacertfile", "certfile", "keyfile"] {
            assert_eq!(
                reason(&format!("amqp://bob:s3cret@rabbit/%2f?{key}=/etc/x.pem")),
                format!("{key}=/etc/x.pem: {key} is a TLS setting, and amqp:// has no TLS: use amqps:// with the broker's TLS port (5671 by default)")
            );
            assert_eq!(
                reason(&format!("amqps://bob:s3cret@rabbit/%2f?{key}=")),
                format!("{key} is empty: it takes the path of a PEM file")
            );
        }
        let base = "amqps://bob:s3cret@rabbit/%2f";
        assert_eq!(
            reason(&format!("{base}?certfile=/etc/c.pem")),
            "certfile=/etc/c.pem without keyfile: a client certificate needs its private key; add &keyfile=/path/to/key.pem"
        );
        assert_eq!(
            reason(&format!("{base}?cacertfile=/etc/ca.pem&keyfile=/etc/k.pem")),
            "keyfile=/etc/k.pem without certfile: a private key needs its client certificate; add &certfile=/path/to/cert.pem"
        );
        assert_eq!(
            reason(&format!("{base}?cacertfile=/a.pem&cacertfile=/b.pem")),
            "cacertfile is given twice (cacertfile=/a.pem and cacertfile=/b.pem): give it once"
        );
        let e = "amqp://bob:s3cret@rabbit/%2f?certfile=/c.pem&keyfile=/k.pem"
            .parse::<AmqpUrl>()
            .unwrap_err()
            .to_string();
        assert_eq!(e, "invalid AMQP URL amqp://bob:***@rabbit/%2f?certfile=/c.pem&keyfile=/k.pem: certfile=/c.pem: certfile is a TLS setting, and amqp:// has no TLS: use amqps:// with the broker's TLS port (5671 by default)");

        let tls = |raw: &str| raw.parse::<AmqpUrl>().unwrap().tls;
        assert_eq!(tls(base), TlsFiles::default());
        assert_eq!(
            tls(&format!("{base}?cacertfile=/etc/my%20ca.pem")),
            TlsFiles {
                ca: Some("/etc/my ca.pem".into()),
                ..TlsFiles::default()
            }
        );
        assert_eq!(
            tls(&format!(
                "{base}?certfile=c.pem&heartbeat=5&keyfile=k.pem&cacertfile=ca.pem"
            )),
            TlsFiles {
                ca: Some("ca.pem".into()),
                cert: Some("c.pem".into()),
                key: Some("k.pem".into()),
            }
        );
    }

    #[test]
    fn the_tls_files_are_shown_and_the_password_is_not() {
        let raw = "amqps://bob:s3cret@rabbit/%2f?cacertfile=/etc/warren/ca.pem&certfile=/etc/warren/client.pem&keyfile=/etc/warren/client.key&auth_mechanism=external";
        let shown = "amqps://bob:***@rabbit/%2f?cacertfile=/etc/warren/ca.pem&certfile=/etc/warren/client.pem&keyfile=/etc/warren/client.key&auth_mechanism=external";
        let u: AmqpUrl = raw.parse().unwrap();
        assert_eq!(u.to_string(), shown);
        assert_eq!(format!("{u:?}"), format!("AmqpUrl({shown})"));
        assert_eq!(redact(raw), shown);
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
    fn query_parameters_the_client_reads_are_checked_by_name() {
        let reason = |raw: &str| match raw.parse::<AmqpUrl>() {
            Err(TopologyError::Url { reason, .. }) => reason,
            other => panic!("{raw}: {other:?}"),
        };
        let base = "amqp://bob:s3cret@rabbit/%2f";
        assert_eq!(
            reason(&format!("{base}?heartbeat=70000")),
            "heartbeat=70000: heartbeat takes seconds, from 0 (none) to 65535"
        );
        for bad in ["10", "0", "4095", "4294967296", "abc"] {
            assert_eq!(
                reason(&format!("{base}?frame_max={bad}")),
                format!("frame_max={bad}: frame_max takes bytes, from 4096 (the AMQP minimum) to 4294967295; without it, 128 KiB")
            );
        }
        assert_eq!(
            reason(&format!("{base}?channel_max=-1")),
            "channel_max=-1: channel_max takes channels, from 0 to 65535"
        );
        assert_eq!(
            reason(&format!("{base}?connection_timeout=soon")),
            "connection_timeout=soon: connection_timeout takes milliseconds"
        );
        assert_eq!(
            reason(&format!("{base}?auth_mechanism=kerberos")),
            "auth_mechanism=kerberos: auth_mechanism takes plain, amqplain, external, anonymous or rabbit-cr-demo"
        );
        for good in [
            "?frame_max=4096&heartbeat=0&channel_max=65535",
            "?connection_timeout=18446744073709551615",
            "?auth_mechanism=EXTERNAL",
            "?something_else=1",
        ] {
            assert!(format!("{base}{good}").parse::<AmqpUrl>().is_ok(), "{good}");
        }
    }

    #[test]
    fn a_wrong_scheme_or_no_host_says_what_an_amqp_url_looks_like() {
        let e = "http://guest:s3cret@localhost:15672/"
            .parse::<AmqpUrl>()
            .unwrap_err()
            .to_string();
        assert_eq!(e, "invalid AMQP URL http://guest:***@localhost:15672/: scheme \"http\" is not amqp or amqps (an http:// URL is the management UI's, port 15672; AMQP listens on 5672); expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f)");
        for raw in ["amqp://", "amqp:///%2f"] {
            let e = raw.parse::<AmqpUrl>().unwrap_err().to_string();
            assert_eq!(e, format!("invalid AMQP URL {raw}: no host; expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f)"));
        }
    }

    #[test]
    fn a_fragment_is_refused_since_the_client_would_drop_it() {
        let e = "amqp://bob:s3cret@rabbit/team#a"
            .parse::<AmqpUrl>()
            .unwrap_err()
            .to_string();
        assert_eq!(e, "invalid AMQP URL amqp://bob:***@rabbit/team#a: the AMQP client drops what follows a '#' (a URL fragment): write a '#' in the vhost as %23");
        assert!("amqp://bob:s3cret@rabbit/team%23a"
            .parse::<AmqpUrl>()
            .is_ok());
    }

    #[test]
    fn a_url_that_does_not_parse_says_how_to_encode_special_characters() {
        // A '/' or '#' in the password ends the authority: "pa" becomes the
        // port.
        for (raw, shown) in [
            ("amqp://bob:pa/ss@rabbit/%2f", "amqp://bob:***@rabbit/%2f"),
            ("amqp://bob:pa#ss@rabbit/%2f", "amqp://bob:***@rabbit/%2f"),
        ] {
            let e = raw.parse::<AmqpUrl>().unwrap_err().to_string();
            assert_eq!(e, format!("invalid AMQP URL {shown}: invalid port number (a '/', '?' or '#' in the password ends the host part: write them as %2F, %3F, %23, and '@' as %40); expected amqp://user:password@host:port/vhost (vhost \"/\" is %2f)"));
        }
        // A real port that is not a number gets no such advice.
        let e = "amqp://bob:pw@rabbit:56x2/%2f"
            .parse::<AmqpUrl>()
            .unwrap_err()
            .to_string();
        assert!(!e.contains("%2F"), "{e}");
    }

    #[test]
    fn shell_words_read_back_as_the_name() {
        assert_eq!(shell_word("/"), "/");
        assert_eq!(shell_word("svc@team.prod"), "svc@team.prod");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("$HOME;rm"), "'$HOME;rm'");
    }

    #[test]
    fn the_password_is_masked_as_written_and_decoded_unless_it_is_the_user_name() {
        let url: AmqpUrl = "amqp://bob:p%40ssw0rd@rabbit/%2f".parse().unwrap();
        assert_eq!(
            mask_secret("a p@ssw0rd and a p%40ssw0rd", &url),
            "a *** and a ***"
        );
        let url: AmqpUrl = "amqp://guest:guest@rabbit/%2f".parse().unwrap();
        assert_eq!(
            mask_secret("refused for user 'guest'", &url),
            "refused for user 'guest'"
        );
    }

    fn amqp_error(kind: lapin::protocol::AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn a_refused_guest_away_from_the_broker_is_told_about_loopback_users() {
        use lapin::protocol::AMQPSoftError;
        let said = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.";
        let e = amqp_error(AMQPSoftError::ACCESSREFUSED.into(), said);
        let remote: AmqpUrl = "amqp://guest:guest@rabbit.example.com/%2f".parse().unwrap();
        let a = classify(&e, &remote);
        assert!(!a.retry);
        assert_eq!(a.reason, format!("the broker refused user \"guest\" ({said}): check the user name and password in the URL; user \"guest\" may only log in from the broker's own host (its loopback_users setting): create a user of your own with rabbitmqctl add_user and set_permissions"));
        for local in [
            "amqp://guest:x@localhost/%2f",
            "amqp://guest:x@127.0.0.1/%2f",
            "amqp://guest:x@[::1]/%2f",
        ] {
            let a = classify(&e, &local.parse().unwrap());
            assert!(
                !a.reason.contains("loopback_users"),
                "{local}: {}",
                a.reason
            );
        }
    }

    #[test]
    fn refused_vhosts_are_told_apart_by_the_broker_words() {
        use lapin::protocol::AMQPHardError;
        let refused = |raw: &str, said: &str| {
            let a = classify(
                &amqp_error(AMQPHardError::NOTALLOWED.into(), said),
                &raw.parse().unwrap(),
            );
            assert!(!a.retry, "{}", a.reason);
            a.reason
        };
        let said =
            "NOT_ALLOWED - Connection refused for user 'bob': user connection limit (2) is reached";
        assert_eq!(
            refused("amqp://bob:pw1@rabbit/%2f", said),
            format!("user \"bob\" has no connections left ({said}): close some, or raise its max-connections (rabbitmqctl list_user_limits, set_user_limits)")
        );
        // With a client certificate the broker names the user.
        let said = "NOT_ALLOWED - access to vhost 'prod' refused for user 'CN=svc,O=team'";
        assert_eq!(
            refused("amqps://rabbit/prod?auth_mechanism=external", said),
            format!("user \"CN=svc,O=team\" has no access to vhost \"prod\" ({said}): grant it with rabbitmqctl set_permissions -p prod CN=svc,O=team \".*\" \".*\" \".*\", or log in as a user that has it")
        );
        let said = "NOT_ALLOWED - something new";
        assert_eq!(
            refused("amqp://bob:pw1@rabbit/a%2fb", said),
            format!("the broker refused vhost \"a/b\" ({said})")
        );
    }

    #[test]
    fn certificate_and_name_failures_say_what_to_check() {
        let io = |text: &str| -> lapin::Error {
            std::io::Error::new(std::io::ErrorKind::InvalidData, text.to_owned()).into()
        };
        let tls: AmqpUrl = "amqps://bob:pw1@rabbit.example.com/%2f".parse().unwrap();
        let a = classify(&io("invalid peer certificate: NotValidForName"), &tls);
        assert!(!a.retry);
        assert_eq!(a.reason, "the TLS certificate of rabbit.example.com:5671 is not accepted (invalid peer certificate: NotValidForName): if a private CA signed it, set SSL_CERT_FILE to that CA's PEM file (or add the CA to the system's trust store); the URL's host must be a name the certificate holds");
        let a = classify(
            &io("failed to lookup address information: Temporary failure in name resolution"),
            &"amqp://bob:pw1@[::1]:5673/%2f".parse().unwrap(),
        );
        assert!(a.retry, "a name server that is away may come back");
        assert_eq!(a.reason, "cannot resolve host \"[::1]\" (failed to lookup address information: Temporary failure in name resolution): check the host name in the URL");
        assert_eq!(endpoint(&tls), "rabbit.example.com:5671");
        // With cacertfile, its CAs are the only ones trusted.
        let own: AmqpUrl = "amqps://bob:pw1@rabbit.example.com/%2f?cacertfile=/etc/ca.pem"
            .parse()
            .unwrap();
        let a = classify(&io("invalid peer certificate: UnknownIssuer"), &own);
        assert!(!a.retry);
        assert_eq!(a.reason, "the TLS certificate of rabbit.example.com:5671 is not accepted (invalid peer certificate: UnknownIssuer): with cacertfile, only the CAs in /etc/ca.pem are trusted: one of them must have signed it; the URL's host must be a name the certificate holds");
        assert_eq!(endpoint(&"amqp://[::1]/%2f".parse().unwrap()), "[::1]:5672");
    }

    #[test]
    fn a_refused_external_login_is_about_the_client_certificate() {
        use lapin::protocol::AMQPSoftError;
        let said = "ACCESS_REFUSED - Login was refused using authentication mechanism EXTERNAL. For details see the broker logfile.";
        let e = amqp_error(AMQPSoftError::ACCESSREFUSED.into(), said);
        let with =
            "amqps://rabbit/%2f?auth_mechanism=external&certfile=/etc/c.pem&keyfile=/etc/k.pem";
        let a = classify(&e, &with.parse().unwrap());
        assert!(!a.retry);
        assert_eq!(a.reason, format!("the broker refused the user of the client certificate in certfile=/etc/c.pem ({said}): with auth_mechanism=external the user is the certificate's subject (its common name with the broker's ssl_cert_login_from = common_name), which must exist on the broker (rabbitmqctl add_user, then clear_password) with permissions on the vhost"));
        for without in [
            "amqps://rabbit/%2f?auth_mechanism=external",
            "amqp://rabbit/%2f?auth_mechanism=EXTERNAL",
        ] {
            let a = classify(&e, &without.parse().unwrap());
            assert_eq!(a.reason, format!("the broker refused the login ({said}): auth_mechanism=external logs in with a client certificate, and the URL names none: use amqps:// with certfile=/path/to/cert.pem&keyfile=/path/to/key.pem"), "{without}");
        }
        // A broker that does not offer EXTERNAL closes the connection.
        let reset: lapin::Error = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "Connection reset by peer",
        )
        .into();
        let a = classify(&reset, &with.parse().unwrap());
        assert_eq!(a.reason, "rabbit:5671 closed the connection during the handshake (Connection reset by peer): the URL asks for auth_mechanism=external, which the broker refuses this way unless its auth_mechanisms setting offers EXTERNAL (rabbitmq-plugins enable rabbitmq_auth_mechanism_ssl, and EXTERNAL in auth_mechanisms in rabbitmq.conf); leave it out to log in with the URL's user and password");
    }

    #[test]
    fn connection_name_names_component_and_host() {
        let o = ConnectOptions::new(AmqpUrl::default(), "producer");
        assert!(o.connection_name().starts_with("warren-producer@"));
    }
}
