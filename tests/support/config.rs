//! Builder for the Envoy bootstrap used by the integration tests.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::{envoy_bin, free_port, wasm_path, Envoy, Proto};

/// Tag extractors that turn the filter's dotted stat names into labels on
/// `/stats/prometheus`. Envoy matches each regex against the full stat name,
/// cuts the first capture group out of the name and uses the second as the
/// tag value.
pub const STATS_TAGS_YAML: &str = r#"stats_config:
  stats_tags:
  - tag_name: rule
    regex: '^wasmcustom\.mesh_fanout\.(rule\.([^.]+)\.)'
  - tag_name: target
    regex: '^wasmcustom\.mesh_fanout\.rule\.[^.]+\.(target\.([^.]+)\.)'
  - tag_name: outcome
    regex: '^wasmcustom\.mesh_fanout\.rule\.[^.]+\.target\.[^.]+\.(outcome\.([^.]+)\.)'
  - tag_name: reason
    regex: '^wasmcustom\.mesh_fanout\.rule\.[^.]+\.target\.[^.]+\.(reason\.([^.]+)\.)'
"#;

/// A STATIC cluster with one endpoint on 127.0.0.1.
#[derive(Clone, Debug)]
struct Cluster {
    name: String,
    port: u16,
    proto: Proto,
}

/// Where the wasm filter comes from, if it is in the chain at all.
#[derive(Clone, Debug)]
enum WasmFilter {
    Omitted,
    /// The release build at `wasm_path()`.
    Release,
    File(PathBuf),
}

/// Bootstrap for one Envoy: an admin endpoint, one listener that routes
/// everything to cluster `primary`, the wasm filter, and target clusters.
#[derive(Clone, Debug)]
pub struct EnvoyConfig {
    port: u16,
    admin_port: u16,
    primary: Cluster,
    targets: Vec<Cluster>,
    wasm: WasmFilter,
    plugin_config: String,
}

impl EnvoyConfig {
    /// Starts a config whose cluster `primary` sends HTTP/1.1 to 127.0.0.1:`primary_port`.
    ///
    /// The listener and admin ports come from `free_port()`. The wasm filter
    /// is included with plugin configuration `{"rules": []}`, because the
    /// filter rejects a configuration without `rules` and Envoy then exits.
    pub fn new(primary_port: u16) -> Self {
        EnvoyConfig {
            port: free_port(),
            admin_port: free_port(),
            primary: Cluster {
                name: "primary".to_owned(),
                port: primary_port,
                proto: Proto::Http1,
            },
            targets: Vec::new(),
            wasm: WasmFilter::Release,
            plugin_config: r#"{"rules": []}"#.to_owned(),
        }
    }

    /// Sets the protocol Envoy speaks to the `primary` cluster.
    pub fn primary_proto(mut self, proto: Proto) -> Self {
        self.primary.proto = proto;
        self
    }

    /// Sets the plugin configuration, a JSON document passed to the filter as a string.
    pub fn plugin_config(mut self, json: impl Into<String>) -> Self {
        self.plugin_config = json.into();
        self
    }

    /// Leaves the wasm filter out, so Envoy only routes.
    pub fn without_wasm(mut self) -> Self {
        self.wasm = WasmFilter::Omitted;
        self
    }

