//! Builder for the Envoy bootstrap used by the integration tests.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// What Envoy does with a plugin whose VM failed (a panic or trap):
/// `failure_policy` of `envoy.extensions.wasm.v3.PluginConfig`, checked
/// against Envoy 1.40 with `envoy --mode validate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Leaves the field out, so Envoy's default applies.
    Unset,
    /// `FAIL_CLOSED`: requests that reach the failed VM get a 503.
    FailClosed,
    /// `FAIL_OPEN`: requests pass through as if the filter were absent.
    FailOpen,
    /// `FAIL_RELOAD`: a new VM replaces the failed one, rate-limited by
    /// `reload_config.backoff`.
    FailReload,
}

impl FailurePolicy {
    fn yaml_value(self) -> Option<&'static str> {
        match self {
            FailurePolicy::Unset => None,
            FailurePolicy::FailClosed => Some("FAIL_CLOSED"),
            FailurePolicy::FailOpen => Some("FAIL_OPEN"),
            FailurePolicy::FailReload => Some("FAIL_RELOAD"),
        }
    }
}

/// `reload_config.backoff` of the plugin: the `BackoffStrategy` that spaces
/// VM reloads under `FailurePolicy::FailReload`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReloadBackoff {
    base_interval: Duration,
    max_interval: Duration,
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
    failure_policy: FailurePolicy,
    reload_backoff: Option<ReloadBackoff>,
    /// Directory of the LDS file, when the listener comes from file-based
    /// LDS instead of `static_resources`.
    lds_dir: Option<PathBuf>,
    /// Envoy's `--drain-time-s`, when set.
    drain_time_s: Option<u64>,
    /// Clusters given as YAML mappings by `raw_cluster`.
    raw_clusters: Vec<String>,
}

