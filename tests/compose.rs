//! docker-compose.yml and the Envoy config it runs stay in step: no Docker
//! engine runs the file here, so this test checks what Docker would need.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_norway::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load_yaml(relative: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(relative)).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {value:?}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Maps each static cluster of an Envoy config to its one endpoint port.
fn cluster_ports(envoy: &Value) -> BTreeMap<String, u64> {
    let clusters = envoy["static_resources"]["clusters"].as_sequence().unwrap();
    clusters
        .iter()
        .map(|cluster| {
            let endpoint =
                &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"];
            let port = endpoint["address"]["socket_address"]["port_value"]
                .as_u64()
                .unwrap();
            (cluster["name"].as_str().unwrap().to_string(), port)
        })
        .collect()
}

/// The value after `flag` in a command line.
fn flag_value(command: &[String], flag: &str) -> Option<String> {
    let position = command.iter().position(|arg| arg == flag)?;
    command.get(position + 1).cloned()
}

#[test]
fn compose_matches_envoy_config() {
    let compose = load_yaml("docker-compose.yml");
    let services = compose["services"].as_mapping().unwrap();
    let envoy_service = &compose["services"]["envoy"];

    // The image runs the Envoy version the Makefile tests with.
    let makefile = std::fs::read_to_string(repo_root().join("Makefile")).unwrap();
    let version = makefile
        .lines()
        .find_map(|line| line.strip_prefix("ENVOY_VERSION ?= "))
        .unwrap()
        .trim();
    assert_eq!(
        envoy_service["image"].as_str(),
        Some(format!("envoyproxy/envoy:v{version}").as_str())
    );

    // The config named on the command line is mounted from the repository.
    let command = strings(&envoy_service["command"]);
    let config = flag_value(&command, "-c").unwrap();
    let working_dir = Path::new(envoy_service["working_dir"].as_str().unwrap());
    let mounts: Vec<(String, String)> = strings(&envoy_service["volumes"])
        .iter()
        .map(|volume| {
            let parts: Vec<&str> = volume.split(':').collect();
            (parts[0].to_string(), parts[1].to_string())
        })
        .collect();
    let host_path_of = |container: &Path| -> PathBuf {
        let (host, mounted) = mounts
            .iter()
            .find(|(_, mounted)| container.starts_with(mounted))
            .unwrap_or_else(|| {
                panic!("{} is not mounted; mounts: {mounts:?}", container.display())
            });
        let rest = container.strip_prefix(mounted).unwrap();
        repo_root().join(host.trim_start_matches("./")).join(rest)
    };
    let config_on_host = host_path_of(&working_dir.join(&config));
    assert!(
        config_on_host.is_file(),
        "{} does not exist",
        config_on_host.display()
    );
    assert_eq!(config_on_host, repo_root().join(&config));

    // The module the config loads is the one compose mounts.
    let envoy_config = load_yaml(&config);
    let config_text = std::fs::read_to_string(&config_on_host).unwrap();
    let wasm = config_text
        .lines()
        .find_map(|line| line.split("filename: ").nth(1))
        .map(|rest| rest.trim_end_matches(['}', ' ']).to_string())
        .unwrap();
    assert_eq!(
        host_path_of(&working_dir.join(&wasm)),
        repo_root().join(&wasm)
    );

    // Every cluster's port is served by the compose service of that name,
    // and every upstream service backs a cluster.
    let clusters = cluster_ports(&envoy_config);
    for (name, port) in &clusters {
        let service = &compose["services"][name.as_str()];
        let service_command = strings(&service["command"]);
        assert_eq!(
            flag_value(&service_command, "--port"),
            Some(port.to_string()),
            "cluster {name} expects port {port}; service {name}: {service_command:?}"
        );
    }
    let upstream_services = services
        .keys()
        .filter(|k| k.as_str() != Some("envoy"))
        .count();
    assert_eq!(
        upstream_services,
        clusters.len(),
        "services {services:?} and clusters {clusters:?}"
    );
}
