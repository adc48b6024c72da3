//! Handlers that make any service a warren worker: an HTTP endpoint
//! ([`HttpHandler`]) or a command ([`ExecHandler`]).
//!
//! Text a handler returns (stderr, a response body) ends up in the
//! `x-warren-error` header and in warren's log, so it is made one line and
//! its control characters are escaped (`\u{1b}`): a command cannot write
//! escape sequences into an operator's terminal through warren. Passwords
//! in it are masked ([`Mask`]) before it is cut to size: a password cut in
//! two would no longer be recognised.

mod exec;
mod http;

use std::str::FromStr as _;
use std::sync::Arc;

pub use exec::{ExecHandler, RunningGroups};
pub use http::HttpHandler;

/// The most of an error text: what `x-warren-error` keeps (1 KiB).
pub const ERROR_TEXT_BYTES: usize = 1024;

/// How much of a handler's output is read and masked for an error text of
/// at most [`ERROR_TEXT_BYTES`]: twice that, so that a password cut at the
/// edge of what was read (and so not recognised) lies outside what is kept,
/// unless it is longer than [`ERROR_TEXT_BYTES`].
pub const READ_BYTES: usize = 2 * ERROR_TEXT_BYTES;

/// The shortest password [`Mask`] also masks on its own, outside the
/// `user:password@` of a URL.
pub const MIN_BARE_PASSWORD: usize = 8;

/// Masks passwords in a handler's output: `--exec` commands inherit
/// `WARREN_AMQP_URL`, and a command that prints its environment or the URL
/// (`set -x`, `env`, a crash dump) would put the broker's password into a
/// dead letter and the log; an HTTP service can echo it too.
///
/// - The password of every `user:password@` (any URL, any user) becomes
///   `***`, as in warren's errors ([`crate::cli::mask_passwords`]).
/// - The broker password of the URL warren connects with (as written in
///   the URL and percent-decoded) becomes `***` wherever it stands when it
///   has at least [`MIN_BARE_PASSWORD`] characters; a shorter one only in
///   its `:password@` form: a short password is often an ordinary word
///   (`guest`), and masking it everywhere would garble the text around it.
///
/// The password is kept in memory only; `Debug` never shows it.
#[derive(Clone, Default)]
pub struct Mask {
    /// The broker password as written in the URL and percent-decoded.
    passwords: Arc<[String]>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mask")
            .field("passwords", &self.passwords.len())
            .finish()
    }
}

impl Mask {
    /// Masks the password of `url` (the broker warren connects to), and
    /// every `user:password@`.
    pub fn new(url: &warren_topology::AmqpUrl) -> Mask {
        let raw = url.expose();
        let written = reqwest::Url::parse(raw)
            .ok()
            .and_then(|u| u.password().map(str::to_owned));
        let decoded = written
            .is_some()
            .then(|| warren_topology::lapin::uri::AMQPUri::from_str(raw).ok())
            .flatten()
            .map(|u| u.authority.userinfo.password);
        let mut passwords: Vec<String> = written.into_iter().chain(decoded).collect();
        passwords.retain(|p| !p.is_empty());
        passwords.dedup();
        Mask {
            passwords: passwords.into(),
        }
    }

    /// `text` with its passwords masked.
    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for p in self.passwords.iter() {
            out = if p.chars().count() >= MIN_BARE_PASSWORD {
                out.replace(p.as_str(), "***")
            } else {
                out.replace(&format!(":{p}@"), ":***@")
            };
        }
        crate::cli::mask_passwords(&out)
    }
}

/// Marks text that was cut.
const CUT: &str = "…";

/// `c` as it may appear in a log line: line breaks and tabs become a space;
/// other control characters and the bidirectional overrides that can
/// reorder what a terminal shows are escaped (`\u{1b}`).
fn push_clean(out: &mut String, c: char) {
    match c {
        '\n' | '\r' | '\t' => out.push(' '),
        c if crate::out::unsafe_on_terminal(c) => out.extend(c.escape_unicode()),
        c => out.push(c),
    }
}

