//! Checks that deserialization errors keep the paths and messages that
//! serde_path_to_error 0.1 gave, which the filter used before `json_path`
//! replaced it to make the module smaller. The inputs are a configuration
//! that sets every field, in compact and in pretty JSON, with one value
//! replaced, one member removed, repeated or added, one byte changed, or a
//! few tokens inserted, removed or replaced at random. Both sides read
//! through the same `Deserialize` impls, so the tests compare paths and
//! messages, not which JSON shapes the structs accept.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    describe, error, missing_field_name, readable_types, strip_position, ConfigError, RawConfig,
};

/// Deserializes with serde_path_to_error and maps its error as
/// `deserialize` did before `json_path` existed.
fn reference_error(bytes: &[u8]) -> Option<ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let e = serde_path_to_error::deserialize::<_, RawConfig>(&mut deserializer).err()?;
    let mut path = e.path().to_string();
    let inner = e.into_inner();
    let syntax = inner.is_syntax() || inner.is_eof();
    let message = readable_types(&inner.to_string());
    if let Some(field) = missing_field_name(&message) {
        path = if path == "." {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        return Some(error(path, "missing"));
    }
    if syntax {
        return Some(error("", format!("invalid JSON: {message}")));
    }
    if path == "." {
        return Some(error("", message));
    }
    Some(error(path, strip_position(&message)))
}

fn scanned_error(bytes: &[u8]) -> Option<ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    <RawConfig as Deserialize>::deserialize(&mut deserializer)
        .err()
        .map(|e| describe(bytes, &e))
}

/// Counts of the compared inputs by result.
#[derive(Default)]
struct Tally {
    accepted: usize,
    errors_without_path: usize,
    errors_with_path: usize,
}

impl Tally {
    fn compare(&mut self, text: &[u8]) {
        let expected = reference_error(text);
        let actual = scanned_error(text);
        assert_eq!(actual, expected, "input: {}", String::from_utf8_lossy(text));
        match expected {
            None => self.accepted += 1,
            Some(e) if e.path.is_empty() => self.errors_without_path += 1,
            Some(_) => self.errors_with_path += 1,
        }
    }

    /// Compares `value` printed in compact and in pretty JSON.
    fn compare_value(&mut self, value: &Value) {
        self.compare(value.to_string().as_bytes());
        let pretty = serde_json::to_string_pretty(value).expect("a Value always serializes");
        self.compare(pretty.as_bytes());
    }
}

/// Returns a configuration that sets every field at least once.
fn full_config() -> Value {
    json!({
        "marker_header": "x-mesh-fanout",
        "strip_incoming_marker": false,
        "limits": {
            "max_in_flight_per_worker": 100,
            "max_body_bytes_per_worker": 1048576,
            "retry_budget_percent": 20,
            "min_retry_concurrency": 3
        },
        "rules": [
            {
                "name": "signup",
                "match": {
                    "methods": ["POST", "PUT"],
                    "path": {"prefix": "/api"},
                    "headers": [
                        {"name": "x-tenant", "exact": "acme"},
                        {"name": "x-debug", "present": true}
                    ]
                },
                "mode": "shadow",
                "targets": [{
                    "name": "analytics",
                    "cluster": "analytics",
                    "timeout_ms": 2000,
                    "sample_percent": 50.5,
                    "sample_key": "x-request-id",
                    "authority": "analytics.internal",
                    "path": "/ingest",
                    "headers": {"set": {"x-source": "mesh-fanout"}, "remove": ["cookie"]},
                    "body": true,
                    "max_body_bytes": 1024,
                    "await": false,
                    "strip_credentials": true,
                    "retry": {"attempts": 3, "backoff_ms": {"base": 50, "max": 1000}, "on": ["5xx"]},
                    "idempotency_header": "idempotency-key",
                    "dead_letter": {"cluster": "dlq", "path": "/dead", "timeout_ms": 500}
                }]
            },
            {
                "name": "orders",
                "match": {"path": {"regex": "/orders/[0-9]+"}},
                "mode": "fanout",
                "on_failure": "fail",
                "result_header": "x-result",
                "targets": [
                    {"name": "a", "cluster": "a", "await": true},
                    {"name": "b", "cluster": "b"}
                ]
            }
        ]
    })
}

