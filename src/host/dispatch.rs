//! Starting a side call with `proxy_http_call`, header bytes intact.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::core::outcome::Outcome;

/// Starts an HTTP call to `cluster` and returns the host's token.
///
/// Envoy returns `BadArgument` for a cluster it does not know or a header
/// list without `:method`, `:path` or `:authority`, and `InternalFailure`
/// when it could not start the stream.
pub fn http_call(
    cluster: &str,
    headers: &[(String, Vec<u8>)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, Status> {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(name, value)| (name.as_str(), value_as_str(value)))
        .collect();
    hostcalls::dispatch_http_call(cluster, pairs, body, Vec::new(), timeout)
}

/// Maps Envoy's refusal to start a call to an outcome. `InternalFailure`
/// means the async client rejected the request at once. In Envoy 1.40 that
/// happens when the target cluster's circuit breakers overflow or it has no
/// healthy host, both the mesh shedding load, so they count as overflow.
pub fn refusal_outcome(status: Status) -> Outcome {
    match status {
        Status::InternalFailure => Outcome::Overflow,
        _ => Outcome::DispatchError,
    }
}

/// Explains a refusal in a log line, with the likely fix.
pub fn refusal_hint(status: Status, cluster: &str) -> String {
    match status {
        Status::BadArgument => format!("Envoy rejected the call (BadArgument): cluster {cluster:?} is not defined in Envoy"),
        Status::InternalFailure => format!(
            "Envoy rejected the call at once (InternalFailure): cluster {cluster:?} overflowed its circuit breakers or has no healthy host"
        ),
        other => format!("Envoy rejected the call ({other:?}) for cluster {cluster:?}"),
    }
}

/// Passes a header value to the SDK, whose `dispatch_http_call` takes
/// `&str` although HTTP header values are bytes (obs-text, RFC 9110
/// section 5.5). UTF-8 values take the checked path.
#[allow(unsafe_code)]
fn value_as_str(value: &[u8]) -> &str {
    match std::str::from_utf8(value) {
        Ok(text) => text,
        // SAFETY: a `str` that is not UTF-8 is unsound only where code relies
        // on the encoding. proxy-wasm 0.2.5 (pinned in Cargo.toml) only calls
        // `len()` and `as_bytes()` on these values while serializing the
        // header map, and this function's callers do nothing else with them.
        Err(_) => unsafe { std::str::from_utf8_unchecked(value) },
    }
}
