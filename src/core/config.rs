//! Plugin configuration: the JSON users write, checked once in
//! `on_configure` and compiled into the form the request path uses.
//!
//! Every error names the field by its JSON path, for example
//! `rules[0].targets[1].cluster: missing`, and says how to fix it.

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use super::headers;
use super::json_path;
use super::matcher::{self, HeaderMatcher, PathMatcher, RequestMatcher, ValueMatcher};
use super::outcome::Outcome;
use super::retry::{RetryPolicy, MAX_ATTEMPTS};
use super::sampling::Rate;

mod object_only;
mod sorted_map;

use sorted_map::SortedStringMap;

pub const DEFAULT_MARKER_HEADER: &str = "x-mesh-fanout";
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
pub const MAX_TIMEOUT_MS: u64 = 600_000;
pub const DEFAULT_SAMPLE_KEY: &str = "x-request-id";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// The side call's body is held in the worker's memory until the request
/// ends, so one request may not pin more than this.
pub const MAX_BODY_BYTES_LIMIT: u64 = 64 * 1024 * 1024;
/// Sized for a sidecar's memory budget: at the default 1 MiB per request,
/// 32 requests per worker can carry full-size bodies at once.
pub const DEFAULT_MAX_BODY_BYTES_PER_WORKER: u64 = 32 * 1024 * 1024;
pub const DEFAULT_MAX_IN_FLIGHT_PER_WORKER: u64 = 1000;
/// Upper bound on targets across all rules. Each target defines about 20
/// stats on every worker thread at startup; 15,000 targets took Envoy 1.40
/// over 14 s to load on a 2-core machine, blocking requests meanwhile.
pub const MAX_TARGETS: usize = 1000;
/// Upper bound for the per-worker limits: a wasm32 VM cannot address more
/// than 4 GiB, so larger values would only hide a typo.
const MAX_LIMIT_VALUE: u64 = u32::MAX as u64;
/// Names become segments of Envoy stat names, so they stay short and
/// free of dots.
const MAX_NAME_LEN: usize = 64;

/// A configuration problem, with the JSON path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Joins a parent path and a field name: `rules[0]` and `name` give
/// `rules[0].name`. Out of line, it keeps the release module about 1 KB
/// smaller than a `format!` at each of its call sites.
#[inline(never)]
fn field(path: &str, name: &str) -> String {
    let mut joined = String::with_capacity(path.len() + 1 + name.len());
    joined.push_str(path);
    joined.push('.');
    joined.push_str(name);
    joined
}

// Out of line, the release module is about 1 KB smaller than with this
// inlined at each of its call sites (rustc 1.95, `make build`).
#[inline(never)]
fn error(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

#[derive(Debug)]
pub struct Config {
    pub marker_header: String,
    /// Drop a client's marker header before matching, so clients cannot
    /// opt their requests out; loops through this listener then go unseen.
    pub strip_incoming_marker: bool,
    pub limits: Limits,
    pub rules: Vec<Rule>,
    /// Reading `:method` and `:path` alone can turn requests away before
    /// the whole header map is copied: no rule matches on other headers,
    /// and no rule accepts every method and path. Callgrind counts show two
    /// single-header reads cost about as much as one copy of a small map,
    /// so the check only pays when it can reject requests.
    pub method_path_prefilter: bool,
}

/// Per-worker caps; past them side calls are skipped and counted, never
/// queued. Each Envoy worker thread has its own VM and its own limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Side calls queued or dispatched and not yet finished.
    pub max_in_flight: usize,
    /// Request body bytes copied for side calls and not yet dispatched.
    pub max_body_bytes: usize,
    /// Retries in flight as a share of all side calls in flight.
    pub retry_budget_percent: u32,
    /// Retries always allowed, whatever the share.
    pub min_retry_concurrency: usize,
}

/// Where a side call goes once it has finally failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub cluster: String,
    pub path: String,
    pub timeout_ms: u64,
}

#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub matcher: RequestMatcher,
    pub mode: Mode,
    pub on_failure: OnFailure,
    /// Response header that reports each target's result; fan-out only.
    pub result_header: Option<String>,
    pub targets: Vec<Target>,
}

/// How a rule treats its side calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", serde(rename_all = "lowercase"))]
pub enum Mode {
    /// Fire and forget: the client never waits for a side call.
    #[default]
    Shadow,
    /// The client's response waits for the awaited targets.
    Fanout,
}

/// What a fan-out rule does when an awaited target fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", serde(rename_all = "lowercase"))]
pub enum OnFailure {
    /// The client gets the primary's response whatever the targets did.
    #[default]
    Ignore,
    /// The client gets a 502 that names the failed targets.
    Fail,
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        variant(
            deserializer,
            &[("shadow", Mode::Shadow), ("fanout", Mode::Fanout)],
        )
    }
}

impl<'de> Deserialize<'de> for OnFailure {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        variant(
            deserializer,
            &[("ignore", OnFailure::Ignore), ("fail", OnFailure::Fail)],
        )
    }
}

/// Reads one of `variants` from a JSON string. serde_json reports a derived
/// enum given another JSON type (`"mode": 1`) as a syntax error, which would
/// read "invalid JSON" without the field, so the value is read as a string.
fn variant<'de, D: Deserializer<'de>, T: Copy>(
    deserializer: D,
    variants: &[(&'static str, T)],
) -> Result<T, D::Error> {
    let name = String::deserialize(deserializer)?;
    if let Some((_, value)) = variants.iter().find(|(known, _)| *known == name) {
        return Ok(*value);
    }
    let expected = variants
        .iter()
        .map(|(known, _)| format!("`{known}`"))
        .collect::<Vec<_>>()
        .join(" or ");
    Err(D::Error::custom(format!(
        "unknown variant `{name}`, expected {expected}"
    )))
}

impl Rule {
    /// Reports whether any response of this rule can be held.
    pub fn awaits_any(&self) -> bool {
        self.mode == Mode::Fanout && self.targets.iter().any(|t| t.awaited)
    }
}

#[derive(Debug)]
pub struct Target {
    pub name: String,
    pub cluster: String,
    pub timeout_ms: u64,
    pub sample_rate: Rate,
    pub sample_key: String,
    pub authority: Option<String>,
    pub path: Option<String>,
    /// Applied after `remove_headers`; each name replaces all its values.
    pub set_headers: Vec<(String, String)>,
    pub remove_headers: Vec<String>,
    pub body: bool,
    pub max_body_bytes: usize,
    /// The client's response waits for this target; fan-out rules only.
    pub awaited: bool,
    /// Drop `authorization`, `proxy-authorization` and `cookie`.
    pub strip_credentials: bool,
    /// The filter's own retries; `None` leaves retries to the mesh.
    pub retry: Option<RetryPolicy>,
    /// Header that carries a key stable across retries and hops.
    pub idempotency_header: Option<String>,
    pub dead_letter: Option<DeadLetter>,
    /// The marker header's value on this target's side calls,
    /// `<rule>/<target>`, built once here instead of once per request.
    pub marker_value: String,
    /// Request headers that never travel to this target, sorted for a
    /// binary search: hop-by-hop headers, the marker header, removed and
    /// set headers, the idempotency header, and credentials when stripped.
    pub dropped_headers: Vec<String>,
}

impl Config {
    /// The first rule whose matcher accepts the request, in configured order.
    pub fn first_match(&self, request_headers: &[(String, Vec<u8>)]) -> Option<(usize, &Rule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matcher.matches(request_headers))
    }
}

/// A valid configuration plus warnings worth logging at startup.
#[derive(Debug)]
pub struct Parsed {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Parses and validates the plugin configuration.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(error(
            "configuration",
            "missing; set the Wasm filter's `configuration` (Istio: `pluginConfig`) to the plugin JSON",
        ));
    }
    let raw: RawConfig = deserialize(bytes)?;
    compile(raw)
}

/// Runs serde, then names the field that an error is about by scanning
/// the JSON text up to the error's position.
fn deserialize(bytes: &[u8]) -> Result<RawConfig, ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    // The trait method reads structs through `ObjectOnly`, and the
    // inherent `RawConfig::deserialize` that `remote = "Self"` derives
    // would not.
    let raw = <RawConfig as Deserialize>::deserialize(&mut deserializer)
        .map_err(|e| with_type_hint(describe(bytes, &e)))?;
    deserializer.end().map_err(|e| {
        error(
            "",
            format!("trailing characters after the JSON value ({e})"),
        )
    })?;
    Ok(raw)
}

/// Adds the fix to a wrong-type error, which serde words without one.
fn with_type_hint(mut e: ConfigError) -> ConfigError {
    if !e.message.starts_with("invalid type:") {
        return e;
    }
    if e.path.is_empty() {
        e.message = "the configuration must be a JSON object, such as {\"rules\": [...]}".into();
    } else {
        e.message
            .push_str("; see the configuration reference in README.md for the field's type");
    }
    e
}