/// Lists the JSON Pointer of every value below the root, parents first.
fn pointers(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(members) => {
            for (key, member) in members {
                let pointer = format!("{prefix}/{}", key.replace('~', "~0").replace('/', "~1"));
                out.push(pointer.clone());
                pointers(member, &pointer, out);
            }
        }
        Value::Array(elements) => {
            for (index, element) in elements.iter().enumerate() {
                let pointer = format!("{prefix}/{index}");
                out.push(pointer.clone());
                pointers(element, &pointer, out);
            }
        }
        _ => {}
    }
}

/// Splits a pointer into its parent's pointer and its last token.
fn split_pointer(pointer: &str) -> (&str, String) {
    let (parent, token) = pointer.rsplit_once('/').expect("pointers start with /");
    (parent, token.replace("~1", "/").replace("~0", "~"))
}

fn replacements() -> Vec<Value> {
    [
        r#""x""#,
        r#""\"]},[""#,
        "5",
        "-5",
        "1.5",
        "0",
        "4294967296",
        "18446744073709551616",
        "true",
        "null",
        "[]",
        "{}",
        r#"["x"]"#,
        "[5]",
        "[[]]",
        r#"{"x": 1}"#,
        r#"{"fanout": null}"#,
        r#"{"mirror": null}"#,
        r#"{"fanout": 5}"#,
        r#"{"name": "t"}"#,
        r#"[{"name": "t", "cluster": "c"}, {"name": "u"}]"#,
    ]
    .iter()
    .map(|text| serde_json::from_str(text).expect("valid replacement"))
    .collect()
}

/// The full configuration and the JSON pointer of every value in it.
fn config_and_pointers() -> (Value, Vec<String>) {
    let config = full_config();
    let mut all = Vec::new();
    pointers(&config, "", &mut all);
    (config, all)
}

#[test]
fn full_config_accepted() {
    assert_eq!(scanned_error(full_config().to_string().as_bytes()), None);
}

#[test]
fn replaced_values_match_reference() {
    let (config, all) = config_and_pointers();
    let mut tally = Tally::default();
    for pointer in &all {
        for replacement in replacements() {
            let mut mutated = config.clone();
            *mutated.pointer_mut(pointer).expect("listed pointer") = replacement;
            tally.compare_value(&mutated);
        }
    }
    assert!(tally.errors_with_path > 1000, "{}", tally.errors_with_path);
    assert!(tally.accepted > 50, "{}", tally.accepted);
}

#[test]
fn removed_members_match_reference() {
    let (config, all) = config_and_pointers();
    let mut tally = Tally::default();
    for pointer in &all {
        let (parent, token) = split_pointer(pointer);
        let mut mutated = config.clone();
        match mutated.pointer_mut(parent) {
            Some(Value::Object(members)) => {
                members.remove(&token);
            }
            Some(Value::Array(elements)) => {
                elements.remove(token.parse::<usize>().expect("array index"));
            }
            _ => panic!("{parent} is not a container"),
        }
        tally.compare_value(&mutated);
    }
    assert!(tally.errors_with_path > 10, "{}", tally.errors_with_path);
}

#[test]
fn added_members_match_reference() {
    let config = full_config();
    let mut all = vec![String::new()];
    pointers(&config, "", &mut all);
    let mut tally = Tally::default();
    for pointer in &all {
        for (key, value) in [
            ("zz", json!(1)),
            ("zz\"[", json!({"a": [1]})),
            ("x-added", json!("v")),
        ] {
            let mut mutated = config.clone();
            if let Some(Value::Object(members)) = mutated.pointer_mut(pointer) {
                members.insert(key.to_string(), value);
                tally.compare_value(&mutated);
            }
        }
    }
    assert!(tally.errors_with_path > 30, "{}", tally.errors_with_path);
}

