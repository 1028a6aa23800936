//! Building the side call's headers from the original request.

use super::config::{DeadLetter, Target};
use super::headers::{self, HeaderList};
use super::outcome::Outcome;
use super::retry;

/// Builds the side call's header list: the original headers in order,
/// without hop-by-hop headers (and without credentials unless the target
/// keeps them), with the target's `authority`, `path` and header edits
/// applied, the marker header added, and `content-length` set to the side
/// call's own body length.
///
/// `x-request-id`, `traceparent` and `tracestate` pass through unchanged
/// (unless the target removes them), so the side call joins the trace.
pub fn build_headers(
    request: &[(String, Vec<u8>)],
    target: &Target,
    marker_header: &str,
    marker_value: &str,
    body_len: Option<usize>,
) -> HeaderList {
    build_headers_from(
        request.to_vec(),
        target,
        marker_header,
        marker_value,
        body_len,
    )
}

/// [`build_headers`] for a request whose header list is not needed again:
/// the kept headers move into the side call instead of being copied.
pub fn build_headers_from(
    mut request: HeaderList,
    target: &Target,
    marker_header: &str,
    marker_value: &str,
    body_len: Option<usize>,
) -> HeaderList {
    let filter = Filter::new(&request, target, marker_header);
    let key = idempotency_key(&request, target, marker_value);
    request.retain(|(name, value)| filter.keeps(name, value));
    complete(request, key, target, marker_header, marker_value, body_len)
}

/// Decides which request headers travel to one target.
struct Filter<'a> {
    target: &'a Target,
    marker_header: &'a str,
    connection_listed: Vec<String>,
}

impl<'a> Filter<'a> {
    fn new(request: &[(String, Vec<u8>)], target: &'a Target, marker_header: &'a str) -> Self {
        Filter {
            target,
            marker_header,
            connection_listed: connection_tokens(request),
        }
    }

    fn keeps(&self, name: &str, value: &[u8]) -> bool {
        let target = self.target;
        if name == self.marker_header || self.connection_listed.iter().any(|t| t == name) {
            return false;
        }
        // `te: trailers` is the one TE value HTTP/2 allows, and gRPC
        // servers require it, so it escapes the hop-by-hop entry of
        // `dropped_headers` but not the target's own edits.
        if name == "te" && value.eq_ignore_ascii_case(b"trailers") {
            return !(target.remove_headers.iter().any(|r| r == name)
                || target.set_headers.iter().any(|(s, _)| s == name)
                || target.idempotency_header.as_deref() == Some(name));
        }
        target
            .dropped_headers
            .binary_search_by(|dropped| dropped.as_str().cmp(name))
            .is_err()
    }
}

/// Derives this target's idempotency key from the request's
/// `x-request-id`. Returns `None` when the target sets no key or the
/// request has no id.
fn idempotency_key(
    request: &[(String, Vec<u8>)],
    target: &Target,
    marker_value: &str,
) -> Option<String> {
    target.idempotency_header.as_ref()?;
    // Without a request id there is nothing stable to derive it from.
    let request_id = headers::first(request, "x-request-id")?;
    Some(retry::idempotency_key(
        request_id,
        rule_of(marker_value),
        &target.name,
    ))
}

/// Rewrites the pseudo-headers the target replaces and appends the
/// headers the filter sets.
fn complete(
    mut out: HeaderList,
    idempotency_key: Option<String>,
    target: &Target,
    marker_header: &str,
    marker_value: &str,
    body_len: Option<usize>,
) -> HeaderList {
    for (name, value) in &mut out {
        let rewrite = match name.as_str() {
            ":authority" => target.authority.as_deref(),
            ":path" => target.path.as_deref(),
            _ => None,
        };
        if let Some(rewrite) = rewrite {
            *value = rewrite.as_bytes().to_vec();
        }
    }
    out.reserve(target.set_headers.len() + 3);
    for (name, value) in &target.set_headers {
        out.push((name.clone(), value.as_bytes().to_vec()));
    }
    if let (Some(name), Some(key)) = (&target.idempotency_header, idempotency_key) {
        out.push((name.clone(), key.into_bytes()));
    }
    out.push((marker_header.to_string(), marker_value.as_bytes().to_vec()));
    if let Some(len) = body_len {
        out.push(("content-length".to_string(), len.to_string().into_bytes()));
    }
    out
}

