//! What commands print on standard output.
//!
//! `warren dlq list | head` closes the pipe after ten lines. `println!`
//! panics on the next write (with a backtrace); `outln!` instead ends the
//! process quietly with exit code 141 (128 + SIGPIPE, what a shell shows for
//! a tool that SIGPIPE ended). Nothing is lost by ending there: a scan's
//! messages are held unacked on a connection that then closes, so the broker
//! puts them back in their order, and commands that change the broker print
//! their summary after the work. Any other write error on stdout is exit 1.

use std::fmt;
use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether anything was written on stdout yet.
static WROTE: AtomicBool = AtomicBool::new(false);

/// Whether a command wrote anything on stdout yet: a command that fails
/// before its `--output json` document can still print one with the error,
/// and one that fails after it (or in the middle of `export -`'s lines)
/// must not print a second.
pub fn wrote_anything() -> bool {
    WROTE.load(Ordering::Relaxed)
}

/// Whether `c`, written to a terminal, could break a line, move the cursor,
/// clear the screen or reorder what is shown: control characters (C0, DEL,
/// C1) and the bidirectional marks and overrides. Text from messages and
/// handlers is escaped where this says so before it reaches a table or a
/// log line.
pub fn unsafe_on_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The exit code when the reader of stdout went away.
pub const BROKEN_PIPE: i32 = 141;

/// `println!` for commands: see the module documentation.
macro_rules! outln {
    () => {
        $crate::out::text(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::out::text(format_args!($($arg)*), true)
    };
}

/// `print!` for commands: see the module documentation.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::text(format_args!($($arg)*), false)
    };
}

/// Writes to stdout (and a newline when `newline`), or ends the process
/// when stdout is gone.
pub fn text(args: fmt::Arguments<'_>, newline: bool) {
    WROTE.store(true, Ordering::Relaxed);
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    if let Err(e) = written {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}
