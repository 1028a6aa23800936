//! Starting a side call with `proxy_http_call`, header bytes intact.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

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