/// Turns a serde_json error into a `ConfigError` with the same path and
/// message that serde_path_to_error 0.1 gave.
fn describe(bytes: &[u8], e: &serde_json::Error) -> ConfigError {
    let message = readable_types(&e.to_string());
    // An error without a position (line 0) gets the root path.
    let offset = json_path::offset_at(bytes, e.line(), e.column()).unwrap_or(0);
    let scanned = json_path::path_at(bytes, offset);
    // serde_json stops right after the key for an unknown field, and the
    // path names that key. It stops there too for a duplicate field and for
    // an unknown variant written as `{"variant": ...}`, but these are
    // errors of the enclosing object.
    let path = if message.starts_with("unknown field `") {
        scanned.reopen_closed_after_key()
    } else {
        scanned.without_pending_key()
    };
    // serde_json reports a missing field after the `}` of its struct, so
    // the field's name is appended to the struct's path.
    if let Some(field) = missing_field_name(&message) {
        let path = if path.is_root() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        return error(path, "missing");
    }
    if e.is_syntax() || e.is_eof() {
        return error("", format!("invalid JSON: {message}"));
    }
    if path.is_root() {
        return error("", message);
    }
    error(path.to_string(), strip_position(&message))
}

/// Rust type names in serde's messages and the JSON terms that replace
/// them, each starting at a space. No replacement contains another entry's
/// pattern.
const JSON_TERMS: [(&str, &str); 7] = [
    (" expected f64", " expected a number"),
    (" expected u64", " expected a whole number of at least 0"),
    (" expected u32", " expected a whole number of at least 0"),
    (" expected a boolean", " expected true or false"),
    (" expected a sequence", " expected an array"),
    (" sequence,", " array,"),
    (" map,", " object,"),
];

/// Term for serde's name of a configuration struct, such as `expected
/// struct RawBackoff`. The error message reads "an object" instead.
const STRUCT_TERM: (&str, &str) = (" expected struct ", " expected an object");

/// Replaces Rust type names in serde's messages with JSON terms, every
/// occurrence that starts after a space, so a quoted value from the
/// configuration stays as written. A scan for spaces keeps the substring
/// searcher that `str::replace` needs out of the module.
fn readable_types(message: &str) -> String {
    let mut readable = String::with_capacity(message.len());
    // A leading space lets a term match at the start of the message.
    let spaced = format!(" {message}");
    let mut rest = spaced.as_str();
    while let Some((before, from_space)) = rest.find(' ').and_then(|i| rest.split_at_checked(i)) {
        readable.push_str(before);
        if let Some(after) = from_space.strip_prefix(STRUCT_TERM.0) {
            readable.push_str(STRUCT_TERM.1);
            let name_len = after
                .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .unwrap_or(after.len());
            rest = after.get(name_len..).unwrap_or_default();
            continue;
        }
        let (skipped, replacement) = JSON_TERMS
            .iter()
            .find(|(rust, _)| from_space.starts_with(rust))
            .map_or((" ", " "), |(rust, json)| (*rust, *json));
        readable.push_str(replacement);
        rest = from_space.get(skipped.len()..).unwrap_or_default();
    }
    readable.push_str(rest);
    readable.get(1..).unwrap_or_default().to_owned()
}

fn missing_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

/// Drops serde_json's " at line L column C" suffix, which the JSON path
/// makes redundant.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(end) => message.get(..end).unwrap_or(message).to_string(),
        None => message.to_string(),
    }
}

#[derive(Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(
        rename = "MeshFanoutConfig",
        description = "Plugin configuration of the mesh-fanout Envoy filter. README.md describes every field."
    )
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawConfig {
    #[serde(default = "default_marker_header")]
    marker_header: String,
    #[serde(default)]
    strip_incoming_marker: bool,
    #[serde(default)]
    limits: RawLimits,
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "Limits")
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawLimits {
    #[serde(default = "default_max_in_flight")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_LIMIT_VALUE)))]
    max_in_flight_per_worker: u64,
    #[serde(default = "default_max_body_bytes_per_worker")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_LIMIT_VALUE)))]
    max_body_bytes_per_worker: u64,
    #[serde(default = "default_retry_budget_percent")]
    #[cfg_attr(feature = "schema", schemars(range(max = 100)))]
    retry_budget_percent: u32,
    #[serde(default = "default_min_retry_concurrency")]
    min_retry_concurrency: u32,
}

fn default_retry_budget_percent() -> u32 {
    20
}
fn default_min_retry_concurrency() -> u32 {
    3
}

#[derive(Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "Retry")
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawRetry {
    #[cfg_attr(feature = "schema", schemars(range(min = 2, max = MAX_ATTEMPTS)))]
    attempts: u32,
    #[serde(default)]
    backoff_ms: RawBackoff,
    #[serde(default = "default_retry_on")]
    #[cfg_attr(
        feature = "schema",
        schemars(
            length(min = 1),
            inner(regex(pattern = r"^(4xx|5xx|timeout|reset|overflow|dispatch_error)$"))
        )
    )]
    on: Vec<String>,
}

#[derive(Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "Backoff")
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawBackoff {
    #[serde(default = "default_backoff_base")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_TIMEOUT_MS)))]
    base: u64,
    #[serde(default = "default_backoff_max")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_TIMEOUT_MS)))]
    max: u64,
}

impl Default for RawBackoff {
    fn default() -> RawBackoff {
        RawBackoff {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_base() -> u64 {
    50
}
fn default_backoff_max() -> u64 {
    1000
}
fn default_retry_on() -> Vec<String> {
    ["5xx", "reset", "timeout", "overflow"]
        .into_iter()
        .map(String::from)
        .collect()
}

#[derive(Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "DeadLetter")
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawDeadLetter {
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"^[^\x00-\x20\x7f]+$")))]
    cluster: String,
    #[serde(default = "default_dead_letter_path")]
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"^/[^\x00-\x20\x7f]*$")))]
    path: String,
    #[serde(default = "default_timeout_ms")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_TIMEOUT_MS)))]
    timeout_ms: u64,
}

fn default_dead_letter_path() -> String {
    "/".to_string()
}

impl Default for RawLimits {
    fn default() -> RawLimits {
        RawLimits {
            max_in_flight_per_worker: DEFAULT_MAX_IN_FLIGHT_PER_WORKER,
            max_body_bytes_per_worker: DEFAULT_MAX_BODY_BYTES_PER_WORKER,
            retry_budget_percent: default_retry_budget_percent(),
            min_retry_concurrency: default_min_retry_concurrency(),
        }
    }
}

fn default_max_in_flight() -> u64 {
    DEFAULT_MAX_IN_FLIGHT_PER_WORKER
}
fn default_max_body_bytes_per_worker() -> u64 {
    DEFAULT_MAX_BODY_BYTES_PER_WORKER
}

#[derive(Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "Rule")
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawRule {
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_NAME_LEN), regex(pattern = r"^[A-Za-z0-9_-]+$")))]
    name: String,
    #[serde(rename = "match", default)]
    match_: RawMatch,
    #[serde(default)]
    mode: Mode,
    on_failure: Option<OnFailure>,
    result_header: Option<String>,
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    targets: Vec<RawTarget>,
}

#[derive(Deserialize, Default)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "Match")
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawMatch {
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(regex(pattern = r"^[A-Z_-]+$"))))]
    methods: Vec<String>,
    path: Option<RawPathMatch>,
    #[serde(default)]
    headers: Vec<RawHeaderMatch>,
}

#[derive(Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "PathMatch", extend("minProperties" = 1, "maxProperties" = 1))
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawPathMatch {
    prefix: Option<String>,
    exact: Option<String>,
    regex: Option<String>,
}

#[derive(Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "HeaderMatch", extend("minProperties" = 2, "maxProperties" = 2))
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawHeaderMatch {
    name: String,
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
    present: Option<bool>,
}

#[derive(Deserialize)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "Target")
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawTarget {
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_NAME_LEN), regex(pattern = r"^[A-Za-z0-9_-]+$")))]
    name: String,
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"^[^\x00-\x20\x7f]+$")))]
    cluster: String,
    #[serde(default = "default_timeout_ms")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = MAX_TIMEOUT_MS)))]
    timeout_ms: u64,
    #[serde(default = "default_sample_percent")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0, max = 100)))]
    sample_percent: f64,
    #[serde(default = "default_sample_key")]
    sample_key: String,
    authority: Option<String>,
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"^/[^\x00-\x20\x7f]*$")))]
    path: Option<String>,
    #[serde(default)]
    headers: RawHeaderEdits,
    #[serde(default = "default_true")]
    body: bool,
    #[serde(default = "default_max_body_bytes")]
    #[cfg_attr(feature = "schema", schemars(range(max = MAX_BODY_BYTES_LIMIT)))]
    max_body_bytes: u64,
    #[serde(rename = "await")]
    awaited: Option<bool>,
    #[serde(default = "default_true")]
    strip_credentials: bool,
    retry: Option<RawRetry>,
    #[cfg_attr(feature = "schema", schemars(regex(pattern = HEADER_NAME_PATTERN)))]
    idempotency_header: Option<String>,
    dead_letter: Option<RawDeadLetter>,
}

