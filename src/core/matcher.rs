//! Request matching, compiled once per configuration and run on raw bytes.

use regex_lite::Regex;

use super::headers;

#[derive(Debug)]
pub enum PathMatcher {
    /// Matches the start of `:path`, query string included, as Envoy's route
    /// `prefix` does.
    Prefix(String),
    /// Matches `:path` with the query string removed.
    Exact(String),
    /// Matches the whole of `:path` with the query string removed. A path
    /// that is not UTF-8 never matches.
    Regex(Regex),
}

#[derive(Debug)]
pub enum ValueMatcher {
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    /// Matches the whole value. A value that is not UTF-8 never matches,
    /// because regex-lite (chosen for its small Wasm size) matches `str` only.
    Regex(Regex),
    /// `true`: the header is present; `false`: it is absent.
    Present(bool),
}

#[derive(Debug)]
pub struct HeaderMatcher {
    pub name: String,
    pub value: ValueMatcher,
}

#[derive(Debug, Default)]
pub struct RequestMatcher {
    /// Empty means any method.
    pub methods: Vec<String>,
    pub path: Option<PathMatcher>,
    /// All must match.
    pub headers: Vec<HeaderMatcher>,
}

impl RequestMatcher {
    pub fn matches(&self, request_headers: &[(String, Vec<u8>)]) -> bool {
        if !self.methods.is_empty() {
            let method = headers::first(request_headers, ":method").unwrap_or_default();
            if !self.methods.iter().any(|m| m.as_bytes() == method) {
                return false;
            }
        }

        if let Some(path_matcher) = &self.path {
            let path = headers::first(request_headers, ":path").unwrap_or_default();
            if !path_matcher.matches(path) {
                return false;
            }
        }

        self.headers.iter().all(|h| h.matches(request_headers))
    }

    /// Reports whether `path` passes the path condition, whatever the
    /// method and headers. The filter reads `:path` first and skips the
    /// `:method` read for requests whose path no rule accepts.
    pub fn path_allows(&self, path: &[u8]) -> bool {
        self.path
            .as_ref()
            .is_none_or(|matcher| matcher.matches(path))
    }

    /// Reports whether every method and every origin-form path (one that
    /// starts with `/`) pass the method and path conditions.
    pub fn accepts_any_method_and_path(&self) -> bool {
        let any_path = match &self.path {
            None => true,
            Some(PathMatcher::Prefix(prefix)) => prefix.is_empty() || prefix == "/",
            Some(_) => false,
        };
        self.methods.is_empty() && any_path
    }
}

impl PathMatcher {
    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatcher::Prefix(prefix) => path.starts_with(prefix.as_bytes()),
            PathMatcher::Exact(exact) => strip_query(path) == exact.as_bytes(),
            PathMatcher::Regex(regex) => regex_matches(regex, strip_query(path)),
        }
    }
}

impl HeaderMatcher {
    /// Matches when any one value of a repeated header matches.
    fn matches(&self, request_headers: &[(String, Vec<u8>)]) -> bool {
        let mut values = headers::values(request_headers, &self.name);
        match &self.value {
            ValueMatcher::Present(expected) => values.next().is_some() == *expected,
            ValueMatcher::Exact(exact) => values.any(|v| v == exact.as_slice()),
            ValueMatcher::Prefix(prefix) => values.any(|v| v.starts_with(prefix)),
            ValueMatcher::Regex(regex) => values.any(|v| regex_matches(regex, v)),
        }
    }
}

fn regex_matches(regex: &Regex, bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|s| regex.is_match(s))
}

fn strip_query(path: &[u8]) -> &[u8] {
    match path.iter().position(|&b| b == b'?') {
        Some(end) => path.get(..end).unwrap_or(path),
        None => path,
    }
}

