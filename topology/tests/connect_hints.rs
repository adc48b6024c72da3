//! Connection failures a new user meets, on real connections: the exact text
//! they see (what went wrong and what to do), and that a failure that cannot
//! pass by waiting fails at once instead of being retried.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_testkit::{rabbitmqctl, unique, TempUser};
use warren_topology::{connect, AmqpUrl, ConnectOptions, TopologyError};

/// The test broker's `host:port`.
fn broker() -> String {
    let base = url::Url::parse(warren_testkit::url().expose()).unwrap();
    format!(
        "{}:{}",
        base.host_str().unwrap(),
        base.port().unwrap_or(5672)
    )
}

/// Options that make a retry visible: eight attempts, at least 2 s apart.
fn options(raw: &str) -> ConnectOptions {
    let url: AmqpUrl = raw.parse().unwrap();
    ConnectOptions::new(url, "test").backoff(Duration::from_secs(2), Duration::from_secs(2))
}

/// Connects to `raw` and expects a failure that is not retried: it comes
/// back well before the first 2 s backoff would end.
async fn fails_at_once(raw: &str) -> String {
    let started = Instant::now();
    let err = connect(&options(raw)).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(!err.is_transient(), "{err}");
    assert!(
        elapsed < Duration::from_millis(1500),
        "retried ({elapsed:?}): {err}"
    );
    err.to_string()
}