/// Pattern of an HTTP token in either case, because the plugin lowercases
/// header names from the configuration. The plugin rejects a few more.
#[cfg(feature = "schema")]
const HEADER_NAME_PATTERN: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";

#[derive(Deserialize, Default)]
#[cfg_attr(
    feature = "schema",
    derive(schemars::JsonSchema),
    schemars(rename = "HeaderEdits")
)]
#[serde(deny_unknown_fields, remote = "Self")]
struct RawHeaderEdits {
    #[serde(default)]
    #[cfg_attr(
        feature = "schema",
        schemars(
            with = "std::collections::BTreeMap<String, String>",
            extend("propertyNames" = {"pattern": HEADER_NAME_PATTERN})
        )
    )]
    set: SortedStringMap,
    #[serde(default)]
    #[cfg_attr(feature = "schema", schemars(inner(regex(pattern = HEADER_NAME_PATTERN))))]
    remove: Vec<String>,
}

object_only::deserialize_from_object!(
    RawConfig,
    RawLimits,
    RawRetry,
    RawBackoff,
    RawDeadLetter,
    RawRule,
    RawMatch,
    RawPathMatch,
    RawHeaderMatch,
    RawTarget,
    RawHeaderEdits,
);

fn default_marker_header() -> String {
    DEFAULT_MARKER_HEADER.to_string()
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_sample_percent() -> f64 {
    100.0
}
fn default_sample_key() -> String {
    DEFAULT_SAMPLE_KEY.to_string()
}
fn default_true() -> bool {
    true
}
fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}

fn compile(raw: RawConfig) -> Result<Parsed, ConfigError> {
    let mut warnings = Vec::new();

    let mut raw = raw;
    raw.marker_header = raw.marker_header.to_ascii_lowercase();
    check_header_name("marker_header", &raw.marker_header)?;
    if headers::is_hop_by_hop(&raw.marker_header) || headers::is_credential(&raw.marker_header) {
        return Err(error(
            "marker_header",
            format!(
                "{:?} is a header the filter drops or recomputes on side calls, so it cannot mark them; use a name of its own such as \"x-mesh-fanout\"",
                raw.marker_header
            ),
        ));
    }

    if raw.rules.is_empty() {
        warnings
            .push("rules: empty, so the filter passes every request through untouched".to_string());
    }

    let mut rules = Vec::with_capacity(raw.rules.len());
    for (i, raw_rule) in raw.rules.into_iter().enumerate() {
        let path = format!("rules[{i}]");
        let rule = compile_rule(&path, raw_rule, &raw.marker_header, &mut warnings)?;
        if let Some(previous) = rules.iter().position(|r: &Rule| r.name == rule.name) {
            return Err(error(
                field(&path, "name"),
                format!(
                    "duplicate name {:?} (also rules[{previous}]); give each rule a unique name",
                    rule.name
                ),
            ));
        }
        rules.push(rule);
    }

    let limits = Limits {
        max_in_flight: limit_value(
            "limits.max_in_flight_per_worker",
            raw.limits.max_in_flight_per_worker,
        )?,
        max_body_bytes: limit_value(
            "limits.max_body_bytes_per_worker",
            raw.limits.max_body_bytes_per_worker,
        )?,
        retry_budget_percent: raw.limits.retry_budget_percent,
        min_retry_concurrency: raw.limits.min_retry_concurrency as usize,
    };
    if limits.retry_budget_percent > 100 {
        return Err(error(
            "limits.retry_budget_percent",
            format!(
                "{} is out of range; use 0 to 100",
                limits.retry_budget_percent
            ),
        ));
    }
    for rule in &rules {
        for target in rule
            .targets
            .iter()
            .filter(|t| t.body && t.max_body_bytes > limits.max_body_bytes)
        {
            warnings.push(format!(
                "rule {:?} target {:?}: max_body_bytes {} is above limits.max_body_bytes_per_worker {}, so bodies between the two are skipped as buffer_limit",
                rule.name, target.name, target.max_body_bytes, limits.max_body_bytes
            ));
        }
    }
    if raw.strip_incoming_marker {
        warnings.push(format!(
            "strip_incoming_marker: {:?} is removed from incoming requests, so a target that routes back to this listener loops; use it only on edge listeners",
            raw.marker_header
        ));
    }

    let total_targets: usize = rules.iter().map(|r| r.targets.len()).sum();
    if total_targets > MAX_TARGETS {
        return Err(error(
            "rules",
            format!(
                "{total_targets} targets in all; use at most {MAX_TARGETS}, because each target defines its stats on every worker when the plugin loads"
            ),
        ));
    }
    let method_path_prefilter = !rules
        .iter()
        .any(|r| !r.matcher.headers.is_empty() || r.matcher.accepts_any_method_and_path());
    Ok(Parsed {
        config: Config {
            method_path_prefilter,
            marker_header: raw.marker_header,
            strip_incoming_marker: raw.strip_incoming_marker,
            limits,
            rules,
        },
        warnings,
    })
}

fn compile_rule(
    path: &str,
    raw: RawRule,
    marker_header: &str,
    warnings: &mut Vec<String>,
) -> Result<Rule, ConfigError> {
    check_name(&field(path, "name"), &raw.name)?;

    if raw.mode == Mode::Shadow {
        if raw.on_failure.is_some() {
            return Err(error(
                field(path, "on_failure"),
                "only fan-out rules wait for targets; set \"mode\": \"fanout\" or remove `on_failure`",
            ));
        }
        if raw.result_header.is_some() {
            return Err(error(
                field(path, "result_header"),
                "only fan-out rules report target results; set \"mode\": \"fanout\" or remove `result_header`",
            ));
        }
    }
    if let Some(name) = &raw.result_header {
        check_editable_header(&field(path, "result_header"), name, marker_header)?;
    }

    let matcher = compile_match(&field(path, "match"), raw.match_)?;

    if raw.targets.is_empty() {
        return Err(error(
            field(path, "targets"),
            "empty; add at least one target",
        ));
    }
    let mut targets: Vec<Target> = Vec::with_capacity(raw.targets.len());
    for (j, raw_target) in raw.targets.into_iter().enumerate() {
        let target_path = format!("{path}.targets[{j}]");
        let target = compile_target(
            &target_path,
            raw_target,
            &raw.name,
            marker_header,
            raw.mode,
            warnings,
        )?;
        if let Some(previous) = targets.iter().position(|t| t.name == target.name) {
            return Err(error(
                field(&target_path, "name"),
                format!(
                    "duplicate name {:?} (also {path}.targets[{previous}]); give each target in a rule a unique name",
                    target.name
                ),
            ));
        }
        targets.push(target);
    }

    let rule = Rule {
        name: raw.name,
        matcher,
        mode: raw.mode,
        on_failure: raw.on_failure.unwrap_or_default(),
        result_header: raw.result_header,
        targets,
    };
    if rule.mode == Mode::Fanout && !rule.awaits_any() {
        warnings.push(format!(
            "{path}: fan-out rule {:?} awaits no target, so it behaves as a shadow rule; set \"await\": true on a target to hold responses",
            rule.name
        ));
    }
    Ok(rule)
}

fn compile_match(path: &str, raw: RawMatch) -> Result<RequestMatcher, ConfigError> {
    for (i, method) in raw.methods.iter().enumerate() {
        let valid = !method.is_empty()
            && method
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
        if !valid {
            return Err(error(
                format!("{path}.methods[{i}]"),
                format!(
                    "invalid method {method:?}; methods are case-sensitive, write them in upper case such as \"{}\"",
                    method.to_ascii_uppercase()
                ),
            ));
        }
    }

    let path_matcher = match raw.path {
        None => None,
        Some(p) => Some(compile_path_match(&field(path, "path"), p)?),
    };

    let mut header_matchers = Vec::with_capacity(raw.headers.len());
    for (i, h) in raw.headers.into_iter().enumerate() {
        header_matchers.push(compile_header_match(&format!("{path}.headers[{i}]"), h)?);
    }

    Ok(RequestMatcher {
        methods: raw.methods,
        path: path_matcher,
        headers: header_matchers,
    })
}

