//! Failure groups: dead letters whose error texts differ only in ids,
//! numbers and quoted values share a fingerprint.

use std::sync::LazyLock;

use regex::Regex;

// The patterns are constants; they compile or the tests fail.
#[allow(clippy::expect_used)]
static RULES: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        // Quoted values first: whatever is inside is data, not the error.
        (r#""(?:[^"\\]|\\.)*""#, "<q>"),
        (r"'(?:[^'\\]|\\.)*'", "<q>"),
        (r"`[^`]*`", "<q>"),
        (
            r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b",
            "<uuid>",
        ),
        (r"(?i)\b0x[0-9a-f]+\b", "<hex>"),
        // Hex ids: 8+ hex digits with at least one digit (so plain words stay).
        (r"(?i)\b[0-9a-f]*[0-9][0-9a-f]*\b", "<hexnum>"),
        (r"[+-]?\d+(?:\.\d+)?", "<n>"),
        (r"\s+", " "),
    ]
    .into_iter()
    .map(|(p, r)| (Regex::new(p).expect("fingerprint pattern compiles"), r))
    .collect()
});

/// The error text with its variable parts replaced: quoted values by `<q>`,
/// UUIDs by `<uuid>`, hex ids by `<hex>`, numbers by `<n>`.
pub fn normalize(error: &str) -> String {
    let mut s = error.trim().to_owned();
    for (re, with) in RULES.iter() {
        if *with == "<hexnum>" {
            s = re
                .replace_all(&s, |c: &regex::Captures<'_>| {
                    let m = &c[0];
                    if m.len() >= 8 && m.bytes().any(|b| b.is_ascii_alphabetic()) {
                        "<hex>".to_owned()
                    } else {
                        m.to_owned()
                    }
                })
                .into_owned();
        } else {
            s = re.replace_all(&s, *with).into_owned();
        }
    }
    s
}

/// A short stable fingerprint (12 hex digits) of the normalised error text
/// and the kind: the failure group of a dead letter.
pub fn fingerprint(kind: &str, error: &str) -> String {
    let text = format!("{kind}\n{}", normalize(error));
    format!("{:012x}", fnv1a64(text.as_bytes()) >> 16)
}

/// FNV-1a, 64 bits: stable across Rust versions and platforms (the std
/// hasher is not), so a fingerprint printed today selects the same
/// messages tomorrow.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A stable 16-hex-digit hash of bytes (ids for messages without a
/// `message_id`).
pub fn content_hash(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a64(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_that_differ_in_ids_and_numbers_share_a_fingerprint() {
        let a = fingerprint(
            "permanent",
            "order 1234 not found for customer 9f1c2b7e-1111-4a4a-8b8b-0123456789ab",
        );
        let b = fingerprint(
            "permanent",
            "order 99 not found for customer 00000000-2222-4b4b-9c9c-abcdefabcdef",
        );
        assert_eq!(a, b);
        let c = fingerprint("retryable", "timeout after 3000ms talking to 10.0.0.7:5432");
        let d = fingerprint("retryable", "timeout after 12ms talking to 10.0.0.9:5432");
        assert_eq!(c, d);
        let e = fingerprint("decode", "missing field \"amount\" at line 1 column 17");
        let f = fingerprint("decode", "missing field 'currency' at line 3 column 2");
        assert_eq!(e, f);
        let g = fingerprint("permanent", "object deadbeef0042 is locked by 0x7ffd1234");
        let h = fingerprint("permanent", "object a1b2c3d4e5f6 is locked by 0x1");
        assert_eq!(g, h);
    }

    #[test]
    fn different_errors_do_not() {
        let a = fingerprint("permanent", "order 1234 not found");
        let b = fingerprint("permanent", "order 1234 already paid");
        assert_ne!(a, b);
        // The same text of another kind is another failure group.
        assert_ne!(
            fingerprint("timeout", "handler ran past 30s"),
            fingerprint("panic", "handler ran past 30s")
        );
        // Words made of hex letters are words, not ids.
        assert_ne!(
            fingerprint("permanent", "bad face"),
            fingerprint("permanent", "bad decade")
        );
    }

    #[test]
    fn normalize_shows_what_was_replaced() {
        assert_eq!(
            normalize("user \"bob\" has 3 items, id 9f1c2b7e-1111-4a4a-8b8b-0123456789ab"),
            "user <q> has <n> items, id <uuid>"
        );
        assert_eq!(normalize("hash abcdef12345678 bad"), "hash <hex> bad");
    }
}
