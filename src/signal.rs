//! SIGTERM / SIGINT → a cancellation token (libraries take the token).
//!
//! Both tokens here cancel on the first signal and exit at once on the
//! second: someone who presses Ctrl-C twice wants to stop now. A signal
//! that comes within [`SAME_SIGNAL`] of the first is taken as the same one,
//! not a second: `timeout(1)` sends its signal to the command and then to
//! its own process group, which holds the command, and wrappers that
//! forward signals to a process that also gets them from its terminal or
//! supervisor do the same. Without that, one `timeout 1h warren consume`
//! quit without draining about one time in three. A process
//! that a signal ends exits with 128 + its number, as a shell reports a
//! command that signal killed: 130 for SIGINT (Ctrl-C), 143 for SIGTERM
//! (`kill`, systemd, Kubernetes), so a supervisor or a script can tell them
//! apart. The signals are listened to from the moment a token is made, so a
//! second signal that arrives while the first is being handled is not
//! missed.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A signal this soon after the first is the same one delivered twice, not
/// a second one: far less than between two presses of Ctrl-C, far more than
/// between `timeout(1)`'s two deliveries (microseconds apart) even on a
/// loaded machine.
pub const SAME_SIGNAL: Duration = Duration::from_millis(250);

/// A signal that stops warren.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C in a terminal.
    Interrupt,
    /// SIGTERM: `kill`, systemd, Kubernetes.
    Terminate,
}

impl Signal {
    /// The exit code of a process this signal stopped: 128 + the signal's
    /// number (130 for SIGINT, 143 for SIGTERM).
    pub const fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }

    /// `SIGINT` or `SIGTERM`.
    pub const fn describe(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }
}

/// A token for a worker that drains (`warren consume`): the first SIGTERM or
/// SIGINT logs that it drains for up to `grace` and that a second signal
/// quits at once, and cancels the token. A second one runs `before_exit`
/// with that signal (which must not block: kill what would outlive the
/// process, log) and exits at once with its code (130 or 143), without
/// waiting for the drain: deliveries not yet acked go back to the queue when
/// the connection drops, as after a crash (at worst a duplicate).
pub fn drain_token(
    grace: Duration,
    before_exit: impl FnOnce(Signal) + Send + 'static,
) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    let mut signals = Signals::new();
    tokio::spawn(async move {
        let first = signals.recv().await;
        let at = Instant::now();
        warn!(
            ?grace,
            signal = first.describe(),
            "shutdown signal received: draining (in-flight handlers get the grace, the rest is \
             requeued); a second SIGINT/SIGTERM (Ctrl-C) quits at once"
        );
        t.cancel();
        let second = signals.second(at).await;
        before_exit(second);
        std::process::exit(second.exit_code().into());
    });
    token
}

/// Interactive work that stops cleanly on a signal: see [`interrupt`].
#[derive(Debug, Clone)]
pub struct Interrupt {
    token: CancellationToken,
    first: Arc<OnceLock<Signal>>,
}

impl Interrupt {
    /// Cancelled by the first SIGINT or SIGTERM.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The signal that cancelled the token, if one did.
    pub fn signal(&self) -> Option<Signal> {
        self.first.get().copied()
    }
}

/// Interactive work that stops cleanly (`warren publish`, `warren dlq
/// replay`): the first SIGINT (Ctrl-C) or SIGTERM prints `first` and the
/// signal, and cancels the token; the work then stops, reports, and exits
/// with [`Interrupt::signal`]'s [`Signal::exit_code`]. A second signal exits
/// at once with its own code (what was in flight is then unknown: at worst
/// a duplicate, as after a crash).
pub fn interrupt(first: &'static str) -> Interrupt {
    let interrupt = Interrupt {
        token: CancellationToken::new(),
        first: Arc::default(),
    };
    let i = interrupt.clone();
    let mut signals = Signals::new();
    tokio::spawn(async move {
        let signal = signals.recv().await;
        let at = Instant::now();
        let _ = i.first.set(signal);
        match signal {
            Signal::Interrupt => eprintln!("{first} (Ctrl-C again to quit at once)"),
            Signal::Terminate => {
                eprintln!("{first} (SIGTERM; a second SIGTERM or Ctrl-C quits at once)")
            }
        }
        i.token.cancel();
        let second = signals.second(at).await;
        eprintln!("interrupted twice: quitting now");
        std::process::exit(second.exit_code().into());
    });
    interrupt
}

/// Waits for one SIGTERM or SIGINT.
pub(crate) async fn wait_for_signal() -> Signal {
    Signals::new().recv().await
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
    async fn recv(&mut self) -> Signal {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.streams {
            return tokio::select! {
                _ = term.recv() => Signal::Terminate,
                _ = int.recv() => Signal::Interrupt,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }

    /// The next signal that comes [`SAME_SIGNAL`] or more after `first` (when
    /// the first was received): those before are the first one again.
    async fn second(&mut self, first: Instant) -> Signal {
        loop {
            let signal = self.recv().await;
            let after = first.elapsed();
            if after >= SAME_SIGNAL {
                return signal;
            }
            info!(
                signal = signal.describe(),
                ?after,
                "a signal this soon after the first is taken as the same one (timeout(1) \
                 and some wrappers send it twice); send another to quit at once"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Signal;

    #[test]
    fn a_signal_exits_with_128_plus_its_number() {
        assert_eq!(Signal::Interrupt.exit_code(), 128 + 2);
        assert_eq!(Signal::Terminate.exit_code(), 128 + 15);
    }
}
