//! Shared by the root CLI tests: unique topologies written to temp files and
//! removed with their queues, the `warren` binary as a child process, and
//! broker helpers over a real connection.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_testkit::Cleanup;

pub use warren_testkit::{count, unique, wait_until, wait_within, OutputWithin, CLI_LIMIT};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A topology file with one exchange `{p}.orders` and the given groups
/// (`[[group]]` bodies without the header, `{p}` replaced); deletes the file,
/// its queues and exchange on drop.
pub struct Topo {
    pub p: String,
    pub path: PathBuf,
    _cleanup: Cleanup,
}

impl Topo {
    pub fn new(tag: &str, groups: &[&str]) -> Topo {
        let p = unique(tag);
        let mut text = format!("[[exchange]]\nname = \"{p}.orders\"\nkind = \"topic\"\n\n");
        for g in groups {
            text.push_str("[[group]]\n");
            text.push_str(&g.replace("{p}", &p));
            text.push('\n');
        }
        let path = std::env::temp_dir().join(format!("{p}.toml"));
        std::fs::write(&path, &text).unwrap();
        let t = warren_topology::Topology::from_file(&path).unwrap();
        let cleanup = cleanup(&t, &p);
        Topo {
            p,
            path,
            _cleanup: cleanup,
        }
    }

    /// Takes ownership of an existing topology file (and its queues).
    pub fn adopt(path: &std::path::Path) -> Topo {
        let t = warren_topology::Topology::from_file(path).unwrap();
        let p = t.exchanges[0].name.trim_end_matches(".orders").to_owned();
        let cleanup = cleanup(&t, &p);
        Topo {
            p,
            path: path.to_owned(),
            _cleanup: cleanup,
        }
    }

    pub fn file(&self) -> &str {
        self.path.to_str().unwrap()
    }

    pub fn exchange(&self) -> String {
        format!("{}.orders", self.p)
    }

    pub fn q(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.p)
    }

    pub fn apply(&self) {
        let o = warren()
            .args(["topology", "apply", "-f", self.file()])
            .output_within(CLI_LIMIT);
        assert!(
            o.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Deletes the queues of `t` and the exchange `{p}.orders`.
fn cleanup(t: &warren_topology::Topology, p: &str) -> Cleanup {
    let mut c = Cleanup::empty().at(URL.parse().unwrap());
    for q in warren_topology::Plan::new(t).queues {
        c.add_queue(&q.name);
    }
    c.exchange(&format!("{p}.orders"))
}

impl Drop for Topo {
    // The file goes first; the queues and exchange when `_cleanup` drops.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The `warren` binary with a clean environment.
pub fn warren() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_warren"));
    c.env_remove("WARREN_TOPOLOGY")
        .env_remove("RUST_LOG")
        .env("WARREN_AMQP_URL", URL);
    c
}

/// A free local port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `warren consume` child, killed on drop if still running.
pub struct Worker {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Worker {
    /// `warren consume` for `group` with `/metrics` on 127.0.0.1; ready
    /// when `/readyz` answers 200.
    pub fn start(topo: &Topo, group: &str, handler: &[&str], extra: &[&str]) -> Worker {
        Worker::start_at(topo, group, handler, extra, "127.0.0.1", false)
    }

    /// [`Worker::start`] with `--metrics-addr {host}:{port}`, and in a
    /// process group of its own when `own_group` (as a shell started from a
    /// terminal runs it).
    pub fn start_at(
        topo: &Topo,
        group: &str,
        handler: &[&str],
        extra: &[&str],
        host: &str,
        own_group: bool,
    ) -> Worker {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let log = std::env::temp_dir().join(format!("{}-{port}.log", topo.p));
        let file = std::fs::File::create(&log).unwrap();
        let addr = format!("{host}:{port}");
        let mut args = vec![
            "consume",
            "-f",
            topo.file(),
            "--group",
            group,
            "--metrics-addr",
            &addr,
            "-v",
        ];
        args.extend_from_slice(handler);
        args.extend_from_slice(extra);
        let mut cmd = warren();
        cmd.args(&args).stdout(Stdio::null()).stderr(file);
        if own_group {
            cmd.process_group(0);
        }
        let child = cmd.spawn().unwrap();
        let mut w = Worker { child, port, log };
        w.wait_ready();
        w
    }

    fn wait_ready(&mut self) {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
                let mut r = String::new();
                let _ = s.read_to_string(&mut r);
                if r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("worker exited with {status}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("worker not ready in 20s: {}", self.log_text());
    }

    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    }

    /// The value of a metric line that starts with `prefix` (0 when absent).
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

pub async fn connect() -> Connection {
    Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap()
}

/// Publishes with confirms; `id` becomes the message_id.
pub async fn publish(conn: &Connection, exchange: &str, key: &str, id: &str, body: &[u8]) {
    let props = BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    warren_testkit::publish(conn, exchange, key, body, props).await;
}

/// Takes every message of a queue (acked): (message_id, body, headers).
pub async fn drain(conn: &Connection, queue: &str) -> Vec<(String, Vec<u8>, FieldTable)> {
    warren_testkit::drain(conn, queue)
        .await
        .into_iter()
        .map(|(body, p)| {
            (
                p.message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                body,
                p.headers().clone().unwrap_or_default(),
            )
        })
        .collect()
}

pub fn header_str(h: &FieldTable, name: &str) -> Option<String> {
    match h.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        lapin::types::AMQPValue::ShortString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}
