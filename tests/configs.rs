//! Envoy itself checks every shipped config and rejects bad plugin
//! configurations with a message that names the field.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{envoy_bin, wasm_path, EnvoyConfig};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `envoy --mode validate` from the repository root, where the shipped
/// configs' relative .wasm path resolves.
fn validate(config: &Path) -> Output {
    // Fails with the `make build` hint when the .wasm is missing.
    wasm_path();
    Command::new(envoy_bin())
        .current_dir(repo_root())
        .args(["--mode", "validate", "-l", "info", "-c"])
        .arg(config)
        .output()
        .expect("running envoy --mode validate failed")
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn shipped_envoy_configs_validate() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("envoy")).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            continue;
        }
        let output = validate(&path);
        let text = output_text(&output);
        assert!(
            output.status.success(),
            "{} failed validation:\n{text}",
            path.display()
        );
        assert!(
            text.contains("mesh-fanout configured"),
            "{}: the filter did not load:\n{text}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 1, "no configs found in envoy/");
}

fn validate_plugin(plugin_json: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!(
        "mesh-fanout-configs-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("envoy.yaml");
    std::fs::write(
        &path,
        EnvoyConfig::new(1).plugin_config(plugin_json).to_yaml(),
    )
    .unwrap();
    let output = validate(&path);
    let _ = std::fs::remove_dir_all(&dir);
    (output.status.success(), output_text(&output))
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn invalid_plugin_config_names_field() {
    let cases = [
        (
            r#"{"rules": [{"name": "signup", "targets": [{"name": "a", "cluster": "a"}, {"name": "b"}]}]}"#,
            "invalid configuration: rules[0].targets[1].cluster: missing",
        ),
        (
            r#"{"rules": [{"name": "signup", "targets": [{"name": "a", "cluster": "a", "sample_percent": 150}]}]}"#,
            "rules[0].targets[0].sample_percent: 150 is out of range; use 0 to 100",
        ),
        (
            r#"{"rules": [{"name": "signup", "match": {"path": {"regex": "(["}}, "targets": [{"name": "a", "cluster": "a"}]}]}"#,
            "rules[0].match.path.regex: invalid regex",
        ),
        (
            r#"{"rules": [{"name": "signup", "targets": []}]}"#,
            "rules[0].targets: empty; add at least one target",
        ),
        (
            r#"{"rules": [], "extra": 1}"#,
            "extra: unknown field `extra`",
        ),
    ];
    for (plugin, expected) in cases {
        let (ok, text) = validate_plugin(plugin);
        assert!(!ok, "Envoy accepted {plugin}");
        assert!(
            text.contains(expected),
            "no `{expected}` in the Envoy output for {plugin}:\n{text}"
        );
        assert!(
            text.contains("[critical]") || text.contains("[error]"),
            "{text}"
        );
    }
}