#[test]
fn repeated_members_match_reference() {
    // A `Value` cannot hold a key twice, so a placeholder string marks the
    // member and is replaced in the printed text by two copies of it.
    const PLACEHOLDER: &str = "\u{0}repeat\u{0}";
    let placeholder_json = serde_json::to_string(PLACEHOLDER).expect("a string serializes");
    let (config, all) = config_and_pointers();
    let mut tally = Tally::default();
    for pointer in &all {
        let (parent, key) = split_pointer(pointer);
        if !config.pointer(parent).is_some_and(Value::is_object) {
            continue;
        }
        let original = config.pointer(pointer).expect("listed pointer").to_string();
        let mut mutated = config.clone();
        *mutated.pointer_mut(pointer).expect("listed pointer") = json!(PLACEHOLDER);
        let key_json = serde_json::to_string(&key).expect("a string serializes");
        let repeated = format!("{original}, {key_json}: {original}");
        for text in [
            mutated.to_string(),
            serde_json::to_string_pretty(&mutated).expect("a Value always serializes"),
        ] {
            tally.compare(text.replace(&placeholder_json, &repeated).as_bytes());
        }
    }
    assert!(tally.errors_with_path > 50, "{}", tally.errors_with_path);
}

#[test]
fn changed_bytes_match_reference() {
    let config = full_config();
    let mut tally = Tally::default();
    for text in [
        config.to_string(),
        serde_json::to_string_pretty(&config).expect("a Value always serializes"),
    ] {
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            let mut removed = bytes.to_vec();
            removed.remove(i);
            tally.compare(&removed);
            for replacement in [b'"', b',', b']', b'}', b'1', b'\\', b'\n'] {
                let mut changed = bytes.to_vec();
                changed[i] = replacement;
                tally.compare(&changed);
            }
        }
    }
    assert!(
        tally.errors_without_path > 1000,
        "{}",
        tally.errors_without_path
    );
    assert!(tally.errors_with_path > 100, "{}", tally.errors_with_path);
}

#[test]
fn key_closed_by_brace_matches_reference() {
    // serde_json reads the key, reports the unknown field, then reads `}`.
    let mut tally = Tally::default();
    for text in [
        r#"{"rules": [{"name": "r", "targets": [{"name": "t", "cluster": "c", "bad"}]}]}"#,
        r#"{"rules": [{"name": "r", "targets": [{"bad" }]}]}"#,
        r#"{"bad"}"#,
        r#"{"rules": [{"name": "r", "name"}]}"#,
    ] {
        tally.compare(text.as_bytes());
    }
    assert_eq!(tally.errors_with_path, 4);
    assert_eq!(
        scanned_error(br#"{"rules": [{"name": "r", "targets": [{"bad" }]}]}"#).map(|e| e.path),
        Some("rules[0].targets[0].bad".to_string())
    );
}

#[test]
fn random_edits_match_reference() {
    const TOKENS: [&str; 26] = [
        "\"",
        ",",
        "]",
        "}",
        "[",
        "{",
        ":",
        "1",
        "-1",
        "1.5",
        "null",
        "true",
        "\"x\"",
        "\\",
        "\n",
        " ",
        "\"name\"",
        "\"zz\"",
        "[]",
        "{}",
        "\"cluster\": \"c\"",
        "\"targets\"",
        "\"fanout\"",
        "\"\\u00e9\"",
        "\"mode\": {\"fanout\": null}",
        "\"set\": {\"a\": \"b\"}",
    ];
    let config = full_config();
    let seeds = [
        config.to_string(),
        serde_json::to_string_pretty(&config).expect("a Value always serializes"),
    ];
    // xorshift64, so every run checks the same inputs.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    let mut tally = Tally::default();
    for _ in 0..50_000 {
        let mut text = seeds[random(seeds.len())].clone().into_bytes();
        for _ in 0..=random(4) {
            let position = random(text.len() + 1);
            let token = TOKENS[random(TOKENS.len())].as_bytes();
            match random(3) {
                0 if position < text.len() => {
                    text.remove(position);
                }
                1 => {
                    text.splice(position..position, token.iter().copied());
                }
                2 if position < text.len() => text[position] = token[0],
                _ => {}
            }
        }
        tally.compare(&text);
    }
    assert!(
        tally.errors_with_path > 20_000,
        "{}",
        tally.errors_with_path
    );
    assert!(
        tally.errors_without_path > 10_000,
        "{}",
        tally.errors_without_path
    );
}

// `make test-wasm32` runs the tests under WASI without file system access.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn fuzz_corpus_matches_reference() {
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/config");
    let mut tally = Tally::default();
    for entry in std::fs::read_dir(corpus).expect("fuzz corpus directory") {
        let text = std::fs::read(entry.expect("corpus entry").path()).expect("corpus file");
        tally.compare(&text);
    }
    assert!(tally.accepted + tally.errors_with_path + tally.errors_without_path >= 10);
}
