//! Test-only helpers shared by warren's integration tests.
//!
//! Generic broker helpers ([`amqp`], re-exported here): unique names, the
//! broker URL, a connection, a guard that deletes what a test declared,
//! counting, publishing, draining and polling.
//!
//! Child processes with a deadline ([`process`]): a hung command fails its
//! test instead of stalling the run.
//!
//! Controlling the local broker through `rabbitmqctl` (as root), with guards
//! that put the broker back the way they found it even when a test fails.
//! Tests that use these disturb every client of the broker: each belongs
//! alone in its own test binary (cargo runs test binaries one after another).

// A test-only crate: failing loudly is what a test helper is for.
#![allow(clippy::expect_used, clippy::panic)]

pub mod amqp;
pub mod process;

pub use amqp::{
    connect, count, drain, publish, publish_on, unique, unique_prefix, url, wait_for, wait_until,
    Cleanup,
};
pub use process::{wait_within, OutputWithin, CLI_LIMIT};

use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `rabbitmqctl args` and returns its trimmed stdout; panics (the test
/// fails) when it cannot run or fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (as root)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Blocks until no channel of `user` has a publish the broker has not
/// confirmed yet (its confirms are on the wire, ahead of anything it sends
/// later), for a minute at most.
pub fn wait_confirms_sent(user: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = rabbitmqctl(&[
            "list_channels",
            "user",
            "messages_unconfirmed",
            "-q",
            "--no-table-headers",
        ]);
        let waiting: u64 = rows
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(u, _)| *u == user)
            .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
            .sum();
        if waiting == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{user}: {waiting} publishes still unconfirmed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The broker's pids of the connections whose client properties contain
/// `name` (a connection name such as `warren-<component>@` or
/// `warren-<component>-copies@`; RabbitMQ 3.10's `name` column is the peer
/// address, the client-provided name is in `client_properties`).
pub fn connection_pids(name: &str) -> Vec<String> {
    rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ])
    .lines()
    .filter(|l| l.contains(name))
    .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
    .collect()
}

/// A broker user of its own (every permission on `/`), deleted when the
/// guard is dropped. It disturbs no other client.
pub struct TempUser {
    /// The user name (unique per test and run).
    pub name: String,
    password: String,
}

impl TempUser {
    /// Creates the user.
    pub fn create() -> TempUser {
        let name = unique("warren-test-user-");
        let password = unique("pw-");
        rabbitmqctl(&["add_user", &name, &password]);
        let user = TempUser { name, password };
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }

    /// [`url`] logged in as this user.
    pub fn url(&self) -> warren_topology::AmqpUrl {
        let base = url();
        let raw = base.expose();
        let host = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
        format!("amqp://{}:{}@{host}", self.name, self.password)
            .parse()
            .expect("the user's URL parses")
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// A memory alarm: `set_vm_memory_high_watermark 0` blocks every publishing
/// connection. The watermark it found is put back by [`Alarm::clear`] or
/// when the guard is dropped.
pub struct Alarm {
    restore: Vec<String>,
}

impl Alarm {
    /// Raises the alarm.
    pub fn raise() -> Alarm {
        let now = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        // `0.4`, or `{absolute,1073741824}` when set in bytes.
        let restore = match now.strip_prefix("{absolute,") {
            Some(rest) => vec![
                "absolute".to_owned(),
                rest.trim_end_matches('}').trim().to_owned(),
            ],
            None => vec![now.clone()],
        };
        assert!(
            restore.last().is_some_and(|v| v != "0" && v != "0.0"),
            "the watermark is already 0 ({now}); a previous run did not restore it"
        );
        let alarm = Alarm { restore };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
        alarm
    }

    /// Puts the watermark back (the alarm clears).
    pub fn clear(&mut self) {
        if self.restore.is_empty() {
            return;
        }
        let mut args = vec!["set_vm_memory_high_watermark"];
        args.extend(self.restore.iter().map(String::as_str));
        rabbitmqctl(&args);
        self.restore.clear();
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if !self.restore.is_empty() {
            let mut args = vec!["set_vm_memory_high_watermark".to_owned()];
            args.extend(self.restore.iter().cloned());
            let _ = Command::new("rabbitmqctl").args(&args).status();
        }
    }
}

/// The broker application stopped with [`Stopped::stop_app`]; started again
/// by [`Stopped::start_app`] or when the guard is dropped.
pub struct Stopped {
    stopped: bool,
}

impl Stopped {
    /// Stops the broker application (every connection is closed; the port
    /// refuses connections until it starts again).
    pub fn stop_app() -> Stopped {
        let guard = Stopped { stopped: true };
        rabbitmqctl(&["stop_app"]);
        guard
    }

    /// Starts it again and waits until it accepts AMQP connections on
    /// 127.0.0.1:5672.
    pub fn start_app(&mut self) {
        if !std::mem::replace(&mut self.stopped, false) {
            return;
        }
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect("127.0.0.1:5672").is_err() {
            assert!(Instant::now() < deadline, "the broker did not come back");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.stopped {
            let _ = Command::new("rabbitmqctl").arg("start_app").status();
            let _ = Command::new("rabbitmqctl").arg("await_startup").status();
        }
    }
}