/// Compiles `pattern` so that it must match a whole value, as Envoy's
/// `safe_regex` matchers do.
pub fn compile_full_match(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::headers::HeaderList;

    fn request(method: &str, path: &str, extra: &[(&str, &[u8])]) -> HeaderList {
        let mut list: HeaderList = vec![
            (":method".into(), method.as_bytes().to_vec()),
            (":path".into(), path.as_bytes().to_vec()),
        ];
        for (name, value) in extra {
            list.push((name.to_string(), value.to_vec()));
        }
        list
    }

    #[test]
    fn empty_matcher_matches_everything() {
        let matcher = RequestMatcher::default();
        assert!(matcher.matches(&request("GET", "/", &[])));
    }

    #[test]
    fn methods_compare_exactly() {
        let matcher = RequestMatcher {
            methods: vec!["POST".into(), "PUT".into()],
            ..Default::default()
        };
        assert!(matcher.matches(&request("PUT", "/", &[])));
        assert!(!matcher.matches(&request("GET", "/", &[])));
        assert!(!matcher.matches(&request("post", "/", &[])));
    }

    #[test]
    fn path_allows_ignores_method_and_headers() {
        let matcher = RequestMatcher {
            methods: vec!["POST".into()],
            path: Some(PathMatcher::Exact("/api/v1/register".into())),
            headers: vec![HeaderMatcher {
                name: "x-tenant".into(),
                value: ValueMatcher::Present(true),
            }],
        };
        for path in ["/api/v1/register", "/api/v1/register?x=1", "/bench", ""] {
            let full = request("POST", path, &[("x-tenant", b"a")]);
            assert_eq!(
                matcher.path_allows(path.as_bytes()),
                matcher.matches(&full),
                "{path}"
            );
        }
        assert!(RequestMatcher::default().path_allows(b"/anything"));
    }

    #[test]
    fn prefix_includes_query() {
        let matcher = RequestMatcher {
            path: Some(PathMatcher::Prefix("/api/v1/register".into())),
            ..Default::default()
        };
        assert!(matcher.matches(&request("POST", "/api/v1/register?x=1", &[])));
        assert!(matcher.matches(&request("POST", "/api/v1/registered", &[])));
        assert!(!matcher.matches(&request("POST", "/api/v1/regis", &[])));
    }

    #[test]
    fn exact_and_regex_ignore_query() {
        let exact = RequestMatcher {
            path: Some(PathMatcher::Exact("/a".into())),
            ..Default::default()
        };
        assert!(exact.matches(&request("GET", "/a?b=c", &[])));
        assert!(!exact.matches(&request("GET", "/a/b", &[])));

        let regex = RequestMatcher {
            path: Some(PathMatcher::Regex(
                compile_full_match("/users/[0-9]+").unwrap(),
            )),
            ..Default::default()
        };
        assert!(regex.matches(&request("GET", "/users/42?x", &[])));
        assert!(!regex.matches(&request("GET", "/users/42/posts", &[])));
    }

    #[test]
    fn headers_all_must_match() {
        let matcher = RequestMatcher {
            headers: vec![
                HeaderMatcher {
                    name: "x-tenant".into(),
                    value: ValueMatcher::Exact(b"acme".to_vec()),
                },
                HeaderMatcher {
                    name: "x-debug".into(),
                    value: ValueMatcher::Present(true),
                },
            ],
            ..Default::default()
        };
        assert!(matcher.matches(&request(
            "GET",
            "/",
            &[("x-tenant", b"acme"), ("x-debug", b"")]
        )));
        assert!(!matcher.matches(&request("GET", "/", &[("x-tenant", b"acme")])));
        assert!(!matcher.matches(&request(
            "GET",
            "/",
            &[("x-tenant", b"other"), ("x-debug", b"1")]
        )));
    }

    #[test]
    fn repeated_header_any_value_matches() {
        let matcher = RequestMatcher {
            headers: vec![HeaderMatcher {
                name: "x-tenant".into(),
                value: ValueMatcher::Prefix(b"ac".to_vec()),
            }],
            ..Default::default()
        };
        assert!(matcher.matches(&request(
            "GET",
            "/",
            &[("x-tenant", b"zz"), ("x-tenant", b"acme")]
        )));
    }

    #[test]
    fn absent_and_non_utf8_values() {
        let absent = RequestMatcher {
            headers: vec![HeaderMatcher {
                name: "x-skip".into(),
                value: ValueMatcher::Present(false),
            }],
            ..Default::default()
        };
        assert!(absent.matches(&request("GET", "/", &[])));
        assert!(!absent.matches(&request("GET", "/", &[("x-skip", b"1")])));

        let exact = RequestMatcher {
            headers: vec![HeaderMatcher {
                name: "x-name".into(),
                value: ValueMatcher::Exact(b"caf\xe9".to_vec()),
            }],
            ..Default::default()
        };
        assert!(exact.matches(&request("GET", "/", &[("x-name", b"caf\xe9")])));
    }
}
