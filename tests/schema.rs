//! The committed JSON Schema of the plugin configuration,
//! schema/mesh-fanout.schema.json: it matches the Rust types, every example
//! configuration in the repository validates against it, and it agrees with
//! the filter's own checks on boundary values.
//!
//! `make schema` rewrites the file (it runs this test with UPDATE_SCHEMA=1).

use std::path::{Path, PathBuf};

use jsonschema::Validator;
use mesh_fanout::core::config::{json_schema, parse};
use serde::Deserialize;
use serde_json::{json, Value};

const SCHEMA_PATH: &str = "schema/mesh-fanout.schema.json";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {} failed: {e}", path.display()))
}

fn validator() -> Validator {
    let schema: Value = serde_json::from_str(&json_schema()).expect("json_schema() returns JSON");
    jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("the schema is invalid: {e}"))
}

/// Returns the schema's error messages for `instance`, empty when it is valid.
fn schema_errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|error| format!("{}: {error}", error.instance_path()))
        .collect()
}

#[test]
fn committed_schema_is_current() {
    let path = repo_root().join(SCHEMA_PATH);
    let generated = json_schema();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{SCHEMA_PATH} does not match the configuration types in src/core/config.rs; \
         run `make schema` and commit the result"
    );
}

/// Finds every Wasm filter `configuration` (a StringValue holding the
/// plugin JSON) in a parsed Envoy config.
fn envoy_plugin_configs(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            if let Some(configuration) = fields.get("configuration") {
                let is_string_value = configuration["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("google.protobuf.StringValue"));
                if let (true, Some(text)) = (is_string_value, configuration["value"].as_str()) {
                    found.push(text.to_owned());
                }
            }
            fields
                .values()
                .for_each(|field| envoy_plugin_configs(field, found));
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| envoy_plugin_configs(item, found)),
        _ => {}
    }
}

/// Returns the ```json blocks of a Markdown file.
fn markdown_json_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match current.as_mut() {
            None if trimmed == "```json" => current = Some(Vec::new()),
            None => {}
            Some(lines) if trimmed == "```" => {
                blocks.push(lines.join("\n"));
                current = None;
            }
            Some(lines) => lines.push(line),
        }
    }
    blocks
}

/// Returns every example configuration in the repository, as (where, JSON).
/// A README block that shows a single rule is wrapped in a configuration,
/// and one that shows a single target in a fan-out rule, where every target
/// field is allowed.
fn example_configs() -> Vec<(String, Value)> {
    let root = repo_root();
    let mut examples = Vec::new();

    let mut envoy_files: Vec<PathBuf> = std::fs::read_dir(root.join("envoy"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            )
        })
        .collect();
    envoy_files.sort();
    for path in envoy_files {
        let config: Value = serde_norway::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
        let mut found = Vec::new();
        envoy_plugin_configs(&config, &mut found);
        assert!(
            !found.is_empty(),
            "{} has no plugin configuration",
            path.display()
        );
        for (i, text) in found.into_iter().enumerate() {
            let value = serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!(
                    "{} plugin configuration {i} is not JSON: {e}",
                    path.display()
                )
            });
            examples.push((format!("{} configuration {i}", path.display()), value));
        }
    }

    let plugin_path = root.join("examples/istio/wasmplugin.yaml");
    for document in serde_norway::Deserializer::from_str(&read(&plugin_path)) {
        let plugin = Value::deserialize(document).unwrap();
        examples.push((
            format!("{} pluginConfig", plugin_path.display()),
            plugin["spec"]["pluginConfig"].clone(),
        ));
    }

    for readme in ["README.md", "examples/istio/README.md"] {
        let path = root.join(readme);
        for (i, block) in markdown_json_blocks(&read(&path)).into_iter().enumerate() {
            let value: Value = serde_json::from_str(&block)
                .unwrap_or_else(|e| panic!("{readme} JSON block {i} is not JSON: {e}\n{block}"));
            let config = if value.get("rules").is_some() {
                value
            } else if value.get("targets").is_some() {
                json!({"rules": [value]})
            } else if value.get("cluster").is_some() {
                json!({"rules": [{"name": "example", "mode": "fanout", "targets": [value]}]})
            } else {
                panic!(
                    "{readme} JSON block {i} is neither a configuration, a rule nor a target:\n{block}"
                );
            };
            examples.push((format!("{readme} JSON block {i}"), config));
        }
    }
    examples
}

#[test]
fn examples_validate_against_schema() {
    let validator = validator();
    let examples = example_configs();
    for required in ["envoy/demo.yaml", "wasmplugin.yaml", "README.md JSON block"] {
        assert!(
            examples.iter().any(|(name, _)| name.contains(required)),
            "no example found from {required}"
        );
    }
    for (name, config) in &examples {
        let errors = schema_errors(&validator, config);
        assert!(errors.is_empty(), "{name} fails the schema: {errors:#?}");
        if let Err(error) = parse(config.to_string().as_bytes()) {
            panic!("{name} passes the schema but the filter rejects it: {error}");
        }
    }
}