/// Connects once to `raw` and expects a failure that a retry may cure.
async fn fails_transiently(raw: &str) -> String {
    let err = connect(&options(raw).attempts(1)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(matches!(err, TopologyError::Connect { .. }), "{err:?}");
    err.to_string()
}

/// A vhost of the test's own, deleted when dropped.
struct TempVhost(String);

impl TempVhost {
    fn create(name: String) -> TempVhost {
        rabbitmqctl(&["add_vhost", &name]);
        TempVhost(name)
    }
}

impl Drop for TempVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

/// `user`'s URL with another path.
fn as_user(user: &TempUser, path: &str) -> String {
    let mut u = url::Url::parse(user.url().expose()).unwrap();
    u.set_path(path);
    u.to_string()
}

/// Percent-encodes a vhost for a URL's path.
fn encoded(vhost: &str) -> String {
    vhost
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A TCP server on `addr` that answers every connection with `reply` once it
/// has read the client's first bytes (`until_line`: a whole line, as an HTTP
/// server such as `python3 -m http.server` does); counts the connections.
async fn answering(addr: &str, reply: &'static [u8], until_line: bool) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut chunk = [0u8; 64];
                while let Ok(n @ 1..) = socket.read(&mut chunk).await {
                    read.extend_from_slice(&chunk[..n]);
                    if !until_line || read.contains(&b'\n') {
                        let _ = socket.write_all(reply).await;
                        break;
                    }
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    (port, accepted)
}

const HTTP_400: &[u8] =
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\n";

const NOT_AMQP: &str = "answered, but not in AMQP 0-9-1 (an HTTP server, or another service?): is it the broker's AMQP port? (RabbitMQ listens on 5672 for amqp://, 5671 for amqps://; 15672 is its management UI)";

/// `amqp://host:5672/` names the vhost "" (the path after the first '/'),
/// which no broker has: the error says how "/" is written, and both ways it
/// offers do connect.
#[tokio::test]
async fn a_url_ending_in_a_slash_names_the_empty_vhost_and_the_error_says_how_to_write_the_default()
{
    let hp = broker();
    let err = fails_at_once(&format!("amqp://guest:guest@{hp}/")).await;
    assert_eq!(
        err,
        format!("cannot connect to amqp://guest:***@{hp}/: the URL names the vhost \"\" (NOT_ALLOWED - vhost  not found): a path of only \"/\" is the empty vhost; for the default vhost \"/\" end the URL in /%2f (amqp://guest:***@{hp}/%2f) or leave the path out (amqp://guest:***@{hp})")
    );
    for fixed in [
        format!("amqp://guest:guest@{hp}/%2f"),
        format!("amqp://guest:guest@{hp}"),
    ] {
        let conn = connect(&options(&fixed).attempts(1))
            .await
            .unwrap_or_else(|e| panic!("{fixed}: {e}"));
        warren_topology::close(&conn, "done").await;
    }
}

/// A vhost that does not exist: create it, or name one that does.
#[tokio::test]
async fn a_vhost_that_does_not_exist_is_named_with_how_to_create_it() {
    let hp = broker();
    let vhost = unique("warren-test-vhost-");
    let err = fails_at_once(&format!("amqp://guest:guest@{hp}/{vhost}")).await;
    assert_eq!(
        err,
        format!("cannot connect to amqp://guest:***@{hp}/{vhost}: vhost \"{vhost}\" does not exist (NOT_ALLOWED - vhost {vhost} not found): create it with rabbitmqctl add_vhost {vhost}, or name an existing one (rabbitmqctl list_vhosts) in the URL's path, where the default vhost \"/\" is written %2f")
    );
}

/// A user with no permissions on "/": the error says so (not "wrong
/// password") and gives the command that grants them.
#[tokio::test]
async fn a_user_without_permissions_on_the_vhost_gets_the_command_that_grants_them() {
    let hp = broker();
    let user = TempUser::create();
    rabbitmqctl(&["clear_permissions", "-p", "/", &user.name]);
    let raw = as_user(&user, "/%2f");
    let password = url::Url::parse(&raw)
        .unwrap()
        .password()
        .unwrap()
        .to_owned();
    let err = fails_at_once(&raw).await;
    let name = &user.name;
    assert_eq!(
        err,
        format!("cannot connect to amqp://{name}:***@{hp}/%2f: user \"{name}\" has no access to vhost \"/\" (NOT_ALLOWED - access to vhost '/' refused for user '{name}'): grant it with rabbitmqctl set_permissions -p / {name} \".*\" \".*\" \".*\", or log in as a user that has it")
    );
    assert!(!err.contains(&password), "{err}");
}

/// A vhost whose name needs quoting in a shell and encoding in a URL: the
/// command the error gives, run as it is, grants the access.
#[tokio::test]
async fn the_permission_command_works_as_given_for_a_vhost_with_special_characters() {
    let hp = broker();
    let vhost = TempVhost::create(format!("{} a/b'c", unique("warren-test-vhost-")));
    let user = TempUser::create();
    let raw = as_user(&user, &format!("/{}", encoded(&vhost.0)));
    let err = fails_at_once(&raw).await;
    let (name, v) = (&user.name, &vhost.0);
    let quoted = format!("'{}'", v.replace('\'', r"'\''"));
    let command = format!("rabbitmqctl set_permissions -p {quoted} {name} \".*\" \".*\" \".*\"");
    assert_eq!(
        err,
        format!("cannot connect to amqp://{name}:***@{hp}/{}: user \"{name}\" has no access to vhost \"{v}\" (NOT_ALLOWED - access to vhost '{v}' refused for user '{name}'): grant it with {command}, or log in as a user that has it", encoded(v))
    );
    let ran = Command::new("sh").args(["-c", &command]).output().unwrap();
    assert!(ran.status.success(), "{command}: {ran:?}");
    let conn = connect(&options(&raw).attempts(1))
        .await
        .unwrap_or_else(|e| panic!("after {command}: {e}"));
    warren_topology::close(&conn, "done").await;
}

/// A wrong password is refused at login (ACCESS_REFUSED), which is not a
/// missing permission: the error says to check the user and password.
#[tokio::test]
async fn a_wrong_password_is_told_apart_from_a_missing_permission() {
    let hp = broker();
    let user = TempUser::create();
    let name = &user.name;
    let err = fails_at_once(&format!("amqp://{name}:Wr0ng-pw-4711@{hp}/%2f")).await;
    assert_eq!(
        err,
        format!("cannot connect to amqp://{name}:***@{hp}/%2f: the broker refused user \"{name}\" (ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.): check the user name and password in the URL")
    );
}

/// A vhost that allows no more connections is named as such, not as a
/// missing permission.
#[tokio::test]
async fn a_vhost_at_its_connection_limit_is_named_as_such() {
    let hp = broker();
    let vhost = TempVhost::create(unique("warren-test-vhost-"));
    rabbitmqctl(&["set_permissions", "-p", &vhost.0, "guest", ".*", ".*", ".*"]);
    rabbitmqctl(&[
        "set_vhost_limits",
        "-p",
        &vhost.0,
        r#"{"max-connections": 0}"#,
    ]);
    let v = &vhost.0;
    let err = fails_at_once(&format!("amqp://guest:guest@{hp}/{v}")).await;
    assert_eq!(
        err,
        format!("cannot connect to amqp://guest:***@{hp}/{v}: vhost \"{v}\" takes no more connections (NOT_ALLOWED - access to vhost '{v}' refused for user 'guest': connection limit (0) is reached): close some, or raise its max-connections (rabbitmqctl list_vhost_limits, set_vhost_limits)")
    );
}

/// `amqps://` to the plain AMQP port: the port does not speak TLS, which no
/// retry changes.
#[tokio::test]
async fn amqps_to_the_plain_port_says_that_the_port_does_not_speak_tls() {
    let hp = broker();
    let err = fails_at_once(&format!("amqps://guest:guest@{hp}/%2f")).await;
    assert_eq!(
        err,
        format!("cannot connect to amqps://guest:***@{hp}/%2f: {hp} does not speak TLS (received corrupt message of type InvalidContentType): use amqp://guest:***@{hp}/%2f for this port, or amqps:// with the broker's TLS port (5671 by default)")
    );
}

/// An HTTP server (or anything else that answers but not in AMQP) on the
/// port: named as such, and tried once.
#[tokio::test]
async fn a_port_that_answers_http_is_not_an_amqp_broker_and_is_tried_once() {
    for reply in [HTTP_400, b"\x00\x01\x02 not a frame \xff".as_slice()] {
        let (port, accepted) = answering("127.0.0.1:0", reply, false).await;
        let err = fails_at_once(&format!("amqp://guest:Sekr1tPw@127.0.0.1:{port}/%2f")).await;
        assert_eq!(
            err,
            format!("cannot connect to amqp://guest:***@127.0.0.1:{port}/%2f: 127.0.0.1:{port} {NOT_AMQP}")
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "tried once");
    }
}

/// An HTTP server that answers only a whole request line, as
/// `python3 -m http.server` does: the AMQP header has none, so the handshake
/// times out. The error names an HTTP server, and the port is not waited on
/// again (one attempt, one probe).
#[tokio::test]
async fn an_http_server_that_waits_for_a_request_line_is_named_and_not_waited_on_again() {
    let (port, accepted) = answering("127.0.0.1:0", HTTP_400, true).await;
    let mut opts = options(&format!("amqp://guest:Sekr1tPw@127.0.0.1:{port}/%2f"));
    opts.connect_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let err = connect(&opts).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(!err.is_transient(), "{err}");
    assert!(
        elapsed < Duration::from_secs(2),
        "retried ({elapsed:?}): {err}"
    );
    assert_eq!(
        err.to_string(),
        format!("cannot connect to amqp://guest:***@127.0.0.1:{port}/%2f: 127.0.0.1:{port} is an HTTP server, not an AMQP broker (it answered a request line in HTTP, and the AMQP handshake not within 500ms): is it the broker's AMQP port? (RabbitMQ listens on 5672 for amqp://, 5671 for amqps://; 15672 is its management UI)")
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "one attempt and one probe"
    );
}

/// A server of another AMQP version (1.0 only) answers with its own protocol
/// header: named, and tried once.
#[tokio::test]
async fn a_server_of_another_amqp_version_is_named_and_tried_once() {
    let (port, accepted) = answering("127.0.0.1:0", b"AMQP\x00\x01\x00\x00", false).await;
    let err = fails_at_once(&format!("amqp://guest:Sekr1tPw@127.0.0.1:{port}/%2f")).await;
    assert_eq!(
        err,
        format!("cannot connect to amqp://guest:***@127.0.0.1:{port}/%2f: 127.0.0.1:{port} speaks AMQP 1.0.0, not AMQP 0-9-1: is it a RabbitMQ AMQP 0-9-1 port? (RabbitMQ listens on 5672 for amqp://, 5671 for amqps://)")
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "tried once");
}

/// An IPv6 address in the URL is connected to, not replaced by "localhost"
/// (amq-protocol-uri reads the host as a domain name, which an IP address is
/// not).
#[tokio::test]
async fn an_ipv6_address_in_the_url_is_the_host_connected_to() {
    let (port, accepted) = answering("[::1]:0", HTTP_400, false).await;
    let err = fails_at_once(&format!("amqp://guest:Sekr1tPw@[::1]:{port}/%2f")).await;
    assert_eq!(
        err,
        format!("cannot connect to amqp://guest:***@[::1]:{port}/%2f: [::1]:{port} {NOT_AMQP}")
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A port nothing listens on: retried (the broker may be starting), and the
/// error names the address and the usual ports.
#[tokio::test]
async fn a_port_nothing_listens_on_is_named_and_retried() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = fails_transiently(&format!("amqp://guest:Sekr1tPw@127.0.0.1:{port}/%2f")).await;
    assert_eq!(
        err,
        format!("cannot connect to amqp://guest:***@127.0.0.1:{port}/%2f: nothing listens on 127.0.0.1:{port} (Connection refused (os error 111)): is the broker running, and is {port} its AMQP port? (RabbitMQ listens on 5672 for amqp://, 5671 for amqps://; scripts/broker starts a local one)")
    );
}

/// A host name that does not resolve (`.invalid` never does): the error
/// names the host. Retried: a name can appear later (a compose service
/// that is starting).
#[tokio::test]
async fn a_host_that_does_not_resolve_is_named() {
    let err = fails_transiently("amqp://guest:Sekr1tPw@warren-test.invalid:5672/%2f").await;
    let head = "cannot connect to amqp://guest:***@warren-test.invalid:5672/%2f: cannot resolve host \"warren-test.invalid\" (";
    assert!(err.starts_with(head), "{err}");
    assert!(err.ends_with("): check the host name in the URL"), "{err}");
}

/// A mechanism the broker does not offer: RabbitMQ closes the connection
/// without a word, so the error says which mechanism the URL asked for.
#[tokio::test]
async fn an_auth_mechanism_the_broker_does_not_offer_is_named() {
    let hp = broker();
    let err = fails_transiently(&format!(
        "amqp://guest:guest@{hp}/%2f?auth_mechanism=external"
    ))
    .await;
    assert_eq!(
        err,
        format!("cannot connect to amqp://guest:***@{hp}/%2f?auth_mechanism=external: {hp} closed the connection during the handshake (Connection reset by peer (os error 104)): the URL asks for auth_mechanism=external, which the broker refuses this way unless its auth_mechanisms setting offers it; leave it out to log in with the URL's user and password")
    );
}

/// `openssl s_server` with a certificate signed by a CA of its own, killed
/// (and its files removed) when dropped.
struct TlsServer {
    port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl TlsServer {
    fn start() -> TlsServer {
        let dir = std::env::temp_dir().join(unique("warren-test-tls-"));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=warren-test-ca",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("openssl")
            .args([
                "s_server", "-quiet", "-cert", "srv.pem", "-key", "srv.key", "-accept",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server starts");
        let server = TlsServer { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "openssl s_server listens");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS port whose certificate a private CA signed: not trusted, which no
/// retry changes; the error says how to trust that CA.
#[tokio::test]
async fn a_tls_certificate_of_a_private_ca_says_how_to_trust_it_and_is_tried_once() {
    let server = TlsServer::start();
    let port = server.port;
    let err = fails_at_once(&format!("amqps://guest:Sekr1tPw@127.0.0.1:{port}/%2f")).await;
    assert_eq!(
        err,
        format!("cannot connect to amqps://guest:***@127.0.0.1:{port}/%2f: the TLS certificate of 127.0.0.1:{port} is not accepted (invalid peer certificate: UnknownIssuer): if a private CA signed it, set SSL_CERT_FILE to that CA's PEM file (or add the CA to the system's trust store); the URL's host must be a name the certificate holds")
    );
}