/// Name of the LDS file inside `EnvoyConfig::listener_via_lds`'s directory.
pub const LDS_FILE_NAME: &str = "lds.yaml";

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
            failure_policy: FailurePolicy::Unset,
            reload_backoff: None,
            lds_dir: None,
            drain_time_s: None,
            raw_clusters: Vec::new(),
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

    /// Sets the plugin's `failure_policy`.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    /// Sets the plugin's `reload_config.backoff`, which spaces the VM
    /// reloads of `FailurePolicy::FailReload`. Envoy's default base
    /// interval is 1 s.
    ///
    /// Panics if the base is under 2 ms or the max is under the base.
    /// Envoy 1.40 accepts a 1 ms base, but then computes its jitter as
    /// `random % (base_ms >> 1)` and dies of SIGFPE at the first reload.
    pub fn reload_backoff(mut self, base_interval: Duration, max_interval: Duration) -> Self {
        assert!(
            base_interval >= Duration::from_millis(2) && max_interval >= base_interval,
            "invalid reload backoff {base_interval:?}..{max_interval:?}: \
             use a base of at least 2 ms and a max not below the base"
        );
        self.reload_backoff = Some(ReloadBackoff {
            base_interval,
            max_interval,
        });
        self
    }

    /// Delivers the listener through file-based LDS: the bootstrap points
    /// `dynamic_resources.lds_config` at `dir/lds.yaml` and watches `dir`.
    ///
    /// `Envoy::start` writes the file; `write_lds` replaces it later, which
    /// pushes a new listener configuration to the running Envoy.
    pub fn listener_via_lds(mut self, dir: impl Into<PathBuf>) -> Self {
        self.lds_dir = Some(dir.into());
        self
    }

    /// Sets Envoy's `--drain-time-s` (600 s by default). After an LDS
    /// update replaces the filter chain, Envoy keeps the old chain, and
    /// with it the old plugin, for this long.
    pub fn drain_time_s(mut self, seconds: u64) -> Self {
        self.drain_time_s = Some(seconds);
        self
    }

    /// Writes the listener to the LDS file by writing a temp file in the
    /// same directory and renaming it over `lds.yaml`. Envoy reloads the
    /// path when an entry is moved into the watched directory (the
    /// `PathConfigSource` API docs), so it never reads a partial file.
    ///
    /// Returns an error if the config does not use `listener_via_lds` or a
    /// file operation fails.
    pub fn write_lds(&self) -> Result<(), String> {
        let dir = self
            .lds_dir
            .as_deref()
            .ok_or("write_lds needs a config built with listener_via_lds")?;
        let yaml = format!(
            "resources:\n{}",
            list_item(
                &format!(
                    "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n{}",
                    self.listener_yaml()
                ),
                0
            )
        );
        write_atomically(dir, LDS_FILE_NAME, &yaml)
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

    /// Adds a cluster written as YAML: one mapping without the leading
    /// `- `, as an item of `static_resources.clusters`. It is for settings
    /// that no builder method sets, such as TLS, circuit breakers or outlier
    /// detection. Envoy checks it when it starts.
    pub fn raw_cluster(mut self, yaml: impl Into<String>) -> Self {
        self.raw_clusters.push(yaml.into());
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
        let mut clusters = String::new();
        for cluster in std::iter::once(&self.primary).chain(&self.targets) {
            clusters.push_str(&cluster_yaml(cluster));
        }
        for raw in &self.raw_clusters {
            clusters.push_str(&list_item(raw, 0));
        }

        let resources = match &self.lds_dir {
            // Envoy requires a node id and cluster for any xDS source,
            // also a local file.
            Some(dir) => format!(
                "node: {{ id: mesh-fanout-test, cluster: mesh-fanout-test }}
dynamic_resources:
  lds_config:
    resource_api_version: V3
    path_config_source:
      path: {path}
      watched_directory: {{ path: {dir} }}
static_resources:
",
                path = yaml_quote(&dir.join(LDS_FILE_NAME).to_string_lossy()),
                dir = yaml_quote(&dir.to_string_lossy()),
            ),
            None => format!(
                "static_resources:
  listeners:
{}",
                list_item(&self.listener_yaml(), 2)
            ),
        };

        format!(
            "admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
{STATS_TAGS_YAML}{resources}  clusters:
{clusters}",
            admin_port = self.admin_port,
            clusters = indent(&clusters, 2),
        )
    }

    /// Renders the listener, a mapping without leading `- `, that routes
    /// everything to cluster `primary` through the filter chain.
    ///
    /// Panics if the wasm filter is included and its file does not exist.
    fn listener_yaml(&self) -> String {
        let wasm_file = match &self.wasm {
            WasmFilter::Omitted => None,
            WasmFilter::Release => Some(wasm_path()),
            WasmFilter::File(path) => Some(path.clone()),
        };
        let http_filters = match wasm_file {
            Some(path) => {
                let wasm = wasm_filter_yaml(
                    &path.to_string_lossy(),
                    &self.plugin_config,
                    self.failure_policy,
                    self.reload_backoff,
                );
                format!("{wasm}{ROUTER_FILTER_YAML}")
            }
            None => ROUTER_FILTER_YAML.to_owned(),
        };

        format!(
            "name: ingress
address:
  socket_address: {{ address: 127.0.0.1, port_value: {port} }}
# A port taken twice fails at start instead of being shared silently.
enable_reuse_port: false
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
{http_filters}",
            port = self.port,
            http_filters = indent(&http_filters, 6),
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
        if config.lds_dir.is_some() {
            config
                .write_lds()
                .unwrap_or_else(|message| panic!("{message}"));
        }
        let mut args = Vec::new();
        if let Some(seconds) = config.drain_time_s {
            args.extend(["--drain-time-s".to_owned(), seconds.to_string()]);
        }
        Envoy::start_from_yaml_with_args(&yaml, config.port(), config.admin_port(), &args)
            .await
            .unwrap_or_else(|message| panic!("{message}"))
    }
}

const ROUTER_FILTER_YAML: &str = r#"- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#;

fn wasm_filter_yaml(
    wasm_file: &str,
    plugin_config: &str,
    failure_policy: FailurePolicy,
    reload_backoff: Option<ReloadBackoff>,
) -> String {
    let mut policy = String::new();
    if let Some(value) = failure_policy.yaml_value() {
        writeln!(policy, "      failure_policy: {value}").unwrap();
    }
    if let Some(backoff) = reload_backoff {
        writeln!(
            policy,
            "      reload_config:\n        backoff: {{ base_interval: {}s, max_interval: {}s }}",
            backoff.base_interval.as_secs_f64(),
            backoff.max_interval.as_secs_f64()
        )
        .unwrap();
    }
    format!(
        r#"- name: envoy.filters.http.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
    config:
      name: mesh_fanout
      root_id: mesh_fanout
{policy}      vm_config:
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

/// Writes `contents` to `dir/name` by renaming a temp file of the same
/// directory over it, so readers see the old file or the new one, never a
/// partial write.
fn write_atomically(dir: &Path, name: &str, contents: &str) -> Result<(), String> {
    let temp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    std::fs::write(&temp, contents)
        .map_err(|e| format!("writing {} failed: {e}", temp.display()))?;
    std::fs::rename(&temp, &target).map_err(|e| {
        format!(
            "renaming {} to {} failed: {e}",
            temp.display(),
            target.display()
        )
    })
}

/// Renders the mapping `text` as a YAML sequence item at `spaces`.
fn list_item(text: &str, spaces: usize) -> String {
    let indented = indent(text, spaces + 2);
    format!("{}- {}", " ".repeat(spaces), &indented[spaces + 2..])
}

fn indent(text: &str, spaces: usize) -> String {
    let prefix = " ".repeat(spaces);
    text.lines()
        .map(|line| format!("{prefix}{line}\n"))
        .collect()
}
