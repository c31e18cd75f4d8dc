//! The limits every way into the system enforces, the same over HTTP and AMQP, so that no
//! single message or request can stall a consumer, exhaust memory, or store something that
//! cannot be read back. The README's "Limits" section lists them for users.
//!
//! [`check_json`] is one pass over the raw bytes, before any parsing: it refuses a body that is
//! too large, nested too deep, carries a NUL character (PostgreSQL cannot store one in text), or
//! an integer that would lose precision (serde_json reads an integer beyond 64 bits as a float).

use std::fmt;

/// The largest message body on any queue, and the largest HTTP request body.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// The largest saga data, as compact JSON: a start's input, and the data after each step's
/// output is merged in.
pub const MAX_DATA_BYTES: usize = 256 * 1024;

/// The deepest JSON nesting in a whole message or request body (an object or array counts one
/// level). Stored records wrap a message's values in a few more levels, and stay far below
/// serde_json's own limit of 128, so everything accepted can be read back.
pub const MAX_DEPTH: usize = 32;

/// How much deeper a message sits in a packed message (`{"commands": [{"command": …}]}`): a
/// packed message may nest to [`MAX_DEPTH`] plus this.
pub const PACK_DEPTH: usize = 3;

/// The longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// The longest reason the system writes about a refused message or request (a dead-letter
/// header, an HTTP error): longer ones are cut, since they may echo the offending value.
pub const MAX_REASON_CHARS: usize = 512;

/// Why a JSON body breaks a limit. `Display` is the reason given to the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// The body has more than [`MAX_MESSAGE_BYTES`] bytes.
    TooLarge { bytes: usize, limit: usize },
    /// Objects and arrays nest deeper than [`MAX_DEPTH`].
    TooDeep { limit: usize },
    /// A string or key contains U+0000.
    Nul,
    /// An integer literal outside the 64-bit range (−2^63 to 2^64−1).
    IntegerOutOfRange { literal: String },
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::TooLarge { bytes, limit } => {
                write!(f, "the body has {bytes} bytes; the limit is {limit}")
            }
            LimitError::TooDeep { limit } => {
                write!(f, "JSON is nested deeper than {limit} levels")
            }
            LimitError::Nul => write!(f, "a string contains the NUL character (\\u0000)"),
            LimitError::IntegerOutOfRange { literal } => write!(
                f,
                "the integer {} does not fit in 64 bits; send it as a string",
                truncate(literal, 40)
            ),
        }
    }
}

impl std::error::Error for LimitError {}

/// Checks a JSON body against [`MAX_MESSAGE_BYTES`], [`MAX_DEPTH`], the NUL rule and the
/// integer range, without parsing it. Syntax errors are left to the parser that follows.
pub fn check_json(body: &[u8]) -> Result<(), LimitError> {
    check_json_with(body, MAX_MESSAGE_BYTES, MAX_DEPTH)
}

/// [`check_json`] with other size and depth limits.
pub fn check_json_with(body: &[u8], max_bytes: usize, max_depth: usize) -> Result<(), LimitError> {
    if body.len() > max_bytes {
        return Err(LimitError::TooLarge {
            bytes: body.len(),
            limit: max_bytes,
        });
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return Err(LimitError::TooDeep { limit: max_depth });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => i = skip_string(body, i + 1)?,
            b'-' | b'0'..=b'9' => i = check_number(body, i)?,
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Skips a string whose first content byte is at `i`; returns the index of its closing quote
/// (or the end). Refuses `\u0000`; a raw NUL byte is a syntax error the parser reports.
fn skip_string(body: &[u8], mut i: usize) -> Result<usize, LimitError> {
    while i < body.len() {
        match body[i] {
            b'"' => return Ok(i),
            b'\\' => {
                if body.get(i + 1) == Some(&b'u') && body.get(i + 2..i + 6) == Some(b"0000") {
                    return Err(LimitError::Nul);
                }
                i += 2;
            }
            0 => return Err(LimitError::Nul),
            _ => i += 1,
        }
    }
    Ok(i)
}

/// Checks the number starting at `i`; returns the index of its last byte.
fn check_number(body: &[u8], start: usize) -> Result<usize, LimitError> {
    let mut end = start;
    let mut integer = true;
    while end < body.len() {
        match body[end] {
            b'0'..=b'9' | b'-' | b'+' => {}
            b'.' | b'e' | b'E' => integer = false,
            _ => break,
        }
        end += 1;
    }
    let literal = &body[start..end];
    if integer && literal.len() >= 19 {
        let text = std::str::from_utf8(literal).unwrap_or_default();
        if text.parse::<i64>().is_err() && text.parse::<u64>().is_err() {
            return Err(LimitError::IntegerOutOfRange {
                literal: text.to_owned(),
            });
        }
    }
    Ok(end.saturating_sub(1).max(start))
}

/// Why an idempotency key is refused, or `Ok` if it follows the rules: 1 to
/// [`MAX_IDEMPOTENCY_KEY_BYTES`] characters, each printable ASCII (space to `~`).
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(format!(
            "the idempotency key must have 1 to {MAX_IDEMPOTENCY_KEY_BYTES} characters; it has {}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err("the idempotency key must be printable ASCII (space to `~`)".into());
    }
    Ok(())
}

/// `text` cut to at most `max_chars` characters, with a note of how much was cut.
pub fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}… ({} more bytes cut)", &text[..end], text.len() - end),
    }
}

