//! `warren consume --exec CMD`: run a command per message.
//!
//! The command runs through `sh -c` with the body on stdin and
//! `WARREN_MESSAGE_ID`, `WARREN_ATTEMPT`, `WARREN_ROUTING_KEY`, `WARREN_GROUP`
//! and `WARREN_REDELIVERED` (`true`/`false`) in its environment; its stdout
//! is warren's. Exit 0 is success; exit 65 (EX_DATAERR) is permanent; any
//! other exit or a signal is retryable, with the end of stderr as the error
//! text (as much of its last 1 KiB as fits in `x-warren-error`), passwords
//! masked ([`Mask`]): the command inherits warren's environment,
//! `WARREN_AMQP_URL` included.
//!
//! ## Process groups
//!
//! Each command runs in a process group of its own, so a Ctrl-C at a
//! terminal or `kill -INT -- -<warren's pgid>` reaches warren, which drains,
//! and not the handlers, which finish. (systemd's `KillMode=control-group`
//! signals every process of the cgroup whatever its group: use
//! `KillMode=mixed`.) The whole group is killed (SIGKILL):
//!
//! - when the command exits (after up to `STDERR_AFTER_EXIT` for the rest
//!   of its stderr): a background child it left behind does not hold the
//!   delivery, nor run on beside the next attempt;
//! - at `handler_timeout` and when the shutdown grace is over (the consumer
//!   drops the handler's future; `GroupGuard` kills on drop);
//! - when warren quits at once on a second SIGINT/SIGTERM:
//!   `std::process::exit` runs no destructor, so every group also stays in
//!   a [`RunningGroups`] from its spawn until it is killed, and the exit path
//!   kills them all ([`RunningGroups::kill_all`]). Their deliveries, unacked,
//!   go back to the queue with the connection; without the kill the commands
//!   would run on beside the redelivery.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, Command};
use warren_consumer::{Delivery, Handler, HandlerError, HandlerResult};

use super::{with_tail, Mask, READ_BYTES};

/// The exit code that means "this message is bad data": permanent.
pub const EX_DATAERR: i32 = 65;

/// How long the rest of stderr is read once the command has exited: a
/// background child holding stderr open does not delay the outcome longer.
pub const STDERR_AFTER_EXIT: Duration = Duration::from_millis(100);

/// Runs a shell command per delivery.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    command: String,
    running: RunningGroups,
    mask: Mask,
}

impl ExecHandler {
    /// A handler running `command` through `sh -c`; its stderr is masked
    /// with `Mask::default()` (every `user:password@`) unless
    /// [`ExecHandler::mask`] says more.
    pub fn new(command: impl Into<String>) -> Self {
        ExecHandler {
            command: command.into(),
            running: RunningGroups::default(),
            mask: Mask::default(),
        }
    }

    /// Masks the passwords `mask` knows in the command's stderr (give it
    /// the broker URL the command inherits).
    pub fn mask(mut self, mask: Mask) -> Self {
        self.mask = mask;
        self
    }

    /// The process groups of the commands running now, for an exit that
    /// cannot wait for them.
    pub fn running(&self) -> RunningGroups {
        self.running.clone()
    }