    /// Loads the filter from `path` in place of `wasm_path()`.
    pub fn wasm_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.wasm = WasmFilter::File(path.into());
        self
    }

    /// Adds cluster `name` that sends `proto` to 127.0.0.1:`port`.
    pub fn target(mut self, name: &str, port: u16, proto: Proto) -> Self {
        self.targets.push(Cluster {
            name: name.to_owned(),
            port,
            proto,
        });
        self
    }

    /// Adds cluster `name` whose endpoint is a port with no listener, so
    /// every connection attempt is refused.
    ///
    /// NOTE: the port comes from `free_port()`, so a process that binds it
    /// later makes the target reachable.
    pub fn down_target(self, name: &str) -> Self {
        let port = free_port();
        self.target(name, port, Proto::Http1)
    }

    /// Listener port for client traffic.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Renders the bootstrap as YAML.
    ///
    /// Panics if the wasm filter is included and its file does not exist.
    pub fn to_yaml(&self) -> String {
        let wasm_file = match &self.wasm {
            WasmFilter::Omitted => None,
            WasmFilter::Release => Some(wasm_path()),
            WasmFilter::File(path) => Some(path.clone()),
        };
        let http_filters = match wasm_file {
            Some(path) => {
                let wasm = wasm_filter_yaml(&path.to_string_lossy(), &self.plugin_config);
                format!("{wasm}{ROUTER_FILTER_YAML}")
            }
            None => ROUTER_FILTER_YAML.to_owned(),
        };

        let mut clusters = String::new();
        for cluster in std::iter::once(&self.primary).chain(&self.targets) {
            clusters.push_str(&cluster_yaml(cluster));
        }

        format!(
            "admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
{STATS_TAGS_YAML}static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          codec_type: AUTO
          generate_request_id: true
          upgrade_configs:
          - upgrade_type: websocket
          route_config:
            name: local_route
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:
              - match: {{ prefix: \"/\" }}
                route: {{ cluster: primary, timeout: 10s }}
          http_filters:
{http_filters}  clusters:
{clusters}",
            admin_port = self.admin_port,
            port = self.port,
            http_filters = indent(&http_filters, 10),
            clusters = indent(&clusters, 2),
        )
    }
}

impl Envoy {
    /// Writes `config` to a new temp dir, starts Envoy on it and waits until
    /// admin `/ready` returns 200.
    ///
    /// Panics with the tail of the Envoy log if Envoy exits or is not ready
    /// within 20 s.
    pub async fn start(config: EnvoyConfig) -> Envoy {
        // Both panic on a missing binary or module, before any file is written.
        envoy_bin();
        let yaml = config.to_yaml();
        Envoy::start_from_yaml(&yaml, config.port(), config.admin_port())
            .await
            .unwrap_or_else(|message| panic!("{message}"))
    }
}

const ROUTER_FILTER_YAML: &str = r#"- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#;

fn wasm_filter_yaml(wasm_file: &str, plugin_config: &str) -> String {
    format!(
        r#"- name: envoy.filters.http.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
    config:
      name: mesh_fanout
      root_id: mesh_fanout
      vm_config:
        vm_id: mesh_fanout
        runtime: envoy.wasm.runtime.v8
        code: {{ local: {{ filename: {file} }} }}
      configuration:
        "@type": type.googleapis.com/google.protobuf.StringValue
        value: {value}
"#,
        file = yaml_quote(wasm_file),
        value = yaml_quote(plugin_config),
    )
}

fn cluster_yaml(cluster: &Cluster) -> String {
    let mut yaml = format!(
        "- name: {name}
  type: STATIC
  connect_timeout: 0.25s
  load_assignment:
    cluster_name: {name}
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {{ address: 127.0.0.1, port_value: {port} }}
",
        name = yaml_quote(&cluster.name),
        port = cluster.port,
    );
    if cluster.proto == Proto::Http2 {
        // The cluster-level `http2_protocol_options` field is deprecated in
        // the v3 API, and this extension replaces it.
        yaml.push_str(
            r#"  typed_extension_protocol_options:
    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
      "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
      explicit_http_config:
        http2_protocol_options: {}
"#,
        );
    }
    yaml
}

/// Quotes `text` as a YAML double-quoted scalar.
///
/// A JSON string literal is valid YAML, so JSON escaping is enough.
fn yaml_quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            c if c.is_control() => {
                write!(quoted, "\\u{:04x}", c as u32).unwrap();
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

fn indent(text: &str, spaces: usize) -> String {
    let prefix = " ".repeat(spaces);
    text.lines()
        .map(|line| format!("{prefix}{line}\n"))
        .collect()
}
