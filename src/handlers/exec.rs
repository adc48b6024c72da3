//! `warren consume --exec CMD`: run a command per message.
//!
//! The command runs through `sh -c` with the body on stdin and
//! `WARREN_MESSAGE_ID`, `WARREN_ATTEMPT`, `WARREN_ROUTING_KEY`, `WARREN_GROUP`
//! in its environment. Exit 0 is success; exit 65 (EX_DATAERR) is permanent;
//! any other exit or a signal is retryable, with the last 1 KiB of stderr as
//! the error text. A command still running at `handler_timeout` is killed
//! (the runtime drops the future; the child is killed on drop).

use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use warren_consumer::{Delivery, Handler, HandlerError, HandlerResult};

use super::{tail_text, ERROR_TEXT_BYTES};

/// The exit code that means "this message is bad data": permanent.
pub const EX_DATAERR: i32 = 65;

/// Runs a shell command per delivery.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    command: String,
}

impl ExecHandler {
    /// A handler running `command` through `sh -c`.
    pub fn new(command: impl Into<String>) -> Self {
        ExecHandler {
            command: command.into(),
        }
    }
}

/// The outcome of a finished command.
pub fn outcome_of_exit(code: Option<i32>, signal: Option<i32>, stderr: &[u8]) -> HandlerResult {
    let tail = tail_text(stderr, ERROR_TEXT_BYTES);
    let with_tail = |s: String| {
        if tail.is_empty() {
            s
        } else {
            format!("{s}: {tail}")
        }
    };
    match (code, signal) {
        (Some(0), _) => Ok(()),
        (Some(EX_DATAERR), _) => Err(HandlerError::permanent(with_tail(format!(
            "command exited with {EX_DATAERR} (EX_DATAERR)"
        )))),
        (Some(c), _) => Err(HandlerError::retryable(with_tail(format!(
            "command exited with {c}"
        )))),
        (None, Some(s)) => Err(HandlerError::retryable(with_tail(format!(
            "command killed by signal {s}"
        )))),
        (None, None) => Err(HandlerError::retryable(with_tail(
            "command ended without an exit code".into(),
        ))),
    }
}

impl Handler for ExecHandler {
    async fn handle(&self, d: Delivery) -> HandlerResult {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .env("WARREN_MESSAGE_ID", d.message_id().unwrap_or_default())
            .env("WARREN_ATTEMPT", d.attempt().to_string())
            .env("WARREN_ROUTING_KEY", d.routing_key())
            .env("WARREN_GROUP", d.group())
            .stdin(Stdio::piped())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                HandlerError::retryable(format!("cannot start `sh -c {}`: {e}", self.command))
            })?;

        let stdin = child.stdin.take();
        let body = d.body().to_vec();
        let write = async move {
            if let Some(mut stdin) = stdin {
                // A command that does not read its stdin closes the pipe: not an error.
                let _ = stdin.write_all(&body).await;
                let _ = stdin.shutdown().await;
            }
        };
        let stderr = child.stderr.take();
        let read = async move {
            // Keep only the last bytes: bounded memory whatever the command prints.
            let mut tail: Vec<u8> = Vec::new();
            if let Some(mut err) = stderr {
                let mut buf = [0u8; 4096];
                loop {
                    match err.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            tail.extend_from_slice(&buf[..n]);
                            if tail.len() > 2 * ERROR_TEXT_BYTES {
                                tail.drain(..tail.len() - ERROR_TEXT_BYTES);
                            }
                        }
                    }
                }
            }
            tail
        };
        let ((), tail, status) = tokio::join!(write, read, child.wait());
        let status = status
            .map_err(|e| HandlerError::retryable(format!("waiting for the command failed: {e}")))?;
        #[cfg(unix)]
        let signal = std::os::unix::process::ExitStatusExt::signal(&status);
        #[cfg(not(unix))]
        let signal = None;
        outcome_of_exit(status.code(), signal, &tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_consumer::ErrorKind;

    #[test]
    fn exit_codes_map_to_the_documented_outcomes() {
        assert!(outcome_of_exit(Some(0), None, b"noise").is_ok());
        let e = outcome_of_exit(Some(65), None, b"line 1\nbad field\n").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert_eq!(
            e.message(),
            "command exited with 65 (EX_DATAERR): line 1 bad field"
        );
        assert_eq!(
            outcome_of_exit(Some(1), None, b"").unwrap_err().kind(),
            ErrorKind::Retryable
        );
        let e = outcome_of_exit(None, Some(9), b"").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Retryable);
        assert_eq!(e.message(), "command killed by signal 9");
    }
}
