//! SIGTERM / SIGINT → a cancellation token (libraries take the token).
//!
//! Both tokens here cancel on the first signal and exit at once, with code
//! 130, on the second: someone who presses Ctrl-C twice wants to stop now.
//! The signals are listened to from the moment a token is made, so a second
//! signal that arrives while the first is being handled is not missed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The exit code after a second signal (128 + SIGINT, what a shell reports
/// for a command that Ctrl-C ended).
pub const INTERRUPTED: i32 = 130;

/// A token for a worker that drains (`warren consume`): the first SIGTERM or
/// SIGINT logs that it drains for up to `grace` and that a second signal
/// quits at once, and cancels the token. A second one runs `before_exit`
/// (which must not block: kill what would outlive the process, log) and
/// exits at once with code 130, without waiting for the drain: deliveries
/// not yet acked go back to the queue when the connection drops, as after a
/// crash (at worst a duplicate).
pub fn drain_token(
    grace: Duration,
    before_exit: impl FnOnce() + Send + 'static,
) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    let mut signals = Signals::new();
    tokio::spawn(async move {
        signals.recv().await;
        warn!(
            ?grace,
            "shutdown signal received: draining (in-flight handlers get the grace, the rest is \
             requeued); a second SIGINT/SIGTERM (Ctrl-C) quits at once"
        );
        t.cancel();
        signals.recv().await;
        before_exit();
        std::process::exit(INTERRUPTED);
    });
    token
}

/// A token for interactive work that stops cleanly: the first SIGINT
/// (Ctrl-C) or SIGTERM prints `first` and cancels the token; a second one
/// exits at once with code 130 (what was in flight is then unknown: at worst
/// a duplicate, as after a crash).
pub fn interrupt_token(first: &'static str) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    let mut signals = Signals::new();
    tokio::spawn(async move {
        signals.recv().await;
        eprintln!("{first} (Ctrl-C again to quit at once)");
        t.cancel();
        signals.recv().await;
        eprintln!("interrupted twice: quitting now");
        std::process::exit(INTERRUPTED);
    });
    token
}

/// Waits for one SIGTERM or SIGINT.
pub(crate) async fn wait_for_signal() {
    Signals::new().recv().await;
}

/// SIGTERM and SIGINT, listened to from [`Signals::new`] on: a signal that
/// comes between two [`Signals::recv`] calls is kept for the second. (Several
/// of one kind that come before a `recv` count as one, as the kernel's
/// pending signals do.)
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Starts listening. Must be called within the runtime.
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// The next SIGTERM or SIGINT (Ctrl-C where those cannot be listened to).
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.streams {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