fn compile_path_match(path: &str, raw: RawPathMatch) -> Result<PathMatcher, ConfigError> {
    let matcher = match (raw.prefix, raw.exact, raw.regex) {
        (Some(prefix), None, None) => {
            check_path_value(&field(path, "prefix"), &prefix)?;
            PathMatcher::Prefix(prefix)
        }
        (None, Some(exact), None) => {
            check_path_value(&field(path, "exact"), &exact)?;
            if exact.contains('?') {
                return Err(error(
                    field(path, "exact"),
                    format!("{exact:?} contains a query string, but `exact` compares the path without it; remove the query or use `prefix`"),
                ));
            }
            PathMatcher::Exact(exact)
        }
        (None, None, Some(regex)) => {
            PathMatcher::Regex(matcher::compile_full_match(&regex).map_err(|e| {
                error(
                    field(path, "regex"),
                    format!("invalid regex {regex:?}: {e}"),
                )
            })?)
        }
        _ => {
            return Err(error(
                path,
                "set exactly one of `prefix`, `exact` or `regex`",
            ));
        }
    };
    Ok(matcher)
}

fn compile_header_match(path: &str, raw: RawHeaderMatch) -> Result<HeaderMatcher, ConfigError> {
    let name = raw.name.to_ascii_lowercase();
    check_header_name(&field(path, "name"), &name)?;

    let value = match (raw.exact, raw.prefix, raw.regex, raw.present) {
        (Some(exact), None, None, None) => ValueMatcher::Exact(exact.into_bytes()),
        (None, Some(prefix), None, None) => ValueMatcher::Prefix(prefix.into_bytes()),
        (None, None, Some(regex), None) => {
            ValueMatcher::Regex(matcher::compile_full_match(&regex).map_err(|e| {
                error(
                    field(path, "regex"),
                    format!("invalid regex {regex:?}: {e}"),
                )
            })?)
        }
        (None, None, None, Some(present)) => ValueMatcher::Present(present),
        _ => {
            return Err(error(
                path,
                "set exactly one of `exact`, `prefix`, `regex` or `present`",
            ));
        }
    };
    Ok(HeaderMatcher { name, value })
}

fn compile_target(
    path: &str,
    raw: RawTarget,
    rule_name: &str,
    marker_header: &str,
    mode: Mode,
    warnings: &mut Vec<String>,
) -> Result<Target, ConfigError> {
    check_name(&field(path, "name"), &raw.name)?;

    // Fan-out targets are awaited unless they opt out; shadow targets never are.
    let awaited = match (mode, raw.awaited) {
        (Mode::Shadow, Some(true)) => {
            return Err(error(
                field(path, "await"),
                "shadow rules never wait for targets; set the rule's \"mode\" to \"fanout\" or remove `await`",
            ));
        }
        (Mode::Shadow, _) => false,
        (Mode::Fanout, awaited) => awaited.unwrap_or(true),
    };

    if raw.cluster.is_empty() {
        return Err(error(
            field(path, "cluster"),
            "empty; name an Envoy cluster",
        ));
    }
    if raw
        .cluster
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(error(
            field(path, "cluster"),
            format!(
                "invalid cluster name {:?}; cluster names contain no spaces or control characters",
                raw.cluster
            ),
        ));
    }

    if raw.timeout_ms == 0 || raw.timeout_ms > MAX_TIMEOUT_MS {
        return Err(error(
            field(path, "timeout_ms"),
            format!(
                "{} is out of range; use 1 to {MAX_TIMEOUT_MS}",
                raw.timeout_ms
            ),
        ));
    }

    if !raw.sample_percent.is_finite() || !(0.0..=100.0).contains(&raw.sample_percent) {
        return Err(error(
            field(path, "sample_percent"),
            format!("{} is out of range; use 0 to 100", raw.sample_percent),
        ));
    }

    let sample_rate = Rate::from_percent(raw.sample_percent);
    if raw.sample_percent > 0.0 && sample_rate.never() {
        return Err(error(
            field(path, "sample_percent"),
            format!(
                "{} rounds to 0 and would never sample; use 0 to turn the target off or at least 0.0001",
                raw.sample_percent
            ),
        ));
    }
    if sample_rate.percent() != raw.sample_percent {
        warnings.push(format!(
            "{}: {} is rounded to {}, because sampling works in steps of 0.0001 %",
            field(path, "sample_percent"),
            raw.sample_percent,
            sample_rate.percent()
        ));
    }

    let sample_key = raw.sample_key.to_ascii_lowercase();
    check_header_name(&field(path, "sample_key"), &sample_key)?;

    if let Some(authority) = &raw.authority {
        let valid = !authority.is_empty()
            && !authority
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
        if !valid {
            return Err(error(
                field(path, "authority"),
                format!("invalid authority {authority:?}; use a host or host:port"),
            ));
        }
    }

    if let Some(side_path) = &raw.path {
        check_path_value(&field(path, "path"), side_path)?;
    }

    let (set_headers, remove_headers) =
        compile_header_edits(&field(path, "headers"), raw.headers, marker_header)?;

    if raw.max_body_bytes > MAX_BODY_BYTES_LIMIT {
        return Err(error(
            field(path, "max_body_bytes"),
            format!(
                "{} is out of range; use 0 to {MAX_BODY_BYTES_LIMIT}",
                raw.max_body_bytes
            ),
        ));
    }
    let max_body_bytes = usize::try_from(raw.max_body_bytes).map_err(|_| {
        error(
            field(path, "max_body_bytes"),
            format!("{} does not fit this platform's memory", raw.max_body_bytes),
        )
    })?;

    let retry = match raw.retry {
        None => None,
        Some(r) => Some(compile_retry(&field(path, "retry"), r)?),
    };
    let idempotency_header = match raw.idempotency_header {
        None => None,
        Some(name) => {
            let name = name.to_ascii_lowercase();
            let field = field(path, "idempotency_header");
            check_editable_header(&field, &name, marker_header)?;
            if set_headers.iter().any(|(set, _)| *set == name) {
                return Err(error(
                    field,
                    format!("{name:?} is also in headers.set; the filter sets this header itself, so remove it from headers.set"),
                ));
            }
            Some(name)
        }
    };
    let dead_letter = match raw.dead_letter {
        None => None,
        Some(d) => Some(compile_dead_letter(&field(path, "dead_letter"), d)?),
    };

    // Inserted in order, so the sort code of the standard library stays
    // out of the module.
    let mut dropped_headers: Vec<String> = Vec::new();
    let credentials = if raw.strip_credentials {
        headers::CREDENTIALS
    } else {
        &[]
    };
    let names = headers::HOP_BY_HOP
        .iter()
        .chain(credentials)
        .copied()
        .chain([marker_header])
        .chain(remove_headers.iter().map(String::as_str))
        .chain(set_headers.iter().map(|(name, _)| name.as_str()))
        .chain(idempotency_header.as_deref());
    for name in names {
        if let Err(at) = dropped_headers.binary_search_by(|d| d.as_str().cmp(name)) {
            dropped_headers.insert(at, name.to_owned());
        }
    }

    Ok(Target {
        marker_value: format!("{rule_name}/{}", raw.name),
        dropped_headers,
        name: raw.name,
        cluster: raw.cluster,
        timeout_ms: raw.timeout_ms,
        sample_rate,
        sample_key,
        authority: raw.authority,
        path: raw.path,
        set_headers,
        remove_headers,
        body: raw.body,
        max_body_bytes,
        awaited,
        strip_credentials: raw.strip_credentials,
        retry,
        idempotency_header,
        dead_letter,
    })
}

fn compile_retry(path: &str, raw: RawRetry) -> Result<RetryPolicy, ConfigError> {
    if raw.attempts < 2 || raw.attempts > MAX_ATTEMPTS {
        return Err(error(
            field(path, "attempts"),
            format!(
                "{} is out of range; use 2 to {MAX_ATTEMPTS} (the first attempt included), or remove `retry`",
                raw.attempts
            ),
        ));
    }
    let RawBackoff { base, max } = raw.backoff_ms;
    if base == 0 || base > MAX_TIMEOUT_MS {
        return Err(error(
            field(path, "backoff_ms.base"),
            format!("{base} is out of range; use 1 to {MAX_TIMEOUT_MS}"),
        ));
    }
    if max < base || max > MAX_TIMEOUT_MS {
        return Err(error(
            field(path, "backoff_ms.max"),
            format!("{max} is out of range; use {base} (the base) to {MAX_TIMEOUT_MS}"),
        ));
    }
    if raw.on.is_empty() {
        return Err(error(
            field(path, "on"),
            "empty; list the outcomes to retry, such as \"5xx\"",
        ));
    }
    let mut on = Vec::with_capacity(raw.on.len());
    for (i, name) in raw.on.iter().enumerate() {
        let outcome = Outcome::ALL
            .into_iter()
            .find(|o| *o != Outcome::Success && o.as_str() == name)
            .ok_or_else(|| {
                error(
                    format!("{path}.on[{i}]"),
                    format!("unknown outcome {name:?}; use 4xx, 5xx, timeout, reset, overflow or dispatch_error"),
                )
            })?;
        on.push(outcome);
    }
    Ok(RetryPolicy {
        attempts: raw.attempts,
        base_ms: base,
        max_ms: max,
        on,
    })
}