/// `prefix: ` and the start of `bytes` (a response body), masked and
/// cleaned, as much of it as fits in [`ERROR_TEXT_BYTES`] with the prefix;
/// `prefix` alone when there is nothing to add.
fn with_head(prefix: &str, bytes: &[u8], mask: &Mask) -> String {
    let budget = ERROR_TEXT_BYTES.saturating_sub(prefix.len() + 2 + CUT.len());
    let text = mask.apply(&String::from_utf8_lossy(
        &bytes[..bytes.len().min(READ_BYTES)],
    ));
    let text = text.trim();
    if text.is_empty() {
        return prefix.to_owned();
    }
    let mut out = format!("{prefix}: ");
    let start = out.len();
    let mut piece = String::new();
    let mut cut = bytes.len() > READ_BYTES;
    for c in text.chars() {
        piece.clear();
        push_clean(&mut piece, c);
        if out.len() - start + piece.len() > budget {
            cut = true;
            break;
        }
        out.push_str(&piece);
    }
    if cut {
        out.push_str(CUT);
    }
    out
}

/// `prefix: ` and the end of `bytes` (stderr), masked and cleaned, as much
/// of it as fits in [`ERROR_TEXT_BYTES`] with the prefix: the last lines of
/// stderr are usually the error. `prefix` alone when there is nothing to
/// add.
fn with_tail(prefix: &str, bytes: &[u8], mask: &Mask) -> String {
    let budget = ERROR_TEXT_BYTES.saturating_sub(prefix.len() + 2 + CUT.len());
    let from = bytes.len().saturating_sub(READ_BYTES);
    let mut raw = &bytes[from..];
    if from > 0 {
        // Cut in the middle of a character: skip its continuation bytes.
        while let [b, rest @ ..] = raw {
            if *b & 0xc0 != 0x80 {
                break;
            }
            raw = rest;
        }
    }
    let text = mask.apply(&String::from_utf8_lossy(raw));
    let text = text.trim();
    if text.is_empty() {
        return prefix.to_owned();
    }
    let mut pieces: Vec<String> = Vec::new();
    let mut len = 0;
    let mut cut = from > 0;
    for c in text.chars().rev() {
        let mut piece = String::new();
        push_clean(&mut piece, c);
        if len + piece.len() > budget {
            cut = true;
            break;
        }
        len += piece.len();
        pieces.push(piece);
    }
    let mut out = format!("{prefix}: ");
    if cut {
        out.push_str(CUT);
    }
    out.extend(pieces.into_iter().rev());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_one_line_and_escaped() {
        assert_eq!(with_head("p", b"abc\ndef", &Mask::default()), "p: abc def");
        assert_eq!(
            with_tail("p", b"abc\ndef\n", &Mask::default()),
            "p: abc def"
        );
        assert_eq!(
            with_head("p", &[0xff, b'a'], &Mask::default()),
            "p: \u{fffd}a"
        );
        assert_eq!(with_tail("p", b" \n", &Mask::default()), "p");
        assert_eq!(
            with_tail(
                "p",
                b"\x1b[31mred\x1b[0m\0nul\ttab\x7f\xc2\x9b \xe2\x80\xae",
                &Mask::default()
            ),
            "p: \\u{1b}[31mred\\u{1b}[0m\\u{0}nul tab\\u{7f}\\u{9b} \\u{202e}"
        );
    }

    #[test]
    fn the_tail_keeps_the_last_line_and_fits_with_the_prefix() {
        let mut stderr = vec![b'e'; 3000];
        stderr.extend_from_slice(b"\nFINAL ERROR: disk full\n");
        let prefix = "command exited with 65 (EX_DATAERR)";
        let t = with_tail(prefix, &stderr, &Mask::default());
        assert!(t.len() <= ERROR_TEXT_BYTES, "{}", t.len());
        assert!(t.len() > ERROR_TEXT_BYTES - 8, "{}", t.len());
        assert!(
            t.starts_with("command exited with 65 (EX_DATAERR): …eee"),
            "{t}"
        );
        assert!(t.ends_with("eee FINAL ERROR: disk full"), "{t}");
        // What the consumer stores as `x-warren-error` keeps the end.
        assert_eq!(warren_consumer::one_line_error(&t), t);

        // Escapes count towards the limit; a character cut in two is dropped.
        let mut stderr = "€".repeat(800).into_bytes();
        stderr.extend_from_slice(&[0x1b; 49]);
        assert_ne!((stderr.len() - READ_BYTES) % 3, 0, "the read cuts a €");
        let t = with_tail(prefix, &stderr, &Mask::default());
        assert!(t.len() <= ERROR_TEXT_BYTES, "{}", t.len());
        assert!(t.ends_with(&format!("€{}", "\\u{1b}".repeat(49))), "{t}");
        assert!(t.contains(": …€€"), "{t}");
        assert!(!t.contains('\u{fffd}'), "{t}");
    }

    #[test]
    fn the_head_fits_with_the_prefix() {
        let long = vec![b'x'; 5000];
        let t = with_head("HTTP 500 Internal Server Error", &long, &Mask::default());
        assert!(t.len() <= ERROR_TEXT_BYTES, "{}", t.len());
        assert!(t.ends_with("xxx…"), "{t}");
        let t = with_head("HTTP 500", b"short", &Mask::default());
        assert_eq!(t, "HTTP 500: short");
    }

    fn mask_of(url: &str) -> Mask {
        Mask::new(&url.parse().unwrap())
    }

    #[test]
    fn the_broker_password_is_masked_as_written_and_decoded() {
        let mask = mask_of("amqp://app:s3cr%2Ft-pw@rabbit:5672/%2f");
        assert_eq!(
            mask.apply(
                "WARREN_AMQP_URL=amqp://app:s3cr%2Ft-pw@rabbit:5672/%2f\n\
                 + PASSWORD='s3cr/t-pw' (s3cr%2Ft-pw), db postgres://db:hunter2@db/x"
            ),
            "WARREN_AMQP_URL=amqp://app:***@rabbit:5672/%2f\n\
             + PASSWORD='***' (***), db postgres://db:***@db/x"
        );
        assert!(!format!("{mask:?}").contains("s3cr"), "{mask:?}");
    }

    #[test]
    fn a_short_password_is_masked_in_urls_only() {
        let mask = mask_of("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            mask.apply(
                "logged in as guest with amqp://guest:guest@127.0.0.1/%2f \"guest:guest@h\""
            ),
            "logged in as guest with amqp://guest:***@127.0.0.1/%2f \"guest:***@h\""
        );
        // No password: only the URLs of the text.
        assert_eq!(
            mask_of("amqp://rabbit/%2f").apply("amqp://u:pw@h/ guest"),
            "amqp://u:***@h/ guest"
        );
    }

    #[test]
    fn a_password_is_masked_before_the_text_is_cut() {
        let mask = mask_of("amqp://app:0123456789abcdef@rabbit/%2f");
        // What is kept would start inside the password: masked after the
        // cut, its end would be left ("89abcdef").
        let prefix = "command exited with 1";
        let budget = ERROR_TEXT_BYTES - prefix.len() - ": ".len() - CUT.len();
        let stderr = format!(
            "{}0123456789abcdef{}",
            "a".repeat(500),
            "b".repeat(budget - 8)
        );
        let t = with_tail(prefix, stderr.as_bytes(), &mask);
        assert!(t.starts_with("command exited with 1: …aaaaa***bbb"), "{t}");
        let prefix = "HTTP 500";
        let budget = ERROR_TEXT_BYTES - prefix.len() - ": ".len() - CUT.len();
        let body = format!("{}0123456789abcdef", "a".repeat(budget - 8));
        let t = with_head(prefix, body.as_bytes(), &mask);
        assert!(t.ends_with("aaa***"), "{t}");
    }
}
