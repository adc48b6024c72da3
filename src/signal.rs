//! SIGTERM / SIGINT → a cancellation token (libraries take the token).

use tokio_util::sync::CancellationToken;
use tracing::info;

/// A token cancelled on the first SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received; draining");
        t.cancel();
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
    tokio::spawn(async move {
        wait_for_signal().await;
        eprintln!("{first} (Ctrl-C again to quit at once)");
        t.cancel();
        wait_for_signal().await;
        eprintln!("interrupted twice: quitting now");
        std::process::exit(130);
    });
    token
}

#[cfg(unix)]
pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