fn compile_dead_letter(path: &str, raw: RawDeadLetter) -> Result<DeadLetter, ConfigError> {
    if raw.cluster.is_empty()
        || raw
            .cluster
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(error(
            field(path, "cluster"),
            format!(
                "invalid cluster name {:?}; name an Envoy cluster",
                raw.cluster
            ),
        ));
    }
    check_path_value(&field(path, "path"), &raw.path)?;
    if raw.timeout_ms == 0 || raw.timeout_ms > MAX_TIMEOUT_MS {
        return Err(error(
            field(path, "timeout_ms"),
            format!(
                "{} is out of range; use 1 to {MAX_TIMEOUT_MS}",
                raw.timeout_ms
            ),
        ));
    }
    Ok(DeadLetter {
        cluster: raw.cluster,
        path: raw.path,
        timeout_ms: raw.timeout_ms,
    })
}

type HeaderEdits = (Vec<(String, String)>, Vec<String>);

fn compile_header_edits(
    path: &str,
    raw: RawHeaderEdits,
    marker_header: &str,
) -> Result<HeaderEdits, ConfigError> {
    let mut set = Vec::with_capacity(raw.set.0.len());
    for (name, value) in raw.set.0 {
        let field = if !name.bytes().any(|b| b.is_ascii_control() || b == b'"') {
            format!("{path}.set.{name}")
        } else {
            // Quoted, so a name with a line break cannot split the log line.
            format!("{path}.set[{name:?}]")
        };
        let lower = name.to_ascii_lowercase();
        check_editable_header(&field, &lower, marker_header)?;
        if headers::has_line_break_or_nul(value.as_bytes()) {
            return Err(error(
                field,
                "value contains CR, LF or NUL, which would start a new header line; remove them",
            ));
        }
        if set.iter().any(|(n, _): &(String, String)| *n == lower) {
            return Err(error(
                field,
                "set twice when names are compared case-insensitively; keep one",
            ));
        }
        set.push((lower, value));
    }

    let mut remove = Vec::with_capacity(raw.remove.len());
    for (i, name) in raw.remove.into_iter().enumerate() {
        let field = format!("{path}.remove[{i}]");
        let lower = name.to_ascii_lowercase();
        check_editable_header(&field, &lower, marker_header)?;
        remove.push(lower);
    }

    Ok((set, remove))
}

/// Pseudo-headers and hop-by-hop headers are the filter's to write, and
/// the marker header keeps side calls from looping.
fn check_editable_header(field: &str, name: &str, marker_header: &str) -> Result<(), ConfigError> {
    if name.starts_with(':') {
        return Err(error(
            field,
            format!(
                "{name:?} is a pseudo-header; use the target's `authority` or `path` field instead"
            ),
        ));
    }
    check_header_name(field, name)?;
    // Envoy keeps the authority in `:authority` and would join a `host`
    // header to it with a comma, which many servers reject with a 400.
    if name == "host" {
        return Err(error(
            field,
            "\"host\" is the request's authority; use the target's `authority` field instead",
        ));
    }
    if headers::is_hop_by_hop(name) {
        return Err(error(
            field,
            format!(
                "{name:?} is a hop-by-hop header that the filter sets itself; remove this entry"
            ),
        ));
    }
    if name == marker_header {
        return Err(error(
            field,
            format!("{name:?} is the marker header that prevents loops; remove this entry"),
        ));
    }
    Ok(())
}

fn check_header_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if headers::is_valid_name(name) {
        Ok(())
    } else {
        Err(error(
            field,
            format!("invalid header name {name:?}; use an HTTP token: letters, digits and !#$%&'*+-.^_`|~, without spaces, colons or pseudo-headers"),
        ))
    }
}

fn limit_value(field: &str, value: u64) -> Result<usize, ConfigError> {
    if value == 0 || value > MAX_LIMIT_VALUE {
        return Err(error(
            field,
            format!("{value} is out of range; use 1 to {MAX_LIMIT_VALUE}"),
        ));
    }
    usize::try_from(value).map_err(|_| {
        error(
            field,
            format!("{value} does not fit this platform's memory"),
        )
    })
}

fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(error(
            field,
            "empty; give it a name such as \"signup\" or \"analytics\"",
        ));
    }
    let valid = name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(error(
            field,
            format!(
                "invalid name {name:?}; use at most {MAX_NAME_LEN} letters, digits, _ or - (names become parts of stat names)"
            ),
        ));
    }
    Ok(())
}

fn check_path_value(field: &str, value: &str) -> Result<(), ConfigError> {
    let valid = value.starts_with('/')
        && !value
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
    if valid {
        Ok(())
    } else {
        Err(error(
            field,
            format!("invalid path {value:?}; start with / and use no spaces or control characters"),
        ))
    }
}

/// Returns the JSON Schema (draft 2020-12) of the plugin configuration,
/// pretty-printed, as committed in schema/mesh-fanout.schema.json.
#[cfg(feature = "schema")]
pub fn json_schema() -> String {
    format!("{:#}\n", schemars::schema_for!(RawConfig).as_value())
}

