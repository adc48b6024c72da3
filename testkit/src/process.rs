//! Child processes with a deadline: a command under test that never exits
//! fails its test (and is killed) instead of stalling the whole run.

use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// How long a CLI command under test may run before it counts as hung.
/// Generous: the slowest command the tests run takes a few seconds.
pub const CLI_LIMIT: Duration = Duration::from_secs(120);

/// [`Command::output`] with a deadline.
pub trait OutputWithin {
    /// Runs the command with stdin from `/dev/null` and stdout and stderr
    /// captured, like [`Command::output`]. When it has not exited within
    /// `within`, kills it (SIGKILL) and panics with what it printed so far.
    fn output_within(&mut self, within: Duration) -> Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self, within: Duration) -> Output {
        let child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", self.get_program()));
        wait_within(child, within)
    }
}

/// Waits for `child` to exit within `within` and collects its output (the
/// pipes it was spawned with). Otherwise kills it (SIGKILL) and panics with
/// what it printed before the deadline.
pub fn wait_within(child: Child, within: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for process {pid}: {e}")),
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
            // The waiter owns the child: kill it by pid, then its pipes
            // close and the waiter returns what was printed.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let printed = rx
                .recv_timeout(Duration::from_secs(10))
                .ok()
                .and_then(Result::ok)
                .map(|o| {
                    format!(
                        "stdout: {}\nstderr: {}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_default();
            drop(waiter);
            panic!("process {pid} did not exit within {within:?}; killed it\n{printed}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_within_its_deadline_returns_what_it_printed() {
        let out = Command::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .output_within(Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn a_command_past_its_deadline_is_killed_and_fails_the_test() {
        let pidfile = std::env::temp_dir().join(format!("testkit-hang-{}", std::process::id()));
        let script = format!(
            "echo $$ > {}; echo started; exec sleep 30",
            pidfile.display()
        );
        let failed = std::panic::catch_unwind(|| {
            Command::new("sh")
                .args(["-c", &script])
                .output_within(Duration::from_millis(500))
        });
        let message = failed
            .err()
            .and_then(|e| e.downcast::<String>().ok())
            .expect("a hung command fails with a message");
        assert!(message.contains("did not exit within 500ms"), "{message}");
        assert!(message.contains("stdout: started"), "{message}");
        let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let _ = std::fs::remove_file(&pidfile);
        let proc = format!("/proc/{}", pid.trim());
        assert!(
            !pid.trim().is_empty() && !std::path::Path::new(&proc).exists(),
            "{proc} still runs"
        );
    }
}
