//! TLS with the URL's own files (RabbitMQ's `cacertfile`, `certfile` and
//! `keyfile` query parameters), on real TLS handshakes with
//! `openssl s_server` and certificates that each test makes with `openssl`:
//! a client certificate reaches a server that requires one, a private CA is
//! trusted through `cacertfile` (instead of the system's CAs), and files that
//! are missing or do not fit fail at once, naming the parameter and the path.
//!
//! `s_server` is not a broker: once the TLS handshake is done it echoes what
//! it received (the AMQP protocol header) and answers with what the test
//! gives it, an HTTP error, so the AMQP handshake then fails as it does on
//! any port that is not a broker's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use warren_testkit::unique;
use warren_topology::{connect, AmqpUrl, ConnectOptions};

/// The AMQP 0-9-1 protocol header, the first bytes a client sends.
const AMQP_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

/// What `s_server` answers once the TLS handshake is done.
const HTTP_400: &[u8] = b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n";

const NOT_AMQP: &str = "answered, but not in AMQP 0-9-1 (an HTTP server, or another service?): is it the broker's AMQP port? (RabbitMQ listens on 5672 for amqp://, 5671 for amqps://; 15672 is its management UI)";

/// Certificates made for one test in a directory of its own, removed when
/// dropped: a CA; a server certificate it signed for localhost and
/// 127.0.0.1; a client certificate it signed, with its key as PKCS#8
/// (`client.key`), PKCS#1 (`client-rsa.key`) and encrypted
/// (`client-encrypted.key`); and another CA with a client certificate of its
/// own (`other-ca.pem`, `other-client.pem`, `other-client.key`).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(unique("warren-test-tls-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        let pki = Pki { dir };
        pki.ca("ca");
        pki.ca("other-ca");
        pki.signed("server", "ca", "/CN=localhost", "server.ext");
        pki.signed("client", "ca", "/CN=warren-client", "client.ext");
        pki.signed("other-client", "other-ca", "/CN=other-client", "client.ext");
        pki.openssl(&[
            "rsa",
            "-in",
            "client.key",
            "-traditional",
            "-out",
            "client-rsa.key",
        ]);
        pki.openssl(&[
            "pkey",
            "-in",
            "client.key",
            "-aes256",
            "-passout",
            "pass:warren-test",
            "-out",
            "client-encrypted.key",
        ]);
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    }

    /// A self-signed CA, `NAME.pem` and `NAME.key`.
    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-subj",
            &format!("/CN=warren-test-{name}"),
        ]);
    }

    /// A certificate `NAME.pem` (RSA key `NAME.key`) that `ca` signed.
    fn signed(&self, name: &str, ca: &str, subject: &str, extensions: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            "1",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-extfile",
            extensions,
        ]);
    }

    /// The path of one of its files.
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `s_server` options that require a client certificate signed by the
/// [`Pki`]'s CA.
const REQUIRE_CLIENT_CERT: &[&str] = &["-CAfile", "ca.pem", "-Verify", "1", "-verify_return_error"];

/// `openssl s_server` with the server certificate of a [`Pki`], killed when
/// dropped. What it prints and receives goes to a file; what the test writes
/// to its standard input it sends to the next client that completes a
/// handshake. No connection is made to see whether it listens (it would be
/// a client that could take that answer): it prints `ACCEPT` once it does.
struct TlsServer {
    port: u16,
    child: Child,
    stdin: ChildStdin,
    received: PathBuf,
}