/// Reports whether the request can be replayed as a side call: CONNECT
/// and protocol upgrades (HTTP/1.1 `Upgrade`, HTTP/2 extended CONNECT with
/// `:protocol`) switch the stream to another protocol and cannot.
pub fn is_copyable(request: &[(String, Vec<u8>)]) -> bool {
    let connect = headers::first(request, ":method") == Some(b"CONNECT".as_slice());
    let upgrade = headers::first(request, "upgrade").is_some()
        || headers::first(request, ":protocol").is_some();
    !connect && !upgrade
}

/// The rule name from a `<rule>/<target>` marker value.
fn rule_of(marker_value: &str) -> &str {
    marker_value.split('/').next().unwrap_or(marker_value)
}

/// How a side call finally failed, for its dead letter.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub attempts: u32,
}

/// Builds the dead letter for a side call that finally failed: a POST to
/// the dead-letter path with the side call's headers, the side call's
/// method, path and authority moved to `x-mesh-fanout-original-*` headers,
/// the failure in `x-mesh-fanout-failure-*` headers, and the same body.
pub fn build_dead_letter_headers(
    side_headers: &[(String, Vec<u8>)],
    dead_letter: &DeadLetter,
    rule: &str,
    target: &str,
    failure: Failure,
    body_len: Option<usize>,
) -> HeaderList {
    let mut out: HeaderList = Vec::with_capacity(side_headers.len() + 10);
    out.push((":method".into(), b"POST".to_vec()));
    out.push((":path".into(), dead_letter.path.as_bytes().to_vec()));
    let original = |name: &str| headers::first(side_headers, name).map(<[u8]>::to_vec);
    if let Some(authority) = original(":authority") {
        out.push((":authority".into(), authority));
    }
    if let Some(scheme) = original(":scheme") {
        out.push((":scheme".into(), scheme));
    }
    for (name, value) in side_headers {
        if !name.starts_with(':') && name != "content-length" {
            out.push((name.clone(), value.clone()));
        }
    }
    for (pseudo, header) in [
        (":method", "x-mesh-fanout-original-method"),
        (":path", "x-mesh-fanout-original-path"),
        (":authority", "x-mesh-fanout-original-authority"),
    ] {
        if let Some(value) = original(pseudo) {
            out.push((header.into(), value));
        }
    }
    out.push(("x-mesh-fanout-rule".into(), rule.as_bytes().to_vec()));
    out.push(("x-mesh-fanout-target".into(), target.as_bytes().to_vec()));
    out.push((
        "x-mesh-fanout-failure-outcome".into(),
        failure.outcome.as_str().as_bytes().to_vec(),
    ));
    if let Some(status) = failure.status {
        out.push((
            "x-mesh-fanout-failure-status".into(),
            status.to_string().into_bytes(),
        ));
    }
    out.push((
        "x-mesh-fanout-attempts".into(),
        failure.attempts.to_string().into_bytes(),
    ));
    if let Some(len) = body_len {
        out.push(("content-length".into(), len.to_string().into_bytes()));
    }
    out
}