    /// Checks, before any message is taken, that the command can start:
    /// that `sh` runs, and that the command's first word, when it is plain
    /// enough to judge ([`plain_first_word`]), is a program that exists and
    /// may be executed, or a shell builtin. Otherwise every message would
    /// fail (`sh` exits 126 or 127), go through the retry tiers and be
    /// dead-lettered while the worker looks healthy. Returns what is wrong
    /// and what to do.
    ///
    /// The check runs in the directory and with the `PATH` the commands
    /// will have; it judges only the first word (`cd /app && ./run` is not
    /// looked into further), and a check that does not answer within
    /// [`CHECK_TIMEOUT`] is skipped.
    pub async fn check(&self) -> Result<(), String> {
        let word = plain_first_word(&self.command).unwrap_or("");
        let mut check = Command::new("sh");
        check
            .args(["-c", CHECK_SCRIPT, "sh", word])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let shown = &self.command;
        let status = match tokio::time::timeout(CHECK_TIMEOUT, check.status()).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) => {
                return Err(format!(
                    "--exec runs its command with `sh -c`, and sh cannot be started: {e}: run \
                     warren where sh is on PATH (warren's distroless image has no shell; use \
                     --http there)"
                ))
            }
            Ok(Ok(status)) => status,
        };
        let here = || {
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "the current directory".into())
        };
        match status.code() {
            Some(10) if word.contains('/') => Err(format!(
                "--exec {shown:?}: {word} does not exist (a relative path starts from {}): \
                 give the handler's path",
                here()
            )),
            Some(10) => Err(format!(
                "--exec {shown:?}: no command {word:?} on PATH, nor a shell builtin: install it \
                 or give its path"
            )),
            Some(11) => Err(format!(
                "--exec {shown:?}: {word} is not executable: run `chmod +x {word}`, or give \
                 --exec \"sh {word}\""
            )),
            Some(12) => Err(format!(
                "--exec {shown:?}: {word} is a directory, not a program"
            )),
            _ => Ok(()),
        }
    }
}