impl TlsServer {
    /// `args` are more `s_server` options, such as [`REQUIRE_CLIENT_CERT`].
    fn start(pki: &Pki, args: &[&str]) -> TlsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let received = pki.dir.join(unique("received-"));
        let mut command = Command::new("openssl");
        command
            .args(["s_server", "-cert", "server.pem", "-key", "server.key"])
            .arg("-accept")
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(&pki.dir)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&received).unwrap())
            .stderr(Stdio::null())
            .args(args);
        let mut child = command.spawn().expect("openssl s_server starts");
        let stdin = child.stdin.take().unwrap();
        let server = TlsServer {
            port,
            child,
            stdin,
            received,
        };
        assert!(server.has_received(b"ACCEPT\n"), "openssl s_server listens");
        server
    }

    /// Has the next client that completes a handshake answered with `reply`.
    fn answer_next(&mut self, reply: &[u8]) {
        self.stdin.write_all(reply).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits (up to 5 s) until it has received or printed `bytes`.
    fn has_received(&self, bytes: &[u8]) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = std::fs::read(&self.received).unwrap_or_default();
            if got.windows(bytes.len()).any(|w| w == bytes) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many times it has received the AMQP protocol header so far.
    fn headers_received(&self) -> usize {
        let got = std::fs::read(&self.received).unwrap_or_default();
        got.windows(AMQP_HEADER.len())
            .filter(|w| *w == AMQP_HEADER)
            .count()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a path for a URL's query.
fn encoded(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `amqps://guest:Sekr1tPw@127.0.0.1:PORT/%2f` with the given TLS files
/// (`(parameter, path)`).
fn url(port: u16, files: &[(&str, String)]) -> String {
    let query: Vec<String> = files
        .iter()
        .map(|(k, path)| format!("{k}={}", encoded(path)))
        .collect();
    let mut raw = format!("amqps://guest:Sekr1tPw@127.0.0.1:{port}/%2f");
    if !query.is_empty() {
        raw.push('?');
        raw.push_str(&query.join("&"));
    }
    raw
}

/// Options that make a retry visible: eight attempts, at least 2 s apart.
fn options(raw: &str) -> ConnectOptions {
    let url: AmqpUrl = raw.parse().unwrap();
    ConnectOptions::new(url, "test").backoff(Duration::from_secs(2), Duration::from_secs(2))
}

/// Connects to `raw` and expects a failure that is not retried: it comes
/// back well before the first 2 s backoff would end. The password is not in
/// it.
async fn fails_at_once(raw: &str) -> String {
    let started = Instant::now();
    let err = connect(&options(raw)).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(!err.is_transient(), "{err}");
    assert!(
        elapsed < Duration::from_millis(1500),
        "retried ({elapsed:?}): {err}"
    );
    let err = err.to_string();
    assert!(!err.contains("Sekr1tPw"), "{err}");
    err
}

/// The URL as errors show it: password masked, the rest as written.
fn shown(raw: &str) -> String {
    raw.replace("Sekr1tPw", "***")
}

/// A server that requires a client certificate completes the TLS handshake
/// with the one of `certfile` and `keyfile` (the key as PKCS#8 or as PKCS#1),
/// then receives the AMQP protocol header; the error is then the one of a
/// port that is not an AMQP broker, not a TLS one.
#[tokio::test]
async fn a_client_certificate_from_the_url_completes_the_handshake_with_a_server_that_requires_one()
{
    let pki = Pki::new();
    for key in ["client.key", "client-rsa.key"] {
        // One server per connection: s_server serves one at a time, and
        // may still be on the last one when the next comes.
        let mut server = TlsServer::start(&pki, REQUIRE_CLIENT_CERT);
        let port = server.port;
        let raw = url(
            port,
            &[
                ("cacertfile", pki.path("ca.pem")),
                ("certfile", pki.path("client.pem")),
                ("keyfile", pki.path(key)),
            ],
        );
        server.answer_next(HTTP_400);
        let err = fails_at_once(&raw).await;
        assert_eq!(
            err,
            format!(
                "cannot connect to {}: 127.0.0.1:{port} {NOT_AMQP}",
                shown(&raw)
            )
        );
        assert!(server.has_received(AMQP_HEADER), "{key}");
    }
}

/// The same server without a client certificate: it refuses the handshake,
/// which no retry changes, and the error says to set `certfile` and
/// `keyfile`. In TLS 1.2 the server says only that the handshake failed,
/// and the error says what else that may be.
#[tokio::test]
async fn without_a_client_certificate_a_server_that_requires_one_refuses_and_the_error_names_the_parameters(
) {
    let pki = Pki::new();
    let server = TlsServer::start(&pki, REQUIRE_CLIENT_CERT);
    let port = server.port;
    let raw = url(port, &[("cacertfile", pki.path("ca.pem"))]);
    let err = fails_at_once(&raw).await;
    assert_eq!(
        err,
        format!("cannot connect to {}: 127.0.0.1:{port} requires a client certificate (received fatal alert: CertificateRequired): name one in the URL with certfile=/path/to/cert.pem&keyfile=/path/to/key.pem (a certificate signed by a CA that the broker trusts, and its private key)", shown(&raw))
    );
    assert_eq!(server.headers_received(), 0);

    let tls12 = [REQUIRE_CLIENT_CERT, &["-tls1_2"]].concat();
    let server = TlsServer::start(&pki, &tls12);
    let port = server.port;
    let raw = url(port, &[("cacertfile", pki.path("ca.pem"))]);
    let err = fails_at_once(&raw).await;
    assert_eq!(
        err,
        format!("cannot connect to {}: 127.0.0.1:{port} refused the TLS handshake (received fatal alert: HandshakeFailure): a broker that requires a client certificate (ssl_options.fail_if_no_peer_cert) does this: name one in the URL with certfile=/path/to/cert.pem&keyfile=/path/to/key.pem (a certificate signed by a CA that the broker trusts, and its private key); else it shares no TLS version or cipher with warren", shown(&raw))
    );
    assert_eq!(server.headers_received(), 0);
}

/// A client certificate that another CA signed: the server refuses it, and
/// the error names the file.
#[tokio::test]
async fn a_client_certificate_the_server_does_not_trust_is_named() {
    let pki = Pki::new();
    let server = TlsServer::start(&pki, REQUIRE_CLIENT_CERT);
    let port = server.port;
    let raw = url(
        port,
        &[
            ("cacertfile", pki.path("ca.pem")),
            ("certfile", pki.path("other-client.pem")),
            ("keyfile", pki.path("other-client.key")),
        ],
    );
    let err = fails_at_once(&raw).await;
    assert_eq!(
        err,
        format!("cannot connect to {}: 127.0.0.1:{port} did not accept the client certificate in certfile={} (received fatal alert: UnknownCA): it must be signed by a CA that the broker trusts (its ssl_options.cacertfile), be valid now and allow client authentication", shown(&raw), pki.path("other-client.pem"))
    );
    assert_eq!(server.headers_received(), 0);
}

/// A server certificate of a private CA: not trusted without `cacertfile`;
/// trusted with it.
#[tokio::test]
async fn cacertfile_makes_the_certificate_of_a_private_ca_trusted() {
    let pki = Pki::new();
    let server = TlsServer::start(&pki, &[]);
    let port = server.port;
    let bare = url(port, &[]);
    let err = fails_at_once(&bare).await;
    assert_eq!(
        err,
        format!("cannot connect to {}: the TLS certificate of 127.0.0.1:{port} is not accepted (invalid peer certificate: UnknownIssuer): if a private CA signed it, set SSL_CERT_FILE to that CA's PEM file (or add the CA to the system's trust store); the URL's host must be a name the certificate holds", shown(&bare))
    );
    assert_eq!(server.headers_received(), 0);

    let mut server = TlsServer::start(&pki, &[]);
    let port = server.port;
    let raw = url(port, &[("cacertfile", pki.path("ca.pem"))]);
    server.answer_next(HTTP_400);
    let err = fails_at_once(&raw).await;
    assert_eq!(
        err,
        format!(
            "cannot connect to {}: 127.0.0.1:{port} {NOT_AMQP}",
            shown(&raw)
        )
    );
    assert!(server.has_received(AMQP_HEADER));
}

/// With `cacertfile`, its CAs are the only ones trusted, as with the
/// Erlang, Java, Go and Python clients: a server certificate that the
/// system's CAs would take is refused when `cacertfile` names another CA.
///
/// The system's CAs here are the test CA: rustls reads them from
/// `SSL_CERT_FILE`, which is set for a run of this test binary of its own
/// (the other tests, running meanwhile, must not trust that CA), where
/// [`system_trust`] connects.
#[tokio::test]
async fn cacertfile_replaces_the_systems_cas() {
    let pki = Pki::new();
    let mut trusted = TlsServer::start(&pki, &[]);
    trusted.answer_next(HTTP_400);
    let other = TlsServer::start(&pki, &[]);
    let run = Command::new(std::env::current_exe().unwrap())
        .args(["system_trust", "--exact", "--ignored", "--nocapture"])
        .env("SSL_CERT_FILE", pki.path("ca.pem"))
        .env("WARREN_TEST_TRUSTED_PORT", trusted.port.to_string())
        .env("WARREN_TEST_OTHER_PORT", other.port.to_string())
        .env("WARREN_TEST_OTHER_CA", pki.path("other-ca.pem"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{run:?}"
    );
    assert!(trusted.has_received(AMQP_HEADER));
    assert_eq!(other.headers_received(), 0);
}

/// The half of [`cacertfile_replaces_the_systems_cas`] that runs with
/// `SSL_CERT_FILE` set to the test CA: without `cacertfile`, the server is
/// trusted (through the "system's" CAs); with `cacertfile` naming another
/// CA, it is not.
#[tokio::test]
#[ignore = "run by cacertfile_replaces_the_systems_cas, with SSL_CERT_FILE set"]
async fn system_trust() {
    let var = |name: &str| {
        std::env::var(name)
            .unwrap_or_else(|_| panic!("{name}: run through cacertfile_replaces_the_systems_cas"))
    };
    let port: u16 = var("WARREN_TEST_TRUSTED_PORT").parse().unwrap();
    let raw = url(port, &[]);
    let err = fails_at_once(&raw).await;
    assert_eq!(
        err,
        format!(
            "cannot connect to {}: 127.0.0.1:{port} {NOT_AMQP}",
            shown(&raw)
        )
    );
    let port: u16 = var("WARREN_TEST_OTHER_PORT").parse().unwrap();
    let other_ca = var("WARREN_TEST_OTHER_CA");
    let raw = url(port, &[("cacertfile", other_ca.clone())]);
    let err = fails_at_once(&raw).await;
    assert_eq!(
        err,
        format!("cannot connect to {}: the TLS certificate of 127.0.0.1:{port} is not accepted (invalid peer certificate: UnknownIssuer): with cacertfile, only the CAs in {other_ca} are trusted: one of them must have signed it; the URL's host must be a name the certificate holds", shown(&raw))
    );
}

/// Files that are missing, unreadable or do not fit fail before connecting
/// (the port here has nothing listening, which would be retried) and at
/// once, naming the parameter and the path, never what a key file holds.
#[tokio::test]
async fn tls_files_that_cannot_be_used_fail_at_once_naming_the_parameter_and_the_path() {
    let pki = Pki::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let missing = pki.path("missing.pem");
    // PEM sections that hold no certificate or key.
    let not_der = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
    std::fs::write(pki.path("bad-ca.pem"), not_der("CERTIFICATE")).unwrap();
    std::fs::write(pki.path("bad.key"), not_der("PRIVATE KEY")).unwrap();
    let dir = pki.dir.to_str().unwrap().to_owned();
    let key_text = std::fs::read_to_string(pki.path("client.key")).unwrap();
    let key_line = key_text.lines().nth(1).unwrap().to_owned();
    let client = |cert: &str, key: &str| {
        url(
            port,
            &[("certfile", pki.path(cert)), ("keyfile", pki.path(key))],
        )
    };
    for (raw, reason) in [
        (
            url(port, &[("cacertfile", missing.clone())]),
            format!("cannot read cacertfile={missing} (No such file or directory (os error 2))"),
        ),
        (
            url(port, &[("cacertfile", dir.clone())]),
            format!("cannot read cacertfile={dir} (Is a directory (os error 21))"),
        ),
        (
            url(port, &[("cacertfile", pki.path("client.key"))]),
            format!(
                "cacertfile={} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                pki.path("client.key")
            ),
        ),
        (
            url(port, &[("cacertfile", pki.path("bad-ca.pem"))]),
            format!(
                "cacertfile={}: none of its certificates can be a CA (Could not load any valid certificates)",
                pki.path("bad-ca.pem")
            ),
        ),
        (
            client("missing.pem", "client.key"),
            format!("cannot read certfile={missing} (No such file or directory (os error 2))"),
        ),
        (
            client("client.pem", "missing.pem"),
            format!("cannot read keyfile={missing} (No such file or directory (os error 2))"),
        ),
        (
            client("client.key", "client.key"),
            format!(
                "certfile={} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                pki.path("client.key")
            ),
        ),
        (
            client("client.pem", "client.pem"),
            format!(
                "keyfile={} holds no PEM private key (-----BEGIN PRIVATE KEY-----, or RSA PRIVATE KEY, or EC PRIVATE KEY)",
                pki.path("client.pem")
            ),
        ),
        (
            client("client.pem", "bad.key"),
            format!(
                "keyfile={} holds a private key that cannot be read (unexpected error: failed to parse private key as RSA, ECDSA, or EdDSA): warren takes RSA, ECDSA (P-256, P-384) and Ed25519 keys",
                pki.path("bad.key")
            ),
        ),
        (
            client("client.pem", "other-client.key"),
            format!(
                "keyfile={} is not the private key of the certificate in certfile={} (the first one in the file)",
                pki.path("other-client.key"),
                pki.path("client.pem")
            ),
        ),
        (
            client("client.pem", "client-encrypted.key"),
            format!(
                "keyfile={} is encrypted (it has a passphrase), which warren cannot use: write it unencrypted with openssl pkey -in ENCRYPTED.pem -out KEY.pem, readable only by warren's user",
                pki.path("client-encrypted.key")
            ),
        ),
    ] {
        let err = fails_at_once(&raw).await;
        assert_eq!(err, format!("cannot connect to {}: {reason}", shown(&raw)));
        assert!(!err.contains(&key_line), "{err}");
    }
}
