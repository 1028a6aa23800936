//! Reading what classification needs from a side call's response.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

use crate::core::outcome::{self, Outcome, ResponseSummary};

/// Classifies the response of the call being delivered, reading the
/// status, two headers and at most [`outcome::BODY_PREFIX_BYTES`] of the
/// body, however large the response is. Returns the outcome and status.
pub fn classify_current(num_headers: usize, body_size: usize) -> (Outcome, Option<u16>) {
    // Envoy delivers no headers only when the stream was reset.
    if num_headers == 0 {
        return (outcome::classify(None), None);
    }
    let header = |name: &str| {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name)
            .ok()
            .flatten()
    };
    let status = header(":status").and_then(|v| {
        std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
    });
    // Only Envoy's own 502, 503 and 504 replies need a closer look; for
    // every other status one host call is enough.
    if !matches!(status, Some(502..=504)) {
        let summary = ResponseSummary {
            status,
            from_upstream: true,
            ..ResponseSummary::default()
        };
        return (outcome::classify(Some(&summary)), status);
    }
    let body_prefix = if body_size == 0 {
        Vec::new()
    } else {
        hostcalls::get_buffer(
            BufferType::HttpCallResponseBody,
            0,
            body_size.min(outcome::BODY_PREFIX_BYTES),
        )
        .ok()
        .flatten()
        .unwrap_or_default()
    };
    let summary = ResponseSummary {
        status,
        overloaded: header("x-envoy-overloaded").is_some(),
        from_upstream: header("x-envoy-upstream-service-time").is_some(),
        body_prefix: &body_prefix,
    };
    (outcome::classify(Some(&summary)), status)
}