/// How long [`ExecHandler::check`] waits for its `sh`.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Run as `sh -c CHECK_SCRIPT sh WORD`: exit 10 when WORD does not exist
/// (a path) or is neither a program on PATH nor a builtin (a name), 11 when
/// it is a file that may not be executed, 12 when it is a directory. An
/// empty WORD passes.
const CHECK_SCRIPT: &str = r#"[ -z "$1" ] && exit 0
case $1 in
  */*) if [ -d "$1" ]; then exit 12; elif [ ! -e "$1" ]; then exit 10; elif [ ! -x "$1" ]; then exit 11; fi;;
  *) command -v "$1" >/dev/null 2>&1 || exit 10;;
esac
exit 0"#;

/// The first word of a command when the shell reads it as written: letters,
/// digits and `/._-+,@%:` only. Quotes, variables, `~`, globs,
/// redirections, assignments (`A=b cmd`) or a subshell make it something
/// [`ExecHandler::check`] does not second-guess: `None`.
fn plain_first_word(command: &str) -> Option<&str> {
    let word = command.split_whitespace().next()?;
    word.chars()
        .all(|c| c.is_alphanumeric() || "/._-+,@%:".contains(c))
        .then_some(word)
}

/// The process groups of the commands that run now, shared between the
/// handler and an exit path that runs no destructor.
///
/// A group is added under the lock together with its spawn, and taken out
/// under the lock together with its kill, so [`RunningGroups::kill_all`]
/// sees every group that may still have processes, and never one that was
/// already killed (whose id could, in theory, be someone else's by then).
/// After `kill_all`, no command starts.
#[derive(Debug, Clone, Default)]
pub struct RunningGroups(Arc<Mutex<Groups>>);

#[derive(Debug, Default)]
struct Groups {
    pgids: HashSet<u32>,
    closed: bool,
}

impl RunningGroups {
    /// A poisoned lock is still usable: the set is changed by single
    /// inserts and removes, never left half-done.
    fn lock(&self) -> MutexGuard<'_, Groups> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Kills every group that runs now (SIGKILL) and refuses to start any
    /// command from now on. Returns how many groups it killed.
    ///
    /// SIGKILL rather than SIGTERM and a pause: this is the way out when
    /// someone asked to quit at once; the commands' deliveries are
    /// redelivered, so their work is done again anyway (as after a crash),
    /// a command could ignore SIGTERM, and the grace and timeout ends kill
    /// the same way, so a command has one way of being stopped to expect.
    pub fn kill_all(&self) -> usize {
        let mut groups = self.lock();
        groups.closed = true;
        let killed = groups.pgids.len();
        for pgid in groups.pgids.drain() {
            kill_group(pgid);
        }
        killed
    }

    /// Spawns `command` and records its process group, both under the lock:
    /// an exit path that kills everything in between cannot miss it.
    fn spawn(&self, command: &mut Command) -> std::io::Result<(Child, GroupGuard)> {
        let mut groups = self.lock();
        if groups.closed {
            return Err(std::io::Error::other(
                "warren is quitting: no command starts any more",
            ));
        }
        let child = command.spawn()?;
        let pgid = child.id();
        if let Some(pgid) = pgid {
            groups.pgids.insert(pgid);
        }
        Ok((
            child,
            GroupGuard {
                pgid,
                running: self.clone(),
            },
        ))
    }

    /// Kills the group `pgid` if it is still recorded, and forgets it.
    fn kill(&self, pgid: u32) {
        let mut groups = self.lock();
        if groups.pgids.remove(&pgid) {
            kill_group(pgid);
        }
    }
}

/// The outcome of a finished command, its stderr masked with `mask`.
pub fn outcome_of_exit(
    code: Option<i32>,
    signal: Option<i32>,
    stderr: &[u8],
    mask: &Mask,
) -> HandlerResult {
    match (code, signal) {
        (Some(0), _) => Ok(()),
        (Some(EX_DATAERR), _) => Err(HandlerError::permanent(with_tail(
            &format!("command exited with {EX_DATAERR} (EX_DATAERR)"),
            stderr,
            mask,
        ))),
        (Some(c), _) => Err(HandlerError::retryable(with_tail(
            &format!("command exited with {c}"),
            stderr,
            mask,
        ))),
        (None, Some(s)) => Err(HandlerError::retryable(with_tail(
            &format!("command killed by signal {s}"),
            stderr,
            mask,
        ))),
        (None, None) => Err(HandlerError::retryable(with_tail(
            "command ended without an exit code",
            stderr,
            mask,
        ))),
    }
}

/// Kills a command's process group when dropped, unless already done: the
/// handler's future being dropped (a timeout, the end of the shutdown grace)
/// takes the command's children with it.
#[derive(Debug)]
struct GroupGuard {
    pgid: Option<u32>,
    running: RunningGroups,
}

impl GroupGuard {
    /// Kills the group now (unless [`RunningGroups::kill_all`] did).
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            self.running.kill(pgid);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILL to a process group (`killpg`, through rustix: the workspace
/// forbids `unsafe`). A group already gone is not an error.
fn kill_group(pgid: u32) {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Writes the body to the command's stdin and closes it. A command that does
/// not read its stdin closes the pipe: not an error.
async fn write_body(stdin: Option<ChildStdin>, body: &[u8]) {
    if let Some(mut stdin) = stdin {
        let _ = stdin.write_all(body).await;
        let _ = stdin.shutdown().await;
    }
}

/// Reads stderr to its end, keeping only the last bytes in `tail` (at least
/// [`READ_BYTES`] of them): bounded memory whatever the command prints.
async fn read_tail(stderr: Option<ChildStderr>, tail: &mut Vec<u8>) {
    let Some(mut err) = stderr else { return };
    let mut buf = [0u8; 4096];
    loop {
        match err.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * READ_BYTES {
                    tail.drain(..tail.len() - READ_BYTES);
                }
            }
        }
    }
}

impl Handler for ExecHandler {
    async fn handle(&self, d: Delivery) -> HandlerResult {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&self.command)
            .env("WARREN_MESSAGE_ID", d.message_id().unwrap_or_default())
            .env("WARREN_ATTEMPT", d.attempt().to_string())
            .env("WARREN_ROUTING_KEY", d.routing_key())
            .env("WARREN_GROUP", d.group())
            .env(
                "WARREN_REDELIVERED",
                if d.redelivered() { "true" } else { "false" },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        command.process_group(0);
        let (child, group) = self.running.spawn(&mut command).map_err(|e| {
            let command = self.mask.apply(&self.command);
            HandlerError::retryable(format!("cannot start `sh -c {command}`: {e}"))
        })?;
        // Bound one after the other (not by the pattern above), `group`
        // after `child`, so `group` is dropped first: the group is killed
        // while its leader is not yet reaped and the group id cannot be
        // reused.
        let mut child = child;
        let mut group = group;

        let mut tail: Vec<u8> = Vec::new();
        let status = {
            let write = write_body(child.stdin.take(), d.body());
            let read = read_tail(child.stderr.take(), &mut tail);
            tokio::pin!(write, read);
            let (mut written, mut read_all) = (false, false);
            // The outcome is settled when the command exits, not when its
            // pipes close: a background child may hold them open.
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    () = &mut write, if !written => written = true,
                    () = &mut read, if !read_all => read_all = true,
                }
            };
            if !read_all {
                let _ = tokio::time::timeout(STDERR_AFTER_EXIT, &mut read).await;
            }
            status
        };
        // The leader has been reaped: its id is free again, but the kernel
        // does not hand out an id while a group of that id still has
        // members, and a reuse of an empty one in this instant would need
        // the whole pid space to wrap around.
        group.kill();
        let status = status
            .map_err(|e| HandlerError::retryable(format!("waiting for the command failed: {e}")))?;
        #[cfg(unix)]
        let signal = std::os::unix::process::ExitStatusExt::signal(&status);
        #[cfg(not(unix))]
        let signal = None;
        outcome_of_exit(status.code(), signal, &tail, &self.mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use warren_consumer::ErrorKind;

    fn sleeper() -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", "exec sleep 57"])
            .process_group(0)
            .kill_on_drop(true);
        c
    }

    #[tokio::test]
    async fn kill_all_kills_the_running_groups_only_and_then_starts_nothing() {
        let running = RunningGroups::default();
        let (mut done, mut done_guard) = running.spawn(&mut sleeper()).unwrap();
        done_guard.kill();
        assert_eq!(done.wait().await.unwrap().signal(), Some(9));
        let (mut child, guard) = running.spawn(&mut sleeper()).unwrap();

        assert_eq!(
            running.kill_all(),
            1,
            "the group killed already is not counted"
        );
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        assert_eq!(status.unwrap().unwrap().signal(), Some(9));
        drop(guard);
        let refused = running.spawn(&mut sleeper()).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "warren is quitting: no command starts any more"
        );
        assert_eq!(running.kill_all(), 0);
    }

    #[test]
    fn only_a_plain_first_word_is_judged() {
        assert_eq!(plain_first_word("  ./run.sh --x"), Some("./run.sh"));
        assert_eq!(plain_first_word("python3 -m app"), Some("python3"));
        assert_eq!(
            plain_first_word("/opt/app/bin/handle"),
            Some("/opt/app/bin/handle")
        );
        for judged_by_the_shell in [
            "",
            "   ",
            "A=1 handle",
            "\"my handler\"",
            "$HOME/bin/handle",
            "~/bin/handle",
            "(cd /app; ./run)",
            "{ cat; }",
            "!true",
            "*.sh",
            "<in handle",
        ] {
            assert_eq!(
                plain_first_word(judged_by_the_shell),
                None,
                "{judged_by_the_shell}"
            );
        }
    }

    #[tokio::test]
    async fn builtins_and_programs_pass_the_check() {
        for ok in [
            "true",
            "exec sh -c true",
            "cat > /dev/null",
            "cd /tmp && ./x",
            "/bin/sh -c :",
            "if true; then :; fi",
        ] {
            assert_eq!(ExecHandler::new(ok).check().await, Ok(()), "{ok}");
        }
    }

    #[test]
    fn exit_codes_map_to_the_documented_outcomes() {
        assert!(outcome_of_exit(Some(0), None, b"noise", &Mask::default()).is_ok());
        let e =
            outcome_of_exit(Some(65), None, b"line 1\nbad field\n", &Mask::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert_eq!(
            e.message(),
            "command exited with 65 (EX_DATAERR): line 1 bad field"
        );
        assert_eq!(
            outcome_of_exit(Some(1), None, b"", &Mask::default())
                .unwrap_err()
                .kind(),
            ErrorKind::Retryable
        );
        let e = outcome_of_exit(None, Some(9), b"", &Mask::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Retryable);
        assert_eq!(e.message(), "command killed by signal 9");
    }
}