/// Wraps one target in a shadow rule.
fn with_target(target: Value) -> Value {
    json!({"rules": [{"name": "r", "targets": [target]}]})
}

fn target(extra: Value) -> Value {
    let mut target = json!({"name": "t", "cluster": "c"});
    target
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    with_target(target)
}

#[test]
fn schema_agrees_with_parser() {
    let long_name = "n".repeat(64);
    let too_long_name = "n".repeat(65);
    let cases = [
        target(json!({"timeout_ms": 0})),
        target(json!({"timeout_ms": 1})),
        target(json!({"timeout_ms": 600000})),
        target(json!({"timeout_ms": 600001})),
        target(json!({"sample_percent": -1})),
        target(json!({"sample_percent": 0})),
        target(json!({"sample_percent": 100})),
        target(json!({"sample_percent": 100.5})),
        target(json!({"max_body_bytes": 67108864})),
        target(json!({"max_body_bytes": 67108865})),
        target(json!({"timeout_ms": "1000"})),
        target(json!({"unknown": 1})),
        with_target(json!({"name": "", "cluster": "c"})),
        with_target(json!({"name": "a.b", "cluster": "c"})),
        with_target(json!({"name": long_name, "cluster": "c"})),
        with_target(json!({"name": too_long_name, "cluster": "c"})),
        with_target(json!({"name": "sign-up_1", "cluster": "c"})),
        with_target(json!({"name": "t"})),
        with_target(json!({"name": "t", "cluster": ""})),
        with_target(json!({"name": "t", "cluster": "a b"})),
        with_target(json!({"name": "t", "cluster": "outbound|8080||a.ns.svc.cluster.local"})),
        json!({"rules": [{"name": "r.1", "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "targets": []}]}),
        json!({"rules": [{"name": "r", "mode": "mirror", "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "mode": "fanout", "on_failure": "fail", "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "match": {"methods": ["post"]}, "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "match": {"methods": ["POST"]}, "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "match": {"path": {}}, "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "match": {"path": {"prefix": "/a", "exact": "/a"}}, "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "match": {"path": {"prefix": "/a"}}, "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "match": {"headers": [{"name": "x"}]}, "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "match": {"headers": [{"name": "x", "present": true}]}, "targets": [{"name": "t", "cluster": "c"}]}]}),
        json!({"rules": [{"name": "r", "match": {"headers": [{"name": "x", "exact": "a", "prefix": "a"}]}, "targets": [{"name": "t", "cluster": "c"}]}]}),
        target(json!({"retry": {"attempts": 1}})),
        target(json!({"retry": {"attempts": 2}})),
        target(json!({"retry": {"attempts": 10}})),
        target(json!({"retry": {"attempts": 11}})),
        target(json!({"retry": {"attempts": 2, "on": ["nope"]}})),
        target(json!({"retry": {"attempts": 2, "on": []}})),
        target(json!({"retry": {"attempts": 2, "on": ["5xx", "dispatch_error"]}})),
        target(json!({"retry": {"attempts": 2, "backoff_ms": {"base": 0}}})),
        target(json!({"dead_letter": {"cluster": "dl", "timeout_ms": 0}})),
        target(json!({"dead_letter": {"cluster": "dl", "path": "failed"}})),
        target(json!({"dead_letter": {"cluster": "dl", "path": "/failed"}})),
        target(json!({"path": "shadow"})),
        target(json!({"path": "/shadow"})),
        target(json!({"headers": {"remove": ["bad name"]}})),
        target(json!({"headers": {"set": {"bad name": "1"}}})),
        target(json!({"headers": {"set": {"X-Source": "shadow"}}})),
        target(json!({"headers": {"remove": ["X-Debug"]}})),
        target(json!({"idempotency_header": "bad:name"})),
        target(json!({"idempotency_header": "Idempotency-Key"})),
        json!({"limits": {"retry_budget_percent": 100}, "rules": []}),
        json!({"limits": {"retry_budget_percent": 101}, "rules": []}),
        json!({"limits": {"max_in_flight_per_worker": 0}, "rules": []}),
        json!({"limits": {"max_in_flight_per_worker": 1}, "rules": []}),
        json!({"limits": {"max_body_bytes_per_worker": 4294967295_u64}, "rules": []}),
        json!({"limits": {"max_body_bytes_per_worker": 4294967296_u64}, "rules": []}),
        json!({"limits": {"max_body_bytes_per_worker": 1099511627777_u64}, "rules": []}),
        json!({"rules": []}),
        json!({}),
    ];
    let validator = validator();
    let mut disagreements = Vec::new();
    for config in &cases {
        let schema_valid = validator.is_valid(config);
        let parser_result = parse(config.to_string().as_bytes());
        if schema_valid != parser_result.is_ok() {
            disagreements.push(format!(
                "{config}\n  schema: {}\n  parser: {}",
                if schema_valid {
                    "valid".to_owned()
                } else {
                    schema_errors(&validator, config).join("; ")
                },
                match &parser_result {
                    Ok(_) => "valid".to_owned(),
                    Err(error) => error.to_string(),
                }
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "the schema and the filter disagree on:\n{}",
        disagreements.join("\n")
    );
}