/// Header names listed in `Connection`, which RFC 9110 makes hop-by-hop.
fn connection_tokens(request: &[(String, Vec<u8>)]) -> Vec<String> {
    headers::values(request, "connection")
        .flat_map(|value| value.split(|&b| b == b','))
        .filter_map(|token| std::str::from_utf8(token).ok())
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config;

    fn target(json: &str) -> Target {
        let config = format!(r#"{{"rules": [{{"name": "r", "targets": [{json}]}}]}}"#);
        let mut parsed = config::parse(config.as_bytes()).unwrap();
        parsed.config.rules.remove(0).targets.remove(0)
    }

    fn request() -> HeaderList {
        [
            (":method", b"POST".as_slice()),
            (":path", b"/api/v1/register?ref=x"),
            (":authority", b"users.example"),
            (":scheme", b"http"),
            ("content-type", b"application/json"),
            ("content-length", b"11"),
            ("transfer-encoding", b"chunked"),
            ("connection", b"keep-alive, x-conn-only"),
            ("keep-alive", b"timeout=5"),
            ("x-conn-only", b"1"),
            ("x-request-id", b"abc-123"),
            (
                "traceparent",
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("tracestate", b"vendor=1"),
            ("authorization", b"Bearer secret"),
            ("cookie", b"a=1"),
            ("x-source", b"client"),
            ("x-multi", b"1"),
            ("x-multi", b"2"),
            ("x-latin1", b"caf\xe9"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect()
    }

    fn names(list: &HeaderList) -> Vec<&str> {
        list.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn strips_hop_by_hop_and_adds_marker() {
        let built = build_headers(
            &request(),
            &target(r#"{"name": "t", "cluster": "c"}"#),
            "x-mesh-fanout",
            "r/t",
            Some(11),
        );
        let names = names(&built);
        for gone in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "x-conn-only",
        ] {
            assert!(!names.contains(&gone), "{gone} still present in {names:?}");
        }
        assert_eq!(
            headers::first(&built, "x-mesh-fanout"),
            Some(b"r/t".as_slice())
        );
        assert_eq!(
            headers::values(&built, "content-length").collect::<Vec<_>>(),
            vec![b"11".as_slice()]
        );
    }

    #[test]
    fn keeps_trace_and_raw_values() {
        let built = build_headers(
            &request(),
            &target(r#"{"name": "t", "cluster": "c"}"#),
            "x-mesh-fanout",
            "r/t",
            None,
        );
        assert_eq!(
            headers::first(&built, "x-request-id"),
            Some(b"abc-123".as_slice())
        );
        assert_eq!(
            headers::first(&built, "traceparent"),
            Some(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".as_slice())
        );
        assert_eq!(
            headers::first(&built, "tracestate"),
            Some(b"vendor=1".as_slice())
        );
        assert_eq!(
            headers::first(&built, "x-latin1"),
            Some(b"caf\xe9".as_slice())
        );
        let multi: Vec<&[u8]> = headers::values(&built, "x-multi").collect();
        assert_eq!(multi, vec![b"1".as_slice(), b"2".as_slice()]);
        assert_eq!(
            headers::first(&built, ":authority"),
            Some(b"users.example".as_slice())
        );
        assert_eq!(
            headers::first(&built, ":path"),
            Some(b"/api/v1/register?ref=x".as_slice())
        );
        assert_eq!(headers::first(&built, "content-length"), None);
    }

    #[test]
    fn applies_target_edits() {
        let t = target(
            r#"{"name": "t", "cluster": "c", "authority": "analytics.internal", "path": "/ingest",
                "headers": {"set": {"x-source": "mesh-fanout"}, "remove": ["authorization", "cookie"]}}"#,
        );
        let built = build_headers(&request(), &t, "x-mesh-fanout", "r/t", Some(0));
        assert_eq!(
            headers::first(&built, ":authority"),
            Some(b"analytics.internal".as_slice())
        );
        assert_eq!(headers::first(&built, ":path"), Some(b"/ingest".as_slice()));
        assert_eq!(
            headers::values(&built, "x-source").collect::<Vec<_>>(),
            vec![b"mesh-fanout".as_slice()]
        );
        assert_eq!(headers::first(&built, "authorization"), None);
        assert_eq!(headers::first(&built, "cookie"), None);
        assert_eq!(headers::first(&built, ":method"), Some(b"POST".as_slice()));
    }

    #[test]
    fn never_forces_shadow_suffix() {
        let built = build_headers(
            &request(),
            &target(r#"{"name": "t", "cluster": "c"}"#),
            "x-mesh-fanout",
            "r/t",
            None,
        );
        let authority = headers::first(&built, ":authority").unwrap();
        assert!(!authority.ends_with(b"-shadow"));
    }

    #[test]
    fn credentials_stripped_unless_kept() {
        let stripped = build_headers(
            &request(),
            &target(r#"{"name": "t", "cluster": "c"}"#),
            "x-mesh-fanout",
            "r/t",
            None,
        );
        assert_eq!(headers::first(&stripped, "authorization"), None);
        assert_eq!(headers::first(&stripped, "cookie"), None);

        let kept = build_headers(
            &request(),
            &target(r#"{"name": "t", "cluster": "c", "strip_credentials": false}"#),
            "x-mesh-fanout",
            "r/t",
            None,
        );
        assert_eq!(
            headers::first(&kept, "authorization"),
            Some(b"Bearer secret".as_slice())
        );
        assert_eq!(headers::first(&kept, "cookie"), Some(b"a=1".as_slice()));
    }

    #[test]
    fn idempotency_key_added_and_stable() {
        let t = target(r#"{"name": "t", "cluster": "c", "idempotency_header": "idempotency-key"}"#);
        let first = build_headers(&request(), &t, "x-mesh-fanout", "signup/t", None);
        let again = build_headers(&request(), &t, "x-mesh-fanout", "signup/t", None);
        let key = headers::first(&first, "idempotency-key").unwrap();
        assert_eq!(
            key,
            retry::idempotency_key(b"abc-123", "signup", "t").as_bytes()
        );
        assert_eq!(headers::first(&again, "idempotency-key"), Some(key));

        let mut spoofed = request();
        spoofed.push(("idempotency-key".into(), b"from-client".to_vec()));
        let built = build_headers(&spoofed, &t, "x-mesh-fanout", "signup/t", None);
        let keys: Vec<&[u8]> = headers::values(&built, "idempotency-key").collect();
        assert_eq!(keys, vec![key], "the derived key replaces a client's value");

        let mut no_id = request();
        no_id.retain(|(n, _)| n != "x-request-id");
        let built = build_headers(&no_id, &t, "x-mesh-fanout", "signup/t", None);
        assert_eq!(headers::first(&built, "idempotency-key"), None);
    }

    #[test]
    fn dead_letter_carries_original_and_failure() {
        let t = target(r#"{"name": "t", "cluster": "c", "path": "/ingest"}"#);
        let side = build_headers(&request(), &t, "x-mesh-fanout", "signup/t", Some(11));
        let dead_letter = DeadLetter {
            cluster: "dlq".into(),
            path: "/dead-letters".into(),
            timeout_ms: 1000,
        };
        let failure = Failure {
            outcome: Outcome::Status5xx,
            status: Some(503),
            attempts: 3,
        };
        let built =
            build_dead_letter_headers(&side, &dead_letter, "signup", "t", failure, Some(11));
        let get = |name: &str| headers::first(&built, name);
        assert_eq!(get(":method"), Some(b"POST".as_slice()));
        assert_eq!(get(":path"), Some(b"/dead-letters".as_slice()));
        assert_eq!(get(":authority"), Some(b"users.example".as_slice()));
        assert_eq!(
            get("x-mesh-fanout-original-method"),
            Some(b"POST".as_slice())
        );
        assert_eq!(
            get("x-mesh-fanout-original-path"),
            Some(b"/ingest".as_slice())
        );
        assert_eq!(
            get("x-mesh-fanout-original-authority"),
            Some(b"users.example".as_slice())
        );
        assert_eq!(
            get("x-mesh-fanout-failure-outcome"),
            Some(b"5xx".as_slice())
        );
        assert_eq!(get("x-mesh-fanout-failure-status"), Some(b"503".as_slice()));
        assert_eq!(get("x-mesh-fanout-attempts"), Some(b"3".as_slice()));
        assert_eq!(get("x-mesh-fanout-rule"), Some(b"signup".as_slice()));
        assert_eq!(get("x-mesh-fanout-target"), Some(b"t".as_slice()));
        assert_eq!(
            get("x-mesh-fanout"),
            Some(b"signup/t".as_slice()),
            "the marker stays, so the dead letter is not copied again"
        );
        assert_eq!(get("content-type"), Some(b"application/json".as_slice()));
        assert_eq!(
            headers::values(&built, "content-length").collect::<Vec<_>>(),
            vec![b"11".as_slice()]
        );
        assert_eq!(headers::values(&built, ":method").count(), 1);
    }

    #[test]
    fn connect_and_upgrades_not_copyable() {
        let with = |name: &str, value: &[u8]| {
            let mut list = request();
            list.retain(|(n, _)| n != name);
            list.push((name.to_string(), value.to_vec()));
            list
        };
        assert!(is_copyable(&request()));
        assert!(!is_copyable(&with(":method", b"CONNECT")));
        assert!(!is_copyable(&with("upgrade", b"websocket")));
        assert!(!is_copyable(&with("upgrade", b"h2c")));
        assert!(!is_copyable(&with(":protocol", b"websocket")));
    }

    #[test]
    fn te_kept_only_for_trailers() {
        let mut grpc = request();
        grpc.push(("te".into(), b"trailers".to_vec()));
        let built = build_headers(
            &grpc,
            &target(r#"{"name": "t", "cluster": "c"}"#),
            "x-mesh-fanout",
            "r/t",
            None,
        );
        assert_eq!(headers::first(&built, "te"), Some(b"trailers".as_slice()));

        let mut other = request();
        other.push(("te".into(), b"gzip".to_vec()));
        let built = build_headers(
            &other,
            &target(r#"{"name": "t", "cluster": "c"}"#),
            "x-mesh-fanout",
            "r/t",
            None,
        );
        assert_eq!(headers::first(&built, "te"), None);
    }

    #[test]
    fn incoming_marker_replaced() {
        let mut req = request();
        req.push(("x-mesh-fanout".into(), b"spoofed".to_vec()));
        let built = build_headers(
            &req,
            &target(r#"{"name": "t", "cluster": "c"}"#),
            "x-mesh-fanout",
            "r/t",
            None,
        );
        let markers: Vec<&[u8]> = headers::values(&built, "x-mesh-fanout").collect();
        assert_eq!(markers, vec![b"r/t".as_slice()]);
    }

    #[test]
    fn moved_headers_match_copied_ones() {
        let mut req = request();
        req.push(("te".into(), b"trailers".to_vec()));
        req.push(("x-mesh-fanout".into(), b"spoofed".to_vec()));
        let targets = [
            r#"{"name": "t", "cluster": "c"}"#,
            r#"{"name": "t", "cluster": "c", "strip_credentials": false,
                "authority": "side.example", "path": "/shadow",
                "idempotency_header": "idempotency-key",
                "headers": {"set": {"x-source": "shadow"}, "remove": ["x-multi"]}}"#,
        ];
        for json in targets {
            let target = target(json);
            for body_len in [None, Some(11)] {
                let copied = build_headers(&req, &target, "x-mesh-fanout", "r/t", body_len);
                let moved =
                    build_headers_from(req.clone(), &target, "x-mesh-fanout", "r/t", body_len);
                assert_eq!(moved, copied, "target {json}, body {body_len:?}");
            }
        }
    }

    #[test]
    fn dropped_headers_sorted_for_binary_search() {
        let target = target(
            r#"{"name": "t", "cluster": "c", "headers": {"set": {"a-first": "1"}, "remove": ["zz-last"]}}"#,
        );
        let mut sorted = target.dropped_headers.clone();
        sorted.sort();
        assert_eq!(target.dropped_headers, sorted);
        for name in [
            "a-first",
            "zz-last",
            "connection",
            "authorization",
            "x-mesh-fanout",
        ] {
            assert!(
                target.dropped_headers.iter().any(|d| d == name),
                "{name} missing"
            );
        }
        assert_eq!(target.marker_value, "r/t");
    }
}
