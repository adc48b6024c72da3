//! Handlers that make any service a warren worker: an HTTP endpoint
//! ([`HttpHandler`]) or a command ([`ExecHandler`]).
//!
//! Text a handler returns (stderr, a response body) ends up in the
//! `x-warren-error` header and in warren's log, so it is made one line and
//! its control characters are escaped (`\u{1b}`): a command cannot write
//! escape sequences into an operator's terminal through warren.

mod exec;
mod http;

pub use exec::{ExecHandler, RunningGroups};
pub use http::HttpHandler;

/// The most of an error text: what `x-warren-error` keeps (1 KiB).
pub const ERROR_TEXT_BYTES: usize = 1024;

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

/// `prefix: ` and the start of `bytes` (a response body), cleaned, as much of
/// it as fits in [`ERROR_TEXT_BYTES`] with the prefix; `prefix` alone when
/// there is nothing to add.
fn with_head(prefix: &str, bytes: &[u8]) -> String {
    let budget = ERROR_TEXT_BYTES.saturating_sub(prefix.len() + 2 + CUT.len());
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_TEXT_BYTES)]);
    let text = text.trim();
    if text.is_empty() {
        return prefix.to_owned();
    }
    let mut out = format!("{prefix}: ");
    let start = out.len();
    let mut piece = String::new();
    let mut cut = bytes.len() > ERROR_TEXT_BYTES;
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

/// `prefix: ` and the end of `bytes` (stderr), cleaned, as much of it as fits
/// in [`ERROR_TEXT_BYTES`] with the prefix: the last lines of stderr are
/// usually the error. `prefix` alone when there is nothing to add.
fn with_tail(prefix: &str, bytes: &[u8]) -> String {
    let budget = ERROR_TEXT_BYTES.saturating_sub(prefix.len() + 2 + CUT.len());
    let from = bytes.len().saturating_sub(ERROR_TEXT_BYTES);
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
    let text = String::from_utf8_lossy(raw);
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
        assert_eq!(with_head("p", b"abc\ndef"), "p: abc def");
        assert_eq!(with_tail("p", b"abc\ndef\n"), "p: abc def");
        assert_eq!(with_head("p", &[0xff, b'a']), "p: \u{fffd}a");
        assert_eq!(with_tail("p", b" \n"), "p");
        assert_eq!(
            with_tail(
                "p",
                b"\x1b[31mred\x1b[0m\0nul\ttab\x7f\xc2\x9b \xe2\x80\xae"
            ),
            "p: \\u{1b}[31mred\\u{1b}[0m\\u{0}nul tab\\u{7f}\\u{9b} \\u{202e}"
        );
    }

    #[test]
    fn the_tail_keeps_the_last_line_and_fits_with_the_prefix() {
        let mut stderr = vec![b'e'; 3000];
        stderr.extend_from_slice(b"\nFINAL ERROR: disk full\n");
        let prefix = "command exited with 65 (EX_DATAERR)";
        let t = with_tail(prefix, &stderr);
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
        let mut stderr = "€".repeat(400).into_bytes();
        stderr.extend_from_slice(&[0x1b; 50]);
        let t = with_tail(prefix, &stderr);
        assert!(t.len() <= ERROR_TEXT_BYTES, "{}", t.len());
        assert!(t.ends_with(&format!("€{}", "\\u{1b}".repeat(50))), "{t}");
        assert!(t.contains(": …€€"), "{t}");
        assert!(!t.contains('\u{fffd}'), "{t}");
    }

    #[test]
    fn the_head_fits_with_the_prefix() {
        let long = vec![b'x'; 5000];
        let t = with_head("HTTP 500 Internal Server Error", &long);
        assert!(t.len() <= ERROR_TEXT_BYTES, "{}", t.len());
        assert!(t.ends_with("xxx…"), "{t}");
        let t = with_head("HTTP 500", b"short");
        assert_eq!(t, "HTTP 500: short");
    }
}