/// A reason about a refused message or request, cut to [`MAX_REASON_CHARS`].
pub fn reason(text: &str) -> String {
    truncate(text, MAX_REASON_CHARS)
}

/// The saga data's size as compact JSON, checked against [`MAX_DATA_BYTES`].
pub fn check_data_size(what: &str, data: &crate::Data) -> Result<(), String> {
    let bytes = serde_json::to_vec(data).map_or(usize::MAX, |v| v.len());
    if bytes > MAX_DATA_BYTES {
        return Err(format!(
            "{what} is {bytes} bytes as JSON; the limit is {MAX_DATA_BYTES}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn refuses_nesting_past_the_limit_and_accepts_it_at_the_limit() {
        assert_eq!(check_json(nested(MAX_DEPTH).as_bytes()), Ok(()));
        assert_eq!(
            check_json(nested(MAX_DEPTH + 1).as_bytes()),
            Err(LimitError::TooDeep { limit: MAX_DEPTH })
        );
        let value: serde_json::Value = serde_json::from_str(&nested(MAX_DEPTH)).unwrap();
        assert!(value.is_array());
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let body = format!(r#"{{"a": "{}", "b": "\"[[["}}"#, "[".repeat(500));
        assert_eq!(check_json(body.as_bytes()), Ok(()));
    }

    #[test]
    fn refuses_a_body_over_the_size_limit() {
        let body = format!(r#""{}""#, "a".repeat(MAX_MESSAGE_BYTES));
        assert!(matches!(
            check_json(body.as_bytes()),
            Err(LimitError::TooLarge { .. })
        ));
    }

    #[test]
    fn refuses_nul_in_values_and_keys_but_not_an_escaped_backslash() {
        assert_eq!(check_json(br#"{"a": "x\u0000y"}"#), Err(LimitError::Nul));
        assert_eq!(check_json(br#"{"a\u0000": 1}"#), Err(LimitError::Nul));
        assert_eq!(check_json(br#"{"a": "x\\u0000y"}"#), Ok(()));
        assert_eq!(check_json(br#"{"a": "\u0001"}"#), Ok(()));
    }

    #[test]
    fn refuses_integers_beyond_64_bits_and_keeps_floats_and_edges() {
        for ok in [
            "18446744073709551615",
            "-9223372036854775808",
            "1e400",
            "184467440737095516160.5",
            "0",
        ] {
            assert_eq!(check_json(format!("[{ok}]").as_bytes()), Ok(()), "{ok}");
        }
        for bad in [
            "18446744073709551616",
            "-9223372036854775809",
            "1".repeat(30).as_str(),
        ] {
            let err = check_json(format!(r#"{{"amount": {bad}}}"#).as_bytes()).unwrap_err();
            assert!(
                matches!(err, LimitError::IntegerOutOfRange { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn idempotency_keys_follow_one_rule() {
        assert!(check_idempotency_key("order-42 retry#1").is_ok());
        assert!(check_idempotency_key(&"k".repeat(255)).is_ok());
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key(&"k".repeat(256)).is_err());
        assert!(check_idempotency_key("a\0b").is_err());
        assert!(check_idempotency_key("naïve").is_err());
    }

    #[test]
    fn truncation_cuts_on_a_character_boundary_and_says_so() {
        assert_eq!(truncate("short", 10), "short");
        let cut = truncate(&"é".repeat(1000), 3);
        assert!(cut.starts_with("ééé…"), "{cut}");
        assert!(cut.contains("1994 more bytes cut"), "{cut}");
        assert!(reason(&"x".repeat(200_000)).len() < MAX_REASON_CHARS + 64);
    }
}
