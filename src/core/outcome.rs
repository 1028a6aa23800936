//! The vocabulary of side call results: every dispatched call ends in one
//! [`Outcome`], and every matched target that was not dispatched ends in one
//! [`Skip`]. The `as_str` names are metric label values and log words.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 1xx, 2xx or 3xx from the target.
    Success,
    Status4xx,
    /// A 5xx that the target itself sent.
    Status5xx,
    /// The filter's `timeout_ms` fired before response headers arrived.
    Timeout,
    /// Connection refused, reset or closed before a complete response.
    Reset,
    /// The target cluster's circuit breaker rejected the call.
    Overflow,
    /// Envoy refused to start the call, for example for an unknown cluster.
    DispatchError,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Success,
        Outcome::Status4xx,
        Outcome::Status5xx,
        Outcome::Timeout,
        Outcome::Reset,
        Outcome::Overflow,
        Outcome::DispatchError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Status4xx => "4xx",
            Outcome::Status5xx => "5xx",
            Outcome::Timeout => "timeout",
            Outcome::Reset => "reset",
            Outcome::Overflow => "overflow",
            Outcome::DispatchError => "dispatch_error",
        }
    }

    /// Position in [`Outcome::ALL`], for per-outcome metric tables.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn is_success(self) -> bool {
        self == Outcome::Success
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The sampling decision left this request out.
    SampledOut,
    /// The request body grew past the target's `max_body_bytes`; a
    /// truncated body is never sent.
    BodyTooLarge,
    /// The request already carried the marker header, so it is itself a
    /// side call.
    Loop,
    /// The request ended before its body was complete.
    Aborted,
    /// CONNECT or a protocol upgrade (WebSocket, h2c), which cannot be
    /// replayed as a plain request.
    Unsupported,
    /// The worker already had `max_in_flight_per_worker` side calls running.
    InFlightLimit,
    /// Copying this body would pass the worker's `max_body_bytes_per_worker`.
    BufferLimit,
}

impl Skip {
    pub const ALL: [Skip; 7] = [
        Skip::SampledOut,
        Skip::BodyTooLarge,
        Skip::Loop,
        Skip::Aborted,
        Skip::Unsupported,
        Skip::InFlightLimit,
        Skip::BufferLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Skip::SampledOut => "sampled_out",
            Skip::BodyTooLarge => "body_too_large",
            Skip::Loop => "loop",
            Skip::Aborted => "aborted",
            Skip::Unsupported => "unsupported",
            Skip::InFlightLimit => "in_flight_limit",
            Skip::BufferLimit => "buffer_limit",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What the filter reads of a side call's response to classify it: the
/// status line, two Envoy headers and the start of the body.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResponseSummary<'a> {
    /// `:status`, or `None` when absent or not a number.
    pub status: Option<u16>,
    /// `x-envoy-overloaded` is present.
    pub overloaded: bool,
    /// `x-envoy-upstream-service-time` is present. Envoy's router adds it to
    /// responses that came from an upstream host and not to its own local
    /// replies, so its absence marks a reply that Envoy generated.
    pub from_upstream: bool,
    /// The first bytes of the body, at most [`BODY_PREFIX_BYTES`].
    pub body_prefix: &'a [u8],
}

/// How much of a response body classification needs to read.
pub const BODY_PREFIX_BYTES: usize = 64;

const TIMEOUT_BODY: &[u8] = b"upstream request timeout";
const RESET_BODY: &[u8] = b"upstream connect error or disconnect/reset before headers";

/// Classifies a completed side call. `None` means Envoy delivered no
/// response headers, which it does only when the stream was reset.
pub fn classify(response: Option<&ResponseSummary<'_>>) -> Outcome {
    let Some(response) = response else {
        return Outcome::Reset;
    };
    let Some(status) = response.status else {
        return Outcome::Reset;
    };

    if !response.from_upstream {
        if status == 504 && response.body_prefix.starts_with(TIMEOUT_BODY) {
            return Outcome::Timeout;
        }
        if status == 503 && response.overloaded {
            return Outcome::Overflow;
        }
        // 503 for refused or reset connections, 502 for a response that is
        // not valid HTTP.
        if matches!(status, 502 | 503) && response.body_prefix.starts_with(RESET_BODY) {
            return Outcome::Reset;
        }
    }

    match status {
        100..=399 => Outcome::Success,
        400..=499 => Outcome::Status4xx,
        _ => Outcome::Status5xx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(status: u16, body: &'static [u8]) -> ResponseSummary<'static> {
        ResponseSummary {
            status: Some(status),
            overloaded: false,
            from_upstream: false,
            body_prefix: body,
        }
    }

    fn upstream(status: u16, body: &'static [u8]) -> ResponseSummary<'static> {
        ResponseSummary {
            from_upstream: true,
            ..local(status, body)
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(classify(Some(&upstream(200, b""))), Outcome::Success);
        assert_eq!(classify(Some(&upstream(204, b""))), Outcome::Success);
        assert_eq!(classify(Some(&upstream(302, b""))), Outcome::Success);
        assert_eq!(classify(Some(&upstream(404, b""))), Outcome::Status4xx);
        assert_eq!(classify(Some(&upstream(500, b""))), Outcome::Status5xx);
        assert_eq!(classify(Some(&upstream(599, b""))), Outcome::Status5xx);
    }

    #[test]
    fn envoy_local_replies() {
        assert_eq!(
            classify(Some(&local(504, b"upstream request timeout"))),
            Outcome::Timeout
        );
        let overflow = ResponseSummary {
            overloaded: true,
            ..local(503, b"upstream connect error or disconnect/reset before headers. reset reason: overflow")
        };
        assert_eq!(classify(Some(&overflow)), Outcome::Overflow);
        let refused = local(
            503,
            b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
        );
        assert_eq!(classify(Some(&refused)), Outcome::Reset);
        let protocol_error = local(
            502,
            b"upstream connect error or disconnect/reset before headers. reset reason: protocol error",
        );
        assert_eq!(classify(Some(&protocol_error)), Outcome::Reset);
        assert_eq!(
            classify(Some(&local(503, b"no healthy upstream"))),
            Outcome::Status5xx
        );
    }

    #[test]
    fn upstream_body_cannot_fake_timeout() {
        assert_eq!(
            classify(Some(&upstream(504, b"upstream request timeout"))),
            Outcome::Status5xx
        );
        let overloaded = ResponseSummary {
            overloaded: true,
            ..upstream(503, b"")
        };
        assert_eq!(classify(Some(&overloaded)), Outcome::Status5xx);
    }

    #[test]
    fn missing_headers_or_status_is_reset() {
        assert_eq!(classify(None), Outcome::Reset);
        let garbage = ResponseSummary {
            status: None,
            ..upstream(200, b"")
        };
        assert_eq!(classify(Some(&garbage)), Outcome::Reset);
    }

    #[test]
    fn indexes_match_all_order() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i);
        }
        for (i, skip) in Skip::ALL.iter().enumerate() {
            assert_eq!(skip.index(), i);
        }
    }
}
