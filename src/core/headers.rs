//! Header names and values as the filter sees them: names are lowercase
//! (Envoy normalizes them), values are raw bytes that need not be UTF-8.

/// A header list in arrival order; repeated names stay separate entries.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// Headers that describe one connection and must not travel on the side
/// call (RFC 9110 section 7.6.1, plus the HTTP/2 upgrade header).
/// `content-length` is recomputed for the side call's own body.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "content-length",
    "http2-settings",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Headers that carry the client's credentials. A shadow target is often a
/// less trusted service, so side calls drop them unless a target opts in.
pub const CREDENTIALS: &[&str] = &["authorization", "cookie", "proxy-authorization"];

pub fn is_credential(name: &str) -> bool {
    CREDENTIALS.contains(&name)
}

/// Reports whether `name` is a lowercase RFC 9110 token, the form Envoy
/// uses for header names. Pseudo-headers (`:path`) are not tokens.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

/// Reports whether `value` could end a header line or smuggle a new one.
pub fn has_line_break_or_nul(value: &[u8]) -> bool {
    value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// Iterates over every value of `name`, in arrival order.
pub fn values<'a>(
    headers: &'a [(String, Vec<u8>)],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> {
    headers
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

/// Returns the first value of `name`.
pub fn first<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        assert!(is_valid_name("x-request-id"));
        assert!(is_valid_name("x_a.b~1"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("X-Upper"));
        assert!(!is_valid_name(":path"));
        assert!(!is_valid_name("bad name"));
        assert!(!is_valid_name("bad\r\nname"));
    }

    #[test]
    fn line_breaks_detected() {
        assert!(has_line_break_or_nul(b"a\r\nx-evil: 1"));
        assert!(has_line_break_or_nul(b"a\nb"));
        assert!(has_line_break_or_nul(b"a\0b"));
        assert!(!has_line_break_or_nul(b"caf\xe9 \t ok"));
    }

    #[test]
    fn repeated_values_in_order() {
        let headers: HeaderList = vec![
            ("a".into(), b"1".to_vec()),
            ("b".into(), b"2".to_vec()),
            ("a".into(), b"3".to_vec()),
        ];
        let all: Vec<&[u8]> = values(&headers, "a").collect();
        assert_eq!(all, vec![b"1".as_slice(), b"3".as_slice()]);
        assert_eq!(first(&headers, "b"), Some(b"2".as_slice()));
        assert_eq!(first(&headers, "c"), None);
    }
}
