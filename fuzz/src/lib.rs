//! Invariants shared by the fuzz targets.
//!
//! Request header lists follow the host's contract (`core::headers`):
//! Envoy hands the filter lowercase token names or pseudo-headers, and
//! values are arbitrary bytes.

use mesh_fanout::core::config::Target;
use mesh_fanout::core::headers;
use mesh_fanout::core::retry;
use mesh_fanout::core::side_request;

/// Header names worth hitting on purpose: pseudo-headers, every
/// hop-by-hop and credential name in `core::headers`, the default marker,
/// sample key and idempotency header, and a few ordinary names.
pub const KNOWN_NAMES: &[&str] = &[
    ":method",
    ":path",
    ":authority",
    ":scheme",
    ":protocol",
    "connection",
    "content-length",
    "http2-settings",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-mesh-fanout",
    "x-request-id",
    "idempotency-key",
    "host",
    "content-type",
    "traceparent",
    "x-tenant",
];

const TOKEN_BYTES: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~";

/// Maps arbitrary bytes onto a non-empty lowercase RFC 9110 token.
pub fn token_from(bytes: &[u8]) -> String {
    let mut name: String = bytes
        .iter()
        .take(24)
        .map(|b| char::from(TOKEN_BYTES[usize::from(*b) % TOKEN_BYTES.len()]))
        .collect();
    if name.is_empty() {
        name.push('x');
    }
    name
}

/// Builds the side call's headers and checks them against the rules that
/// must hold for any request and any target that `config::parse` accepted.
pub fn check_build_headers(
    request: &[(String, Vec<u8>)],
    target: &Target,
    marker_header: &str,
    marker_value: &str,
    body_len: Option<usize>,
) {
    let built = side_request::build_headers(request, target, marker_header, marker_value, body_len);
    let moved = side_request::build_headers_from(
        request.to_vec(),
        target,
        marker_header,
        marker_value,
        body_len,
    );
    assert_eq!(
        moved, built,
        "moving the request's headers must give the same side call"
    );
    let set_value = |name: &str| {
        target
            .set_headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_bytes())
    };
    let connection_listed = connection_tokens(request);
    let idempotency_header = target.idempotency_header.as_deref();

    for (name, value) in &built {
        let from_input = request.iter().any(|(n, _)| n == name);
        assert!(
            (name.starts_with(':') && from_input) || headers::is_valid_name(name),
            "output header name {name:?} is neither a pseudo-header from the input nor a lowercase token"
        );
        // The core keeps `te: trailers` for gRPC, and sets content-length itself.
        let te_trailers = name == "te" && value.eq_ignore_ascii_case(b"trailers");
        assert!(
            name == "content-length" || te_trailers || !headers::is_hop_by_hop(name),
            "hop-by-hop header {name:?} in the side call (marker header {marker_header:?})"
        );
        if headers::has_line_break_or_nul(value) {
            assert!(
                request.iter().any(|(n, v)| n == name && v == value),
                "{name}: value {value:?} contains CR, LF or NUL but no input {name} has it"
            );
        }
        if name != marker_header && Some(name.as_str()) != idempotency_header {
            if let Some(expected) = set_value(name) {
                assert_eq!(
                    value.as_slice(),
                    expected,
                    "{name}: set by the target, but another value remains"
                );
            } else if target.remove_headers.contains(name) {
                panic!("{name}: removed by the target, but still present");
            } else if target.strip_credentials && headers::is_credential(name) {
                panic!("{name}: credential not stripped");
            } else if connection_listed.contains(name) {
                panic!("{name}: listed in Connection, but still present");
            }
        }
    }

    let markers: Vec<&[u8]> = headers::values(&built, marker_header).collect();
    assert_eq!(
        markers,
        vec![marker_value.as_bytes()],
        "marker header {marker_header:?} must appear exactly once"
    );

    let lengths: Vec<&[u8]> = headers::values(&built, "content-length").collect();
    assert!(
        lengths.len() <= 1,
        "content-length appears {} times: {lengths:?}",
        lengths.len()
    );
    let expected_length = body_len.map(|len| len.to_string().into_bytes());
    assert_eq!(
        lengths.first().map(|v| v.to_vec()),
        expected_length,
        "content-length must be the side call's body length"
    );

    for (name, value) in &target.set_headers {
        let values: Vec<&[u8]> = headers::values(&built, name).collect();
        assert_eq!(values, vec![value.as_bytes()], "{name}: set exactly once");
    }

    // The key replaces any value the client sent, as `set` does. Without
    // `x-request-id` there is no key, and the client's value passes.
    if let Some(name) = idempotency_header {
        if let Some(request_id) = headers::first(request, "x-request-id") {
            let rule = marker_value.split('/').next().unwrap_or(marker_value);
            let key = retry::idempotency_key(request_id, rule, &target.name);
            let values: Vec<&[u8]> = headers::values(&built, name).collect();
            assert_eq!(
                values,
                vec![key.as_bytes()],
                "idempotency header {name:?} must carry exactly the derived key"
            );
        }
    }

    // Every request header that no rule above drops reaches the side call.
    for (name, value) in request {
        let te_trailers = name == "te" && value.eq_ignore_ascii_case(b"trailers");
        let dropped = (headers::is_hop_by_hop(name) && !te_trailers)
            || name == marker_header
            || connection_listed.contains(name)
            || target.remove_headers.contains(name)
            || (target.strip_credentials && headers::is_credential(name))
            || idempotency_header == Some(name.as_str())
            || set_value(name).is_some();
        let rewritten = matches!(
            (name.as_str(), &target.authority, &target.path),
            (":authority", Some(_), _) | (":path", _, Some(_))
        );
        if !dropped && !rewritten {
            assert!(
                built.iter().any(|(n, v)| n == name && v == value),
                "{name}: {value:?} was dropped, but no rule drops it"
            );
        }
    }

    let rewrites = [(":authority", &target.authority), (":path", &target.path)];
    for (name, rewrite) in rewrites {
        if let Some(rewrite) = rewrite {
            for value in headers::values(&built, name) {
                assert_eq!(value, rewrite.as_bytes(), "{name} not rewritten");
            }
        }
    }

    check_is_copyable(request);
}

fn check_is_copyable(request: &[(String, Vec<u8>)]) {
    let copyable = side_request::is_copyable(request);
    let connect = headers::first(request, ":method") == Some(b"CONNECT".as_slice());
    let upgrade = request
        .iter()
        .any(|(n, _)| n == "upgrade" || n == ":protocol");
    assert_eq!(copyable, !connect && !upgrade, "is_copyable({request:?})");
}

/// Names listed in the request's `Connection` headers, lowercased. This
/// mirrors the core's parsing, so it catches regressions, not misreadings
/// of RFC 9110 section 7.6.1.
fn connection_tokens(request: &[(String, Vec<u8>)]) -> Vec<String> {
    headers::values(request, "connection")
        .flat_map(|value| value.split(|&b| b == b','))
        .filter_map(|token| std::str::from_utf8(token).ok())
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect()
}
