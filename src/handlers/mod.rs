//! Handlers that make any service a warren worker: an HTTP endpoint
//! ([`HttpHandler`]) or a command ([`ExecHandler`]).

mod exec;
mod http;

pub use exec::ExecHandler;
pub use http::HttpHandler;

/// The most of a response body or of stderr kept as the error text.
pub const ERROR_TEXT_BYTES: usize = 1024;

/// The first `max` bytes of `bytes` as text, cut at a character boundary.
fn head_text(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let s = String::from_utf8_lossy(cut);
    s.trim().replace(['\n', '\r'], " ")
}

/// The last `max` bytes of `bytes` as text.
fn tail_text(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[bytes.len().saturating_sub(max)..];
    let s = String::from_utf8_lossy(cut);
    s.trim().replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_bounded_and_one_line() {
        assert_eq!(head_text(b"abc\ndef", 5), "abc d");
        assert_eq!(tail_text(b"abc\ndef\n", 6), "c def");
        assert_eq!(head_text(&[0xff, b'a'], 10), "\u{fffd}a");
    }
}
