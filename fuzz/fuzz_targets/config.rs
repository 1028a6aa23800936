//! Fuzzes `config::parse` with arbitrary bytes. When the bytes parse, it
//! also runs every rule's matcher, the sampling decision and
//! `build_headers` on requests derived from the input, and checks that a
//! request built from a rule's own literal conditions matches that rule.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_fanout::core::config::{self, Config, Rule};
use mesh_fanout::core::headers;
use mesh_fanout::core::matcher::{PathMatcher, ValueMatcher};
use mesh_fanout::core::sampling;
use mesh_fanout_fuzz::check_build_headers;

/// Builds a request from pieces of the raw input, so matchers also see
/// non-UTF-8 and unexpected bytes: the pieces between commas become the
/// values of the pseudo-headers and of every header a matcher names.
fn request_from_input(data: &[u8], config: &Config) -> Vec<(String, Vec<u8>)> {
    let mut names: Vec<String> = [":method", ":path", ":authority", "x-request-id"]
        .iter()
        .map(|name| name.to_string())
        .collect();
    for rule in &config.rules {
        names.extend(rule.matcher.headers.iter().map(|h| h.name.clone()));
    }
    names
        .into_iter()
        .zip(data.split(|&b| b == b','))
        .map(|(name, value)| (name, value.to_vec()))
        .collect()
}

/// Builds the request that a rule's literal conditions describe, or `None`
/// when the rule uses a regex or requires a header both present and absent.
fn request_satisfying(rule: &Rule) -> Option<Vec<(String, Vec<u8>)>> {
    let matcher = &rule.matcher;
    let mut request = Vec::new();
    if let Some(method) = matcher.methods.first() {
        request.push((":method".to_string(), method.as_bytes().to_vec()));
    }
    match &matcher.path {
        None => {}
        Some(PathMatcher::Prefix(path)) | Some(PathMatcher::Exact(path)) => {
            request.push((":path".to_string(), path.as_bytes().to_vec()));
        }
        Some(PathMatcher::Regex(_)) => return None,
    }

    let absent: Vec<&str> = matcher
        .headers
        .iter()
        .filter(|h| matches!(h.value, ValueMatcher::Present(false)))
        .map(|h| h.name.as_str())
        .collect();
    for header in &matcher.headers {
        let value = match &header.value {
            ValueMatcher::Exact(value) | ValueMatcher::Prefix(value) => value.clone(),
            ValueMatcher::Present(true) => b"1".to_vec(),
            ValueMatcher::Present(false) => continue,
            ValueMatcher::Regex(_) => return None,
        };
        if absent.contains(&header.name.as_str()) {
            return None;
        }
        request.push((header.name.clone(), value));
    }
    Some(request)
}

fn exercise_rule(config: &Config, rule: &Rule, request: &[(String, Vec<u8>)], body_len: usize) {
    let _ = rule.matcher.matches(request);
    for target in &rule.targets {
        let key = headers::first(request, &target.sample_key);
        let _ = sampling::sampled_in(target.sample_rate, key, || body_len as u64);
        let marker_value = format!("{}/{}", rule.name, target.name);
        let body = target.body.then_some(body_len);
        check_build_headers(request, target, &config.marker_header, &marker_value, body);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = config::parse(data) else {
        return;
    };
    let config = &parsed.config;

    let request = request_from_input(data, config);
    let _ = config.first_match(&request);
    for rule in &config.rules {
        exercise_rule(config, rule, &request, data.len());

        if let Some(own) = request_satisfying(rule) {
            assert!(
                rule.matcher.matches(&own),
                "rule {:?} does not match a request built from its own conditions: {own:?}",
                rule.name
            );
            exercise_rule(config, rule, &own, data.len());
        }
    }
});