#[cfg(test)]
mod error_path_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"{
      "marker_header": "x-mesh-fanout",
      "rules": [{
        "name": "signup",
        "match": {"methods": ["POST"], "path": {"prefix": "/api/v1/register"},
                  "headers": [{"name": "x-tenant", "exact": "acme"}, {"name": "x-debug", "present": true}]},
        "mode": "shadow",
        "targets": [{
          "name": "analytics", "cluster": "analytics", "timeout_ms": 2000,
          "sample_percent": 100, "sample_key": "x-request-id",
          "authority": "analytics.internal", "path": "/ingest",
          "headers": {"set": {"x-source": "mesh-fanout"}, "remove": ["authorization", "cookie"]},
          "body": true, "max_body_bytes": 1048576
        }]
      }]
    }"#;

    fn parse_err(json: &str) -> String {
        match parse(json.as_bytes()) {
            Ok(_) => panic!("expected an error for {json}"),
            Err(e) => e.to_string(),
        }
    }

    fn one_target(target: &str) -> String {
        format!(r#"{{"rules": [{{"name": "r", "targets": [{target}]}}]}}"#)
    }

    #[test]
    fn prefilter_only_when_it_can_reject() {
        let cases = [
            (r#"{"methods": ["POST"], "path": {"prefix": "/api"}}"#, true),
            (r#"{"path": {"exact": "/api"}}"#, true),
            (r#"{"methods": ["GET"]}"#, true),
            (r#"{"path": {"prefix": "/"}}"#, false),
            (r#"{}"#, false),
            (
                r#"{"path": {"prefix": "/api"}, "headers": [{"name": "x-a", "present": true}]}"#,
                false,
            ),
        ];
        for (matcher, expected) in cases {
            let json = format!(
                r#"{{"rules": [{{"name": "r", "match": {matcher}, "targets": [{{"name": "t", "cluster": "c"}}]}}]}}"#
            );
            let config = parse(json.as_bytes()).unwrap().config;
            assert_eq!(config.method_path_prefilter, expected, "match {matcher}");
        }
    }

    #[test]
    fn full_example_parses() {
        let parsed = parse(ISSUE_EXAMPLE.as_bytes()).unwrap();
        assert!(parsed.warnings.is_empty());
        let rule = &parsed.config.rules[0];
        assert_eq!(rule.name, "signup");
        assert_eq!(rule.matcher.methods, vec!["POST"]);
        let target = &rule.targets[0];
        assert_eq!(target.cluster, "analytics");
        assert_eq!(target.timeout_ms, 2000);
        assert_eq!(target.authority.as_deref(), Some("analytics.internal"));
        assert_eq!(target.path.as_deref(), Some("/ingest"));
        assert_eq!(
            target.set_headers,
            vec![("x-source".to_string(), "mesh-fanout".to_string())]
        );
        assert_eq!(target.remove_headers, vec!["authorization", "cookie"]);
        assert!(target.body);
        assert_eq!(target.max_body_bytes, 1_048_576);
    }

    #[test]
    fn defaults_apply() {
        let parsed = parse(one_target(r#"{"name": "t", "cluster": "c"}"#).as_bytes()).unwrap();
        let config = parsed.config;
        assert_eq!(config.marker_header, DEFAULT_MARKER_HEADER);
        let target = &config.rules[0].targets[0];
        assert_eq!(target.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert!(target.sample_rate.always());
        assert_eq!(target.sample_key, "x-request-id");
        assert!(target.body);
        assert_eq!(target.max_body_bytes, 1024 * 1024);
        assert!(target.authority.is_none());
        assert!(target.path.is_none());
    }

    #[test]
    fn missing_field_named() {
        assert_eq!(
            parse_err(
                r#"{"rules": [{"name": "r", "targets": [{"name": "a", "cluster": "c"}, {"name": "b"}]}]}"#
            ),
            "rules[0].targets[1].cluster: missing"
        );
        assert_eq!(parse_err(r#"{}"#), "rules: missing");
    }

    #[test]
    fn unknown_field_named() {
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "timeout": 5}"#,
        ));
        assert!(
            message.starts_with("rules[0].targets[0].timeout: unknown field `timeout`"),
            "{message}"
        );
        assert!(message.contains("timeout_ms"), "{message}");
    }

    #[test]
    fn wrong_type_named() {
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "timeout_ms": "5"}"#,
        ));
        assert!(
            message.starts_with("rules[0].targets[0].timeout_ms: invalid type"),
            "{message}"
        );
    }

    #[test]
    fn enum_of_wrong_type_named() {
        for value in ["1", "true", "null", r#"["shadow"]"#] {
            let json = format!(
                r#"{{"rules": [{{"name": "r", "mode": {value}, "targets": [{{"name": "t", "cluster": "c"}}]}}]}}"#
            );
            let message = parse_err(&json);
            assert!(
                message.starts_with("rules[0].mode: invalid type:"),
                "{value}: {message}"
            );
            assert!(message.contains("expected a string"), "{value}: {message}");
        }
        let message = parse_err(
            r#"{"rules": [{"name": "r", "mode": "fanout", "on_failure": 0, "targets": [{"name": "t", "cluster": "c"}]}]}"#,
        );
        assert!(
            message.starts_with("rules[0].on_failure: invalid type: integer `0`"),
            "{message}"
        );
        assert_eq!(
            parse_err(
                r#"{"rules": [{"name": "r", "mode": "x", "targets": [{"name": "t", "cluster": "c"}]}]}"#
            ),
            "rules[0].mode: unknown variant `x`, expected `shadow` or `fanout`"
        );
    }

    #[test]
    fn negative_count_named_in_json_terms() {
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "retry": {"attempts": -1}}"#,
        ));
        assert_eq!(
            message,
            "rules[0].targets[0].retry.attempts: invalid value: integer `-1`, expected a whole number of at least 0"
        );
    }

    #[test]
    fn struct_as_array_rejected() {
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "retry": {"attempts": 2, "backoff_ms": [50, 1000]}}"#,
        ));
        assert_eq!(
            message,
            "rules[0].targets[0].retry.backoff_ms: invalid type: array, expected an object; see the configuration reference in README.md for the field's type"
        );
        assert_eq!(
            parse_err(r#"{"rules": [["r", {}, "shadow"]]}"#),
            "rules[0]: invalid type: array, expected an object; see the configuration reference in README.md for the field's type"
        );
        assert_eq!(
            parse_err(r#"{"rules": {"r": {}}}"#),
            "rules: invalid type: object, expected an array; see the configuration reference in README.md for the field's type"
        );
        assert_eq!(
            parse_err("[1]"),
            "the configuration must be a JSON object, such as {\"rules\": [...]}"
        );
    }

    #[test]
    fn readable_types_replaces_every_term() {
        let cases = [
            (
                "invalid type: string \"x\", expected f64",
                "invalid type: string \"x\", expected a number",
            ),
            (
                "expected u64 at line 1 column 5",
                "expected a whole number of at least 0 at line 1 column 5",
            ),
            ("expected a boolean", "expected true or false"),
            // A quoted value from the configuration stays as written.
            (
                "string \"expected u64\", expected u64",
                "string \"expected u64\", expected a whole number of at least 0",
            ),
            (
                "expected u32, expected f32, expected",
                "expected a whole number of at least 0, expected f32, expected",
            ),
            (
                "expected u16, expected f32, expected",
                "expected u16, expected f32, expected",
            ),
            ("é expected f64é e", "é expected a numberé e"),
            ("", ""),
            ("e", "e"),
            (
                "invalid type: sequence, expected struct RawRetry",
                "invalid type: array, expected an object",
            ),
            (
                "expected struct RawConfig at line 1 column 0",
                "expected an object at line 1 column 0",
            ),
            (
                "invalid type: map, expected a sequence",
                "invalid type: object, expected an array",
            ),
            (" expected f64 ", " expected a number "),
        ];
        for (message, expected) in cases {
            assert_eq!(readable_types(message), expected, "{message}");
        }
    }

    #[test]
    fn not_json_rejected() {
        let message = parse_err("{rules");
        assert!(message.contains("key must be a string"), "{message}");
        let message = parse_err(r#"{"rules": []} x"#);
        assert!(message.contains("trailing characters"), "{message}");
    }

    #[test]
    fn messages_use_json_terms() {
        let message = parse_err("not json");
        assert!(message.starts_with("invalid JSON: expected"), "{message}");
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "sample_percent": "all"}"#,
        ));
        assert!(message.contains("expected a number"), "{message}");
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "timeout_ms": -5}"#,
        ));
        assert!(
            message.contains("expected a whole number of at least 0"),
            "{message}"
        );
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "body": "yes"}"#,
        ));
        assert!(message.contains("expected true or false"), "{message}");
    }

    #[test]
    fn header_name_with_line_break_quoted() {
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "headers": {"set": {"x-a\r\nx-b": "v"}}}"#,
        ));
        assert!(
            message.starts_with(
                r#"rules[0].targets[0].headers.set["x-a\r\nx-b"]: invalid header name"#
            ),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn tiny_sample_percent_rejected() {
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "sample_percent": 0.00001}"#,
        ));
        assert!(
            message.starts_with("rules[0].targets[0].sample_percent: 0.00001 rounds to 0"),
            "{message}"
        );
        assert!(parse(
            one_target(r#"{"name": "t", "cluster": "c", "sample_percent": 0.0001}"#).as_bytes()
        )
        .is_ok());
    }

    #[test]
    fn fine_sample_percent_rounded_with_warning() {
        let parsed = parse(
            one_target(r#"{"name": "t", "cluster": "c", "sample_percent": 12.34567}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            parsed.warnings,
            vec!["rules[0].targets[0].sample_percent: 12.34567 is rounded to 12.3457, because sampling works in steps of 0.0001 %"]
        );
        for exact in ["12.3457", "33.33", "0.1", "100", "0"] {
            let json = one_target(&format!(
                r#"{{"name": "t", "cluster": "c", "sample_percent": {exact}}}"#
            ));
            let parsed = parse(json.as_bytes()).unwrap();
            assert!(parsed.warnings.is_empty(), "{exact}: {:?}", parsed.warnings);
        }
    }

    #[test]
    fn marker_header_must_survive_side_calls() {
        for name in [
            "content-length",
            "connection",
            "te",
            "keep-alive",
            "cookie",
            "authorization",
        ] {
            let message = parse_err(&format!(r#"{{"marker_header": "{name}", "rules": []}}"#));
            assert!(
                message.starts_with(&format!(
                    "marker_header: \"{name}\" is a header the filter drops"
                )),
                "{message}"
            );
        }
    }

    #[test]
    fn exact_path_with_query_rejected() {
        let json = r#"{"rules": [{"name": "r", "match": {"path": {"exact": "/a?b"}}, "targets": [{"name": "t", "cluster": "c"}]}]}"#;
        assert!(parse_err(json)
            .starts_with("rules[0].match.path.exact: \"/a?b\" contains a query string"));
    }

    #[test]
    fn idempotency_header_not_also_set() {
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "idempotency_header": "x-key", "headers": {"set": {"x-key": "v"}}}"#,
        ));
        assert!(
            message.starts_with(
                "rules[0].targets[0].idempotency_header: \"x-key\" is also in headers.set"
            ),
            "{message}"
        );
    }

    #[test]
    fn too_many_targets_rejected() {
        let rule = |i: usize| {
            format!(
                r#"{{"name": "r{i}", "targets": [{{"name": "a", "cluster": "c"}}, {{"name": "b", "cluster": "c"}}]}}"#
            )
        };
        let rules: Vec<String> = (0..501).map(rule).collect();
        let message = parse_err(&format!(r#"{{"rules": [{}]}}"#, rules.join(",")));
        assert!(
            message.starts_with("rules: 1002 targets in all; use at most 1000"),
            "{message}"
        );
        let rules: Vec<String> = (0..500).map(rule).collect();
        assert!(parse(format!(r#"{{"rules": [{}]}}"#, rules.join(",")).as_bytes()).is_ok());
    }

    #[test]
    fn marker_header_lowercased() {
        let parsed = parse(br#"{"marker_header": "X-Mesh-Fanout", "rules": []}"#).unwrap();
        assert_eq!(parsed.config.marker_header, "x-mesh-fanout");
    }

    #[test]
    fn body_limit_above_worker_budget_warns() {
        let json = r#"{"limits": {"max_body_bytes_per_worker": 1000}, "rules": [{"name": "r", "targets": [{"name": "t", "cluster": "c", "max_body_bytes": 5000}]}]}"#;
        let parsed = parse(json.as_bytes()).unwrap();
        assert_eq!(parsed.warnings.len(), 1, "{:?}", parsed.warnings);
        assert!(parsed.warnings[0].contains("skipped as buffer_limit"));
    }

    #[test]
    fn empty_configuration_rejected() {
        assert!(parse_err("  ").starts_with("configuration: missing"));
    }

    #[test]
    fn empty_rules_warns() {
        let parsed = parse(br#"{"rules": []}"#).unwrap();
        assert_eq!(parsed.warnings.len(), 1);
    }

    #[test]
    fn names_checked() {
        assert_eq!(
            parse_err(&one_target(r#"{"name": "", "cluster": "c"}"#)),
            "rules[0].targets[0].name: empty; give it a name such as \"signup\" or \"analytics\""
        );
        assert!(parse_err(&one_target(r#"{"name": "a.b", "cluster": "c"}"#))
            .starts_with("rules[0].targets[0].name: invalid name \"a.b\""));
        assert!(parse_err(
            r#"{"rules": [{"name": "r", "targets": [{"name": "t", "cluster": "c"}]}, {"name": "r", "targets": [{"name": "t", "cluster": "c"}]}]}"#
        )
        .starts_with("rules[1].name: duplicate name \"r\" (also rules[0])"));
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c"}, {"name": "t", "cluster": "d"}"#
        ))
        .starts_with("rules[0].targets[1].name: duplicate name \"t\""));
    }

    #[test]
    fn no_targets_rejected() {
        assert_eq!(
            parse_err(r#"{"rules": [{"name": "r", "targets": []}]}"#),
            "rules[0].targets: empty; add at least one target"
        );
    }

    #[test]
    fn limits_and_marker_options() {
        let parsed = parse(br#"{"rules": []}"#).unwrap();
        assert_eq!(
            parsed.config.limits,
            Limits {
                max_in_flight: 1000,
                max_body_bytes: 32 * 1024 * 1024,
                retry_budget_percent: 20,
                min_retry_concurrency: 3
            }
        );
        assert!(!parsed.config.strip_incoming_marker);

        let parsed = parse(
            br#"{"strip_incoming_marker": true, "limits": {"max_in_flight_per_worker": 5, "max_body_bytes_per_worker": 100}, "rules": []}"#,
        )
        .unwrap();
        assert_eq!(
            parsed.config.limits,
            Limits {
                max_in_flight: 5,
                max_body_bytes: 100,
                retry_budget_percent: 20,
                min_retry_concurrency: 3
            }
        );
        assert!(parsed.config.strip_incoming_marker);
        assert!(
            parsed
                .warnings
                .iter()
                .any(|w| w.starts_with("strip_incoming_marker:")),
            "{:?}",
            parsed.warnings
        );

        assert_eq!(
            parse_err(r#"{"limits": {"max_in_flight_per_worker": 0}, "rules": []}"#),
            "limits.max_in_flight_per_worker: 0 is out of range; use 1 to 4294967295"
        );
        assert!(parse_err(r#"{"limits": {"max_inflight": 3}, "rules": []}"#)
            .starts_with("limits.max_inflight: unknown field `max_inflight`"));
    }

    #[test]
    fn credentials_stripped_by_default() {
        let parsed = parse(one_target(r#"{"name": "t", "cluster": "c"}, {"name": "u", "cluster": "c", "strip_credentials": false}"#).as_bytes()).unwrap();
        let targets = &parsed.config.rules[0].targets;
        assert!(targets[0].strip_credentials);
        assert!(!targets[1].strip_credentials);
    }

    #[test]
    fn retry_and_dead_letter_parse() {
        let parsed = parse(
            one_target(
                r#"{"name": "t", "cluster": "c",
                "retry": {"attempts": 3, "backoff_ms": {"base": 50, "max": 1000}, "on": ["5xx", "reset"]},
                "idempotency_header": "Idempotency-Key",
                "dead_letter": {"cluster": "dlq", "path": "/dead-letters"}}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        let target = &parsed.config.rules[0].targets[0];
        assert_eq!(
            target.retry,
            Some(RetryPolicy {
                attempts: 3,
                base_ms: 50,
                max_ms: 1000,
                on: vec![Outcome::Status5xx, Outcome::Reset]
            })
        );
        assert_eq!(
            target.idempotency_header.as_deref(),
            Some("idempotency-key")
        );
        assert_eq!(
            target.dead_letter,
            Some(DeadLetter {
                cluster: "dlq".into(),
                path: "/dead-letters".into(),
                timeout_ms: DEFAULT_TIMEOUT_MS
            })
        );
        assert_eq!(parsed.config.limits.retry_budget_percent, 20);
        assert_eq!(parsed.config.limits.min_retry_concurrency, 3);

        let defaults = parse(
            one_target(r#"{"name": "t", "cluster": "c", "retry": {"attempts": 2}}"#).as_bytes(),
        )
        .unwrap();
        let retry = defaults.config.rules[0].targets[0].retry.clone().unwrap();
        assert_eq!((retry.base_ms, retry.max_ms), (50, 1000));
        assert_eq!(
            retry.on,
            vec![
                Outcome::Status5xx,
                Outcome::Reset,
                Outcome::Timeout,
                Outcome::Overflow
            ]
        );
    }

    #[test]
    fn retry_and_dead_letter_checked() {
        let cases = [
            (
                r#""retry": {"attempts": 1}"#,
                "rules[0].targets[0].retry.attempts: 1 is out of range; use 2 to 10",
            ),
            (
                r#""retry": {"attempts": 11}"#,
                "rules[0].targets[0].retry.attempts: 11 is out of range",
            ),
            (
                r#""retry": {"attempts": 3, "backoff_ms": {"base": 0}}"#,
                "rules[0].targets[0].retry.backoff_ms.base: 0 is out of range",
            ),
            (
                r#""retry": {"attempts": 3, "backoff_ms": {"base": 100, "max": 50}}"#,
                "rules[0].targets[0].retry.backoff_ms.max: 50 is out of range; use 100 (the base)",
            ),
            (
                r#""retry": {"attempts": 3, "on": []}"#,
                "rules[0].targets[0].retry.on: empty",
            ),
            (
                r#""retry": {"attempts": 3, "on": ["success"]}"#,
                "rules[0].targets[0].retry.on[0]: unknown outcome \"success\"",
            ),
            (
                r#""retry": {"attempts": 3, "on": ["5XX"]}"#,
                "rules[0].targets[0].retry.on[0]: unknown outcome \"5XX\"",
            ),
            (
                r#""idempotency_header": ":path""#,
                "rules[0].targets[0].idempotency_header: \":path\" is a pseudo-header",
            ),
            (
                r#""dead_letter": {"cluster": ""}"#,
                "rules[0].targets[0].dead_letter.cluster: invalid cluster name",
            ),
            (
                r#""dead_letter": {"cluster": "dlq", "path": "dead"}"#,
                "rules[0].targets[0].dead_letter.path: invalid path",
            ),
            (
                r#""dead_letter": {"path": "/x"}"#,
                "rules[0].targets[0].dead_letter.cluster: missing",
            ),
        ];
        for (fields, expected) in cases {
            let message = parse_err(&one_target(&format!(
                r#"{{"name": "t", "cluster": "c", {fields}}}"#
            )));
            assert!(message.starts_with(expected), "{fields}: {message}");
        }
        assert!(
            parse_err(r#"{"limits": {"retry_budget_percent": 101}, "rules": []}"#)
                .starts_with("limits.retry_budget_percent: 101 is out of range")
        );
    }

    #[test]
    fn fanout_rule_parses() {
        let json = r#"{"rules": [{"name": "orders", "match": {"methods": ["POST"], "path": {"prefix": "/orders"}},
            "mode": "fanout", "on_failure": "fail", "result_header": "x-mesh-fanout-result",
            "targets": [
              {"name": "inventory", "cluster": "inventory", "timeout_ms": 800, "await": true},
              {"name": "audit", "cluster": "audit", "timeout_ms": 3000, "await": false},
              {"name": "billing", "cluster": "billing"}
            ]}]}"#;
        let parsed = parse(json.as_bytes()).unwrap();
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        let rule = &parsed.config.rules[0];
        assert_eq!(rule.mode, Mode::Fanout);
        assert_eq!(rule.on_failure, OnFailure::Fail);
        assert_eq!(rule.result_header.as_deref(), Some("x-mesh-fanout-result"));
        let awaited: Vec<bool> = rule.targets.iter().map(|t| t.awaited).collect();
        assert_eq!(awaited, vec![true, false, true]);
        assert!(rule.awaits_any());
    }

    #[test]
    fn fanout_defaults() {
        let json = r#"{"rules": [{"name": "r", "mode": "fanout", "targets": [{"name": "t", "cluster": "c"}]}]}"#;
        let rule = &parse(json.as_bytes()).unwrap().config.rules[0];
        assert_eq!(rule.on_failure, OnFailure::Ignore);
        assert_eq!(rule.result_header, None);
        assert!(rule.targets[0].awaited);
    }

    #[test]
    fn fanout_without_awaited_target_warns() {
        let json = r#"{"rules": [{"name": "r", "mode": "fanout", "targets": [{"name": "t", "cluster": "c", "await": false}]}]}"#;
        let parsed = parse(json.as_bytes()).unwrap();
        assert_eq!(parsed.warnings.len(), 1);
        assert!(
            parsed.warnings[0].starts_with("rules[0]: fan-out rule \"r\" awaits no target"),
            "{:?}",
            parsed.warnings
        );
        assert!(!parsed.config.rules[0].awaits_any());
    }

    #[test]
    fn fanout_fields_rejected_on_shadow() {
        let message = parse_err(
            r#"{"rules": [{"name": "r", "on_failure": "fail", "targets": [{"name": "t", "cluster": "c"}]}]}"#,
        );
        assert!(
            message.starts_with("rules[0].on_failure: only fan-out rules wait"),
            "{message}"
        );
        let message = parse_err(
            r#"{"rules": [{"name": "r", "result_header": "x-r", "targets": [{"name": "t", "cluster": "c"}]}]}"#,
        );
        assert!(
            message.starts_with("rules[0].result_header: only fan-out rules"),
            "{message}"
        );
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "await": true}"#,
        ));
        assert!(
            message.starts_with("rules[0].targets[0].await: shadow rules never wait"),
            "{message}"
        );
        let shadow_await_false =
            parse(one_target(r#"{"name": "t", "cluster": "c", "await": false}"#).as_bytes());
        assert!(shadow_await_false.is_ok());
    }

    #[test]
    fn fanout_values_checked() {
        let message = parse_err(
            r#"{"rules": [{"name": "r", "mode": "fanout", "on_failure": "retry", "targets": [{"name": "t", "cluster": "c"}]}]}"#,
        );
        assert!(
            message.starts_with("rules[0].on_failure: unknown variant `retry`"),
            "{message}"
        );
        let message = parse_err(
            r#"{"rules": [{"name": "r", "mode": "fanout", "result_header": "Bad Header", "targets": [{"name": "t", "cluster": "c"}]}]}"#,
        );
        assert!(
            message.starts_with("rules[0].result_header: invalid header name"),
            "{message}"
        );
        let message = parse_err(
            r#"{"rules": [{"name": "r", "mode": "mirror", "targets": [{"name": "t", "cluster": "c"}]}]}"#,
        );
        assert!(
            message.starts_with("rules[0].mode: unknown variant `mirror`"),
            "{message}"
        );
    }

    #[test]
    fn ranges_checked() {
        assert_eq!(
            parse_err(&one_target(
                r#"{"name": "t", "cluster": "c", "sample_percent": 100.5}"#
            )),
            "rules[0].targets[0].sample_percent: 100.5 is out of range; use 0 to 100"
        );
        assert_eq!(
            parse_err(&one_target(
                r#"{"name": "t", "cluster": "c", "sample_percent": -1}"#
            )),
            "rules[0].targets[0].sample_percent: -1 is out of range; use 0 to 100"
        );
        assert_eq!(
            parse_err(&one_target(
                r#"{"name": "t", "cluster": "c", "timeout_ms": 0}"#
            )),
            "rules[0].targets[0].timeout_ms: 0 is out of range; use 1 to 600000"
        );
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "max_body_bytes": 100000000}"#
        ))
        .starts_with("rules[0].targets[0].max_body_bytes: 100000000 is out of range"));
    }

    #[test]
    fn path_match_needs_exactly_one() {
        let two = r#"{"rules": [{"name": "r", "match": {"path": {"prefix": "/a", "exact": "/a"}}, "targets": [{"name": "t", "cluster": "c"}]}]}"#;
        assert_eq!(
            parse_err(two),
            "rules[0].match.path: set exactly one of `prefix`, `exact` or `regex`"
        );
        let none = r#"{"rules": [{"name": "r", "match": {"path": {}}, "targets": [{"name": "t", "cluster": "c"}]}]}"#;
        assert_eq!(
            parse_err(none),
            "rules[0].match.path: set exactly one of `prefix`, `exact` or `regex`"
        );
    }

    #[test]
    fn bad_regex_named() {
        let json = r#"{"rules": [{"name": "r", "match": {"path": {"regex": "/a(["}}, "targets": [{"name": "t", "cluster": "c"}]}]}"#;
        assert!(parse_err(json).starts_with("rules[0].match.path.regex: invalid regex \"/a([\""));
        let json = r#"{"rules": [{"name": "r", "match": {"headers": [{"name": "x", "regex": "*"}]}, "targets": [{"name": "t", "cluster": "c"}]}]}"#;
        assert!(parse_err(json).starts_with("rules[0].match.headers[0].regex: invalid regex"));
    }

    #[test]
    fn methods_must_be_upper_case() {
        let json = r#"{"rules": [{"name": "r", "match": {"methods": ["GET", "post"]}, "targets": [{"name": "t", "cluster": "c"}]}]}"#;
        assert!(parse_err(json).starts_with("rules[0].match.methods[1]: invalid method \"post\""));
        assert!(parse_err(json).contains("\"POST\""));
    }

    #[test]
    fn host_header_edits_rejected() {
        for edits in [
            r#"{"set": {"host": "evil.example"}}"#,
            r#"{"remove": ["Host"]}"#,
        ] {
            let json = one_target(&format!(
                r#"{{"name": "t", "cluster": "c", "headers": {edits}}}"#
            ));
            let message = parse_err(&json);
            assert!(
                message.contains("\"host\" is the request's authority"),
                "{message}"
            );
            assert!(message.contains("`authority` field"), "{message}");
        }
        let message = parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "idempotency_header": "host"}"#,
        ));
        assert!(
            message.starts_with("rules[0].targets[0].idempotency_header: \"host\""),
            "{message}"
        );
    }

    #[test]
    fn header_edits_checked() {
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "headers": {"set": {"x-a": "1\r\nx-evil: 1"}}}"#
        ))
        .starts_with("rules[0].targets[0].headers.set.x-a: value contains CR, LF or NUL"));
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "headers": {"set": {":path": "/x"}}}"#
        ))
        .starts_with("rules[0].targets[0].headers.set.:path: \":path\" is a pseudo-header"));
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "headers": {"remove": ["transfer-encoding"]}}"#
        ))
        .starts_with(
            "rules[0].targets[0].headers.remove[0]: \"transfer-encoding\" is a hop-by-hop header"
        ));
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "headers": {"set": {"x-mesh-fanout": "no"}}}"#
        ))
        .contains("marker header"));
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "headers": {"set": {"bad name": "v"}}}"#
        ))
        .contains("invalid header name \"bad name\""));
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "headers": {"set": {"X-A": "1", "x-a": "2"}}}"#
        ))
        .contains("set twice"));
    }

    #[test]
    fn header_set_sorted_last_value_wins() {
        let parsed = parse(one_target(r#"{"name": "t", "cluster": "c", "headers": {"set": {"x-b": "1", "x-a": "2", "x-b": "3"}}}"#).as_bytes()).unwrap();
        let target = &parsed.config.rules[0].targets[0];
        assert_eq!(
            target.set_headers,
            vec![
                ("x-a".to_string(), "2".to_string()),
                ("x-b".to_string(), "3".to_string())
            ]
        );
    }

    #[test]
    fn header_edit_names_lowercased() {
        let parsed = parse(one_target(r#"{"name": "t", "cluster": "c", "headers": {"set": {"X-Source": "m"}, "remove": ["Cookie"]}}"#).as_bytes()).unwrap();
        let target = &parsed.config.rules[0].targets[0];
        assert_eq!(target.set_headers[0].0, "x-source");
        assert_eq!(target.remove_headers, vec!["cookie"]);
    }

    #[test]
    fn authority_and_path_checked() {
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "authority": "a b"}"#
        ))
        .starts_with("rules[0].targets[0].authority: invalid authority"));
        assert!(parse_err(&one_target(
            r#"{"name": "t", "cluster": "c", "path": "ingest"}"#
        ))
        .starts_with("rules[0].targets[0].path: invalid path \"ingest\"; start with /"));
    }

    #[test]
    fn marker_header_checked() {
        assert!(parse_err(r#"{"marker_header": "X Bad", "rules": []}"#)
            .starts_with("marker_header: invalid header name"));
    }

    #[test]
    fn first_match_wins_in_order() {
        let json = r#"{"rules": [
            {"name": "a", "match": {"path": {"prefix": "/a"}}, "targets": [{"name": "t", "cluster": "c"}]},
            {"name": "b", "match": {"path": {"prefix": "/"}}, "targets": [{"name": "t", "cluster": "c"}]}
        ]}"#;
        let config = parse(json.as_bytes()).unwrap().config;
        let request = |path: &str| vec![(":path".to_string(), path.as_bytes().to_vec())];
        assert_eq!(
            config.first_match(&request("/a/1")).map(|(i, _)| i),
            Some(0)
        );
        assert_eq!(config.first_match(&request("/b")).map(|(i, _)| i), Some(1));
    }
}
